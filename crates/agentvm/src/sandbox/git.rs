//! The git the host runs for sandboxes, in the user's repository and in
//! private scratch repositories.
//!
//! The user's repository may have been shared read-write with a guest
//! before (a plain `agentvm run`), so its `.git/config`, `.git/hooks` and
//! `.gitattributes` are the guest's word. Every git here runs with
//! [`NEUTRAL_CONFIG`] on its command line, which wins over any file: no
//! hook (`core.hooksPath=/dev/null`), no fsmonitor, no automatic gc or
//! maintenance, no submodule recursion, every object received checked
//! (fsck), and no alternates command; and with `GIT_ALLOW_PROTOCOL=file`,
//! which overrides the config's `protocol.*.allow`, so a URL rewrite
//! (`url.*.insteadOf`) cannot reach a transport that runs commands
//! (`ext::`). It runs nothing that checks out, diffs or refreshes the
//! index, so no filter and no textconv runs; and it is given a repository
//! (`--git-dir`), never left to find one. The git environment of the host
//! is not passed on (a `GIT_DIR` there would redirect it).

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Configuration given on every command line, where it beats the
/// repository's own.
pub const NEUTRAL_CONFIG: &[(&str, &str)] = &[
    ("core.hooksPath", "/dev/null"),
    ("core.fsmonitor", "false"),
    // Run (instead of `for-each-ref`) for the refs of an alternate object
    // store, which a guest can add to `objects/info/alternates`.
    ("core.alternateRefsCommand", "true"),
    ("gc.auto", "0"),
    ("maintenance.auto", "false"),
    // fetch.fsckObjects wins over transfer.fsckObjects: set both.
    ("transfer.fsckObjects", "true"),
    ("fetch.fsckObjects", "true"),
    ("fetch.recurseSubmodules", "false"),
    ("submodule.recurse", "false"),
    ("fetch.writeCommitGraph", "false"),
    ("protocol.allow", "never"),
    ("protocol.file.allow", "always"),
];

/// The most of a command's output that is read.
const OUTPUT_LIMIT: u64 = 1 << 20;

/// A git command that failed.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot run git ({0}): install git")]
    Spawn(#[source] std::io::Error),
    #[error("git {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
}

/// git, neutralised, in one repository.
#[derive(Debug, Clone)]
pub struct HostGit {
    git_dir: PathBuf,
}

impl HostGit {
    /// git in the repository whose git dir is `git_dir` (e.g. `PROJECT/.git`).
    pub fn new(git_dir: &Path) -> HostGit {
        HostGit { git_dir: git_dir.to_path_buf() }
    }

    /// `git --git-dir=DIR -c ... ARGS`, with a clean environment and no input.
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut c = Command::new("git");
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("GIT_") {
                c.env_remove(name);
            }
        }
        let mut dir = std::ffi::OsString::from("--git-dir=");
        dir.push(&self.git_dir);
        c.arg(dir);
        for (key, value) in NEUTRAL_CONFIG {
            c.arg("-c").arg(format!("{key}={value}"));
        }
        c.args(args).env("GIT_ALLOW_PROTOCOL", "file").env("GIT_TERMINAL_PROMPT", "0").env("LC_ALL", "C");
        c.stdin(Stdio::null());
        c
    }

    /// Runs `args`; its output (the first MiB), trimmed.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String, GitError> {
        match self.output(args)? {
            (true, out, _) => Ok(out),
            (false, _, stderr) => Err(failed(args, stderr)),
        }
    }

    /// Runs `args`, for which exit status 1 means "no" (e.g. `symbolic-ref
    /// -q`, `rev-parse -q --verify`): its output, or `None`.
    pub fn query<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Option<String>, GitError> {
        let mut cmd = self.command(args);
        let out = cmd.output().map_err(GitError::Spawn)?;
        match out.status.code() {
            Some(0) => Ok(Some(String::from_utf8_lossy(&out.stdout).trim().to_string())),
            Some(1) => Ok(None),
            _ => Err(failed(args, String::from_utf8_lossy(&out.stderr).into_owned())),
        }
    }

    /// Runs `args`: whether it succeeded, its output and its error output
    /// (the first MiB of each, trimmed).
    pub fn output<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<(bool, String, String), GitError> {
        let mut child =
            self.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(GitError::Spawn)?;
        let (stdout, stderr) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
        let err_reader = std::thread::spawn(move || bounded(stderr));
        let out = bounded(stdout);
        let err = err_reader.join().unwrap_or_default();
        let status = child.wait().map_err(GitError::Spawn)?;
        Ok((status.success(), out.trim().to_string(), err.trim().to_string()))
    }
}

/// What `r` gives, up to [`OUTPUT_LIMIT`]; the rest is read and dropped.
fn bounded(r: impl Read) -> String {
    let mut r = r;
    let mut buf = Vec::new();
    let _ = (&mut r).take(OUTPUT_LIMIT).read_to_end(&mut buf);
    let _ = std::io::copy(&mut r, &mut std::io::sink());
    String::from_utf8_lossy(&buf).into_owned()
}

fn failed<S: AsRef<OsStr>>(args: &[S], stderr: String) -> GitError {
    let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    // The last lines say why; the guest may have had a hand in them.
    let lines: Vec<&str> = stderr.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join("\n");
    let stderr = crate::escape::printable_text(&tail);
    GitError::Failed { args: args.join(" "), stderr }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(c: &Command) -> Vec<String> {
        c.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn every_command_names_its_repository_and_neutralises_hooks_filters_gc_and_transports() {
        let git = HostGit::new(Path::new("/p/.git"));
        let c = git.command(&["fetch", "x"]);
        let a = words(&c);
        assert_eq!(a[0], "--git-dir=/p/.git");
        assert_eq!(&a[a.len() - 2..], ["fetch", "x"]);
        let configs: Vec<&str> = a.windows(2).filter(|w| w[0] == "-c").map(|w| w[1].as_str()).collect();
        for wanted in [
            "core.hooksPath=/dev/null",
            "core.fsmonitor=false",
            "gc.auto=0",
            "maintenance.auto=false",
            "transfer.fsckObjects=true",
            "fetch.fsckObjects=true",
            "fetch.recurseSubmodules=false",
            "protocol.allow=never",
        ] {
            assert!(configs.contains(&wanted), "{wanted} missing in {a:?}");
        }
        let env: Vec<(String, Option<String>)> = c
            .get_envs()
            .map(|(k, v)| (k.to_string_lossy().into_owned(), v.map(|v| v.to_string_lossy().into_owned())))
            .collect();
        assert!(env.contains(&("GIT_ALLOW_PROTOCOL".into(), Some("file".into()))), "{env:?}");
        assert_eq!(c.get_program(), "git");
    }

    #[test]
    fn a_failure_names_the_command_and_shows_its_last_lines_escaped() {
        let e = failed(&["fetch", "b"], "one\ntwo\nthree\nfour\nfive\nsix\x1b[31m".into());
        let text = e.to_string();
        assert!(text.starts_with("git fetch b failed: two\n"), "{text}");
        assert!(!text.contains('\x1b'), "{text}");
    }
}
