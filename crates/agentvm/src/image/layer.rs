//! Agent layers: npm packages installed under `/usr/local`, packed as a
//! squashfs the guest stacks on the base root as an extra overlay lower layer.
//!
//! ```text
//! <images>/layer-<name>-<key16>/
//!   layer.squashfs   /usr/local of the packages (bin/, lib/node_modules/), owned by root
//!   layer.json       LayerMeta
//!   build.log        logs of the build steps
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{ImageError, ManifestError};
use super::recipe::{hex, is_valid_name, NAME_RULE};

/// Version of the layer build procedure; part of every layer key. Bump it
/// when a change to the build (npm options, layout) should invalidate every
/// cached layer.
pub const LAYER_FORMAT: u32 = 1;

/// File name of the metadata in a layer directory.
pub const LAYER_META_FILE: &str = "layer.json";
/// File name of the squashfs in a layer directory.
pub const LAYER_FILE: &str = "layer.squashfs";
/// Prefix of layer directory names, setting them apart from images.
pub const LAYER_DIR_PREFIX: &str = "layer-";
/// Where the layer's files go in the guest (and under the build's staging root).
pub const LAYER_PREFIX: &str = "usr/local";

/// The inputs of a layer build: npm packages installed globally.
///
/// The key hashes the specs as given: an unpinned `"pkg"` means "the latest
/// version at build time", reused until [`Store::build_layer`] rebuilds it;
/// a pinned `"pkg@1.2.3"` gives a key of its own.
///
/// [`Store::build_layer`]: super::Store::build_layer
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecipe {
    /// Short name, e.g. "claude"; the directory is `layer-<name>-<key16>`.
    pub name: String,
    /// npm package specs: `"pkg"`, `"@scope/pkg"` (latest) or with `@<version or range or tag>`.
    pub npm: Vec<String>,
}

/// What is hashed: the recipe in a canonical form plus the build format.
#[derive(Serialize)]
struct LayerKeyInput<'a> {
    format: u32,
    kind: &'static str,
    name: &'a str,
    npm: Vec<&'a str>,
}

impl LayerRecipe {
    /// A layer named `name` of the npm packages `specs`.
    pub fn new(name: &str, specs: &[&str]) -> LayerRecipe {
        LayerRecipe { name: name.to_string(), npm: specs.iter().map(|s| s.to_string()).collect() }
    }

    /// SHA-256 (64 lowercase hex digits) of the canonical JSON of the recipe
    /// and [`LAYER_FORMAT`]. Spec order and duplicates do not matter.
    pub fn key(&self) -> String {
        let input =
            LayerKeyInput { format: LAYER_FORMAT, kind: "npm-layer", name: &self.name, npm: self.sorted_specs() };
        // Struct fields serialize in declaration order: the JSON is canonical.
        let json = serde_json::to_vec(&input).expect("layer recipe serializes");
        hex(&Sha256::digest(json))
    }

    /// The directory name of this layer: `layer-<name>-<first 16 hex of key>`.
    pub fn dir_name(&self) -> String {
        format!("{LAYER_DIR_PREFIX}{}-{}", self.name, &self.key()[..16])
    }

    /// The specs sorted, without duplicates.
    pub(crate) fn sorted_specs(&self) -> Vec<&str> {
        let mut specs: Vec<&str> = self.npm.iter().map(String::as_str).collect();
        specs.sort_unstable();
        specs.dedup();
        specs
    }

    /// The package names of the specs (versions stripped), sorted, without duplicates.
    pub fn packages(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.npm.iter().filter_map(|s| package_name(s)).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Checks that the name is usable in a directory name and every spec is
    /// a registry package name with an optional version.
    pub fn validate(&self) -> Result<(), ImageError> {
        let invalid = |reason: String| ImageError::InvalidRecipe { name: self.name.clone(), reason };
        if !is_valid_name(&self.name) {
            return Err(invalid(NAME_RULE.into()));
        }
        if self.npm.is_empty() {
            return Err(invalid("the layer has no npm packages".into()));
        }
        if let Some(bad) = self.npm.iter().find(|s| package_name(s).is_none()) {
            return Err(invalid(format!(
                "npm spec {bad:?} must be a registry package, optionally with a version: \"pkg\", \"@scope/pkg\" or \"pkg@1.2.3\""
            )));
        }
        Ok(())
    }
}

/// The package name of a registry spec (`pkg`, `@scope/pkg`, either with
/// `@<version>`), or `None` for anything else (paths, URLs, git, options).
pub fn package_name(spec: &str) -> Option<&str> {
    let (scope, rest) = match spec.strip_prefix('@') {
        Some(scoped) => {
            let (scope, rest) = scoped.split_once('/')?;
            (Some(scope), rest)
        }
        None => (None, spec),
    };
    let (name, version) = match rest.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (rest, None),
    };
    let word_ok = |w: &str| {
        !w.is_empty()
            && !w.starts_with(['.', '_', '-'])
            && w.len() <= 214
            && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._~".contains(c))
    };
    let version_ok = |v: &str| {
        !v.is_empty()
            && !v.starts_with('-')
            && v.chars().all(|c| c.is_ascii_alphanumeric() || ".-+_^~<>=*|".contains(c))
    };
    if !word_ok(name) || !scope.is_none_or(word_ok) || !version.is_none_or(version_ok) {
        return None;
    }
    let name_len = spec.len() - version.map_or(0, |v| v.len() + 1);
    Some(&spec[..name_len])
}

/// What `layer.json` records about a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    /// The recipe's name.
    pub name: String,
    /// The recipe's key (64 hex).
    pub key: String,
    /// The recipe it was built from.
    pub recipe: LayerRecipe,
    /// Installed version of each package of the recipe (package name -> version).
    pub versions: BTreeMap<String, String>,
    /// Build time, seconds since the Unix epoch.
    pub created: u64,
    /// Total size of the layer directory in bytes.
    pub size_bytes: u64,
    /// The squashfs compressor used (e.g. "lz4").
    #[serde(default)]
    pub compressor: String,
    /// `node --version` of the host that ran npm (native addons match its ABI).
    #[serde(default)]
    pub host_node: String,
    /// The agentvm that built it ([`crate::build_info::VERSION_LONG`]);
    /// empty for a layer built before agentvm recorded it.
    #[serde(default)]
    pub built_by: String,
}

/// A published layer: its directory and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The layer directory, `<images>/layer-<name>-<key16>`.
    pub dir: PathBuf,
    /// Its `layer.json`.
    pub meta: LayerMeta,
}

impl Layer {
    /// Reads the layer in `dir`; `None` when it has no `layer.json`.
    pub fn load(dir: &Path) -> Result<Option<Layer>, ImageError> {
        let path = dir.join(LAYER_META_FILE);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io("cannot read", path)(e)),
        };
        let meta = serde_json::from_slice(&text).map_err(|source| ImageError::BadMeta { path, source })?;
        Ok(Some(Layer { dir: dir.to_path_buf(), meta }))
    }

    /// The squashfs holding the layer's `/usr/local` (its root is the guest's `/`).
    pub fn squashfs(&self) -> PathBuf {
        self.dir.join(LAYER_FILE)
    }

    /// Whether the squashfs is present.
    pub fn is_complete(&self) -> bool {
        self.squashfs().is_file()
    }
}

/// The `version` of each package in `node_modules/<package>/package.json`.
/// A package without a readable version is an error: npm did not install it.
pub fn installed_versions(node_modules: &Path, packages: &[&str]) -> Result<BTreeMap<String, String>, ManifestError> {
    packages
        .iter()
        .map(|package| {
            let manifest = read_manifest(node_modules, package)?;
            match manifest.get("version").and_then(|v| v.as_str()) {
                Some(version) => Ok((package.to_string(), version.to_string())),
                None => Err(ManifestError::NoVersion { path: manifest_path(node_modules, package) }),
            }
        })
        .collect()
}

/// The commands a package declares in its `package.json` `bin` field (a
/// string names one command after the unscoped package name).
pub fn declared_bins(node_modules: &Path, package: &str) -> Result<Vec<String>, ManifestError> {
    let manifest = read_manifest(node_modules, package)?;
    let unscoped = package.rsplit('/').next().unwrap_or(package);
    Ok(match manifest.get("bin") {
        Some(serde_json::Value::String(_)) => vec![unscoped.to_string()],
        Some(serde_json::Value::Object(bins)) => bins.keys().cloned().collect(),
        _ => Vec::new(),
    })
}

fn manifest_path(node_modules: &Path, package: &str) -> PathBuf {
    node_modules.join(package).join("package.json")
}

fn read_manifest(node_modules: &Path, package: &str) -> Result<serde_json::Value, ManifestError> {
    let path = manifest_path(node_modules, package);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(source) => return Err(ManifestError::Read { path, source }),
    };
    serde_json::from_slice(&text).map_err(|source| ManifestError::Parse { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_64_hex_and_stable() {
        let r = LayerRecipe::new("claude", &["@anthropic-ai/claude-code"]);
        let key = r.key();
        assert_eq!(key.len(), 64);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(key, r.clone().key());
    }

    #[test]
    fn key_ignores_spec_order_and_duplicates() {
        let a = LayerRecipe::new("tools", &["a", "@s/b@1.0.0", "c"]);
        let b = LayerRecipe::new("tools", &["c", "a", "@s/b@1.0.0", "a"]);
        assert_eq!(a.key(), b.key());
        assert_eq!(a.dir_name(), b.dir_name());
    }

    #[test]
    fn key_differs_pinned_unpinned_and_by_name() {
        let latest = LayerRecipe::new("codex", &["@openai/codex"]);
        let pinned = LayerRecipe::new("codex", &["@openai/codex@0.1.0"]);
        let other_pin = LayerRecipe::new("codex", &["@openai/codex@0.2.0"]);
        let renamed = LayerRecipe::new("codex2", &["@openai/codex"]);
        assert_ne!(latest.key(), pinned.key());
        assert_ne!(pinned.key(), other_pin.key());
        assert_ne!(latest.key(), renamed.key());
    }

    #[test]
    fn layer_key_differs_from_image_key_of_same_name() {
        let layer = LayerRecipe::new("base", &["x"]);
        assert_ne!(layer.key(), super::super::Recipe::base().key());
    }

    #[test]
    fn dir_name_is_prefix_name_and_key16() {
        let r = LayerRecipe::new("gemini", &["@google/gemini-cli"]);
        assert_eq!(r.dir_name(), format!("layer-gemini-{}", &r.key()[..16]));
    }

    #[test]
    fn package_name_strips_versions_and_rejects_non_registry_specs() {
        assert_eq!(package_name("left-pad"), Some("left-pad"));
        assert_eq!(package_name("left-pad@1.3.0"), Some("left-pad"));
        assert_eq!(package_name("@openai/codex"), Some("@openai/codex"));
        assert_eq!(package_name("@anthropic-ai/claude-code@2.0.1"), Some("@anthropic-ai/claude-code"));
        assert_eq!(package_name("x@^1.2 || >=3"), None);
        assert_eq!(package_name("x@latest"), Some("x"));
        for bad in [
            "",
            "--global",
            "-x",
            "@scope",
            "@/x",
            "./dir",
            "../x",
            "/abs",
            "git+https://example.com/x.git",
            "github:user/repo",
            "Upper",
            "x@",
            "x@-1",
            "a b",
        ] {
            assert_eq!(package_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn validate_rejects_bad_names_and_specs() {
        assert!(LayerRecipe::new("claude", &["@anthropic-ai/claude-code"]).validate().is_ok());
        assert!(LayerRecipe::new("../x", &["a"]).validate().is_err());
        assert!(LayerRecipe::new("x", &[]).validate().is_err());
        assert!(LayerRecipe::new("x", &["--prefix=/"]).validate().is_err());
    }

    #[test]
    fn packages_are_names_without_versions() {
        let r = LayerRecipe::new("x", &["b@1", "@s/a", "b"]);
        assert_eq!(r.packages(), ["@s/a", "b"]);
    }

    fn write_manifest(node_modules: &Path, package: &str, json: &str) {
        let dir = node_modules.join(package);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("package.json"), json).unwrap();
    }

    #[test]
    fn installed_versions_reads_package_json_of_each_package() {
        let tmp = tempfile::tempdir().unwrap();
        let nm = tmp.path();
        write_manifest(nm, "@openai/codex", r#"{"name":"@openai/codex","version":"0.171.0"}"#);
        write_manifest(nm, "plain", r#"{"name":"plain","version":"1.2.3","bin":"cli.js"}"#);
        let v = installed_versions(nm, &["@openai/codex", "plain"]).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v["@openai/codex"], "0.171.0");
        assert_eq!(v["plain"], "1.2.3");
    }

    #[test]
    fn installed_versions_missing_or_versionless_package_errs() {
        let tmp = tempfile::tempdir().unwrap();
        let nm = tmp.path();
        write_manifest(nm, "noversion", r#"{"name":"noversion"}"#);
        assert!(installed_versions(nm, &["absent"]).unwrap_err().to_string().contains("absent/package.json"));
        assert!(installed_versions(nm, &["noversion"]).unwrap_err().to_string().contains("no version"));
    }

    #[test]
    fn declared_bins_reads_string_and_object_forms() {
        let tmp = tempfile::tempdir().unwrap();
        let nm = tmp.path();
        write_manifest(nm, "@s/tool", r#"{"version":"1.0.0","bin":"cli.js"}"#);
        write_manifest(nm, "multi", r#"{"version":"1.0.0","bin":{"a":"a.js","b":"b.js"}}"#);
        write_manifest(nm, "lib", r#"{"version":"1.0.0"}"#);
        assert_eq!(declared_bins(nm, "@s/tool").unwrap(), ["tool"]);
        assert_eq!(declared_bins(nm, "multi").unwrap(), ["a", "b"]);
        assert!(declared_bins(nm, "lib").unwrap().is_empty());
    }

    #[test]
    fn layer_load_reads_meta_and_names_squashfs() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(Layer::load(tmp.path()).unwrap().is_none());
        let r = LayerRecipe::new("codex", &["@openai/codex"]);
        let meta = LayerMeta {
            name: r.name.clone(),
            key: r.key(),
            recipe: r,
            versions: BTreeMap::new(),
            created: 1,
            size_bytes: 2,
            compressor: "lz4".into(),
            host_node: "v20.0.0".into(),
            built_by: String::new(),
        };
        std::fs::write(tmp.path().join(LAYER_META_FILE), serde_json::to_string(&meta).unwrap()).unwrap();
        let layer = Layer::load(tmp.path()).unwrap().unwrap();
        assert_eq!(layer.meta, meta);
        assert_eq!(layer.squashfs(), tmp.path().join("layer.squashfs"));
        assert!(!layer.is_complete());
    }
}
