//! Exec ports: second sessions in a running VM (`agentvm exec`).
//!
//! Each port named `org.agentvm.exec.<i>` serves one session at a time. The
//! host connects (the guest sees the port's hang-up condition clear), sends
//! [`Frame::Exec`], and then speaks the same frames as on the control port.
//! The program runs as the agent user like the main one; when it ends the
//! guest sends [`Frame::Exit`] and the port waits for the next connection.
//! If the host goes away first, the program gets SIGHUP (SIGKILL a moment
//! later).
//!
//! Everything runs in PID 1's single-threaded relay loop, and nothing here
//! blocks: an exec client that stops reading only stalls its own program.

use crate::console;
use crate::port::{find_port, PORTS_SYSFS};
use crate::program;
use crate::session::{pollfd, Session, Slot};
use crate::sys;
use agentvm_proto::{exec_port_name, ExecRequest, Frame, FrameReader, LaunchSpec, EXEC_PORTS};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// How often ports without a host connection are checked for one (a
/// virtio-serial port reports a hang-up while the host is away, so it
/// cannot be waited on with poll).
const IDLE_CHECK: Duration = Duration::from_millis(100);
/// Stop reading the program's output while this much waits for the host.
const OUTPUT_HIGH_WATER: usize = 256 * 1024;
/// How long a program may outlive its session's host connection after SIGHUP.
const HANGUP_GRACE: Duration = Duration::from_secs(3);

/// Where one exec port is in its cycle.
enum State {
    /// No host connection.
    Idle,
    /// Connected; waiting for [`Frame::Exec`] (or, after a session, for the
    /// host to hang up).
    Waiting,
    /// A program runs.
    Running(Session),
    /// The host hung up while the program ran: it was sent SIGHUP and is
    /// killed at `kill_at`.
    Ending { pid: libc::pid_t, kill_at: Instant },
}

/// One exec port.
struct ExecPort {
    name: String,
    fd: OwnedFd,
    reader: FrameReader,
    to_host: Vec<u8>,
    state: State,
}

/// What a poll entry registered by [`ExecPorts::poll_fds`] is for.
#[derive(Debug, Clone, Copy)]
pub struct Token {
    port: usize,
    slot: Option<Slot>,
}

/// All exec ports of the VM.
pub struct ExecPorts {
    ports: Vec<ExecPort>,
    base: LaunchSpec,
    groups: Vec<u32>,
}

impl ExecPorts {
    /// Opens the exec ports the host configured; programs started on them
    /// run like the main program of `spec` with the supplementary `groups`.
    pub fn open(spec: &LaunchSpec, groups: Vec<u32>) -> ExecPorts {
        let mut ports = Vec::new();
        for i in 0..EXEC_PORTS {
            let name = exec_port_name(i);
            let Some(dev) = find_port(Path::new(PORTS_SYSFS), &name) else {
                console::step(&format!("no exec port {name}"));
                continue;
            };
            let path = Path::new("/dev").join(dev);
            match sys::open(&path, libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK) {
                Ok(fd) => ports.push(ExecPort {
                    name,
                    fd,
                    reader: FrameReader::new(),
                    to_host: Vec::new(),
                    state: State::Idle,
                }),
                Err(e) => console::line(&format!("cannot open exec port {}: {e}", path.display())),
            }
        }
        ExecPorts { ports, base: spec.clone(), groups }
    }

    /// The longest the relay may sleep before [`ExecPorts::tick`] is due.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.ports
            .iter()
            .filter_map(|p| match &p.state {
                State::Idle => Some(IDLE_CHECK),
                State::Waiting => None,
                State::Running(s) => s.timeout(now),
                State::Ending { kill_at, .. } => Some(kill_at.saturating_duration_since(now)),
            })
            .min()
    }

    /// Appends the descriptors to poll to `fds`; returns what each is for.
    pub fn poll_fds(&self, fds: &mut Vec<libc::pollfd>) -> Vec<Token> {
        let mut tokens = Vec::new();
        for (i, p) in self.ports.iter().enumerate() {
            let out = if p.to_host.is_empty() { 0 } else { libc::POLLOUT };
            match &p.state {
                State::Idle | State::Ending { .. } => {}
                State::Waiting => {
                    fds.push(pollfd(p.fd.as_raw_fd(), libc::POLLIN | out));
                    tokens.push(Token { port: i, slot: None });
                }
                State::Running(s) => {
                    let input = if s.wants_input() { libc::POLLIN } else { 0 };
                    fds.push(pollfd(p.fd.as_raw_fd(), input | out));
                    tokens.push(Token { port: i, slot: None });
                    let mut slots = Vec::new();
                    s.poll_fds(p.to_host.len() < OUTPUT_HIGH_WATER, &mut slots);
                    for (fd, slot) in slots {
                        fds.push(fd);
                        tokens.push(Token { port: i, slot: Some(slot) });
                    }
                }
            }
        }
        tokens
    }

    /// Handles the poll results for the entries [`ExecPorts::poll_fds`] added.
    pub fn ready(&mut self, fds: &[libc::pollfd], tokens: &[Token]) {
        for (fd, token) in fds.iter().zip(tokens) {
            if fd.revents == 0 {
                continue;
            }
            let Some(p) = self.ports.get_mut(token.port) else {
                continue;
            };
            match token.slot {
                None => {
                    if fd.revents & libc::POLLOUT != 0 {
                        p.flush();
                    }
                    if fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                        p.read(&self.base, &self.groups);
                    }
                }
                Some(slot) => {
                    if let State::Running(s) = &mut p.state {
                        if let Some(frame) = s.ready(slot) {
                            frame.encode(&mut p.to_host);
                        }
                    }
                }
            }
        }
        for p in &mut self.ports {
            p.flush();
        }
    }

    /// Takes the wait status of `pid` if it is an exec session's program.
    pub fn exited(&mut self, pid: libc::pid_t, status: libc::c_int) {
        for p in &mut self.ports {
            match &mut p.state {
                State::Running(s) if s.pid() == pid => s.exited(status),
                State::Ending { pid: ending, .. } if *ending == pid => p.state = State::Idle,
                _ => {}
            }
        }
    }

    /// Time-driven work: notices new host connections, ends finished
    /// sessions, kills programs whose host went away.
    pub fn tick(&mut self, now: Instant) {
        let idle: Vec<usize> = (0..self.ports.len()).filter(|&i| matches!(self.ports[i].state, State::Idle)).collect();
        if !idle.is_empty() {
            let mut fds: Vec<libc::pollfd> =
                idle.iter().map(|&i| pollfd(self.ports[i].fd.as_raw_fd(), libc::POLLIN)).collect();
            if sys::poll(&mut fds, Some(Duration::ZERO)).is_ok() {
                for (fd, &i) in fds.iter().zip(&idle) {
                    if fd.revents & libc::POLLHUP == 0 {
                        let p = &mut self.ports[i];
                        console::step(&format!("{}: host connected", p.name));
                        p.reader = FrameReader::new();
                        p.to_host.clear();
                        p.state = State::Waiting;
                    }
                }
            }
        }
        for p in &mut self.ports {
            match &mut p.state {
                State::Running(s) => {
                    if let Some(code) = s.finished(now) {
                        console::step(&format!("{}: program exited with {code}", p.name));
                        Frame::Exit(code).encode(&mut p.to_host);
                        p.state = State::Waiting;
                        p.flush();
                    }
                }
                State::Ending { pid, kill_at } if now >= *kill_at => {
                    let _ = sys::kill(-*pid, libc::SIGKILL);
                    *kill_at = now + Duration::from_secs(3600);
                }
                _ => {}
            }
        }
    }
}

impl ExecPort {
    /// Writes what is queued for the host, as far as it takes it now.
    fn flush(&mut self) {
        while !self.to_host.is_empty() {
            match sys::write(self.fd.as_raw_fd(), &self.to_host) {
                Ok(0) => return,
                Ok(n) => {
                    self.to_host.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.hang_up();
                    return;
                }
            }
        }
    }

    /// Reads and handles what the host sent; notices its hang-up.
    fn read(&mut self, base: &LaunchSpec, groups: &[u32]) {
        let mut buf = [0u8; 32 * 1024];
        let mut closed = false;
        loop {
            match sys::read(self.fd.as_raw_fd(), &mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => self.reader.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
            if let State::Running(s) = &self.state {
                if !s.wants_input() {
                    break;
                }
            }
        }
        loop {
            match self.reader.next_frame() {
                Ok(Some(frame)) => self.on_frame(frame, base, groups),
                Ok(None) => break,
                Err(e) => {
                    Frame::InitError(format!("corrupt data on {}: {e}", self.name)).encode(&mut self.to_host);
                    self.flush();
                    closed = true;
                    break;
                }
            }
        }
        if closed {
            self.hang_up();
        }
    }

    fn on_frame(&mut self, frame: Frame, base: &LaunchSpec, groups: &[u32]) {
        match (&mut self.state, frame) {
            (State::Waiting, Frame::Exec(req)) => self.start(req, base, groups),
            (State::Running(s), frame) => s.on_host_frame(frame),
            _ => {}
        }
    }

    /// Starts the requested program.
    fn start(&mut self, req: ExecRequest, base: &LaunchSpec, groups: &[u32]) {
        let program = req.argv.first().map_or("a login shell", String::as_str);
        console::step(&format!("{}: start {program}", self.name));
        let mut env = base.env.clone();
        env.extend(req.env);
        let spec = LaunchSpec { argv: req.argv, env, tty: req.tty, winsize: req.winsize, ..base.clone() };
        match program::spawn(&spec, groups.to_vec()) {
            Ok(child) => {
                Frame::Started.encode(&mut self.to_host);
                self.state = State::Running(Session::new(child));
            }
            Err(e) => Frame::InitError(e.to_string()).encode(&mut self.to_host),
        }
        self.flush();
    }

    /// The host went away: the port goes idle; a running program is hung up on.
    fn hang_up(&mut self) {
        console::step(&format!("{}: host disconnected", self.name));
        self.reader = FrameReader::new();
        self.to_host.clear();
        let state = std::mem::replace(&mut self.state, State::Idle);
        if let State::Running(s) = state {
            if s.status().is_none() {
                s.signal(libc::SIGHUP);
                s.signal(libc::SIGCONT);
                self.state = State::Ending { pid: s.pid(), kill_at: Instant::now() + HANGUP_GRACE };
            }
        }
    }
}
