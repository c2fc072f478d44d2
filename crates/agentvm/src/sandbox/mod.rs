//! Sandboxed clones (`agentvm run --clone NAME`): the agent gets its own
//! copy of the project on a disk of its own, and its work comes back as the
//! branch `agentvm/NAME`.
//!
//! - [`name`]: what a sandbox may be called.
//! - [`repo`]: the project's repository, checked before boot.
//! - [`store`]: the sandbox's dir, disk, lock and record; listing, removing.
//! - [`import`]: the guest's bundle, verified, into `agentvm/NAME`.
//! - [`git`]: the neutralised git the host runs for all of it.
//!
//! The guest never writes the project: it is shared read-only, and the
//! guest's one writable dir on the host is the sandbox's `export/`.

pub mod git;
pub mod import;
pub mod name;
pub mod repo;
pub mod store;

pub use name::{NameError, SandboxName};
