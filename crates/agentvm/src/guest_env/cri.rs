//! Container runtimes in the guest (`--cri`, `ENABLE_CRI`): which ones, the
//! Debian packages they need, and the per-project disk that holds their
//! storage across runs.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// A container runtime the guest can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Runtime {
    Docker,
    Podman,
    Containerd,
    /// containerd with crun as its runtime.
    Crun,
}

/// Every name `--cri` accepts, for messages.
const NAMES: &str = "docker, podman, containerd, crun";

/// Debian packages each runtime needs (the clients included).
fn packages(r: Runtime) -> &'static [&'static str] {
    match r {
        Runtime::Docker => &["docker.io", "docker-cli", "docker-compose", "docker-buildx", "iptables"],
        // netavark, podman's network stack, runs `nft`.
        Runtime::Podman => &["podman", "crun", "buildah", "uidmap", "iptables", "nftables", "catatonit"],
        Runtime::Containerd => &["containerd", "runc", "containernetworking-plugins", "iptables"],
        Runtime::Crun => &["containerd", "crun", "containernetworking-plugins", "iptables"],
    }
}

impl Runtime {
    /// The name used on the command line and in the launch spec.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
            Runtime::Containerd => "containerd",
            Runtime::Crun => "crun",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Container runtime settings that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("container runtime {name:?} (from {source_name}) is unknown: use a comma-separated list of {NAMES}")]
    Unknown { name: String, source_name: &'static str },
    #[error("container runtime \"crio\" (from {0}) is not available: Debian trixie does not package CRI-O; use containerd or crun")]
    CrioUnpackaged(&'static str),
    /// The user's size text (no error lies under it).
    #[error("container disk size {0:?} is not a size: use e.g. 32G or 50000M")]
    DiskSize(String),
    #[error("cannot create the container disk {path}: {source}")]
    CreateDisk { path: PathBuf, source: io::Error },
    #[error("container disk: {0}")]
    Disk(#[from] super::disk::DiskError),
    #[error("the container disk {path} is in use by another run of this project; stop it (agentvm ps, agentvm stop) or run without --cri")]
    InUse { path: PathBuf },
    #[error("cannot remove the container disk {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
}

/// Parses a `--cri` / `ENABLE_CRI` list: comma-separated, spaces ignored,
/// empty items skipped, duplicates merged. `source_name` names where the
/// list came from in errors.
pub fn parse_list(list: &str, source_name: &'static str) -> Result<Vec<Runtime>, CriError> {
    let mut out = Vec::new();
    for item in list.split(',').map(|s| s.split_whitespace().collect::<String>()) {
        let r = match item.to_ascii_lowercase().as_str() {
            "" => continue,
            "docker" => Runtime::Docker,
            "podman" => Runtime::Podman,
            "containerd" => Runtime::Containerd,
            "crun" => Runtime::Crun,
            "crio" | "cri-o" => return Err(CriError::CrioUnpackaged(source_name)),
            _ => return Err(CriError::Unknown { name: item, source_name }),
        };
        if !out.contains(&r) {
            out.push(r);
        }
    }
    Ok(out)
}

/// Every runtime's Debian packages, sorted, without duplicates: they all go
/// into one image, so any choice of runtimes shares it.
pub fn all_packages() -> Vec<&'static str> {
    let all = [Runtime::Docker, Runtime::Podman, Runtime::Containerd, Runtime::Crun];
    let mut p: Vec<&str> = all.iter().flat_map(|r| packages(*r).iter().copied()).collect();
    p.sort_unstable();
    p.dedup();
    p
}

/// Default size of the container disk (sparse: it takes what is written).
pub const DEFAULT_DISK_MIB: u64 = 32 * 1024;

/// The project's container disk: an ext4 image file, sparse, attached to
/// the VM as a block device (overlayfs wants a real file system under it,
/// which virtiofs is not).
pub fn disk_path(data_dir: &Path, project_name: &str) -> PathBuf {
    data_dir.join("containers").join(format!("{project_name}.ext4"))
}

/// The container disk, locked for one run. The lock is held as long as
/// this lives, so two runs of a project never mount it at once.
#[derive(Debug)]
pub struct Disk {
    pub path: PathBuf,
    _lock: File,
}

/// Locks the disk at `path` and creates it (`size_mib`, ext4) if missing.
pub fn open_disk(path: &Path, size_mib: u64) -> Result<Disk, CriError> {
    let create_err = |source| CriError::CreateDisk { path: path.to_path_buf(), source };
    let dir = path.parent().expect("disk path has a parent");
    std::fs::create_dir_all(dir).map_err(create_err)?;
    let lock = lock_file(path)?;
    if !path.exists() {
        super::disk::create_ext4(path, size_mib, "agentvm-cri")?;
    }
    Ok(Disk { path: path.to_path_buf(), _lock: lock })
}

/// Removes the project's container disk (`agentvm cri prune`), unless a
/// run uses it. Returns whether there was one.
pub fn remove_disk(path: &Path) -> Result<bool, CriError> {
    if !path.exists() {
        return Ok(false);
    }
    let _lock = lock_file(path)?;
    std::fs::remove_file(path).map_err(|source| CriError::Remove { path: path.into(), source })?;
    Ok(true)
}

/// Takes the exclusive lock beside the disk; `InUse` when a run holds it.
fn lock_file(path: &Path) -> Result<File, CriError> {
    let lock_path = path.with_extension("ext4.lock");
    super::disk::try_lock(&lock_path)
        .map_err(|source| CriError::CreateDisk { path: lock_path.clone(), source })?
        .ok_or_else(|| CriError::InUse { path: path.to_path_buf() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_with_spaces_case_and_duplicates() {
        let got = parse_list(" docker, Podman ,,docker , c r u n", "--cri").unwrap();
        assert_eq!(got, [Runtime::Docker, Runtime::Podman, Runtime::Crun]);
        assert!(parse_list("", "--cri").unwrap().is_empty());
    }

    #[test]
    fn unknown_and_unpackaged_names_are_errors_naming_the_source() {
        let e = parse_list("docker,rkt", "ENABLE_CRI").unwrap_err().to_string();
        assert!(e.contains("\"rkt\"") && e.contains("ENABLE_CRI") && e.contains(NAMES), "{e}");
        let e = parse_list("crio", "--cri").unwrap_err().to_string();
        assert!(e.contains("does not package CRI-O"), "{e}");
    }

    #[test]
    fn packages_merge_without_duplicates() {
        let p = all_packages();
        assert_eq!(p.iter().filter(|n| **n == "iptables").count(), 1);
        assert!(p.contains(&"docker.io") && p.contains(&"podman") && p.contains(&"containerd") && p.contains(&"crun"));
    }

    /// `f`'s result, retried for a moment while the disk is in use: a child
    /// that another test forks holds a copy of the lock's descriptor until
    /// it execs, so the lock can outlive our drop by a few milliseconds.
    fn when_free<T>(f: impl Fn() -> Result<T, CriError>) -> T {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match f() {
                Err(CriError::InUse { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => return other.unwrap(),
            }
        }
    }

    #[test]
    fn disk_is_created_once_locked_and_removable_when_free() {
        let d = tempfile::tempdir().unwrap();
        let path = disk_path(d.path(), "proj-abc");
        let disk = open_disk(&path, 64).unwrap();
        assert!(path.is_file());
        assert!(matches!(open_disk(&path, 64), Err(CriError::InUse { .. })));
        assert!(matches!(remove_disk(&path), Err(CriError::InUse { .. })));
        drop(disk);
        // Reopening keeps the file (and what is on it).
        let before = std::fs::metadata(&path).unwrap().len();
        drop(when_free(|| open_disk(&path, 128)));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
        assert!(when_free(|| remove_disk(&path)));
        assert!(!path.exists());
        assert!(!remove_disk(&path).unwrap());
    }
}
