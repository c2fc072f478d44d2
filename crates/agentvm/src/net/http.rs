//! Bounded HTTP/1.1 for the egress proxy and the shield. Heads are parsed
//! with httparse; bodies are streamed through fixed buffers, never held
//! whole; every size a peer controls has a limit (head, header count,
//! chunk-size line, trailers, request body) and sizes are parsed without
//! overflow. A head must arrive before a deadline, not just byte by byte.

use std::io::{self, BufRead, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Longest head (request or response) read.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (size, extensions, CRLF).
const MAX_CHUNK_LINE: u64 = 4096;
/// Most bytes of trailer fields after the last chunk.
const MAX_TRAILERS: u64 = 16 * 1024;
/// Largest request body the proxy forwards.
pub const MAX_REQUEST_BODY: u64 = 1 << 30;
/// How much of a stream is read at once.
const READ_SIZE: usize = 16 * 1024;

/// How long a client may take to send a whole request head or TLS hello.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(15);
/// How long a request body may pause.
pub const BODY_IDLE: Duration = Duration::from_secs(60);
/// An HTTP message that cannot be relayed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the head did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("the head is longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    #[error("malformed head: {0}")]
    Malformed(#[from] httparse::Error),
    #[error("the connection closed before the end of the head")]
    ClosedEarly,
    /// What is wrong with the framing headers (no error lies under it).
    #[error("bad body framing: {0}")]
    Framing(String),
    #[error("the body is longer than the limit of {0} bytes")]
    BodyTooLarge(u64),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One header field, as received (the value may hold any byte httparse lets through).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

impl Header {
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

/// A request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub headers: Vec<Header>,
}

/// A response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub code: u16,
    pub reason: String,
    pub headers: Vec<Header>,
}

fn headers_of(parsed: &[httparse::Header]) -> Vec<Header> {
    parsed.iter().map(|h| Header { name: h.name.to_string(), value: h.value.to_vec() }).collect()
}

/// `host` or `host:port` (`[v6]:port`), as a Host header says it.
pub fn authority(host: &str, port: u16, default_port: u16) -> String {
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    if port == default_port {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// Answers a client with an error of agentvm's own (`status`, and `why` as
/// the body) and no more: the connection is to end.
pub fn write_refusal<W: Write>(client: &mut W, status: u16, why: &str) {
    let reason = match status {
        403 => "Forbidden",
        408 => "Request Timeout",
        413 => "Content Too Large",
        502 => "Bad Gateway",
        _ => "Bad Request",
    };
    let body = format!("agentvm: {why}\n");
    let _ = write!(
        client,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.flush();
}

/// A request head at the start of `buf` and its length; `None` until it is whole.
pub fn parse_request(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf)? {
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(n) => n,
    };
    let head = RequestHead {
        method: req.method.unwrap_or_default().to_string(),
        target: req.path.unwrap_or_default().to_string(),
        minor: req.version.unwrap_or(1),
        headers: headers_of(req.headers),
    };
    Ok(Some((head, len)))
}

/// A response head at the start of `buf` and its length; `None` until it is whole.
pub fn parse_response(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HttpError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf)? {
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(n) => n,
    };
    let head = ResponseHead {
        code: resp.code.unwrap_or_default(),
        reason: resp.reason.unwrap_or_default().to_string(),
        headers: headers_of(resp.headers),
    };
    Ok(Some((head, len)))
}

/// [`parse_request`] or [`parse_response`].
pub type HeadParser<T> = fn(&[u8]) -> Result<Option<(T, usize)>, HttpError>;

/// A socket whose reads can time out.
pub trait ReadTimeout {
    fn set_read_timeout(&self, limit: Option<Duration>) -> io::Result<()>;
}

impl ReadTimeout for UnixStream {
    fn set_read_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, limit)
    }
}

impl ReadTimeout for TcpStream {
    fn set_read_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, limit)
    }
}

impl<C, S: Read + Write + ReadTimeout> ReadTimeout for rustls::StreamOwned<C, S> {
    fn set_read_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(limit)
    }
}

impl<S: ReadTimeout> ReadTimeout for Peer<S> {
    fn set_read_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(limit)
    }
}

/// One side of a connection with the bytes read from it but not used yet.
pub struct Peer<S> {
    pub stream: S,
    buf: Vec<u8>,
    start: usize,
}

impl<S: Read + ReadTimeout> Peer<S> {
    pub fn new(stream: S) -> Peer<S> {
        Peer { stream, buf: Vec::new(), start: 0 }
    }

    /// Bytes read but not consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Reads once more into the buffer, giving up at `deadline` (none:
    /// wait as long as it takes). Returns how many bytes came (0: the end).
    pub fn read_more(&mut self, deadline: Option<Instant>) -> Result<usize, HttpError> {
        let limit = match deadline {
            None => None,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(HttpError::Timeout(Duration::ZERO));
                }
                Some(left)
            }
        };
        self.stream.set_read_timeout(limit)?;
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                Err(HttpError::Timeout(limit.unwrap_or_default()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads a whole head with `parse`, within `deadline`, and consumes it;
    /// what follows it stays buffered. Reads are left without a time limit.
    pub fn read_head<T>(&mut self, parse: HeadParser<T>, deadline: Option<Instant>) -> Result<T, HttpError> {
        let started = Instant::now();
        let head = loop {
            if let Some((head, len)) = parse(self.buffered())? {
                self.start += len;
                break head;
            }
            if self.buffered().len() > MAX_HEAD {
                return Err(HttpError::HeadTooLong);
            }
            match self.read_more(deadline) {
                Ok(0) => return Err(HttpError::ClosedEarly),
                Ok(_) => {}
                Err(HttpError::Timeout(_)) => return Err(HttpError::Timeout(started.elapsed())),
                Err(e) => return Err(e),
            }
        };
        self.stream.set_read_timeout(None)?;
        Ok(head)
    }
}

impl<S: Read> Read for Peer<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start < self.buf.len() {
            let n = out.len().min(self.buf.len() - self.start);
            out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
            self.start += n;
            return Ok(n);
        }
        self.stream.read(out)
    }
}

impl<S: Read> BufRead for Peer<S> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.buf.resize(READ_SIZE, 0);
            let got = self.stream.read(&mut self.buf);
            self.buf.truncate(*got.as_ref().unwrap_or(&0));
            got?;
        }
        Ok(&self.buf[self.start..])
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
    }
}

impl<S: Write> Write for Peer<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.stream.write(data)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

fn framing_headers(headers: &[Header]) -> (Vec<&Header>, Vec<&Header>) {
    let te = headers.iter().filter(|h| h.is("transfer-encoding")).collect();
    let cl = headers.iter().filter(|h| h.is("content-length")).collect();
    (te, cl)
}

/// A Content-Length value: digits only, no sign, no list.
fn content_length(value: &[u8]) -> Result<u64, HttpError> {
    let bad = || HttpError::Framing(format!("Content-Length {:?} is not a length", String::from_utf8_lossy(value)));
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    std::str::from_utf8(value).map_err(|_| bad())?.parse().map_err(|_| bad())
}

/// The body of a request: only one of Content-Length and
/// `Transfer-Encoding: chunked`, each at most once, so that no server down
/// the line can read the body differently (request smuggling).
pub fn request_body(headers: &[Header]) -> Result<BodyKind, HttpError> {
    match framing_headers(headers) {
        (te, cl) if te.is_empty() && cl.is_empty() => Ok(BodyKind::Empty),
        (te, cl) if te.is_empty() && cl.len() == 1 => Ok(BodyKind::Length(content_length(&cl[0].value)?)),
        (te, cl) if te.len() == 1 && cl.is_empty() => {
            if te[0].value.eq_ignore_ascii_case(b"chunked") {
                Ok(BodyKind::Chunked)
            } else {
                Err(HttpError::Framing(format!(
                    "Transfer-Encoding {:?} is not supported (only chunked)",
                    String::from_utf8_lossy(&te[0].value)
                )))
            }
        }
        _ => Err(HttpError::Framing("more than one of Content-Length and Transfer-Encoding".into())),
    }
}

/// The body of a response to a `method` request (RFC 9112, section 6.3).
pub fn response_body(head: &ResponseHead, method: &str) -> Result<BodyKind, HttpError> {
    if method.eq_ignore_ascii_case("HEAD") || head.code < 200 || head.code == 204 || head.code == 304 {
        return Ok(BodyKind::Empty);
    }
    let (te, cl) = framing_headers(&head.headers);
    if let Some(last) = te.last() {
        let last_coding = last.value.rsplit(|b| *b == b',').next().unwrap_or_default();
        return Ok(if last_coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            BodyKind::Chunked
        } else {
            BodyKind::UntilClose
        });
    }
    match cl.as_slice() {
        [] => Ok(BodyKind::UntilClose),
        [one] => Ok(BodyKind::Length(content_length(&one.value)?)),
        _ => Err(HttpError::Framing("more than one Content-Length".into())),
    }
}

/// The size of a chunk-size line (hex, then maybe `;extensions`, CRLF).
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let bad = || {
        io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk-size line {:?}", String::from_utf8_lossy(line)))
    };
    let line = line.strip_suffix(b"\r\n").ok_or_else(bad)?;
    if line.contains(&b'\r') || line.contains(&b'\n') {
        return Err(bad());
    }
    let size = line.split(|b| *b == b';').next().unwrap_or_default();
    let size = size.trim_ascii_end();
    // 16 hex digits fill a u64: more would overflow.
    if size.is_empty() || size.len() > 16 || !size.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad());
    }
    u64::from_str_radix(std::str::from_utf8(size).map_err(|_| bad())?, 16).map_err(|_| bad())
}

/// One line ending in LF, at most `max` bytes; longer is an error.
fn read_line(from: &mut impl BufRead, max: u64, what: &str) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    from.take(max).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        let why = if line.len() as u64 >= max {
            format!("{what} longer than {max} bytes")
        } else {
            format!("{what} cut short")
        };
        return Err(io::Error::new(io::ErrorKind::InvalidData, why));
    }
    Ok(line)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    UntilClose,
    Done,
}

/// Reads a body's content (chunked framing removed), checking its framing
/// and, with a limit, its total size.
pub struct BodyReader<'a, R> {
    from: &'a mut R,
    state: State,
    total: u64,
    limit: Option<u64>,
}

impl<'a, R: BufRead> BodyReader<'a, R> {
    /// A reader of a `kind` body; a Content-Length over `limit` is refused at once.
    pub fn new(from: &'a mut R, kind: BodyKind, limit: Option<u64>) -> Result<BodyReader<'a, R>, HttpError> {
        let state = match kind {
            BodyKind::Empty => State::Done,
            BodyKind::Length(n) if limit.is_some_and(|l| n > l) => {
                return Err(HttpError::BodyTooLarge(limit.unwrap_or(0)))
            }
            BodyKind::Length(n) => State::Length(n),
            BodyKind::Chunked => State::ChunkSize,
            BodyKind::UntilClose => State::UntilClose,
        };
        Ok(BodyReader { from, state, total: 0, limit })
    }

    fn data(&mut self, out: &mut [u8], left: u64) -> io::Result<usize> {
        let want = out.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.from.read(&mut out[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the body ended before its announced size"));
        }
        self.total += n as u64;
        if let Some(limit) = self.limit.filter(|l| self.total > *l) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, HttpError::BodyTooLarge(limit)));
        }
        Ok(n)
    }

    fn trailers(&mut self) -> io::Result<()> {
        let mut budget = MAX_TRAILERS;
        loop {
            let line = read_line(self.from, budget, "trailer section")?;
            if line == b"\r\n" {
                return Ok(());
            }
            budget -= line.len() as u64;
        }
    }
}

impl<R: BufRead> Read for BodyReader<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Done | State::Length(0) => {
                    self.state = State::Done;
                    return Ok(0);
                }
                State::Length(left) => {
                    let n = self.data(out, left)?;
                    self.state = State::Length(left - n as u64);
                    return Ok(n);
                }
                State::ChunkSize => {
                    let size = chunk_size(&read_line(self.from, MAX_CHUNK_LINE, "chunk-size line")?)?;
                    self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                }
                State::ChunkData(left) => {
                    let n = self.data(out, left)?;
                    let left = left - n as u64;
                    self.state = if left == 0 { State::ChunkEnd } else { State::ChunkData(left) };
                    return Ok(n);
                }
                State::ChunkEnd => {
                    if read_line(self.from, 2, "chunk end")? != b"\r\n" {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk data longer than its size"));
                    }
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    self.trailers()?;
                    self.state = State::Done;
                }
                State::UntilClose => match self.from.read(out) {
                    Ok(0) => self.state = State::Done,
                    Ok(n) => return Ok(n),
                    // A TLS peer that closes without close_notify ends the body too.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => self.state = State::Done,
                    Err(e) => return Err(e),
                },
            }
        }
    }
}

/// Writes a body with `kind`'s framing: chunked data as chunks (ended by
/// [`Framer::finish`]), anything else as is. Flushes each write, so that
/// streamed responses arrive as they come.
pub struct Framer<W: Write> {
    to: W,
    chunked: bool,
}

impl<W: Write> Framer<W> {
    pub fn new(to: W, kind: BodyKind) -> Framer<W> {
        Framer { to, chunked: kind == BodyKind::Chunked }
    }

    pub fn finish(mut self) -> io::Result<W> {
        if self.chunked {
            self.to.write_all(b"0\r\n\r\n")?;
        }
        self.to.flush()?;
        Ok(self.to)
    }
}

impl<W: Write> Write for Framer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if self.chunked {
            write!(self.to, "{:x}\r\n", data.len())?;
            self.to.write_all(data)?;
            self.to.write_all(b"\r\n")?;
        } else {
            self.to.write_all(data)?;
        }
        self.to.flush()?;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.to.flush()
    }
}

/// Replaces each secret in a byte stream by a mask of the same length (so
/// lengths and framing stay right), also where a secret spans two writes:
/// a tail that could begin a secret is held back until it can be decided.
pub struct Redactor<W: Write> {
    to: W,
    secrets: Vec<Vec<u8>>,
    held: Vec<u8>,
}

/// What a secret of `len` bytes becomes.
pub fn mask(len: usize) -> Vec<u8> {
    b"[agentvm: redacted]".iter().copied().chain(std::iter::repeat(b'*')).take(len).collect()
}

impl<W: Write> Redactor<W> {
    pub fn new(to: W, secrets: &[&[u8]]) -> Redactor<W> {
        let secrets = secrets.iter().filter(|s| !s.is_empty()).map(|s| s.to_vec()).collect();
        Redactor { to, secrets, held: Vec::new() }
    }

    /// Emits what can be decided; at the end (`last`), everything.
    fn drain(&mut self, last: bool) -> io::Result<()> {
        let mut out = Vec::with_capacity(self.held.len());
        let mut i = 0;
        'scan: while i < self.held.len() {
            let rest = &self.held[i..];
            for s in &self.secrets {
                if rest.starts_with(s) {
                    out.extend_from_slice(&mask(s.len()));
                    i += s.len();
                    continue 'scan;
                }
                if !last && s.starts_with(rest) {
                    break 'scan; // maybe the start of a secret: wait for more
                }
            }
            out.push(self.held[i]);
            i += 1;
        }
        self.held.drain(..i);
        self.to.write_all(&out)
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.drain(true)?;
        Ok(self.to)
    }
}

impl<W: Write> Write for Redactor<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.held.extend_from_slice(data);
        self.drain(false)?;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.to.flush()
    }
}

/// Copies a `kind` body from `from` to `to` with the same kind of framing
/// (chunked bodies are re-chunked, so the receiver sees only framing we
/// wrote), masking `secrets` in its content. Returns the content's size.
pub fn copy_body(
    from: &mut impl BufRead,
    to: &mut impl Write,
    kind: BodyKind,
    limit: Option<u64>,
    secrets: &[&[u8]],
) -> Result<u64, HttpError> {
    copy_body_as(from, kind, to, kind, limit, secrets)
}

/// As [`copy_body`], written with `out_kind`'s framing.
pub fn copy_body_as(
    from: &mut impl BufRead,
    kind: BodyKind,
    to: &mut impl Write,
    out_kind: BodyKind,
    limit: Option<u64>,
    secrets: &[&[u8]],
) -> Result<u64, HttpError> {
    let mut body = BodyReader::new(from, kind, limit)?;
    let mut out = Redactor::new(Framer::new(to, out_kind), secrets);
    let n = io::copy(&mut body, &mut out)?;
    out.finish()?.finish()?;
    Ok(n)
}

/// Appends `name: value` and CRLF.
pub fn put_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The framing header for `kind`, if it needs one.
pub fn put_framing(out: &mut Vec<u8>, kind: BodyKind) {
    match kind {
        BodyKind::Length(n) => put_header(out, "Content-Length", n.to_string().as_bytes()),
        BodyKind::Chunked => put_header(out, "Transfer-Encoding", b"chunked"),
        BodyKind::Empty | BodyKind::UntilClose => {}
    }
}

/// Whether a header is about this hop only or about framing, which the
/// proxy writes itself.
pub fn is_hop_header(h: &Header) -> bool {
    const HOP: [&str; 10] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "upgrade",
        "trailer",
        "expect",
        "content-length",
        "transfer-encoding",
    ];
    HOP.iter().any(|n| h.is(n))
}

/// A response head to pass on: `kind`'s framing (ours), no hop-by-hop
/// headers, `Connection: close`.
pub fn response_head_to_pass_on(resp: &ResponseHead, kind: BodyKind) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", resp.code, resp.reason).into_bytes();
    for h in &resp.headers {
        // A bodiless response keeps its Content-Length (it describes, not delimits).
        if !is_hop_header(h) || (kind == BodyKind::Empty && h.is("content-length")) {
            put_header(&mut out, &h.name, &h.value);
        }
    }
    put_framing(&mut out, kind);
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

/// Whether the request asks for `100 Continue` before sending its body.
pub fn expects_continue(head: &RequestHead) -> bool {
    head.minor >= 1 && head.headers.iter().any(|h| h.is("expect") && h.value.eq_ignore_ascii_case(b"100-continue"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, value: &str) -> Header {
        Header { name: name.into(), value: value.into() }
    }

    #[test]
    fn authorities_bracket_v6_and_drop_the_default_port() {
        assert_eq!(authority("::1", 8080, 80), "[::1]:8080");
        assert_eq!(authority("a.com", 443, 443), "a.com");
    }

    #[test]
    fn heads_parse_with_httparse_once_whole() {
        assert!(parse_request(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
        let (head, len) =
            parse_request(b"CONNECT a.com:443 HTTP/1.1\r\nHost:  a.com:443  \r\n\r\nxyz").unwrap().unwrap();
        assert_eq!((head.method.as_str(), head.target.as_str(), head.minor, len), ("CONNECT", "a.com:443", 1, 50));
        assert_eq!(head.headers, vec![h("Host", "a.com:443")]);
        assert!(parse_request(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n").is_err());
        assert!(parse_request(b"GET /\x1b[2J HTTP/1.1\r\n\r\n").is_err(), "control bytes in the target");
        let many: String = (0..200).map(|i| format!("h{i}: v\r\n")).collect();
        assert!(parse_request(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).is_err(), "too many headers");
        let (resp, _) = parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\n").unwrap().unwrap();
        assert_eq!((resp.code, resp.reason.as_str()), (404, "Not Found"));
    }

    /// A reader that gives `data` a few bytes at a time, then never ends.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = out.len().min(3).min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "nothing yet"));
            }
            Ok(n)
        }
    }

    impl ReadTimeout for Trickle {
        fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_head_must_arrive_before_its_deadline() {
        let mut p = Peer::new(Trickle { data: b"GET http://a/ HTTP/1.1\r\nHost: a\r\n".to_vec(), pos: 0 });
        let deadline = Instant::now() + Duration::from_millis(50);
        assert!(matches!(p.read_head(parse_request, Some(deadline)), Err(HttpError::Timeout(_))));
        let mut p = Peer::new(Trickle { data: b"GET http://a/ HTTP/1.1\r\n\r\nrest".to_vec(), pos: 0 });
        let head = p.read_head(parse_request, Some(Instant::now() + Duration::from_secs(5))).unwrap();
        assert_eq!(head.target, "http://a/");
        let mut endless = Peer::new(Trickle { data: vec![b'a'; 2 * MAX_HEAD], pos: 0 });
        assert!(matches!(
            endless.read_head(parse_request, None),
            Err(HttpError::Malformed(_) | HttpError::HeadTooLong)
        ));
    }

    #[test]
    fn request_framing_is_one_unambiguous_header() {
        assert_eq!(request_body(&[]).unwrap(), BodyKind::Empty);
        assert_eq!(request_body(&[h("content-length", "12")]).unwrap(), BodyKind::Length(12));
        assert_eq!(request_body(&[h("Transfer-Encoding", "Chunked")]).unwrap(), BodyKind::Chunked);
        for bad in [
            vec![h("content-length", "12"), h("transfer-encoding", "chunked")],
            vec![h("content-length", "12"), h("content-length", "12")],
            vec![h("transfer-encoding", "gzip, chunked")],
            vec![h("content-length", "-1")],
            vec![h("content-length", "+1")],
            vec![h("content-length", "99999999999999999999")],
        ] {
            assert!(request_body(&bad).is_err(), "{bad:?}");
        }
        let resp = |code, headers| ResponseHead { code, reason: String::new(), headers };
        assert_eq!(response_body(&resp(200, vec![h("content-length", "5")]), "HEAD").unwrap(), BodyKind::Empty);
        assert_eq!(response_body(&resp(204, vec![]), "GET").unwrap(), BodyKind::Empty);
        assert_eq!(
            response_body(&resp(200, vec![h("transfer-encoding", "gzip, chunked")]), "GET").unwrap(),
            BodyKind::Chunked
        );
        assert_eq!(response_body(&resp(200, vec![]), "GET").unwrap(), BodyKind::UntilClose);
    }

    fn decode(body: &[u8], kind: BodyKind, limit: Option<u64>) -> Result<(Vec<u8>, Vec<u8>), String> {
        let mut from = io::BufReader::with_capacity(7, body);
        let mut out = Vec::new();
        copy_body(&mut from, &mut out, kind, limit, &[]).map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        from.read_to_end(&mut rest).unwrap();
        Ok((out, rest))
    }

    #[test]
    fn chunked_bodies_are_rechunked_up_to_their_end_only() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let (out, rest) = decode(body, BodyKind::Chunked, None).unwrap();
        assert!(out.ends_with(b"\r\n0\r\n\r\n") && !out.windows(3).any(|w| w == b"ext"), "{out:?}");
        let mut content = Vec::new();
        BodyReader::new(&mut &out[..], BodyKind::Chunked, None).unwrap().read_to_end(&mut content).unwrap();
        assert_eq!(content, b"Wikipedia");
        assert_eq!(rest, b"NEXT", "what follows the body is left unread");
        assert_eq!(decode(b"0\r\n\r\n", BodyKind::Chunked, None).unwrap().0, b"0\r\n\r\n");
        let (out, rest) = decode(b"0123456789", BodyKind::Length(4), None).unwrap();
        assert_eq!((out.as_slice(), rest.as_slice()), (&b"0123"[..], &b"456789"[..]));
        for bad in [&b"4\r\nWi"[..], b"4\r\nWikiXX\r\n0\r\n\r\n", b"-4\r\nWiki\r\n", b"x\r\n", b"4\nWiki\r\n0\r\n\r\n"]
        {
            assert!(decode(bad, BodyKind::Chunked, None).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(decode(b"012", BodyKind::Length(4), None).is_err());
        assert!(decode(b"0123456789", BodyKind::Length(10), Some(4)).unwrap_err().contains("limit"));
    }

    /// A reader of `prefix` followed by endless `fill` bytes, that counts
    /// what it gave.
    struct Endless {
        prefix: Vec<u8>,
        fill: u8,
        given: u64,
    }

    impl Read for Endless {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let start = (self.given as usize).min(self.prefix.len());
            let from_prefix = (self.prefix.len() - start).min(out.len());
            out[..from_prefix].copy_from_slice(&self.prefix[start..start + from_prefix]);
            out[from_prefix..].fill(self.fill);
            self.given += out.len() as u64;
            Ok(out.len())
        }
    }

    /// The chunked bomb: a 7fffffffff-byte chunk and an endless stream of
    /// data. Copying streams it (the writer sees data long before the chunk
    /// would end) and stops at the limit; endless size lines and trailers
    /// stop at theirs.
    #[test]
    fn endless_chunks_lines_and_trailers_end_in_an_error_without_buffering() {
        const LIMIT: u64 = 4 << 20;
        let mut bomb = io::BufReader::new(Endless { prefix: b"7fffffffff\r\n".to_vec(), fill: b'x', given: 0 });
        let mut sink = io::sink();
        let err = copy_body(&mut bomb, &mut sink, BodyKind::Chunked, Some(LIMIT), &[]).unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
        assert!(bomb.get_ref().given < LIMIT + 64 * 1024, "read {} bytes for a limit of {LIMIT}", bomb.get_ref().given);

        let mut written = Vec::new();
        let mut bomb = io::BufReader::new(Endless { prefix: b"7fffffffff\r\n".to_vec(), fill: b'x', given: 0 });
        let mut body = BodyReader::new(&mut bomb, BodyKind::Chunked, None).unwrap();
        let mut buf = [0u8; 1024];
        for _ in 0..100 {
            let n = body.read(&mut buf).unwrap();
            written.extend_from_slice(&buf[..n]);
        }
        assert!(written.len() >= 100, "the chunk's data is streamed, not held until its end");

        let mut long_size = io::BufReader::new(Endless { prefix: Vec::new(), fill: b'f', given: 0 });
        let err = copy_body(&mut long_size, &mut io::sink(), BodyKind::Chunked, None, &[]).unwrap_err();
        assert!(err.to_string().contains("chunk-size line longer"), "{err}");
        assert!(long_size.get_ref().given < 64 * 1024);

        let mut trailers = io::BufReader::new(Endless { prefix: b"0\r\n".to_vec(), fill: b't', given: 0 });
        let err = copy_body(&mut trailers, &mut io::sink(), BodyKind::Chunked, None, &[]).unwrap_err();
        assert!(err.to_string().contains("trailer section longer"), "{err}");
        assert!(decode(b"10000000000000000\r\n", BodyKind::Chunked, None).is_err(), "17 hex digits overflow");
    }

    #[test]
    fn secrets_are_masked_across_writes_and_chunks() {
        let secret: &[u8] = b"sk-real-0123456789abcdef";
        let masked = String::from_utf8(mask(secret.len())).unwrap();
        assert_eq!(masked, "[agentvm: redacted]*****");
        let mut r = Redactor::new(Vec::new(), &[secret]);
        for piece in
            [&b"echo: sk-re"[..], b"al-01234", b"56789abcdef and sk-", b"rea", b" done sk-real-0123456789abcdef"]
        {
            r.write_all(piece).unwrap();
        }
        let text = String::from_utf8(r.finish().unwrap()).unwrap();
        assert_eq!(text, format!("echo: {masked} and sk-rea done {masked}"));

        let body = b"a\r\nkey: sk-re\r\n13\r\nal-0123456789abcdef\r\n0\r\n\r\n";
        let mut rechunked = Vec::new();
        copy_body(&mut &body[..], &mut rechunked, BodyKind::Chunked, None, &[secret]).unwrap();
        let mut plain = Vec::new();
        BodyReader::new(&mut &rechunked[..], BodyKind::Chunked, None).unwrap().read_to_end(&mut plain).unwrap();
        assert_eq!(String::from_utf8(plain).unwrap(), format!("key: {masked}"));
    }
}
