//! agentvm: run AI coding agents in fast, isolated KVM microVMs.
//!
//! The `agentvm` binary is a thin CLI ([`cli`]) over this library. One
//! `agentvm run` flows through [`settings`] (what to run, validated once),
//! [`image`] (the cached root image), [`instance`] (runtime dir), [`share`]
//! (virtiofsd), [`vm`] (accelerator, QEMU command line, helper processes)
//! and [`launch`] (the whole sequence and the stdio relay); [`devshell`]
//! evaluates a project's Nix, devenv or direnv environment on the host.

pub mod cli;
pub mod console;
pub mod console_log;
pub mod cri;
pub mod devshell;
pub mod doctor;
pub mod egress;
pub mod envvars;
pub mod exec;
pub mod flavor;
pub mod homesetup;
pub mod forwarding;
pub mod http;
pub mod image;
pub mod initramfs;
pub mod instance;
pub mod launch;
pub mod net;
pub mod paths;
pub mod ps;
pub mod settings;
pub mod shield;
pub mod share;
pub mod share_filter;
pub mod tools;
pub mod trust;
pub mod vm;
