//! The kit every end-to-end test of agentvm shares (as Cloud Hypervisor's
//! `test_infra`): one place for each helper, so a test file holds only its
//! tests and what is particular to them.
//!
//! - [`Launch`]: one `agentvm` invocation with its own project, data and
//!   runtime dirs; runs in the foreground ([`Launch::run`]) or the
//!   background ([`Launch::spawn`], a [`Background`] that is killed if the
//!   test fails), and finds what it left behind.
//! - [`Tmux`]: a real terminal for interactive sessions.
//! - [`servers`]: stand-in servers on the host's loopback (TCP, HTTP, HTTPS
//!   with a test CA) and port polling.
//! - [`files_containing`]: where a secret ended up on the host.
//! - [`process`]: running a command with its output shown, and the host's
//!   process table.
//! - [`skip`]: [`require!`] skips a test whose prerequisite is missing,
//!   visibly: `scripts/test` lists every skip at its end and fails on any
//!   when it runs as root (a set-up host, as in CI).
//!
//! Tests that boot a VM carry `#[ignore = "boots a VM: scripts/test runs it"]`,
//! so a plain `cargo test` runs the unit tests and the tests that need no
//! VM and lists the others as ignored with that reason; `scripts/test`
//! builds the test images and runs them with `--ignored`.

mod background;
mod files;
mod launch;
pub mod process;
pub mod servers;
pub mod skip;
mod tmux;

pub use background::Background;
pub use files::files_containing;
pub use launch::{agentvm_bin, cache_dir, spawn_until_marker, Launch};
pub use process::{git, my_uid, stderr, stdout};
pub use servers::http_get_until;
pub use skip::{Skip, TestUser};
pub use tmux::Tmux;
