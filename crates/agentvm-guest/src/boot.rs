//! Boot steps: early file systems, the spec, kernel modules, the overlay
//! root, switching into it, and the system mounts inside it.

use crate::console::step;
use crate::error::{Error, IoContext, Result};
use crate::sys;
use agentvm_proto::{LaunchSpec, Mount, MODULES_DIR, SPEC_PATH};
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long to wait for the root block device.
const ROOT_WAIT: Duration = Duration::from_secs(10);
/// finit_module flag: the file is compressed, let the kernel decompress it.
const MODULE_INIT_COMPRESSED_FILE: libc::c_int = 4;

/// Mount points in the initramfs.
const LOWER: &str = "/lower";
const RW: &str = "/rw";
const NEWROOT: &str = "/newroot";

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

fn mkdir_p(path: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new().recursive(true).mode(mode).create(path).ctx("create directory", path)
}

fn mount(what: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: Option<&str>) -> Result<()> {
    step(&format!("mount {fstype} {what} on {target}"));
    sys::mount(what, Path::new(target), fstype, flags, data).map_err(|source| Error::Mount {
        fstype: fstype.to_owned(),
        what: what.to_owned(),
        target: target.to_owned(),
        source,
    })
}

/// Mounts /proc, /sys and /dev in the initramfs and makes sure fds 0-2 are
/// the console.
pub fn early_mounts() -> Result<()> {
    for (fstype, target) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        mkdir_p(Path::new(target), 0o755)?;
        let flags = if fstype == "devtmpfs" { libc::MS_NOSUID } else { NOSUID_NODEV | libc::MS_NOEXEC };
        mount(fstype, target, fstype, flags, None)?;
    }
    if !(0..3).all(sys::fd_is_open) {
        let console = Path::new("/dev/console");
        let fd = sys::open(console, libc::O_RDWR | libc::O_NOCTTY).ctx("open", console)?;
        for target in (0..3).filter(|&t| !sys::fd_is_open(t)) {
            sys::dup2(fd.as_raw_fd(), target).map_err(|e| Error::sys("dup2 of /dev/console", e))?;
        }
    }
    Ok(())
}

/// Reads the launch spec and deletes it (it may hold secrets).
pub fn read_spec() -> Result<LaunchSpec> {
    let bytes = fs::read(SPEC_PATH).ctx("read", SPEC_PATH)?;
    fs::remove_file(SPEC_PATH).ctx("delete", SPEC_PATH)?;
    LaunchSpec::from_bytes(&bytes).map_err(|source| Error::Spec { path: SPEC_PATH, source })
}

/// Loads the modules in order from [`MODULES_DIR`], then deletes them from
/// the initramfs to give the memory back. Only the watch module may fail
/// (watching is then off).
pub fn load_modules(names: &[String]) -> Result<()> {
    for name in names {
        if name.is_empty() || name.contains('/') {
            return Err(Error::BadSpec(format!("module name {name:?} must be a plain file name")));
        }
        let path = Path::new(MODULES_DIR).join(name);
        step(&format!("load module {name}"));
        let fd = sys::open(&path, libc::O_RDONLY).ctx("open kernel module", &path)?;
        let compressed = [".xz", ".zst", ".gz"].iter().any(|ext| name.ends_with(ext));
        let flags = if compressed { MODULE_INIT_COMPRESSED_FILE } else { 0 };
        match sys::finit_module(fd.as_raw_fd(), flags) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) if crate::watch::is_module(name) => {
                crate::watch::module_failed(format!("cannot load kernel module {name}: {source}"));
            }
            Err(source) => {
                let hint = match source.raw_os_error() {
                    Some(libc::ENOENT) => " (unknown symbol: is a module it depends on missing or listed after it?)",
                    Some(libc::ENOEXEC) => " (not a kernel module, or built for another kernel?)",
                    _ => "",
                };
                return Err(Error::Module { path: path.display().to_string(), source, hint });
            }
        }
    }
    let _ = fs::remove_dir_all(MODULES_DIR);
    Ok(())
}

/// Waits for a block device and returns its path. `serial:NAME` names the
/// virtio disk whose serial is NAME (robust against probe order); anything
/// else is a device path.
pub fn wait_for_disk(device: &str, timeout: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        let found = match device.strip_prefix("serial:") {
            Some(serial) => disk_with_serial(serial),
            None => Path::new(device).exists().then(|| device.to_string()),
        };
        if let Some(path) = found {
            return Ok(path);
        }
        if start.elapsed() > timeout {
            return Err(Error::Timeout {
                what: format!("disk {device}"),
                secs: timeout.as_secs(),
                hint: "; is the disk attached and its driver module (virtio_blk) loaded?",
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `/dev/vdX` of the disk whose `/sys/block/vdX/serial` is `serial`.
fn disk_with_serial(serial: &str) -> Option<String> {
    fs::read_dir("/sys/block").ok()?.flatten().find_map(|e| {
        let s = fs::read_to_string(e.path().join("serial")).ok()?;
        (s.trim() == serial).then(|| format!("/dev/{}", e.file_name().to_string_lossy()))
    })
}

/// Mounts the root image read-only under a tmpfs overlay at [`NEWROOT`].
pub fn mount_root(spec: &LaunchSpec) -> Result<()> {
    step(&format!("wait for {}", spec.root_device));
    let root_device = wait_for_disk(&spec.root_device, ROOT_WAIT)?;
    for dir in [LOWER, RW, NEWROOT] {
        mkdir_p(Path::new(dir), 0o755)?;
    }
    mount(&root_device, LOWER, &spec.root_fstype, libc::MS_RDONLY, None)?;
    mount("tmpfs", RW, "tmpfs", 0, Some("mode=0755"))?;
    for dir in ["upper", "work"] {
        mkdir_p(&Path::new(RW).join(dir), 0o755)?;
    }
    // Extra read-only layers (e.g. an agent's npm packages) stack above the
    // root image, the first one topmost.
    let mut lowers = Vec::new();
    for (i, device) in spec.layers.iter().enumerate() {
        let dir = format!("{LOWER}-{i}");
        mkdir_p(Path::new(&dir), 0o755)?;
        let device = wait_for_disk(device, ROOT_WAIT)?;
        step(&format!("mount layer {device} on {dir}"));
        mount(&device, &dir, &spec.root_fstype, libc::MS_RDONLY, None)?;
        lowers.push(dir);
    }
    lowers.push(LOWER.to_string());
    let opts = format!("lowerdir={},upperdir={RW}/upper,workdir={RW}/work", lowers.join(":"));
    mount("overlay", NEWROOT, "overlay", 0, Some(&opts))
}

/// Moves /dev, /proc and /sys into the new root and makes it `/` (the
/// initramfs way: pivot_root does not work on rootfs).
pub fn switch_root() -> Result<()> {
    for dir in ["/dev", "/proc", "/sys"] {
        let target = Path::new(NEWROOT).join(&dir[1..]);
        mkdir_p(&target, 0o755)?;
        step(&format!("move {dir} to {}", target.display()));
        sys::move_mount(Path::new(dir), &target).map_err(|source| Error::Mount {
            fstype: "(move)".into(),
            what: dir.into(),
            target: target.display().to_string(),
            source,
        })?;
    }
    std::env::set_current_dir(NEWROOT).ctx("chdir to", NEWROOT)?;
    step("switch root");
    sys::move_mount(Path::new("."), Path::new("/")).map_err(|source| Error::Mount {
        fstype: "(move)".into(),
        what: NEWROOT.into(),
        target: "/".into(),
        source,
    })?;
    sys::chroot(Path::new(".")).ctx("chroot to", NEWROOT)?;
    std::env::set_current_dir("/").ctx("chdir to", "/")
}

/// A symlink at `link` to `target`, replacing whatever is there.
fn symlink(target: &str, link: &str) -> Result<()> {
    let _ = fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).ctx("create symlink", link)
}

/// The mounts and links a program expects in the new root, then the
/// launch's hostname and loopback.
pub fn setup_system(spec: &LaunchSpec) -> Result<()> {
    system_mounts()?;
    name_and_loopback(spec)
}

/// The mounts and links a program expects in the new root: devpts, shm,
/// /run, /tmp, /dev/fd and friends, cgroup2 (the same for every launch, so
/// a template has them).
pub fn system_mounts() -> Result<()> {
    mkdir_p(Path::new("/dev/pts"), 0o755)?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    symlink("pts/ptmx", "/dev/ptmx")?;
    for (target, mode) in [("/dev/shm", "1777"), ("/run", "0755"), ("/tmp", "1777")] {
        mkdir_p(Path::new(target), 0o755)?;
        mount("tmpfs", target, "tmpfs", NOSUID_NODEV, Some(&format!("mode={mode}")))?;
    }
    let run_lock = Path::new("/run/lock");
    mkdir_p(run_lock, 0o755)?;
    fs::set_permissions(run_lock, fs::Permissions::from_mode(0o1777)).ctx("set the mode of", run_lock)?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, link)?;
    }
    // Not every program needs cgroups; a kernel without cgroup2 is no reason to fail.
    let cgroup = Path::new("/sys/fs/cgroup");
    if cgroup.is_dir() {
        if let Err(e) = mount("cgroup2", "/sys/fs/cgroup", "cgroup2", NOSUID_NODEV | libc::MS_NOEXEC, None) {
            step(&format!("{e} (ignored)"));
        }
    }
    Ok(())
}

/// The launch's hostname, and loopback up.
pub fn name_and_loopback(spec: &LaunchSpec) -> Result<()> {
    step(&format!("hostname {}", spec.hostname));
    crate::etc::setup_hostname(Path::new("/"), &spec.hostname)?;
    step("loopback up");
    sys::interface_up("lo").map_err(|e| Error::sys("bringing up interface lo (SIOCSIFFLAGS)", e))
}

/// Mounts the virtiofs shares.
pub fn mount_shares(mounts: &[Mount]) -> Result<()> {
    for m in mounts {
        if !m.path.starts_with('/') {
            return Err(Error::BadSpec(format!("mount point {:?} of share {:?} is not absolute", m.path, m.tag)));
        }
        mkdir_p(Path::new(&m.path), 0o755)?;
        let ro = if m.read_only { libc::MS_RDONLY } else { 0 };
        mount(&m.tag, &m.path, "virtiofs", NOSUID_NODEV | ro, None)?;
    }
    Ok(())
}
