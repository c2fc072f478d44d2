//! The relay between the host's terminal or streams and a program in the
//! guest, shared by `agentvm run`, `exec` and `shell`.
//!
//! It moves stdin to the guest as [`Frame::Stdin`] (stopping while too
//! much is queued), the guest's [`Frame::Stdout`] and [`Frame::Stderr`] to
//! stdout and stderr, puts an interactive terminal in raw mode and sends
//! its size when it changes. What only the caller can decide (the exit
//! status, a stop request, the guest hanging up) comes back as [`Event`]s.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use agentvm_proto::{Frame, FrameError, FrameReader};

use crate::sys::fd::{PollFd, PollFlags};
use crate::sys::{self, RawMode, SignalFd, Signals};

/// Stop reading stdin while this much is queued for the guest.
const MAX_QUEUED: usize = 1 << 20;
/// Size of one read from the guest or from stdin.
const READ_BYTES: usize = 1 << 16;

/// The signals a relay handles: stop requests and terminal resizes.
pub const SIGNALS: Signals = Signals::new(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGWINCH]);
/// [`SIGNALS`] and SIGCHLD, for a launcher that watches its helpers.
pub const SIGNALS_AND_CHILDREN: Signals =
    Signals::new(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGWINCH, libc::SIGCHLD]);

/// What the relay leaves to its caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A frame other than the program's output: [`Frame::Started`],
    /// [`Frame::Exit`], [`Frame::InitError`].
    Frame(Frame),
    /// SIGINT, SIGTERM or SIGHUP: the user asks to stop.
    Stop(i32),
    /// The guest closed the connection.
    Closed,
    /// The guest sent bytes that are not frames; nothing more is read.
    Corrupt(FrameError),
}

/// The host side's streams: normally the process's own stdin, stdout and
/// stderr.
#[derive(Debug)]
pub struct Streams {
    pub input: OwnedFd,
    pub output: OwnedFd,
    pub error: OwnedFd,
}

impl Streams {
    /// Copies of this process's stdin, stdout and stderr.
    pub fn inherited() -> io::Result<Streams> {
        Ok(Streams {
            input: io::stdin().as_fd().try_clone_to_owned()?,
            output: io::stdout().as_fd().try_clone_to_owned()?,
            error: io::stderr().as_fd().try_clone_to_owned()?,
        })
    }
}

/// Moves bytes between the host's streams and one guest connection.
pub struct Relay<'s> {
    guest: OwnedFd,
    signals: &'s SignalFd,
    streams: Streams,
    /// Raw mode of the host terminal while relaying an interactive session.
    raw: Option<RawMode>,
    terminal: bool,
    reader: FrameReader,
    to_guest: Vec<u8>,
    guest_open: bool,
    stdin_open: bool,
    stdout_ok: bool,
    stderr_ok: bool,
    heard_from_guest: bool,
}

impl<'s> Relay<'s> {
    /// A relay over `guest` (made non-blocking). With `terminal`, the host's
    /// stdin is put in raw mode (when it is a terminal) and resizes are
    /// sent; without, the end of stdin is sent as [`Frame::StdinEof`].
    pub fn new(guest: OwnedFd, signals: &'s SignalFd, streams: Streams, terminal: bool) -> io::Result<Relay<'s>> {
        sys::set_nonblocking(&guest)?;
        let raw = if terminal && sys::is_tty(&streams.input) { RawMode::enable().ok() } else { None };
        Ok(Relay {
            guest,
            signals,
            streams,
            raw,
            terminal,
            reader: FrameReader::new(),
            to_guest: Vec::new(),
            guest_open: true,
            stdin_open: true,
            stdout_ok: true,
            stderr_ok: true,
            heard_from_guest: false,
        })
    }

    /// Queues `frame` for the guest and sends what the connection takes now.
    pub fn send(&mut self, frame: &Frame) {
        frame.encode(&mut self.to_guest);
        self.flush();
    }

    /// Whether the guest has sent anything yet.
    pub fn heard_from_guest(&self) -> bool {
        self.heard_from_guest
    }

    /// Restores the host terminal (also done on drop).
    pub fn restore_terminal(&mut self) {
        self.raw = None;
    }

    /// Waits up to `timeout` (`None`: until something happens), relays what
    /// is ready, and returns what the caller must decide on.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Vec<Event> {
        let mut events = Vec::new();
        let ready = self.poll(timeout);
        if ready.signals {
            for sig in self.signals.read() {
                self.on_signal(sig, &mut events);
            }
        }
        if ready.guest_in {
            self.read_guest(&mut events);
        }
        if ready.guest_out {
            self.flush();
        }
        if ready.stdin {
            self.read_stdin();
        }
        events
    }

    /// Reads what the guest already sent, without waiting (e.g. after QEMU
    /// exited, for the exit status still in the socket).
    pub fn drain(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        if self.guest_open {
            self.read_guest(&mut events);
        }
        events
    }

    fn poll(&self, timeout: Option<Duration>) -> Ready {
        let stdin_wanted = self.stdin_open && self.to_guest.len() < MAX_QUEUED;
        let mut guest_flags = PollFlags::IN;
        if !self.to_guest.is_empty() {
            guest_flags |= PollFlags::OUT;
        }
        let mut fds = vec![PollFd::new(self.signals, PollFlags::IN)];
        if self.guest_open {
            fds.push(PollFd::new(&self.guest, guest_flags));
        }
        if stdin_wanted {
            fds.push(PollFd::new(&self.streams.input, PollFlags::IN));
        }
        if sys::fd::poll(&mut fds, timeout).unwrap_or(0) == 0 {
            return Ready::default();
        }
        let guest = if self.guest_open { fds[1].revents() } else { PollFlags::empty() };
        Ready {
            signals: !fds[0].revents().is_empty(),
            guest_in: guest.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR),
            guest_out: guest.contains(PollFlags::OUT),
            stdin: stdin_wanted && !fds[fds.len() - 1].revents().is_empty(),
        }
    }

    fn on_signal(&mut self, sig: i32, events: &mut Vec<Event>) {
        match sig {
            libc::SIGWINCH if self.terminal => {
                if let Some((rows, cols)) = sys::winsize(&self.streams.input) {
                    self.send(&Frame::Resize { rows, cols });
                }
            }
            libc::SIGINT | libc::SIGTERM | libc::SIGHUP => events.push(Event::Stop(sig)),
            _ => {}
        }
    }

    /// Reads until the guest has nothing more, then handles its frames.
    fn read_guest(&mut self, events: &mut Vec<Event>) {
        let mut buf = vec![0u8; READ_BYTES];
        let open = loop {
            match sys::fd::read(&self.guest, &mut buf) {
                Ok(0) => break false,
                Ok(n) => self.reader.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                Err(_) => break false,
            }
        };
        loop {
            match self.reader.next_frame() {
                Ok(Some(frame)) => self.on_frame(frame, events),
                Ok(None) => break,
                Err(e) => {
                    events.push(Event::Corrupt(e));
                    self.guest_open = false;
                    return;
                }
            }
        }
        if !open {
            self.guest_open = false;
            events.push(Event::Closed);
        }
    }

    fn on_frame(&mut self, frame: Frame, events: &mut Vec<Event>) {
        self.heard_from_guest = true;
        match frame {
            Frame::Stdout(d) => self.stdout_ok = self.stdout_ok && sys::fd::write_all(&self.streams.output, &d).is_ok(),
            Frame::Stderr(d) => self.stderr_ok = self.stderr_ok && sys::fd::write_all(&self.streams.error, &d).is_ok(),
            Frame::Started | Frame::Exit(_) | Frame::InitError(_) => events.push(Event::Frame(frame)),
            // Guest-bound only; ignore anything else.
            _ => {}
        }
    }

    fn flush(&mut self) {
        while self.guest_open && !self.to_guest.is_empty() {
            match sys::fd::write(&self.guest, &self.to_guest) {
                Ok(n) => {
                    self.to_guest.drain(..n);
                }
                Err(_) => return,
            }
        }
    }

    fn read_stdin(&mut self) {
        let mut buf = vec![0u8; READ_BYTES];
        match sys::fd::read(&self.streams.input, &mut buf) {
            Ok(n) if n > 0 => self.send(&Frame::Stdin(buf[..n].to_vec())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            _ => {
                self.stdin_open = false;
                if self.raw.is_none() {
                    self.send(&Frame::StdinEof);
                }
            }
        }
    }
}

/// Which descriptors [`Relay::poll`] found ready.
#[derive(Debug, Default)]
struct Ready {
    signals: bool,
    guest_in: bool,
    guest_out: bool,
    stdin: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Host {
        /// Writes to the relay's stdin.
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    }

    fn relay(signals: &SignalFd) -> (Relay<'_>, OwnedFd, Host) {
        let (ours, guest) = sys::socketpair().unwrap();
        let (input, stdin) = sys::pipe(1 << 16).unwrap();
        let (stdout, output) = sys::pipe(1 << 16).unwrap();
        let (stderr, error) = sys::pipe(1 << 16).unwrap();
        sys::set_nonblocking(&stdout).unwrap();
        let relay = Relay::new(ours, signals, Streams { input, output, error }, false).unwrap();
        (relay, guest, Host { stdin, stdout, stderr })
    }

    fn read_all(fd: &OwnedFd) -> Vec<u8> {
        let mut buf = vec![0; 1 << 16];
        let n = sys::fd::read(fd, &mut buf).unwrap_or(0);
        buf.truncate(n);
        buf
    }

    fn frames(guest: &OwnedFd) -> Vec<Frame> {
        let mut reader = FrameReader::new();
        reader.push(&read_all(guest));
        std::iter::from_fn(|| reader.next_frame().unwrap()).collect()
    }

    fn send(guest: &OwnedFd, frames: &[Frame]) {
        let mut bytes = Vec::new();
        for f in frames {
            f.encode(&mut bytes);
        }
        sys::fd::write_all(guest, &bytes).unwrap();
    }

    const TICK: Option<Duration> = Some(Duration::from_millis(200));

    #[test]
    fn output_goes_to_the_streams_and_the_exit_status_to_the_caller() {
        let signals = SignalFd::block_and_open(Signals::new(&[libc::SIGWINCH])).unwrap();
        let (mut relay, guest, host) = relay(&signals);
        send(&guest, &[Frame::Stdout(b"out".to_vec()), Frame::Stderr(b"err".to_vec()), Frame::Exit(3)]);
        assert_eq!(relay.wait(TICK), vec![Event::Frame(Frame::Exit(3))]);
        assert_eq!(read_all(&host.stdout), b"out");
        assert_eq!(read_all(&host.stderr), b"err");
        assert!(relay.heard_from_guest());
    }

    #[test]
    fn stdin_and_its_end_reach_the_guest() {
        let signals = SignalFd::block_and_open(Signals::new(&[libc::SIGWINCH])).unwrap();
        let (mut relay, guest, host) = relay(&signals);
        sys::fd::write_all(&host.stdin, b"hello").unwrap();
        drop(host.stdin);
        relay.wait(TICK);
        relay.wait(TICK);
        assert_eq!(frames(&guest), vec![Frame::Stdin(b"hello".to_vec()), Frame::StdinEof]);
    }

    #[test]
    fn a_hang_up_and_garbage_are_events() {
        let signals = SignalFd::block_and_open(Signals::new(&[libc::SIGWINCH])).unwrap();
        let (mut relay, guest, _host) = relay(&signals);
        drop(guest);
        assert_eq!(relay.wait(TICK), vec![Event::Closed]);
        let (mut relay, guest, _host) = super::tests::relay(&signals);
        sys::fd::write_all(&guest, &[0xff; 16]).unwrap();
        assert!(matches!(relay.wait(TICK)[..], [Event::Corrupt(_)]));
    }
}
