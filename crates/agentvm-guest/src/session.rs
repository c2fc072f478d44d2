//! One program's side of a relay: what goes to its stdin, what comes from
//! its output streams, and its exit status. The main program and every exec
//! session each have one.

use crate::program::{exit_code, Child};
use crate::sys;
use agentvm_proto::Frame;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long the program's output may stay silent after it exited before we
/// stop waiting for it (a background process may hold the pipes open).
const DRAIN_SILENCE: Duration = Duration::from_millis(300);
/// The longest we keep relaying output after the program exited.
const DRAIN_MAX: Duration = Duration::from_secs(3);
/// Stop taking stdin from the host while this much is still unwritten.
const STDIN_HIGH_WATER: usize = 1 << 20;
/// Size of one read from the program's output.
const CHUNK: usize = 32 * 1024;
/// The terminal's end-of-file character (^D).
const VEOF: u8 = 0x04;

/// Bytes on their way to the program's stdin, and whether EOF follows them.
#[derive(Debug, Default)]
pub struct InputBuffer {
    buf: Vec<u8>,
    eof: bool,
}

impl InputBuffer {
    /// Queues bytes (ignored after EOF).
    pub fn push(&mut self, data: &[u8]) {
        if !self.eof {
            self.buf.extend_from_slice(data);
        }
    }

    /// Marks the end of input: the stdin pipe closes once the bytes are out.
    pub fn close(&mut self) {
        self.eof = true;
    }

    /// Unwritten bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the writer has something to do (bytes, or closing).
    pub fn wants_write(&self) -> bool {
        !self.buf.is_empty() || self.eof
    }

    /// Writes as much as `write` takes. `Ok(true)` once everything is out
    /// and EOF was requested (then the stdin should be closed).
    pub fn flush(&mut self, mut write: impl FnMut(&[u8]) -> io::Result<usize>) -> io::Result<bool> {
        while !self.buf.is_empty() {
            match write(&self.buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.buf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(self.buf.is_empty() && self.eof)
    }
}

/// One of the program's output streams.
struct Output {
    fd: OwnedFd,
    stderr: bool,
}

impl Output {
    fn frame(&self, data: &[u8]) -> Frame {
        if self.stderr {
            Frame::Stderr(data.to_vec())
        } else {
            Frame::Stdout(data.to_vec())
        }
    }
}

/// Which of a session's descriptors a poll entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Output stream `i` (stdout, then stderr): readable.
    Output(usize),
    /// The program's stdin: writable.
    Stdin,
}

/// A running program and its streams.
pub struct Session {
    pid: libc::pid_t,
    tty: bool,
    stdin: Option<OwnedFd>,
    input: InputBuffer,
    /// `None` once a stream reached its end.
    outputs: Vec<Option<Output>>,
    status: Option<i32>,
    exited_at: Option<Instant>,
    last_output: Instant,
}

impl Session {
    /// Takes over a started program.
    pub fn new(child: Child) -> Session {
        let mut outputs = vec![Some(Output { fd: child.stdout, stderr: false })];
        if let Some(fd) = child.stderr {
            outputs.push(Some(Output { fd, stderr: true }));
        }
        Session {
            pid: child.pid,
            tty: child.tty,
            stdin: Some(child.stdin),
            input: InputBuffer::default(),
            outputs,
            status: None,
            exited_at: None,
            last_output: Instant::now(),
        }
    }

    /// The program's pid (also its process group).
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The exit code, once the program was reaped.
    pub fn status(&self) -> Option<i32> {
        self.status
    }

    /// Records the program's wait status.
    pub fn exited(&mut self, status: libc::c_int) {
        self.status = Some(exit_code(status));
        self.exited_at = Some(Instant::now());
        self.last_output = Instant::now();
    }

    /// The exit code once the program exited and its output is drained (or
    /// waiting for the rest took too long).
    pub fn finished(&self, now: Instant) -> Option<i32> {
        let (code, at) = (self.status?, self.exited_at?);
        let deadline = (self.last_output + DRAIN_SILENCE).min(at + DRAIN_MAX);
        (self.outputs.iter().all(Option::is_none) || now >= deadline).then_some(code)
    }

    /// How long until [`Session::finished`] may change with time alone.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        let at = self.exited_at?;
        let deadline = (self.last_output + DRAIN_SILENCE).min(at + DRAIN_MAX);
        Some(deadline.saturating_duration_since(now))
    }

    /// Whether more input from the host can be taken now.
    pub fn wants_input(&self) -> bool {
        self.input.len() < STDIN_HIGH_WATER
    }

    /// Adds the descriptors to poll: the outputs (if `read_output`) and the
    /// stdin while something waits to be written.
    pub fn poll_fds(&self, read_output: bool, out: &mut Vec<(libc::pollfd, Slot)>) {
        if read_output {
            for (i, o) in self.outputs.iter().enumerate() {
                if let Some(o) = o {
                    out.push((pollfd(o.fd.as_raw_fd(), libc::POLLIN), Slot::Output(i)));
                }
            }
        }
        if let Some(fd) = &self.stdin {
            if self.input.wants_write() {
                out.push((pollfd(fd.as_raw_fd(), libc::POLLOUT), Slot::Stdin));
            }
        }
    }

    /// Handles a ready descriptor; returns a frame for the host, if any.
    pub fn ready(&mut self, slot: Slot) -> Option<Frame> {
        match slot {
            Slot::Stdin => {
                self.feed_stdin();
                None
            }
            Slot::Output(i) => self.read_output(i),
        }
    }

    /// Applies a frame from the host.
    pub fn on_host_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Stdin(data) if self.stdin.is_some() => self.input.push(&data),
            Frame::StdinEof if self.tty => self.input.push(&[VEOF]),
            Frame::StdinEof => self.input.close(),
            Frame::Resize { rows, cols } if self.tty => {
                if let Some(fd) = &self.stdin {
                    let _ = sys::set_winsize(fd.as_raw_fd(), rows, cols);
                }
            }
            Frame::Signal(sig) if sig > 0 && i32::from(sig) <= libc::SIGRTMAX() => {
                self.signal(i32::from(sig));
            }
            _ => {}
        }
        if self.input.wants_write() {
            self.feed_stdin();
        }
    }

    /// Sends `sig` to the program's process group (if it still runs).
    pub fn signal(&self, sig: i32) {
        if self.status.is_none() {
            let _ = sys::kill(-self.pid, sig);
        }
    }

    /// Reads one chunk of output stream `i`; drops the stream at its end.
    fn read_output(&mut self, i: usize) -> Option<Frame> {
        let out = self.outputs.get(i)?.as_ref()?;
        let mut buf = vec![0u8; CHUNK];
        match sys::read(out.fd.as_raw_fd(), &mut buf) {
            Ok(0) => {
                self.outputs[i] = None;
                None
            }
            Ok(n) => {
                self.last_output = Instant::now();
                Some(out.frame(&buf[..n]))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            // EIO on a pty master: every slave is closed.
            Err(_) => {
                self.outputs[i] = None;
                None
            }
        }
    }

    /// Writes queued input; closes the stdin pipe after EOF or when the
    /// program stopped reading it.
    fn feed_stdin(&mut self) {
        let Some(fd) = &self.stdin else { return };
        let raw = fd.as_raw_fd();
        match self.input.flush(|b| sys::write(raw, b)) {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                self.input = InputBuffer { buf: Vec::new(), eof: true };
                if !self.tty {
                    self.stdin = None;
                }
            }
        }
    }
}

/// A poll entry for `fd`.
pub fn pollfd(fd: libc::c_int, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_buffer_keeps_what_the_writer_did_not_take() {
        let mut b = InputBuffer::default();
        b.push(b"hello");
        let mut taken = Vec::new();
        let done = b
            .flush(|d| {
                if taken.is_empty() {
                    taken.extend_from_slice(&d[..2]);
                    Ok(2)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                }
            })
            .unwrap();
        assert!(!done);
        assert_eq!(taken, b"he");
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn input_buffer_reports_done_after_eof_and_empty() {
        let mut b = InputBuffer::default();
        b.push(b"x");
        b.close();
        b.push(b"ignored");
        let mut out = Vec::new();
        assert!(b
            .flush(|d| {
                out.extend_from_slice(d);
                Ok(d.len())
            })
            .unwrap());
        assert_eq!(out, b"x");
    }

    #[test]
    fn input_buffer_passes_write_errors_on() {
        let mut b = InputBuffer::default();
        b.push(b"x");
        assert!(b.flush(|_| Err(io::ErrorKind::BrokenPipe.into())).is_err());
    }

    #[test]
    fn output_frame_kind_follows_the_stream() {
        let (r, _w) = sys::pipe().unwrap();
        let out = Output { fd: r, stderr: true };
        assert_eq!(out.frame(b"e"), Frame::Stderr(b"e".to_vec()));
    }

    fn session_on_pipes() -> (Session, OwnedFd, OwnedFd, OwnedFd) {
        let (in_r, in_w) = sys::pipe().unwrap();
        let (out_r, out_w) = sys::pipe().unwrap();
        let (err_r, err_w) = sys::pipe().unwrap();
        for fd in [&in_w, &out_r, &err_r] {
            sys::set_nonblocking(fd.as_raw_fd(), true).unwrap();
        }
        let child = Child { pid: i32::MAX, stdin: in_w, stdout: out_r, stderr: Some(err_r), tty: false };
        (Session::new(child), in_r, out_w, err_w)
    }

    #[test]
    fn session_relays_output_and_finishes_when_streams_end() {
        let (mut s, _in_r, out_w, err_w) = session_on_pipes();
        sys::write(out_w.as_raw_fd(), b"out").unwrap();
        assert_eq!(s.ready(Slot::Output(0)), Some(Frame::Stdout(b"out".to_vec())));
        // Asking "finished?" as of before the exit keeps the drain timeout
        // out of it: only closed streams can finish the session.
        let before_exit = Instant::now();
        s.exited(3 << 8);
        assert_eq!(s.finished(before_exit), None, "streams still open");
        drop((out_w, err_w));
        // Another test's child may hold copies of the write ends between its
        // fork and exec, so the end of the streams can show a moment later.
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.finished(before_exit).is_none() && Instant::now() < deadline {
            assert_eq!(s.ready(Slot::Output(0)), None);
            assert_eq!(s.ready(Slot::Output(1)), None);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(s.finished(before_exit), Some(3));
    }

    #[test]
    fn session_feeds_stdin_and_closes_it_at_eof() {
        let (mut s, in_r, _out_w, _err_w) = session_on_pipes();
        s.on_host_frame(Frame::Stdin(b"abc".to_vec()));
        s.on_host_frame(Frame::StdinEof);
        let mut buf = [0u8; 8];
        assert_eq!(sys::read(in_r.as_raw_fd(), &mut buf).unwrap(), 3);
        assert_eq!(sys::read(in_r.as_raw_fd(), &mut buf).unwrap(), 0, "write end closed");
    }
}
