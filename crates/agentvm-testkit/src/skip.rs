//! Visible skips: a test that cannot run here says so, and why, where the
//! reader of `scripts/test`'s output sees it, instead of passing silently.
//!
//! ```no_run
//! use agentvm_testkit::{require, skip};
//!
//! fn interactive_session_test() {
//!     let tmux = require!(skip::tool("tmux")); // returns here if tmux is missing
//!     println!("tmux is {}", tmux.display());
//! }
//! ```
//!
//! A skip is printed on the test's stderr and appended as one line
//! (`BINARY TEST: REASON`) to the file `$AGENTVM_TEST_SKIP_LOG`;
//! `scripts/test` sets it, lists the skips at its end, and fails if any
//! test skipped while it ran as root (a set-up host, as in CI).

use std::io::Write;
use std::path::PathBuf;

/// Why the running test cannot run here.
#[derive(Debug)]
pub struct Skip {
    reason: String,
    /// A prerequisite a set-up host has: under CI its absence fails the
    /// test instead.
    prerequisite: bool,
}

/// Gives the value of `Ok`, or records the skip of `Err` and returns from
/// the calling test.
#[macro_export]
macro_rules! require {
    ($check:expr) => {
        match $check {
            Ok(found) => found,
            Err(skip) => {
                $crate::Skip::record(skip);
                return;
            }
        }
    };
}

impl Skip {
    /// A prerequisite that `scripts/setup-host` or `scripts/test` provides
    /// is missing (say which, and what provides it).
    pub fn missing(reason: impl Into<String>) -> Skip {
        Skip { reason: reason.into(), prerequisite: true }
    }

    /// The test does not apply here (say why, and what covers it instead).
    pub fn not_applicable(reason: impl Into<String>) -> Skip {
        Skip { reason: reason.into(), prerequisite: false }
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Reports that the running test is skipped, and why. Under CI a
    /// missing prerequisite fails the test instead.
    pub fn record(self) {
        let line = format!("{} {}: {}", test_binary(), test_name(), self.reason);
        assert!(!(self.prerequisite && std::env::var_os("CI").is_some()), "CI must provide this: {line}");
        eprintln!("skipped: {line}");
        if let Some(log) = std::env::var_os("AGENTVM_TEST_SKIP_LOG") {
            // One write of one line: concurrent tests do not interleave.
            let mut file = std::fs::OpenOptions::new().append(true).create(true).open(log).unwrap();
            file.write_all(format!("{line}\n").as_bytes()).unwrap();
        }
    }
}

/// The running test's name: libtest runs each test on a thread named
/// after it.
fn test_name() -> String {
    std::thread::current().name().unwrap_or("(unnamed test)").to_string()
}

/// The running test binary's name, without cargo's hash (`e2e`, not
/// `e2e-0123abcd`).
fn test_binary() -> String {
    let exe = std::env::current_exe().unwrap();
    let name = exe.file_name().unwrap().to_string_lossy().into_owned();
    match name.rsplit_once('-') {
        Some((base, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => base.to_string(),
        _ => name,
    }
}

/// The program `name` on PATH.
pub fn tool(name: &str) -> Result<PathBuf, Skip> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Skip::missing(format!("{name} is not on PATH: scripts/setup-host installs it")))
}

/// The normal user the non-root tests switch to.
pub const TEST_USER: &str = "agentvm-test";

/// The ids of [`TEST_USER`].
pub struct TestUser {
    pub uid: u32,
    pub gid: u32,
}

/// The test user, when this test runs as root (only root can switch users).
pub fn test_user() -> Result<TestUser, Skip> {
    if crate::my_uid() != 0 {
        return Err(Skip::not_applicable(format!(
            "switching to the user {TEST_USER} needs root; as a normal user, every other test covers this"
        )));
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&TEST_USER)).then(|| TestUser { uid: f[2].parse().unwrap(), gid: f[3].parse().unwrap() })
        })
        .ok_or_else(|| Skip::missing(format!("no user {TEST_USER}: scripts/test creates it")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_knows_its_own_name_and_binary() {
        assert_eq!(test_name(), "skip::tests::a_test_knows_its_own_name_and_binary");
        assert_eq!(test_binary(), "agentvm_testkit");
    }

    #[test]
    fn tools_are_found_on_path_and_a_missing_one_says_what_installs_it() {
        assert!(tool("sh").is_ok());
        let skip = tool("no-such-tool-agentvm").unwrap_err();
        assert_eq!(skip.reason(), "no-such-tool-agentvm is not on PATH: scripts/setup-host installs it");
    }
}
