//! A sandboxed clone (`--clone`): its disk mounted (and grown to the size
//! the host gave it), the clone's work tree bound at /work, and the guest's
//! tool ([`SANDBOX_TOOL`], the script `sandbox.sh`) run as the agent user:
//! `prepare` clones the project from the read-only share on the first run,
//! `export` writes the results for the host when the program ends, unless
//! the disk was not written since the export the host holds.

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agentvm_proto::guest::{SANDBOX_EXPORT, SANDBOX_HOST_REPO, SANDBOX_STATUS, SANDBOX_TOOL, WORK};
use agentvm_proto::{Sandbox, User, DEFAULT_PATH};

use crate::boot;
use crate::console;
use crate::error::{Error, IoContext, Result};
use crate::sys;

/// The tool itself.
pub const SCRIPT: &str = include_str!("sandbox.sh");
/// Where the sandbox's disk is mounted; the clone is its `work` dir.
const DISK_MOUNT: &str = "/agentvm/sandbox";
const WORK_TREE: &str = "/agentvm/sandbox/work";
/// The tool's record of its last complete export, on the disk: the
/// result's commit on the first line, then the status it wrote.
const EXPORTED_MARK: &str = "/agentvm/sandbox/.agentvm-exported";
/// The most of the mark that is read (a status is a few hundred bytes).
const MARK_LIMIT: u64 = 64 << 10;
const DISK_WAIT: Duration = Duration::from_secs(10);
/// Below this much free space, a failure is blamed on a full disk.
const NEARLY_FULL: u64 = 16 << 20;
/// The end of the tool's output a failure shows.
const OUTPUT_TAIL: usize = 2000;

/// The sandbox's disk, mounted and ready for the program.
pub struct Opened {
    /// Its block device, e.g. `/dev/vdb`.
    device: String,
    /// Set when the disk's last export is what the host holds.
    baseline: Option<Baseline>,
}

/// The disk as the program got it, when its last export is what the host
/// holds: the mark that export left, and the disk's write counters.
struct Baseline {
    mark: Vec<u8>,
    writes: String,
}

/// Mounts the disk, clones the project into it on the first run, binds
/// the clone at /work and notes whether the host holds its last export.
pub fn open(s: &Sandbox, user: &User) -> Result<Opened> {
    let device = mount(s, user)?;
    prepare(s, user)?;
    let baseline = baseline(s, &device);
    Ok(Opened { device, baseline })
}

impl Opened {
    /// Writes the sandbox's results for the host (the tool's `export`);
    /// when the disk was not written since the export the host holds,
    /// hands the host that export's status again instead. Call it with no
    /// other process left, so nothing writes meanwhile.
    pub fn export(&self, s: &Sandbox, user: &User) -> Result<()> {
        if let Some(b) = self.baseline.as_ref().filter(|b| settle(&self.device).as_ref() == Some(&b.writes)) {
            console::step("sandbox: not written since its last export");
            return hand_back(b, user);
        }
        console::step("sandbox: export");
        run_tool(&s.name, user, &["export"])
    }

    /// Unmounts the disk (so its next mount needs no journal recovery).
    pub fn close(self) {
        for target in [WORK, DISK_MOUNT] {
            if let Err(e) = sys::umount(Path::new(target)) {
                console::line(&format!("cannot unmount {target}: {e}"));
            }
        }
    }
}

/// Mounts the sandbox's disk, grows its file system to the disk's size,
/// hands it to `user` and installs the tool; returns the disk's device.
fn mount(s: &Sandbox, user: &User) -> Result<String> {
    console::step(&format!("sandbox {} on {}", s.name, s.disk));
    let disk = boot::wait_for_disk(&s.disk, DISK_WAIT)?;
    fs::create_dir_all(DISK_MOUNT).ctx("create directory", DISK_MOUNT)?;
    // noatime: reading must not write, or an unchanged disk would not
    // look unchanged (see `baseline`).
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    // noauto_da_alloc: a file truncated and written again is not flushed
    // on close (ext4's guard for programs that skip fsync); under TCG it
    // halved the time to write 5,000 small files.
    sys::mount(&disk, Path::new(DISK_MOUNT), "ext4", flags, Some("noauto_da_alloc")).map_err(|source| {
        Error::Mount { fstype: "ext4".into(), what: disk.clone(), target: DISK_MOUNT.into(), source }
    })?;
    if let Err(e) = grow(&disk) {
        console::line(&format!("cannot grow the sandbox's file system to its disk: {e}"));
    }
    sys::chown(Path::new(DISK_MOUNT), user.uid, user.gid).ctx("chown", DISK_MOUNT)?;
    let tool = Path::new(SANDBOX_TOOL);
    fs::create_dir_all(tool.parent().expect("an absolute path")).ctx("create the directory of", tool)?;
    fs::write(tool, SCRIPT).ctx("write", tool)?;
    fs::set_permissions(tool, fs::Permissions::from_mode(0o755)).ctx("chmod", tool)?;
    Ok(disk)
}

/// Grows the mounted file system to the size of `disk` (the host makes a
/// disk larger when asked for a larger `--clone-disk-size`).
fn grow(disk: &str) -> std::io::Result<()> {
    let dev = sys::open(Path::new(disk), libc::O_RDONLY)?;
    let bytes = sys::block_device_bytes(dev.as_raw_fd())?;
    let dir = sys::open(Path::new(DISK_MOUNT), libc::O_RDONLY | libc::O_DIRECTORY)?;
    let block = fs::metadata(DISK_MOUNT).map(|m| std::os::unix::fs::MetadataExt::blksize(&m))?;
    sys::ext4_resize(dir.as_raw_fd(), bytes / block.max(1))
}

/// Takes the mark of the last export off the disk (it speaks for one run
/// at most: a run cut short, by a kill -9, is exported in full next time),
/// and keeps it with the disk's write counters if the host holds that
/// export's result.
fn baseline(s: &Sandbox, device: &str) -> Option<Baseline> {
    let mark = read_mark();
    if mark.is_some() {
        if let Err(e) = fs::remove_file(EXPORTED_MARK) {
            console::line(&format!("cannot remove {EXPORTED_MARK}: {e}"));
            return None;
        }
    }
    let writes = settle(device)?;
    let mark = mark?;
    let result = mark.split(|b| *b == b'\n').next()?;
    (s.held.as_deref().map(str::as_bytes) == Some(result)).then_some(Baseline { mark, writes })
}

fn read_mark() -> Option<Vec<u8>> {
    let file = fs::File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(EXPORTED_MARK).ok()?;
    let mut mark = Vec::new();
    file.take(MARK_LIMIT).read_to_end(&mut mark).ok()?;
    Some(mark)
}

/// Writes out everything of the disk's file system, then reads how much
/// was written to the disk since boot: sectors written and discards (not
/// the count of writes: an empty flush, as syncfs sends, counts as one).
fn settle(device: &str) -> Option<String> {
    let dir = sys::open(Path::new(DISK_MOUNT), libc::O_RDONLY | libc::O_DIRECTORY).ok()?;
    sys::syncfs(dir.as_raw_fd()).ok()?;
    let name = Path::new(device).file_name()?;
    let stat = fs::read_to_string(Path::new("/sys/class/block").join(name).join("stat")).ok()?;
    let fields: Vec<&str> = stat.split_whitespace().collect();
    Some(format!("{} {}", fields.get(6)?, fields.get(11).unwrap_or(&"-")))
}

/// Puts the mark back and hands the host the status of the export it
/// holds (the host then finds the result's commit in the project).
fn hand_back(b: &Baseline, user: &User) -> Result<()> {
    let status = b.mark.splitn(2, |byte| *byte == b'\n').nth(1).unwrap_or_default();
    write_as(user, Path::new(EXPORTED_MARK), &b.mark)?;
    write_as(user, &Path::new(SANDBOX_EXPORT).join(SANDBOX_STATUS), status)
}

/// Writes `path` whole (a temporary file renamed over it), owned by `user`.
fn write_as(user: &User, path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("agentvm-tmp");
    fs::write(&tmp, bytes).ctx("write", &tmp)?;
    sys::chown(&tmp, user.uid, user.gid).ctx("chown", &tmp)?;
    fs::rename(&tmp, path).ctx("rename into place", path)
}

/// On the first run, clones the project into the sandbox (the tool's
/// `prepare`); then binds the clone's work tree at /work.
fn prepare(s: &Sandbox, user: &User) -> Result<()> {
    if !Path::new(WORK_TREE).join(".git").is_dir() {
        console::step("sandbox: first run, cloning the project");
        let mut args = vec!["prepare", s.name.as_str(), s.commit.as_str()];
        args.extend(s.branch.as_deref());
        run_tool(&s.name, user, &args)?;
    }
    fs::create_dir_all(WORK).ctx("create directory", WORK)?;
    sys::mount(WORK_TREE, Path::new(WORK), "", libc::MS_BIND, None).map_err(|source| Error::Mount {
        fstype: "bind".into(),
        what: WORK_TREE.into(),
        target: WORK.into(),
        source,
    })
}

/// Runs the tool with `args` as `user`, in a plain environment; a failure
/// carries the end of its output, and says so when the disk is full.
fn run_tool(name: &str, user: &User, args: &[&str]) -> Result<()> {
    let out = Command::new("/bin/bash")
        .arg(SANDBOX_TOOL)
        .args(args)
        .uid(user.uid)
        .gid(user.gid)
        .env_clear()
        .envs([("HOME", user.home.as_str()), ("USER", &user.name), ("LOGNAME", &user.name)])
        .envs([("PATH", DEFAULT_PATH), ("LANG", "C.UTF-8")])
        .envs([("AGENTVM_SANDBOX_HOST", SANDBOX_HOST_REPO), ("AGENTVM_SANDBOX_WORK", WORK_TREE)])
        .envs([("AGENTVM_SANDBOX_EXPORT", SANDBOX_EXPORT), ("AGENTVM_SANDBOX_MARK", EXPORTED_MARK)])
        .current_dir("/")
        .output()
        .map_err(|e| Error::io("run", SANDBOX_TOOL, e))?;
    if out.status.success() {
        return Ok(());
    }
    let tail = &out.stderr[out.stderr.len().saturating_sub(OUTPUT_TAIL)..];
    let output = String::from_utf8_lossy(tail).trim_end().to_string();
    Err(Error::Sandbox { step: args[0].to_string(), output, full: full_hint(name) })
}

/// What to do when the disk is (nearly) full, else nothing.
fn full_hint(name: &str) -> String {
    match sys::fs_space(Path::new(DISK_MOUNT)) {
        Ok((total, free)) if free < NEARLY_FULL => {
            let bigger = (total >> 30).max(1) * 2;
            format!(
                "\nthe sandbox's disk is full ({} MiB): delete files in the sandbox, or grow its disk with \
                 `agentvm run --clone={name} --clone-disk-size={bigger}G`",
                total >> 20
            )
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    //! The tool against real git, on the host: a "host" repository with
    //! commits, staged, unstaged, untracked and ignored changes, cloned the
    //! way the guest does it.
    use super::SCRIPT;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    struct Dirs {
        _tmp: tempfile::TempDir,
        host: PathBuf,
        work: PathBuf,
        export: PathBuf,
        script: PathBuf,
    }

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    /// A host repository with a commit and each kind of uncommitted change.
    fn dirs() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().join("host");
        std::fs::create_dir(&host).unwrap();
        git(&host, &["init", "-q"]);
        write(&host, ".gitignore", "build/\n");
        write(&host, "a.txt", "a1\n");
        write(&host, "b.txt", "b1\n");
        write(&host, "gone.txt", "x\n");
        git(&host, &["add", "-A"]);
        git(&host, &["commit", "-qm", "one"]);
        write(&host, "a.txt", "a2 staged\n");
        git(&host, &["add", "a.txt"]);
        write(&host, "a.txt", "a3 unstaged\n");
        write(&host, "b.txt", "b2 unstaged\n");
        std::fs::remove_file(host.join("gone.txt")).unwrap();
        write(&host, "new.txt", "untracked\n");
        std::fs::create_dir(host.join("build")).unwrap();
        write(&host.join("build"), "out.o", "ignored\n");
        let script = tmp.path().join("agentvm-sandbox");
        std::fs::write(&script, SCRIPT).unwrap();
        let (work, export) = (tmp.path().join("disk/work"), tmp.path().join("export"));
        std::fs::create_dir_all(work.parent().unwrap()).unwrap();
        std::fs::create_dir(&export).unwrap();
        Dirs { _tmp: tmp, host, work, export, script }
    }

    fn tool(d: &Dirs, args: &[&str]) -> std::process::Output {
        Command::new("bash")
            .arg(&d.script)
            .args(args)
            .env("AGENTVM_SANDBOX_HOST", &d.host)
            .env("AGENTVM_SANDBOX_WORK", &d.work)
            .env("AGENTVM_SANDBOX_EXPORT", &d.export)
            .env("GIT_CONFIG_GLOBAL", d.export.parent().unwrap().join("gitconfig"))
            .output()
            .unwrap()
    }

    fn prepared() -> Dirs {
        let d = dirs();
        let head = git(&d.host, &["rev-parse", "HEAD"]);
        let out = tool(&d, &["prepare", "t1", head.trim(), "main"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        d
    }

    #[test]
    fn prepare_gives_the_hosts_branch_index_and_work_tree_without_ignored_files() {
        let d = prepared();
        assert_eq!(git(&d.work, &["status", "--porcelain"]), git(&d.host, &["status", "--porcelain"]));
        assert_eq!(git(&d.work, &["diff", "--cached"]), git(&d.host, &["diff", "--cached"]));
        for f in ["a.txt", "b.txt", "new.txt"] {
            assert_eq!(std::fs::read(d.work.join(f)).unwrap(), std::fs::read(d.host.join(f)).unwrap(), "{f}");
        }
        assert!(!d.work.join("gone.txt").exists() && !d.work.join("build").exists());
        assert_eq!(git(&d.work, &["symbolic-ref", "--short", "HEAD"]), "main\n");
        assert_eq!(git(&d.work, &["rev-parse", "--abbrev-ref", "main@{upstream}"]), "host/main\n");
        assert!(!d.work.with_extension("new").exists());
    }

    #[test]
    fn export_bundles_head_and_the_uncommitted_work_without_touching_the_index() {
        let d = prepared();
        git(&d.work, &["commit", "-qam", "agent's commit"]);
        write(&d.work, "later.txt", "uncommitted\n");
        let index = std::fs::read(d.work.join(".git/index")).unwrap();
        let out = tool(&d, &["export"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(d.work.join(".git/index")).unwrap(), index, "the sandbox's index changed");
        assert_eq!(git(&d.work, &["status", "--porcelain"]), "?? later.txt\n?? new.txt\n");

        let bundle = d.export.join("result.bundle");
        let heads = git(&d.host, &["bundle", "list-heads", bundle.to_str().unwrap()]);
        assert!(heads.ends_with(" refs/agentvm/export\n") && heads.lines().count() == 1, "{heads}");
        git(&d.host, &["fetch", "-q", bundle.to_str().unwrap(), "refs/agentvm/export:refs/heads/agentvm/t1"]);
        let log = git(&d.host, &["log", "--format=%s", "main..agentvm/t1"]);
        assert_eq!(log, "agentvm: uncommitted work in sandbox t1\nagent's commit\n");
        assert_eq!(git(&d.host, &["show", "agentvm/t1:later.txt"]), "uncommitted\n");

        let status: String = std::fs::read_to_string(d.export.join("status.json")).unwrap();
        assert!(status.contains(r#""branch":"main","base":"main","dirty":true,"ahead":1"#), "{status}");
    }

    #[test]
    fn an_export_with_a_mark_path_records_its_result_and_status_there_and_one_without_does_not() {
        let d = prepared();
        let mark = d.export.parent().unwrap().join("disk/.agentvm-exported");
        let out = tool(&d, &["export"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(!mark.exists(), "an export run through `agentvm sandbox export` left a mark");

        let out = Command::new("bash")
            .arg(&d.script)
            .arg("export")
            .env("AGENTVM_SANDBOX_HOST", &d.host)
            .env("AGENTVM_SANDBOX_WORK", &d.work)
            .env("AGENTVM_SANDBOX_EXPORT", &d.export)
            .env("AGENTVM_SANDBOX_MARK", &mark)
            .env("GIT_CONFIG_GLOBAL", d.export.parent().unwrap().join("gitconfig"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let status = std::fs::read_to_string(d.export.join("status.json")).unwrap();
        let result = git(&d.work, &["rev-parse", "refs/agentvm/export"]);
        assert_eq!(std::fs::read_to_string(&mark).unwrap(), format!("{result}{status}"));
    }

    #[test]
    fn a_clean_export_carries_only_what_the_host_lacks() {
        let d = prepared();
        git(&d.work, &["add", "-A"]);
        git(&d.work, &["commit", "-qm", "all of it"]);
        let out = tool(&d, &["export"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let bundle = d.export.join("result.bundle");
        // One prerequisite: the host's HEAD, which the host has.
        let verify = Command::new("git").args(["bundle", "verify"]).arg(&bundle).current_dir(&d.host).output();
        let verify = verify.unwrap();
        let verify = format!("{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
        assert!(verify.contains("requires this ref"), "{verify}");
        let status: String = std::fs::read_to_string(d.export.join("status.json")).unwrap();
        assert!(status.contains(r#""dirty":false"#), "{status}");
    }

    #[test]
    fn a_sandbox_at_a_commit_the_host_has_writes_no_bundle_only_its_name() {
        let d = prepared();
        git(&d.work, &["reset", "-q", "--hard"]);
        git(&d.work, &["clean", "-qfd"]);
        let out = tool(&d, &["export"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(!d.export.join("result.bundle").exists());
        let status = std::fs::read_to_string(d.export.join("status.json")).unwrap();
        let head = git(&d.host, &["rev-parse", "HEAD"]);
        assert!(status.contains(&format!(r#""result":"{}""#, head.trim())) && status.contains(r#""dirty":false"#));
    }

    #[test]
    fn a_second_prepare_keeps_the_sandbox_as_it_is() {
        let d = prepared();
        write(&d.work, "mine.txt", "kept\n");
        let head = git(&d.host, &["rev-parse", "HEAD"]);
        let out = tool(&d, &["prepare", "t1", head.trim(), "main"]);
        assert!(out.status.success());
        assert_eq!(std::fs::read_to_string(d.work.join("mine.txt")).unwrap(), "kept\n");
    }

    #[test]
    fn a_work_tree_without_its_git_dir_is_kept_aside_and_cloned_again() {
        let d = prepared();
        std::fs::remove_dir_all(d.work.join(".git")).unwrap();
        let head = git(&d.host, &["rev-parse", "HEAD"]);
        let out = tool(&d, &["prepare", "t1", head.trim(), "main"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(d.work.join(".git").is_dir() && !d.work.join("work.new").exists());
        let parent = d.work.parent().unwrap();
        let kept = std::fs::read_dir(parent).unwrap().flatten().filter(|e| {
            e.file_name().to_string_lossy().starts_with("work.lost-") && e.path().join("new.txt").is_file()
        });
        assert_eq!(kept.count(), 1);
    }

    #[test]
    fn a_detached_host_head_is_checked_out_detached() {
        let d = dirs();
        git(&d.host, &["checkout", "-q", "--detach"]);
        let head = git(&d.host, &["rev-parse", "HEAD"]);
        let out = tool(&d, &["prepare", "t1", head.trim()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(git(&d.work, &["rev-parse", "HEAD"]), head);
        assert!(
            Command::new("git").args(["symbolic-ref", "-q", "HEAD"]).current_dir(&d.work).status().unwrap().code()
                == Some(1)
        );
    }
}
