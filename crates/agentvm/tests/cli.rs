//! The command line itself, without booting anything.

use std::process::Command;

fn agentvm(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentvm")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_and_help_describe_the_tool() {
    let (code, out, _) = agentvm(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("agentvm "), "{out}");
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
fn unknown_subcommand_is_a_usage_error() {
    let (code, _, err) = agentvm(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(err.contains("frobnicate"));
}
