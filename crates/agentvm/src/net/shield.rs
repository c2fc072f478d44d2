//! `--shield-secrets`: the guest gets a placeholder instead of each of the
//! flavor's keys; the egress proxy terminates TLS for the flavor's secret
//! hosts with a certificate from a per-instance CA (which the guest trusts)
//! and sends each request on over a TLS connection verified against the
//! host's trust store. The real key goes only where the flavor says the key
//! travels (`key_headers`, e.g. `x-api-key: {key}`), and only in place of
//! a header whose whole value is the placeholder in that form: never into
//! the path, the query, another header or the body. The request's Host is
//! the secret host. Should the response carry a real key anyway (an API
//! that echoes the request's headers), it is masked before the guest sees
//! it. The real key stays in agentvm's memory: never in the VM's memory,
//! disk or logs.
//!
//! One request per connection: the head going up and the one coming back
//! both say `Connection: close`, so every request is rewritten.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned};

use crate::net::allow::AllowList;
use crate::net::http::{self, authority, BodyKind, Header, HttpError, Peer, ReadTimeout, RequestHead, ResponseHead};

/// A PEM file of extra CA certificates the proxy trusts upstream (besides
/// the host's). For tests against a local server.
pub const EXTRA_CA_ENV: &str = "AGENTVM_PROXY_CA";
/// Stands for the key in a `key_headers` form.
pub const KEY_MARK: &str = "{key}";

/// Shielding that cannot be set up, or one shielded connection that failed
/// (that one goes to the instance's `net.log`).
#[derive(Debug, thiserror::Error)]
pub enum ShieldError {
    #[error("cannot make the instance CA: {0}")]
    Ca(#[source] rcgen::Error),
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot read the extra CA file {path} ({EXTRA_CA_ENV}): {source}")]
    ExtraCaFile { path: String, source: rustls::pki_types::pem::Error },
    #[error("cannot use a certificate of the extra CA file {path} ({EXTRA_CA_ENV}): {source}")]
    ExtraCaCert { path: String, source: rustls::Error },
    /// The network mode given (no error lies under it).
    #[error("--shield-secrets needs --network allow (the proxy is where keys are put in): drop --network {0}")]
    NeedsAllowMode(String),
    #[error("--shield-secrets: flavor {flavor:?} has no secret_hosts, so its keys could never be used; add secret_hosts = [\"api.example.com\"] to [flavors.{flavor}]")]
    NoSecretHosts { flavor: String },
    #[error("--shield-secrets: flavor {flavor:?} does not say in which header {key} travels, so it could never be put in; add key_headers = {{ {key} = [\"x-api-key: {{key}}\"] }} (or \"authorization: Bearer {{key}}\") to [flavors.{flavor}]")]
    NoKeyHeaders { flavor: String, key: String },
    /// The variable's name (no error lies under it).
    #[error("the value of {0} holds control characters, which no header may carry: check the variable")]
    BadKey(String),
    #[error("the system's random source failed: {0}")]
    Random(io::Error),
    #[error("the flavor's secret_hosts: {0}")]
    SecretHosts(#[source] crate::net::allow::EgressError),
    #[error("cannot make a certificate for {host}: {source}")]
    Leaf { host: String, source: rcgen::Error },
    #[error("{0:?} is not a host name TLS can verify")]
    ServerName(String, #[source] rustls::pki_types::InvalidDnsNameError),
    /// Relaying the request or the response failed while `what`.
    #[error("{what}: {source}")]
    Relay { what: &'static str, source: HttpError },
    /// The guest's request was refused with this answer (no error lies under it).
    #[error("refused: {0}")]
    Refused(String),
    #[error("the server switched protocols, which the shield does not relay")]
    SwitchedProtocols,
}

/// A flavor's keys: their names, the headers each travels in, and the
/// hosts they may go to.
#[derive(Debug, Clone, Copy)]
pub struct FlavorKeys<'a> {
    pub names: &'a [String],
    pub headers: &'a BTreeMap<String, Vec<String>>,
    pub hosts: &'a [String],
}

/// The program's environment with the flavor's keys swapped for
/// placeholders, and the shield that knows the real ones.
pub struct Shielded {
    pub env: Vec<(String, String)>,
    pub shield: Shield,
    /// Set when none of the flavor's keys is set: nothing to shield.
    pub warning: Option<String>,
}

/// Swaps the flavor's keys in `env` for placeholders (`--shield-secrets`).
pub fn swap_secrets(env: &[(String, String)], keys: FlavorKeys<'_>) -> Result<Shielded, ShieldError> {
    let mut env = env.to_vec();
    let mut secrets = Vec::new();
    for (name, value) in env.iter_mut() {
        if keys.names.contains(name) && !value.is_empty() {
            let placeholder = placeholder()?;
            let real = std::mem::replace(value, placeholder.clone());
            let forms = keys.headers.get(name).map_or(&[][..], Vec::as_slice);
            secrets.push(Secret::new(name, placeholder, real, forms)?);
        }
    }
    let warning = secrets
        .is_empty()
        .then(|| format!("--shield-secrets: none of {} is set, so there is no key to shield", keys.names.join(", ")));
    let hosts = AllowList::new(keys.hosts).map_err(ShieldError::SecretHosts)?;
    Ok(Shielded { env, shield: Shield::new(hosts, secrets)?, warning })
}

/// What failed while `what`, relaying.
fn relay(what: &'static str) -> impl FnOnce(HttpError) -> ShieldError {
    move |source| ShieldError::Relay { what, source }
}

/// [`relay`] for an I/O error.
fn relay_io(what: &'static str) -> impl FnOnce(io::Error) -> ShieldError {
    move |e| relay(what)(e.into())
}

/// A placeholder for one secret: recognisable, unguessable (128 bits from
/// getrandom), as long as a typical key so tools that check the format are
/// less likely to balk.
pub fn placeholder() -> Result<String, ShieldError> {
    let mut bytes = [0u8; 16];
    crate::sys::random_bytes(&mut bytes).map_err(ShieldError::Random)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("agentvm-shielded-{hex}"))
}

/// One way a key travels: a header and its value around the key, e.g.
/// `authorization: Bearer {key}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyForm {
    /// The header's name, lower-case.
    pub name: String,
    pub prefix: String,
    pub suffix: String,
}

impl KeyForm {
    fn value(&self, key: &str) -> Vec<u8> {
        format!("{}{key}{}", self.prefix, self.suffix).into_bytes()
    }
}

/// Parses `name: text{key}text`, or says what is wrong with it.
pub fn parse_key_form(form: &str) -> Result<KeyForm, String> {
    let example = "write it as \"x-api-key: {key}\" or \"authorization: Bearer {key}\"";
    let (name, value) =
        form.split_once(':').ok_or_else(|| format!("{form:?} has no ':' after the header name: {example}"))?;
    let name = name.trim();
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!("{name:?} in {form:?} is not a header name: {example}"));
    }
    let probe = Header { name: name.into(), value: Vec::new() };
    if http::is_hop_header(&probe) || probe.is("host") {
        return Err(format!(
            "{name:?} in {form:?} is a header the proxy writes itself: name the header that carries the key"
        ));
    }
    let value = value.trim();
    if value.matches(KEY_MARK).count() != 1 {
        return Err(format!("{form:?} must hold {KEY_MARK} exactly once: {example}"));
    }
    if !value.chars().all(|c| (' '..='~').contains(&c)) {
        return Err(format!("{form:?} holds characters a header value cannot: {example}"));
    }
    let (prefix, suffix) = value.split_once(KEY_MARK).expect("counted above");
    Ok(KeyForm { name: name.to_ascii_lowercase(), prefix: prefix.into(), suffix: suffix.into() })
}

/// Checks that a flavor (named `flavor`, for messages) can be shielded: it
/// has `secret_hosts`, and each of its `keys` says in which header it
/// travels (`key_headers`).
pub fn check_flavor(
    flavor: &str,
    keys: &[String],
    secret_hosts: &[String],
    key_headers: &BTreeMap<String, Vec<String>>,
) -> Result<(), ShieldError> {
    if secret_hosts.is_empty() {
        return Err(ShieldError::NoSecretHosts { flavor: flavor.to_string() });
    }
    match keys.iter().find(|k| key_headers.get(*k).map_or(0, Vec::len) == 0) {
        Some(key) => Err(ShieldError::NoKeyHeaders { flavor: flavor.to_string(), key: key.clone() }),
        None => Ok(()),
    }
}

/// One shielded key.
#[derive(Debug, Clone)]
pub struct Secret {
    pub placeholder: String,
    pub real: String,
    /// Where it may be put in.
    pub forms: Vec<KeyForm>,
}

impl Secret {
    /// `placeholder` for `real`, put in where `forms` (flavor syntax) say.
    pub fn new(name: &str, placeholder: String, real: String, forms: &[String]) -> Result<Secret, ShieldError> {
        if real.chars().any(|c| c.is_control()) {
            return Err(ShieldError::BadKey(name.to_string()));
        }
        // The flavor was checked when loaded.
        let forms = forms.iter().filter_map(|f| parse_key_form(f).ok()).collect();
        Ok(Secret { placeholder, real, forms })
    }
}

/// The per-instance CA and the secrets, shared by the proxy's threads.
pub struct Shield {
    hosts: AllowList,
    secrets: Vec<Secret>,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, Arc<ServerConfig>>>,
    upstream: Arc<ClientConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The roots the upstream side trusts: the host's own trust store (which
/// has any company or local CA the host trusts), or the public web roots
/// if it has none; plus [`EXTRA_CA_ENV`]'s.
fn upstream_roots() -> Result<RootCertStore, ShieldError> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Ok(path) = std::env::var(EXTRA_CA_ENV) {
        use rustls::pki_types::pem::PemObject;
        let file = |source| ShieldError::ExtraCaFile { path: path.clone(), source };
        for c in CertificateDer::pem_file_iter(&path).map_err(file)? {
            roots.add(c.map_err(file)?).map_err(|source| ShieldError::ExtraCaCert { path: path.clone(), source })?;
        }
    }
    Ok(roots)
}

impl Shield {
    /// A fresh CA for `hosts` (where secrets may go) and `secrets`.
    pub fn new(hosts: AllowList, secrets: Vec<Secret>) -> Result<Shield, ShieldError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(ShieldError::Ca)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, "agentvm instance CA");
        let key = KeyPair::generate().map_err(ShieldError::Ca)?;
        let cert = params.self_signed(&key).map_err(ShieldError::Ca)?;
        let mut upstream = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(upstream_roots()?)
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

    /// [`Shield::ca_pem`] as DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// Whether secrets may go to `host`.
    pub fn covers(&self, host: &str) -> bool {
        self.hosts.allows(host)
    }

    /// A leaf certificate for `host` signed by the CA, with what strict
    /// verifiers (Python 3.13's default context) require: an Authority Key
    /// Identifier, key usage and the server-auth purpose.
    fn leaf(&self, host: &str) -> Result<(rcgen::Certificate, KeyPair), rcgen::Error> {
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let leaf = params.signed_by(&key, &self.issuer)?;
        Ok((leaf, key))
    }

    /// A TLS server set-up for `host`, with a leaf signed by the CA.
    fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, ShieldError> {
        if let Some(c) = self.leaves.lock().unwrap_or_else(|e| e.into_inner()).get(host) {
            return Ok(c.clone());
        }
        let (leaf, key) = self.leaf(host).map_err(|source| ShieldError::Leaf { host: host.to_string(), source })?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), self.ca_der.clone()], key)?;
        // HTTP/1.1 only: its heads are what gets rewritten.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        self.leaves.lock().unwrap_or_else(|e| e.into_inner()).insert(host.to_string(), config.clone());
        Ok(config)
    }

    /// A header's value with the real key in place of a placeholder, if the
    /// header is one that key travels in and its whole value is the
    /// placeholder in that form; otherwise the value as it is.
    fn reveal(&self, h: &Header) -> Vec<u8> {
        for secret in &self.secrets {
            for form in secret.forms.iter().filter(|f| h.is(&f.name)) {
                if h.value == form.value(&secret.placeholder) {
                    return form.value(&secret.real);
                }
            }
        }
        h.value.clone()
    }

    /// The head sent upstream: origin-form target, Host pinned to the
    /// secret host, keys put in, framing and `Connection: close` ours, and
    /// no content coding, so that the response can be searched for keys.
    /// `Err` says why the guest's request cannot go (no error lies under it).
    fn upstream_head(&self, req: &RequestHead, host: &str, port: u16, kind: BodyKind) -> Result<Vec<u8>, String> {
        if !req.target.starts_with('/') {
            return Err(format!("{:?} is not a path: a request to {host} names only the path", req.target));
        }
        let mut out = format!("{} {} HTTP/1.1\r\n", req.method, req.target).into_bytes();
        http::put_header(&mut out, "Host", authority(host, port, 443).as_bytes());
        for h in &req.headers {
            if !http::is_hop_header(h) && !h.is("host") && !h.is("accept-encoding") {
                http::put_header(&mut out, &h.name, &self.reveal(h));
            }
        }
        http::put_header(&mut out, "Accept-Encoding", b"identity");
        http::put_framing(&mut out, kind);
        out.extend_from_slice(b"Connection: close\r\n\r\n");
        Ok(out)
    }

    fn real_keys(&self) -> Vec<&[u8]> {
        self.secrets.iter().map(|s| s.real.as_bytes()).collect()
    }

    /// The response head for the guest, with `kind`'s framing, `Connection:
    /// close` and any real key masked.
    fn guest_head(&self, resp: &ResponseHead, kind: BodyKind) -> Vec<u8> {
        let out = http::response_head_to_pass_on(resp, kind);
        let mut masked = http::Redactor::new(Vec::new(), &self.real_keys());
        masked.write_all(&out).expect("writing to memory");
        masked.finish().expect("writing to memory")
    }

    /// Serves one tunnelled connection to `host` (the client already got
    /// its 200): TLS to the client as `host`, TLS to `upstream`, one request
    /// with its keys put in, and the response back with any key masked.
    pub fn intercept(
        &self,
        client: Peer<UnixStream>,
        upstream: TcpStream,
        host: &str,
        port: u16,
    ) -> Result<(), ShieldError> {
        let server = ServerConnection::new(self.server_config(host)?)?;
        let mut guest = Peer::new(StreamOwned::new(server, client));
        // The TLS handshake happens while the head is read, within the deadline.
        let request = guest
            .read_head(http::parse_request, Some(Instant::now() + http::HEAD_DEADLINE))
            .map_err(relay("reading the request"))?;
        let kind = match http::request_body(&request.headers) {
            Ok(BodyKind::Length(n)) if n > http::MAX_REQUEST_BODY => {
                return answer(&mut guest, 413, HttpError::BodyTooLarge(http::MAX_REQUEST_BODY).to_string())
            }
            Ok(kind) => kind,
            Err(e) => return answer(&mut guest, 400, e.to_string()),
        };
        let head = match self.upstream_head(&request, host, port, kind) {
            Ok(head) => head,
            Err(why) => return answer(&mut guest, 400, why),
        };
        let name = ServerName::try_from(host.to_string()).map_err(|e| ShieldError::ServerName(host.to_string(), e))?;
        let mut up = StreamOwned::new(ClientConnection::new(self.upstream.clone(), name)?, upstream);
        if http::expects_continue(&request) {
            guest.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").map_err(relay_io("answering 100 Continue"))?;
        }
        up.write_all(&head).map_err(relay_io("upstream"))?;
        guest.set_read_timeout(Some(http::BODY_IDLE)).map_err(relay_io("setting the body's timeout"))?;
        http::copy_body(&mut guest, &mut up, kind, Some(http::MAX_REQUEST_BODY), &[]).map_err(relay("request body"))?;
        self.respond(Peer::new(up), &request, &mut guest)
    }

    /// Relays the response to `request` from upstream to the guest, with
    /// any real key masked, and closes the guest's TLS.
    fn respond(
        &self,
        mut up: Peer<UpstreamTls>,
        request: &RequestHead,
        guest: &mut Peer<GuestTls>,
    ) -> Result<(), ShieldError> {
        let response = loop {
            let head = up.read_head(http::parse_response, None).map_err(relay("reading the response"))?;
            // Interim responses (the request's Expect was answered here).
            if !(100..200).contains(&head.code) {
                break head;
            }
            if head.code == 101 {
                return Err(ShieldError::SwitchedProtocols);
            }
        };
        let kind = http::response_body(&response, &request.method).map_err(relay("the response"))?;
        // An HTTP/1.0 client knows no chunks: it reads to the end.
        let to_guest = if request.minor == 0 && kind == BodyKind::Chunked { BodyKind::UntilClose } else { kind };
        guest.write_all(&self.guest_head(&response, to_guest)).map_err(relay_io("answering the guest"))?;
        http::copy_body_as(&mut up, kind, guest, to_guest, None, &self.real_keys()).map_err(relay("response body"))?;
        guest.stream.conn.send_close_notify();
        let _ = guest.flush();
        Ok(())
    }
}

/// The TLS connection with the guest, as the secret host.
type GuestTls = StreamOwned<ServerConnection, Peer<UnixStream>>;
/// The TLS connection with the secret host.
type UpstreamTls = StreamOwned<ClientConnection, TcpStream>;

/// Answers the guest with an error of our own, which ends the connection.
fn answer<W: Write>(guest: &mut W, status: u16, why: String) -> Result<(), ShieldError> {
    http::write_refusal(guest, status, &why);
    Err(ShieldError::Refused(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shield_with(forms: &[&str]) -> (Shield, String) {
        let p = placeholder().unwrap();
        let forms: Vec<String> = forms.iter().map(|s| s.to_string()).collect();
        let secret = Secret::new("K", p.clone(), "sk-real".into(), &forms).unwrap();
        (Shield::new(AllowList::new(&["api.test".to_string()]).unwrap(), vec![secret]).unwrap(), p)
    }

    #[test]
    fn placeholders_are_random_and_long() {
        let (a, b) = (placeholder().unwrap(), placeholder().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("agentvm-shielded-") && a.len() == 17 + 32);
        assert_ne!(&a[17..], "0".repeat(32));
    }

    #[test]
    fn key_forms_parse_and_refuse_what_cannot_carry_a_key() {
        assert_eq!(
            parse_key_form("Authorization: Bearer {key}").unwrap(),
            KeyForm { name: "authorization".into(), prefix: "Bearer ".into(), suffix: String::new() }
        );
        assert_eq!(parse_key_form(" x-api-key:{key} ").unwrap().prefix, "");
        for bad in [
            "x-api-key",
            "x-api-key: key",
            "x api: {key}",
            "host: {key}",
            "content-length: {key}",
            "a: {key}{key}",
            "a: \u{7f}{key}",
        ] {
            assert!(parse_key_form(bad).is_err(), "{bad:?}");
        }
    }

    fn head_for(shield: &Shield, request: &str) -> String {
        let (req, _) = http::parse_request(request.as_bytes()).unwrap().unwrap();
        String::from_utf8(shield.upstream_head(&req, "api.test", 443, BodyKind::Empty).unwrap()).unwrap()
    }

    #[test]
    fn the_key_goes_only_into_its_headers_in_their_exact_form() {
        let (s, p) = shield_with(&["x-api-key: {key}", "authorization: Bearer {key}"]);
        let head = head_for(
            &s,
            &format!(
                "POST /v1/{p}?key={p} HTTP/1.1\r\nHost: evil.test\r\nX-Api-Key: {p}\r\nAuthorization: Bearer {p}\r\n\
                 X-Reflect: {p}\r\nConnection: keep-alive\r\nAccept-Encoding: gzip\r\n\r\n"
            ),
        );
        assert_eq!(
            head,
            format!(
                "POST /v1/{p}?key={p} HTTP/1.1\r\nHost: api.test\r\nX-Api-Key: sk-real\r\nAuthorization: Bearer sk-real\r\n\
                 X-Reflect: {p}\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
            )
        );
        // Not the exact form: left alone.
        let head = head_for(&s, &format!("GET / HTTP/1.1\r\nx-api-key: x{p}\r\nauthorization: Basic {p}\r\n\r\n"));
        assert!(!head.contains("sk-real"), "{head}");
        let (req, _) = http::parse_request(b"GET http://evil.test/ HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert!(s.upstream_head(&req, "api.test", 443, BodyKind::Empty).is_err(), "absolute-form targets are refused");
    }

    #[test]
    fn response_heads_have_keys_masked_and_close() {
        let (s, _) = shield_with(&["x-api-key: {key}"]);
        let resp = http::parse_response(
            b"HTTP/1.1 401 sk-real\r\nX-Echo: sk-real\r\nKeep-Alive: 5\r\nContent-Length: 7\r\n\r\n",
        )
        .unwrap()
        .unwrap()
        .0;
        let head = String::from_utf8(s.guest_head(&resp, BodyKind::Length(7))).unwrap();
        assert_eq!(head, "HTTP/1.1 401 [agentv\r\nX-Echo: [agentv\r\nContent-Length: 7\r\nConnection: close\r\n\r\n");
    }

    #[test]
    fn flavors_must_say_where_their_keys_travel() {
        let check = |f: &crate::config::flavor::Flavor| check_flavor(&f.name, &f.keys, &f.secret_hosts, &f.key_headers);
        let all = crate::config::flavor::builtin_flavors();
        for name in ["claude", "gemini", "codex"] {
            check(&all[name]).unwrap();
        }
        let mut f = all["claude"].clone();
        f.key_headers.clear();
        let e = check(&f).unwrap_err().to_string();
        assert!(e.contains("key_headers") && e.contains("ANTHROPIC_API_KEY") && e.contains("[flavors.claude]"), "{e}");
        f.secret_hosts.clear();
        assert!(check(&f).unwrap_err().to_string().contains("secret_hosts"));
    }

    #[test]
    fn the_ca_signs_leaves_that_strict_verifiers_accept() {
        let (s, _) = shield_with(&[]);
        assert!(s.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(s.covers("api.test") && !s.covers("other.test"));
        let a = s.server_config("api.test").unwrap();
        assert!(Arc::ptr_eq(&a, &s.server_config("api.test").unwrap()), "leaves are cached");

        // OpenSSL's strict mode is what Python 3.13's default context turns on.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), s.ca_pem()).unwrap();
        std::fs::write(dir.path().join("leaf.pem"), s.leaf("api.test").unwrap().0.pem()).unwrap();
        let out = match std::process::Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", "ca.pem", "leaf.pem"])
            .current_dir(dir.path())
            .output()
        {
            Ok(out) => out,
            Err(e) => return eprintln!("skipped the strict check: openssl cannot run: {e}"),
        };
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
