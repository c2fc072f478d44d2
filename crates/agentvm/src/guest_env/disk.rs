//! The guest's persistent ext4 disks (container storage, sandboxed clones):
//! sparse image files made without root, published whole, and locked for
//! one run at a time. The host only ever creates them: it never reads the
//! file system the guest wrote, which the guest could have crafted.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A disk that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot create the disk {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot create the disk {path}: cannot run mkfs.ext4 ({source}); install e2fsprogs")]
    NoMkfs { path: PathBuf, source: io::Error },
    /// mkfs.ext4 ran and failed: its own words (there is no error value).
    #[error("cannot create the disk {path}: mkfs.ext4 failed: {stderr}")]
    MkfsFailed { path: PathBuf, stderr: String },
    #[error("cannot grow the disk {path}: {source}")]
    Grow { path: PathBuf, source: io::Error },
}

/// Creates an empty ext4 disk of `size_mib` at `path` (sparse: it takes
/// only what is written), labelled `label`. Built beside it and renamed: an
/// interrupted mkfs leaves no disk.
pub fn create_ext4(path: &Path, size_mib: u64, label: &str) -> Result<(), DiskError> {
    let create_err = |source| DiskError::Create { path: path.to_path_buf(), source };
    let tmp = path.with_extension("ext4.tmp");
    let file = File::create(&tmp).map_err(create_err)?;
    file.set_len(size_mib * 1024 * 1024).map_err(create_err)?;
    drop(file);
    // No metadata checksums: under TCG they cost 15-20% of the time to
    // create or delete small files; the journal still keeps it consistent.
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-L", label, "-O", "^metadata_csum"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .arg(&tmp)
        .output()
        .map_err(|source| DiskError::NoMkfs { path: path.to_path_buf(), source })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(DiskError::MkfsFailed { path: path.to_path_buf(), stderr });
    }
    std::fs::rename(&tmp, path).map_err(create_err)
}

/// Makes the disk at `path` `size_mib` large if it is smaller (the guest
/// grows its file system to fill it); returns its size before, in MiB.
/// Disks never shrink.
pub fn grow(path: &Path, size_mib: u64) -> Result<u64, DiskError> {
    let err = |source| DiskError::Grow { path: path.to_path_buf(), source };
    let file = std::fs::OpenOptions::new().write(true).open(path).map_err(err)?;
    let before = file.metadata().map_err(err)?.len();
    if before < size_mib * 1024 * 1024 {
        file.set_len(size_mib * 1024 * 1024).map_err(err)?;
    }
    Ok(before >> 20)
}

/// The exclusive lock of the file at `lock_path` (created if missing), or
/// `None` while another process holds it.
pub fn try_lock(lock_path: &Path) -> io::Result<Option<File>> {
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(lock_path)?;
    Ok(crate::sys::lock(&file, crate::sys::Lock::TryExclusive).is_ok().then_some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_is_sparse_ext4_and_only_grows() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("d.ext4");
        create_ext4(&path, 64, "agentvm-test").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 16 << 20, "not sparse");
        assert!(!path.with_extension("ext4.tmp").exists());
        let features = std::process::Command::new("dumpe2fs").arg("-h").arg(&path).output().unwrap();
        let features = String::from_utf8_lossy(&features.stdout).into_owned();
        assert!(features.contains("has_journal") && !features.contains("metadata_csum"), "{features}");
        assert_eq!(grow(&path, 128).unwrap(), 64);
        assert_eq!(grow(&path, 32).unwrap(), 128);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 128 << 20);
    }

    #[test]
    fn a_lock_is_held_once() {
        let d = tempfile::tempdir().unwrap();
        let lock = d.path().join("x.lock");
        let held = try_lock(&lock).unwrap();
        assert!(held.is_some());
        // flock is per open file description: a second open is refused.
        assert!(try_lock(&lock).unwrap().is_none());
        drop(held);
        assert!(try_lock(&lock).unwrap().is_some());
    }
}
