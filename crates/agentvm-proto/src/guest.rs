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

/// Where a sandboxed clone (`--clone`) sees the host's project, read-only
/// (its git remote `host`).
pub const SANDBOX_HOST_REPO: &str = "/agentvm/host";
/// Where a sandboxed clone writes its results for the host (a share of
/// their own): [`SANDBOX_BUNDLE`] and [`SANDBOX_STATUS`].
pub const SANDBOX_EXPORT: &str = "/agentvm/export";
/// The git bundle of a sandbox's state, in [`SANDBOX_EXPORT`]: one ref,
/// [`SANDBOX_REF`].
pub const SANDBOX_BUNDLE: &str = "result.bundle";
/// The ref a sandbox's bundle carries: its HEAD, plus a commit of the
/// uncommitted work when there is any.
pub const SANDBOX_REF: &str = "refs/agentvm/export";
/// What the sandbox reports about itself (JSON), in [`SANDBOX_EXPORT`].
pub const SANDBOX_STATUS: &str = "status.json";
/// The guest's tool for a sandbox: `prepare` on the first run, `export`
/// when the program ends or the host asks (`agentvm sandbox export`).
pub const SANDBOX_TOOL: &str = "/usr/local/libexec/agentvm-sandbox";
