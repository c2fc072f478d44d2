//! The first stage: what this host brings to the launch, resolved before
//! anything is started (programs, accelerator, dev shell, image, network,
//! the program's environment).

use std::path::PathBuf;
use std::sync::Arc;

use crate::clipboard::HostClipboard;
use crate::config::Settings;
use crate::guest_env::cri;
use crate::guest_env::devshell::{self, DevShell};
use crate::guest_env::host_ca::{self, GuestTrust};
use crate::guest_env::login;
use crate::image::{self, Image, Store};
use crate::net::plan::NetworkPlan;
use crate::net::shield::{self, Shield};
use crate::net::{self, NetError};
use crate::sandbox::repo::{self, RepoBase, RepoError};
use crate::sandbox::store::SandboxPaths;
use crate::sandbox::SandboxName;
use crate::sys;
use crate::tools;
use crate::vm::share::{self, IdMap, ShareError};
use crate::vm::{accel, Accel};

/// A resource the launch needs is missing or unusable.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("qemu-system-x86_64 not found: `agentvm doctor --fix` installs it")]
    NoQemu,
    #[error("AGENTVM_GUEST_INIT={path} is not a file: unset it to use the guest init built into agentvm, or point it at a built agentvm-guest")]
    NoGuestInit { path: PathBuf },
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error(transparent)]
    Accel(#[from] accel::AccelError),
    #[error(transparent)]
    Devshell(#[from] devshell::DevshellError),
    #[error(transparent)]
    Paths(#[from] crate::paths::PathsError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("--shield-secrets: {0}")]
    Shield(#[from] shield::ShieldError),
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// The host's programs and files for one launch.
#[derive(Debug, Clone)]
pub struct Resources {
    pub qemu: PathBuf,
    pub guest_init: tools::GuestInit,
    pub accel: Accel,
    /// The host's TSC frequency, told to a TCG guest.
    pub tsc_khz: Option<u64>,
    pub image: Image,
    /// The kernel to boot (from the image).
    pub kernel: PathBuf,
    /// Agent layers (squashfs), topmost first.
    pub layers: Vec<PathBuf>,
    /// The host's Nix store, shared when the dev shell needs it.
    pub nix_store: Option<PathBuf>,
    pub network: NetworkPlan,
    /// The program's environment: the settings', with the dev shell's and
    /// with shielded keys swapped for placeholders.
    pub env: Vec<(String, String)>,
    /// The CA certificates the guest trusts: the host's (`--host-ca`) and
    /// the instance CA of `--shield-secrets`.
    pub trust: GuestTrust,
    /// The project's (or the sandbox's) container disk, when container
    /// runtimes run.
    pub cri_disk: Option<PathBuf>,
    /// The sandboxed clone (`--clone`).
    pub sandbox: Option<SandboxPlan>,
    /// The login files shared with every project (`--login=shared`).
    pub login: Option<login::Places>,
    pub ids: IdMap,
    /// The host's clipboard tool, when the clipboard is shared.
    pub clipboard: Option<HostClipboard>,
    /// Whether the program runs on a terminal (stdin and stdout are one).
    pub tty: bool,
    /// The terminal's size, when `tty`.
    pub winsize: Option<(u16, u16)>,
}

/// A sandboxed clone as the launch uses it.
#[derive(Debug, Clone)]
pub struct SandboxPlan {
    pub name: SandboxName,
    pub paths: SandboxPaths,
    /// Where a new sandbox starts: the project's branch and commit.
    pub base: RepoBase,
    /// The commit `agentvm/NAME` holds, when it is the sandbox's last result.
    pub held: Option<String>,
}

/// What resolving found that the later stages need besides [`Resources`].
pub struct Resolved {
    pub resources: Resources,
    pub shield: Option<Arc<Shield>>,
}

impl Resources {
    /// Finds or builds everything the launch needs. `warn` is told what the
    /// user should know (a TCG fallback, slirp, a dev shell problem, ...).
    pub fn resolve(settings: &Settings, warn: &mut dyn FnMut(String)) -> Result<Resolved, ResolveError> {
        // First: the project decides whether a sandbox can be made at all.
        let sandbox = sandbox_plan(settings)?;
        let guest_init = tools::guest_init();
        if let tools::GuestInit::File(path) = &guest_init {
            path.is_file().then_some(()).ok_or_else(|| ResolveError::NoGuestInit { path: path.clone() })?;
        }
        let qemu = tools::find_qemu().ok_or(ResolveError::NoQemu)?;
        share::find_virtiofsd().ok_or(ShareError::NoVirtiofsd)?;
        let (accel, fallback) = accel::choose(settings.accel)?;
        if let Some(why) = fallback {
            warn(format!("no usable KVM: {why}; falling back to TCG (slow)"));
        }
        let devshell = prepare_devshell(settings, warn)?;
        let (image, layers) = ensure_image(settings)?;
        let (network, net_warning) = NetworkPlan::decide(
            settings.network,
            settings.net_backend,
            &settings.ports,
            &settings.host_ports,
            settings.host_proxy.as_ref(),
            net::find_passt(),
        )?;
        if let Some(w) = net_warning {
            warn(w);
        }
        let env = match &devshell {
            Some(shell) => devshell::apply(&settings.guest_env.vars, shell),
            None => settings.guest_env.vars.clone(),
        };
        let (env, shield) = shield_secrets(settings, env, warn)?;
        let host_cas = host_ca::for_launch(settings.host_ca, &|var| std::env::var(var).ok(), warn);
        let trust = GuestTrust::new(host_cas.as_ref(), shield.as_ref().map(|s| s.ca_der()));
        let tty = sys::interactive();
        let clipboard = host_clipboard(settings, warn);
        let resources = Resources {
            qemu,
            guest_init,
            accel,
            tsc_khz: if accel == Accel::Tcg { accel::host_tsc_khz() } else { None },
            kernel: image.kernel(),
            image,
            layers,
            nix_store: devshell.and_then(|d| d.nix_store),
            network,
            trust,
            env,
            cri_disk: cri_disk_path(settings, sandbox.as_ref())?,
            sandbox,
            login: login::Places::for_run(settings)?,
            ids: IdMap::current(),
            clipboard,
            tty,
            winsize: if tty { sys::winsize(std::io::stdin()) } else { None },
        };
        Ok(Resolved { resources, shield })
    }
}

/// The host's clipboard tool when `--clipboard` shares it; without one the
/// launch goes on (the guest's tools then say why) after a warning.
fn host_clipboard(settings: &Settings, warn: &mut dyn FnMut(String)) -> Option<HostClipboard> {
    if !settings.clipboard.is_on() {
        return None;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let host = HostClipboard::detect(&|var| std::env::var(var).ok(), &path);
    if let Some(why) = host.problem() {
        warn(format!("--clipboard: {why}; the guest's clipboard tools will fail"));
    }
    Some(host)
}

/// The flavor's base image and agent layer, built if missing.
fn ensure_image(settings: &Settings) -> Result<(Image, Vec<PathBuf>), ResolveError> {
    let store = Store::open(Store::default_dir()?);
    let mut progress = image::TerminalProgress::new();
    let image = store.ensure(&image::base_recipe(&settings.flavor, !settings.cri.is_empty()), &mut progress)?;
    let layers = match image::layer_recipe(&settings.flavor) {
        Some(recipe) => vec![store.ensure_layer(&recipe, &mut progress)?.squashfs()],
        None => Vec::new(),
    };
    Ok((image, layers))
}

/// Environment variables, in order.
type Env = Vec<(String, String)>;

/// With `--shield-secrets`, the environment with placeholders and the
/// shield; else the environment as it is.
fn shield_secrets(
    settings: &Settings,
    env: Env,
    warn: &mut dyn FnMut(String),
) -> Result<(Env, Option<Arc<Shield>>), ResolveError> {
    if !settings.shield_secrets {
        return Ok((env, None));
    }
    let f = &settings.flavor;
    let keys = shield::FlavorKeys { names: &f.keys, headers: &f.key_headers, hosts: &f.secret_hosts };
    let shielded = shield::swap_secrets(&env, keys)?;
    if let Some(w) = shielded.warning {
        warn(w);
    }
    Ok((shielded.env, Some(Arc::new(shielded.shield))))
}

/// The sandbox `--clone` asks for, after checking the project (what only
/// a first run needs, only then).
fn sandbox_plan(settings: &Settings) -> Result<Option<SandboxPlan>, ResolveError> {
    let Some(choice) = &settings.clone else { return Ok(None) };
    let project = crate::paths::project_home_name(&settings.work_dir);
    let paths = SandboxPaths::new(&crate::paths::data_dir()?, &project, &choice.name);
    let base = repo::inspect(&settings.work_dir, !paths.exists())?;
    let held = crate::sandbox::import::held(&paths, &choice.name, &settings.work_dir);
    Ok(Some(SandboxPlan { name: choice.name.clone(), paths, base, held }))
}

/// Where the container disk is, when container runtimes run: the
/// sandbox's own, else the project's.
fn cri_disk_path(settings: &Settings, sandbox: Option<&SandboxPlan>) -> Result<Option<PathBuf>, ResolveError> {
    if settings.cri.is_empty() {
        return Ok(None);
    }
    if let Some(s) = sandbox {
        return Ok(Some(s.paths.containers()));
    }
    let name = crate::paths::project_home_name(&settings.work_dir);
    Ok(Some(cri::disk_path(&crate::paths::data_dir()?, &name)))
}

/// Evaluates the project's dev shell when the settings ask for it, if the
/// user trusted its files. With `--devshell=try` a failure (an untrusted
/// file too) is a warning and the launch goes on without.
fn prepare_devshell(settings: &Settings, warn: &mut dyn FnMut(String)) -> Result<Option<DevShell>, ResolveError> {
    if settings.devshell == devshell::Mode::Off {
        return Ok(None);
    }
    let state_dir = crate::paths::project_state_dir(&settings.work_dir)?;
    let trusted = crate::config::trust::TrustStore::default_location()?.load(&settings.work_dir);
    let loaded = trusted.map_err(devshell::DevshellError::from).and_then(|trusted| {
        devshell::load(
            &devshell::Request::for_host(&settings.work_dir, state_dir, trusted, settings.devshell_files.clone()),
            &mut image::TerminalProgress::labeled("agentvm"),
        )
    });
    match loaded {
        Ok(Some(mut shell)) => {
            std::mem::take(&mut shell.warnings).into_iter().for_each(&mut *warn);
            Ok(Some(shell))
        }
        Ok(None) => {
            warn(format!(
                "--devshell: {} has no flake.nix, devenv.nix, .devenv.flake.nix or .envrc; running without a dev shell",
                settings.work_dir.display()
            ));
            Ok(None)
        }
        Err(e) if settings.devshell == devshell::Mode::Try => {
            warn(e.to_string());
            warn("starting without the dev shell (--devshell=try)".into());
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::plan::tests::settings;

    #[test]
    fn the_container_disk_is_the_sandboxs_own_with_a_sandbox() {
        let name = SandboxName::parse("fix-1").unwrap();
        let paths = SandboxPaths::new(std::path::Path::new("/data"), "project-0", &name);
        let sandbox = SandboxPlan { name, paths, base: RepoBase { branch: None, commit: "c0ffee".into() }, held: None };
        let s = Settings { cri: vec![cri::Runtime::Docker], ..settings() };
        let disk = cri_disk_path(&s, Some(&sandbox)).unwrap().unwrap();
        assert_eq!(disk, std::path::Path::new("/data/sandboxes/project-0/fix-1/containers.ext4"));
        assert_eq!(cri_disk_path(&settings(), Some(&sandbox)).unwrap(), None, "no runtimes, no disk");
    }
}
