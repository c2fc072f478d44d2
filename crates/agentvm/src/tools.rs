//! Finding the host programs agentvm drives.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// `name` on this process's PATH, else the first of `extra` that is an
/// executable file.
pub fn find_program(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| find_in_path(name, &path));
    on_path.or_else(|| extra.iter().map(PathBuf::from).find(|p| is_executable(p)))
}

/// The first executable file `name` in the directories of `path`, a value
/// of PATH (this process's or another environment's).
pub fn find_in_path(name: &str, path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path).map(|dir| dir.join(name)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The QEMU binary for x86-64 guests.
pub fn find_qemu() -> Option<PathBuf> {
    find_program("qemu-system-x86_64", &[])
}

/// Where the guest init comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestInit {
    /// The one built into agentvm ([`crate::build_info::GUEST_INIT`]).
    BuiltIn,
    /// A file, named by `AGENTVM_GUEST_INIT` (for development).
    File(PathBuf),
}

impl std::fmt::Display for GuestInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestInit::BuiltIn => write!(f, "built in ({} bytes)", crate::build_info::GUEST_INIT.len()),
            GuestInit::File(path) => write!(f, "{} (AGENTVM_GUEST_INIT)", path.display()),
        }
    }
}

/// The guest init: the file `$AGENTVM_GUEST_INIT` names, else (unset or
/// empty) the one built into agentvm.
pub fn guest_init() -> GuestInit {
    match std::env::var_os("AGENTVM_GUEST_INIT").filter(|v| !v.is_empty()) {
        Some(path) => GuestInit::File(path.into()),
        None => GuestInit::BuiltIn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_on_path_and_not_a_missing_program() {
        assert!(find_program("sh", &[]).is_some());
        assert!(find_program("no-such-program-agentvm", &["/nonexistent"]).is_none());
        assert!(find_program("no-such-program-agentvm", &["/bin/sh"]).is_some(), "the extra places are tried last");
    }

    #[test]
    fn finds_in_a_given_path_only_executable_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("plain"), "").unwrap();
        let path = std::env::join_paths([Path::new("/nonexistent"), dir.path(), Path::new("/bin")]).unwrap();
        assert_eq!(find_in_path("sh", &path), Some(PathBuf::from("/bin/sh")));
        assert_eq!(find_in_path("plain", &path), None, "not executable");
        assert_eq!(find_in_path("sh", OsStr::new("")), None);
    }
}
