//! Host ports opened to the guest (`--host-port`): TCP connections carried
//! over one virtio-serial port, so they work with any network back end, or
//! none, and reach nothing on the host but the ports the user named.
//!
//! The guest listens on [`GUEST_ADDR`] (named [`HOST_NAME`] in its
//! /etc/hosts) at each opened port. Each accepted connection gets an id and
//! an [`Msg::Open`]; the host checks the port against its own list, connects
//! to it on its loopback, and from then on both sides pump bytes as
//! [`Msg::Data`]. [`Msg::Eof`] half-closes, [`Msg::Close`] aborts. The other
//! way round works the same (published ports when the guest has no network
//! interface): the host accepts, the guest dials. Guest ids are even, host
//! ids odd, so they never clash.
//!
//! Both sides run the same [`Mux`]: a thread reading the channel and routing
//! messages, plus two threads per connection (socket to channel, queue to
//! socket). Each connection's queue is bounded, so a peer that stops reading
//! holds up the channel rather than growing memory without limit.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};

/// The virtio-serial port name of the forwarding channel.
pub const PORT_NAME: &str = "org.agentvm.fwd";
/// The name under which the guest reaches the opened host ports.
pub const HOST_NAME: &str = "host.agentvm.internal";
/// The guest-local address [`HOST_NAME`] resolves to. A loopback address
/// (all of 127/8 is local), so it needs no interface and no network.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 2);
/// Connections open at once per VM; more are refused.
pub const MAX_CONNECTIONS: usize = 256;

/// Bytes per data message.
const CHUNK: usize = 64 * 1024;
/// Chunks queued per connection before the channel waits (4 MiB).
const QUEUE: usize = 64;
const HEADER_LEN: usize = 9;

/// Which end of the channel a [`Mux`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Guest,
    Host,
}

/// One message on the forwarding channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// A new connection to port `port` of the other side.
    Open { conn: u32, port: u16 },
    /// Bytes for the other end of the connection.
    Data { conn: u32, data: Vec<u8> },
    /// The sender will send no more data on this connection.
    Eof { conn: u32 },
    /// The connection is gone (refused, reset or failed); drop it.
    Close { conn: u32 },
}

mod kind {
    pub const OPEN: u8 = 1;
    pub const DATA: u8 = 2;
    pub const EOF: u8 = 3;
    pub const CLOSE: u8 = 4;
}

impl Msg {
    /// `kind: u8`, `conn: u32`, `len: u32` (little endian), payload.
    pub fn encode(&self) -> Vec<u8> {
        let (k, conn, payload): (u8, u32, &[u8]) = match self {
            Msg::Open { conn, port } => (kind::OPEN, *conn, &port.to_le_bytes()),
            Msg::Data { conn, data } => (kind::DATA, *conn, data),
            Msg::Eof { conn } => (kind::EOF, *conn, &[]),
            Msg::Close { conn } => (kind::CLOSE, *conn, &[]),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.push(k);
        out.extend_from_slice(&conn.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Reads one message; `Ok(None)` at a clean end of the channel.
    pub fn read_from(r: &mut impl Read) -> io::Result<Option<Msg>> {
        let mut header = [0u8; HEADER_LEN];
        match r.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let conn = u32::from_le_bytes(header[1..5].try_into().unwrap());
        let len = u32::from_le_bytes(header[5..9].try_into().unwrap()) as usize;
        if len > CHUNK {
            return Err(bad(format!("message of {len} bytes exceeds {CHUNK}")));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        Ok(Some(match header[0] {
            kind::OPEN => {
                let port: [u8; 2] = payload.as_slice().try_into().map_err(|_| bad("malformed open".into()))?;
                Msg::Open { conn, port: u16::from_le_bytes(port) }
            }
            kind::DATA => Msg::Data { conn, data: payload },
            kind::EOF => Msg::Eof { conn },
            kind::CLOSE => Msg::Close { conn },
            other => return Err(bad(format!("unknown message kind {other}"))),
        }))
    }
}

fn bad(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("forwarding channel: {why}"))
}

/// One end of a forwarded connection: a TCP socket, or a Unix socket for
/// connections served inside the launcher (the egress proxy).
#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.shutdown(how),
            Conn::Unix(s) => s.shutdown(how),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a connection's writer thread gets from the channel.
enum Chunk {
    Data(Vec<u8>),
    Eof,
    Close,
}

/// The channel's writing end, shared by every connection.
type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

/// One end of the forwarding channel.
#[derive(Clone)]
pub struct Mux {
    sink: Sink,
    conns: Arc<Mutex<HashMap<u32, SyncSender<Chunk>>>>,
    next_conn: Arc<AtomicU32>,
}

impl Mux {
    /// A mux for `side`, writing to `sink` (the channel's writing end).
    pub fn new(sink: Box<dyn Write + Send>, side: Side) -> Mux {
        let first = match side {
            Side::Guest => 0,
            Side::Host => 1,
        };
        Mux { sink: Arc::new(Mutex::new(sink)), conns: Arc::default(), next_conn: Arc::new(AtomicU32::new(first)) }
    }

    fn send(&self, msg: &Msg) -> io::Result<()> {
        let bytes = msg.encode();
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        sink.write_all(&bytes)?;
        sink.flush()
    }

    /// Accepts connections on `listener` (for the other side's port
    /// `port`) until the channel fails, announcing each to the other side.
    pub fn accept(&self, listener: TcpListener, port: u16) {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let conn = self.next_conn.fetch_add(2, Ordering::Relaxed);
            if self.conns.lock().unwrap().len() >= MAX_CONNECTIONS {
                let _ = stream.shutdown(Shutdown::Both);
                continue;
            }
            // Registered before the open goes out, so the host's answer
            // always finds the connection.
            let queue = self.register(conn);
            if self.send(&Msg::Open { conn, port }).is_err() {
                return;
            }
            self.pump(conn, Conn::Tcp(stream), queue);
        }
    }

    /// Reads the channel and routes its messages until it ends. `dial`
    /// answers an [`Msg::Open`]: it decides which ports may be reached;
    /// `None` means opens are refused.
    pub fn serve(
        &self,
        mut channel: impl Read,
        dial: Option<&dyn Fn(u16) -> io::Result<Conn>>,
    ) -> io::Result<()> {
        while let Some(msg) = Msg::read_from(&mut channel)? {
            match msg {
                Msg::Open { conn, port } => {
                    let known = self.conns.lock().unwrap().contains_key(&conn);
                    let full = self.conns.lock().unwrap().len() >= MAX_CONNECTIONS;
                    match dial.filter(|_| !known && !full).map(|d| d(port)) {
                        Some(Ok(stream)) => {
                            let queue = self.register(conn);
                            self.pump(conn, stream, queue);
                        }
                        _ if known => {}
                        _ => self.send(&Msg::Close { conn })?,
                    }
                }
                Msg::Data { conn, data } => self.deliver(conn, Chunk::Data(data)),
                Msg::Eof { conn } => self.deliver(conn, Chunk::Eof),
                Msg::Close { conn } => self.deliver(conn, Chunk::Close),
            }
        }
        Ok(())
    }

    fn register(&self, conn: u32) -> std::sync::mpsc::Receiver<Chunk> {
        let (tx, rx) = sync_channel(QUEUE);
        self.conns.lock().unwrap().insert(conn, tx);
        rx
    }

    fn deliver(&self, conn: u32, chunk: Chunk) {
        let tx = self.conns.lock().unwrap().get(&conn).cloned();
        // Unknown ids belong to connections already gone: drop the chunk.
        if let Some(tx) = tx {
            let _ = tx.send(chunk);
        }
    }

    /// Starts the two threads of one connection.
    fn pump(&self, conn: u32, stream: Conn, queue: std::sync::mpsc::Receiver<Chunk>) {
        let Ok(mut reader) = stream.try_clone() else {
            self.conns.lock().unwrap().remove(&conn);
            let _ = self.send(&Msg::Close { conn });
            return;
        };
        let me = self.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            let last = loop {
                match reader.read(&mut buf) {
                    Ok(0) => break Msg::Eof { conn },
                    Ok(n) => {
                        if me.send(&Msg::Data { conn, data: buf[..n].to_vec() }).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break Msg::Close { conn },
                }
            };
            let _ = me.send(&last);
        });
        let me = self.clone();
        std::thread::spawn(move || {
            let mut writer = stream;
            for chunk in queue.iter() {
                match chunk {
                    Chunk::Data(d) => {
                        if writer.write_all(&d).is_err() {
                            let _ = me.send(&Msg::Close { conn });
                            break;
                        }
                    }
                    Chunk::Eof => {
                        let _ = writer.shutdown(Shutdown::Write);
                        break;
                    }
                    Chunk::Close => {
                        let _ = writer.shutdown(Shutdown::Both);
                        break;
                    }
                }
            }
            me.conns.lock().unwrap().remove(&conn);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn messages_roundtrip() {
        let msgs = vec![
            Msg::Open { conn: 7, port: 5432 },
            Msg::Data { conn: 7, data: b"hello".to_vec() },
            Msg::Data { conn: 1, data: Vec::new() },
            Msg::Eof { conn: 7 },
            Msg::Close { conn: u32::MAX },
        ];
        let bytes: Vec<u8> = msgs.iter().flat_map(Msg::encode).collect();
        let mut r = &bytes[..];
        let mut got = Vec::new();
        while let Some(m) = Msg::read_from(&mut r).unwrap() {
            got.push(m);
        }
        assert_eq!(got, msgs);
    }

    #[test]
    fn oversized_and_unknown_messages_are_errors() {
        let mut big = vec![kind::DATA, 0, 0, 0, 0];
        big.extend_from_slice(&(CHUNK as u32 + 1).to_le_bytes());
        assert!(Msg::read_from(&mut &big[..]).is_err());
        let unknown = [9u8, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(Msg::read_from(&mut &unknown[..]).is_err());
        let short_open = [kind::OPEN, 0, 0, 0, 0, 1, 0, 0, 0, 5];
        assert!(Msg::read_from(&mut &short_open[..]).is_err());
    }

    /// A guest-side and a host-side mux joined by a socket pair, like the
    /// launcher and the guest init over the virtio-serial port.
    fn joined(allowed: u16, target: u16) -> (Mux, TcpListener) {
        let (g, h) = UnixStream::pair().unwrap();
        let guest = Mux::new(Box::new(g.try_clone().unwrap()), Side::Guest);
        let host = Mux::new(Box::new(h.try_clone().unwrap()), Side::Host);
        std::thread::spawn(move || {
            let dial = move |port: u16| {
                if port != allowed {
                    return Err(io::Error::from(io::ErrorKind::PermissionDenied));
                }
                TcpStream::connect(("127.0.0.1", target)).map(Conn::Tcp)
            };
            host.serve(h, Some(&dial)).unwrap();
        });
        let g2 = guest.clone();
        std::thread::spawn(move || g2.serve(g, None).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        (guest, listener)
    }

    #[test]
    fn a_connection_carries_both_ways_and_half_closes() {
        let service = TcpListener::bind("127.0.0.1:0").unwrap();
        let service_port = service.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = service.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(&[got.as_slice(), b" back"].concat()).unwrap();
        });
        let (guest, listener) = joined(5432, service_port);
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || guest.accept(listener, 5432));

        let mut c = TcpStream::connect(addr).unwrap();
        let big = vec![b'x'; 300_000];
        c.write_all(&big).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).unwrap();
        assert_eq!(answer.len(), big.len() + 5);
        assert!(answer.ends_with(b" back"));
    }

    #[test]
    fn a_port_the_host_refuses_closes_the_guest_connection() {
        // A live service, so only the port check can keep the guest out.
        let service = TcpListener::bind("127.0.0.1:0").unwrap();
        let service_port = service.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in service.incoming() {
                let _ = s.unwrap().write_all(b"secret");
            }
        });
        let (guest, listener) = joined(5432, service_port);
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || guest.accept(listener, 6000));
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 8];
        // Closed without data, not hanging: an orderly end or a reset, not a timeout.
        match c.read(&mut buf) {
            Ok(0) => {}
            Err(e) if !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            other => panic!("the refused connection is still open: {other:?}"),
        }
    }
}
