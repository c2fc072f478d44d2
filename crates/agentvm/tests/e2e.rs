//! End-to-end tests: real VMs (TCG where KVM is unusable), real virtiofsd,
//! real files. The image is shared by every test through one cache dir
//! (`AGENTVM_TEST_CACHE`, default /var/tmp/agentvm-test-cache); the first
//! test that needs it builds it, the others wait on the store's lock.
//! `scripts/test` builds the workspace and the image before running these.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn agentvm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_agentvm"))
}

fn guest_init() -> PathBuf {
    let p = agentvm_bin().parent().unwrap().join("agentvm-guest");
    assert!(p.is_file(), "{} is missing: run `cargo build --workspace` first (scripts/test does)", p.display());
    p
}

fn cache_dir() -> PathBuf {
    std::env::var_os("AGENTVM_TEST_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/agentvm-test-cache".into())
}

/// One `agentvm run` with its own project, data and runtime dirs.
struct Launch {
    dirs: tempfile::TempDir,
    work: PathBuf,
    data: PathBuf,
    runtime: PathBuf,
    args: Vec<String>,
    stdin: Vec<u8>,
    /// uid, gid and binary dir when running as another user.
    user: Option<(u32, u32, PathBuf)>,
}

impl Launch {
    fn new() -> Launch {
        let dirs = tempfile::tempdir().unwrap();
        let work = dirs.path().join("project");
        let data = dirs.path().join("data");
        let runtime = dirs.path().join("runtime");
        for d in [&work, &data, &runtime] {
            std::fs::create_dir(d).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        Launch { dirs, work, data, runtime, args: Vec::new(), stdin: Vec::new(), user: None }
    }

    /// Shares the data dir (agent homes) of another launch.
    fn same_data_as(mut self, other: &Launch) -> Launch {
        self.data = other.data.clone();
        self
    }

    fn work_dir(mut self, dir: &Path) -> Launch {
        self.work = dir.to_path_buf();
        self
    }

    /// Runs `argv` with the shell flavor.
    fn cmd(mut self, argv: &[&str]) -> Launch {
        self.args = ["run", "--memory", "512M", "--cpus", "1", "shell", "--"].iter().map(|s| s.to_string()).collect();
        self.args.extend(argv.iter().map(|s| s.to_string()));
        self
    }

    fn shell(self, script: &str) -> Launch {
        self.cmd(&["sh", "-c", script])
    }

    /// Runs as another (non-root) user: its dirs are handed to that user,
    /// and the binaries are copied where that user can reach them.
    fn run_as(mut self, uid: u32, gid: u32) -> Launch {
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

    fn stdin(mut self, data: &[u8]) -> Launch {
        self.stdin = data.to_vec();
        self
    }

    fn command(&self) -> Command {
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
        c.args(&self.args)
            .current_dir(&self.work)
            .env("XDG_CACHE_HOME", cache_dir())
            .env("XDG_DATA_HOME", &self.data)
            .env("XDG_CONFIG_HOME", self.dirs.path().join("config"))
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .env_remove("WORK_DIR")
            .env_remove("AGENT_HOME");
        c
    }

    fn run(&self) -> Output {
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
    fn leftover_instances(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.runtime.join("agentvm")) {
            Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Processes whose command line mentions this launch's runtime dir
    /// (QEMU and virtiofsd carry socket paths from it).
    fn leftover_processes(&self) -> Vec<String> {
        let needle = self.runtime.to_string_lossy().into_owned();
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(&needle) {
                    found.push(cmd);
                }
            }
        }
        found
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn my_uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

#[test]
fn guest_file_write_appears_on_host_with_invoking_owner() {
    let l = Launch::new().shell("echo hello from the guest > /work/out.txt && id -un && pwd");
    let out = l.run();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "agent\n/work\n");
    let path = l.work.join("out.txt");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello from the guest\n");
    assert_eq!(std::fs::metadata(&path).unwrap().uid(), my_uid());
    assert!(l.leftover_instances().is_empty(), "{:?}", l.leftover_instances());
    assert!(l.leftover_processes().is_empty(), "{:?}", l.leftover_processes());
}

#[test]
fn exit_status_of_the_program_comes_back() {
    let out = Launch::new().shell("exit 7").run();
    assert_eq!(out.status.code(), Some(7));
    let out = Launch::new().shell("kill -KILL $$").run();
    assert_eq!(out.status.code(), Some(128 + 9));
}

#[test]
fn stdin_is_fed_and_stdout_stderr_stay_apart() {
    let l = Launch::new().shell("cat > /work/in.txt; tr a-z A-Z < /work/in.txt; echo to-stderr >&2").stdin(b"data\n");
    let out = l.run();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "DATA\n");
    assert!(stderr(&out).contains("to-stderr"));
    assert!(!stdout(&out).contains("to-stderr"));
    assert_eq!(std::fs::read_to_string(l.work.join("in.txt")).unwrap(), "data\n");
}

#[test]
fn agent_home_persists_per_project_and_differs_between_projects() {
    let a1 = Launch::new().shell("echo kept > ~/marker; echo $HOME");
    let out = a1.run();
    assert_eq!(stdout(&out), "/home/agent\n");
    let a2 = Launch::new().same_data_as(&a1).work_dir(&a1.work).shell("cat ~/marker");
    assert_eq!(stdout(&a2.run()), "kept\n");
    let b = Launch::new().same_data_as(&a1).shell("cat ~/marker 2>/dev/null || echo absent");
    assert_eq!(stdout(&b.run()), "absent\n");
}

#[test]
fn sigterm_to_headless_agentvm_stops_the_vm_cleanly() {
    let l = Launch::new().shell("touch /work/started; sleep 600");
    let child = l.command().stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !l.work.join("started").exists() {
        assert!(Instant::now() < deadline, "the guest never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopped = Instant::now();
    let out = child.wait_with_output().unwrap();
    eprintln!("{}", stderr(&out));
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
    assert!(stopped.elapsed() < Duration::from_secs(30));
    assert!(l.leftover_instances().is_empty());
    assert!(l.leftover_processes().is_empty(), "{:?}", l.leftover_processes());
}

#[test]
fn missing_command_is_127_with_a_message() {
    let out = Launch::new().cmd(&["no-such-command-xyz"]).run();
    assert_eq!(out.status.code(), Some(127));
    assert!(stderr(&out).contains("no-such-command-xyz"));
}

#[test]
fn bad_input_fails_fast_naming_the_input() {
    let cases: [(&[&str], &str); 4] = [
        (&["run", "--work-dir", "/no/such/dir", "shell"], "/no/such/dir"),
        (&["run", "--memory", "lots", "shell"], "\"lots\""),
        (&["run", "--cpus", "0", "shell"], "cpus 0"),
        (&["run", "emacs"], "\"emacs\""),
    ];
    for (args, needle) in cases {
        let l = Launch::new();
        let started = Instant::now();
        let out = l.command().args(args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?} was slow");
        assert!(l.leftover_instances().is_empty());
    }
}

#[test]
fn work_dir_that_is_a_file_is_refused() {
    let l = Launch::new();
    let file = l.work.join("file.txt");
    std::fs::write(&file, "keep me").unwrap();
    let out = l.command().args(["run", "-w"]).arg(&file).arg("shell").stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("not a directory"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn guest_kernel_panic_ends_the_run_with_console_lines() {
    // An init that is not an executable makes the kernel panic at boot.
    let l = Launch::new().shell("true");
    let bogus = l.dirs.path().join("bogus-init");
    std::fs::write(&bogus, "not an executable").unwrap();
    let out = l.command().env("AGENTVM_GUEST_INIT", &bogus).stdin(Stdio::null()).output().unwrap();
    let err = stderr(&out);
    eprintln!("{err}");
    assert_eq!(out.status.code(), Some(125));
    assert!(err.contains("guest console"), "{err}");
    assert!(err.to_lowercase().contains("panic"), "{err}");
    assert!(l.leftover_instances().is_empty());
    assert!(l.leftover_processes().is_empty());
}

/// The user the non-root tests run as (CI creates it; see scripts/test).
const TEST_USER: &str = "agentvm-test";

fn test_user_ids() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&TEST_USER)).then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
    })
}

#[test]
fn normal_user_runs_without_root_and_owns_what_the_guest_writes() {
    if my_uid() != 0 {
        // Every other test already runs as this normal user.
        return;
    }
    let Some((uid, gid)) = test_user_ids() else {
        assert!(std::env::var_os("CI").is_none(), "CI must create the user {TEST_USER} (scripts/test does)");
        eprintln!("skipping: no user {TEST_USER}; scripts/test creates it");
        return;
    };
    let l = Launch::new().run_as(uid, gid).shell("echo mine > /work/f.txt; mkdir /work/d; id -u; echo x > ~/h; exit 3");
    let out = l.run();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(stdout(&out), format!("{uid}\n"));
    for p in [l.work.join("f.txt"), l.work.join("d")] {
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{}", p.display());
    }
    assert!(l.leftover_instances().is_empty());
    assert!(l.leftover_processes().is_empty(), "{:?}", l.leftover_processes());
}

/// Drives an interactive session in a real terminal (tmux).
struct Tmux {
    socket: PathBuf,
    session: &'static str,
}

impl Tmux {
    /// Starts `agentvm run shell` in a new tmux session of the given size;
    /// after agentvm exits, its status and the terminal's settings go to
    /// `after`.
    fn start(l: &Launch, width: u16, height: u16, after: &Path) -> Tmux {
        let socket = l.dirs.path().join("tmux.sock");
        let script_path = l.dirs.path().join("session.sh");
        let mut script = format!("cd '{}'\nunset WORK_DIR AGENT_HOME\n", l.work.display());
        for (k, v) in l.command().get_envs() {
            if let Some(v) = v {
                script.push_str(&format!("export {}='{}'\n", k.to_string_lossy(), v.to_string_lossy()));
            }
        }
        script.push_str(&format!(
            "'{}' run --memory 512M --cpus 1 shell\necho \"exit=$?\" > '{after}'\nstty -a >> '{after}'\nsleep 60\n",
            agentvm_bin().display(),
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

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").arg("-S").arg(&self.socket).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn send(&self, keys: &str) {
        self.tmux(&["send-keys", "-t", self.session, keys, "Enter"]);
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", self.session])
    }

    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
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

#[test]
fn interactive_session_has_the_terminal_size_follows_resize_and_restores_the_terminal() {
    if Command::new("tmux").arg("-V").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "tmux is missing: scripts/setup-host installs it");
        return;
    }
    let l = Launch::new();
    let marker = l.dirs.path().join("after.txt");
    let t = Tmux::start(&l, 120, 40, &marker);
    t.wait_for("agent@");
    t.send("echo size=$(stty size)");
    t.wait_for("size=40 120");
    t.tmux(&["resize-window", "-t", "t", "-x", "100", "-y", "30"]);
    t.send("echo size=$(stty size)");
    t.wait_for("size=30 100");
    // Ctrl-C reaches the program in the guest, not agentvm.
    t.send("sleep 300");
    std::thread::sleep(Duration::from_millis(500));
    t.tmux(&["send-keys", "-t", "t", "C-c"]);
    t.send("echo still-$((1+1))");
    t.wait_for("still-2");
    t.send("exit 4");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !marker.exists() || !std::fs::read_to_string(&marker).unwrap().contains("icanon") {
        assert!(Instant::now() < deadline, "agentvm did not exit; screen:\n{}", t.screen());
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = std::fs::read_to_string(&marker).unwrap();
    assert!(after.starts_with("exit=4"), "{after}");
    // Raw mode was undone: canonical input and echo are back on.
    assert!(after.contains(" icanon") && after.contains(" echo "), "{after}");
}
