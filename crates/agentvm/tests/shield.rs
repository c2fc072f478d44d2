//! End-to-end test of `--shield-secrets`: the guest holds only a
//! placeholder, and a local HTTPS server (its own test CA, under a test name
//! mapped to loopback) receives the real key through agentvm's proxy.

use agentvm_testkit::servers::https_server;
use agentvm_testkit::*;
use std::time::Duration;

const REAL_KEY: &str = "real-secret-key-4f1c9e";

/// The request's x-api-key, as the server got it.
fn api_key_of(head: &str) -> &str {
    head.lines().find_map(|l| l.strip_prefix("x-api-key:")).map(str::trim).unwrap_or("")
}

/// Whether the request's x-api-key was the real key (never echoing it),
/// and the body length.
fn key_verdict(head: &str, body: usize) -> (Vec<String>, String) {
    let verdict = if api_key_of(head) == REAL_KEY.to_lowercase() { "KEY-REAL" } else { "KEY-NOT-REAL" };
    (Vec::new(), format!("{verdict} body={body}"))
}

/// An API that echoes: the verdict, then the whole request head in the
/// body and its x-api-key in a response header.
fn echo_all(head: &str, body: usize) -> (Vec<String>, String) {
    let (_, verdict) = key_verdict(head, body);
    (vec![format!("x-echo-api-key: {}", api_key_of(head))], format!("{verdict}\n{head}"))
}

/// A launch of the flavor `keyed` (key TEST_API_KEY, sent in x-api-key to
/// api.test, which the proxy maps to loopback and trusts `ca_pem` for).
fn keyed_launch(ca_pem: &str) -> Launch {
    let l = Launch::new();
    let ca_file = l.dirs.path().join("test-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    l.trusted_config(
        "[flavors.keyed]\ncommand = []\nkeys = [\"TEST_API_KEY\"]\nsecret_hosts = [\"api.test\"]\n\
         key_headers = { TEST_API_KEY = [\"x-api-key: {key}\"] }\n",
    );
    l.env("TEST_API_KEY", REAL_KEY)
        .env("AGENTVM_PROXY_RESOLVE", "api.test=127.0.0.1")
        .env("AGENTVM_PROXY_CA", ca_file.to_str().unwrap())
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn shielded_key_reaches_the_api_host_but_never_the_guest() {
    let (port, ca_pem) = https_server("api.test", key_verdict);
    let l = keyed_launch(&ca_pem);
    let script = format!(
        "echo \"key=$TEST_API_KEY\"; \
         curl -sS https://api.test:{port}/v1 -H \"x-api-key: $TEST_API_KEY\"; echo; \
         printf 0123456789 > /tmp/body; \
         curl -sS -X POST --data-binary @/tmp/body https://api.test:{port}/v1 -H \"x-api-key: $TEST_API_KEY\"; echo; \
         cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c {REAL_KEY}; \
         grep -rl {REAL_KEY} /etc /tmp /home/agent /work 2>/dev/null | wc -l"
    );
    let out = l.agentvm(&["run", "--memory", "512M", "--shield-secrets", "keyed", "--", "sh", "-c", &script]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("key=agentvm-shielded-"), "{text}");
    assert_eq!(lines[1], "KEY-REAL body=0", "{text}");
    assert_eq!(lines[2], "KEY-REAL body=10", "{text}");
    assert_eq!(lines[3], "0", "the real key is in a guest process's environment: {text}");
    assert_eq!(lines[4], "0", "the real key is in a guest file: {text}");
    assert!(!text.contains(REAL_KEY) && !stderr(&out).contains(REAL_KEY));
    l.assert_no_leftovers();
}

#[test]
fn shielding_with_an_open_network_is_refused_before_boot() {
    let out = Launch::new().agentvm(&["run", "--network", "open", "--shield-secrets", "claude"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("--shield-secrets needs --network allow"), "{}", stderr(&out));
}

#[test]
fn a_flavor_that_does_not_say_where_its_key_travels_is_refused_before_boot() {
    let l = Launch::new();
    l.trusted_config("[flavors.keyed]\ncommand = []\nkeys = [\"TEST_API_KEY\"]\nsecret_hosts = [\"api.test\"]\n");
    let out = l.env("TEST_API_KEY", REAL_KEY).agentvm(&["run", "--shield-secrets", "keyed"]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("key_headers = { TEST_API_KEY"), "{}", stderr(&out));
}

/// Peak resident memory of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib / 1024
}

/// The attacks on the shield, from a real guest against a stand-in API
/// that echoes the request (path, headers) back: the key reflected through
/// the path or another header must not come back, nor the real key echoed
/// from its own header; the Host is the secret host's; Python's default
/// (strict) TLS context accepts the leaf; a chunked request with a chunk
/// of 0x7fffffffff bytes and a stream of data is streamed, not buffered.
#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn the_shield_puts_the_key_only_into_its_header_and_never_lets_it_back() {
    const BOMB_MIB: u64 = 128;
    let (port, ca_pem) = https_server("api.test", echo_all);
    let l = keyed_launch(&ca_pem);
    let python_get = format!(
        "import os, urllib.request; \
         r = urllib.request.Request('https://api.test:{port}/py', headers={{'x-api-key': os.environ['TEST_API_KEY']}}); \
         print('python:', urllib.request.urlopen(r).read().decode().splitlines()[0])"
    );
    let bomb = format!(
        "import socket, ssl\n\
         s = socket.create_connection(('host.agentvm.internal', 3128))\n\
         s.sendall(b'CONNECT api.test:{port} HTTP/1.1\\r\\nHost: api.test:{port}\\r\\n\\r\\n')\n\
         got = b''\n\
         while b'\\r\\n\\r\\n' not in got: got += s.recv(1024)\n\
         ctx = ssl.create_default_context()\n\
         ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # verifying is the urllib part's job\n\
         t = ctx.wrap_socket(s, server_hostname='api.test')\n\
         t.sendall(b'POST /bomb HTTP/1.1\\r\\nHost: api.test\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n7fffffffff\\r\\n')\n\
         block, sent = b'x' * (1 << 20), 0\n\
         try:\n    for _ in range({BOMB_MIB}):\n        t.sendall(block); sent += 1\n\
         except OSError as e:\n    print('bomb stopped:', e)\n\
         print('bomb sent', sent, 'MiB')\n"
    );
    std::fs::write(l.work.join("bomb.py"), bomb).unwrap();
    let script = format!(
        "echo \"key=$TEST_API_KEY\"; \
         curl -sS -D - https://api.test:{port}/v1/$TEST_API_KEY -H \"x-api-key: $TEST_API_KEY\" \
           -H \"X-Reflect: $TEST_API_KEY\" -H 'Host: evil.test'; echo; \
         python3 -c \"{python_get}\" 2>&1 | tail -1; \
         python3 /work/bomb.py 2>&1 | tail -2; \
         touch /work/done; exec sleep 300"
    );
    let args = ["run", "--memory", "512M", "--shield-secrets", "keyed", "--", "sh", "-c", &script];
    let child = spawn_until_marker(&l, &args, "done", Duration::from_secs(400));
    let peak = peak_rss_mib(child.id());
    child.signal(libc::SIGTERM);
    let out = child.wait_with_output();
    let text = stdout(&out);
    eprintln!("--- agentvm peak RSS: {peak} MiB");

    let placeholder = text.lines().next().unwrap().strip_prefix("key=").unwrap().to_lowercase();
    assert!(placeholder.starts_with("agentvm-shielded-"), "{text}");
    assert!(!text.contains(REAL_KEY), "the real key came back to the guest: {text}");
    assert!(text.contains("\nKEY-REAL body=0\n"), "the key did not reach its header: {text}");
    assert!(
        text.contains(&format!("post /v1/{placeholder} http/1.1"))
            || text.contains(&format!("get /v1/{placeholder} http/1.1")),
        "{text}"
    );
    assert!(text.contains(&format!("x-reflect: {placeholder}")), "another header got the key: {text}");
    assert!(
        text.contains(&format!("host: api.test:{port}")) && !text.contains("host: evil.test"),
        "Host not pinned: {text}"
    );
    assert!(text.contains("[agentvm: redacted]"), "the echoed key was not masked: {text}");
    assert!(text.contains("python: KEY-REAL"), "Python's default context refused the leaf: {text}");
    assert!(text.contains(&format!("bomb sent {BOMB_MIB} MiB")), "{text}");
    assert!(peak < BOMB_MIB / 2 + 40, "agentvm grew to {peak} MiB while the guest sent a {BOMB_MIB} MiB chunk");
    l.assert_no_leftovers();
}
