//! The guest's network: user-mode networking with no root, through passt
//! (the host's loopback closed to the guest) or QEMU's slirp (the fallback,
//! which cannot close it), and published ports.

pub mod allow;
pub mod dns;
pub mod egress;
pub mod forwarding;
pub mod host_proxy;
pub mod http;
pub mod plan;
pub mod shield;

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::Command;

use agentvm_proto::Network;

use crate::tools;
use crate::vm::process::{self, Helper};

/// The guest's address, gateway and name server inside passt's network.
pub const GUEST_ADDRESS: &str = "10.0.2.15/24";
pub const GATEWAY: &str = "10.0.2.2";
/// Queries to this address are forwarded by passt to the host's resolver.
pub const DNS: &str = "10.0.2.3";

/// Whether the guest gets a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Internet access through the host; the host itself stays closed.
    #[default]
    Open,
    /// Only loopback in the guest.
    None,
    /// No interface either: HTTP(S) through agentvm's proxy, to the allowed
    /// names only (`--allow`, the flavor's preset).
    Allow,
}

/// The user-mode network stack behind the guest's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NetBackend {
    /// passt when installed, else slirp (with a warning).
    #[default]
    Auto,
    /// passt: the host's loopback stays closed to the guest.
    Passt,
    /// QEMU's built-in slirp: the guest can reach the host's loopback.
    Slirp,
}

/// The stack a launch uses, once chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stack {
    /// passt, at this path.
    Passt(std::path::PathBuf),
    Slirp,
}

/// Printed whenever slirp is used: what it leaves open, and the fix.
pub const SLIRP_WARNING: &str = "the slirp network back end cannot close the host's loopback: \
the guest can reach services on the host's 127.0.0.1 at 10.0.2.2; install passt (scripts/setup-host) \
and use --net-backend passt or auto to close it";

/// Picks the stack for `backend`, given where passt is (if installed).
/// Returns a warning to print when the choice leaves the host open.
pub fn choose_stack(
    backend: NetBackend,
    passt: Option<std::path::PathBuf>,
) -> Result<(Stack, Option<String>), NetError> {
    match (backend, passt) {
        (NetBackend::Passt | NetBackend::Auto, Some(bin)) => Ok((Stack::Passt(bin), None)),
        (NetBackend::Passt, None) => Err(NetError::NoPasst),
        (NetBackend::Slirp, _) => Ok((Stack::Slirp, Some(SLIRP_WARNING.into()))),
        (NetBackend::Auto, None) => Ok((Stack::Slirp, Some(format!("passt not found, using slirp; {SLIRP_WARNING}")))),
    }
}

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

/// A published port: `[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortSpec {
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
    pub proto: Proto,
}

/// A network set-up that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("port spec {spec:?} is invalid: {why}; use [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp], e.g. 8080:80")]
    BadSpec { spec: String, why: String },
    #[error("port spec {spec:?}: host port {port} is privileged (below 1024) and agentvm is not root; pick a port from 1024 up")]
    Privileged { spec: String, port: u16 },
    #[error("port spec {spec:?}: host port {port}/{proto} is published twice")]
    Duplicate { spec: String, port: u16, proto: Proto },
    #[error("port spec {spec:?}: cannot listen on {addr} ({why}); stop what uses it or pick another host port")]
    InUse { spec: String, addr: SocketAddr, why: String },
    #[error("passt not found: run scripts/setup-host (it installs passt), then `agentvm doctor`; or use --net-backend slirp")]
    NoPasst,
    #[error("published port {spec}: the slirp back end binds IPv4 host addresses only; give an IPv4 address or use --net-backend passt")]
    SlirpIpv6 { spec: PortSpec },
    #[error("cannot start passt: {0}")]
    Spawn(std::io::Error),
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}->{}/{}", self.host_ip, self.host_port, self.guest_port, self.proto)
    }
}

impl serde::Serialize for PortSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl PortSpec {
    /// Parses one `-p` value. The host side binds 127.0.0.1 unless an
    /// address is given.
    pub fn parse(spec: &str) -> Result<PortSpec, NetError> {
        let bad = |why: &str| NetError::BadSpec { spec: spec.to_string(), why: why.to_string() };
        let (body, proto) = match spec.rsplit_once('/') {
            Some((b, "tcp")) => (b, Proto::Tcp),
            Some((b, "udp")) => (b, Proto::Udp),
            Some(_) => return Err(bad("the protocol must be tcp or udp")),
            None => (spec, Proto::Tcp),
        };
        // The guest port is after the last colon, the host port before it;
        // anything before that is the address (IPv6 in brackets).
        let (rest, guest) = body.rsplit_once(':').ok_or_else(|| bad("both a host and a guest port are needed"))?;
        let (ip, host) = match rest.rsplit_once(':') {
            Some((ip, host)) => {
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                (ip.parse::<IpAddr>().map_err(|_| bad("the host address is not an IP address"))?, host)
            }
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), rest),
        };
        let port = |s: &str, which: &str| -> Result<u16, NetError> {
            match s.parse::<u16>() {
                Ok(0) | Err(_) => Err(bad(&format!("the {which} port must be a number from 1 to 65535"))),
                Ok(p) => Ok(p),
            }
        };
        Ok(PortSpec { host_ip: ip, host_port: port(host, "host")?, guest_port: port(guest, "guest")?, proto })
    }
}

/// Parses and checks all published ports: no duplicates, no privileged
/// host ports for a normal user, and every host port free right now.
pub fn check_ports(specs: &[String], is_root: bool) -> Result<Vec<PortSpec>, NetError> {
    let mut seen: Vec<PortSpec> = Vec::new();
    for spec in specs {
        let p = PortSpec::parse(spec)?;
        if p.host_port < 1024 && !is_root {
            return Err(NetError::Privileged { spec: spec.clone(), port: p.host_port });
        }
        if seen.iter().any(|s| s.host_port == p.host_port && s.proto == p.proto) {
            return Err(NetError::Duplicate { spec: spec.clone(), port: p.host_port, proto: p.proto });
        }
        let addr = SocketAddr::new(p.host_ip, p.host_port);
        let free = match p.proto {
            Proto::Tcp => TcpListener::bind(addr).map(drop),
            Proto::Udp => UdpSocket::bind(addr).map(drop),
        };
        free.map_err(|e| NetError::InUse { spec: spec.clone(), addr, why: e.to_string() })?;
        seen.push(p);
    }
    Ok(seen)
}

/// What the guest is told about its interface.
pub fn guest_network() -> Network {
    Network { address: GUEST_ADDRESS.into(), gateway: GATEWAY.into(), dns: vec![DNS.into()] }
}

/// passt's arguments: talk to QEMU over inherited fd `fd`, fixed addresses,
/// no mapping of the gateway to the host's loopback, DNS forwarding, and
/// the published ports.
pub fn passt_args(ports: &[PortSpec], fd: i32) -> Vec<OsString> {
    let (addr, prefix) = GUEST_ADDRESS.split_once('/').expect("address has a prefix");
    let mut a: Vec<OsString> = [
        "--foreground",
        "--quiet",
        "--ipv4-only",
        "--no-dhcp",
        "--no-map-gw",
        "--address",
        addr,
        "--netmask",
        prefix,
        "--gateway",
        GATEWAY,
        "--dns-forward",
        DNS,
    ]
    .iter()
    .map(OsString::from)
    .collect();
    a.push(format!("--fd={fd}").into());
    for proto in [Proto::Tcp, Proto::Udp] {
        let flag = if proto == Proto::Tcp { "--tcp-ports" } else { "--udp-ports" };
        let mine: Vec<&PortSpec> = ports.iter().filter(|p| p.proto == proto).collect();
        if mine.is_empty() {
            a.extend([flag.into(), "none".into()]);
        }
        for p in mine {
            a.extend([flag.into(), format!("{}/{}:{}", p.host_ip, p.host_port, p.guest_port).into()]);
        }
    }
    a
}

/// QEMU's `-netdev` value for passt on QEMU's inherited fd `fd`.
pub fn passt_netdev(fd: i32) -> String {
    format!("stream,id={NETDEV_ID},addr.type=fd,addr.str={fd}")
}

/// QEMU's `-netdev` value for slirp: the same addresses as passt (so the
/// guest's static set-up is the same) and the published ports.
pub fn slirp_netdev(ports: &[PortSpec]) -> Result<String, NetError> {
    let (addr, prefix) = GUEST_ADDRESS.split_once('/').expect("address has a prefix");
    let net = format!("{}.0/{prefix}", addr.rsplit_once('.').expect("dotted address").0);
    let mut v = format!("user,id={NETDEV_ID},ipv6=off,net={net},host={GATEWAY},dns={DNS},dhcpstart={addr}");
    for p in ports {
        let IpAddr::V4(host_ip) = p.host_ip else {
            return Err(NetError::SlirpIpv6 { spec: *p });
        };
        v.push_str(&format!(",hostfwd={}:{host_ip}:{}-{addr}:{}", p.proto, p.host_port, p.guest_port));
    }
    Ok(v)
}

/// The id both `-netdev` values give the network back end.
pub const NETDEV_ID: &str = "net0";

/// The passt binary, if installed.
pub fn find_passt() -> Option<std::path::PathBuf> {
    tools::find_program("passt", &[])
}

/// Starts passt (`bin`) for one VM. Returns the helper and QEMU's end of
/// the connection (a socketpair: no socket file, no race).
pub fn start_passt(bin: &Path, ports: &[PortSpec], runtime_dir: &Path) -> Result<(Helper, OwnedFd), NetError> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(NetError::Spawn)?;
    let theirs = OwnedFd::from(theirs);
    let mut cmd = Command::new(bin);
    cmd.args(passt_args(ports, 3));
    let helper = process::spawn("passt (network)", cmd, &[(theirs.as_fd(), 3)], &runtime_dir.join("passt.log"))
        .map_err(NetError::Spawn)?;
    Ok((helper, OwnedFd::from(ours)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PortSpec {
        PortSpec::parse(s).unwrap()
    }

    #[test]
    fn port_specs_parse_with_defaults() {
        assert_eq!(
            p("8080:80"),
            PortSpec { host_ip: "127.0.0.1".parse().unwrap(), host_port: 8080, guest_port: 80, proto: Proto::Tcp }
        );
        assert_eq!(p("0.0.0.0:5353:53/udp").proto, Proto::Udp);
        assert_eq!(p("0.0.0.0:5353:53/udp").host_ip, "0.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(p("[::1]:8080:80").host_ip, "::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn malformed_port_specs_name_the_spec() {
        for bad in ["80", "a:80", "8080:b", "8080:0", "70000:80", "8080:80/sctp", "host:8080:80", ""] {
            let e = PortSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn duplicates_and_privileged_ports_are_refused() {
        let e = check_ports(&["18080:80".into(), "18080:81".into()], true).unwrap_err();
        assert!(matches!(e, NetError::Duplicate { port: 18080, .. }), "{e}");
        let e = check_ports(&["80:80".into()], false).unwrap_err();
        assert!(matches!(e, NetError::Privileged { port: 80, .. }), "{e}");
    }

    #[test]
    fn a_host_port_in_use_is_refused_before_boot() {
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let e = check_ports(&[format!("{port}:80")], false).unwrap_err().to_string();
        assert!(e.contains("cannot listen on 127.0.0.1"), "{e}");
    }

    #[test]
    fn auto_prefers_passt_and_falls_back_to_slirp_with_a_warning() {
        let bin = std::path::PathBuf::from("/usr/bin/passt");
        assert_eq!(choose_stack(NetBackend::Auto, Some(bin.clone())).unwrap(), (Stack::Passt(bin.clone()), None));
        let (stack, warning) = choose_stack(NetBackend::Auto, None).unwrap();
        assert_eq!(stack, Stack::Slirp);
        assert!(warning.unwrap().contains("host's loopback"));
        let (stack, warning) = choose_stack(NetBackend::Slirp, Some(bin)).unwrap();
        assert_eq!(stack, Stack::Slirp);
        assert!(warning.is_some());
        assert!(matches!(choose_stack(NetBackend::Passt, None), Err(NetError::NoPasst)));
    }

    #[test]
    fn slirp_uses_passts_addresses_and_forwards_ports() {
        let v = slirp_netdev(&[p("8080:80"), p("0.0.0.0:5353:53/udp")]).unwrap();
        assert_eq!(
            v,
            "user,id=net0,ipv6=off,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,dhcpstart=10.0.2.15,\
             hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80,hostfwd=udp:0.0.0.0:5353-10.0.2.15:53"
        );
        let e = slirp_netdev(&[p("[::1]:8080:80")]).unwrap_err().to_string();
        assert!(e.contains("IPv4"), "{e}");
        assert_eq!(passt_netdev(5), "stream,id=net0,addr.type=fd,addr.str=5");
    }

    #[test]
    fn passt_keeps_the_gateway_off_the_host_loopback_and_forwards_ports() {
        let args: Vec<String> =
            passt_args(&[p("8080:80"), p("5353:53/udp")], 3).into_iter().map(|s| s.into_string().unwrap()).collect();
        assert!(args.contains(&"--no-map-gw".to_string()));
        assert!(args.contains(&"--fd=3".to_string()));
        let j = args.join(" ");
        assert!(j.contains("--tcp-ports 127.0.0.1/8080:80"), "{j}");
        assert!(j.contains("--udp-ports 127.0.0.1/5353:53"), "{j}");
        let none: Vec<String> = passt_args(&[], 3).into_iter().map(|s| s.into_string().unwrap()).collect();
        assert!(none.join(" ").contains("--tcp-ports none --udp-ports none"));
    }
}
