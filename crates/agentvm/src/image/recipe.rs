//! What goes into an image, and the key that names it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ImageError;

/// Version of the build procedure. Bump it whenever a change to the build
/// (mmdebstrap options, file system format, layout) should invalidate every
/// cached image; it is part of every key.
pub const RECIPE_FORMAT: u32 = 3;

/// The Debian suite images are built from by default.
pub const DEFAULT_SUITE: &str = "trixie";

/// The Debian mirror images are built from by default.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// Packages of the base image: a kernel with its modules, and what a coding
/// agent expects of a Unix box. Layers (agents, container runtimes) add to it.
pub const BASE_PACKAGES: &[&str] = &[
    "linux-image-cloud-amd64",
    "kmod",
    "bash",
    "coreutils",
    "findutils",
    "grep",
    "sed",
    "tar",
    "gzip",
    "xz-utils",
    "unzip",
    "diffutils",
    "patch",
    "file",
    "less",
    "procps",
    "sudo",
    "iproute2",
    "iputils-ping",
    "ca-certificates",
    "curl",
    "openssh-client",
    "git",
    "make",
    "jq",
    "ripgrep",
    "python3",
    "nodejs",
    "npm",
    // File watchers' own tool, and what tests of host changes watch with.
    "inotify-tools",
];

/// The inputs of an image build. Equal recipes give equal keys, so an image
/// is built once and then reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    /// Short name, the first part of the image's directory name (e.g. "base").
    pub name: String,
    /// Debian suite (e.g. "trixie").
    pub suite: String,
    /// Debian mirror URL.
    pub mirror: String,
    /// Packages installed on top of the minbase variant.
    pub packages: Vec<String>,
}

/// What is hashed: the recipe in a canonical form plus the build format.
#[derive(Serialize)]
struct KeyInput<'a> {
    format: u32,
    name: &'a str,
    suite: &'a str,
    mirror: &'a str,
    packages: Vec<&'a str>,
}

impl Recipe {
    /// The base image: [`BASE_PACKAGES`] from [`DEFAULT_SUITE`] at [`DEFAULT_MIRROR`].
    pub fn base() -> Recipe {
        Recipe {
            name: "base".to_string(),
            suite: DEFAULT_SUITE.to_string(),
            mirror: DEFAULT_MIRROR.to_string(),
            packages: BASE_PACKAGES.iter().map(|p| p.to_string()).collect(),
        }
    }

    /// This recipe plus a layer: `name` becomes the image name and `packages`
    /// are added (duplicates are harmless; the key ignores them).
    pub fn with_layer(&self, name: &str, packages: &[&str]) -> Recipe {
        let mut layered = self.clone();
        layered.name = name.to_string();
        layered.packages.extend(packages.iter().map(|p| p.to_string()));
        layered
    }

    /// SHA-256 (64 lowercase hex digits) of the canonical JSON of the recipe
    /// and [`RECIPE_FORMAT`]. Package order and duplicates do not matter.
    pub fn key(&self) -> String {
        let mut packages: Vec<&str> = self.packages.iter().map(String::as_str).collect();
        packages.sort_unstable();
        packages.dedup();
        let input =
            KeyInput { format: RECIPE_FORMAT, name: &self.name, suite: &self.suite, mirror: &self.mirror, packages };
        // Struct fields serialize in declaration order: the JSON is canonical.
        let json = serde_json::to_vec(&input).expect("recipe serializes");
        hex(&Sha256::digest(json))
    }

    /// The directory name of this recipe's image: `<name>-<first 16 hex of key>`.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.name, &self.key()[..16])
    }

    /// The packages, sorted and without duplicates, as mmdebstrap's `--include` wants them.
    pub(crate) fn include_list(&self) -> String {
        let mut packages: Vec<&str> = self.packages.iter().map(String::as_str).collect();
        packages.sort_unstable();
        packages.dedup();
        packages.join(",")
    }

    /// Checks that the name is usable in a directory name and the rest in a command line.
    pub fn validate(&self) -> Result<(), ImageError> {
        let invalid = |reason: String| ImageError::InvalidRecipe { name: self.name.clone(), reason };
        if !is_valid_name(&self.name) {
            return Err(invalid(NAME_RULE.into()));
        }
        if !is_word(&self.suite) {
            return Err(invalid(format!("suite {:?} must be a single word such as \"trixie\"", self.suite)));
        }
        if !(self.mirror.starts_with("http://")
            || self.mirror.starts_with("https://")
            || self.mirror.starts_with("file:/"))
            || self.mirror.contains(char::is_whitespace)
        {
            return Err(invalid(format!("mirror {:?} must be an http(s):// or file:/ URL", self.mirror)));
        }
        if self.packages.is_empty() {
            return Err(invalid("the package list is empty".into()));
        }
        if let Some(bad) = self.packages.iter().find(|p| !is_word(p) || p.contains(',')) {
            return Err(invalid(format!("package {bad:?} is not a Debian package name")));
        }
        Ok(())
    }
}

/// What [`is_valid_name`] accepts, for error messages.
pub(super) const NAME_RULE: &str = "the name must be 1-64 characters of [A-Za-z0-9._+-], not starting with '.'";

/// Whether `name` is usable as the first part of a directory name in the store.
pub(super) fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
}

/// Non-empty, no white space, no leading dash (it would read as an option).
fn is_word(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('-') && !s.contains(char::is_whitespace)
}

/// Lowercase hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_64_hex_and_stable() {
        let a = Recipe::base().key();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(a, Recipe::base().key());
    }

    #[test]
    fn key_changes_with_packages_suite_mirror_and_name() {
        let base = Recipe::base();
        let mut more = base.clone();
        more.packages.push("htop".into());
        let mut suite = base.clone();
        suite.suite = "forky".into();
        let mut mirror = base.clone();
        mirror.mirror = "http://ftp.de.debian.org/debian".into();
        let mut name = base.clone();
        name.name = "other".into();
        for other in [more, suite, mirror, name] {
            assert_ne!(base.key(), other.key(), "{other:?}");
        }
    }

    #[test]
    fn key_ignores_package_order_and_duplicates() {
        let base = Recipe::base();
        let mut shuffled = base.clone();
        shuffled.packages.reverse();
        shuffled.packages.push("git".into());
        assert_eq!(base.key(), shuffled.key());
    }

    #[test]
    fn with_layer_renames_and_adds_packages() {
        let layered = Recipe::base().with_layer("docker", &["docker.io"]);
        assert_eq!(layered.name, "docker");
        assert!(layered.packages.iter().any(|p| p == "docker.io"));
        assert_ne!(layered.key(), Recipe::base().key());
    }

    #[test]
    fn dir_name_is_name_and_key_prefix() {
        let r = Recipe::base();
        assert_eq!(r.dir_name(), format!("base-{}", &r.key()[..16]));
    }

    #[test]
    fn validate_rejects_bad_names_and_packages() {
        assert!(Recipe::base().validate().is_ok());
        let mut r = Recipe::base();
        r.name = "../x".into();
        assert!(r.validate().is_err());
        let mut r = Recipe::base();
        r.packages.push("a,b".into());
        assert!(r.validate().is_err());
        let mut r = Recipe::base();
        r.packages.push("--evil".into());
        assert!(r.validate().is_err());
    }
}
