//! File changes made on the host, for the guest's file watchers (`watch`):
//! virtiofs raises no inotify event for them, so the host watches the
//! project and sends what changed over a virtio-serial port of its own,
//! [`PORT_NAME`], as [`crate::Frame::Changes`] batches; the guest init
//! hands each [`Change`] to the kernel module behind [`DEVICE`], which
//! raises the matching events on /work. The host only writes this port.
//!
//! Paths are relative to /work, as bytes (a file name need not be UTF-8),
//! and checked on both sides: non-empty, no `.`, `..` or empty component,
//! no NUL, at most [`MAX_PATH`] bytes.

/// The virtio-serial port name of the change channel.
pub const PORT_NAME: &str = "org.agentvm.watch";
/// The guest's device that raises the events (the kernel module's).
pub const DEVICE: &str = "/dev/agentvm-notify";
/// The kernel module's file name, in an image's boot modules directory.
pub const MODULE_FILE: &str = "agentvm_notify.ko";
/// The longest path a change names (the kernel's PATH_MAX less its NUL).
pub const MAX_PATH: usize = 4095;
/// The most changes one batch holds.
pub const MAX_BATCH: usize = 1024;

/// One change under /work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A file's content changed.
    Modify {
        path: Vec<u8>,
        dir: bool,
    },
    Create {
        path: Vec<u8>,
        dir: bool,
    },
    Delete {
        path: Vec<u8>,
        dir: bool,
    },
    /// Moved within the project.
    Rename {
        from: Vec<u8>,
        to: Vec<u8>,
        dir: bool,
    },
    /// More changed than was kept: watchers should look at everything (a
    /// modify on /work itself).
    Rescan,
}

/// A batch that is not a valid sequence of changes.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("a change batch ends inside a record")]
    Truncated,
    #[error("unknown change kind {0:#04x}")]
    UnknownKind(u8),
    #[error("change path {0:?} is not a relative path under /work")]
    BadPath(String),
    #[error("a change batch holds over {MAX_BATCH} changes")]
    TooMany,
}

const MODIFY: u8 = b'M';
const CREATE: u8 = b'C';
const DELETE: u8 = b'D';
const RENAME: u8 = b'R';
const RESCAN: u8 = b'A';

/// Whether `path` is one a change may name (see the module's docs).
pub fn valid_path(path: &[u8]) -> bool {
    !path.is_empty()
        && path.len() <= MAX_PATH
        && !path.contains(&0)
        && path.split(|b| *b == b'/').all(|c| !c.is_empty() && c != b"." && c != b"..")
}

impl Change {
    fn kind(&self) -> u8 {
        match self {
            Change::Modify { .. } => MODIFY,
            Change::Create { .. } => CREATE,
            Change::Delete { .. } => DELETE,
            Change::Rename { .. } => RENAME,
            Change::Rescan => RESCAN,
        }
    }

    fn is_dir(&self) -> bool {
        match self {
            Change::Modify { dir, .. } | Change::Create { dir, .. } | Change::Delete { dir, .. } => *dir,
            Change::Rename { dir, .. } => *dir,
            Change::Rescan => true,
        }
    }

    /// The paths it names: none, one, or a rename's two.
    fn paths(&self) -> Vec<&[u8]> {
        match self {
            Change::Modify { path, .. } | Change::Create { path, .. } | Change::Delete { path, .. } => vec![path],
            Change::Rename { from, to, .. } => vec![from, to],
            Change::Rescan => Vec::new(),
        }
    }

    /// The record the kernel module takes in one write: kind, `d` or `f`,
    /// the path (a rename's two joined by a NUL).
    pub fn device_record(&self) -> Vec<u8> {
        let mut rec = vec![self.kind(), if self.is_dir() { b'd' } else { b'f' }];
        rec.extend(self.paths().join(&0u8));
        rec
    }

    /// Appends the change as a batch holds it: kind, `d` or `f`, then each
    /// path as a u16 (little-endian) length and its bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend([self.kind(), if self.is_dir() { b'd' } else { b'f' }]);
        for path in self.paths() {
            out.extend_from_slice(&(path.len() as u16).to_le_bytes());
            out.extend_from_slice(path);
        }
    }

    /// Its size in a batch.
    pub fn encoded_len(&self) -> usize {
        2 + self.paths().iter().map(|p| 2 + p.len()).sum::<usize>()
    }
}

/// A batch's bytes.
pub fn encode_batch(changes: &[Change]) -> Vec<u8> {
    let mut out = Vec::new();
    for change in changes {
        change.encode(&mut out);
    }
    out
}

/// The changes of a batch, each path checked.
pub fn decode_batch(mut bytes: &[u8]) -> Result<Vec<Change>, ChangeError> {
    let mut changes = Vec::new();
    while !bytes.is_empty() {
        if changes.len() == MAX_BATCH {
            return Err(ChangeError::TooMany);
        }
        let [kind, flag, rest @ ..] = bytes else { return Err(ChangeError::Truncated) };
        let dir = match flag {
            b'd' => true,
            b'f' => false,
            _ => return Err(ChangeError::UnknownKind(*flag)),
        };
        bytes = rest;
        let mut path = || take_path(&mut bytes);
        changes.push(match *kind {
            MODIFY => Change::Modify { path: path()?, dir },
            CREATE => Change::Create { path: path()?, dir },
            DELETE => Change::Delete { path: path()?, dir },
            RENAME => Change::Rename { from: path()?, to: path()?, dir },
            RESCAN => Change::Rescan,
            other => return Err(ChangeError::UnknownKind(other)),
        });
    }
    Ok(changes)
}

/// One length-prefixed path off the front of `bytes`.
fn take_path(bytes: &mut &[u8]) -> Result<Vec<u8>, ChangeError> {
    let [a, b, rest @ ..] = *bytes else { return Err(ChangeError::Truncated) };
    let len = u16::from_le_bytes([*a, *b]) as usize;
    let path = rest.get(..len).ok_or(ChangeError::Truncated)?;
    if !valid_path(path) {
        return Err(ChangeError::BadPath(String::from_utf8_lossy(path).into_owned()));
    }
    *bytes = &rest[len..];
    Ok(path.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Change> {
        vec![
            Change::Modify { path: b"src/main.rs".to_vec(), dir: false },
            Change::Create { path: b"new dir".to_vec(), dir: true },
            Change::Delete { path: b"a/\xffb".to_vec(), dir: false },
            Change::Rename { from: b"a.tmp".to_vec(), to: b"a".to_vec(), dir: false },
            Change::Rescan,
        ]
    }

    #[test]
    fn batches_roundtrip_and_know_their_size() {
        let bytes = encode_batch(&sample());
        assert_eq!(bytes.len(), sample().iter().map(Change::encoded_len).sum::<usize>());
        assert_eq!(decode_batch(&bytes).unwrap(), sample());
        assert_eq!(decode_batch(&[]).unwrap(), []);
    }

    #[test]
    fn device_records_are_kind_flag_and_paths_joined_by_nul() {
        let records: Vec<Vec<u8>> = sample().iter().map(Change::device_record).collect();
        assert_eq!(records, [&b"Mfsrc/main.rs"[..], b"Cdnew dir", b"Dfa/\xffb", b"Rfa.tmp\0a", b"Ad"]);
    }

    #[test]
    fn paths_that_leave_work_or_hide_a_nul_are_refused() {
        for bad in [&b""[..], b"/etc/passwd", b"..", b"a/../../x", b"a//b", b"./a", b"a/", b"a\0b"] {
            assert!(!valid_path(bad), "{bad:?}");
            let mut bytes = vec![MODIFY, b'f'];
            bytes.extend((bad.len() as u16).to_le_bytes());
            bytes.extend(bad);
            assert!(matches!(decode_batch(&bytes), Err(ChangeError::BadPath(_))), "{bad:?}");
        }
        assert!(valid_path(b"a/.b/..c/x"));
        assert!(!valid_path(&[b'a'; MAX_PATH + 1]));
    }

    #[test]
    fn truncated_unknown_and_oversized_batches_are_errors() {
        let bytes = encode_batch(&sample()[..1]);
        for cut in 1..bytes.len() {
            assert_eq!(decode_batch(&bytes[..cut]), Err(ChangeError::Truncated), "cut at {cut}");
        }
        assert_eq!(decode_batch(b"Xf"), Err(ChangeError::UnknownKind(b'X')));
        assert_eq!(decode_batch(b"Mx"), Err(ChangeError::UnknownKind(b'x')));
        let many = encode_batch(&vec![Change::Rescan; MAX_BATCH + 1]);
        assert_eq!(decode_batch(&many), Err(ChangeError::TooMany));
        assert_eq!(decode_batch(&encode_batch(&vec![Change::Rescan; MAX_BATCH])).unwrap().len(), MAX_BATCH);
    }
}
