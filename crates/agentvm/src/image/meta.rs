//! A built image on disk and its `image.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::ImageError;
use super::recipe::Recipe;

/// File name of the metadata in an image directory.
pub const META_FILE: &str = "image.json";
/// File name of the kernel (bzImage) in an image directory.
pub const KERNEL_FILE: &str = "vmlinuz";
/// The same kernel uncompressed, for a PVH boot; only when it has a PVH entry.
pub const PVH_KERNEL_FILE: &str = "vmlinux";
/// File name of the root file system in an image directory.
pub const ROOT_FILE: &str = "root.squashfs";
/// Directory of the uncompressed boot modules in an image directory.
pub const MODULES_DIR: &str = "modules";
/// File name of the concatenated build logs in an image directory.
pub const LOG_FILE: &str = "build.log";

/// What `image.json` records about an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// The recipe's name.
    pub name: String,
    /// The recipe's key (64 hex).
    pub key: String,
    /// The recipe it was built from.
    pub recipe: Recipe,
    /// `uname -r` of the kernel, e.g. "6.12.43+deb13-cloud-amd64".
    pub kernel_release: String,
    /// Boot module file names under `modules/`, in load order.
    pub modules: Vec<String>,
    /// The watch module's file under `modules/` (loaded only when the host
    /// sends its changes); None when its build failed or the image is older.
    #[serde(default)]
    pub watch_module: Option<String>,
    /// Build time, seconds since the Unix epoch.
    pub created: u64,
    /// Total size of the image directory in bytes.
    pub size_bytes: u64,
    /// The squashfs compressor used (e.g. "lz4").
    #[serde(default)]
    pub compressor: String,
    /// Installed versions of the recipe's packages, from the dpkg status.
    #[serde(default)]
    pub package_versions: BTreeMap<String, String>,
    /// The agentvm that built it ([`crate::build_info::VERSION_LONG`]);
    /// empty for an image built before agentvm recorded it.
    #[serde(default)]
    pub built_by: String,
}

/// A published image: its directory and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The image directory, `<images>/<name>-<key16>`.
    pub dir: PathBuf,
    /// Its `image.json`.
    pub meta: ImageMeta,
}

impl Image {
    /// Reads the image in `dir`; `None` when it has no `image.json`.
    pub fn load(dir: &Path) -> Result<Option<Image>, ImageError> {
        let path = dir.join(META_FILE);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io("cannot read", path)(e)),
        };
        let meta = serde_json::from_slice(&text).map_err(|source| ImageError::BadMeta { path, source })?;
        Ok(Some(Image { dir: dir.to_path_buf(), meta }))
    }

    /// The kernel to boot: the uncompressed PVH one where the build made
    /// it, else the bzImage.
    pub fn kernel(&self) -> PathBuf {
        let pvh = self.dir.join(PVH_KERNEL_FILE);
        if pvh.is_file() {
            pvh
        } else {
            self.bzimage()
        }
    }

    /// The compressed kernel (bzImage), which every image has.
    pub fn bzimage(&self) -> PathBuf {
        self.dir.join(KERNEL_FILE)
    }

    /// The root file system (squashfs).
    pub fn root(&self) -> PathBuf {
        self.dir.join(ROOT_FILE)
    }

    /// The boot modules (uncompressed `.ko`), in load order.
    pub fn module_paths(&self) -> Vec<PathBuf> {
        self.meta.modules.iter().map(|m| self.module_path(m)).collect()
    }

    /// One boot module's file, by its name in [`ImageMeta::modules`].
    pub fn module_path(&self, file: &str) -> PathBuf {
        self.dir.join(MODULES_DIR).join(file)
    }

    /// Whether the kernel, root and modules are all present.
    pub fn is_complete(&self) -> bool {
        self.kernel().is_file() && self.root().is_file() && self.module_paths().iter().all(|p| p.is_file())
    }
}

/// Parses the dpkg status file into installed package -> version, keeping only `wanted`.
pub fn installed_versions(status: &str, wanted: &[String]) -> BTreeMap<String, String> {
    let mut versions = BTreeMap::new();
    for para in status.split("\n\n") {
        let field = |name: &str| {
            para.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')).map(str::trim))
        };
        let (Some(package), Some(version), Some(state)) = (field("Package"), field("Version"), field("Status")) else {
            continue;
        };
        if state.ends_with(" installed") && wanted.iter().any(|w| w == package) {
            versions.insert(package.to_string(), version.to_string());
        }
    }
    versions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_versions_keeps_wanted_installed_packages() {
        let status = "Package: nodejs\nStatus: install ok installed\nArchitecture: amd64\nVersion: 20.19.2+dfsg-1\n\n\
Package: git\nStatus: deinstall ok config-files\nVersion: 1:2.47\n\n\
Package: jq\nStatus: install ok installed\nVersion: 1.7.1-6\n";
        let wanted = vec!["nodejs".to_string(), "git".to_string()];
        let v = installed_versions(status, &wanted);
        assert_eq!(v.len(), 1);
        assert_eq!(v["nodejs"], "20.19.2+dfsg-1");
    }
}
