//! Managing running instances: `agentvm ps`, `stop` and `logs`.
//!
//! Everything here works from the runtime dirs under
//! [`crate::paths::runtime_base`]: each holds the instance's metadata
//! (launcher and QEMU pids), its sockets and its logs. Instances whose
//! launcher is gone are swept first.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::instance::console_log;
use crate::instance::{self, InstanceMeta};
use crate::sys;

/// Marker file `agentvm stop` leaves in an instance dir.
const STOPPING_FILE: &str = "stopping";
/// How long a launcher gets to die after SIGKILL, and its QEMU after that.
const KILL_WAIT: Duration = Duration::from_secs(3);

/// An instance command that failed.
#[derive(Debug, thiserror::Error)]
pub enum InstancesError {
    #[error("no instance matches {query:?}; {}", running_list(.running))]
    NotFound { query: String, running: Vec<String> },
    #[error("{query:?} matches {} instances ({}): give more of the id", .matches.len(), .matches.join(", "))]
    Ambiguous { query: String, matches: Vec<String> },
    #[error("cannot signal the launcher (pid {pid}) of instance {id}: {source}")]
    Signal { id: String, pid: u32, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("instance {id} did not stop: its launcher (pid {pid}) survived SIGKILL")]
    Unkillable { id: String, pid: u32 },
    #[error("instance {id} has no network log: only runs with --network allow keep one")]
    NoNetLog { id: String },
}

fn running_list(running: &[String]) -> String {
    if running.is_empty() {
        "no instance is running".into()
    } else {
        format!("running: {}", running.join(", "))
    }
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The launcher runs but QEMU is not started yet.
    Starting,
    /// QEMU runs.
    Running,
    /// `agentvm stop` asked it to stop.
    Stopping,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
        }
    }
}

/// A live instance: its metadata and runtime dir.
#[derive(Debug, Clone)]
pub struct Live {
    pub meta: InstanceMeta,
    pub dir: PathBuf,
}

impl Live {
    /// Its state, from the metadata and the stop marker.
    pub fn state(&self) -> State {
        if self.dir.join(STOPPING_FILE).exists() {
            State::Stopping
        } else if self.meta.qemu_pid.is_none() {
            State::Starting
        } else {
            State::Running
        }
    }

    /// QEMU's resident memory in KiB, if QEMU runs (and is still ours).
    pub fn qemu_rss_kib(&self) -> Option<u64> {
        let pid = self.meta.qemu_pid?;
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let (ppid, rss) = parse_proc_status(&status);
        // A reused pid is not our QEMU.
        (ppid == Some(self.meta.pid)).then_some(rss).flatten()
    }

    /// `id (flavor in work dir)`, for messages.
    fn describe(&self) -> String {
        format!("{} ({} in {})", self.meta.id, self.meta.flavor, self.meta.work_dir.display())
    }
}

/// The instances whose launcher is alive, oldest first. Sweeps the dirs of
/// dead launchers first.
pub fn live_instances(base: &Path) -> Vec<Live> {
    instance::sweep_stale(base);
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(base) else { return found };
    for e in entries.flatten() {
        let dir = e.path();
        if let Some(meta) = instance::read_meta(&dir) {
            if !launcher_gone(&meta) {
                found.push(Live { meta, dir });
            }
        }
    }
    found.sort_by(|a, b| (a.meta.started, &a.meta.id).cmp(&(b.meta.started, &b.meta.id)));
    found
}

/// Finds the instance whose id is `query` or starts with it.
pub fn resolve<'a>(live: &'a [Live], query: &str) -> Result<&'a Live, InstancesError> {
    let ids: Vec<&str> = live.iter().map(|l| l.meta.id.as_str()).collect();
    match match_prefix(&ids, query) {
        Ok(i) => Ok(&live[i]),
        Err(matches) if matches.is_empty() => {
            Err(InstancesError::NotFound { query: query.into(), running: live.iter().map(Live::describe).collect() })
        }
        Err(matches) => Err(InstancesError::Ambiguous {
            query: query.into(),
            matches: matches.into_iter().map(|i| ids[i].to_string()).collect(),
        }),
    }
}

/// The index of the one id equal to `query` or starting with it; else the
/// indices of all matches (none, or several).
pub fn match_prefix(ids: &[&str], query: &str) -> Result<usize, Vec<usize>> {
    if let Some(i) = ids.iter().position(|id| *id == query) {
        return Ok(i);
    }
    let matches: Vec<usize> =
        if query.is_empty() { Vec::new() } else { (0..ids.len()).filter(|&i| ids[i].starts_with(query)).collect() };
    match matches[..] {
        [one] => Ok(one),
        _ => Err(matches),
    }
}

/// The parent pid and the resident set size (KiB) from a `/proc/PID/status`.
pub fn parse_proc_status(status: &str) -> (Option<u32>, Option<u64>) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
    };
    (field("PPid:").and_then(|v| v.parse().ok()), field("VmRSS:").and_then(|v| v.parse().ok()))
}

/// Whether `pid` is gone: no such process, or a zombie waiting for its parent.
pub fn process_gone(pid: u32) -> bool {
    if !instance::pid_alive(pid) {
        return true;
    }
    // The state follows the command name in parentheses, which may contain anything.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => !instance::pid_alive(pid),
    }
}

/// Whether an instance's launcher is gone: exited, a zombie, or its pid now
/// belongs to another process (the start time differs).
pub fn launcher_gone(meta: &InstanceMeta) -> bool {
    process_gone(meta.pid) || !instance::launcher_alive(meta)
}

/// One row of `agentvm ps`, also its JSON form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PsEntry {
    pub id: String,
    pub state: State,
    pub flavor: String,
    pub work_dir: PathBuf,
    /// Unix seconds.
    pub started: u64,
    pub uptime_secs: u64,
    pub cpus: u32,
    /// Configured guest memory.
    pub memory_mib: u64,
    /// QEMU's resident memory, when known.
    pub rss_mib: Option<u64>,
    pub ports: Vec<String>,
    /// Host loopback ports the guest reaches as host.agentvm.internal.
    pub host_ports: Vec<u16>,
    /// The sandbox it runs in (`--clone`).
    pub sandbox: Option<String>,
    /// The launcher (`agentvm run`).
    pub pid: u32,
    pub qemu_pid: Option<u32>,
}

impl PsEntry {
    /// The row for `live` at Unix time `now`.
    pub fn of(live: &Live, now: u64) -> PsEntry {
        let m = &live.meta;
        PsEntry {
            id: m.id.clone(),
            state: live.state(),
            flavor: m.flavor.clone(),
            work_dir: m.work_dir.clone(),
            started: m.started,
            uptime_secs: now.saturating_sub(m.started),
            cpus: m.cpus,
            memory_mib: m.memory_mib,
            rss_mib: live.qemu_rss_kib().map(|k| k.div_ceil(1024)),
            ports: m.ports.clone(),
            host_ports: m.host_ports.clone(),
            sandbox: m.sandbox.clone(),
            pid: m.pid,
            qemu_pid: m.qemu_pid,
        }
    }
}

/// A duration for humans: `42s`, `7m`, `3h05m`, `2d04h`.
pub fn format_uptime(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// Published ports as given (`8080:80`), then host ports the guest reaches (`host:5432`).
fn ports_cell(e: &PsEntry) -> String {
    let all: Vec<String> = e.ports.iter().cloned().chain(e.host_ports.iter().map(|p| format!("host:{p}"))).collect();
    if all.is_empty() {
        "-".into()
    } else {
        all.join(",")
    }
}

/// The `agentvm ps` table (with its header line).
pub fn format_table(entries: &[PsEntry]) -> String {
    let header = ["ID", "FLAVOR", "STATE", "UPTIME", "CPUS", "MEMORY", "RSS", "PORTS", "SANDBOX", "PROJECT"];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for e in entries {
        rows.push(vec![
            e.id.clone(),
            e.flavor.clone(),
            e.state.as_str().into(),
            format_uptime(e.uptime_secs),
            e.cpus.to_string(),
            format!("{}M", e.memory_mib),
            e.rss_mib.map_or("-".into(), |m| format!("{m}M")),
            ports_cell(e),
            e.sandbox.clone().unwrap_or_else(|| "-".into()),
            e.work_dir.display().to_string(),
        ]);
    }
    aligned(&rows)
}

/// `rows` (a header first) as text in aligned columns.
pub fn aligned(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> =
        (0..columns).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let last = r.len() - 1;
        for (c, cell) in r.iter().enumerate() {
            if c == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push('\n');
    }
    out
}

/// `agentvm ps`: the table, or a JSON array with `json`.
pub fn ps(base: &Path, json: bool) -> String {
    let now = instance::now_secs();
    let entries: Vec<PsEntry> = live_instances(base).iter().map(|l| PsEntry::of(l, now)).collect();
    if json {
        let mut s = serde_json::to_string_pretty(&entries).expect("serializable");
        s.push('\n');
        s
    } else {
        format_table(&entries)
    }
}

/// How an instance was stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    pub id: String,
    /// It did not stop within the timeout and was killed.
    pub killed: bool,
}

/// `agentvm stop`: asks each instance's launcher to stop (SIGTERM: the
/// program gets the signal and the VM powers off), waits up to `timeout`
/// for all of them, then kills the rest (their helpers die with them) and
/// removes their runtime dirs.
pub fn stop(base: &Path, queries: &[String], all: bool, timeout: Duration) -> Result<Vec<Stopped>, InstancesError> {
    let live = live_instances(base);
    let mut targets: Vec<Live> = Vec::new();
    if all {
        targets = live.clone();
    } else {
        for q in queries {
            let l = resolve(&live, q)?;
            if !targets.iter().any(|t| t.meta.id == l.meta.id) {
                targets.push(l.clone());
            }
        }
    }
    for t in &targets {
        let _ = fs::write(t.dir.join(STOPPING_FILE), b"");
        signal(t, libc::SIGTERM)?;
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && !targets.iter().all(|t| launcher_gone(&t.meta)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stopped = Vec::new();
    for t in &targets {
        let killed = !launcher_gone(&t.meta);
        if killed {
            signal(t, libc::SIGKILL)?;
            if !wait_launcher_gone(&t.meta, KILL_WAIT) {
                return Err(InstancesError::Unkillable { id: t.meta.id.clone(), pid: t.meta.pid });
            }
        }
        // QEMU and virtiofsd die with the launcher (PR_SET_PDEATHSIG); make
        // sure QEMU is gone before its dir goes.
        if let Some(qemu) = t.meta.qemu_pid.filter(|&p| cmdline_mentions(p, &t.dir)) {
            wait_gone(qemu, KILL_WAIT);
        }
        let _ = fs::remove_dir_all(&t.dir);
        stopped.push(Stopped { id: t.meta.id.clone(), killed });
    }
    Ok(stopped)
}

/// Sends `sig` to the instance's launcher unless it is gone. The process is
/// pinned with a pidfd before its start time is checked, so the signal
/// cannot reach another process that took over the pid in between.
fn signal(t: &Live, sig: i32) -> Result<(), InstancesError> {
    let fail = |source| InstancesError::Signal { id: t.meta.id.clone(), pid: t.meta.pid, source };
    let pidfd = match sys::pidfd_open(t.meta.pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
        Err(e) => return Err(fail(e)),
    };
    if !instance::launcher_alive(&t.meta) {
        return Ok(());
    }
    match sys::pidfd_send_signal(&pidfd, sig) {
        Err(source) if source.raw_os_error() != Some(libc::ESRCH) => Err(fail(source)),
        _ => Ok(()),
    }
}

fn wait_launcher_gone(meta: &InstanceMeta, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !launcher_gone(meta) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !process_gone(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Whether process `pid`'s command line mentions `path` (identifies our QEMU).
fn cmdline_mentions(pid: u32, path: &Path) -> bool {
    let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let needle = path.as_os_str().as_encoded_bytes();
    cmd.windows(needle.len()).any(|w| w == needle)
}

/// `agentvm logs`: writes an instance's console log (its rotated part
/// first), or with `net` its network log (the egress proxy's decisions under
/// `--network allow`), to `out`; with `follow`, keeps writing what is added
/// until the instance ends.
pub fn logs(base: &Path, query: &str, net: bool, follow: bool, out: &mut impl Write) -> Result<(), InstancesError> {
    let live = live_instances(base);
    let inst = resolve(&live, query)?;
    let path = if net { crate::net::egress::log_path(&inst.dir) } else { inst.dir.join(console_log::LOG) };
    if net && !path.exists() {
        return Err(InstancesError::NoNetLog { id: inst.meta.id.clone() });
    }
    // The files stay readable through open descriptors after the dir is removed.
    let following = || follow && !launcher_gone(&inst.meta) && inst.dir.exists();
    let copied = if net {
        // The net log holds text the guest chose: never raw to a terminal.
        console_log::copy_log(&path, following, &mut Printable(out))
    } else {
        console_log::copy_log(&path, following, out)
    };
    copied.map_err(|source| InstancesError::Read { path: path.clone(), source })
}

/// Writes what it is given with the guest's control characters escaped
/// ([`crate::escape::printable`]).
struct Printable<'a, W: Write>(&'a mut W);

impl<W: Write> Write for Printable<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(&crate::escape::printable(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_matching_finds_unique_exact_and_reports_the_rest() {
        let ids = ["a1b2c3d4e5f6", "a1ff00000000", "b00000000000"];
        assert_eq!(match_prefix(&ids, "b"), Ok(2));
        assert_eq!(match_prefix(&ids, "a1b"), Ok(0));
        assert_eq!(match_prefix(&ids, "a1ff00000000"), Ok(1));
        assert_eq!(match_prefix(&ids, "a1"), Err(vec![0, 1]));
        assert_eq!(match_prefix(&ids, "c"), Err(vec![]));
        assert_eq!(match_prefix(&ids, ""), Err(vec![]));
        assert_eq!(match_prefix(&[], "a"), Err(vec![]));
    }

    fn live(id: &str) -> Live {
        Live {
            meta: InstanceMeta {
                id: id.into(),
                pid: 1,
                pid_start: None,
                flavor: "shell".into(),
                work_dir: "/src/p".into(),
                memory_mib: 512,
                cpus: 1,
                started: 0,
                qemu_pid: None,
                ports: vec![],
                host_ports: vec![],
                sandbox: None,
            },
            dir: PathBuf::from("/nonexistent").join(id),
        }
    }

    #[test]
    fn unknown_and_ambiguous_ids_name_what_exists() {
        let l = vec![live("aaaa00000000"), live("aaaa11111111")];
        let e = resolve(&l, "zz").unwrap_err().to_string();
        assert!(e.contains("\"zz\"") && e.contains("aaaa00000000 (shell in /src/p)"), "{e}");
        let e = resolve(&l, "aaaa").unwrap_err().to_string();
        assert!(e.contains("aaaa00000000, aaaa11111111") && e.contains("more of the id"), "{e}");
        let e = resolve(&[], "x").unwrap_err().to_string();
        assert!(e.contains("no instance is running"), "{e}");
    }

    #[test]
    fn proc_status_gives_ppid_and_rss() {
        let status = "Name:\tqemu-system-x86\nPPid:\t4242\nVmPeak:\t 999 kB\nVmRSS:\t  183204 kB\nThreads:\t5\n";
        assert_eq!(parse_proc_status(status), (Some(4242), Some(183_204)));
        assert_eq!(parse_proc_status("Name:\tkthreadd\nPPid:\t0\n"), (Some(0), None));
    }

    #[test]
    fn own_process_status_parses() {
        let s = fs::read_to_string("/proc/self/status").unwrap();
        let (ppid, rss) = parse_proc_status(&s);
        assert!(ppid.is_some() && rss.unwrap() > 0);
    }

    #[test]
    fn uptime_is_short_and_readable() {
        assert_eq!(format_uptime(5), "5s");
        assert_eq!(format_uptime(125), "2m");
        assert_eq!(format_uptime(3 * 3600 + 5 * 60 + 9), "3h05m");
        assert_eq!(format_uptime(2 * 86_400 + 4 * 3600), "2d04h");
    }

    #[test]
    fn table_has_aligned_columns_and_dashes_for_unknowns() {
        let mut a = PsEntry::of(&live("aaaa00000000"), 100);
        a.rss_mib = Some(180);
        let mut b = PsEntry::of(&live("bbbb00000000"), 100);
        b.flavor = "claude".into();
        b.ports = vec!["8080:80".into()];
        b.host_ports = vec![5432];
        b.sandbox = Some("fix-1".into());
        let t = format_table(&[a, b]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("ID            FLAVOR  STATE"), "{t}");
        assert!(
            lines[1].starts_with(
                "aaaa00000000  shell   starting  1m      1     512M    180M  -                  -        /src/p"
            ),
            "{t}"
        );
        assert!(lines[2].contains("claude") && lines[2].contains("-     8080:80,host:5432  fix-1"), "{t}");
        let col = |l: &str, w: &str| l.find(w).unwrap();
        assert_eq!(col(lines[0], "PROJECT"), col(lines[1], "/src/p"));
    }

    #[test]
    fn json_entries_use_lowercase_states() {
        let e = PsEntry::of(&live("aaaa00000000"), 0);
        let v = serde_json::to_value([e]).unwrap();
        assert_eq!(v[0]["state"], "starting");
        assert_eq!(v[0]["work_dir"], "/src/p");
        assert!(v[0]["rss_mib"].is_null());
    }

    /// A runtime base holding one instance whose launcher is `pid`, recorded
    /// with start time `start`.
    fn base_with_instance(pid: u32, start: Option<u64>) -> (tempfile::TempDir, String) {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        fs::set_permissions(base.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let inst = instance::Instance::create(base.path()).unwrap();
        let mut meta = live(&inst.id).meta;
        (meta.pid, meta.pid_start) = (pid, start);
        inst.write_meta(&meta).unwrap();
        let id = inst.id.clone();
        std::mem::forget(inst); // the dir stays for stop to find
        (base, id)
    }

    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep").arg("60").spawn().unwrap()
    }

    #[test]
    fn stop_leaves_a_process_that_reused_the_launchers_pid_alone() {
        let mut other = sleeper();
        let start = instance::process_start_ticks(other.id()).unwrap();
        let (base, id) = base_with_instance(other.id(), Some(start + 1));
        let e = stop(base.path(), std::slice::from_ref(&id), false, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(e, InstancesError::NotFound { .. }), "{e}");
        std::thread::sleep(Duration::from_millis(200));
        assert!(other.try_wait().unwrap().is_none(), "the process that took over the pid was signalled");
        assert!(!base.path().join(&id).exists(), "the stale instance dir is swept");
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[test]
    fn stop_signals_the_launcher_whose_start_time_matches() {
        let mut launcher = sleeper();
        let start = instance::process_start_ticks(launcher.id());
        let (base, id) = base_with_instance(launcher.id(), start);
        let waiter = std::thread::spawn(move || launcher.wait().unwrap());
        let stopped = stop(base.path(), std::slice::from_ref(&id), false, Duration::from_secs(5)).unwrap();
        assert_eq!(stopped, vec![Stopped { id, killed: false }]);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(waiter.join().unwrap().signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn zombie_free_dead_pid_is_gone_and_we_are_not() {
        assert!(process_gone(4_194_305));
        assert!(!process_gone(std::process::id()));
    }
}
