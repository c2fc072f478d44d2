//! `agentvm exec` and `agentvm shell`: a second session in a running VM.
//!
//! QEMU listens on `exec-<i>.sock` in the instance dir for each exec port.
//! A client takes a free port by holding an exclusive lock on
//! `exec-<i>.lock` while it is connected (QEMU would queue a second
//! connection behind the first, not refuse it), sends [`Frame::Exec`], and
//! then relays the terminal or the streams with the same [`Relay`] as `agentvm run` until the
//! guest sends the exit status.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use agentvm_proto::{ExecRequest, Frame, EXEC_PORTS};

use crate::instance::ps::{self, InstancesError};
use crate::relay::{self, Event, Relay, Streams};
use crate::sys::{self, SignalFd};

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
/// (`None`: when stdin and stdout are terminals); `no_input`: the command
/// gets an empty stdin, not agentvm's.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub argv: Vec<String>,
    pub tty: Option<bool>,
    pub no_input: bool,
}

/// Runs a command in the running instance `query` (an id or unique prefix)
/// and returns its exit status.
pub fn exec(base: &Path, query: &str, opts: ExecOptions) -> Result<i32, ExecError> {
    let live = ps::live_instances(base);
    let inst = ps::resolve(&live, query)?;
    let id = inst.meta.id.clone();
    let (stream, _lock) = connect(&inst.dir, &id)?;

    let tty = opts.tty.unwrap_or_else(sys::interactive);
    let env =
        ["TERM", "COLORTERM"].iter().filter_map(|var| Some((var.to_string(), std::env::var(var).ok()?))).collect();
    let winsize = if tty { sys::winsize(io::stdin()) } else { None };
    let req = ExecRequest { argv: opts.argv, env, tty, winsize };
    let signals = SignalFd::block_and_open(relay::SIGNALS).map_err(os("signalfd"))?;
    let mut streams = Streams::inherited().map_err(os("stdio"))?;
    if opts.no_input {
        streams.input = std::fs::File::open("/dev/null").map_err(os("open /dev/null"))?.into();
    }
    let mut relay = Relay::new(OwnedFd::from(stream), &signals, streams, tty).map_err(os("fcntl(O_NONBLOCK)"))?;
    relay.send(&Frame::Exec(req));
    follow(&mut relay, &id)
}

fn os(what: &'static str) -> impl FnOnce(io::Error) -> ExecError {
    move |source| ExecError::Os { what, source }
}

/// Relays until the command exits. A second stop request leaves at once
/// (the guest hangs up on the program).
fn follow(relay: &mut Relay<'_>, id: &str) -> Result<i32, ExecError> {
    let mut stop_signal = None;
    loop {
        for event in relay.wait(None) {
            match event {
                Event::Frame(Frame::Exit(code)) => return Ok(code),
                Event::Frame(Frame::InitError(message)) => return Err(ExecError::Guest { id: id.into(), message }),
                Event::Frame(_) => {}
                Event::Stop(sig) if stop_signal.is_some() => return Err(ExecError::Interrupted(sig)),
                Event::Stop(sig) => {
                    stop_signal = Some(sig);
                    relay.send(&Frame::Signal(sig as u8));
                }
                Event::Closed => return Err(ExecError::Disconnected { id: id.into() }),
                Event::Corrupt(e) => {
                    return Err(ExecError::Guest { id: id.into(), message: format!("corrupt data: {e}") })
                }
            }
        }
    }
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
        if sys::lock(&lock, sys::Lock::TryExclusive).is_err() {
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
