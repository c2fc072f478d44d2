//! agentvm: run AI coding agents in fast, isolated KVM microVMs.
//!
//! The `agentvm` binary is a thin CLI ([`cli`]) over this library. One
//! `agentvm run` goes through these stages, each a folder:
//!
//! 1. [`config`]: what to run, from flags, environment and config files
//!    (a project's file only once trusted), validated once.
//! 2. [`image`]: the cached root image and agent layers (built if missing).
//! 3. [`guest_env`]: what the guest finds: the agent home, the dev shell,
//!    the container runtimes' disk.
//! 4. [`launch`]: the whole run as named stages: resources, host state,
//!    the plan (pure), initramfs, start the helpers and QEMU, relay
//!    the terminal or the streams, and the program's exit status.
//! 5. [`net`] and [`vm`]: the network back ends, the forwarding channel,
//!    the egress proxy and the shield; the accelerator, QEMU's command
//!    line, helper processes and virtiofsd shares.
//!
//! [`sandbox`] keeps the sandboxed clones (`run --clone`): their disks,
//! the project's checks, and their results brought back as branches.
//! [`instance`] keeps each running VM's runtime dir and serves `ps`,
//! `stop`, `logs` and `exec`; [`relay`] moves the terminal or the streams
//! for `run`, `exec` and `shell`; [`sys`] holds the host's system calls
//! (the one place for `unsafe`); [`doctor`] checks the host;
//! [`build_info`] is what the build put in (version, commit, guest init);
//! [`escape`] makes text a guest wrote safe to log and print; [`clipboard`]
//! answers the guest's clipboard tools from the host's clipboard; [`watch`]
//! tells the guest's file watchers what changed on the host.

pub mod build_info;
pub mod cli;
pub mod clipboard;
pub mod commands;
pub mod config;
pub mod doctor;
pub mod escape;
pub mod guest_env;
pub mod host_setup;
pub mod image;
pub mod instance;
pub mod launch;
pub mod net;
pub mod paths;
pub mod relay;
pub mod sandbox;
pub mod sys;
pub mod tools;
pub mod vm;
pub mod watch;
