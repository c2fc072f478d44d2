//! What virtiofsd may not do on the host for the guest: make device nodes,
//! or make a file setuid or setgid.
//!
//! The guest is root in its VM, and virtiofsd carries out its requests on
//! the host as the invoking user (as root, when agentvm runs as root).
//! Dropping virtiofsd's capabilities ([`VIRTIOFSD_MODCAPS`]) stops device
//! nodes and file capabilities, but the owner of a file may always set its
//! setuid bit, and a setuid binary of the host user (root, or alice, run by
//! bob) is an escalation on the host. So virtiofsd also runs under a
//! seccomp filter, installed before it is executed, that fails with EPERM:
//!
//! - `chmod`, `fchmod`, `fchmodat`, `fchmodat2` whose mode has S_ISUID or
//!   S_ISGID;
//! - `open`, `openat` with O_CREAT or O_TMPFILE, `creat`, `mkdir` and
//!   `mkdirat`, whose mode has either bit;
//! - `mknod` and `mknodat` of a character or block device, or whose mode
//!   has either bit.
//!
//! `openat2` carries its mode in a struct a filter cannot read: it fails
//! with ENOSYS, and virtiofsd then creates files with `openat`, as on
//! kernels before 5.6 (its namespace sandbox already confines the paths
//! that `openat2` resolved in the shared dir). `io_uring_setup` fails the
//! same way: io_uring requests do not pass through seccomp.
//!
//! Left as it is: a setgid directory the host user made in the share still
//! passes its bit on to new subdirectories (the kernel does that), and a
//! guest `chmod` that keeps that bit fails.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// virtiofsd's `--modcaps`: no device nodes (CAP_MKNOD), no keeping the
/// setuid and setgid bits on files it writes or chowns (CAP_FSETID), no
/// file capabilities (CAP_SETFCAP).
pub const VIRTIOFSD_MODCAPS: &str = "--modcaps=-mknod:-fsetid:-setfcap";

/// Bits of a mode that make a file setuid or setgid.
const SETID_BITS: [u64; 2] = [libc::S_ISUID as u64, libc::S_ISGID as u64];
/// File types `mknod` may not make.
const DEVICE_TYPES: [u64; 2] = [libc::S_IFCHR as u64, libc::S_IFBLK as u64];
/// Open flags that create a file.
const CREATE_FLAGS: [u64; 2] = [libc::O_CREAT as u64, libc::O_TMPFILE as u64];

/// The filter could not be built (a bug: its rules are fixed).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the seccomp filter for virtiofsd: {0}")]
pub struct FilterError(#[from] seccompiler::BackendError);

/// The filters to install in virtiofsd's process, in order
/// ([`crate::sys::process::seccomp_child`]).
pub fn programs() -> Result<Vec<BpfProgram>, FilterError> {
    let arch = TargetArch::x86_64;
    let setid =
        SeccompFilter::new(setid_rules()?, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch)?;
    let opaque: BTreeMap<i64, Vec<SeccompRule>> =
        [(libc::SYS_openat2, Vec::new()), (libc::SYS_io_uring_setup, Vec::new())].into_iter().collect();
    let opaque = SeccompFilter::new(opaque, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch)?;
    Ok(vec![setid.try_into()?, opaque.try_into()?])
}

/// The calls the EPERM filter matches, by syscall number.
fn setid_rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, FilterError> {
    let mut rules = BTreeMap::new();
    // (syscall, index of its mode argument)
    for (nr, mode) in [
        (libc::SYS_chmod, 1),
        (libc::SYS_fchmod, 1),
        (libc::SYS_fchmodat, 2),
        (libc::SYS_fchmodat2, 2),
        (libc::SYS_creat, 1),
        (libc::SYS_mkdir, 1),
        (libc::SYS_mkdirat, 2),
    ] {
        rules.insert(nr, setid_mode(mode, &[])?);
    }
    // (syscall, index of its flags, index of its mode)
    for (nr, flags, mode) in [(libc::SYS_open, 1, 2), (libc::SYS_openat, 2, 3)] {
        let mut chain = Vec::new();
        for create in CREATE_FLAGS {
            chain.extend(setid_mode(mode, &[masked(flags, create, create)?])?);
        }
        rules.insert(nr, chain);
    }
    for (nr, mode) in [(libc::SYS_mknod, 1), (libc::SYS_mknodat, 2)] {
        let mut chain = setid_mode(mode, &[])?;
        for kind in DEVICE_TYPES {
            chain.push(SeccompRule::new(vec![masked(mode, libc::S_IFMT as u64, kind)?])?);
        }
        rules.insert(nr, chain);
    }
    Ok(rules)
}

/// Rules matching `with` and a mode (argument `mode`) with S_ISUID, or
/// with S_ISGID.
fn setid_mode(mode: u8, with: &[SeccompCondition]) -> Result<Vec<SeccompRule>, FilterError> {
    SETID_BITS
        .iter()
        .map(|&bit| {
            let mut conditions = with.to_vec();
            conditions.push(masked(mode, bit, bit)?);
            Ok(SeccompRule::new(conditions)?)
        })
        .collect()
}

/// Argument `arg` (a 32-bit int or mode) masked with `mask` equals `value`.
fn masked(arg: u8, mask: u64, value: u64) -> Result<SeccompCondition, FilterError> {
    Ok(SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(mask), value)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::process::Command;

    /// Runs a Python script under the filters; its stdout.
    fn python_under_filter(script: &str, dir: &std::path::Path) -> String {
        let programs = programs().unwrap();
        let mut cmd = Command::new("python3");
        cmd.args(["-c", script]).current_dir(dir);
        crate::sys::process::seccomp_child(&mut cmd, programs);
        let out = cmd.output().expect("python3 runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    const SCRIPT: &str = r#"
import errno, os, stat
def attempt(name, f):
    try:
        f()
        print(name, "ok")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
open("plain", "w").close()
attempt("chmod 755", lambda: os.chmod("plain", 0o755))
attempt("chmod 644", lambda: os.chmod("plain", 0o644))
attempt("chmod u+s", lambda: os.chmod("plain", 0o4755))
attempt("chmod g+s", lambda: os.chmod("plain", 0o2755))
fd = os.open("plain", os.O_RDONLY)
attempt("fchmod u+s", lambda: os.fchmod(fd, 0o4755))
attempt("create 0755", lambda: os.close(os.open("new", os.O_CREAT | os.O_WRONLY, 0o755)))
attempt("create 04755", lambda: os.close(os.open("suid", os.O_CREAT | os.O_WRONLY, 0o4755)))
attempt("tmpfile 02755", lambda: os.close(os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o2755)))
attempt("open existing 04755 without O_CREAT", lambda: os.close(os.open("plain", os.O_RDONLY, 0o4755)))
attempt("mkdir 0755", lambda: os.mkdir("dir", 0o755))
attempt("mkdir 02755", lambda: os.mkdir("sgid-dir", 0o2755))
attempt("mkfifo", lambda: os.mkfifo("fifo"))
attempt("mknod reg 04755", lambda: os.mknod("node", stat.S_IFREG | 0o4755))
attempt("mknod chr", lambda: os.mknod("chr", stat.S_IFCHR | 0o600, os.makedev(1, 3)))
attempt("mknod blk", lambda: os.mknod("blk", stat.S_IFBLK | 0o600, os.makedev(7, 0)))
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
r = libc.syscall(437, -100, b".", b"\0" * 24, 24)
print("openat2", "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()])
"#;

    #[test]
    fn setid_modes_and_devices_fail_and_plain_modes_work() {
        if Command::new("python3").arg("-V").output().is_err() {
            eprintln!("skipping: python3 is missing");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let out = python_under_filter(SCRIPT, d.path());
        let expected = "\
chmod 755 ok
chmod 644 ok
chmod u+s EPERM
chmod g+s EPERM
fchmod u+s EPERM
create 0755 ok
create 04755 EPERM
tmpfile 02755 EPERM
open existing 04755 without O_CREAT ok
mkdir 0755 ok
mkdir 02755 EPERM
mkfifo ok
mknod reg 04755 EPERM
mknod chr EPERM
mknod blk EPERM
openat2 ENOSYS
";
        assert_eq!(out, expected);
        for entry in std::fs::read_dir(d.path()).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            assert_eq!(meta.permissions().mode() & 0o6000, 0, "{:?}", entry.path());
            assert!(!meta.file_type().is_block_device() && !meta.file_type().is_char_device(), "{:?}", entry.path());
        }
    }
}
