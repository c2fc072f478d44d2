//! Bringing a sandbox's result back: the guest wrote a git bundle (and its
//! status) into the sandbox's export dir, which is all it can write on the
//! host. The host takes a private copy of at most the disk's size, verifies
//! it in a private scratch repository (whose object store borrows the
//! user's, read-only, so prerequisites count): `git bundle verify`, exactly
//! one ref ([`SANDBOX_REF`]), and a fetch that checks every object (fsck)
//! and that the result is a complete commit. Only then does the user's
//! repository fetch that one ref into `agentvm/NAME`, with
//! [`super::git::NEUTRAL_CONFIG`]. A refused bundle leaves the user's
//! repository untouched. A branch checked out here, or moved here since
//! the last import, is left alone: the bundle is kept for the user.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use agentvm_proto::guest::{SANDBOX_BUNDLE, SANDBOX_REF, SANDBOX_STATUS};

use super::git::{GitError, HostGit};
use super::name::SandboxName;
use super::repo::{self, RepoError};
use super::store::{GuestStatus, SandboxPaths, StoreError};

/// The most of a status file that is read.
const STATUS_LIMIT: u64 = 64 << 10;

/// A result that was not brought back, and why.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("sandbox {name} wrote no result; its work stays on its disk: `agentvm sandbox export {name}` tries again")]
    NoResult { name: String },
    #[error("the result of sandbox {name} is not a regular file; nothing was applied")]
    NotAFile { name: String },
    #[error("the result of sandbox {name} is {size} bytes, more than its disk holds ({limit}); nothing was applied")]
    TooLarge { name: String, size: u64, limit: u64 },
    #[error("the bundle of sandbox {name} was refused: {why}; {} is untouched", .repo.display())]
    Refused { name: String, why: String, repo: PathBuf },
    #[error("cannot {what} {}: {source}", .path.display())]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImportError + 'a {
    move |source| ImportError::Io { what, path: path.to_path_buf(), source }
}

/// What became of a result that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// `agentvm/NAME` was made.
    Created,
    /// `agentvm/NAME` moved from this commit.
    Updated { previous: String },
    /// `agentvm/NAME` was already there.
    Unchanged,
    /// `agentvm/NAME` was left alone; the bundle is at `path` (none: the
    /// project has the result's commit).
    Kept { path: Option<PathBuf>, why: KeptBecause },
}

/// Why a result was kept instead of applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeptBecause {
    /// The branch is checked out in the project (or one of its worktrees).
    CheckedOut,
    /// The branch moved since the last import and is not in the result.
    Diverged,
}

/// A result brought back (or kept).
#[derive(Debug, Clone)]
pub struct Imported {
    pub name: SandboxName,
    /// The result's commit.
    pub commit: String,
    pub applied: Applied,
    /// The sandbox's own word about itself.
    pub status: Option<GuestStatus>,
}

/// What to do with a verified result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Unchanged,
    /// Make the branch.
    Create,
    /// Move the branch whatever it holds: it is what this sandbox last set.
    Replace,
    /// Move the branch if the result contains it (someone moved it), else
    /// keep the result.
    FastForward,
    Keep(KeptBecause),
}

/// What to do with the result `new` when the branch is at `current`, was
/// last set from the sandbox to `exported`, and is `checked_out` or not.
pub fn decide(current: Option<&str>, exported: Option<&str>, new: &str, checked_out: bool) -> Decision {
    match current {
        Some(c) if c == new => Decision::Unchanged,
        _ if checked_out => Decision::Keep(KeptBecause::CheckedOut),
        None => Decision::Create,
        Some(c) if Some(c) == exported => Decision::Replace,
        Some(_) => Decision::FastForward,
    }
}

/// Brings the result of the sandbox `name` at `paths` into the project
/// (a real path) as `agentvm/NAME`.
pub fn import(paths: &SandboxPaths, name: &SandboxName, project: &Path) -> Result<Imported, ImportError> {
    let lock_path = paths.import_lock();
    let lock = File::options().create(true).truncate(false).write(true).open(&lock_path);
    let lock = lock.map_err(io_err("lock", &lock_path))?;
    crate::sys::lock(&lock, crate::sys::Lock::Exclusive).map_err(io_err("lock", &lock_path))?;
    let private = tempfile::Builder::new().prefix("import-").tempdir_in(&paths.dir);
    let private = private.map_err(io_err("create a private dir in", &paths.dir))?;
    let status = read_status(&paths.export());
    let user = HostGit::new(&repo::git_dir(project)?);
    let result = obtain(paths, name, project, &user, private.path(), status.as_ref())?;
    let commit = result.commit().to_string();

    let branch = name.branch_ref();
    let current = user.query(&["rev-parse", "-q", "--verify", &format!("{branch}^{{commit}}")])?;
    let mut record = paths.read_record();
    let exported = record.as_ref().and_then(|r| r.exported.clone());
    let mut decision = decide(current.as_deref(), exported.as_deref(), &commit, checked_out(&user, &branch)?);
    if let (Decision::FastForward, Some(c)) = (decision, &current) {
        if !result.contains(&user, c)? {
            decision = Decision::Keep(KeptBecause::Diverged);
        }
    }
    let applied = match decision {
        Decision::Unchanged => Applied::Unchanged,
        Decision::Keep(why) => Applied::Kept { path: result.keep(paths)?, why },
        Decision::Create | Decision::Replace | Decision::FastForward => {
            result.apply(&user, name, current.as_deref())?;
            current.map_or(Applied::Created, |previous| Applied::Updated { previous })
        }
    };
    if let Some(r) = record.as_mut() {
        if !matches!(applied, Applied::Kept { .. }) {
            r.exported = Some(commit.clone());
        }
        r.status = status.clone();
        paths.write_record(r)?;
    }
    Ok(Imported { name: name.clone(), commit, applied, status })
}

/// The commit `agentvm/NAME` holds in `project`, when it is the result
/// this sandbox last brought back: a sandbox not written since has nothing
/// new to export. None when the branch is gone, moved or unreadable.
pub fn held(paths: &SandboxPaths, name: &SandboxName, project: &Path) -> Option<String> {
    let exported = paths.read_record()?.exported?;
    let user = HostGit::new(&repo::git_dir(project).ok()?);
    let current = user.query(&["rev-parse", "-q", "--verify", &format!("{}^{{commit}}", name.branch_ref())]).ok()??;
    (current == exported).then_some(current)
}

/// A result that may be applied.
enum Result_ {
    /// A bundle that verified: its commit, and the scratch repository that
    /// holds it (and sees the project's objects).
    Bundle { path: PathBuf, commit: String, scratch: HostGit },
    /// No bundle: the sandbox names a commit the project already has.
    Known { commit: String },
}

/// The sandbox's result: its bundle, verified; or, when it wrote none
/// (the project has its commit), the commit its status names, checked.
fn obtain(
    paths: &SandboxPaths,
    name: &SandboxName,
    project: &Path,
    user: &HostGit,
    private: &Path,
    status: Option<&GuestStatus>,
) -> Result<Result_, ImportError> {
    let limit = std::fs::metadata(paths.disk()).map_err(io_err("read", &paths.disk()))?.len();
    let bundle = match take_result(paths, name, limit, private) {
        Err(ImportError::NoResult { .. }) if status.is_some_and(|s| is_oid(&s.result)) => {
            let commit = status.expect("checked").result.to_ascii_lowercase();
            let known = user.query(&["rev-parse", "-q", "--verify", &format!("{commit}^{{commit}}")])?;
            return match known {
                Some(c) if c == commit => Ok(Result_::Known { commit }),
                _ => Err(ImportError::NoResult { name: name.to_string() }),
            };
        }
        other => other?,
    };
    match verify(&bundle, private, user) {
        Ok((commit, scratch)) => Ok(Result_::Bundle { path: bundle, commit, scratch }),
        Err(Verify::Refused(why)) => Err(ImportError::Refused { name: name.to_string(), why, repo: project.into() }),
        Err(Verify::Failed(e)) => Err(e),
    }
}

impl Result_ {
    fn commit(&self) -> &str {
        match self {
            Result_::Bundle { commit, .. } | Result_::Known { commit } => commit,
        }
    }

    /// Whether the result contains the commit `ancestor` of the project.
    fn contains(&self, user: &HostGit, ancestor: &str) -> Result<bool, GitError> {
        // The scratch repository sees both: the result and (borrowed) the project.
        let git = match self {
            Result_::Bundle { scratch, .. } => scratch,
            Result_::Known { .. } => user,
        };
        Ok(git.query(&["merge-base", "--is-ancestor", ancestor, self.commit()])?.is_some())
    }

    /// Sets the branch of `name` to the result (whether it may move was
    /// decided); `current` is where it is.
    fn apply(&self, user: &HostGit, name: &SandboxName, current: Option<&str>) -> Result<(), ImportError> {
        match self {
            Result_::Bundle { path, .. } => fetch(user, path, &name.branch_ref()),
            Result_::Known { commit } => {
                let message = format!("agentvm: sandbox {name}");
                let args = ["update-ref", "-m", &message, &name.branch_ref(), commit, current.unwrap_or("")];
                Ok(user.run(&args).map(drop)?)
            }
        }
    }

    /// Keeps the bundle in the sandbox's `kept/` dir (a known commit needs
    /// nothing kept).
    fn keep(&self, paths: &SandboxPaths) -> Result<Option<PathBuf>, ImportError> {
        match self {
            Result_::Bundle { path, commit, .. } => keep(paths, path, commit).map(Some),
            Result_::Known { .. } => Ok(None),
        }
    }
}

fn is_oid(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Copies the guest's bundle into `private`: a regular file (never
/// through a link, never a FIFO), at most `limit` bytes.
fn take_result(paths: &SandboxPaths, name: &SandboxName, limit: u64, private: &Path) -> Result<PathBuf, ImportError> {
    let path = paths.export().join(SANDBOX_BUNDLE);
    let file = match open_untrusted(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ImportError::NoResult { name: name.to_string() }),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(ImportError::NotAFile { name: name.to_string() })
        }
        Err(e) => return Err(io_err("open", &path)(e)),
    };
    let meta = file.metadata().map_err(io_err("read", &path))?;
    if !meta.is_file() {
        return Err(ImportError::NotAFile { name: name.to_string() });
    }
    if meta.len() > limit {
        return Err(ImportError::TooLarge { name: name.to_string(), size: meta.len(), limit });
    }
    let copy = private.join(SANDBOX_BUNDLE);
    let mut out = File::create(&copy).map_err(io_err("write", &copy))?;
    let copied = io::copy(&mut file.take(limit), &mut out).map_err(io_err("copy", &path))?;
    if copied > limit {
        return Err(ImportError::TooLarge { name: name.to_string(), size: copied, limit });
    }
    Ok(copy)
}

/// A file the guest wrote, opened without following a link or blocking
/// on a FIFO.
fn open_untrusted(path: &Path) -> io::Result<File> {
    File::options().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)
}

/// The sandbox's status, if it wrote a readable one.
fn read_status(export: &Path) -> Option<GuestStatus> {
    let file = open_untrusted(&export.join(SANDBOX_STATUS)).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(STATUS_LIMIT).read_to_end(&mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Why a bundle did not verify.
enum Verify {
    /// The bundle is at fault.
    Refused(String),
    /// Something else is.
    Failed(ImportError),
}

impl From<GitError> for Verify {
    fn from(e: GitError) -> Verify {
        Verify::Failed(e.into())
    }
}

impl From<ImportError> for Verify {
    fn from(e: ImportError) -> Verify {
        Verify::Failed(e)
    }
}

/// Verifies `bundle` in a scratch repository in `private` that borrows the
/// objects of `user`'s: the commit its one ref names, and that repository.
fn verify(bundle: &Path, private: &Path, user: &HostGit) -> Result<(String, HostGit), Verify> {
    let format = user.run(&["rev-parse", "--show-object-format"])?;
    let objects = user.run(&["rev-parse", "--path-format=absolute", "--git-path", "objects"])?;
    let scratch_dir = private.join("scratch.git");
    let scratch = HostGit::new(&scratch_dir);
    scratch.run(&["init", "--bare", "-q", &format!("--object-format={format}")])?;
    let alternates = scratch_dir.join("objects/info/alternates");
    std::fs::write(&alternates, format!("{objects}\n")).map_err(io_err("write", &alternates))?;

    let bundle_arg = bundle.as_os_str();
    let (ok, _, stderr) = scratch.output(&[std::ffi::OsStr::new("bundle"), "verify".as_ref(), bundle_arg])?;
    if !ok {
        return Err(Verify::Refused(format!("it does not verify ({})", last_line(&stderr))));
    }
    let heads = scratch.output(&[std::ffi::OsStr::new("bundle"), "list-heads".as_ref(), bundle_arg])?.1;
    let commit = one_ref(&heads).ok_or_else(|| Verify::Refused(format!("it must carry {SANDBOX_REF} alone")))?;
    let refspec = format!("{SANDBOX_REF}:refs/agentvm/result");
    let fetch = ["fetch", "-q", "--no-tags", "--no-write-fetch-head"].map(std::ffi::OsStr::new);
    let args: Vec<&std::ffi::OsStr> = fetch.into_iter().chain([bundle_arg, refspec.as_ref()]).collect();
    let (ok, _, stderr) = scratch.output(&args)?;
    if !ok {
        return Err(Verify::Refused(format!("its objects do not check out ({})", last_line(&stderr))));
    }
    if scratch.run(&["cat-file", "-t", "refs/agentvm/result"])? != "commit" {
        return Err(Verify::Refused(format!("{SANDBOX_REF} is not a commit")));
    }
    Ok((commit, scratch))
}

/// The object `list-heads` names if it lists [`SANDBOX_REF`] and nothing else.
fn one_ref(heads: &str) -> Option<String> {
    let mut lines = heads.lines();
    let (oid, name) = lines.next()?.split_once(' ')?;
    (lines.next().is_none() && name == SANDBOX_REF && is_oid(oid)).then(|| oid.to_ascii_lowercase())
}

fn last_line(text: &str) -> &str {
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no reason given")
}

/// Whether `branch` is checked out in the project or one of its worktrees.
fn checked_out(user: &HostGit, branch: &str) -> Result<bool, GitError> {
    if user.query(&["symbolic-ref", "-q", "HEAD"])?.as_deref() == Some(branch) {
        return Ok(true);
    }
    let worktrees = user.run(&["worktree", "list", "--porcelain"])?;
    Ok(worktrees.lines().any(|l| l.strip_prefix("branch ") == Some(branch)))
}

/// Fetches the bundle's ref into `branch` (forced: whether it may move
/// was decided).
fn fetch(user: &HostGit, bundle: &Path, branch: &str) -> Result<(), ImportError> {
    let refspec = format!("+{SANDBOX_REF}:{branch}");
    // The longest `insteadOf` wins: the bundle's whole (random) path, mapped
    // to itself, beats any rewrite the repository's config may carry.
    let mut keep_url = std::ffi::OsString::from("url.");
    keep_url.push(bundle.as_os_str());
    keep_url.push(".insteadOf=");
    keep_url.push(bundle.as_os_str());
    let mut args: Vec<&std::ffi::OsStr> = vec!["-c".as_ref(), keep_url.as_os_str()];
    let options = ["fetch", "-q", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules"];
    args.extend(options.into_iter().chain(["--no-auto-gc", "--no-auto-maintenance"]).map(std::ffi::OsStr::new));
    args.extend([bundle.as_os_str(), refspec.as_ref()]);
    match user.output(&args)? {
        (true, _, _) => Ok(()),
        (false, _, stderr) => Err(GitError::Failed { args: format!("fetch {refspec}"), stderr }.into()),
    }
}

/// Moves the verified bundle into the sandbox's `kept/` dir.
fn keep(paths: &SandboxPaths, bundle: &Path, commit: &str) -> Result<PathBuf, ImportError> {
    let kept = paths.kept();
    std::fs::create_dir_all(&kept).map_err(io_err("create", &kept))?;
    let path = kept.join(format!("{}-{}.bundle", crate::instance::now_secs(), &commit[..12]));
    std::fs::rename(bundle, &path).map_err(io_err("keep the bundle in", &kept))?;
    Ok(path)
}

/// ` (N commits ahead of BASE, its uncommitted work as the last commit)`,
/// as far as the sandbox said.
fn summary(s: &GuestStatus) -> String {
    let commits = |n: u64| if n == 1 { "1 commit".to_string() } else { format!("{n} commits") };
    let base = s.base.as_deref().unwrap_or("its base");
    let ahead = s.ahead.map(|n| format!("{} ahead of {base}", commits(n)));
    let dirty = s.dirty.then(|| "its uncommitted work as the last commit".to_string());
    let parts: Vec<String> = ahead.into_iter().chain(dirty).collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

impl fmt::Display for Imported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, branch, short) = (&self.name, self.name.branch(), &self.commit[..self.commit.len().min(12)]);
        let work = self.status.as_ref().map(summary).unwrap_or_default();
        let why = |why: &KeptBecause| match why {
            KeptBecause::CheckedOut => "is checked out here",
            KeptBecause::Diverged => "has commits the result lacks",
        };
        match &self.applied {
            Applied::Created => write!(f, "sandbox {name}: branch {branch} made at {short}{work}"),
            Applied::Updated { .. } => write!(f, "sandbox {name}: branch {branch} now at {short}{work}"),
            Applied::Unchanged => write!(f, "sandbox {name}: branch {branch} unchanged at {short}{work}"),
            Applied::Kept { path, why: because } => {
                write!(f, "sandbox {name}: {branch} {}, so it was left as it is; the result ({short}) ", why(because))?;
                match path {
                    Some(p) => write!(f, "is kept in {0}: take it with `git pull {0} {SANDBOX_REF}`", p.display()),
                    None => write!(f, "is a commit of this repository: take it with `git merge {short}`"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::repo::tests::{git, repo};
    use crate::sandbox::store::Record;
    use std::process::Command;

    /// A project, a sandbox's paths for it, and a clone of the project
    /// standing in for the sandbox's work tree.
    struct Fixture {
        project: tempfile::TempDir,
        _data: tempfile::TempDir,
        paths: SandboxPaths,
        name: SandboxName,
        clone: PathBuf,
    }

    impl Fixture {
        fn new() -> Fixture {
            let project = repo();
            let data = tempfile::tempdir().unwrap();
            let name = SandboxName::parse("t1").unwrap();
            let paths = SandboxPaths::new(data.path(), "p-0", &name);
            std::fs::create_dir_all(paths.export()).unwrap();
            File::create(paths.disk()).unwrap().set_len(64 << 20).unwrap();
            let record = Record {
                name: "t1".into(),
                project: project.path().into(),
                created: 0,
                base_branch: Some("main".into()),
                base_commit: git(project.path(), &["rev-parse", "HEAD"]).trim().into(),
                last_run: None,
                exported: None,
                status: None,
            };
            paths.write_record(&record).unwrap();
            let clone = data.path().join("clone");
            git(data.path(), &["clone", "-q", project.path().to_str().unwrap(), clone.to_str().unwrap()]);
            Fixture { project, _data: data, paths, name, clone }
        }

        fn project(&self) -> PathBuf {
            self.project.path().canonicalize().unwrap()
        }

        /// Commits `file` in the clone and writes the bundle as the guest does.
        fn result(&self, file: &str) -> String {
            std::fs::write(self.clone.join(file), file).unwrap();
            git(&self.clone, &["add", file]);
            git(&self.clone, &["commit", "-qm", file]);
            self.bundle(&[SANDBOX_REF, "^origin/main"])
        }

        fn bundle(&self, revs: &[&str]) -> String {
            git(&self.clone, &["update-ref", SANDBOX_REF, "HEAD"]);
            let out = self.paths.export().join(SANDBOX_BUNDLE);
            let _ = std::fs::remove_file(&out);
            let mut args = vec!["bundle", "create", "-q", out.to_str().unwrap()];
            args.extend(revs);
            git(&self.clone, &args);
            git(&self.clone, &["rev-parse", "HEAD"]).trim().to_string()
        }

        fn import(&self) -> Result<Imported, ImportError> {
            import(&self.paths, &self.name, &self.project())
        }

        /// Everything of the project a result must not change.
        fn untouched_state(&self) -> (String, Vec<u8>, String) {
            let p = self.project.path();
            let refs = git(p, &["for-each-ref", "--format=%(refname) %(objectname)"]);
            let refs: String = refs.lines().filter(|l| !l.starts_with("refs/heads/agentvm/")).collect();
            let index = std::fs::read(p.join(".git/index")).unwrap();
            // Without writing the index or running the fsmonitor itself.
            let status = Command::new("git")
                .args(["-c", "core.fsmonitor=false", "status", "--porcelain"])
                .current_dir(p)
                .env("GIT_OPTIONAL_LOCKS", "0")
                .output()
                .unwrap();
            (refs, index, String::from_utf8(status.stdout).unwrap())
        }
    }

    #[test]
    fn decisions_follow_the_branch_the_last_import_and_the_checkout() {
        use Decision::*;
        assert_eq!(decide(None, None, "n", false), Create);
        assert_eq!(decide(Some("n"), None, "n", true), Unchanged);
        assert_eq!(decide(Some("o"), Some("o"), "n", false), Replace);
        assert_eq!(decide(Some("o"), Some("x"), "n", false), FastForward);
        assert_eq!(decide(Some("o"), None, "n", false), FastForward);
        assert_eq!(decide(Some("o"), Some("o"), "n", true), Keep(KeptBecause::CheckedOut));
        assert_eq!(decide(None, None, "n", true), Keep(KeptBecause::CheckedOut));
    }

    #[test]
    fn the_branch_is_held_only_while_it_is_the_last_result_brought_back() {
        let f = Fixture::new();
        let held = || held(&f.paths, &f.name, &f.project());
        assert_eq!(held(), None, "nothing brought back yet");
        let commit = f.result("new.txt");
        f.import().unwrap();
        assert_eq!(held().as_deref(), Some(commit.as_str()));
        // The user moves the branch, or deletes it: the next run exports.
        let p = f.project.path();
        git(p, &["branch", "-f", "agentvm/t1", "main"]);
        assert_eq!(held(), None, "a moved branch");
        git(p, &["branch", "-D", "agentvm/t1"]);
        assert_eq!(held(), None, "a deleted branch");
    }

    #[test]
    fn a_verified_result_becomes_the_branch_and_nothing_else_changes() {
        let f = Fixture::new();
        let p = f.project.path();
        std::fs::write(p.join("dirty.txt"), "user's work\n").unwrap();
        // What a guest could have left in the repository in a plain run.
        let marker = p.join("hook-ran");
        let hook = format!("#!/bin/sh\ntouch {}\n", marker.display());
        for name in ["reference-transaction", "post-merge", "post-checkout"] {
            let path = p.join(".git/hooks").join(name);
            std::fs::write(&path, &hook).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        git(p, &["config", "core.fsmonitor", p.join(".git/hooks/post-merge").to_str().unwrap()]);
        git(p, &["config", "protocol.ext.allow", "always"]);
        git(p, &["config", &format!("url.ext::sh -c touch% {}.insteadOf", marker.display()), "/"]);
        git(p, &["config", "fetch.fsckObjects", "false"]);
        let before = f.untouched_state();

        let commit = f.result("new.txt");
        let imported = f.import().unwrap();
        assert_eq!((imported.applied.clone(), imported.commit.as_str()), (Applied::Created, commit.as_str()));
        assert_eq!(git(p, &["rev-parse", "agentvm/t1"]).trim(), commit);
        assert_eq!(git(p, &["show", "agentvm/t1:new.txt"]), "new.txt");
        assert_eq!(f.untouched_state(), before);
        assert!(!marker.exists(), "a hook, the fsmonitor or a rewritten URL ran");
        assert_eq!(f.paths.read_record().unwrap().exported.as_deref(), Some(commit.as_str()));
        assert!(imported.to_string().starts_with("sandbox t1: branch agentvm/t1 made at "), "{imported}");

        // Again: unchanged. Then the agent rewrites its commit: replaced.
        assert_eq!(f.import().unwrap().applied, Applied::Unchanged);
        git(&f.clone, &["commit", "-q", "--amend", "-m", "amended"]);
        let amended = f.bundle(&[SANDBOX_REF, "^origin/main"]);
        assert_eq!(f.import().unwrap().applied, Applied::Updated { previous: commit });
        assert_eq!(git(p, &["rev-parse", "agentvm/t1"]).trim(), amended);
    }

    #[test]
    fn a_tampered_bundle_is_refused_and_the_project_is_untouched() {
        let f = Fixture::new();
        let before = f.untouched_state();
        f.result("new.txt");
        let path = f.paths.export().join(SANDBOX_BUNDLE);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 30;
        bytes[at] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        let objects = git(f.project.path(), &["count-objects", "-v"]);
        let e = f.import().unwrap_err();
        assert!(matches!(e, ImportError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("is untouched"), "{e}");
        assert_eq!(f.untouched_state(), before);
        assert!(git(f.project.path(), &["branch", "--list", "agentvm/*"]).is_empty());
        assert_eq!(git(f.project.path(), &["count-objects", "-v"]), objects, "objects were added");
    }

    #[test]
    fn bundles_with_other_refs_missing_history_or_no_file_are_refused() {
        let f = Fixture::new();
        f.result("x.txt");
        f.bundle(&[SANDBOX_REF, "refs/heads/main", "^origin/main"]);
        let e = f.import().unwrap_err().to_string();
        assert!(e.contains("must carry refs/agentvm/export alone"), "{e}");

        // Prerequisites the project lacks: a commit only the sandbox has.
        f.result("y.txt");
        git(&f.clone, &["branch", "-f", "only-here", "HEAD~1"]);
        f.result("z.txt");
        f.bundle(&[SANDBOX_REF, "^only-here"]);
        let e = f.import().unwrap_err().to_string();
        assert!(e.contains("it does not verify"), "{e}");

        let path = f.paths.export().join(SANDBOX_BUNDLE);
        std::fs::remove_file(&path).unwrap();
        let e = f.import().unwrap_err();
        assert!(matches!(e, ImportError::NoResult { .. }) && e.to_string().contains("sandbox export t1"), "{e}");
        std::os::unix::fs::symlink(f.project.path().join(".git/config"), &path).unwrap();
        assert!(matches!(f.import().unwrap_err(), ImportError::NotAFile { .. }));
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, vec![b'x'; (64 << 20) + 1]).unwrap();
        assert!(matches!(f.import().unwrap_err(), ImportError::TooLarge { .. }));
        assert!(git(f.project.path(), &["branch", "--list", "agentvm/*"]).is_empty());
    }

    #[test]
    fn without_a_bundle_a_commit_the_project_has_is_taken_and_nothing_else() {
        let f = Fixture::new();
        let p = f.project.path();
        let main = git(p, &["rev-parse", "main"]).trim().to_string();
        let status = |result: &str| {
            let text = format!(
                r#"{{"head":"{result}","result":"{result}","branch":"main","base":"main","dirty":false,"ahead":0}}"#
            );
            std::fs::write(f.paths.export().join(SANDBOX_STATUS), text).unwrap();
        };
        status(&main);
        let imported = f.import().unwrap();
        assert_eq!((imported.applied, imported.commit.as_str()), (Applied::Created, main.as_str()));
        assert_eq!(git(p, &["rev-parse", "agentvm/t1"]).trim(), main);
        assert_eq!(f.import().unwrap().applied, Applied::Unchanged);

        let only_in_the_sandbox = f.result("x.txt");
        std::fs::remove_file(f.paths.export().join(SANDBOX_BUNDLE)).unwrap();
        for named in [only_in_the_sandbox.as_str(), "HEAD", "main", &"0".repeat(40)] {
            status(named);
            let e = f.import().unwrap_err();
            assert!(matches!(e, ImportError::NoResult { .. }), "{named}: {e}");
        }
        assert_eq!(git(p, &["rev-parse", "agentvm/t1"]).trim(), main);
    }

    #[test]
    fn a_checked_out_or_moved_branch_is_left_alone_and_the_bundle_kept() {
        let f = Fixture::new();
        let p = f.project.path();
        let first = f.result("one.txt");
        f.import().unwrap();
        git(p, &["checkout", "-q", "agentvm/t1"]);
        std::fs::write(p.join("one.txt"), "the user's edit\n").unwrap();
        f.result("two.txt");
        let imported = f.import().unwrap();
        let Applied::Kept { path: Some(path), why: KeptBecause::CheckedOut } = &imported.applied else {
            panic!("{imported:?}")
        };
        assert!(path.starts_with(f.paths.kept()) && path.is_file());
        assert!(imported.to_string().contains("is checked out here") && imported.to_string().contains("git pull"));
        assert_eq!(git(p, &["rev-parse", "agentvm/t1"]).trim(), first);
        assert_eq!(std::fs::read_to_string(p.join("one.txt")).unwrap(), "the user's edit\n");

        // Moved by the user to a commit the result lacks: kept too.
        git(p, &["checkout", "-q", "--force", "-b", "side", "main"]);
        git(p, &["commit", "-q", "--allow-empty", "-m", "the user's own"]);
        git(p, &["branch", "-f", "agentvm/t1", "side"]);
        let imported = f.import().unwrap();
        assert!(matches!(imported.applied, Applied::Kept { why: KeptBecause::Diverged, .. }), "{imported:?}");
    }
}
