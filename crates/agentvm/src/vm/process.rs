//! Helper processes (QEMU, virtiofsd) that never outlive the launcher.
//!
//! Each child gets its own process group (a Ctrl-C meant for the launcher
//! does not hit it), `PR_SET_PDEATHSIG(SIGKILL)` (it dies if the launcher is
//! killed, even by SIGKILL), an unblocked signal mask, and exactly the file
//! descriptors it is meant to inherit.

use std::fs::File;
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::sys;

/// A running helper process and where its output goes.
#[derive(Debug)]
pub struct Helper {
    /// What it is, for messages: e.g. "virtiofsd for /work".
    pub name: String,
    pub child: Child,
    /// Its stdout and stderr.
    pub log: PathBuf,
    status: Option<ExitStatus>,
}

/// The only environment variables helpers inherit.
const HELPER_ENV: &[&str] = &["PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "XDG_RUNTIME_DIR"];

/// Spawns `cmd` as a supervised helper. `pass` maps fds of ours to the fd
/// numbers the child sees (e.g. a socket as fd 3).
pub fn spawn(name: &str, mut cmd: Command, pass: &[(BorrowedFd<'_>, RawFd)], log: &Path) -> io::Result<Helper> {
    let out = File::create(log)?;
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    // Helpers get a minimal environment: the launcher's may hold API keys,
    // and a helper's environment is readable in /proc.
    cmd.env_clear();
    for (k, v) in std::env::vars_os() {
        if HELPER_ENV.iter().any(|keep| k == *keep) {
            cmd.env(k, v);
        }
    }
    // Not in agentvm's own directory, usually the project, which the guest
    // writes: a helper that read anything there would read the guest's.
    if cmd.get_current_dir().is_none() {
        cmd.current_dir("/");
    }

    let inherited = sys::process::Inherited::new(pass)?;
    sys::process::supervise_child(&mut cmd, &inherited);
    let child = cmd.spawn()?;
    drop(inherited);
    Ok(Helper { name: name.to_string(), child, log: log.to_path_buf(), status: None })
}

impl Helper {
    /// The exit status if it has exited (reaps it), without blocking.
    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Sends a signal unless it has already exited.
    pub fn signal(&mut self, sig: i32) {
        if self.poll().is_none() {
            // Not yet reaped, so the pid is still this child's.
            let _ = sys::kill(self.child.id(), sig);
        }
    }

    /// Waits up to `grace` for it to exit, then kills it; always reaps.
    pub fn stop(&mut self, grace: Duration) -> ExitStatus {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.poll() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.signal(libc::SIGKILL);
        let s = self.child.wait().expect("waiting for our own child");
        self.status = Some(s);
        s
    }

    /// The last `n` lines of its output.
    pub fn log_tail(&self, n: usize) -> String {
        tail_lines(&std::fs::read(&self.log).unwrap_or_default(), n)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if self.poll().is_none() {
            self.signal(libc::SIGTERM);
            self.stop(Duration::from_secs(2));
        }
    }
}

/// The last `n` non-empty lines of `bytes`, lossily decoded.
pub fn tail_lines(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Describes an exit status for a message: "exit status 1", "signal 9".
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn tail_lines_keeps_the_last_non_empty_lines() {
        assert_eq!(tail_lines(b"a\n\nb\r\nc\n\n", 2), "b\nc");
        assert_eq!(tail_lines(b"", 3), "");
    }

    #[test]
    fn passed_fd_arrives_at_its_target_number() {
        let dir = tempfile::tempdir().unwrap();
        let (r, w) = sys::pipe(1 << 16).unwrap();
        let r = File::from(r);
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello >&3"]);
        let mut h = spawn("sh", cmd, &[(w.as_fd(), 3)], &dir.path().join("log")).unwrap();
        drop(w);
        let mut got = String::new();
        use std::io::Read;
        (&r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello\n");
        assert!(h.stop(Duration::from_secs(5)).success());
    }

    #[test]
    fn child_environment_is_reduced_to_the_allow_list() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "env > env.txt"]).current_dir(dir.path()).env("SECRET_API_KEY", "s3cr3t");
        let mut h = spawn("sh", cmd, &[], &dir.path().join("log")).unwrap();
        h.stop(Duration::from_secs(5));
        let env = std::fs::read_to_string(dir.path().join("env.txt")).unwrap();
        assert!(!env.contains("s3cr3t"), "{env}");
        assert!(env.contains("PATH="), "{env}");
    }

    #[test]
    fn child_runs_in_the_root_dir_unless_given_one() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pwd");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("pwd > '{}'", out.display())]);
        spawn("sh", cmd, &[], &dir.path().join("log")).unwrap().stop(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "/\n");
    }

    #[test]
    fn child_runs_in_its_own_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "ps -o pgid= -p $$ > pgid; echo $$ > pid"]).current_dir(dir.path());
        let mut h = spawn("sh", cmd, &[], &dir.path().join("log")).unwrap();
        h.stop(Duration::from_secs(5));
        let pgid = std::fs::read_to_string(dir.path().join("pgid")).unwrap();
        let pid = std::fs::read_to_string(dir.path().join("pid")).unwrap();
        assert_eq!(pgid.trim(), pid.trim());
    }

    #[test]
    fn stop_kills_a_child_that_ignores_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; sleep 30"]);
        let mut h = spawn("sh", cmd, &[], &dir.path().join("log")).unwrap();
        h.signal(libc::SIGTERM);
        let started = Instant::now();
        let status = h.stop(Duration::from_millis(200));
        assert!(!status.success());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
