//! The command line itself, without booting anything.

use agentvm_testkit::*;
use std::process::Command;

/// `cmd`'s status, stdout and stderr; PATH has no QEMU, so nothing can boot
/// even if a check were missing.
fn without_qemu(l: &Launch, cmd: &mut Command) -> (i32, String, String) {
    let out = l.run_command(cmd.env("PATH", "/nonexistent"));
    (out.status.code().unwrap_or(-1), stdout(&out), stderr(&out))
}

/// `agentvm ARGS` in a launch of its own.
fn agentvm(args: &[&str]) -> (i32, String, String) {
    let l = Launch::new();
    without_qemu(&l, &mut l.command_with(args))
}

#[test]
fn version_and_help_describe_the_tool() {
    let (code, out, _) = agentvm(&["--version"]);
    assert_eq!(code, 0);
    // Built in this checkout: the commit is HEAD's (build.rs watches it).
    let head = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().unwrap();
    let head = String::from_utf8(head.stdout).unwrap();
    assert_eq!(out, format!("agentvm {} (commit {})\n", env!("CARGO_PKG_VERSION"), head.trim()));
    let (code, out, _) = agentvm(&["--help"]);
    assert_eq!(code, 0);
    for cmd in ["run", "image", "doctor", "completions", "man"] {
        assert!(out.contains(cmd), "--help lacks {cmd}: {out}");
    }
    let (code, out, _) = agentvm(&["image", "--help"]);
    assert_eq!(code, 0);
    for cmd in ["build", "ls", "rm", "prune"] {
        assert!(out.contains(cmd), "image --help lacks {cmd}: {out}");
    }
}

#[test]
fn the_guest_init_is_built_in_and_a_missing_override_is_named() {
    let l = Launch::new();
    let out = l.run_command(l.command_with(&["doctor"]).env("PATH", "/nonexistent"));
    assert!(stdout(&out).contains("ok   guest init        built in ("), "{}", stdout(&out));

    let missing = l.dirs.path().join("no-such-init");
    let out = l.run_command(l.command_with(&["doctor"]).env("AGENTVM_GUEST_INIT", &missing));
    let needle = format!("FAIL guest init        AGENTVM_GUEST_INIT={} is not a file", missing.display());
    assert!(stdout(&out).contains(&needle), "{}", stdout(&out));
    assert_eq!(out.status.code(), Some(1));

    let (code, _, err) =
        without_qemu(&l, l.command_with(&["run", "shell", "--", "true"]).env("AGENTVM_GUEST_INIT", &missing));
    assert_eq!(code, 125);
    assert!(err.contains(&format!("AGENTVM_GUEST_INIT={} is not a file: unset it", missing.display())), "{err}");
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    let (code, out, _) = agentvm(&["completions", "bash"]);
    assert_eq!(code, 0);
    assert!(out.contains("_agentvm") && out.contains("--work-dir"), "{out}");
    let (code, out, _) = agentvm(&["completions", "zsh"]);
    assert_eq!(code, 0);
    assert!(out.contains("#compdef agentvm"));
    let (code, out, _) = agentvm(&["man"]);
    assert_eq!(code, 0);
    assert!(out.contains(".TH agentvm 1"), "{out}");
}

#[test]
fn usage_errors_are_one_line_naming_the_input_with_status_125() {
    for (args, input) in [
        (&["run", "--cpus", "-1"][..], "'-1' for '--cpus"),
        (&["run", "--host-port", "99999"][..], "'99999' for '--host-port"),
        (&["run", "--network", "bogus"][..], "'bogus' for '--network"),
        (&["frobnicate"][..], "'frobnicate'"),
        (&["image", "buidl"][..], "'buidl'"),
    ] {
        let (code, out, err) = agentvm(args);
        assert_eq!(code, 125, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.starts_with("agentvm: error: ") && err.contains(input), "{args:?}: {err}");
        assert!(err.contains("--help`"), "{args:?}: {err}");
    }
    let (_, _, err) = agentvm(&["run", "--network", "bogus"]);
    assert!(err.contains("open, none, allow") && err.contains("`agentvm run --help`"), "{err}");
}

#[test]
fn sharing_the_root_or_the_home_dir_is_refused_with_the_reason() {
    let l = Launch::new();
    let home = l.dirs.path().join("home/user");
    let project = home.join("project");
    std::fs::create_dir_all(&project).unwrap();
    let l = l.work_dir(&project).env("HOME", home.to_str().unwrap());
    let refused = |extra: &[(&str, &str)], args: &[&str], why: &str| {
        let (code, _, err) = without_qemu(&l, l.command_with(args).envs(extra.iter().copied()));
        assert_eq!(code, 125, "{args:?}: {err}");
        assert!(err.contains(why), "{args:?} {extra:?}: {err}");
    };
    refused(&[], &["run", "-w", "/", "shell"], "work dir / is the root of the host's file system");
    refused(&[("WORK_DIR", "/")], &["run", "shell"], "root of the host's file system");
    refused(&[], &["run", "-w", home.to_str().unwrap(), "shell"], "is your home directory");
    refused(&[], &["run", "-w", "..", "shell"], "is your home directory");
    refused(&[], &["run", "-w", l.dirs.path().join("home").to_str().unwrap(), "shell"], "contains your home directory");
    refused(&[], &["run", "--home", home.to_str().unwrap(), "shell"], "agent home");
    refused(&[], &["run", "-w", l.data.to_str().unwrap(), "shell"], "contains agentvm's");
}

#[test]
fn trust_records_show_and_revoke_what_the_user_approved() {
    let l = Launch::new();
    let project = &l.work;
    let config = "[flavors.review]\ncommand = [\"true\"]\nkeys = [\"REVIEW_KEY\"]\n";
    std::fs::write(project.join(".agentvm.toml"), config).unwrap();
    std::fs::write(project.join("flake.nix"), "{}").unwrap();
    let run = |args: &[&str]| without_qemu(&l, &mut l.command_with(args));

    // Untrusted: `flavor ls` warns once, and the project's flavor is not there.
    let (code, out, err) = run(&["flavor", "ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("review"), "{out}");
    assert_eq!(err.matches("warning").count(), 1, "{err}");
    assert!(err.contains(".agentvm.toml") && err.contains("agentvm trust"), "{err}");

    let (code, out, err) = run(&["trust"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("flavors.review.keys = [\"REVIEW_KEY\"]") && out.contains("flake.nix"), "{out}");
    let records: Vec<_> = std::fs::read_dir(l.data.join("agentvm/trust")).unwrap().flatten().collect();
    assert_eq!(records.len(), 1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(records[0].metadata().unwrap().permissions().mode() & 0o777, 0o600);
    let (_, out, err) = run(&["flavor", "ls"]);
    assert!(out.contains("review") && err.is_empty(), "{out}{err}");

    std::fs::write(project.join("flake.nix"), "{ }").unwrap();
    let (_, out, _) = run(&["trust", "--show"]);
    assert!(out.contains("trusted, unchanged") && out.contains("changed since it was trusted"), "{out}");

    let (code, out, _) = run(&["trust", "--revoke", project.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("no longer trusted"), "{out}");
    let (_, out, err) = run(&["flavor", "ls"]);
    assert!(!out.contains("review") && err.contains("agentvm trust"), "{out}{err}");
}

#[test]
fn trust_refuses_a_symlinked_config_without_printing_its_target() {
    let l = Launch::new();
    let target = l.dirs.path().join("host-file");
    std::fs::write(&target, "HOST-FILE-FIRST-LINE\n").unwrap();
    std::os::unix::fs::symlink(&target, l.work.join(".agentvm.toml")).unwrap();
    for args in [&["trust"][..], &["flavor", "ls"][..]] {
        let (_, out, err) = without_qemu(&l, &mut l.command_with(args));
        assert!(err.contains("symbolic link"), "{args:?}: {err}");
        assert!(!err.contains("HOST-FILE") && !out.contains("HOST-FILE"), "{args:?}: {out}{err}");
    }
}
