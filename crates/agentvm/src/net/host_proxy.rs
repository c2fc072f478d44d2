//! The host's HTTP proxy (a company proxy), as agentvm's environment names
//! it: `https_proxy`/`HTTPS_PROXY`, `http_proxy`/`HTTP_PROXY` and
//! `no_proxy`/`NO_PROXY` (lower case first, as curl reads them; an empty
//! variable counts as unset; `ALL_PROXY` is not read: it is often a SOCKS
//! proxy, which agentvm does not speak).
//!
//! Only `http://HOST[:PORT]` proxies are used (no scheme means http, no
//! port means 80). Credentials in the URL (`http://user:pass@proxy:3128`)
//! are secrets: never logged or printed, and handed to the guest only when
//! the user passes the variable on himself (`-e HTTPS_PROXY`).
//!
//! * `--network open`: the guest gets the variables; a proxy on the host's
//!   loopback is reached over the forwarding channel, as `--host-port`
//!   reaches a port there.
//! * `--network allow`: the egress proxy connects through the host's proxy
//!   (CONNECT for tunnels, the absolute-form request for plain HTTP) unless
//!   `NO_PROXY` names the target.

use std::fmt;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::net::dns::{DnsError, Resolver};
use crate::net::http::{self, authority, HttpError, Peer};

/// How long connecting to the host's proxy may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The names the guest reaches without any proxy: its own loopback, and
/// the host ports of the forwarding channel.
const GUEST_NO_PROXY: &str = "localhost,127.0.0.1,::1";

/// A proxy variable that cannot be used, or the host's proxy failing one
/// connection (that one goes to the guest as a 502 and to `net.log`).
#[derive(Debug, thiserror::Error)]
pub enum HostProxyError {
    /// The variable's name and what is wrong with its value (no error lies
    /// under it; the value is not repeated: it may hold credentials).
    #[error("{var} is not a proxy URL agentvm can use: {why}; set it to http://HOST:PORT, or unset it for agentvm (env -u {var} agentvm ...)")]
    BadUrl { var: &'static str, why: String },
    /// The variable's name (no error lies under it).
    #[error("{var} holds credentials (user:password@), which --network open would hand to the guest: use --network allow (agentvm's proxy adds them on the host and the guest never sees them), or share them on purpose with -e {var}")]
    CredentialsToGuest { var: &'static str },
    #[error("cannot resolve the host proxy {proxy}: {source}")]
    Resolve { proxy: String, source: DnsError },
    #[error("cannot connect to the host proxy {proxy}: {source}")]
    Connect { proxy: String, source: io::Error },
    /// The proxy's status line (no error lies under it).
    #[error("the host proxy {proxy} refused {what}: {status}")]
    Refused { proxy: String, what: String, status: String },
    #[error("the host proxy {proxy} answered {what} badly: {source}")]
    BadAnswer { proxy: String, what: String, source: HttpError },
    #[error("the host proxy {proxy} sent data through the tunnel of {what} before the client spoke")]
    EarlyData { proxy: String, what: String },
}

/// One proxy URL: where it is and, if the URL holds them, the credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// The variable it came from.
    pub var: &'static str,
    /// A name (lower case) or an address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// `user:password`, percent-decoded.
    credentials: Option<String>,
}

/// Shows where the proxy is and where it came from, never its credentials.
impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{} (from {})", authority(&self.host, self.port, 0), self.var)
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let creds = if self.credentials.is_some() { " with credentials" } else { "" };
        write!(f, "{self}{creds}")
    }
}

impl ProxyUrl {
    /// Parses the value of `var` with a URL parser (WHATWG's rules).
    pub fn parse(var: &'static str, value: &str) -> Result<ProxyUrl, HostProxyError> {
        let bad = |why: String| HostProxyError::BadUrl { var, why };
        let text = if value.contains("://") { value.to_string() } else { format!("http://{value}") };
        let url = url::Url::parse(&text).map_err(|e| bad(e.to_string()))?;
        if url.scheme() != "http" {
            return Err(bad(format!("its scheme is {}://, and agentvm speaks only to http:// proxies", url.scheme())));
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(bad("it names no host".into())),
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(bad("it has a path, query or fragment, which a proxy URL has not".into()));
        }
        let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8().map(|s| s.into_owned());
        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            (user, password) => {
                let user = decode(user).map_err(|_| bad("its user name is not UTF-8".into()))?;
                let password = decode(password.unwrap_or("")).map_err(|_| bad("its password is not UTF-8".into()))?;
                Some(format!("{user}:{password}"))
            }
        };
        let port = url.port_or_known_default().unwrap_or(80);
        Ok(ProxyUrl { var, host, port, credentials })
    }

    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// Whether the proxy is on the host's loopback (127.0.0.0/8, ::1,
    /// localhost), which the guest reaches only over the forwarding channel.
    pub fn is_loopback(&self) -> bool {
        match self.host.parse::<IpAddr>() {
            Ok(ip) => ip.is_loopback(),
            Err(_) => self.host == "localhost" || self.host.ends_with(".localhost"),
        }
    }

    /// The `Proxy-Authorization` header's line, when the URL has credentials.
    fn authorization(&self) -> Option<String> {
        let creds = self.credentials.as_ref()?;
        Some(format!("Proxy-Authorization: Basic {}\r\n", data_encoding::BASE64.encode(creds.as_bytes())))
    }

    /// The URL without credentials, with the host as the guest reaches it.
    fn url_for(&self, host: &str) -> String {
        format!("http://{}", authority(host, self.port, 0))
    }

    /// Connects to the proxy itself (its own address may be private or on
    /// loopback: it is the user's own configuration).
    pub fn connect(&self, resolver: &Resolver) -> Result<TcpStream, HostProxyError> {
        let addrs = resolver
            .lookup(&self.host)
            .map_err(|source| HostProxyError::Resolve { proxy: self.to_string(), source })?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for ip in addrs {
            match TcpStream::connect_timeout(&SocketAddr::new(ip, self.port), CONNECT_TIMEOUT) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(HostProxyError::Connect { proxy: self.to_string(), source: last })
    }

    /// A tunnel to `host:port` through the proxy (CONNECT), ready for the
    /// client's first byte.
    pub fn tunnel(&self, resolver: &Resolver, host: &str, port: u16) -> Result<TcpStream, HostProxyError> {
        let target = authority(host, port, 0);
        let what = format!("CONNECT {target}");
        let mut stream = self.connect(resolver)?;
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        head.push_str(&self.authorization().unwrap_or_default());
        head.push_str("\r\n");
        let bad = |source: HttpError| HostProxyError::BadAnswer { proxy: self.to_string(), what: what.clone(), source };
        stream.write_all(head.as_bytes()).map_err(|e| bad(e.into()))?;
        let mut peer = Peer::new(stream);
        let answer = peer.read_head(http::parse_response, Some(Instant::now() + http::HEAD_DEADLINE)).map_err(bad)?;
        if !(200..300).contains(&answer.code) {
            return Err(self.refused(&what, answer.code, &answer.reason));
        }
        if !peer.buffered().is_empty() {
            return Err(HostProxyError::EarlyData { proxy: self.to_string(), what });
        }
        Ok(peer.stream)
    }

    /// The error for the proxy answering `what` with `code reason`.
    pub fn refused(&self, what: &str, code: u16, reason: &str) -> HostProxyError {
        HostProxyError::Refused { proxy: self.to_string(), what: what.to_string(), status: format!("{code} {reason}") }
    }

    /// The request line of a plain HTTP request to `host:port` through the
    /// proxy (absolute-form), and its credentials' header if any.
    pub fn request_line(&self, method: &str, host: &str, port: u16, path: &str) -> Vec<u8> {
        let mut line = format!("{method} http://{}{path} HTTP/1.1\r\n", authority(host, port, 80));
        line.push_str(&self.authorization().unwrap_or_default());
        line.into_bytes()
    }
}

/// `NO_PROXY`: the names (and addresses) reached without the proxy. Each
/// entry matches the name itself and the names below it (a leading `.` or
/// `*.` is dropped, as curl does); `*` matches everything; an address
/// entry, or a CIDR block, matches addresses; `:PORT` limits an entry to
/// that port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    /// The variable's text, passed on to the guest.
    pub text: String,
    entries: Vec<(String, Option<u16>)>,
}

impl NoProxy {
    pub fn parse(text: &str) -> NoProxy {
        let entries = text
            .split(',')
            .map(|e| e.trim().to_ascii_lowercase())
            .filter(|e| !e.is_empty())
            .map(|e| split_port(&e))
            .collect();
        NoProxy { text: text.to_string(), entries }
    }

    /// Whether `host:port` is reached without the proxy.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.entries.iter().any(|(entry, only)| (only.is_none() || *only == Some(port)) && entry_matches(entry, &host))
    }
}

/// `entry[:port]` (`[v6]:port`), the port only when it parses.
fn split_port(entry: &str) -> (String, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        if let Some((ip, port)) = rest.split_once("]:") {
            return (ip.to_string(), port.parse().ok());
        }
        return (rest.trim_end_matches(']').to_string(), None);
    }
    match entry.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => match port.parse() {
            Ok(p) => (name.to_string(), Some(p)),
            Err(_) => (entry.to_string(), None),
        },
        _ => (entry.to_string(), None),
    }
}

fn entry_matches(entry: &str, host: &str) -> bool {
    if entry == "*" {
        return true;
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return cidr_contains(entry, ip);
    }
    let name = entry.trim_start_matches('*').trim_start_matches('.').trim_end_matches('.');
    !name.is_empty() && (host == name || host.ends_with(&format!(".{name}")))
}

/// Whether `entry` (an address, or an address/prefix) holds `ip`.
fn cidr_contains(entry: &str, ip: IpAddr) -> bool {
    let (net, bits) = match entry.split_once('/') {
        Some((net, bits)) => (net, bits.parse::<u32>().ok()),
        None => (entry, None),
    };
    match (net.parse::<IpAddr>(), ip) {
        (Ok(IpAddr::V4(net)), IpAddr::V4(ip)) => prefix_eq(u32::from(net).into(), u32::from(ip).into(), 32, bits),
        (Ok(IpAddr::V6(net)), IpAddr::V6(ip)) => prefix_eq(u128::from(net), u128::from(ip), 128, bits),
        _ => false,
    }
}

fn prefix_eq(net: u128, ip: u128, width: u32, bits: Option<u32>) -> bool {
    let bits = bits.unwrap_or(width).min(width);
    let shift = width - bits;
    bits == 0 || (net >> shift) == (ip >> shift)
}

/// The host's proxies: for `http://` and for `https://` targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProxy {
    pub http: Option<ProxyUrl>,
    pub https: Option<ProxyUrl>,
    pub no_proxy: NoProxy,
}

/// The first non-empty of `names` in the environment `get`, with its name.
fn first_set(get: &dyn Fn(&str) -> Option<String>, names: [&'static str; 2]) -> Option<(&'static str, String)> {
    names.into_iter().find_map(|n| get(n).filter(|v| !v.trim().is_empty()).map(|v| (n, v.trim().to_string())))
}

/// The variable names the guest's tools read, for each kind.
const HTTP_VARS: [&str; 2] = ["http_proxy", "HTTP_PROXY"];
const HTTPS_VARS: [&str; 2] = ["https_proxy", "HTTPS_PROXY"];
const NO_PROXY_VARS: [&str; 2] = ["no_proxy", "NO_PROXY"];

/// Whether `name` is one of the proxy variables (passed by the user, it
/// wins over what agentvm would hand on).
pub fn is_proxy_var(name: &str) -> bool {
    HTTP_VARS.iter().chain(&HTTPS_VARS).chain(&NO_PROXY_VARS).any(|v| *v == name)
}

impl HostProxy {
    /// The proxies in the environment `get`; `None` when neither is set.
    pub fn from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<HostProxy>, HostProxyError> {
        let parse = |vars| first_set(get, vars).map(|(var, value)| ProxyUrl::parse(var, &value)).transpose();
        let (http, https) = (parse(HTTP_VARS)?, parse(HTTPS_VARS)?);
        if http.is_none() && https.is_none() {
            return Ok(None);
        }
        let no_proxy = first_set(get, NO_PROXY_VARS).map(|(_, v)| NoProxy::parse(&v)).unwrap_or_default();
        Ok(Some(HostProxy { http, https, no_proxy }))
    }

    /// The proxy for a tunnel (`HTTPS_PROXY`) or a plain HTTP request
    /// (`HTTP_PROXY`) to `host:port`, unless NO_PROXY names it.
    pub fn for_target(&self, tunnel: bool, host: &str, port: u16) -> Option<&ProxyUrl> {
        let proxy = if tunnel { &self.https } else { &self.http };
        proxy.as_ref().filter(|_| !self.no_proxy.matches(host, port))
    }

    fn proxies(&self) -> impl Iterator<Item = &ProxyUrl> {
        self.http.iter().chain(&self.https)
    }

    /// For `--network open`: refuses to hand credentials to the guest.
    pub fn check_for_guest(&self) -> Result<(), HostProxyError> {
        match self.proxies().find(|p| p.has_credentials()) {
            Some(p) => Err(HostProxyError::CredentialsToGuest { var: p.var }),
            None => Ok(()),
        }
    }

    /// For `--network open`: the guest's proxy variables, a proxy on the
    /// host's loopback at `guest_host:PORT`; and the loopback proxies'
    /// ports, to be opened over the forwarding channel.
    pub fn guest_view(&self, guest_host: &str) -> (Vec<(String, String)>, Vec<u16>) {
        let mut env = Vec::new();
        let mut ports = Vec::new();
        for (p, names) in [(&self.http, HTTP_VARS), (&self.https, HTTPS_VARS)] {
            let Some(p) = p else { continue };
            let url = if p.is_loopback() {
                if !ports.contains(&p.port) {
                    ports.push(p.port);
                }
                p.url_for(guest_host)
            } else {
                p.url_for(&p.host)
            };
            env.extend(names.iter().map(|n| (n.to_string(), url.clone())));
        }
        let mut no_proxy = format!("{GUEST_NO_PROXY},{guest_host}");
        if !self.no_proxy.text.is_empty() {
            no_proxy = format!("{},{no_proxy}", self.no_proxy.text);
        }
        env.extend(NO_PROXY_VARS.iter().map(|n| (n.to_string(), no_proxy.clone())));
        (env, ports)
    }
}

/// For `--print-plan`: where the proxies are, never their credentials.
impl serde::Serialize for HostProxy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("HostProxy", 3)?;
        st.serialize_field("http", &self.http.as_ref().map(ToString::to_string))?;
        st.serialize_field("https", &self.https.as_ref().map(ToString::to_string))?;
        st.serialize_field("no_proxy", &self.no_proxy.text)?;
        st.end()
    }
}

impl fmt::Display for HostProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.proxies().map(ToString::to_string).collect();
        write!(f, "{}", parts.join(", "))?;
        if !self.no_proxy.text.is_empty() {
            write!(f, ", NO_PROXY {}", self.no_proxy.text)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Read;
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn proxy_urls_parse_with_defaults_and_hide_their_credentials() {
        let p = ProxyUrl::parse("HTTPS_PROXY", "http://us%40er:p%3Ass@Proxy.Corp:3128/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        assert_eq!(p.credentials.as_deref(), Some("us@er:p:ss"));
        assert_eq!(p.to_string(), "http://proxy.corp:3128 (from HTTPS_PROXY)");
        assert!(!format!("{p:?}").contains("p:ss") && format!("{p:?}").contains("with credentials"));
        assert_eq!(p.authorization().unwrap(), "Proxy-Authorization: Basic dXNAZXI6cDpzcw==\r\n");
        let bare = ProxyUrl::parse("http_proxy", "10.1.2.3").unwrap();
        assert_eq!((bare.host.as_str(), bare.port, bare.has_credentials()), ("10.1.2.3", 80, false));
        assert_eq!(ProxyUrl::parse("x", "http://[::1]:8080").unwrap().host, "::1");
    }

    #[test]
    fn unusable_proxy_urls_name_the_variable_and_never_the_value() {
        for (value, why) in [
            ("socks5://user:secret@127.0.0.1:1080", "socks5://"),
            ("https://user:secret@proxy:443", "https://"),
            ("http://user:secret@proxy:3128/path", "path"),
            ("http://user:secret@proxy:99999", "port"),
            ("http://user:secret@", "host"),
        ] {
            let e = ProxyUrl::parse("HTTPS_PROXY", value).unwrap_err().to_string();
            assert!(e.starts_with("HTTPS_PROXY is not a proxy URL") && e.contains("env -u HTTPS_PROXY"), "{e}");
            assert!(e.to_lowercase().contains(why), "{value}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn lower_case_variables_come_first_and_empty_ones_count_as_unset() {
        let hp = HostProxy::from_env(&env(&[
            ("https_proxy", "http://lower:1"),
            ("HTTPS_PROXY", "http://upper:2"),
            ("http_proxy", " "),
            ("HTTP_PROXY", "http://plain:3"),
            ("NO_PROXY", ".corp.example"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(hp.https.as_ref().unwrap().host, "lower");
        assert_eq!(hp.http.as_ref().unwrap().var, "HTTP_PROXY");
        assert_eq!(hp.no_proxy.text, ".corp.example");
        assert_eq!(HostProxy::from_env(&env(&[("NO_PROXY", "x"), ("https_proxy", "")])).unwrap(), None);
        assert!(HostProxy::from_env(&env(&[("http_proxy", "ftp://x")])).is_err());
    }

    #[test]
    fn no_proxy_matches_names_below_addresses_blocks_and_ports() {
        let n = NoProxy::parse("corp.example, .internal.test,*.wild.test,10.0.0.0/8,::1,only.test:8080,[fd00::1]:443");
        for (host, port) in [
            ("corp.example", 443),
            ("a.corp.example", 443),
            ("Deep.A.corp.example.", 80),
            ("internal.test", 443),
            ("x.internal.test", 443),
            ("x.wild.test", 443),
            ("10.2.3.4", 80),
            ("::1", 80),
            ("only.test", 8080),
            ("fd00::1", 443),
        ] {
            assert!(n.matches(host, port), "{host}:{port}");
        }
        for (host, port) in [
            ("evilcorp.example", 443),
            ("corp.example.evil", 443),
            ("11.0.0.1", 80),
            ("only.test", 443),
            ("fd00::1", 80),
        ] {
            assert!(!n.matches(host, port), "{host}:{port}");
        }
        assert!(NoProxy::parse("*").matches("anything.test", 1));
        assert!(!NoProxy::parse("").matches("anything.test", 1));
    }

    #[test]
    fn the_guest_reaches_a_loopback_proxy_over_the_channel_and_no_proxy_grows_its_own_names() {
        let hp = HostProxy::from_env(&env(&[
            ("https_proxy", "http://127.0.0.1:3128"),
            ("http_proxy", "http://localhost:3128"),
            ("no_proxy", "corp.example"),
        ]))
        .unwrap()
        .unwrap();
        let (guest, ports) = hp.guest_view("host.agentvm.internal");
        let get = |k: &str| guest.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("HTTPS_PROXY"), Some("http://host.agentvm.internal:3128"));
        assert_eq!(get("http_proxy"), Some("http://host.agentvm.internal:3128"));
        assert_eq!(get("NO_PROXY"), Some("corp.example,localhost,127.0.0.1,::1,host.agentvm.internal"));
        assert_eq!(ports, [3128]);
        let remote = HostProxy::from_env(&env(&[("HTTPS_PROXY", "proxy.corp:8080")])).unwrap().unwrap();
        let (guest, ports) = remote.guest_view("host.agentvm.internal");
        assert!(ports.is_empty() && guest.contains(&("https_proxy".into(), "http://proxy.corp:8080".into())));
        assert!(!guest.iter().any(|(n, _)| n.eq_ignore_ascii_case("http_proxy")));
    }

    #[test]
    fn credentials_are_never_handed_to_the_guest_nor_printed() {
        let hp = HostProxy::from_env(&env(&[("HTTPS_PROXY", "http://me:hunter2@proxy.corp:3128")])).unwrap().unwrap();
        let e = hp.check_for_guest().unwrap_err().to_string();
        assert!(e.contains("HTTPS_PROXY holds credentials") && e.contains("--network allow"), "{e}");
        let shown = format!("{hp} {hp:?} {}", serde_json::to_string(&hp).unwrap());
        assert!(!shown.contains("hunter2") && !shown.contains("me:"), "{shown}");
        let (guest, _) = hp.guest_view("h");
        assert!(!guest.iter().any(|(_, v)| v.contains("hunter2")));
    }

    /// A stand-in company proxy on loopback, answering each request with
    /// the status line `answer`. It logs each request line with its
    /// Proxy-Authorization (if any); a plain request's answer has a body,
    /// FROM-THE-PROXY; a tunnel it accepted echoes the first byte it
    /// carries, which it logs too. Shared with the egress proxy's tests.
    pub(crate) fn company_proxy(answer: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let mut peer = Peer::new(s);
                let Ok(head) = peer.read_head(http::parse_request, None) else { continue };
                let auth = head.headers.iter().find(|h| h.is("proxy-authorization"));
                let auth = auth.map(|h| format!(" auth={}", String::from_utf8_lossy(&h.value))).unwrap_or_default();
                seen.lock().unwrap().push(format!("{} {}{auth}", head.method, head.target));
                let _ = peer.stream.write_all(answer.as_bytes());
                if head.method != "CONNECT" {
                    let _ = peer.stream.write_all(b"\r\nContent-Length: 14\r\n\r\nFROM-THE-PROXY");
                    continue;
                }
                let _ = peer.stream.write_all(b"\r\n\r\n");
                let mut first = [0u8; 1];
                if answer.starts_with("HTTP/1.1 200") && peer.stream.read_exact(&mut first).is_ok() {
                    seen.lock().unwrap().push(format!("tunnel starts with {:#04x}", first[0]));
                    let _ = peer.stream.write_all(&first);
                }
            }
        });
        (port, log)
    }

    fn resolver() -> Resolver {
        Resolver::new(crate::net::dns::ResolvConf::default(), String::new())
    }

    #[test]
    fn tunnels_go_through_the_proxy_with_its_credentials() {
        let (port, log) = company_proxy("HTTP/1.1 200 Connection established");
        let p = ProxyUrl::parse("HTTPS_PROXY", &format!("http://me:pw@127.0.0.1:{port}")).unwrap();
        let mut s = p.tunnel(&resolver(), "api.example.test", 443).unwrap();
        s.write_all(&[0x16]).unwrap();
        let mut back = [0u8; 1];
        s.read_exact(&mut back).unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            ["CONNECT api.example.test:443 auth=Basic bWU6cHc=", "tunnel starts with 0x16"]
        );
    }

    #[test]
    fn a_refusing_or_absent_proxy_is_an_error_that_says_so() {
        let (port, _) = company_proxy("HTTP/1.1 407 Proxy Authentication Required");
        let p = ProxyUrl::parse("HTTPS_PROXY", &format!("http://127.0.0.1:{port}")).unwrap();
        let e = p.tunnel(&resolver(), "api.example.test", 443).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "the host proxy http://127.0.0.1:{port} (from HTTPS_PROXY) refused CONNECT api.example.test:443: \
                 407 Proxy Authentication Required"
            )
        );
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let p = ProxyUrl::parse("HTTPS_PROXY", &format!("http://127.0.0.1:{closed}")).unwrap();
        let e = p.tunnel(&resolver(), "api.example.test", 443).unwrap_err().to_string();
        assert!(e.starts_with(&format!("cannot connect to the host proxy http://127.0.0.1:{closed}")), "{e}");
    }

    #[test]
    fn plain_requests_name_the_whole_url_for_the_proxy() {
        let p = ProxyUrl::parse("HTTP_PROXY", "http://u:p@proxy:3128").unwrap();
        assert_eq!(
            String::from_utf8(p.request_line("GET", "a.test", 80, "/x?y")).unwrap(),
            "GET http://a.test/x?y HTTP/1.1\r\nProxy-Authorization: Basic dTpw\r\n"
        );
        let q = ProxyUrl::parse("HTTP_PROXY", "proxy:3128").unwrap();
        assert_eq!(
            String::from_utf8(q.request_line("POST", "a.test", 8080, "/")).unwrap(),
            "POST http://a.test:8080/ HTTP/1.1\r\n"
        );
    }
}
