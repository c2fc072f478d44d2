//! End-to-end tests of `--devshell`: a real direnv, and a stand-in `nix` on
//! PATH (Debian's Nix cannot evaluate a flake offline here) that prints a
//! known environment naming a program in a stand-in Nix store.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn write_exec(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `direnv ARGS` in the launch's work dir, with the launch's XDG dirs (so
/// its allow list is the one agentvm's direnv sees).
fn direnv(l: &Launch, args: &[&str]) -> Output {
    let out = Command::new("direnv")
        .args(args)
        .current_dir(&l.work)
        .env("XDG_DATA_HOME", &l.data)
        .env("XDG_CONFIG_HOME", l.dirs.path().join("config"))
        .env("PWD", &l.work)
        .output()
        .expect("direnv is installed (scripts/setup-host)");
    assert!(out.status.success(), "direnv {args:?}: {}", stderr(&out));
    out
}

/// The launch's `agentvm run ...` with `flag` right after `run`.
fn command_with_flag(l: &Launch, flag: &str) -> Command {
    let mut args = l.args.clone();
    args.insert(1, flag.to_string());
    l.command_with(&args)
}

fn run_with(l: &Launch, cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    eprintln!(
        "--- {:?} in {} -> {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
        cmd.get_args().collect::<Vec<_>>(),
        l.work.display(),
        out.status,
        stdout(&out),
        stderr(&out)
    );
    out
}

#[test]
fn direnv_allowed_envrc_exports_and_path_reach_the_guest_command() {
    let l = Launch::new().shell(
        "echo \"greeting=$DEVSHELL_GREETING\"; echo \"path=$PATH\"; devshell-tool; \
         echo \"dir=$DIRENV_DIR\"; echo \"diff=${DIRENV_DIFF:-none}\"",
    );
    std::fs::write(l.work.join(".envrc"), "export DEVSHELL_GREETING='hello from direnv'\nPATH_add bin\n").unwrap();
    write_exec(&l.work.join("bin/devshell-tool"), "#!/bin/sh\necho tool-ran-from-work-bin\n");
    direnv(&l, &["allow", "."]);

    // As in a shell with direnv's hook: the .envrc is loaded already.
    let loaded: std::collections::BTreeMap<String, Option<String>> =
        serde_json::from_slice(&direnv(&l, &["export", "json"]).stdout).unwrap();
    let mut cmd = l.command();
    for (k, v) in &loaded {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = run_with(&l, cmd.env("DIRENV_ALLOW", "1"));
    let o = stdout(&out);
    assert_eq!(out.status.code(), Some(0));
    assert!(o.contains("greeting=hello from direnv\n"), "{o}");
    assert!(o.contains("path=/work/bin:/usr/local/sbin:/usr/local/bin:"), "{o}");
    assert!(!o.contains(&l.work.display().to_string()), "a host path leaked: {o}");
    assert!(o.contains("tool-ran-from-work-bin"), "{o}");
    assert!(o.contains("dir=-/work\n") && o.contains("diff=none\n"), "{o}");
    assert!(l.leftover_processes().is_empty());
}

#[test]
fn direnv_blocked_envrc_is_refused_before_boot_with_the_allow_hint() {
    let l = Launch::new().shell("echo booted");
    std::fs::write(l.work.join(".envrc"), "export NOT_ALLOWED=1\n").unwrap();
    let out = run_with(&l, command_with_flag(&l, "--devshell").env_remove("DIRENV_ALLOW"));
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{e}");
    let work = l.work.canonicalize().unwrap();
    assert!(e.contains(&format!("direnv allow {}", work.display())), "{e}");
    assert!(e.contains("is blocked"), "{e}");
    assert!(!stdout(&out).contains("booted"));
    assert!(l.leftover_instances().is_empty() && l.leftover_processes().is_empty());
}

/// A project with a flake, a stand-in `nix` that prints `json` (logging
/// each call), and a stand-in Nix store holding `hello`.
struct NixProject {
    launch: Launch,
    bin: PathBuf,
    store: PathBuf,
}

const NIX_JSON: &str = r#"{"bashFunctions":{},"variables":{
  "GREETING":{"type":"exported","value":"hello from the flake"},
  "PATH":{"type":"exported","value":"/nix/store/abc-hello/bin"},
  "HOME":{"type":"exported","value":"/homeless-shelter"},
  "TMPDIR":{"type":"exported","value":"/build"},
  "LOCAL":{"type":"var","value":"not exported"}}}"#;

impl NixProject {
    fn new(script: &str, nix_body: &str) -> NixProject {
        let launch = Launch::new().shell(script);
        std::fs::write(launch.work.join("flake.nix"), "{ outputs = _: { }; }\n").unwrap();
        std::fs::write(launch.work.join("flake.lock"), "{ \"version\": 7 }\n").unwrap();
        let bin = launch.dirs.path().join("fakebin");
        let log = launch.dirs.path().join("nix-calls.log");
        write_exec(&bin.join("nix"), &format!("#!/bin/sh\necho \"$*\" >> '{}'\n{nix_body}\n", log.display()));
        let store = launch.dirs.path().join("store");
        write_exec(&store.join("abc-hello/bin/hello"), "#!/bin/sh\necho hello-from-the-store\n");
        NixProject { launch, bin, store }
    }

    fn ok(script: &str) -> NixProject {
        NixProject::new(script, &format!("cat <<'JSON'\n{NIX_JSON}\nJSON"))
    }

    fn command(&self, store: &Path, devshell: &str) -> Command {
        let path = format!("{}:{}", self.bin.display(), std::env::var("PATH").unwrap());
        let mut c = command_with_flag(&self.launch, devshell);
        c.env("PATH", path).env("AGENTVM_NIX_STORE", store).env_remove("DIRENV_ALLOW");
        c
    }

    fn calls(&self) -> usize {
        std::fs::read_to_string(self.launch.dirs.path().join("nix-calls.log")).map_or(0, |s| s.lines().count())
    }

    fn cache_files(&self) -> Vec<PathBuf> {
        let projects = self.launch.data.join("agentvm/projects");
        std::fs::read_dir(projects)
            .map(|rd| rd.flatten().map(|e| e.path().join("devshell.json")).filter(|p| p.is_file()).collect())
            .unwrap_or_default()
    }
}

const NIX_SCRIPT: &str = "echo \"greeting=$GREETING\"; echo \"path=$PATH\"; echo \"tmpdir=${TMPDIR:-unset}\"; \
    hello; grep ' /nix/store ' /proc/mounts || echo 'no store mount'; \
    touch /nix/store/x 2>/dev/null && echo store-writable || echo store-not-writable";

#[test]
fn nix_devshell_env_path_and_read_only_store_reach_the_guest() {
    // Uses --devshell=on (the flag's value form); the cache is per project.
    let p = NixProject::ok(NIX_SCRIPT);
    let l = &p.launch;
    let out = run_with(l, &mut p.command(&p.store, "--devshell=on"));
    let o = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(o.contains("greeting=hello from the flake\n"), "{o}");
    assert!(o.contains("path=/nix/store/abc-hello/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"), "{o}");
    assert!(o.contains("tmpdir=unset\n"), "the sandbox's TMPDIR is not applied: {o}");
    assert!(o.contains("hello-from-the-store\n"), "{o}");
    let mount = o.lines().find(|l| l.contains(" /nix/store ")).unwrap_or_else(|| panic!("no /nix/store mount: {o}"));
    assert!(mount.contains(" virtiofs ro,") || mount.contains(" virtiofs ro "), "{mount}");
    assert!(o.contains("store-not-writable"), "{o}");
    assert!(!p.store.join("x").exists());
    assert_eq!(p.calls(), 1);
    assert_eq!(p.cache_files().len(), 1, "the result is cached in the project's state dir");
    assert!(l.leftover_processes().is_empty());
}

#[test]
fn nix_devshell_without_a_host_store_shares_none() {
    let p = NixProject::ok(NIX_SCRIPT);
    let out = run_with(&p.launch, &mut p.command(&p.launch.dirs.path().join("no-store"), "--devshell"));
    let o = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(o.contains("greeting=hello from the flake\n"), "{o}");
    assert!(o.contains("no store mount\n"), "{o}");
    assert!(stderr(&out).contains("no Nix store"), "{}", stderr(&out));
}

#[test]
fn nix_failure_stops_before_boot_with_its_output_and_the_command() {
    let p = NixProject::new("echo booted", "echo 'error: flake has no devShells.x86_64-linux.default' >&2; exit 1");
    let out = run_with(&p.launch, &mut p.command(&p.store, "--devshell"));
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{e}");
    assert!(e.contains("error: flake has no devShells.x86_64-linux.default"), "{e}");
    let work = p.launch.work.canonicalize().unwrap();
    assert!(e.contains(&format!("cd {} && nix ", work.display())) && e.contains("print-dev-env"), "{e}");
    assert!(!stdout(&out).contains("booted"));
    assert!(p.cache_files().is_empty(), "a failure is not cached");
    assert!(p.launch.leftover_instances().is_empty());
}

#[test]
fn nix_failure_with_devshell_try_warns_and_runs_without() {
    let p = NixProject::new(
        "echo \"greeting=${GREETING:-unset}\"",
        "echo 'error: flake has no devShells.x86_64-linux.default' >&2; exit 1",
    );
    let out = run_with(&p.launch, &mut p.command(&p.store, "--devshell=try"));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("greeting=unset"));
    let e = stderr(&out);
    assert!(e.contains("flake has no devShells") && e.contains("starting without the dev shell"), "{e}");
    assert!(p.cache_files().is_empty());
}
