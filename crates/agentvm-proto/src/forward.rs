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
//! socket). What waits in the queues is bounded per connection
//! ([`CONN_QUEUE_BYTES`]) and for all of them together
//! ([`TOTAL_QUEUE_BYTES`]): when either is full, the mux stops reading the
//! channel until a socket takes some, so a peer that opens many connections
//! and sends into sockets that never read holds up the channel rather than
//! growing memory without limit.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};

/// The virtio-serial port name of the forwarding channel.
pub const PORT_NAME: &str = "org.agentvm.fwd";
/// The name under which the guest reaches the opened host ports.
pub const HOST_NAME: &str = "host.agentvm.internal";
/// The guest-local address [`HOST_NAME`] resolves to. A loopback address
/// (all of 127/8 is local), so it needs no interface and no network.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 2);
/// Connections open at once per VM; more are refused.
pub const MAX_CONNECTIONS: usize = 256;

/// Bytes queued for one connection's socket before the channel waits.
pub const CONN_QUEUE_BYTES: usize = 1 << 20;
/// Bytes queued for all connections together before the channel waits
/// (without it, [`MAX_CONNECTIONS`] full queues would be 256 MiB).
pub const TOTAL_QUEUE_BYTES: usize = 16 << 20;

/// Bytes per data message.
const CHUNK: usize = 64 * 1024;
/// Messages queued per connection, however small, before the channel waits.
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
        out.extend_from_slice(&header(k, conn, payload.len()));
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

fn header(k: u8, conn: u32, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = k;
    h[1..5].copy_from_slice(&conn.to_le_bytes());
    h[5..9].copy_from_slice(&(len as u32).to_le_bytes());
    h
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
    Data(Queued),
    Eof,
    Close,
}

/// Bytes waiting for a connection's socket. They count against the
/// connection's and the mux's budgets until written or dropped.
struct Queued {
    data: Vec<u8>,
    budgets: [Arc<Budget>; 2],
}

impl Drop for Queued {
    fn drop(&mut self) {
        for b in &self.budgets {
            b.give(self.data.len());
        }
    }
}

/// A number of bytes that may be queued: taking more than is left waits
/// until enough is given back.
struct Budget {
    used: Mutex<usize>,
    freed: Condvar,
    limit: usize,
}

impl Budget {
    fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget { used: Mutex::new(0), freed: Condvar::new(), limit })
    }

    fn take(&self, n: usize) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        // An empty budget lets anything through, so nothing waits forever.
        while *used > 0 && *used + n > self.limit {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
    }

    fn give(&self, n: usize) {
        *self.used.lock().unwrap_or_else(|e| e.into_inner()) -= n;
        self.freed.notify_all();
    }

    fn used(&self) -> usize {
        *self.used.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where the channel's messages for one connection go.
#[derive(Clone)]
struct Route {
    queue: SyncSender<Chunk>,
    budget: Arc<Budget>,
}

/// The channel's writing end, shared by every connection.
type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

/// One end of the forwarding channel.
#[derive(Clone)]
pub struct Mux {
    sink: Sink,
    conns: Arc<Mutex<HashMap<u32, Route>>>,
    next_conn: Arc<AtomicU32>,
    /// Bytes queued for all connections.
    budget: Arc<Budget>,
}

impl Mux {
    /// A mux for `side`, writing to `sink` (the channel's writing end).
    pub fn new(sink: Box<dyn Write + Send>, side: Side) -> Mux {
        let first = match side {
            Side::Guest => 0,
            Side::Host => 1,
        };
        Mux {
            sink: Arc::new(Mutex::new(sink)),
            conns: Arc::default(),
            next_conn: Arc::new(AtomicU32::new(first)),
            budget: Budget::new(TOTAL_QUEUE_BYTES),
        }
    }

    /// Bytes received from the channel and not yet written to their
    /// sockets, over all connections; at most [`TOTAL_QUEUE_BYTES`].
    pub fn queued_bytes(&self) -> usize {
        self.budget.used()
    }

    fn send(&self, msg: &Msg) -> io::Result<()> {
        self.send_bytes(&msg.encode())
    }

    fn send_bytes(&self, bytes: &[u8]) -> io::Result<()> {
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        sink.write_all(bytes)?;
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
    pub fn serve(&self, mut channel: impl Read, dial: Option<&dyn Fn(u16) -> io::Result<Conn>>) -> io::Result<()> {
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
                Msg::Data { conn, data } => self.deliver_data(conn, data),
                Msg::Eof { conn } => self.deliver(conn, Chunk::Eof),
                Msg::Close { conn } => self.deliver(conn, Chunk::Close),
            }
        }
        Ok(())
    }

    fn register(&self, conn: u32) -> Receiver<Chunk> {
        let (queue, rx) = sync_channel(QUEUE);
        self.conns.lock().unwrap().insert(conn, Route { queue, budget: Budget::new(CONN_QUEUE_BYTES) });
        rx
    }

    /// Queues the end of `conn` (an [`Chunk::Eof`] or [`Chunk::Close`]).
    fn deliver(&self, conn: u32, chunk: Chunk) {
        let route = self.conns.lock().unwrap().get(&conn).cloned();
        // Unknown ids belong to connections already gone: drop the chunk.
        if let Some(route) = route {
            // A send that fails drops the chunk, which gives its bytes back.
            let _ = route.queue.send(chunk);
        }
    }

    /// Queues data for `conn`, waiting while its connection's or the mux's
    /// budget is used up: the channel is not read meanwhile.
    fn deliver_data(&self, conn: u32, data: Vec<u8>) {
        let Some(route) = self.conns.lock().unwrap().get(&conn).cloned() else { return };
        route.budget.take(data.len());
        self.budget.take(data.len());
        let queued = Queued { data, budgets: [route.budget.clone(), self.budget.clone()] };
        let _ = route.queue.send(Chunk::Data(queued));
    }

    /// Starts the two threads of one connection.
    fn pump(&self, conn: u32, stream: Conn, queue: Receiver<Chunk>) {
        let Ok(mut reader) = stream.try_clone() else {
            self.conns.lock().unwrap().remove(&conn);
            let _ = self.send(&Msg::Close { conn });
            return;
        };
        let me = self.clone();
        std::thread::spawn(move || {
            // The message is built in place: one buffer per connection.
            let mut buf = vec![0u8; HEADER_LEN + CHUNK];
            let last = loop {
                match reader.read(&mut buf[HEADER_LEN..]) {
                    Ok(0) => break Msg::Eof { conn },
                    Ok(n) => {
                        buf[..HEADER_LEN].copy_from_slice(&header(kind::DATA, conn, n));
                        if me.send_bytes(&buf[..HEADER_LEN + n]).is_err() {
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
                        if writer.write_all(&d.data).is_err() {
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

    /// A host mux on one end of a socket pair, answering every open with a
    /// socket that nobody reads; the other end is the guest's, raw.
    fn host_with_unread_sockets() -> (Mux, UnixStream, Arc<Mutex<Vec<UnixStream>>>) {
        let (guest, host_end) = UnixStream::pair().unwrap();
        let host = Mux::new(Box::new(host_end.try_clone().unwrap()), Side::Host);
        let unread = Arc::new(Mutex::new(Vec::new()));
        let (h, kept) = (host.clone(), unread.clone());
        std::thread::spawn(move || {
            let dial = move |_port: u16| {
                let (ours, theirs) = UnixStream::pair()?;
                kept.lock().unwrap().push(theirs);
                Ok(Conn::Unix(ours))
            };
            let _ = h.serve(host_end, Some(&dial));
        });
        (host, guest, unread)
    }

    /// Opens `conns` connections from the raw guest end and sends into all of
    /// them until the host stops reading; never reads the channel. Returns
    /// the host's peak of queued bytes, checking each sample against `bound`.
    fn flood(host: &Mux, guest: &UnixStream, conns: u32, bound: usize) -> usize {
        use std::sync::atomic::AtomicU64;
        use std::time::{Duration, Instant};
        let sent = Arc::new(AtomicU64::new(0));
        let (mut g, counter) = (guest.try_clone().unwrap(), sent.clone());
        std::thread::spawn(move || {
            for i in 0..conns {
                g.write_all(&Msg::Open { conn: 2 * i, port: 1 }.encode()).unwrap();
            }
            let data = vec![b'x'; CHUNK];
            loop {
                for i in 0..conns {
                    if g.write_all(&Msg::Data { conn: 2 * i, data: data.clone() }.encode()).is_err() {
                        return;
                    }
                    counter.fetch_add(CHUNK as u64, Ordering::Relaxed);
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut last, mut peak) = (0, 0);
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let queued = host.queued_bytes();
            assert!(queued <= bound, "the host queued {queued} bytes, over {bound}");
            peak = peak.max(queued);
            let now = sent.load(Ordering::Relaxed);
            if now == last && now > 0 {
                return peak; // the guest's writes stall: backpressure
            }
            last = now;
            assert!(Instant::now() < deadline, "the guest's flood never stalled ({now} bytes sent)");
        }
    }

    #[test]
    fn a_guest_flooding_many_connections_cannot_make_the_host_queue_more_than_the_bound() {
        let (host, guest, unread) = host_with_unread_sockets();
        let peak = flood(&host, &guest, MAX_CONNECTIONS as u32, TOTAL_QUEUE_BYTES);
        assert!(peak > TOTAL_QUEUE_BYTES - CHUNK, "the flood never filled the queues: {peak} bytes");
        assert_eq!(unread.lock().unwrap().len(), MAX_CONNECTIONS);
        guest.shutdown(Shutdown::Both).unwrap();
        unread.lock().unwrap().clear();
    }

    #[test]
    fn one_connection_queues_at_most_its_own_bound() {
        let (host, guest, unread) = host_with_unread_sockets();
        let peak = flood(&host, &guest, 1, CONN_QUEUE_BYTES);
        assert!(peak > CONN_QUEUE_BYTES - CHUNK, "the flood never filled the queue: {peak} bytes");
        guest.shutdown(Shutdown::Both).unwrap();
        unread.lock().unwrap().clear();
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
