//! The host side of the forwarding channel (see [`agentvm_proto::forward`]):
//! a virtio-serial port that carries TCP connections, so they need no
//! network interface in the guest.
//!
//! * `--host-port PORT`: the guest's connections to
//!   `host.agentvm.internal:PORT` go to the host's loopback at PORT, and to
//!   nothing else: the check is here, on the host.
//! * `--network allow`: connections to the proxy port go to the egress proxy
//!   inside agentvm.
//! * Published ports when the guest has no interface (`--network allow`):
//!   agentvm listens on the host and the guest dials its own loopback.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use agentvm_proto::forward::{Conn, Mux, Side};

use crate::net::egress::{self, Proxy};
use crate::net::PortSpec;

/// How long connecting to a host port may take (it is on loopback).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A host port list that cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    #[error("host port 0 is not a port: use --host-port with a port from 1 to 65535, e.g. --host-port 5432")]
    Zero,
    #[error("host port {0} is given twice: name each port once (flags and config files add up)")]
    Duplicate(u16),
}

/// Checks the ports to open: each from 1 up, each once.
pub fn check(ports: &[u16]) -> Result<Vec<u16>, HostPortError> {
    let mut seen = Vec::new();
    for &p in ports {
        if p == 0 {
            return Err(HostPortError::Zero);
        }
        if seen.contains(&p) {
            return Err(HostPortError::Duplicate(p));
        }
        seen.push(p);
    }
    Ok(seen)
}

/// What the channel carries for one launch.
pub struct Routes {
    /// Host loopback ports the guest may reach.
    pub host_ports: Vec<u16>,
    /// The egress proxy, reached at [`egress::PROXY_PORT`].
    pub proxy: Option<Proxy>,
    /// Published (TCP) ports, each with its listener already bound.
    pub published: Vec<(PortSpec, TcpListener)>,
}

/// Binds the published ports' listeners (before boot, so a port in use is
/// an error then).
pub fn bind_published(ports: &[PortSpec]) -> io::Result<Vec<(PortSpec, TcpListener)>> {
    ports.iter().map(|p| Ok((*p, TcpListener::bind(SocketAddr::new(p.host_ip, p.host_port))?))).collect()
}

/// Serves `routes` over `channel` (the launcher's end of the forwarding
/// port) on threads of their own, until the VM goes away.
pub fn serve(channel: UnixStream, routes: Routes) -> io::Result<()> {
    let reader = channel.try_clone()?;
    let mux = Mux::new(Box::new(channel), Side::Host);
    for (spec, listener) in routes.published {
        let mux = mux.clone();
        std::thread::spawn(move || mux.accept(listener, spec.guest_port));
    }
    let Routes { host_ports, proxy, .. } = routes;
    std::thread::Builder::new().name("forwarding".into()).spawn(move || {
        let dial = |port: u16| -> io::Result<Conn> {
            match &proxy {
                Some(p) if port == egress::PROXY_PORT => p.connect().map(Conn::Unix),
                _ => dial(port, &host_ports).map(Conn::Tcp),
            }
        };
        // The channel ends with the VM; a broken one ends forwarding only.
        let _ = mux.serve(reader, Some(&dial));
    })?;
    Ok(())
}

/// Connects to host port `port` on loopback (IPv4, then IPv6), if allowed.
fn dial(port: u16, allowed: &[u16]) -> io::Result<TcpStream> {
    if !allowed.contains(&port) {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("host port {port} is not opened")));
    }
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT)
        .or_else(|_| TcpStream::connect_timeout(&SocketAddr::from((Ipv6Addr::LOCALHOST, port)), CONNECT_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn ports_are_checked_for_zero_and_duplicates() {
        assert_eq!(check(&[5432, 8080]), Ok(vec![5432, 8080]));
        assert_eq!(check(&[5432, 0]), Err(HostPortError::Zero));
        assert_eq!(check(&[5432, 8080, 5432]), Err(HostPortError::Duplicate(5432)));
        assert!(HostPortError::Duplicate(5432).to_string().contains("5432"));
    }

    #[test]
    fn only_listed_ports_are_dialled() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(dial(port, &[port]).is_ok());
        let err = dial(port, &[port.wrapping_add(1)]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }
}
