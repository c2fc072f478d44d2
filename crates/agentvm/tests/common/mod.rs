//! Helpers shared by the end-to-end tests: one `agentvm` invocation with its
//! own project, data and runtime dirs, and checks for leftovers.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn agentvm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_agentvm"))
}

pub fn guest_init() -> PathBuf {
    let p = agentvm_bin().parent().unwrap().join("agentvm-guest");
    assert!(p.is_file(), "{} is missing: run `cargo build --workspace` first (scripts/test does)", p.display());
    p
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("AGENTVM_TEST_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/agentvm-test-cache".into())
}

/// One `agentvm run` with its own project, data and runtime dirs.
pub struct Launch {
    pub dirs: tempfile::TempDir,
    pub work: PathBuf,
    pub data: PathBuf,
    pub runtime: PathBuf,
    pub args: Vec<String>,
    pub stdin: Vec<u8>,
    /// uid, gid and binary dir when running as another user.
    pub user: Option<(u32, u32, PathBuf)>,
    /// Extra environment for agentvm.
    pub env: Vec<(String, String)>,
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
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        Launch { dirs, work, data, runtime, args: Vec::new(), stdin: Vec::new(), user: None, env: Vec::new() }
    }

    /// Shares the data dir (agent homes) of another launch.
    pub fn same_data_as(mut self, other: &Launch) -> Launch {
        self.data = other.data.clone();
        self
    }

    /// Sets `name=value` in agentvm's environment.
    pub fn env(mut self, name: &str, value: &str) -> Launch {
        self.env.push((name.into(), value.into()));
        self
    }

    pub fn work_dir(mut self, dir: &Path) -> Launch {
        self.work = dir.to_path_buf();
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
        use std::os::unix::fs::PermissionsExt;
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

    pub fn command(&self) -> Command {
        self.command_with(&self.args)
    }

    /// `agentvm ARGS` with this launch's environment (for `ps`, `exec`, ...).
    pub fn command_with<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
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
            c.env("AGENTVM_GUEST_INIT", guest_init());
        }
        c.args(args)
            .current_dir(&self.work)
            .env("XDG_CACHE_HOME", cache_dir())
            .env("XDG_DATA_HOME", &self.data)
            .env("XDG_CONFIG_HOME", self.dirs.path().join("config"))
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .env_remove("WORK_DIR")
            .env_remove("AGENT_HOME")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// `agentvm trust` of this launch's project, as the user would run it
    /// after reviewing its .agentvm.toml (and dev shell files).
    pub fn trust_project(&self) -> String {
        let out = self.command_with(&["trust"]).stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "agentvm trust: {}", stderr(&out));
        stdout(&out)
    }

    pub fn run(&self) -> Output {
        let mut child = self
            .command()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agentvm starts");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&self.stdin).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        eprintln!(
            "--- agentvm {:?} -> {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.args,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The instance dirs left in this launch's runtime dir.
    pub fn leftover_instances(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.runtime.join("agentvm")) {
            Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// agentvm, QEMU or virtiofsd processes whose command line mentions this
    /// launch's dirs (QEMU carries socket paths from the runtime dir,
    /// virtiofsd the shared dirs), still there 3 s after the call: a
    /// helper's own child may take a moment to follow it.
    pub fn leftover_processes(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let found = self.helper_processes();
            if found.is_empty() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn helper_processes(&self) -> Vec<String> {
        let needle = self.dirs.path().to_string_lossy().into_owned();
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                let ours = ["agentvm", "qemu-system", "virtiofsd"].iter().any(|p| cmd.contains(p));
                if ours && cmd.contains(&needle) {
                    found.push(cmd);
                }
            }
        }
        found
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn my_uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// Drives an interactive session in a real terminal (tmux).
pub struct Tmux {
    socket: PathBuf,
    session: &'static str,
}

impl Tmux {
    /// Starts `agentvm run RUN_ARGS` in a new tmux session of the given size;
    /// after agentvm exits, its status and the terminal's settings go to
    /// `after`.
    pub fn start(l: &Launch, width: u16, height: u16, after: &Path, run_args: &[&str]) -> Tmux {
        let socket = l.dirs.path().join("tmux.sock");
        let script_path = l.dirs.path().join("session.sh");
        let mut script = format!("cd '{}'\nunset WORK_DIR AGENT_HOME\n", l.work.display());
        for (k, v) in l.command().get_envs() {
            if let Some(v) = v {
                script.push_str(&format!("export {}='{}'\n", k.to_string_lossy(), v.to_string_lossy()));
            }
        }
        script.push_str(&format!(
            "'{}' run {}\necho \"exit=$?\" > '{after}'\nstty -a >> '{after}'\nsleep 60\n",
            agentvm_bin().display(),
            run_args.join(" "),
            after = after.display()
        ));
        std::fs::write(&script_path, script).unwrap();
        let ok = Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args(["new-session", "-d", "-s", "t", "-x", &width.to_string(), "-y", &height.to_string()])
            .arg(format!("sh '{}'", script_path.display()))
            .status()
            .unwrap();
        assert!(ok.success());
        Tmux { socket, session: "t" }
    }

    pub fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").arg("-S").arg(&self.socket).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn send(&self, keys: &str) {
        self.tmux(&["send-keys", "-t", self.session, keys, "Enter"]);
    }

    pub fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", self.session])
    }

    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_for_within(needle, Duration::from_secs(180))
    }

    /// Waits until the screen shows `needle`, at most `limit`.
    pub fn wait_for_within(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.screen();
            if s.contains(needle) {
                return s;
            }
            assert!(Instant::now() < deadline, "{needle:?} never appeared; screen:\n{s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.tmux(&["kill-server"]);
    }
}

/// Starts `agentvm ARGS` for `l` in the background (output piped) and waits
/// until the guest creates `marker` in the work dir; panics with agentvm's
/// output if it exits first or `timeout` passes.
pub fn spawn_until_marker(l: &Launch, args: &[&str], marker: &str, timeout: Duration) -> std::process::Child {
    let mut child = l
        .command_with(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agentvm starts");
    let deadline = Instant::now() + timeout;
    while !l.work.join(marker).exists() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the guest never created {marker}:\n{}\n{}", stdout(&out), stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

/// GETs `path` from 127.0.0.1:`port` until the answer contains `token`;
/// panics with the last answer after `timeout`.
pub fn http_get_until(port: u16, path: &str, token: &str, timeout: Duration) -> String {
    use std::io::Read;
    let deadline = Instant::now() + timeout;
    let mut body = String::new();
    while !body.contains(token) {
        assert!(Instant::now() < deadline, "127.0.0.1:{port}{path} never answered with {token}: {body:?}");
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = write!(s, "GET {path} HTTP/1.0\r\n\r\n");
            body.clear();
            let _ = s.read_to_string(&mut body);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    body
}
