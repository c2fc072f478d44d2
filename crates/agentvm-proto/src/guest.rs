//! Where things are in the guest, and who runs the program there: the
//! launcher writes these into the spec and its environment, the guest init
//! and the host's home and dev shell set-up rely on them.

/// Mount point of the project (the `work` share), the program's working
/// directory.
pub const WORK: &str = "/work";
/// Home of the agent user (the `home` share).
pub const HOME: &str = "/home/agent";
/// Mount point of the host's Nix store, when a dev shell needs it.
pub const NIX_STORE: &str = "/nix/store";
/// The unprivileged user the program runs as.
pub const USER: &str = "agent";
/// The agent user's id when the host user is root (otherwise it takes the
/// host user's ids, so files on the shares keep their owner).
pub const ROOT_HOST_GUEST_ID: u32 = 1000;
