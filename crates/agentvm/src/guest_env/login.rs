//! Log in once: the flavor's login files (its `login_files`, e.g. Claude
//! Code's `.claude/.credentials.json`) kept in a store of the user's,
//! `$XDG_DATA_HOME/agentvm/logins/<flavor>/` (0700, files 0600), which every
//! project's agent home shares (`--login=shared`, the default).
//!
//! The store is the host's own: no guest mounts it. The launcher copies it
//! into the home before boot and, while the VM runs, carries each change
//! across: a login file the guest changed goes to the store, one that
//! another VM put in the store comes to this home. Each copy is written to a
//! temporary file beside its target and renamed over it, so a reader (a CLI
//! in any VM, or another launcher) sees a whole version, never a partial
//! one; the agents' own ways of writing (Claude Code and Codex write a
//! temporary file and rename it, Gemini CLI rewrites the file in place)
//! all leave a plain file in the home, which is all this needs. A file in
//! the home is taken only once it held still for one poll and did not
//! change while read, so a half-done in-place write never reaches the
//! store. When both sides changed, the later change wins, and a change the
//! guest made is never overwritten before it was taken: the store's version
//! goes into the home only while the home holds still, swapped in
//! atomically (`RENAME_EXCHANGE`) and swapped back if the guest wrote in the
//! moment between.
//!
//! The home is guest-written: its files are reached from the home's
//! descriptor without following symlinks, read only when regular and at
//! most [`home::MAX_READ`] bytes (the helpers of [`home`]).

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::fs::AtFlags;
use sha2::{Digest, Sha256};

use super::home::{self, HomeError};
use crate::config::real_as_far_as_exists;
use crate::paths;

/// Where a flavor's login files live (`--login`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LoginMode {
    /// One login for every project, kept in a store of the user's and
    /// synced with each home.
    #[default]
    Shared,
    /// Each agent home keeps its own login.
    PerProject,
}

/// How often a running VM's home and the store are compared.
pub const POLL: Duration = Duration::from_millis(500);
/// Mode of the login files agentvm writes, and of the store's dirs.
const FILE_MODE: libc::mode_t = 0o600;
const STORE_DIR_MODE: u32 = 0o700;

/// A login file that could not be synced.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("the login file {path} would be inside the work dir {work}, which agentvm keeps the shared login out of: use an agent home outside the project (--home) or --login=per-project")]
    InsideWorkDir { path: PathBuf, work: PathBuf },
}

/// The store of `flavor`'s login files: `$XDG_DATA_HOME/agentvm/logins/<flavor>`.
pub fn store_dir(flavor: &str) -> Result<PathBuf, paths::PathsError> {
    Ok(paths::data_dir()?.join("logins").join(flavor))
}

/// A run's shared login: which files, between its home and the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Places {
    pub home: PathBuf,
    pub store: PathBuf,
    /// The flavor's `login_files`, relative to both.
    pub files: Vec<String>,
}

impl Places {
    /// The places of a run with `--login=shared` whose flavor has login
    /// files; None otherwise.
    pub fn for_run(settings: &crate::config::Settings) -> Result<Option<Places>, paths::PathsError> {
        let flavor = &settings.flavor;
        if settings.login != LoginMode::Shared || flavor.login_files.is_empty() {
            return Ok(None);
        }
        let (home, files) = (settings.home_dir.clone(), flavor.login_files.clone());
        Ok(Some(Places { home, store: store_dir(&flavor.name)?, files }))
    }
}

/// The login files of one run, kept in step between its home and the
/// store.
pub struct LoginSync {
    places: Places,
    files: Vec<Tracked>,
    /// What went wrong, each once, for the user.
    problems: Vec<String>,
}

/// What the guest or another VM last did to one login file, as far as
/// this sync knows.
struct Tracked {
    rel: String,
    /// The content both sides held when they last agreed (None: absent).
    agreed: Option<[u8; 32]>,
    /// The home's file at the previous poll: a change is taken once it held
    /// still for a poll.
    home_polled: Option<Stamp>,
    /// The home's file when its content was last looked at.
    home_taken: Option<Stamp>,
    /// The store's file when its content was last looked at.
    store_taken: Option<Stamp>,
}

/// Identifies one version of a file: a rename changes the inode, a write in
/// place the size or the modification time. `absent` for no file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    absent: bool,
}

const ABSENT: Stamp = Stamp { ino: 0, size: 0, mtime: (0, 0), absent: true };

impl LoginSync {
    /// The login files between the home and the store of `places`, for a
    /// run in `work_dir`; before boot: the store's version of each file goes
    /// into the home, or, where the store has none, the home's into the
    /// store (a login made before the store existed). Files that cannot be
    /// synced are left out, each with its problem.
    pub fn start(places: Places, work_dir: &Path) -> LoginSync {
        let mut sync = LoginSync { places, files: Vec::new(), problems: Vec::new() };
        if let Err(e) = make_store(&sync.places.store) {
            sync.problem(&e);
            return sync;
        }
        for rel in &sync.places.files.clone() {
            match sync.seed(rel, work_dir) {
                Ok(tracked) => sync.files.push(tracked),
                Err(e) => sync.problem(&e),
            }
        }
        sync
    }

    /// Brings one file's store version into the home (or the home's into an
    /// empty store).
    fn seed(&mut self, rel: &str, work_dir: &Path) -> Result<Tracked, LoginError> {
        let in_home = real_as_far_as_exists(&self.places.home).join(rel);
        if in_home.starts_with(work_dir) {
            return Err(LoginError::InsideWorkDir { path: in_home, work: work_dir.to_path_buf() });
        }
        let (home_stamp, home_bytes) = read_settled(&self.places.home, rel)?;
        let (store_stamp, store_bytes) = read_settled(&self.places.store, rel)?;
        let (home_taken, store_taken) = (Some(home_stamp), Some(store_stamp));
        let mut t = Tracked { rel: rel.to_string(), agreed: None, home_polled: None, home_taken, store_taken };
        match (store_bytes, home_bytes) {
            (Some(store), home) => {
                if home.as_deref() != Some(store.as_slice()) {
                    // Another VM of this project may be writing it: if so, its
                    // version goes to the store at the first poll.
                    if let (true, now) = write(&self.places.home, rel, &store, Some(home_stamp))? {
                        t.home_taken = Some(now);
                    }
                }
                t.agreed = Some(digest(&store));
            }
            (None, Some(home)) => {
                t.store_taken = Some(write(&self.places.store, rel, &home, None)?.1);
                t.agreed = Some(digest(&home));
            }
            (None, None) => {}
        }
        t.home_polled = t.home_taken;
        Ok(t)
    }

    /// One comparison of every file: a settled change in the home goes to
    /// the store, else a change in the store comes to the home.
    /// `settled`: nothing writes the home any more (the VM is off), so a
    /// change need not hold still first.
    pub fn poll(&mut self, settled: bool) {
        let places = self.places.clone();
        let mut problems = Vec::new();
        for t in &mut self.files {
            if let Err(e) = t.poll(&places, settled) {
                problems.push(e);
            }
        }
        for e in problems {
            self.problem(&e);
        }
    }

    /// What went wrong so far, each once.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    fn problem(&mut self, e: &LoginError) {
        let text = format!("login not shared: {e}");
        if !self.problems.contains(&text) {
            self.problems.push(text);
        }
    }

    /// Polls every [`POLL`] on a thread of its own until stopped.
    pub fn spawn(self) -> Running {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut sync = self;
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(POLL) {
                sync.poll(false);
            }
            sync.poll(true);
            sync
        });
        Running { stop, thread: Some(thread) }
    }
}

/// A sync polling on its thread; dropped unfinished (a launch that failed),
/// it stops without being waited for.
pub struct Running {
    stop: mpsc::Sender<()>,
    thread: Option<JoinHandle<LoginSync>>,
}

impl Running {
    /// Stops polling after a last comparison (call once the VM is off);
    /// every problem the sync had.
    pub fn finish(mut self) -> Vec<String> {
        let _ = self.stop.send(());
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(sync)) => sync.problems,
            _ => vec!["login not shared: the sync stopped unexpectedly".to_string()],
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.send(());
    }
}

impl Tracked {
    fn poll(&mut self, places: &Places, settled: bool) -> Result<(), LoginError> {
        let home_now = stat(&places.home, &self.rel)?;
        let held_still = settled || self.home_polled == Some(home_now);
        self.home_polled = Some(home_now);
        // A home that is changing wins once it holds still: the store's
        // version must not overwrite it meanwhile.
        if self.home_taken != Some(home_now) && (!held_still || self.take_home(places)?) {
            return Ok(());
        }
        let store_now = stat(&places.store, &self.rel)?;
        if self.store_taken != Some(store_now) {
            self.take_store(places)?;
        }
        Ok(())
    }

    /// Carries the home's version to the store if it differs from the one
    /// agreed; true if it did, or if the file changed while read (it is
    /// then left for the next poll).
    fn take_home(&mut self, places: &Places) -> Result<bool, LoginError> {
        let (stamp, bytes) = read_settled(&places.home, &self.rel)?;
        if Some(stamp) != self.home_polled {
            self.home_polled = Some(stamp);
            return Ok(true);
        }
        self.home_taken = Some(stamp);
        let version = bytes.as_deref().map(digest);
        if version == self.agreed {
            return Ok(false);
        }
        let store_stamp = match &bytes {
            Some(b) => write(&places.store, &self.rel, b, None)?.1,
            None => remove_if(&places.store, &self.rel, self.agreed)?,
        };
        self.store_taken = Some(store_stamp);
        self.agreed = version;
        Ok(true)
    }

    /// Brings the store's version into the home if it differs from the one
    /// agreed (another VM's login or refresh, or a log out).
    fn take_store(&mut self, places: &Places) -> Result<(), LoginError> {
        let (stamp, bytes) = read_settled(&places.store, &self.rel)?;
        let version = bytes.as_deref().map(digest);
        if version == self.agreed {
            self.store_taken = Some(stamp);
            return Ok(());
        }
        // Unless the guest just changed its file: that goes first.
        let home_was = self.home_taken.unwrap_or(ABSENT);
        let home_stamp = match &bytes {
            Some(b) => match write(&places.home, &self.rel, b, Some(home_was))? {
                (true, now) => now,
                (false, _) => return Ok(()),
            },
            None if stat(&places.home, &self.rel)? != home_was => return Ok(()),
            None => remove_if(&places.home, &self.rel, self.agreed)?,
        };
        self.store_taken = Some(stamp);
        self.home_taken = Some(home_stamp);
        self.home_polled = Some(home_stamp);
        self.agreed = version;
        Ok(())
    }
}

/// Creates the store's dirs (`logins/` and the flavor's), private to the
/// user even if they were not.
fn make_store(store: &Path) -> Result<(), LoginError> {
    let err = |source| LoginError::Io { what: "create the login store", path: store.into(), source };
    std::fs::DirBuilder::new().recursive(true).mode(STORE_DIR_MODE).create(store).map_err(err)?;
    for dir in [Some(store), store.parent()].into_iter().flatten() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(STORE_DIR_MODE)).map_err(err)?;
    }
    Ok(())
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `rel` split into its parent dirs and its file name.
fn split(rel: &str) -> (Vec<&OsStr>, &str) {
    let parts: Vec<&OsStr> = Path::new(rel)
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p),
            _ => None,
        })
        .collect();
    let name = parts.last().and_then(|n| n.to_str()).unwrap_or_default();
    (parts[..parts.len().saturating_sub(1)].to_vec(), name)
}

/// The dir holding `root/rel`, reached without following a symlink; None
/// if part of it is missing.
fn open_parent(root: &Path, rel: &str) -> Result<Option<(OwnedFd, String)>, LoginError> {
    let (parents, name) = split(rel);
    let mut dir = home::open_home(root)?;
    let mut path = root.to_path_buf();
    for p in parents {
        path.push(p);
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let c = std::ffi::CString::new(p.as_encoded_bytes()).expect("a path component holds no NUL");
        dir = match home::openat(&dir, &c, flags, 0) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                return Err(HomeError::NotPlain { path, kind: "directory" }.into())
            }
            Err(source) => return Err(LoginError::Io { what: "open", path, source }),
        };
    }
    Ok(Some((dir, name.to_string())))
}

/// The stamp of `root/rel` (not following a symlink).
fn stat(root: &Path, rel: &str) -> Result<Stamp, LoginError> {
    let Some((dir, name)) = open_parent(root, rel)? else { return Ok(ABSENT) };
    match rustix::fs::statat(&dir, home::cstr(&name).as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(stamp_of(&st)),
        Err(rustix::io::Errno::NOENT) => Ok(ABSENT),
        Err(e) => Err(LoginError::Io { what: "inspect", path: root.join(rel), source: e.into() }),
    }
}

fn stamp_of(st: &rustix::fs::Stat) -> Stamp {
    Stamp { ino: st.st_ino, size: st.st_size, mtime: (st.st_mtime, st.st_mtime_nsec as i64), absent: false }
}

/// `root/rel`'s content (None: absent) and its stamp, which held from
/// before the read to after it; a file that changed meanwhile gets the
/// stamp after, which then differs from the one polled.
fn read_settled(root: &Path, rel: &str) -> Result<(Stamp, Option<Vec<u8>>), LoginError> {
    let before = stat(root, rel)?;
    let bytes = match open_parent(root, rel)? {
        Some((dir, name)) => home::read_nofollow(&dir, &name, &root.join(rel))?.map(|(b, _)| b),
        None => None,
    };
    let after = stat(root, rel)?;
    Ok((if before == after { before } else { after }, bytes))
}

/// Replaces `root/rel` with `bytes` (mode 0600) through a temporary file
/// beside it, creating missing dirs (0700); whether it did, and the stamp
/// of the file there now. With `expected`, only if the file there still is
/// that version: a write the guest made a moment before is never lost.
fn write(root: &Path, rel: &str, bytes: &[u8], expected: Option<Stamp>) -> Result<(bool, Stamp), LoginError> {
    let (parents, name) = split(rel);
    let mut dir = home::open_home(root)?;
    let mut path = root.to_path_buf();
    for p in parents {
        path.push(p);
        dir = home::open_or_create_dir(&dir, p, &path)?;
    }
    let target = path.join(name);
    let tmp = home::cstr(&format!(".{name}.agentvm-{}.tmp", home::unique()));
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let io_err = |what| {
        let path = target.clone();
        move |source| LoginError::Io { what, path, source }
    };
    let file = File::from(home::openat(&dir, &tmp, flags, FILE_MODE).map_err(io_err("create a temporary file for"))?);
    let result = (|| {
        (&file).write_all(bytes)?;
        home::fchmod(&file, FILE_MODE)?;
        file.sync_all()?;
        put_in_place(&dir, &tmp, &home::cstr(name), expected)
    })();
    // Gone after a rename; the old file after a swap; ours if it failed.
    let _ = rustix::fs::unlinkat(&dir, tmp.as_c_str(), AtFlags::empty());
    let replaced = result.map_err(io_err("write"))?;
    Ok((replaced, stat(root, rel)?))
}

/// Renames `tmp` over `name` in `dir`; with `expected`, only if `name`
/// still is that version (else false): an absent one must stay absent
/// until the rename, and an existing one is swapped with `tmp` atomically
/// and swapped back if it was another version. Where the file system
/// cannot swap, a plain rename.
fn put_in_place(dir: &OwnedFd, tmp: &CStr, name: &CStr, expected: Option<Stamp>) -> io::Result<bool> {
    use rustix::fs::{renameat, renameat_with, RenameFlags};
    use rustix::io::Errno;
    let flags = match expected {
        None => RenameFlags::empty(),
        Some(e) if e.absent => RenameFlags::NOREPLACE,
        Some(_) => RenameFlags::EXCHANGE,
    };
    match renameat_with(dir, tmp, dir, name, flags) {
        Ok(()) => {}
        Err(Errno::EXIST) if flags == RenameFlags::NOREPLACE => return Ok(false),
        Err(Errno::INVAL) if !flags.is_empty() => {
            renameat(dir, tmp, dir, name)?;
            return Ok(true);
        }
        Err(e) => return Err(e.into()),
    }
    if flags != RenameFlags::EXCHANGE {
        return Ok(true);
    }
    let replaced = stamp_of(&rustix::fs::statat(dir, tmp, AtFlags::SYMLINK_NOFOLLOW)?);
    if Some(replaced) == expected {
        return Ok(true);
    }
    renameat_with(dir, tmp, dir, name, RenameFlags::EXCHANGE)?;
    Ok(false)
}

/// Removes `root/rel` if it still holds the version `agreed` (a newer one
/// is kept: it goes the other way at the next poll); the stamp after.
fn remove_if(root: &Path, rel: &str, agreed: Option<[u8; 32]>) -> Result<Stamp, LoginError> {
    let (_, bytes) = read_settled(root, rel)?;
    if let (Some(b), Some((dir, name))) = (bytes, open_parent(root, rel)?) {
        if Some(digest(&b)) == agreed {
            rustix::fs::unlinkat(&dir, home::cstr(&name).as_c_str(), AtFlags::empty()).map_err(|e| LoginError::Io {
                what: "remove",
                path: root.join(rel),
                source: e.into(),
            })?;
        }
    }
    stat(root, rel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::flavor::builtin_flavors;

    const CREDS: &str = ".claude/.credentials.json";

    /// A home, a store and a work dir apart, in one temporary dir.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            for d in ["home", "work"] {
                std::fs::create_dir(dir.path().join(d)).unwrap();
            }
            Fixture { dir }
        }
        fn places(&self) -> Places {
            let (home, store) = (self.dir.path().join("home"), self.dir.path().join("logins/claude"));
            Places { home, store, files: builtin_flavors()["claude"].login_files.clone() }
        }
        fn home(&self) -> PathBuf {
            self.places().home.join(CREDS)
        }
        fn store(&self) -> PathBuf {
            self.places().store.join(CREDS)
        }
        fn start(&self) -> LoginSync {
            LoginSync::start(self.places(), &self.dir.path().join("work"))
        }
    }

    fn put(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// As Claude Code and Codex write: a temporary file beside it, renamed.
    fn put_by_rename(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp.1234");
        put(&tmp, text);
        std::fs::rename(tmp, path).unwrap();
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_stores_login_comes_into_a_new_home_private_to_the_user() {
        let f = Fixture::new();
        put(&f.store(), "{\"token\":\"from the store\"}");
        let sync = f.start();
        assert!(sync.problems().is_empty(), "{:?}", sync.problems());
        assert_eq!(read(&f.home()), "{\"token\":\"from the store\"}");
        assert_eq!(mode(&f.home()), 0o600);
        assert_eq!(mode(f.home().parent().unwrap()), 0o700);
        assert_eq!(mode(&f.places().store), 0o700);
        let leftovers = std::fs::read_dir(f.home().parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file is left");
    }

    #[test]
    fn a_login_made_before_the_store_existed_goes_into_it_and_the_store_wins_over_an_old_home() {
        let f = Fixture::new();
        put(&f.home(), "old login");
        f.start();
        assert_eq!(read(&f.store()), "old login");
        assert_eq!(mode(&f.store()), 0o600);
        put(&f.store(), "newer login");
        f.start();
        assert_eq!(read(&f.home()), "newer login", "at launch the store's version counts");
    }

    #[test]
    fn a_change_in_the_home_reaches_the_store_once_it_held_still_for_a_poll() {
        let f = Fixture::new();
        put(&f.store(), "v1");
        let mut sync = f.start();
        put_by_rename(&f.home(), "v2 (refreshed in this VM)");
        sync.poll(false);
        assert_eq!(read(&f.store()), "v1", "a change is not taken at the poll that first sees it");
        sync.poll(false);
        assert_eq!(read(&f.store()), "v2 (refreshed in this VM)");
        assert_eq!(mode(&f.store()), 0o600);
        // Written in place (as Gemini CLI does), half-way at one poll: only
        // the whole version that held still is taken.
        std::fs::write(f.home(), "v3 (half").unwrap();
        sync.poll(false);
        std::fs::write(f.home(), "v3 (whole)").unwrap();
        sync.poll(false);
        assert_eq!(read(&f.store()), "v2 (refreshed in this VM)");
        sync.poll(false);
        assert_eq!(read(&f.store()), "v3 (whole)");
    }

    #[test]
    fn another_vms_change_in_the_store_reaches_the_home_and_a_log_out_goes_both_ways() {
        let f = Fixture::new();
        put(&f.store(), "v1");
        let mut sync = f.start();
        put_by_rename(&f.store(), "v2 (from another project)");
        sync.poll(false);
        assert_eq!(read(&f.home()), "v2 (from another project)");
        sync.poll(false);
        sync.poll(false);
        assert_eq!(read(&f.store()), "v2 (from another project)", "it does not come back as a change");

        std::fs::remove_file(f.home()).unwrap();
        sync.poll(false);
        sync.poll(false);
        assert!(!f.store().exists(), "logging out in one VM logs out the store");
        put(&f.store(), "v3 (logged in again elsewhere)");
        sync.poll(false);
        assert_eq!(read(&f.home()), "v3 (logged in again elsewhere)");
        std::fs::remove_file(f.store()).unwrap();
        sync.poll(false);
        assert!(!f.home().exists());
    }

    #[test]
    fn a_change_in_the_home_not_yet_taken_is_not_overwritten_by_the_stores() {
        let f = Fixture::new();
        put(&f.store(), "v1");
        let mut sync = f.start();
        put_by_rename(&f.home(), "v2 (this VM, just now)");
        put_by_rename(&f.store(), "v2 (another VM, a moment earlier)");
        sync.poll(false);
        assert_eq!(read(&f.home()), "v2 (this VM, just now)");
        sync.poll(false);
        assert_eq!(read(&f.store()), "v2 (this VM, just now)", "the later change wins");
        sync.poll(false);
        assert_eq!(read(&f.home()), "v2 (this VM, just now)");
    }

    #[test]
    fn a_version_the_guest_wrote_after_it_was_looked_at_is_never_replaced() {
        let f = Fixture::new();
        let (home, rel) = (f.places().home, CREDS);
        put(&f.home(), "guest v1");
        let looked_at = stat(&home, rel).unwrap();
        put_by_rename(&f.home(), "guest v2");
        assert!(!write(&home, rel, b"store", Some(looked_at)).unwrap().0);
        assert_eq!(read(&f.home()), "guest v2", "the swap was undone");
        assert!(!write(&home, rel, b"store", Some(ABSENT)).unwrap().0, "it is no longer absent");
        assert_eq!(read(&f.home()), "guest v2");
        let (replaced, now) = write(&home, rel, b"store", Some(stat(&home, rel).unwrap())).unwrap();
        assert!(replaced && now == stat(&home, rel).unwrap());
        assert_eq!(read(&f.home()), "store");
        let names = std::fs::read_dir(f.home().parent().unwrap()).unwrap().count();
        assert_eq!(names, 1, "no temporary file is left");
    }

    #[test]
    fn the_last_poll_after_the_vm_stopped_takes_a_change_at_once() {
        let f = Fixture::new();
        let mut sync = f.start();
        put(&f.home(), "logged in just before the exit");
        sync.poll(true);
        assert_eq!(read(&f.store()), "logged in just before the exit");
    }

    #[test]
    fn a_guest_made_symlink_is_not_followed_and_is_a_problem() {
        let f = Fixture::new();
        let outside = f.dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, f.places().home.join(".claude")).unwrap();
        put(&f.store(), "secret login");
        let sync = f.start();
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "nothing written through the link");
        assert!(sync.problems()[0].contains("symlink"), "{:?}", sync.problems());

        let f = Fixture::new();
        let target = f.dir.path().join("host-file");
        std::fs::write(&target, "host secret").unwrap();
        std::fs::create_dir(f.places().home.join(".claude")).unwrap();
        std::os::unix::fs::symlink(&target, f.home()).unwrap();
        let mut sync = f.start();
        sync.poll(true);
        assert!(!f.store().exists(), "a link's target is not read into the store");
        assert!(sync.problems()[0].contains("symlink"), "{:?}", sync.problems());
    }

    #[test]
    fn a_home_file_over_the_limit_is_not_taken() {
        let f = Fixture::new();
        put(&f.store(), "v1");
        let mut sync = f.start();
        std::fs::File::create(f.home()).unwrap().set_len(home::MAX_READ + 1).unwrap();
        sync.poll(true);
        assert_eq!(read(&f.store()), "v1");
        assert!(sync.problems()[0].contains("larger than"), "{:?}", sync.problems());
    }

    #[test]
    fn a_home_inside_the_work_dir_gets_no_shared_login() {
        let f = Fixture::new();
        let work = f.dir.path().join("work");
        let places = Places { home: work.join("agent-home"), ..f.places() };
        put(&places.store.join(CREDS), "secret login");
        let sync = LoginSync::start(places.clone(), &work);
        assert!(!places.home.join(CREDS).exists());
        assert!(sync.problems()[0].contains("inside the work dir"), "{:?}", sync.problems());
    }

    #[test]
    fn the_sync_thread_takes_a_change_and_stops_after_a_last_poll() {
        let f = Fixture::new();
        let running = f.start().spawn();
        put_by_rename(&f.home(), "v1");
        std::thread::sleep(POLL * 3);
        assert_eq!(read(&f.store()), "v1");
        put(&f.home(), "v2");
        let problems = running.finish();
        assert_eq!(read(&f.store()), "v2");
        assert!(problems.is_empty(), "{problems:?}");
    }
}
