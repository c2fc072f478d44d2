//! End-to-end tests of `--devshell` with Debian's direnv and Nix: an
//! `.envrc`, and a self-contained flake evaluated offline into a private
//! Nix store. (Cache key, reuse and invalidation are unit tests of
//! `devshell`, with a stand-in nix.)

use agentvm_testkit::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
        .unwrap();
    assert!(out.status.success(), "direnv {args:?}: {}", stderr(&out));
    out
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn direnv_allowed_envrc_exports_and_path_reach_the_guest_login_shell() {
    require!(skip::tool("direnv"));
    // The shell flavor without a command: a login bash reading stdin, whose
    // /etc/profile would reset PATH.
    let mut l = Launch::new().stdin(
        b"echo \"greeting=$DEVSHELL_GREETING\"; echo \"path=$PATH\"; devshell-tool; \
          echo \"dir=$DIRENV_DIR\"; echo \"diff=${DIRENV_DIFF:-none}\"\n",
    );
    l.args = ["run", "--memory", "512M", "--cpus", "1", "shell"].map(String::from).to_vec();
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
    let out = l.run_command(cmd.env("DIRENV_ALLOW", "1"));
    let o = stdout(&out);
    assert_eq!(out.status.code(), Some(0));
    assert!(o.contains("greeting=hello from direnv\n"), "{o}");
    assert!(o.contains("path=/work/bin:/usr/local/sbin:/usr/local/bin:"), "{o}");
    assert!(!o.contains(&l.work.display().to_string()), "a host path leaked: {o}");
    assert!(o.contains("tool-ran-from-work-bin"), "{o}");
    assert!(o.contains("dir=-/work\n") && o.contains("diff=none\n"), "{o}");
    l.assert_no_leftovers();
}

#[test]
#[ignore = "needs QEMU and virtiofsd, though it fails before boot: scripts/test runs it"]
fn direnv_blocked_envrc_is_refused_before_boot_with_the_allow_hint() {
    require!(skip::tool("direnv"));
    let l = Launch::new().shell("echo booted");
    std::fs::write(l.work.join(".envrc"), "export NOT_ALLOWED=1\n").unwrap();
    let out = l.run_command(l.command_with_flags(&["--devshell"]).env_remove("DIRENV_ALLOW"));
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{e}");
    let work = l.work.canonicalize().unwrap();
    assert!(e.contains(&format!("direnv allow {}", work.display())), "{e}");
    assert!(e.contains("is blocked"), "{e}");
    assert!(!stdout(&out).contains("booted"));
    assert!(l.leftover_instances().is_empty());
    l.assert_no_leftovers();
}

/// A project with a self-contained flake (no inputs), evaluated by the real
/// `nix` (Debian's nix-bin) into a private store under the test's dir, so
/// the host's /nix is never touched. `nix` on agentvm's PATH is a wrapper
/// that logs each call, then runs the real one under [`nix_lock`].
struct NixProject {
    launch: Launch,
    bin: PathBuf,
    /// The real nix.
    real: PathBuf,
    /// The private store's root; its Nix store is `<root>/nix/store`.
    root: PathBuf,
}

/// A dev shell with a variable and, on PATH, a program built into the store.
const FLAKE: &str = r#"{
  outputs = { self }:
    let
      system = "x86_64-linux";
      hello = derivation {
        name = "hello";
        inherit system;
        builder = "/bin/bash";
        args = [ "-c" "/usr/bin/mkdir -p $out/bin && printf '#!/bin/sh\\necho hello-from-the-store\\n' > $out/bin/hello && /usr/bin/chmod +x $out/bin/hello" ];
      };
    in {
      devShells.${system}.default = derivation {
        name = "agentvm-test-shell";
        inherit system;
        builder = "/bin/bash";
        outputs = [ "out" ];
        GREETING = "hello from a real flake";
        PATH = "${hello}/bin";
      };
    };
}
"#;

/// [`FLAKE`] with `expr` as the greeting's Nix expression.
fn flake_with_greeting(expr: &str) -> String {
    FLAKE.replace("GREETING = \"hello from a real flake\";", &format!("GREETING = {expr};"))
}

/// The lock file of a flake without inputs.
const FLAKE_LOCK: &str = "{\"nodes\":{\"root\":{}},\"root\":\"root\",\"version\":7}\n";

/// The file whose lock every nix of these tests holds while it runs.
fn nix_lock() -> PathBuf {
    std::env::temp_dir().join("agentvm-test-nix.lock")
}

impl NixProject {
    fn new(script: &str, flake: &str) -> Result<NixProject, Skip> {
        let real = skip::tool("nix")?;
        let launch = Launch::new().shell(script);
        std::fs::write(launch.work.join("flake.nix"), flake).unwrap();
        std::fs::write(launch.work.join("flake.lock"), FLAKE_LOCK).unwrap();
        // The user reviewed the flake: --devshell evaluates it on the host.
        launch.trust_project();
        let bin = launch.dirs.path().join("nixbin");
        let log = launch.dirs.path().join("nix-calls.log");
        // Nix's eval cache goes to $XDG_CACHE_HOME, which agentvm's tests
        // point at the shared image cache: give nix its own.
        let cache = launch.dirs.path().join("nixcache");
        // One nix at a time across the tests (see `prebuild`).
        write_exec(
            &bin.join("nix"),
            &format!(
                "#!/bin/sh\necho \"$*\" >> '{}'\nXDG_CACHE_HOME='{}' exec flock '{}' '{}' \"$@\"\n",
                log.display(),
                cache.display(),
                nix_lock().display(),
                real.display()
            ),
        );
        let root = launch.dirs.path().join("nixroot");
        Ok(NixProject { launch, bin, real, root })
    }

    /// Builds the dev shell into the private store before agentvm runs, so
    /// agentvm's nix only evaluates. Nix 2.8 here kills its sandboxed
    /// builder ("signal 9") now and then when two nix processes build at
    /// once, even in separate stores (reproduced with two shells: about one
    /// build in sixteen). Behind one lock it was rarer (one in thirty, when
    /// a build started the moment the other ended), and none of fifteen
    /// builds with a pause between failed. So every nix of these tests
    /// holds one lock (here and in the wrapper), and a failed build is
    /// retried after a pause.
    fn prebuild(&self) {
        let mut last = String::new();
        for attempt in 0..4 {
            std::thread::sleep(std::time::Duration::from_secs(attempt * 2));
            let out = Command::new("flock")
                .arg(nix_lock())
                .arg(&self.real)
                .args(["print-dev-env", "--json"])
                .arg(&self.launch.work)
                .current_dir(&self.launch.work)
                .env("NIX_CONFIG", self.nix_config())
                .env("XDG_CACHE_HOME", self.launch.dirs.path().join("nixcache"))
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            last = stderr(&out);
            eprintln!("nix build of the test flake failed, retrying:\n{last}");
        }
        panic!("nix could not build the test flake:\n{last}");
    }

    /// A store under the test's dir; builds in nix's sandbox with the host's
    /// bash, no substituters (offline). The syscall filter is off: with it,
    /// nix 2.8 killed about one build in four here.
    fn nix_config(&self) -> String {
        format!(
            "experimental-features = nix-command flakes\nstore = {}\nsandbox = true\n\
             sandbox-paths = /usr /bin /lib /lib64\nbuild-users-group =\nsubstituters =\nfilter-syscalls = false\n",
            self.root.display()
        )
    }

    fn store(&self) -> PathBuf {
        self.root.join("nix/store")
    }

    /// `agentvm run FLAG ...` whose nix uses the private store, and which
    /// shares `store` as the host's Nix store.
    fn command(&self, store: &Path, flag: &str) -> Command {
        let path = format!("{}:{}", self.bin.display(), std::env::var("PATH").unwrap());
        let mut c = self.launch.command_with_flags(&[flag]);
        c.env("PATH", path)
            .env("NIX_CONFIG", self.nix_config())
            .env("AGENTVM_NIX_STORE", store)
            .env_remove("DIRENV_ALLOW");
        c
    }

    /// Runs the launch with `flag`, sharing the private store.
    fn run(&self, flag: &str) -> Output {
        self.launch.run_command(&mut self.command(&self.store(), flag))
    }

    /// Sets the guest's script for the next run.
    fn set_script(&mut self, script: &str) {
        *self.launch.args.last_mut().unwrap() = script.to_string();
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
    hello; test -e \"$out\" && echo out-exists; grep ' /nix/store ' /proc/mounts || echo 'no store mount'; \
    touch /nix/store/x 2>/dev/null && echo store-writable || echo store-not-writable";

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn nix_flake_env_path_and_read_only_store_reach_the_guest() {
    let p = require!(NixProject::new(NIX_SCRIPT, FLAKE));
    p.prebuild();
    let out = p.run("--devshell=on");
    let o = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(o.contains("greeting=hello from a real flake\n"), "{o}");
    let path = o.lines().find_map(|l| l.strip_prefix("path=")).unwrap();
    assert!(path.starts_with("/nix/store/") && path.contains("-hello/bin:"), "{path}");
    assert!(path.ends_with("-hello/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), "{path}");
    assert!(o.contains("tmpdir=unset\n"), "the build sandbox's TMPDIR is not applied: {o}");
    assert!(o.contains("hello-from-the-store\n") && o.contains("out-exists\n"), "{o}");
    let mount = o.lines().find(|l| l.contains(" /nix/store ")).unwrap_or_else(|| panic!("no /nix/store mount: {o}"));
    assert!(mount.contains(" virtiofs ro,") || mount.contains(" virtiofs ro "), "{mount}");
    assert!(o.contains("store-not-writable"), "{o}");
    assert!(!p.store().join("x").exists());
    assert_eq!(p.calls(), 1);
    assert_eq!(p.cache_files().len(), 1, "the result is cached in the project's state dir");
    p.launch.assert_no_leftovers();
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn nix_flake_without_a_host_store_shares_none() {
    let p = require!(NixProject::new(NIX_SCRIPT, FLAKE));
    p.prebuild();
    let out = p.launch.run_command(&mut p.command(&p.launch.dirs.path().join("no-store"), "--devshell"));
    let o = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(o.contains("greeting=hello from a real flake\n"), "{o}");
    assert!(o.contains("no store mount\n"), "{o}");
    assert!(stderr(&out).contains("no Nix store"), "{}", stderr(&out));
}

/// A flake.nix with a syntax error.
const BROKEN_FLAKE: &str = "{ outputs = { self }: {\n";

#[test]
#[ignore = "needs QEMU and virtiofsd, though it fails before boot: scripts/test runs it"]
fn nix_failure_stops_before_boot_with_its_output_and_the_command() {
    let p = require!(NixProject::new("echo booted", BROKEN_FLAKE));
    let out = p.run("--devshell");
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{e}");
    assert!(e.contains("error: syntax error"), "nix's own message is shown: {e}");
    let work = p.launch.work.canonicalize().unwrap();
    assert!(e.contains(&format!("cd {} && nix ", work.display())) && e.contains("print-dev-env"), "{e}");
    assert!(!stdout(&out).contains("booted"));
    assert!(p.cache_files().is_empty(), "a failure is not cached");
    assert!(p.launch.leftover_instances().is_empty());
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn nix_failure_with_devshell_try_warns_and_runs_without() {
    let p = require!(NixProject::new("echo \"greeting=${GREETING:-unset}\"", BROKEN_FLAKE));
    let out = p.run("--devshell=try");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("greeting=unset"));
    let e = stderr(&out);
    assert!(e.contains("error: syntax error") && e.contains("starting without the dev shell"), "{e}");
    assert!(p.cache_files().is_empty());
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn changed_flake_stops_before_boot_and_devshell_try_runs_without_it() {
    let p = require!(NixProject::new("echo \"booted greeting=${GREETING:-unset}\"", FLAKE));
    // A guest of an earlier run edits the trusted flake.
    std::fs::write(p.launch.work.join("flake.nix"), FLAKE.replace("hello from a real flake", "from the guest"))
        .unwrap();
    let out = p.run("--devshell");
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{e}");
    let work = p.launch.work.canonicalize().unwrap();
    assert!(
        e.contains("flake.nix is new, changed or removed") && e.contains(&format!("agentvm trust {}", work.display())),
        "{e}"
    );
    assert!(!stdout(&out).contains("booted"));
    assert_eq!(p.calls(), 0, "nix never ran on the changed flake");
    assert!(p.launch.leftover_instances().is_empty());

    let out = p.run("--devshell=try");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("booted greeting=unset"), "{}", stdout(&out));
    let e = stderr(&out);
    assert!(e.contains("agentvm trust") && e.contains("starting without the dev shell"), "{e}");
    assert_eq!(p.calls(), 0);
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_guest_edit_of_a_nix_file_the_flake_imports_stops_the_next_dev_shell() {
    let flake = flake_with_greeting("import ./nix/greeting.nix");
    let mut p = require!(NixProject::new("", &flake));
    std::fs::create_dir(p.launch.work.join("nix")).unwrap();
    std::fs::write(p.launch.work.join("nix/greeting.nix"), "\"hello from an import\"\n").unwrap();
    p.launch.trust_project();
    p.prebuild();

    // Run 1: the trusted dev shell; the guest edits the imported file.
    p.set_script("echo \"greeting=$GREETING\"; echo '\"from the guest\"' > /work/nix/greeting.nix");
    let out = p.run("--devshell");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("greeting=hello from an import\n"), "{}", stdout(&out));
    assert_eq!(std::fs::read_to_string(p.launch.work.join("nix/greeting.nix")).unwrap(), "\"from the guest\"\n");

    // Run 2: refused before nix runs and before boot, neither is the cached result used.
    p.set_script("echo booted");
    let out = p.run("--devshell");
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{e}");
    assert!(e.contains("nix/greeting.nix is new, changed or removed") && e.contains("agentvm trust"), "{e}");
    assert!(!stdout(&out).contains("booted"));
    assert_eq!(p.calls(), 1, "nix ran only for run 1");
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn guest_written_git_config_is_not_run_on_the_host_by_the_dev_shell() {
    require!(skip::tool("git"));
    let p = require!(NixProject::new("echo \"greeting=$GREETING\"", FLAKE));
    let work = &p.launch.work;
    // The user's project is a git repository with the trusted flake committed.
    git(work, &["init", "-q"]);
    git(work, &["add", "flake.nix", "flake.lock"]);
    git(work, &["commit", "-q", "-m", "flake"]);
    p.prebuild();

    // A guest of an earlier run writes git configuration that makes git run
    // its program: an fsmonitor hook and a filter driver for every file.
    let marker = p.launch.dirs.path().join("host-marker");
    write_exec(&work.join("evil.sh"), &format!("#!/bin/sh\necho \"ran $*\" >> '{}'\ncat\n", marker.display()));
    let config = std::fs::read_to_string(work.join(".git/config")).unwrap();
    let evil =
        "[core]\n\tfsmonitor = ./evil.sh\n[filter \"x\"]\n\tclean = ./evil.sh clean\n\tsmudge = ./evil.sh smudge\n";
    std::fs::write(work.join(".git/config"), config + evil).unwrap();
    std::fs::write(work.join(".git/info/attributes"), "* filter=x\n").unwrap();

    let out = p.run("--devshell");
    let ran = std::fs::read_to_string(&marker).unwrap_or_default();
    assert!(ran.is_empty(), "the host ran the guest's program: {ran}");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("greeting=hello from a real flake\n"), "{}", stdout(&out));
    assert_eq!(p.calls(), 1);
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_flake_reads_a_project_file_named_in_devshell_files_and_a_guest_edit_of_it_stops_the_next_run() {
    let flake = flake_with_greeting("builtins.readFile ./extra.txt");
    let mut p = require!(NixProject::new("echo booted", &flake));
    let work = p.launch.work.clone();
    std::fs::write(work.join("extra.txt"), "hello from extra.txt").unwrap();

    // Run 1: extra.txt is not part of the dev shell's sources, so the
    // private copy nix evaluates lacks it: the error names it and the fix.
    let out = p.run("--devshell");
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{e}");
    assert!(!stdout(&out).contains("booted"));
    assert!(e.contains("No such file or directory") || e.contains("does not exist"), "nix's own error is shown: {e}");
    let hint =
        e.lines().find(|l| l.contains("devshell_files =")).unwrap_or_else(|| panic!("no devshell_files hint: {e}"));
    assert!(hint.contains("extra.txt") && !hint.contains("/nix/store") && !hint.contains("devshell-src."), "{hint}");
    let real = work.canonicalize().unwrap();
    assert!(e.contains(&format!("agentvm trust {}", real.display())), "{e}");

    // The user lists it in the project config and trusts both.
    std::fs::write(work.join(".agentvm.toml"), "devshell_files = [\"extra.txt\"]\n").unwrap();
    let trusted = p.launch.trust_project();
    assert!(trusted.lines().any(|l| l.trim_start().starts_with("extra.txt ")), "trust lists extra.txt: {trusted}");
    p.prebuild();

    // Run 2: the variable reaches the guest; the guest edits extra.txt.
    p.set_script("echo \"greeting=$GREETING\"; echo 'from the guest' > /work/extra.txt");
    let out = p.run("--devshell");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("greeting=hello from extra.txt\n"), "{}", stdout(&out));

    // Run 3: stopped before nix runs and before boot.
    p.set_script("echo booted");
    let calls = p.calls();
    let out = p.run("--devshell");
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{e}");
    assert!(e.contains("extra.txt is new, changed or removed") && e.contains("agentvm trust"), "{e}");
    assert!(!stdout(&out).contains("booted"));
    assert_eq!(p.calls(), calls, "nix did not run on the edited file");
    assert!(p.launch.leftover_instances().is_empty());
}
