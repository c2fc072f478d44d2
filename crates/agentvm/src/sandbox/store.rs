//! Where a sandbox lives on the host, and what the host records about it:
//! `$XDG_DATA_HOME/agentvm/sandboxes/<project>/<NAME>/` (mode 0700) holds
//!
//! - `disk.ext4`: its disk (sparse ext4; the guest's /work);
//! - `sandbox.json`: the host's record ([`Record`]);
//! - `export/`: the one directory the guest writes (its results), shared
//!   read-write and emptied before every run;
//! - `kept/`: results the host did not apply, for the user to take;
//! - `containers.ext4`: its container storage with `--cri`;
//! - `run.lock` and `import.lock`: one run at a time, one import at a time.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::name::SandboxName;
use super::repo::RepoBase;
use crate::guest_env::disk::{self, DiskError};

/// Default size of a sandbox's disk when it is created (sparse).
pub const DEFAULT_DISK_MIB: u64 = 64 * 1024;
/// The most of a record that is read.
const RECORD_LIMIT: u64 = 1 << 20;

/// A sandbox's storage that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "sandbox {name} is in use by another run; stop it (agentvm ps, agentvm stop), or use another name \
         (--clone=OTHER)"
    )]
    InUse { name: String },
    #[error("no sandbox {name} for {}: `agentvm sandbox ls` lists them", .project.display())]
    Missing { name: String, project: PathBuf },
    #[error("cannot {what} {}: {source}", .path.display())]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error(transparent)]
    Disk(#[from] DiskError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { what, path: path.to_path_buf(), source }
}

/// What the host records about a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    /// The project (a real path).
    pub project: PathBuf,
    /// Unix seconds.
    pub created: u64,
    /// The host's branch and commit the sandbox started from.
    pub base_branch: Option<String>,
    pub base_commit: String,
    /// Unix seconds.
    #[serde(default)]
    pub last_run: Option<u64>,
    /// The commit the host's `agentvm/NAME` was last set to from here.
    #[serde(default)]
    pub exported: Option<String>,
    /// What the sandbox said about itself at its last export.
    #[serde(default)]
    pub status: Option<GuestStatus>,
}

/// What a sandbox reports with its results (`status.json`): its word,
/// shown by `agentvm sandbox ls`, never acted on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// Its HEAD.
    pub head: String,
    /// What the bundle carries: HEAD, or a commit of the uncommitted work.
    pub result: String,
    /// Its checked-out branch (None: detached).
    pub branch: Option<String>,
    /// The host branch it started from.
    pub base: Option<String>,
    /// Whether it had uncommitted work.
    pub dirty: bool,
    /// Commits on its HEAD that the host branch lacks.
    pub ahead: Option<u64>,
}

/// The files of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPaths {
    pub dir: PathBuf,
}

impl SandboxPaths {
    /// The sandbox `name` of the project `project_name` (its agent home's
    /// name, [`crate::paths::project_home_name`]) under the data dir.
    pub fn new(data_dir: &Path, project_name: &str, name: &SandboxName) -> SandboxPaths {
        SandboxPaths { dir: project_dir(data_dir, project_name).join(name.as_str()) }
    }

    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.ext4")
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join("sandbox.json")
    }
    pub fn export(&self) -> PathBuf {
        self.dir.join("export")
    }
    pub fn kept(&self) -> PathBuf {
        self.dir.join("kept")
    }
    pub fn containers(&self) -> PathBuf {
        self.dir.join("containers.ext4")
    }
    fn run_lock(&self) -> PathBuf {
        self.dir.join("run.lock")
    }
    pub fn import_lock(&self) -> PathBuf {
        self.dir.join("import.lock")
    }

    /// Whether the sandbox exists (its disk does).
    pub fn exists(&self) -> bool {
        self.disk().is_file()
    }

    pub fn read_record(&self) -> Option<Record> {
        let file = File::open(self.record()).ok()?;
        let mut bytes = Vec::new();
        file.take(RECORD_LIMIT).read_to_end(&mut bytes).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes the record atomically.
    pub fn write_record(&self, record: &Record) -> Result<(), StoreError> {
        let (path, tmp) = (self.record(), self.dir.join(".sandbox.json.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(record).expect("serializable"))
            .map_err(io_err("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("write", &path))
    }
}

/// The project's sandboxes' dir.
pub fn project_dir(data_dir: &Path, project_name: &str) -> PathBuf {
    sandboxes_dir(data_dir).join(project_name)
}

/// Every project's sandboxes are below this.
pub fn sandboxes_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("sandboxes")
}

fn private_dir(path: &Path) -> Result<(), StoreError> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(io_err("create", path))
}

/// A sandbox held by one run: locked, its disk there (grown if asked), its
/// export dir empty, its record updated. Dropping it unlocks it.
#[derive(Debug)]
pub struct InUse {
    pub paths: SandboxPaths,
    pub name: SandboxName,
    pub record: Record,
    /// The disk was made for this run (its first).
    pub new: bool,
    _lock: File,
}

/// What a run asks of its sandbox.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub name: &'a SandboxName,
    /// The project (a real path).
    pub project: &'a Path,
    pub disk_mib: u64,
    /// The size was asked for (so an existing disk grows to it).
    pub size_asked: bool,
    pub base: &'a RepoBase,
}

/// Locks the sandbox at `paths` for a run (refused while another run holds
/// it) and makes what is missing. `warn` hears that a disk cannot shrink.
pub fn open(paths: &SandboxPaths, req: &Request<'_>, warn: &mut dyn FnMut(String)) -> Result<InUse, StoreError> {
    private_dir(&paths.dir)?;
    let lock = disk::try_lock(&paths.run_lock())
        .map_err(io_err("lock", &paths.run_lock()))?
        .ok_or_else(|| StoreError::InUse { name: req.name.to_string() })?;
    let disk_path = paths.disk();
    let new = !disk_path.exists();
    if new {
        disk::create_ext4(&disk_path, req.disk_mib, "agentvm-work")?;
    } else if req.size_asked {
        let before = disk::grow(&disk_path, req.disk_mib)?;
        if before > req.disk_mib {
            warn(format!(
                "the disk of sandbox {} stays at {before} MiB: disks only grow (asked for {} MiB)",
                req.name, req.disk_mib
            ));
        }
    }
    empty_export_dir(paths)?;
    let now = crate::instance::now_secs();
    let record = match paths.read_record().filter(|_| !new) {
        Some(r) => Record { last_run: Some(now), ..r },
        None => Record {
            name: req.name.to_string(),
            project: req.project.to_path_buf(),
            created: now,
            base_branch: req.base.branch.clone(),
            base_commit: req.base.commit.clone(),
            last_run: Some(now),
            exported: None,
            status: None,
        },
    };
    paths.write_record(&record)?;
    Ok(InUse { paths: paths.clone(), name: req.name.clone(), record, new, _lock: lock })
}

/// Empties the dir the guest writes, keeping the dir itself (a running
/// guest has it mounted). Nothing in it is followed: links go as links.
pub fn empty_export_dir(paths: &SandboxPaths) -> Result<(), StoreError> {
    let export = paths.export();
    private_dir(&export)?;
    for entry in std::fs::read_dir(&export).map_err(io_err("read", &export))? {
        let path = entry.map_err(io_err("read", &export))?.path();
        let is_dir = std::fs::symlink_metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
        let removed = if is_dir { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("remove", &path)(e)),
            _ => {}
        }
    }
    Ok(())
}

/// One sandbox as `agentvm sandbox ls` shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub paths: SandboxPaths,
    pub record: Record,
    /// What its disk takes on the host (it is sparse).
    pub disk_bytes: u64,
}

/// Every sandbox of every project, by project and name.
pub fn list(data_dir: &Path) -> Vec<Listed> {
    let mut found = Vec::new();
    let Ok(projects) = std::fs::read_dir(sandboxes_dir(data_dir)) else { return found };
    for project in projects.flatten() {
        let Ok(sandboxes) = std::fs::read_dir(project.path()) else { continue };
        for entry in sandboxes.flatten() {
            let paths = SandboxPaths { dir: entry.path() };
            let Some(record) = paths.read_record() else { continue };
            let disk_bytes = std::fs::metadata(paths.disk()).map(|m| m.blocks() * 512).unwrap_or(0);
            found.push(Listed { paths, record, disk_bytes });
        }
    }
    found.sort_by(|a, b| (&a.record.project, &a.record.name).cmp(&(&b.record.project, &b.record.name)));
    found
}

/// Removes the sandbox (its disk and state), unless a run holds it.
pub fn remove(paths: &SandboxPaths, name: &SandboxName, project: &Path) -> Result<(), StoreError> {
    if !paths.dir.is_dir() {
        return Err(StoreError::Missing { name: name.to_string(), project: project.into() });
    }
    let _lock = disk::try_lock(&paths.run_lock())
        .map_err(io_err("lock", &paths.run_lock()))?
        .ok_or_else(|| StoreError::InUse { name: name.to_string() })?;
    std::fs::remove_dir_all(&paths.dir).map_err(io_err("remove", &paths.dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `f`'s result, retried for a moment while the sandbox is in use: a
    /// child another test forks holds a copy of the lock until it execs.
    fn when_free<T>(mut f: impl FnMut() -> Result<T, StoreError>) -> T {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match f() {
                Err(StoreError::InUse { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => return other.unwrap(),
            }
        }
    }

    fn base() -> RepoBase {
        RepoBase { branch: Some("main".into()), commit: "c".repeat(40) }
    }

    #[test]
    fn a_sandbox_is_made_once_held_by_one_run_listed_and_removed() {
        let data = tempfile::tempdir().unwrap();
        let name = SandboxName::parse("t1").unwrap();
        let paths = SandboxPaths::new(data.path(), "proj-abc", &name);
        let base = base();
        let req =
            Request { name: &name, project: Path::new("/src/proj"), disk_mib: 64, size_asked: false, base: &base };
        let mut warnings = Vec::new();
        let held = open(&paths, &req, &mut |w| warnings.push(w)).unwrap();
        assert!(held.new && paths.disk().is_file() && paths.export().is_dir());
        assert!(matches!(open(&paths, &req, &mut |_| {}), Err(StoreError::InUse { .. })));
        assert!(matches!(remove(&paths, &name, req.project), Err(StoreError::InUse { .. })));
        std::fs::write(paths.export().join("stale.bundle"), "old").unwrap();
        std::fs::create_dir(paths.export().join("dir")).unwrap();
        std::os::unix::fs::symlink(data.path(), paths.export().join("link")).unwrap();
        let export_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(paths.export()).unwrap());
        drop(held);

        let grown = Request { disk_mib: 128, size_asked: true, ..req.clone() };
        let held = when_free(|| open(&paths, &grown, &mut |w| warnings.push(w)));
        assert!(!held.new);
        assert_eq!(std::fs::metadata(paths.disk()).unwrap().len(), 128 << 20);
        assert_eq!(std::fs::read_dir(paths.export()).unwrap().count(), 0, "the export dir is emptied");
        assert!(data.path().is_dir(), "a link's target stays");
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(paths.export()).unwrap());
        assert_eq!(inode, export_inode, "the dir itself stays (a running guest has it mounted)");
        assert_eq!(held.record.created, paths.read_record().unwrap().created);
        drop(held);
        let smaller = Request { disk_mib: 32, size_asked: true, ..req.clone() };
        drop(when_free(|| open(&paths, &smaller, &mut |w| warnings.push(w))));
        assert!(warnings.len() == 1 && warnings[0].contains("disks only grow"), "{warnings:?}");

        let listed = list(data.path());
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].record.name.as_str(), listed[0].record.base_branch.as_deref()), ("t1", Some("main")));
        when_free(|| remove(&paths, &name, req.project));
        assert!(!paths.dir.exists() && list(data.path()).is_empty());
        assert!(matches!(remove(&paths, &name, req.project), Err(StoreError::Missing { .. })));
    }
}
