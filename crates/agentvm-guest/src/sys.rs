//! Thin wrappers over the Linux system calls the init needs.
//!
//! Every function here checks the return value and turns it into an
//! `io::Result`; callers attach the path or name for the error message.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

/// A C string from a path or string; interior NUL bytes are an `InvalidInput` error.
pub fn cstr(s: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(s.as_ref().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))
}

/// Turns a `-1` return value into the current `errno`.
fn check<T: PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// mount(2).
pub fn mount(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong, data: Option<&str>) -> io::Result<()> {
    let source = cstr(source)?;
    let target = cstr(target)?;
    let fstype = cstr(fstype)?;
    let data = data.map(cstr).transpose()?;
    let data_ptr = data.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: all pointers are valid NUL-terminated strings (or null for data)
    // that outlive the call.
    check(unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data_ptr) })?;
    Ok(())
}

/// Moves the mount at `from` to `to` (MS_MOVE).
pub fn move_mount(from: &Path, to: &Path) -> io::Result<()> {
    let from = cstr(from)?;
    let to = cstr(to)?;
    // SAFETY: valid NUL-terminated strings; fstype and data may be null for MS_MOVE.
    check(unsafe { libc::mount(from.as_ptr(), to.as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()) })?;
    Ok(())
}

/// chroot(2).
pub fn chroot(path: &Path) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: valid NUL-terminated string.
    check(unsafe { libc::chroot(p.as_ptr()) })?;
    Ok(())
}

/// finit_module(2) with `flags` (e.g. MODULE_INIT_COMPRESSED_FILE).
pub fn finit_module(fd: RawFd, flags: libc::c_int) -> io::Result<()> {
    let params = c"";
    // SAFETY: finit_module takes an fd, a NUL-terminated parameter string and
    // flags; the string is a static empty C string.
    check(unsafe { libc::syscall(libc::SYS_finit_module, fd, params.as_ptr(), flags) })?;
    Ok(())
}

/// sethostname(2).
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe the bytes of `name`.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

/// Steps CLOCK_REALTIME to `ns` nanoseconds since the Unix epoch.
pub fn set_realtime(ns: u64) -> io::Result<()> {
    let ts = libc::timespec { tv_sec: (ns / 1_000_000_000) as libc::time_t, tv_nsec: (ns % 1_000_000_000) as _ };
    // SAFETY: clock_settime reads the timespec that lives across the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })?;
    Ok(())
}

/// RNDADDENTROPY: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// RNDRESEEDCRNG: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Credits `seed` to the kernel's entropy pool (RNDADDENTROPY, as many
/// bits as it has) and makes the CRNG reseed from it at once
/// (RNDRESEEDCRNG), through the random device open at `fd`.
pub fn add_entropy_and_reseed(fd: RawFd, seed: &[u8; 32]) -> io::Result<()> {
    // struct rand_pool_info: int entropy_count (bits), int buf_size (bytes), then the bytes.
    let mut info = [0u8; 8 + 32];
    info[..4].copy_from_slice(&(8 * seed.len() as i32).to_ne_bytes());
    info[4..8].copy_from_slice(&(seed.len() as i32).to_ne_bytes());
    info[8..].copy_from_slice(seed);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info of 8 + buf_size bytes, all in `info`.
    check(unsafe { libc::ioctl(fd, RNDADDENTROPY, info.as_ptr()) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(fd, RNDRESEEDCRNG) })?;
    Ok(())
}

/// An IPv4 datagram socket for interface and route ioctls.
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let fd = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` naming interface `name` (shorter than IFNAMSIZ), all else zero.
fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    if name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// `ip` as the generic socket address the interface and route ioctls take.
fn sockaddr_v4(ip: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain old data;
    // the kernel reads a sockaddr of family AF_INET as a sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Brings interface `name` up (SIOCGIFFLAGS / SIOCSIFFLAGS).
pub fn interface_up(name: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq_for(name)?;
    // SAFETY: SIOCGIFFLAGS reads the interface name and writes the flags into `req`.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the union member ifru_flags is the one SIOCGIFFLAGS filled in.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the name and flags from `req`.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(())
}

/// Gives interface `name` the IPv4 address `ip` with network `netmask`
/// (SIOCSIFADDR, SIOCSIFNETMASK); the kernel adds the subnet's route once
/// the interface is up.
pub fn set_ipv4_address(name: &str, ip: std::net::Ipv4Addr, netmask: std::net::Ipv4Addr) -> io::Result<()> {
    let sock = inet_socket()?;
    for (request, value) in [(libc::SIOCSIFADDR, ip), (libc::SIOCSIFNETMASK, netmask)] {
        let mut req = ifreq_for(name)?;
        req.ifr_ifru.ifru_addr = sockaddr_v4(value);
        // SAFETY: both requests read the name and the address from `req`.
        check(unsafe { libc::ioctl(sock.as_raw_fd(), request, &req) })?;
    }
    Ok(())
}

/// Adds the default IPv4 route through `gateway` on interface `name` (SIOCADDRT).
pub fn add_default_route(name: &str, gateway: std::net::Ipv4Addr) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut dev = cstr(name)?.into_bytes_with_nul();
    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_v4(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    route.rt_dev = dev.as_mut_ptr().cast();
    // SAFETY: SIOCADDRT reads `route` and the NUL-terminated name `rt_dev`
    // points to, which `dev` keeps alive until the call returns.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &route) })?;
    Ok(())
}

/// Sets a terminal's window size (TIOCSWINSZ).
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize struct that lives across the call.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// Opens a new pseudo-terminal pair from `ptmx`: (master, slave). Both are
/// close-on-exec and not made the controlling terminal.
pub fn open_pty(ptmx: &Path) -> io::Result<(OwnedFd, OwnedFd)> {
    let master = open(ptmx, libc::O_RDWR | libc::O_NOCTTY)?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int that lives across the call.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes an unsigned int into `n`.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n) })?;
    let slave_path = ptmx.with_file_name(format!("pts/{n}"));
    let slave = open(&slave_path, libc::O_RDWR | libc::O_NOCTTY)?;
    Ok((master, slave))
}

/// open(2) with O_CLOEXEC added.
pub fn open(path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let p = cstr(path)?;
    // SAFETY: valid NUL-terminated path.
    let fd = check(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, 0o600) })?;
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors are fresh and owned by us from here on.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets or clears O_NONBLOCK.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL on a descriptor has no memory effects.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let flags = if on { flags | libc::O_NONBLOCK } else { flags & !libc::O_NONBLOCK };
    // SAFETY: F_SETFL with an int argument has no memory effects.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) })?;
    Ok(())
}

/// Whether `fd` is an open descriptor.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD has no memory effects.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// dup2(2).
pub fn dup2(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: dup2 only manipulates the descriptor table.
    check(unsafe { libc::dup2(from, to) })?;
    Ok(())
}

/// read(2), retrying on EINTR.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the pointer and length describe `buf`, which is writable.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// write(2), retrying on EINTR; may write less than `buf`.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the pointer and length describe `buf`.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// poll(2) on `fds` for at most `timeout` (None: forever), retrying on EINTR
/// (returns 0 then, like a timeout).
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    // SAFETY: the pointer and length describe the `fds` slice.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::Interrupted {
        Ok(0)
    } else {
        Err(e)
    }
}

/// Blocks SIGCHLD and returns a close-on-exec, non-blocking signalfd for it.
pub fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
    }
    // SAFETY: `set` is initialised; the old mask is not needed.
    let r = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    check(r)?;
    // SAFETY: `set` is initialised; -1 asks for a new descriptor.
    let fd = check(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads and discards everything pending on a signalfd.
pub fn drain_signalfd(fd: RawFd) {
    let mut buf = [0u8; std::mem::size_of::<libc::signalfd_siginfo>() * 8];
    while matches!(read(fd, &mut buf), Ok(n) if n > 0) {}
}

/// waitpid(-1, WNOHANG): `Ok(Some((pid, status)))` for a reaped child,
/// `Ok(None)` if children exist but none has exited, `Err(ECHILD)` if none exist.
pub fn reap_one() -> io::Result<Option<(libc::pid_t, libc::c_int)>> {
    let mut status = 0;
    // SAFETY: waitpid writes the status into a local int.
    let pid = check(unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) })?;
    Ok((pid > 0).then_some((pid, status)))
}

/// kill(2).
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory effects.
    check(unsafe { libc::kill(pid, sig) })?;
    Ok(())
}

/// getpid(2).
pub fn getpid() -> libc::pid_t {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

/// sync(2).
pub fn sync() {
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// syncfs(2): writes out everything of the file system holding `fd`.
pub fn syncfs(fd: RawFd) -> io::Result<()> {
    // SAFETY: syncfs has no memory effects.
    check(unsafe { libc::syncfs(fd) })?;
    Ok(())
}

/// umount(2).
pub fn umount(target: &Path) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: `t` is NUL-terminated.
    check(unsafe { libc::umount(t.as_ptr()) })?;
    Ok(())
}

/// Powers the machine off. Returns only if reboot(2) failed.
pub fn power_off() -> io::Error {
    // Without ACPI (e.g. its tables were not found) the kernel cannot power
    // off and would halt with QEMU still running. A reset ends QEMU too,
    // since agentvm runs it with -no-reboot.
    let how = if std::path::Path::new("/sys/firmware/acpi").exists() { libc::RB_POWER_OFF } else { libc::RB_AUTOBOOT };
    // SAFETY: reboot has no memory effects; on success it does not return.
    unsafe { libc::reboot(how) };
    io::Error::last_os_error()
}

/// Time since boot (CLOCK_MONOTONIC), the same clock as the kernel's log stamps.
pub fn monotonic() -> Duration {
    // SAFETY: timespec is plain data.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A file system's size and the space left to an unprivileged user, in
/// bytes (statvfs(2)).
pub fn fs_space(path: &Path) -> io::Result<(u64, u64)> {
    let p = cstr(path)?;
    // SAFETY: statvfs is plain data.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `p` is NUL-terminated and `st` is writable.
    check(unsafe { libc::statvfs(p.as_ptr(), &mut st) })?;
    let frsize = st.f_frsize as u64;
    Ok((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

/// BLKGETSIZE64: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// EXT4_IOC_RESIZE_FS: `_IOW('f', 16, __u64)`.
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// The size of the block device open at `fd`, in bytes.
pub fn block_device_bytes(fd: RawFd) -> io::Result<u64> {
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into `bytes`.
    check(unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut bytes) })?;
    Ok(bytes)
}

/// Grows the mounted ext4 file system of the directory open at `fd` to
/// `blocks` blocks (online resize; the same count is a no-op).
pub fn ext4_resize(fd: RawFd, blocks: u64) -> io::Result<()> {
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 from the pointer.
    check(unsafe { libc::ioctl(fd, EXT4_IOC_RESIZE_FS, &blocks) })?;
    Ok(())
}

/// chown(2) (follows symlinks).
pub fn chown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

/// fork(2). `Ok(0)` in the child.
///
/// Only sound while the process is single-threaded, which the init is.
pub fn fork() -> io::Result<libc::pid_t> {
    // SAFETY: the init never starts threads, so the child is a complete copy
    // with no locks held by other threads.
    check(unsafe { libc::fork() })
}

/// Calls used only in the forked child before exec.
pub mod child {
    use super::check;
    use std::ffi::CString;
    use std::io;
    use std::os::fd::RawFd;

    /// setsid(2).
    pub fn setsid() -> io::Result<()> {
        // SAFETY: setsid has no memory effects.
        check(unsafe { libc::setsid() })?;
        Ok(())
    }

    /// Makes the terminal on `fd` the controlling terminal (TIOCSCTTY).
    pub fn set_controlling_tty(fd: RawFd) -> io::Result<()> {
        // SAFETY: TIOCSCTTY takes an integer argument.
        check(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) })?;
        Ok(())
    }

    /// Unblocks all signals and restores SIGPIPE (Rust ignores it at startup,
    /// and an ignored disposition survives exec).
    pub fn reset_signals() {
        // SAFETY: an empty, initialised set replaces the mask; SIG_DFL is valid.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }

    /// setgroups + setgid + setuid, then checks that root cannot be regained.
    pub fn become_user(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
        // SAFETY: the pointer and length describe `groups` (gid_t is u32).
        check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
        // SAFETY: setgid has no memory effects.
        check(unsafe { libc::setgid(gid) })?;
        // SAFETY: setuid has no memory effects.
        check(unsafe { libc::setuid(uid) })?;
        // SAFETY: these getters cannot fail.
        let (ruid, euid, rgid, egid) = unsafe { (libc::getuid(), libc::geteuid(), libc::getgid(), libc::getegid()) };
        // SAFETY: setuid has no memory effects; it must fail for a non-root user.
        let regained = uid != 0 && unsafe { libc::setuid(0) } == 0;
        if ruid != uid || euid != uid || rgid != gid || egid != gid || regained {
            return Err(io::Error::other("the user and group ids did not stick"));
        }
        Ok(())
    }

    /// execve(2); returns only on failure.
    pub fn execve(path: &CString, argv: &[CString], env: &[CString]) -> io::Error {
        let mut a: Vec<*const libc::c_char> = argv.iter().map(|s| s.as_ptr()).collect();
        a.push(std::ptr::null());
        let mut e: Vec<*const libc::c_char> = env.iter().map(|s| s.as_ptr()).collect();
        e.push(std::ptr::null());
        // SAFETY: path, argv and envp are NUL-terminated strings in
        // null-terminated arrays, all alive for the call.
        unsafe { libc::execve(path.as_ptr(), a.as_ptr(), e.as_ptr()) };
        io::Error::last_os_error()
    }

    /// access(path, X_OK) with the current (real) ids.
    pub fn executable(path: &CString) -> bool {
        // SAFETY: valid NUL-terminated string.
        unsafe { libc::access(path.as_ptr(), libc::X_OK) == 0 }
    }

    /// _exit(2): leaves without running Rust or libc exit handlers.
    pub fn exit(code: i32) -> ! {
        // SAFETY: _exit never returns and touches no process memory.
        unsafe { libc::_exit(code) }
    }
}
