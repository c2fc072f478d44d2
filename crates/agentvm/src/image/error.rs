//! The one error type of the image module, and the detail one of its
//! variants carries.

use std::path::PathBuf;

/// Everything that can go wrong finding, building or managing images.
///
/// Messages name the input that failed and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Neither `$XDG_CACHE_HOME` nor `$HOME` gives a cache directory.
    #[error(
        "cannot find the image cache: neither $XDG_CACHE_HOME nor $HOME is set to an absolute path; set one of them"
    )]
    NoCacheDir,

    /// A file system operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "cannot create".
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A host tool the build needs is not installed.
    #[error("{tool} not found on PATH (Debian package {package}): `agentvm doctor --fix` installs it")]
    MissingTool {
        /// The program name.
        tool: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },

    /// npm, which installs the packages of agent layers, is not on `$PATH`.
    #[error("npm not found on PATH: agent layers are installed with the host's npm; install nodejs and npm (`agentvm doctor --fix` does), then try again")]
    MissingNpm,

    /// An agent layer was installed but lacks what its packages declare.
    #[error("agent layer {name:?} is incomplete after npm install: {reason}")]
    BadLayer {
        /// The layer's name.
        name: String,
        /// What is missing or wrong (a finding: no error lies under it).
        reason: String,
    },

    /// An agent layer's package has no readable `package.json`.
    #[error("agent layer {name:?} is incomplete after npm install: {source}")]
    LayerManifest {
        /// The layer's name.
        name: String,
        /// What is wrong with the manifest.
        #[source]
        source: ManifestError,
    },

    /// A normal user lacks the subordinate ids `mmdebstrap --mode=unshare` maps.
    #[error("{0}: run `{fix}` (or build as root)", fix = .0.fix())]
    NoSubordinateIds(super::subids::Shortfall),

    /// The recipe cannot be built as given.
    #[error("invalid image recipe {name:?}: {reason}")]
    InvalidRecipe {
        /// The recipe's name.
        name: String,
        /// What is wrong and how to fix it (no error lies under it).
        reason: String,
    },

    /// A build command could not be started.
    #[error("image build step {step:?} could not run `{command}`: {source}")]
    Spawn {
        /// The build step.
        step: String,
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A build command exited unsuccessfully.
    #[error("image build step {step:?} failed ({status}): `{command}`\nlast lines of {}:\n{tail}", log.display())]
    StepFailed {
        /// The build step.
        step: String,
        /// The command line.
        command: String,
        /// How it ended, e.g. "exit status: 100".
        status: String,
        /// The full log of the step.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },

    /// The built root holds no usable kernel.
    #[error("no usable kernel in the image root: {reason}; the recipe's packages must include a kernel such as linux-image-cloud-amd64")]
    Kernel {
        /// What was found instead (no error lies under it).
        reason: String,
    },

    /// A module the guest needs at boot is missing from the kernel.
    #[error("boot module {module} is neither a file in modules.dep nor built into kernel {release}: choose a kernel package that provides it")]
    MissingModule {
        /// The module name.
        module: String,
        /// The kernel release.
        release: String,
    },

    /// `image.json` or `layer.json` is unreadable.
    #[error("bad image metadata {}: {source}; remove the image with `agentvm image rm` and build again", path.display())]
    BadMeta {
        /// The metadata file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// `remove` matched no image or layer.
    #[error("no image or layer matches {query:?} in {}: see `agentvm image ls` for names and keys", dir.display())]
    NoMatch {
        /// What the user asked to remove.
        query: String,
        /// The images directory.
        dir: PathBuf,
    },
}

impl ImageError {
    /// Wraps an I/O error with what was being done to which path.
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Io { action, path, source }
    }
}

/// An installed package's `package.json` that says npm did not install the
/// package whole: the source of [`ImageError::LayerManifest`].
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot parse {}: {source}", path.display())]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("{} has no version", path.display())]
    NoVersion { path: PathBuf },
}
