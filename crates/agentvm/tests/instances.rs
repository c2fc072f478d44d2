//! End-to-end tests of running instances: `ps`, `stop`, `logs`, `exec`, and
//! that nothing is left behind when an instance, its launcher or one of its
//! helpers is stopped or killed. Real VMs, like e2e.rs.

use agentvm_testkit::process::{self, kill, pids_with};
use agentvm_testkit::*;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

/// How long a VM may take to boot under TCG on a loaded machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Starts `l`, whose guest touches /work/started, kills its QEMU (SIGKILL)
/// once the guest started, and returns agentvm's output.
fn run_and_kill_qemu(l: &Launch) -> Output {
    let child = l.spawn_until("started", BOOT_TIMEOUT);
    let qemu = l.ps()[0]["qemu_pid"].as_u64().expect("ps knows QEMU's pid") as u32;
    kill(qemu, libc::SIGKILL);
    child.wait_exit(Duration::from_secs(30))
}

fn real(p: &Path) -> PathBuf {
    p.canonicalize().unwrap()
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn two_instances_are_listed_stopped_by_id_then_all_and_leave_nothing() {
    // Distinct names: guest PIDs are deterministic, so `$$` can collide.
    let a = Launch::new().shell("touch /work/started-a; sleep 300");
    let b = a.sibling().shell("touch /work/started-b; sleep 300");
    let ca = a.spawn_until("started-a", BOOT_TIMEOUT);
    let cb = b.spawn_until("started-b", BOOT_TIMEOUT);

    let listed = a.ps();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for e in &listed {
        assert_eq!(Path::new(e["work_dir"].as_str().unwrap()), real(&a.work));
        assert_eq!(e["state"], "running");
        assert_eq!(e["flavor"], "shell");
        assert_eq!(e["memory_mib"], 512);
        assert!(e["rss_mib"].as_u64().unwrap() > 0, "{e}");
    }
    let table = stdout(&a.agentvm(&["ps"]));
    assert!(table.starts_with("ID "), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");

    // The older one (ps lists oldest first) is the first spawned only by
    // chance; stop whichever is first, by a prefix of its id.
    let first_id = listed[0]["id"].as_str().unwrap().to_string();
    let first_pid = listed[0]["pid"].as_u64().unwrap() as u32;
    let (first, second) = if ca.id() == first_pid { (ca, cb) } else { (cb, ca) };
    let started = Instant::now();
    let out = a.agentvm(&["stop", &first_id[..5]]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out).trim(), first_id);
    eprintln!("stop took {:?}", started.elapsed());
    let out = first.wait_exit(Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "the stopped run exits non-zero");

    let listed = a.ps();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_ne!(listed[0]["id"].as_str().unwrap(), first_id);

    let out = a.agentvm(&["stop", "--all"]);
    assert_eq!(out.status.code(), Some(0));
    let out = second.wait_exit(Duration::from_secs(30));
    assert_ne!(out.status.code(), Some(0));
    assert!(a.ps().is_empty());
    assert!(a.leftover_instances().is_empty(), "{:?}", a.leftover_instances());
    a.assert_no_leftovers_within(Duration::from_secs(2));
}

#[test]
fn unknown_instance_id_is_an_error_naming_what_runs() {
    let l = Launch::new();
    for args in [&["stop", "nope"][..], &["logs", "nope"], &["exec", "nope", "--", "true"], &["shell", "nope"]] {
        let out = l.agentvm(args);
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        assert!(stderr(&out).contains("no instance matches \"nope\"; no instance is running"), "{}", stderr(&out));
    }
    let out = l.agentvm(&["ps"]);
    assert_eq!(stdout(&out).lines().count(), 1, "only the header");
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn exec_runs_in_a_running_vm_with_stdin_output_and_exit_status_and_logs_show_the_console() {
    let l = Launch::new().shell("touch /work/started; sleep 300");
    let child = l.spawn_until("started", BOOT_TIMEOUT);
    let id = l.ps()[0]["id"].as_str().unwrap().to_string();

    let started = Instant::now();
    let exec = ["exec", &id, "--", "sh", "-c", "echo hi; id -un; pwd; cat; echo err >&2; exit 5"];
    let out = process::run(&mut l.command_with(&exec), b"fed\n");
    eprintln!("exec took {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(stdout(&out), "hi\nagent\n/work\nfed\n");
    assert_eq!(stderr(&out), "err\n");

    // Two sessions at once, each on its own port; a missing command is 127.
    let (x, y) = std::thread::scope(|s| {
        let x = s.spawn(|| l.agentvm(&["exec", &id[..4], "--", "sh", "-c", "sleep 1; echo one"]));
        let y = s.spawn(|| l.agentvm(&["exec", &id[..4], "--", "no-such-command-xyz"]));
        (x.join().unwrap(), y.join().unwrap())
    });
    assert_eq!((x.status.code(), stdout(&x).as_str()), (Some(0), "one\n"));
    assert_eq!(y.status.code(), Some(127));
    assert!(stderr(&y).contains("no-such-command-xyz"));

    // A line on the kernel console shows up in `logs`.
    let out = l.agentvm(&["exec", &id, "--", "sh", "-c", "echo '<2>console-marker-42' | sudo tee /dev/kmsg"]);
    assert_eq!(out.status.code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = l.agentvm(&["logs", &id]);
        assert_eq!(out.status.code(), Some(0));
        if stdout(&out).contains("console-marker-42") {
            break;
        }
        assert!(Instant::now() < deadline, "logs lacks the marker");
        std::thread::sleep(Duration::from_millis(200));
    }

    // `logs -f` ends with the instance; the main program's end ends exec sessions.
    let follow = l.spawn_with(&["logs", "-f", &id]);
    let pending = l.spawn_with(&["exec", &id, "--", "sleep", "300"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(l.agentvm(&["stop", &id]).status.code(), Some(0));
    let out = follow.wait_exit(Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("console-marker-42"));
    let out = pending.wait_exit(Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("closed before the command finished"), "{}", stderr(&out));
    assert_ne!(child.wait_exit(Duration::from_secs(30)).status.code(), Some(0));
    l.assert_no_leftovers_within(Duration::from_secs(2));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn killed_launcher_takes_its_helpers_along_and_ps_sweeps_its_dir() {
    let l = Launch::new().shell("touch /work/started; sleep 300");
    let child = l.spawn_until("started", BOOT_TIMEOUT);
    assert!(!l.processes().is_empty(), "the helpers are found while running");
    child.kill();
    let killed = Instant::now();
    l.assert_no_leftovers_within(Duration::from_secs(5));
    eprintln!("helpers gone {:?} after SIGKILL", killed.elapsed());
    assert_eq!(l.leftover_instances().len(), 1, "the dir stays until swept");
    assert!(l.ps().is_empty());
    assert!(l.leftover_instances().is_empty(), "ps swept the dir: {:?}", l.leftover_instances());
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn killed_virtiofsd_stops_the_run_naming_it() {
    let l = Launch::new().shell("touch /work/started; sleep 300");
    let child = l.spawn_until("started", BOOT_TIMEOUT);
    let work = l.work.to_string_lossy().into_owned();
    let pids = pids_with(&["virtiofsd", "--shared-dir", &work]);
    assert!(!pids.is_empty(), "virtiofsd for /work not found");
    for pid in pids {
        kill(pid, libc::SIGKILL);
    }
    let out = child.wait_exit(Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("virtiofsd for /work exited"), "{}", stderr(&out));
    assert!(l.leftover_instances().is_empty());
    l.assert_no_leftovers_within(Duration::from_secs(2));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn killed_qemu_ends_the_run_with_a_message_and_no_leftovers() {
    let l = Launch::new().shell("touch /work/started; sleep 300");
    let out = run_and_kill_qemu(&l);
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(err.contains("QEMU was killed (signal 9) by something other than agentvm"), "{err}");
    assert!(l.leftover_instances().is_empty());
    l.assert_no_leftovers_within(Duration::from_secs(2));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn shell_into_a_running_vm_is_a_terminal_that_follows_resize_and_returns_the_status() {
    require!(skip::tool("tmux"));
    let l = Launch::new().shell("touch /work/started; sleep 300");
    let child = l.spawn_until("started", BOOT_TIMEOUT);
    let id = l.ps()[0]["id"].as_str().unwrap().to_string();

    let t = Tmux::start(&l, 120, 40, &["shell", &id]);
    t.wait_for("agent@");
    t.send("echo size=$(stty size) $PWD");
    t.wait_for("size=40 120 /work");
    t.resize(100, 30);
    t.send("echo size=$(stty size)");
    t.wait_for("size=30 100");
    t.send("exit 6");
    let after = t.wait_exit(Duration::from_secs(30));
    assert_eq!(after.lines().next(), Some("exit=6"), "{after}");
    assert_eq!(l.agentvm(&["stop", &id]).status.code(), Some(0));
    assert_ne!(child.wait_exit(Duration::from_secs(30)).status.code(), Some(0));
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
#[ignore = "boots a VM: scripts/test runs it"]
fn four_concurrent_runs_on_one_project_keep_their_own_output() {
    let first = Launch::new().shell("echo run-0 | tee /work/out-0");
    let mut launches = vec![];
    for i in 1..4 {
        launches.push(first.sibling().shell(&format!("echo run-{i} | tee /work/out-{i}")));
    }
    launches.insert(0, first);
    let outs = run_all(&launches);
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(out.status.code(), Some(0), "run {i}: {}", stderr(out));
        assert_eq!(stdout(out), format!("run-{i}\n"));
        assert_eq!(std::fs::read_to_string(launches[0].work.join(format!("out-{i}"))).unwrap(), format!("run-{i}\n"));
    }
    assert!(launches[0].leftover_instances().is_empty());
    launches[0].assert_no_leftovers_within(Duration::from_secs(2));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn fsynced_file_survives_a_forced_stop_of_the_vm() {
    let l = Launch::new().shell("printf 'kept data' > /work/f; sync /work/f; touch /work/started; sleep 300");
    let out = run_and_kill_qemu(&l);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(std::fs::read_to_string(l.work.join("f")).unwrap(), "kept data");
    l.assert_no_leftovers_within(Duration::from_secs(5));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
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
#[ignore = "boots a VM: scripts/test runs it"]
fn soak_twenty_runs_in_a_row_then_four_at_once_all_clean() {
    let base = Launch::new();
    for i in 0..20 {
        let l = base.sibling().shell(&format!("echo {i}"));
        let out = l.run();
        assert_eq!(out.status.code(), Some(0), "run {i}");
        assert_eq!(stdout(&out), format!("{i}\n"), "run {i}");
        assert!(base.leftover_instances().is_empty(), "run {i}");
    }
    let launches: Vec<Launch> = (0..4).map(|i| base.sibling().shell(&format!("echo at-once-{i}; exit {i}"))).collect();
    for (i, out) in run_all(&launches).iter().enumerate() {
        assert_eq!(out.status.code(), Some(i as i32));
        assert_eq!(stdout(out), format!("at-once-{i}\n"));
    }
    assert!(base.leftover_instances().is_empty());
    base.assert_no_leftovers_within(Duration::from_secs(2));
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
#[ignore = "boots a VM: scripts/test runs it"]
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
    let child = l
        .command_with(&args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let mut child = Background::new(child, &l.runtime);
    let deadline = Instant::now() + Duration::from_secs(400);
    while !l.work.join("flooded").exists() {
        assert!(child.try_wait().is_none(), "agentvm exited: {}", std::fs::read_to_string(&err_path).unwrap());
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
    let status = child.wait_exit(Duration::from_secs(60)).status;
    assert_eq!(status.code(), Some(0));
    assert_eq!(std::fs::read_to_string(&out_path).unwrap(), "survived\n");
    // --verbose prints the console's end, not all of it.
    let err = std::fs::read(&err_path).unwrap();
    assert!(err.len() < (1 << 20) + (64 << 10), "--verbose printed {} bytes", err.len());
    let err = String::from_utf8_lossy(&err);
    assert!(err.contains("--- guest console (its last 1024 KiB of "), "{}", err.chars().take(2000).collect::<String>());
    l.assert_no_leftovers_within(Duration::from_secs(2));
}
