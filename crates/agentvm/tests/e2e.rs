//! End-to-end tests: real VMs (TCG where KVM is unusable), real virtiofsd,
//! real files. The image is shared by every test through one cache dir
//! (`AGENTVM_TEST_CACHE`, default /var/tmp/agentvm-test-cache); the first
//! test that needs it builds it, the others wait on the store's lock.
//! `scripts/test` builds the workspace and the image before running these.

use agentvm_testkit::*;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn guest_file_write_appears_on_host_with_invoking_owner() {
    let l = Launch::new().shell("echo hello from the guest > /work/out.txt && id -un && pwd");
    let out = l.run();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "agent\n/work\n");
    let path = l.work.join("out.txt");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello from the guest\n");
    assert_eq!(std::fs::metadata(&path).unwrap().uid(), my_uid());
    assert!(l.leftover_instances().is_empty(), "{:?}", l.leftover_instances());
    l.assert_no_leftovers();
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn exit_status_of_the_program_comes_back() {
    let out = Launch::new().shell("exit 7").run();
    assert_eq!(out.status.code(), Some(7));
    let out = Launch::new().shell("kill -KILL $$").run();
    assert_eq!(out.status.code(), Some(128 + 9));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
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
#[ignore = "boots a VM: scripts/test runs it"]
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
#[ignore = "boots a VM: scripts/test runs it"]
fn sigterm_to_headless_agentvm_stops_the_vm_cleanly() {
    let l = Launch::new().shell("touch /work/started; sleep 600");
    let mut child = l.spawn();
    child.wait_for_file(&l.work.join("started"), Duration::from_secs(120));
    child.signal(libc::SIGTERM);
    let stopped = Instant::now();
    let out = child.wait_with_output();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
    assert!(stopped.elapsed() < Duration::from_secs(30));
    assert!(l.leftover_instances().is_empty());
    l.assert_no_leftovers();
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
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
        let out = l.agentvm(args);
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
    let out = l.agentvm(&["run", "-w", file.to_str().unwrap(), "shell"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("not a directory"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn guest_kernel_panic_ends_the_run_with_console_lines() {
    // An init that is not an executable makes the kernel panic at boot.
    let l = Launch::new().shell("true");
    let bogus = l.dirs.path().join("bogus-init");
    std::fs::write(&bogus, "not an executable").unwrap();
    let out = l.run_command(l.command().env("AGENTVM_GUEST_INIT", &bogus));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(125));
    assert!(err.contains("guest console"), "{err}");
    assert!(err.to_lowercase().contains("panic"), "{err}");
    assert!(l.leftover_instances().is_empty());
    l.assert_no_leftovers();
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_guest_that_floods_its_console_then_dies_shows_its_last_words_in_a_short_message() {
    // A long line without a newline, then the last words, then power off
    // without reporting an exit status.
    let l = Launch::new().shell(
        "sudo sh -c 'head -c 2M /dev/zero | tr \"\\0\" x > /dev/console; \
         echo > /dev/console; echo last-words-4242 > /dev/console; echo o > /proc/sysrq-trigger'; sleep 60",
    );
    let out = l.run();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        err.contains("without reporting the program's exit status"),
        "{}",
        err.chars().take(2000).collect::<String>()
    );
    assert!(err.contains("last-words-4242"), "the console's last lines are missing");
    assert!(err.len() < 64 << 10, "the message is {} bytes long", err.len());
    assert!(l.leftover_instances().is_empty());
    l.assert_no_leftovers();
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn normal_user_runs_without_root_and_owns_what_the_guest_writes() {
    let TestUser { uid, gid } = require!(skip::test_user());
    let l = Launch::new().run_as(uid, gid).shell("echo mine > /work/f.txt; mkdir /work/d; id -u; echo x > ~/h; exit 3");
    let out = l.run();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(stdout(&out), format!("{uid}\n"));
    for p in [l.work.join("f.txt"), l.work.join("d")] {
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{}", p.display());
    }
    assert!(l.leftover_instances().is_empty());
    l.assert_no_leftovers();
}

/// What a guest tries in the directory `$1` (as the agent and through
/// sudo) to leave a setuid or setgid file or a device node on the host,
/// then the plain file work that must keep working.
const SETID_ATTEMPTS: &str = r#"cd "$1" && mkdir t && cd t || exit 1
sudo cp /bin/bash sbash; sudo chmod 4755 sbash; sudo chmod g+s sbash
echo x > mine; chmod u+s mine; chmod g+s mine
install -m 4755 mine installed; sudo install -m 6755 mine installed-root
python3 -c 'import os; os.close(os.open("created", os.O_CREAT | os.O_WRONLY, 0o4755))'
sudo python3 -c 'import os; os.close(os.open("created-root", os.O_CREAT | os.O_WRONLY, 0o6755))'
sudo python3 -c 'import os, stat; os.mknod("node", stat.S_IFREG | 0o4755)'
mkdir -m 2755 sgid-dir
sudo mknod blk b 7 0; sudo mknod chr c 1 3
printf '#!/bin/sh\necho script-ran\n' > script && chmod +x script && ./script
chmod 755 mine && chmod 644 mine && stat -c 'mine %a' mine
mkdir -p deep/er && chmod 700 deep && stat -c 'deep %a' deep
git init -q repo && cd repo && git -c user.name=a -c user.email=a@b commit -q --allow-empty -m committed && git log --format=%s
"#;

/// Files under `dir` that are setuid, setgid or device nodes.
fn setid_files_and_devices(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        let kind = meta.file_type();
        if meta.mode() & 0o6000 != 0 || kind.is_block_device() || kind.is_char_device() {
            found.push(format!("{} (mode {:o})", e.path().display(), meta.mode()));
        }
        if kind.is_dir() {
            found.extend(setid_files_and_devices(&e.path()));
        }
    }
    found
}

/// Runs [`SETID_ATTEMPTS`] in /work and in the agent home, then checks the
/// host side of both.
fn guest_leaves_no_setid_file_or_device_on_the_host(l: Launch) {
    std::fs::write(l.work.join("attempts.sh"), SETID_ATTEMPTS).unwrap();
    let l = l.shell("sh /work/attempts.sh /work && sh /work/attempts.sh /home/agent");
    let out = l.run();
    let plain = "script-ran\nmine 644\ndeep 700\ncommitted\n";
    assert_eq!(stdout(&out), plain.repeat(2), "plain file work failed in the guest");
    assert_eq!(out.status.code(), Some(0));
    assert!(l.work.join("t/repo/.git").is_dir());
    let homes = l.data.join("agentvm/homes");
    assert!(std::fs::read_dir(&homes).unwrap().flatten().any(|h| h.path().join("t/script").is_file()));
    let found: Vec<String> = [&l.work, &homes].iter().flat_map(|d| setid_files_and_devices(d)).collect();
    assert!(found.is_empty(), "the guest left these on the host: {found:#?}");
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn guest_root_leaves_no_setid_file_or_device_on_the_host() {
    guest_leaves_no_setid_file_or_device_on_the_host(Launch::new());
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn guest_root_leaves_no_setid_file_on_the_host_of_a_normal_user() {
    let TestUser { uid, gid } = require!(skip::test_user());
    guest_leaves_no_setid_file_or_device_on_the_host(Launch::new().run_as(uid, gid));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn interactive_session_has_the_terminal_size_follows_resize_and_restores_the_terminal() {
    require!(skip::tool("tmux"));
    let l = Launch::new();
    let t = Tmux::start(&l, 120, 40, &["run", "--memory", "512M", "--cpus", "1", "shell"]);
    t.wait_for("agent@");
    t.send("echo size=$(stty size)");
    t.wait_for("size=40 120");
    t.resize(100, 30);
    t.send("echo size=$(stty size)");
    t.wait_for("size=30 100");
    // Ctrl-C reaches the program in the guest, not agentvm.
    t.send("sleep 300");
    std::thread::sleep(Duration::from_millis(500));
    t.key("C-c");
    t.send("echo still-$((1+1))");
    t.wait_for("still-2");
    t.send("exit 4");
    let after = t.wait_exit(Duration::from_secs(60));
    assert!(after.starts_with("exit=4"), "{after}");
    // Raw mode was undone: canonical input and echo are back on.
    assert!(after.contains(" icanon") && after.contains(" echo "), "{after}");
}

/// Resident KiB of the guest RAM (QEMU's memfd mapping: its own, or a warm
/// start's copy of the template's RAM) of `qemu`.
fn guest_ram_resident_kib(qemu: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{qemu}/smaps")).unwrap();
    let mut in_ram = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if !first.ends_with(':') {
            in_ram = line.contains("memfd:memory-backend-memfd")
                || line.contains(&format!("memfd:{}", agentvm::launch::warm::RAM_COPY_NAME));
        } else if in_ram && first == "Rss:" {
            kib += line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
        }
    }
    kib
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn memory_the_guest_frees_goes_back_to_the_host() {
    let l = Launch::new();
    let script = "dd if=/dev/zero of=/dev/shm/fill bs=1M count=384 2>/dev/null && touch /work/filled \
                  && while [ ! -e /work/measured ]; do sleep 0.1; done; rm /dev/shm/fill; sleep 120";
    let args = ["run", "--memory", "1G", "--cpus", "1", "shell", "--", "sh", "-c", script];
    let child = spawn_until_marker(&l, &args, "filled", Duration::from_secs(120));
    let meta = agentvm::instance::read_meta(&l.leftover_instances()[0]).expect("the instance's metadata");
    let qemu = meta.qemu_pid.expect("instance.json names QEMU");
    let filled = guest_ram_resident_kib(qemu);
    std::fs::write(l.work.join("measured"), "").unwrap();
    // Free page reporting hands memory back in passes two seconds apart.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut now = filled;
    while filled - now.min(filled) < 256 * 1024 {
        assert!(
            Instant::now() < deadline,
            "guest RAM resident on the host: {filled} KiB with 384 MiB filled, still {now} KiB a minute after it was freed"
        );
        std::thread::sleep(Duration::from_millis(500));
        now = guest_ram_resident_kib(qemu);
    }
    child.signal(libc::SIGTERM);
    let out = child.wait_with_output();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{}", stderr(&out));
    l.assert_no_leftovers();
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn host_edits_to_work_show_up_in_a_running_guest_with_the_default_cache() {
    let l = Launch::new();
    std::fs::write(l.work.join("f"), "before\n").unwrap();
    let script = "cat /work/f > /work/seen1; touch /work/ready; \
                  while [ ! -e /work/changed ]; do sleep 0.1; done; sleep 1.5; cat /work/f > /work/seen2";
    let args = ["run", "--memory", "512M", "--cpus", "1", "shell", "--", "sh", "-c", script];
    let child = spawn_until_marker(&l, &args, "ready", Duration::from_secs(120));
    std::fs::write(l.work.join("f"), "after, and longer\n").unwrap();
    std::fs::write(l.work.join("changed"), "").unwrap();
    let out = child.wait_with_output();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(l.work.join("seen1")).unwrap(), "before\n");
    assert_eq!(std::fs::read_to_string(l.work.join("seen2")).unwrap(), "after, and longer\n");
}

/// The JSON of `agentvm run --print-plan --json` with `flags`.
fn print_plan(l: &Launch, flags: &[&str]) -> serde_json::Value {
    let mut args = vec!["--print-plan", "--json"];
    args.extend_from_slice(flags);
    let out = l.run_command(&mut l.command_with_flags(&args));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

fn strings(json: &serde_json::Value) -> Vec<&str> {
    json.as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect()
}

#[test]
#[ignore = "needs QEMU and the test image, though it boots nothing: scripts/test runs it"]
fn print_plan_json_gives_a_baseline_the_machine_the_kernel_and_the_module_bytes_agentvm_loads() {
    let l = Launch::new().cmd(&["true"]);
    let plan = print_plan(&l, &["--accel", "tcg", "--network", "none"]);
    assert_eq!(plan["accel"], "tcg");
    let (machine, all) = (strings(&plan["qemu_machine_args"]), strings(&plan["qemu_args"]));
    assert!(all.starts_with(&machine), "{machine:?}");
    assert!(machine.windows(2).any(|w| w == ["-accel", "tcg,thread=multi"]), "{machine:?}");
    let value_of = |flag: &str| all.windows(2).find(|w| w[0] == flag).map(|w| w[1]).unwrap();
    assert_eq!(value_of("-kernel"), plan["kernel"]);
    assert_eq!(value_of("-append"), plan["kernel_cmdline"]);
    let image = &plan["image"];
    assert!(std::path::Path::new(image["bzimage"].as_str().unwrap()).is_file(), "{image}");
    let modules = image["boot_modules"].as_array().unwrap();
    let files: Vec<&str> = modules.iter().map(|m| m["file"].as_str().unwrap()).collect();
    assert_eq!(plan["spec"]["modules"].as_array().unwrap().len(), files.len());
    assert!(files.contains(&"virtio_mmio.ko") && files.contains(&"virtio_blk.ko"), "{files:?}");
    // The bytes named are the module up to its signature (Debian signs them;
    // the watch module is agentvm's own, built unsigned, and loaded whole).
    let magic = b"~Module signature appended~\n";
    for m in modules {
        let ko = std::fs::read(m["path"].as_str().unwrap()).unwrap();
        let len = m["unsigned_len"].as_u64().unwrap() as usize;
        assert!(ko.starts_with(b"\x7fELF"), "{m}");
        if m["file"] == "agentvm_notify.ko" {
            assert_eq!(len, ko.len(), "{m}");
            continue;
        }
        assert!(ko.ends_with(magic), "{m}: the test image's modules are signed");
        assert!(len < ko.len() - magic.len() - 12, "{m}: {} bytes", ko.len());
        let sig_len = u32::from_be_bytes(ko[ko.len() - magic.len() - 4..][..4].try_into().unwrap()) as usize;
        assert_eq!(len + sig_len + 12 + magic.len(), ko.len(), "{m}");
    }
    assert!(plan["plan_ms"].as_f64().unwrap() > 0.0);
    assert!(l.leftover_instances().is_empty());
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn verbose_run_reports_the_launchers_clock_as_one_json_line() {
    let l = Launch::new().cmd(&["true"]);
    let started = Instant::now();
    let out = l.run_command(&mut l.command_with_flags(&["--verbose"]));
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let lines: Vec<&str> = err.lines().filter_map(|l| l.strip_prefix("agentvm: timings ")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    let t: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let (plan, qemu) = (t["plan_ms"].as_f64().unwrap(), t["qemu_started_ms"].as_f64().unwrap());
    assert!(0.0 < plan && plan <= qemu && qemu < wall_ms, "{t} in {wall_ms} ms");
}
