//! End-to-end tests of the shared login (`--login`, the flavors'
//! `login_files`): a login made in one project's VM serves another
//! project's, while both run too, every version whole, never under /work;
//! `--login=per-project` keeps the homes apart; the real Codex CLI's own
//! login (a temporary file renamed over `auth.json`) is shared, and the real
//! Claude Code is signed in with credentials written in another project as
//! it writes them.

use agentvm_testkit::*;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

/// A flavor like the agents': its login file under a dir of the home.
const FLAVOR: &str = "[flavors.logintest]\ncommand = []\nlogin_files = [\".test/login.json\"]\n";
const LOGIN: &str = ".test/login.json";

/// A project of its own whose launches share `first`'s data dir (agent
/// homes, the login store), with the test flavor trusted.
fn project(first: Option<&Launch>) -> Launch {
    let l = match first {
        Some(f) => Launch::new().same_data_as(f),
        None => Launch::new(),
    };
    l.trusted_config(FLAVOR);
    l
}

fn store(l: &Launch, flavor: &str, rel: &str) -> PathBuf {
    l.data.join("agentvm/logins").join(flavor).join(rel)
}

/// `agentvm run --memory MEMORY [flags] rest...`.
fn run(l: &Launch, memory: &str, flags: &[&str], rest: &[&str]) -> Output {
    let mut args = vec!["run", "--memory", memory];
    args.extend(flags);
    args.extend(rest);
    l.agentvm(&args)
}

/// `agentvm run [flags] logintest -- sh -c script`, on one CPU.
fn run_script(l: &Launch, flags: &[&str], script: &str) -> Output {
    run(l, "512M", &[&["--cpus", "1"], flags].concat(), &["logintest", "--", "sh", "-c", script])
}

/// Panics if a file in one of the projects holds `secret`.
fn assert_not_under_work(projects: &[&Launch], secret: &str) {
    for l in projects {
        let found = files_containing(&l.work, secret.as_bytes());
        assert!(found.is_empty(), "the login is under /work: {found:?}");
    }
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Claude Code's way of writing its credentials: a temporary file beside
/// the target, renamed over it.
fn write_by_rename(text: &str) -> String {
    format!("mkdir -p ~/.test && printf '%s' '{text}' > ~/{LOGIN}.tmp.1a2b3c4d && mv ~/{LOGIN}.tmp.1a2b3c4d ~/{LOGIN}")
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_login_written_in_one_projects_vm_is_there_in_another_projects_vm_and_never_under_work() {
    let token = format!("login-token-{}", std::process::id() as u64 * 7919 + 17);
    let a = project(None);
    let out = run_script(&a, &[], &write_by_rename(&token));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stored = store(&a, "logintest", LOGIN);
    assert_eq!(std::fs::read_to_string(&stored).unwrap(), token);
    assert_eq!(mode(&stored), 0o600);
    assert_eq!(mode(&a.data.join("agentvm/logins/logintest")), 0o700);

    let b = project(Some(&a));
    let out = run_script(&b, &[], &format!("cat ~/{LOGIN}; stat -c %a ~/{LOGIN}"));
    assert_eq!(stdout(&out), format!("{token}600\n"), "{}", stderr(&out));
    // An agent home inside a project gets no shared login.
    let c = project(Some(&a));
    let home = c.work.join("agent-home");
    let out = run_script(&c, &["--home", home.to_str().unwrap()], &format!("test ! -e ~/{LOGIN}"));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("inside the work dir"), "{}", stderr(&out));
    assert_not_under_work(&[&a, &b, &c], &token);
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn per_project_keeps_the_homes_apart_until_the_project_shares_its_login() {
    let a = project(None);
    let out = run_script(&a, &["--login=per-project"], &write_by_rename("made per project"));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!store(&a, "logintest", LOGIN).exists(), "per-project puts nothing in the store");

    let b = project(Some(&a));
    let check = format!("(cat ~/{LOGIN} && echo) 2>/dev/null || echo no login");
    let out = run_script(&b, &["--login=per-project"], &check);
    assert_eq!(stdout(&out), "no login\n", "{}", stderr(&out));
    let out = run_script(&b, &[], &check);
    assert_eq!(stdout(&out), "no login\n", "{}", stderr(&out));

    // A's own login, kept in its home, becomes the shared one on its first
    // shared run.
    let out = run_script(&a, &[], "true");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run_script(&b, &[], &check);
    assert_eq!(stdout(&out), "made per project\n", "{}", stderr(&out));
}

/// How many times each VM rewrites the login, and how long it waits in
/// between: longer than a poll, so a change holds still long enough to be
/// taken (a real agent refreshes hourly).
const REWRITES: u32 = 20;
const PAUSE: &str = "1.2";

/// Rewrites the login [`REWRITES`] times, each version one whole line of
/// JSON with 4 KiB of padding: by rename (Claude Code, Codex) or in place
/// (Gemini CLI); in the background, reads the home's file and notes each
/// writer seen and each read that is not a whole version. A says when its
/// writes are done (/work/written); B writes its last version only when
/// the host says so (/work/last), so the latest change is B's and must
/// reach A: while both write, "the later change wins" may let A's own
/// versions win every time.
fn rewrite_loop(writer: &str, in_place: bool) -> String {
    let other = if writer == "A" { "B" } else { "A" };
    let write = if in_place {
        format!("printf '%s\\n' \"$v\" > ~/{LOGIN}")
    } else {
        format!("printf '%s\\n' \"$v\" > ~/{LOGIN}.tmp.$i && mv ~/{LOGIN}.tmp.$i ~/{LOGIN}")
    };
    let (first, then) = if writer == "A" {
        (REWRITES, "touch /work/written".to_string())
    } else {
        let last = REWRITES - 1;
        (last, format!("while [ ! -e /work/last ]; do sleep 0.1; done; i={last}; v=$(version $i); {write}"))
    };
    format!(
        r#"mkdir -p ~/.test; pad=$(head -c 4096 /dev/zero | tr '\0' x)
version() {{ echo '{{"writer":"{writer}","n":'$1',"pad":"'$pad'"}}'; }}
touch /work/ready; while [ ! -e /work/go ]; do sleep 0.1; done
( while [ ! -e /tmp/done ]; do
    c=$(cat ~/{LOGIN} 2>/dev/null) || continue
    case "$c" in '{{"writer":"'?'","n":'*',"pad":"'"$pad"'"}}') echo "${{c#*writer\":\"}}" | cut -c1 ;; '') ;; *) echo partial ;; esac
  done > /tmp/seen.raw; sort -u /tmp/seen.raw > /work/seen ) &
i=0; while [ $i -lt {first} ]; do
  v=$(version $i); {write}; i=$((i+1)); sleep {PAUSE}
done
{then}
# Until the other VM's version has come through (a loaded host may need
# longer than the writes took), at most 60 s.
t=0; while [ $t -lt 600 ] && ! grep -q '^{other}$' /tmp/seen.raw; do sleep 0.1; t=$((t+1)); done
sleep 1; touch /tmp/done; wait"#
    )
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn two_vms_rewriting_the_login_at_once_share_it_and_every_read_is_whole() {
    let a = project(None);
    let b = project(Some(&a));
    let run = |l: &Launch, script: &str| {
        let args = ["run", "--memory", "512M", "--cpus", "1", "logintest", "--", "sh", "-c", script];
        l.spawn_with(&args)
    };
    let mut vm_a = run(&a, &rewrite_loop("A", false));
    let mut vm_b = run(&b, &rewrite_loop("B", true));
    vm_a.wait_for_file(&a.work.join("ready"), Duration::from_secs(300));
    vm_b.wait_for_file(&b.work.join("ready"), Duration::from_secs(300));
    for l in [&a, &b] {
        std::fs::write(l.work.join("go"), "").unwrap();
    }

    // Meanwhile the store, as another launcher reads it, is always whole.
    let stored = store(&a, "logintest", LOGIN);
    let (mut reads, mut writers) = (0, std::collections::BTreeSet::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    while vm_a.try_wait().is_none() || vm_b.try_wait().is_none() {
        assert!(Instant::now() < deadline, "the VMs did not finish");
        if let Ok(text) = std::fs::read_to_string(&stored) {
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("a partial store file ({e}): {text:?}"));
            writers.insert(v["writer"].as_str().unwrap().to_string());
            reads += 1;
            // A's last version reached the store: now B's last one.
            let a_done = v["writer"] == "A" && v["n"] == REWRITES - 1 && a.work.join("written").exists();
            if a_done && !b.work.join("last").exists() {
                std::fs::write(b.work.join("last"), "").unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for vm in [vm_a, vm_b] {
        let out = vm.wait_with_output();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    eprintln!("{reads} reads of the store, writers seen there: {writers:?}");
    assert_eq!(writers.into_iter().collect::<Vec<_>>(), ["A", "B"]);
    // A's home got B's versions while both ran, and A never read a partial
    // one (B's own reads may catch its in-place writes half-way: that is
    // the CLI's own pattern, in its own home); the store ends with B's last.
    assert_eq!(std::fs::read_to_string(a.work.join("seen")).unwrap(), "A\nB\n");
    assert!(std::fs::read_to_string(b.work.join("seen")).unwrap().contains('A'));
    let last: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stored).unwrap()).unwrap();
    assert_eq!((&last["writer"], &last["n"]), (&"B".into(), &(REWRITES - 1).into()), "the store's last version");
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn the_real_codex_login_in_one_project_is_logged_in_in_another() {
    let key = format!("sk-agentvm-test-{}", std::process::id() as u64 * 7919 + 5);
    let a = Launch::new().stdin(format!("{key}\n").as_bytes());
    let login = ["run", "--memory", "1G", "codex", "--", "login", "--with-api-key"];
    let out = a.run_command(&mut a.command_with(&login));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stored = store(&a, "codex", ".codex/auth.json");
    assert!(std::fs::read_to_string(&stored).unwrap().contains(&key), "codex's login reached the store");
    assert_eq!(mode(&stored), 0o600);

    // Another project: logged out while it keeps its own login, logged in
    // with the shared one.
    let b = Launch::new().same_data_as(&a);
    let status = |flags: &[&str]| {
        let out = run(&b, "1G", flags, &["codex", "--", "login", "status"]);
        (out.status.code(), stderr(&out))
    };
    let (code, text) = status(&["--login=per-project"]);
    assert!(code == Some(1) && text.contains("Not logged in"), "{code:?} {text}");
    let (code, text) = status(&[]);
    assert!(code == Some(0) && text.contains("API key configured"), "{code:?} {text}");
    assert_not_under_work(&[&a, &b], &key);
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn the_real_claude_code_is_signed_in_with_a_login_made_in_another_project() {
    // Claude Code's own write needs its OAuth servers: project A writes its
    // credentials file as Claude Code does (`.credentials.json.tmp.<8 hex>`,
    // mode 0600, renamed over the file) from a shell in the claude image.
    let a = Launch::new();
    a.trusted_config("[flavors.claude]\ncommand = []\n");
    let creds = r#"{"claudeAiOauth":{"accessToken":"sk-ant-oat01-agentvm-test","refreshToken":"sk-ant-ort01-agentvm-test","expiresAt":4102444800000,"scopes":["user:inference","user:profile"],"subscriptionType":"max"}}"#;
    let tmp = "~/.claude/.credentials.json.tmp.5f3a9c1e";
    let write = format!("(umask 077; printf '%s' '{creds}' > {tmp}) && mv {tmp} ~/.claude/.credentials.json");
    let out = a.agentvm(&["run", "--memory", "1G", "claude", "--", "sh", "-c", &write]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let b = Launch::new().same_data_as(&a);
    let status = |flags: &[&str]| {
        let out = run(&b, "1G", flags, &["claude", "--", "auth", "status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("claude auth status: {e}: {}{}", stdout(&out), stderr(&out)));
        (out.status.code(), v)
    };
    let (code, v) = status(&["--network", "none", "--login=per-project"]);
    assert_eq!((code, &v["loggedIn"]), (Some(1), &serde_json::Value::Bool(false)), "{v}");
    let (code, v) = status(&["--network", "none"]);
    assert_eq!((code, &v["loggedIn"], &v["authMethod"]), (Some(0), &true.into(), &"claude.ai".into()), "{v}");
}
