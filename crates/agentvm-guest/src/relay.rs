//! The relay loop: frames from the host to the program, its output back, and
//! reaping every process (PID 1 inherits orphans).

use crate::error::{Error, Result};
use crate::port::{Input, Port};
use crate::program::{exit_code, Child};
use crate::sys;
use agentvm_proto::Frame;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
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

/// How the relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The program exited with this code (128+N for signal N).
    Exited(i32),
    /// The host closed the port.
    HostGone,
}

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

/// The relay's state.
struct Relay<'a> {
    port: &'a mut Port,
    pid: libc::pid_t,
    tty: bool,
    stdin: Option<OwnedFd>,
    input: InputBuffer,
    outputs: Vec<Output>,
    status: Option<i32>,
    exited_at: Option<Instant>,
    last_output: Instant,
}

/// Relays between the port and `child` until the child exited and its output
/// is drained, or the host is gone. Reaps every child of the init meanwhile.
pub fn run(port: &mut Port, child: Child, sigchld: &OwnedFd) -> Result<Outcome> {
    let mut outputs = vec![Output {
        fd: child.stdout,
        stderr: false,
    }];
    if let Some(fd) = child.stderr {
        outputs.push(Output { fd, stderr: true });
    }
    let mut relay = Relay {
        port,
        pid: child.pid,
        tty: child.tty,
        stdin: Some(child.stdin),
        input: InputBuffer::default(),
        outputs,
        status: None,
        exited_at: None,
        last_output: Instant::now(),
    };
    relay.run(sigchld.as_raw_fd())
}

impl Relay<'_> {
    fn run(&mut self, sigfd: RawFd) -> Result<Outcome> {
        loop {
            let timeout = match (self.status, self.exited_at) {
                (Some(code), Some(at)) => {
                    let now = Instant::now();
                    let deadline = (self.last_output + DRAIN_SILENCE).min(at + DRAIN_MAX);
                    if self.outputs.is_empty() || now >= deadline {
                        return Ok(Outcome::Exited(code));
                    }
                    Some(deadline - now)
                }
                _ => None,
            };

            let mut fds = vec![libc::pollfd {
                fd: sigfd,
                events: libc::POLLIN,
                revents: 0,
            }];
            let port_events = if self.input.len() < STDIN_HIGH_WATER {
                libc::POLLIN
            } else {
                0
            };
            fds.push(libc::pollfd {
                fd: self.port.raw_fd(),
                events: port_events,
                revents: 0,
            });
            for out in &self.outputs {
                fds.push(libc::pollfd {
                    fd: out.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let stdin_slot = match &self.stdin {
                Some(fd) if self.input.wants_write() => {
                    fds.push(libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    });
                    Some(fds.len() - 1)
                }
                _ => None,
            };
            sys::poll(&mut fds, timeout).map_err(|e| Error::sys("poll", e))?;

            if fds[0].revents != 0 {
                sys::drain_signalfd(sigfd);
                self.reap();
            }
            if fds[1].revents != 0 && self.handle_host()? == Some(Outcome::HostGone) {
                return Ok(Outcome::HostGone);
            }
            // Outputs in reverse so removing one keeps the earlier indices valid.
            for i in (0..self.outputs.len()).rev() {
                if fds[2 + i].revents != 0 {
                    self.relay_output(i)?;
                }
            }
            if let Some(slot) = stdin_slot {
                if fds[slot].revents != 0 {
                    self.feed_stdin();
                }
            }
        }
    }

    /// Reaps every exited child; remembers the program's status.
    fn reap(&mut self) {
        while let Ok(Some((pid, status))) = sys::reap_one() {
            if pid == self.pid {
                self.status = Some(exit_code(status));
                self.exited_at = Some(Instant::now());
                self.last_output = Instant::now();
            }
        }
    }

    /// Handles what the host sent.
    fn handle_host(&mut self) -> Result<Option<Outcome>> {
        let frames = match self.port.receive()? {
            Input::Closed => return Ok(Some(Outcome::HostGone)),
            Input::Frames(f) => f,
        };
        for frame in frames {
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
                    let _ = sys::kill(-self.pid, i32::from(sig));
                }
                _ => {}
            }
        }
        if self.input.wants_write() {
            self.feed_stdin();
        }
        Ok(None)
    }

    /// Relays one chunk of the program's output stream `i`; drops it at EOF.
    fn relay_output(&mut self, i: usize) -> Result<()> {
        let mut buf = vec![0u8; CHUNK];
        match sys::read(self.outputs[i].fd.as_raw_fd(), &mut buf) {
            Ok(0) => {
                self.outputs.remove(i);
            }
            Ok(n) => {
                self.last_output = Instant::now();
                self.port.send(&self.outputs[i].frame(&buf[..n]))?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // EIO on a pty master: every slave is closed.
            Err(_) => {
                self.outputs.remove(i);
            }
        }
        Ok(())
    }

    /// Writes queued input; closes the stdin pipe after EOF or when the
    /// program stopped reading it.
    fn feed_stdin(&mut self) {
        let Some(fd) = &self.stdin else { return };
        let raw = fd.as_raw_fd();
        match self.input.flush(|b| sys::write(raw, b)) {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                self.input = InputBuffer {
                    buf: Vec::new(),
                    eof: true,
                };
                if !self.tty {
                    self.stdin = None;
                }
            }
        }
    }
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
        let out = Output {
            fd: r,
            stderr: true,
        };
        assert_eq!(out.frame(b"e"), Frame::Stderr(b"e".to_vec()));
    }
}
