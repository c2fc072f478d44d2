//! Host changes for the guest's file watchers (`watch`, on by default):
//! virtiofs raises no inotify event in the guest for a change made on the
//! host, so agentvm watches the project ([`tree`]: recursive inotify, less
//! `.git` and what `.gitignore` ignores, bounded), coalesces what changed
//! over [`WINDOW`] ([`pending`]) and sends it in bounded batches over a
//! virtio-serial port of its own ([`agentvm_proto::watch`]); the guest's
//! kernel module raises the matching events on /work. The host writes the
//! port and never reads it: nothing the guest says there is acted on.
//!
//! The guest's own writes to /work reach the host's inotify too (through
//! virtiofsd) and come back as a second event: harmless to a watcher (it
//! looks again and finds nothing new), and telling them apart would take
//! knowing which process wrote, which inotify does not say.

pub mod ignores;
pub mod pending;
pub mod tree;

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentvm_proto::Frame;

use crate::sys::fd::{PollFd, PollFlags};
use pending::{Pending, MAX_BATCH_BYTES, MAX_PENDING};
use tree::{Full, Tree, MAX_DIRS};

/// How long changes gather before they are sent: a burst of writes to a
/// file is one modify, and a watcher still hears well within a second.
pub const WINDOW: Duration = Duration::from_millis(50);

/// Whether a launch sends the host's changes, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchPlan {
    /// The project dir, shared as /work.
    On { project: PathBuf },
    /// Off; `tell`: the user asked for it and should hear why not.
    Off { why: String, tell: bool },
}

impl WatchPlan {
    pub fn is_on(&self) -> bool {
        matches!(self, WatchPlan::On { .. })
    }

    /// One line for `--print-plan`.
    pub fn describe(&self) -> String {
        match self {
            WatchPlan::On { project } => format!("on: {} -> /work", project.display()),
            WatchPlan::Off { why, .. } => format!("off: {why}"),
        }
    }
}

/// Watching could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("watch: off: cannot watch {project}: {source}{hint}")]
    Init { project: String, source: io::Error, hint: &'static str },
}

/// The project's watches, ready to serve a port.
pub struct Watcher {
    tree: Tree,
}

impl Watcher {
    /// Watches `project` (up to [`MAX_DIRS`] directories); `warn` hears
    /// once when a limit leaves some unwatched.
    pub fn new(project: &Path, warn: &mut dyn FnMut(String)) -> Result<Watcher, WatchError> {
        Watcher::with_bound(project, MAX_DIRS, warn)
    }

    fn with_bound(project: &Path, bound: usize, warn: &mut dyn FnMut(String)) -> Result<Watcher, WatchError> {
        let mut tree = Tree::new(project, bound).map_err(|source| WatchError::Init {
            project: project.display().to_string(),
            hint: if source.raw_os_error() == Some(libc::EMFILE) {
                " (the host's fs.inotify.max_user_instances is reached: raise it with sudo sysctl)"
            } else {
                ""
            },
            source,
        })?;
        if let Some(full) = tree.take_full() {
            warn(full.to_string());
        }
        Ok(Watcher { tree })
    }

    /// Sends the changes to `port` on a thread of its own, until the port
    /// closes (the VM is gone).
    pub fn serve(self, port: UnixStream) {
        std::thread::spawn(move || {
            let _ = self.run(port, WINDOW);
        });
    }

    fn run(mut self, mut port: UnixStream, window: Duration) -> io::Result<()> {
        let mut pending = Pending::new(MAX_PENDING);
        let mut since: Option<Instant> = None;
        loop {
            let timeout = since.map(|t| window.saturating_sub(t.elapsed()));
            let inotify = self.tree.fd();
            let mut fds = [PollFd::new(&inotify, PollFlags::IN), PollFd::new(&port, PollFlags::empty())];
            crate::sys::fd::poll(&mut fds, timeout)?;
            if fds[1].revents().intersects(PollFlags::HUP | PollFlags::ERR) {
                return Ok(());
            }
            self.tree.read(&mut |change| pending.push(change))?;
            if let Some(full) = self.tree.take_full() {
                tell_later(&full);
            }
            if !pending.is_empty() && since.is_none() {
                since = Some(Instant::now());
            }
            if since.is_some_and(|t| t.elapsed() >= window) {
                for batch in pending.take_batches(MAX_BATCH_BYTES) {
                    port.write_all(&Frame::Changes(batch).to_bytes())?;
                }
                since = None;
            }
        }
    }
}

/// A limit reached while the program runs: its terminal may be raw.
fn tell_later(full: &Full) {
    eprint!("agentvm: warning: {full}\r\n");
}

#[cfg(test)]
mod tests;
