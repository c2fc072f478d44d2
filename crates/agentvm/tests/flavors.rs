//! End-to-end tests of agent flavors: the real npm packages in their image
//! layers, keys and environment, custom flavors, and the agent home.

use agentvm_testkit::process::command_lines_containing;
use agentvm_testkit::*;
use std::time::Duration;

fn has_version_number(s: &str) -> bool {
    s.split(|c: char| !(c.is_ascii_digit() || c == '.')).any(|w| w.matches('.').count() >= 1 && w.len() >= 3)
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn each_agent_flavor_prints_its_version_from_the_registry_package() {
    for flavor in ["claude", "gemini", "codex"] {
        let l = Launch::new();
        let out = l.agentvm(&["run", "--memory", "1G", flavor, "--", "--version"]);
        assert_eq!(out.status.code(), Some(0), "{flavor}");
        assert!(has_version_number(&stdout(&out)), "{flavor} printed no version: {}", stdout(&out));
        l.assert_no_leftovers();
    }
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn custom_flavor_gets_its_key_and_env_while_the_key_stays_off_host_disk_and_command_lines() {
    let l = Launch::new();
    l.trusted_config(
        r#"
[flavors.envdump]
description = "prints its environment"
command = ["sh", "-c", "env | sort > /tmp/env.txt; touch /work/started; sleep 15; cat /tmp/env.txt"]
keys = ["AGENTVM_TEST_SECRET"]
env = { FROM_FLAVOR = "flavor-value" }
"#,
    );
    let env_file = l.dirs.path().join("extra.env");
    std::fs::write(&env_file, "# comment\nexport FROM_FILE='file value'\n").unwrap();
    let secret = format!("sk-test-{}", std::process::id() as u64 * 7919 + 1234567);

    let env_file = env_file.to_str().unwrap();
    let args = ["run", "--memory", "512M", "-e", "FROM_FLAG=flag-value", "--env-file", env_file, "envdump"];
    let mut child = l.spawn_command(l.command_with(&args).env("AGENTVM_TEST_SECRET", &secret));
    child.wait_for_file(&l.work.join("started"), Duration::from_secs(180));
    // While the VM runs: the secret is on no command line, and in no file
    // under the XDG dirs, the runtime dir or the project.
    let cmdlines = command_lines_containing(&secret);
    let files = files_containing(l.dirs.path(), secret.as_bytes());
    let out = child.wait_with_output();
    assert!(cmdlines.is_empty(), "secret on a command line: {cmdlines:?}");
    assert!(files.is_empty(), "secret in files: {files:?}");
    assert!(!stderr(&out).contains(&secret), "secret in agentvm's output");

    assert_eq!(out.status.code(), Some(0));
    let env = stdout(&out);
    for line in [
        format!("AGENTVM_TEST_SECRET={secret}"),
        "FROM_FLAVOR=flavor-value".into(),
        "FROM_FILE=file value".into(),
        "FROM_FLAG=flag-value".into(),
        "HOME=/home/agent".into(),
        "USER=agent".into(),
        "LANG=C.UTF-8".into(),
    ] {
        assert!(env.lines().any(|l| l == line), "{line} missing from the guest environment:\n{env}");
    }
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn missing_key_is_a_warning_not_an_error() {
    let l = Launch::new();
    l.trusted_config("[flavors.k]\ncommand = [\"true\"]\nkeys = [\"AGENTVM_TEST_ABSENT_KEY\"]\n");
    let out = l.run_command(l.command_with(&["run", "--memory", "512M", "k"]).env_remove("AGENTVM_TEST_ABSENT_KEY"));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("AGENTVM_TEST_ABSENT_KEY is not set"), "{}", stderr(&out));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn agent_home_gets_safe_directory_once_and_a_memory_note_never_overwritten() {
    let first = Launch::new();
    first.trusted_config("[flavors.noted]\ncommand = []\nmemory_file = \"notes/AGENT.md\"\n");
    let script =
        "git config --global --get-all safe.directory; head -c 200 ~/notes/AGENT.md >/dev/null && echo note-ok";
    let out = first.agentvm(&["run", "--memory", "512M", "noted", "--", "sh", "-c", script]);
    assert_eq!(stdout(&out), "/work\nnote-ok\n", "{}", stderr(&out));

    // The user edits the note; a second run keeps it and adds no duplicate.
    let home = std::fs::read_dir(first.data.join("agentvm/homes")).unwrap().next().unwrap().unwrap().path();
    std::fs::write(home.join("notes/AGENT.md"), "mine\n").unwrap();
    let second = Launch::new().same_data_as(&first).work_dir(&first.work);
    let out = second.agentvm(&["run", "--memory", "512M", "noted", "--", "sh", "-c", script]);
    assert_eq!(stdout(&out), "/work\nnote-ok\n", "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(home.join("notes/AGENT.md")).unwrap(), "mine\n");
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn each_agent_first_screen_renders_in_a_terminal() {
    require!(skip::tool("tmux"));
    // What each agent shows first with no key and no login: its welcome,
    // trust or sign-in screen. Under emulation the agents take minutes.
    let cases = [
        ("claude", "Claude Code"),
        ("gemini", "Do you trust the files in this folder?"),
        ("codex", "Sign in with ChatGPT"),
    ];
    for (flavor, text) in cases {
        let l = Launch::new();
        let t = Tmux::start(&l, 120, 40, &["run", "--memory", "2G", flavor]);
        let screen = t.wait_for_within(text, Duration::from_secs(600));
        eprintln!("{flavor} first screen:\n{screen}");
        drop(t);
        l.assert_no_leftovers_within(Duration::from_secs(30));
    }
}
