//! The control port: the virtio-serial port named [`PORT_NAME`] that carries
//! frames to and from the host.

use crate::error::{Error, Result};
use crate::sys;
use agentvm_proto::{Frame, FrameReader, PORT_NAME};
use std::fs;
use std::io;
use std::os::fd::{IntoRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// The open port's descriptor, for the fatal-error path and the panic hook.
static PORT_FD: AtomicI32 = AtomicI32::new(-1);

/// Whether a write ever went through: before that, a hang-up means the host
/// has not connected yet (so wait), after it that the host went away.
static CONNECTED: AtomicBool = AtomicBool::new(false);

/// The sysfs directory listing virtio-serial ports.
pub const PORTS_SYSFS: &str = "/sys/class/virtio-ports";

/// What reading the port produced.
pub enum Input {
    /// Complete frames (possibly none yet).
    Frames(Vec<Frame>),
    /// The host closed its end.
    Closed,
}

/// The open control port.
///
/// Its descriptor is never closed: the fatal-error path and the panic hook
/// still write to it after the `Port` is gone.
pub struct Port {
    fd: RawFd,
    path: PathBuf,
    reader: FrameReader,
}

/// The `/dev` node of the port named `name`, if sysfs lists it.
pub fn find_port(sysfs: &Path, name: &str) -> Option<String> {
    for entry in fs::read_dir(sysfs).ok()?.flatten() {
        let got = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if got.trim_end() == name {
            return Some(entry.file_name().to_string_lossy().into_owned());
        }
    }
    None
}

impl Port {
    /// Waits up to `timeout` for the port to appear and opens it.
    pub fn open(timeout: Duration) -> Result<Port> {
        let start = Instant::now();
        let path = loop {
            if let Some(dev) = find_port(Path::new(PORTS_SYSFS), PORT_NAME) {
                let path = Path::new("/dev").join(dev);
                if path.exists() {
                    break path;
                }
            }
            if start.elapsed() > timeout {
                return Err(Error::Timeout {
                    what: format!("virtio-serial port {PORT_NAME} (in {PORTS_SYSFS})"),
                    secs: timeout.as_secs(),
                    hint: "; is the virtserialport device configured and virtio_console loaded?",
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let fd = sys::open(&path, libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK)
            .map_err(|e| Error::io("open", &path, e))?;
        let fd = fd.into_raw_fd();
        PORT_FD.store(fd, Ordering::SeqCst);
        Ok(Port { fd, path, reader: FrameReader::new() })
    }

    /// The raw descriptor, for poll.
    pub fn raw_fd(&self) -> RawFd {
        self.fd
    }

    /// Sends one frame, waiting as long as the host needs to take it.
    /// Fails when the host disconnected.
    pub fn send(&self, frame: &Frame) -> Result<()> {
        write_frame(self.raw_fd(), frame, None)
            .map_err(|source| Error::Port { path: self.path.display().to_string(), source })
    }

    /// Reads what is available (call when poll says readable).
    pub fn receive(&mut self) -> Result<Input> {
        let mut buf = [0u8; 32 * 1024];
        let n = match sys::read(self.raw_fd(), &mut buf) {
            Ok(0) => return Ok(Input::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(source) => return Err(Error::Port { path: self.path.display().to_string(), source }),
        };
        self.reader.push(&buf[..n]);
        let mut frames = Vec::new();
        loop {
            match self.reader.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    return Err(Error::Port {
                        path: self.path.display().to_string(),
                        source: io::Error::new(io::ErrorKind::InvalidData, e),
                    })
                }
            }
        }
        Ok(Input::Frames(frames))
    }
}

/// Writes a whole frame to the non-blocking port `fd`, waiting for POLLOUT in
/// between. Gives up when the host hangs up, or after `timeout` if given.
fn write_frame(fd: RawFd, frame: &Frame, timeout: Option<Duration>) -> io::Result<()> {
    let bytes = frame.to_bytes();
    let mut rest = &bytes[..];
    let deadline = timeout.map(|t| Instant::now() + t);
    while !rest.is_empty() {
        match sys::write(fd, rest) {
            Ok(n) => {
                rest = &rest[n..];
                CONNECTED.store(true, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if left == Some(Duration::ZERO) {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "the host does not read"));
                }
                let mut p = [libc::pollfd { fd, events: libc::POLLOUT, revents: 0 }];
                sys::poll(&mut p, left)?;
                if p[0].revents & libc::POLLOUT == 0 && p[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                    if CONNECTED.load(Ordering::Relaxed) {
                        return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the host disconnected"));
                    }
                    // Not connected yet: poll reports the hang-up at once, so pace the retries.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `frame` on the port, giving up after a few seconds. If the port was
/// not opened yet (an early failure), tries briefly to find it. For the
/// fatal-error path and the panic hook; errors are ignored.
pub fn send_last_words(frame: &Frame) {
    if PORT_FD.load(Ordering::SeqCst) < 0 && Path::new(PORTS_SYSFS).is_dir() {
        let _ = Port::open(Duration::from_secs(1));
    }
    let fd = PORT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let _ = write_frame(fd, frame, Some(Duration::from_secs(3)));
    }
}
