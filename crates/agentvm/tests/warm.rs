//! End-to-end tests of warm starts (`--warm`, issue 17): VMs restored from
//! a template of their shape, made on first use in the shared image cache.

use agentvm_testkit::servers::{free_port, http_get_until, tcp_token_server};
use agentvm_testkit::*;
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The line a fallback to a cold start prints.
const FELL_BACK: &str = "starting cold";

/// `--print-plan --json` of `l` with `flags`: its `start` part.
fn start_plan(l: &Launch, flags: &[&str]) -> serde_json::Value {
    let mut cmd = l.command_with_flags(&[flags, &["--print-plan", "--json"]].concat());
    let out = l.run_command(&mut cmd);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["start"].clone()
}

/// The directory of the template `key` in the shared cache.
fn template_dir(key: &str) -> PathBuf {
    cache_dir().join("agentvm/images").join(format!("template-{}", &key[..16]))
}

fn run_with(l: &Launch, flags: &[&str]) -> Output {
    l.run_command(&mut l.command_with_flags(flags))
}

/// Runs `l` warm until a template serves it (the first run may make it).
fn warm_run(l: &Launch, flags: &[&str]) -> Output {
    let out = run_with(l, &[&["--warm"], flags].concat());
    assert!(!stderr(&out).contains(FELL_BACK), "the warm start fell back: {}", stderr(&out));
    out
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn warm_run_gives_what_a_cold_run_gives_for_work_home_network_and_exit_code() {
    let opened = tcp_token_server("WARM-HOST-PORT-TOKEN");
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("marker"), "from the home\n").unwrap();
    let script = "cat /work/in.txt ~/marker; echo \"$RUN\" > /work/out-\"$RUN\"; \
         ip -o -4 addr show dev eth0 | grep -o 'inet [0-9./]*'; ip route | grep -c '^default via'; \
         timeout 5 bash -c \"cat < /dev/tcp/host.agentvm.internal/$OPENED\"; echo; \
         cd /tmp && echo served > t && (python3 -m http.server 8000 >/dev/null 2>&1 &); \
         for i in $(seq 600); do [ -e /work/fetched ] && break; sleep 0.1; done; cat /work/fetched; rm /work/fetched; exit 7";
    let l = Launch::new().shell(script);
    std::fs::write(l.work.join("in.txt"), "input\n").unwrap();
    let mut outputs = Vec::new();
    for mode in ["--cold", "--warm"] {
        let port = free_port();
        let (publish, opened) = (format!("{port}:8000"), opened.to_string());
        let work = l.work.clone();
        let host = std::thread::spawn(move || {
            http_get_until(port, "/t", "served", Duration::from_secs(180));
            std::fs::write(work.join("fetched"), "fetched over passt\n").unwrap();
        });
        let run = format!("RUN={}", &mode[2..]);
        let home = home.path().to_str().unwrap();
        let flags = [
            mode,
            "--home",
            home,
            "-e",
            &run,
            "-e",
            &format!("OPENED={opened}"),
            "--host-port",
            &opened,
            "-p",
            &publish,
        ];
        let out = run_with(&l, &flags);
        host.join().unwrap();
        assert!(!stderr(&out).contains(FELL_BACK), "{}", stderr(&out));
        outputs.push(out);
    }
    let expected = "input\nfrom the home\ninet 10.0.2.15/24\n1\nWARM-HOST-PORT-TOKEN\nfetched over passt\n";
    for (out, run) in outputs.iter().zip(["cold", "warm"]) {
        assert_eq!(out.status.code(), Some(7), "{run}: {}", stderr(out));
        assert_eq!(stdout(out), expected, "{run}: {}", stderr(out));
        assert_eq!(std::fs::read_to_string(l.work.join(format!("out-{run}"))).unwrap(), format!("{run}\n"));
    }
    l.assert_no_leftovers();
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn two_warm_vms_of_one_template_differ_in_randomness_boot_id_and_names_and_have_the_hosts_clock() {
    let script = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
                  cat /proc/sys/kernel/random/boot_id; hostname; cat /etc/machine-id; date +%s.%N";
    let l = Launch::new().shell(script);
    // Made now if missing; then old enough that a clock not stepped shows.
    warm_run(&l, &[]);
    std::thread::sleep(Duration::from_secs(5));
    let now = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let before = now();
        let out = warm_run(&l, &[]);
        let after = now();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let lines: Vec<String> = stdout(&out).lines().map(String::from).collect();
        assert_eq!(lines.len(), 5, "{lines:?}");
        let guest_clock: f64 = lines[4].parse().unwrap();
        assert!(guest_clock > before - 1.0 && guest_clock < after + 1.0, "guest {guest_clock}, host {before}..{after}");
        seen.push(lines);
    }
    for (i, what) in ["/dev/urandom", "boot_id", "hostname", "machine-id"].iter().enumerate() {
        assert_ne!(seen[0][i], seen[1][i], "two warm VMs share their {what}");
    }
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_corrupted_template_falls_back_to_a_cold_start_with_one_line_and_the_run_succeeds() {
    // A shape of its own: no other test uses this template.
    let l = Launch::new().shell("echo ran");
    let flags = ["--network", "none"];
    let out = warm_run(&l, &flags);
    assert_eq!(stdout(&out), "ran\n");
    let plan = start_plan(&l, &[&["--warm"][..], &flags].concat());
    assert_eq!(plan["template_ready"], true, "{plan}");
    let template = template_dir(plan["template_key"].as_str().unwrap());
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&template).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700, "a template is its user's alone");
    let state = template.join("state");
    let f = std::fs::OpenOptions::new().write(true).open(&state).unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    let out = run_with(&l, &[&["--warm"][..], &flags].concat());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ran\n");
    let err = stderr(&out);
    let said: Vec<&str> = err.lines().filter(|l| l.contains("warm start")).collect();
    assert_eq!(said.len(), 1, "{}", stderr(&out));
    assert!(said[0].contains("could not load the template") && said[0].ends_with(FELL_BACK), "{}", said[0]);
    // The broken template is gone: the next warm start makes a new one and uses it.
    let out = warm_run(&l, &flags);
    assert_eq!(stdout(&out), "ran\n");
    l.assert_no_leftovers();
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn another_image_or_layer_gets_a_template_of_its_own() {
    let l = Launch::new().shell("true");
    // The claude flavor's layer, with a command that runs without a key.
    let config = l.dirs.path().join("config/agentvm");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("config.toml"), "[flavors.claude]\ncommand = [\"sh\", \"-c\"]\n").unwrap();
    let shell = start_plan(&l, &["--warm"]);
    let mut claude_cmd =
        l.command_with(&["run", "--memory", "512M", "--cpus", "1", "--warm", "--print-plan", "--json", "claude"]);
    let claude: serde_json::Value = serde_json::from_str(&stdout(&l.run_command(&mut claude_cmd))).unwrap();
    let (shell_key, claude_key) =
        (shell["template_key"].as_str().unwrap(), claude["start"]["template_key"].as_str().unwrap());
    assert_ne!(shell_key, claude_key, "the layer must change the key");
    let cri = start_plan(&l, &["--warm", "--cri", "docker"]);
    assert_eq!(cri["mode"], "warm", "{cri}");
    assert_ne!(cri["template_key"], shell["template_key"], "the storage disk must change the key");
    let args = [
        "run",
        "--memory",
        "512M",
        "--cpus",
        "1",
        "--warm",
        "claude",
        "--",
        "command -v claude >/dev/null && echo layer",
    ];
    let out = l.agentvm(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains(FELL_BACK), "{}", stderr(&out));
    assert_eq!(stdout(&out), "layer\n");
    assert!(template_dir(claude_key).join("template.json").is_file());
    let listed = stdout(&l.agentvm(&["image", "ls"]));
    assert!(listed.contains(&format!("template-{}", &claude_key[..16])), "{listed}");
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_warm_vm_with_the_clipboard_channel_is_made_and_restored_and_its_tools_answer() {
    // A shape of its own (the clipboard's port), made on the first run.
    let l = Launch::new().shell("xclip -selection clipboard -t TARGETS -o; echo \"rc=$?\"");
    for _ in 0..2 {
        let mut cmd = l.command_with_flags(&["--warm", "--clipboard", "--network", "none"]);
        cmd.env_remove("DISPLAY").env_remove("WAYLAND_DISPLAY");
        let out = l.run_command(&mut cmd);
        let err = stderr(&out);
        assert!(!err.contains(FELL_BACK), "{err}");
        assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "rc=1\n"), "{err}");
        assert!(err.contains("xclip: no clipboard on the host"), "{err}");
    }
    l.assert_no_leftovers();
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn warm_runs_with_a_sandbox_and_container_storage_use_and_keep_their_own_disks() {
    // The template's guest bound empty stand-ins of these disks: each run
    // must mount its own, find what the last run left there, and export.
    let l = Launch::new();
    git(&l.work, &["init", "-q"]);
    std::fs::write(l.work.join("a.txt"), "a\n").unwrap();
    git(&l.work, &["add", "-A"]);
    git(&l.work, &["commit", "-qm", "first"]);
    let flags = ["--warm", "--memory", "2G", "--clone=w", "--cri", "docker", "shell", "--", "sh", "-c"];
    let first = "set -e; echo kept > /work/kept.txt; git -C /work add kept.txt; \
        git -C /work -c user.name=t -c user.email=t@t commit -qm kept; docker volume create warmvol >/dev/null";
    let second = "cat /work/kept.txt; git -C /work log -1 --format=%s; docker volume ls -q";
    let mut outputs = Vec::new();
    for script in [first, second] {
        let out = l.agentvm(&[&["run"], &flags[..], &[script]].concat());
        assert!(!stderr(&out).contains(FELL_BACK), "the warm start fell back: {}", stderr(&out));
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        outputs.push(stdout(&out));
    }
    assert_eq!(outputs[1], "kept\nkept\nwarmvol\n");
    assert_eq!(git(&l.work, &["log", "-1", "--format=%s", "agentvm/w"]), "kept\n");
    l.assert_no_leftovers();
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn image_build_warm_makes_the_template_that_a_plain_run_then_restores() {
    let l = Launch::new();
    // A plain run's shape of its own, from the user config both commands read.
    let config = l.dirs.path().join("config/agentvm");
    std::fs::create_dir_all(&config).unwrap();
    let settings = "flavor = \"shell\"\nmemory = \"576M\"\ncpus = 1\nnetwork = \"none\"\n";
    std::fs::write(config.join("config.toml"), settings).unwrap();
    let plan = |l: &Launch| {
        let out = l.run_command(&mut l.command_with(&["run", "--print-plan", "--json"]));
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["start"].clone()
    };
    let key = plan(&l)["template_key"].as_str().unwrap().to_string();
    let name = format!("template-{}", &key[..16]);
    // Left by an earlier run of this test on this machine.
    if template_dir(&key).exists() {
        assert!(l.agentvm(&["image", "rm", &name]).status.success());
    }
    let making = "making a warm-start template";
    let build = l.agentvm(&["image", "build", "--warm"]);
    assert_eq!(build.status.code(), Some(0), "{}", stderr(&build));
    assert!(stderr(&build).contains(making), "{}", stderr(&build));
    assert!(stdout(&build).contains(&format!("{name} (warm start of shell)")), "{}", stdout(&build));
    assert_eq!(plan(&l)["template_ready"], true);

    let out = l.run_command(&mut l.command_with(&["run", "--", "sh", "-c", "echo ran"]));
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "ran\n"), "{}", stderr(&out));
    assert!(!stderr(&out).contains(making) && !stderr(&out).contains(FELL_BACK), "{}", stderr(&out));
    let again = l.agentvm(&["image", "build", "--warm"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(!stderr(&again).contains(making), "made twice: {}", stderr(&again));
    assert!(l.agentvm(&["image", "rm", &name]).status.success());
    l.assert_no_leftovers();
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_warm_vms_trust_store_is_a_cold_vms_byte_for_byte() {
    // The template installs the host's public roots; each launch adds its extras.
    let l = Launch::new().shell(
        "cat /etc/ssl/certs/ca-certificates.crt | sha256sum; grep -c 'BEGIN CERT' /etc/ssl/certs/ca-certificates.crt",
    );
    let cold = run_with(&l, &["--cold"]);
    let warm = warm_run(&l, &[]);
    for (out, run) in [(&cold, "cold"), (&warm, "warm")] {
        assert_eq!(out.status.code(), Some(0), "{run}: {}", stderr(out));
    }
    assert_eq!(stdout(&warm), stdout(&cold), "{}", stderr(&warm));
    l.assert_no_leftovers();
}
