//! What `--network allow` lets through: the allow list of host names, and
//! the proxy's port in the guest. The proxy that enforces it is
//! [`super::egress`]; the shield ([`super::shield`]) uses an allow list for
//! the hosts that may receive secrets.

/// The guest port of the proxy, at `host.agentvm.internal`.
pub const PROXY_PORT: u16 = 3128;
/// A `--network allow` setting that cannot be used: an allow list entry
/// (the `String`s are the user's own entries, no error lies under them), or
/// an option that does not go with the mode.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("allowed name {0:?} is not a host name: use e.g. api.example.com or *.example.com")]
    BadPattern(String),
    #[error("allowed name {0:?} is this host itself: the proxy never connects to the host's loopback; open one port of it with --host-port PORT instead")]
    LocalName(String),
    #[error("allowed name {0:?} is an address, not a host name: name the host (e.g. api.example.com); the proxy connects only to public addresses")]
    AddressName(String),
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
    /// Checks and lower-cases the patterns; duplicates are merged. Names of
    /// the host itself (`localhost`) and numeric names are refused.
    pub fn new(patterns: &[String]) -> Result<AllowList, EgressError> {
        let mut out: Vec<String> = Vec::new();
        for p in patterns {
            let lower = p.trim().to_ascii_lowercase();
            let name = lower.strip_prefix("*.").unwrap_or(&lower);
            if !is_host_name(name) {
                return Err(EgressError::BadPattern(p.clone()));
            }
            if is_local_name(name) {
                return Err(EgressError::LocalName(p.clone()));
            }
            if is_numeric_name(name) {
                return Err(EgressError::AddressName(p.clone()));
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
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host[..host.len() - suffix.len()].ends_with('.')
            }
            None => *p == host,
        })
    }
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Names that mean this host (RFC 6761 and Debian's /etc/hosts). Others
/// that resolve to loopback are caught when the proxy connects.
fn is_local_name(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || ["localhost.localdomain", "ip6-localhost", "ip6-loopback"].contains(&name)
}

/// Names the resolver reads as an IPv4 address (`127.0.0.1`, `127.1`,
/// `2130706433`, `0x7f.1`): no top-level domain is numeric.
fn is_numeric_name(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or_default();
    let hex = last.strip_prefix("0x").is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()));
    hex || last.chars().all(|c| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for bad in ["", "*.", "a b", "http://x.com", "x.com/", "-x.com", "*", "[::1]", "::1"] {
            assert!(AllowList::new(&[bad.to_string()]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_of_this_host_and_addresses_are_refused_at_parse_time() {
        for local in ["localhost", "LOCALHOST", "*.localhost", "db.localhost", "ip6-localhost", "localhost.localdomain"]
        {
            assert!(matches!(AllowList::new(&[local.to_string()]), Err(EgressError::LocalName(_))), "{local}");
        }
        for numeric in ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0x7f.1", "*.0.0.1", "10.0.0.1"] {
            assert!(matches!(AllowList::new(&[numeric.to_string()]), Err(EgressError::AddressName(_))), "{numeric}");
        }
        assert!(EgressError::LocalName("localhost".into()).to_string().contains("--host-port"));
        list(&["localhost-tools.example.com", "v1.api.example.com", "1password.com", "x.0x"]);
    }
}
