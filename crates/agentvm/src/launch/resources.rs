//! The first stage: what this host brings to the launch, resolved before
//! anything is started (programs, accelerator, dev shell, image, network,
//! the program's environment).

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Settings;
use crate::guest_env::cri;
use crate::guest_env::devshell::{self, DevShell};
use crate::guest_env::host_ca::{self, GuestTrust};
use crate::image::{self, Image, Store};
use crate::net::plan::NetworkPlan;
use crate::net::shield::{self, Shield};
use crate::net::{self, NetError};
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
    /// The project's container disk, when container runtimes run.
    pub cri_disk: Option<PathBuf>,
    pub ids: IdMap,
    /// Whether the program runs on a terminal (stdin and stdout are one).
    pub tty: bool,
    /// The terminal's size, when `tty`.
    pub winsize: Option<(u16, u16)>,
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
            cri_disk: cri_disk_path(settings)?,
            ids: IdMap::current(),
            tty,
            winsize: if tty { sys::winsize(std::io::stdin()) } else { None },
        };
        Ok(Resolved { resources, shield })
    }
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

/// Where the project's container disk is, when container runtimes run.
fn cri_disk_path(settings: &Settings) -> Result<Option<PathBuf>, ResolveError> {
    if settings.cri.is_empty() {
        return Ok(None);
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
