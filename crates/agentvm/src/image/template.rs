//! Warm-start templates in the image cache (issue 17): a VM booted to the
//! point where the guest waits for its launch, saved. `template-<key16>/`
//! holds `ram` (the guest's RAM, a sparse file), `state` (QEMU's device
//! state) and `template.json`; built in a `.build-` directory under the
//! key's lock and published by rename, like images, so a half-made
//! template is never found. The key is a hash of everything a restore must
//! match (`crate::launch::warm::template_key`).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::ImageError;
use super::progress::NullProgress;
use super::store::Store;

/// The prefix of a template's directory name.
pub const PREFIX: &str = "template-";
/// The metadata file in a template directory.
pub const META_FILE: &str = "template.json";
/// The guest RAM file.
pub const RAM_FILE: &str = "ram";
/// QEMU's saved device state.
pub const STATE_FILE: &str = "state";

/// What `template.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMeta {
    /// The template key (64 hex).
    pub key: String,
    /// Made at, seconds since the Unix epoch.
    pub created: u64,
    /// The image directory and layer directories it boots (their names in the store).
    pub image: String,
    pub layers: Vec<String>,
    pub memory_mib: u64,
    pub cpus: u32,
    /// The accelerator it was made under (`kvm` or `tcg`).
    pub accel: String,
    /// Bytes of RAM the template touched (what a restore copies).
    pub ram_used: u64,
    /// The agentvm that made it.
    pub built_by: String,
}

/// A published template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub dir: PathBuf,
    pub meta: TemplateMeta,
}

impl Template {
    /// The template in `dir`, if it is one with its files.
    pub fn load(dir: &Path) -> Option<Template> {
        let bytes = fs::read(dir.join(META_FILE)).ok()?;
        let meta: TemplateMeta = serde_json::from_slice(&bytes).ok()?;
        let t = Template { dir: dir.to_path_buf(), meta };
        (t.ram().is_file() && t.state().is_file()).then_some(t)
    }

    pub fn ram(&self) -> PathBuf {
        self.dir.join(RAM_FILE)
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Its name in the store, `template-<key16>`.
    pub fn name(&self) -> String {
        dir_name(&self.meta.key)
    }
}

/// `template-<key16>`.
pub fn dir_name(key: &str) -> String {
    format!("{PREFIX}{}", &key[..16.min(key.len())])
}

/// The templates of a store.
pub struct Templates<'a> {
    store: &'a Store,
}

impl<'a> Templates<'a> {
    pub fn new(store: &'a Store) -> Templates<'a> {
        Templates { store }
    }

    /// The published template of `key`, if complete.
    pub fn find(&self, key: &str) -> Option<Template> {
        Template::load(&self.store.dir().join(dir_name(key))).filter(|t| t.meta.key == key)
    }

    /// The template of `key`: found, or made by `build` in a fresh
    /// directory (under the key's lock, so two launches make it once) and
    /// published. `build` writes the ram, state and returns the metadata.
    pub fn ensure<E: From<ImageError>>(
        &self,
        key: &str,
        build: impl FnOnce(&Path) -> Result<TemplateMeta, E>,
    ) -> Result<Template, E> {
        if let Some(t) = self.find(key) {
            return Ok(t);
        }
        let name = dir_name(key);
        let _lock = self.store.lock(&name, &mut NullProgress)?;
        if let Some(t) = self.find(key) {
            return Ok(t);
        }
        self.store.remove_dead_builds(&name)?;
        let tmp = self.store.dir().join(format!(".build-{name}-{}", std::process::id()));
        fs::create_dir(&tmp).map_err(ImageError::io("cannot create", &tmp))?;
        let meta = match build(&tmp) {
            Ok(meta) => meta,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let bytes = serde_json::to_vec_pretty(&meta).expect("serializable");
        fs::write(tmp.join(META_FILE), bytes).map_err(ImageError::io("cannot write", tmp.join(META_FILE)))?;
        let dir = self.store.dir().join(&name);
        self.store.publish(&tmp, &dir)?;
        Ok(Template { dir, meta })
    }

    /// Every published template, newest first.
    pub fn list(&self) -> Result<Vec<Template>, ImageError> {
        let mut all: Vec<Template> = self
            .store
            .entries()?
            .iter()
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(PREFIX)))
            .filter_map(|p| Template::load(p))
            .collect();
        all.sort_by_key(|t| std::cmp::Reverse(t.meta.created));
        Ok(all)
    }

    /// Removes the templates `query` names: `template-<key16>`, a key
    /// prefix of 4 or more hex digits, or `templates` for all of them.
    pub fn remove(&self, query: &str) -> Result<Vec<PathBuf>, ImageError> {
        let hex = query.len() >= 4 && query.bytes().all(|b| b.is_ascii_hexdigit());
        let mut removed = Vec::new();
        for t in self.list()? {
            if query == "templates" || t.name() == query || (hex && t.meta.key.starts_with(query)) {
                self.store.discard(&t.dir)?;
                removed.push(t.dir);
            }
        }
        Ok(removed)
    }

    /// Whether `prune` keeps `t`: its image and layers are in the store
    /// and this agentvm made it.
    pub fn is_current(&self, t: &Template) -> bool {
        let dir = self.store.dir();
        std::iter::once(&t.meta.image).chain(&t.meta.layers).all(|d| dir.join(d).is_dir())
            && t.meta.built_by == crate::build_info::VERSION_LONG
    }

    /// Removes the templates whose image or a layer is no longer in the
    /// store, or that an older agentvm made (its guest init differs).
    pub fn prune(&self) -> Result<Vec<PathBuf>, ImageError> {
        let mut removed = Vec::new();
        for t in self.list()? {
            if !self.is_current(&t) {
                self.store.discard(&t.dir)?;
                removed.push(t.dir);
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str, image: &str) -> TemplateMeta {
        TemplateMeta {
            key: key.into(),
            created: 1,
            image: image.into(),
            layers: vec![],
            memory_mib: 1024,
            cpus: 2,
            accel: "tcg".into(),
            ram_used: 0,
            built_by: crate::build_info::VERSION_LONG.into(),
        }
    }

    fn build(tmp: &Path, key: &str, image: &str) -> Result<TemplateMeta, ImageError> {
        fs::write(tmp.join(RAM_FILE), b"ram").unwrap();
        fs::write(tmp.join(STATE_FILE), b"state").unwrap();
        Ok(meta(key, image))
    }

    #[test]
    fn ensure_builds_once_publishes_and_finds_by_key() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().to_path_buf());
        let t = Templates::new(&store);
        let key = "ab".repeat(32);
        let made = t.ensure(&key, |tmp| build(tmp, &key, "base-1")).unwrap();
        assert_eq!(made.dir, d.path().join("template-abababababababab"));
        let again = t.ensure(&key, |_| -> Result<TemplateMeta, ImageError> { panic!("built twice") }).unwrap();
        assert_eq!(again, made);
        assert!(t.find(&"cd".repeat(32)).is_none());
    }

    #[test]
    fn a_template_without_its_state_is_not_found() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().to_path_buf());
        let t = Templates::new(&store);
        let key = "ab".repeat(32);
        let made = t.ensure(&key, |tmp| build(tmp, &key, "base-1")).unwrap();
        fs::remove_file(made.state()).unwrap();
        assert!(t.find(&key).is_none());
    }

    #[test]
    fn prune_removes_templates_of_images_gone_and_rm_takes_names() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("base-1")).unwrap();
        let store = Store::open(d.path().to_path_buf());
        let t = Templates::new(&store);
        let (live, dead) = ("ab".repeat(32), "cd".repeat(32));
        t.ensure(&live, |tmp| build(tmp, &live, "base-1")).unwrap();
        t.ensure(&dead, |tmp| build(tmp, &dead, "base-0")).unwrap();
        assert_eq!(t.prune().unwrap(), [d.path().join("template-cdcdcdcdcdcdcdcd")]);
        assert_eq!(t.list().unwrap().len(), 1);
        assert_eq!(t.remove("abab").unwrap().len(), 1);
        assert!(t.list().unwrap().is_empty());
    }
}
