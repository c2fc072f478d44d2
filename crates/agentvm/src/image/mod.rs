//! Root images: a Debian root built with mmdebstrap, with its kernel and the
//! modules the guest init loads at boot, cached by the hash of its recipe.
//!
//! ```text
//! <images>/<name>-<key16>/
//!   vmlinuz          kernel (bzImage)
//!   root.squashfs    root file system
//!   modules/*.ko     boot modules, uncompressed, load order in image.json
//!   image.json       ImageMeta
//!   build.log        logs of the build steps
//! ```
//!
//! Images are built in a temporary directory next to the published ones and
//! renamed into place, so an interrupted build is never used; a lock file
//! per key keeps two processes from building the same image at once.

mod build;
mod error;
pub mod kmod;
mod meta;
mod progress;
mod recipe;
mod store;

pub use error::ImageError;
pub use meta::{Image, ImageMeta};
pub use progress::{NullProgress, Progress, TerminalProgress};
pub use recipe::{Recipe, BASE_PACKAGES, DEFAULT_MIRROR, DEFAULT_SUITE, RECIPE_FORMAT};
pub use store::Store;

#[cfg(test)]
mod real_build_tests {
    use super::*;

    /// Builds the base image for real (network, ~2-3 minutes, root or
    /// subordinate ids). The image goes to `$AGENTVM_IMAGE_TEST_DIR` if set
    /// (and stays there), else to a temporary directory.
    ///
    /// `cargo test -p agentvm image::real_build -- --ignored --nocapture`
    #[test]
    #[ignore = "builds a real image: needs network, mmdebstrap, tar2sqfs and minutes"]
    fn real_build_base_image_has_layout() {
        let keep_dir = std::env::var_os("AGENTVM_IMAGE_TEST_DIR").map(std::path::PathBuf::from);
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(keep_dir.unwrap_or_else(|| tmp.path().join("images")));
        let recipe = Recipe::base();
        let started = std::time::Instant::now();
        let image = store
            .build(&recipe, &mut TerminalProgress::labeled("image base"))
            .unwrap();
        eprintln!("built {} in {:.0?}", image.dir.display(), started.elapsed());
        eprintln!("{}", serde_json::to_string_pretty(&image.meta).unwrap());

        assert_eq!(image.dir, store.dir().join(recipe.dir_name()));
        assert!(std::fs::metadata(image.kernel()).unwrap().len() > 1 << 20);
        let mut magic = [0u8; 4];
        std::io::Read::read_exact(&mut std::fs::File::open(image.root()).unwrap(), &mut magic)
            .unwrap();
        assert_eq!(&magic, b"hsqs", "root is a squashfs");
        assert!(image.meta.modules.iter().any(|m| m == "virtio_blk.ko"));
        for module in image.module_paths() {
            let head = std::fs::read(&module).unwrap();
            assert_eq!(
                &head[..4],
                b"\x7fELF",
                "{} is uncompressed",
                module.display()
            );
        }
        assert!(image.dir.join("build.log").is_file());
        assert_eq!(store.find(&recipe).unwrap(), Some(image.clone()));
        let hidden: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".build-"))
            .collect();
        assert!(hidden.is_empty(), "temporary build dirs left: {hidden:?}");
    }

    /// A build that fails in mmdebstrap reports the step, command and log
    /// tail, and leaves nothing that `find` or `list` would return.
    #[test]
    #[ignore = "runs mmdebstrap: needs network and mmdebstrap"]
    fn real_build_unknown_suite_fails_with_step_and_log() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("images"));
        let mut recipe = Recipe::base();
        recipe.suite = "no-such-suite".into();
        let err = store
            .build(&recipe, &mut TerminalProgress::labeled("image bad"))
            .unwrap_err();
        eprintln!("{err}");
        let ImageError::StepFailed {
            step, command, log, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(step, "mmdebstrap");
        assert!(command.contains("no-such-suite"));
        assert!(log.is_file());
        assert!(store.find(&recipe).unwrap().is_none());
        assert!(store.list().unwrap().is_empty());
        assert_eq!(
            store.prune(&[]).unwrap().len(),
            1,
            "the dead build dir is pruned"
        );
    }
}
