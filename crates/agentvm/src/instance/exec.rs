//! `agentvm exec` and `agentvm shell`: a second session in a running VM.
//!
//! QEMU listens on `exec-<i>.sock` in the instance dir for each exec port.
//! A client takes a free port by holding an exclusive lock on
//! `exec-<i>.lock` while it is connected (QEMU would queue a second
//! connection behind the first, not refuse it), sends [`Frame::Exec`], and
//! then relays the terminal or the streams like `agentvm run` until the
//! guest sends the exit status.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use agentvm_proto::{ExecRequest, Frame, FrameReader, EXEC_PORTS};

use crate::console::{self, RawMode};
use crate::instance::ps::{self, InstancesError};

/// An exec session that failed; the program's own failures are exit codes.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Instance(#[from] InstancesError),
    #[error("all {EXEC_PORTS} exec sessions of instance {id} are in use; try again when one ends")]
    Busy { id: String },
    #[error("cannot connect to instance {id} ({path}): {source}; is it still starting, or was it started by an older agentvm?")]
    Connect { id: String, path: String, source: io::Error },
    #[error("{what}: {source}")]
    Os { what: &'static str, source: io::Error },
    #[error("instance {id} could not start the command: {message}")]
    Guest { id: String, message: String },
    #[error("the connection to instance {id} closed before the command finished (the VM stopped?)")]
    Disconnected { id: String },
    #[error("stopped by signal {0} before the command reported its exit status")]
    Interrupted(i32),
}

impl ExecError {
    /// 128+N for a signal, else 125 (agentvm failed), as for `run`.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExecError::Interrupted(sig) => 128 + sig,
            _ => 125,
        }
    }
}

/// What to run: `argv` (empty: a login shell) and whether on a terminal
/// (`None`: when stdin and stdout are terminals).
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub argv: Vec<String>,
    pub tty: Option<bool>,
}

/// Runs a command in the running instance `query` (an id or unique prefix)
/// and returns its exit status.
pub fn exec(base: &Path, query: &str, opts: ExecOptions) -> Result<i32, ExecError> {
    let live = ps::live_instances(base);
    let inst = ps::resolve(&live, query)?;
    let id = inst.meta.id.clone();
    let (stream, _lock) = connect(&inst.dir, &id)?;

    let local_tty = console::is_tty(0) && console::is_tty(1);
    let tty = opts.tty.unwrap_or(local_tty);
    let mut env = Vec::new();
    for var in ["TERM", "COLORTERM"] {
        if let Ok(v) = std::env::var(var) {
            env.push((var.to_string(), v));
        }
    }
    let req = ExecRequest { argv: opts.argv, env, tty, winsize: if tty { console::winsize(0) } else { None } };
    let signals = SignalFd::block_and_open()?;
    let raw = if tty && console::is_tty(0) { RawMode::enable(0).ok() } else { None };
    let mut client = Client::new(stream, signals, tty && console::is_tty(0), &id);
    Frame::Exec(req).encode(&mut client.to_guest);
    let result = client.run();
    drop(raw);
    result
}

/// Locks and connects to a free exec port of the instance in `dir`.
fn connect(dir: &Path, id: &str) -> Result<(UnixStream, std::fs::File), ExecError> {
    let mut last_err = None;
    for i in 0..EXEC_PORTS {
        let lock_path = dir.join(format!("exec-{i}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(|source| ExecError::Os { what: "creating an exec lock file", source })?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue; // another exec holds this port
        }
        let sock = dir.join(format!("exec-{i}.sock"));
        match UnixStream::connect(&sock) {
            Ok(s) => return Ok((s, lock)),
            Err(source) => last_err = Some((sock, source)),
        }
    }
    match last_err {
        None => Err(ExecError::Busy { id: id.into() }),
        Some((path, source)) => Err(ExecError::Connect { id: id.into(), path: path.display().to_string(), source }),
    }
}

/// Stop reading stdin while this much is queued for the guest.
const MAX_QUEUED: usize = 1 << 20;

struct Client<'a> {
    sock: UnixStream,
    signals: SignalFd,
    tty: bool,
    id: &'a str,
    reader: FrameReader,
    to_guest: Vec<u8>,
    stdin_open: bool,
    stop_signal: Option<i32>,
}

impl<'a> Client<'a> {
    fn new(sock: UnixStream, signals: SignalFd, tty: bool, id: &'a str) -> Client<'a> {
        Client {
            sock,
            signals,
            tty,
            id,
            reader: FrameReader::new(),
            to_guest: Vec::new(),
            stdin_open: true,
            stop_signal: None,
        }
    }

    fn run(&mut self) -> Result<i32, ExecError> {
        self.sock.set_nonblocking(true).map_err(|source| ExecError::Os { what: "fcntl(O_NONBLOCK)", source })?;
        loop {
            let stdin_wanted = self.stdin_open && self.to_guest.len() < MAX_QUEUED;
            let out = if self.to_guest.is_empty() { 0 } else { libc::POLLOUT };
            let mut fds = [
                pollfd(self.signals.0.as_raw_fd(), libc::POLLIN),
                pollfd(self.sock.as_raw_fd(), libc::POLLIN | out),
                pollfd(if stdin_wanted { 0 } else { -1 }, libc::POLLIN),
            ];
            // SAFETY: polling an array of pollfd we own.
            if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, -1) } < 0 {
                continue; // EINTR
            }
            if fds[0].revents != 0 {
                for sig in self.signals.read() {
                    self.on_signal(sig)?;
                }
            }
            if fds[1].revents & libc::POLLOUT != 0 {
                self.flush();
            }
            if fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                if let Some(code) = self.read_sock()? {
                    return Ok(code);
                }
            }
            if fds[2].revents != 0 {
                self.read_stdin();
            }
        }
    }

    fn on_signal(&mut self, sig: i32) -> Result<(), ExecError> {
        match sig {
            libc::SIGWINCH if self.tty => {
                if let Some((rows, cols)) = console::winsize(0) {
                    Frame::Resize { rows, cols }.encode(&mut self.to_guest);
                }
            }
            libc::SIGINT | libc::SIGTERM | libc::SIGHUP => {
                if self.stop_signal.is_some() {
                    // Asked twice: leave; the guest hangs up on the program.
                    return Err(ExecError::Interrupted(sig));
                }
                self.stop_signal = Some(sig);
                Frame::Signal(sig as u8).encode(&mut self.to_guest);
            }
            _ => {}
        }
        self.flush();
        Ok(())
    }

    /// Handles what the guest sent; `Some(code)` once the command exited.
    fn read_sock(&mut self) -> Result<Option<i32>, ExecError> {
        let mut buf = [0u8; 65536];
        let open = loop {
            match (&self.sock).read(&mut buf) {
                Ok(0) => break false,
                Ok(n) => self.reader.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break false,
            }
        };
        loop {
            match self.reader.next_frame() {
                Ok(Some(Frame::Stdout(d))) => write_fd(1, &d),
                Ok(Some(Frame::Stderr(d))) => write_fd(2, &d),
                Ok(Some(Frame::Exit(code))) => return Ok(Some(code)),
                Ok(Some(Frame::InitError(message))) => return Err(ExecError::Guest { id: self.id.into(), message }),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(ExecError::Guest { id: self.id.into(), message: format!("corrupt data: {e}") }),
            }
        }
        if open {
            Ok(None)
        } else {
            Err(ExecError::Disconnected { id: self.id.into() })
        }
    }

    fn flush(&mut self) {
        while !self.to_guest.is_empty() {
            match (&self.sock).write(&self.to_guest) {
                Ok(n) => {
                    self.to_guest.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    fn read_stdin(&mut self) {
        let mut buf = [0u8; 65536];
        // SAFETY: reading into a buffer we own from fd 0.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                self.stdin_open = false;
                Frame::StdinEof.encode(&mut self.to_guest);
            }
        } else {
            Frame::Stdin(buf[..n as usize].to_vec()).encode(&mut self.to_guest);
        }
        self.flush();
    }
}

fn pollfd(fd: RawFd, events: i16) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

/// Writes all of `data` to `fd`, dropping it if the reader went away.
fn write_fd(fd: RawFd, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: writing a buffer we own to a borrowed fd.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            return;
        }
        data = &data[n as usize..];
    }
}

/// The signals the client handles, read from a signalfd.
struct SignalFd(OwnedFd);

const HANDLED_SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGWINCH];

fn signal_set() -> libc::sigset_t {
    // SAFETY: building a signal set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in HANDLED_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

impl SignalFd {
    fn block_and_open() -> Result<SignalFd, ExecError> {
        let set = signal_set();
        // SAFETY: blocking the signals of a set we own, then opening a signalfd for them.
        unsafe {
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(ExecError::Os { what: "signalfd", source: io::Error::last_os_error() });
            }
            Ok(SignalFd(OwnedFd::from_raw_fd(fd)))
        }
    }

    fn read(&self) -> Vec<i32> {
        let mut out = Vec::new();
        loop {
            // SAFETY: reading whole signalfd_siginfo records into one we own.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: as above; the buffer is `size` bytes long.
            let n = unsafe { libc::read(self.0.as_raw_fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
            if n != size as isize {
                return out;
            }
            out.push(info.ssi_signo as i32);
        }
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        let set = signal_set();
        // SAFETY: unblocking the signals we blocked.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}
