//! `--shield-secrets`: the guest gets a placeholder instead of each of the
//! flavor's keys; the egress proxy terminates TLS for the flavor's secret
//! hosts with a certificate from a per-instance CA (which the guest trusts)
//! and puts the real key in place of the placeholder in each request head
//! before it goes upstream over a verified TLS connection. The real key
//! stays in agentvm's memory: never in the VM's memory, disk or logs.
//!
//! One request per connection: the head going up and the one coming back
//! both say `Connection: close`, so every request is rewritten.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned};

use crate::egress::{parse_head, AllowList};

/// A PEM file of extra CA certificates the proxy trusts upstream (besides
/// the public web roots). For tests against a local server.
pub const EXTRA_CA_ENV: &str = "AGENTVM_PROXY_CA";
const MAX_HEAD: usize = 64 * 1024;

/// Shielding that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ShieldError {
    #[error("cannot make the instance CA: {0}")]
    Ca(String),
    #[error("cannot read the extra CA file {path} ({EXTRA_CA_ENV}): {why}")]
    ExtraCa { path: String, why: String },
    #[error("--shield-secrets needs --network allow (the proxy is where keys are put in): drop --network {0}")]
    NeedsAllowMode(String),
    #[error("--shield-secrets: flavor {flavor:?} has no secret_hosts, so its keys could never be used; add secret_hosts = [\"api.example.com\"] to [flavors.{flavor}]")]
    NoSecretHosts { flavor: String },
}

/// The guest environment that makes common tools trust the instance CA
/// (Node does not read the system bundle; Python's requests has its own).
pub fn guest_env() -> Vec<(String, String)> {
    vec![
        ("NODE_EXTRA_CA_CERTS".into(), agentvm_proto::spec::EXTRA_CA_PATH.into()),
        ("REQUESTS_CA_BUNDLE".into(), GUEST_BUNDLE.into()),
        ("SSL_CERT_FILE".into(), GUEST_BUNDLE.into()),
    ]
}

/// The guest's system CA bundle, which the instance CA is appended to.
pub const GUEST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A placeholder for one secret: recognisable, unguessable, as long as a
/// typical key so tools that check the format are less likely to balk.
pub fn placeholder() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("agentvm-shielded-{hex}")
}

/// `head` with every placeholder replaced by its secret.
pub fn reveal(head: &str, secrets: &[(String, String)]) -> String {
    secrets.iter().fold(head.to_string(), |h, (placeholder, real)| h.replace(placeholder.as_str(), real))
}

/// `head` (request or response, with its blank line) with its Connection
/// headers replaced by `Connection: close`.
pub fn with_close(head: &str) -> String {
    let mut out = String::new();
    for line in head.trim_end_matches("\r\n").split("\r\n") {
        let name = line.split(':').next().unwrap_or_default().trim();
        if !name.eq_ignore_ascii_case("connection") && !name.eq_ignore_ascii_case("keep-alive") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

/// The per-instance CA and the secrets, shared by the proxy's threads.
pub struct Shield {
    hosts: AllowList,
    secrets: Vec<(String, String)>,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, Arc<ServerConfig>>>,
    upstream: Arc<ClientConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Shield {
    /// A fresh CA for `hosts` (where secrets may go) and `secrets`
    /// (placeholder, real value) pairs.
    pub fn new(hosts: AllowList, secrets: Vec<(String, String)>) -> Result<Shield, ShieldError> {
        let ca_err = |e: &dyn std::fmt::Display| ShieldError::Ca(e.to_string());
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| ca_err(&e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "agentvm instance CA");
        let key = KeyPair::generate().map_err(|e| ca_err(&e))?;
        let cert = params.self_signed(&key).map_err(|e| ca_err(&e))?;
        let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Ok(path) = std::env::var(EXTRA_CA_ENV) {
            use rustls::pki_types::pem::PemObject;
            let extra = |why: String| ShieldError::ExtraCa { path: path.clone(), why };
            for c in CertificateDer::pem_file_iter(&path).map_err(|e| extra(e.to_string()))? {
                roots.add(c.map_err(|e| extra(e.to_string()))?).map_err(|e| extra(e.to_string()))?;
            }
        }
        let mut upstream = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ca_err(&e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        upstream.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Shield {
            hosts,
            secrets,
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            leaves: Mutex::default(),
            upstream: Arc::new(upstream),
        })
    }

    /// The CA certificate (public) the guest must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Whether secrets may go to `host`.
    pub fn covers(&self, host: &str) -> bool {
        self.hosts.allows(host)
    }

    /// A TLS server set-up for `host`, with a leaf signed by the CA.
    fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, String> {
        if let Some(c) = self.leaves.lock().unwrap_or_else(|e| e.into_inner()).get(host) {
            return Ok(c.clone());
        }
        let params = CertificateParams::new(vec![host.to_string()]).map_err(|e| e.to_string())?;
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let leaf = params.signed_by(&key, &self.issuer).map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), self.ca_der.clone()], key)
            .map_err(|e| e.to_string())?;
        // HTTP/1.1 only: its heads are what gets rewritten.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        self.leaves.lock().unwrap_or_else(|e| e.into_inner()).insert(host.to_string(), config.clone());
        Ok(config)
    }

    /// Serves one tunnelled connection to `host` (the client already got
    /// its 200): TLS to the client as `host`, TLS to `upstream`, one request
    /// with its secrets put in, and the response back.
    pub fn intercept(&self, client: UnixStream, upstream: TcpStream, host: &str) -> Result<(), String> {
        let server = ServerConnection::new(self.server_config(host)?).map_err(|e| e.to_string())?;
        let mut guest = StreamOwned::new(server, client);
        let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        let conn = ClientConnection::new(self.upstream.clone(), name).map_err(|e| e.to_string())?;
        let mut up = StreamOwned::new(conn, upstream);

        let (head, mut rest) = read_head(&mut guest).map_err(|e| format!("reading the request: {e}"))?;
        let request = parse_head(head.as_bytes()).and_then(Result::ok).ok_or("malformed request")?;
        let body_len = content_length(&request.headers);
        let chunked = request.headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked"));
        up.write_all(with_close(&reveal(&head, &self.secrets)).as_bytes()).map_err(|e| format!("upstream: {e}"))?;
        if chunked {
            copy_chunked(&mut guest, &mut up, rest).map_err(|e| format!("request body: {e}"))?;
        } else {
            let want = body_len.unwrap_or(0);
            let have = rest.len().min(want);
            up.write_all(&rest[..have]).map_err(|e| format!("request body: {e}"))?;
            rest.clear();
            copy_exact(&mut guest, &mut up, (want - have) as u64).map_err(|e| format!("request body: {e}"))?;
        }
        up.flush().map_err(|e| format!("upstream: {e}"))?;

        let (head, rest) = read_head(&mut up).map_err(|e| format!("reading the response: {e}"))?;
        guest.write_all(with_close(&head).as_bytes()).map_err(|e| e.to_string())?;
        guest.write_all(&rest).map_err(|e| e.to_string())?;
        // The response ends when upstream closes (we asked it to).
        let mut buf = [0u8; 16 * 1024];
        loop {
            match up.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    guest.write_all(&buf[..n]).map_err(|e| e.to_string())?;
                    guest.flush().map_err(|e| e.to_string())?;
                }
                // Servers that close without close_notify end the body too.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(format!("response body: {e}")),
            }
        }
        guest.conn.send_close_notify();
        let _ = guest.flush();
        Ok(())
    }
}

/// Reads up to and including the blank line; returns the head and what came after.
fn read_head(r: &mut impl Read) -> io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            let head = String::from_utf8(buf).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "head is not text"))?;
            return Ok((head, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
        let n = r.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the end of the head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn content_length(headers: &[(String, String)]) -> Option<usize> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).and_then(|(_, v)| v.parse().ok())
}

fn copy_exact(from: &mut impl Read, to: &mut impl Write, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut from.take(n), to)?;
    if copied < n {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "body shorter than its Content-Length"));
    }
    Ok(())
}

/// Copies a chunked body as is, up to and including its last chunk and
/// trailers, starting with the bytes already read (`pending`).
fn copy_chunked(from: &mut impl Read, to: &mut impl Write, mut pending: Vec<u8>) -> io::Result<()> {
    let mut need_more = |pending: &mut Vec<u8>| -> io::Result<()> {
        let mut chunk = [0u8; 8192];
        let n = from.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunked body cut short"));
        }
        pending.extend_from_slice(&chunk[..n]);
        Ok(())
    };
    loop {
        // A size line.
        let line_end = loop {
            if let Some(i) = pending.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            need_more(&mut pending)?;
        };
        let size_text = String::from_utf8_lossy(&pending[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if size == 0 {
            // Trailers until a blank line.
            loop {
                if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                    return to.write_all(&pending[..i + 4]);
                }
                need_more(&mut pending)?;
            }
        }
        let whole = line_end + 2 + size + 2;
        while pending.len() < whole {
            need_more(&mut pending)?;
        }
        to.write_all(&pending[..whole])?;
        pending.drain(..whole);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_unique_and_revealed_only_where_they_are() {
        let (a, b) = (placeholder(), placeholder());
        assert_ne!(a, b);
        assert!(a.starts_with("agentvm-shielded-") && a.len() == 17 + 32);
        let secrets = vec![(a.clone(), "sk-real".to_string())];
        let head = format!("POST /v1?key={a} HTTP/1.1\r\nx-api-key: {a}\r\nAuthorization: Bearer {a}\r\nX-Other: {b}\r\n\r\n");
        let out = reveal(&head, &secrets);
        assert_eq!(out.matches("sk-real").count(), 3);
        assert!(out.contains(&b) && !out.contains(&a));
    }

    #[test]
    fn connection_headers_become_close() {
        let h = "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(with_close(h), "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n");
    }

    #[test]
    fn chunked_bodies_are_copied_to_their_end_only() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\nNEXT".to_vec();
        let (first, second) = body.split_at(7);
        let mut out = Vec::new();
        copy_chunked(&mut &second[..], &mut out, first.to_vec()).unwrap();
        assert_eq!(out, &body[..body.len() - 4]);
        let mut out = Vec::new();
        copy_chunked(&mut &b""[..], &mut out, b"0\r\n\r\n".to_vec()).unwrap();
        assert_eq!(out, b"0\r\n\r\n");
        assert!(copy_chunked(&mut &b"4\r\nWi"[..], &mut Vec::new(), Vec::new()).is_err());
    }

    #[test]
    fn the_ca_signs_leaves_for_the_hosts() {
        let s = Shield::new(AllowList::new(&["api.test".to_string()]).unwrap(), Vec::new()).unwrap();
        assert!(s.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(s.covers("api.test") && !s.covers("other.test"));
        let a = s.server_config("api.test").unwrap();
        assert!(Arc::ptr_eq(&a, &s.server_config("api.test").unwrap()), "leaves are cached");
    }
}
