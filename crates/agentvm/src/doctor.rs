//! `agentvm doctor`: checks every host requirement and says how to fix
//! each one that fails.

use std::path::Path;
use std::process::Command;

use crate::image::subids;
use crate::{paths, tools, vm::accel, vm::share};

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but worse than it could (e.g. TCG instead of KVM).
    Warn,
    Fail,
}

/// One requirement, checked.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do when it is not Ok.
    pub fix: Option<String>,
}

const SETUP: &str = "run scripts/setup-host (as root) from the agentvm source tree";

/// Oldest QEMU known to run our microvm set-up (ACPI virtio-mmio discovery).
const MIN_QEMU: (u32, u32) = (7, 2);

fn ok(name: &'static str, detail: impl Into<String>) -> Check {
    Check { name, status: Status::Ok, detail: detail.into(), fix: None }
}

fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name, status: Status::Fail, detail: detail.into(), fix: Some(fix.into()) }
}

/// Runs every check.
pub fn run_checks() -> Vec<Check> {
    vec![
        check_qemu(),
        check_virtiofsd(),
        check_program("mmdebstrap", "mmdebstrap", "builds the image"),
        check_program("tar2sqfs", "tar2sqfs", "makes the image's root file system (squashfs-tools-ng)"),
        check_program("passt", "passt", "gives the guest its network with the host's loopback closed; without it agentvm falls back to QEMU's slirp, which leaves it open"),
        check_program("npm", "npm", "installs the agents into their image layers"),
        check_program("mkfs.ext4", "mkfs.ext4", "makes the container disk for --cri (e2fsprogs)"),
        check_optional("direnv", "direnv", "--devshell with an .envrc needs it", SETUP),
        check_optional("nix", "nix", "--devshell with a flake.nix or devenv.nix needs it", "install Nix (https://nixos.org/download), or run scripts/setup-host"),
        check_guest_init(),
        check_accel(),
        check_kvm_access(),
        check_userns(),
        check_subids(),
        check_dir("cache dir", paths::cache_dir()),
        check_dir("data dir", paths::data_dir()),
        check_runtime_dir(),
    ]
}

/// Parses "QEMU emulator version 10.0.2 (...)" into (10, 0).
pub fn parse_qemu_version(out: &str) -> Option<(u32, u32)> {
    let v = out.split("version ").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

fn check_qemu() -> Check {
    let name = "qemu";
    let Some(bin) = tools::find_qemu() else {
        return fail(name, "qemu-system-x86_64 not found", SETUP);
    };
    let out = Command::new(&bin).arg("--version").output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    match parse_qemu_version(&text) {
        Some(v) if v >= MIN_QEMU => {
            let machines = Command::new(&bin).args(["-machine", "help"]).output();
            let has_microvm = machines.map(|o| String::from_utf8_lossy(&o.stdout).contains("microvm")).unwrap_or(false);
            if has_microvm {
                ok(name, format!("QEMU {}.{} at {}", v.0, v.1, bin.display()))
            } else {
                fail(name, format!("{} lacks the microvm machine", bin.display()), SETUP)
            }
        }
        Some(v) => fail(
            name,
            format!("QEMU {}.{} at {} is older than {}.{}", v.0, v.1, bin.display(), MIN_QEMU.0, MIN_QEMU.1),
            format!("install a newer QEMU ({SETUP} uses bookworm-backports on Debian 12)"),
        ),
        None => fail(name, format!("{} --version printed no version", bin.display()), SETUP),
    }
}

fn check_virtiofsd() -> Check {
    match share::find_virtiofsd() {
        Some(bin) => {
            let v = Command::new(&bin).arg("--version").output();
            let v = v.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
            ok("virtiofsd", format!("{v} at {}", bin.display()))
        }
        None => fail(
            "virtiofsd",
            "not found on PATH, /usr/libexec or /usr/lib/qemu",
            format!("{SETUP} (installs the package, or builds it with cargo)"),
        ),
    }
}

fn check_program(name: &'static str, program: &str, why: &str) -> Check {
    match tools::find_program(program, &[]) {
        Some(p) => ok(name, p.display().to_string()),
        None => fail(name, format!("{program} not found ({why})"), SETUP),
    }
}

/// A program only some features need: missing is a warning.
fn check_optional(name: &'static str, program: &str, why: &str, fix: &str) -> Check {
    match tools::find_program(program, &[]) {
        Some(p) => ok(name, p.display().to_string()),
        None => Check {
            name,
            status: Status::Warn,
            detail: format!("{program} not found ({why})"),
            fix: Some(fix.to_string()),
        },
    }
}

fn check_guest_init() -> Check {
    match tools::guest_init() {
        tools::GuestInit::File(path) if !path.is_file() => fail(
            "guest init",
            format!("AGENTVM_GUEST_INIT={} is not a file", path.display()),
            "unset AGENTVM_GUEST_INIT to use the guest init built into agentvm",
        ),
        init => ok("guest init", init.to_string()),
    }
}

fn check_accel() -> Check {
    match accel::probe_kvm() {
        Ok(()) => ok("accelerator", "KVM runs guests"),
        Err(why) => Check {
            name: "accelerator",
            status: Status::Warn,
            detail: format!("no usable KVM ({why}); VMs run under TCG emulation, several times slower"),
            fix: Some("use a host with hardware virtualization and kvm_intel/kvm_amd loaded".into()),
        },
    }
}

fn check_kvm_access() -> Check {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return Check {
            name: "/dev/kvm",
            status: Status::Warn,
            detail: "missing".into(),
            fix: Some("load kvm_intel or kvm_amd (TCG works without it, slowly)".into()),
        };
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => ok("/dev/kvm", "readable and writable"),
        Err(e) => Check {
            name: "/dev/kvm",
            status: Status::Warn,
            detail: format!("cannot open: {e}"),
            fix: Some("sudo usermod -aG kvm $USER, then log in again".into()),
        },
    }
}

fn check_userns() -> Check {
    if crate::sys::process::userns_works() {
        ok("user namespaces", "available")
    } else {
        fail(
            "user namespaces",
            "this user cannot create user namespaces",
            "enable them: sysctl kernel.unprivileged_userns_clone=1 (Debian) or user.max_user_namespaces=15000",
        )
    }
}

fn check_subids() -> Check {
    let uid = crate::sys::uid();
    if uid == 0 {
        return ok("subordinate ids", "not needed as root");
    }
    let user = subids::user_name(uid);
    match subids::check(user.as_deref(), uid) {
        Ok(()) => ok(
            "subordinate ids",
            format!(
                "{} has ranges of at least {} ids in /etc/subuid and /etc/subgid",
                user.unwrap_or_else(|| uid.to_string()),
                subids::NEEDED
            ),
        ),
        Err(shortfall) => fail("subordinate ids", shortfall.to_string(), shortfall.fix()),
    }
}

fn check_dir(name: &'static str, dir: Result<std::path::PathBuf, paths::PathsError>) -> Check {
    let dir = match dir {
        Ok(d) => d,
        Err(e) => return fail(name, e.to_string(), "set HOME"),
    };
    let probe = dir.join(format!(".doctor-{}", std::process::id()));
    let result = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&probe, b"ok"));
    let _ = std::fs::remove_file(&probe);
    match result {
        Ok(()) => ok(name, format!("{} is writable", dir.display())),
        Err(e) => fail(
            name,
            format!("{}: {e}", dir.display()),
            format!("make {} writable, or point the XDG variable elsewhere", dir.display()),
        ),
    }
}

fn check_runtime_dir() -> Check {
    let base = paths::runtime_base();
    match crate::instance::ensure_private_dir(&base) {
        Ok(()) => ok("runtime dir", format!("{} is private and writable", base.display())),
        Err(e) => fail("runtime dir", e.to_string(), "remove it, or set XDG_RUNTIME_DIR to a private directory"),
    }
}

/// What `agentvm doctor` prints: a line per check, with the fix under each
/// one that is not Ok, then the verdict.
pub fn report(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let tag = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("{tag} {:<17} {}\n", c.name, c.detail));
        if let Some(fix) = c.fix.as_ref().filter(|_| c.status != Status::Ok) {
            out.push_str(&format!("     {:<17} fix: {fix}\n", ""));
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    out.push_str(&match failed {
        0 => "agentvm is ready.\n".to_string(),
        n => format!("{n} requirement(s) missing.\n"),
    });
    out
}

/// Whether no check failed (warnings allowed).
pub fn all_passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.status != Status::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_version_parses() {
        assert_eq!(parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds)\n"), Some((10, 0)));
        assert_eq!(parse_qemu_version("QEMU emulator version 7.2.15\n"), Some((7, 2)));
        assert_eq!(parse_qemu_version("garbage"), None);
    }

    #[test]
    fn report_shows_fixes_for_what_is_not_ok_and_the_verdict() {
        let checks = [
            ok("qemu", "QEMU 10.0"),
            Check { name: "/dev/kvm", status: Status::Warn, detail: "missing".into(), fix: Some("load kvm".into()) },
            fail("npm", "npm not found", SETUP),
        ];
        let text = report(&checks);
        assert_eq!(
            text,
            format!(
                "ok   qemu              QEMU 10.0\nwarn /dev/kvm          missing\n     {:<17} fix: load kvm\n\
                 FAIL npm               npm not found\n     {:<17} fix: {SETUP}\n1 requirement(s) missing.\n",
                "", ""
            )
        );
        assert!(!all_passed(&checks));
        assert!(all_passed(&checks[..2]));
        assert!(report(&checks[..2]).ends_with("agentvm is ready.\n"));
    }
}
