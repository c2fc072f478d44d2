//! End-to-end tests of sandboxed clones (`agentvm run --clone NAME`): real
//! VMs and real git. The project is a git repository with every kind of
//! uncommitted change; the sandbox must start from exactly what its user
//! sees, its work must come back as `agentvm/NAME`, and nothing else of the
//! project may change, whatever the guest writes.

use agentvm_testkit::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// How long a VM may take to boot under TCG on a loaded machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn write(dir: &Path, name: &str, text: &str) {
    if let Some(parent) = Path::new(name).parent() {
        std::fs::create_dir_all(dir.join(parent)).unwrap();
    }
    std::fs::write(dir.join(name), text).unwrap();
}

/// A launch whose project is a repository with a commit and, uncommitted:
/// a staged change, a staged and then changed file, an unstaged change, a
/// deletion, an executable, untracked files (one in a new dir) and ignored
/// build output.
fn project() -> Launch {
    let l = Launch::new();
    let p = &l.work;
    git(p, &["init", "-q"]);
    write(p, ".gitignore", "build/\n*.log\n");
    for (name, text) in [("a.txt", "a1\n"), ("b.txt", "b1\n"), ("c.txt", "c1\n"), ("gone.txt", "x\n")] {
        write(p, name, text);
    }
    write(p, "run.sh", "#!/bin/sh\necho run\n");
    git(p, &["add", "-A"]);
    git(p, &["commit", "-qm", "first"]);
    write(p, "a.txt", "a2 staged\n");
    write(p, "b.txt", "b2 staged\n");
    git(p, &["add", "a.txt", "b.txt"]);
    write(p, "b.txt", "b3 then changed\n");
    write(p, "c.txt", "c2 unstaged\n");
    std::fs::remove_file(p.join("gone.txt")).unwrap();
    std::fs::set_permissions(p.join("run.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    write(p, "new.txt", "untracked\n");
    write(p, "docs/notes.md", "untracked in a new dir\n");
    write(p, "build/out.o", "ignored\n");
    write(p, "debug.log", "ignored\n");
    l
}

/// `agentvm run --clone=NAME [flags] shell -- sh -c SCRIPT` in `l`'s
/// project (`--clone` alone when NAME is empty).
fn in_sandbox(l: &Launch, name: &str, flags: &[&str], script: &str) -> Output {
    l.agentvm(&sandbox_args(l, name, flags, script))
}

fn sandbox_args(l: &Launch, name: &str, flags: &[&str], script: &str) -> Vec<String> {
    let home = l.dirs.path().join("home").display().to_string();
    let mut args: Vec<String> = ["run", "--memory", "512M", "--cpus", "1", "--home", &home].map(String::from).into();
    args.push(if name.is_empty() { "--clone".into() } else { format!("--clone={name}") });
    args.extend(flags.iter().map(|f| f.to_string()));
    args.extend(["shell", "--", "sh", "-c", script].map(String::from));
    args
}

/// Where the guest's /home/agent is on the host (markers for the test).
fn home(l: &Launch) -> PathBuf {
    l.dirs.path().join("home")
}

/// Everything of the project a sandbox must not change besides its
/// branch: the other refs, the index, the status, every file's bytes.
fn untouched_state(p: &Path) -> (String, Vec<u8>, String, String) {
    let refs = git(p, &["for-each-ref", "--format=%(refname) %(objectname)"]);
    let refs = refs.lines().filter(|l| !l.starts_with("refs/heads/agentvm/")).collect::<Vec<_>>().join("\n");
    let files = Command::new("sh")
        .args(["-c", "find . -path ./.git -prune -o -type f -print0 | sort -z | xargs -0 sha256sum; ls -lR"])
        .current_dir(p)
        .output()
        .unwrap();
    let index = std::fs::read(p.join(".git/index")).unwrap();
    (refs, index, git(p, &["status", "--porcelain"]), String::from_utf8(files.stdout).unwrap())
}

fn assert_ok(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", stdout(out), stderr(out));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn the_first_run_starts_from_exactly_what_the_user_sees_without_ignored_files() {
    let l = project();
    let p = l.work.clone();
    // What the guest sees: status, index, the work tree's bytes and modes.
    let script = "cd /work; git status --porcelain; echo ---; git ls-files --stage; echo ---; \
        find . -path ./.git -prune -o -type f -print | sort | xargs sha256sum; echo ---; \
        test -x run.sh && echo executable; ls build debug.log 2>&1 | sed 's/^ls: //'; echo ---; \
        git symbolic-ref --short HEAD; git remote; git log --format=%s host/main";
    let out = in_sandbox(&l, "t1", &[], script);
    assert_ok(&out);
    let text = stdout(&out);
    let parts: Vec<&str> = text.split("---\n").collect();
    assert_eq!(parts[0], git(&p, &["status", "--porcelain"]), "status");
    assert_eq!(parts[1], git(&p, &["ls-files", "--stage"]), "index");
    let host_files = Command::new("sh")
        .args([
            "-c",
            "git ls-files -co --exclude-standard | grep -v '^gone.txt$' | sed 's|^|./|' | sort | xargs sha256sum",
        ])
        .current_dir(&p)
        .output()
        .unwrap();
    assert_eq!(parts[2], String::from_utf8(host_files.stdout).unwrap(), "files");
    assert!(parts[3].starts_with("executable\n"), "{}", parts[3]);
    assert!(parts[3].contains("cannot access 'build'") && parts[3].contains("cannot access 'debug.log'"), "{text}");
    assert_eq!(parts[4], "main\nhost\nfirst\n");
    assert!(stderr(&out).contains("sandbox t1: branch agentvm/t1 made at"), "{}", stderr(&out));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn the_agents_commit_and_uncommitted_work_come_back_as_its_branch_the_project_untouched_and_it_resumes() {
    let l = project();
    let p = l.work.clone();
    let before = untouched_state(&p);
    let script = "set -e; cd /work; export GIT_AUTHOR_NAME=agent GIT_AUTHOR_EMAIL=agent@example.com; \
        export GIT_COMMITTER_NAME=agent GIT_COMMITTER_EMAIL=agent@example.com; \
        git add -A; git commit -qm 'agent: take the host state'; \
        echo feature > feature.txt; git add feature.txt; git commit -qm 'agent: feature'; \
        git switch -qc agent-side; git switch -q main; \
        echo draft > draft.txt; echo edited >> a.txt";
    let out = in_sandbox(&l, "t1", &[], script);
    assert_ok(&out);
    assert_eq!(untouched_state(&p), before, "the project changed");

    let log = git(&p, &["log", "--format=%s", "main..agentvm/t1"]);
    assert_eq!(log, "agentvm: uncommitted work in sandbox t1\nagent: feature\nagent: take the host state\n");
    assert_eq!(git(&p, &["show", "agentvm/t1:draft.txt"]), "draft\n");
    assert_eq!(git(&p, &["show", "agentvm/t1:a.txt"]), "a2 staged\nedited\n");
    assert_eq!(git(&p, &["show", "agentvm/t1~1:feature.txt"]), "feature\n");
    assert!(git(&p, &["ls-tree", "-r", "--name-only", "agentvm/t1"]).lines().all(|f| f != "debug.log"));
    let err = stderr(&out);
    assert!(err.contains("2 commits ahead of main, its uncommitted work as the last commit"), "{err}");

    // The user commits meanwhile (on a branch of its own: the work tree
    // stays as it is).
    let tree = git(&p, &["rev-parse", "HEAD^{tree}"]);
    let later = git(&p, &["commit-tree", tree.trim(), "-p", "HEAD", "-m", "user: later"]);
    git(&p, &["update-ref", "refs/heads/later", later.trim()]);
    let before = untouched_state(&p);

    // The next run finds everything as it was left: files, index, branches;
    // and `git fetch host` brings the user's later commit.
    let script = "cd /work; git status --porcelain; git branch --format='%(refname:short)'; \
        git fetch -q host && git log --format=%s -1 host/later";
    let out = in_sandbox(&l, "t1", &[], script);
    assert_ok(&out);
    assert_eq!(stdout(&out), " M a.txt\n?? draft.txt\nagent-side\nmain\nuser: later\n");
    assert_eq!(untouched_state(&p), before, "the project changed");
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn two_sandboxes_of_a_project_run_at_once_and_one_sandbox_runs_once() {
    let l = project();
    let marker = home(&l).join("a-started");
    let mut a = l.spawn_with(
        &sandbox_args(&l, "a", &[], "touch /home/agent/a-started; sleep 300")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    a.wait_for_file(&marker, BOOT_TIMEOUT);
    let listed = l.ps();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["sandbox"], "a");
    let out = l.agentvm(&["sandbox", "ls", "--json"]);
    assert_ok(&out);
    let sandboxes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let running = sandboxes.iter().map(|s| (s["name"].as_str().unwrap(), s["running"].as_bool())).collect::<Vec<_>>();
    assert_eq!(running, [("a", Some(true))]);

    let out = in_sandbox(&l, "b", &[], "echo b > /work/b.txt");
    assert_ok(&out);
    assert_eq!(git(&l.work, &["show", "agentvm/b:b.txt"]), "b\n");

    let started = Instant::now();
    let out = in_sandbox(&l, "a", &[], "echo never");
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("sandbox a is in use by another run"), "{}", stderr(&out));
    assert!(!stdout(&out).contains("never"));
    eprintln!("the second run of a was refused after {:?}", started.elapsed());
    assert_eq!(l.ps().len(), 1, "the refused run started a VM");

    a.signal(libc::SIGTERM);
    let out = a.wait_exit(Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{}", stderr(&out));
    assert!(stderr(&out).contains("sandbox a: branch agentvm/a made at"), "{}", stderr(&out));
    l.assert_no_leftovers();
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_tampered_bundle_is_refused_and_the_project_is_untouched() {
    let l = project();
    let p = l.work.clone();
    let before = untouched_state(&p);
    // A hostile guest replaces the tool that writes its result: first with
    // garbage, then with a valid bundle that also tries to move main.
    let garbage = "printf 'garbage' > /agentvm/export/result.bundle";
    let forged = "cd /work && git -c user.name=a -c user.email=a@a commit -qam forged && \
        git update-ref refs/agentvm/export HEAD && \
        git bundle create -q /agentvm/export/result.bundle refs/agentvm/export refs/heads/main";
    let script = "printf '#!/bin/sh\\n%s\\n' \"$TOOL\" | sudo tee /usr/local/libexec/agentvm-sandbox > /dev/null";
    for (tool, refusal) in [(garbage, "it does not verify"), (forged, "must carry refs/agentvm/export alone")] {
        let mut cmd = l.command_with(&sandbox_args(&l, "evil", &["-e", &format!("TOOL={tool}")], script));
        let out = l.run_command(&mut cmd);
        assert_eq!(out.status.code(), Some(125), "a refused result fails the run: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("the bundle of sandbox evil was refused") && err.contains(refusal), "{err}");
        assert!(err.contains("is untouched"), "{err}");
        assert_eq!(untouched_state(&p), before, "the project changed");
        assert!(git(&p, &["branch", "--list", "agentvm/*"]).is_empty());
    }
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn sandbox_ls_lists_and_rm_removes_the_sandbox_but_not_its_branch() {
    let l = project();
    let script = "cd /work && git add -A && git -c user.name=a -c user.email=a@a commit -qm one && echo x > x.txt";
    assert_ok(&in_sandbox(&l, "t1", &[], script));
    let out = l.agentvm(&["sandbox", "ls", "--json"]);
    assert_ok(&out);
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let s = &listed[0];
    assert_eq!(
        (s["name"].as_str(), s["branch"].as_str(), s["base"].as_str()),
        (Some("t1"), Some("main"), Some("main"))
    );
    assert_eq!((s["ahead"].as_u64(), s["dirty"].as_bool(), s["running"].as_bool()), (Some(1), Some(true), Some(false)));
    assert_eq!(Path::new(s["project"].as_str().unwrap()), l.work.canonicalize().unwrap());
    assert!(s["disk_bytes"].as_u64().unwrap() > 0 && s["last_run"].as_u64().is_some());
    assert_eq!(s["exported"].as_str().unwrap(), git(&l.work, &["rev-parse", "agentvm/t1"]).trim());
    let table = stdout(&l.agentvm(&["sandbox", "ls"]));
    assert!(
        table.starts_with("NAME") && table.lines().nth(1).unwrap().starts_with("t1    main    1 (main)  yes"),
        "{table}"
    );

    let out = l.agentvm(&["sandbox", "rm", "t1"]);
    assert_ok(&out);
    assert!(stdout(&out).starts_with("removed "), "{}", stdout(&out));
    assert_eq!(stdout(&l.agentvm(&["sandbox", "ls", "--json"])).trim(), "[]");
    assert!(!git(&l.work, &["branch", "--list", "agentvm/t1"]).is_empty(), "the branch went too");
    let out = l.agentvm(&["sandbox", "rm", "t1"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("no sandbox t1 for"), "{}", stderr(&out));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn after_a_kill_9_of_agentvm_the_sandbox_resumes_and_export_recovers_its_work() {
    let l = project();
    let marker = home(&l).join("written");
    let script = "echo unsaved > /work/unsaved.txt; sync; touch /home/agent/written; sleep 300";
    let mut run = l.spawn_with(&sandbox_args(&l, "t1", &[], script).iter().map(String::as_str).collect::<Vec<_>>());
    run.wait_for_file(&marker, BOOT_TIMEOUT);

    // While it runs: export through the running VM.
    let out = l.agentvm(&["sandbox", "export", "t1"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("sandbox t1: branch agentvm/t1 made at"), "{}", stdout(&out));
    assert_eq!(git(&l.work, &["show", "agentvm/t1:unsaved.txt"]), "unsaved\n");

    run.signal(libc::SIGKILL);
    run.wait_exit(Duration::from_secs(30));
    l.assert_no_leftovers();
    git(&l.work, &["branch", "-D", "agentvm/t1"]);

    // Stopped: export boots it, and the work is there.
    let out = l.agentvm(&["sandbox", "export", "t1"]);
    assert_ok(&out);
    assert_eq!(git(&l.work, &["show", "agentvm/t1:unsaved.txt"]), "unsaved\n");
    let out = in_sandbox(&l, "t1", &[], "cat /work/unsaved.txt");
    assert_ok(&out);
    assert_eq!(stdout(&out), "unsaved\n");
}

/// What the guest said about the export at the end of a `--verbose` run.
fn export_step(out: &Output) -> &'static str {
    let err = stderr(out);
    match (err.contains("sandbox: not written since its last export"), err.contains("sandbox: export")) {
        (true, false) => "skipped",
        (false, true) => "exported",
        _ => panic!("no word on the export, or both: {err}"),
    }
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_run_that_writes_nothing_skips_the_export_but_a_write_a_lost_branch_or_a_killed_run_exports() {
    let l = project();
    let p = l.work.clone();
    let run = |script: &str| {
        let out = in_sandbox(&l, "t1", &["--verbose"], script);
        assert_ok(&out);
        export_step(&out)
    };
    assert_eq!(run("echo one > /work/one.txt"), "exported");
    let first = git(&p, &["rev-parse", "agentvm/t1"]);
    let tree = git(&p, &["rev-parse", "agentvm/t1^{tree}"]);
    // Reading (noatime) writes nothing: the host holds the result already.
    assert_eq!(run("cat /work/one.txt > /dev/null && cd /work && git log -1 > /dev/null"), "skipped");
    assert_eq!(git(&p, &["rev-parse", "agentvm/t1"]), first);

    // The user deletes the branch: the next run brings the work back (its
    // commit of uncommitted work made anew).
    git(&p, &["branch", "-D", "agentvm/t1"]);
    assert_eq!(run("true"), "exported");
    assert_eq!(git(&p, &["rev-parse", "agentvm/t1^{tree}"]), tree);
    assert_eq!(run("true"), "skipped");

    // A run killed after writing: the next run exports its work.
    let marker = home(&l).join("written");
    let script = "echo two > /work/two.txt; sync; touch /home/agent/written; sleep 300";
    let mut killed = l.spawn_with(&sandbox_args(&l, "t1", &[], script).iter().map(String::as_str).collect::<Vec<_>>());
    killed.wait_for_file(&marker, BOOT_TIMEOUT);
    killed.signal(libc::SIGKILL);
    killed.wait_exit(Duration::from_secs(30));
    l.assert_no_leftovers();
    assert_eq!(run("true"), "exported");
    assert_eq!(git(&p, &["show", "agentvm/t1:two.txt"]), "two\n");

    // A write, however small, is seen.
    assert_eq!(run("touch -d 2001-01-01 /work/one.txt"), "exported");
    assert_eq!(run("true"), "skipped");
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_full_disk_gives_the_guest_enospc_says_how_to_grow_it_and_a_larger_size_grows_it() {
    let l = project();
    let fill = "dd if=/dev/urandom of=/work/big bs=1M 2>&1 | grep -o 'No space left on device'; df -m /work | tail -1";
    let out = in_sandbox(&l, "full", &["--clone-disk-size=96M"], fill);
    assert_eq!(out.status.code(), Some(125), "the work did not come back: {}", stderr(&out));
    assert!(stdout(&out).starts_with("No space left on device\n"), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("the sandbox's disk is full") && err.contains("--clone=full --clone-disk-size="), "{err}");
    assert!(err.contains("sandbox full wrote no result"), "{err}");
    assert!(git(&l.work, &["branch", "--list", "agentvm/*"]).is_empty());

    let out = in_sandbox(&l, "full", &["--clone-disk-size=512M"], "rm /work/big; df -m --output=size /work | tail -1");
    assert_ok(&out);
    let size: u64 = stdout(&out).trim().parse().unwrap();
    assert!(size > 400, "the file system did not grow: {size} MiB");
    assert!(!git(&l.work, &["branch", "--list", "agentvm/full"]).is_empty());
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_sandbox_works_with_the_proxy_and_a_published_port() {
    let l = project();
    let port = servers::free_port();
    let publish = format!("{port}:8000");
    let script = "cd /work && echo SANDBOX-PORT-TOKEN > served.txt && touch /home/agent/serving && \
        exec python3 -m http.server 8000";
    let args = sandbox_args(&l, "web", &["--network", "allow", "-p", &publish], script);
    let mut run = l.spawn_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    run.wait_for_file(&home(&l).join("serving"), BOOT_TIMEOUT);
    http_get_until(port, "/served.txt", "SANDBOX-PORT-TOKEN", Duration::from_secs(60));
    run.signal(libc::SIGTERM);
    let out = run.wait_exit(Duration::from_secs(60));
    assert!(stderr(&out).contains("sandbox web: branch agentvm/web made at"), "{}", stderr(&out));
    assert_eq!(git(&l.work, &["show", "agentvm/web:served.txt"]), "SANDBOX-PORT-TOKEN\n");
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_normal_user_gets_a_sandbox_and_its_branch_without_root() {
    let TestUser { uid, gid } = require!(skip::test_user());
    let l = project().run_as(uid, gid);
    std::fs::create_dir(home(&l)).unwrap();
    for dir in [&l.work, &home(&l)] {
        let status = Command::new("chown").args(["-R", &format!("{uid}:{gid}")]).arg(dir).status().unwrap();
        assert!(status.success());
    }
    let out = in_sandbox(&l, "mine", &[], "cd /work && git status --porcelain | wc -l && echo new > made.txt");
    assert_ok(&out);
    assert_eq!(stdout(&out), "7\n");
    assert_eq!(git(&l.work, &["show", "agentvm/mine:made.txt"]), "new\n");
    let disk = std::fs::read_dir(l.data.join("agentvm/sandboxes")).unwrap().next().unwrap().unwrap().path();
    let meta = std::fs::metadata(disk.join("mine/disk.ext4")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), uid);

    // A run that writes nothing hands back the last status instead of
    // exporting, through the user's own virtiofsd.
    let out = in_sandbox(&l, "mine", &["--verbose"], "true");
    assert_ok(&out);
    assert_eq!(export_step(&out), "skipped");
    assert!(stderr(&out).contains("branch agentvm/mine unchanged"), "{}", stderr(&out));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_sandbox_without_a_name_gets_a_new_one_and_the_projects_dev_shell() {
    require!(skip::tool("direnv"));
    let l = project();
    write(&l.work, ".envrc", "export DEVSHELL_GREETING='hello from direnv'\n");
    let allowed = Command::new("direnv")
        .args(["allow", "."])
        .current_dir(&l.work)
        .env("XDG_DATA_HOME", &l.data)
        .env("XDG_CONFIG_HOME", l.dirs.path().join("config"))
        .status()
        .unwrap();
    assert!(allowed.success());
    let out = in_sandbox(&l, "", &["--devshell"], "echo \"greeting=$DEVSHELL_GREETING\" | tee /work/greeting.txt");
    assert_ok(&out);
    assert_eq!(stdout(&out), "greeting=hello from direnv\n");
    let err = stderr(&out);
    let name = err
        .lines()
        .find_map(|l| l.strip_prefix("agentvm: sandbox ")?.strip_suffix(")")?.split_once(" (its work comes back as "))
        .map(|(name, _)| name.to_string());
    let name = name.unwrap_or_else(|| panic!("no new sandbox's name in\n{err}"));
    assert!(err.contains(&format!("sandbox {name}: branch agentvm/{name} made at")), "{err}");
    assert_eq!(git(&l.work, &["show", &format!("agentvm/{name}:greeting.txt")]), "greeting=hello from direnv\n");
}

#[test]
fn a_project_a_sandbox_cannot_be_made_of_is_refused_before_boot_with_what_to_do() {
    let l = Launch::new();
    let refused = |l: &Launch, name: &str| {
        let started = Instant::now();
        let out = in_sandbox(l, name, &[], "true");
        assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
        assert!(started.elapsed() < Duration::from_secs(10), "it booted");
        stderr(&out)
    };
    let e = refused(&l, "t1");
    assert!(e.contains("--clone needs a git work tree") && e.contains("run without --clone"), "{e}");
    git(&l.work, &["init", "-q"]);
    let e = refused(&l, "t1");
    assert!(e.contains("has none yet: commit first"), "{e}");
    let e = refused(&l, "bad name");
    assert!(e.contains("sandbox name \"bad name\" is not allowed"), "{e}");
    write(&l.work, "a.txt", "a");
    git(&l.work, &["add", "a.txt"]);
    git(&l.work, &["commit", "-qm", "one"]);
    write(&l.work, ".gitmodules", "");
    let e = refused(&l, "t1");
    assert!(e.contains("uses git submodules") && e.contains("run without --clone"), "{e}");
}
