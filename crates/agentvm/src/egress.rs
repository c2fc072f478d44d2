//! `--network allow`: the guest has no network interface at all, only an
//! HTTP proxy in the launcher (reached over the forwarding channel) that
//! lets through the names on the allow list: plain HTTP by the request's
//! host, HTTPS by the CONNECT host and the TLS SNI, which must agree. Each
//! decision goes to the instance's `net.log`. A tool that ignores the proxy
//! settings has nothing to connect through.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::console_log::{self, RotatingLog};

/// The guest port of the proxy, at `host.agentvm.internal`.
pub const PROXY_PORT: u16 = 3128;
/// Longest request head the proxy reads.
const MAX_HEAD: usize = 64 * 1024;
/// How long a client may take to send its request head or TLS hello.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// `name=address,...`: names the proxy resolves to fixed addresses instead
/// of asking DNS (like curl's --resolve). For tests against loopback.
pub const RESOLVE_ENV: &str = "AGENTVM_PROXY_RESOLVE";

/// An allow list entry that cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("allowed name {0:?} is not a host name: use e.g. api.example.com or *.example.com")]
    BadPattern(String),
    #[error("--allow needs --network allow (the allow list has no effect on an open or absent network)")]
    AllowWithoutAllowMode,
    #[error("published port {0} is UDP: with --network allow only TCP ports can be published")]
    UdpPublished(String),
    #[error("host port {PROXY_PORT} is the egress proxy's port in the guest: open another one")]
    ProxyPortTaken,
}

/// Host names the guest may reach: `example.com` exactly, `*.example.com`
/// any name below it (not example.com itself).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<String>);

impl AllowList {
    /// Checks and lower-cases the patterns; duplicates are merged.
    pub fn new(patterns: &[String]) -> Result<AllowList, EgressError> {
        let mut out: Vec<String> = Vec::new();
        for p in patterns {
            let lower = p.trim().to_ascii_lowercase();
            let name = lower.strip_prefix("*.").unwrap_or(&lower);
            if !is_host_name(name) {
                return Err(EgressError::BadPattern(p.clone()));
            }
            if !out.contains(&lower) {
                out.push(lower);
            }
        }
        Ok(AllowList(out))
    }

    pub fn patterns(&self) -> &[String] {
        &self.0
    }

    /// Whether `host` (a name, any case, maybe with a trailing dot) is allowed.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.0.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(suffix) && host[..host.len() - suffix.len()].ends_with('.'),
            None => *p == host,
        })
    }
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// The guest environment that points every proxy-aware tool at the proxy.
pub fn guest_env() -> Vec<(String, String)> {
    let url = format!("http://{}:{PROXY_PORT}", agentvm_proto::forward::HOST_NAME);
    let mut env = Vec::new();
    for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        env.push((name.to_string(), url.clone()));
    }
    for name in ["NO_PROXY", "no_proxy"] {
        env.push((name.to_string(), format!("localhost,127.0.0.1,::1,{}", agentvm_proto::forward::HOST_NAME)));
    }
    env
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    /// Bytes of the head, including the blank line.
    pub len: usize,
}

/// Parses a request head from `buf`; `None` until the blank line is there.
pub fn parse_head(buf: &[u8]) -> Option<Result<Head, String>> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = match std::str::from_utf8(&buf[..end]) {
        Ok(t) => t,
        Err(_) => return Some(Err("the request head is not text".into())),
    };
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(target), Some(version)) = (first.next(), first.next(), first.next()) else {
        return Some(Err("malformed request line".into()));
    };
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect();
    Some(Ok(Head { method: method.into(), target: target.into(), version: version.into(), headers, len: end }))
}

/// Where a request wants to go: host, port, and for plain HTTP the path.
#[derive(Debug, PartialEq, Eq)]
pub enum Destination {
    Tunnel { host: String, port: u16 },
    Http { host: String, port: u16, path: String },
}

/// The destination of a proxy request, or why it is not one.
pub fn destination(head: &Head) -> Result<Destination, String> {
    if head.method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = split_host_port(&head.target, None)?;
        return Ok(Destination::Tunnel { host, port });
    }
    let rest = head
        .target
        .strip_prefix("http://")
        .ok_or_else(|| format!("{} is not a proxy request (https goes through CONNECT)", head.target))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = split_host_port(authority, Some(80))?;
    Ok(Destination::Http { host, port, path: path.to_string() })
}

fn split_host_port(authority: &str, default: Option<u16>) -> Result<(String, u16), String> {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse::<u16>().map_err(|_| format!("bad port in {authority:?}"))?)
        }
        _ => (authority, default.ok_or_else(|| format!("{authority:?} has no port"))?),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{authority:?} has no host"));
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// The server name (SNI) of a TLS ClientHello at the start of `buf`:
/// `Some(Some(name))`, `Some(None)` when it is a hello without one, `None`
/// when `buf` is not (or not yet) a whole ClientHello.
pub fn client_hello_sni(buf: &[u8]) -> Option<Option<String>> {
    // Record: type 22 (handshake), version, length; then handshake type 1.
    if buf.len() < 9 || buf[0] != 22 || buf[5] != 1 {
        return None;
    }
    let record_len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    let body = buf.get(5..5 + record_len)?;
    let mut r = Reader(body);
    r.skip(4)?; // handshake type and length
    r.skip(2 + 32)?; // version, random
    let session = r.u8()? as usize;
    r.skip(session)?;
    let suites = r.u16()? as usize;
    r.skip(suites)?;
    let compression = r.u8()? as usize;
    r.skip(compression)?;
    if r.0.is_empty() {
        return Some(None);
    }
    let ext_len = r.u16()? as usize;
    let mut exts = Reader(r.take(ext_len)?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let len = exts.u16()? as usize;
        let data = exts.take(len)?;
        if kind == 0 {
            // server_name: list length, then (type 0, length, name).
            let mut d = Reader(data);
            d.skip(2)?;
            if d.u8()? != 0 {
                return Some(None);
            }
            let n = d.u16()? as usize;
            return Some(Some(String::from_utf8_lossy(d.take(n)?).to_ascii_lowercase()));
        }
    }
    Some(None)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = b;
        Some(a)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

/// The running proxy's shared state.
#[derive(Clone)]
pub struct Proxy {
    allow: Arc<AllowList>,
    shield: Option<Arc<crate::shield::Shield>>,
    log: Arc<Mutex<Option<RotatingLog>>>,
    resolve: Arc<Vec<(String, std::net::IpAddr)>>,
}

/// Parses [`RESOLVE_ENV`]'s `name=address,...`; bad entries are skipped.
pub fn parse_resolve(s: &str) -> Vec<(String, std::net::IpAddr)> {
    s.split(',')
        .filter_map(|e| e.split_once('='))
        .filter_map(|(n, a)| Some((n.trim().to_ascii_lowercase(), a.trim().parse().ok()?)))
        .collect()
}

impl Proxy {
    /// A proxy for `allow`, logging to `log_path` (rotated like the console
    /// log: the guest decides how many lines there are); with `shield`, it
    /// puts secrets into the requests to the shield's hosts.
    pub fn new(allow: AllowList, shield: Option<Arc<crate::shield::Shield>>, log_path: &Path) -> Proxy {
        let log = RotatingLog::create(log_path, console_log::ROTATE_BYTES).ok();
        let resolve = std::env::var(RESOLVE_ENV).map(|s| parse_resolve(&s)).unwrap_or_default();
        Proxy { allow: Arc::new(allow), shield, log: Arc::new(Mutex::new(log)), resolve: Arc::new(resolve) }
    }

    /// A new client connection: the proxy serves it on a thread of its own
    /// and the returned end goes to the forwarding channel.
    pub fn connect(&self) -> io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        let me = self.clone();
        std::thread::spawn(move || me.serve(ours));
        Ok(theirs)
    }

    fn note(&self, line: &str) {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if let Some(log) = self.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = log.write(format!("{secs} {line}\n").as_bytes());
        }
    }

    fn serve(&self, mut client: UnixStream) {
        let _ = client.set_read_timeout(Some(CLIENT_TIMEOUT));
        let mut buf = Vec::new();
        let head = loop {
            let mut chunk = [0u8; 4096];
            match client.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            match parse_head(&buf) {
                Some(Ok(h)) => break h,
                Some(Err(why)) => return self.refuse(&mut client, 400, "-", &why),
                None if buf.len() > MAX_HEAD => return self.refuse(&mut client, 400, "-", "request head too long"),
                None => {}
            }
        };
        let dest = match destination(&head) {
            Ok(d) => d,
            Err(why) => return self.refuse(&mut client, 400, &head.target, &why),
        };
        let (host, port) = match &dest {
            Destination::Tunnel { host, port } | Destination::Http { host, port, .. } => (host.clone(), *port),
        };
        let what = format!("{} {host}:{port}", head.method);
        if !self.allow.allows(&host) {
            return self.refuse(
                &mut client,
                403,
                &what,
                &format!("egress to {host} is not allowed: allow it with --allow {host} (or allow = [\"{host}\"] in .agentvm.toml)"),
            );
        }
        let upstream = match self.dial(&host, port) {
            Ok(u) => u,
            Err(e) => return self.refuse(&mut client, 502, &what, &format!("cannot connect to {host}:{port}: {e}")),
        };
        let rest = buf[head.len..].to_vec();
        match dest {
            Destination::Tunnel { .. } if self.shield.as_ref().is_some_and(|s| s.covers(&host)) => {
                if client.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").is_err() {
                    return;
                }
                let shield = self.shield.as_ref().expect("checked above");
                match shield.intercept(client, upstream, &host) {
                    Ok(()) => self.note(&format!("ALLOW {what} (secrets put in)")),
                    Err(why) => self.note(&format!("FAIL {what} (secrets put in): {why}")),
                }
            }
            Destination::Tunnel { .. } => self.tunnel(client, upstream, &host, &what, rest),
            Destination::Http { path, .. } => {
                self.note(&format!("ALLOW {what}"));
                let mut up = upstream;
                let mut out = format!("{} {path} {}\r\n", head.method, head.version);
                for (k, v) in &head.headers {
                    let k_lower = k.to_ascii_lowercase();
                    if !["proxy-connection", "proxy-authorization", "connection"].contains(&k_lower.as_str()) {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                }
                // One request per upstream connection: the next one comes
                // through the proxy again and is checked again.
                out.push_str("Connection: close\r\n\r\n");
                if up.write_all(out.as_bytes()).and_then(|_| up.write_all(&rest)).is_ok() {
                    splice(client, up);
                }
            }
        }
    }

    fn tunnel(&self, mut client: UnixStream, upstream: TcpStream, host: &str, what: &str, mut first: Vec<u8>) {
        if client.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").is_err() {
            return;
        }
        // The client's first bytes: a TLS hello must name the CONNECT host.
        loop {
            let settled = client_hello_sni(&first).is_some() || (!first.is_empty() && !looks_like_tls(&first));
            if settled || first.len() > 16 * 1024 {
                break;
            }
            let mut chunk = [0u8; 4096];
            match client.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => first.extend_from_slice(&chunk[..n]),
            }
        }
        if let Some(Some(sni)) = client_hello_sni(&first) {
            if sni != host {
                self.note(&format!("DENY {what} (the TLS hello names {sni})"));
                return;
            }
        }
        self.note(&format!("ALLOW {what}"));
        let mut up = upstream;
        if up.write_all(&first).is_ok() {
            splice(client, up);
        }
    }

    fn dial(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let addrs: Vec<SocketAddr> = match self.resolve.iter().find(|(n, _)| n == host) {
            Some((_, ip)) => vec![SocketAddr::new(*ip, port)],
            None => (host, port).to_socket_addrs()?.collect(),
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn refuse(&self, client: &mut UnixStream, status: u16, what: &str, why: &str) {
        self.note(&format!("DENY {what} ({why})"));
        let reason = match status {
            403 => "Forbidden",
            502 => "Bad Gateway",
            _ => "Bad Request",
        };
        let body = format!("agentvm: {why}\n");
        let _ = write!(
            client,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

fn looks_like_tls(b: &[u8]) -> bool {
    b.first() == Some(&22)
}

/// Copies both ways until each side ends.
fn splice(client: UnixStream, upstream: TcpStream) {
    let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else { return };
    let _ = client.set_read_timeout(None);
    let t = std::thread::spawn(move || {
        let _ = io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(Shutdown::Write);
    });
    let (mut c, mut u) = (client, upstream);
    let _ = io::copy(&mut u, &mut c);
    let _ = c.shutdown(Shutdown::Write);
    let _ = t.join();
}

/// Where an instance's connection log lives.
pub fn log_path(instance_dir: &Path) -> PathBuf {
    instance_dir.join("net.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_log_of_a_guest_opening_connection_after_connection_stays_under_the_cap() {
        let d = tempfile::tempdir().unwrap();
        let path = log_path(d.path());
        let proxy = Proxy::new(AllowList::new(&[]).unwrap(), None, &path);
        let line = format!("denied CONNECT {}.example.com:443", "x".repeat(1000));
        for _ in 0..10_000 {
            proxy.note(&line);
        }
        let rotated = console_log::rotated(&path);
        for p in [&path, &rotated] {
            let len = std::fs::metadata(p).unwrap().len();
            assert!(len <= console_log::ROTATE_BYTES + 1100, "{}: {len} bytes", p.display());
        }
        assert!(console_log::tail(&path, 2000).ends_with(format!("{line}\n").as_bytes()));
    }

    fn list(p: &[&str]) -> AllowList {
        AllowList::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn exact_names_and_wildcards_match_as_documented() {
        let a = list(&["API.example.com", "*.npmjs.org"]);
        assert!(a.allows("api.example.com") && a.allows("Api.Example.COM."));
        assert!(!a.allows("example.com") && !a.allows("evilapi.example.com"));
        assert!(a.allows("registry.npmjs.org") && a.allows("a.b.npmjs.org"));
        assert!(!a.allows("npmjs.org") && !a.allows("evilnpmjs.org"));
        for bad in ["", "*.", "a b", "http://x.com", "x.com/", "-x.com", "*"] {
            assert!(AllowList::new(&[bad.to_string()]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn heads_parse_once_complete() {
        assert!(parse_head(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n").is_none());
        let h = parse_head(b"CONNECT a.com:443 HTTP/1.1\r\nHost: a.com:443\r\n\r\nxyz").unwrap().unwrap();
        assert_eq!((h.method.as_str(), h.target.as_str(), h.len), ("CONNECT", "a.com:443", 47));
        assert_eq!(destination(&h).unwrap(), Destination::Tunnel { host: "a.com".into(), port: 443 });
        let h = parse_head(b"GET http://A.com:8080/x?y HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(destination(&h).unwrap(), Destination::Http { host: "a.com".into(), port: 8080, path: "/x?y".into() });
        let h = parse_head(b"GET http://user@b.org HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert_eq!(destination(&h).unwrap(), Destination::Http { host: "b.org".into(), port: 80, path: "/".into() });
        let h = parse_head(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").unwrap().unwrap();
        assert!(destination(&h).is_err(), "origin-form is not a proxy request");
        let h = parse_head(b"CONNECT a.com HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert!(destination(&h).is_err(), "CONNECT needs a port");
    }

    /// A minimal ClientHello with the server name `name`.
    fn hello(name: &str) -> Vec<u8> {
        let mut sni = vec![0u8];
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name.as_bytes());
        let mut ext = 0u16.to_be_bytes().to_vec();
        ext.extend_from_slice(&((sni.len() + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        ext.extend_from_slice(&sni);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0u8; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1, 0];
        hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn sni_is_read_from_a_client_hello() {
        let h = hello("API.example.com");
        assert_eq!(client_hello_sni(&h), Some(Some("api.example.com".into())));
        assert_eq!(client_hello_sni(&h[..h.len() - 3]), None, "incomplete");
        assert_eq!(client_hello_sni(b"GET / HTTP/1.1\r\n\r\n"), None);
    }

    #[test]
    fn resolve_overrides_parse() {
        let r = parse_resolve("a.test=127.0.0.1, B.test = ::1,bad,c=notip");
        assert_eq!(r, vec![("a.test".into(), "127.0.0.1".parse().unwrap()), ("b.test".into(), "::1".parse().unwrap())]);
    }
}
