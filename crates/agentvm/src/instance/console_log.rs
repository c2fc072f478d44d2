//! The guest's serial console, kept on the host with a size cap.
//!
//! QEMU writes the console to a pipe; a thread of the launcher reads it
//! and appends to `console.log` in the instance dir. When that file reaches
//! [`ROTATE_BYTES`], it becomes `console.log.1` (replacing the previous one)
//! and a new `console.log` starts: a guest flooding its console keeps at
//! most about twice that on disk. The thread never stops reading, so a slow
//! disk never holds up QEMU (the guest's serial port waits instead).
//! Readers take only the tail ([`tail`]) or follow the files across
//! rotations ([`copy_log`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// The console log in an instance dir.
pub const LOG: &str = "console.log";
/// Size at which the console log rotates.
pub const ROTATE_BYTES: u64 = 4 << 20;
/// How often a follower looks for more.
const POLL: Duration = Duration::from_millis(200);
/// How long the recorder lets the console fill the pipe after a short
/// read. QEMU writes the serial port a byte at a time: reading each byte
/// as it comes wakes the recorder per byte, while the fastest console seen
/// (0.6 MB/s) fills a fifth of a default 64 KiB pipe in this time.
const BATCH_WAIT: Duration = Duration::from_millis(20);

/// The file the log rotates to: `PATH.1`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".1");
    PathBuf::from(name)
}

/// A log file that rotates once it holds `limit` bytes.
pub struct RotatingLog {
    path: PathBuf,
    file: File,
    len: u64,
    limit: u64,
}

impl RotatingLog {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path, limit: u64) -> io::Result<RotatingLog> {
        Ok(RotatingLog { path: path.to_path_buf(), file: create_private(path)?, len: 0, limit })
    }

    /// Appends `data`, rotating after it if the file reached the limit.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.len += data.len() as u64;
        if self.len >= self.limit {
            // Everything is in the old file before it is renamed: a
            // follower that sees the new name has the old one complete.
            fs::rename(&self.path, rotated(&self.path))?;
            self.file = create_private(&self.path)?;
            self.len = 0;
        }
        Ok(())
    }
}

fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)
}

/// The thread recording a console stream.
pub struct Recorder {
    done: mpsc::Receiver<u64>,
}

impl Recorder {
    /// Starts recording `stream` into `path` until the other end closes.
    pub fn start(stream: impl Read + Send + 'static, path: &Path) -> io::Result<Recorder> {
        let mut log = RotatingLog::create(path, ROTATE_BYTES)?;
        let (tx, done) = mpsc::channel();
        std::thread::Builder::new().name("console".into()).spawn(move || {
            let total = record(stream, &mut log);
            let _ = tx.send(total);
        })?;
        Ok(Recorder { done })
    }

    /// Waits up to `timeout` for the stream to end (QEMU closes it when it
    /// exits), so the last lines are on disk; the bytes recorded, if it ended.
    pub fn finish(self, timeout: Duration) -> Option<u64> {
        self.done.recv_timeout(timeout).ok()
    }
}

/// Copies `stream` into `log` until it ends; the number of bytes read. A
/// failing write loses that data but reading goes on.
fn record(mut stream: impl Read, log: &mut RotatingLog) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => {
                total += n as u64;
                let _ = log.write(&buf[..n]);
                if n < buf.len() {
                    std::thread::sleep(BATCH_WAIT);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return total,
        }
    }
}

/// The last `max` bytes of the log at `path`, from its rotated file too.
pub fn tail(path: &Path, max: u64) -> Vec<u8> {
    let current = tail_of(path, max);
    let rest = max - current.len() as u64;
    let mut out = if rest > 0 { tail_of(&rotated(path), rest) } else { Vec::new() };
    out.extend_from_slice(&current);
    out
}

/// The last `max` bytes of one file (empty if it cannot be read).
fn tail_of(path: &Path, max: u64) -> Vec<u8> {
    let Ok(mut f) = File::open(path) else { return Vec::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut out = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(max))).is_ok() {
        let _ = f.take(max).read_to_end(&mut out);
    }
    out
}

/// Copies the log at `path` to `out`: its rotated file first, then the
/// file itself; while `follow()` says so, what is added too, across
/// rotations.
pub fn copy_log(path: &Path, mut follow: impl FnMut() -> bool, out: &mut impl Write) -> io::Result<()> {
    // Opened before the rotated file: if it rotates in between, the
    // rotated file is this one, and it is copied once.
    let mut file = File::open(path)?;
    let mut inode = file.metadata()?.ino();
    if let Ok(old) = File::open(rotated(path)) {
        if old.metadata()?.ino() != inode && !copy_to_end(old, out) {
            return Ok(());
        }
    }
    loop {
        // Asked before copying: what was written before following ended
        // is copied still.
        let following = follow();
        if !copy_to_end(&file, out) {
            return Ok(()); // the reader went away
        }
        match File::open(path) {
            // Rotated: ours is complete; go on with the new file.
            Ok(next) if next.metadata()?.ino() != inode => {
                if !copy_to_end(&file, out) {
                    return Ok(());
                }
                inode = next.metadata()?.ino();
                file = next;
            }
            _ if !following => return Ok(()),
            _ => std::thread::sleep(POLL),
        }
    }
}

/// Copies what `file` holds past its offset; false if `out` failed.
fn copy_to_end(mut file: impl Read, out: &mut impl Write) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) | Err(_) => return out.flush().is_ok(),
            Ok(n) => {
                if out.write_all(&buf[..n]).is_err() {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Numbered lines, `n` bytes in all.
    fn lines(n: usize) -> Vec<u8> {
        let mut v = Vec::new();
        let mut i = 0;
        while v.len() < n {
            v.extend_from_slice(format!("line {i:08}\n").as_bytes());
            i += 1;
        }
        v.truncate(n);
        v
    }

    #[test]
    fn a_flood_keeps_at_most_two_files_of_the_limit_and_the_tail_is_the_end() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(LOG);
        let mut log = RotatingLog::create(&path, 1 << 20).unwrap();
        let data = lines(10 << 20);
        for chunk in data.chunks(4000) {
            log.write(chunk).unwrap();
        }
        let sizes = [fs::metadata(&path).unwrap().len(), fs::metadata(rotated(&path)).unwrap().len()];
        assert!(sizes.iter().all(|&s| s < (1 << 20) + 4000), "{sizes:?}");
        let kept = [fs::read(rotated(&path)).unwrap(), fs::read(&path).unwrap()].concat();
        assert!(data.ends_with(&kept));
        assert_eq!(tail(&path, 100_000), data[data.len() - 100_000..]);
        assert_eq!(tail(&path, 1 << 30), kept);
        assert!(tail(&d.path().join("missing"), 10).is_empty());
    }

    #[test]
    fn recorder_writes_everything_until_the_stream_ends() {
        use std::os::unix::net::UnixStream;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(LOG);
        let (mut qemu, ours) = UnixStream::pair().unwrap();
        let rec = Recorder::start(ours, &path).unwrap();
        qemu.write_all(b"boot\nlast words\n").unwrap();
        drop(qemu);
        assert_eq!(rec.finish(Duration::from_secs(5)), Some(16));
        assert_eq!(fs::read(&path).unwrap(), b"boot\nlast words\n");
    }

    #[test]
    fn following_goes_across_rotations_without_losing_or_repeating() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(LOG);
        let log = std::cell::RefCell::new(RotatingLog::create(&path, 10_000).unwrap());
        let data = lines(60_000);
        let mut chunks = data.chunks(4_000);
        // The log grows between the follower's looks: at most one rotation
        // each time, as with a console slower than the polling.
        let grow = || match chunks.next() {
            Some(c) => {
                log.borrow_mut().write(c).unwrap();
                true
            }
            None => false,
        };
        let mut out = Vec::new();
        copy_log(&path, grow, &mut out).unwrap();
        assert_eq!(out.len(), data.len());
        assert!(out == data, "the followed log differs from what was written");
    }

    #[test]
    fn copying_a_rotated_log_gives_the_old_file_then_the_new() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(LOG);
        let mut log = RotatingLog::create(&path, 10).unwrap();
        log.write(b"0123456789").unwrap();
        log.write(b"abc").unwrap();
        let mut out = Vec::new();
        copy_log(&path, || false, &mut out).unwrap();
        assert_eq!(out, b"0123456789abc");
    }
}
