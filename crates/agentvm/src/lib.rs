//! agentvm: run AI coding agents in fast, isolated KVM microVMs.
//!
//! The `agentvm` binary is a thin CLI over this library.

pub mod image;
pub mod initramfs;
pub mod vm;
pub mod paths;
pub mod settings;
