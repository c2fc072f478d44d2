//! The launch spec: everything the guest init needs to know about one launch.

use serde::{Deserialize, Serialize};

/// Where the spec lives inside the initramfs (and so in the guest's initial root).
pub const SPEC_PATH: &str = "/agentvm/spec.json";

/// The guest's system CA bundle (Debian's), which OpenSSL, curl, git and
/// Python read by default.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where the guest puts [`CaTrust::extra`] (they also join its system
/// bundle): the file `NODE_EXTRA_CA_CERTS` names.
pub const EXTRA_CA_PATH: &str = "/etc/ssl/certs/agentvm-extra-cas.pem";

/// Directory in the initramfs holding the kernel modules listed in
/// [`LaunchSpec::modules`].
pub const MODULES_DIR: &str = "/agentvm/modules";

/// The program's PATH in the guest unless [`LaunchSpec::env`] sets one. The
/// host needs it too: a dev shell's PATH is put in front of it.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One launch of a program in a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// The guest's hostname.
    pub hostname: String,
    /// Kernel module file names under [`MODULES_DIR`], in load order.
    pub modules: Vec<String>,
    /// The root image's block device in the guest, e.g. `/dev/vda`.
    pub root_device: String,
    /// The root image's file system type, e.g. `squashfs` (layers use it too).
    pub root_fstype: String,
    /// Block devices of extra read-only layers stacked above the root image,
    /// topmost first (e.g. an agent's packages).
    #[serde(default)]
    pub layers: Vec<String>,
    /// virtiofs shares to mount, in order.
    pub mounts: Vec<Mount>,
    /// The guest's network interface, configured statically (no DHCP).
    /// None: only loopback.
    #[serde(default)]
    pub network: Option<Network>,
    /// Host loopback ports the guest may reach at
    /// [`crate::forward::HOST_NAME`] (`--host-port`), carried over the
    /// forwarding port.
    #[serde(default)]
    pub host_ports: Vec<u16>,
    /// Guest ports the host may connect to over the forwarding port
    /// (published ports when the guest has no network interface).
    #[serde(default)]
    pub published_ports: Vec<u16>,
    /// Whether the guest gets clipboard tools (`xclip`, `xsel`, `wl-paste`,
    /// `wl-copy`) that ask the host over the clipboard port
    /// ([`crate::clipboard`]).
    #[serde(default)]
    pub clipboard: bool,
    /// Whether the host sends its changes under /work for the guest's file
    /// watchers ([`crate::watch`]); the module that raises them,
    /// [`crate::watch::MODULE_FILE`], is then one of `modules`, and the
    /// guest goes on without watching when it does not load.
    #[serde(default)]
    pub watch: bool,
    /// The certificates the guest trusts, built on the host.
    #[serde(default)]
    pub ca_trust: CaTrust,
    /// Container runtimes to start before the program, if any.
    #[serde(default)]
    pub containers: Option<Containers>,
    /// A sandboxed clone of the project (`--clone`): /work is on its own
    /// disk instead of the `work` share.
    #[serde(default)]
    pub sandbox: Option<Sandbox>,
    /// The unprivileged user the program runs as.
    pub user: User,
    /// Working directory of the program (normally `/work`).
    pub cwd: String,
    /// The program and its arguments. Empty: the user's login shell.
    pub argv: Vec<String>,
    /// Environment of the program, on top of HOME, USER, LOGNAME, SHELL, PATH.
    /// May hold secrets: the guest must never log it.
    pub env: Vec<(String, String)>,
    /// Run the program on a pseudo-terminal (interactive) instead of pipes.
    pub tty: bool,
    /// Initial terminal size as (rows, columns), when `tty`.
    pub winsize: Option<(u16, u16)>,
    /// Print the guest init's progress on the console (for debugging boots).
    pub verbose: bool,
    /// A template boot (warm starts): the guest mounts the root and layers,
    /// binds only the control port, the balloon and the image's disks, sends
    /// [`crate::Frame::TemplateReady`] and waits for [`crate::Frame::Warm`],
    /// which carries the real spec. This spec then holds no program, user
    /// data or secret.
    #[serde(default)]
    pub template: bool,
}

/// What a VM restored from a template gets over the control port
/// ([`crate::Frame::Warm`]): the launch's spec and what makes it a VM of its
/// own rather than a copy of the template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmLaunch {
    /// The launch, as a cold boot would read it from the initramfs.
    pub spec: LaunchSpec,
    /// The host's wall clock, in nanoseconds since the Unix epoch: the
    /// template's clock stopped when it was saved.
    pub clock_ns: u64,
    /// 32 random bytes from the host, as 64 hex digits: credited to the
    /// guest's entropy pool and the RNG reseeded, so no two VMs of one
    /// template share a random stream.
    pub seed: String,
    /// The guest's `/etc/machine-id` (32 hex digits).
    pub machine_id: String,
}

/// A second program in a running VM (`agentvm exec`), sent in
/// [`crate::Frame::Exec`]. It runs as [`LaunchSpec::user`] in
/// [`LaunchSpec::cwd`], with the launch's environment plus `env`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The program and its arguments. Empty: the user's login shell.
    pub argv: Vec<String>,
    /// Environment on top of the launch's (same rules as [`LaunchSpec::env`]).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Run on a pseudo-terminal instead of pipes.
    #[serde(default)]
    pub tty: bool,
    /// Initial terminal size as (rows, columns), when `tty`.
    #[serde(default)]
    pub winsize: Option<(u16, u16)>,
}

/// The guest's trust store for one launch, built on the host (PEM
/// certificates, one per string). Empty: the image's bundle as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaTrust {
    /// The host's public roots: with any, they and [`CaTrust::extra`] make
    /// up [`SYSTEM_BUNDLE`] in place of the image's.
    #[serde(default)]
    pub bundle: Vec<String>,
    /// The certificates beyond the public web roots (the host's company or
    /// local CAs, the instance CA of `--shield-secrets`): they join
    /// [`SYSTEM_BUNDLE`] and make up [`EXTRA_CA_PATH`].
    #[serde(default)]
    pub extra: Vec<String>,
}

impl CaTrust {
    /// Whether the image's bundle stays as it is.
    pub fn is_empty(&self) -> bool {
        self.bundle.is_empty() && self.extra.is_empty()
    }
}

/// Container runtimes and the disk that holds their storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Containers {
    /// Runtime names, e.g. `docker`, `podman`, `containerd`, `crun`.
    pub runtimes: Vec<String>,
    /// The storage disk (an ext4 file system), e.g. `serial:agentvm-cri`.
    pub disk: String,
}

/// A sandboxed clone: its disk holds a git clone of the project, mounted at
/// [`crate::guest::WORK`]; the project is shared read-only at
/// [`crate::guest::SANDBOX_HOST_REPO`] and results go to
/// [`crate::guest::SANDBOX_EXPORT`] (both in [`LaunchSpec::mounts`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    /// The sandbox's name (its branch on the host is `agentvm/NAME`).
    pub name: String,
    /// Its disk (an ext4 file system), e.g. `serial:agentvm-work`.
    pub disk: String,
    /// The host's current branch, checked out on the first run; None when
    /// the host's HEAD is detached.
    pub branch: Option<String>,
    /// The host's HEAD commit, the first run's starting point.
    pub commit: String,
    /// The commit the host's `agentvm/NAME` holds, when it is this
    /// sandbox's last result: a sandbox not written since that export has
    /// nothing new to export.
    #[serde(default)]
    pub held: Option<String>,
}

/// A virtiofs share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// virtiofs tag, as given to QEMU's vhost-user-fs device.
    pub tag: String,
    /// Mount point in the guest.
    pub path: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// Static configuration of the guest's one network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Address with prefix length, e.g. `10.0.2.15/24`.
    pub address: String,
    /// Default gateway, e.g. `10.0.2.2`.
    pub gateway: String,
    /// Name servers for /etc/resolv.conf.
    pub dns: Vec<String>,
}

/// The guest user the program runs as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Login name, normally `agent`.
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Home directory, normally `/home/agent` (a share).
    pub home: String,
}

/// A spec that cannot be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("launch spec is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl LaunchSpec {
    /// Encodes the spec for the initramfs.
    pub fn to_bytes(&self) -> Result<Vec<u8>, SpecError> {
        Ok(serde_json::to_vec(self)?)
    }

    /// Decodes a spec read from the initramfs.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SpecError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> LaunchSpec {
        LaunchSpec {
            hostname: "agentvm".into(),
            modules: vec!["virtio.ko".into()],
            root_device: "/dev/vda".into(),
            root_fstype: "squashfs".into(),
            layers: vec!["/dev/vdb".into()],
            mounts: vec![Mount { tag: "work".into(), path: crate::guest::WORK.into(), read_only: false }],
            network: Some(Network {
                address: "10.0.2.15/24".into(),
                gateway: "10.0.2.2".into(),
                dns: vec!["10.0.2.3".into()],
            }),
            host_ports: vec![5432],
            published_ports: vec![8000],
            clipboard: true,
            watch: true,
            ca_trust: CaTrust {
                bundle: vec!["-----BEGIN CERTIFICATE-----\nPUBLIC".into()],
                extra: vec!["-----BEGIN CERTIFICATE-----\nEXTRA".into()],
            },
            containers: Some(Containers { runtimes: vec!["docker".into()], disk: "serial:agentvm-cri".into() }),
            sandbox: Some(Sandbox {
                name: "fix-1".into(),
                disk: "serial:agentvm-work".into(),
                branch: Some("main".into()),
                commit: "0".repeat(40),
                held: Some("1".repeat(40)),
            }),
            user: User { name: crate::guest::USER.into(), uid: 1000, gid: 1000, home: crate::guest::HOME.into() },
            cwd: crate::guest::WORK.into(),
            argv: vec!["sh".into(), "-c".into(), "exit 7".into()],
            env: vec![("TERM".into(), "xterm".into())],
            tty: false,
            winsize: None,
            verbose: false,
            template: false,
        }
    }

    #[test]
    fn spec_roundtrip_preserves_every_field() {
        let spec = sample();
        assert_eq!(LaunchSpec::from_bytes(&spec.to_bytes().unwrap()).unwrap(), spec);
    }

    #[test]
    fn spec_without_template_field_is_a_cold_boot() {
        let mut json: serde_json::Value = serde_json::from_slice(&sample().to_bytes().unwrap()).unwrap();
        json.as_object_mut().unwrap().remove("template");
        let spec = LaunchSpec::from_bytes(&serde_json::to_vec(&json).unwrap()).unwrap();
        assert!(!spec.template);
    }

    #[test]
    fn spec_garbage_is_an_error() {
        assert!(LaunchSpec::from_bytes(b"{not json").is_err());
    }
}
