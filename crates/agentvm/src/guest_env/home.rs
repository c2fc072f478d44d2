//! First-run comfort in the agent home, done on the host before boot.
//!
//! - `.gitconfig`: `[safe] directory = /work` (the project belongs to the
//!   host user, whose uid the guest may not share), and the host user's git
//!   identity when the file has none. Only appends; every existing byte is
//!   kept, and nothing is written when nothing is missing.
//! - The flavor's memory note (e.g. `.claude/CLAUDE.md`), created once and
//!   never touched again.
//!
//! The home is also the guest's `/home/agent`, so a guest (perhaps another
//! VM of the same project running now) controls what is in it. Nothing here
//! follows a symlink inside the home: paths are walked with `openat` and
//! `O_NOFOLLOW` from the home's directory fd, and a symlink where a file or
//! directory is expected is an error. A file is read only up to
//! [`MAX_READ`] bytes: a larger one is left alone, with a warning. Writes
//! are atomic: `.gitconfig` is replaced through git's own lock file
//! (`.gitconfig.lock`, created with `O_EXCL`, then renamed), and a new note
//! is written to a temporary file and hard-linked into place, so concurrent
//! launches never clobber each other or leave a half-written file.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, Mode, OFlags};

use super::GUEST_WORK;
use crate::config::flavor::Flavor;

/// Mode of files created here.
const FILE_MODE: libc::mode_t = 0o644;
/// Mode of directories created here.
const DIR_MODE: libc::mode_t = 0o700;
/// How long to wait for another writer's `.gitconfig.lock`.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// The largest home file read here. A real `.gitconfig` is a few KB; the
/// guest can put anything in the home, and a larger file is left alone.
pub const MAX_READ: u64 = 1 << 20;

/// Facts about the VM, for the memory note.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmFacts {
    /// Guest RAM, shared by programs and the RAM-backed root.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub cpus: u32,
}

/// A home file that could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{path} is a symlink or not a regular {kind}; agentvm does not follow or replace it (remove it to let agentvm create it)")]
    NotPlain { path: PathBuf, kind: &'static str },
    #[error("{path} is larger than the {limit} bytes agentvm reads from the agent home ({size} bytes); it was left alone, without the entries agentvm adds (a real one is a few KB: if this one is not yours, remove it)")]
    TooLarge { path: PathBuf, size: u64, limit: u64 },
    #[error(
        "{path} is being changed by another program ({lock} exists); if no git or agentvm is running, remove {lock}"
    )]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("memory note path {path:?} must be relative to the agent home, without '..'")]
    BadNotePath { path: String },
}

/// Prepares `home` for `flavor`: the `.gitconfig` entries and the memory
/// note. Every step is tried; the first failure is returned. The launch can
/// go on after a failure (the caller should print it as a warning).
/// `git_identity` (e.g. [`host_git_identity`], which runs git) is asked only
/// when the home's `.gitconfig` lacks a name or an email.
pub fn prepare(
    home: &Path,
    flavor: &Flavor,
    facts: &VmFacts,
    git_identity: impl FnOnce() -> Option<(String, String)>,
) -> Result<(), HomeError> {
    let git = ensure_gitconfig(home, git_identity);
    let note = match &flavor.memory_file {
        Some(rel) => write_note_once(home, rel, &memory_note(facts)).map(drop),
        None => Ok(()),
    };
    git.and(note)
}

/// The host user's `git config --global user.name` and `user.email`; None
/// if git is missing or either is unset. git runs in `/`, not in agentvm's
/// directory: that is usually the project, whose `.git` the guest writes.
pub fn host_git_identity() -> Option<(String, String)> {
    let get = |key: &str| {
        let out = Command::new("git")
            .args(["config", "--global", "--get", key])
            .current_dir("/")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let v = String::from_utf8(out.stdout).ok()?;
        let v = v.trim_end_matches(['\n', '\r']);
        (out.status.success() && !v.trim().is_empty()).then(|| v.to_string())
    };
    Some((get("user.name")?, get("user.email")?))
}

/// The memory note's text.
pub fn memory_note(facts: &VmFacts) -> String {
    format!(
        "# Running in an agentvm microVM\n\
         \n\
         You run inside a small Linux VM started by agentvm, as user `agent`, with passwordless sudo.\n\
         \n\
         - `/work` is the user's project, shared live with the host: changes there are real and persist.\n  \
           In a sandbox (`agentvm run --clone`), `/work` is instead a git clone of it on the sandbox's own\n  \
           disk; when the session ends your HEAD (plus your uncommitted work, as one more commit) goes back\n  \
           to the user as the branch `agentvm/NAME`. `git fetch host` brings the user's newer commits.\n\
         - `/home/agent` (your home, with this file) persists between sessions of this project.\n\
         - Everything else (`/`, `/tmp`, packages installed with apt or `npm -g`) is on a RAM-backed overlay\n  \
           and is lost when the VM powers off. Keep what must survive under `/work` or `/home/agent`.\n\
         - Memory is limited: the VM had {} MiB of RAM when this note was written, shared by all programs\n  \
           and by the RAM-backed files above. Avoid large files outside `/work`; check with `free -m`.\n\
         - CPUs: {} when this note was written (check with `nproc`).\n\
         - Network access may be restricted.\n\
         - The VM powers off when the session ends.\n",
        facts.memory_mib, facts.cpus
    )
}

// ---------------------------------------------------------------------------
// .gitconfig

/// What a git config file already says that we care about.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct GitFacts {
    safe_work: bool,
    user_name: bool,
    user_email: bool,
}

/// The text to append to a `.gitconfig` holding `text`; None when nothing
/// is missing.
fn gitconfig_addition(text: &str, identity: Option<(&str, &str)>) -> Option<String> {
    let facts = scan_gitconfig(text);
    let mut add = String::new();
    if !facts.safe_work {
        add.push_str(&format!("[safe]\n\tdirectory = {GUEST_WORK}\n"));
    }
    if let Some((name, email)) = identity.filter(|(n, e)| plain_value(n) && plain_value(e)) {
        let mut user = String::new();
        if !facts.user_name {
            user.push_str(&format!("\tname = {}\n", quote_value(name)));
        }
        if !facts.user_email {
            user.push_str(&format!("\temail = {}\n", quote_value(email)));
        }
        if !user.is_empty() {
            add.push_str("[user]\n");
            add.push_str(&user);
        }
    }
    if add.is_empty() {
        return None;
    }
    if !text.is_empty() && !text.ends_with('\n') {
        add.insert(0, '\n');
    }
    Some(add)
}

/// Values we are willing to write: non-empty, one line, no control chars.
fn plain_value(v: &str) -> bool {
    !v.trim().is_empty() && !v.chars().any(char::is_control)
}

fn quote_value(v: &str) -> String {
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Reads the parts of git's config syntax we need: section headers
/// (`[user]`, `[safe]`, with subsections told apart), keys (case-insensitive),
/// quoted values, escapes, comments and continuation lines.
fn scan_gitconfig(text: &str) -> GitFacts {
    let mut facts = GitFacts::default();
    let mut section = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let mut rest = line.trim_start();
        if let Some(h) = rest.strip_prefix('[') {
            let Some(end) = h.find(']') else { continue };
            section = normalize_section(&h[..end]);
            rest = h[end + 1..].trim_start();
        }
        if rest.is_empty() || rest.starts_with(['#', ';']) {
            continue;
        }
        let key_end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).unwrap_or(rest.len());
        let key = rest[..key_end].to_ascii_lowercase();
        let after = rest[key_end..].trim_start();
        let mut raw = match after.strip_prefix('=') {
            Some(v) => v.to_string(),
            None => String::new(), // `key` alone: boolean true
        };
        while raw.ends_with('\\') && !raw.ends_with("\\\\") {
            raw.pop();
            match lines.next() {
                Some(next) => raw.push_str(next),
                None => break,
            }
        }
        let value = parse_value(&raw);
        match (section.as_str(), key.as_str()) {
            // An empty safe.directory resets the list; `*` trusts everything.
            ("safe", "directory") => {
                facts.safe_work = value == GUEST_WORK || value == "*" || (facts.safe_work && !value.is_empty())
            }
            ("user", "name") => facts.user_name = true,
            ("user", "email") => facts.user_email = true,
            _ => {}
        }
    }
    facts
}

/// `user` → "user"; `Safe` → "safe"; `user "x"` or `user.x` → "user x"
/// (a subsection, which is not the section).
fn normalize_section(h: &str) -> String {
    let h = h.trim();
    match h.find(|c: char| c.is_whitespace() || c == '"' || c == '.') {
        Some(i) => format!("{} {}", h[..i].to_ascii_lowercase(), &h[i..]),
        None => h.to_ascii_lowercase(),
    }
}

/// A value as git reads it: quotes removed, escapes applied, comments and
/// surrounding whitespace outside quotes dropped.
fn parse_value(raw: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    let mut pending_space = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' => {
                let e = match chars.next() {
                    Some('n') => '\n',
                    Some('t') => '\t',
                    Some('b') => '\u{8}',
                    Some(o) => o,
                    None => break,
                };
                out.push_str(&std::mem::take(&mut pending_space));
                out.push(e);
            }
            '#' | ';' if !quoted => break,
            c if c.is_whitespace() && !quoted => {
                if !out.is_empty() {
                    pending_space.push(c);
                }
            }
            c => {
                out.push_str(&std::mem::take(&mut pending_space));
                out.push(c);
            }
        }
    }
    out
}

/// Ensures `home/.gitconfig` has the safe directory and, if missing and
/// `identity` gives one, the identity.
fn ensure_gitconfig(home: &Path, identity: impl FnOnce() -> Option<(String, String)>) -> Result<(), HomeError> {
    let path = home.join(".gitconfig");
    let lock_path = home.join(".gitconfig.lock");
    let dir = open_home(home)?;
    // Fast path without the lock: usually nothing is missing.
    let current = read_nofollow(&dir, ".gitconfig", &path)?;
    let text = text_of(&current);
    let known = scan_gitconfig(&text);
    let identity = if known.user_name && known.user_email { None } else { identity() };
    let identity = identity.as_ref().map(|(n, e)| (n.as_str(), e.as_str()));
    if gitconfig_addition(&text, identity).is_none() {
        return Ok(());
    }

    let lock = Lock::acquire(&dir, ".gitconfig.lock", &path, &lock_path)?;
    let current = read_nofollow(&dir, ".gitconfig", &path)?;
    let text = text_of(&current);
    let Some(add) = gitconfig_addition(&text, identity) else { return Ok(()) };
    let mut bytes = current.as_ref().map(|(b, _)| b.clone()).unwrap_or_default();
    bytes.extend_from_slice(add.as_bytes());
    let mode = current.as_ref().map_or(FILE_MODE, |(_, m)| *m);
    let fill = |f: &File| -> io::Result<()> {
        let mut w = f;
        w.write_all(&bytes)?;
        fchmod(f, mode)?;
        f.sync_all()
    };
    fill(&lock.file).map_err(|source| HomeError::Io { what: "write", path: lock_path, source })?;
    lock.commit(&dir, ".gitconfig").map_err(|source| HomeError::Io { what: "replace", path, source })
}

fn text_of(current: &Option<(Vec<u8>, libc::mode_t)>) -> String {
    current.as_ref().map(|(b, _)| String::from_utf8_lossy(b).into_owned()).unwrap_or_default()
}

/// git's lock protocol: `NAME.lock` created exclusively, filled, renamed
/// over `NAME`; removed if not committed.
struct Lock {
    file: File,
    /// The directory it is in (a copy of the caller's descriptor).
    dir: OwnedFd,
    name: CString,
    committed: bool,
}

impl Lock {
    fn acquire(dir: &OwnedFd, name: &str, path: &Path, lock_path: &Path) -> Result<Lock, HomeError> {
        let cname = cstr(name);
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            match openat(dir, &cname, flags, 0o600) {
                Ok(fd) => {
                    let dir =
                        dir.try_clone().map_err(|source| HomeError::Io { what: "open", path: path.into(), source })?;
                    return Ok(Lock { file: File::from(fd), dir, name: cname, committed: false });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(HomeError::Locked { path: path.into(), lock: lock_path.into() })
                }
                Err(source) => return Err(HomeError::Io { what: "create", path: lock_path.into(), source }),
            }
        }
    }

    fn commit(mut self, dir: &OwnedFd, target: &str) -> io::Result<()> {
        let t = cstr(target);
        rustix::fs::renameat(dir, self.name.as_c_str(), dir, t.as_c_str())?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if !self.committed {
            let _ = rustix::fs::unlinkat(&self.dir, self.name.as_c_str(), AtFlags::empty());
        }
    }
}

// ---------------------------------------------------------------------------
// The memory note

/// Writes `home/rel` with `contents` unless something exists there; true if
/// written. Missing parent directories are created (0700).
fn write_note_once(home: &Path, rel: &str, contents: &str) -> Result<bool, HomeError> {
    let bad = || HomeError::BadNotePath { path: rel.to_string() };
    let parts: Vec<&std::ffi::OsStr> = Path::new(rel)
        .components()
        .map(|c| match c {
            Component::Normal(p) => Ok(p),
            _ => Err(bad()),
        })
        .collect::<Result<_, _>>()?;
    let Some((file_name, parents)) = parts.split_last() else { return Err(bad()) };

    let mut dir = open_home(home)?;
    let mut dir_path = home.to_path_buf();
    for p in parents {
        dir_path.push(p);
        dir = open_or_create_dir(&dir, p, &dir_path)?;
    }
    let path = dir_path.join(file_name);
    let name = CString::new(file_name.as_bytes()).map_err(|_| bad())?;
    if exists_nofollow(&dir, &name).map_err(|source| HomeError::Io { what: "inspect", path: path.clone(), source })? {
        return Ok(false);
    }

    // Write a temporary file, then hard-link it into place: the link fails
    // if the name appeared meanwhile, so nothing is ever overwritten.
    let tmp = cstr(&format!(".{}.agentvm-{}.tmp", file_name.to_string_lossy(), unique()));
    let io_err = |what| {
        let path = path.clone();
        move |source| HomeError::Io { what, path, source }
    };
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let file = File::from(openat(&dir, &tmp, flags, 0o600).map_err(io_err("create a temporary file for"))?);
    let result = (|| {
        (&file).write_all(contents.as_bytes())?;
        fchmod(&file, FILE_MODE)?;
        file.sync_all()?;
        match rustix::fs::linkat(&dir, tmp.as_c_str(), &dir, name.as_c_str(), AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::EXIST) => Ok(false),
            Err(e) => Err(e.into()),
        }
    })();
    let _ = rustix::fs::unlinkat(&dir, tmp.as_c_str(), AtFlags::empty());
    result.map_err(io_err("write"))
}

// ---------------------------------------------------------------------------
// Small fd-relative helpers

pub(super) fn cstr(s: &str) -> CString {
    CString::new(s).expect("names built here hold no NUL")
}

pub(super) fn unique() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{}-{nanos}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub(super) fn openat(dir: &OwnedFd, name: &CString, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(dir, name.as_c_str(), OFlags::from_bits_retain(flags as u32), Mode::from_raw_mode(mode))?)
}

/// The home directory itself (chosen by the host user, so followed).
pub(super) fn open_home(home: &Path) -> Result<OwnedFd, HomeError> {
    rustix::fs::open(home, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| HomeError::Io { what: "open", path: home.into(), source: e.into() })
}

/// Opens the subdirectory `name` of `dir` without following a symlink,
/// creating it if missing.
pub(super) fn open_or_create_dir(dir: &OwnedFd, name: &std::ffi::OsStr, path: &Path) -> Result<OwnedFd, HomeError> {
    let c = CString::new(name.as_bytes()).map_err(|_| HomeError::NotPlain { path: path.into(), kind: "directory" })?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    for _ in 0..2 {
        match openat(dir, &c, flags, 0) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match rustix::fs::mkdirat(dir, c.as_c_str(), Mode::from_raw_mode(DIR_MODE)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => {
                        return Err(HomeError::Io { what: "create directory", path: path.into(), source: e.into() })
                    }
                }
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                return Err(HomeError::NotPlain { path: path.into(), kind: "directory" })
            }
            Err(source) => return Err(HomeError::Io { what: "open", path: path.into(), source }),
        }
    }
    Err(HomeError::NotPlain { path: path.into(), kind: "directory" })
}

/// The contents and permission bits of the regular file `name` in `dir`;
/// None if it does not exist; an error if it is a symlink, not a file, or
/// larger than [`MAX_READ`] (then nothing of it is read).
pub(super) fn read_nofollow(
    dir: &OwnedFd,
    name: &str,
    path: &Path,
) -> Result<Option<(Vec<u8>, libc::mode_t)>, HomeError> {
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    let fd = match openat(dir, &cstr(name), flags, 0) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(HomeError::NotPlain { path: path.into(), kind: "file" })
        }
        Err(source) => return Err(HomeError::Io { what: "open", path: path.into(), source }),
    };
    let mut file = File::from(fd);
    let meta = file.metadata().map_err(|source| HomeError::Io { what: "inspect", path: path.into(), source })?;
    if !meta.is_file() {
        return Err(HomeError::NotPlain { path: path.into(), kind: "file" });
    }
    let too_large = |size| HomeError::TooLarge { path: path.into(), size, limit: MAX_READ };
    if meta.len() > MAX_READ {
        return Err(too_large(meta.len()));
    }
    // The guest may be growing it right now: read at most one byte more.
    let mut bytes = Vec::new();
    (&mut file).take(MAX_READ + 1).read_to_end(&mut bytes).map_err(|source| HomeError::Io {
        what: "read",
        path: path.into(),
        source,
    })?;
    if bytes.len() as u64 > MAX_READ {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(Some((bytes, std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777)))
}

/// Whether anything (a symlink included) has the name `name` in `dir`.
fn exists_nofollow(dir: &OwnedFd, name: &CString) -> io::Result<bool> {
    match rustix::fs::statat(dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn fchmod(file: &File, mode: libc::mode_t) -> io::Result<()> {
    Ok(rustix::fs::fchmod(file, Mode::from_raw_mode(mode))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::flavor::builtin_flavors;
    use std::os::unix::fs::PermissionsExt;

    const FACTS: VmFacts = VmFacts { memory_mib: 4096, cpus: 4 };

    fn id() -> Option<(String, String)> {
        Some(("Jane \"JD\" Doe".into(), "jane@example.com".into()))
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn gitconfig_created_then_left_alone_on_second_run() {
        let d = tempfile::tempdir().unwrap();
        let shell = &builtin_flavors()["shell"];
        prepare(d.path(), shell, &FACTS, id).unwrap();
        let first = read(&d.path().join(".gitconfig"));
        assert_eq!(
            first,
            "[safe]\n\tdirectory = /work\n[user]\n\tname = \"Jane \\\"JD\\\" Doe\"\n\temail = \"jane@example.com\"\n"
        );
        let facts = scan_gitconfig(&first);
        assert!(facts.safe_work && facts.user_name && facts.user_email);
        prepare(d.path(), shell, &FACTS, || panic!("the identity is asked only when one is missing")).unwrap();
        assert_eq!(read(&d.path().join(".gitconfig")), first);
        assert!(!d.path().join(".gitconfig.lock").exists());
        let mode = std::fs::metadata(d.path().join(".gitconfig")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }

    #[test]
    fn gitconfig_existing_content_is_kept_byte_for_byte() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(".gitconfig");
        let original = "# mine\n[core]\n\teditor = vim ; comment\n[alias]\n  st = status";
        std::fs::write(&p, original).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        prepare(d.path(), &builtin_flavors()["shell"], &FACTS, || None).unwrap();
        let after = read(&p);
        assert_eq!(after, format!("{original}\n[safe]\n\tdirectory = /work\n"));
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600, "mode kept");
        prepare(d.path(), &builtin_flavors()["shell"], &FACTS, || None).unwrap();
        assert_eq!(read(&p), after);
    }

    #[test]
    fn gitconfig_with_safe_work_already_is_untouched() {
        for text in [
            "[safe]\n\tdirectory = /work\n",
            "[Safe]\n    Directory = \"/work\" # quoted\n",
            "[safe] directory=/work\n",
            "[safe]\n\tdirectory = *\n",
        ] {
            assert!(scan_gitconfig(text).safe_work, "{text:?}");
            assert_eq!(gitconfig_addition(text, None), None, "{text:?}");
        }
        for text in [
            "[safe \"x\"]\n\tdirectory = /work\n",
            "[safe]\n\tdirectory = /work2\n",
            "[safe]\n\tdirectory = /work\n\tdirectory =\n",
            "[core]\n\tdirectory = /work\n",
            "# [safe] directory = /work\n",
        ] {
            assert!(!scan_gitconfig(text).safe_work, "{text:?}");
        }
    }

    #[test]
    fn identity_does_not_override_existing_user() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(".gitconfig");
        std::fs::write(&p, "[user]\n\tname = Agent Smith\n").unwrap();
        prepare(d.path(), &builtin_flavors()["shell"], &FACTS, id).unwrap();
        let text = read(&p);
        assert!(text.starts_with("[user]\n\tname = Agent Smith\n"), "{text}");
        assert!(!text.contains("Jane"), "{text}");
        assert!(text.contains("\temail = \"jane@example.com\"\n"), "{text}");
        // A subsection is not [user].
        assert!(!scan_gitconfig("[user \"x\"]\n\tname = a\n").user_name);
        // Values with newlines are not written.
        assert_eq!(gitconfig_addition("[safe]\ndirectory=/work\n", Some(("a\nb", "e"))), None);
    }

    #[test]
    fn gitconfig_symlink_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, "host secret").unwrap();
        let home = d.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::symlink(&secret, home.join(".gitconfig")).unwrap();
        let e = prepare(&home, &builtin_flavors()["shell"], &FACTS, || None).unwrap_err();
        assert!(matches!(e, HomeError::NotPlain { .. }), "{e}");
        assert_eq!(read(&secret), "host secret");
        assert!(std::fs::symlink_metadata(home.join(".gitconfig")).unwrap().file_type().is_symlink());
    }

    /// The peak resident memory of this process so far, in KiB.
    fn peak_rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn huge_sparse_gitconfig_is_left_alone_without_reading_it() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(".gitconfig");
        std::fs::File::create(&p).unwrap().set_len(512 << 20).unwrap();
        let before = std::fs::metadata(&p).unwrap();
        let peak_before = peak_rss_kib();
        let result = prepare(d.path(), &builtin_flavors()["shell"], &FACTS, id);
        let grown_mib = (peak_rss_kib() - peak_before) / 1024;
        assert!(grown_mib < 32, "reading the home took {grown_mib} MiB more memory at its peak");
        let e = result.unwrap_err();
        assert!(matches!(e, HomeError::TooLarge { size: 536_870_912, .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(".gitconfig") && msg.contains("left alone") && msg.contains("remove it"), "{msg}");
        let after = std::fs::metadata(&p).unwrap();
        assert_eq!(
            (after.len(), after.mtime(), after.mtime_nsec()),
            (before.len(), before.mtime(), before.mtime_nsec())
        );
        assert!(!d.path().join(".gitconfig.lock").exists());
    }

    #[test]
    fn gitconfig_at_the_limit_is_read_and_one_byte_more_is_not() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(".gitconfig");
        let mut text = format!("[safe]\n\tdirectory = {GUEST_WORK}\n[user]\n\tname = a\n\temail = b\n#");
        text.push_str(&"x".repeat(MAX_READ as usize - text.len()));
        std::fs::write(&p, &text).unwrap();
        prepare(d.path(), &builtin_flavors()["shell"], &FACTS, || None).unwrap();
        text.push('x');
        std::fs::write(&p, &text).unwrap();
        let e = prepare(d.path(), &builtin_flavors()["shell"], &FACTS, || None).unwrap_err();
        assert!(matches!(e, HomeError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn stale_lock_is_reported() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(".gitconfig.lock"), "").unwrap();
        let e = prepare(d.path(), &builtin_flavors()["shell"], &FACTS, || None).unwrap_err().to_string();
        assert!(e.contains(".gitconfig.lock"), "{e}");
        assert!(d.path().join(".gitconfig.lock").exists(), "someone else's lock is left alone");
    }

    #[test]
    fn memory_note_created_once_never_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let claude = &builtin_flavors()["claude"];
        prepare(d.path(), claude, &FACTS, || None).unwrap();
        let note = d.path().join(".claude/CLAUDE.md");
        let text = read(&note);
        assert!(text.contains("4096 MiB") && text.contains("/work") && text.contains("sudo"), "{text}");
        assert_eq!(std::fs::metadata(&note).unwrap().permissions().mode() & 0o777, 0o644);
        let dir_mode = std::fs::metadata(d.path().join(".claude")).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);

        std::fs::write(&note, "my own notes").unwrap();
        prepare(d.path(), claude, &VmFacts { memory_mib: 512, cpus: 1 }, || None).unwrap();
        assert_eq!(read(&note), "my own notes");
        let leftovers: Vec<_> = std::fs::read_dir(d.path().join(".claude")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files remain");
    }

    #[test]
    fn memory_note_parent_symlink_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let home = d.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::symlink(&outside, home.join(".claude")).unwrap();
        let e = prepare(&home, &builtin_flavors()["claude"], &FACTS, || None).unwrap_err();
        assert!(matches!(e, HomeError::NotPlain { .. }), "{e}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert!(home.join(".gitconfig").exists(), "the other steps still ran");
    }

    #[test]
    fn memory_note_bad_path_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = write_note_once(d.path(), "../x.md", "x").unwrap_err();
        assert!(matches!(e, HomeError::BadNotePath { .. }));
        assert!(write_note_once(d.path(), "/etc/x", "x").is_err());
        assert!(write_note_once(d.path(), "", "x").is_err());
    }

    #[test]
    fn value_parsing_follows_git() {
        assert_eq!(parse_value(" /work "), "/work");
        assert_eq!(parse_value(" \"a b\" # c"), "a b");
        assert_eq!(parse_value("a\\\"b ; c"), "a\"b");
        assert_eq!(parse_value("x  y  "), "x  y");
    }
}
