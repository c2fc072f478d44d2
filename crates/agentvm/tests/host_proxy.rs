//! End-to-end tests of real networks: a company proxy on the host (a
//! stand-in HTTP proxy on its loopback, which logs what it is asked) that
//! the guest uses under `--network open` and agentvm's egress proxy
//! connects through under `--network allow`; and the egress proxy
//! resolving a real name with agentvm's own resolver.

use agentvm_testkit::servers::{http_proxy_server, http_server, https_server, ProxyLog};
use agentvm_testkit::*;
use std::process::{Command, Output};
use std::time::Duration;

/// An HTTPS server for `secure.test` (its test CA at /work/cert.pem for the
/// guest) and a plain HTTP server; their ports.
fn test_servers(l: &Launch) -> (u16, u16) {
    let (tls, ca_pem) = https_server("secure.test", |_, _| (Vec::new(), "HTTPS-THROUGH-PROXY".into()));
    std::fs::write(l.work.join("cert.pem"), ca_pem).unwrap();
    (tls, http_server("HTTP-THROUGH-PROXY"))
}

/// A launch whose environment names the stand-in proxy at `proxy` for
/// HTTPS (with credentials when `auth`) and plain HTTP.
fn behind_proxy(proxy: u16, auth: bool) -> Launch {
    let creds = if auth { "me:secret@" } else { "" };
    Launch::new()
        .env("HTTPS_PROXY", &format!("http://{creds}127.0.0.1:{proxy}"))
        .env("http_proxy", &format!("http://127.0.0.1:{proxy}"))
}

/// The net log of `l`'s running instance, as `agentvm logs --net` prints
/// it; then `child` (that instance) stopped, and its output.
fn net_log_and_stop(l: &Launch, child: Background) -> (String, Output) {
    let id = l.ps()[0]["id"].as_str().unwrap().to_string();
    let net_log = stdout(&l.agentvm(&["logs", &id, "--net"]));
    eprintln!("--- net log:\n{net_log}");
    child.signal(libc::SIGTERM);
    (net_log, child.wait_with_output())
}

fn logged(log: &ProxyLog) -> Vec<String> {
    let lines = log.lock().unwrap().clone();
    eprintln!("--- the stand-in proxy was asked:\n{}", lines.join("\n"));
    lines
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn allow_mode_connects_through_the_hosts_proxy() {
    let (proxy, log) = http_proxy_server();
    let l = behind_proxy(proxy, true);
    let (tls, http) = test_servers(&l);
    // No AGENTVM_PROXY_RESOLVE: the test names resolve nowhere but in the
    // stand-in proxy, so an answer proves the connection went through it.
    let script = format!(
        "curl -s --cacert /work/cert.pem https://secure.test:{tls}/; echo; \
         curl -s http://allowed.test:{http}/; echo; \
         curl -s -w ' %{{http_code}}' http://denied.test:{http}/; echo; \
         touch /work/done; exec sleep 300"
    );
    let mut args: Vec<&str> =
        "run --memory 512M --allow secure.test --allow allowed.test shell -- sh -c".split(' ').collect();
    args.push(&script);
    let child = spawn_until_marker(&l, &args, "done", Duration::from_secs(240));
    let (net_log, out) = net_log_and_stop(&l, child);
    let text = stdout(&out);

    assert!(text.contains("HTTPS-THROUGH-PROXY") && text.contains("HTTP-THROUGH-PROXY"), "{text}");
    assert!(text.contains("egress to denied.test is not allowed") && text.contains(" 403"), "{text}");
    let asked = logged(&log);
    assert_eq!(
        asked,
        [format!("CONNECT secure.test:{tls} HTTP/1.1 +auth"), format!("GET http://allowed.test:{http}/ HTTP/1.1")],
        "the allow list decides before the host's proxy is asked"
    );
    let via = format!("via http://127.0.0.1:{proxy} (from HTTPS_PROXY)");
    assert!(net_log.contains(&format!("ALLOW CONNECT secure.test:{tls} {via}")), "{net_log}");
    assert!(!net_log.contains("secret") && !stderr(&out).contains("secret"), "the proxy's credentials leaked");
    l.assert_no_leftovers();
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn open_mode_hands_the_hosts_proxy_to_the_guest_over_the_channel() {
    let (proxy, log) = http_proxy_server();
    let l = behind_proxy(proxy, false);
    let (tls, http) = test_servers(&l);
    let script = format!(
        "echo \"proxy=$HTTPS_PROXY no_proxy=$NO_PROXY\"; \
         curl -s --max-time 60 --cacert /work/cert.pem https://secure.test:{tls}/; echo; \
         curl -s --max-time 60 http://allowed.test:{http}/; echo"
    );
    let out = l.shell(&script).run();
    let text = stdout(&out);

    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(&format!(
            "proxy=http://host.agentvm.internal:{proxy} no_proxy=localhost,127.0.0.1,::1,host.agentvm.internal"
        )),
        "{text}"
    );
    assert!(text.contains("HTTPS-THROUGH-PROXY") && text.contains("HTTP-THROUGH-PROXY"), "{text}");
    let asked = logged(&log);
    assert!(asked.contains(&format!("CONNECT secure.test:{tls} HTTP/1.1")), "{asked:?}");
    assert!(asked.contains(&format!("GET http://allowed.test:{http}/ HTTP/1.1")), "{asked:?}");
}

#[test]
fn open_mode_refuses_to_hand_the_proxys_credentials_to_the_guest() {
    let (proxy, log) = http_proxy_server();
    let out = behind_proxy(proxy, true).shell("true").run();
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(err.contains("HTTPS_PROXY holds credentials") && err.contains("--network allow"), "{err}");
    assert!(!err.contains("secret"), "{err}");
    assert!(logged(&log).is_empty());
}

/// The host reaches the npm registry (these machines do), resolving its
/// name as the proxy does.
fn npm_registry_reachable() -> Result<(), Skip> {
    let ips = agentvm::net::dns::Resolver::system()
        .lookup("registry.npmjs.org")
        .map_err(|e| Skip::not_applicable(format!("this host cannot resolve registry.npmjs.org: {e}")))?;
    ips.iter()
        .find_map(|ip| std::net::TcpStream::connect_timeout(&(*ip, 443).into(), Duration::from_secs(5)).ok())
        .map(drop)
        .ok_or_else(|| Skip::not_applicable("this host cannot reach registry.npmjs.org:443"))
}

/// Runs `script` in the shell flavor under `--allow registry.npmjs.org`
/// (started by `command`, when given, instead of agentvm itself); its
/// output and the net log. npm verifies the registry with the CAs the
/// guest took from the host (this network re-signs HTTPS).
fn allowing_the_npm_registry(l: &Launch, script: &str, command: Option<fn(Command) -> Command>) -> (String, String) {
    let script = format!("{script}; touch /work/done; exec sleep 300");
    let args = ["run", "--memory", "1G", "--allow", "registry.npmjs.org", "shell", "--", "sh", "-c", &script];
    let mut cmd = l.command_with(&args);
    if let Some(wrap) = command {
        cmd = wrap(cmd);
    }
    let mut child = l.spawn_command(&mut cmd);
    child.wait_for_file(&l.work.join("done"), Duration::from_secs(300));
    let (net_log, out) = net_log_and_stop(l, child);
    l.assert_no_leftovers();
    (stdout(&out), net_log)
}

const NPM_VIEW: &str = "npm view left-pad version 2>&1";

fn assert_is_a_version(text: &str) {
    let version = text.lines().next().unwrap_or_default();
    assert!(
        version.split('.').count() == 3 && version.split('.').all(|n| n.parse::<u32>().is_ok()),
        "no version from npm: {text}"
    );
}

/// Real names, real DNS: the proxy resolves registry.npmjs.org itself (no
/// test override) and lets it through, and refuses pypi.org.
#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn allow_mode_resolves_real_names_and_refuses_the_others() {
    require!(npm_registry_reachable());
    let pypi = "curl -s -o /dev/null -w 'pypi %{http_connect}\\n' https://pypi.org/";
    let (text, net_log) = allowing_the_npm_registry(&Launch::new(), &format!("{NPM_VIEW}; {pypi}"), None);
    assert_is_a_version(&text);
    assert!(text.contains("pypi 403"), "{text}");
    assert!(net_log.contains("ALLOW CONNECT registry.npmjs.org:443"), "{net_log}");
    assert!(net_log.contains("DENY CONNECT pypi.org:443 (egress to pypi.org is not allowed"), "{net_log}");
}

/// A host whose NSS set-up a static binary cannot follow: agentvm in a
/// mount namespace of its own whose /etc/nsswitch.conf resolves host names
/// through systemd-resolved's NSS module only (`hosts: files resolve`),
/// which is not installed here, as it is unusable to a static glibc where
/// it is. resolv.conf is the host's: agentvm's own resolver reads it.
fn with_nss_it_cannot_load(cmd: Command) -> Command {
    // Beside the project, in the launch's own temporary dir.
    let conf = cmd.get_current_dir().unwrap().with_file_name("nsswitch.conf");
    std::fs::write(&conf, "hosts: files resolve\n").unwrap();
    let mut wrapped = Command::new("unshare");
    wrapped
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("mount --bind {} /etc/nsswitch.conf && exec \"$0\" \"$@\"", conf.display()))
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .current_dir(cmd.get_current_dir().unwrap());
    for (name, value) in cmd.get_envs() {
        match value {
            Some(v) => wrapped.env(name, v),
            None => wrapped.env_remove(name),
        };
    }
    wrapped
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn allow_mode_resolves_names_without_the_hosts_nss_modules() {
    require!(npm_registry_reachable());
    if my_uid() != 0 {
        require!(Err(Skip::not_applicable("a mount namespace with another nsswitch.conf needs root")));
    }
    require!(skip::tool("unshare"));
    let (text, net_log) = allowing_the_npm_registry(&Launch::new(), NPM_VIEW, Some(with_nss_it_cannot_load));
    assert_is_a_version(&text);
    assert!(net_log.contains("ALLOW CONNECT registry.npmjs.org:443"), "{net_log}");
}
