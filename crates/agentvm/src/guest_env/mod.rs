//! What the guest finds when it starts, prepared on the host: the agent
//! home's first-run files, the project's dev shell, the container
//! runtimes' persistent disk, the CA certificates it trusts, and the
//! agent's login, shared by every project's home.

pub mod cri;
pub mod devshell;
pub mod disk;
pub mod home;
pub mod host_ca;
pub mod login;

/// Where the guest sees the project (the `work` share), its working
/// directory and git's safe directory.
pub use agentvm_proto::guest::WORK as GUEST_WORK;
