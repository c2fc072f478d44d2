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
    let l = Launch::new().env("AGENTVM_PROXY_RESOLVE", "allowed.test=127.0.0.1,denied.test=127.0.0.1,secure.test=127.0.0.1");
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
        "run", "--memory", "512M", "--allow", "allowed.test", "--allow", "secure.test", "--host-port", &opened, "-p",
        &publish, "shell", "--", "sh", "-c", &script,
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
    assert!(text.contains("agentvm: egress to denied.test is not allowed: allow it with --allow denied.test"), "{text}");
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
    let cases: [(&[&str], &str); 3] = [
        (&["--allow", "not a name"], "allowed name \"not a name\" is not a host name"),
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
