//! Root images: a Debian root built with mmdebstrap, with its kernel and the
//! modules the guest init loads at boot, cached by the hash of its recipe.
//!
//! ```text
//! <images>/<name>-<key16>/
//!   vmlinuz          kernel (bzImage)
//!   vmlinux          the same, uncompressed, when it has a PVH entry (booted instead)
//!   root.squashfs    root file system
//!   modules/*.ko     boot modules, uncompressed, load order in image.json
//!   image.json       ImageMeta
//!   build.log        logs of the build steps
//! ```
//!
//! Agent layers ([`LayerRecipe`], [`Layer`]) live next to the images: npm
//! packages installed with the host's npm under `/usr/local`, packed as a
//! squashfs that the guest mounts as an extra overlay lower layer above the
//! base root, so one base image serves every agent flavor.
//!
//! ```text
//! <images>/layer-<name>-<key16>/
//!   layer.squashfs   the layer's /usr/local (bin/, lib/node_modules/), owned by root
//!   layer.json       LayerMeta (resolved package versions)
//!   build.log        logs of the build steps
//! ```
//!
//! Images and layers are built in a temporary directory next to the
//! published ones and renamed into place, so an interrupted build is never
//! used; a lock file per key keeps two processes from building the same
//! image or layer at once.

mod build;
mod error;
mod flavor_recipes;
pub mod kmod;
mod layer;
mod layer_build;
mod meta;
mod progress;
mod pvh;
mod recipe;
mod store;
pub mod subids;
pub mod template;
mod watch_module;

pub use error::{ImageError, ManifestError};
pub use flavor_recipes::{base_recipe, layer_recipe};
pub use layer::{package_name, Layer, LayerMeta, LayerRecipe, LAYER_FILE, LAYER_FORMAT, LAYER_META_FILE};
pub use meta::{Image, ImageMeta};
pub use progress::{NullProgress, Progress, TerminalProgress};
/// Lowercase hex of bytes (image and template keys).
pub(crate) use recipe::hex;
pub use recipe::{Recipe, BASE_PACKAGES, DEFAULT_MIRROR, DEFAULT_SUITE, RECIPE_FORMAT};
pub use store::{CacheEntry, EntryKind, Store};

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
        let image = store.build(&recipe, &mut TerminalProgress::labeled("image base")).unwrap();
        eprintln!("built {} in {:.0?}", image.dir.display(), started.elapsed());
        eprintln!("{}", serde_json::to_string_pretty(&image.meta).unwrap());

        assert_eq!(image.dir, store.dir().join(recipe.dir_name()));
        assert_eq!(image.meta.built_by, crate::build_info::VERSION_LONG);
        assert!(std::fs::metadata(image.kernel()).unwrap().len() > 1 << 20);
        // Debian's kernels have CONFIG_PVH: the uncompressed one is booted.
        assert_eq!(image.kernel(), image.dir.join("vmlinux"));
        assert!(pvh::has_pvh_entry(&std::fs::read(image.kernel()).unwrap()));
        let mut magic = [0u8; 4];
        std::io::Read::read_exact(&mut std::fs::File::open(image.root()).unwrap(), &mut magic).unwrap();
        assert_eq!(&magic, b"hsqs", "root is a squashfs");
        assert!(image.meta.modules.iter().any(|m| m == "virtio_blk.ko"));
        for module in image.module_paths() {
            let head = std::fs::read(&module).unwrap();
            assert_eq!(&head[..4], b"\x7fELF", "{} is uncompressed", module.display());
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
        let err = store.build(&recipe, &mut TerminalProgress::labeled("image bad")).unwrap_err();
        eprintln!("{err}");
        let ImageError::StepFailed { step, command, log, .. } = &err else { panic!("{err:?}") };
        assert_eq!(step, "mmdebstrap");
        assert!(command.contains("no-such-suite"));
        assert!(log.is_file());
        assert!(store.find(&recipe).unwrap().is_none());
        assert!(store.list().unwrap().is_empty());
        assert_eq!(store.prune(&[], &[]).unwrap().len(), 1, "the dead build dir is pruned");
    }
}

#[cfg(test)]
mod real_layer_tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// The squashfs's entries as (path, uid, gid, mode, link target), via sqfs2tar.
    fn squashfs_entries(path: &std::path::Path) -> Vec<(String, u64, u64, u32, Option<String>)> {
        let mut child = Command::new("sqfs2tar").arg(path).stdout(Stdio::piped()).spawn().expect("sqfs2tar runs");
        let mut archive = tar::Archive::new(child.stdout.take().unwrap());
        let entries = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                let link = e.link_name().unwrap().map(|l| l.to_string_lossy().into_owned());
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    h.mode().unwrap(),
                    link,
                )
            })
            .collect();
        assert!(child.wait().unwrap().success());
        entries
    }

    /// Builds the Codex CLI layer for real (npm registry, host npm, ~1 minute).
    /// The layer goes to `$AGENTVM_IMAGE_TEST_DIR` if set (and stays there),
    /// else to a temporary directory.
    ///
    /// `cargo test -p agentvm image::real_layer -- --ignored --nocapture`
    #[test]
    #[ignore = "builds a real layer: needs npm, the npm registry and tar2sqfs"]
    fn real_layer_codex_has_root_owned_bin() {
        let keep_dir = std::env::var_os("AGENTVM_IMAGE_TEST_DIR").map(std::path::PathBuf::from);
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(keep_dir.unwrap_or_else(|| tmp.path().join("images")));
        let recipe = LayerRecipe::new("codex", &["@openai/codex"]);
        let started = std::time::Instant::now();
        let layer = store.build_layer(&recipe, &mut TerminalProgress::labeled("layer codex")).unwrap();
        eprintln!("built {} in {:.0?}", layer.dir.display(), started.elapsed());
        eprintln!("{}", serde_json::to_string_pretty(&layer.meta).unwrap());

        assert_eq!(layer.dir, store.dir().join(recipe.dir_name()));
        assert_eq!(layer.meta.built_by, crate::build_info::VERSION_LONG);
        assert!(layer.meta.versions["@openai/codex"].starts_with(|c: char| c.is_ascii_digit()));
        assert!(layer.dir.join("build.log").is_file());
        assert_eq!(store.find_layer(&recipe).unwrap(), Some(layer.clone()));
        assert_eq!(store.ensure_layer(&recipe, &mut NullProgress).unwrap(), layer, "a second ensure is a cache hit");
        let mut magic = [0u8; 4];
        std::io::Read::read_exact(&mut std::fs::File::open(layer.squashfs()).unwrap(), &mut magic).unwrap();
        assert_eq!(&magic, b"hsqs");

        let entries = squashfs_entries(&layer.squashfs());
        assert!(entries.iter().all(|e| e.1 == 0 && e.2 == 0), "all owned by root");
        let writable: Vec<_> = entries.iter().filter(|e| e.4.is_none() && e.3 & 0o022 != 0).collect();
        assert!(writable.is_empty(), "group/other writable: {writable:?}");
        assert!(entries.iter().filter(|e| e.4.is_none()).all(|e| e.3 & 0o444 == 0o444), "all world-readable");
        let bin = entries
            .iter()
            .find(|e| e.0.trim_start_matches("./") == "usr/local/bin/codex")
            .expect("usr/local/bin/codex in the layer");
        let target = bin.4.as_deref().expect("bin/codex is a symlink");
        assert!(target.starts_with("../lib/node_modules/@openai/codex/"), "{target}");
        assert!(entries.iter().all(|e| e.0.trim_start_matches("./").starts_with("usr")), "only /usr/local");
        let leftovers: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".build-"))
            .collect();
        assert!(leftovers.is_empty(), "temporary build dirs left: {leftovers:?}");
        let files: Vec<_> = std::fs::read_dir(&layer.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files.len(), 3, "only squashfs, json and log: {files:?}");
    }

    /// Builds (or, with `AGENTVM_LAYER_REFRESH=1`, rebuilds) the three agent
    /// layers into the default store (`$XDG_CACHE_HOME/agentvm/images`), for
    /// booting by hand; `AGENTVM_LAYERS=claude,codex` picks some of them.
    ///
    /// `XDG_CACHE_HOME=/var/tmp/agentvm-dev-cache cargo test -p agentvm image::real_layer_agents -- --ignored --nocapture`
    #[test]
    #[ignore = "builds real layers into the default store: needs npm and the npm registry"]
    fn real_layer_agents_into_default_store() {
        let store = Store::open(Store::default_dir().unwrap());
        let wanted = std::env::var("AGENTVM_LAYERS").unwrap_or_default();
        let refresh = std::env::var_os("AGENTVM_LAYER_REFRESH").is_some();
        for (name, spec, bin) in [
            ("claude", "@anthropic-ai/claude-code", "claude"),
            ("gemini", "@google/gemini-cli", "gemini"),
            ("codex", "@openai/codex", "codex"),
        ] {
            if !wanted.is_empty() && !wanted.split(',').any(|w| w == name) {
                continue;
            }
            let recipe = LayerRecipe::new(name, &[spec]);
            let mut progress = TerminalProgress::labeled(&format!("layer {name}"));
            let started = std::time::Instant::now();
            let layer = if refresh {
                store.build_layer(&recipe, &mut progress)
            } else {
                store.ensure_layer(&recipe, &mut progress)
            }
            .unwrap();
            eprintln!(
                "{name}: {} {:?} {} MiB in {:.1?}",
                layer.squashfs().display(),
                layer.meta.versions,
                layer.meta.size_bytes >> 20,
                started.elapsed()
            );
            let entries = squashfs_entries(&layer.squashfs());
            let path = format!("usr/local/bin/{bin}");
            assert!(entries.iter().any(|e| e.0.trim_start_matches("./") == path), "{path} in {name}");
        }
    }

    /// A package that does not exist fails in the npm step with its command
    /// and log tail, and leaves no layer.
    #[test]
    #[ignore = "runs npm against the npm registry"]
    fn real_layer_unknown_package_fails_with_step_and_log() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("images"));
        let recipe = LayerRecipe::new("bad", &["@agentvm-test/no-such-package-hopefully"]);
        let err = store.build_layer(&recipe, &mut TerminalProgress::labeled("layer bad")).unwrap_err();
        eprintln!("{err}");
        let ImageError::StepFailed { step, command, log, .. } = &err else { panic!("{err:?}") };
        assert_eq!(step, "npm install");
        assert!(command.contains("no-such-package-hopefully"));
        assert!(log.is_file());
        assert!(store.find_layer(&recipe).unwrap().is_none());
        assert!(store.list_layers().unwrap().is_empty());
        let build_dir = log.parent().unwrap().parent().unwrap();
        assert!(!build_dir.join("staging").exists() && !build_dir.join("npm-cache").exists());
        assert_eq!(store.prune(&[], &[]).unwrap().len(), 1, "the dead build dir is pruned");
    }
}
