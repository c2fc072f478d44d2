//! What the guest finds when it starts, prepared on the host: the agent
//! home's first-run files, the project's dev shell, and the container
//! runtimes' persistent disk.

pub mod cri;
pub mod devshell;
pub mod home;
