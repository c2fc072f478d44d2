//! Processes: signals to a pid or a pidfd, and what a helper process sets
//! up between `fork` and `exec`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::process::{Pid, PidfdFlags, Signal};

fn signal(sig: i32) -> io::Result<Signal> {
    Signal::from_named_raw(sig).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

fn pid(pid: u32) -> io::Result<Pid> {
    i32::try_from(pid).ok().and_then(Pid::from_raw).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))
}

/// Sends signal `sig` to process `pid`.
pub fn kill(target: u32, sig: i32) -> io::Result<()> {
    Ok(rustix::process::kill_process(pid(target)?, signal(sig)?)?)
}

/// Whether a process with this pid exists (a zombie counts as existing).
pub fn pid_alive(target: u32) -> bool {
    let Ok(target) = pid(target) else { return false };
    match rustix::process::test_kill_process(target) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    }
}

/// A pidfd for process `pid`: it keeps naming that process even if the pid
/// is reused after it exits.
pub fn pidfd_open(target: u32) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_open(pid(target)?, PidfdFlags::empty())?)
}

/// Sends `sig` to the process a pidfd names.
pub fn pidfd_send_signal(pidfd: impl AsFd, sig: i32) -> io::Result<()> {
    Ok(rustix::process::pidfd_send_signal(pidfd, signal(sig)?)?)
}

/// Lowest fd number used for fds in transit to a child, above any target.
const TRANSIT_FD_MIN: RawFd = 64;

/// The descriptors a helper is to inherit, moved out of the way of their
/// target numbers (so one `dup2` can never overwrite another's source).
/// Keep it until the helper is spawned.
#[derive(Debug)]
pub struct Inherited(Vec<(OwnedFd, RawFd)>);

impl Inherited {
    /// `pass` maps fds of ours to the numbers the child sees (e.g. a socket
    /// as fd 3).
    pub fn new(pass: &[(BorrowedFd<'_>, RawFd)]) -> io::Result<Inherited> {
        let moved = pass
            .iter()
            .map(|&(src, target)| Ok((super::fd::dup_at_least(src, TRANSIT_FD_MIN)?, target)))
            .collect::<io::Result<_>>()?;
        Ok(Inherited(moved))
    }
}

/// Makes `cmd`'s child a supervised helper, between `fork` and `exec`: its
/// own process group (a Ctrl-C meant for the launcher does not hit it),
/// killed when the launcher dies (`PR_SET_PDEATHSIG`), no signal blocked,
/// and the descriptors of `fds` at their target numbers.
pub fn supervise_child(cmd: &mut Command, fds: &Inherited) {
    let moves: Vec<(RawFd, RawFd)> = fds.0.iter().map(|(fd, target)| (fd.as_raw_fd(), *target)).collect();
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (setpgid, prctl, getppid, _exit, sigprocmask,
    // dup2); the descriptors it duplicates are kept open by `fds` until the
    // caller has spawned the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The launcher may have died before prctl took effect.
            if libc::getppid() != parent.as_raw_nonzero().get() {
                libc::_exit(1);
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            for &(src, target) in &moves {
                // dup2 clears close-on-exec on the new fd.
                if libc::dup2(src, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Installs the seccomp `filters` in `cmd`'s child before it is executed,
/// for good (no new privileges from then on).
pub fn seccomp_child(cmd: &mut Command, filters: Vec<seccompiler::BpfProgram>) {
    // SAFETY: applying a filter makes only system calls (prctl, seccomp),
    // which is safe between fork and exec; `filters` is built beforehand.
    unsafe {
        cmd.pre_exec(move || {
            for program in &filters {
                seccompiler::apply_filter(program).map_err(|e| match e {
                    seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
                    _ => io::Error::from_raw_os_error(libc::EINVAL),
                })?;
            }
            Ok(())
        });
    }
}

/// Whether this process may create a user namespace (virtiofsd's sandbox
/// and image builds need one as a normal user): a forked child tries.
pub fn userns_works() -> bool {
    // SAFETY: the child only calls unshare and _exit (async-signal-safe);
    // the parent reaps it.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let r = libc::unshare(libc::CLONE_NEWUSER);
            libc::_exit(if r == 0 { 0 } else { 1 });
        }
        if pid < 0 {
            return false;
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_pid_is_alive_and_pid_zero_is_not() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
    }

    #[test]
    fn a_pidfd_signals_its_process() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        pidfd_send_signal(&fd, libc::SIGKILL).unwrap();
        assert!(!child.wait().unwrap().success());
    }
}
