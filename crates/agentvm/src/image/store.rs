//! The image cache: find, build (locked, atomically published), list,
//! remove, prune.
//!
//! Names in the images directory:
//! - `<name>-<key16>/`: a published image (only ever created by rename).
//! - `layer-<name>-<key16>/`: a published agent layer (likewise).
//! - `.build-<dir name>-<pid>/`: a build in progress, or a dead one.
//! - `.lock-<dir name>`: flock(2)ed while a build of that key runs.
//! - `.trash-...`: an image or layer being deleted.
//!
//! - `template-<key16>/`: a warm-start template (`super::template`), built
//!   and published the same way.
//!
//! Images and layers share the directory, the locking, the publishing and
//! the cleanup; they differ in their build and their metadata file
//! (`image.json`, `layer.json`).

use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::build::{self, Mode};
use super::error::ImageError;
use super::layer::{Layer, LayerRecipe};
use super::layer_build;
use super::meta::Image;
use super::progress::Progress;
use super::recipe::Recipe;
use crate::sys;

const BUILD_PREFIX: &str = ".build-";
const LOCK_PREFIX: &str = ".lock-";
const TRASH_PREFIX: &str = ".trash-";

/// What [`Store::remove`] and [`Store::prune`] deal with: an image or a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// Image or layer.
    pub kind: EntryKind,
    /// Its directory in the store.
    pub dir: PathBuf,
    /// The recipe's name.
    pub name: String,
    /// The recipe's key (64 hex).
    pub key: String,
}

/// The kinds of published entries in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A root image ([`Image`]).
    Image,
    /// An agent layer ([`Layer`]).
    Layer,
}

/// The images directory and the operations on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// A store in `images_dir`; nothing is created until a build.
    pub fn open(images_dir: PathBuf) -> Store {
        Store { dir: images_dir }
    }

    /// `$XDG_CACHE_HOME/agentvm/images`, or `$HOME/.cache/agentvm/images`.
    pub fn default_dir() -> Result<PathBuf, ImageError> {
        crate::paths::cache_dir().map(|c| c.join("images")).map_err(|_| ImageError::NoCacheDir)
    }

    /// The images directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The published image of `recipe`, if there is a complete one. Never builds.
    pub fn find(&self, recipe: &Recipe) -> Result<Option<Image>, ImageError> {
        let found = match Image::load(&self.dir.join(recipe.dir_name())) {
            Ok(found) => found,
            // A damaged image counts as missing; a build replaces it.
            Err(ImageError::BadMeta { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(found.filter(|image| image.meta.key == recipe.key() && image.is_complete()))
    }

    /// The image of `recipe`, built first if it is not cached. When another
    /// process is building the same recipe, waits for it and reuses its result.
    pub fn ensure(&self, recipe: &Recipe, progress: &mut dyn Progress) -> Result<Image, ImageError> {
        self.ensure_with(
            &recipe.dir_name(),
            progress,
            || self.find(recipe),
            |progress| self.build_locked(recipe, progress),
        )
    }

    /// Builds the image of `recipe` even if it is cached; the new image
    /// replaces the old one atomically.
    pub fn build(&self, recipe: &Recipe, progress: &mut dyn Progress) -> Result<Image, ImageError> {
        let _lock = self.lock(&recipe.dir_name(), progress)?;
        self.build_locked(recipe, progress)
    }

    /// The published layer of `recipe`, if there is a complete one. Never builds.
    pub fn find_layer(&self, recipe: &LayerRecipe) -> Result<Option<Layer>, ImageError> {
        let found = match Layer::load(&self.dir.join(recipe.dir_name())) {
            Ok(found) => found,
            // A damaged layer counts as missing; a build replaces it.
            Err(ImageError::BadMeta { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(found.filter(|layer| layer.meta.key == recipe.key() && layer.is_complete()))
    }

    /// The layer of `recipe`, built first if it is not cached (an unpinned
    /// package is then at its latest version). When another process is
    /// building the same layer, waits for it and reuses its result.
    pub fn ensure_layer(&self, recipe: &LayerRecipe, progress: &mut dyn Progress) -> Result<Layer, ImageError> {
        self.ensure_with(
            &recipe.dir_name(),
            progress,
            || self.find_layer(recipe),
            |progress| self.build_layer_locked(recipe, progress),
        )
    }

    /// Builds the layer of `recipe` even if it is cached, picking up the
    /// latest versions of unpinned packages; the new layer replaces the old
    /// one atomically.
    pub fn build_layer(&self, recipe: &LayerRecipe, progress: &mut dyn Progress) -> Result<Layer, ImageError> {
        let _lock = self.lock(&recipe.dir_name(), progress)?;
        self.build_layer_locked(recipe, progress)
    }

    /// All published layers, sorted by name, then newest first.
    pub fn list_layers(&self) -> Result<Vec<Layer>, ImageError> {
        let mut layers = Vec::new();
        for dir in self.entries()? {
            if is_hidden(&dir) {
                continue;
            }
            if let Ok(Some(layer)) = Layer::load(&dir) {
                layers.push(layer);
            }
        }
        layers.sort_by(|a, b| a.meta.name.cmp(&b.meta.name).then(b.meta.created.cmp(&a.meta.created)));
        Ok(layers)
    }

    /// All published images, sorted by name, then newest first.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let mut images = Vec::new();
        for dir in self.entries()? {
            if is_hidden(&dir) {
                continue;
            }
            // Not ours or damaged: list what can be listed.
            if let Ok(Some(image)) = Image::load(&dir) {
                images.push(image);
            }
        }
        images.sort_by(|a, b| a.meta.name.cmp(&b.meta.name).then(b.meta.created.cmp(&a.meta.created)));
        Ok(images)
    }

    /// Removes the images and layers matching `query`: a directory name or
    /// path, a recipe name (all its versions; "claude" matches the layer
    /// "claude"), or a key prefix of at least 4 hex digits. Errors when
    /// nothing matches.
    pub fn remove(&self, query: &str) -> Result<Vec<CacheEntry>, ImageError> {
        let as_path = fs::canonicalize(query).ok();
        let matches: Vec<CacheEntry> = self
            .published()?
            .into_iter()
            .filter(|entry| {
                let dir_name = entry.dir.file_name().map(|n| n.as_bytes()) == Some(query.as_bytes());
                let key_prefix = query.len() >= 4
                    && query.chars().all(|c| c.is_ascii_hexdigit())
                    && entry.key.starts_with(&query.to_ascii_lowercase());
                let path = as_path.is_some() && fs::canonicalize(&entry.dir).ok() == as_path;
                dir_name || entry.name == query || key_prefix || path
            })
            .collect();
        if matches.is_empty() {
            return Err(ImageError::NoMatch { query: query.to_string(), dir: self.dir.clone() });
        }
        for entry in &matches {
            self.discard(&entry.dir)?;
        }
        Ok(matches)
    }

    /// Removes images whose key is not one of `keep`'s, layers whose key is
    /// not one of `keep_layers`', dead builds and leftovers of interrupted
    /// removals. Returns the paths removed.
    pub fn prune(&self, keep: &[Recipe], keep_layers: &[LayerRecipe]) -> Result<Vec<PathBuf>, ImageError> {
        let image_keys: Vec<String> = keep.iter().map(Recipe::key).collect();
        let layer_keys: Vec<String> = keep_layers.iter().map(LayerRecipe::key).collect();
        let mut removed = Vec::new();
        for entry in self.published()? {
            let keys = match entry.kind {
                EntryKind::Image => &image_keys,
                EntryKind::Layer => &layer_keys,
            };
            if !keys.contains(&entry.key) {
                self.discard(&entry.dir)?;
                removed.push(entry.dir);
            }
        }
        for path in self.entries()? {
            let name = file_name(&path);
            let stale = if let Some(rest) = name.strip_prefix(BUILD_PREFIX) {
                // A build is dead when nobody holds its key's lock.
                self.try_lock(build_dir_key(rest))?.is_some()
            } else {
                name.starts_with(TRASH_PREFIX)
            };
            if stale && path.is_dir() {
                remove_tree(&path)?;
                removed.push(path);
            }
        }
        Ok(removed)
    }

    /// Published images and layers.
    fn published(&self) -> Result<Vec<CacheEntry>, ImageError> {
        let images = self.list()?.into_iter().map(|i| CacheEntry {
            kind: EntryKind::Image,
            dir: i.dir,
            name: i.meta.name,
            key: i.meta.key,
        });
        let layers = self.list_layers()?.into_iter().map(|l| CacheEntry {
            kind: EntryKind::Layer,
            dir: l.dir,
            name: l.meta.name,
            key: l.meta.key,
        });
        Ok(images.chain(layers).collect())
    }

    /// `find()`'s result if there is one, else `build()`'s under the lock of
    /// `dir_name`: when another process built it meanwhile, that is reused.
    fn ensure_with<T>(
        &self,
        dir_name: &str,
        progress: &mut dyn Progress,
        find: impl Fn() -> Result<Option<T>, ImageError>,
        build: impl FnOnce(&mut dyn Progress) -> Result<T, ImageError>,
    ) -> Result<T, ImageError> {
        if let Some(found) = find()? {
            return Ok(found);
        }
        let _lock = self.lock(dir_name, progress)?;
        if let Some(found) = find()? {
            progress.done();
            return Ok(found);
        }
        build(progress)
    }

    /// Builds the image into a fresh temporary directory and publishes it.
    /// The caller holds the key's lock.
    fn build_locked(&self, recipe: &Recipe, progress: &mut dyn Progress) -> Result<Image, ImageError> {
        recipe.validate()?;
        let mode: Mode = build::check_host()?;
        let (dir, meta) = self.build_and_publish(
            &recipe.dir_name(),
            progress,
            |tmp, progress| build::build_in(tmp, recipe, mode, progress),
            build::discard_bulk,
        )?;
        Ok(Image { dir, meta })
    }

    /// Builds the layer into a fresh temporary directory and publishes it.
    /// The caller holds the key's lock.
    fn build_layer_locked(&self, recipe: &LayerRecipe, progress: &mut dyn Progress) -> Result<Layer, ImageError> {
        recipe.validate()?;
        layer_build::check_host()?;
        let (dir, meta) = self.build_and_publish(
            &recipe.dir_name(),
            progress,
            |tmp, progress| layer_build::build_layer_in(tmp, recipe, progress),
            layer_build::discard_bulk,
        )?;
        Ok(Layer { dir, meta })
    }

    /// Runs `build` in a fresh `.build-<dir_name>-<pid>` directory and
    /// renames it to `dir_name`; on failure `discard_bulk` frees its space
    /// (the logs stay until the next build or prune). The caller holds the
    /// lock of `dir_name`.
    fn build_and_publish<T>(
        &self,
        dir_name: &str,
        progress: &mut dyn Progress,
        build: impl FnOnce(&Path, &mut dyn Progress) -> Result<T, ImageError>,
        discard_bulk: fn(&Path),
    ) -> Result<(PathBuf, T), ImageError> {
        self.remove_dead_builds(dir_name)?;
        let tmp = self.dir.join(format!("{BUILD_PREFIX}{dir_name}-{}", std::process::id()));
        fs::create_dir(&tmp).map_err(ImageError::io("cannot create", &tmp))?;
        let meta = match build(&tmp, progress) {
            Ok(meta) => meta,
            Err(e) => {
                progress.fail();
                discard_bulk(&tmp);
                return Err(e);
            }
        };
        progress.step("publish");
        let dir = self.dir.join(dir_name);
        self.publish(&tmp, &dir)?;
        progress.done();
        Ok((dir, meta))
    }

    /// Takes the build lock of `dir_name`, waiting (and saying so) while another process holds it.
    pub(crate) fn lock(&self, dir_name: &str, progress: &mut dyn Progress) -> Result<File, ImageError> {
        if let Some(lock) = self.try_lock(dir_name)? {
            return Ok(lock);
        }
        progress.step("waiting for another build of this image");
        let file = self.open_lock(dir_name)?;
        sys::lock(&file, sys::Lock::Exclusive).map_err(ImageError::io("cannot lock", self.lock_path(dir_name)))?;
        Ok(file)
    }

    /// The build lock of `dir_name` if it is free now. Released when the file is dropped.
    fn try_lock(&self, dir_name: &str) -> Result<Option<File>, ImageError> {
        let file = self.open_lock(dir_name)?;
        match sys::lock(&file, sys::Lock::TryExclusive) {
            Ok(()) => Ok(Some(file)),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(ImageError::io("cannot lock", self.lock_path(dir_name))(e)),
        }
    }

    fn open_lock(&self, dir_name: &str) -> Result<File, ImageError> {
        fs::create_dir_all(&self.dir).map_err(ImageError::io("cannot create", &self.dir))?;
        let path = self.lock_path(dir_name);
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o644)
            .open(&path)
            .map_err(ImageError::io("cannot open lock file", path))
    }

    fn lock_path(&self, dir_name: &str) -> PathBuf {
        self.dir.join(format!("{LOCK_PREFIX}{dir_name}"))
    }

    /// Removes the temporary directories of earlier builds of `dir_name`:
    /// with its lock held, none of them can be alive.
    pub(crate) fn remove_dead_builds(&self, dir_name: &str) -> Result<(), ImageError> {
        for path in self.entries()? {
            let name = file_name(&path);
            if name.strip_prefix(BUILD_PREFIX).map(build_dir_key) == Some(dir_name) {
                remove_tree(&path)?;
            }
        }
        Ok(())
    }

    /// Moves `tmp` to `dir` in one step, replacing an existing image.
    pub(crate) fn publish(&self, tmp: &Path, dir: &Path) -> Result<(), ImageError> {
        match fs::rename(tmp, dir) {
            Ok(()) => return Ok(()),
            Err(e) if !dir.exists() => return Err(ImageError::io("cannot rename to", dir)(e)),
            Err(_) => {}
        }
        // An image is in the way: swap atomically, then delete the old one
        // (now at `tmp`). Without RENAME_EXCHANGE, move it aside first.
        if sys::exchange(tmp, dir).is_ok() {
            return self.discard(tmp);
        }
        let aside = self.trash_path(dir);
        fs::rename(dir, &aside).map_err(ImageError::io("cannot move aside", dir))?;
        fs::rename(tmp, dir).map_err(ImageError::io("cannot rename to", dir))?;
        remove_tree(&aside)
    }

    /// Deletes an image directory: first renamed away, so it vanishes from
    /// view at once and a half-deleted image is never found.
    pub(crate) fn discard(&self, dir: &Path) -> Result<(), ImageError> {
        let trash = self.trash_path(dir);
        fs::rename(dir, &trash).map_err(ImageError::io("cannot remove", dir))?;
        remove_tree(&trash)
    }

    fn trash_path(&self, dir: &Path) -> PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        self.dir.join(format!("{TRASH_PREFIX}{}-{}-{nanos}", file_name(dir), std::process::id()))
    }

    /// Paths of the entries of the images directory (none if it does not exist).
    pub(crate) fn entries(&self) -> Result<Vec<PathBuf>, ImageError> {
        match fs::read_dir(&self.dir) {
            Ok(rd) => Ok(rd.filter_map(|e| e.ok().map(|e| e.path())).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(ImageError::io("cannot read", &self.dir)(e)),
        }
    }
}

/// `<name>-<key16>` of a build directory name without its prefix (`<name>-<key16>-<pid>`).
fn build_dir_key(rest: &str) -> &str {
    rest.rsplit_once('-').map_or(rest, |(key, _pid)| key)
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

fn is_hidden(path: &Path) -> bool {
    file_name(path).starts_with('.')
}

/// Removes a directory tree; one that is already gone is fine.
fn remove_tree(path: &Path) -> Result<(), ImageError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ImageError::io("cannot remove", path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::meta::{ImageMeta, KERNEL_FILE, META_FILE, MODULES_DIR, ROOT_FILE};
    use super::super::{LayerMeta, NullProgress, LAYER_FILE, LAYER_META_FILE};
    use super::*;

    /// Writes a complete fake image of `recipe` as a build would publish it.
    fn fake_image(store: &Store, recipe: &Recipe, created: u64) -> PathBuf {
        let dir = store.dir().join(recipe.dir_name());
        fs::create_dir_all(dir.join(MODULES_DIR)).unwrap();
        fs::write(dir.join(KERNEL_FILE), b"bzImage").unwrap();
        fs::write(dir.join(ROOT_FILE), b"hsqs").unwrap();
        fs::write(dir.join(MODULES_DIR).join("overlay.ko"), b"elf").unwrap();
        let meta = ImageMeta {
            name: recipe.name.clone(),
            key: recipe.key(),
            recipe: recipe.clone(),
            kernel_release: "6.12-test".into(),
            modules: vec!["overlay.ko".into()],
            watch_module: None,
            created,
            size_bytes: 14,
            compressor: "lz4".into(),
            package_versions: Default::default(),
            built_by: String::new(),
        };
        fs::write(dir.join(META_FILE), serde_json::to_string(&meta).unwrap()).unwrap();
        dir
    }

    fn recipe(name: &str, extra: &str) -> Recipe {
        Recipe::base().with_layer(name, &[extra])
    }

    fn store() -> (tempfile::TempDir, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("images"));
        (tmp, store)
    }

    #[test]
    fn find_missing_dir_returns_none_and_creates_nothing() {
        let (_tmp, store) = store();
        assert!(store.find(&Recipe::base()).unwrap().is_none());
        assert!(store.list().unwrap().is_empty());
        assert!(!store.dir().exists());
    }

    #[test]
    fn find_published_image_returns_it_with_paths() {
        let (_tmp, store) = store();
        let r = Recipe::base();
        let dir = fake_image(&store, &r, 1);
        let image = store.find(&r).unwrap().unwrap();
        assert_eq!(image.dir, dir);
        assert_eq!(image.kernel(), dir.join("vmlinuz"));
        assert_eq!(image.root(), dir.join("root.squashfs"));
        assert_eq!(image.module_paths(), vec![dir.join("modules/overlay.ko")]);
        // The uncompressed PVH kernel is booted where the build made one.
        fs::write(dir.join("vmlinux"), b"ELF").unwrap();
        assert_eq!(image.kernel(), dir.join("vmlinux"));
        assert_eq!(image.bzimage(), dir.join("vmlinuz"));
    }

    #[test]
    fn find_half_built_temp_dir_returns_none() {
        let (_tmp, store) = store();
        let r = Recipe::base();
        let dir = fake_image(&store, &r, 1);
        let tmp = store.dir().join(format!(".build-{}-4242", r.dir_name()));
        fs::rename(&dir, &tmp).unwrap();
        assert!(store.find(&r).unwrap().is_none());
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn find_incomplete_image_returns_none() {
        let (_tmp, store) = store();
        let r = Recipe::base();
        let dir = fake_image(&store, &r, 1);
        fs::remove_file(dir.join(ROOT_FILE)).unwrap();
        assert!(store.find(&r).unwrap().is_none());
    }

    #[test]
    fn find_damaged_meta_returns_none() {
        let (_tmp, store) = store();
        let r = Recipe::base();
        let dir = fake_image(&store, &r, 1);
        fs::write(dir.join(META_FILE), b"{").unwrap();
        assert!(store.find(&r).unwrap().is_none());
    }

    #[test]
    fn list_sorts_by_name_then_newest() {
        let (_tmp, store) = store();
        fake_image(&store, &recipe("b", "x1"), 5);
        fake_image(&store, &recipe("a", "x1"), 1);
        fake_image(&store, &recipe("a", "x2"), 9);
        let listed: Vec<(String, u64)> =
            store.list().unwrap().into_iter().map(|i| (i.meta.name, i.meta.created)).collect();
        assert_eq!(listed, [("a".into(), 9), ("a".into(), 1), ("b".into(), 5)]);
    }

    #[test]
    fn remove_by_name_key_prefix_dir_name_and_path() {
        let (_tmp, store) = store();
        let a = recipe("a", "x1");
        let b = recipe("b", "x1");
        let c = recipe("c", "x1");
        let d = recipe("d", "x1");
        let d_dir = fake_image(&store, &d, 1);
        for r in [&a, &b, &c] {
            fake_image(&store, r, 1);
        }
        assert_eq!(store.remove("a").unwrap()[0].key, a.key());
        assert_eq!(store.remove(&b.key()[..8]).unwrap()[0].key, b.key());
        assert_eq!(store.remove(&c.dir_name()).unwrap()[0].key, c.key());
        assert_eq!(store.remove(d_dir.to_str().unwrap()).unwrap()[0].key, d.key());
        assert!(store.list().unwrap().is_empty());
        let leftovers: Vec<_> = fs::read_dir(store.dir()).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn remove_nothing_matching_errs() {
        let (_tmp, store) = store();
        fake_image(&store, &Recipe::base(), 1);
        assert!(matches!(store.remove("nope"), Err(ImageError::NoMatch { .. })));
        assert!(matches!(store.remove("ab"), Err(ImageError::NoMatch { .. })));
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn prune_keeps_listed_and_removes_others_and_dead_builds() {
        let (_tmp, store) = store();
        let keep = Recipe::base();
        let old = recipe("old", "x1");
        fake_image(&store, &keep, 1);
        let old_dir = fake_image(&store, &old, 1);
        let dead = store.dir().join(format!(".build-{}-999999", old.dir_name()));
        fs::create_dir_all(dead.join("logs")).unwrap();
        let trash = store.dir().join(".trash-x-1-2");
        fs::create_dir(&trash).unwrap();

        let mut removed = store.prune(std::slice::from_ref(&keep), &[]).unwrap();
        removed.sort();
        let mut expected = vec![old_dir, dead, trash];
        expected.sort();
        assert_eq!(removed, expected);
        assert_eq!(store.list().unwrap().len(), 1);
        assert!(store.find(&keep).unwrap().is_some());
    }

    #[test]
    fn prune_leaves_a_running_build_alone() {
        let (_tmp, store) = store();
        let r = Recipe::base();
        let running = store.dir().join(format!(".build-{}-1", r.dir_name()));
        fs::create_dir_all(&running).unwrap();
        let _held = store.try_lock(&r.dir_name()).unwrap().unwrap();
        // flock is per open file description: a second open conflicts even in one process.
        assert!(store.try_lock(&r.dir_name()).unwrap().is_none());
        assert!(store.prune(&[], &[]).unwrap().is_empty());
        assert!(running.exists());
    }

    #[test]
    fn publish_replaces_existing_image() {
        let (_tmp, store) = store();
        let r = Recipe::base();
        let dir = fake_image(&store, &r, 1);
        let tmp = store.dir().join(format!(".build-{}-7", r.dir_name()));
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join("marker"), b"new").unwrap();
        store.publish(&tmp, &dir).unwrap();
        assert!(dir.join("marker").exists());
        assert!(!tmp.exists());
        assert_eq!(fs::read_dir(store.dir()).unwrap().count(), 1);
    }

    /// Writes a complete fake layer of `recipe` as a build would publish it.
    fn fake_layer(store: &Store, recipe: &LayerRecipe, created: u64) -> PathBuf {
        let dir = store.dir().join(recipe.dir_name());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(LAYER_FILE), b"hsqs").unwrap();
        let meta = LayerMeta {
            name: recipe.name.clone(),
            key: recipe.key(),
            recipe: recipe.clone(),
            versions: [("pkg".to_string(), "1.0.0".to_string())].into(),
            created,
            size_bytes: 4,
            compressor: "lz4".into(),
            host_node: "v20.0.0".into(),
            built_by: String::new(),
        };
        fs::write(dir.join(LAYER_META_FILE), serde_json::to_string(&meta).unwrap()).unwrap();
        dir
    }

    fn layer(name: &str, spec: &str) -> LayerRecipe {
        LayerRecipe::new(name, &[spec])
    }

    #[test]
    fn find_layer_published_returns_it_and_images_do_not_see_it() {
        let (_tmp, store) = store();
        let r = layer("codex", "@openai/codex");
        let dir = fake_layer(&store, &r, 1);
        fake_image(&store, &Recipe::base(), 1);
        let found = store.find_layer(&r).unwrap().unwrap();
        assert_eq!(found.dir, dir);
        assert_eq!(found.squashfs(), dir.join("layer.squashfs"));
        assert_eq!(store.list().unwrap().len(), 1, "layers are not images");
        assert_eq!(store.list_layers().unwrap().len(), 1, "images are not layers");
        assert!(store.find_layer(&layer("codex", "@openai/codex@1.0.0")).unwrap().is_none());
    }

    #[test]
    fn find_layer_incomplete_or_damaged_returns_none() {
        let (_tmp, store) = store();
        let r = layer("codex", "@openai/codex");
        let dir = fake_layer(&store, &r, 1);
        fs::remove_file(dir.join(LAYER_FILE)).unwrap();
        assert!(store.find_layer(&r).unwrap().is_none());
        fake_layer(&store, &r, 1);
        fs::write(dir.join(LAYER_META_FILE), b"{").unwrap();
        assert!(store.find_layer(&r).unwrap().is_none());
        assert!(store.list_layers().unwrap().is_empty());
    }

    #[test]
    fn ensure_layer_cached_returns_without_building() {
        let (_tmp, store) = store();
        let r = layer("codex", "@openai/codex");
        let dir = fake_layer(&store, &r, 1);
        // A build would need npm and fail on the fake package: a hit must not build.
        let found = store.ensure_layer(&r, &mut NullProgress).unwrap();
        assert_eq!(found.dir, dir);
    }

    #[test]
    fn ensure_layer_invalid_recipe_errs_and_leaves_no_build_dir() {
        let (_tmp, store) = store();
        let r = layer("codex", "--prefix=/");
        assert!(matches!(store.ensure_layer(&r, &mut NullProgress), Err(ImageError::InvalidRecipe { .. })));
        assert!(store.list_layers().unwrap().is_empty());
        let builds = fs::read_dir(store.dir())
            .unwrap()
            .filter(|e| file_name(&e.as_ref().unwrap().path()).starts_with(BUILD_PREFIX))
            .count();
        assert_eq!(builds, 0);
    }

    #[test]
    fn list_layers_sorts_by_name_then_newest() {
        let (_tmp, store) = store();
        fake_layer(&store, &layer("gemini", "@google/gemini-cli"), 5);
        fake_layer(&store, &layer("claude", "@anthropic-ai/claude-code"), 1);
        fake_layer(&store, &layer("claude", "@anthropic-ai/claude-code@2.0.0"), 9);
        let listed: Vec<(String, u64)> =
            store.list_layers().unwrap().into_iter().map(|l| (l.meta.name, l.meta.created)).collect();
        assert_eq!(listed, [("claude".into(), 9), ("claude".into(), 1), ("gemini".into(), 5)]);
    }

    #[test]
    fn remove_layers_by_name_key_prefix_and_dir_name() {
        let (_tmp, store) = store();
        let base = Recipe::base();
        fake_image(&store, &base, 1);
        let claude = layer("claude", "@anthropic-ai/claude-code");
        let codex = layer("codex", "@openai/codex");
        let gemini = layer("gemini", "@google/gemini-cli");
        for r in [&claude, &codex, &gemini] {
            fake_layer(&store, r, 1);
        }
        let removed = store.remove("claude").unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].kind, EntryKind::Layer);
        assert_eq!(removed[0].key, claude.key());
        assert_eq!(store.remove(&codex.key()[..8]).unwrap()[0].key, codex.key());
        assert_eq!(store.remove(&gemini.dir_name()).unwrap()[0].key, gemini.key());
        assert!(store.list_layers().unwrap().is_empty());
        assert!(store.find(&base).unwrap().is_some(), "the image stays");
        let base_removed = store.remove("base").unwrap();
        assert_eq!(base_removed[0].kind, EntryKind::Image);
    }

    #[test]
    fn prune_keeps_listed_layers_and_removes_others_and_dead_layer_builds() {
        let (_tmp, store) = store();
        let base = Recipe::base();
        let keep = layer("claude", "@anthropic-ai/claude-code");
        let old = layer("claude", "@anthropic-ai/claude-code@1.0.0");
        let other = layer("codex", "@openai/codex");
        fake_image(&store, &base, 1);
        fake_layer(&store, &keep, 2);
        let old_dir = fake_layer(&store, &old, 1);
        let other_dir = fake_layer(&store, &other, 1);
        let dead = store.dir().join(format!(".build-{}-999999", keep.dir_name()));
        fs::create_dir_all(dead.join("staging/usr/local")).unwrap();

        let mut removed = store.prune(std::slice::from_ref(&base), std::slice::from_ref(&keep)).unwrap();
        removed.sort();
        let mut expected = vec![old_dir, other_dir, dead];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(store.find(&base).unwrap().is_some());
        assert!(store.find_layer(&keep).unwrap().is_some());
        assert_eq!(store.list_layers().unwrap().len(), 1);
    }

    #[test]
    fn prune_without_keep_layers_removes_all_layers_but_kept_images() {
        let (_tmp, store) = store();
        let base = Recipe::base();
        fake_image(&store, &base, 1);
        fake_layer(&store, &layer("codex", "@openai/codex"), 1);
        assert_eq!(store.prune(std::slice::from_ref(&base), &[]).unwrap().len(), 1);
        assert!(store.list_layers().unwrap().is_empty());
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn build_dir_key_strips_pid() {
        assert_eq!(build_dir_key("base-0123456789abcdef-42"), "base-0123456789abcdef");
    }

    #[test]
    fn default_dir_uses_xdg_cache_home() {
        // Only reads the environment as it is; both branches end in agentvm/images.
        if let Ok(dir) = Store::default_dir() {
            assert!(dir.ends_with("agentvm/images"));
        }
    }
}
