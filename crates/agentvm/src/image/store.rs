//! The image cache: find, build (locked, atomically published), list,
//! remove, prune.
//!
//! Names in the images directory:
//! - `<name>-<key16>/`: a published image (only ever created by rename).
//! - `.build-<name>-<key16>-<pid>/`: a build in progress, or a dead one.
//! - `.lock-<name>-<key16>`: flock(2)ed while a build of that key runs.
//! - `.trash-...`: an image being deleted.

use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::build::{self, Mode};
use super::{Image, ImageError, Progress, Recipe};

const BUILD_PREFIX: &str = ".build-";
const LOCK_PREFIX: &str = ".lock-";
const TRASH_PREFIX: &str = ".trash-";

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
    pub fn ensure(
        &self,
        recipe: &Recipe,
        progress: &mut dyn Progress,
    ) -> Result<Image, ImageError> {
        if let Some(image) = self.find(recipe)? {
            return Ok(image);
        }
        let _lock = self.lock(&recipe.dir_name(), progress)?;
        if let Some(image) = self.find(recipe)? {
            progress.done();
            return Ok(image);
        }
        self.build_locked(recipe, progress)
    }

    /// Builds the image of `recipe` even if it is cached; the new image
    /// replaces the old one atomically.
    pub fn build(&self, recipe: &Recipe, progress: &mut dyn Progress) -> Result<Image, ImageError> {
        let _lock = self.lock(&recipe.dir_name(), progress)?;
        self.build_locked(recipe, progress)
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
        images.sort_by(|a, b| {
            a.meta
                .name
                .cmp(&b.meta.name)
                .then(b.meta.created.cmp(&a.meta.created))
        });
        Ok(images)
    }

    /// Removes the images matching `query`: a directory name or path, an
    /// image name (all its versions), or a key prefix of at least 4 hex
    /// digits. Errors when nothing matches.
    pub fn remove(&self, query: &str) -> Result<Vec<Image>, ImageError> {
        let as_path = fs::canonicalize(query).ok();
        let matches: Vec<Image> = self
            .list()?
            .into_iter()
            .filter(|image| {
                let dir_name =
                    image.dir.file_name().map(|n| n.as_bytes()) == Some(query.as_bytes());
                let key_prefix = query.len() >= 4
                    && query.chars().all(|c| c.is_ascii_hexdigit())
                    && image.meta.key.starts_with(&query.to_ascii_lowercase());
                let path = as_path.is_some() && fs::canonicalize(&image.dir).ok() == as_path;
                dir_name || image.meta.name == query || key_prefix || path
            })
            .collect();
        if matches.is_empty() {
            return Err(ImageError::NoMatch {
                query: query.to_string(),
                dir: self.dir.clone(),
            });
        }
        for image in &matches {
            self.discard(&image.dir)?;
        }
        Ok(matches)
    }

    /// Removes images whose key is not one of `keep`'s, dead builds and
    /// leftovers of interrupted removals. Returns the paths removed.
    pub fn prune(&self, keep: &[Recipe]) -> Result<Vec<PathBuf>, ImageError> {
        let keys: Vec<String> = keep.iter().map(Recipe::key).collect();
        let mut removed = Vec::new();
        for image in self.list()? {
            if !keys.contains(&image.meta.key) {
                self.discard(&image.dir)?;
                removed.push(image.dir);
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

    /// Builds into a fresh temporary directory and publishes it. The caller
    /// holds the key's lock.
    fn build_locked(
        &self,
        recipe: &Recipe,
        progress: &mut dyn Progress,
    ) -> Result<Image, ImageError> {
        recipe.validate()?;
        let mode: Mode = build::check_host()?;
        let dir_name = recipe.dir_name();
        self.remove_dead_builds(&dir_name)?;
        let tmp = self
            .dir
            .join(format!("{BUILD_PREFIX}{dir_name}-{}", std::process::id()));
        fs::create_dir(&tmp).map_err(ImageError::io("cannot create", &tmp))?;
        let meta = match build::build_in(&tmp, recipe, mode, progress) {
            Ok(meta) => meta,
            Err(e) => {
                progress.fail();
                build::discard_bulk(&tmp);
                return Err(e);
            }
        };
        progress.step("publish");
        let dir = self.dir.join(&dir_name);
        self.publish(&tmp, &dir)?;
        progress.done();
        Ok(Image { dir, meta })
    }

    /// Takes the build lock of `dir_name`, waiting (and saying so) while another process holds it.
    fn lock(&self, dir_name: &str, progress: &mut dyn Progress) -> Result<File, ImageError> {
        if let Some(lock) = self.try_lock(dir_name)? {
            return Ok(lock);
        }
        progress.step("waiting for another build of this image");
        let file = self.open_lock(dir_name)?;
        flock(&file, libc::LOCK_EX)
            .map_err(ImageError::io("cannot lock", self.lock_path(dir_name)))?;
        Ok(file)
    }

    /// The build lock of `dir_name` if it is free now. Released when the file is dropped.
    fn try_lock(&self, dir_name: &str) -> Result<Option<File>, ImageError> {
        let file = self.open_lock(dir_name)?;
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
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
    fn remove_dead_builds(&self, dir_name: &str) -> Result<(), ImageError> {
        for path in self.entries()? {
            let name = file_name(&path);
            if name.strip_prefix(BUILD_PREFIX).map(build_dir_key) == Some(dir_name) {
                remove_tree(&path)?;
            }
        }
        Ok(())
    }

    /// Moves `tmp` to `dir` in one step, replacing an existing image.
    fn publish(&self, tmp: &Path, dir: &Path) -> Result<(), ImageError> {
        match fs::rename(tmp, dir) {
            Ok(()) => return Ok(()),
            Err(e) if !dir.exists() => return Err(ImageError::io("cannot rename to", dir)(e)),
            Err(_) => {}
        }
        // An image is in the way: swap atomically, then delete the old one
        // (now at `tmp`). Without RENAME_EXCHANGE, move it aside first.
        if exchange(tmp, dir).is_ok() {
            return self.discard(tmp);
        }
        let aside = self.trash_path(dir);
        fs::rename(dir, &aside).map_err(ImageError::io("cannot move aside", dir))?;
        fs::rename(tmp, dir).map_err(ImageError::io("cannot rename to", dir))?;
        remove_tree(&aside)
    }

    /// Deletes an image directory: first renamed away, so it vanishes from
    /// view at once and a half-deleted image is never found.
    fn discard(&self, dir: &Path) -> Result<(), ImageError> {
        let trash = self.trash_path(dir);
        fs::rename(dir, &trash).map_err(ImageError::io("cannot remove", dir))?;
        remove_tree(&trash)
    }

    fn trash_path(&self, dir: &Path) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        self.dir.join(format!(
            "{TRASH_PREFIX}{}-{}-{nanos}",
            file_name(dir),
            std::process::id()
        ))
    }

    /// Paths of the entries of the images directory (none if it does not exist).
    fn entries(&self) -> Result<Vec<PathBuf>, ImageError> {
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
    path.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

fn is_hidden(path: &Path) -> bool {
    file_name(path).starts_with('.')
}

/// Removes a directory tree; one that is already gone is fine.
fn remove_tree(path: &Path) -> Result<(), ImageError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(ImageError::io("cannot remove", path)(e))
        }
        _ => Ok(()),
    }
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: the descriptor is valid for the life of `file`; flock has no memory effects.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Swaps two paths atomically (renameat2 with RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::super::meta::{ImageMeta, KERNEL_FILE, META_FILE, MODULES_DIR, ROOT_FILE};
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
            created,
            size_bytes: 14,
            compressor: "lz4".into(),
            package_versions: Default::default(),
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
        let listed: Vec<(String, u64)> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|i| (i.meta.name, i.meta.created))
            .collect();
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
        assert_eq!(store.remove("a").unwrap()[0].meta.key, a.key());
        assert_eq!(store.remove(&b.key()[..8]).unwrap()[0].meta.key, b.key());
        assert_eq!(store.remove(&c.dir_name()).unwrap()[0].meta.key, c.key());
        assert_eq!(
            store.remove(d_dir.to_str().unwrap()).unwrap()[0].meta.key,
            d.key()
        );
        assert!(store.list().unwrap().is_empty());
        let leftovers: Vec<_> = fs::read_dir(store.dir()).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn remove_nothing_matching_errs() {
        let (_tmp, store) = store();
        fake_image(&store, &Recipe::base(), 1);
        assert!(matches!(
            store.remove("nope"),
            Err(ImageError::NoMatch { .. })
        ));
        assert!(matches!(
            store.remove("ab"),
            Err(ImageError::NoMatch { .. })
        ));
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn prune_keeps_listed_and_removes_others_and_dead_builds() {
        let (_tmp, store) = store();
        let keep = Recipe::base();
        let old = recipe("old", "x1");
        fake_image(&store, &keep, 1);
        let old_dir = fake_image(&store, &old, 1);
        let dead = store
            .dir()
            .join(format!(".build-{}-999999", old.dir_name()));
        fs::create_dir_all(dead.join("logs")).unwrap();
        let trash = store.dir().join(".trash-x-1-2");
        fs::create_dir(&trash).unwrap();

        let mut removed = store.prune(std::slice::from_ref(&keep)).unwrap();
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
        assert!(store.prune(&[]).unwrap().is_empty());
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

    #[test]
    fn build_dir_key_strips_pid() {
        assert_eq!(
            build_dir_key("base-0123456789abcdef-42"),
            "base-0123456789abcdef"
        );
    }

    #[test]
    fn default_dir_uses_xdg_cache_home() {
        // Only reads the environment as it is; both branches end in agentvm/images.
        if let Ok(dir) = Store::default_dir() {
            assert!(dir.ends_with("agentvm/images"));
        }
    }
}
