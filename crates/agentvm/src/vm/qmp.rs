//! A QMP client: QEMU's JSON monitor protocol, one JSON object a line,
//! over a connected socket QEMU inherited. Used to save a VM as a template
//! and to restore one. Reads are bounded in size and time: QEMU is ours,
//! but a stuck or crashed one must not hang the launch.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The longest line read from QEMU (its replies here are a few hundred bytes).
const MAX_LINE: u64 = 64 * 1024;
/// How often a migration's status is asked for.
const MIGRATION_POLL: Duration = Duration::from_millis(5);

/// A QMP exchange that failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP: {0}")]
    Io(#[from] io::Error),
    #[error("QMP: QEMU closed the monitor (did it exit?)")]
    Closed,
    #[error("QMP: a line of over {MAX_LINE} bytes")]
    TooLong,
    #[error("QMP: not a QMP message: {0}")]
    Malformed(String),
    #[error("QEMU refused {command}: {desc} ({class})")]
    Refused { command: String, class: String, desc: String },
    #[error("QEMU's migration {status}{}", .desc.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Migration { status: String, desc: Option<String> },
    #[error("QEMU did not finish {what} within {} s", .secs)]
    Timeout { what: &'static str, secs: u64 },
}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting QEMU sends first.
    Greeting,
    /// A command's result.
    Return(Value),
    /// A command's failure.
    Error { class: String, desc: String },
    /// An asynchronous event (ignored here).
    Event(String),
}

/// Parses one line QEMU sent.
pub fn parse_message(line: &[u8]) -> Result<Message, QmpError> {
    let text = || String::from_utf8_lossy(line).chars().take(200).collect::<String>();
    let value: Value = serde_json::from_slice(line).map_err(|_| QmpError::Malformed(text()))?;
    let obj = value.as_object().ok_or_else(|| QmpError::Malformed(text()))?;
    if obj.contains_key("QMP") {
        return Ok(Message::Greeting);
    }
    if let Some(ret) = obj.get("return") {
        return Ok(Message::Return(ret.clone()));
    }
    if let Some(err) = obj.get("error") {
        let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        return Ok(Message::Error { class: field("class"), desc: field("desc") });
    }
    match obj.get("event").and_then(Value::as_str) {
        Some(event) => Ok(Message::Event(event.to_string())),
        None => Err(QmpError::Malformed(text())),
    }
}

/// Where a migration is, from `query-migrate`'s result: `Ok(true)` when it
/// completed, `Ok(false)` while it runs (or has not started), an error when
/// it failed.
pub fn migration_done(ret: &Value) -> Result<bool, QmpError> {
    match ret.get("status").and_then(Value::as_str) {
        Some("completed") => Ok(true),
        Some(status @ ("failed" | "cancelled")) => Err(QmpError::Migration {
            status: status.to_string(),
            desc: ret.get("error-desc").and_then(Value::as_str).map(str::to_string),
        }),
        _ => Ok(false),
    }
}

/// A QMP session, past the greeting and capabilities negotiation.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// How long one answer may take.
    timeout: Duration,
}

impl Qmp {
    /// Opens the session on `stream`: reads the greeting, leaves
    /// capabilities negotiation mode.
    pub fn connect(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer, timeout };
        match qmp.read_message()? {
            Message::Greeting => {}
            other => return Err(QmpError::Malformed(format!("expected the greeting, got {other:?}"))),
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Runs one command; its result.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut line = serde_json::to_vec(&json!({ "execute": command, "arguments": arguments }))
            .map_err(|e| QmpError::Malformed(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        loop {
            match self.read_message()? {
                Message::Return(value) => return Ok(value),
                Message::Error { class, desc } => {
                    return Err(QmpError::Refused { command: command.to_string(), class, desc })
                }
                Message::Greeting | Message::Event(_) => {}
            }
        }
    }

    /// Turns on `x-ignore-shared`: RAM in a shared backend stays out of the
    /// migration stream (the template's RAM file holds it).
    pub fn ignore_shared_ram(&mut self) -> Result<(), QmpError> {
        let caps = json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] });
        self.execute("migrate-set-capabilities", caps).map(drop)
    }

    /// Polls `query-migrate` until the migration completed, failed, or
    /// `limit` passed.
    pub fn wait_migration(&mut self, limit: Duration) -> Result<(), QmpError> {
        let start = Instant::now();
        while !migration_done(&self.execute("query-migrate", json!({}))?)? {
            if start.elapsed() > limit {
                return Err(QmpError::Timeout { what: "the migration", secs: limit.as_secs() });
            }
            std::thread::sleep(MIGRATION_POLL);
        }
        Ok(())
    }

    /// The next message, at most [`MAX_LINE`] bytes.
    fn read_message(&mut self) -> Result<Message, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader).take(MAX_LINE + 1).read_until(b'\n', &mut line).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                QmpError::Timeout { what: "a QMP answer", secs: self.timeout.as_secs() }
            }
            _ => QmpError::Io(e),
        })?;
        match n {
            0 => Err(QmpError::Closed),
            _ if line.last() != Some(&b'\n') && n as u64 > MAX_LINE => Err(QmpError::TooLong),
            _ if line.last() != Some(&b'\n') => Err(QmpError::Closed),
            _ => parse_message(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_by_their_key() {
        let greeting = br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}}, "capabilities": []}}"#;
        assert_eq!(parse_message(greeting).unwrap(), Message::Greeting);
        assert_eq!(parse_message(b"{\"return\": {}}\n").unwrap(), Message::Return(json!({})));
        let err = br#"{"error": {"class": "GenericError", "desc": "no migration"}}"#;
        assert_eq!(
            parse_message(err).unwrap(),
            Message::Error { class: "GenericError".into(), desc: "no migration".into() }
        );
        let event = br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#;
        assert_eq!(parse_message(event).unwrap(), Message::Event("STOP".into()));
        assert!(matches!(parse_message(b"[1]"), Err(QmpError::Malformed(_))));
        assert!(matches!(parse_message(b"{\"x\": 1}"), Err(QmpError::Malformed(_))));
    }

    #[test]
    fn migration_status_completed_failed_or_running() {
        assert!(migration_done(&json!({"status": "completed"})).unwrap());
        assert!(!migration_done(&json!({"status": "active"})).unwrap());
        assert!(!migration_done(&json!({})).unwrap());
        let failed = migration_done(&json!({"status": "failed", "error-desc": "load of migration failed"}));
        assert_eq!(failed.unwrap_err().to_string(), "QEMU's migration failed: load of migration failed");
    }

    /// A stand-in QEMU on the other end of a socket pair: greets, then
    /// answers each command from `answers` (events in between).
    fn fake_qemu(answers: Vec<&'static str>) -> (UnixStream, std::thread::JoinHandle<Vec<String>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let handle = std::thread::spawn(move || {
            let mut w = theirs.try_clone().unwrap();
            let mut r = BufReader::new(theirs);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n").unwrap();
            let mut got = Vec::new();
            for answer in std::iter::once("{\"return\": {}}").chain(answers) {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                got.push(line);
                w.write_all(b"{\"event\": \"RESUME\", \"timestamp\": {}}\n").unwrap();
                w.write_all(answer.as_bytes()).unwrap();
                w.write_all(b"\n").unwrap();
            }
            got
        });
        (ours, handle)
    }

    #[test]
    fn session_negotiates_then_waits_out_a_migration_past_events() {
        let (stream, qemu) = fake_qemu(vec![
            "{\"return\": {}}",
            "{\"return\": {\"status\": \"active\"}}",
            "{\"return\": {\"status\": \"completed\"}}",
        ]);
        let mut qmp = Qmp::connect(stream, Duration::from_secs(5)).unwrap();
        qmp.ignore_shared_ram().unwrap();
        qmp.wait_migration(Duration::from_secs(5)).unwrap();
        let sent = qemu.join().unwrap();
        assert!(sent[0].contains("\"qmp_capabilities\""));
        assert!(sent[1].contains("x-ignore-shared"));
        assert!(sent[2].contains("query-migrate") && sent[3].contains("query-migrate"));
    }

    #[test]
    fn refusal_names_the_command_and_qemus_reason() {
        let (stream, _qemu) = fake_qemu(vec!["{\"error\": {\"class\": \"GenericError\", \"desc\": \"bad state\"}}"]);
        let mut qmp = Qmp::connect(stream, Duration::from_secs(5)).unwrap();
        let err = qmp.execute("cont", json!({})).unwrap_err();
        assert_eq!(err.to_string(), "QEMU refused cont: bad state (GenericError)");
    }

    #[test]
    fn an_endless_line_is_refused_and_silence_times_out() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let _ = theirs.write_all(&vec![b'x'; MAX_LINE as usize + 10]);
            std::thread::sleep(Duration::from_secs(2));
        });
        assert!(matches!(Qmp::connect(ours, Duration::from_secs(1)), Err(QmpError::TooLong)));
        let (ours, _theirs) = UnixStream::pair().unwrap();
        assert!(matches!(Qmp::connect(ours, Duration::from_millis(100)), Err(QmpError::Timeout { .. })));
    }
}
