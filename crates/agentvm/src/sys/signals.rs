//! Signals read synchronously from a signalfd instead of by handlers.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A set of signals, by number.
#[derive(Debug, Clone, Copy)]
pub struct Signals(&'static [i32]);

impl Signals {
    pub const fn new(signals: &'static [i32]) -> Signals {
        Signals(signals)
    }

    fn set(self) -> libc::sigset_t {
        // SAFETY: sigset_t is plain data, and sigemptyset/sigaddset only
        // write into the set we own.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &s in self.0 {
                libc::sigaddset(&mut set, s);
            }
            set
        }
    }
}

/// Blocks `signals` in the calling thread and reads them from a signalfd
/// (non-blocking) until dropped, when they are unblocked again. Threads
/// started afterwards inherit the mask, so none of them takes one; helper
/// processes reset it ([`super::process::supervise_child`]).
#[derive(Debug)]
pub struct SignalFd {
    fd: OwnedFd,
    signals: Signals,
}

impl SignalFd {
    pub fn block_and_open(signals: Signals) -> io::Result<SignalFd> {
        let set = signals.set();
        // SAFETY: blocking the signals of a set we own, in this thread.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        // SAFETY: signalfd with a set we own returns a new fd or -1.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: unblocking the signals blocked just above.
            unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
            return Err(e);
        }
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        Ok(SignalFd { fd: unsafe { OwnedFd::from_raw_fd(fd) }, signals })
    }

    /// The pending signals, in arrival order.
    pub fn read(&self) -> Vec<i32> {
        let mut out = Vec::new();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        loop {
            // SAFETY: signalfd_siginfo is plain data; all zeroes is valid.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            // SAFETY: reading one whole record into the struct we own, of
            // exactly `size` bytes.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
            if n != size as isize {
                return out;
            }
            out.push(info.ssi_signo as i32);
        }
    }
}

impl AsFd for SignalFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        let set = self.signals.set();
        // SAFETY: unblocking the signals we blocked.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_is_read_from_the_fd() {
        // SIGWINCH is harmless if it reached another thread's default action.
        let fd = SignalFd::block_and_open(Signals::new(&[libc::SIGWINCH])).unwrap();
        // SAFETY: raising a signal in this thread, where it is blocked.
        let tid = unsafe { libc::pthread_self() };
        // SAFETY: signalling our own thread.
        unsafe { libc::pthread_kill(tid, libc::SIGWINCH) };
        assert_eq!(fd.read(), vec![libc::SIGWINCH]);
        assert!(fd.read().is_empty());
    }
}
