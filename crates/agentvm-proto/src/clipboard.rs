//! The host's clipboard for the guest (`--clipboard`): the guest's `xclip`,
//! `xsel`, `wl-paste` and `wl-copy` (the guest init, called by those names)
//! ask the guest init at [`GUEST_SOCKET`], which passes each request to the
//! host over a virtio-serial port of its own, [`PORT_NAME`], present only
//! when the clipboard is shared. The host answers each [`Request`] with one
//! [`Reply`], one at a time.
//!
//! A clipboard type travels as a byte naming one of [`Kind`], never as a
//! name: what the host may be asked for is this fixed list, whatever a
//! program in the guest asks its tool for.

use std::io::{self, Read, Write};

/// The virtio-serial port name of the clipboard channel.
pub const PORT_NAME: &str = "org.agentvm.clip";
/// Where the guest init listens for the clipboard tools' requests.
pub const GUEST_SOCKET: &str = "/run/agentvm/clipboard.sock";
/// The most clipboard content one message carries, either way.
pub const MAX_DATA: usize = 32 << 20;
/// The longest refusal text.
pub const MAX_TEXT: usize = 4096;

const HEADER_LEN: usize = 5;

/// The clipboard types that can be shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Png,
    Jpeg,
    /// UTF-8 text.
    Text,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Png, Kind::Jpeg, Kind::Text];

    /// The MIME type.
    pub fn mime(self) -> &'static str {
        match self {
            Kind::Png => "image/png",
            Kind::Jpeg => "image/jpeg",
            Kind::Text => "text/plain;charset=utf-8",
        }
    }

    pub fn is_image(self) -> bool {
        matches!(self, Kind::Png | Kind::Jpeg)
    }

    /// The kind a tool's type name means: a MIME type, or an X target
    /// (`UTF8_STRING`, `STRING`, `TEXT`) for text. Case does not matter.
    pub fn from_name(name: &str) -> Option<Kind> {
        const NAMES: &[(&str, Kind)] = &[
            ("image/png", Kind::Png),
            ("image/jpeg", Kind::Jpeg),
            ("image/jpg", Kind::Jpeg),
            ("text/plain;charset=utf-8", Kind::Text),
            ("text/plain", Kind::Text),
            ("text", Kind::Text),
            ("UTF8_STRING", Kind::Text),
            ("STRING", Kind::Text),
            ("TEXT", Kind::Text),
        ];
        let name = name.trim();
        NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, k)| *k)
    }

    fn code(self) -> u8 {
        match self {
            Kind::Png => 1,
            Kind::Jpeg => 2,
            Kind::Text => 3,
        }
    }

    fn from_code(code: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.code() == code)
    }
}

/// What the guest asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Which of the shared kinds the clipboard holds.
    Types,
    /// The clipboard's content as this kind.
    Read(Kind),
    /// Set the clipboard to this content.
    Write(Kind, Vec<u8>),
}

/// The host's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The kinds the clipboard holds that the guest may read.
    Types(Vec<Kind>),
    /// The content asked for.
    Data(Vec<u8>),
    /// The clipboard was set.
    Done,
    /// Why not (for the tool to print).
    Refused(String),
}

/// A message that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ClipboardError {
    #[error("clipboard channel: {0}")]
    Io(#[from] io::Error),
    #[error("clipboard channel: a message of {len} bytes is over the {max} byte limit")]
    TooLong { len: usize, max: usize },
    #[error("clipboard channel: unknown message {0}")]
    UnknownMessage(u8),
    #[error("clipboard channel: message {tag} has a malformed payload of {len} bytes")]
    BadPayload { tag: u8, len: usize },
}

mod tag {
    pub const TYPES: u8 = 1;
    pub const READ: u8 = 2;
    pub const WRITE: u8 = 3;
    pub const LIST: u8 = 16;
    pub const DATA: u8 = 17;
    pub const DONE: u8 = 18;
    pub const REFUSED: u8 = 19;
}

impl Request {
    /// Writes the request: `tag: u8`, `len: u32` (little endian), payload.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        match self {
            Request::Types => send(w, tag::TYPES, &[], &[]),
            Request::Read(kind) => send(w, tag::READ, &[kind.code()], &[]),
            Request::Write(kind, data) => send(w, tag::WRITE, &[kind.code()], data),
        }
    }

    /// Reads one request; `Ok(None)` at a clean end of the stream.
    pub fn read_from(r: &mut impl Read) -> Result<Option<Request>, ClipboardError> {
        let Some((t, payload)) = receive(r, 1 + MAX_DATA)? else { return Ok(None) };
        let bad = || ClipboardError::BadPayload { tag: t, len: payload.len() };
        let kind = |p: &[u8]| p.first().copied().and_then(Kind::from_code);
        Ok(Some(match t {
            tag::TYPES if payload.is_empty() => Request::Types,
            tag::READ if payload.len() == 1 => Request::Read(kind(&payload).ok_or_else(bad)?),
            tag::WRITE => Request::Write(kind(&payload).ok_or_else(bad)?, payload[1..].to_vec()),
            tag::TYPES | tag::READ => return Err(bad()),
            other => return Err(ClipboardError::UnknownMessage(other)),
        }))
    }
}

impl Reply {
    /// Writes the reply (same layout as a request).
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        match self {
            Reply::Types(kinds) => send(w, tag::LIST, &kinds.iter().map(|k| k.code()).collect::<Vec<_>>(), &[]),
            Reply::Data(data) => send(w, tag::DATA, &[], data),
            Reply::Done => send(w, tag::DONE, &[], &[]),
            Reply::Refused(why) => send(w, tag::REFUSED, &[], truncate(why, MAX_TEXT).as_bytes()),
        }
    }

    /// Reads one reply; `Ok(None)` at a clean end of the stream.
    pub fn read_from(r: &mut impl Read) -> Result<Option<Reply>, ClipboardError> {
        let Some((t, payload)) = receive(r, MAX_DATA)? else { return Ok(None) };
        let bad = || ClipboardError::BadPayload { tag: t, len: payload.len() };
        Ok(Some(match t {
            tag::LIST => {
                Reply::Types(payload.iter().map(|&c| Kind::from_code(c).ok_or_else(bad)).collect::<Result<_, _>>()?)
            }
            tag::DATA => Reply::Data(payload),
            tag::DONE if payload.is_empty() => Reply::Done,
            tag::REFUSED if payload.len() <= MAX_TEXT => Reply::Refused(String::from_utf8_lossy(&payload).into_owned()),
            tag::DONE | tag::REFUSED => return Err(bad()),
            other => return Err(ClipboardError::UnknownMessage(other)),
        }))
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn send(w: &mut impl Write, t: u8, head: &[u8], data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(head.len() + data.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut header = [0u8; HEADER_LEN];
    header[0] = t;
    header[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&header)?;
    w.write_all(head)?;
    w.write_all(data)?;
    w.flush()
}

/// One message's tag and payload, its length checked against `max` before
/// anything is read; memory grows with the bytes that actually arrive.
fn receive(r: &mut impl Read, max: usize) -> Result<Option<(u8, Vec<u8>)>, ClipboardError> {
    let mut header = [0u8; HEADER_LEN];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(header[1..].try_into().expect("4 bytes")) as usize;
    if len > max {
        return Err(ClipboardError::TooLong { len, max });
    }
    let mut payload = Vec::new();
    r.take(len as u64).read_to_end(&mut payload)?;
    if payload.len() < len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(Some((header[0], payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_roundtrip() {
        let requests = [Request::Types, Request::Read(Kind::Jpeg), Request::Write(Kind::Text, b"hi".to_vec())];
        let mut bytes = Vec::new();
        for r in &requests {
            r.write_to(&mut bytes).unwrap();
        }
        let mut r = &bytes[..];
        for want in &requests {
            assert_eq!(Request::read_from(&mut r).unwrap().as_ref(), Some(want));
        }
        assert!(Request::read_from(&mut r).unwrap().is_none());

        let replies = [
            Reply::Types(vec![Kind::Png, Kind::Text]),
            Reply::Data(vec![0x89, b'P', b'N', b'G']),
            Reply::Done,
            Reply::Refused("no".into()),
        ];
        let mut bytes = Vec::new();
        for r in &replies {
            r.write_to(&mut bytes).unwrap();
        }
        let mut r = &bytes[..];
        for want in &replies {
            assert_eq!(Reply::read_from(&mut r).unwrap().as_ref(), Some(want));
        }
    }

    #[test]
    fn an_oversized_message_is_refused_before_its_payload_is_read() {
        let mut header = vec![tag::WRITE];
        header.extend_from_slice(&(MAX_DATA as u32 + 2).to_le_bytes());
        assert!(matches!(Request::read_from(&mut &header[..]), Err(ClipboardError::TooLong { .. })));
        let mut header = vec![tag::DATA];
        header.extend_from_slice(&(MAX_DATA as u32 + 1).to_le_bytes());
        assert!(matches!(Reply::read_from(&mut &header[..]), Err(ClipboardError::TooLong { .. })));
    }

    #[test]
    fn unknown_kinds_tags_and_short_payloads_are_errors() {
        let bad_kind = [tag::READ, 1, 0, 0, 0, 9];
        assert!(matches!(Request::read_from(&mut &bad_kind[..]), Err(ClipboardError::BadPayload { .. })));
        let unknown = [42u8, 0, 0, 0, 0];
        assert!(matches!(Request::read_from(&mut &unknown[..]), Err(ClipboardError::UnknownMessage(42))));
        let short = [tag::DATA, 5, 0, 0, 0, 1, 2];
        assert!(matches!(Reply::read_from(&mut &short[..]), Err(ClipboardError::Io(_))));
        let write_without_kind = [tag::WRITE, 0, 0, 0, 0];
        assert!(Request::read_from(&mut &write_without_kind[..]).is_err());
    }

    #[test]
    fn tool_names_map_to_kinds_and_others_to_none() {
        assert_eq!(Kind::from_name("image/png"), Some(Kind::Png));
        assert_eq!(Kind::from_name("IMAGE/JPG"), Some(Kind::Jpeg));
        assert_eq!(Kind::from_name("UTF8_STRING"), Some(Kind::Text));
        assert_eq!(Kind::from_name("text/plain;charset=utf-8"), Some(Kind::Text));
        assert_eq!(Kind::from_name("image/bmp"), None);
        assert_eq!(Kind::from_name("TARGETS"), None);
    }

    #[test]
    fn a_long_refusal_is_cut_at_a_character() {
        let mut bytes = Vec::new();
        Reply::Refused("é".repeat(MAX_TEXT)).write_to(&mut bytes).unwrap();
        let Some(Reply::Refused(text)) = Reply::read_from(&mut &bytes[..]).unwrap() else { panic!() };
        assert!(text.len() <= MAX_TEXT && text.chars().all(|c| c == 'é'));
    }
}
