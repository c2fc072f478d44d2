//! The project's repository as a sandbox needs it, checked before boot:
//! the top of a git work tree (not a linked worktree), with a commit, and
//! without submodules or git LFS, which a clone would not bring along.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::git::{GitError, HostGit};

/// Where a sandbox starts from: the host's branch (None: detached HEAD)
/// and its commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoBase {
    pub branch: Option<String>,
    pub commit: String,
}

/// A project a sandbox cannot be made of, with what to do.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(
        "--clone needs a git work tree: {} has no .git; make it one (git init, git commit), or run without \
         --clone (the project is then shared read-write at /work)", .0.display()
    )]
    NotAWorkTree(PathBuf),
    #[error(
        "--clone needs the top of a git work tree: {} is inside {}; run it there (--work-dir {1})",
        .dir.display(), .top.display()
    )]
    BelowTheTop { dir: PathBuf, top: PathBuf },
    #[error(
        "--clone needs the repository's main work tree: {}/.git is a file (a linked worktree or a submodule); \
         run it in the main work tree (--work-dir)", .0.display()
    )]
    LinkedWorkTree(PathBuf),
    #[error(
        "--clone starts a sandbox from a commit, and {} has none yet: commit first (git commit), or run \
         without --clone", .0.display()
    )]
    NoCommits(PathBuf),
    #[error(
        "{} uses git submodules ({why}), which --clone does not bring into a sandbox: run without --clone",
        .dir.display()
    )]
    Submodules { dir: PathBuf, why: String },
    #[error(
        "{} uses git LFS ({why}): a sandbox would get its pointer files, not their content; run without --clone",
        .dir.display()
    )]
    Lfs { dir: PathBuf, why: String },
    #[error("cannot read {}: {source}", .path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Git(#[from] GitError),
}

/// The most of a `.gitattributes` read when looking for LFS.
const ATTRIBUTES_LIMIT: u64 = 1 << 20;
/// Index entries of a submodule (a gitlink) have this mode.
const GITLINK_MODE: &[u8] = b"160000 ";

/// The git dir of the project `work_dir` (a real path), checked.
pub fn git_dir(work_dir: &Path) -> Result<PathBuf, RepoError> {
    let dot_git = work_dir.join(".git");
    match std::fs::symlink_metadata(&dot_git) {
        Ok(m) if m.is_dir() => Ok(dot_git),
        Ok(_) => Err(RepoError::LinkedWorkTree(work_dir.into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match work_dir.ancestors().find(|d| d.join(".git").exists()) {
                Some(top) => Err(RepoError::BelowTheTop { dir: work_dir.into(), top: top.into() }),
                None => Err(RepoError::NotAWorkTree(work_dir.into())),
            }
        }
        Err(source) => Err(RepoError::Read { path: dot_git, source }),
    }
}

/// Where the project `work_dir` is: its branch and commit. `first_run`
/// also checks what only matters when the clone is made (submodules, LFS).
pub fn inspect(work_dir: &Path, first_run: bool) -> Result<RepoBase, RepoError> {
    let git = HostGit::new(&git_dir(work_dir)?);
    let commit = git
        .query(&["rev-parse", "-q", "--verify", "HEAD^{commit}"])?
        .ok_or_else(|| RepoError::NoCommits(work_dir.into()))?;
    let branch =
        git.query(&["symbolic-ref", "-q", "HEAD"])?.and_then(|r| r.strip_prefix("refs/heads/").map(String::from));
    if first_run {
        refuse_what_a_clone_lacks(work_dir, &git)?;
    }
    Ok(RepoBase { branch, commit })
}

/// Submodules (a `.gitmodules`, or a gitlink in the index) and LFS (its
/// dir in `.git`, or `filter=lfs` in a tracked `.gitattributes`).
fn refuse_what_a_clone_lacks(work_dir: &Path, git: &HostGit) -> Result<(), RepoError> {
    let submodules = |why: &str| RepoError::Submodules { dir: work_dir.into(), why: why.into() };
    let lfs = |why: String| RepoError::Lfs { dir: work_dir.into(), why };
    if std::fs::symlink_metadata(work_dir.join(".gitmodules")).is_ok() {
        return Err(submodules("it has a .gitmodules"));
    }
    if work_dir.join(".git/lfs").is_dir() {
        return Err(lfs(".git/lfs exists".into()));
    }
    // The index, streamed: `MODE OID STAGE\tPATH\0` per entry.
    let mut child = git
        .command(&["ls-files", "-z", "--stage"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(GitError::Spawn)?;
    let mut entries = BufReader::new(child.stdout.take().expect("piped"));
    let mut found = Ok(());
    let mut entry = Vec::new();
    while found.is_ok() && entries.read_until(0, &mut entry).map_err(|e| read_err(work_dir, e))? > 0 {
        let path = entry.split(|b| *b == b'\t').nth(1).unwrap_or_default().strip_suffix(b"\0").unwrap_or_default();
        if entry.starts_with(GITLINK_MODE) {
            found = Err(submodules("its index has a gitlink"));
        } else if (path == b".gitattributes" || path.ends_with(b"/.gitattributes")) && names_lfs(work_dir, path)? {
            found = Err(lfs(format!("{} sets filter=lfs", String::from_utf8_lossy(path))));
        }
        entry.clear();
    }
    drop(entries);
    let _ = child.kill();
    let status = child.wait().map_err(GitError::Spawn)?;
    if found.is_ok() && !status.success() {
        return Err(GitError::Failed { args: "ls-files -z --stage".into(), stderr: format!("{status}") }.into());
    }
    found
}

/// Whether the attributes file at `path` in the work tree sets the LFS
/// filter (read without following a link, and only its first MiB).
fn names_lfs(work_dir: &Path, path: &[u8]) -> Result<bool, RepoError> {
    let full = work_dir.join(std::ffi::OsStr::from_bytes(path));
    let file =
        match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(&full) {
            Ok(f) => f,
            Err(_) => return Ok(false),
        };
    if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Ok(false);
    }
    let mut text = Vec::new();
    file.take(ATTRIBUTES_LIMIT).read_to_end(&mut text).map_err(|source| RepoError::Read { path: full, source })?;
    Ok(text.windows(b"filter=lfs".len()).any(|w| w == b"filter=lfs"))
}

fn read_err(dir: &Path, source: std::io::Error) -> RepoError {
    RepoError::Read { path: dir.join(".git/index"), source }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    pub use agentvm_testkit::git;

    /// A repository with one commit on main.
    pub fn repo() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        git(d.path(), &["init", "-q"]);
        std::fs::write(d.path().join("a.txt"), "a\n").unwrap();
        git(d.path(), &["add", "a.txt"]);
        git(d.path(), &["commit", "-qm", "one"]);
        d
    }

    fn real(d: &tempfile::TempDir) -> PathBuf {
        d.path().canonicalize().unwrap()
    }

    #[test]
    fn a_repository_gives_its_branch_and_commit_and_a_detached_head_no_branch() {
        let d = repo();
        let base = inspect(&real(&d), true).unwrap();
        assert_eq!(base.branch.as_deref(), Some("main"));
        assert_eq!(base.commit, git(d.path(), &["rev-parse", "HEAD"]).trim());
        git(d.path(), &["checkout", "-q", "--detach"]);
        assert_eq!(inspect(&real(&d), true).unwrap(), RepoBase { branch: None, commit: base.commit });
    }

    #[test]
    fn no_repository_no_commit_and_a_linked_worktree_are_refused_with_what_to_do() {
        let d = tempfile::tempdir().unwrap();
        let e = inspect(d.path(), true).unwrap_err().to_string();
        assert!(e.contains("has no .git") && e.contains("run without --clone"), "{e}");
        git(d.path(), &["init", "-q"]);
        let e = inspect(d.path(), true).unwrap_err().to_string();
        assert!(e.contains("has none yet: commit first"), "{e}");
        let r = repo();
        std::fs::create_dir(r.path().join("sub")).unwrap();
        let e = inspect(&r.path().join("sub"), true).unwrap_err().to_string();
        assert!(e.contains("is inside") && e.contains(&format!("--work-dir {}", r.path().display())), "{e}");
        let linked = r.path().join("linked");
        git(r.path(), &["worktree", "add", "-q", linked.to_str().unwrap()]);
        let e = inspect(&linked, true).unwrap_err().to_string();
        assert!(e.contains(".git is a file") && e.contains("main work tree"), "{e}");
    }

    #[test]
    fn submodules_and_lfs_are_refused_on_the_first_run_only() {
        let d = repo();
        let oid = git(d.path(), &["rev-parse", "HEAD"]);
        git(d.path(), &["update-index", "--add", "--cacheinfo", &format!("160000,{},sub", oid.trim())]);
        let e = inspect(&real(&d), true).unwrap_err().to_string();
        assert!(e.contains("uses git submodules (its index has a gitlink)"), "{e}");
        assert!(inspect(&real(&d), false).is_ok(), "a later run does not look");

        let d = repo();
        std::fs::create_dir(d.path().join("assets")).unwrap();
        std::fs::write(d.path().join("assets/.gitattributes"), "*.bin filter=lfs diff=lfs merge=lfs -text\n").unwrap();
        git(d.path(), &["add", "assets/.gitattributes"]);
        let e = inspect(&real(&d), true).unwrap_err().to_string();
        assert!(e.contains("uses git LFS (assets/.gitattributes sets filter=lfs)"), "{e}");

        let d = repo();
        std::fs::write(d.path().join(".gitmodules"), "").unwrap();
        assert!(inspect(&real(&d), true).unwrap_err().to_string().contains("it has a .gitmodules"));
    }

    #[test]
    fn a_hook_or_fsmonitor_the_guest_left_does_not_run_while_looking() {
        let d = repo();
        let marker = d.path().join("ran");
        let script = format!("#!/bin/sh\ntouch {}\n", marker.display());
        for hook in ["reference-transaction", "post-checkout", "post-index-change"] {
            let path = d.path().join(".git/hooks").join(hook);
            std::fs::write(&path, &script).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        git(d.path(), &["config", "core.fsmonitor", d.path().join(".git/hooks/post-checkout").to_str().unwrap()]);
        inspect(&real(&d), true).unwrap();
        assert!(!marker.exists(), "a hook or the fsmonitor ran");
    }
}
