//! Directory shares: one virtiofsd per share, sandboxed, with the guest's
//! agent user mapped to the invoking host user, and kept from making device
//! nodes or setuid and setgid files on the host ([`crate::vm::share_filter`]).

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::vm::process::{self, Helper};
use crate::vm::share_filter::{self, VIRTIOFSD_MODCAPS};

/// A host directory shared into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// virtiofs tag, also used for socket and log names.
    pub tag: String,
    pub host_dir: PathBuf,
    /// Mount point in the guest.
    pub guest_path: String,
    pub read_only: bool,
    pub cache: CacheMode,
}

/// How long the guest may cache a share's names, attributes and data
/// (virtiofsd's `--cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Cache for a second, then revalidate: edits on the host show up
    /// within a second.
    #[default]
    Auto,
    /// Cache until the guest drops it: fastest, but files the host changes
    /// while the VM runs may look stale in the guest.
    Always,
    /// Cache names and attributes only; file data is always read from the host.
    Metadata,
    /// No caching: every access goes to the host.
    Never,
}

impl CacheMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Auto => "auto",
            CacheMode::Always => "always",
            CacheMode::Metadata => "metadata",
            CacheMode::Never => "never",
        }
    }
}

/// How guest and host user ids correspond.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub host_uid: u32,
    pub host_gid: u32,
    /// The agent user's ids in the guest.
    pub guest_uid: u32,
    pub guest_gid: u32,
}

/// Guest ids used for the agent when the host user is root: files the agent
/// writes still belong to the host's root, but the agent is not root.
pub use agentvm_proto::guest::ROOT_HOST_GUEST_ID;

impl IdMap {
    /// The mapping for the invoking host user.
    pub fn for_host(uid: u32, gid: u32) -> IdMap {
        if uid == 0 {
            IdMap { host_uid: 0, host_gid: gid, guest_uid: ROOT_HOST_GUEST_ID, guest_gid: ROOT_HOST_GUEST_ID }
        } else {
            IdMap { host_uid: uid, host_gid: gid, guest_uid: uid, guest_gid: gid }
        }
    }

    /// The mapping for the user running this process.
    pub fn current() -> IdMap {
        IdMap::for_host(crate::sys::uid(), crate::sys::gid())
    }
}

/// A share that could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("virtiofsd not found (looked on PATH, /usr/libexec, /usr/lib/qemu): `agentvm doctor --fix` installs it")]
    NoVirtiofsd,
    #[error("cannot create the socket {path} for the {tag} share: {source}")]
    Socket { tag: String, path: PathBuf, source: std::io::Error },
    #[error("cannot start virtiofsd for {dir}: {source}")]
    Spawn { dir: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Filter(#[from] share_filter::FilterError),
}

/// Finds the virtiofsd binary.
pub fn find_virtiofsd() -> Option<PathBuf> {
    crate::tools::find_program("virtiofsd", &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"])
}

/// virtiofsd's arguments for one share, listening on inherited fd `fd`.
///
/// virtiofsd always runs in its namespace sandbox (it sees only the shared
/// dir). As a normal user, its user namespace maps only the invoking user
/// (as 0), and the guest's agent uid translates to that 0; other guest ids
/// cannot create files. As root, the guest's agent uid maps to root. In
/// both cases it may not make device nodes or keep setuid bits.
pub fn virtiofsd_args(share: &Share, ids: IdMap, fd: i32) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "--shared-dir".into(),
        share.host_dir.clone().into(),
        format!("--fd={fd}").into(),
        "--sandbox=namespace".into(),
        VIRTIOFSD_MODCAPS.into(),
        format!("--cache={}", share.cache.as_str()).into(),
        "--log-level=error".into(),
    ];
    let (ns_uid, ns_gid) = if ids.host_uid == 0 {
        (0, ids.host_gid)
    } else {
        a.push(format!("--uid-map=:0:{}:1:", ids.host_uid).into());
        a.push(format!("--gid-map=:0:{}:1:", ids.host_gid).into());
        (0, 0)
    };
    a.push(format!("--translate-uid=map:{}:{ns_uid}:1", ids.guest_uid).into());
    a.push(format!("--translate-gid=map:{}:{ns_gid}:1", ids.guest_gid).into());
    if share.read_only {
        a.push("--readonly".into());
    }
    a
}

/// Where virtiofsd listens for the share `tag` of the instance in `runtime_dir`.
pub fn socket_path(runtime_dir: &Path, tag: &str) -> PathBuf {
    runtime_dir.join(format!("{tag}.sock"))
}

/// Starts virtiofsd for `share`, listening on `<runtime_dir>/<tag>.sock`.
/// The socket exists (and accepts) before this returns, so QEMU can connect
/// right away; virtiofsd answers once it is up.
pub fn start(share: &Share, ids: IdMap, runtime_dir: &Path) -> Result<(Helper, PathBuf), ShareError> {
    let bin = find_virtiofsd().ok_or(ShareError::NoVirtiofsd)?;
    let socket = socket_path(runtime_dir, &share.tag);
    let listener = UnixListener::bind(&socket).map_err(|source| ShareError::Socket {
        tag: share.tag.clone(),
        path: socket.clone(),
        source,
    })?;
    let listener = OwnedFd::from(listener);
    let filters = share_filter::programs()?;
    let mut cmd = Command::new(bin);
    cmd.args(virtiofsd_args(share, ids, 3));
    crate::sys::process::seccomp_child(&mut cmd, filters);
    let helper = process::spawn(
        &format!("virtiofsd for {}", share.guest_path),
        cmd,
        &[(listener.as_fd(), 3)],
        &runtime_dir.join(format!("virtiofsd-{}.log", share.tag)),
    )
    .map_err(|source| ShareError::Spawn { dir: share.host_dir.clone(), source })?;
    Ok((helper, socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share() -> Share {
        Share {
            tag: "work".into(),
            host_dir: "/p".into(),
            guest_path: "/work".into(),
            read_only: false,
            cache: CacheMode::Auto,
        }
    }

    fn args(ids: IdMap, s: &Share) -> Vec<String> {
        virtiofsd_args(s, ids, 3).into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn normal_user_maps_own_ids_through_a_user_namespace() {
        let a = args(IdMap::for_host(1001, 1002), &share());
        assert!(a.contains(&"--uid-map=:0:1001:1:".to_string()));
        assert!(a.contains(&"--gid-map=:0:1002:1:".to_string()));
        assert!(a.contains(&"--translate-uid=map:1001:0:1".to_string()));
        assert!(a.contains(&"--translate-gid=map:1002:0:1".to_string()));
        assert!(a.contains(&"--sandbox=namespace".to_string()));
        assert!(a.contains(&"--fd=3".to_string()));
    }

    #[test]
    fn virtiofsd_drops_mknod_fsetid_and_setfcap_as_root_and_as_a_user() {
        for ids in [IdMap::for_host(0, 0), IdMap::for_host(1001, 1001)] {
            assert!(args(ids, &share()).contains(&"--modcaps=-mknod:-fsetid:-setfcap".to_string()));
        }
    }

    #[test]
    fn root_host_maps_guest_agent_1000_to_root_without_user_namespace() {
        let ids = IdMap::for_host(0, 0);
        assert_eq!((ids.guest_uid, ids.guest_gid), (1000, 1000));
        let a = args(ids, &share());
        assert!(!a.iter().any(|x| x.starts_with("--uid-map")));
        assert!(a.contains(&"--translate-uid=map:1000:0:1".to_string()));
        assert!(a.contains(&"--translate-gid=map:1000:0:1".to_string()));
    }

    #[test]
    fn read_only_share_is_read_only_in_virtiofsd() {
        let s = Share { read_only: true, ..share() };
        assert!(args(IdMap::for_host(5, 5), &s).contains(&"--readonly".to_string()));
        assert!(!args(IdMap::for_host(5, 5), &share()).contains(&"--readonly".to_string()));
    }

    #[test]
    fn cache_mode_reaches_virtiofsd() {
        let ids = IdMap::for_host(1000, 1000);
        assert!(args(ids, &share()).contains(&"--cache=auto".to_string()));
        let s = Share { cache: CacheMode::Always, ..share() };
        assert!(args(ids, &s).contains(&"--cache=always".to_string()));
    }
}
