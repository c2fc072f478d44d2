//! The host terminal: raw mode (restored on every exit path) and its size.

use std::io;
use std::os::fd::AsFd;

use rustix::termios::{self, OptionalActions, Termios};

/// Whether `fd` is a terminal.
pub fn is_tty(fd: impl AsFd) -> bool {
    termios::isatty(fd)
}

/// Whether standard input and standard output are both terminals: an
/// interactive session.
pub fn interactive() -> bool {
    is_tty(io::stdin()) && is_tty(io::stdout())
}

/// The terminal size of `fd` as (rows, columns), if it is a terminal.
pub fn winsize(fd: impl AsFd) -> Option<(u16, u16)> {
    let ws = termios::tcgetwinsize(fd).ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Puts the terminal on standard input in raw mode until dropped.
/// Keystrokes such as Ctrl-C then go to the guest program instead of
/// signalling the launcher.
#[derive(Debug)]
pub struct RawMode {
    stdin: io::Stdin,
    saved: Termios,
}

impl RawMode {
    pub fn enable() -> io::Result<RawMode> {
        let stdin = io::stdin();
        let saved = termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&stdin, OptionalActions::Now, &raw)?;
        Ok(RawMode { stdin, saved })
    }

    /// Restores the saved settings (also done on drop).
    pub fn restore(&self) {
        let _ = termios::tcsetattr(&self.stdin, OptionalActions::Now, &self.saved);
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        self.restore();
    }
}
