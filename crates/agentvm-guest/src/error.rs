//! The one error type of the guest init.

use std::io;

/// Everything that can go wrong while booting the guest and starting the program.
///
/// Each message names the operation and the path (or name) it failed on, because
/// it ends up verbatim on the host's terminal as `agentvm-guest: <message>`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation on a path failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was attempted, e.g. "read" or "create directory".
        op: &'static str,
        /// The path it was attempted on.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// mount(2) failed.
    #[error("cannot mount {fstype} {what} on {target}: {source}")]
    Mount {
        /// File system type.
        fstype: String,
        /// Mount source (device, tag or file system name).
        what: String,
        /// Mount point.
        target: String,
        /// The OS error.
        source: io::Error,
    },
    /// The network interface could not be configured.
    #[error("cannot configure the network: {0}")]
    Network(String),
    /// The launch spec could not be decoded.
    #[error("launch spec {path} is invalid: {source}")]
    Spec {
        /// Where the spec was read from.
        path: &'static str,
        /// The decoding error.
        source: agentvm_proto::SpecError,
    },
    /// finit_module(2) failed for a module other than with EEXIST.
    #[error("cannot load kernel module {path}: {source}{hint}")]
    Module {
        /// The module file.
        path: String,
        /// The OS error.
        source: io::Error,
        /// Extra advice, possibly empty.
        hint: &'static str,
    },
    /// Something expected to appear (a device, a port) did not in time.
    #[error("{what} did not appear within {secs} s{hint}")]
    Timeout {
        /// What was waited for, with its path or name.
        what: String,
        /// How long we waited.
        secs: u64,
        /// Extra advice, possibly empty.
        hint: &'static str,
    },
    /// A system call that is not about a path failed.
    #[error("{op} failed: {source}")]
    Sys {
        /// The call and its argument, e.g. "sethostname(agentvm)".
        op: String,
        /// The OS error.
        source: io::Error,
    },
    /// The program could not be started (reported by the forked child).
    #[error("cannot start the program: {0}")]
    Spawn(String),
    /// A container runtime could not be set up or did not start.
    #[error("container runtimes: {0}")]
    Containers(String),
    /// The sandbox's tool failed (`--clone`).
    #[error("the sandbox's {step} failed:\n{output}{full}")]
    Sandbox {
        /// `prepare` or `export`.
        step: String,
        /// The end of the tool's error output.
        output: String,
        /// What to do when its disk is full, or nothing.
        full: String,
    },
    /// The host clipboard's channel could not be set up (`--clipboard`).
    #[error("clipboard: {0}")]
    Clipboard(String),
    /// The launch spec holds a value the init cannot use.
    #[error("launch spec: {0}")]
    BadSpec(String),
    /// Writing to the control port failed; the host is gone.
    #[error("control port {path}: {source}")]
    Port {
        /// The port's device node.
        path: String,
        /// The OS error.
        source: io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for `op` on `path`.
    pub fn io(op: &'static str, path: impl AsRef<std::path::Path>, source: io::Error) -> Self {
        Error::Io { op, path: path.as_ref().display().to_string(), source }
    }

    /// An [`Error::Sys`] for the call described by `op`.
    pub fn sys(op: impl Into<String>, source: io::Error) -> Self {
        Error::Sys { op: op.into(), source }
    }
}

/// Attaches an operation and a path to an `io::Result`.
pub trait IoContext<T> {
    /// Maps the error to [`Error::Io`] with `op` and `path`.
    fn ctx(self, op: &'static str, path: impl AsRef<std::path::Path>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl AsRef<std::path::Path>) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}
