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
