//! Building an agent layer into a directory: `npm install --global` with the
//! host's npm into a staging `/usr/local`, checks, then a squashfs whose
//! files all belong to root. The store publishes the result.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use super::build::{self, Steps};
use super::error::ImageError;
use super::layer::{self, LayerMeta, LayerRecipe, LAYER_FILE, LAYER_META_FILE, LAYER_PREFIX};
use super::progress::Progress;

/// The root the packages are installed under (`<staging>/usr/local`).
const STAGING_DIR: &str = "staging";
/// npm's cache (and its debug logs) for this build only, deleted after the
/// install: nothing lands in the user's `~/.npm`, which matters when the
/// build runs as root through sudo, and nothing stale is reused.
const NPM_CACHE_DIR: &str = "npm-cache";
/// Compressor of the layer's squashfs; lz4 decompresses fastest, and the
/// base image's kernel supports it (the base image uses it too).
pub(super) const LAYER_COMPRESSOR: &str = "lz4";

/// Checks that the host can build layers: npm, tar and tar2sqfs are installed.
pub(crate) fn check_host() -> Result<(), ImageError> {
    if crate::tools::find_program("npm", &[]).is_none() {
        return Err(ImageError::MissingNpm);
    }
    build::require_tool("tar", "tar")?;
    build::require_tool("tar2sqfs", "squashfs-tools-ng")?;
    Ok(())
}

/// Builds the layer of `recipe` into the empty directory `dir`, ending with
/// its `layer.json`. On error `dir` keeps the logs of the steps run.
pub(crate) fn build_layer_in(
    dir: &Path,
    recipe: &LayerRecipe,
    progress: &mut dyn Progress,
) -> Result<LayerMeta, ImageError> {
    let mut steps = Steps::new(dir, progress)?;
    let staging = dir.join(STAGING_DIR);
    let prefix = staging.join(LAYER_PREFIX);
    make_staging_root(&staging, &prefix)?;

    run_npm(&mut steps, dir, &prefix, recipe)?;
    build::remove_dir(&dir.join(NPM_CACHE_DIR))?;
    let versions = check_installed(recipe, dir, &prefix)?;

    make_squashfs(&mut steps, &staging, &dir.join(LAYER_FILE))?;
    build::remove_dir(&staging)?;

    steps.begin("metadata");
    build::collect_logs(dir)?;
    build::make_world_readable(dir)?;
    let mut meta = LayerMeta {
        name: recipe.name.clone(),
        key: recipe.key(),
        recipe: recipe.clone(),
        versions,
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        size_bytes: 0,
        compressor: LAYER_COMPRESSOR.to_string(),
        host_node: host_node_version(),
        built_by: crate::build_info::VERSION_LONG.to_string(),
    };
    meta.size_bytes = build::dir_size(dir)?;
    build::write_json(&dir.join(LAYER_META_FILE), &meta)?;
    Ok(meta)
}

/// Removes what a failed layer build leaves that is large (the staging
/// tree, the npm cache, the squashfs); the logs stay for the user to read.
pub(crate) fn discard_bulk(dir: &Path) {
    let _ = fs::remove_dir_all(dir.join(STAGING_DIR));
    let _ = fs::remove_dir_all(dir.join(NPM_CACHE_DIR));
    let _ = fs::remove_file(dir.join(LAYER_FILE));
}

/// Creates `<staging>/usr/local` with the modes the guest expects: overlayfs
/// takes a merged directory's attributes from its uppermost layer, so the
/// layer's `/`, `/usr` and `/usr/local` must look like the base's.
fn make_staging_root(staging: &Path, prefix: &Path) -> Result<(), ImageError> {
    fs::create_dir_all(prefix).map_err(ImageError::io("cannot create", prefix))?;
    for path in prefix.ancestors().take_while(|p| p.starts_with(staging)) {
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(ImageError::io("cannot chmod", path))?;
    }
    Ok(())
}

/// Step 1: the packages into `<prefix>` with the host's npm, as the calling
/// user. npm picks platform-specific optional dependencies (e.g. Claude
/// Code's native binary) for this host: x86-64 Linux with glibc, like the
/// guest. Install scripts run (Claude Code's links its binary); an addon
/// they compile targets the host's Node ABI, recorded as `host_node`.
fn run_npm(steps: &mut Steps, dir: &Path, prefix: &Path, recipe: &LayerRecipe) -> Result<(), ImageError> {
    let mut cmd = Command::new("npm");
    cmd.args(["install", "--global", "--prefix"])
        .arg(prefix)
        .arg("--cache")
        .arg(dir.join(NPM_CACHE_DIR))
        .args(["--no-audit", "--no-fund", "--loglevel=error"])
        .args(recipe.sorted_specs())
        .env("npm_config_update_notifier", "false")
        // node-gyp (packages that compile an addon) keeps headers here, not in ~/.cache.
        .env("npm_config_devdir", dir.join(NPM_CACHE_DIR).join("node-gyp"));
    steps.begin("npm install");
    steps.run(&mut cmd)
}

/// Checks what npm installed: each package's `package.json` has a version
/// (returned) and each command it declares is in `<prefix>/bin`; no symlink
/// points into the build directory (it would dangle in the guest).
fn check_installed(
    recipe: &LayerRecipe,
    dir: &Path,
    prefix: &Path,
) -> Result<std::collections::BTreeMap<String, String>, ImageError> {
    let bad = |reason: String| ImageError::BadLayer { name: recipe.name.clone(), reason };
    let manifest = |source| ImageError::LayerManifest { name: recipe.name.clone(), source };
    let node_modules = prefix.join("lib/node_modules");
    let packages = recipe.packages();
    let versions = layer::installed_versions(&node_modules, &packages).map_err(manifest)?;
    for package in &packages {
        for bin in layer::declared_bins(&node_modules, package).map_err(manifest)? {
            let path = prefix.join("bin").join(&bin);
            // metadata() follows the symlink: a dangling one fails too.
            if fs::metadata(&path).is_err() {
                return Err(bad(format!(
                    "{package} declares the command {bin:?}, but {} is missing or a dangling link",
                    path.display()
                )));
            }
        }
    }
    if let Some(link) = find_link_into(prefix, dir)? {
        return Err(bad(format!("{} points into the build directory {}", link.display(), dir.display())));
    }
    Ok(versions)
}

/// The first symlink under `root` whose absolute target lies in `dir`.
fn find_link_into(root: &Path, dir: &Path) -> Result<Option<std::path::PathBuf>, ImageError> {
    for entry in fs::read_dir(root).map_err(ImageError::io("cannot read", root))? {
        let entry = entry.map_err(ImageError::io("cannot read", root))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(ImageError::io("cannot stat", &path))?;
        if kind.is_symlink() {
            let target = fs::read_link(&path).map_err(ImageError::io("cannot read link", &path))?;
            if target.is_absolute() && target.starts_with(dir) {
                return Ok(Some(path));
            }
        } else if kind.is_dir() {
            if let Some(found) = find_link_into(&path, dir)? {
                return Ok(Some(found));
            }
        }
    }
    Ok(None)
}

/// Step 2: the staging root as a squashfs. tar records every file as
/// root's and drops group/other write; tar2sqfs packs the stream.
fn make_squashfs(steps: &mut Steps, staging: &Path, out: &Path) -> Result<(), ImageError> {
    let mut tar = Command::new("tar");
    tar.args(["--create", "--file=-", "--directory"]).arg(staging).args([
        "--owner=0",
        "--group=0",
        "--numeric-owner",
        "--mode=go-w,a+rX",
        "--sort=name",
        ".",
    ]);
    let mut squash = build::tar2sqfs(LAYER_COMPRESSOR, out);
    steps.begin("squashfs");
    steps.run_pipe(None, &mut tar, &mut squash)
}

/// `node --version` of the host, or "" when it cannot be run.
fn host_node_version() -> String {
    Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_link_into_flags_absolute_links_into_the_build_dir_only() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("staging/usr/local");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("lib/node_modules/x")).unwrap();
        std::os::unix::fs::symlink("../lib/node_modules/x/cli.js", root.join("bin/x")).unwrap();
        std::os::unix::fs::symlink("/usr/bin/env", root.join("bin/env")).unwrap();
        assert_eq!(find_link_into(&root, tmp.path()).unwrap(), None);
        let bad = root.join("lib/node_modules/x/bad");
        std::os::unix::fs::symlink(root.join("bin/x"), &bad).unwrap();
        assert_eq!(find_link_into(&root, tmp.path()).unwrap(), Some(bad));
    }

    #[test]
    fn make_staging_root_sets_0755_up_to_staging() {
        let tmp = tempfile::tempdir().unwrap();
        let staging = tmp.path().join("staging");
        let prefix = staging.join(LAYER_PREFIX);
        make_staging_root(&staging, &prefix).unwrap();
        for p in [&staging, &staging.join("usr"), &prefix] {
            assert_eq!(fs::metadata(p).unwrap().permissions().mode() & 0o777, 0o755);
        }
    }
}
