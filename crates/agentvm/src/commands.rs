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
    // With and without the container runtimes: both are in use.
    let bases: Vec<Recipe> = flavors.values().flat_map(|f| [base_recipe(f, false), base_recipe(f, true)]).collect();
    let layers: Vec<LayerRecipe> = flavors.values().filter_map(layer_recipe).collect();
    Ok((store.prune(&bases, &layers)?, warning))
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

    #[test]
    fn the_project_of_a_command_is_its_dir_else_work_dir_else_here() {
        let env = |v: &'static str| move |name: &str| (name == "WORK_DIR").then(|| v.to_string());
        assert_eq!(config::project_dir(Some("/a".into()), &env("/b")), Path::new("/a"));
        assert_eq!(config::project_dir(None, &env("/b")), Path::new("/b"));
        assert_eq!(config::project_dir(None, &env("")), Path::new("."));
    }
}
