//! Installing agentvm and setting up a host from it: `agentvm doctor
//! [--fix]`.

use agentvm_testkit::*;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Stand-ins for apt-get and sudo, which must not change this machine: they
/// append their command lines to $FIX_LOG; sudo then runs its command.
const APT_GET: &str = "#!/bin/sh\necho \"apt-get $*\" >> \"$FIX_LOG\"\n";
const SUDO: &str = "#!/bin/sh\necho \"sudo $*\" >> \"$FIX_LOG\"\nexec \"$@\"\n";

/// A PATH dir for `agentvm doctor` in `dir`: every program of the host list
/// found here except `missing`, what --fix and a tmux session run besides,
/// and the stand-ins for apt-get and sudo.
fn doctor_path(dir: &Path, missing: &[&str]) -> PathBuf {
    let bin = dir.join("fix-bin");
    std::fs::create_dir(&bin).unwrap();
    let listed = agentvm::host_setup::builtin().iter().flat_map(|r| r.check.split_whitespace());
    let programs = listed.filter(|c| !c.starts_with('/') && !missing.contains(c));
    for program in programs.chain(["sh", "stty", "sleep", "setpriv"]) {
        if let Some(found) = agentvm::tools::find_program(program, &[]) {
            let _ = symlink(found, bin.join(program));
        }
    }
    for (name, script) in [("apt-get", APT_GET), ("sudo", SUDO)] {
        std::fs::write(bin.join(name), script).unwrap();
        std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

/// What the stand-ins logged.
fn fix_log(l: &Launch) -> String {
    std::fs::read_to_string(l.work.join("fix.log")).unwrap_or_default()
}

/// A launch whose agentvm sees the host without tar2sqfs and direnv.
fn without_tar2sqfs_and_direnv(l: Launch) -> Launch {
    let bin = doctor_path(l.dirs.path(), &["tar2sqfs", "direnv"]);
    let log = l.work.join("fix.log");
    l.env("PATH", bin.to_str().unwrap()).env("FIX_LOG", log.to_str().unwrap())
}

const INSTALL: &str = "apt-get install -y --no-install-recommends squashfs-tools-ng direnv";

#[test]
fn doctor_prints_the_commands_and_fix_runs_them_as_root() {
    if my_uid() != 0 {
        return Skip::not_applicable("--fix runs its commands directly only as root").record();
    }
    let l = without_tar2sqfs_and_direnv(Launch::new());
    let out = l.agentvm(&["doctor"]);
    let report = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("FAIL tar2sqfs          tar2sqfs not found (makes the image's root"), "{report}");
    assert!(report.contains("     fix: install squashfs-tools-ng\n"), "{report}");
    assert!(report.contains("warn direnv            direnv not found (--devshell with an .envrc)"), "{report}");
    let commands = format!("    apt-get update\n    {INSTALL}\n");
    assert!(report.ends_with(&format!("runs these):\n{commands}")), "{report}");
    assert_eq!(fix_log(&l), "", "doctor alone runs nothing");

    let out = l.agentvm(&["doctor", "--fix"]);
    assert_eq!(fix_log(&l), format!("apt-get update\n{INSTALL}\n"), "{}", stderr(&out));
    // The stand-in installed nothing: the second report still misses both.
    assert_eq!(stdout(&out).matches("FAIL tar2sqfs").count(), 2, "{}", stdout(&out));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn doctor_fix_without_a_terminal_only_says_what_to_run() {
    let TestUser { uid, gid } = require!(skip::test_user());
    let l = without_tar2sqfs_and_direnv(Launch::new().run_as(uid, gid));
    let out = l.agentvm(&["doctor", "--fix"]);
    let text = stdout(&out);
    let commands = format!("    sudo apt-get update\n    sudo {INSTALL}\n");
    assert!(text.ends_with(&format!("run these yourself, then `agentvm doctor` again:\n{commands}")), "{text}");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(fix_log(&l), "", "nothing ran");
}

#[test]
fn doctor_fix_asks_then_runs_roots_commands_through_sudo() {
    let TestUser { uid, gid } = require!(skip::test_user());
    require!(skip::tool("tmux"));
    for (answer, log) in [
        ("n", String::new()),
        ("y", format!("sudo sh -c apt-get update\napt-get update\nsudo sh -c {INSTALL}\n{INSTALL}\n")),
    ] {
        let l = without_tar2sqfs_and_direnv(Launch::new().run_as(uid, gid));
        let tmux = Tmux::start(&l, 200, 50, &["doctor", "--fix"]);
        tmux.wait_for_within("Run them? [y/N]", Duration::from_secs(30));
        assert!(tmux.screen().contains(&format!("    sudo {INSTALL}")), "{}", tmux.screen());
        tmux.send(answer);
        tmux.wait_exit(Duration::from_secs(30));
        assert_eq!(fix_log(&l), log, "answered {answer}");
    }
}

/// `agentvm run shell -- true` with `agentvm` where it is, from a project
/// dir that holds no build output and with no AGENTVM_GUEST_INIT: as root
/// and as the test user. `agentvm` and the dirs above it must be readable
/// by everyone.
fn boots_as_root_and_as_a_user(agentvm: &Path) {
    let beside = agentvm.with_file_name("agentvm-guest");
    assert!(!beside.exists(), "{} would be a second file", beside.display());
    let plan = Launch::new().with_agentvm(agentvm).cmd(&["true"]);
    let out = plan.run_command(&mut plan.command_with_flags(&["--print-plan"]));
    assert!(stdout(&out).contains(", guest init built in ("), "{}{}", stdout(&out), stderr(&out));

    let as_root = Launch::new().with_agentvm(agentvm).cmd(&["sh", "-c", "echo booted > /work/out.txt"]);
    let out = as_root.run();
    assert_eq!(out.status.code(), Some(0), "as root: {}", stderr(&out));
    assert_eq!(std::fs::read_to_string(as_root.work.join("out.txt")).unwrap(), "booted\n");
    as_root.assert_no_leftovers();

    let TestUser { uid, gid } = require!(skip::test_user());
    let as_user = Launch::new().with_agentvm(agentvm).run_as(uid, gid).cmd(&["sh", "-c", "id -u > /work/out.txt"]);
    let out = as_user.run();
    assert_eq!(out.status.code(), Some(0), "as the test user: {}", stderr(&out));
    assert_eq!(std::fs::read_to_string(as_user.work.join("out.txt")).unwrap(), format!("{uid}\n"));
    as_user.assert_no_leftovers();
}

/// A temp dir every user can read and enter.
fn shared_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// The workspace this test binary was built from.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn the_one_binary_copied_to_another_dir_runs_vms() {
    let dir = shared_tempdir();
    let copy = dir.path().join("agentvm");
    std::fs::copy(agentvm_bin(), &copy).unwrap();
    boots_as_root_and_as_a_user(&copy);
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn cargo_install_gives_an_agentvm_that_runs_vms() {
    let root = shared_tempdir();
    // A target dir of its own, kept between runs (cargo test holds the
    // workspace's); the dev profile, to keep the suite's time down.
    let target = workspace().join("target/install-test");
    let out = std::process::Command::new(env!("CARGO"))
        .args(["install", "--locked", "--debug", "--quiet", "--path", "crates/agentvm", "--root"])
        .arg(root.path())
        .arg("--target-dir")
        .arg(&target)
        .current_dir(workspace())
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo install: {}", stderr(&out));
    let installed: Vec<_> =
        std::fs::read_dir(root.path().join("bin")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(installed, ["agentvm"], "one file");
    boots_as_root_and_as_a_user(&root.path().join("bin/agentvm"));
}

/// `cmd`'s stdout; panics with its stderr unless it succeeds.
fn output_of(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
    stdout(&out)
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn the_debian_package_installs_into_a_clean_root_and_runs_vms() {
    if my_uid() != 0 {
        return Skip::not_applicable(
            "dpkg installs into a clean root only as root; as a user, the other tests cover the binary",
        )
        .record();
    }
    let dir = shared_tempdir();
    let build = workspace().join("scripts/build-deb");
    let deb =
        output_of(std::process::Command::new(build).arg("--binary").arg(agentvm_bin()).arg("--out").arg(dir.path()));
    let deb = PathBuf::from(deb.trim());

    let control = output_of(std::process::Command::new("dpkg-deb").arg("--field").arg(&deb));
    let field =
        |name: &str| control.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).unwrap_or_default().to_string();
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    for needed in ["qemu-system-x86", "mmdebstrap", "squashfs-tools-ng", "passt", "uidmap", "debian-archive-keyring"] {
        assert!(field("Depends").split(", ").any(|d| d == needed), "Depends lacks {needed}: {control}");
    }
    assert_eq!(field("Recommends"), "virtiofsd", "not packaged in Debian 12: {control}");
    // apt can install it here: the dependencies it names are what this host has.
    let simulated = output_of(std::process::Command::new("apt-get").args(["install", "--simulate"]).arg(&deb));
    assert!(simulated.contains("0 upgraded, 1 newly installed, 0 to remove"), "{simulated}");

    let root = dir.path().join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let mut dpkg = std::process::Command::new("dpkg");
    dpkg.arg(format!("--root={}", root.display())).args(["--force-depends", "--log=/dev/null", "--install"]).arg(&deb);
    output_of(&mut dpkg);
    let files = output_of(
        std::process::Command::new("dpkg").arg(format!("--root={}", root.display())).args(["--listfiles", "agentvm"]),
    );
    for path in [
        "/usr/bin/agentvm",
        "/usr/share/man/man1/agentvm.1.gz",
        "/usr/share/bash-completion/completions/agentvm",
        "/usr/share/zsh/vendor-completions/_agentvm",
        "/usr/share/fish/vendor_completions.d/agentvm.fish",
    ] {
        assert!(files.lines().any(|l| l == path), "{path} missing: {files}");
    }
    let man = output_of(std::process::Command::new("zcat").arg(root.join("usr/share/man/man1/agentvm.1.gz")));
    assert!(man.contains(".TH agentvm 1"), "{man}");
    boots_as_root_and_as_a_user(&root.join("usr/bin/agentvm"));
}
