//! End-to-end tests of `watch`: the host edits the project while the real
//! `inotifywait -m -r /work` and a Node `fs.watch` run in the guest; each
//! event must show up in their logs within a second of the host's change.
//!
//! The watchers log into `out/`, which the project's .gitignore ignores:
//! the host does not send changes there, so a log line never echoes back
//! as an event of its own.

use agentvm_testkit::*;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the host waits for the guest to boot and start its watchers.
const BOOT: Duration = Duration::from_secs(240);
/// The issue's bound on a host change reaching a watcher in the guest.
const WITHIN: Duration = Duration::from_secs(1);

/// The guest's watchers, logging to out/, until the host creates out/done;
/// then what the guest's `stat` says of the renamed and deleted files.
const WATCHERS: &str = r#"
cd /work
stdbuf -oL inotifywait -m -r --exclude '^/work/out' -e modify,create,delete,moved_from,moved_to \
  --format '%e %w%f' /work > out/inotify.log 2> out/inotify.err &
node -e '
const fs = require("fs");
fs.watch("/work", (event, name) => fs.appendFileSync("/work/out/node.log", event + " " + name + "\n"));
fs.writeFileSync("/work/out/node.ready", "");
setInterval(() => {}, 1000);
' &
# Ready once both watchers are (node starts slowly on a loaded host).
until grep -q 'Watches established' out/inotify.err 2>/dev/null && [ -e out/node.ready ]; do sleep 0.1; done
touch out/ready
while [ ! -e out/done ]; do sleep 0.1; done
for f in gone.txt old.txt renamed.txt new.txt; do [ -e "$f" ] && echo "exists $f" || echo "absent $f"; done
cat a.txt
N=/dev/agentvm-notify
printf 'Mf../etc/hostname' | sudo tee $N >/dev/null 2>&1 && echo "module took ../" || echo "module refused ../"
printf 'Mflink/hostname' | sudo tee $N >/dev/null 2>&1 && echo "module took a symlink" || echo "module refused a symlink"
printf 'Rfa.txt' | sudo tee $N >/dev/null 2>&1 && echo "module took half a rename" || echo "module refused half a rename"
printf 'Mfa.txt' 2>/dev/null > $N && echo "a user wrote the device" || echo "a user cannot write the device"
"#;

/// Every regular file under `dir` but out/, with its content.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if rel == "out" {
                continue;
            }
            let kind = entry.file_type().unwrap();
            if kind.is_symlink() {
                files.insert(rel, fs::read_link(&path).unwrap().into_os_string().into_encoded_bytes());
            } else if kind.is_dir() {
                todo.push(path);
            } else {
                files.insert(rel, fs::read(&path).unwrap());
            }
        }
    }
    files
}

fn project() -> Launch {
    let l = Launch::new();
    for dir in ["out", "ignored", "sub"] {
        fs::create_dir(l.work.join(dir)).unwrap();
    }
    for (name, text) in [
        (".gitignore", "out/\nignored/\n"),
        ("a.txt", "before\n"),
        ("gone.txt", "x\n"),
        ("old.txt", "o\n"),
        ("sub/hot.txt", ""),
    ] {
        fs::write(l.work.join(name), text).unwrap();
    }
    std::os::unix::fs::symlink("/etc", l.work.join("link")).unwrap();
    l
}

fn log(l: &Launch, name: &str) -> String {
    fs::read_to_string(l.work.join("out").join(name)).unwrap_or_default()
}

/// How often each of `lines` is in `file`'s log.
fn counts(l: &Launch, file: &str, lines: &[&str]) -> Vec<usize> {
    let text = log(l, file);
    lines.iter().map(|want| text.lines().filter(|line| line == want).count()).collect()
}

/// Waits until each of `lines` is in `file`'s log once more than `before`
/// says; how long it took since `since`.
fn seen(l: &Launch, file: &str, lines: &[&str], before: &[usize], since: Instant) -> Duration {
    let found = process::poll(Duration::from_secs(5), Duration::from_millis(10), || {
        let now = counts(l, file, lines);
        now.iter().zip(before).all(|(n, b)| n > b).then(|| since.elapsed())
    });
    found.unwrap_or_else(|| panic!("{lines:?} not (again) in {file} within 5 s:\n{}", log(l, file)))
}

/// Does `change` on the host and checks that both watchers hear it in time.
fn expect(l: &Launch, what: &str, change: impl FnOnce(), inotify: &[&str], node: &[&str]) {
    let (before_inotify, before_node) = (counts(l, "inotify.log", inotify), counts(l, "node.log", node));
    let start = Instant::now();
    change();
    let a = seen(l, "inotify.log", inotify, &before_inotify, start);
    let b = seen(l, "node.log", node, &before_node, start);
    eprintln!("{what}: inotifywait after {a:?}, fs.watch after {b:?}");
    assert!(a <= WITHIN && b <= WITHIN, "{what}: inotifywait after {a:?}, fs.watch after {b:?}");
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn inotifywait_and_node_fs_watch_see_host_edits_new_files_deletions_and_renames_within_a_second() {
    let l = project().shell(WATCHERS);
    let w = l.work.clone();
    let mut want = tree(&w);
    let vm = l.spawn_until("out/ready", BOOT);

    let edit = || fs::write(w.join("a.txt"), "edited on the host\n").unwrap();
    expect(&l, "edit", edit, &["MODIFY /work/a.txt"], &["change a.txt"]);
    let create = || fs::write(w.join("new.txt"), "new\n").unwrap();
    expect(&l, "new file", create, &["CREATE /work/new.txt"], &["rename new.txt"]);
    let delete = || fs::remove_file(w.join("gone.txt")).unwrap();
    expect(&l, "deletion", delete, &["DELETE /work/gone.txt"], &["rename gone.txt"]);
    let rename = || fs::rename(w.join("old.txt"), w.join("renamed.txt")).unwrap();
    let moved = ["MOVED_FROM /work/old.txt", "MOVED_TO /work/renamed.txt"];
    expect(&l, "rename", rename, &moved, &["rename old.txt", "rename renamed.txt"]);
    fs::write(w.join("ignored/skip.txt"), "x").unwrap();

    // A burst of 1,000 writes: the guest keeps up, and hears a few modifies.
    let mut hot = fs::OpenOptions::new().append(true).open(w.join("sub/hot.txt")).unwrap();
    for i in 0..1000 {
        writeln!(hot, "line {i}").unwrap();
    }
    drop(hot);
    let after_burst = || fs::write(w.join("a.txt"), "edited again\n").unwrap();
    expect(&l, "edit after the burst", after_burst, &["MODIFY /work/a.txt"], &["change a.txt"]);
    std::thread::sleep(Duration::from_millis(500));
    fs::write(w.join("out/done"), "").unwrap();
    let out = vm.wait_exit(Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));

    let events = log(&l, "inotify.log");
    let hot_events = events.lines().filter(|e| e.ends_with("/work/sub/hot.txt")).count();
    eprintln!("1,000 writes: {hot_events} events");
    assert!((1..=40).contains(&hot_events), "{hot_events} events for 1,000 writes:\n{events}");
    assert!(!events.contains("ignored") && !log(&l, "node.log").contains("ignored"), "{events}");
    assert!(stderr(&out).lines().all(|line| !line.contains("watch")), "{}", stderr(&out));
    let said = stdout(&out);
    for line in ["absent gone.txt", "absent old.txt", "exists renamed.txt", "exists new.txt", "edited again"] {
        assert!(said.contains(line), "the guest's stat disagrees with the host: {line:?} missing in\n{said}");
    }
    for line in [
        "module refused ../",
        "module refused a symlink",
        "module refused half a rename",
        "a user cannot write the device",
    ] {
        assert!(said.contains(line), "{line:?} missing in\n{said}");
    }

    // The host's tree is what it was plus the test's own changes only.
    want.insert("a.txt".into(), b"edited again\n".to_vec());
    want.insert("new.txt".into(), b"new\n".to_vec());
    want.remove("gone.txt");
    let old = want.remove("old.txt").unwrap();
    want.insert("renamed.txt".into(), old);
    want.insert("ignored/skip.txt".into(), b"x".to_vec());
    want.insert("sub/hot.txt".into(), (0..1000).map(|i| format!("line {i}\n")).collect::<String>().into_bytes());
    assert_eq!(tree(&w), want);
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn watch_false_delivers_nothing_and_says_so_in_the_plan() {
    let l = project().env("AGENTVM_WATCH", "false").shell(WATCHERS);
    let plan = l.run_command(&mut l.command_with_flags(&["--print-plan"]));
    assert!(stdout(&plan).contains("watch         off: watch = false"), "{}", stdout(&plan));
    assert!(stdout(&plan).contains("watch -"), "no watch channel: {}", stdout(&plan));
    let w = l.work.clone();
    let vm = l.spawn_until("out/ready", BOOT);
    fs::write(w.join("a.txt"), "edited on the host\n").unwrap();
    fs::write(w.join("new.txt"), "new\n").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    fs::write(w.join("out/done"), "").unwrap();
    let out = vm.wait_exit(Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!((log(&l, "inotify.log"), log(&l, "node.log")), (String::new(), String::new()));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_warm_start_hears_host_edits_too() {
    let l = project().shell(WATCHERS);
    let w = l.work.clone();
    let mut vm = l.spawn_command(&mut l.command_with_flags(&["--warm"]));
    vm.wait_for_file(&w.join("out/ready"), BOOT);
    let edit = || fs::write(w.join("a.txt"), "edited on the host\n").unwrap();
    expect(&l, "edit in a restored VM", edit, &["MODIFY /work/a.txt"], &["change a.txt"]);
    fs::write(w.join("out/done"), "").unwrap();
    let out = vm.wait_exit(Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("starting cold"), "the start was warm: {}", stderr(&out));
}

/// A copy of the test cache's base image, its watch module replaced by
/// `module` (the store finds it by the same directory name).
fn cache_with_watch_module(module: &[u8]) -> tempfile::TempDir {
    let images = cache_dir().join("agentvm/images");
    let newest = fs::read_dir(&images)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("base-"))
        .filter_map(|e| {
            let meta: serde_json::Value = serde_json::from_slice(&fs::read(e.path().join("image.json")).ok()?).ok()?;
            meta["watch_module"].is_string().then(|| (meta["created"].as_u64().unwrap_or(0), e.path()))
        })
        .max()
        .expect("a base image with the watch module (the other tests build it)")
        .1;
    let copy = tempfile::tempdir().unwrap();
    let dst = copy.path().join("agentvm/images").join(newest.file_name().unwrap());
    fs::create_dir_all(&dst).unwrap();
    assert!(std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", newest.display()))
        .arg(&dst)
        .status()
        .unwrap()
        .success());
    fs::write(dst.join("modules/agentvm_notify.ko"), module).unwrap();
    copy
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_watch_module_that_does_not_load_leaves_watching_off_with_one_line_and_the_run_goes_on() {
    // Make sure the image exists before copying it.
    let first = Launch::new().cmd(&["true"]).run();
    assert!(first.status.success(), "{}", stderr(&first));
    let cache = cache_with_watch_module(b"not a kernel module");
    let l = Launch::new().env("XDG_CACHE_HOME", &cache.path().to_string_lossy()).shell("echo ran");
    let out = l.run();
    assert!(out.status.success() && stdout(&out).contains("ran"), "{}", stderr(&out));
    let said = stderr(&out);
    let lines: Vec<&str> = said.lines().filter(|line| line.contains("watch")).map(str::trim).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("agentvm-guest: watch: off: cannot load kernel module agentvm_notify.ko"),
        "{lines:?}"
    );
}
