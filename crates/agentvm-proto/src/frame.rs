//! The framed channel between launcher and guest init.
//!
//! Each frame is `kind: u8`, `len: u32` (little endian), then `len` bytes of
//! payload. One channel carries everything, so stdout and stderr stay apart
//! and the exit status cannot be confused with program output.

use crate::spec::{ExecRequest, WarmLaunch};
use crate::watch::{self, Change};

/// The virtio-serial port name both sides use (`/dev/virtio-ports/<name>`).
pub const PORT_NAME: &str = "org.agentvm.ctl";

/// How many exec ports a VM has: extra sessions (`agentvm exec`) that can
/// run at the same time as the main program.
pub const EXEC_PORTS: usize = 4;

/// The virtio-serial port name of exec port `i` (`org.agentvm.exec.<i>`).
///
/// An exec port carries the same frames as the control port, one session at
/// a time: the host connects and sends [`Frame::Exec`]; the guest starts the
/// program and relays it like the main one, then sends [`Frame::Exit`] and
/// waits for the next connection.
pub fn exec_port_name(i: usize) -> String {
    format!("org.agentvm.exec.{i}")
}

/// Largest payload accepted; bigger lengths mean a corrupt stream.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// A frame's kind byte and its payload's length (u32, little-endian).
pub const HEADER_LEN: usize = 5;

/// One message on the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    // host -> guest
    /// Bytes for the program's stdin (or the terminal's input).
    Stdin(Vec<u8>),
    /// The host's stdin reached end of file.
    StdinEof,
    /// The terminal was resized to (rows, columns).
    Resize { rows: u16, cols: u16 },
    /// Deliver this signal to the program's process group.
    Signal(u8),
    /// Start a program (first frame on an exec port; JSON payload).
    Exec(ExecRequest),
    /// The launch for a VM restored from a template (JSON payload); the
    /// guest answers [`Frame::Resumed`] before it does anything else.
    Warm(Box<WarmLaunch>),
    /// Files the host saw change under the project (on the watch port,
    /// [`crate::watch::PORT_NAME`], only).
    Changes(Vec<Change>),

    // guest -> host
    /// The program is about to start (the guest booted).
    Started,
    /// Bytes from the program's stdout (or the terminal's output).
    Stdout(Vec<u8>),
    /// Bytes from the program's stderr.
    Stderr(Vec<u8>),
    /// The program ended: its exit code, or 128+N when killed by signal N.
    Exit(i32),
    /// The guest init failed before or while starting the program.
    InitError(String),
    /// A template boot is ready to be saved: nothing of a launch is in it yet.
    TemplateReady,
    /// A restored VM took its [`Frame::Warm`] launch and goes on with it.
    Resumed,
}

/// A byte stream that is not a valid frame sequence.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame of {0} bytes exceeds the {MAX_PAYLOAD} byte limit")]
    TooLong(usize),
    #[error("frame kind {kind} has a malformed payload of {len} bytes")]
    BadPayload { kind: u8, len: usize },
}

mod kind {
    pub const STDIN: u8 = 1;
    pub const STDIN_EOF: u8 = 2;
    pub const RESIZE: u8 = 3;
    pub const SIGNAL: u8 = 4;
    pub const EXEC: u8 = 5;
    pub const WARM: u8 = 6;
    pub const CHANGES: u8 = 7;
    pub const STARTED: u8 = 16;
    pub const STDOUT: u8 = 17;
    pub const STDERR: u8 = 18;
    pub const EXIT: u8 = 19;
    pub const INIT_ERROR: u8 = 20;
    pub const TEMPLATE_READY: u8 = 21;
    pub const RESUMED: u8 = 22;
}

impl Frame {
    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (k, payload): (u8, std::borrow::Cow<[u8]>) = match self {
            Frame::Stdin(d) => (kind::STDIN, d.into()),
            Frame::StdinEof => (kind::STDIN_EOF, (&[][..]).into()),
            Frame::Resize { rows, cols } => {
                let mut p = rows.to_le_bytes().to_vec();
                p.extend_from_slice(&cols.to_le_bytes());
                (kind::RESIZE, p.into())
            }
            Frame::Signal(s) => (kind::SIGNAL, vec![*s].into()),
            Frame::Exec(req) => (kind::EXEC, serde_json::to_vec(req).expect("serializable").into()),
            Frame::Warm(launch) => (kind::WARM, serde_json::to_vec(launch).expect("serializable").into()),
            Frame::Changes(changes) => (kind::CHANGES, watch::encode_batch(changes).into()),
            Frame::Started => (kind::STARTED, (&[][..]).into()),
            Frame::Stdout(d) => (kind::STDOUT, d.into()),
            Frame::Stderr(d) => (kind::STDERR, d.into()),
            Frame::Exit(code) => (kind::EXIT, code.to_le_bytes().to_vec().into()),
            Frame::InitError(msg) => (kind::INIT_ERROR, msg.as_bytes().into()),
            Frame::TemplateReady => (kind::TEMPLATE_READY, (&[][..]).into()),
            Frame::Resumed => (kind::RESUMED, (&[][..]).into()),
        };
        out.push(k);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
    }

    /// The encoded frame as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    fn decode(k: u8, p: &[u8]) -> Result<Frame, FrameError> {
        let bad = || FrameError::BadPayload { kind: k, len: p.len() };
        Ok(match k {
            kind::STDIN => Frame::Stdin(p.to_vec()),
            kind::STDIN_EOF => Frame::StdinEof,
            kind::RESIZE => {
                let b: [u8; 4] = p.try_into().map_err(|_| bad())?;
                Frame::Resize { rows: u16::from_le_bytes([b[0], b[1]]), cols: u16::from_le_bytes([b[2], b[3]]) }
            }
            kind::SIGNAL => Frame::Signal(*p.first().filter(|_| p.len() == 1).ok_or_else(bad)?),
            kind::EXEC => Frame::Exec(serde_json::from_slice(p).map_err(|_| bad())?),
            kind::WARM => Frame::Warm(serde_json::from_slice(p).map_err(|_| bad())?),
            kind::CHANGES => Frame::Changes(watch::decode_batch(p).map_err(|_| bad())?),
            kind::STARTED => Frame::Started,
            kind::STDOUT => Frame::Stdout(p.to_vec()),
            kind::STDERR => Frame::Stderr(p.to_vec()),
            kind::EXIT => Frame::Exit(i32::from_le_bytes(p.try_into().map_err(|_| bad())?)),
            kind::INIT_ERROR => Frame::InitError(String::from_utf8_lossy(p).into_owned()),
            kind::TEMPLATE_READY => Frame::TemplateReady,
            kind::RESUMED => Frame::Resumed,
            other => return Err(FrameError::UnknownKind(other)),
        })
    }
}

/// Reads one whole frame from `r`, and nothing after it (what follows stays
/// for the next reader). A payload over `max` bytes (at most
/// [`MAX_PAYLOAD`]) is refused before it is read.
pub fn read_one(r: &mut impl std::io::Read, max: usize) -> std::io::Result<Result<Frame, FrameError>> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header)?;
    let len = payload_len(&header);
    if len > max.min(MAX_PAYLOAD) {
        return Ok(Err(FrameError::TooLong(len)));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Frame::decode(header[0], &payload))
}

/// The payload length a frame's header announces.
fn payload_len(header: &[u8]) -> usize {
    u32::from_le_bytes(header[1..HEADER_LEN].try_into().expect("a whole header")) as usize
}

/// Incremental decoder: feed it bytes as they arrive, take whole frames out.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the channel.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = payload_len(&self.buf);
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLong(len));
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let frame = Frame::decode(self.buf[0], &self.buf[HEADER_LEN..HEADER_LEN + len]);
        self.buf.drain(..HEADER_LEN + len);
        frame.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_one_takes_one_frame_and_leaves_the_rest_and_refuses_a_long_one_unread() {
        let mut bytes = Frame::Signal(15).to_bytes();
        bytes.extend(Frame::Stdout(b"next".to_vec()).to_bytes());
        let mut r = std::io::Cursor::new(bytes);
        assert_eq!(read_one(&mut r, 64).unwrap().unwrap(), Frame::Signal(15));
        assert_eq!(read_one(&mut r, 64).unwrap().unwrap(), Frame::Stdout(b"next".to_vec()));
        assert!(read_one(&mut r, 64).is_err(), "nothing left");

        let mut r = std::io::Cursor::new(Frame::Stdout(vec![0; 100]).to_bytes());
        assert!(matches!(read_one(&mut r, 99).unwrap(), Err(FrameError::TooLong(100))));
        assert_eq!(r.position(), HEADER_LEN as u64, "the payload was read");
    }

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Stdin(b"hello".to_vec()),
            Frame::StdinEof,
            Frame::Resize { rows: 40, cols: 120 },
            Frame::Signal(15),
            Frame::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec![("TERM".into(), "xterm".into())],
                tty: true,
                winsize: Some((24, 80)),
            }),
            Frame::Changes(vec![Change::Create { path: b"a/b".to_vec(), dir: false }, Change::Rescan]),
            Frame::Started,
            Frame::Stdout(vec![0, 255, 10]),
            Frame::Stderr(Vec::new()),
            Frame::Exit(-3),
            Frame::InitError("mount failed: /work".into()),
            Frame::TemplateReady,
            Frame::Resumed,
        ]
    }

    #[test]
    fn frames_roundtrip_when_fed_one_byte_at_a_time() {
        let mut bytes = Vec::new();
        for f in all_frames() {
            f.encode(&mut bytes);
        }
        let mut r = FrameReader::new();
        let mut got = Vec::new();
        for b in bytes {
            r.push(&[b]);
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, all_frames());
    }

    #[test]
    fn warm_launch_roundtrips_with_its_spec() {
        let warm = Frame::Warm(Box::new(WarmLaunch {
            spec: crate::spec::tests::sample(),
            clock_ns: 1_700_000_000_123_456_789,
            seed: "ab".repeat(32),
            machine_id: "0f".repeat(16),
        }));
        let mut r = FrameReader::new();
        r.push(&warm.to_bytes());
        assert_eq!(r.next_frame().unwrap(), Some(warm));
    }

    #[test]
    fn unknown_kind_is_an_error() {
        let mut r = FrameReader::new();
        r.push(&[99, 0, 0, 0, 0]);
        assert_eq!(r.next_frame(), Err(FrameError::UnknownKind(99)));
    }

    #[test]
    fn oversized_length_is_rejected_before_buffering() {
        let mut r = FrameReader::new();
        r.push(&[1, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(r.next_frame(), Err(FrameError::TooLong(_))));
    }

    #[test]
    fn exec_with_bad_json_is_a_bad_payload() {
        let mut r = FrameReader::new();
        r.push(&[5, 2, 0, 0, 0, b'{', b'x']);
        assert!(matches!(r.next_frame(), Err(FrameError::BadPayload { kind: 5, .. })));
    }

    #[test]
    fn exec_request_fields_other_than_argv_are_optional() {
        let req: ExecRequest = serde_json::from_str(r#"{"argv":["ls"]}"#).unwrap();
        assert_eq!(req, ExecRequest { argv: vec!["ls".into()], env: vec![], tty: false, winsize: None });
    }

    #[test]
    fn exec_port_names_are_numbered() {
        assert_eq!(exec_port_name(0), "org.agentvm.exec.0");
        assert_eq!(exec_port_name(EXEC_PORTS - 1), "org.agentvm.exec.3");
    }

    #[test]
    fn a_change_naming_a_path_outside_work_is_a_bad_payload() {
        let mut r = FrameReader::new();
        r.push(&[7, 6, 0, 0, 0, b'D', b'f', 2, 0, b'.', b'.']);
        assert!(matches!(r.next_frame(), Err(FrameError::BadPayload { kind: 7, .. })));
    }

    #[test]
    fn malformed_resize_payload_is_an_error() {
        let mut r = FrameReader::new();
        r.push(&[3, 1, 0, 0, 0, 7]);
        assert!(matches!(r.next_frame(), Err(FrameError::BadPayload { kind: 3, .. })));
    }
}
