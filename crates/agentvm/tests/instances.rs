//! End-to-end tests of running instances: `ps`, `stop`, `logs`, `exec`, and
//! that nothing is left behind when an instance, its launcher or one of its
//! helpers is stopped or killed. Real VMs, like e2e.rs.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a VM may take to boot under TCG on a loaded machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// A background `agentvm`, killed if the test fails before it ends.
struct Bg(Option<Child>);

impl Bg {
    fn id(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }
    fn take(mut self) -> Child {
        self.0.take().unwrap()
    }
}

impl std::ops::Deref for Bg {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().unwrap()
    }
}

impl std::ops::DerefMut for Bg {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts the launch in the background (stdin closed, output captured).
fn spawn(l: &Launch) -> Bg {
    Bg(Some(
        l.command().stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("agentvm starts"),
    ))
}

/// Starts `agentvm ARGS` in the background.
fn spawn_tool(l: &Launch, args: &[&str], stdin: Stdio) -> Bg {
    Bg(Some(l.command_with(args).stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()))
}

/// Waits for the child to exit, up to `timeout`; kills it if it does not.
fn wait_exit(child: Bg, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    let mut child = child.take();
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("agentvm did not exit within {timeout:?}; stderr:\n{}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    eprintln!("--- agentvm -> {:?}\n--- stdout:\n{}\n--- stderr:\n{}", out.status, stdout(&out), stderr(&out));
    out
}

/// The guest consoles of the launch's instances, for failure messages.
fn consoles(runtime: &Path) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(runtime.join("agentvm")).into_iter().flatten().flatten() {
        let log = std::fs::read(e.path().join("console.log")).unwrap_or_default();
        s.push_str(&format!("--- {}:\n{}\n", e.path().display(), String::from_utf8_lossy(&log)));
    }
    s
}

/// Waits until `n` files named `started*` exist in `dir`.
fn wait_started(dir: &Path, n: usize, child: &mut [&mut Bg]) {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let found = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("started"))
            .count();
        if found >= n {
            return;
        }
        for c in child.iter_mut() {
            if let Some(status) = c.try_wait().unwrap() {
                panic!("agentvm exited early with {status}");
            }
        }
        let runtime = dir.parent().unwrap().join("runtime");
        assert!(Instant::now() < deadline, "the guest never started\n{}", consoles(&runtime));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `agentvm ARGS` with the launch's environment.
fn tool(l: &Launch, args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut c =
        l.command_with(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    c.stdin.take().unwrap().write_all(input).unwrap();
    let out = c.wait_with_output().unwrap();
    eprintln!("--- agentvm {args:?} -> {:?}\n{}{}", out.status, stdout(&out), stderr(&out));
    out
}

/// `agentvm ps --json`, parsed.
fn ps(l: &Launch) -> Vec<serde_json::Value> {
    let out = tool(l, &["ps", "--json"], b"");
    assert_eq!(out.status.code(), Some(0));
    serde_json::from_slice(&out.stdout).expect("ps --json prints a JSON array")
}

/// Processes whose command line mentions any of the launch's dirs (QEMU
/// names the runtime dir, virtiofsd the shared dirs).
fn leftover_helpers(l: &Launch) -> Vec<String> {
    let needle = l.dirs.path().to_string_lossy().into_owned();
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

/// Waits up to `timeout` for the launch's helpers to be gone.
fn assert_helpers_gone_within(l: &Launch, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !leftover_helpers(l).is_empty() {
        assert!(Instant::now() < deadline, "left behind after {timeout:?}: {:?}", leftover_helpers(l));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pids of processes whose command line contains all of `words`.
fn pids_with(words: &[&str]) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if words.iter().all(|w| cmd.contains(w)) {
                found.push(pid);
            }
        }
    }
    found
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, sig) };
}

/// A second launch in the same project, data and runtime dirs as `l`.
fn sibling(l: &Launch) -> Launch {
    let mut s = Launch::new();
    s.work = l.work.clone();
    s.data = l.data.clone();
    s.runtime = l.runtime.clone();
    s
}

fn real(p: &Path) -> PathBuf {
    p.canonicalize().unwrap()
}

#[test]
fn two_instances_are_listed_stopped_by_id_then_all_and_leave_nothing() {
    // Distinct names: guest PIDs are deterministic, so `$$` can collide.
    let a = Launch::new().shell("touch /work/started-a; sleep 300");
    let b = sibling(&a).shell("touch /work/started-b; sleep 300");
    let mut ca = spawn(&a);
    let mut cb = spawn(&b);
    wait_started(&a.work, 2, &mut [&mut ca, &mut cb]);

    let listed = ps(&a);
    assert_eq!(listed.len(), 2, "{listed:?}");
    for e in &listed {
        assert_eq!(Path::new(e["work_dir"].as_str().unwrap()), real(&a.work));
        assert_eq!(e["state"], "running");
        assert_eq!(e["flavor"], "shell");
        assert_eq!(e["memory_mib"], 512);
        assert!(e["rss_mib"].as_u64().unwrap() > 0, "{e}");
    }
    let table = stdout(&tool(&a, &["ps"], b""));
    assert!(table.starts_with("ID "), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");

    // The older one (ps lists oldest first) is the first spawned only by
    // chance; stop whichever is first, by a prefix of its id.
    let first_id = listed[0]["id"].as_str().unwrap().to_string();
    let first_pid = listed[0]["pid"].as_u64().unwrap() as u32;
    let (first, second) = if ca.id() == first_pid { (ca, cb) } else { (cb, ca) };
    let started = Instant::now();
    let out = tool(&a, &["stop", &first_id[..5]], b"");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out).trim(), first_id);
    eprintln!("stop took {:?}", started.elapsed());
    let out = wait_exit(first, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "the stopped run exits non-zero");

    let listed = ps(&a);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_ne!(listed[0]["id"].as_str().unwrap(), first_id);

    let out = tool(&a, &["stop", "--all"], b"");
    assert_eq!(out.status.code(), Some(0));
    let out = wait_exit(second, Duration::from_secs(30));
    assert_ne!(out.status.code(), Some(0));
    assert!(ps(&a).is_empty());
    assert!(a.leftover_instances().is_empty(), "{:?}", a.leftover_instances());
    assert_helpers_gone_within(&a, Duration::from_secs(2));
}

#[test]
fn unknown_instance_id_is_an_error_naming_what_runs() {
    let l = Launch::new();
    for args in [&["stop", "nope"][..], &["logs", "nope"], &["exec", "nope", "--", "true"], &["shell", "nope"]] {
        let out = tool(&l, args, b"");
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        assert!(stderr(&out).contains("no instance matches \"nope\"; no instance is running"), "{}", stderr(&out));
    }
    let out = tool(&l, &["ps"], b"");
    assert_eq!(stdout(&out).lines().count(), 1, "only the header");
}

#[test]
fn exec_runs_in_a_running_vm_with_stdin_output_and_exit_status_and_logs_show_the_console() {
    let l = Launch::new().shell("touch /work/started; sleep 300");
    let mut child = spawn(&l);
    wait_started(&l.work, 1, &mut [&mut child]);
    let id = ps(&l)[0]["id"].as_str().unwrap().to_string();

    let started = Instant::now();
    let out = tool(&l, &["exec", &id, "--", "sh", "-c", "echo hi; id -un; pwd; cat; echo err >&2; exit 5"], b"fed\n");
    eprintln!("exec took {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(stdout(&out), "hi\nagent\n/work\nfed\n");
    assert_eq!(stderr(&out), "err\n");

    // Two sessions at once, each on its own port; a missing command is 127.
    let (x, y) = std::thread::scope(|s| {
        let x = s.spawn(|| tool(&l, &["exec", &id[..4], "--", "sh", "-c", "sleep 1; echo one"], b""));
        let y = s.spawn(|| tool(&l, &["exec", &id[..4], "--", "no-such-command-xyz"], b""));
        (x.join().unwrap(), y.join().unwrap())
    });
    assert_eq!((x.status.code(), stdout(&x).as_str()), (Some(0), "one\n"));
    assert_eq!(y.status.code(), Some(127));
    assert!(stderr(&y).contains("no-such-command-xyz"));

    // A line on the kernel console shows up in `logs`.
    let out = tool(&l, &["exec", &id, "--", "sh", "-c", "echo '<2>console-marker-42' | sudo tee /dev/kmsg"], b"");
    assert_eq!(out.status.code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = tool(&l, &["logs", &id], b"");
        assert_eq!(out.status.code(), Some(0));
        if stdout(&out).contains("console-marker-42") {
            break;
        }
        assert!(Instant::now() < deadline, "logs lacks the marker");
        std::thread::sleep(Duration::from_millis(200));
    }

    // `logs -f` ends with the instance; the main program's end ends exec sessions.
    let follow = spawn_tool(&l, &["logs", "-f", &id], Stdio::null());
    let pending = spawn_tool(&l, &["exec", &id, "--", "sleep", "300"], Stdio::null());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(tool(&l, &["stop", &id], b"").status.code(), Some(0));
    let out = wait_exit(follow, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("console-marker-42"));
    let out = wait_exit(pending, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("closed before the command finished"), "{}", stderr(&out));
    assert_ne!(wait_exit(child, Duration::from_secs(30)).status.code(), Some(0));
    assert_helpers_gone_within(&l, Duration::from_secs(2));
}

#[test]
fn killed_launcher_takes_its_helpers_along_and_ps_sweeps_its_dir() {
    let l = Launch::new().shell("touch /work/started; sleep 300");
    let mut child = spawn(&l);
    wait_started(&l.work, 1, &mut [&mut child]);
    assert!(!leftover_helpers(&l).is_empty(), "the helpers are found while running");
    let mut child = child.take();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed = Instant::now();
    assert_helpers_gone_within(&l, Duration::from_secs(5));
    eprintln!("helpers gone {:?} after SIGKILL", killed.elapsed());
    assert_eq!(l.leftover_instances().len(), 1, "the dir stays until swept");
    assert!(ps(&l).is_empty());
    assert!(l.leftover_instances().is_empty(), "ps swept the dir: {:?}", l.leftover_instances());
}

#[test]
fn killed_virtiofsd_stops_the_run_naming_it() {
    let l = Launch::new().shell("touch /work/started; sleep 300");
    let mut child = spawn(&l);
    wait_started(&l.work, 1, &mut [&mut child]);
    let work = l.work.to_string_lossy().into_owned();
    let pids = pids_with(&["virtiofsd", "--shared-dir", &work]);
    assert!(!pids.is_empty(), "virtiofsd for /work not found");
    for pid in pids {
        kill(pid, libc::SIGKILL);
    }
    let out = wait_exit(child, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("virtiofsd for /work exited"), "{}", stderr(&out));
    assert!(l.leftover_instances().is_empty());
    assert_helpers_gone_within(&l, Duration::from_secs(2));
}

#[test]
fn killed_qemu_ends_the_run_with_a_message_and_no_leftovers() {
    let l = Launch::new().shell("touch /work/started; sleep 300");
    let mut child = spawn(&l);
    wait_started(&l.work, 1, &mut [&mut child]);
    let qemu = ps(&l)[0]["qemu_pid"].as_u64().expect("ps knows QEMU's pid") as i32;
    kill(qemu, libc::SIGKILL);
    let out = wait_exit(child, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(err.contains("QEMU was killed (signal 9) by something other than agentvm"), "{err}");
    assert!(l.leftover_instances().is_empty());
    assert_helpers_gone_within(&l, Duration::from_secs(2));
}

/// Runs `tmux -S SOCKET ARGS` and returns its stdout.
fn tmux(socket: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("tmux").arg("-S").arg(socket).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_screen(socket: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let screen = tmux(socket, &["capture-pane", "-p", "-t", "t"]);
        if screen.contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "{needle:?} never appeared; screen:\n{screen}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn shell_into_a_running_vm_is_a_terminal_that_follows_resize_and_returns_the_status() {
    if std::process::Command::new("tmux").arg("-V").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "tmux is missing: scripts/setup-host installs it");
        return;
    }
    let l = Launch::new().shell("touch /work/started; sleep 300");
    let mut child = spawn(&l);
    wait_started(&l.work, 1, &mut [&mut child]);
    let id = ps(&l)[0]["id"].as_str().unwrap().to_string();

    let socket = l.dirs.path().join("tmux.sock");
    let after = l.dirs.path().join("after.txt");
    let mut script = String::new();
    for (k, v) in l.command().get_envs() {
        if let Some(v) = v {
            script.push_str(&format!("export {}='{}'\n", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    script.push_str(&format!(
        "'{}' shell {id}\necho \"exit=$?\" > '{}'\nsleep 60\n",
        agentvm_bin().display(),
        after.display()
    ));
    let script_path = l.dirs.path().join("shell.sh");
    std::fs::write(&script_path, script).unwrap();
    let sh = format!("sh '{}'", script_path.display());
    tmux(&socket, &["new-session", "-d", "-s", "t", "-x", "120", "-y", "40", &sh]);
    wait_screen(&socket, "agent@");
    tmux(&socket, &["send-keys", "-t", "t", "echo size=$(stty size) $PWD", "Enter"]);
    wait_screen(&socket, "size=40 120 /work");
    tmux(&socket, &["resize-window", "-t", "t", "-x", "100", "-y", "30"]);
    tmux(&socket, &["send-keys", "-t", "t", "echo size=$(stty size)", "Enter"]);
    wait_screen(&socket, "size=30 100");
    tmux(&socket, &["send-keys", "-t", "t", "exit 6", "Enter"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&after).unwrap_or_default().is_empty() {
        assert!(Instant::now() < deadline, "agentvm shell did not exit");
        std::thread::sleep(Duration::from_millis(100));
    }
    tmux(&socket, &["kill-server"]);
    assert_eq!(std::fs::read_to_string(&after).unwrap().trim(), "exit=6");
    assert_eq!(tool(&l, &["stop", &id], b"").status.code(), Some(0));
    assert_ne!(wait_exit(child, Duration::from_secs(30)).status.code(), Some(0));
}

/// Runs every launch at once, each on its own thread, and returns outputs
/// in order.
fn run_all(launches: &[Launch]) -> Vec<Output> {
    std::thread::scope(|s| {
        let handles: Vec<_> = launches.iter().map(|l| s.spawn(move || l.run())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn four_concurrent_runs_on_one_project_keep_their_own_output() {
    let first = Launch::new().shell("echo run-0 | tee /work/out-0");
    let mut launches = vec![];
    for i in 1..4 {
        launches.push(sibling(&first).shell(&format!("echo run-{i} | tee /work/out-{i}")));
    }
    launches.insert(0, first);
    let outs = run_all(&launches);
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(out.status.code(), Some(0), "run {i}: {}", stderr(out));
        assert_eq!(stdout(out), format!("run-{i}\n"));
        assert_eq!(std::fs::read_to_string(launches[0].work.join(format!("out-{i}"))).unwrap(), format!("run-{i}\n"));
    }
    assert!(launches[0].leftover_instances().is_empty());
    assert_helpers_gone_within(&launches[0], Duration::from_secs(2));
}

#[test]
fn fsynced_file_survives_a_forced_stop_of_the_vm() {
    let l = Launch::new().shell("printf 'kept data' > /work/f; sync /work/f; touch /work/started; sleep 300");
    let mut c = spawn(&l);
    wait_started(&l.work, 1, &mut [&mut c]);
    let qemu = ps(&l)[0]["qemu_pid"].as_u64().expect("qemu pid") as i32;
    kill(qemu, libc::SIGKILL);
    let out = wait_exit(c, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(std::fs::read_to_string(l.work.join("f")).unwrap(), "kept data");
    assert_helpers_gone_within(&l, Duration::from_secs(5));
}

#[test]
fn symlinks_and_dotdot_in_the_share_stay_inside_the_guest() {
    let l = Launch::new();
    // A file next to the project, and links that point at host paths.
    std::fs::write(l.dirs.path().join("outside.txt"), "host-only secret").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", l.work.join("passwd-link")).unwrap();
    std::os::unix::fs::symlink("../outside.txt", l.work.join("outside-link")).unwrap();
    let l = l.shell(
        "grep -c '^agent:' /work/passwd-link; \
         cat /work/outside-link 2>&1; cat /work/../outside.txt 2>&1; ls /work/.. | grep -c outside.txt; true",
    );
    let out = l.run();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0));
    assert!(!text.contains("host-only secret"), "the guest read a host file: {text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "1", "the link resolved to the guest's own /etc/passwd: {text}");
    assert!(lines[1].contains("No such file"), "{text}");
    assert!(lines[2].contains("No such file"), "{text}");
    assert_eq!(lines[3], "0", "{text}");
}

#[test]
fn soak_twenty_runs_in_a_row_then_four_at_once_all_clean() {
    let base = Launch::new();
    for i in 0..20 {
        let l = sibling(&base).shell(&format!("echo {i}"));
        let out = l.run();
        assert_eq!(out.status.code(), Some(0), "run {i}");
        assert_eq!(stdout(&out), format!("{i}\n"), "run {i}");
        assert!(base.leftover_instances().is_empty(), "run {i}");
    }
    let launches: Vec<Launch> = (0..4).map(|i| sibling(&base).shell(&format!("echo at-once-{i}; exit {i}"))).collect();
    for (i, out) in run_all(&launches).iter().enumerate() {
        assert_eq!(out.status.code(), Some(i as i32));
        assert_eq!(stdout(out), format!("at-once-{i}\n"));
    }
    assert!(base.leftover_instances().is_empty());
    assert_helpers_gone_within(&base, Duration::from_secs(2));
}

/// The sizes of the console log files in an instance dir.
fn console_files(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("console.log"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
        .collect();
    files.sort();
    files
}

#[test]
fn a_guest_flooding_its_console_stays_under_the_cap_on_disk_in_logs_and_at_exit() {
    use agentvm::instance::console_log::ROTATE_BYTES;
    // Past both files the log keeps; the serial console takes ~0.25 MB/s under TCG.
    let flood_mib = 2 * ROTATE_BYTES / (1 << 20) + 1;
    let script = format!(
        "sudo sh -c 'head -c {flood_mib}M /dev/zero | tr \"\\0\" x > /dev/console'; touch /work/flooded; \
         while [ ! -e /work/checked ]; do sleep 0.1; done; echo survived"
    );
    let l = Launch::new();
    let args = ["run", "--verbose", "--memory", "512M", "--cpus", "1", "shell", "--", "sh", "-c", &script];
    // Output to files: --verbose prints more at exit than a pipe holds.
    let (out_path, err_path) = (l.dirs.path().join("stdout"), l.dirs.path().join("stderr"));
    let mut child = Bg(Some(
        l.command_with(&args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .unwrap(),
    ));
    let deadline = Instant::now() + Duration::from_secs(400);
    while !l.work.join("flooded").exists() {
        assert!(child.try_wait().unwrap().is_none(), "agentvm exited: {}", std::fs::read_to_string(&err_path).unwrap());
        assert!(Instant::now() < deadline, "the flood did not end within 400 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    let dir = l.leftover_instances().pop().expect("the instance dir");
    // One read of the socket may land past the limit before the file rotates.
    let per_file = ROTATE_BYTES + 64 * 1024;
    let files = console_files(&dir);
    eprintln!("console files after a {flood_mib} MiB flood: {files:?}");
    assert!(files.iter().all(|(_, len)| *len <= per_file), "{files:?}");
    assert!(files.len() <= 2, "{files:?}");

    let id = dir.file_name().unwrap().to_str().unwrap().to_string();
    let out = l.command_with(&["logs", &id]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.len() as u64 <= 2 * per_file, "logs printed {} bytes", out.stdout.len());
    assert!(out.stdout.ends_with(b"xxxxxxxx"), "logs ends with the flood");

    std::fs::write(l.work.join("checked"), "").unwrap();
    let status = wait_exit(child, Duration::from_secs(60)).status;
    assert_eq!(status.code(), Some(0));
    assert_eq!(std::fs::read_to_string(&out_path).unwrap(), "survived\n");
    // --verbose prints the console's end, not all of it.
    let err = std::fs::read(&err_path).unwrap();
    assert!(err.len() < (1 << 20) + (64 << 10), "--verbose printed {} bytes", err.len());
    let err = String::from_utf8_lossy(&err);
    assert!(err.contains("--- guest console (its last 1024 KiB of "), "{}", err.chars().take(2000).collect::<String>());
    assert_helpers_gone_within(&l, Duration::from_secs(2));
}
