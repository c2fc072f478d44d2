//! `--network allow`: the guest has no network interface at all, only an
//! HTTP proxy in the launcher (reached over the forwarding channel) that
//! lets through the names on the allow list: plain HTTP by the request's
//! host (one request per connection, its Host header pinned to it), HTTPS
//! by the CONNECT host and the TLS hello's server name, which must agree.
//! Tunnels carry TLS only. The proxy connects to public addresses only: the
//! host's loopback and private networks stay closed whatever a name
//! resolves to. Each decision goes to the instance's `net.log`, with the
//! guest's text escaped. A tool that ignores the proxy settings has nothing
//! to connect through.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::instance::console_log::{self, RotatingLog};
use crate::net::dns::{DnsError, Resolver};
use crate::net::host_proxy::{HostProxy, HostProxyError, ProxyUrl};
use crate::net::http::{self, authority, BodyKind, HttpError, Peer, RequestHead, BODY_IDLE, HEAD_DEADLINE};
use crate::net::shield::Shield;
// The settings and the launch name these through the proxy's module.
pub use crate::net::allow::{AllowList, EgressError, PROXY_PORT};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Proxy connections served at once; more are refused. As many as the
/// forwarding channel carries, but counted until each one's thread ends.
const MAX_CONNECTIONS: usize = agentvm_proto::forward::MAX_CONNECTIONS;
/// `name=address,...`: names the proxy resolves to fixed addresses instead
/// of asking DNS (like curl's --resolve), for tests against loopback. Only
/// the user sets agentvm's environment, so these addresses are trusted:
/// they skip the check that keeps the proxy off loopback and private
/// addresses.
pub const RESOLVE_ENV: &str = "AGENTVM_PROXY_RESOLVE";

/// Why the proxy refuses a connection or cannot serve it. Each goes to the
/// instance's `net.log`; a refused client also gets [`ProxyError::status`].
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request's target is not one the proxy serves (the guest's own
    /// text; no error lies under it).
    #[error("{0}")]
    BadTarget(String),
    #[error("reading the request: {0}")]
    ReadRequest(#[source] HttpError),
    #[error("not a TLS hello: {0}")]
    HelloRead(#[source] io::Error),
    #[error("not a TLS hello (the proxy tunnels only TLS): {0}")]
    NotTls(#[source] rustls::Error),
    #[error("the TLS hello names no server (SNI): the proxy tunnels only TLS that names the CONNECT host")]
    NoServerName,
    #[error("the TLS hello is too long")]
    HelloTooLong,
    #[error("closed before its TLS hello was whole")]
    HelloCut,
    #[error("no whole TLS hello within {}s", HEAD_DEADLINE.as_secs())]
    HelloTimeout,
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("egress to {host} is not allowed: {}", not_allowed_hint(.host))]
    NotAllowed { host: String },
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: DnsError },
    #[error("{host} has no address")]
    NoAddress { host: String },
    #[error(
        "{host} resolves to {ip}, {}: the proxy connects only to public addresses \
         (to reach a service on this host's loopback, open its port with --host-port PORT)",
        non_public(*.ip).unwrap_or("not public")
    )]
    NotPublic { host: String, ip: IpAddr },
    #[error("cannot connect to {host}:{port}: {source}")]
    Connect { host: String, port: u16, source: io::Error },
    #[error(transparent)]
    HostProxy(#[from] HostProxyError),
}

impl ProxyError {
    /// The HTTP status a refused client gets.
    pub fn status(&self) -> u16 {
        match self {
            ProxyError::ReadRequest(HttpError::Timeout(_)) => 408,
            ProxyError::Http(HttpError::BodyTooLarge(_)) => 413,
            ProxyError::NotPublic { .. } | ProxyError::NotAllowed { .. } => 403,
            ProxyError::Resolve { .. }
            | ProxyError::NoAddress { .. }
            | ProxyError::Connect { .. }
            | ProxyError::HostProxy(_) => 502,
            _ => 400,
        }
    }
}

/// Why the proxy does not connect to `ip`, or `None` for a public address.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(match (a, b) {
        (0, _) => "an unspecified (0.0.0.0/8) address",
        (127, _) => "a loopback address",
        (10, _) | (192, 168) => "a private address",
        (172, 16..=31) => "a private address",
        (100, 64..=127) => "a shared (carrier-grade NAT) address",
        (169, 254) => "a link-local address",
        (224..=239, _) => "a multicast address",
        (240..=255, _) => "a reserved or broadcast address",
        _ => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        [0, 0, 0, 0, 0, 0, 0, 0] => Some("an unspecified address"),
        [0, 0, 0, 0, 0, 0, 0, 1] => Some("a loopback address"),
        // IPv4-mapped (::ffff:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d): the IPv4 address decides.
        [0, 0, 0, 0, 0, 0xffff, hi, lo] | [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => non_public_v4(embedded_v4(hi, lo)),
        // 6to4 (2002:a.b.c.d::/48): the same.
        [0x2002, hi, lo, ..] => non_public_v4(embedded_v4(hi, lo)),
        [0, 0, 0, 0, 0, 0, _, _] => Some("a reserved (IPv4-compatible) address"),
        [x, ..] if x & 0xfe00 == 0xfc00 => Some("a private (unique local) address"),
        [x, ..] if x & 0xffc0 == 0xfe80 => Some("a link-local address"),
        [x, ..] if x & 0xffc0 == 0xfec0 => Some("a private (site-local) address"),
        [x, ..] if x & 0xff00 == 0xff00 => Some("a multicast address"),
        [0x64, 0xff9b, 1, ..] => Some("a private (local NAT64) address"),
        _ => None,
    }
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

/// Where a request wants to go: host, port, and for plain HTTP the path.
#[derive(Debug, PartialEq, Eq)]
pub enum Destination {
    Tunnel { host: String, port: u16 },
    Http { host: String, port: u16, path: String },
}

impl Destination {
    fn is_tunnel(&self) -> bool {
        matches!(self, Destination::Tunnel { .. })
    }

    fn host_port(&self) -> (&str, u16) {
        match self {
            Destination::Tunnel { host, port } | Destination::Http { host, port, .. } => (host, *port),
        }
    }
}

/// The destination of a proxy request, or why it is not one.
pub fn destination(head: &RequestHead) -> Result<Destination, ProxyError> {
    if head.method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = split_host_port(&head.target, None)?;
        return Ok(Destination::Tunnel { host, port });
    }
    let rest = head.target.strip_prefix("http://").ok_or_else(|| {
        ProxyError::BadTarget(format!("{} is not a proxy request (https goes through CONNECT)", head.target))
    })?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    let (host, port) = split_host_port(authority, Some(80))?;
    Ok(Destination::Http { host, port, path })
}

/// How to allow `host`, if it can be allowed.
fn not_allowed_hint(host: &str) -> String {
    match AllowList::new(&[host.to_string()]) {
        Ok(_) => format!("allow it with --allow {host} (or allow = [\"{host}\"] in .agentvm.toml)"),
        Err(_) => "the proxy reaches only host names on the allow list, never an address or this host itself".into(),
    }
}

/// `host[:port]` or `[v6]:port`, without user info; the host lower-cased.
fn split_host_port(authority: &str, default: Option<u16>) -> Result<(String, u16), ProxyError> {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let bad = |why: &str| ProxyError::BadTarget(format!("{authority:?} {why}"));
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("is not host:port"))?;
            (host, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad("has a bad port"))?,
        None => default.ok_or_else(|| bad("has no port"))?,
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// Reads the client's TLS hello (however many records it spans) within
/// `deadline` and returns the server name it asks for. Everything read
/// stays buffered in `client`, to be passed on.
pub fn read_client_hello<S>(client: &mut Peer<S>, deadline: Instant) -> Result<String, ProxyError>
where
    S: std::io::Read + http::ReadTimeout,
{
    let mut acceptor = rustls::server::Acceptor::default();
    let mut fed = 0;
    loop {
        while fed < client.buffered().len() {
            let mut rest = &client.buffered()[fed..];
            let before = rest.len();
            acceptor.read_tls(&mut rest).map_err(ProxyError::HelloRead)?;
            fed += before - rest.len();
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    return accepted.client_hello().server_name().map(str::to_string).ok_or(ProxyError::NoServerName)
                }
                Ok(None) => {}
                Err((e, _)) => return Err(ProxyError::NotTls(e)),
            }
        }
        if client.buffered().len() > http::MAX_HEAD {
            return Err(ProxyError::HelloTooLong);
        }
        match client.read_more(Some(deadline)) {
            Ok(0) => return Err(ProxyError::HelloCut),
            Ok(_) => {}
            Err(HttpError::Timeout(_)) => return Err(ProxyError::HelloTimeout),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The running proxy's shared state.
#[derive(Clone)]
pub struct Proxy {
    allow: Arc<AllowList>,
    shield: Option<Arc<Shield>>,
    log: Arc<Mutex<Option<RotatingLog>>>,
    resolve: Arc<Vec<(String, IpAddr)>>,
    /// The host's proxy, which upstream connections go through.
    host_proxy: Option<Arc<HostProxy>>,
    active: Arc<AtomicUsize>,
}

/// The connection to a destination: straight to it, or to the host's
/// proxy (`via`) for a plain HTTP request that names the whole URL. A
/// tunnel through the host's proxy is straight to its end once set up.
struct Upstream {
    stream: TcpStream,
    via: Option<ProxyUrl>,
}

/// Parses [`RESOLVE_ENV`]'s `name=address,...`; bad entries are skipped.
pub fn parse_resolve(s: &str) -> Vec<(String, IpAddr)> {
    s.split(',')
        .filter_map(|e| e.split_once('='))
        .filter_map(|(n, a)| Some((n.trim().to_ascii_lowercase(), a.trim().parse().ok()?)))
        .collect()
}

/// Counts a connection as open until it is dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Proxy {
    /// A proxy for `allow`, logging to `log_path` (rotated like the console
    /// log: the guest decides how many lines there are); with `shield`, it
    /// puts secrets into the requests to the shield's hosts.
    pub fn new(allow: AllowList, shield: Option<Arc<Shield>>, log_path: &Path) -> Proxy {
        let log = RotatingLog::create(log_path, console_log::ROTATE_BYTES).ok();
        let resolve = std::env::var(RESOLVE_ENV).map(|s| parse_resolve(&s)).unwrap_or_default();
        Proxy {
            allow: Arc::new(allow),
            shield,
            log: Arc::new(Mutex::new(log)),
            resolve: Arc::new(resolve),
            host_proxy: None,
            active: Arc::default(),
        }
    }

    /// Connects upstream through `host_proxy` (the host's HTTP proxy), for
    /// the targets its NO_PROXY does not name.
    pub fn through(mut self, host_proxy: Option<HostProxy>) -> Proxy {
        self.host_proxy = host_proxy.map(Arc::new);
        self
    }

    /// A new client connection: the proxy serves it on a thread of its own
    /// and the returned end goes to the forwarding channel. Refused when
    /// [`MAX_CONNECTIONS`] are open.
    pub fn connect(&self) -> io::Result<UnixStream> {
        let open = Open(self.active.clone());
        if self.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            self.note(&format!("DENY - (more than {MAX_CONNECTIONS} proxy connections at once)"));
            return Err(io::Error::other("too many proxy connections"));
        }
        let (ours, theirs) = UnixStream::pair()?;
        let me = self.clone();
        std::thread::spawn(move || {
            let _open = open;
            me.serve(ours)
        });
        Ok(theirs)
    }

    fn note(&self, line: &str) {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if let Some(log) = self.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = log.write(format!("{secs} {}\n", crate::escape::log_line(line)).as_bytes());
        }
    }

    fn serve(&self, client: UnixStream) {
        let mut client = Peer::new(client);
        let head = match client.read_head(http::parse_request, Some(Instant::now() + HEAD_DEADLINE)) {
            Ok(h) => h,
            Err(HttpError::ClosedEarly) => return,
            Err(e) => return self.refuse(&mut client.stream, "-", &ProxyError::ReadRequest(e)),
        };
        let dest = match destination(&head) {
            Ok(d) => d,
            Err(e) => return self.refuse(&mut client.stream, &head.target, &e),
        };
        let (host, port) = dest.host_port();
        let what = format!("{} {host}:{port}", head.method);
        if !self.allow.allows(host) {
            return self.refuse(&mut client.stream, &what, &ProxyError::NotAllowed { host: host.to_string() });
        }
        let Upstream { stream: upstream, via } = match self.open(&dest) {
            Ok(u) => u,
            Err(e) => return self.refuse(&mut client.stream, &what, &e),
        };
        let what = match self.host_proxy.as_ref().and_then(|h| h.for_target(dest.is_tunnel(), host, port)) {
            Some(p) => format!("{what} via {p}"),
            None => what,
        };
        match &dest {
            Destination::Tunnel { .. } if self.shield.as_ref().is_some_and(|s| s.covers(host)) => {
                if client.stream.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").is_err() {
                    return;
                }
                let shield = self.shield.as_ref().expect("checked above");
                match shield.intercept(client, upstream, host, port) {
                    Ok(()) => self.note(&format!("ALLOW {what} (secrets put in)")),
                    Err(why) => self.note(&format!("FAIL {what} (secrets put in): {why}")),
                }
            }
            Destination::Tunnel { .. } => self.tunnel(client, upstream, host, &what),
            Destination::Http { path, .. } => {
                self.forward(client, &head, Upstream { stream: upstream, via }, (host, port, path), &what)
            }
        }
    }

    /// A CONNECT tunnel: the client's TLS hello must name `host`.
    fn tunnel(&self, mut client: Peer<UnixStream>, mut upstream: TcpStream, host: &str, what: &str) {
        if client.stream.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").is_err() {
            return;
        }
        match read_client_hello(&mut client, Instant::now() + HEAD_DEADLINE) {
            Err(why) => return self.note(&format!("DENY {what} ({why})")),
            Ok(sni) if !sni.trim_end_matches('.').eq_ignore_ascii_case(host.trim_end_matches('.')) => {
                return self.note(&format!("DENY {what} (the TLS hello names {sni})"));
            }
            Ok(_) => self.note(&format!("ALLOW {what}")),
        }
        if upstream.write_all(client.buffered()).is_ok() {
            splice(client.stream, upstream);
        }
    }

    /// One plain HTTP request, sent on with its Host pinned to the checked
    /// host, and its response; then the connection ends. A request the
    /// client sent after it is not sent anywhere: it is logged as refused.
    fn forward(
        &self,
        mut client: Peer<UnixStream>,
        head: &RequestHead,
        upstream: Upstream,
        to: (&str, u16, &str),
        what: &str,
    ) {
        let (host, port, path) = to;
        let kind = match http::request_body(&head.headers) {
            Ok(BodyKind::Length(n)) if n > http::MAX_REQUEST_BODY => {
                return self.refuse(&mut client.stream, what, &HttpError::BodyTooLarge(http::MAX_REQUEST_BODY).into())
            }
            Ok(k) => k,
            Err(e) => return self.refuse(&mut client.stream, what, &e.into()),
        };
        self.note(&format!("ALLOW {what}"));
        let mut out = match &upstream.via {
            Some(proxy) => proxy.request_line(&head.method, host, port, path),
            None => format!("{} {path} HTTP/1.1\r\n", head.method).into_bytes(),
        };
        http::put_header(&mut out, "Host", authority(host, port, 80).as_bytes());
        for h in head.headers.iter().filter(|h| !http::is_hop_header(h) && !h.is("host")) {
            http::put_header(&mut out, &h.name, &h.value);
        }
        http::put_framing(&mut out, kind);
        out.extend_from_slice(b"Connection: close\r\n\r\n");
        if http::expects_continue(head) && client.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return;
        }
        let mut up = upstream.stream;
        let _ = client.stream.set_read_timeout(Some(BODY_IDLE));
        let sent = up
            .write_all(&out)
            .map_err(HttpError::from)
            .and_then(|()| http::copy_body(&mut client, &mut up, kind, Some(http::MAX_REQUEST_BODY), &[]));
        if let Err(e) = sent {
            return self.note(&format!("FAIL {what}: sending the request: {e}"));
        }
        let via = upstream.via.as_ref().map(|p| (p, format!("{} {host}:{port}", head.method)));
        match relay_response(Peer::new(up), &head.method, &mut client.stream, via) {
            Ok(()) => {}
            Err(e @ ProxyError::HostProxy(_)) => return self.refuse(&mut client.stream, what, &e),
            Err(e) => self.note(&format!("FAIL {what}: relaying the response: {e}")),
        }
        // The client sees the end at once; what it sent after is only logged.
        let _ = client.stream.shutdown(Shutdown::Write);
        self.note_pipelined(&mut client);
    }

    /// Logs a request the client sent after the one served, which goes nowhere.
    fn note_pipelined(&self, client: &mut Peer<UnixStream>) {
        if client.buffered().is_empty() {
            let _ = client.read_more(Some(Instant::now() + Duration::from_millis(200)));
        }
        if client.buffered().is_empty() {
            return;
        }
        let what = match http::parse_request(client.buffered()) {
            Ok(Some((h, _))) => match destination(&h) {
                Ok(d) => format!("{} {}:{}", h.method, d.host_port().0, d.host_port().1),
                Err(_) => format!("{} {}", h.method, h.target),
            },
            _ => "-".to_string(),
        };
        self.note(&format!(
            "DENY {what} (a second request on one connection: the proxy takes one request per connection)"
        ));
    }

    /// The connection for `dest`: through the host's proxy unless there is
    /// none or its NO_PROXY names the target (the host's proxy then
    /// resolves the name and dials), else straight to it ([`Proxy::dial`]).
    fn open(&self, dest: &Destination) -> Result<Upstream, ProxyError> {
        let (host, port) = dest.host_port();
        let Some(proxy) = self.host_proxy.as_ref().and_then(|h| h.for_target(dest.is_tunnel(), host, port)) else {
            return Ok(Upstream { stream: self.dial(host, port)?, via: None });
        };
        let resolver = Resolver::system();
        Ok(match dest {
            Destination::Tunnel { .. } => Upstream { stream: proxy.tunnel(&resolver, host, port)?, via: None },
            Destination::Http { .. } => Upstream { stream: proxy.connect(&resolver)?, via: Some(proxy.clone()) },
        })
    }

    /// Resolves `host` (with agentvm's own resolver: /etc/hosts, then
    /// resolv.conf's name servers) and connects to the first address that
    /// answers, never to a loopback, private or otherwise non-public one
    /// (checked on the addresses actually dialled, so DNS rebinding gains
    /// nothing).
    fn dial(&self, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
        let addrs: Vec<SocketAddr> = match self.resolve.iter().find(|(n, _)| n == host) {
            Some((_, ip)) => vec![SocketAddr::new(*ip, port)],
            None => {
                let all: Vec<SocketAddr> = Resolver::system()
                    .lookup(host)
                    .map_err(|source| ProxyError::Resolve { host: host.to_string(), source })?
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect();
                let public: Vec<SocketAddr> = all.iter().copied().filter(|a| non_public(a.ip()).is_none()).collect();
                if public.is_empty() {
                    return Err(match all.first() {
                        Some(a) => ProxyError::NotPublic { host: host.to_string(), ip: a.ip() },
                        None => ProxyError::NoAddress { host: host.to_string() },
                    });
                }
                public
            }
        };
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(source) => ProxyError::Connect { host: host.to_string(), port, source },
            None => ProxyError::NoAddress { host: host.to_string() },
        })
    }

    /// Logs the refusal of `what` and answers the client with its status.
    fn refuse(&self, client: &mut UnixStream, what: &str, why: &ProxyError) {
        self.note(&format!("DENY {what} ({why})"));
        http::write_refusal(client, why.status(), &why.to_string());
    }
}

/// Copies the response to a `method` request: its head with `Connection:
/// close`, then its body, to its end (a server may keep the connection
/// open although it was asked to close it).
///
/// Through the host's proxy (`via`, with what was asked of it), its asking
/// for credentials (407) is its refusal, not the server's answer.
fn relay_response(
    mut up: Peer<TcpStream>,
    method: &str,
    client: &mut UnixStream,
    via: Option<(&ProxyUrl, String)>,
) -> Result<(), ProxyError> {
    let head = loop {
        let head = up.read_head(http::parse_response, None)?;
        // Interim responses (the request's Expect was answered here).
        if !(100..200).contains(&head.code) || head.code == 101 {
            break head;
        }
    };
    if let Some((proxy, what)) = via.filter(|_| head.code == 407) {
        return Err(proxy.refused(&what, head.code, &head.reason).into());
    }
    let kind = http::response_body(&head, method)?;
    client.write_all(&http::response_head_to_pass_on(&head, kind)).map_err(HttpError::from)?;
    http::copy_body(&mut up, client, kind, None, &[])?;
    Ok(())
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
    use crate::net::host_proxy::tests::company_proxy;
    use std::io::Read;
    use std::net::TcpListener;

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

    #[test]
    fn only_public_addresses_are_dialled() {
        let refused = [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "224.0.0.1",
            "239.1.1.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
        ];
        for a in refused {
            assert!(non_public(a.parse().unwrap()).is_some(), "{a} counts as public");
        }
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2002:808:808::1",
        ] {
            assert_eq!(non_public(a.parse().unwrap()), None, "{a}");
        }
    }

    fn proxy() -> (Proxy, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Proxy::new(AllowList::default(), None, &log_path(dir.path()));
        p.resolve = Arc::new(Vec::new());
        (p, dir)
    }

    /// A proxy allowing `allowed.test` and `direct.test`, through the host
    /// proxy at `port` (with credentials for HTTPS) except for
    /// `direct.test`, which the test override maps to loopback.
    fn chained_proxy(port: u16) -> (Proxy, tempfile::TempDir) {
        let (p, dir) = proxy();
        let allow = AllowList::new(&["allowed.test".into(), "direct.test".into()]).unwrap();
        let vars = [
            ("HTTPS_PROXY", format!("http://me:pw@127.0.0.1:{port}")),
            ("HTTP_PROXY", format!("http://127.0.0.1:{port}")),
            ("NO_PROXY", "direct.test".to_string()),
        ];
        let host_proxy = HostProxy::from_env(&|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())).unwrap();
        let mut p = Proxy { allow: Arc::new(allow), ..p }.through(host_proxy);
        p.resolve = Arc::new(parse_resolve("direct.test=127.0.0.1"));
        (p, dir)
    }

    /// What the guest gets back for `request` (and `then`, sent once the
    /// proxy answered).
    fn exchange(p: &Proxy, request: &[u8], then: &[u8]) -> String {
        let mut guest = p.connect().unwrap();
        guest.write_all(request).unwrap();
        if !then.is_empty() {
            let mut established = [0u8; 39];
            guest.read_exact(&mut established).unwrap();
            assert!(established.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&established));
            guest.write_all(then).unwrap();
            guest.shutdown(Shutdown::Write).unwrap();
        }
        let mut answer = String::new();
        let _ = guest.read_to_string(&mut answer);
        answer
    }

    #[test]
    fn connections_go_through_the_host_proxy_unless_no_proxy_names_them() {
        let (port, seen) = company_proxy("HTTP/1.1 200 OK");
        let direct = agentvm_testkit::servers::http_server("DIRECT");
        let (p, dir) = chained_proxy(port);
        exchange(&p, b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n", &client_hello(Some("allowed.test")));
        let plain = exchange(&p, b"GET http://allowed.test/x HTTP/1.1\r\nProxy-Authorization: guest\r\n\r\n", b"");
        assert!(plain.ends_with("FROM-THE-PROXY"), "{plain}");
        let straight = exchange(&p, format!("GET http://direct.test:{direct}/ HTTP/1.1\r\n\r\n").as_bytes(), b"");
        assert!(straight.ends_with("DIRECT"), "NO_PROXY names it: {straight}");
        let denied = exchange(&p, b"GET http://denied.test/ HTTP/1.1\r\n\r\n", b"");
        assert!(denied.starts_with("HTTP/1.1 403"), "the allow list decides first: {denied}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.lock().unwrap().len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "CONNECT allowed.test:443 auth=Basic bWU6cHc=",
                "tunnel starts with 0x16",
                "GET http://allowed.test/x" // the guest's own credentials are dropped
            ]
        );
        let log = std::fs::read_to_string(log_path(dir.path())).unwrap();
        assert!(log.contains(&format!("ALLOW CONNECT allowed.test:443 via http://127.0.0.1:{port} (from HTTPS_PROXY)")));
        assert!(log.contains(&format!("ALLOW GET allowed.test:80 via http://127.0.0.1:{port} (from HTTP_PROXY)")));
        assert!(log.contains(&format!("ALLOW GET direct.test:{direct}\n")), "{log}");
    }

    #[test]
    fn the_host_proxy_refusing_or_absent_is_a_502_that_says_so() {
        let (port, _) = company_proxy("HTTP/1.1 407 Proxy Authentication Required");
        let (p, dir) = chained_proxy(port);
        let tunnel = exchange(&p, b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n", b"");
        let refused = format!("the host proxy http://127.0.0.1:{port} (from HTTPS_PROXY) refused CONNECT allowed.test:443: 407 Proxy Authentication Required");
        assert!(tunnel.starts_with("HTTP/1.1 502") && tunnel.contains(&refused), "{tunnel}");
        let plain = exchange(&p, b"GET http://allowed.test/ HTTP/1.1\r\n\r\n", b"");
        assert!(plain.starts_with("HTTP/1.1 502") && plain.contains("refused GET allowed.test:80: 407"), "{plain}");
        let log = std::fs::read_to_string(log_path(dir.path())).unwrap();
        assert!(log.contains(&format!("DENY CONNECT allowed.test:443 ({refused})")), "{log}");
        assert!(!log.contains("pw") && !log.contains("bWU6cHc"), "credentials in the log: {log}");

        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (p, _dir) = chained_proxy(closed);
        let absent = exchange(&p, b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n", b"");
        assert!(absent.starts_with("HTTP/1.1 502") && absent.contains("cannot connect to the host proxy"), "{absent}");
    }

    #[test]
    fn names_and_addresses_of_loopback_are_not_dialled_even_with_a_listener_there() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (p, _dir) = proxy();
        for host in ["localhost", "127.0.0.1", "::ffff:127.0.0.1", "0.0.0.0"] {
            let Err(e) = p.dial(host, port) else { panic!("{host} was dialled") };
            let why = e.to_string();
            assert_eq!(e.status(), 403, "{host}: {why}");
            assert!(why.contains("--host-port") && why.contains("only to public addresses"), "{why}");
        }
        // The trusted test override may map a name to loopback.
        let mut trusted = p.clone();
        trusted.resolve = Arc::new(parse_resolve("api.test=127.0.0.1"));
        assert!(trusted.dial("api.test", port).is_ok());
    }

    #[test]
    fn destinations_are_read_from_the_request_target() {
        let head = |t: &[u8]| http::parse_request(t).unwrap().unwrap().0;
        let dest = |t: &[u8]| destination(&head(t));
        assert_eq!(
            dest(b"CONNECT a.com:443 HTTP/1.1\r\n\r\n").unwrap(),
            Destination::Tunnel { host: "a.com".into(), port: 443 }
        );
        assert_eq!(
            dest(b"CONNECT [::1]:22 HTTP/1.1\r\n\r\n").unwrap(),
            Destination::Tunnel { host: "::1".into(), port: 22 }
        );
        assert_eq!(
            dest(b"GET http://A.com:8080/x?y HTTP/1.1\r\n\r\n").unwrap(),
            Destination::Http { host: "a.com".into(), port: 8080, path: "/x?y".into() }
        );
        assert_eq!(
            dest(b"GET http://user@b.org HTTP/1.0\r\n\r\n").unwrap(),
            Destination::Http { host: "b.org".into(), port: 80, path: "/".into() }
        );
        assert_eq!(
            dest(b"GET http://b.org?q HTTP/1.1\r\n\r\n").unwrap(),
            Destination::Http { host: "b.org".into(), port: 80, path: "/?q".into() }
        );
        assert!(dest(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").is_err(), "origin-form is not a proxy request");
        assert!(dest(b"CONNECT a.com HTTP/1.1\r\n\r\n").is_err(), "CONNECT needs a port");
        assert!(dest(b"CONNECT a.com:0 HTTP/1.1\r\n\r\n").is_err());
        assert!(dest(b"CONNECT [::1 HTTP/1.1\r\n\r\n").is_err());
    }

    /// The TLS records of a real ClientHello for `sni` (none: no SNI).
    fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.enable_sni = sni.is_some();
        let name = rustls::pki_types::ServerName::try_from(sni.unwrap_or("unnamed.test").to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    /// The same handshake message split over two TLS records.
    fn split_in_two_records(hello: &[u8]) -> Vec<u8> {
        let body = &hello[5..];
        let (a, b) = body.split_at(body.len() / 2);
        let mut out = Vec::new();
        for part in [a, b] {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn hello_over_socket(bytes: &[u8]) -> (Result<String, ProxyError>, Duration) {
        let (mut guest, ours) = UnixStream::pair().unwrap();
        guest.write_all(bytes).unwrap();
        let mut peer = Peer::new(ours);
        let started = Instant::now();
        let got = read_client_hello(&mut peer, Instant::now() + Duration::from_secs(2));
        if got.is_ok() {
            assert_eq!(peer.buffered(), bytes, "the hello stays buffered for upstream");
        }
        (got, started.elapsed())
    }

    #[test]
    fn the_whole_tls_hello_is_read_however_it_is_split() {
        let hello = client_hello(Some("Evil.test"));
        assert_eq!(hello_over_socket(&hello).0.unwrap().to_ascii_lowercase(), "evil.test");
        let (got, took) = hello_over_socket(&split_in_two_records(&hello));
        assert_eq!(got.unwrap().to_ascii_lowercase(), "evil.test", "a hello over two records is read whole");
        assert!(took < Duration::from_secs(1), "{took:?}");
        let (got, _) = hello_over_socket(&client_hello(None));
        assert!(got.unwrap_err().to_string().contains("names no server"));
        let (got, _) = hello_over_socket(b"SSH-2.0-OpenSSH_9.2\r\n");
        assert!(got.unwrap_err().to_string().contains("not a TLS hello"));
        let (got, took) = hello_over_socket(&hello[..hello.len() - 10]);
        assert!(
            got.unwrap_err().to_string().contains("no whole TLS hello"),
            "an incomplete hello waits for the deadline only"
        );
        assert!(took < Duration::from_secs(3));
    }

    #[test]
    fn resolve_overrides_parse() {
        let r = parse_resolve("a.test=127.0.0.1, B.test = ::1,bad,c=notip");
        assert_eq!(r, vec![("a.test".into(), "127.0.0.1".parse().unwrap()), ("b.test".into(), "::1".parse().unwrap())]);
    }

    #[test]
    fn connections_past_the_limit_are_refused() {
        let (p, _dir) = proxy();
        let held: Vec<UnixStream> = (0..MAX_CONNECTIONS).map(|_| p.connect().unwrap()).collect();
        assert!(p.connect().is_err());
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut again = p.connect().expect("closed connections free their places");
        write!(again, "GET http://denied.test/ HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = String::new();
        again.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    }
}
