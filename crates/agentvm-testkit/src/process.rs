//! Running commands with their output shown, the host's process table,
//! and waiting for a condition.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `cmd` with `input` on its stdin (then closed), and returns its
/// output after printing it: the harness shows it when the test fails.
pub fn run(cmd: &mut Command, input: &[u8]) -> Output {
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the command starts");
    let mut stdin = child.stdin.take().unwrap();
    // A program that exits without reading its input closes the pipe early.
    let _ = stdin.write_all(input);
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    show(&format!("{:?}", cmd.get_args().collect::<Vec<_>>()), &out);
    out
}

/// Prints `what`'s status and output.
pub fn show(what: &str, out: &Output) {
    eprintln!("--- {what} -> {:?}\n--- stdout:\n{}\n--- stderr:\n{}", out.status, stdout(out), stderr(out));
}

/// `git ARGS` in `dir` as a user runs it: an identity for commits, `main`
/// for new repositories, local clones allowed, no global config, any
/// owner's repository, and never the index rewritten behind the test's back
/// (`GIT_OPTIONAL_LOCKS=0`). Its output; panics when git fails.
pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=agentvm test", "-c", "user.email=test@agentvm.invalid"])
        .args(["-c", "init.defaultBranch=main", "-c", "protocol.file.allow=always", "-c", "safe.directory=*"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_OPTIONAL_LOCKS", "0")
        .output()
        .expect("git is installed");
    assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
    stdout(&out)
}

pub fn my_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Sends `signal` to the process `pid`.
pub fn kill(pid: u32, signal: i32) {
    // SAFETY: kill has no memory effects; at worst it fails with ESRCH.
    unsafe { libc::kill(pid as i32, signal) };
}

/// Every process on the host, with its command line (arguments joined by
/// spaces).
pub fn command_lines() -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            found.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    found
}

/// The command lines that contain `needle`.
pub fn command_lines_containing(needle: &str) -> Vec<String> {
    command_lines().into_iter().filter(|(_, cmd)| cmd.contains(needle)).map(|(_, cmd)| cmd).collect()
}

/// The pids of processes whose command line contains all of `words`.
pub fn pids_with(words: &[&str]) -> Vec<u32> {
    command_lines().into_iter().filter(|(_, cmd)| words.iter().all(|w| cmd.contains(w))).map(|(pid, _)| pid).collect()
}

/// Calls `probe` every `every` until it returns something, at most `limit`
/// long; `None` if it never did.
pub fn poll<T>(limit: Duration, every: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_feeds_stdin_and_keeps_stdout_and_stderr_apart() {
        let out = run(Command::new("sh").args(["-c", "tr a-z A-Z; echo err >&2"]), b"data\n");
        assert_eq!((stdout(&out).as_str(), stderr(&out).as_str()), ("DATA\n", "err\n"));
    }

    #[test]
    fn the_process_table_holds_this_test() {
        let me = std::process::id();
        assert!(command_lines().iter().any(|(pid, _)| *pid == me));
    }

    #[test]
    fn poll_returns_what_the_probe_found_or_none_after_the_limit() {
        let mut calls = 0;
        let found = poll(Duration::from_secs(5), Duration::from_millis(1), || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(found, Some(3));
        assert_eq!(poll(Duration::from_millis(20), Duration::from_millis(5), || None::<()>), None);
    }
}
