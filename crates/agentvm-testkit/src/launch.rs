//! One `agentvm` invocation with its own project, data and runtime dirs,
//! and what it left behind.

use crate::background::Background;
use crate::process::{self, stderr, stdout};
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The agentvm binary cargo built for the running test (test binaries live
/// in `deps/` beside it).
pub fn agentvm_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join("agentvm");
    assert!(bin.is_file(), "{} is missing: cargo builds it for agentvm's integration tests", bin.display());
    bin
}

/// The guest init beside agentvm; `cargo build --workspace` builds it
/// (scripts/test does), a plain `cargo test` does not.
pub fn guest_init() -> PathBuf {
    let p = agentvm_bin().parent().unwrap().join("agentvm-guest");
    assert!(p.is_file(), "{} is missing: run `cargo build --workspace` first (scripts/test does)", p.display());
    p
}

/// Where the test images are built and shared by every test and run.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("AGENTVM_TEST_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/agentvm-test-cache".into())
}

/// One `agentvm run` with its own project, data and runtime dirs.
pub struct Launch {
    pub dirs: tempfile::TempDir,
    pub work: PathBuf,
    pub data: PathBuf,
    pub runtime: PathBuf,
    /// agentvm's arguments for [`Launch::run`] and [`Launch::command`].
    pub args: Vec<String>,
    pub stdin: Vec<u8>,
    /// uid, gid and binary dir when running as another user.
    pub user: Option<(u32, u32, PathBuf)>,
    /// Extra environment for agentvm.
    pub env: Vec<(String, String)>,
}

impl Default for Launch {
    fn default() -> Launch {
        Launch::new()
    }
}

impl Launch {
    pub fn new() -> Launch {
        let dirs = tempfile::tempdir().unwrap();
        let work = dirs.path().join("project");
        let data = dirs.path().join("data");
        let runtime = dirs.path().join("runtime");
        for d in [&work, &data, &runtime] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        Launch { dirs, work, data, runtime, args: Vec::new(), stdin: Vec::new(), user: None, env: Vec::new() }
    }

    /// Shares the data dir (agent homes) of another launch.
    pub fn same_data_as(mut self, other: &Launch) -> Launch {
        self.data = other.data.clone();
        self
    }

    pub fn work_dir(mut self, dir: &Path) -> Launch {
        self.work = dir.to_path_buf();
        self
    }

    /// A second launch in the same project, data and runtime dirs: `ps`
    /// and `stop` of either see both.
    pub fn sibling(&self) -> Launch {
        let mut s = Launch::new().same_data_as(self).work_dir(&self.work);
        s.runtime = self.runtime.clone();
        s
    }

    /// Sets `name=value` in agentvm's environment.
    pub fn env(mut self, name: &str, value: &str) -> Launch {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Runs `argv` with the shell flavor.
    pub fn cmd(mut self, argv: &[&str]) -> Launch {
        self.args = ["run", "--memory", "512M", "--cpus", "1", "shell", "--"].iter().map(|s| s.to_string()).collect();
        self.args.extend(argv.iter().map(|s| s.to_string()));
        self
    }

    pub fn shell(self, script: &str) -> Launch {
        self.cmd(&["sh", "-c", script])
    }

    /// Runs as another (non-root) user: its dirs are handed to that user,
    /// and the binaries are copied where that user can reach them.
    pub fn run_as(mut self, uid: u32, gid: u32) -> Launch {
        std::fs::set_permissions(self.dirs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = self.dirs.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::copy(agentvm_bin(), bin.join("agentvm")).unwrap();
        std::fs::copy(guest_init(), bin.join("agentvm-guest")).unwrap();
        for d in [&self.work, &self.data, &self.runtime] {
            std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
        }
        self.user = Some((uid, gid, bin));
        self
    }

    pub fn stdin(mut self, data: &[u8]) -> Launch {
        self.stdin = data.to_vec();
        self
    }

    /// `agentvm` with this launch's arguments and environment.
    pub fn command(&self) -> Command {
        self.command_with(&self.args)
    }

    /// This launch's `agentvm run ...` with `flags` right after `run`.
    pub fn command_with_flags(&self, flags: &[&str]) -> Command {
        assert_eq!(self.args.first().map(String::as_str), Some("run"), "set the command first (cmd, shell)");
        let mut args = self.args.clone();
        args.splice(1..1, flags.iter().map(|f| f.to_string()));
        self.command_with(&args)
    }

    /// `agentvm ARGS` with this launch's environment (for `ps`, `exec`, ...).
    pub fn command_with<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut c = match &self.user {
            None => Command::new(agentvm_bin()),
            Some((uid, gid, bin)) => {
                use std::os::unix::process::CommandExt;
                let mut c = Command::new(bin.join("agentvm"));
                c.uid(*uid).gid(*gid).env("HOME", &self.data).env("AGENTVM_GUEST_INIT", bin.join("agentvm-guest"));
                c
            }
        };
        if self.user.is_none() {
            // Without it, agentvm looks beside itself and says what to do.
            let init = agentvm_bin().with_file_name("agentvm-guest");
            if init.is_file() {
                c.env("AGENTVM_GUEST_INIT", init);
            }
        }
        c.args(args)
            .current_dir(&self.work)
            .env("XDG_CACHE_HOME", cache_dir())
            .env("XDG_DATA_HOME", &self.data)
            .env("XDG_CONFIG_HOME", self.dirs.path().join("config"))
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .env_remove("WORK_DIR")
            .env_remove("AGENT_HOME");
        // A proxy of the machine running the tests would change every
        // launch's network: a test that wants one sets it with `env`.
        for name in ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"] {
            c.env_remove(name);
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// `agentvm trust` of this launch's project, as the user would run it
    /// after reviewing its .agentvm.toml (and dev shell files).
    pub fn trust_project(&self) -> String {
        let out = self.command_with(&["trust"]).stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "agentvm trust: {}", stderr(&out));
        stdout(&out)
    }

    /// Writes the project's .agentvm.toml and trusts it, as its user would.
    pub fn trusted_config(&self, toml: &str) {
        std::fs::write(self.work.join(".agentvm.toml"), toml).unwrap();
        self.trust_project();
    }

    /// Runs this launch in the foreground, its stdin fed, its output printed.
    pub fn run(&self) -> Output {
        self.run_command(&mut self.command())
    }

    /// Runs `cmd` (made from this launch's) with this launch's stdin.
    pub fn run_command(&self, cmd: &mut Command) -> Output {
        process::run(cmd, &self.stdin)
    }

    /// `agentvm ARGS` with this launch's environment and no input.
    pub fn agentvm<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        process::run(&mut self.command_with(args), b"")
    }

    /// Starts this launch in the background (stdin closed, output captured).
    pub fn spawn(&self) -> Background {
        self.spawn_command(&mut self.command())
    }

    /// Starts this launch in the background and waits until the guest
    /// creates `marker` in the work dir ([`Background::wait_for_file`]).
    pub fn spawn_until(&self, marker: &str, limit: Duration) -> Background {
        let mut child = self.spawn();
        child.wait_for_file(&self.work.join(marker), limit);
        child
    }

    /// Starts `agentvm ARGS` in the background.
    pub fn spawn_with(&self, args: &[&str]) -> Background {
        self.spawn_command(&mut self.command_with(args))
    }

    /// Starts `cmd` (made from this launch's) in the background.
    pub fn spawn_command(&self, cmd: &mut Command) -> Background {
        let child =
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("agentvm starts");
        Background::new(child, &self.runtime)
    }

    /// `agentvm ps --json`, parsed.
    pub fn ps(&self) -> Vec<serde_json::Value> {
        let out = self.agentvm(&["ps", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).expect("ps --json prints a JSON array")
    }

    /// The instance dirs left in this launch's runtime dir.
    pub fn leftover_instances(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.runtime.join("agentvm")) {
            Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Processes whose command line mentions this launch's dirs (QEMU and
    /// passt carry socket paths from the runtime dir, virtiofsd the shared
    /// dirs), still there 3 s after the call: a helper's own child may take
    /// a moment to follow it.
    pub fn leftover_processes(&self) -> Vec<String> {
        self.processes_after(Duration::from_secs(3))
    }

    /// Panics if any process of this launch is still there 3 s after the
    /// call.
    pub fn assert_no_leftovers(&self) {
        self.assert_no_leftovers_within(Duration::from_secs(3));
    }

    /// Panics if any process of this launch is still there `limit` after
    /// the call.
    pub fn assert_no_leftovers_within(&self, limit: Duration) {
        let left = self.processes_after(limit);
        assert!(left.is_empty(), "left behind after {limit:?}: {left:?}");
    }

    /// The command lines of the processes that mention this launch's dirs
    /// now.
    pub fn processes(&self) -> Vec<String> {
        process::command_lines_containing(&self.dirs.path().to_string_lossy())
    }

    /// This launch's processes once they are gone, or those still there
    /// after `limit`.
    fn processes_after(&self, limit: Duration) -> Vec<String> {
        let gone = || Some(self.processes()).filter(Vec::is_empty);
        process::poll(limit, Duration::from_millis(100), gone).unwrap_or_else(|| self.processes())
    }
}

/// Starts `agentvm ARGS` for `l` in the background and waits until the
/// guest creates `marker` in the work dir; panics with agentvm's output if
/// it exits first or `timeout` passes.
pub fn spawn_until_marker(l: &Launch, args: &[&str], marker: &str, timeout: Duration) -> Background {
    let mut child = l.spawn_with(args);
    child.wait_for_file(&l.work.join(marker), timeout);
    child
}
