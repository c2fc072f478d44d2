//! What the commands other than `run` do, as data: the binary parses the
//! command line, calls one of these and prints what comes back (warnings
//! included).

use crate::image::template::{Template, Templates};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::flavor::{self, Flavor, FlavorError};
use crate::config::trust::{self, TrustError};
use crate::config::{self, SettingsError};
use crate::guest_env::cri::{self, CriError};
use crate::image::{base_recipe, layer_recipe};
use crate::image::{Image, ImageError, Layer, LayerRecipe, Progress, Recipe, Store};
use crate::instance::exec::{self, ExecError, ExecOptions};
use crate::instance::ps;
use crate::launch::{self, LaunchError};
use crate::net::NetworkMode;
use crate::paths::{self, PathsError};
use crate::sandbox::import::{ImportError, Imported};
use crate::sandbox::store::{self, SandboxPaths, StoreError};
use crate::sandbox::{NameError, SandboxName};

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
    #[error(transparent)]
    SandboxName(#[from] NameError),
    #[error(transparent)]
    Sandbox(#[from] StoreError),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("sandbox {name}: its export failed ({why}); its work stays on its disk")]
    ExportFailed { name: String, why: String },
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

/// One row of `agentvm sandbox ls`, also its JSON form. `branch`,
/// `ahead` and `dirty` are the sandbox's word at its last export.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SandboxRow {
    pub name: String,
    pub project: PathBuf,
    /// Its checked-out branch.
    pub branch: Option<String>,
    /// The host branch it started from.
    pub base: Option<String>,
    /// Commits ahead of `base`.
    pub ahead: Option<u64>,
    pub dirty: Option<bool>,
    /// What its disk takes on the host.
    pub disk_bytes: u64,
    pub running: bool,
    /// Unix seconds.
    pub last_run: Option<u64>,
    /// The commit `agentvm/NAME` was last set to from it.
    pub exported: Option<String>,
}

/// `agentvm sandbox ls`: every sandbox of every project.
pub fn sandbox_ls() -> Result<Vec<SandboxRow>, CommandError> {
    let live = ps::live_instances(&paths::runtime_base());
    let running = |r: &store::Record| {
        live.iter().any(|l| l.meta.sandbox.as_deref() == Some(&r.name) && l.meta.work_dir == r.project)
    };
    let rows = store::list(&paths::data_dir()?).into_iter().map(|l| {
        let status = l.record.status.as_ref();
        SandboxRow {
            running: running(&l.record),
            name: l.record.name.clone(),
            project: l.record.project.clone(),
            branch: status.and_then(|s| s.branch.clone()),
            base: status.and_then(|s| s.base.clone()).or(l.record.base_branch.clone()),
            ahead: status.and_then(|s| s.ahead),
            dirty: status.map(|s| s.dirty),
            disk_bytes: l.disk_bytes,
            last_run: l.record.last_run,
            exported: l.record.exported,
        }
    });
    Ok(rows.collect())
}

/// The `agentvm sandbox ls` table (with its header line). What the
/// sandboxes said about themselves is shown escaped.
pub fn sandbox_table(rows: &[SandboxRow]) -> String {
    let header = ["NAME", "BRANCH", "AHEAD", "DIRTY", "DISK", "RUNNING", "LAST RUN (UTC)", "PROJECT"];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for r in rows {
        table.push(vec![
            r.name.clone(),
            or_dash(r.branch.as_deref().map(crate::escape::printable_text)),
            or_dash(
                r.ahead
                    .map(|n| format!("{n} ({})", r.base.as_deref().map_or("-".into(), crate::escape::printable_text))),
            ),
            or_dash(r.dirty.map(|d| if d { "yes" } else { "no" }.to_string())),
            format!("{}M", r.disk_bytes >> 20),
            if r.running { "yes" } else { "no" }.into(),
            or_dash(r.last_run.map(crate::instance::format_utc)),
            r.project.display().to_string(),
        ]);
    }
    ps::aligned(&table)
}

/// The sandbox `name` of the project `dir` (else `$WORK_DIR`, else `.`):
/// its name, paths and project (a real path).
fn sandbox_of(
    name: &str,
    dir: Option<PathBuf>,
    get_env: &dyn Fn(&str) -> Option<String>,
) -> Result<(SandboxName, SandboxPaths, PathBuf), CommandError> {
    let name = SandboxName::parse(name)?;
    let dir = config::project_dir(dir, get_env);
    let project = dir.canonicalize().map_err(|source| CommandError::WorkDir { path: dir, source })?;
    let paths = SandboxPaths::new(&paths::data_dir()?, &paths::project_home_name(&project), &name);
    if !paths.exists() {
        return Err(StoreError::Missing { name: name.to_string(), project }.into());
    }
    Ok((name, paths, project))
}

/// `agentvm sandbox rm`: removes the project's sandboxes `names` (none
/// while one runs); their branches stay.
pub fn sandbox_rm(
    names: &[String],
    dir: Option<PathBuf>,
    get_env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<PathBuf>, CommandError> {
    let found = names.iter().map(|n| sandbox_of(n, dir.clone(), get_env)).collect::<Result<Vec<_>, _>>()?;
    let mut removed = Vec::new();
    for (name, paths, project) in found {
        store::remove(&paths, &name, &project)?;
        removed.push(paths.dir);
    }
    Ok(removed)
}

/// `agentvm sandbox export`: the sandbox's work as `agentvm/NAME` now.
/// A running sandbox is asked through an exec session; a stopped one is
/// booted to run nothing but its export (no network, no ports).
pub fn sandbox_export(
    name: &str,
    dir: Option<PathBuf>,
    get_env: &dyn Fn(&str) -> Option<String>,
    warn: &mut dyn FnMut(String),
) -> Result<Imported, CommandError> {
    let (name, paths, project) = sandbox_of(name, dir, get_env)?;
    let live = ps::live_instances(&paths::runtime_base());
    let running = live.iter().find(|l| l.meta.sandbox.as_deref() == Some(name.as_str()) && l.meta.work_dir == project);
    let Some(instance) = running else { return export_by_booting(&name, &project, warn) };
    store::empty_export_dir(&paths)?;
    let argv = vec![agentvm_proto::guest::SANDBOX_TOOL.to_string(), "export".into()];
    let code =
        exec::exec(&paths::runtime_base(), &instance.meta.id, ExecOptions { argv, tty: Some(false), no_input: true })?;
    if code != 0 {
        return Err(CommandError::ExportFailed { name: name.to_string(), why: format!("exit status {code}") });
    }
    Ok(crate::sandbox::import::import(&paths, &name, &project)?)
}

/// Boots the stopped sandbox `name` of `project` to run `true`: its work
/// comes back when that ends, as after any run.
fn export_by_booting(
    name: &SandboxName,
    project: &Path,
    warn: &mut dyn FnMut(String),
) -> Result<Imported, CommandError> {
    let flags = config::RunOptions {
        clone: Some(name.to_string()),
        flavor: Some("shell".into()),
        args: vec!["true".into()],
        work_dir: Some(project.to_path_buf()),
        ..Default::default()
    };
    let mut settings = config::resolve(flags)?;
    // Only the export: nothing reaches out, nothing is published.
    settings.network = NetworkMode::None;
    (settings.ports, settings.host_ports, settings.cri) = (Vec::new(), Vec::new(), Vec::new());
    (settings.shield_secrets, settings.devshell, settings.clone_disk_mib) = (false, Default::default(), None);
    settings.warnings.into_iter().for_each(&mut *warn);
    settings.warnings = Vec::new();
    let outcome = launch::run(&settings, std::time::Instant::now(), warn)?;
    match (outcome.result, outcome.sandbox) {
        (Ok(0), Some(imported)) => Ok(imported?),
        (Ok(code), _) => Err(CommandError::ExportFailed { name: name.to_string(), why: format!("exit status {code}") }),
        (Err(e), _) => Err(CommandError::ExportFailed { name: name.to_string(), why: e.to_string() }),
    }
}

/// `agentvm image prune`: removes the images and layers no recipe of the
/// flavors known here uses; returns what was removed, and the warning
/// about an ignored project config.
pub fn image_prune(store: &Store) -> Result<(Vec<PathBuf>, Option<String>), CommandError> {
    let (flavors, warning) = flavors_here()?;
    let (bases, layers) = current_recipes(&flavors);
    let mut removed = store.prune(&bases, &layers)?;
    removed.extend(Templates::new(store).prune()?);
    Ok((removed, warning))
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
    let templates = Templates::new(store);
    listed.extend(templates.list()?.into_iter().map(|t| Listed {
        state: if templates.is_current(&t) { RecipeState::Current } else { RecipeState::OldRecipe },
        contents: format!(
            "warm-start template: {} MiB, {} CPUs, {} of {}",
            t.meta.memory_mib,
            t.meta.cpus,
            t.meta.accel,
            std::iter::once(&t.meta.image).chain(&t.meta.layers).cloned().collect::<Vec<_>>().join(" + ")
        ),
        size_bytes: t.meta.ram_used,
        created: t.meta.created,
        built_by: t.meta.built_by,
        dir: t.dir,
    }));
    Ok(listed)
}

/// `agentvm image rm NAME`: the images and layers `name` matches, or the
/// warm-start templates (`template-<key16>`, or `templates` for all).
pub fn image_remove(store: &Store, name: &str) -> Result<Vec<PathBuf>, ImageError> {
    if name == "templates" || name.starts_with(crate::image::template::PREFIX) {
        let removed = Templates::new(store).remove(name)?;
        if removed.is_empty() {
            return Err(ImageError::NoMatch { query: name.to_string(), dir: store.dir().to_path_buf() });
        }
        return Ok(removed);
    }
    Ok(store.remove(name)?.into_iter().map(|e| e.dir).collect())
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

/// The warm-start templates of a plain `agentvm run FLAVOR` in the current
/// project for each of `flavors` (none: of a plain `agentvm run`), made
/// unless the store has them (`agentvm image build --warm`); with the name
/// of the flavor each serves.
pub fn warm_templates(
    flavors: &[String],
    warn: &mut dyn FnMut(String),
) -> Result<Vec<(String, Template)>, CommandError> {
    let runs: Vec<Option<String>> =
        if flavors.is_empty() { vec![None] } else { flavors.iter().cloned().map(Some).collect() };
    let mut made = Vec::new();
    for flavor in runs {
        let settings = config::resolve(config::RunOptions { flavor, ..Default::default() })?;
        settings.warnings.iter().chain(&settings.guest_env.warnings).for_each(|w| warn(w.clone()));
        let template = launch::make_template(&settings, warn)?;
        made.push((settings.flavor.name.clone(), template));
    }
    Ok(made)
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
            watch_module: None,
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
