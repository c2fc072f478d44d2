//! End-to-end test of `--shield-secrets`: the guest holds only a
//! placeholder, and a local HTTPS server (its own test CA, under a test name
//! mapped to loopback) receives the real key through agentvm's proxy.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::Arc;

const REAL_KEY: &str = "real-secret-key-4f1c9e";

/// An HTTPS server for `api.test` that answers whether the request's
/// x-api-key was the real key (never echoing it), and the body length.
/// Returns its port and its CA's PEM.
fn https_key_checker() -> (u16, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["api.test".to_string()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    let config = Arc::new(config);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in l.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                    .unwrap_or(0);
                while buf.len() < end + len {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let key = head.lines().find_map(|l| l.strip_prefix("x-api-key:")).map(str::trim).unwrap_or("");
                let verdict = if key == REAL_KEY { "KEY-REAL" } else { "KEY-NOT-REAL" };
                let body = format!("{verdict} body={}", buf.len() - end);
                let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                s.conn.send_close_notify();
                let _ = s.flush();
            });
        }
    });
    (port, ca.pem())
}

#[test]
fn shielded_key_reaches_the_api_host_but_never_the_guest() {
    let (port, ca_pem) = https_key_checker();
    let l = Launch::new();
    let ca_file = l.dirs.path().join("test-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    std::fs::write(
        l.work.join(".agentvm.toml"),
        "[flavors.keyed]\ncommand = []\nkeys = [\"TEST_API_KEY\"]\nsecret_hosts = [\"api.test\"]\n",
    )
    .unwrap();
    l.trust_project();
    let l = l
        .env("TEST_API_KEY", REAL_KEY)
        .env("AGENTVM_PROXY_RESOLVE", "api.test=127.0.0.1")
        .env("AGENTVM_PROXY_CA", ca_file.to_str().unwrap());
    let script = format!(
        "echo \"key=$TEST_API_KEY\"; \
         curl -sS https://api.test:{port}/v1 -H \"x-api-key: $TEST_API_KEY\"; echo; \
         printf 0123456789 > /tmp/body; \
         curl -sS -X POST --data-binary @/tmp/body https://api.test:{port}/v1 -H \"x-api-key: $TEST_API_KEY\"; echo; \
         cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c {REAL_KEY}; \
         grep -rl {REAL_KEY} /etc /tmp /home/agent /work 2>/dev/null | wc -l"
    );
    let out = l
        .command_with(&["run", "--memory", "512M", "--shield-secrets", "keyed", "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = stdout(&out);
    eprintln!("--- stdout:\n{text}\n--- stderr:\n{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("key=agentvm-shielded-"), "{text}");
    assert_eq!(lines[1], "KEY-REAL body=0", "{text}");
    assert_eq!(lines[2], "KEY-REAL body=10", "{text}");
    assert_eq!(lines[3], "0", "the real key is in a guest process's environment: {text}");
    assert_eq!(lines[4], "0", "the real key is in a guest file: {text}");
    assert!(!text.contains(REAL_KEY) && !stderr(&out).contains(REAL_KEY));
    assert!(l.leftover_processes().is_empty(), "{:?}", l.leftover_processes());
}

#[test]
fn shielding_with_an_open_network_is_refused_before_boot() {
    let out = Launch::new()
        .command_with(&["run", "--network", "open", "--shield-secrets", "claude"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("--shield-secrets needs --network allow"), "{}", stderr(&out));
}
