//! Host ports opened to the guest: listeners at `host.agentvm.internal`
//! whose connections travel to the host over the forwarding port (see
//! [`agentvm_proto::forward`]).

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;

use agentvm_proto::forward::{Conn, Mux, Side, GUEST_ADDR, HOST_NAME, PORT_NAME};

use crate::console;
use crate::error::{Error, Result};
use crate::port::{find_port, PORTS_SYSFS};

/// Listens on every port of `ports` and relays their connections to the
/// host, and lets the host connect to the guest's own loopback at each of
/// `published`, on threads of their own. Nothing to do for no ports.
pub fn start(ports: &[u16], published: &[u16]) -> Result<()> {
    if ports.is_empty() && published.is_empty() {
        return Ok(());
    }
    let dev = find_port(Path::new(PORTS_SYSFS), PORT_NAME).ok_or_else(|| {
        Error::Network(format!("host ports were asked for, but the virtio-serial port {PORT_NAME} is missing"))
    })?;
    let path = Path::new("/dev").join(dev);
    let channel = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| Error::io("open", &path, e))?;
    let reader = channel.try_clone().map_err(|e| Error::io("duplicate", &path, e))?;
    // Bind all before anything runs, so the program can connect at once.
    let mut listeners = Vec::new();
    for &port in ports {
        let listener = TcpListener::bind((GUEST_ADDR, port))
            .map_err(|e| Error::Network(format!("cannot listen on {GUEST_ADDR}:{port} for host port {port}: {e}")))?;
        listeners.push((listener, port));
    }
    crate::etc::add_host_alias(Path::new("/"), HOST_NAME, GUEST_ADDR)?;
    let mux = Mux::new(Box::new(channel), Side::Guest);
    for (listener, port) in listeners {
        let mux = mux.clone();
        std::thread::spawn(move || mux.accept(listener, port));
    }
    let published = published.to_vec();
    std::thread::spawn(move || {
        let dial = |port: u16| -> std::io::Result<Conn> {
            if !published.contains(&port) {
                return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "not a published port"));
            }
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map(Conn::Tcp)
        };
        if let Err(e) = mux.serve(reader, Some(&dial)) {
            console::line(&format!("host port forwarding stopped: {e}"));
        }
    });
    console::step(&format!("host ports {ports:?} at {GUEST_ADDR}"));
    Ok(())
}
