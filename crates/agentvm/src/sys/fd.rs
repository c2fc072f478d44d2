//! File descriptors: in-memory files, socket pairs, pipes, and plain reads
//! and writes on descriptors the caller borrows.

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};

/// An anonymous in-memory file (close-on-exec) holding `data`, named
/// `name` in `/proc/PID/fd`.
pub fn memfd_with(name: &str, data: &[u8]) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(data)?;
    Ok(OwnedFd::from(file))
}

/// The byte ranges of `file` (of length `len`) that hold data, found with
/// SEEK_DATA and SEEK_HOLE: a sparse file's holes are left out.
pub fn data_ranges(file: &std::fs::File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom};
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < len {
        let start = match seek(file, SeekFrom::Data(at)) {
            Ok(start) => start,
            // No data after `at`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = seek(file, SeekFrom::Hole(start))?.min(len);
        ranges.push((start, end));
        at = end;
    }
    Ok(ranges)
}

/// Turns every whole page of zeros in `file`'s data into a hole (the
/// file reads the same), and returns how many bytes that freed. A saved
/// VM's RAM holds many pages its kernel zeroed: as holes, no copy of it
/// has to read or write them.
pub fn punch_zero_pages(file: &std::fs::File, len: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    let mut buf = vec![0u8; 256 * PAGE];
    let mut freed = 0;
    let mut punch = |start: u64, end: u64| -> io::Result<()> {
        if end > start {
            use rustix::fs::FallocateFlags;
            rustix::fs::fallocate(file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, start, end - start)?;
            freed += end - start;
        }
        Ok(())
    };
    for (start, end) in data_ranges(file, len)? {
        // Ranges start and end on block bounds; a partial last page stays.
        let mut at = start;
        let mut zeros_from = at;
        while at < end {
            let n = buf.len().min((end - at) as usize);
            file.read_exact_at(&mut buf[..n], at)?;
            for page in buf[..n].chunks(PAGE) {
                if page.len() < PAGE || page.iter().any(|&b| b != 0) {
                    punch(zeros_from, at)?;
                    zeros_from = at + page.len() as u64;
                }
                at += page.len() as u64;
            }
        }
        punch(zeros_from, at)?;
    }
    Ok(freed)
}

/// A connected pair of Unix stream sockets, both close-on-exec.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    Ok(rustix::net::socketpair(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)?)
}

/// A pipe (read end, write end), both close-on-exec, asking for `capacity`
/// bytes of buffer; the kernel's default is kept if it refuses.
pub fn pipe(capacity: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let _ = rustix::pipe::fcntl_setpipe_size(&write, capacity);
    Ok((read, write))
}

/// Makes reads and writes on `fd` return `WouldBlock` instead of waiting.
pub fn set_nonblocking(fd: impl AsFd) -> io::Result<()> {
    Ok(rustix::io::ioctl_fionbio(fd, true)?)
}

/// A close-on-exec copy of `fd` numbered `min` or above.
pub fn dup_at_least(fd: impl AsFd, min: i32) -> io::Result<OwnedFd> {
    Ok(rustix::io::fcntl_dupfd_cloexec(fd, min)?)
}

/// One `read` from `fd` (a signal's interruption is retried).
pub fn read(fd: impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match rustix::io::read(fd.as_fd(), &mut *buf) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(Into::into),
        }
    }
}

/// One `write` to `fd` (a signal's interruption is retried).
pub fn write(fd: impl AsFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        match rustix::io::write(fd.as_fd(), buf) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(Into::into),
        }
    }
}

/// Writes all of `data` to `fd`, which may be blocking or not (a full
/// non-blocking descriptor is waited for).
pub fn write_all(fd: impl AsFd, mut data: &[u8]) -> io::Result<()> {
    let fd = fd.as_fd();
    while !data.is_empty() {
        match write(fd, data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(fd)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn wait_writable(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use rustix::event::{PollFd, PollFlags};
    let mut fds = [PollFd::new(&fd, PollFlags::OUT)];
    match rustix::event::poll(&mut fds, None) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Readiness of descriptors, for [`poll`].
pub use rustix::event::{PollFd, PollFlags};

/// Waits until one of `fds` is ready or `timeout` passes (`None`: no
/// limit); an interruption by a signal counts as nothing ready.
pub fn poll(fds: &mut [PollFd<'_>], timeout: Option<std::time::Duration>) -> io::Result<usize> {
    let timeout = timeout.map(|t| rustix::event::Timespec {
        tv_sec: t.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: t.subsec_nanos().into(),
    });
    match rustix::event::poll(fds, timeout.as_ref()) {
        Err(rustix::io::Errno::INTR) => Ok(0),
        r => r.map_err(Into::into),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn zero_pages_become_holes_and_the_file_reads_the_same() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let d = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(d.path().join("ram"))
            .unwrap();
        let page = |n: u64| n * 4096;
        // Pages: 0 data, 1-3 written zeros, 4 data, 5-9 written zeros, then a hole.
        file.write_all_at(&[0u8; 10 * 4096], 0).unwrap();
        file.write_all_at(b"first", page(0) + 7).unwrap();
        file.write_all_at(b"second", page(4)).unwrap();
        file.set_len(page(300)).unwrap();
        let mut before = vec![0u8; page(300) as usize];
        file.read_exact_at(&mut before, 0).unwrap();
        let blocks_before = file.metadata().unwrap().blocks();

        assert_eq!(punch_zero_pages(&file, page(300)).unwrap(), page(8));

        let mut after = vec![0u8; page(300) as usize];
        file.read_exact_at(&mut after, 0).unwrap();
        assert!(before == after, "the file reads the same");
        assert_eq!(blocks_before - file.metadata().unwrap().blocks(), page(8) / 512);
        assert_eq!(data_ranges(&file, page(300)).unwrap(), vec![(0, page(1)), (page(4), page(5))]);
    }

    #[test]
    fn memfd_holds_the_data() {
        let fd = memfd_with("test", b"hello").unwrap();
        let mut s = String::new();
        let mut f = std::fs::File::from(fd);
        std::io::Seek::rewind(&mut f).unwrap();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
    }

    #[test]
    fn socketpair_and_pipe_carry_bytes() {
        let (a, b) = socketpair().unwrap();
        write_all(&a, b"ping").unwrap();
        let mut buf = [0; 8];
        assert_eq!(read(&b, &mut buf).unwrap(), 4);
        let (r, w) = pipe(1 << 20).unwrap();
        write_all(&w, b"pong").unwrap();
        assert_eq!(read(&r, &mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"pong");
    }

    #[test]
    fn nonblocking_read_of_an_empty_socket_would_block() {
        let (a, _b) = socketpair().unwrap();
        set_nonblocking(&a).unwrap();
        let e = read(&a, &mut [0; 4]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
