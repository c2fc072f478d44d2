//! Starting the program: environment, PATH lookup, pty or pipes, dropping
//! root, and the exit-code mapping.

use crate::error::{Error, Result};
use crate::sys::{self, child};
use agentvm_proto::{LaunchSpec, User};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// PATH of the program unless the spec's environment overrides it.
pub use agentvm_proto::DEFAULT_PATH;

/// The shell for an empty argv, and the user's login shell.
const SHELL: &str = "/bin/bash";

/// Exit code when the program does not exist (as in shells).
pub const EXIT_NOT_FOUND: i32 = 127;
/// Exit code when the program exists but cannot be executed (as in shells).
pub const EXIT_NOT_EXECUTABLE: i32 = 126;

/// The running program and the parent's ends of its terminal or pipes.
pub struct Child {
    /// Its pid, which is also its process group and session id.
    pub pid: libc::pid_t,
    /// Where its input goes (pipe write end, or the pty master).
    pub stdin: OwnedFd,
    /// Its stdout (pipe read end, or the pty master).
    pub stdout: OwnedFd,
    /// Its stderr pipe; `None` on a pty.
    pub stderr: Option<OwnedFd>,
    /// Whether it runs on a pty.
    pub tty: bool,
}

/// What a file found on PATH is like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// No such file, or a directory.
    Missing,
    /// A file without execute permission for us.
    NotExecutable,
    /// An executable file.
    Executable,
}

/// The result of looking a command up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Run this file.
    Found(PathBuf),
    /// Only a non-executable file of that name exists.
    NotExecutable(PathBuf),
    /// Nothing of that name exists.
    NotFound,
}

/// Looks `cmd` up like a shell does: a name with a slash is used as is,
/// others are searched in the `:`-separated `path` (an empty entry is the
/// current directory); the first executable wins.
pub fn lookup(cmd: &str, path: &str, probe: impl Fn(&Path) -> Probe) -> Lookup {
    if cmd.contains('/') {
        return Lookup::Found(PathBuf::from(cmd));
    }
    if cmd.is_empty() {
        return Lookup::NotFound;
    }
    let mut denied = None;
    for dir in path.split(':') {
        let candidate = Path::new(if dir.is_empty() { "." } else { dir }).join(cmd);
        match probe(&candidate) {
            Probe::Executable => return Lookup::Found(candidate),
            Probe::NotExecutable if denied.is_none() => denied = Some(candidate),
            _ => {}
        }
    }
    denied.map_or(Lookup::NotFound, Lookup::NotExecutable)
}

/// The exit code of a wait status: the exit status, or 128+N for signal N.
pub fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        255
    }
}

/// The program's environment: the fixed defaults, then `extra` (later
/// entries override earlier ones with the same name, keeping the position).
pub fn environment(user: &User, extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("HOME", user.home.as_str()),
        ("USER", user.name.as_str()),
        ("LOGNAME", user.name.as_str()),
        ("SHELL", SHELL),
        ("PATH", DEFAULT_PATH),
        ("LANG", "C.UTF-8"),
        ("TERM", "dumb"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (k, v) in extra {
        match env.iter_mut().find(|(name, _)| name == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    env
}

/// The file to execute and the argv for `spec.argv` (empty: a login bash).
fn command_line(argv: &[String]) -> (String, Vec<String>) {
    match argv.first() {
        None => (SHELL.to_owned(), vec!["-bash".to_owned()]),
        Some(first) => (first.clone(), argv.to_vec()),
    }
}

/// Everything the child needs, converted before fork.
struct Plan {
    program: String,
    argv: Vec<CString>,
    env: Vec<CString>,
    path: String,
    cwd: String,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

impl Plan {
    fn new(spec: &LaunchSpec, groups: Vec<u32>) -> Result<Plan> {
        let (program, argv) = command_line(&spec.argv);
        let argv = argv
            .iter()
            .map(|a| sys::cstr(a).map_err(|_| Error::BadSpec(format!("argument {a:?} contains a NUL byte"))))
            .collect::<Result<Vec<_>>>()?;
        let env = environment(&spec.user, &spec.env);
        let path = env.iter().find(|(k, _)| k == "PATH").map_or(DEFAULT_PATH.to_owned(), |(_, v)| v.clone());
        let env = env
            .iter()
            .map(|(k, v)| {
                if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                    // Only the name: values may be secrets.
                    return Err(Error::BadSpec(format!("environment variable {k:?} has an invalid name or value")));
                }
                Ok(CString::new(format!("{k}={v}")).expect("checked for NUL above"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Plan { program, argv, env, path, cwd: spec.cwd.clone(), uid: spec.user.uid, gid: spec.user.gid, groups })
    }
}

/// The child's standard descriptors: a pty slave, or three pipe ends.
enum Stdio {
    Pty(OwnedFd),
    Pipes { stdin: OwnedFd, stdout: OwnedFd, stderr: OwnedFd },
}

/// Starts the program as described by `spec`, with the supplementary `groups`.
///
/// Returns once the program was exec'd (or the child failed to set up, which
/// is an error; a missing command is not: the child exits 127 then).
pub fn spawn(spec: &LaunchSpec, groups: Vec<u32>) -> Result<Child> {
    let plan = Plan::new(spec, groups)?;
    let pipe_err = |e| Error::sys("pipe", e);
    let (stdio, parent_in, parent_out, parent_err) = if spec.tty {
        let ptmx = Path::new("/dev/ptmx");
        let (master, slave) = sys::open_pty(ptmx).map_err(|e| Error::io("open a pseudo-terminal at", ptmx, e))?;
        if let Some((rows, cols)) = spec.winsize {
            sys::set_winsize(master.as_raw_fd(), rows, cols).map_err(|e| Error::sys("TIOCSWINSZ", e))?;
        }
        let input = master.try_clone().map_err(|e| Error::sys("dup of the pty master", e))?;
        (Stdio::Pty(slave), input, master, None)
    } else {
        let (in_r, in_w) = sys::pipe().map_err(pipe_err)?;
        let (out_r, out_w) = sys::pipe().map_err(pipe_err)?;
        let (err_r, err_w) = sys::pipe().map_err(pipe_err)?;
        (Stdio::Pipes { stdin: in_r, stdout: out_w, stderr: err_w }, in_w, out_r, Some(err_r))
    };
    let (report_r, report_w) = sys::pipe().map_err(pipe_err)?;

    let pid = sys::fork().map_err(|e| Error::sys("fork", e))?;
    if pid == 0 {
        drop(report_r);
        run_child(&plan, &stdio, report_w.as_raw_fd());
    }
    drop(stdio);
    drop(report_w);

    // The child reports a setup failure on the pipe; EOF alone means it exec'd.
    let mut report = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match sys::read(report_r.as_raw_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => report.extend_from_slice(&buf[..n]),
            Err(e) => return Err(Error::sys("read from the starting program", e)),
        }
    }
    if !report.is_empty() {
        return Err(Error::Spawn(String::from_utf8_lossy(&report).into_owned()));
    }
    for fd in [Some(&parent_in), Some(&parent_out), parent_err.as_ref()].into_iter().flatten() {
        sys::set_nonblocking(fd.as_raw_fd(), true).map_err(|e| Error::sys("fcntl(O_NONBLOCK)", e))?;
    }
    Ok(Child { pid, stdin: parent_in, stdout: parent_out, stderr: parent_err, tty: spec.tty })
}

/// How a file on PATH looks to the current (already unprivileged) user.
fn probe_file(path: &Path) -> Probe {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {
            let executable = sys::cstr(path).map(|c| child::executable(&c)).unwrap_or(false);
            if executable && m.permissions().mode() & 0o111 != 0 {
                Probe::Executable
            } else {
                Probe::NotExecutable
            }
        }
        _ => Probe::Missing,
    }
}

/// Writes `msg` to `fd`, ignoring errors (the child has nowhere else to report).
fn say(fd: RawFd, msg: &str) {
    let mut rest = msg.as_bytes();
    while let Ok(n @ 1..) = sys::write(fd, rest) {
        rest = &rest[n..];
    }
}

/// The forked child: sets up its session, descriptors and user, then execs.
fn run_child(plan: &Plan, stdio: &Stdio, report: RawFd) -> ! {
    if let Err(msg) = prepare_child(plan, stdio) {
        say(report, &msg);
        child::exit(EXIT_NOT_EXECUTABLE);
    }
    let not_found = |what: &str| -> ! {
        say(2, &format!("agentvm: command not found: {what}\n"));
        child::exit(EXIT_NOT_FOUND);
    };
    let path = match lookup(&plan.program, &plan.path, probe_file) {
        Lookup::Found(p) => p,
        Lookup::NotExecutable(p) => {
            say(2, &format!("agentvm: permission denied: {}\n", p.display()));
            child::exit(EXIT_NOT_EXECUTABLE);
        }
        Lookup::NotFound => not_found(&plan.program),
    };
    let Ok(cpath) = sys::cstr(&path) else { not_found(&plan.program) };
    let err = child::execve(&cpath, &plan.argv, &plan.env);
    if err.raw_os_error() == Some(libc::ENOENT) {
        not_found(&plan.program);
    }
    say(2, &format!("agentvm: cannot execute {}: {err}\n", path.display()));
    child::exit(EXIT_NOT_EXECUTABLE);
}

/// The child's setup before exec; the error message goes to the init.
fn prepare_child(plan: &Plan, stdio: &Stdio) -> std::result::Result<(), String> {
    let fail = |what: &str, e: io::Error| format!("{what}: {e}");
    child::reset_signals();
    child::setsid().map_err(|e| fail("setsid", e))?;
    match stdio {
        Stdio::Pty(slave) => {
            let fd = slave.as_raw_fd();
            child::set_controlling_tty(fd).map_err(|e| fail("TIOCSCTTY on the pty", e))?;
            for target in 0..3 {
                sys::dup2(fd, target).map_err(|e| fail("dup2 of the pty", e))?;
            }
        }
        Stdio::Pipes { stdin, stdout, stderr } => {
            for (fd, target) in [(stdin, 0), (stdout, 1), (stderr, 2)] {
                sys::dup2(fd.as_raw_fd(), target).map_err(|e| fail("dup2 of a pipe", e))?;
            }
        }
    }
    child::become_user(plan.uid, plan.gid, &plan.groups)
        .map_err(|e| fail(&format!("switch to uid {} gid {}", plan.uid, plan.gid), e))?;
    std::env::set_current_dir(&plan.cwd).map_err(|e| fail(&format!("working directory {}", plan.cwd), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_proto::guest;

    fn fake(exec: &'static [&'static str], plain: &'static [&'static str]) -> impl Fn(&Path) -> Probe {
        move |p: &Path| {
            let s = p.to_str().unwrap();
            if exec.contains(&s) {
                Probe::Executable
            } else if plain.contains(&s) {
                Probe::NotExecutable
            } else {
                Probe::Missing
            }
        }
    }

    #[test]
    fn lookup_finds_first_executable_on_path() {
        let probe = fake(&["/usr/bin/ls", "/bin/ls"], &[]);
        assert_eq!(lookup("ls", "/usr/local/bin:/usr/bin:/bin", probe), Lookup::Found("/usr/bin/ls".into()));
    }

    #[test]
    fn lookup_skips_non_executable_for_a_later_executable() {
        let probe = fake(&["/bin/x"], &["/usr/bin/x"]);
        assert_eq!(lookup("x", "/usr/bin:/bin", probe), Lookup::Found("/bin/x".into()));
    }

    #[test]
    fn lookup_only_non_executable_is_not_executable() {
        let probe = fake(&[], &["/usr/bin/x"]);
        assert_eq!(lookup("x", "/usr/bin:/bin", probe), Lookup::NotExecutable("/usr/bin/x".into()));
    }

    #[test]
    fn lookup_missing_is_not_found() {
        assert_eq!(lookup("nope", "/usr/bin:/bin", fake(&[], &[])), Lookup::NotFound);
        assert_eq!(lookup("", "/usr/bin", fake(&[], &[])), Lookup::NotFound);
    }

    #[test]
    fn lookup_with_slash_is_used_as_is() {
        assert_eq!(lookup("./run.sh", "/bin", fake(&[], &[])), Lookup::Found("./run.sh".into()));
    }

    #[test]
    fn lookup_empty_path_entry_is_current_directory() {
        assert_eq!(lookup("t", ":/bin", fake(&["./t"], &[])), Lookup::Found("./t".into()));
    }

    #[test]
    fn exit_code_maps_exit_and_signal() {
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(7 << 8), 7);
        assert_eq!(exit_code(libc::SIGKILL), 137);
        assert_eq!(exit_code(libc::SIGSEGV | 0x80), 128 + libc::SIGSEGV); // core dumped
    }

    #[test]
    fn environment_defaults_then_overrides_in_place() {
        let user = User { name: guest::USER.into(), uid: 1000, gid: 1000, home: guest::HOME.into() };
        let extra = vec![("TERM".into(), "xterm-256color".into()), ("FOO".into(), "bar".into())];
        let env = environment(&user, &extra);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("HOME"), Some(guest::HOME));
        assert_eq!(get("LOGNAME"), Some(guest::USER));
        assert_eq!(get("PATH"), Some(DEFAULT_PATH));
        assert_eq!(get("TERM"), Some("xterm-256color"));
        assert_eq!(get("FOO"), Some("bar"));
        assert_eq!(env.iter().filter(|(n, _)| n == "TERM").count(), 1);
        assert_eq!(env[6].0, "TERM");
    }

    #[test]
    fn empty_argv_is_a_login_bash() {
        assert_eq!(command_line(&[]), ("/bin/bash".to_owned(), vec!["-bash".to_owned()]));
        let argv = vec!["sh".to_owned(), "-c".to_owned()];
        assert_eq!(command_line(&argv), ("sh".to_owned(), argv.clone()));
    }
}
