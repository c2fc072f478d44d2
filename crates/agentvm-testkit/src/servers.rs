//! Stand-in servers on the host's loopback, each on a free port, each
//! connection on a thread of its own; and port polling.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Listens on 127.0.0.1 and hands every connection to `handle`; returns
/// the port.
pub fn serve(handle: impl Fn(TcpStream) + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let handle = handle.clone();
            std::thread::spawn(move || handle(conn));
        }
    });
    port
}

/// Sends `token` to whoever connects (no protocol).
pub fn tcp_token_server(token: &'static str) -> u16 {
    serve(move |mut s| {
        let _ = s.write_all(token.as_bytes());
    })
}

/// Reads to the end, then answers `GOT <the number of bytes it got>`.
pub fn tcp_counting_server() -> u16 {
    serve(|mut s| {
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let _ = s.write_all(format!("GOT {}", got.len()).as_bytes());
    })
}

/// An HTTP server that answers every request with `body`. It reads what
/// the client sends until the client closes: closing a socket with unread
/// input sends a reset, which throws away an answer not yet delivered.
pub fn http_server(body: &'static str) -> u16 {
    serve(move |mut s| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let _ = read_head(&mut reader);
        let _ = s.write_all(format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    })
}

/// An HTTP/1.1 server that serves any number of requests per connection,
/// answering each with `ECHO host=<its Host header> target=<its target>`.
pub fn http_echo_server() -> u16 {
    serve(|s| {
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut s = s;
        while let Some(head) = read_head(&mut reader) {
            let target = head[0].split(' ').nth(1).unwrap_or("").to_string();
            let host = head.iter().find_map(|l| l.to_lowercase().strip_prefix("host:").map(|h| h.trim().to_string()));
            let body = format!("ECHO host={} target={target}\n", host.unwrap_or_default());
            if write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).is_err() {
                return;
            }
        }
    })
}

/// What a stand-in proxy was asked: each request line, in order.
pub type ProxyLog = Arc<Mutex<Vec<String>>>;

/// A stand-in company proxy (an HTTP proxy, as squid or cntlm speak it):
/// CONNECT opens a tunnel, an absolute-form request is sent on and its
/// answer relayed; every target name is taken to be on this host's
/// loopback (the proxy resolves names for its clients). Logs each request
/// line, and whether it carried credentials (` +auth`).
pub fn http_proxy_server() -> (u16, ProxyLog) {
    let log = ProxyLog::default();
    let seen = log.clone();
    let port = serve(move |client| {
        let mut reader = BufReader::new(client.try_clone().unwrap());
        let Some(head) = read_head(&mut reader) else { return };
        let auth = head.iter().any(|l| l.to_lowercase().starts_with("proxy-authorization:"));
        seen.lock().unwrap().push(format!("{}{}", head[0], if auth { " +auth" } else { "" }));
        let mut parts = head[0].split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (authority, path) = match target.strip_prefix("http://") {
            Some(rest) => rest.split_at(rest.find('/').unwrap_or(rest.len())),
            None => (target, ""),
        };
        let port: u16 = authority.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(80);
        let mut client = client;
        let Ok(mut up) = TcpStream::connect(("127.0.0.1", port)) else {
            let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
            return;
        };
        if method == "CONNECT" {
            let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
            let _ = up.write_all(reader.buffer());
        } else {
            let path = if path.is_empty() { "/" } else { path };
            let _ = up.write_all(format!("{method} {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes());
        }
        let (mut up_reader, mut client_writer) = (up.try_clone().unwrap(), client.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut up_reader, &mut client_writer);
            let _ = client_writer.shutdown(std::net::Shutdown::Write);
        });
        if method == "CONNECT" {
            let _ = std::io::copy(&mut client, &mut up);
            let _ = up.shutdown(std::net::Shutdown::Write);
        }
    });
    (port, log)
}

/// The lines of one request head, without the blank line; `None` at the
/// connection's end.
fn read_head(reader: &mut impl BufRead) -> Option<Vec<String>> {
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) if line == "\r\n" => return Some(head),
            Ok(_) => head.push(line.trim_end().to_string()),
        }
    }
}

/// What a stand-in HTTPS server answers, given a request's head (lower-cased)
/// and its body's size: extra response headers and the body.
pub type Answer = fn(&str, usize) -> (Vec<String>, String);

/// An HTTPS server for `name` with a certificate from a test CA of its own,
/// reading one request per connection (a body to its end, discarded) and
/// answering with `answer`. Returns its port and its CA's PEM.
pub fn https_server(name: &str, answer: Answer) -> (u16, String) {
    https_server_for(&[name], answer)
}

/// [`https_server`] with a certificate for each of `names`.
pub fn https_server_for(names: &[&str], answer: Answer) -> (u16, String) {
    let (config, ca_pem) = tls_with_test_ca(names);
    let port = serve(move |tcp| {
        let conn = rustls::ServerConnection::new(config.clone()).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let Some((head, body)) = read_request(&mut s) else { return };
        let (headers, text) = answer(&head, body);
        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n", text.len());
        for h in headers {
            let _ = write!(s, "{h}\r\n");
        }
        let _ = write!(s, "\r\n{text}");
        s.conn.send_close_notify();
        let _ = s.flush();
    });
    (port, ca_pem)
}

/// A new test CA and a leaf it signed for `names`, as the strictest
/// verifiers want them (OpenSSL's X509_STRICT, which Python 3.13's default
/// context turns on): the CA with key usages, the leaf with an Authority
/// Key Identifier, key usage and the server-auth purpose.
pub fn test_ca_and_leaf(names: &[&str]) -> (rcgen::Certificate, rcgen::Certificate, rcgen::KeyPair) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // Names of their own: OpenSSL takes a leaf named as its issuer for a
    // self-signed certificate, and refuses it.
    ca_params.distinguished_name.push(DnType::CommonName, "agentvm test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut leaf_params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    leaf_params.distinguished_name.push(DnType::CommonName, names[0]);
    leaf_params.use_authority_key_identifier_extension = true;
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    (ca, leaf, leaf_key)
}

/// A TLS server set-up for `names` with a certificate from a new test CA;
/// and that CA's PEM.
fn tls_with_test_ca(names: &[&str]) -> (Arc<rustls::ServerConfig>, String) {
    let (ca, leaf, leaf_key) = test_ca_and_leaf(names);
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    (Arc::new(config), ca.pem())
}

/// Reads one request: its head (lower-cased) and the size of its body (a
/// chunked body is read to the connection's end).
fn read_request(s: &mut impl Read) -> Option<(String, usize)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    let chunked = head.contains("transfer-encoding: chunked");
    let len: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())).unwrap_or(0);
    let mut body = buf.len() - end;
    while chunked || body < len {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => body += n,
        }
    }
    Some((head, body))
}

/// GETs `path` from 127.0.0.1:`port` until the answer contains `token`;
/// panics with the last answer after `timeout`.
pub fn http_get_until(port: u16, path: &str, token: &str, timeout: Duration) -> String {
    let mut body = String::new();
    let get = |body: &mut String| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        let _ = write!(s, "GET {path} HTTP/1.0\r\n\r\n");
        body.clear();
        let _ = s.read_to_string(body);
        body.contains(token).then(|| body.clone())
    };
    crate::process::poll(timeout, Duration::from_millis(300), || get(&mut body))
        .unwrap_or_else(|| panic!("127.0.0.1:{port}{path} never answered with {token}: {body:?}"))
}

/// What a stand-in API was sent: each request's line and body, in order.
pub type RequestLog = Arc<Mutex<Vec<(String, String)>>>;

/// A stand-in of Anthropic's Messages API (what `ANTHROPIC_BASE_URL`
/// points Claude Code at), HTTP/1.1 with keep-alive: `POST /v1/messages`
/// gets a short assistant answer, as server-sent events when the request
/// asks to stream, else as JSON; anything else a 404. Logs every request.
pub fn messages_api_server(answer: &'static str) -> (u16, RequestLog) {
    let log = RequestLog::default();
    let seen = log.clone();
    let port = serve(move |s| {
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut s = s;
        while let Some(head) = read_head(&mut reader) {
            let length = head.iter().find_map(|l| {
                let l = l.to_lowercase();
                l.strip_prefix("content-length:").and_then(|n| n.trim().parse::<usize>().ok())
            });
            let mut body = vec![0; length.unwrap_or(0)];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let body = String::from_utf8_lossy(&body).into_owned();
            let is_messages = head[0].starts_with("POST /v1/messages?") || head[0].starts_with("POST /v1/messages ");
            let (kind, reply) = match (is_messages, body.contains("\"stream\":true")) {
                (true, true) => ("text/event-stream", message_events(answer)),
                (true, false) => ("application/json", message_json(answer).to_string()),
                (false, _) => (
                    "application/json",
                    r#"{"type":"error","error":{"type":"not_found_error","message":"stand-in"}}"#.into(),
                ),
            };
            let status = if is_messages { "200 OK" } else { "404 Not Found" };
            seen.lock().unwrap().push((head[0].clone(), body));
            let head = format!("HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\n\r\n", reply.len());
            if s.write_all(head.as_bytes()).and_then(|()| s.write_all(reply.as_bytes())).is_err() {
                return;
            }
        }
    });
    (port, log)
}

fn message_json(answer: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "msg_standin", "type": "message", "role": "assistant", "model": "claude-standin",
        "content": [{"type": "text", "text": answer}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 1, "output_tokens": 1}
    })
}

/// The Messages API's stream of one text answer.
fn message_events(answer: &str) -> String {
    let mut start = message_json("");
    start["content"] = serde_json::json!([]);
    start["stop_reason"] = serde_json::Value::Null;
    let events = [
        ("message_start", serde_json::json!({"type": "message_start", "message": start})),
        (
            "content_block_start",
            serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        (
            "content_block_delta",
            serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": answer}}),
        ),
        ("content_block_stop", serde_json::json!({"type": "content_block_stop", "index": 0})),
        (
            "message_delta",
            serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 1}}),
        ),
        ("message_stop", serde_json::json!({"type": "message_stop"})),
    ];
    events.iter().map(|(name, data)| format!("event: {name}\ndata: {data}\n\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(port: u16, request: &[u8]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(request).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn the_plain_servers_answer_as_documented() {
        assert_eq!(exchange(tcp_token_server("TOKEN"), b""), "TOKEN");
        assert_eq!(exchange(tcp_counting_server(), &[b'x'; 5000]), "GOT 5000");
        assert!(http_get_until(http_server("BODY"), "/", "BODY", Duration::from_secs(5)).ends_with("\r\n\r\nBODY"));
        let two = b"GET /a HTTP/1.1\r\nHost: one.test\r\n\r\nGET /b HTTP/1.1\r\nHost: two.test\r\n\r\n";
        let answer = exchange(http_echo_server(), two);
        assert!(answer.contains("ECHO host=one.test target=/a\n") && answer.contains("ECHO host=two.test target=/b\n"));
    }

    #[test]
    fn the_http_server_answers_whole_whatever_follows_the_request_head() {
        let mut request = b"POST / HTTP/1.0\r\n\r\n".to_vec();
        request.resize(request.len() + 200_000, b'x');
        for _ in 0..20 {
            assert!(exchange(http_server("WHOLE"), &request).ends_with("\r\n\r\nWHOLE"));
        }
    }

    #[test]
    fn the_stand_in_proxy_tunnels_and_forwards_and_logs_each_request() {
        let target = http_server("BEHIND-THE-PROXY");
        let (proxy, log) = http_proxy_server();
        let plain = exchange(proxy, format!("GET http://named.test:{target}/x HTTP/1.1\r\n\r\n").as_bytes());
        assert!(plain.ends_with("BEHIND-THE-PROXY"), "{plain}");
        let tunnel = exchange(
            proxy,
            format!(
                "CONNECT named.test:{target} HTTP/1.1\r\nProxy-Authorization: Basic eDp5\r\n\r\nGET / HTTP/1.0\r\n\r\n"
            )
            .as_bytes(),
        );
        assert!(tunnel.starts_with("HTTP/1.1 200 Connection established") && tunnel.ends_with("BEHIND-THE-PROXY"));
        assert_eq!(
            *log.lock().unwrap(),
            [
                format!("GET http://named.test:{target}/x HTTP/1.1"),
                format!("CONNECT named.test:{target} HTTP/1.1 +auth")
            ]
        );
    }

    #[test]
    fn a_request_is_read_with_its_body_size() {
        let request = b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        let (head, body) = read_request(&mut &request[..]).unwrap();
        assert!(head.starts_with("post /x http/1.1\r\ncontent-length: 3"), "{head}");
        assert_eq!(body, 3);
    }

    #[test]
    fn the_test_certificates_pass_openssls_strict_checks_for_every_name() {
        let openssl = crate::require!(crate::skip::tool("openssl"));
        let (ca, leaf, _) = test_ca_and_leaf(&["one.test", "two.test"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("leaf.pem"), leaf.pem()).unwrap();
        for name in ["one.test", "two.test"] {
            let out = crate::process::run(
                std::process::Command::new(&openssl)
                    .args(["verify", "-x509_strict", "-purpose", "sslserver", "-verify_hostname", name])
                    .args(["-CAfile", "ca.pem", "leaf.pem"])
                    .current_dir(dir.path()),
                b"",
            );
            assert!(out.status.success(), "{name}: {}{}", crate::stdout(&out), crate::stderr(&out));
        }
    }

    #[test]
    fn a_client_that_trusts_only_the_test_ca_gets_the_answer() {
        let curl = crate::require!(crate::skip::tool("curl"));
        let (port, ca_pem) = https_server("secure.test", |head, _| (vec!["x-test: 1".into()], head.into()));
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        let out = crate::process::run(
            std::process::Command::new(curl)
                .args(["-sS", "-i", "--resolve", &format!("secure.test:{port}:127.0.0.1"), "--cacert"])
                .arg(&ca)
                .arg(format!("https://secure.test:{port}/path")),
            b"",
        );
        let answer = crate::stdout(&out);
        assert!(out.status.success(), "{}", crate::stderr(&out));
        assert!(answer.contains("x-test: 1\r\n") && answer.contains("get /path http/1.1\r\n"), "{answer}");
    }
}
