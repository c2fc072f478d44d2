//! Messages on the console (PID 1's stderr is the kernel console).

use std::sync::atomic::{AtomicBool, Ordering};

static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Turns step logging on or off (the spec's `verbose`).
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

/// Writes one line to the console; errors are ignored (there is nowhere to report them).
pub fn line(msg: &str) {
    let mut s = String::with_capacity(msg.len() + 16);
    s.push_str("agentvm-guest: ");
    s.push_str(msg);
    s.push('\n');
    let mut buf = s.as_bytes();
    while !buf.is_empty() {
        match crate::sys::write(2, buf) {
            Ok(n) if n > 0 => buf = &buf[n..],
            _ => return,
        }
    }
}

/// Logs a boot step with a monotonic timestamp, when verbose.
pub fn step(msg: &str) {
    if VERBOSE.load(Ordering::Relaxed) {
        let t = crate::sys::monotonic();
        line(&format!("[{:5}.{:06}] {msg}", t.as_secs(), t.subsec_micros()));
    }
}
