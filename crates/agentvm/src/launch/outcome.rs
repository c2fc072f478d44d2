//! The last stage: how a run ended, as the program's exit status or an
//! error that says why there is none (with the guest console's last lines).

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use crate::instance::console_log;
use crate::sandbox::import::{ImportError, Imported};
use crate::vm::process;

/// Lines of the guest console shown when a launch fails.
pub const CONSOLE_TAIL_LINES: usize = 25;
/// The end of the console those lines are taken from (a guest may write
/// lines of any length).
const CONSOLE_TAIL_BYTES: u64 = 16 << 10;
/// The end of the console `--verbose` shows when the run ends.
const VERBOSE_CONSOLE_BYTES: u64 = 1 << 20;

/// The VM ran but did not report the program's exit status.
#[derive(Debug, thiserror::Error)]
pub enum EndError {
    #[error("the guest failed to start the program: {message}\n--- guest console (last lines) ---\n{console}")]
    GuestInit { message: String, console: String },
    #[error("the VM ended without reporting the program's exit status (QEMU {status}); the guest may have crashed\n--- guest console (last lines) ---\n{console}")]
    GuestDied { status: String, console: String },
    #[error("QEMU was killed ({status}) by something other than agentvm; the program's exit status is lost\n--- guest console (last lines) ---\n{console}")]
    QemuKilled { status: String, console: String },
    #[error("QEMU failed to start the VM ({status}):\n{log}")]
    QemuFailed { status: String, log: String },
    #[error("{helper} exited unexpectedly ({status}); the VM was stopped\n{log}")]
    HelperDied { helper: String, status: String, log: String },
    #[error("stopped by signal {0} before the program reported its exit status")]
    Interrupted(i32),
}

impl EndError {
    /// 128+N for a signal, otherwise 125 (agentvm itself failed, as
    /// `docker run` does).
    pub fn exit_code(&self) -> i32 {
        match self {
            EndError::Interrupted(sig) => 128 + sig,
            _ => 125,
        }
    }
}

/// How QEMU exited.
#[derive(Debug)]
pub struct QemuExit {
    pub status: ExitStatus,
    /// The end of its own output.
    pub log: String,
}

/// A helper that died while QEMU ran.
#[derive(Debug)]
pub struct HelperDeath {
    pub helper: String,
    pub status: String,
    pub log: String,
}

/// What the relay saw by the time QEMU exited.
#[derive(Debug, Default)]
pub struct End {
    pub exit: Option<i32>,
    pub init_error: Option<String>,
    pub helper_died: Option<HelperDeath>,
    pub stop_signal: Option<i32>,
    pub qemu: Option<QemuExit>,
    /// agentvm itself signalled QEMU (grace period over, helper died, ...).
    pub we_stopped_qemu: bool,
    /// The guest said a word before QEMU exited.
    pub heard_from_guest: bool,
}

impl End {
    /// The program's exit status, or why there is none; `console` is the
    /// guest console's last lines.
    pub fn into_result(self, console: String) -> Result<i32, EndError> {
        if let Some(code) = self.exit {
            return Ok(code);
        }
        if let Some(message) = self.init_error {
            return Err(EndError::GuestInit { message, console });
        }
        if let Some(HelperDeath { helper, status, log }) = self.helper_died {
            return Err(EndError::HelperDied { helper, status, log });
        }
        if let Some(sig) = self.stop_signal {
            return Err(EndError::Interrupted(sig));
        }
        let qemu = self.qemu.expect("the relay ends when QEMU exits");
        let status = process::describe(qemu.status);
        if qemu.status.signal().is_some() && !self.we_stopped_qemu {
            return Err(EndError::QemuKilled { status, console });
        }
        if !self.heard_from_guest && !qemu.status.success() {
            return Err(EndError::QemuFailed { status, log: qemu.log });
        }
        Err(EndError::GuestDied { status, console })
    }
}

/// The end of the guest console, for `--verbose`.
#[derive(Debug, Clone)]
pub struct ConsoleDump {
    pub text: Vec<u8>,
    /// How much the guest wrote, when known.
    pub total: Option<u64>,
}

impl ConsoleDump {
    pub fn read(path: &Path, total: Option<u64>) -> ConsoleDump {
        ConsoleDump { text: console_log::tail(path, VERBOSE_CONSOLE_BYTES), total }
    }

    /// The line to show above it.
    pub fn heading(&self) -> String {
        match self.total {
            Some(total) if total > self.text.len() as u64 => {
                format!("--- guest console (its last {} KiB of {} KiB) ---", self.text.len() / 1024, total / 1024)
            }
            _ => "--- guest console ---".into(),
        }
    }
}

/// The guest console's last lines, for an error.
pub fn console_tail(path: &Path) -> String {
    process::tail_lines(&console_log::tail(path, CONSOLE_TAIL_BYTES), CONSOLE_TAIL_LINES)
}

/// How a run that booted ended.
#[derive(Debug)]
pub struct Outcome {
    /// The program's exit status, or why there is none.
    pub result: Result<i32, EndError>,
    /// When the launch was planned (initramfs built), after agentvm started.
    pub planned: Duration,
    /// When QEMU was started, after agentvm started.
    pub qemu_started: Duration,
    /// The end of the guest console (`--verbose`).
    pub console: Option<ConsoleDump>,
    /// The sandbox's result, brought back (`--clone`, once the program
    /// reported its exit status).
    pub sandbox: Option<Result<Imported, ImportError>>,
}

/// What starts the line of [`Outcome::timings_line`].
pub const TIMINGS_PREFIX: &str = "agentvm: timings ";

impl Outcome {
    /// The launcher's own clock, for `--verbose`: one line, the prefix and
    /// a JSON object of milliseconds since agentvm started (bench/run reads
    /// it): `plan_ms` when the plan and the initramfs were ready (as
    /// `--print-plan` reports it), `qemu_started_ms` when QEMU was spawned,
    /// its helpers already running. Exec and dynamic linking before `main`
    /// are not in it.
    pub fn timings_line(&self) -> String {
        let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        let json = serde_json::json!({ "plan_ms": ms(self.planned), "qemu_started_ms": ms(self.qemu_started) });
        format!("{TIMINGS_PREFIX}{json}")
    }

    /// agentvm's own exit status: the program's, unless its sandbox's
    /// result could not be brought back after it succeeded (125).
    pub fn exit_code(&self) -> i32 {
        match (&self.result, &self.sandbox) {
            (Ok(0), Some(Err(_))) => 125,
            (Ok(code), _) => *code,
            (Err(e), _) => e.exit_code(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> Option<QemuExit> {
        Some(QemuExit { status: ExitStatus::from_raw(code << 8), log: "qemu: boom".into() })
    }

    fn killed(sig: i32) -> Option<QemuExit> {
        Some(QemuExit { status: ExitStatus::from_raw(sig), log: String::new() })
    }

    #[test]
    fn the_programs_status_wins_over_everything() {
        let end = End { exit: Some(3), stop_signal: Some(2), qemu: killed(9), ..End::default() };
        assert_eq!(end.into_result(String::new()).unwrap(), 3);
    }

    #[test]
    fn an_interrupted_run_exits_with_128_plus_the_signal() {
        let end = End { stop_signal: Some(15), qemu: exited(0), ..End::default() };
        let e = end.into_result(String::new()).unwrap_err();
        assert_eq!(e.exit_code(), 143);
    }

    #[test]
    fn qemu_killed_by_someone_else_is_told_apart_from_our_kill() {
        let e = End { qemu: killed(9), heard_from_guest: true, ..End::default() }.into_result("c".into());
        assert!(matches!(e, Err(EndError::QemuKilled { .. })));
        let e = End { qemu: killed(9), we_stopped_qemu: true, heard_from_guest: true, ..End::default() };
        assert!(matches!(e.into_result("c".into()), Err(EndError::GuestDied { .. })));
    }

    #[test]
    fn qemu_failing_before_the_guest_spoke_shows_qemus_log() {
        let e = End { qemu: exited(1), ..End::default() }.into_result("console".into()).unwrap_err();
        assert!(matches!(&e, EndError::QemuFailed { log, .. } if log == "qemu: boom"), "{e}");
        assert_eq!(e.exit_code(), 125);
    }

    #[test]
    fn init_errors_and_helper_deaths_are_named() {
        let e = End { init_error: Some("no /bin/x".into()), qemu: exited(0), ..End::default() };
        assert!(e.into_result("tail".into()).unwrap_err().to_string().contains("no /bin/x\n--- guest console"));
        let death = HelperDeath { helper: "passt (network)".into(), status: "signal 9".into(), log: String::new() };
        let e = End { helper_died: Some(death), qemu: exited(0), ..End::default() };
        assert!(e.into_result(String::new()).unwrap_err().to_string().starts_with("passt (network) exited"));
    }

    #[test]
    fn verbose_console_heading_says_when_it_is_cut() {
        assert_eq!(
            ConsoleDump { text: vec![b'x'; 2048], total: Some(4096) }.heading(),
            "--- guest console (its last 2 KiB of 4 KiB) ---"
        );
        assert_eq!(ConsoleDump { text: vec![], total: None }.heading(), "--- guest console ---");
    }

    #[test]
    fn timings_line_is_the_prefix_and_json_milliseconds() {
        let outcome = Outcome {
            result: Ok(0),
            planned: Duration::from_micros(6_543),
            qemu_started: Duration::from_micros(12_345),
            console: None,
            sandbox: None,
        };
        let line = outcome.timings_line();
        let json: serde_json::Value = serde_json::from_str(line.strip_prefix(TIMINGS_PREFIX).unwrap()).unwrap();
        assert_eq!(json, serde_json::json!({ "plan_ms": 6.5, "qemu_started_ms": 12.3 }), "{line}");
        assert!(!line.contains('\n'));
    }
}
