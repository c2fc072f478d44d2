//! Trust in a project's own files, the way `direnv allow` works.
//!
//! The project's `.agentvm.toml` and the dev shell sources that
//! `--devshell` evaluates on the host (every `*.nix` file in the project
//! tree, `flake.lock`, `devenv.yaml`, `devenv.lock` at its top, and the
//! files the `devshell_files` setting names, see [`FilePattern`]) live in
//! the work dir, which the guest can write. They take effect only when the
//! user has trusted their current content: `agentvm trust DIR` records the
//! SHA-256 of each one in a per-project record under
//! `$XDG_DATA_HOME/agentvm/trust/` (mode 0700, records 0600, written
//! atomically), outside every share (settings refuses shares that overlap
//! it). A file whose content differs from the record, or that is new, is
//! not trusted. `.envrc` is left to direnv, which has its own allow list.
//!
//! Project files are opened without following a symbolic link in the last
//! component (the work dir itself is a real path; the walk that finds the
//! `*.nix` files opens each directory relative to its parent, never through
//! a link), as regular files of bounded size, and the bytes that are
//! hashed are the bytes that are used.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::file::{self, ConfigFileError, PROJECT_CONFIG};
pub use crate::config::file_pattern::FilePattern;
use crate::guest_env::devshell;
use crate::paths;

/// Largest project config read.
pub const CONFIG_LIMIT: u64 = 1 << 20;
/// Largest dev shell file read (lock files can be large).
pub const DEVSHELL_FILE_LIMIT: u64 = 16 << 20;
/// How far the walk that finds the `*.nix` files may go: past a bound it
/// fails, and the dev shell cannot be used.
#[derive(Debug, Clone, Copy)]
pub struct WalkBounds {
    /// Directory entries seen.
    pub entries: u64,
    pub time: Duration,
    /// Directories deep.
    pub depth: usize,
    /// Bytes of the sources together.
    pub bytes: u64,
}

impl WalkBounds {
    pub const DEFAULT: WalkBounds =
        WalkBounds { entries: 2_000_000, time: Duration::from_secs(20), depth: 64, bytes: 64 << 20 };
}

/// The trust records' directory under the data dir.
const TRUST_DIR: &str = "trust";
/// Bumped when a record's meaning changes; other versions are not trusted.
const RECORD_VERSION: u32 = 1;

/// A project file that cannot be trusted or a record that cannot be kept.
/// Never holds a file's content.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path} is a symbolic link: agentvm does not follow links in the project (the guest could plant one); replace it with the file itself")]
    Symlink { path: PathBuf },
    #[error("{path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error("{path} is larger than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is invalid, so it was not trusted: {source}")]
    Invalid { path: PathBuf, source: Box<ConfigFileError> },
    #[error("cannot write the trust record {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot remove the trust record {path}: {source}")]
    Remove { path: PathBuf, source: std::io::Error },
    #[error("the trust record {path} is damaged ({source}): run `agentvm trust --revoke {dir}`, then trust it again")]
    BadRecord { path: PathBuf, dir: PathBuf, source: RecordError },
    #[error("looking for the *.nix files of {dir} stopped: {why}. --devshell needs to know all of them: move that tree out of the project, or run without --devshell")]
    WalkLimit { dir: PathBuf, why: BoundHit },
    #[error("project dir {path}: {source}; pass an existing directory")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("project dir {path}: is not a directory; pass an existing directory")]
    NotADir { path: PathBuf },
    #[error(transparent)]
    Paths(#[from] paths::PathsError),
}

/// The bytes of `dir/name`, opened without following a symbolic link, as
/// a regular file of at most `limit` bytes; `None` if there is none.
pub fn read_project_file(dir: &Path, name: &str, limit: u64) -> Result<Option<Vec<u8>>, TrustError> {
    let path = dir.join(name);
    // O_NONBLOCK: a FIFO planted in the project must not hang the open.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path);
    match file {
        Ok(f) => read_bounded(f, path, limit).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(TrustError::Symlink { path }),
        Err(source) => Err(TrustError::Read { path, source }),
    }
}

/// The bytes of the open `file` (named `path`), a regular file of at most
/// `limit` bytes.
fn read_bounded(mut file: std::fs::File, path: PathBuf, limit: u64) -> Result<Vec<u8>, TrustError> {
    let meta = file.metadata().map_err(|source| TrustError::Read { path: path.clone(), source })?;
    if !meta.is_file() {
        return Err(TrustError::NotRegular { path });
    }
    let mut bytes = Vec::new();
    (&mut file)
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| TrustError::Read { path: path.clone(), source })?;
    if bytes.len() as u64 > limit {
        return Err(TrustError::TooLarge { path, limit });
    }
    Ok(bytes)
}

/// The [`WalkBounds`] bound the walk hit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundHit {
    #[error("the tree has more than {0} entries")]
    Entries(u64),
    #[error("it took longer than {0:?}")]
    Time(Duration),
    #[error("{rel} is more than {depth} directories deep")]
    Depth { rel: String, depth: usize },
    #[error("its dev shell files are larger than {0} bytes together")]
    Bytes(u64),
}

/// Why a trust record cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Read(Box<TrustError>),
    #[error("not a record: {0}")]
    NotARecord(#[from] serde_json::Error),
}

/// SHA-256 of `bytes`, in hex.
pub fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// One dev shell source as it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// SHA-256 (hex) of `bytes`.
    pub hash: String,
    pub bytes: Vec<u8>,
}

/// A project's dev shell sources: path relative to the work dir → file.
pub type Sources = BTreeMap<String, SourceFile>;

/// The project's dev shell sources as they are now: every `*.nix` file in
/// the tree below `work_dir` (a real path), [`devshell::KEY_FILES`] at its
/// top, and the files `files` (the `devshell_files` setting) name. The walk
/// does not follow symbolic links (a linked `*.nix` file is an error, a
/// linked directory is not entered), skips `.git` and names that are not
/// UTF-8, and is bounded by [`WalkBounds::DEFAULT`]: past a bound it fails
/// with [`TrustError::WalkLimit`]. A file `files` names is read the same
/// way, through no link (a linked file or directory on its path is an
/// error); one that is absent is no source.
pub fn devshell_sources(work_dir: &Path, files: &[FilePattern]) -> Result<Sources, TrustError> {
    devshell_sources_within(work_dir, files, WalkBounds::DEFAULT)
}

/// [`devshell_sources`] within `bounds`.
pub fn devshell_sources_within(
    work_dir: &Path,
    files: &[FilePattern],
    bounds: WalkBounds,
) -> Result<Sources, TrustError> {
    let root = open_dir(work_dir)?;
    let deadline = Instant::now() + bounds.time;
    let mut walk = Walk { work_dir, bounds, sources: Sources::new(), entries: 0, bytes: 0, deadline };
    walk.dir(root, "", 0)?;
    for pattern in files {
        walk.pattern(open_dir(work_dir)?, pattern)?;
    }
    Ok(walk.sources)
}

/// Whether `name` in the directory `dir` is a symbolic link.
fn is_symlink(dir: &OwnedFd, name: &str) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
}

/// Opens the directory `path` itself, not a link to one.
fn open_dir(path: &Path) -> Result<OwnedFd, TrustError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::open(path, flags, Mode::empty())
        .map_err(|e| TrustError::Read { path: path.to_path_buf(), source: e.into() })
}

/// Whether the entry `name`, at `rel` in the tree, is a dev shell source.
fn is_source(name: &str, rel: &str) -> bool {
    name.ends_with(".nix") || (rel == name && devshell::KEY_FILES.contains(&name))
}

/// The state of [`devshell_sources`]' walk.
struct Walk<'a> {
    work_dir: &'a Path,
    bounds: WalkBounds,
    sources: Sources,
    entries: u64,
    bytes: u64,
    deadline: Instant,
}

impl Walk<'_> {
    /// Reads the directory `fd` (at `rel`, `depth` levels down) and below.
    fn dir(&mut self, fd: OwnedFd, rel: &str, depth: usize) -> Result<(), TrustError> {
        let path = self.work_dir.join(rel);
        let fail = |e: Errno| TrustError::Read { path: path.clone(), source: e.into() };
        let mut dir = Dir::new(fd).map_err(fail)?;
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(fail)?;
            // Left out, so never evaluated: .git (git's, not the project's
            // sources) and names Nix sources cannot have (not UTF-8).
            let Ok(name) = entry.file_name().to_str() else { continue };
            if matches!(name, "." | ".." | ".git") {
                continue;
            }
            self.count()?;
            let child = if rel.is_empty() { name.to_string() } else { format!("{rel}/{name}") };
            let dir_fd = dir.fd().map_err(fail)?;
            let kind = match entry.file_type() {
                FileType::Unknown => rustix::fs::statat(dir_fd, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_or(FileType::Unknown, |st| FileType::from_raw_mode(st.st_mode)),
                kind => kind,
            };
            if kind == FileType::Directory {
                self.subdir(dir_fd, name, &child, depth + 1)?;
            } else if is_source(name, &child) {
                self.source(dir_fd, name, child)?;
            }
        }
        Ok(())
    }

    /// Enters the directory `name` of `parent`, unless it is no longer one.
    fn subdir(&mut self, parent: BorrowedFd, name: &str, rel: &str, depth: usize) -> Result<(), TrustError> {
        if depth > self.bounds.depth {
            return Err(self.limit(BoundHit::Depth { rel: rel.to_string(), depth: self.bounds.depth }));
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(parent, name, flags, Mode::empty()) {
            Ok(fd) => self.dir(fd, rel, depth),
            // Replaced or removed since it was listed: there is nothing to walk.
            Err(Errno::LOOP | Errno::NOTDIR | Errno::NOENT) => Ok(()),
            Err(e) => Err(TrustError::Read { path: self.work_dir.join(rel), source: e.into() }),
        }
    }

    /// Reads the source `name` of `parent` (at `rel`).
    fn source(&mut self, parent: BorrowedFd, name: &str, rel: String) -> Result<(), TrustError> {
        let path = self.work_dir.join(&rel);
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(parent, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(()),
            Err(Errno::LOOP) => return Err(TrustError::Symlink { path }),
            Err(e) => return Err(TrustError::Read { path, source: e.into() }),
        };
        let bytes = read_bounded(std::fs::File::from(fd), path, DEVSHELL_FILE_LIMIT)?;
        self.bytes += bytes.len() as u64;
        if self.bytes > self.bounds.bytes {
            return Err(self.limit(BoundHit::Bytes(self.bounds.bytes)));
        }
        self.sources.insert(rel, SourceFile { hash: digest(&bytes), bytes });
        Ok(())
    }

    /// Reads the files `pattern` names, from the work dir `root` down.
    fn pattern(&mut self, root: OwnedFd, pattern: &FilePattern) -> Result<(), TrustError> {
        let Some((dir, rel)) = self.pattern_dir(root, pattern)? else { return Ok(()) };
        let child = |name: &str| if rel.is_empty() { name.to_string() } else { format!("{rel}/{name}") };
        if pattern.name.contains('*') {
            return self.matching(dir, &rel, pattern, child);
        }
        match self.sources.contains_key(&child(&pattern.name)) {
            true => Ok(()),
            false => self.source(dir.as_fd(), &pattern.name, child(&pattern.name)),
        }
    }

    /// The directory `pattern`'s file is in, opened from `root` one name
    /// at a time without following a link, and its path in the project;
    /// `None` if it does not exist.
    fn pattern_dir(&self, root: OwnedFd, pattern: &FilePattern) -> Result<Option<(OwnedFd, String)>, TrustError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut dir = root;
        let mut rel = String::new();
        for name in &pattern.dirs {
            rel = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
            let path = || self.work_dir.join(&rel);
            dir = match rustix::fs::openat(&dir, name.as_str(), flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => return Ok(None),
                Err(Errno::LOOP) => return Err(TrustError::Symlink { path: path() }),
                // O_DIRECTORY | O_NOFOLLOW on a link fails with ENOTDIR.
                Err(Errno::NOTDIR) if is_symlink(&dir, name) => return Err(TrustError::Symlink { path: path() }),
                Err(e) => return Err(TrustError::Read { path: path(), source: e.into() }),
            };
        }
        Ok(Some((dir, rel)))
    }

    /// Reads the files of `dir` (at `rel`) whose names match `pattern`'s
    /// last component; `child` makes a name a path in the project.
    fn matching(
        &mut self,
        dir: OwnedFd,
        rel: &str,
        pattern: &FilePattern,
        child: impl Fn(&str) -> String,
    ) -> Result<(), TrustError> {
        let path = self.work_dir.join(rel);
        let fail = |e: Errno| TrustError::Read { path: path.clone(), source: e.into() };
        let mut entries = Dir::new(dir).map_err(fail)?;
        while let Some(entry) = entries.read() {
            let entry = entry.map_err(fail)?;
            let Ok(name) = entry.file_name().to_str() else { continue };
            if matches!(name, "." | "..") || !pattern.matches_name(name) {
                continue;
            }
            self.count()?;
            let dir_fd = entries.fd().map_err(fail)?;
            let is_dir = rustix::fs::statat(dir_fd, name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
            // A pattern names files; a directory that matches is not one.
            if !is_dir && !self.sources.contains_key(&child(name)) {
                self.source(dir_fd, name, child(name))?;
            }
        }
        Ok(())
    }

    /// Counts one directory entry against the bounds.
    fn count(&mut self) -> Result<(), TrustError> {
        self.entries += 1;
        if self.entries > self.bounds.entries {
            return Err(self.limit(BoundHit::Entries(self.bounds.entries)));
        }
        if Instant::now() > self.deadline {
            return Err(self.limit(BoundHit::Time(self.bounds.time)));
        }
        Ok(())
    }

    fn limit(&self, why: BoundHit) -> TrustError {
        TrustError::WalkLimit { dir: self.work_dir.to_path_buf(), why }
    }
}

/// What the user trusted in one project: each file's hash as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    version: u32,
    /// The project (real path).
    pub work_dir: PathBuf,
    /// File name in the work dir → SHA-256 (hex) of the trusted content.
    /// A file not named here was absent when trusted.
    pub files: BTreeMap<String, String>,
}

/// How a file's current content stands against the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Same content as trusted (or absent, as it was when trusted).
    Trusted,
    /// There is no record, or the file was absent when trusted.
    NotTrusted,
    /// The content (or its presence) differs from what was trusted.
    Changed,
}

impl Record {
    /// A record trusting `files` (name, hash) of `work_dir`.
    pub fn new(work_dir: &Path, files: impl IntoIterator<Item = (String, String)>) -> Record {
        Record { version: RECORD_VERSION, work_dir: work_dir.to_path_buf(), files: files.into_iter().collect() }
    }

    /// `name`'s standing given its current hash (`None`: absent).
    pub fn verdict(record: Option<&Record>, name: &str, current: Option<&str>) -> Verdict {
        let Some(record) = record else {
            return if current.is_none() { Verdict::Trusted } else { Verdict::NotTrusted };
        };
        match (record.files.get(name).map(String::as_str), current) {
            (a, b) if a == b => Verdict::Trusted,
            (None, Some(_)) => Verdict::NotTrusted,
            _ => Verdict::Changed,
        }
    }

    /// The dev shell sources that are not as the record trusted them: new,
    /// changed, or trusted and now absent.
    pub fn untrusted_devshell_files(record: Option<&Record>, sources: &Sources) -> Vec<String> {
        let recorded = record.into_iter().flat_map(|r| r.files.keys()).filter(|n| *n != PROJECT_CONFIG);
        let names: std::collections::BTreeSet<&String> = sources.keys().chain(recorded).collect();
        names
            .into_iter()
            .filter(|name| {
                let current = sources.get(*name).map(|f| f.hash.as_str());
                Record::verdict(record, name, current) != Verdict::Trusted
            })
            .cloned()
            .collect()
    }
}

/// The per-project trust records.
#[derive(Debug, Clone)]
pub struct TrustStore {
    dir: PathBuf,
}

impl TrustStore {
    /// `$XDG_DATA_HOME/agentvm/trust`.
    pub fn default_location() -> Result<TrustStore, paths::PathsError> {
        Ok(TrustStore::at(paths::data_dir()?.join(TRUST_DIR)))
    }

    /// A store in `dir` (for tests).
    pub fn at(dir: impl Into<PathBuf>) -> TrustStore {
        TrustStore { dir: dir.into() }
    }

    /// Where the records are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The record file of the project at `work_dir` (a real path).
    pub fn record_path(&self, work_dir: &Path) -> PathBuf {
        self.dir.join(format!("{}.json", paths::project_home_name(work_dir)))
    }

    /// The project's record; `None` if there is none (or it is another
    /// project's, or of another version).
    pub fn load(&self, work_dir: &Path) -> Result<Option<Record>, TrustError> {
        let path = self.record_path(work_dir);
        let damaged =
            |source: RecordError| TrustError::BadRecord { path: path.clone(), dir: work_dir.to_path_buf(), source };
        let Some(bytes) = read_project_file(&self.dir, path.file_name().unwrap().to_str().unwrap(), CONFIG_LIMIT)
            .map_err(|e| damaged(RecordError::Read(Box::new(e))))?
        else {
            return Ok(None);
        };
        let record: Record = serde_json::from_slice(&bytes).map_err(|e| damaged(e.into()))?;
        Ok((record.version == RECORD_VERSION && record.work_dir == work_dir).then_some(record))
    }

    /// Writes the record atomically (a private temporary file, then a
    /// rename) and returns its path.
    pub fn save(&self, record: &Record) -> Result<PathBuf, TrustError> {
        let path = self.record_path(&record.work_dir);
        let fail = |source| TrustError::Write { path: path.clone(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(fail)?;
        let tmp = self.dir.join(format!(".{}.{}.tmp", path.file_name().unwrap().to_string_lossy(), std::process::id()));
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(e));
        }
        Ok(path)
    }

    /// Removes the project's record; `false` if there was none.
    pub fn revoke(&self, work_dir: &Path) -> Result<bool, TrustError> {
        let path = self.record_path(work_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(TrustError::Remove { path, source }),
        }
    }
}

/// The project config as far as a launch may use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectConfig {
    /// There is none.
    Absent,
    /// Its bytes, trusted as they are.
    Trusted(Vec<u8>),
    /// It is not used; the warning says why and what to do.
    Ignored(String),
}

/// Reads `work_dir`'s project config and keeps it only if its content is
/// trusted. A config that cannot be read safely is ignored too: nothing
/// that was not trusted can take effect.
pub fn project_config(work_dir: &Path, store: &TrustStore) -> Result<ProjectConfig, TrustError> {
    let path = work_dir.join(PROJECT_CONFIG);
    let bytes = match read_project_file(work_dir, PROJECT_CONFIG, CONFIG_LIMIT) {
        Ok(None) => return Ok(ProjectConfig::Absent),
        Ok(Some(b)) => b,
        Err(e) => return Ok(ProjectConfig::Ignored(format!("ignoring {}: {e}", path.display()))),
    };
    let record = store.load(work_dir)?;
    let hint = format!("review it, then run `agentvm trust {}` to use it", work_dir.display());
    Ok(match Record::verdict(record.as_ref(), PROJECT_CONFIG, Some(&digest(&bytes))) {
        Verdict::Trusted => ProjectConfig::Trusted(bytes),
        Verdict::NotTrusted => {
            ProjectConfig::Ignored(format!("ignoring {}: its content is not trusted; {hint}", path.display()))
        }
        Verdict::Changed => ProjectConfig::Ignored(format!(
            "ignoring {}: it changed since it was trusted (the guest can write it); {hint}",
            path.display()
        )),
    })
}

/// The project dir named on the command line, as a real path.
pub fn real_project_dir(dir: &Path) -> Result<PathBuf, TrustError> {
    let real = std::fs::canonicalize(dir).map_err(|source| TrustError::Dir { path: dir.to_path_buf(), source })?;
    if !real.is_dir() {
        return Err(TrustError::NotADir { path: dir.to_path_buf() });
    }
    Ok(real)
}

/// Trusts the project's config and dev shell files as they are now (an
/// invalid config is refused) and returns what was trusted, for the user.
/// The dev shell files include those `user_files` (the user config's
/// `devshell_files`) and the config's own `devshell_files` name.
pub fn trust(store: &TrustStore, work_dir: &Path, user_files: &[FilePattern]) -> Result<String, TrustError> {
    let mut files = Vec::new();
    let mut out = String::new();
    let mut patterns = user_files.to_vec();
    if let Some(bytes) = read_project_file(work_dir, PROJECT_CONFIG, CONFIG_LIMIT)? {
        let layer = parse_project_config(&bytes, work_dir)?;
        patterns.extend(layer.devshell_files);
        let hash = digest(&bytes);
        let _ = writeln!(out, "  {PROJECT_CONFIG:<18} sha256 {}, which sets:", &hash[..16]);
        for line in summarize(&String::from_utf8_lossy(&bytes)) {
            let _ = writeln!(out, "      {line}");
        }
        files.push((PROJECT_CONFIG.to_string(), hash));
    }
    match devshell_sources(work_dir, &patterns) {
        Ok(sources) => {
            for (name, file) in sources {
                let how = if is_nix_source(&name) { "evaluated" } else { "read" };
                let _ = writeln!(out, "  {name:<18} sha256 {} ({how} on this host by --devshell)", &file.hash[..16]);
                files.push((name, file.hash));
            }
        }
        // The config alone can still be trusted; --devshell will give the same error.
        Err(e) if !files.is_empty() => {
            let _ = writeln!(out, "  dev shell files: none recorded: {e}");
        }
        Err(e) => return Err(e),
    }
    for pattern in patterns.iter().filter(|p| !files.iter().any(|(name, _)| p.matches(name))) {
        let _ = writeln!(out, "  {:<18} devshell_files names it, but there is no such file", pattern.to_string());
    }
    if work_dir.join(".envrc").exists() {
        let _ = writeln!(out, "  {:<18} not recorded here: direnv decides (`direnv allow`)", ".envrc");
    }
    if files.is_empty() {
        store.revoke(work_dir)?;
        return Ok(format!(
            "{} has no {PROJECT_CONFIG} and no dev shell files (*.nix, {}): nothing to trust\n{out}",
            work_dir.display(),
            devshell::DATA_FILES.join(", ")
        ));
    }
    let path = store.save(&Record::new(work_dir, files))?;
    Ok(format!("trusted in {} (recorded in {}):\n{out}", work_dir.display(), path.display()))
}

/// Whether the dev shell source `rel` is one of the Nix files (found by
/// the walk, not named by `devshell_files`).
fn is_nix_source(rel: &str) -> bool {
    is_source(rel.rsplit('/').next().unwrap_or(rel), rel)
}

/// The `devshell_files` of the project's config, if it is trusted as it
/// is now (what a launch uses); none otherwise.
pub fn trusted_project_files(work_dir: &Path, store: &TrustStore) -> Result<Vec<FilePattern>, TrustError> {
    let ProjectConfig::Trusted(bytes) = project_config(work_dir, store)? else { return Ok(Vec::new()) };
    Ok(parse_project_config(&bytes, work_dir)?.devshell_files)
}

/// The project config of `work_dir` with content `bytes`, which must be valid to be trusted.
fn parse_project_config(bytes: &[u8], work_dir: &Path) -> Result<crate::config::RunOptions, TrustError> {
    let path = work_dir.join(PROJECT_CONFIG);
    file::parse_bytes(bytes, &path).map_err(|e| TrustError::Invalid { path, source: Box::new(e) })
}

/// What `agentvm trust` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Trust the files as they are now.
    Trust,
    /// Show what is trusted.
    Show,
    /// Forget what was trusted.
    Revoke,
}

/// `agentvm trust` on the project at `dir`, with the default store and
/// the user config's `devshell_files`: the text to print.
pub fn command(action: Action, dir: &Path, user_files: &[FilePattern]) -> Result<String, TrustError> {
    let store = TrustStore::default_location()?;
    let dir = real_project_dir(dir)?;
    match action {
        Action::Trust => trust(&store, &dir, user_files),
        Action::Show => show(&store, &dir, user_files),
        Action::Revoke if store.revoke(&dir)? => Ok(format!("{} is no longer trusted\n", dir.display())),
        Action::Revoke => Ok(format!("nothing was trusted in {}\n", dir.display())),
    }
}

/// What is trusted in the project, and how each file stands now (the dev
/// shell files with `user_files` and the trusted config's `devshell_files`).
pub fn show(store: &TrustStore, work_dir: &Path, user_files: &[FilePattern]) -> Result<String, TrustError> {
    let Some(record) = store.load(work_dir)? else {
        return Ok(format!("nothing is trusted in {}\n", work_dir.display()));
    };
    let mut out =
        format!("trusted in {} (recorded in {}):\n", work_dir.display(), store.record_path(work_dir).display());
    let config = read_project_file(work_dir, PROJECT_CONFIG, CONFIG_LIMIT).map(|b| b.map(|b| digest(&b)));
    show_file(&mut out, &record, PROJECT_CONFIG, config);
    let patterns = [user_files, &trusted_project_files(work_dir, store)?].concat();
    match devshell_sources(work_dir, &patterns) {
        Ok(sources) => {
            let recorded = record.files.keys().filter(|n| *n != PROJECT_CONFIG && !sources.contains_key(*n));
            let mut names: Vec<String> = sources.keys().chain(recorded).cloned().collect();
            names.sort();
            for name in names {
                let current = sources.get(&name).map(|f| f.hash.clone());
                show_file(&mut out, &record, &name, Ok(current));
            }
        }
        Err(e) => {
            let _ = writeln!(out, "  dev shell files: cannot be checked now: {e}");
        }
    }
    Ok(out)
}

/// One line of [`show`]: how `name`, whose hash is now `current`, stands.
fn show_file(out: &mut String, record: &Record, name: &str, current: Result<Option<String>, TrustError>) {
    let trusted = record.files.get(name);
    let state = match (current, trusted) {
        (Ok(None), None) => return,
        (Err(e), _) => format!("not trusted now: {e}"),
        (Ok(c), t) if c.as_ref() == t => "trusted, unchanged".to_string(),
        (Ok(None), Some(_)) => "trusted, but now absent".to_string(),
        (Ok(Some(_)), None) => "not trusted (new since)".to_string(),
        (Ok(Some(_)), Some(_)) => "not trusted: changed since it was trusted".to_string(),
    };
    let hash = trusted.map_or(String::new(), |h| format!(" (sha256 {})", &h[..16.min(h.len())]));
    let _ = writeln!(out, "  {name:<18} {state}{hash}");
}

/// One line per value the config sets, `a.b.c = value`, values as TOML
/// (control characters escaped); values of secret-looking `env` names are
/// hidden.
fn summarize(text: &str) -> Vec<String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
        for (key, value) in table {
            let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            match value {
                toml::Value::Table(t) => walk(&path, t, out),
                _ if prefix.ends_with(".env") && crate::config::flavor::looks_secret(key) => {
                    out.push(format!("{path} = (hidden)"))
                }
                v => out.push(format!("{path} = {v}")),
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(table) = text.parse::<toml::Table>() {
        walk("", &table, &mut out);
    }
    if out.is_empty() {
        out.push("(nothing)".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A FIFO at `path`, as a guest could plant one.
    fn make_fifo(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
            0,
        )
        .unwrap();
    }

    /// A project dir and a trust store apart from it.
    fn fixture() -> (tempfile::TempDir, PathBuf, TrustStore) {
        let d = tempfile::tempdir().unwrap();
        let work = d.path().join("project");
        std::fs::create_dir(&work).unwrap();
        let store = TrustStore::at(d.path().join("data/trust"));
        (d, work.canonicalize().unwrap(), store)
    }

    fn config(work: &Path, store: &TrustStore) -> ProjectConfig {
        project_config(work, store).unwrap()
    }

    #[test]
    fn untrusted_config_is_ignored_trusted_applies_and_a_change_untrusts_it() {
        let (_d, work, store) = fixture();
        assert_eq!(config(&work, &store), ProjectConfig::Absent);
        std::fs::write(work.join(PROJECT_CONFIG), "memory = \"2G\"\n").unwrap();
        let ProjectConfig::Ignored(w) = config(&work, &store) else { panic!("an untrusted config is used") };
        assert!(w.contains(&work.join(PROJECT_CONFIG).display().to_string()), "{w}");
        assert!(w.contains(&format!("agentvm trust {}", work.display())) && w.contains("not trusted"), "{w}");

        let shown = trust(&store, &work, &[]).unwrap();
        assert!(shown.contains("memory = \"2G\""), "{shown}");
        assert_eq!(config(&work, &store), ProjectConfig::Trusted(b"memory = \"2G\"\n".to_vec()));

        std::fs::write(work.join(PROJECT_CONFIG), "memory = \"2G\"\nhost_ports = [22]\n").unwrap();
        let ProjectConfig::Ignored(w) = config(&work, &store) else { panic!("a changed config is used") };
        assert!(w.contains("changed since it was trusted") && w.contains("agentvm trust"), "{w}");
        std::fs::write(work.join(PROJECT_CONFIG), "memory = \"2G\"\n").unwrap();
        assert!(matches!(config(&work, &store), ProjectConfig::Trusted(_)), "the trusted content again");

        assert!(store.revoke(&work).unwrap());
        assert!(matches!(config(&work, &store), ProjectConfig::Ignored(_)));
        assert!(!store.revoke(&work).unwrap());
    }

    #[test]
    fn symlinked_config_is_ignored_without_reading_its_target() {
        let (d, work, store) = fixture();
        let secret = d.path().join("host-secret");
        std::fs::write(&secret, "TOPSECRET-line = 1\n").unwrap();
        std::os::unix::fs::symlink(&secret, work.join(PROJECT_CONFIG)).unwrap();
        let ProjectConfig::Ignored(w) = config(&work, &store) else { panic!("a symlinked config is used") };
        assert!(w.contains("symbolic link") && !w.contains("TOPSECRET"), "{w}");
        let e = trust(&store, &work, &[]).unwrap_err().to_string();
        assert!(e.contains("symbolic link") && !e.contains("TOPSECRET"), "{e}");
        assert!(store.load(&work).unwrap().is_none());
    }

    #[test]
    fn fifo_directory_and_oversized_configs_are_ignored() {
        let (_d, work, store) = fixture();
        let path = work.join(PROJECT_CONFIG);
        make_fifo(&path);
        let ProjectConfig::Ignored(w) = config(&work, &store) else { panic!() };
        assert!(w.contains("not a regular file"), "{w}");
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(matches!(config(&work, &store), ProjectConfig::Ignored(_)));
        std::fs::remove_dir(&path).unwrap();
        std::fs::write(&path, vec![b'#'; CONFIG_LIMIT as usize + 1]).unwrap();
        let ProjectConfig::Ignored(w) = config(&work, &store) else { panic!() };
        assert!(w.contains("larger than"), "{w}");
    }

    #[test]
    fn invalid_config_is_not_trusted_and_the_error_shows_no_content() {
        let (_d, work, store) = fixture();
        std::fs::write(work.join(PROJECT_CONFIG), "# ok\nroot:$y$j9T$SECRETHASH:19000:0:99999:7:::\n").unwrap();
        let e = trust(&store, &work, &[]).unwrap_err().to_string();
        assert!(e.contains("line 2") && !e.contains("SECRETHASH"), "{e}");
        assert!(store.load(&work).unwrap().is_none());
    }

    #[test]
    fn records_are_private_per_project_and_atomic() {
        let (d, work, store) = fixture();
        std::fs::write(work.join(PROJECT_CONFIG), "cpus = 1\n").unwrap();
        std::fs::write(work.join("flake.nix"), "{}").unwrap();
        trust(&store, &work, &[]).unwrap();
        let path = store.record_path(&work);
        assert_eq!(path.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(store.dir().metadata().unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 1, "no temporary file is left");
        let record = store.load(&work).unwrap().unwrap();
        assert_eq!(record.files.keys().collect::<Vec<_>>(), [PROJECT_CONFIG, "flake.nix"]);
        // Another project with the same content is not trusted by it.
        let other = d.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join(PROJECT_CONFIG), "cpus = 1\n").unwrap();
        assert!(matches!(config(&other.canonicalize().unwrap(), &store), ProjectConfig::Ignored(_)));
        // A record naming another dir (a moved or forged file) counts for nothing.
        std::fs::copy(&path, store.record_path(&other.canonicalize().unwrap())).unwrap();
        assert!(matches!(config(&other.canonicalize().unwrap(), &store), ProjectConfig::Ignored(_)));
        std::fs::write(&path, "{").unwrap();
        let e = project_config(&work, &store).unwrap_err().to_string();
        assert!(e.contains("damaged") && e.contains("--revoke"), "{e}");
    }

    #[test]
    fn devshell_files_are_trusted_as_a_set() {
        let (_d, work, store) = fixture();
        let sources = || devshell_sources(&work, &[]).unwrap();
        let untrusted = |record: Option<&Record>| Record::untrusted_devshell_files(record, &sources());
        assert!(untrusted(None).is_empty(), "no files: nothing to trust");
        std::fs::write(work.join("flake.nix"), "{}").unwrap();
        assert_eq!(untrusted(None), ["flake.nix"]);
        trust(&store, &work, &[]).unwrap();
        let record = store.load(&work).unwrap();
        assert!(untrusted(record.as_ref()).is_empty());
        std::fs::write(work.join("flake.lock"), "{}").unwrap();
        assert_eq!(untrusted(record.as_ref()), ["flake.lock"], "a new file");
        std::fs::remove_file(work.join("flake.lock")).unwrap();
        std::fs::write(work.join("flake.nix"), "{ }").unwrap();
        assert_eq!(untrusted(record.as_ref()), ["flake.nix"], "a changed file");
        std::fs::remove_file(work.join("flake.nix")).unwrap();
        assert_eq!(untrusted(record.as_ref()), ["flake.nix"], "a removed file");
        std::os::unix::fs::symlink("/etc/passwd", work.join("flake.nix")).unwrap();
        assert!(matches!(devshell_sources(&work, &[]), Err(TrustError::Symlink { .. })));
    }

    #[test]
    fn every_nix_file_in_the_tree_is_a_source_and_links_and_git_are_not_followed() {
        let (d, work, store) = fixture();
        let write = |rel: &str, text: &str| {
            let path = work.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write("flake.nix", "{ outputs = _: import ./nix/shell.nix; }");
        write("nix/shell.nix", "{}");
        write("a/b/c/d/deep.nix", "{}");
        write("dir.nix/default.nix", "{}");
        write("sub/flake.lock", "not a source below the top");
        write("README.md", "not a source");
        write(".git/hooks/x.nix", "git's, not a source");
        write("vendor/.git/config.nix", "neither in a nested repo");
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("host.nix"), "a host file").unwrap();
        std::os::unix::fs::symlink(&outside, work.join("linked-dir")).unwrap();
        let names: Vec<String> = devshell_sources(&work, &[]).unwrap().into_keys().collect();
        assert_eq!(names, ["a/b/c/d/deep.nix", "dir.nix/default.nix", "flake.nix", "nix/shell.nix"]);

        trust(&store, &work, &[]).unwrap();
        let record = store.load(&work).unwrap();
        let untrusted = || Record::untrusted_devshell_files(record.as_ref(), &devshell_sources(&work, &[]).unwrap());
        assert!(untrusted().is_empty());
        write("nix/shell.nix", "{ evil = true; }");
        assert_eq!(untrusted(), ["nix/shell.nix"], "a changed import");
        write("nix/shell.nix", "{}");
        write("nix/new.nix", "{}");
        assert_eq!(untrusted(), ["nix/new.nix"], "a new file");
        std::fs::remove_file(work.join("nix/new.nix")).unwrap();
        std::fs::remove_file(work.join("a/b/c/d/deep.nix")).unwrap();
        assert_eq!(untrusted(), ["a/b/c/d/deep.nix"], "a removed file");

        std::os::unix::fs::symlink(outside.join("host.nix"), work.join("nix/link.nix")).unwrap();
        let e = devshell_sources(&work, &[]).unwrap_err();
        assert!(matches!(&e, TrustError::Symlink { path } if path.ends_with("nix/link.nix")), "{e}");
        std::fs::remove_file(work.join("nix/link.nix")).unwrap();
        make_fifo(&work.join("nix/fifo.nix"));
        assert!(
            matches!(devshell_sources(&work, &[]), Err(TrustError::NotRegular { .. })),
            "a FIFO does not hang the walk"
        );
    }

    fn patterns(list: &[&str]) -> Vec<FilePattern> {
        list.iter().map(|p| FilePattern::try_from(p.to_string()).unwrap()).collect()
    }

    #[test]
    fn devshell_files_are_read_like_the_nix_files_and_trusted_with_them() {
        let (d, work, store) = fixture();
        let write = |rel: &str, text: &str| {
            let path = work.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write("flake.nix", "{}");
        write("rust-toolchain.toml", "[toolchain]\nchannel = \"1.80\"\n");
        write("nix/data/a.json", "{}");
        write("nix/data/b.json", "[]");
        write("nix/data/.hidden.json", "not matched, as in the shell");
        write("nix/data/c.txt", "not matched");
        write("nix/data/d.json/inner", "a directory that matches is not entered");
        write("unlisted.toml", "not a source");
        let files = patterns(&["rust-toolchain.toml", "nix/data/*.json", "absent.txt", "nodir/*.json"]);
        let names: Vec<String> = devshell_sources(&work, &files).unwrap().into_keys().collect();
        assert_eq!(names, ["flake.nix", "nix/data/a.json", "nix/data/b.json", "rust-toolchain.toml"]);

        // `agentvm trust` lists them, and says which entry names nothing.
        let shown = trust(&store, &work, &files).unwrap();
        assert!(shown.contains("rust-toolchain.toml") && shown.contains("read on this host"), "{shown}");
        assert!(shown.contains("flake.nix") && shown.contains("evaluated on this host"), "{shown}");
        assert!(
            shown.contains("absent.txt") && shown.contains("nodir/*.json") && shown.contains("no such file"),
            "{shown}"
        );
        assert!(!shown.contains("nix/data/*.json   devshell_files names it"), "{shown}");
        let record = store.load(&work).unwrap();
        let untrusted = || Record::untrusted_devshell_files(record.as_ref(), &devshell_sources(&work, &files).unwrap());
        assert!(untrusted().is_empty());
        write("rust-toolchain.toml", "[toolchain]\nchannel = \"nightly\"\n");
        write("nix/data/new.json", "{}");
        std::fs::remove_file(work.join("nix/data/a.json")).unwrap();
        assert_eq!(
            untrusted(),
            ["nix/data/a.json", "nix/data/new.json", "rust-toolchain.toml"],
            "changed, new, removed"
        );
        // The record was made with them: without the setting they count as removed.
        write("rust-toolchain.toml", "[toolchain]\nchannel = \"1.80\"\n");
        let sources = devshell_sources(&work, &[]).unwrap();
        assert!(
            Record::untrusted_devshell_files(record.as_ref(), &sources).contains(&"rust-toolchain.toml".to_string())
        );

        // No link is followed, in the last component or before it; no FIFO hangs.
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("host.json"), "a host file").unwrap();
        std::os::unix::fs::symlink(&outside, work.join("linkdir")).unwrap();
        std::os::unix::fs::symlink(outside.join("host.json"), work.join("link.json")).unwrap();
        for (pattern, at) in [
            ("linkdir/host.json", "linkdir"),
            ("linkdir/*.json", "linkdir"),
            ("link.json", "link.json"),
            ("*.json", "link.json"),
        ] {
            let e = devshell_sources(&work, &patterns(&[pattern])).unwrap_err();
            assert!(matches!(&e, TrustError::Symlink { path } if path.ends_with(at)), "{pattern}: {e}");
        }
        make_fifo(&work.join("fifo.txt"));
        assert!(matches!(devshell_sources(&work, &patterns(&["fifo.txt"])), Err(TrustError::NotRegular { .. })));
        assert!(
            matches!(devshell_sources(&work, &patterns(&["nix"])), Err(TrustError::NotRegular { .. })),
            "a directory"
        );
        write("big.bin", "0123456789");
        let bounds = WalkBounds { bytes: 8, ..WalkBounds::DEFAULT };
        let e = devshell_sources_within(&work, &patterns(&["big.bin"]), bounds).unwrap_err().to_string();
        assert!(e.contains("larger than 8 bytes"), "{e}");
    }

    #[test]
    fn the_project_configs_devshell_files_count_once_it_is_trusted() {
        let (_d, work, store) = fixture();
        std::fs::write(work.join("flake.nix"), "{}").unwrap();
        std::fs::write(work.join("extra.txt"), "data").unwrap();
        std::fs::write(work.join(PROJECT_CONFIG), "devshell_files = [\"extra.txt\"]\n").unwrap();
        let shown = trust(&store, &work, &[]).unwrap();
        assert!(
            shown.contains("devshell_files = [\"extra.txt\"]") && shown.contains("extra.txt          sha256"),
            "{shown}"
        );
        let record = store.load(&work).unwrap().unwrap();
        assert_eq!(record.files.keys().collect::<Vec<_>>(), [PROJECT_CONFIG, "extra.txt", "flake.nix"]);
        assert_eq!(trusted_project_files(&work, &store).unwrap(), patterns(&["extra.txt"]));
        let s = show(&store, &work, &[]).unwrap();
        assert!(s.lines().any(|l| l.contains("extra.txt") && l.contains("trusted, unchanged")), "{s}");
        // Changed by the guest, the config is not used: neither are its devshell_files.
        std::fs::write(work.join(PROJECT_CONFIG), "devshell_files = [\"extra.txt\", \"more.txt\"]\n").unwrap();
        assert!(trusted_project_files(&work, &store).unwrap().is_empty());
        // A bad entry is refused with its place, not its content.
        std::fs::write(work.join(PROJECT_CONFIG), "cpus = 1\ndevshell_files = [\"../SECRET-NAME\"]\n").unwrap();
        let e = trust(&store, &work, &[]).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("`..`") && !e.contains("SECRET-NAME"), "{e}");
    }

    #[test]
    fn the_walk_is_bounded_and_says_which_bound_it_hit() {
        let (_d, work, store) = fixture();
        std::fs::write(work.join("flake.nix"), "{}").unwrap();
        for i in 0..20 {
            std::fs::write(work.join(format!("f{i}")), "").unwrap();
        }
        let bounds = WalkBounds::DEFAULT;
        assert_eq!(devshell_sources_within(&work, &[], bounds).unwrap().len(), 1);
        let e = devshell_sources_within(&work, &[], WalkBounds { entries: 10, ..bounds }).unwrap_err().to_string();
        assert!(e.contains("more than 10 entries") && e.contains("without --devshell"), "{e}");
        let e =
            devshell_sources_within(&work, &[], WalkBounds { time: Duration::ZERO, ..bounds }).unwrap_err().to_string();
        assert!(e.contains("took longer"), "{e}");
        let e = devshell_sources_within(&work, &[], WalkBounds { bytes: 1, ..bounds }).unwrap_err().to_string();
        assert!(e.contains("larger than 1 bytes"), "{e}");
        let deep: PathBuf = (0..=bounds.depth).map(|_| "d").collect();
        std::fs::create_dir_all(work.join(&deep)).unwrap();
        let e = devshell_sources(&work, &[]).unwrap_err().to_string();
        assert!(e.contains(&format!("more than {} directories deep", bounds.depth)), "{e}");

        // The config can still be trusted; the dev shell files are not recorded.
        std::fs::write(work.join(PROJECT_CONFIG), "cpus = 1\n").unwrap();
        let shown = trust(&store, &work, &[]).unwrap();
        assert!(shown.contains("none recorded") && shown.contains("directories deep"), "{shown}");
        assert_eq!(store.load(&work).unwrap().unwrap().files.keys().collect::<Vec<_>>(), [PROJECT_CONFIG]);
        std::fs::remove_file(work.join(PROJECT_CONFIG)).unwrap();
        assert!(trust(&store, &work, &[]).is_err(), "nothing else to trust: the error");
    }

    #[test]
    fn show_tells_each_files_standing_and_summary_escapes_control_characters() {
        let (_d, work, store) = fixture();
        assert!(show(&store, &work, &[]).unwrap().starts_with("nothing is trusted"));
        std::fs::write(
            work.join(PROJECT_CONFIG),
            "[flavors.x]\ncommand = [\"a\\u001b[2J\"]\nenv = { API_TOKEN = \"t0k\" }\n",
        )
        .unwrap();
        std::fs::write(work.join("flake.nix"), "{}").unwrap();
        let shown = trust(&store, &work, &[]).unwrap();
        assert!(!shown.contains('\u{1b}') && shown.contains("flavors.x.command"), "{shown}");
        assert!(shown.contains("flavors.x.env.API_TOKEN = (hidden)") && !shown.contains("t0k"), "{shown}");
        std::fs::write(work.join("flake.nix"), "{ }").unwrap();
        std::fs::write(work.join("devenv.nix"), "{ }").unwrap();
        let s = show(&store, &work, &[]).unwrap();
        assert!(s.contains(".agentvm.toml") && s.contains("trusted, unchanged"), "{s}");
        assert!(s.contains("flake.nix") && s.contains("changed since it was trusted"), "{s}");
        assert!(s.contains("devenv.nix") && s.contains("new since"), "{s}");
    }
}
