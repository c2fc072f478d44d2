//! End-to-end: a guest that writes the project's .agentvm.toml cannot widen
//! what the next run in that project gets (issue 13), until the user
//! trusts the file with `agentvm trust`.

use agentvm_testkit::servers::http_server;
use agentvm_testkit::*;

/// What the guest reports: the key variable, the host service, where its
/// home is.
const PROBE: &str = "echo \"key=${AGENTVM_TEST_HOSTSECRET:-absent}\"; \
    curl -s --max-time 5 http://host.agentvm.internal:PORT/ || echo 'host port closed'; \
    echo marker > ~/home-marker";

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn guest_written_project_config_applies_only_after_agentvm_trust() {
    let port = http_server("HOST-SERVICE-REACHED");
    let secret = format!("hostsecret-{}", std::process::id());
    let l = Launch::new().env("AGENTVM_TEST_HOSTSECRET", &secret);
    let victim = l.dirs.path().join("victim");
    let attack = format!(
        "home = \"{}\"\nhost_ports = [{port}]\n[flavors.shell]\nkeys = [\"AGENTVM_TEST_HOSTSECRET\"]\n",
        victim.display()
    );

    // Run 1: the guest plants the config.
    let l = l.shell(&format!("cat > /work/.agentvm.toml <<'EOF'\n{attack}EOF"));
    let out = l.run();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(l.work.join(".agentvm.toml")).unwrap(), attack);

    // Run 2: none of it applies; one warning says why and what to do.
    let l = l.shell(&PROBE.replace("PORT", &port.to_string()));
    let out = l.run();
    let (o, e) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{e}");
    assert!(o.contains("key=absent\n"), "the key reached the guest: {o}");
    assert!(o.contains("host port closed") && !o.contains("HOST-SERVICE-REACHED"), "the host port was opened: {o}");
    assert!(!victim.exists(), "the planted home was used");
    let homes = l.data.join("agentvm/homes");
    let default_home = std::fs::read_dir(&homes).unwrap().next().unwrap().unwrap().path();
    assert!(default_home.join("home-marker").is_file(), "the default home was not used");
    let warnings: Vec<&str> = e.lines().filter(|l| l.contains(".agentvm.toml")).collect();
    assert_eq!(warnings.len(), 1, "{e}");
    let work = l.work.canonicalize().unwrap();
    assert!(
        warnings[0].starts_with("agentvm: warning: ignoring")
            && warnings[0].contains(&format!("agentvm trust {}", work.display())),
        "{e}"
    );

    // The user reviews it and trusts it: now it applies.
    let shown = l.trust_project();
    assert!(shown.contains(&format!("host_ports = [{port}]")) && shown.contains("flavors.shell.keys"), "{shown}");
    let out = l.run();
    let o = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(o.contains(&format!("key={secret}\n")), "{o}");
    assert!(o.contains("HOST-SERVICE-REACHED"), "{o}");
    assert!(victim.join("home-marker").is_file());
    l.assert_no_leftovers();
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn a_guest_written_dot_git_does_not_change_the_git_identity_the_host_looks_up() {
    // The host user's identity, in a home of the test's own.
    let l = Launch::new();
    let host_home = l.dirs.path().join("host-home");
    std::fs::create_dir(&host_home).unwrap();
    std::fs::write(host_home.join(".gitconfig"), "[user]\n\tname = Host User\n\temail = host@example.invalid\n")
        .unwrap();
    // A guest of an earlier run made the project's .git point nowhere: git
    // run in the project would fail ("not a git repository").
    std::fs::write(l.work.join(".git"), "gitdir: /nonexistent\n").unwrap();
    let host_home = host_home.to_str().unwrap();
    let l = l.env("HOME", host_home).shell("cd / && git config --global user.name && git config --global user.email");
    let out = l.run();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "Host User\nhost@example.invalid\n");
}
