//! What the commands other than `run` do, as data: the binary parses the
//! command line, calls one of these and prints what comes back (warnings
//! included).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::flavor::{self, Flavor, FlavorError};
use crate::config::trust::{self, TrustError};
use crate::config::{self, SettingsError};
use crate::guest_env::cri::{self, CriError};
use crate::image::{base_recipe, layer_recipe};
use crate::image::{Image, ImageError, Layer, LayerRecipe, Progress, Recipe, Store};
use crate::paths::{self, PathsError};

/// A command that failed, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot read the current directory: {0}")]
    CurrentDir(#[source] std::io::Error),
    #[error("work dir {path}: {source}; pass an existing directory with --work-dir")]
    WorkDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Flavor(#[from] FlavorError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error(transparent)]
    Cri(#[from] CriError),
    #[error(transparent)]
    Paths(#[from] PathsError),
}

/// The flavors as seen from the current directory (built-in, the user's,
/// the project's if trusted), and the warning about an ignored project
/// config.
pub fn flavors_here() -> Result<(BTreeMap<String, Flavor>, Option<String>), CommandError> {
    let cwd = std::env::current_dir().map_err(CommandError::CurrentDir)?;
    Ok(config::flavors_for(&cwd)?)
}

/// `agentvm trust` in the project `dir` (else `$WORK_DIR` from `get_env`,
/// else `.`): the text to print. The user config's `devshell_files` are
/// dev shell files too.
pub fn trust(
    action: trust::Action,
    dir: Option<PathBuf>,
    get_env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, CommandError> {
    let user_files = match action {
        trust::Action::Revoke => Vec::new(),
        trust::Action::Trust | trust::Action::Show => config::user_layer()?.devshell_files,
    };
    Ok(trust::command(action, &config::project_dir(dir, get_env), &user_files)?)
}

/// What `agentvm cri prune` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pruned {
    /// The container disk at this path is gone.
    Removed(PathBuf),
    /// The project (a real path) has no container disk.
    NoDisk(PathBuf),
}

/// `agentvm cri prune`: removes the container disk of the project `dir`
/// (else `$WORK_DIR` from `get_env`, else `.`).
pub fn cri_prune(dir: Option<PathBuf>, get_env: &dyn Fn(&str) -> Option<String>) -> Result<Pruned, CommandError> {
    let dir = config::project_dir(dir, get_env);
    let real = dir.canonicalize().map_err(|source| CommandError::WorkDir { path: dir, source })?;
    let disk = cri::disk_path(&paths::data_dir()?, &paths::project_home_name(&real));
    Ok(if cri::remove_disk(&disk)? { Pruned::Removed(disk) } else { Pruned::NoDisk(real) })
}

/// `agentvm image prune`: removes the images and layers no recipe of the
/// flavors known here uses; returns what was removed, and the warning
/// about an ignored project config.
pub fn image_prune(store: &Store) -> Result<(Vec<PathBuf>, Option<String>), CommandError> {
    let (flavors, warning) = flavors_here()?;
    let (bases, layers) = current_recipes(&flavors);
    Ok((store.prune(&bases, &layers)?, warning))
}

/// What the flavors build now: the base images (with and without the
/// container runtimes: both are in use) and the agent layers.
fn current_recipes(flavors: &BTreeMap<String, Flavor>) -> (Vec<Recipe>, Vec<LayerRecipe>) {
    let bases = flavors.values().flat_map(|f| [base_recipe(f, false), base_recipe(f, true)]).collect();
    (bases, flavors.values().filter_map(layer_recipe).collect())
}

/// How a cached image or layer stands against what agentvm builds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipeState {
    /// A recipe of the flavors known here builds exactly it.
    Current,
    /// An older build procedure made it: its recorded recipe has another
    /// key under today's [`crate::image::RECIPE_FORMAT`] (or
    /// [`crate::image::LAYER_FORMAT`]).
    OldFormat,
    /// Today's procedure, but no recipe known here is its recipe (an older
    /// agentvm's package list, or a flavor that changed or is gone).
    OldRecipe,
}

impl RecipeState {
    /// How `image ls` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            RecipeState::Current => "current",
            RecipeState::OldFormat => "old format",
            RecipeState::OldRecipe => "old recipe",
        }
    }

    fn of(key: &str, key_now: &str, current: &[String]) -> RecipeState {
        if current.iter().any(|k| k == key) {
            RecipeState::Current
        } else if key != key_now {
            RecipeState::OldFormat
        } else {
            RecipeState::OldRecipe
        }
    }
}

/// One image or layer, as `agentvm image ls` shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub dir: PathBuf,
    pub size_bytes: u64,
    pub created: u64,
    /// The agentvm that built it (empty: one from before that was recorded).
    pub built_by: String,
    pub state: RecipeState,
    /// Its kernel (an image) or its packages' versions (a layer).
    pub contents: String,
}

/// `agentvm image ls`: the cached images, then the layers, each with how
/// it stands against today's recipes; and the warning about an ignored
/// project config.
pub fn image_list(store: &Store) -> Result<(Vec<Listed>, Option<String>), CommandError> {
    let (flavors, warning) = flavors_here()?;
    Ok((list_cached(store, &flavors)?, warning))
}

/// The cached images, then the layers, against the recipes of `flavors`.
fn list_cached(store: &Store, flavors: &BTreeMap<String, Flavor>) -> Result<Vec<Listed>, ImageError> {
    let (bases, layers) = current_recipes(flavors);
    let (bases, layers): (Vec<String>, Vec<String>) =
        (bases.iter().map(Recipe::key).collect(), layers.iter().map(LayerRecipe::key).collect());
    let mut listed: Vec<Listed> = store
        .list()?
        .into_iter()
        .map(|i| Listed {
            state: RecipeState::of(&i.meta.key, &i.meta.recipe.key(), &bases),
            contents: format!("kernel {}", i.meta.kernel_release),
            size_bytes: i.meta.size_bytes,
            created: i.meta.created,
            built_by: i.meta.built_by,
            dir: i.dir,
        })
        .collect();
    listed.extend(store.list_layers()?.into_iter().map(|l| Listed {
        state: RecipeState::of(&l.meta.key, &l.meta.recipe.key(), &layers),
        contents: versions(&l.meta.versions),
        size_bytes: l.meta.size_bytes,
        created: l.meta.created,
        built_by: l.meta.built_by,
        dir: l.dir,
    }));
    Ok(listed)
}

/// `package@version, ...`
pub fn versions<'a>(versions: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    versions.into_iter().map(|(p, v)| format!("{p}@{v}")).collect::<Vec<_>>().join(", ")
}

/// `agentvm image build`: the images and layers to build, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBuild {
    pub bases: Vec<Recipe>,
    pub layers: Vec<LayerRecipe>,
    /// Rebuild the base images even if cached.
    pub rebuild_bases: bool,
    /// Rebuild the layers even if cached (picks up new agent versions).
    pub rebuild_layers: bool,
}

/// One image or layer built (or found cached).
#[derive(Debug, Clone)]
pub enum Built {
    Image(Image),
    Layer(Layer),
}

impl ImageBuild {
    /// The build of the base image and the layers of the flavors `names`
    /// (from `flavors`); `cri`: with the container runtimes too.
    pub fn plan(
        flavors: &BTreeMap<String, Flavor>,
        names: &[String],
        refresh: bool,
        base: bool,
        cri: bool,
    ) -> Result<ImageBuild, CommandError> {
        let chosen = names.iter().map(|n| flavor::resolve(flavors, n)).collect::<Result<Vec<_>, _>>()?;
        let mut bases = vec![Recipe::base()];
        bases.extend(chosen.iter().map(|f| base_recipe(f, false)));
        if cri {
            bases.push(base_recipe(&flavor::resolve(flavors, "shell")?, true));
            bases.extend(chosen.iter().map(|f| base_recipe(f, true)));
        }
        bases.dedup();
        let layers = chosen.iter().filter_map(layer_recipe).collect();
        Ok(ImageBuild { bases, layers, rebuild_bases: refresh && base, rebuild_layers: refresh })
    }

    /// Builds each in turn, as the iterator is consumed.
    pub fn run<'a>(
        self,
        store: &'a Store,
        progress: &'a mut dyn Progress,
    ) -> impl Iterator<Item = Result<Built, ImageError>> + 'a {
        enum Step {
            Base(Recipe),
            Layer(LayerRecipe),
        }
        let steps = self.bases.into_iter().map(Step::Base).chain(self.layers.into_iter().map(Step::Layer));
        steps.map(move |step| match step {
            Step::Base(base) if self.rebuild_bases => store.build(&base, progress).map(Built::Image),
            Step::Base(base) => store.ensure(&base, progress).map(Built::Image),
            Step::Layer(layer) if self.rebuild_layers => store.build_layer(&layer, progress).map(Built::Layer),
            Step::Layer(layer) => store.ensure_layer(&layer, progress).map(Built::Layer),
        })
    }
}

impl Built {
    /// The directory it is in.
    pub fn dir(&self) -> &Path {
        match self {
            Built::Image(image) => &image.dir,
            Built::Layer(layer) => &layer.dir,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn image_build_plans_the_base_then_each_flavors_image_and_layer() {
        let flavors = flavor::builtin_flavors();
        let plan = ImageBuild::plan(&flavors, &names(&["claude", "shell"]), false, false, false).unwrap();
        assert_eq!(plan.bases, [Recipe::base()], "neither flavor adds Debian packages");
        assert_eq!(plan.layers.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), ["claude"]);
        assert!(!plan.rebuild_bases && !plan.rebuild_layers);

        let plan = ImageBuild::plan(&flavors, &names(&["codex"]), true, false, true).unwrap();
        assert_eq!(plan.bases, [Recipe::base(), base_recipe(&flavors["shell"], true)]);
        assert!(plan.rebuild_layers && !plan.rebuild_bases, "--refresh rebuilds the base only with --base");

        let e = ImageBuild::plan(&flavors, &names(&["emacs"]), false, false, false).unwrap_err();
        assert!(e.to_string().contains("unknown flavor \"emacs\""), "{e}");
    }

    /// Publishes a fake image of `recipe` under `key`, as `built_by` built it.
    fn cached_image(store: &Store, recipe: &Recipe, key: String, built_by: &str) {
        let dir = store.dir().join(format!("{}-{}", recipe.name, &key[..16]));
        std::fs::create_dir_all(dir.join("modules")).unwrap();
        for file in ["vmlinuz", "root.squashfs"] {
            std::fs::write(dir.join(file), b"x").unwrap();
        }
        let meta = crate::image::ImageMeta {
            name: recipe.name.clone(),
            key,
            recipe: recipe.clone(),
            kernel_release: "6.12-test".into(),
            modules: Vec::new(),
            created: 1,
            size_bytes: 2,
            compressor: "lz4".into(),
            package_versions: Default::default(),
            built_by: built_by.into(),
        };
        std::fs::write(dir.join("image.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
    }

    #[test]
    fn image_list_tells_current_images_from_an_older_format_or_recipe() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("images"));
        let base = Recipe::base();
        cached_image(&store, &base, base.key(), "0.1.0 (commit 0123456789ab)");
        // The same recipe hashed under an older RECIPE_FORMAT: another key.
        cached_image(&store, &base, "ab".repeat(32), "");
        let older = Recipe { packages: vec!["linux-image-cloud-amd64".into()], ..base.clone() };
        cached_image(&store, &older, older.key(), "");

        let listed = list_cached(&store, &flavor::builtin_flavors()).unwrap();
        let state = |key16: &str| {
            let l = listed.iter().find(|l| l.dir.to_string_lossy().ends_with(key16)).unwrap();
            (l.state, l.built_by.as_str())
        };
        assert_eq!(state(&base.key()[..16]), (RecipeState::Current, "0.1.0 (commit 0123456789ab)"));
        assert_eq!(state(&"ab".repeat(8)), (RecipeState::OldFormat, ""));
        assert_eq!(state(&older.key()[..16]), (RecipeState::OldRecipe, ""));
    }

    #[test]
    fn the_project_of_a_command_is_its_dir_else_work_dir_else_here() {
        let env = |v: &'static str| move |name: &str| (name == "WORK_DIR").then(|| v.to_string());
        assert_eq!(config::project_dir(Some("/a".into()), &env("/b")), Path::new("/a"));
        assert_eq!(config::project_dir(None, &env("/b")), Path::new("/b"));
        assert_eq!(config::project_dir(None, &env("")), Path::new("."));
    }
}
