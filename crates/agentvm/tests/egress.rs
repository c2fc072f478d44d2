//! End-to-end tests of `--network allow`: the guest has no interface, only
//! agentvm's proxy, which lets through the allowed names and logs each
//! decision. Only servers on the host's loopback, under test names that
//! the proxy maps to 127.0.0.1 (AGENTVM_PROXY_RESOLVE).

use agentvm_testkit::servers::{free_port, http_echo_server, http_server, https_server};
use agentvm_testkit::*;
use std::time::Duration;

/// A name that /etc/hosts maps to a loopback address and that the allow
/// list accepts (its static check knows only `localhost` and its kin).
fn loopback_name_in_etc_hosts() -> Result<String, Skip> {
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let name = hosts.lines().filter(|l| !l.trim_start().starts_with('#')).find_map(|l| {
        let mut words = l.split_whitespace();
        let ip: std::net::IpAddr = words.next()?.parse().ok()?;
        if !ip.is_loopback() {
            return None;
        }
        words.find(|name| agentvm::net::egress::AllowList::new(&[name.to_string()]).is_ok()).map(str::to_string)
    });
    name.ok_or_else(|| {
        Skip::missing(
            "/etc/hosts maps no name but localhost to a loopback address (Debian maps the host's name to 127.0.1.1)",
        )
    })
}

/// The proxy's map of the test names to the host's loopback.
const TEST_NAMES_ON_LOOPBACK: &str = "allowed.test=127.0.0.1,denied.test=127.0.0.1,secure.test=127.0.0.1";

/// An HTTPS server for `secure.test` whose test CA's certificate is at
/// /work/cert.pem for the guest; its port.
fn secure_test_server(l: &Launch) -> u16 {
    let (port, ca_pem) = https_server("secure.test", |_, _| (Vec::new(), "HTTPS-ALLOWED-TOKEN".into()));
    std::fs::write(l.work.join("cert.pem"), ca_pem).unwrap();
    port
}

/// `agentvm run` that allows `allowed.test` and `secure.test`, with
/// `flags`, running `script` in the shell flavor.
fn allowing_test_names<'a>(flags: &[&'a str], script: &'a str) -> Vec<&'a str> {
    let mut args = vec!["run", "--memory", "512M", "--allow", "allowed.test", "--allow", "secure.test"];
    args.extend_from_slice(flags);
    args.extend(["shell", "--", "sh", "-c", script]);
    args
}

/// The id of `l`'s running instance and its net log, as `agentvm logs
/// --net` prints it.
fn net_log(l: &Launch) -> (String, String) {
    let id = l.ps()[0]["id"].as_str().unwrap().to_string();
    let log = stdout(&l.agentvm(&["logs", &id, "--net"]));
    eprintln!("--- net log:\n{log}");
    (id, log)
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn allow_mode_lets_through_allowed_names_only_and_logs_each_decision() {
    let http = http_server("HTTP-ALLOWED-TOKEN");
    let opened = http_server("HOST-PORT-TOKEN");
    let l = Launch::new().env("AGENTVM_PROXY_RESOLVE", TEST_NAMES_ON_LOOPBACK);
    let p = secure_test_server(&l);
    let published = free_port();

    let script = format!(
        "ls /sys/class/net; \
         curl -s http://allowed.test:{http}/; echo; \
         curl -s -w ' %{{http_code}}' http://denied.test:{http}/; echo; \
         curl -s --cacert /work/cert.pem https://secure.test:{p}/token.txt; echo; \
         curl -s --cacert /work/cert.pem --connect-to secure.test:{p}:allowed.test:{p} https://secure.test:{p}/token.txt \
           || echo sni-mismatch-refused; \
         curl -s --noproxy '*' --max-time 5 http://allowed.test:{http}/ || echo direct-name-failed; \
         curl -s --noproxy '*' --max-time 5 http://10.0.2.2:{http}/ || echo direct-address-failed; \
         curl -s http://host.agentvm.internal:{opened}/; echo; \
         cd /tmp && echo GUEST-SERVER-TOKEN > g && (python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &); \
         for i in $(seq 100); do curl -s --noproxy '*' -o /dev/null http://127.0.0.1:8000/g && break; sleep 0.3; done; \
         touch /work/done; exec sleep 300"
    );
    let (opened, publish) = (opened.to_string(), format!("{published}:8000"));
    let args = allowing_test_names(&["--host-port", &opened, "-p", &publish], &script);
    let child = spawn_until_marker(&l, &args, "done", Duration::from_secs(240));
    // A published port still reaches a server in the guest (over the channel).
    http_get_until(published, "/g", "GUEST-SERVER-TOKEN", Duration::from_secs(30));
    let (_, net_log) = net_log(&l);
    child.signal(libc::SIGTERM);
    let text = stdout(&child.wait_with_output());

    assert!(text.starts_with("lo\n"), "the guest has an interface besides lo: {text}");
    assert!(text.contains("HTTP-ALLOWED-TOKEN"), "{text}");
    assert!(
        text.contains("agentvm: egress to denied.test is not allowed: allow it with --allow denied.test"),
        "{text}"
    );
    assert!(text.contains(" 403"), "{text}");
    assert!(text.contains("HTTPS-ALLOWED-TOKEN"), "{text}");
    assert!(text.contains("sni-mismatch-refused"), "{text}");
    assert_eq!(text.matches("HTTP-ALLOWED-TOKEN").count(), 1, "a direct connection got through: {text}");
    assert!(text.contains("direct-name-failed") && text.contains("direct-address-failed"), "{text}");
    assert!(text.contains("HOST-PORT-TOKEN"), "--host-port is unaffected: {text}");

    assert!(net_log.contains(&format!("ALLOW GET allowed.test:{http}")), "{net_log}");
    assert!(net_log.contains(&format!("DENY GET denied.test:{http}")), "{net_log}");
    assert!(net_log.contains(&format!("ALLOW CONNECT secure.test:{p}")), "{net_log}");
    assert!(net_log.contains(&format!("DENY CONNECT allowed.test:{p} (the TLS hello names secure.test)")), "{net_log}");
    l.assert_no_leftovers();
}

#[test]
fn bad_allow_input_fails_before_boot() {
    let cases: [(&[&str], &str); 5] = [
        (&["--allow", "not a name"], "allowed name \"not a name\" is not a host name"),
        (&["--allow", "localhost"], "allowed name \"localhost\" is this host itself"),
        (&["--allow", "127.0.0.1"], "allowed name \"127.0.0.1\" is an address, not a host name"),
        (&["--network", "open", "--allow", "example.com"], "--allow needs --network allow"),
        (&["--allow", "example.com", "-p", "18002:53/udp"], "only TCP ports can be published"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        all.push("shell");
        let out = Launch::new().agentvm(&all);
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
}

/// The ways around the allow list, each from a real guest: a pipelined
/// second request, a Host header other than the checked host, a TLS hello
/// split over two records naming another server, a hello without a server
/// name, a tunnel that is not TLS, numeric and resolved loopback targets,
/// and request text that would forge net.log lines or drive the terminal.
#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn allow_mode_cannot_be_slipped_past() {
    let loopback_name = require!(loopback_name_in_etc_hosts());
    let echo = http_echo_server();
    let loopback_only = http_server("LOOPBACK-REACHED");
    let l = Launch::new().env("AGENTVM_PROXY_RESOLVE", TEST_NAMES_ON_LOOPBACK);
    let tls = secure_test_server(&l);
    let probe = format!(
        r#"import socket, ssl, time
P = ("host.agentvm.internal", 3128)
def talk(first, then=b"", wait=40):
    s = socket.create_connection(P, timeout=wait)
    s.sendall(first)
    if then:
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(1024)
        start = time.time()
        s.sendall(then)
    else:
        got, start = b"", time.time()
    data = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
    except socket.timeout:
        pass
    return data, time.time() - start
def hello(name):
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()
def two_records(rec):
    body = rec[5:]
    half = len(body) // 2
    return b"".join(bytes([22, 3, 1]) + len(b).to_bytes(2, "big") + b for b in (body[:half], body[half:]))
connect = b"CONNECT secure.test:{tls} HTTP/1.1\r\nHost: secure.test:{tls}\r\n\r\n"
data, _ = talk(b"GET http://allowed.test:{echo}/first HTTP/1.1\r\nHost: denied.test\r\n\r\n"
               b"GET http://denied.test:{echo}/second HTTP/1.1\r\nHost: denied.test\r\n\r\n")
print("pipelined:", data.decode(errors="replace").count("ECHO"), "answers;", [l for l in data.decode(errors="replace").splitlines() if l.startswith("ECHO")])
data, took = talk(connect, two_records(hello("evil.test")))
print("split hello: %d bytes back after %.1f s" % (len(data), took))
data, took = talk(connect, hello(None))
print("no-SNI hello: %d bytes back after %.0f s" % (len(data), took))
data, _ = talk(b"CONNECT allowed.test:{echo} HTTP/1.1\r\n\r\n", b"GET /x HTTP/1.1\r\nHost: denied.test\r\n\r\n")
print("plain tunnel:", data.count(b"ECHO"), "answers")
for target in ("127.0.0.1:22", "[::1]:22", "{loopback_name}:{loopback_only}"):
    data, _ = talk(b"CONNECT %s HTTP/1.1\r\n\r\n" % target.encode())
    print("connect", target, "->", data.split(b"\r\n")[0].decode())
talk(b"CONNECT evil.test:443\x1b]0;pwned\x07\x1b[2J HTTP/1.1\r\n\r\n")
talk(b"CONNECT x.test:443\n1700000000 ALLOW CONNECT forged.test:443 HTTP/1.1\r\n\r\n")
"#
    );
    std::fs::write(l.work.join("probe.py"), probe).unwrap();
    let script = format!(
        "python3 /work/probe.py 2>&1; \
         curl -s -w ' %{{http_code}}' http://{loopback_name}:{loopback_only}/; echo; \
         touch /work/done; exec sleep 300"
    );
    let args = allowing_test_names(&["--allow", &loopback_name], &script);
    let child = spawn_until_marker(&l, &args, "done", Duration::from_secs(300));
    let (id, net_log) = net_log(&l);
    let raw_log = std::fs::read(l.runtime.join("agentvm").join(&id).join("net.log")).unwrap();
    child.signal(libc::SIGTERM);
    let text = stdout(&child.wait_with_output());

    assert!(text.contains(&format!("pipelined: 1 answers; ['ECHO host=allowed.test:{echo} target=/first']")), "{text}");
    assert!(net_log.contains(&format!("DENY GET denied.test:{echo} (a second request on one connection")), "{net_log}");
    let split_took: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("split hello: 0 bytes back after "))
        .and_then(|rest| rest.trim_end_matches(" s").parse().ok())
        .unwrap_or_else(|| panic!("the split hello got an answer: {text}"));
    assert!(split_took < 10.0, "the split hello was refused only after {split_took} s");
    assert!(net_log.contains(&format!("DENY CONNECT secure.test:{tls} (the TLS hello names evil.test)")), "{net_log}");
    assert!(text.contains("no-SNI hello: 0 bytes back"), "{text}");
    assert!(net_log.contains("the TLS hello names no server"), "{net_log}");
    assert!(text.contains("plain tunnel: 0 answers"), "{text}");
    assert!(net_log.contains(&format!("DENY CONNECT allowed.test:{echo} (not a TLS hello")), "{net_log}");
    assert!(text.contains("connect 127.0.0.1:22 -> HTTP/1.1 403 Forbidden"), "{text}");
    assert!(text.contains("connect [::1]:22 -> HTTP/1.1 403 Forbidden"), "{text}");
    assert!(text.contains(&format!("connect {loopback_name}:{loopback_only} -> HTTP/1.1 403 Forbidden")), "{text}");
    assert!(!text.contains("LOOPBACK-REACHED"), "a name resolving to loopback reached the host: {text}");
    assert!(text.contains("a loopback address: the proxy connects only to public addresses"), "{text}");
    assert!(!raw_log.iter().any(|b| *b == 0x1b || *b == 0x07), "net.log holds control characters: {net_log}");
    assert!(!net_log.contains('\u{1b}') && !net_log.contains('\u{7}'), "{net_log}");
    assert!(!net_log.lines().any(|l| l.contains("ALLOW CONNECT forged.test")), "a log line was forged: {net_log}");
    l.assert_no_leftovers();
}
