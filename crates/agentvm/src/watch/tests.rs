//! The watcher on real inotify in a temporary project, its frames read
//! from a socket pair as the guest would.

use std::fs;
use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use agentvm_proto::frame::read_one;
use agentvm_proto::watch::Change;
use agentvm_proto::Frame;

use super::*;

/// Serves `project` and returns the guest's end of the port.
fn serve(project: &Path, bound: usize) -> (UnixStream, Vec<String>) {
    let mut warnings = Vec::new();
    let watcher = Watcher::with_bound(project, bound, &mut |w| warnings.push(w)).unwrap();
    let (host, guest) = UnixStream::pair().unwrap();
    std::thread::spawn(move || watcher.run(host, WINDOW));
    guest.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    (guest, warnings)
}

/// Every change sent until none came for 200 ms.
fn received(guest: &mut UnixStream) -> Vec<Change> {
    let mut all = Vec::new();
    while let Ok(frame) = read_one(guest, agentvm_proto::frame::MAX_PAYLOAD) {
        match frame {
            Ok(Frame::Changes(changes)) => all.extend(changes),
            other => panic!("not a batch: {other:?}"),
        }
    }
    all
}

fn modify(p: &str) -> Change {
    Change::Modify { path: p.as_bytes().to_vec(), dir: false }
}

fn create(p: &str, dir: bool) -> Change {
    Change::Create { path: p.as_bytes().to_vec(), dir }
}

#[test]
fn edits_new_files_deletions_and_renames_are_sent_relative_to_the_project() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("src")).unwrap();
    fs::write(d.path().join("src/a.txt"), "a").unwrap();
    let (mut guest, warnings) = serve(d.path(), 100);
    assert!(warnings.is_empty(), "{warnings:?}");
    fs::write(d.path().join("src/a.txt"), "edited").unwrap();
    fs::write(d.path().join("new.txt"), "n").unwrap();
    fs::rename(d.path().join("new.txt"), d.path().join("src/moved.txt")).unwrap();
    fs::remove_file(d.path().join("src/a.txt")).unwrap();
    let got = received(&mut guest);
    let want = [
        modify("src/a.txt"),
        create("new.txt", false),
        modify("new.txt"),
        Change::Rename { from: b"new.txt".to_vec(), to: b"src/moved.txt".to_vec(), dir: false },
        Change::Delete { path: b"src/a.txt".to_vec(), dir: false },
    ];
    assert_eq!(got, want);
}

#[test]
fn a_new_directory_is_watched_and_what_was_made_in_it_first_is_told() {
    let d = tempfile::tempdir().unwrap();
    let (mut guest, _) = serve(d.path(), 100);
    fs::create_dir_all(d.path().join("x/y")).unwrap();
    fs::write(d.path().join("x/y/f"), "1").unwrap();
    std::thread::sleep(Duration::from_millis(150));
    fs::write(d.path().join("x/y/f"), "2").unwrap();
    let got = received(&mut guest);
    assert_eq!(got.first(), Some(&create("x", true)), "{got:?}");
    assert!(got.contains(&create("x/y", true)) && got.contains(&create("x/y/f", false)), "{got:?}");
    assert_eq!(got.last(), Some(&modify("x/y/f")), "the new directory's watch works: {got:?}");
}

#[test]
fn ignored_paths_and_dot_git_are_not_sent() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir_all(d.path().join("target/debug")).unwrap();
    fs::create_dir_all(d.path().join(".git")).unwrap();
    fs::write(d.path().join(".gitignore"), "target/\n*.log\n").unwrap();
    let (mut guest, _) = serve(d.path(), 100);
    fs::write(d.path().join("target/debug/out"), "x").unwrap();
    fs::write(d.path().join("build.log"), "x").unwrap();
    fs::write(d.path().join(".git/index"), "x").unwrap();
    fs::write(d.path().join("kept.txt"), "x").unwrap();
    assert_eq!(received(&mut guest), [create("kept.txt", false), modify("kept.txt")]);
}

#[test]
fn a_burst_of_writes_is_coalesced_into_a_few_modifies() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("hot"), "").unwrap();
    let (mut guest, _) = serve(d.path(), 100);
    let start = Instant::now();
    let mut file = fs::OpenOptions::new().append(true).open(d.path().join("hot")).unwrap();
    for i in 0..1000 {
        writeln!(file, "line {i}").unwrap();
    }
    let got = received(&mut guest);
    let windows = start.elapsed().as_millis() / WINDOW.as_millis() + 1;
    assert!(!got.is_empty() && got.iter().all(|c| *c == modify("hot")), "{got:?}");
    assert!(got.len() as u128 <= windows, "{} modifies for {windows} windows", got.len());
}

#[test]
fn the_bound_on_watched_directories_warns_once_and_watches_what_it_can() {
    let d = tempfile::tempdir().unwrap();
    for i in 0..5 {
        fs::create_dir(d.path().join(format!("d{i}"))).unwrap();
    }
    let mut warnings = Vec::new();
    let mut watcher = Watcher::with_bound(d.path(), 3, &mut |w| warnings.push(w)).unwrap();
    assert_eq!(watcher.tree.watched(), 3);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("over 3 directories") && warnings[0].contains(".gitignore"), "{warnings:?}");
    fs::create_dir(d.path().join("d9")).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut changes = Vec::new();
    watcher.tree.read(&mut |c| changes.push(c)).unwrap();
    assert_eq!(changes, [create("d9", true)], "still told, though not watched");
    assert_eq!(watcher.tree.take_full(), None, "told once");
}

#[test]
fn the_hosts_limit_warning_names_the_sysctl_and_the_fix() {
    let full = Full::HostLimit { watched: 8192, project: "/p".into() };
    let text = full.to_string();
    assert!(text.contains("fs.inotify.max_user_watches") && text.contains("sudo sysctl"), "{text}");
}

#[test]
fn a_project_that_cannot_be_watched_is_an_error_naming_it() {
    let err = Watcher::new(Path::new("/nonexistent/agentvm-project"), &mut |_| {}).err().unwrap();
    assert!(err.to_string().starts_with("watch: off: cannot watch /nonexistent/agentvm-project"), "{err}");
}

#[test]
fn the_watcher_stops_when_the_vm_is_gone() {
    let d = tempfile::tempdir().unwrap();
    let watcher = Watcher::with_bound(d.path(), 10, &mut |_| {}).unwrap();
    let (host, guest) = UnixStream::pair().unwrap();
    let ran = std::thread::spawn(move || watcher.run(host, WINDOW));
    drop(guest);
    assert!(ran.join().unwrap().is_ok());
}
