//! The host's clipboard for the guest (`--clipboard`): the guest's clipboard
//! tools ask over a virtio-serial port of their own, present only when the
//! clipboard is shared (see [`agentvm_proto::clipboard`]); agentvm answers
//! each request with the host session's tool ([`host_tool`]), only what the
//! mode allows, one request at a time.
//!
//! * `off` (default): no port, no tools in the guest.
//! * `images`: the guest reads PNG and JPEG images; text and writes are
//!   refused.
//! * `all`: text too, and the guest may set the host's clipboard.

pub mod host_tool;

use std::io;
use std::os::unix::net::UnixStream;

use agentvm_proto::clipboard::{Kind, Reply, Request};

pub use host_tool::{HostClipboard, HostTool, ToolError};

/// Why a request of the guest is refused (the guest's tool prints it).
#[derive(Debug, thiserror::Error)]
pub enum ClipboardError {
    #[error("agentvm shares only images of the host's clipboard with this VM (--clipboard=images): {what} needs --clipboard=all")]
    NotShared { what: &'static str },
    #[error("agentvm lets this VM set the host's clipboard only with --clipboard=all (it is {})", .mode.name())]
    WriteNotAllowed { mode: ClipboardMode },
    #[error(transparent)]
    Host(#[from] ToolError),
}

/// What of the host's clipboard the guest gets (`--clipboard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClipboardMode {
    /// Nothing: the guest has no clipboard channel and no clipboard tools.
    #[default]
    Off,
    /// The guest reads images (PNG, JPEG) from the host's clipboard.
    Images,
    /// The guest reads images and text, and may set the host's clipboard.
    All,
}

impl ClipboardMode {
    pub fn is_on(self) -> bool {
        self != ClipboardMode::Off
    }

    /// Whether the guest may read `kind`.
    pub fn reads(self, kind: Kind) -> bool {
        match self {
            ClipboardMode::Off => false,
            ClipboardMode::Images => kind.is_image(),
            ClipboardMode::All => true,
        }
    }

    /// Whether the guest may set the host's clipboard.
    pub fn writes(self) -> bool {
        self == ClipboardMode::All
    }

    pub fn name(self) -> &'static str {
        match self {
            ClipboardMode::Off => "off",
            ClipboardMode::Images => "images",
            ClipboardMode::All => "all",
        }
    }
}

/// The clipboard as the host offers it: what may go to the guest, and the
/// tool that reads it.
#[derive(Debug)]
pub struct Service {
    pub mode: ClipboardMode,
    pub host: HostClipboard,
}

impl Service {
    /// The reply to one request from the guest.
    pub fn answer(&self, request: Request) -> Reply {
        self.try_answer(request).unwrap_or_else(|e| Reply::Refused(e.to_string()))
    }

    fn try_answer(&self, request: Request) -> Result<Reply, ClipboardError> {
        Ok(match request {
            Request::Types => Reply::Types(self.host.types()?.into_iter().filter(|k| self.mode.reads(*k)).collect()),
            // Off has no channel at all: only text under images gets here.
            Request::Read(kind) if !self.mode.reads(kind) => {
                return Err(ClipboardError::NotShared { what: if kind.is_image() { kind.mime() } else { "text" } })
            }
            Request::Read(kind) => Reply::Data(self.host.read(kind)?),
            Request::Write(..) if !self.mode.writes() => {
                return Err(ClipboardError::WriteNotAllowed { mode: self.mode })
            }
            Request::Write(kind, data) => {
                self.host.write(kind, &data)?;
                Reply::Done
            }
        })
    }

    /// Answers the guest's requests on `channel` (the launcher's end of the
    /// clipboard port) until the VM goes away or sends what is not a
    /// request, on a thread of its own.
    pub fn serve(self, channel: UnixStream) -> io::Result<()> {
        let mut reader = channel.try_clone()?;
        let mut writer = channel;
        std::thread::Builder::new().name("clipboard".into()).spawn(move || {
            // Malformed input ends the service: the guest's tools then fail.
            while let Ok(Some(request)) = Request::read_from(&mut reader) {
                if self.answer(request).write_to(&mut writer).is_err() {
                    break;
                }
            }
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(mode: ClipboardMode) -> Service {
        Service { mode, host: HostClipboard::missing("no session in this test".into()) }
    }

    #[test]
    fn images_mode_refuses_text_and_writes_before_asking_the_host() {
        let s = service(ClipboardMode::Images);
        let Reply::Refused(why) = s.answer(Request::Read(Kind::Text)) else { panic!("text was not refused") };
        assert!(why.contains("--clipboard=all"), "{why}");
        let Reply::Refused(why) = s.answer(Request::Write(Kind::Png, vec![1])) else { panic!("a write went through") };
        assert!(why.contains("--clipboard=all"), "{why}");
        // An image is asked of the host, which has no session here.
        let Reply::Refused(why) = s.answer(Request::Read(Kind::Png)) else { panic!() };
        assert!(why.contains("no session in this test"), "{why}");
    }

    #[test]
    fn all_mode_passes_text_and_writes_to_the_host() {
        let s = service(ClipboardMode::All);
        for request in [Request::Read(Kind::Text), Request::Write(Kind::Text, b"x".to_vec())] {
            let Reply::Refused(why) = s.answer(request) else { panic!() };
            assert!(why.contains("no session in this test"), "{why}");
        }
    }

    #[test]
    fn modes_read_what_they_name() {
        assert!(ClipboardMode::Images.reads(Kind::Jpeg) && !ClipboardMode::Images.reads(Kind::Text));
        assert!(ClipboardMode::All.reads(Kind::Text) && ClipboardMode::All.writes());
        assert!(!ClipboardMode::Off.reads(Kind::Png) && !ClipboardMode::Images.writes());
    }
}
