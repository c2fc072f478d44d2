//! Warm starts (issue 17): a new VM restored from a template of its shape
//! instead of booted.
//!
//! A template is a VM booted once with a template spec (the guest mounts the
//! image and waits for its launch, with the shares' and the network's
//! drivers not bound), saved by QMP with its RAM in a file. A warm start
//! copies that RAM into a memfd, starts QEMU with the same command line as
//! a cold start (plus `-incoming defer`), fresh helpers as always, loads the
//! saved state, and sends the launch over the control port
//! ([`Frame::Warm`]): the spec, the host's clock, a random seed and a machine
//! id, so each VM is its own. Anything that keeps a template from serving
//! is a [`WarmError`], and the caller starts cold instead.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentvm_proto::frame::{self, MAX_PAYLOAD};
use agentvm_proto::{CaTrust, Frame, FrameError, LaunchSpec, User, WarmLaunch};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::fds::QemuEnds;
use super::initramfs::{self, Initramfs, InitramfsError};
use super::plan::Plan;
use super::resources::Resources;
use crate::image::hex;
use crate::image::template::{self, Template, TemplateMeta, Templates};
use crate::image::{ImageError, Store};
use crate::sys;
use crate::vm::process::{self, Helper};
use crate::vm::qmp::{Qmp, QmpError};
use crate::vm::share::{self, Share, ShareError};
use crate::vm::{self, VmConfig};

/// How a run starts its VM (`--start`, `AGENTVM_START`, `start = ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StartMode {
    /// Boot the kernel and the guest init.
    Cold,
    /// Restore a template of the VM's shape (made on first use); a cold
    /// start, with a line saying why, when no template can serve.
    #[default]
    Warm,
}

pub use super::fds::{QMP_FD, RAM_FD};

/// The name of a warm start's RAM copy (a memfd: `/memfd:agentvm-ram` in
/// QEMU's maps).
pub const RAM_COPY_NAME: &str = "agentvm-ram";

/// Bounds on a template's making and a restore (TCG on a busy host).
const TEMPLATE_BOOT: Duration = Duration::from_secs(180);
const SAVE: Duration = Duration::from_secs(60);
const QMP_ANSWER: Duration = Duration::from_secs(10);
const RESTORE: Duration = Duration::from_secs(30);
const GUEST_ANSWER: Duration = Duration::from_secs(10);
const QEMU_EXIT: Duration = Duration::from_secs(10);
/// The most a guest may send before its launch (its frames then are tiny).
const BEFORE_LAUNCH: usize = 64 << 10;

/// Why a template cannot serve this launch (the run then starts cold).
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("the guest {0}")]
    Guest(String),
    #[error("the launch spec is {0} bytes, over the control port's {MAX_PAYLOAD}")]
    SpecTooLarge(usize),
    #[error("QEMU could not load the template {template}{}: {source} (it is removed: the next warm start makes a new one)", .qemu_said.as_deref().map(|s| format!(" ({s})")).unwrap_or_default())]
    Refused { template: String, qemu_said: Option<String>, source: QmpError },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> WarmError {
    let what = what.into();
    move |source| WarmError::Io { what, source }
}

/// What a warm start of one plan uses: the template's key, its initramfs
/// (the same bytes the template booted) and, once found or made, the template.
pub struct WarmPlan {
    pub key: String,
    pub initramfs: Initramfs,
}

impl WarmPlan {
    /// The template's key and initramfs for `plan`.
    pub fn new(plan: &Plan, res: &Resources) -> Result<WarmPlan, WarmError> {
        let initramfs = initramfs::build(&res.guest_init, &res.image, &template_spec(&plan.spec))?;
        let key = plan_key(&plan.vm, &qemu_identity(&res.qemu), &initramfs.bytes);
        Ok(WarmPlan { key, initramfs })
    }
}

/// The spec a template boots with: the image's part of `spec` only (no
/// program, user data or secret).
pub fn template_spec(spec: &LaunchSpec) -> LaunchSpec {
    LaunchSpec {
        hostname: "agentvm-template".into(),
        modules: spec.modules.clone(),
        root_device: spec.root_device.clone(),
        root_fstype: spec.root_fstype.clone(),
        layers: spec.layers.clone(),
        mounts: Vec::new(),
        network: None,
        host_ports: Vec::new(),
        published_ports: Vec::new(),
        // The host's public roots are the same for every launch: installed
        // in the template, no warm start sends or writes their 200 KB. The
        // extras (company CAs, an instance's CA) come with each launch.
        ca_trust: CaTrust { bundle: spec.ca_trust.bundle.clone(), extra: Vec::new() },
        containers: None,
        sandbox: None,
        user: User { name: String::new(), uid: 0, gid: 0, home: String::new() },
        cwd: "/".into(),
        argv: Vec::new(),
        env: Vec::new(),
        tty: false,
        winsize: None,
        verbose: spec.verbose,
        clipboard: false,
        watch: false,
        template: true,
    }
}

/// The spec a warm start sends: `spec` without what its template (made
/// from [`template_spec`]) installed already.
fn warm_launch_spec(spec: &LaunchSpec) -> LaunchSpec {
    let mut spec = spec.clone();
    spec.ca_trust.bundle = Vec::new();
    spec
}

/// QEMU's config for restoring `vm`: the same machine and devices, RAM
/// from the memfd at [`RAM_FD`], a QMP monitor, and a wait for the state.
pub fn restore_vm(vm: &VmConfig) -> VmConfig {
    VmConfig {
        memory_file: Some(PathBuf::from(format!("/proc/self/fd/{RAM_FD}"))),
        qmp_fd: Some(QMP_FD),
        incoming: true,
        ..vm.clone()
    }
}

/// `vm` with its per-run parts (name, socket paths, RAM file) put under
/// `dir`: the template's shape. What stays is what a restore must match:
/// machine, accelerator, CPUs, memory, kernel, command line, image and
/// layer files, and every device.
pub fn shape_in(vm: &VmConfig, dir: &Path) -> VmConfig {
    VmConfig {
        name: "agentvm-template".into(),
        shares: vm.shares.iter().map(|(tag, _)| (tag.clone(), share::socket_path(dir, tag))).collect(),
        exec_sockets: (0..vm.exec_sockets.len()).map(|i| dir.join(format!("exec-{i}.sock"))).collect(),
        data_disks: vm.data_disks.iter().map(|(serial, _)| (serial.clone(), stand_in_disk(dir, serial))).collect(),
        memory_file: Some(dir.join(template::RAM_FILE)),
        incoming: false,
        ..vm.clone()
    }
}

/// Where a template keeps the empty stand-in for the data disk `serial`
/// (a sandbox's or the container storage): the template's guest binds a
/// disk of the run's size, and the restore opens the run's own file. The
/// guest caches none of the stand-in's blocks: the kernel drops a disk's
/// cache when the bind's partition scan closes it.
fn stand_in_disk(dir: &Path, serial: &str) -> PathBuf {
    dir.join(format!("disk-{serial}.img"))
}

/// The key of the template that restores `vm` (a cold start's config).
pub fn plan_key(vm: &VmConfig, qemu: &str, initramfs: &[u8]) -> String {
    let disks = data_disk_sizes(vm);
    template_key(qemu, &shape_in(&restore_vm(vm), Path::new("/t")), &disks, initramfs)
}

/// Each data disk's size in bytes (0 when it cannot be read: the restore
/// then fails and the run starts cold). The guest learns a disk's size
/// when its driver binds, in the template, so the size is part of the shape.
fn data_disk_sizes(vm: &VmConfig) -> Vec<u64> {
    vm.data_disks.iter().map(|(_, path)| fs::metadata(path).map_or(0, |m| m.len())).collect()
}

/// The template key: QEMU's identity, the shape's command line, its data
/// disks' sizes and the template's initramfs (guest init, modules, the
/// image's part of the spec).
pub fn template_key(qemu: &str, shape: &VmConfig, disk_sizes: &[u64], initramfs: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"agentvm template 1\0");
    h.update(qemu.as_bytes());
    h.update(b"\0");
    for arg in vm::qemu_args(shape) {
        h.update(arg.as_encoded_bytes());
        h.update(b"\0");
    }
    for size in disk_sizes {
        h.update(size.to_le_bytes());
    }
    h.update(Sha256::digest(initramfs));
    format!("{:x}", h.finalize())
}

/// QEMU's binary as a key part: its path, size and change time (an upgrade
/// changes them; `--version` would cost a process per launch).
fn qemu_identity(qemu: &Path) -> String {
    match fs::metadata(qemu) {
        Ok(m) => format!("{} {} {}.{}", qemu.display(), m.len(), m.ctime(), m.ctime_nsec()),
        Err(_) => qemu.display().to_string(),
    }
}

/// The published template of `key`, if there is one.
pub fn find_template(key: &str) -> Option<Template> {
    Templates::new(&Store::open(Store::default_dir().ok()?)).find(key)
}

/// The template of `warm`'s key, made first (one cold boot and a save)
/// when the store has none.
pub fn ensure_template(warm: &WarmPlan, plan: &Plan, res: &Resources) -> Result<Template, WarmError> {
    let store = Store::open(Store::default_dir()?);
    Templates::new(&store).ensure(&warm.key, |tmp| {
        eprintln!("agentvm: making a warm-start template for this VM's shape (once)");
        make_template(tmp, warm, plan, res)
    })
}

/// Boots the template in `dir`, waits for the guest to be ready, saves it.
fn make_template(dir: &Path, warm: &WarmPlan, plan: &Plan, res: &Resources) -> Result<TemplateMeta, WarmError> {
    // The user's alone: the RAM file holds the guest's memory (its kernel's
    // random state before a restore reseeds it, among the rest).
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(format!("chmod {}", dir.display())))?;
    let empty = dir.join("empty");
    fs::create_dir(&empty).map_err(io_err(format!("create {}", empty.display())))?;
    let mut helpers = Vec::new();
    for s in &plan.shares {
        let share = Share { host_dir: empty.clone(), read_only: true, ..s.clone() };
        helpers.push(share::start(&share, res.ids, dir)?.0);
    }
    let vm = VmConfig { qmp_fd: Some(QMP_FD), ..shape_in(&plan.vm, dir) };
    make_stand_in_disks(&plan.vm, &vm)?;
    let mut ends = TemplateEnds::new(dir, &warm.initramfs.bytes, plan)?;
    let mut cmd = std::process::Command::new(&res.qemu);
    cmd.args(vm::qemu_args(&vm));
    let pass = ends.pass(plan);
    let mut qemu = process::spawn("QEMU (template)", cmd, &pass, &dir.join("qemu.log"))
        .map_err(io_err("start QEMU for the template"))?;
    drop(pass);
    // QEMU has them now: with ours closed, its exit reads as end of file.
    ends.qemu = None;
    let saved = save_when_ready(&ends, dir, &mut qemu);
    // A saved template's QEMU quits by itself; one that failed may still
    // wait, and virtiofsd waits for a QEMU that never came: end them now,
    // not after the grace period (the cold start waits for this).
    if saved.is_err() {
        qemu.signal(libc::SIGTERM);
    }
    qemu.stop(QEMU_EXIT);
    for h in &mut helpers {
        h.signal(libc::SIGTERM);
        h.stop(QEMU_EXIT);
    }
    saved?;
    for entry in fs::read_dir(dir).map_err(io_err("read the template dir"))?.flatten() {
        // Sockets of the helpers, and the stand-in disks a restore replaces.
        if entry.path().extension().is_some_and(|e| e == "sock" || e == "img") {
            let _ = fs::remove_file(entry.path());
        }
    }
    let _ = fs::remove_dir(&empty);
    // Half the saved RAM's pages are zeros its kernel wrote: as holes, no
    // warm start copies them. A file system that cannot punch holes only
    // keeps that cost.
    let ram = dir.join(template::RAM_FILE);
    if let Ok(file) = fs::OpenOptions::new().read(true).write(true).open(&ram) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = sys::punch_zero_pages(&file, len);
    }
    let ram_used = fs::metadata(&ram).map(|m| m.blocks() * 512).unwrap_or(0);
    let name = |p: &Path| p.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
    Ok(TemplateMeta {
        key: warm.key.clone(),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        image: res.image.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        layers: res.layers.iter().filter_map(|l| name(l)).collect(),
        memory_mib: plan.vm.memory_mib,
        cpus: plan.vm.cpus,
        accel: format!("{:?}", plan.vm.accel).to_lowercase(),
        ram_used,
        built_by: crate::build_info::VERSION_LONG.into(),
    })
}

/// Sparse, empty files of the run's data disks' sizes at the template's
/// disk paths (`shape`'s), for the template's guest to bind.
fn make_stand_in_disks(vm: &VmConfig, shape: &VmConfig) -> Result<(), WarmError> {
    for ((_, stand_in), size) in shape.data_disks.iter().zip(data_disk_sizes(vm)) {
        let file = File::create(stand_in).map_err(io_err(format!("create {}", stand_in.display())))?;
        file.set_len(size).map_err(io_err(format!("size {}", stand_in.display())))?;
    }
    Ok(())
}

/// Waits for the template guest's [`Frame::TemplateReady`], then stops the
/// VM and saves its device state (the RAM stays in its file).
fn save_when_ready(ends: &TemplateEnds, dir: &Path, qemu: &mut Helper) -> Result<(), WarmError> {
    match read_frame(&ends.control, TEMPLATE_BOOT)? {
        Frame::TemplateReady => {}
        other => return Err(WarmError::Guest(format!("sent {} instead of TemplateReady", frame_name(&other)))),
    }
    let stream = UnixStream::from(ends.qmp.try_clone().map_err(io_err("dup the QMP socket"))?);
    let mut qmp = Qmp::connect(stream, QMP_ANSWER)?;
    qmp.execute("stop", json!({}))?;
    qmp.ignore_shared_ram()?;
    let uri = format!("file:{}", dir.join(template::STATE_FILE).display());
    qmp.execute("migrate", json!({ "uri": uri }))?;
    qmp.wait_migration(SAVE)?;
    let _ = qmp.execute("quit", json!({}));
    let deadline = Instant::now() + QEMU_EXIT;
    while qemu.poll().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Our ends of the template VM's channels, and QEMU's.
struct TemplateEnds {
    control: OwnedFd,
    qmp: OwnedFd,
    /// Ends nothing reads: the network's, the forwarding channel's and the
    /// clipboard's (their drivers or tools are not set up in a template).
    _idle: Vec<OwnedFd>,
    /// QEMU's ends, until it has them: every channel the plan numbers, and
    /// the QMP socket.
    qemu: Option<(QemuEnds, OwnedFd)>,
}

impl TemplateEnds {
    /// A socket pair for each channel `plan` gives QEMU (the same set, so
    /// the template's command line is the plan's).
    fn new(dir: &Path, initramfs: &[u8], plan: &Plan) -> Result<TemplateEnds, WarmError> {
        let pair = || sys::socketpair().map_err(io_err("socketpair"));
        let mut idle = Vec::new();
        let mut optional = |wanted: Option<i32>| -> Result<Option<OwnedFd>, WarmError> {
            let Some(_) = wanted else { return Ok(None) };
            let (ours, qemus) = pair()?;
            idle.push(ours);
            Ok(Some(qemus))
        };
        let (network, forwarding, clipboard, watch) = (
            optional(plan.fds.network)?,
            optional(plan.fds.forwarding)?,
            optional(plan.fds.clipboard)?,
            optional(plan.fds.watch)?,
        );
        let (control, control_qemu) = pair()?;
        let (qmp, qmp_qemu) = pair()?;
        let initramfs = sys::memfd_with("agentvm-template-initramfs", initramfs).map_err(io_err("memfd_create"))?;
        let log = dir.join("console.log");
        let console = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log)
            .map_err(io_err(format!("create {}", log.display())))?;
        let console = OwnedFd::from(console);
        let ends = QemuEnds { control: control_qemu, initramfs, network, forwarding, console, clipboard, watch };
        Ok(TemplateEnds { control, qmp, _idle: idle, qemu: Some((ends, qmp_qemu)) })
    }

    /// QEMU's ends at the numbers the plan's command line names.
    fn pass(&self, plan: &Plan) -> Vec<(std::os::fd::BorrowedFd<'_>, i32)> {
        let Some((ends, qmp)) = &self.qemu else { return Vec::new() };
        let mut pass = plan.fds.pass(ends);
        pass.push((qmp.as_fd(), QMP_FD));
        pass
    }
}

/// A restore's own pieces: the RAM copy and the QMP socket (QEMU's ends
/// and ours), and the state to load.
pub struct Restore {
    /// QEMU's ends, until it has them: the RAM copy and its QMP socket.
    pub ram: Option<OwnedFd>,
    pub qmp_qemu: Option<OwnedFd>,
    pub qmp: OwnedFd,
    pub template: Template,
    /// The thread filling the RAM copy, until the load waits for it.
    copying: Option<RamCopying>,
}

impl Restore {
    /// Starts copying the template's RAM into a new memfd (its data only:
    /// holes stay holes) and opens the QMP socket pair. QEMU may map the
    /// copy meanwhile: it touches no guest RAM before the load.
    pub fn new(template: &Template) -> Result<Restore, WarmError> {
        let (ram, copying) = start_sparse_copy_to_memfd(&template.ram())?;
        let (qmp, qmp_qemu) = sys::socketpair().map_err(io_err("socketpair"))?;
        let template = template.clone();
        Ok(Restore { ram: Some(ram), qmp, qmp_qemu: Some(qmp_qemu), template, copying: Some(copying) })
    }

    /// Closes our copies of QEMU's ends once it runs, so that its exit
    /// reads as end of file instead of a wait for the time limit.
    pub fn qemu_has_its_ends(&mut self) {
        self.ram = None;
        self.qmp_qemu = None;
    }

    /// Loads the state into the waiting QEMU (once the RAM copy is whole:
    /// loading reads the devices' rings from guest RAM) and lets it run. A
    /// state QEMU refuses is removed with its template (`qemu_log` tells why).
    pub fn load(&mut self, qemu_log: &Path) -> Result<(), WarmError> {
        if let Some(copying) = self.copying.take() {
            copying.wait()?;
        }
        let stream = UnixStream::from(self.qmp.try_clone().map_err(io_err("dup the QMP socket"))?);
        let mut qmp = Qmp::connect(stream, QMP_ANSWER)?;
        qmp.ignore_shared_ram()?;
        let uri = format!("file:{}", self.template.state().display());
        let loaded = qmp.execute("migrate-incoming", json!({ "uri": uri })).and_then(|_| qmp.wait_migration(RESTORE));
        if let Err(source) = loaded {
            if let Ok(store) = Store::default_dir().map(Store::open) {
                let _ = Templates::new(&store).remove(&self.template.name());
            }
            let qemu_said = last_line(qemu_log);
            return Err(WarmError::Refused { template: self.template.name(), qemu_said, source });
        }
        qmp.execute("cont", json!({}))?;
        Ok(())
    }
}

/// Sends the launch to the restored guest and waits for it to take it.
pub fn hand_over(control: &OwnedFd, spec: &LaunchSpec) -> Result<(), WarmError> {
    let mut seed = [0u8; 32];
    let mut machine_id = [0u8; 16];
    for buf in [&mut seed[..], &mut machine_id[..]] {
        sys::random_bytes(buf).map_err(io_err("getrandom"))?;
    }
    let launch = WarmLaunch {
        spec: warm_launch_spec(spec),
        clock_ns: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
        seed: hex(&seed),
        machine_id: hex(&machine_id),
    };
    let bytes = Frame::Warm(Box::new(launch)).to_bytes();
    if bytes.len() - frame::HEADER_LEN > MAX_PAYLOAD {
        return Err(WarmError::SpecTooLarge(bytes.len()));
    }
    let mut stream = UnixStream::from(control.try_clone().map_err(io_err("dup the control socket"))?);
    stream.set_write_timeout(Some(GUEST_ANSWER)).map_err(io_err("set a timeout"))?;
    io::Write::write_all(&mut stream, &bytes).map_err(io_err("send the launch to the guest"))?;
    match read_frame(control, GUEST_ANSWER)? {
        Frame::Resumed => Ok(()),
        other => Err(WarmError::Guest(format!("sent {} instead of Resumed", frame_name(&other)))),
    }
}

/// Reads exactly one frame from `fd` (nothing after it: the relay reads
/// the rest), within `limit`.
fn read_frame(fd: &OwnedFd, limit: Duration) -> Result<Frame, WarmError> {
    let mut stream = UnixStream::from(fd.try_clone().map_err(io_err("dup the control socket"))?);
    stream.set_read_timeout(Some(limit)).map_err(io_err("set a timeout"))?;
    let not_in_time = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            WarmError::Guest(format!("did not answer within {} s", limit.as_secs()))
        }
        io::ErrorKind::UnexpectedEof => WarmError::Guest("closed the control port (did QEMU exit?)".into()),
        _ => WarmError::Io { what: "read the control port".into(), source: e },
    };
    match frame::read_one(&mut stream, BEFORE_LAUNCH) {
        Ok(Ok(frame)) => Ok(frame),
        Ok(Err(FrameError::TooLong(len))) => {
            Err(WarmError::Guest(format!("sent a frame of {len} bytes before its launch")))
        }
        Ok(Err(e)) => Err(WarmError::Guest(format!("sent a bad frame: {e}"))),
        Err(e) => Err(not_in_time(e)),
    }
}

/// The last line QEMU logged (of its last KiB), escaped: why it refused.
fn last_line(log: &Path) -> Option<String> {
    let mut f = File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    let mut tail = Vec::new();
    std::io::Seek::seek(&mut f, io::SeekFrom::Start(len.saturating_sub(1024))).ok()?;
    f.take(1024).read_to_end(&mut tail).ok()?;
    let line = process::tail_lines(&tail, 1);
    (!line.is_empty()).then(|| crate::escape::log_line(line.trim()))
}

/// A frame's kind, for a message (never its payload: it may be the guest's words).
fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::InitError(_) => "an init error",
        Frame::TemplateReady => "TemplateReady",
        Frame::Resumed => "Resumed",
        Frame::Started => "Started",
        _ => "another frame",
    }
}

/// A RAM copy being filled by its thread.
pub struct RamCopying(std::thread::JoinHandle<Result<(), WarmError>>);

impl RamCopying {
    /// Waits until the copy is whole.
    pub fn wait(self) -> Result<(), WarmError> {
        let panicked = || io_err("copy the template's RAM")(io::Error::other("the copying thread panicked"));
        self.0.join().unwrap_or_else(|_| Err(panicked()))
    }
}

/// A memfd as large as `path`, already sized, and the thread copying
/// `path`'s data into it; what `path` leaves as holes stays holes (a
/// template's RAM file is mostly holes).
pub fn start_sparse_copy_to_memfd(path: &Path) -> Result<(OwnedFd, RamCopying), WarmError> {
    let src = File::open(path).map_err(io_err(format!("open {}", path.display())))?;
    let len = src.metadata().map_err(io_err(format!("stat {}", path.display())))?.len();
    let dst = File::from(sys::memfd_with(RAM_COPY_NAME, b"").map_err(io_err("memfd_create"))?);
    dst.set_len(len).map_err(io_err("size the RAM copy"))?;
    let writer = dst.try_clone().map_err(io_err("dup the RAM copy"))?;
    let path = path.to_path_buf();
    let copying = std::thread::spawn(move || copy_data(&src, &writer, len, &path));
    Ok((OwnedFd::from(dst), RamCopying(copying)))
}

/// Copies the data ranges of `src` (`path`, `len` bytes) into `dst`.
fn copy_data(src: &File, dst: &File, len: u64, path: &Path) -> Result<(), WarmError> {
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in sys::data_ranges(src, len).map_err(io_err(format!("read {}", path.display())))? {
        let mut at = start;
        while at < end {
            let n = buf.len().min((end - at) as usize);
            src.read_exact_at(&mut buf[..n], at).map_err(io_err(format!("read {}", path.display())))?;
            dst.write_all_at(&buf[..n], at).map_err(io_err("write the RAM copy"))?;
            at += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::plan::tests::{plan, resources, settings};
    use crate::launch::plan::InstanceRef;

    fn key(vm: &VmConfig) -> String {
        plan_key(vm, "qemu 1", b"initramfs")
    }

    #[test]
    fn a_restores_own_fds_come_after_every_channel_of_the_plan() {
        let all = crate::launch::fds::FdPlan::new(true, true, true, true);
        let planned = [Some(all.control), Some(all.initramfs), all.network, all.forwarding, Some(all.console)];
        let highest = planned.into_iter().chain([all.clipboard, all.watch]).flatten().max().unwrap();
        let restore = [QMP_FD, RAM_FD];
        assert!(restore.iter().all(|fd| *fd > highest), "{restore:?} collide with the plan's (up to {highest})");
        assert_ne!(restore[0], restore[1]);
    }

    #[test]
    fn key_is_the_same_for_every_instance_of_a_shape() {
        let s = settings();
        let res = resources(&s);
        let a = plan(&s, &res);
        let b = Plan::new(&s, &res, InstanceRef { id: "fedcba987654", dir: Path::new("/run/user/7/agentvm/x") });
        assert_ne!(vm::qemu_args(&a.vm), vm::qemu_args(&b.vm), "per-run paths differ");
        assert_eq!(key(&a.vm), key(&b.vm));
    }

    #[test]
    fn key_changes_with_what_a_restore_must_match() {
        let s = settings();
        let vm = plan(&s, &resources(&s)).vm;
        let base = key(&vm);
        let changed = [
            VmConfig { memory_mib: vm.memory_mib * 2, ..vm.clone() },
            VmConfig { cpus: vm.cpus + 1, ..vm.clone() },
            VmConfig { accel: vm::Accel::Kvm, ..vm.clone() },
            VmConfig { root_image: "/img/base-other/root.squashfs".into(), ..vm.clone() },
            VmConfig { layers: vec!["/img/layer-claude-1/layer.squashfs".into()], ..vm.clone() },
            VmConfig { kernel: "/img2/vmlinux".into(), ..vm.clone() },
            VmConfig { netdev: None, ..vm.clone() },
        ];
        for other in &changed {
            assert_ne!(key(other), base, "{other:?}");
        }
        assert_ne!(plan_key(&vm, "qemu 2", b"initramfs"), base, "another QEMU");
        assert_ne!(plan_key(&vm, "qemu 1", b"another init"), base, "another guest init or modules");
    }

    #[test]
    fn a_restore_runs_the_cold_command_line_with_ram_from_the_copy_and_a_monitor() {
        let s = settings();
        let vm = plan(&s, &resources(&s)).vm;
        let strings = |vm: &VmConfig| -> Vec<String> {
            vm::qemu_args(vm).into_iter().map(|a| a.into_string().unwrap()).collect()
        };
        let cold = strings(&vm);
        let warm = strings(&restore_vm(&vm));
        let ram =
            format!("memory-backend-file,id=mem,size={}M,share=on,mem-path=/proc/self/fd/{RAM_FD}", vm.memory_mib);
        let memfd = format!("memory-backend-memfd,id=mem,size={}M,share=on", vm.memory_mib);
        let mut expected: Vec<String> =
            cold.iter().map(|a| if *a == memfd { ram.clone() } else { a.clone() }).collect();
        expected.extend(
            ["-chardev", &format!("socket,id=qmp,fd={QMP_FD}"), "-mon", "chardev=qmp,mode=control"].map(String::from),
        );
        expected.extend(["-incoming", "defer"].map(String::from));
        assert_eq!(warm, expected);
    }

    #[test]
    fn the_template_spec_carries_the_image_and_nothing_of_the_launch() {
        let s = settings();
        let spec = plan(&s, &resources(&s)).spec;
        let t = template_spec(&spec);
        assert!(t.template);
        assert_eq!((&t.modules, &t.root_device, &t.layers), (&spec.modules, &spec.root_device, &spec.layers));
        assert!(t.env.is_empty() && t.argv.is_empty() && t.mounts.is_empty() && t.network.is_none());
        assert!(!String::from_utf8(t.to_bytes().unwrap()).unwrap().contains("s3cr3t"));
    }

    #[test]
    fn the_template_installs_the_public_roots_and_each_launch_brings_its_extras() {
        let mut spec = plan(&settings(), &resources(&settings())).spec;
        spec.ca_trust = CaTrust { bundle: vec!["public root".into()], extra: vec!["company CA".into()] };
        let template = template_spec(&spec);
        assert_eq!(template.ca_trust, CaTrust { bundle: vec!["public root".into()], extra: vec![] });
        let launch = warm_launch_spec(&spec);
        assert_eq!(launch.ca_trust, CaTrust { bundle: vec![], extra: vec!["company CA".into()] });
        assert_eq!(LaunchSpec { ca_trust: spec.ca_trust.clone(), ..launch }, spec, "only the roots are left out");
    }

    #[test]
    fn a_sparse_copy_keeps_data_and_holes() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("ram");
        let f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"middle", 5 << 20).unwrap();
        let (copy, copying) = start_sparse_copy_to_memfd(&path).unwrap();
        copying.wait().unwrap();
        let copy = File::from(copy);
        assert_eq!(copy.metadata().unwrap().len(), 8 << 20);
        let mut got = [0u8; 6];
        copy.read_exact_at(&mut got, 5 << 20).unwrap();
        assert_eq!(&got, b"middle");
        assert!(copy.metadata().unwrap().blocks() * 512 < 4 << 20, "holes stay holes");
    }
}
