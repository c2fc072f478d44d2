//! Text a guest wrote, made safe to log and to print: control characters
//! and non-ASCII bytes become `\xNN`, so it can neither forge log lines nor
//! send escape sequences to the user's terminal.

/// Text from the guest as one line of printable ASCII: control characters,
/// non-ASCII bytes and backslashes become `\xNN`, so a request cannot forge
/// log lines or send escape sequences to the terminal that shows the log.
pub fn log_line(text: &str) -> String {
    String::from_utf8(escape_bytes(text.as_bytes(), false)).unwrap_or_default()
}

/// `bytes` for a terminal: as [`log_line`] but newlines are kept and
/// backslashes are left alone (for printing a log written escaped).
pub fn printable(bytes: &[u8]) -> Vec<u8> {
    escape_bytes(bytes, true)
}

fn escape_bytes(bytes: &[u8], lines: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        let keep = (b' '..=b'~').contains(&b) && (lines || b != b'\\') || (lines && b == b'\n');
        if keep {
            out.push(b);
        } else {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        }
    }
    out
}

/// Guest text for a terminal, as [`printable`].
pub fn printable_text(text: &str) -> String {
    String::from_utf8_lossy(&printable(text.as_bytes())).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_text_is_escaped_and_printing_keeps_only_lines() {
        assert_eq!(log_line("CONNECT a\n1 ALLOW x\x1b[2J\\é"), "CONNECT a\\x0a1 ALLOW x\\x1b[2J\\x5c\\xc3\\xa9");
        assert_eq!(printable(b"1 DENY a\n2 ALLOW \x1b]0;x\x07 \\x1b\n"), b"1 DENY a\n2 ALLOW \\x1b]0;x\\x07 \\x1b\n");
        assert_eq!(printable_text("main\x1b[31m"), "main\\x1b[31m");
    }
}
