//! Instances: a random id and a private runtime dir per launch, holding
//! sockets, logs and a small metadata file for `ps`. The dir is removed when
//! the launch ends; dirs left by launchers that died are swept by the next.

pub mod console_log;
pub mod exec;
pub mod ps;

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What `ps` shows about an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceMeta {
    pub id: String,
    /// The launcher's pid.
    pub pid: u32,
    /// The launcher's start time (clock ticks after boot, field 22 of
    /// `/proc/PID/stat`): tells the launcher from a later process that got
    /// its pid. None in metadata written before it was recorded.
    #[serde(default)]
    pub pid_start: Option<u64>,
    pub flavor: String,
    pub work_dir: PathBuf,
    pub memory_mib: u64,
    pub cpus: u32,
    /// Unix seconds.
    pub started: u64,
    /// QEMU's pid, once it runs.
    #[serde(default)]
    pub qemu_pid: Option<u32>,
    /// Published ports, as given on the command line (e.g. `8080:8080`).
    #[serde(default)]
    pub ports: Vec<String>,
    /// Host loopback ports the guest reaches (`--host-port`).
    #[serde(default)]
    pub host_ports: Vec<u16>,
    /// The sandbox it runs in (`--clone`).
    #[serde(default)]
    pub sandbox: Option<String>,
}

/// The metadata file in an instance dir.
pub const META_FILE: &str = "instance.json";

/// Reads an instance dir's metadata, if it is there and valid.
pub fn read_meta(dir: &Path) -> Option<InstanceMeta> {
    fs::read(dir.join(META_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

/// A live instance's runtime dir; removed on drop.
#[derive(Debug)]
pub struct Instance {
    pub id: String,
    pub dir: PathBuf,
}

/// The runtime dir could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("cannot create runtime dir {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("runtime dir {path} is not private: it belongs to uid {owner} or is accessible to others (mode {mode:o}); remove it or set XDG_RUNTIME_DIR")]
    NotPrivate { path: PathBuf, owner: u32, mode: u32 },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// A random 12-hex-digit instance id.
pub fn new_id() -> String {
    let mut b = [0u8; 6];
    crate::sys::random_bytes(&mut b).expect("getrandom failed");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Creates `base` (0700, ours) if needed and checks that nobody else can
/// reach into it.
pub fn ensure_private_dir(base: &Path) -> Result<(), InstanceError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(base)
        .map_err(|source| InstanceError::Create { path: base.into(), source })?;
    let meta = fs::symlink_metadata(base).map_err(|source| InstanceError::Create { path: base.into(), source })?;
    let me = crate::sys::uid();
    let mode = meta.permissions().mode() & 0o777;
    if !meta.is_dir() || meta.uid() != me || mode & 0o077 != 0 {
        return Err(InstanceError::NotPrivate { path: base.into(), owner: meta.uid(), mode });
    }
    Ok(())
}

impl Instance {
    /// Creates a new instance dir under `base`.
    pub fn create(base: &Path) -> Result<Instance, InstanceError> {
        ensure_private_dir(base)?;
        sweep_stale(base);
        let id = new_id();
        let dir = base.join(&id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| InstanceError::Create { path: dir.clone(), source })?;
        Ok(Instance { id, dir })
    }

    /// Records the metadata `ps` reads (atomically: write, then rename).
    pub fn write_meta(&self, meta: &InstanceMeta) -> Result<(), InstanceError> {
        let path = self.dir.join(META_FILE);
        let tmp = self.dir.join(".instance.json.tmp");
        let err = |source| InstanceError::Write { path: path.clone(), source };
        fs::write(&tmp, serde_json::to_vec_pretty(meta).expect("serializable")).map_err(err)?;
        fs::rename(&tmp, &path).map_err(err)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Removes instance dirs whose launcher is gone (it was killed with SIGKILL,
/// or the host crashed). Returns the ids removed.
pub fn sweep_stale(base: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(base) else { return removed };
    for e in entries.flatten() {
        let dir = e.path();
        let Some(id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
        if !dir.is_dir() {
            continue;
        }
        let meta = read_meta(&dir);
        let stale = match meta {
            Some(m) => !launcher_alive(&m),
            // No metadata: either being created right now, or abandoned
            // before it was written. Only old ones are abandoned.
            None => e
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default().as_secs() > 60)
                .unwrap_or(false),
        };
        if stale && fs::remove_dir_all(&dir).is_ok() {
            removed.push(id);
        }
    }
    removed
}

/// Whether the instance's launcher still runs: its pid exists and, when the
/// metadata recorded it, still has the launcher's start time (a pid that
/// was reused belongs to another process).
pub fn launcher_alive(meta: &InstanceMeta) -> bool {
    let same_start = match meta.pid_start {
        Some(start) => process_start_ticks(meta.pid) == Some(start),
        None => true,
    };
    pid_alive(meta.pid) && same_start
}

/// When process `pid` started, in clock ticks after boot; None if it is gone.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    parse_start_ticks(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The start time (field 22) of a `/proc/PID/stat` line. The command name
/// (field 2, in parentheses) may hold spaces and parentheses, so fields are
/// counted after its last `)`, where field 3 comes first.
pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Whether a process with this pid exists (a zombie counts as existing).
pub fn pid_alive(pid: u32) -> bool {
    crate::sys::pid_alive(pid)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Unix seconds as `YYYY-MM-DD HH:MM` in UTC.
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_format_matches_known_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00");
        assert_eq!(format_utc(1_795_886_518), "2026-11-28 17:21");
    }

    use super::*;

    fn meta(id: &str, pid: u32) -> InstanceMeta {
        InstanceMeta {
            id: id.into(),
            pid,
            pid_start: process_start_ticks(pid),
            flavor: "shell".into(),
            work_dir: "/p".into(),
            memory_mib: 1024,
            cpus: 1,
            started: now_secs(),
            qemu_pid: None,
            ports: Vec::new(),
            host_ports: Vec::new(),
            sandbox: None,
        }
    }

    #[test]
    fn meta_without_new_fields_still_reads() {
        let old = r#"{"id":"abc","pid":1,"flavor":"shell","work_dir":"/p","memory_mib":512,"cpus":1,"started":5}"#;
        let m: InstanceMeta = serde_json::from_str(old).unwrap();
        assert_eq!((m.qemu_pid, m.ports.len(), m.pid_start), (None, 0, None));
    }

    #[test]
    fn start_time_is_field_22_even_with_parentheses_in_the_name() {
        let stat =
            "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 987654 1000 200 18446744073709551615";
        assert_eq!(parse_start_ticks(stat), Some(987_654));
        assert_eq!(parse_start_ticks("4242 (truncated) S 1"), None);
        assert!(process_start_ticks(std::process::id()).is_some());
    }

    #[test]
    fn launcher_whose_pid_now_has_another_start_time_is_not_alive() {
        let mut m = meta("abc", std::process::id());
        assert!(launcher_alive(&m));
        m.pid_start = m.pid_start.map(|t| t + 1);
        assert!(!launcher_alive(&m), "a reused pid counts as the launcher");
        m.pid_start = None;
        assert!(launcher_alive(&m), "old metadata without a start time");
    }

    #[test]
    fn ids_are_12_hex_and_differ() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 12);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn instance_dir_is_private_and_removed_on_drop() {
        let base = tempfile::tempdir().unwrap();
        let base = base.path().join("agentvm");
        let inst = Instance::create(&base).unwrap();
        let mode = fs::metadata(&inst.dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(fs::metadata(&base).unwrap().permissions().mode() & 0o777, 0o700);
        let dir = inst.dir.clone();
        drop(inst);
        assert!(!dir.exists());
    }

    #[test]
    fn base_open_to_others_is_refused() {
        let base = tempfile::tempdir().unwrap();
        fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let e = Instance::create(base.path()).unwrap_err().to_string();
        assert!(e.contains("not private"), "{e}");
    }

    #[test]
    fn sweep_removes_dead_launchers_and_keeps_live_ones() {
        let base = tempfile::tempdir().unwrap();
        fs::set_permissions(base.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let live = Instance::create(base.path()).unwrap();
        live.write_meta(&meta(&live.id, std::process::id())).unwrap();
        let dead_dir = base.path().join("deadbeef0000");
        fs::create_dir(&dead_dir).unwrap();
        // A pid that cannot exist (above pid_max's hard limit).
        let m = meta("deadbeef0000", 4_194_305);
        fs::write(dead_dir.join("instance.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        let fresh = base.path().join("fresh0000000");
        fs::create_dir(&fresh).unwrap();

        assert_eq!(sweep_stale(base.path()), vec!["deadbeef0000".to_string()]);
        assert!(live.dir.exists());
        assert!(fresh.exists(), "a dir without metadata may be mid-creation");
    }
}
