//! End-to-end tests of `--network allow`: the guest has no interface, only
//! agentvm's proxy, which lets through the allowed names and logs each
//! decision. Only servers on the host's loopback, under test names that
//! the proxy maps to 127.0.0.1 (AGENTVM_PROXY_RESOLVE).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// An HTTP server on 127.0.0.1 that answers every request with `token`.
fn http_token_server(token: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(s, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{token}", token.len());
        }
    });
    port
}

/// An HTTP/1.1 server on 127.0.0.1 that serves any number of requests per
/// connection, answering each with `ECHO host=<its Host header> target=<its target>`.
fn http_echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(s.try_clone().unwrap());
                let mut s = s;
                loop {
                    let mut head = Vec::new();
                    loop {
                        let mut line = String::new();
                        match std::io::BufRead::read_line(&mut reader, &mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => head.push(line.trim_end().to_string()),
                        }
                    }
                    let target = head[0].split(' ').nth(1).unwrap_or("").to_string();
                    let host =
                        head.iter().find_map(|l| l.to_lowercase().strip_prefix("host:").map(|h| h.trim().to_string()));
                    let body = format!("ECHO host={} target={target}\n", host.unwrap_or_default());
                    if write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A name that /etc/hosts maps to a loopback address and that the allow
/// list accepts (its static check knows only `localhost` and its kin).
fn loopback_name_in_etc_hosts() -> Option<String> {
    let hosts = std::fs::read_to_string("/etc/hosts").ok()?;
    hosts.lines().filter(|l| !l.trim_start().starts_with('#')).find_map(|l| {
        let mut words = l.split_whitespace();
        let ip: std::net::IpAddr = words.next()?.parse().ok()?;
        if !ip.is_loopback() {
            return None;
        }
        words.find(|name| agentvm::net::egress::AllowList::new(&[name.to_string()]).is_ok()).map(str::to_string)
    })
}

/// An HTTPS server (openssl s_server) for `secure.test` serving `dir`;
/// writes its certificate to `cert`.
struct HttpsServer(Child, u16);

impl HttpsServer {
    fn start(dir: &std::path::Path, cert: &std::path::Path) -> HttpsServer {
        let key = dir.join("key.pem");
        let ok = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=secure.test"])
            .args(["-addext", "subjectAltName=DNS:secure.test", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(cert)
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs (scripts/setup-host installs it)");
        assert!(ok.success());
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-WWW", "-accept", &port.to_string(), "-cert"])
            .arg(cert)
            .arg("-key")
            .arg(&key)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        HttpsServer(child, port)
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn allow_mode_lets_through_allowed_names_only_and_logs_each_decision() {
    let http = http_token_server("HTTP-ALLOWED-TOKEN");
    let opened = http_token_server("HOST-PORT-TOKEN");
    let l = Launch::new()
        .env("AGENTVM_PROXY_RESOLVE", "allowed.test=127.0.0.1,denied.test=127.0.0.1,secure.test=127.0.0.1");
    let www = l.dirs.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("token.txt"), "HTTPS-ALLOWED-TOKEN").unwrap();
    let https = HttpsServer::start(&www, &l.work.join("cert.pem"));
    let published = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();

    let p = https.1;
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
    let args = [
        "run",
        "--memory",
        "512M",
        "--allow",
        "allowed.test",
        "--allow",
        "secure.test",
        "--host-port",
        &opened,
        "-p",
        &publish,
        "shell",
        "--",
        "sh",
        "-c",
        &script,
    ];
    let child = spawn_until_marker(&l, &args, "done", Duration::from_secs(240));
    // A published port still reaches a server in the guest (over the channel).
    http_get_until(published, "/g", "GUEST-SERVER-TOKEN", Duration::from_secs(30));
    let ps = l.command_with(&["ps", "--json"]).output().unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    let id = listed[0]["id"].as_str().unwrap().to_string();
    let net_log = stdout(&l.command_with(&["logs", &id, "--net"]).output().unwrap());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    eprintln!("--- guest:\n{text}\n--- stderr:\n{}\n--- net log:\n{net_log}", stderr(&out));

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
    assert!(l.leftover_processes().is_empty(), "{:?}", l.leftover_processes());
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
        let out = Launch::new().command_with(&all).stdin(Stdio::null()).output().unwrap();
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
fn allow_mode_cannot_be_slipped_past() {
    let Some(loopback_name) = loopback_name_in_etc_hosts() else {
        eprintln!("skipped: /etc/hosts maps no name (other than localhost) to a loopback address");
        return;
    };
    let echo = http_echo_server();
    let loopback_only = http_token_server("LOOPBACK-REACHED");
    let l = Launch::new()
        .env("AGENTVM_PROXY_RESOLVE", "allowed.test=127.0.0.1,denied.test=127.0.0.1,secure.test=127.0.0.1");
    let www = l.dirs.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let https = HttpsServer::start(&www, &l.work.join("cert.pem"));
    let tls = https.1;
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
    let args = [
        "run",
        "--memory",
        "512M",
        "--allow",
        "allowed.test",
        "--allow",
        "secure.test",
        "--allow",
        &loopback_name,
        "shell",
        "--",
        "sh",
        "-c",
        &script,
    ];
    let child = spawn_until_marker(&l, &args, "done", Duration::from_secs(300));
    let ps = l.command_with(&["ps", "--json"]).output().unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    let id = listed[0]["id"].as_str().unwrap().to_string();
    let net_log = stdout(&l.command_with(&["logs", &id, "--net"]).output().unwrap());
    let raw_log = std::fs::read(l.runtime.join("agentvm").join(&id).join("net.log")).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    eprintln!("--- guest:\n{text}\n--- stderr:\n{}\n--- net log:\n{net_log}", stderr(&out));

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
    assert!(l.leftover_processes().is_empty(), "{:?}", l.leftover_processes());
}
