//! The host's system calls: the one place for `unsafe` in the host crate.
//!
//! Most calls go through `rustix`'s safe API and need no `unsafe` at all;
//! what it lacks (a signalfd, the set-up of a helper between `fork` and
//! `exec`, the KVM probe, a forked user-namespace probe) is done here, each
//! block with its `// SAFETY:` reason. Everything else in the crate calls
//! these safe functions.

pub mod fd;
pub mod kvm;
pub mod process;
pub mod signals;
pub mod terminal;

use std::fs::File;
use std::io;
use std::path::Path;

pub use fd::{data_ranges, memfd_with, pipe, punch_zero_pages, set_nonblocking, socketpair};
pub use process::{kill, pid_alive, pidfd_open, pidfd_send_signal};
pub use signals::{SignalFd, Signals};
pub use terminal::{interactive, is_tty, winsize, RawMode};

/// The real user id of this process.
pub fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The real group id of this process.
pub fn gid() -> u32 {
    rustix::process::getgid().as_raw()
}

/// Whether this process runs as root (effective user id 0).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Fills `buf` from the kernel's random source.
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// How [`lock`] waits for a file lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// Exclusive, waiting for it.
    Exclusive,
    /// Exclusive, failing with `WouldBlock` if someone holds the lock.
    TryExclusive,
}

/// Takes or releases an advisory lock (`flock`) on `file`; a wait that a
/// signal interrupts is resumed.
pub fn lock(file: &File, how: Lock) -> io::Result<()> {
    use rustix::fs::FlockOperation as Op;
    let op = match how {
        Lock::Exclusive => Op::LockExclusive,
        Lock::TryExclusive => Op::NonBlockingLockExclusive,
    };
    loop {
        match rustix::fs::flock(file, op) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(Into::into),
        }
    }
}

/// Swaps two paths atomically (`renameat2` with `RENAME_EXCHANGE`).
pub fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_makes_a_try_fail_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = File::create(&path).unwrap();
        let second = File::open(&path).unwrap();
        lock(&first, Lock::Exclusive).unwrap();
        assert_eq!(lock(&second, Lock::TryExclusive).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        drop(first);
        lock(&second, Lock::TryExclusive).unwrap();
    }

    #[test]
    fn exchange_swaps_two_paths() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "A").unwrap();
        std::fs::write(&b, "B").unwrap();
        exchange(&a, &b).unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "B");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "A");
    }

    #[test]
    fn random_bytes_fill_the_buffer() {
        let mut a = [0u8; 32];
        random_bytes(&mut a).unwrap();
        assert_ne!(a, [0u8; 32]);
    }
}
