//! Where agentvm keeps things: XDG directories and per-project names.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A directory that cannot be determined.
#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error("neither ${var} nor $HOME is set: set HOME (or {var}) to an absolute path")]
    NoHome { var: &'static str },
}

/// `$VAR` if it is an absolute path, else `$HOME/<fallback>` (the XDG rule).
fn xdg(var: &'static str, fallback: &str) -> Result<PathBuf, PathsError> {
    if let Some(v) = std::env::var_os(var).filter(|v| Path::new(v).is_absolute()) {
        return Ok(PathBuf::from(v));
    }
    std::env::var_os("HOME")
        .filter(|h| Path::new(h).is_absolute())
        .map(|h| Path::new(&h).join(fallback))
        .ok_or(PathsError::NoHome { var })
}

/// `$XDG_DATA_HOME/agentvm`: persistent per-project state (agent homes).
pub fn data_dir() -> Result<PathBuf, PathsError> {
    Ok(xdg("XDG_DATA_HOME", ".local/share")?.join("agentvm"))
}

/// `$XDG_DATA_HOME/agentvm/projects/<name>`: agentvm's own state for one
/// project (e.g. its dev shell cache), named like its agent home, so two
/// projects never share it.
pub fn project_state_dir(real_path: &Path) -> Result<PathBuf, PathsError> {
    Ok(data_dir()?.join("projects").join(project_home_name(real_path)))
}

/// `$XDG_CACHE_HOME/agentvm`: images, rebuildable.
pub fn cache_dir() -> Result<PathBuf, PathsError> {
    Ok(xdg("XDG_CACHE_HOME", ".cache")?.join("agentvm"))
}

/// `$XDG_CONFIG_HOME/agentvm/config.toml`: the user's settings.
pub fn user_config_file() -> Result<PathBuf, PathsError> {
    Ok(xdg("XDG_CONFIG_HOME", ".config")?.join("agentvm/config.toml"))
}

/// Base of the per-instance runtime dirs: `$XDG_RUNTIME_DIR/agentvm`, or
/// `/tmp/agentvm-<uid>` where there is no runtime dir (e.g. under su or cron).
pub fn runtime_base() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| Path::new(v).is_absolute()) {
        Some(dir) => Path::new(&dir).join("agentvm"),
        None => PathBuf::from(format!("/tmp/agentvm-{}", crate::sys::uid())),
    }
}

/// The agent home's directory name for a project: its base name reduced to
/// `[A-Za-z0-9_-]` (at most 24 characters), a dash, and the first 12 hex
/// digits of the SHA-256 of its real path, so equal names never collide.
pub fn project_home_name(real_path: &Path) -> String {
    let base: String = real_path
        .file_name()
        .unwrap_or(OsStr::new("root"))
        .to_string_lossy()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(24)
        .collect();
    let base = if base.is_empty() { "project".to_string() } else { base };
    let digest = Sha256::digest(real_path.as_os_str().as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{base}-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_home_name_is_sanitized_base_and_hash() {
        let n = project_home_name(Path::new("/home/u/src/my project!.v2"));
        let (base, hash) = n.rsplit_once('-').unwrap();
        assert_eq!(base, "myprojectv2");
        assert_eq!(hash.len(), 12);
        assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn same_base_name_in_two_places_differs() {
        assert_ne!(project_home_name(Path::new("/a/app")), project_home_name(Path::new("/b/app")));
    }

    #[test]
    fn root_and_odd_names_get_a_placeholder() {
        assert!(project_home_name(Path::new("/")).starts_with("root-"));
        assert!(project_home_name(Path::new("/x/???")).starts_with("project-"));
    }

    #[test]
    fn long_names_are_cut() {
        let n = project_home_name(Path::new("/x/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"));
        assert_eq!(n.len(), 24 + 1 + 12);
    }
}
