//! Resolving one launch's settings.
//!
//! Layers, later wins: built-in defaults < `~/.config/agentvm/config.toml` <
//! `<project>/.agentvm.toml` < environment (`WORK_DIR`, `AGENT_HOME`,
//! `AGENTVM_MEMORY`, `AGENTVM_CPUS`, `AGENTVM_ACCEL`, `AGENTVM_FLAVOR`,
//! `DIRENV_ALLOW`) <
//! command-line flags. Flavors (`[flavors.NAME]`) merge field by field:
//! built-in < user config < project config.
//! The project config is written where the guest can write too: it is used
//! only when the user trusted its current content ([`crate::config::trust`]), and
//! is otherwise ignored with a warning.
//! The result is validated once, here, before anything starts; shares that
//! would hand the guest the whole host, the user's home or agentvm's own
//! state are refused.

pub mod envvars;
pub mod flavor;
pub mod trust;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use std::collections::BTreeMap;

use crate::guest_env::cri::Runtime;
use crate::guest_env::devshell;
use crate::net::egress::{AllowList, EgressError};
use crate::net::{self, NetBackend, NetError, NetworkMode, PortSpec};
use crate::paths;
use crate::vm::share::CacheMode;
use crate::vm::AccelChoice;
use envvars::{EnvError, GuestEnv};
use flavor::{Flavor, FlavorError, FlavorOverride, DEFAULT_FLAVOR};
use trust::{FilePattern, ProjectConfig, TrustError, TrustStore};

/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u64 = 4096;
/// Smallest guest memory that boots our image with room for a program.
pub const MIN_MEMORY_MIB: u64 = 256;
/// Default vCPUs: the smaller of this and the host's cores.
pub const DEFAULT_MAX_CPUS: u32 = 4;
/// Default guest memory when container runtimes are on (unless the user
/// set one): image builds and several containers need room.
pub const CRI_MEMORY_MIB: u64 = 8192;
/// The project config file's name, in the work dir.
pub const PROJECT_CONFIG: &str = ".agentvm.toml";

/// One layer of settings, as found in a config file or the environment.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    /// Guest memory: `4G`, `4096M`, `4096` (MiB).
    pub memory: Option<String>,
    pub cpus: Option<u32>,
    pub accel: Option<AccelChoice>,
    /// Agent home directory (absolute, or relative to the file's directory).
    pub home: Option<PathBuf>,
    /// The flavor `run` starts when none is named.
    pub flavor: Option<String>,
    /// `open` (default) or `none`.
    pub network: Option<NetworkMode>,
    /// `auto` (default), `passt` or `slirp`.
    pub net_backend: Option<NetBackend>,
    /// virtiofs caching of /work: `auto` (default), `always`, `metadata`, `never`.
    pub work_cache: Option<CacheMode>,
    /// Published ports, `[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]`; the
    /// layers' lists add up.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Host loopback ports the guest may reach at host.agentvm.internal;
    /// the layers' lists add up.
    #[serde(default)]
    pub host_ports: Vec<u16>,
    /// Host names the guest may reach under `--network allow`, on top of
    /// the flavor's; the layers' lists add up.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Give the guest placeholders for the flavor's keys (`--shield-secrets`).
    pub shield_secrets: Option<bool>,
    /// Container runtimes to start in the guest, e.g. "docker,podman".
    pub cri: Option<String>,
    /// Size limit of the project's container disk, e.g. "32G".
    pub cri_disk_size: Option<String>,
    /// The project's dev shell: `off` (default), `on` or `try`.
    pub devshell: Option<devshell::Mode>,
    /// Project files the dev shell reads besides the Nix files (trusted,
    /// copied and cached with them); the layers' lists add up.
    #[serde(default)]
    pub devshell_files: Vec<FilePattern>,
    /// `[flavors.NAME]` tables: new flavors or changes to existing ones.
    /// Not merged by [`Layer::merge`]: flavors merge field by field.
    #[serde(default)]
    pub flavors: BTreeMap<String, FlavorOverride>,
}

impl Layer {
    /// Lays `over` on top of `self`.
    pub fn merge(self, over: Layer) -> Layer {
        Layer {
            memory: over.memory.or(self.memory),
            cpus: over.cpus.or(self.cpus),
            accel: over.accel.or(self.accel),
            home: over.home.or(self.home),
            flavor: over.flavor.or(self.flavor),
            network: over.network.or(self.network),
            net_backend: over.net_backend.or(self.net_backend),
            work_cache: over.work_cache.or(self.work_cache),
            ports: self.ports.into_iter().chain(over.ports).collect(),
            host_ports: self.host_ports.into_iter().chain(over.host_ports).collect(),
            allow: self.allow.into_iter().chain(over.allow).collect(),
            shield_secrets: over.shield_secrets.or(self.shield_secrets),
            cri: over.cri.or(self.cri),
            cri_disk_size: over.cri_disk_size.or(self.cri_disk_size),
            devshell: over.devshell.or(self.devshell),
            devshell_files: self.devshell_files.into_iter().chain(over.devshell_files).collect(),
            flavors: BTreeMap::new(),
        }
    }
}

/// What the command line asked for (`None`: not given).
#[derive(Debug, Default, Clone)]
pub struct Request {
    pub work_dir: Option<PathBuf>,
    pub home: Option<PathBuf>,
    pub memory: Option<String>,
    pub cpus: Option<u32>,
    pub accel: Option<AccelChoice>,
    pub flavor: Option<String>,
    pub args: Vec<String>,
    /// `-e NAME` / `-e NAME=VALUE`, in order.
    pub env: Vec<String>,
    /// `--network`.
    pub network: Option<NetworkMode>,
    /// `--net-backend`.
    pub net_backend: Option<NetBackend>,
    /// `-p/--publish`, in order.
    pub publish: Vec<String>,
    /// `--host-port`, in order.
    pub host_ports: Vec<u16>,
    /// `--allow NAME`, in order.
    pub allow: Vec<String>,
    /// `--shield-secrets`.
    pub shield_secrets: bool,
    /// `--cri LIST`.
    pub cri: Option<String>,
    /// `--cri-disk-size SIZE`.
    pub cri_disk_size: Option<String>,
    /// `--env-file FILE`, in order.
    pub env_files: Vec<PathBuf>,
    /// `--devshell[=MODE]`.
    pub devshell: Option<devshell::Mode>,
    pub verbose: bool,
}

/// The resolved, validated settings of one launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The project directory (real path), shared at /work.
    pub work_dir: PathBuf,
    /// The persistent agent home, shared at /home/agent.
    pub home_dir: PathBuf,
    pub flavor: Flavor,
    /// The program and arguments to run; empty: a login shell.
    pub argv: Vec<String>,
    /// The program's environment (may hold secrets; Debug redacts values).
    pub guest_env: GuestEnv,
    pub network: NetworkMode,
    pub net_backend: NetBackend,
    /// virtiofs caching of the work share.
    pub work_cache: CacheMode,
    /// Published ports, checked: valid, unique, free at resolve time.
    pub ports: Vec<PortSpec>,
    /// Host loopback ports opened to the guest, checked: each once.
    pub host_ports: Vec<u16>,
    /// Names the guest may reach under [`NetworkMode::Allow`]: the
    /// flavor's preset plus the user's.
    pub allow: AllowList,
    /// Put placeholders for the flavor's keys in the guest; the proxy puts
    /// the real ones in (implies [`NetworkMode::Allow`]).
    pub shield_secrets: bool,
    /// Container runtimes to start in the guest, in the order given.
    pub cri: Vec<Runtime>,
    /// Size of the project's container disk when it is created.
    pub cri_disk_mib: u64,
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: AccelChoice,
    /// Whether to apply the project's dev shell (Nix, devenv, direnv).
    pub devshell: devshell::Mode,
    /// Project files the dev shell reads besides the Nix files.
    pub devshell_files: Vec<FilePattern>,
    pub verbose: bool,
    /// Things the user should know (printed by the caller as warnings),
    /// e.g. an untrusted project config that was ignored.
    pub warnings: Vec<String>,
}

/// Settings that cannot be used, with what to do about them.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("work dir {path}: {why}; pass an existing directory with --work-dir or WORK_DIR")]
    WorkDir { path: PathBuf, why: String },
    #[error("cannot read config {path}: {why}")]
    ReadConfig { path: PathBuf, why: String },
    #[error("config {path} is invalid: {why}")]
    ParseConfig { path: PathBuf, why: String },
    #[error("memory {0:?} is not a size: use e.g. 4G, 2048M or 2048 (MiB)")]
    MemoryFormat(String),
    #[error("memory {value:?} is below the minimum of {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall { value: String },
    #[error("memory {value:?} exceeds the host's {host_mib} MiB of RAM")]
    MemoryTooLarge { value: String, host_mib: u64 },
    #[error("cpus {value} is not allowed: use 1 to {max} (this host's cores)")]
    Cpus { value: u32, max: u32 },
    #[error("{var}={value:?} is invalid: {why}")]
    Env { var: &'static str, value: String, why: String },
    #[error(transparent)]
    Flavor(#[from] FlavorError),
    #[error(transparent)]
    GuestEnv(#[from] EnvError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    HostPort(#[from] crate::net::forwarding::HostPortError),
    #[error(transparent)]
    Cri(#[from] crate::guest_env::cri::CriError),
    #[error(transparent)]
    Egress(#[from] crate::net::egress::EgressError),
    #[error(transparent)]
    Shield(#[from] crate::net::shield::ShieldError),
    #[error("published ports need the network: drop --network none or the ports ({0})")]
    PortsWithoutNetwork(String),
    #[error("agent home {path}: {why}; pass a directory with --home or AGENT_HOME")]
    Home { path: PathBuf, why: String },
    #[error(transparent)]
    Paths(#[from] paths::PathsError),
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("{what} {path} {why}; {fix}")]
    ShareTooWide { what: &'static str, path: PathBuf, why: String, fix: &'static str },
}

/// Facts about the host that bound the settings.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    pub cores: u32,
    pub memory_mib: u64,
}

impl HostLimits {
    pub fn detect() -> HostLimits {
        let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map(|kb| kb / 1024)
            .unwrap_or(u64::MAX);
        HostLimits { cores, memory_mib }
    }
}

/// `value` of the variable `var` as one of `T`'s choices (any case); `why`
/// lists them for the error.
fn env_choice<T: clap::ValueEnum>(
    var: &'static str,
    value: Option<String>,
    why: &str,
) -> Result<Option<T>, SettingsError> {
    value.map(|v| T::from_str(&v, true).map_err(|_| SettingsError::Env { var, value: v, why: why.into() })).transpose()
}

/// The environment variables agentvm reads, as a layer plus work dir.
fn env_layer(get: &dyn Fn(&str) -> Option<String>) -> Result<(Layer, Option<PathBuf>), SettingsError> {
    let cpus = match get("AGENTVM_CPUS") {
        Some(v) => Some(v.parse().map_err(|_| SettingsError::Env {
            var: "AGENTVM_CPUS",
            value: v.clone(),
            why: "not a number".into(),
        })?),
        None => None,
    };
    let accel = env_choice::<AccelChoice>("AGENTVM_ACCEL", get("AGENTVM_ACCEL"), "use auto, kvm or tcg")?;
    let net_backend = env_choice::<NetBackend>(
        "AGENTVM_NET_BACKEND",
        get("AGENTVM_NET_BACKEND").filter(|s| !s.is_empty()),
        "use auto, passt or slirp",
    )?;
    let work_cache = env_choice::<CacheMode>(
        "AGENTVM_WORK_CACHE",
        get("AGENTVM_WORK_CACHE").filter(|s| !s.is_empty()),
        "use auto, always, metadata or never",
    )?;
    // DIRENV_ALLOW is the original tool's switch: 1 turns the dev shell on.
    let devshell = match get("DIRENV_ALLOW").as_deref().map(str::trim) {
        None | Some("") => None,
        Some("1" | "true" | "yes" | "on") => Some(devshell::Mode::On),
        Some("0" | "false" | "no" | "off") => Some(devshell::Mode::Off),
        Some(v) => {
            return Err(SettingsError::Env {
                var: "DIRENV_ALLOW",
                value: v.to_string(),
                why: "use 1 to turn the dev shell on, 0 to leave it off".into(),
            })
        }
    };
    let layer = Layer {
        memory: get("AGENTVM_MEMORY"),
        cpus,
        accel,
        home: get("AGENT_HOME").filter(|s| !s.is_empty()).map(PathBuf::from),
        flavor: get("AGENTVM_FLAVOR").filter(|s| !s.is_empty()),
        network: None,
        net_backend,
        work_cache,
        ports: Vec::new(),
        host_ports: Vec::new(),
        allow: Vec::new(),
        shield_secrets: None,
        cri: get("ENABLE_CRI"),
        cri_disk_size: None,
        devshell,
        devshell_files: Vec::new(),
        flavors: BTreeMap::new(),
    };
    Ok((layer, get("WORK_DIR").filter(|s| !s.is_empty()).map(PathBuf::from)))
}

/// The user's config (`~/.config/agentvm/config.toml`); none is an empty layer.
pub fn user_layer() -> Result<Layer, SettingsError> {
    read_layer(&paths::user_config_file()?)
}

/// Reads the user's config file; a missing file is an empty layer.
pub fn read_layer(path: &Path) -> Result<Layer, SettingsError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Layer::default()),
        Err(e) => return Err(SettingsError::ReadConfig { path: path.into(), why: e.to_string() }),
    };
    parse_layer(&text, path)
}

/// Parses the text of the config file at `path`. Relative `home` paths are
/// taken relative to the file's directory.
pub fn parse_layer(text: &str, path: &Path) -> Result<Layer, SettingsError> {
    let mut layer: Layer = toml::from_str(text)
        .map_err(|e| SettingsError::ParseConfig { path: path.into(), why: describe_toml_error(&e, text) })?;
    // Re-read the flavor tables for errors that name the file and flavor.
    layer.flavors = flavor::parse_flavor_tables(text, path)?;
    if let (Some(home), Some(dir)) = (&layer.home, path.parent()) {
        layer.home = Some(dir.join(home));
    }
    Ok(layer)
}

/// A TOML error as `line L, column C: message`. Not the error's own
/// Display, which quotes the offending line: whatever the file holds
/// never reaches an error message.
pub(crate) fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let message: String = e.message().trim_end().chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let Some(span) = e.span() else { return message };
    let before = &text.as_bytes()[..span.start.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    format!("line {line}, column {column}: {message}")
}

/// The project config's layer if its content is trusted; otherwise an empty
/// layer and the warning to show.
pub fn project_layer(work_dir: &Path, trust: &TrustStore) -> Result<(Layer, Option<String>), SettingsError> {
    match trust::project_config(work_dir, trust)? {
        ProjectConfig::Absent => Ok((Layer::default(), None)),
        ProjectConfig::Ignored(warning) => Ok((Layer::default(), Some(warning))),
        ProjectConfig::Trusted(bytes) => {
            let path = work_dir.join(PROJECT_CONFIG);
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| SettingsError::ParseConfig { path: path.clone(), why: "not UTF-8 text".into() })?;
            Ok((parse_layer(text, &path)?, None))
        }
    }
}

/// Parses a memory size into MiB: `4G`, `4GiB`, `512M`, `512MiB`, `2048`.
pub fn parse_memory_mib(s: &str) -> Result<u64, SettingsError> {
    let err = || SettingsError::MemoryFormat(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        _ => return Err(err()),
    };
    n.checked_mul(factor).ok_or_else(err)
}

/// All flavors as seen from `work_dir` (built-in < user config < trusted
/// project config), for commands other than `run` (e.g. `image build
/// claude`), and the warning about an ignored project config.
pub fn flavors_for(work_dir: &Path) -> Result<(BTreeMap<String, Flavor>, Option<String>), SettingsError> {
    let user = read_layer(&paths::user_config_file()?)?;
    let work_dir = trust::real_project_dir(work_dir)?;
    let (project, warning) = project_layer(&work_dir, &TrustStore::default_location()?)?;
    Ok((flavor::merge(flavor::merge(flavor::builtin_flavors(), &user.flavors)?, &project.flavors)?, warning))
}

/// Resolves everything for one `run`, reading the real environment and files.
pub fn resolve(req: Request) -> Result<Settings, SettingsError> {
    let get = |k: &str| std::env::var(k).ok();
    let user_file = paths::user_config_file()?;
    resolve_with(req, &get, &user_file, &TrustStore::default_location()?, HostLimits::detect())
}

/// [`resolve`] with its inputs passed in, for tests.
pub fn resolve_with(
    req: Request,
    get_env: &dyn Fn(&str) -> Option<String>,
    user_config: &Path,
    trust: &TrustStore,
    host: HostLimits,
) -> Result<Settings, SettingsError> {
    let (env, env_work_dir) = env_layer(get_env)?;
    let work_dir = real_work_dir(req.work_dir.or(env_work_dir).unwrap_or_else(|| PathBuf::from(".")))?;
    let guarded = GuardedDirs::new(get_env, user_config, trust)?;
    guarded.check("work dir", &work_dir, "pass a project directory with --work-dir or WORK_DIR")?;
    let flags = Layer {
        memory: req.memory,
        cpus: req.cpus,
        accel: req.accel,
        home: req.home,
        flavor: req.flavor,
        network: req.network,
        net_backend: req.net_backend,
        work_cache: None,
        ports: req.publish,
        host_ports: req.host_ports,
        allow: req.allow.clone(),
        shield_secrets: req.shield_secrets.then_some(true),
        cri: req.cri,
        cri_disk_size: req.cri_disk_size,
        devshell: req.devshell,
        devshell_files: Vec::new(),
        flavors: BTreeMap::new(),
    };
    let user = read_layer(user_config)?;
    let (project, project_warning) = project_layer(&work_dir, trust)?;
    let flavors = flavor::merge(flavor::merge(flavor::builtin_flavors(), &user.flavors)?, &project.flavors)?;
    let cri_source = if flags.cri.is_some() {
        "--cri"
    } else if env.cri.is_some() {
        "ENABLE_CRI"
    } else {
        "cri in a config file"
    };
    let layer = Layer::default().merge(user).merge(project).merge(env).merge(flags);
    let cri = crate::guest_env::cri::parse_list(layer.cri.as_deref().unwrap_or_default(), cri_source)?;
    let cri_disk_mib = match &layer.cri_disk_size {
        None => crate::guest_env::cri::DEFAULT_DISK_MIB,
        Some(v) => parse_memory_mib(v).map_err(|_| crate::guest_env::cri::CriError::DiskSize(v.clone()))?,
    };

    let memory_mib = match &layer.memory {
        None => {
            let want = if cri.is_empty() { DEFAULT_MEMORY_MIB } else { CRI_MEMORY_MIB };
            want.min(host.memory_mib / 2).max(MIN_MEMORY_MIB)
        }
        Some(m) => {
            let mib = parse_memory_mib(m)?;
            if mib < MIN_MEMORY_MIB {
                return Err(SettingsError::MemoryTooSmall { value: m.clone() });
            }
            if mib > host.memory_mib {
                return Err(SettingsError::MemoryTooLarge { value: m.clone(), host_mib: host.memory_mib });
            }
            mib
        }
    };
    let cpus = layer.cpus.unwrap_or(DEFAULT_MAX_CPUS.min(host.cores));
    if cpus == 0 || cpus > host.cores {
        return Err(SettingsError::Cpus { value: cpus, max: host.cores });
    }

    let flavor = flavor::resolve(&flavors, layer.flavor.as_deref().unwrap_or(DEFAULT_FLAVOR))?;
    let guest_env = envvars::build(&flavor, &req.env, &req.env_files, get_env)?;
    // --allow or shielding alone means --network allow; with another mode
    // it is a mistake.
    let shield_secrets = layer.shield_secrets.unwrap_or(false);
    let network = match (layer.network, req.allow.is_empty()) {
        (Some(m), _) if shield_secrets && m != NetworkMode::Allow => {
            return Err(crate::net::shield::ShieldError::NeedsAllowMode(format!("{m:?}").to_lowercase()).into())
        }
        (None, _) if shield_secrets => NetworkMode::Allow,
        (None, false) => NetworkMode::Allow,
        (Some(m), false) if m != NetworkMode::Allow => return Err(EgressError::AllowWithoutAllowMode.into()),
        (m, _) => m.unwrap_or_default(),
    };
    if shield_secrets {
        crate::net::shield::check_flavor(&flavor.name, &flavor.keys, &flavor.secret_hosts, &flavor.key_headers)?;
    }
    // SAFETY: geteuid has no preconditions.
    let ports = net::check_ports(&layer.ports, unsafe { libc::geteuid() } == 0)?;
    if network == NetworkMode::None && !ports.is_empty() {
        return Err(SettingsError::PortsWithoutNetwork(layer.ports.join(", ")));
    }

    let host_ports = crate::net::forwarding::check(&layer.host_ports)?;
    // Secret hosts must be reachable to be of use.
    let allow = AllowList::new(
        &flavor.allow.iter().chain(&flavor.secret_hosts).chain(&layer.allow).cloned().collect::<Vec<_>>(),
    )?;
    if network == NetworkMode::Allow {
        if host_ports.contains(&crate::net::egress::PROXY_PORT) {
            return Err(EgressError::ProxyPortTaken.into());
        }
        if let Some(p) = ports.iter().find(|p| p.proto == net::Proto::Udp) {
            return Err(EgressError::UdpPublished(p.to_string()).into());
        }
    }

    let home_dir = match layer.home {
        Some(h) => absolute(&h),
        None => paths::data_dir()?.join("homes").join(paths::project_home_name(&work_dir)),
    };
    check_home(&home_dir, &work_dir)?;
    guarded.check("agent home", &home_dir, "pass another directory with --home or AGENT_HOME")?;

    Ok(Settings {
        work_dir,
        home_dir,
        argv: flavor.argv(&req.args),
        flavor,
        guest_env,
        network,
        net_backend: layer.net_backend.unwrap_or_default(),
        work_cache: layer.work_cache.unwrap_or_default(),
        ports,
        host_ports,
        allow,
        shield_secrets,
        cri,
        cri_disk_mib,
        memory_mib,
        cpus,
        accel: layer.accel.unwrap_or_default(),
        devshell: layer.devshell.unwrap_or_default(),
        devshell_files: layer.devshell_files,
        verbose: req.verbose,
        warnings: project_warning.into_iter().collect(),
    })
}

/// What a share (the work dir, the agent home) must not expose: the whole
/// host, the user's home, and agentvm's own state, config and images,
/// which decide what later runs get.
struct GuardedDirs {
    user_home: Option<PathBuf>,
    /// (what it is, where), each a real path as far as it exists.
    agentvm: Vec<(&'static str, PathBuf)>,
    /// The agent homes' dir (inside the data dir): shares may sit below it.
    homes: PathBuf,
}

impl GuardedDirs {
    fn new(
        get_env: &dyn Fn(&str) -> Option<String>,
        user_config: &Path,
        trust: &TrustStore,
    ) -> Result<GuardedDirs, SettingsError> {
        let data = paths::data_dir()?;
        Ok(GuardedDirs {
            user_home: get_env("HOME")
                .filter(|h| Path::new(h).is_absolute())
                .map(|h| real_as_far_as_exists(Path::new(&h))),
            agentvm: vec![
                ("trust records", real_as_far_as_exists(trust.dir())),
                ("data dir", real_as_far_as_exists(&data)),
                // The file, and where it points if it is a link (dotfile managers).
                ("config", real_parent(user_config)),
                ("config", real_as_far_as_exists(user_config)),
                ("image cache", real_as_far_as_exists(&paths::cache_dir()?)),
            ],
            homes: real_as_far_as_exists(&data.join("homes")),
        })
    }

    /// Refuses `dir` (shared read-write as `what`) if it exposes too much.
    fn check(&self, what: &'static str, dir: &Path, fix: &'static str) -> Result<(), SettingsError> {
        let dir = real_as_far_as_exists(dir);
        let why = self.problem(&dir);
        why.map_or(Ok(()), |why| Err(SettingsError::ShareTooWide { what, path: dir, why, fix }))
    }

    fn problem(&self, dir: &Path) -> Option<String> {
        if dir.parent().is_none() {
            return Some(
                "is the root of the host's file system: the guest would get every host file read-write".into(),
            );
        }
        if let Some(home) = self.user_home.as_deref().filter(|h| h.starts_with(dir)) {
            let whose = if home == dir {
                "is your home directory".to_string()
            } else {
                format!("contains your home directory {}", home.display())
            };
            return Some(format!("{whose}: the guest would get all of it read-write (~/.ssh, shell startup files, agentvm's trust records)"));
        }
        for (name, guarded) in &self.agentvm {
            if guarded.starts_with(dir) {
                return Some(format!(
                    "contains agentvm's {name} {}: the guest could change what later runs trust and get",
                    guarded.display()
                ));
            }
            let in_a_home = dir.starts_with(&self.homes) && dir != self.homes;
            if dir.starts_with(guarded) && !in_a_home {
                return Some(format!(
                    "is inside agentvm's {name} {}: the guest could change what later runs trust and get",
                    guarded.display()
                ));
            }
        }
        None
    }
}

/// `p` in its parent's real path (a link `p` itself is not followed).
fn real_parent(p: &Path) -> PathBuf {
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) => real_as_far_as_exists(dir).join(name),
        _ => p.to_path_buf(),
    }
}

/// `p` with its longest existing ancestor resolved to a real path (the rest
/// may not exist yet).
fn real_as_far_as_exists(p: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut at = p;
    loop {
        if let Ok(real) = std::fs::canonicalize(at) {
            return missing.iter().rev().fold(real, |acc, name| acc.join(name));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name);
                at = parent;
            }
            _ => return p.to_path_buf(),
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    }
}

/// The work dir must exist, be a directory and be readable.
fn real_work_dir(p: PathBuf) -> Result<PathBuf, SettingsError> {
    let err = |why: String| SettingsError::WorkDir { path: p.clone(), why };
    let real = std::fs::canonicalize(&p).map_err(|e| err(e.to_string()))?;
    if !real.is_dir() {
        return Err(err("is not a directory".into()));
    }
    std::fs::read_dir(&real).map_err(|e| err(format!("cannot be read: {e}")))?;
    Ok(real)
}

/// The home may not exist yet (it is created at launch), but must not be a
/// file, nor the work dir itself.
fn check_home(home: &Path, work_dir: &Path) -> Result<(), SettingsError> {
    if home.exists() && !home.is_dir() {
        return Err(SettingsError::Home { path: home.into(), why: "exists and is not a directory".into() });
    }
    if std::fs::canonicalize(home).ok().as_deref() == Some(work_dir) {
        return Err(SettingsError::Home { path: home.into(), why: "is the work dir itself".into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const HOST: HostLimits = HostLimits { cores: 8, memory_mib: 16384 };

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    fn req(dir: &Path) -> Request {
        Request { work_dir: Some(dir.into()), home: Some(dir.join("h")), ..Default::default() }
    }

    /// A trust store that trusts nothing.
    fn no_trust() -> TrustStore {
        TrustStore::at("/nonexistent/agentvm-trust")
    }

    /// Writes `dir`'s project config and trusts it as written, in a store
    /// apart from the project (kept while the TempDir lives).
    fn trusted_config(dir: &Path, text: &str) -> (tempfile::TempDir, TrustStore) {
        std::fs::write(dir.join(PROJECT_CONFIG), text).unwrap();
        let t = tempfile::tempdir().unwrap();
        let store = TrustStore::at(t.path().join("trust"));
        let hash = trust::digest(text.as_bytes());
        store.save(&trust::Record::new(&dir.canonicalize().unwrap(), [(PROJECT_CONFIG.to_string(), hash)])).unwrap();
        (t, store)
    }

    #[test]
    fn memory_sizes_parse() {
        assert_eq!(parse_memory_mib("4G").unwrap(), 4096);
        assert_eq!(parse_memory_mib("4GiB").unwrap(), 4096);
        assert_eq!(parse_memory_mib("512M").unwrap(), 512);
        assert_eq!(parse_memory_mib("2048").unwrap(), 2048);
        assert!(parse_memory_mib("lots").is_err());
        assert!(parse_memory_mib("4T").is_err());
        assert!(parse_memory_mib("").is_err());
    }

    #[test]
    fn defaults_apply_without_any_config() {
        let d = tempfile::tempdir().unwrap();
        let s = resolve_with(req(d.path()), &env(&[]), Path::new("/nonexistent/none.toml"), &no_trust(), HOST).unwrap();
        assert_eq!(s.memory_mib, 4096);
        assert_eq!(s.cpus, 4);
        assert_eq!(s.flavor.name, "claude");
        assert_eq!(s.argv, ["claude"]);
        assert_eq!(s.accel, AccelChoice::Auto);
        assert_eq!(s.work_dir, d.path().canonicalize().unwrap());
    }

    #[test]
    fn layers_apply_in_order_user_project_env_flags() {
        let d = tempfile::tempdir().unwrap();
        let config_dir = tempfile::tempdir().unwrap();
        let user = config_dir.path().join("user.toml");
        std::fs::write(&user, "memory = \"1G\"\ncpus = 1\naccel = \"tcg\"\n").unwrap();
        let (_t, trust) = trusted_config(d.path(), "memory = \"2G\"\n");
        let s = resolve_with(req(d.path()), &env(&[]), &user, &trust, HOST).unwrap();
        assert_eq!((s.memory_mib, s.cpus, s.accel), (2048, 1, AccelChoice::Tcg));

        let s = resolve_with(req(d.path()), &env(&[("AGENTVM_MEMORY", "3G")]), &user, &trust, HOST).unwrap();
        assert_eq!(s.memory_mib, 3072);

        let r = Request { memory: Some("512M".into()), ..req(d.path()) };
        let s = resolve_with(r, &env(&[("AGENTVM_MEMORY", "3G")]), &user, &trust, HOST).unwrap();
        assert_eq!(s.memory_mib, 512);
    }

    #[test]
    fn work_dir_comes_from_env_when_no_flag() {
        let d = tempfile::tempdir().unwrap();
        let r = Request { home: Some(d.path().join("h")), ..Default::default() };
        let s = resolve_with(
            r,
            &env(&[("WORK_DIR", d.path().to_str().unwrap())]),
            Path::new("/nonexistent"),
            &no_trust(),
            HOST,
        )
        .unwrap();
        assert_eq!(s.work_dir, d.path().canonicalize().unwrap());
    }

    #[test]
    fn missing_work_dir_is_named_in_the_error() {
        let r = Request { work_dir: Some("/no/such/dir".into()), ..Default::default() };
        let e = resolve_with(r, &env(&[]), Path::new("/nonexistent"), &no_trust(), HOST).unwrap_err().to_string();
        assert!(e.contains("/no/such/dir") && e.contains("--work-dir"), "{e}");
    }

    #[test]
    fn work_dir_that_is_a_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("file");
        std::fs::write(&f, "").unwrap();
        let e = resolve_with(req(&f), &env(&[]), Path::new("/x"), &no_trust(), HOST).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_with_the_value() {
        let d = tempfile::tempdir().unwrap();
        let none = PathBuf::from("/nonexistent/none.toml");
        let bad = |r: Request| resolve_with(r, &env(&[]), &none, &no_trust(), HOST).unwrap_err().to_string();
        assert!(bad(Request { memory: Some("12X".into()), ..req(d.path()) }).contains("\"12X\""));
        assert!(bad(Request { memory: Some("100M".into()), ..req(d.path()) }).contains("minimum"));
        assert!(bad(Request { memory: Some("64G".into()), ..req(d.path()) }).contains("16384 MiB"));
        assert!(bad(Request { cpus: Some(0), ..req(d.path()) }).contains("1 to 8"));
        assert!(bad(Request { cpus: Some(9), ..req(d.path()) }).contains("1 to 8"));
        assert!(bad(Request { flavor: Some("emacs".into()), ..req(d.path()) }).contains("\"emacs\""));
        let e = resolve_with(req(d.path()), &env(&[("AGENTVM_CPUS", "two")]), &none, &no_trust(), HOST).unwrap_err();
        assert!(e.to_string().contains("AGENTVM_CPUS"));
    }

    #[test]
    fn unknown_config_keys_are_errors_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let (_t, trust) = trusted_config(d.path(), "memroy = \"2G\"\n");
        let e = resolve_with(req(d.path()), &env(&[]), Path::new("/x"), &trust, HOST).unwrap_err().to_string();
        assert!(e.contains(PROJECT_CONFIG) && e.contains("memroy"), "{e}");
    }

    #[test]
    fn project_flavor_runs_its_command_with_args_and_env() {
        let d = tempfile::tempdir().unwrap();
        let (_t, trust) = trusted_config(
            d.path(),
            "flavor = \"show\"\n[flavors.show]\ncommand = [\"printenv\"]\nkeys = [\"SHOW_KEY\"]\nenv = { A = \"1\" }\n",
        );
        let r = Request { args: vec!["A".into()], env: vec!["B=2".into()], ..req(d.path()) };
        let s = resolve_with(r, &env(&[("SHOW_KEY", "k")]), Path::new("/x"), &trust, HOST).unwrap();
        assert_eq!(s.flavor.name, "show");
        assert_eq!(s.argv, ["printenv", "A"]);
        assert_eq!(s.guest_env.get("A"), Some("1"));
        assert_eq!(s.guest_env.get("B"), Some("2"));
        assert_eq!(s.guest_env.get("SHOW_KEY"), Some("k"));
    }

    #[test]
    fn flag_flavor_beats_env_and_config_default() {
        let d = tempfile::tempdir().unwrap();
        let (_t, trust) = trusted_config(d.path(), "flavor = \"codex\"\n");
        let s =
            resolve_with(req(d.path()), &env(&[("AGENTVM_FLAVOR", "gemini")]), Path::new("/x"), &trust, HOST).unwrap();
        assert_eq!(s.flavor.name, "gemini");
        let r = Request { flavor: Some("shell".into()), args: vec!["make".into()], ..req(d.path()) };
        let s = resolve_with(r, &env(&[("AGENTVM_FLAVOR", "gemini")]), Path::new("/x"), &trust, HOST).unwrap();
        assert_eq!((s.flavor.name.as_str(), s.argv.as_slice()), ("shell", &["make".to_string()][..]));
    }

    #[test]
    fn bad_env_flag_is_refused_before_boot() {
        let d = tempfile::tempdir().unwrap();
        let r = Request { env: vec!["1BAD=x".into()], ..req(d.path()) };
        let e = resolve_with(r, &env(&[]), Path::new("/x"), &no_trust(), HOST).unwrap_err().to_string();
        assert!(e.contains("1BAD"), "{e}");
    }

    #[test]
    fn devshell_is_off_by_default_and_on_with_direnv_allow_or_the_flag() {
        use devshell::Mode;
        let d = tempfile::tempdir().unwrap();
        let none = PathBuf::from("/nonexistent/none.toml");
        let mode_with = |r: Request, e: &[(&str, &str)], t: &TrustStore| {
            resolve_with(r, &env(e), &none, t, HOST).map(|s| s.devshell)
        };
        let mode = |r: Request, e: &[(&str, &str)]| mode_with(r, e, &no_trust());
        assert_eq!(mode(req(d.path()), &[]).unwrap(), Mode::Off);
        assert_eq!(mode(req(d.path()), &[("DIRENV_ALLOW", "1")]).unwrap(), Mode::On);
        let r = Request { devshell: Some(Mode::Try), ..req(d.path()) };
        assert_eq!(mode(r, &[("DIRENV_ALLOW", "1")]).unwrap(), Mode::Try);
        let (_t, trust) = trusted_config(d.path(), "devshell = \"try\"\n");
        assert_eq!(mode_with(req(d.path()), &[], &trust).unwrap(), Mode::Try);
        assert_eq!(mode_with(req(d.path()), &[("DIRENV_ALLOW", "0")], &trust).unwrap(), Mode::Off);
        let e = mode(req(d.path()), &[("DIRENV_ALLOW", "maybe")]).unwrap_err().to_string();
        assert!(e.contains("DIRENV_ALLOW"), "{e}");
    }

    #[test]
    fn devshell_files_from_the_user_and_the_trusted_project_config_add_up() {
        let d = tempfile::tempdir().unwrap();
        let config_dir = tempfile::tempdir().unwrap();
        let user = config_dir.path().join("user.toml");
        std::fs::write(&user, "devshell_files = [\"rust-toolchain.toml\"]\n").unwrap();
        let (_t, trust) = trusted_config(d.path(), "devshell_files = [\"nix/*.json\"]\n");
        let s = resolve_with(req(d.path()), &env(&[]), &user, &trust, HOST).unwrap();
        let names: Vec<String> = s.devshell_files.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["rust-toolchain.toml", "nix/*.json"]);
        let s = resolve_with(req(d.path()), &env(&[]), &user, &no_trust(), HOST).unwrap();
        assert_eq!(s.devshell_files.len(), 1, "an untrusted project config adds none");
        std::fs::write(&user, "cpus = 1\ndevshell_files = [\"/home/SECRET-NAME\"]\n").unwrap();
        let e = resolve_with(req(d.path()), &env(&[]), &user, &no_trust(), HOST).unwrap_err().to_string();
        assert!(e.contains("user.toml") && e.contains("line 2") && e.contains("absolute"), "{e}");
        assert!(!e.contains("SECRET-NAME"), "{e}");
    }

    #[test]
    fn home_that_is_a_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("h"), "").unwrap();
        let e = resolve_with(req(d.path()), &env(&[]), Path::new("/x"), &no_trust(), HOST).unwrap_err().to_string();
        assert!(e.contains("--home"), "{e}");
    }

    #[test]
    fn default_home_is_per_project_under_data_dir() {
        let d = tempfile::tempdir().unwrap();
        let r = Request { work_dir: Some(d.path().into()), ..Default::default() };
        let s = resolve_with(r, &env(&[]), Path::new("/x"), &no_trust(), HOST).unwrap();
        assert!(s.home_dir.starts_with(paths::data_dir().unwrap()));
        assert!(s.home_dir.file_name().unwrap().to_str().unwrap().contains('-'));
    }

    #[test]
    fn host_ports_from_config_and_flags_add_up_and_must_be_unique() {
        let d = tempfile::tempdir().unwrap();
        let (_t, trust) = trusted_config(d.path(), "host_ports = [5432]\n");
        let r = Request { host_ports: vec![6379], ..req(d.path()) };
        let s = resolve_with(r, &env(&[]), Path::new("/x"), &trust, HOST).unwrap();
        assert_eq!(s.host_ports, [5432, 6379]);

        let r = Request { host_ports: vec![5432], ..req(d.path()) };
        let e = resolve_with(r, &env(&[]), Path::new("/x"), &trust, HOST).unwrap_err().to_string();
        assert!(e.contains("host port 5432 is given twice"), "{e}");
    }

    #[test]
    fn net_backend_comes_from_config_env_and_flag() {
        let d = tempfile::tempdir().unwrap();
        let (_t, trust) = trusted_config(d.path(), "net_backend = \"slirp\"\n");
        let s = resolve_with(req(d.path()), &env(&[]), Path::new("/x"), &trust, HOST).unwrap();
        assert_eq!(s.net_backend, NetBackend::Slirp);
        let s = resolve_with(req(d.path()), &env(&[("AGENTVM_NET_BACKEND", "passt")]), Path::new("/x"), &trust, HOST)
            .unwrap();
        assert_eq!(s.net_backend, NetBackend::Passt);
        let r = Request { net_backend: Some(NetBackend::Auto), ..req(d.path()) };
        let s = resolve_with(r, &env(&[("AGENTVM_NET_BACKEND", "passt")]), Path::new("/x"), &trust, HOST).unwrap();
        assert_eq!(s.net_backend, NetBackend::Auto);
        let e = resolve_with(req(d.path()), &env(&[("AGENTVM_NET_BACKEND", "vde")]), Path::new("/x"), &trust, HOST);
        assert!(e.unwrap_err().to_string().contains("AGENTVM_NET_BACKEND=\"vde\""));
    }

    #[test]
    fn work_cache_comes_from_config_and_env_and_bad_values_name_the_source() {
        let d = tempfile::tempdir().unwrap();
        let s = resolve_with(req(d.path()), &env(&[]), Path::new("/x"), &no_trust(), HOST).unwrap();
        assert_eq!(s.work_cache, CacheMode::Auto);
        let (_t, trust) = trusted_config(d.path(), "work_cache = \"always\"\n");
        let s = resolve_with(req(d.path()), &env(&[]), Path::new("/x"), &trust, HOST).unwrap();
        assert_eq!(s.work_cache, CacheMode::Always);
        let s = resolve_with(req(d.path()), &env(&[("AGENTVM_WORK_CACHE", "Never")]), Path::new("/x"), &trust, HOST)
            .unwrap();
        assert_eq!(s.work_cache, CacheMode::Never, "the environment wins over the project's file");
        let e = resolve_with(req(d.path()), &env(&[("AGENTVM_WORK_CACHE", "fast")]), Path::new("/x"), &trust, HOST);
        let e = e.unwrap_err().to_string();
        assert!(e.contains("AGENTVM_WORK_CACHE=\"fast\"") && e.contains("auto, always, metadata or never"), "{e}");
        let (_t, trust) = trusted_config(d.path(), "work_cache = \"fast\"\n");
        let e = resolve_with(req(d.path()), &env(&[]), Path::new("/x"), &trust, HOST).unwrap_err().to_string();
        assert!(e.contains(PROJECT_CONFIG) && e.contains("fast"), "{e}");
    }

    #[test]
    fn cri_comes_from_flag_env_or_config_and_raises_default_memory() {
        let d = tempfile::tempdir().unwrap();
        let (_t, trust) = trusted_config(d.path(), "cri = \"podman\"\n");
        let s = resolve_with(req(d.path()), &env(&[]), Path::new("/x"), &trust, HOST).unwrap();
        assert_eq!(s.cri, [Runtime::Podman]);
        assert_eq!(s.memory_mib, 8192);
        let s =
            resolve_with(req(d.path()), &env(&[("ENABLE_CRI", "docker, containerd")]), Path::new("/x"), &trust, HOST)
                .unwrap();
        assert_eq!(s.cri, [Runtime::Docker, Runtime::Containerd]);
        let r = Request { cri: Some("docker".into()), memory: Some("2G".into()), ..req(d.path()) };
        let s = resolve_with(r, &env(&[("ENABLE_CRI", "bogus")]), Path::new("/x"), &trust, HOST).unwrap();
        assert_eq!(
            (s.cri.as_slice(), s.memory_mib),
            (&[Runtime::Docker][..], 2048),
            "the flag wins; memory stays the user's"
        );
        let e =
            resolve_with(req(d.path()), &env(&[("ENABLE_CRI", "bogus")]), Path::new("/x"), &trust, HOST).unwrap_err();
        assert!(e.to_string().contains("ENABLE_CRI"), "{e}");
    }

    /// What one run's guest wrote into /work/.agentvm.toml (issue 13).
    const HOSTILE_CONFIG: &str = "home = \"/tmp/victim\"\nhost_ports = [18601]\nnetwork = \"open\"\n\
        devshell = \"on\"\n[flavors.shell]\nkeys = [\"HOSTSECRET\"]\nsecret_hosts = [\"evil.example\"]\n";

    #[test]
    fn untrusted_project_config_is_ignored_with_one_warning() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(PROJECT_CONFIG), HOSTILE_CONFIG).unwrap();
        let r = Request { work_dir: Some(d.path().into()), flavor: Some("shell".into()), ..Default::default() };
        let s = resolve_with(r, &env(&[("HOSTSECRET", "x")]), Path::new("/x"), &no_trust(), HOST).unwrap();
        assert!(s.home_dir.starts_with(paths::data_dir().unwrap()), "{:?}", s.home_dir);
        assert!(s.host_ports.is_empty() && s.guest_env.get("HOSTSECRET").is_none());
        assert!(s.flavor.secret_hosts.is_empty() && s.devshell == devshell::Mode::Off);
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        let w = &s.warnings[0];
        let real = d.path().canonicalize().unwrap();
        assert!(w.contains(&real.join(PROJECT_CONFIG).display().to_string()), "{w}");
        assert!(w.contains(&format!("agentvm trust {}", real.display())), "{w}");
    }

    #[test]
    fn trusted_project_config_applies_until_it_changes() {
        let d = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        let text = HOSTILE_CONFIG.replace("/tmp/victim", victim.path().to_str().unwrap());
        let (_t, trust) = trusted_config(d.path(), &text);
        let r = || Request { work_dir: Some(d.path().into()), flavor: Some("shell".into()), ..Default::default() };
        let s = resolve_with(r(), &env(&[("HOSTSECRET", "x")]), Path::new("/x"), &trust, HOST).unwrap();
        assert_eq!((s.home_dir.as_path(), s.host_ports.as_slice()), (victim.path(), &[18601][..]));
        assert_eq!(s.guest_env.get("HOSTSECRET"), Some("x"));
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);

        std::fs::write(d.path().join(PROJECT_CONFIG), format!("{text}\n# one more line\n")).unwrap();
        let s = resolve_with(r(), &env(&[("HOSTSECRET", "x")]), Path::new("/x"), &trust, HOST).unwrap();
        assert!(s.host_ports.is_empty() && s.guest_env.get("HOSTSECRET").is_none() && s.home_dir != victim.path());
        assert!(s.warnings[0].contains("changed since it was trusted"), "{:?}", s.warnings);
    }

    #[test]
    fn symlinked_project_config_is_ignored_without_its_targets_content() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("secret");
        std::fs::write(&target, "memory = \"1G\" # HOSTFILE-LINE\n").unwrap();
        std::os::unix::fs::symlink(&target, d.path().join(PROJECT_CONFIG)).unwrap();
        // Even a record that trusts the target's content does not make the link count.
        let t = tempfile::tempdir().unwrap();
        let trust = TrustStore::at(t.path().join("trust"));
        let hash = trust::digest(&std::fs::read(&target).unwrap());
        trust
            .save(&trust::Record::new(&d.path().canonicalize().unwrap(), [(PROJECT_CONFIG.to_string(), hash)]))
            .unwrap();
        let s = resolve_with(req(d.path()), &env(&[]), Path::new("/x"), &trust, HOST).unwrap();
        assert_eq!(s.memory_mib, DEFAULT_MEMORY_MIB);
        assert!(s.warnings[0].contains("symbolic link") && !s.warnings[0].contains("HOSTFILE"), "{:?}", s.warnings);
    }

    #[test]
    fn config_parse_errors_give_the_place_not_the_content() {
        let d = tempfile::tempdir().unwrap();
        let config_dir = tempfile::tempdir().unwrap();
        let user = config_dir.path().join("user.toml");
        std::fs::write(&user, "cpus = 1\nroot:$y$SECRETHASH:19000::::\n").unwrap();
        let e = resolve_with(req(d.path()), &env(&[]), &user, &no_trust(), HOST).unwrap_err().to_string();
        assert!(e.contains("user.toml") && e.contains("line 2, column 5"), "{e}");
        assert!(!e.contains("SECRETHASH"), "{e}");
        std::fs::write(&user, "[flavors.x]\ncommand = \"SECRET-VALUE\n").unwrap();
        let e = resolve_with(req(d.path()), &env(&[]), &user, &no_trust(), HOST).unwrap_err().to_string();
        assert!(e.contains("line 2") && !e.contains("SECRET-VALUE"), "{e}");
    }

    #[test]
    fn shares_of_the_whole_host_or_home_or_agentvm_state_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let home = d.path().join("home/user");
        let project = home.join("src/p");
        std::fs::create_dir_all(&project).unwrap();
        let trust = TrustStore::at(home.join(".local/share/agentvm/trust"));
        let e_home = [("HOME", home.to_str().unwrap())];
        let refused =
            |r: Request| resolve_with(r, &env(&e_home), Path::new("/x"), &trust, HOST).unwrap_err().to_string();
        let work =
            |dir: &Path| Request { work_dir: Some(dir.into()), home: Some(project.join("h")), ..Default::default() };

        let e = refused(work(Path::new("/")));
        assert!(e.contains("work dir / is the root of the host's file system") && e.contains("--work-dir"), "{e}");
        let e = refused(work(&home));
        assert!(e.contains("is your home directory") && e.contains("--work-dir"), "{e}");
        let e = refused(work(&d.path().join("home")));
        assert!(e.contains("contains your home directory"), "{e}");
        let e = refused(work(&home.join("src/../.")));
        assert!(e.contains("is your home directory"), "the real path counts: {e}");
        let e = resolve_with(
            Request::default(),
            &env(&[("WORK_DIR", "/"), ("HOME", home.to_str().unwrap())]),
            Path::new("/x"),
            &trust,
            HOST,
        );
        assert!(e.unwrap_err().to_string().contains("root of the host"));
        let e = refused(Request { home: Some(home.clone()), ..work(&project) });
        assert!(e.contains("agent home") && e.contains("is your home directory") && e.contains("--home"), "{e}");
        let e = refused(Request { home: Some(home.join(".local/share/agentvm/trust/x")), ..work(&project) });
        assert!(e.contains("is inside agentvm's trust records"), "{e}");

        // Without HOME, agentvm's own dirs still count.
        let local = home.join(".local");
        std::fs::create_dir_all(&local).unwrap();
        let e = resolve_with(work(&local), &env(&[]), Path::new("/x"), &trust, HOST).unwrap_err().to_string();
        assert!(e.contains("contains agentvm's trust records"), "{e}");
        assert!(resolve_with(work(&project), &env(&e_home), Path::new("/x"), &trust, HOST).is_ok());

        // The user's config, and its target when it is a link, are the user's alone.
        let config_dir = home.join(".config/agentvm");
        std::fs::create_dir_all(&config_dir).unwrap();
        let dotfiles = home.join("dotfiles");
        std::fs::create_dir_all(&dotfiles).unwrap();
        std::fs::write(dotfiles.join("agentvm.toml"), "").unwrap();
        std::os::unix::fs::symlink(dotfiles.join("agentvm.toml"), config_dir.join("config.toml")).unwrap();
        for dir in [home.join(".config"), dotfiles] {
            let e = resolve_with(work(&dir), &env(&e_home), &config_dir.join("config.toml"), &trust, HOST);
            let e = e.unwrap_err().to_string();
            assert!(e.contains("contains agentvm's config"), "{e}");
        }
    }
}
