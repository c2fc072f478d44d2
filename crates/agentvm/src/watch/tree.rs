//! The project's directories under inotify: added recursively (never
//! through a symlink, never into `.git` or what `.gitignore` ignores), up
//! to a bound, and the kernel's events turned into [`Change`]s relative to
//! the project.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use agentvm_proto::watch::{valid_path, Change};
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use super::ignores::Ignores;

/// The most directories watched unless told otherwise: about 1 KiB of
/// kernel memory each.
pub const MAX_DIRS: usize = 65536;

/// What the project's directories are watched for.
const MASK: WatchMask = WatchMask::MODIFY
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DONT_FOLLOW)
    .union(WatchMask::ONLYDIR)
    .union(WatchMask::EXCL_UNLINK);

/// Why not every directory is watched (told once).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("watch: the host's inotify limit is reached after {watched} directories of {project}; changes in the others do not reach the VM's file watchers. Raise it: sudo sysctl fs.inotify.max_user_watches=524288 (and a line in /etc/sysctl.d/ to keep it)")]
    HostLimit { watched: usize, project: String },
    #[error("watch: {project} has over {bound} directories besides .git and what .gitignore ignores; changes in the others do not reach the VM's file watchers. Ignore build outputs in .gitignore, or run with --watch=false")]
    Bound { bound: usize, project: String },
}

/// The watched directories of one project.
pub struct Tree {
    inotify: Inotify,
    root: PathBuf,
    /// Each watch's directory, relative to the project (the root is empty).
    dirs: HashMap<WatchDescriptor, Vec<u8>>,
    ignores: Ignores,
    bound: usize,
    /// Set once a directory could not be watched for a limit.
    full: Option<Full>,
    told: bool,
}

impl Tree {
    /// Watches `root` and its directories, at most `bound` of them.
    pub fn new(root: &Path, bound: usize) -> io::Result<Tree> {
        let inotify = Inotify::init()?;
        let ignores = Ignores::new(root);
        let mut tree =
            Tree { inotify, root: root.to_path_buf(), dirs: HashMap::new(), ignores, bound, full: None, told: false };
        tree.add_dir(b"", &mut |_| {})?;
        Ok(tree)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    pub fn watched(&self) -> usize {
        self.dirs.len()
    }

    /// Why some directories are not watched, only the first time it is
    /// asked after it happened.
    pub fn take_full(&mut self) -> Option<Full> {
        if self.told {
            return None;
        }
        self.told = self.full.is_some();
        self.full.clone()
    }

    fn abs(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(OsStr::from_bytes(rel))
        }
    }

    /// Watches `rel` and the directories under it; `found` hears of every
    /// entry under it (for a new directory: what was made in it before its
    /// watch). Only the root's failure is an error.
    fn add_dir(&mut self, rel: &[u8], found: &mut dyn FnMut(Change)) -> io::Result<()> {
        let mut todo = vec![rel.to_vec()];
        while let Some(dir) = todo.pop() {
            if !self.watch(&dir)? {
                continue;
            }
            if !dir.is_empty() && self.abs(&dir).join(".gitignore").is_file() {
                self.ignores.load(&dir);
            }
            let Ok(entries) = std::fs::read_dir(self.abs(&dir)) else { continue };
            for entry in entries.flatten() {
                let Ok(kind) = entry.file_type() else { continue };
                let child = join(&dir, entry.file_name().as_bytes());
                if !valid_path(&child) || self.ignores.is_ignored(&child, kind.is_dir()) {
                    continue;
                }
                if !rel.is_empty() {
                    found(Change::Create { path: child.clone(), dir: kind.is_dir() });
                }
                if kind.is_dir() {
                    todo.push(child);
                }
            }
        }
        Ok(())
    }

    /// Adds one directory's watch; false when it is not watched (gone, not
    /// readable, or a limit reached). Only the root's failure is an error.
    fn watch(&mut self, dir: &[u8]) -> io::Result<bool> {
        if matches!(self.full, Some(Full::HostLimit { .. })) || self.dirs.len() >= self.bound {
            self.full.get_or_insert(Full::Bound { bound: self.bound, project: self.root.display().to_string() });
            return Ok(false);
        }
        match self.inotify.watches().add(self.abs(dir), MASK) {
            Ok(wd) => {
                self.dirs.insert(wd, dir.to_vec());
                Ok(true)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                let project = self.root.display().to_string();
                self.full.get_or_insert(Full::HostLimit { watched: self.dirs.len(), project });
                Ok(false)
            }
            Err(e) if dir.is_empty() => Err(e),
            Err(_) => Ok(false),
        }
    }
}

impl Tree {
    /// Reads the events the kernel has (none: returns at once) into `out`.
    pub fn read(&mut self, out: &mut dyn FnMut(Change)) -> io::Result<()> {
        let mut buf = [0u8; 64 << 10];
        loop {
            let events: Vec<(WatchDescriptor, EventMask, u32, Option<Vec<u8>>)> = match self
                .inotify
                .read_events(&mut buf)
            {
                Ok(events) => events.map(|e| (e.wd, e.mask, e.cookie, e.name.map(|n| n.as_bytes().to_vec()))).collect(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            let mut moves = Moves::default();
            for (wd, mask, cookie, name) in events {
                self.on_event(&wd, mask, cookie, name, &mut moves, out);
            }
            // A move whose other half is not in the project: a delete.
            for (from, dir) in moves.from.into_values() {
                self.forget(&from, dir);
                out(Change::Delete { path: from, dir });
            }
        }
    }

    fn on_event(
        &mut self,
        wd: &WatchDescriptor,
        mask: EventMask,
        cookie: u32,
        name: Option<Vec<u8>>,
        moves: &mut Moves,
        out: &mut dyn FnMut(Change),
    ) {
        if mask.contains(EventMask::Q_OVERFLOW) {
            return out(Change::Rescan);
        }
        if mask.contains(EventMask::IGNORED) {
            self.dirs.remove(wd);
            return;
        }
        let (Some(dir), Some(name)) = (self.dirs.get(wd), name) else { return };
        let path = join(dir, &name);
        let is_dir = mask.contains(EventMask::ISDIR);
        if !valid_path(&path) {
            return;
        }
        if name == b".gitignore" {
            let dir = dir.clone();
            self.ignores.load(&dir);
        }
        let ignored = self.ignores.is_ignored(&path, is_dir);
        if mask.contains(EventMask::MOVED_FROM) {
            if !ignored {
                moves.from.insert(cookie, (path, is_dir));
            }
        } else if mask.contains(EventMask::MOVED_TO) {
            match moves.from.remove(&cookie) {
                Some((from, _)) if ignored => {
                    self.forget(&from, is_dir);
                    out(Change::Delete { path: from, dir: is_dir });
                }
                Some((from, _)) => {
                    self.rename(&from, &path);
                    out(Change::Rename { from, to: path, dir: is_dir });
                }
                None if ignored => {}
                None => self.created(path, is_dir, out),
            }
        } else if !ignored {
            self.changed(mask, path, is_dir, out);
        }
    }

    /// A create, delete or modify of a path that is not ignored.
    fn changed(&mut self, mask: EventMask, path: Vec<u8>, is_dir: bool, out: &mut dyn FnMut(Change)) {
        if mask.contains(EventMask::CREATE) {
            self.created(path, is_dir, out);
        } else if mask.contains(EventMask::DELETE) {
            out(Change::Delete { path, dir: is_dir });
        } else if mask.contains(EventMask::MODIFY) {
            out(Change::Modify { path, dir: is_dir });
        }
    }

    /// A new entry: told, and a directory watched with what is already in it.
    fn created(&mut self, path: Vec<u8>, is_dir: bool, out: &mut dyn FnMut(Change)) {
        out(Change::Create { path: path.clone(), dir: is_dir });
        if is_dir {
            // Only the root's failure is an error, and this is not the root.
            let _ = self.add_dir(&path, out);
        }
    }

    /// The watches of a directory moved within the project follow it: their
    /// paths change.
    fn rename(&mut self, from: &[u8], to: &[u8]) {
        for dir in self.dirs.values_mut() {
            if let Some(rest) = under(dir, from) {
                *dir = [to, rest].concat();
            }
        }
    }

    /// A directory moved out of the project: its watches would report from
    /// outside it, so they go.
    fn forget(&mut self, path: &[u8], is_dir: bool) {
        if !is_dir {
            return;
        }
        let gone: Vec<WatchDescriptor> =
            self.dirs.iter().filter(|(_, d)| under(d, path).is_some()).map(|(wd, _)| wd.clone()).collect();
        for wd in gone {
            self.dirs.remove(&wd);
            let _ = self.inotify.watches().remove(wd);
        }
    }
}

/// The halves of moves seen so far in one read: cookie -> (path, is_dir).
#[derive(Default)]
struct Moves {
    from: HashMap<u32, (Vec<u8>, bool)>,
}

/// What follows `prefix` in `path` when `path` is `prefix` or under it.
fn under<'a>(path: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with(b"/")).then_some(rest)
}

/// `dir/name`, or `name` at the root.
fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}
