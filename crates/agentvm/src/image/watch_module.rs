//! The guest's watch module (`kmod/agentvm_notify.c`, see
//! [`agentvm_proto::watch`]): built against the image's exact kernel in a
//! throwaway root of the image's suite (its `linux-headers-<release>`, with
//! the compiler the kernel was built with), once per kernel release and
//! module source (cached in the store), and shipped beside the boot
//! modules. A failed build leaves the image without it: watching is then
//! off, with a line saying why, and the build log has the compiler's words.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::build::{Mode, Steps};
use super::error::ImageError;
use super::meta::MODULES_DIR;
use super::recipe::{hex, Recipe};
use agentvm_proto::watch::MODULE_FILE;

const SOURCE: &str = include_str!("../../kmod/agentvm_notify.c");
const MAKEFILE: &str = include_str!("../../kmod/Makefile");
/// Where the built modules are kept, in the images directory (hidden: not
/// an image, and no prune removes it).
const CACHE_DIR: &str = ".kmod";
/// The module's directory inside the build root.
const CHROOT_SRC: &str = "/tmp/agentvm-kmod";

/// The first 16 hex digits of the source's hash: a changed module is rebuilt.
fn source_key() -> String {
    let mut hash = Sha256::new();
    hash.update(SOURCE.as_bytes());
    hash.update(MAKEFILE.as_bytes());
    hex(&hash.finalize())[..16].to_string()
}

/// A kernel release as `uname -r` gives it; it goes into a package name
/// and a shell hook, so nothing else is let through.
fn valid_release(release: &str) -> bool {
    !release.is_empty()
        && release.len() <= 64
        && release.chars().all(|c| c.is_ascii_alphanumeric() || "+-._~".contains(c))
        && !release.starts_with(['-', '.'])
}

/// The cached module for `release` in the images directory `store`.
fn cached(store: &Path, release: &str) -> PathBuf {
    store.join(CACHE_DIR).join(format!("agentvm_notify-{release}-{}.ko", source_key()))
}

/// Puts the module for `release` into the image being built in `dir` (from
/// the cache, else built); `Ok(None)` when it could not be built.
pub(super) fn install(
    steps: &mut Steps,
    dir: &Path,
    recipe: &Recipe,
    mode: Mode,
    release: &str,
) -> Result<Option<String>, ImageError> {
    let dst = dir.join(MODULES_DIR).join(MODULE_FILE);
    if !valid_release(release) {
        steps.note(&format!("no watch module: kernel release {release:?} is not one to build for"))?;
        return Ok(None);
    }
    let store = dir.parent().unwrap_or(dir);
    let ko = cached(store, release);
    if !ko.is_file() {
        if let Err(e) = build(steps, dir, recipe, mode, release, &ko) {
            steps.note(&format!("no watch module: {e}"))?;
            return Ok(None);
        }
    }
    fs::copy(&ko, &dst).map_err(ImageError::io("cannot copy", &ko))?;
    Ok(Some(MODULE_FILE.to_string()))
}

/// Builds the module into `ko` (through a file beside it, renamed: builds
/// of two images may run at once).
fn build(
    steps: &mut Steps,
    dir: &Path,
    recipe: &Recipe,
    mode: Mode,
    release: &str,
    ko: &Path,
) -> Result<(), ImageError> {
    let src = dir.join("kmod-src");
    fs::create_dir_all(&src).map_err(ImageError::io("cannot create", &src))?;
    for (name, text) in [("agentvm_notify.c", SOURCE), ("Makefile", MAKEFILE)] {
        fs::write(src.join(name), text).map_err(ImageError::io("cannot write", src.join(name)))?;
    }
    let cache = ko.parent().expect("a file in the cache dir");
    fs::create_dir_all(cache).map_err(ImageError::io("cannot create", cache))?;
    let part = ko.with_extension(format!("ko.{}", std::process::id()));
    let ran = steps.run(&mut build_command(recipe, mode, release, &src, &part));
    let _ = fs::remove_dir_all(&src);
    ran?;
    fs::rename(&part, ko).map_err(ImageError::io("cannot rename", &part))
}

/// mmdebstrap making a root with the headers and the compiler, building
/// the module in it, copying it out to `out`, and keeping nothing else.
/// Paths go to the hooks in the environment, never in their text.
fn build_command(recipe: &Recipe, mode: Mode, release: &str, src: &Path, out: &Path) -> Command {
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=minbase")
        .arg(mode.as_arg())
        .arg("--format=null")
        .arg(format!("--include=linux-headers-{release},gcc,make,binutils"))
        .env("AGENTVM_KMOD_SRC", src)
        .env("AGENTVM_KMOD_OUT", out)
        .arg(format!("--customize-hook=mkdir -p \"$1{CHROOT_SRC}\" && cp \"$AGENTVM_KMOD_SRC\"/* \"$1{CHROOT_SRC}/\""))
        .arg(format!("--customize-hook=chroot \"$1\" make -C /usr/src/linux-headers-{release} M={CHROOT_SRC} modules"))
        .arg(format!("--customize-hook=chroot \"$1\" strip --strip-debug {CHROOT_SRC}/agentvm_notify.ko"))
        .arg(format!("--customize-hook=cp \"$1{CHROOT_SRC}/agentvm_notify.ko\" \"$AGENTVM_KMOD_OUT\""))
        .arg(&recipe.suite)
        .arg("/dev/null")
        .arg(&recipe.mirror);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_releases_are_built_for() {
        assert!(valid_release("6.12.117+deb13-cloud-amd64"));
        for bad in ["", "6.12 x", "6.12;rm -rf /", "$(id)", "../6.12", "-x", "6.12\"x"] {
            assert!(!valid_release(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_cache_names_the_release_and_the_source() {
        let ko = cached(Path::new("/s"), "6.12-cloud");
        let name = ko.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("agentvm_notify-6.12-cloud-") && name.ends_with(".ko"), "{name}");
        assert_eq!(ko.parent().unwrap(), Path::new("/s/.kmod"));
        assert_eq!(source_key().len(), 16);
    }

    #[test]
    fn the_build_takes_the_releases_headers_and_keeps_paths_out_of_hooks() {
        let cmd = build_command(&Recipe::base(), Mode::Unshare, "6.12-cloud", Path::new("/a b"), Path::new("/o"));
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.contains(&"--include=linux-headers-6.12-cloud,gcc,make,binutils".to_string()), "{args:?}");
        assert!(args.contains(&"--mode=unshare".to_string()) && args.contains(&"--format=null".to_string()));
        assert!(!args.iter().any(|a| a.contains("/a b")), "{args:?}");
        assert!(SOURCE.contains("MODULE_LICENSE(\"GPL\")"));
    }
}
