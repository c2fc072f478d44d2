//! `--host-port`: single host loopback ports opened to the guest, reached
//! there as `host.agentvm.internal:PORT`. The connections travel over a
//! virtio-serial port (see [`agentvm_proto::forward`]), not the network, so
//! they work with `--network none` too, and the guest reaches nothing on the
//! host but the ports on the list: the check is here, on the host.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use agentvm_proto::forward::Mux;

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

/// Serves the guest's connections to `allowed` ports over `channel` (the
/// launcher's end of the forwarding port), on a thread of its own, until
/// the VM goes away.
pub fn serve(channel: UnixStream, allowed: Vec<u16>) -> io::Result<()> {
    let reader = channel.try_clone()?;
    let mux = Mux::new(Box::new(channel));
    std::thread::Builder::new().name("host-ports".into()).spawn(move || {
        let dial = |port: u16| dial(port, &allowed);
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
