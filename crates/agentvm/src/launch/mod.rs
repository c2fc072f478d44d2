//! One `agentvm run`: from resolved settings to the program's exit status.
//!
//! Order of events: check tools, evaluate the dev shell (if asked), get the
//! image, create the instance dir,
//! build the initramfs in memory, start one virtiofsd per share, start QEMU,
//! relay the terminal or the streams until the guest reports the exit
//! status and powers off, then stop and reap every helper and remove the
//! instance dir.

pub mod initramfs;

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentvm_proto::{Containers, Frame, FrameReader, LaunchSpec, Mount, User, MODULES_DIR, SPEC_PATH};

use crate::config::flavor::Flavor;
use crate::config::Settings;
use crate::console::{self, RawMode};
use crate::guest_env::cri;
use crate::guest_env::devshell::{self, DevShell};
use crate::guest_env::home::{self, VmFacts};
use crate::image::{self, kmod, Image, LayerRecipe, Recipe, Store};
use crate::instance::console_log;
use crate::instance::{self, Instance, InstanceMeta};
use crate::launch::initramfs::Cpio;
use crate::net::egress;
use crate::net::forwarding;
use crate::net::shield::{self, Shield};
use crate::net::{self, NetworkMode};
use crate::tools;
use crate::vm::process::{self, Helper};
use crate::vm::share::{self, CacheMode, IdMap, Share};
use crate::vm::{self, accel, Accel, VmConfig};

/// Lines of the guest console shown when a launch fails.
const CONSOLE_TAIL_LINES: usize = 25;
/// The end of the console those lines are taken from (a guest may write
/// lines of any length).
const CONSOLE_TAIL_BYTES: u64 = 16 << 10;
/// The end of the console `--verbose` prints when the run ends.
const VERBOSE_CONSOLE_BYTES: u64 = 1 << 20;
/// Capacity asked for the console pipe.
const CONSOLE_PIPE_BYTES: i32 = 1 << 20;
/// How long the console's last bytes may take to reach the log after QEMU
/// exited.
const CONSOLE_DRAIN: Duration = Duration::from_secs(2);
/// How long the guest may take to power off after the program ended, or to
/// react to a stop request, before QEMU is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long QEMU may outlive an exited helper before the helper is blamed.
const HELPER_BLAME_DELAY: Duration = Duration::from_secs(1);
/// Guest home directory of the agent user.
pub const GUEST_HOME: &str = "/home/agent";
/// Guest mount point of the project.
pub const GUEST_WORK: &str = "/work";

/// A launch that failed; the program's own failures are exit codes instead.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("qemu-system-x86_64 not found: run scripts/setup-host, then `agentvm doctor`")]
    NoQemu,
    #[error("the guest init (agentvm-guest) was not found next to {exe}: build the workspace (`cargo build --workspace`) or set AGENTVM_GUEST_INIT")]
    NoGuestInit { exe: String },
    #[error(transparent)]
    Accel(#[from] accel::AccelError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Share(#[from] share::ShareError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    Cri(#[from] cri::CriError),
    #[error("--shield-secrets: {0}")]
    Shield(String),
    #[error(transparent)]
    Instance(#[from] instance::InstanceError),
    #[error(transparent)]
    Paths(#[from] crate::paths::PathsError),
    #[error(transparent)]
    Devshell(#[from] devshell::DevshellError),
    #[error("cannot create the agent home {path}: {source}")]
    Home { path: PathBuf, source: io::Error },
    #[error("cannot read {path} for the initramfs: {source}")]
    Initramfs { path: PathBuf, source: io::Error },
    #[error("{what}: {source}")]
    Os { what: &'static str, source: io::Error },
    #[error("cannot start QEMU: {0}")]
    QemuSpawn(io::Error),
    #[error("QEMU failed to start the VM ({status}):\n{log}")]
    QemuFailed { status: String, log: String },
    #[error("the guest failed to start the program: {message}\n--- guest console (last lines) ---\n{console}")]
    GuestInit { message: String, console: String },
    #[error("the VM ended without reporting the program's exit status (QEMU {status}); the guest may have crashed\n--- guest console (last lines) ---\n{console}")]
    GuestDied { status: String, console: String },
    #[error("QEMU was killed ({status}) by something other than agentvm; the program's exit status is lost\n--- guest console (last lines) ---\n{console}")]
    QemuKilled { status: String, console: String },
    #[error("{helper} exited unexpectedly ({status}); the VM was stopped\n{log}")]
    HelperDied { helper: String, status: String, log: String },
    #[error("stopped by signal {0} before the program reported its exit status")]
    Interrupted(i32),
}

impl LaunchError {
    /// The process exit status for this failure: 128+N for a signal,
    /// otherwise 125 (agentvm itself failed, as `docker run` does).
    pub fn exit_code(&self) -> i32 {
        match self {
            LaunchError::Interrupted(sig) => 128 + sig,
            _ => 125,
        }
    }
}

fn os(what: &'static str) -> impl FnOnce(io::Error) -> LaunchError {
    move |source| LaunchError::Os { what, source }
}

/// Runs the settings' program in a new VM and returns its exit status.
/// `started` is when agentvm started, for `--verbose` timing.
pub fn run(settings: &Settings, started: Instant) -> Result<i32, LaunchError> {
    let qemu_bin = tools::find_qemu().ok_or(LaunchError::NoQemu)?;
    let guest_init = tools::find_guest_init().ok_or_else(|| LaunchError::NoGuestInit {
        exe: std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default(),
    })?;
    share::find_virtiofsd().ok_or(share::ShareError::NoVirtiofsd)?;
    let (accel, fallback) = accel::choose(settings.accel)?;
    if let Some(why) = fallback {
        eprintln!("agentvm: warning: no usable KVM: {why}; falling back to TCG (slow)");
    }

    let devshell = prepare_devshell(settings)?;

    let store = Store::open(Store::default_dir()?);
    let mut progress = image::TerminalProgress::new();
    let image = store.ensure(&base_recipe(&settings.flavor, !settings.cri.is_empty()), &mut progress)?;
    let layers = match layer_recipe(&settings.flavor) {
        Some(recipe) => vec![store.ensure_layer(&recipe, &mut progress)?.squashfs()],
        None => Vec::new(),
    };

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&settings.home_dir)
        .map_err(|source| LaunchError::Home { path: settings.home_dir.clone(), source })?;
    let facts = VmFacts { memory_mib: settings.memory_mib, cpus: settings.cpus };
    if let Err(e) = home::prepare(&settings.home_dir, &settings.flavor, &facts, home::host_git_identity) {
        eprintln!("agentvm: warning: could not prepare the agent home: {e}");
    }

    // Locked for the whole run: one run of a project at a time uses it.
    let cri_disk = if settings.cri.is_empty() {
        None
    } else {
        let path = cri::disk_path(&crate::paths::data_dir()?, &crate::paths::project_home_name(&settings.work_dir));
        Some(cri::open_disk(&path, settings.cri_disk_mib)?)
    };

    let inst = Instance::create(&crate::paths::runtime_base())?;
    let mut meta = InstanceMeta {
        id: inst.id.clone(),
        pid: std::process::id(),
        pid_start: instance::process_start_ticks(std::process::id()),
        flavor: settings.flavor.name.clone(),
        work_dir: settings.work_dir.clone(),
        memory_mib: settings.memory_mib,
        cpus: settings.cpus,
        started: instance::now_secs(),
        qemu_pid: None,
        ports: settings.ports.iter().map(ToString::to_string).collect(),
        host_ports: settings.host_ports.clone(),
    };
    inst.write_meta(&meta)?;

    let tty = console::is_tty(0) && console::is_tty(1);
    let ids = IdMap::current();
    let shares = shares(settings, devshell.as_ref());
    let mut env = match &devshell {
        Some(shell) => devshell::apply(&settings.guest_env.vars, shell),
        None => settings.guest_env.vars.clone(),
    };
    let shield = if settings.shield_secrets { Some(Arc::new(shield_keys(settings, &mut env)?)) } else { None };
    let ca_pem = shield.as_ref().map(|s| s.ca_pem().to_string());
    let spec = launch_spec(settings, env, ca_pem, &image, layers.len(), &shares, ids, tty, &inst.id);
    let initrd = memfd_with(&build_initramfs(&guest_init, &image, &spec)?)?;

    // Signals are read from a signalfd from here on; helpers unblock them.
    let signals = SignalFd::block_and_open()?;

    let mut helpers = Vec::new();
    let mut share_sockets = Vec::new();
    for s in &shares {
        let (helper, socket) = share::start(s, ids, &inst.dir)?;
        helpers.push(helper);
        share_sockets.push((s.tag.clone(), socket));
    }

    let (mut netdev, mut net_fd) = (None, None);
    if settings.network == NetworkMode::Open {
        let (stack, warning) = net::choose_stack(settings.net_backend, net::find_passt())?;
        if let Some(w) = warning {
            eprintln!("agentvm: warning: {w}");
        }
        match stack {
            net::Stack::Passt(bin) => {
                let (passt, fd) = net::start_passt(&bin, &settings.ports, &inst.dir)?;
                helpers.push(passt);
                net_fd = Some(fd);
                netdev = Some(net::passt_netdev(5));
            }
            net::Stack::Slirp => netdev = Some(net::slirp_netdev(&settings.ports)?),
        }
    }

    let (ctl, ctl_guest) = socketpair()?;
    let (console_ours, console_qemu) = console_pipe()?;
    let console_path = inst.dir.join(console_log::LOG);
    let console_recorder = console_log::Recorder::start(std::fs::File::from(console_ours), &console_path)
        .map_err(os("record the guest console"))?;
    // Started after the signals are blocked, so its threads never take one.
    let allow_mode = settings.network == NetworkMode::Allow;
    let forward_guest = if settings.host_ports.is_empty() && !allow_mode {
        None
    } else {
        let routes = forwarding::Routes {
            host_ports: settings.host_ports.clone(),
            proxy: allow_mode
                .then(|| egress::Proxy::new(settings.allow.clone(), shield.clone(), &egress::log_path(&inst.dir))),
            published: if allow_mode {
                forwarding::bind_published(&settings.ports).map_err(os("listen on a published port"))?
            } else {
                Vec::new()
            },
        };
        let (ours, theirs) = socketpair()?;
        forwarding::serve(UnixStream::from(ours), routes).map_err(os("start port forwarding"))?;
        Some(theirs)
    };
    let cfg = VmConfig {
        name: format!("agentvm-{}", inst.id),
        accel,
        cpus: settings.cpus,
        memory_mib: vm::qemu_memory_mib(settings.memory_mib),
        kernel: image.kernel(),
        initrd: PathBuf::from("/proc/self/fd/4"),
        cmdline: vm::kernel_cmdline(if accel == Accel::Tcg { accel::host_tsc_khz() } else { None }, settings.verbose),
        root_image: image.root(),
        layers,
        console_fd: 7,
        control_fd: 3,
        shares: share_sockets,
        exec_sockets: (0..agentvm_proto::EXEC_PORTS).map(|i| inst.dir.join(format!("exec-{i}.sock"))).collect(),
        sandbox: true,
        netdev,
        forward_fd: forward_guest.as_ref().map(|_| 6),
        data_disk: cri_disk.as_ref().map(|d| d.path.clone()),
    };
    let mut cmd = Command::new(&qemu_bin);
    cmd.args(vm::qemu_args(&cfg));
    let qemu = process::spawn(
        "QEMU",
        cmd,
        &qemu_fds(&ctl_guest, &initrd, net_fd.as_ref(), forward_guest.as_ref(), &console_qemu),
        &inst.dir.join("qemu.log"),
    )
    .map_err(LaunchError::QemuSpawn)?;
    if settings.verbose {
        // bench/run reads this line: the launcher's own work before QEMU.
        eprintln!("agentvm: QEMU started {:.1} ms after agentvm", started.elapsed().as_secs_f64() * 1000.0);
    }
    drop(ctl_guest);
    drop(console_qemu);
    drop(initrd);
    drop(net_fd);
    drop(forward_guest);
    // For `agentvm ps` (memory use) and `agentvm stop`.
    meta.qemu_pid = Some(qemu.child.id());
    inst.write_meta(&meta)?;

    let raw = if tty { RawMode::enable(0).ok() } else { None };
    let mut relay = Relay::new(ctl, signals, tty);
    let end = relay.run(qemu, &mut helpers);
    drop(raw);

    for h in &mut helpers {
        h.signal(libc::SIGTERM);
        h.stop(Duration::from_secs(2));
    }
    let console_bytes = console_recorder.finish(CONSOLE_DRAIN);
    if settings.verbose {
        print_console(&console_path, console_bytes);
    }
    let console = process::tail_lines(&console_log::tail(&console_path, CONSOLE_TAIL_BYTES), CONSOLE_TAIL_LINES);
    let result = end.into_result(console);
    drop(inst);
    result
}

/// Evaluates the project's dev shell when the settings ask for it, if the
/// user trusted its files. With `--devshell=try` a failure (an untrusted
/// file too) is a warning and the launch goes on without.
fn prepare_devshell(settings: &Settings) -> Result<Option<DevShell>, LaunchError> {
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
        Ok(Some(shell)) => {
            for w in &shell.warnings {
                eprintln!("agentvm: warning: {w}");
            }
            Ok(Some(shell))
        }
        Ok(None) => {
            eprintln!(
                "agentvm: warning: --devshell: {} has no flake.nix, devenv.nix, .devenv.flake.nix or .envrc; running without a dev shell",
                settings.work_dir.display()
            );
            Ok(None)
        }
        Err(e) if settings.devshell == devshell::Mode::Try => {
            eprintln!("agentvm: warning: {e}\nagentvm: warning: starting without the dev shell (--devshell=try)");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The directories shared into the guest: the project, the agent home, and
/// the host's Nix store (read-only) when the dev shell needs it.
pub fn shares(settings: &Settings, devshell: Option<&DevShell>) -> Vec<Share> {
    let mut shares = vec![
        Share {
            tag: "work".into(),
            host_dir: settings.work_dir.clone(),
            guest_path: GUEST_WORK.into(),
            read_only: false,
            cache: settings.work_cache,
        },
        // Other instances of the project share the home: keep revalidating.
        Share {
            tag: "home".into(),
            host_dir: settings.home_dir.clone(),
            guest_path: GUEST_HOME.into(),
            read_only: false,
            cache: CacheMode::Auto,
        },
    ];
    if let Some(store) = devshell.and_then(|d| d.nix_store.clone()) {
        shares.push(Share {
            tag: "nixstore".into(),
            host_dir: store,
            guest_path: devshell::NIX_STORE.into(),
            read_only: true,
            cache: CacheMode::Auto,
        });
    }
    shares
}

/// The fds QEMU inherits: control port as 3, initramfs as 4, network as 5,
/// host-port forwarding as 6, serial console as 7.
fn qemu_fds(
    ctl: &OwnedFd,
    initrd: &OwnedFd,
    net: Option<&OwnedFd>,
    forward: Option<&OwnedFd>,
    console: &OwnedFd,
) -> Vec<(RawFd, RawFd)> {
    let mut fds = vec![(ctl.as_raw_fd(), 3), (initrd.as_raw_fd(), 4)];
    fds.extend(net.map(|n| (n.as_raw_fd(), 5)));
    fds.extend(forward.map(|f| (f.as_raw_fd(), 6)));
    fds.push((console.as_raw_fd(), 7));
    fds
}

/// Prints the end of the guest console (`--verbose`); `total` is how much
/// the guest wrote, when known.
fn print_console(path: &Path, total: Option<u64>) {
    let shown = console_log::tail(path, VERBOSE_CONSOLE_BYTES);
    match total {
        Some(total) if total > shown.len() as u64 => {
            eprintln!("--- guest console (its last {} KiB of {} KiB) ---", shown.len() / 1024, total / 1024)
        }
        _ => eprintln!("--- guest console ---"),
    }
    eprintln!("{}", String::from_utf8_lossy(&shown));
}

/// The base image for a flavor: the shared base, plus the flavor's Debian
/// packages if it has any, plus every container runtime's when `cri` (one
/// image for any choice of runtimes; the guest starts only those asked for).
pub fn base_recipe(flavor: &Flavor, cri: bool) -> Recipe {
    let mut recipe = Recipe::base();
    if !flavor.apt.is_empty() {
        let apt: Vec<&str> = flavor.apt.iter().map(String::as_str).collect();
        recipe = recipe.with_layer(&format!("base-{}", flavor.name), &apt);
    }
    if cri {
        recipe = recipe.with_layer(&format!("{}+cri", recipe.name), &cri::all_packages());
    }
    recipe
}

/// The npm layer of a flavor, if it has npm packages.
pub fn layer_recipe(flavor: &Flavor) -> Option<LayerRecipe> {
    let npm = flavor.npm_specs();
    (!npm.is_empty()).then(|| LayerRecipe { name: flavor.name.clone(), npm })
}

/// Replaces the flavor's keys in `env` with placeholders and returns the
/// shield that knows the real ones.
fn shield_keys(s: &Settings, env: &mut [(String, String)]) -> Result<Shield, LaunchError> {
    let mut secrets = Vec::new();
    for (name, value) in env.iter_mut() {
        if s.flavor.keys.contains(name) && !value.is_empty() {
            let placeholder = shield::placeholder().map_err(|e| LaunchError::Shield(e.to_string()))?;
            let real = std::mem::replace(value, placeholder.clone());
            let forms = s.flavor.key_headers.get(name).map_or(&[][..], Vec::as_slice);
            secrets.push(
                shield::Secret::new(name, placeholder, real, forms).map_err(|e| LaunchError::Shield(e.to_string()))?,
            );
        }
    }
    if secrets.is_empty() {
        eprintln!(
            "agentvm: warning: --shield-secrets: none of {} is set, so there is no key to shield",
            s.flavor.keys.join(", ")
        );
    }
    let hosts = egress::AllowList::new(&s.flavor.secret_hosts).map_err(|e| LaunchError::Shield(e.to_string()))?;
    Shield::new(hosts, secrets).map_err(|e| LaunchError::Shield(e.to_string()))
}

/// The guest's view of this launch; `env` is the program's environment
/// before the network's and the shield's additions.
#[allow(clippy::too_many_arguments)]
fn launch_spec(
    s: &Settings,
    env: Vec<(String, String)>,
    ca_pem: Option<String>,
    image: &Image,
    layer_count: usize,
    shares: &[Share],
    ids: IdMap,
    tty: bool,
    id: &str,
) -> LaunchSpec {
    let allow = s.network == NetworkMode::Allow;
    LaunchSpec {
        hostname: format!("agentvm-{}", &id[..6]),
        modules: kmod::modules_for_launch(&image.meta.modules, s.network == NetworkMode::Open),
        root_device: format!("serial:{}", vm::ROOT_SERIAL),
        root_fstype: "squashfs".into(),
        layers: (0..layer_count).map(|i| format!("serial:{}", vm::layer_serial(i))).collect(),
        network: (s.network == NetworkMode::Open).then(net::guest_network),
        // Under --network allow the proxy is one more host port.
        host_ports: s.host_ports.iter().copied().chain(allow.then_some(egress::PROXY_PORT)).collect(),
        published_ports: if allow { s.ports.iter().map(|p| p.guest_port).collect() } else { Vec::new() },
        containers: (!s.cri.is_empty()).then(|| Containers {
            runtimes: s.cri.iter().map(|r| r.name().to_string()).collect(),
            disk: format!("serial:{}", vm::DATA_SERIAL),
        }),
        mounts: shares
            .iter()
            .map(|sh| Mount { tag: sh.tag.clone(), path: sh.guest_path.clone(), read_only: sh.read_only })
            .collect(),
        user: User { name: "agent".into(), uid: ids.guest_uid, gid: ids.guest_gid, home: GUEST_HOME.into() },
        cwd: GUEST_WORK.into(),
        argv: s.argv.clone(),
        env: env
            .into_iter()
            .chain(if allow { egress::guest_env() } else { Vec::new() })
            .chain(if ca_pem.is_some() { shield::guest_env() } else { Vec::new() })
            .collect(),
        ca_certs: ca_pem.into_iter().collect(),
        tty,
        winsize: if tty { console::winsize(0) } else { None },
        verbose: s.verbose,
    }
}

/// The initramfs: guest init as /init, the spec's boot modules (without their
/// signatures), the spec.
fn build_initramfs(guest_init: &Path, image: &Image, spec: &LaunchSpec) -> Result<Vec<u8>, LaunchError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LaunchError::Initramfs { path, source }
    };
    let mut c = Cpio::new();
    c.file_from("init", 0o755, guest_init).map_err(read_err(guest_init))?;
    c.dir("agentvm", 0o700).dir(MODULES_DIR, 0o700);
    for name in &spec.modules {
        let path = image.module_path(name);
        let ko = std::fs::read(&path).map_err(read_err(&path))?;
        c.file(&format!("{MODULES_DIR}/{name}"), 0o600, kmod::strip_signature(&ko));
    }
    c.file(SPEC_PATH, 0o600, &spec.to_bytes().expect("spec serializes"));
    // QEMU loads the initrd page-aligned just under the top of low RAM,
    // where microvm's firmware also keeps the ACPI tables (under 1 KiB). A
    // size that is a whole number of pages leaves the top page to them;
    // otherwise the archive's tail can overwrite them and the guest boots
    // without ACPI: one vCPU, no devices, no power-off.
    Ok(c.finish_padded(4096))
}

/// An anonymous in-memory file holding `data`.
fn memfd_with(data: &[u8]) -> Result<OwnedFd, LaunchError> {
    // SAFETY: memfd_create with a valid C string; the fd is ours.
    let fd = unsafe { libc::memfd_create(c"agentvm-initramfs".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(os("memfd_create")(io::Error::last_os_error()));
    }
    // SAFETY: fresh fd we own.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(data).map_err(os("writing the initramfs"))?;
    Ok(OwnedFd::from(f))
}

fn socketpair() -> Result<(OwnedFd, OwnedFd), LaunchError> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two fds on success.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    if r != 0 {
        return Err(os("socketpair")(io::Error::last_os_error()));
    }
    // SAFETY: both fds are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The pipe of the guest console: (read end, write end for QEMU).
fn console_pipe() -> Result<(OwnedFd, OwnedFd), LaunchError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os("pipe")(io::Error::last_os_error()));
    }
    // SAFETY: both fds are fresh and ours.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // More room for a console burst while the recorder waits; the default
    // (64 KiB) is fine too, so a refusal is ignored.
    // SAFETY: F_SETPIPE_SZ on a pipe we own.
    unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, CONSOLE_PIPE_BYTES) };
    Ok((read, write))
}

/// Signals the launcher handles, read synchronously from a signalfd.
struct SignalFd(OwnedFd);

const HANDLED_SIGNALS: [i32; 5] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGWINCH, libc::SIGCHLD];

impl SignalFd {
    fn block_and_open() -> Result<SignalFd, LaunchError> {
        // SAFETY: building and applying a signal set we own.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in HANDLED_SIGNALS {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(os("signalfd")(io::Error::last_os_error()));
            }
            Ok(SignalFd(OwnedFd::from_raw_fd(fd)))
        }
    }

    /// The pending signals, in arrival order.
    fn read(&self) -> Vec<i32> {
        let mut out = Vec::new();
        loop {
            // SAFETY: signalfd_siginfo is plain data; all zeroes is valid.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            // SAFETY: reading whole signalfd_siginfo records into one we own.
            let n = unsafe {
                libc::read(
                    self.0.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    std::mem::size_of::<libc::signalfd_siginfo>(),
                )
            };
            if n != std::mem::size_of::<libc::signalfd_siginfo>() as isize {
                return out;
            }
            out.push(info.ssi_signo as i32);
        }
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // SAFETY: unblocking the signals we blocked.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in HANDLED_SIGNALS {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
}

/// How a relay ended.
struct End {
    exit: Option<i32>,
    init_error: Option<String>,
    helper_died: Option<(String, String, String)>,
    stop_signal: Option<i32>,
    qemu_status: String,
    qemu_ok: bool,
    /// QEMU was killed by a signal.
    qemu_signalled: bool,
    /// agentvm itself signalled QEMU (grace period over, helper died, ...).
    we_stopped_qemu: bool,
    qemu_log: String,
    /// QEMU exited before the guest said a word.
    never_started: bool,
}

impl End {
    fn into_result(self, console: String) -> Result<i32, LaunchError> {
        if let Some(code) = self.exit {
            return Ok(code);
        }
        if let Some(message) = self.init_error {
            return Err(LaunchError::GuestInit { message, console });
        }
        if let Some((helper, status, log)) = self.helper_died {
            return Err(LaunchError::HelperDied { helper, status, log });
        }
        if let Some(sig) = self.stop_signal {
            return Err(LaunchError::Interrupted(sig));
        }
        if self.qemu_signalled && !self.we_stopped_qemu {
            return Err(LaunchError::QemuKilled { status: self.qemu_status, console });
        }
        if self.never_started && !self.qemu_ok {
            return Err(LaunchError::QemuFailed { status: self.qemu_status, log: self.qemu_log });
        }
        Err(LaunchError::GuestDied { status: self.qemu_status, console })
    }
}

/// Moves bytes between the host's stdio and the guest's control port.
struct Relay {
    ctl: OwnedFd,
    signals: SignalFd,
    tty: bool,
    reader: FrameReader,
    to_guest: Vec<u8>,
    stdin_open: bool,
    stdout_ok: bool,
    stderr_ok: bool,
}

/// Stop reading stdin while this much is queued for the guest.
const MAX_QUEUED: usize = 1 << 20;

impl Relay {
    fn new(ctl: OwnedFd, signals: SignalFd, tty: bool) -> Relay {
        // SAFETY: making our own socket non-blocking.
        unsafe {
            let fl = libc::fcntl(ctl.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(ctl.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Relay {
            ctl,
            signals,
            tty,
            reader: FrameReader::new(),
            to_guest: Vec::new(),
            stdin_open: true,
            stdout_ok: true,
            stderr_ok: true,
        }
    }

    fn run(&mut self, mut qemu: Helper, helpers: &mut [Helper]) -> End {
        let mut end = End {
            exit: None,
            init_error: None,
            helper_died: None,
            stop_signal: None,
            qemu_status: String::new(),
            qemu_ok: false,
            qemu_signalled: false,
            we_stopped_qemu: false,
            qemu_log: String::new(),
            never_started: true,
        };
        let mut ctl_open = true;
        let mut kill_at: Option<Instant> = None;
        let mut helper_gone_at: Option<Instant> = None;
        loop {
            if let Some(status) = qemu.poll() {
                if ctl_open {
                    self.read_ctl(&mut end);
                }
                end.qemu_status = process::describe(status);
                end.qemu_ok = status.success();
                end.qemu_signalled = std::os::unix::process::ExitStatusExt::signal(&status).is_some();
                end.qemu_log = qemu.log_tail(CONSOLE_TAIL_LINES);
                return end;
            }
            // A helper that exits is to blame only if QEMU is still running a
            // moment later: when QEMU ends, virtiofsd ends too, and the two
            // exits may be seen in either order.
            if end.helper_died.is_none() {
                if let Some(h) = helpers.iter_mut().find_map(|h| h.poll().map(|_| h)) {
                    let since = *helper_gone_at.get_or_insert_with(Instant::now);
                    if since.elapsed() >= HELPER_BLAME_DELAY {
                        let status = process::describe(h.poll().expect("exited"));
                        end.helper_died = Some((h.name.clone(), status, h.log_tail(10)));
                        qemu.signal(libc::SIGTERM);
                        end.we_stopped_qemu = true;
                        kill_at.get_or_insert(Instant::now() + Duration::from_secs(2));
                    }
                }
            }
            if kill_at.is_some_and(|t| Instant::now() >= t) {
                qemu.signal(libc::SIGKILL);
                end.we_stopped_qemu = true;
            }

            let stdin_wanted = self.stdin_open && self.to_guest.len() < MAX_QUEUED;
            let mut fds = vec![
                pollfd(self.signals.0.as_raw_fd(), libc::POLLIN),
                pollfd(
                    if ctl_open { self.ctl.as_raw_fd() } else { -1 },
                    libc::POLLIN | if self.to_guest.is_empty() { 0 } else { libc::POLLOUT },
                ),
                pollfd(if stdin_wanted { 0 } else { -1 }, libc::POLLIN),
            ];
            // SAFETY: polling an array of pollfd we own.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, 100) };
            if n < 0 {
                continue; // EINTR
            }
            if fds[0].revents != 0 {
                for sig in self.signals.read() {
                    self.on_signal(sig, &mut end, &mut kill_at, &mut qemu);
                }
            }
            if fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                ctl_open = self.read_ctl(&mut end);
                if end.exit.is_some() || end.init_error.is_some() {
                    // The guest powers off by itself; give it time.
                    kill_at.get_or_insert(Instant::now() + STOP_GRACE);
                }
            }
            if ctl_open && fds[1].revents & libc::POLLOUT != 0 {
                self.flush_to_guest();
            }
            if fds[2].revents != 0 {
                self.read_stdin();
            }
        }
    }

    fn on_signal(&mut self, sig: i32, end: &mut End, kill_at: &mut Option<Instant>, qemu: &mut Helper) {
        match sig {
            libc::SIGWINCH if self.tty => {
                if let Some((rows, cols)) = console::winsize(0) {
                    Frame::Resize { rows, cols }.encode(&mut self.to_guest);
                }
            }
            libc::SIGINT | libc::SIGTERM | libc::SIGHUP => {
                if end.stop_signal.is_some() {
                    // Asked twice: stop now.
                    qemu.signal(libc::SIGKILL);
                    end.we_stopped_qemu = true;
                } else {
                    end.stop_signal = Some(sig);
                    Frame::Signal(sig as u8).encode(&mut self.to_guest);
                    *kill_at = Some(Instant::now() + STOP_GRACE);
                }
            }
            _ => {}
        }
    }

    /// Reads and handles what the guest sent; false once the channel closed.
    fn read_ctl(&mut self, end: &mut End) -> bool {
        let mut buf = [0u8; 65536];
        let open = loop {
            match (&File(self.ctl.as_raw_fd())).read(&mut buf) {
                Ok(0) => break false,
                Ok(n) => self.reader.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break false,
            }
        };
        loop {
            match self.reader.next_frame() {
                Ok(Some(frame)) => self.on_frame(frame, end),
                Ok(None) => break,
                Err(e) => {
                    end.init_error.get_or_insert(format!("corrupt data from the guest: {e}"));
                    return false;
                }
            }
        }
        open
    }

    fn on_frame(&mut self, frame: Frame, end: &mut End) {
        end.never_started = false;
        match frame {
            Frame::Stdout(d) => self.stdout_ok = self.stdout_ok && write_fd(1, &d),
            Frame::Stderr(d) => self.stderr_ok = self.stderr_ok && write_fd(2, &d),
            Frame::Exit(code) => end.exit = Some(code),
            Frame::InitError(msg) => end.init_error = Some(msg),
            Frame::Started => {
                // A stop asked for before the guest could listen still counts.
                if let Some(sig) = end.stop_signal {
                    Frame::Signal(sig as u8).encode(&mut self.to_guest);
                }
            }
            // Host-bound only; ignore anything else.
            _ => {}
        }
    }

    fn flush_to_guest(&mut self) {
        while !self.to_guest.is_empty() {
            match (&File(self.ctl.as_raw_fd())).write(&self.to_guest) {
                Ok(n) => {
                    self.to_guest.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    fn read_stdin(&mut self) {
        let mut buf = [0u8; 65536];
        match (&File(0)).read(&mut buf) {
            Ok(0) | Err(_) => {
                self.stdin_open = false;
                if !self.tty {
                    Frame::StdinEof.encode(&mut self.to_guest);
                }
            }
            Ok(n) => Frame::Stdin(buf[..n].to_vec()).encode(&mut self.to_guest),
        }
        self.flush_to_guest();
    }
}

fn pollfd(fd: RawFd, events: i16) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

/// Writes all of `data` to `fd`; false if the reader went away.
fn write_fd(fd: RawFd, data: &[u8]) -> bool {
    (&File(fd)).write_all(data).and_then(|()| (&File(fd)).flush()).is_ok()
}

/// A borrowed fd usable with Read/Write, never closed.
struct File(RawFd);

impl Read for &File {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reading into a buffer we own from a borrowed fd.
        let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for &File {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: writing a buffer we own to a borrowed fd.
        let n = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
