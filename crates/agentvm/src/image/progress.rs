//! Build progress: which step runs and for how long.

use std::io::{IsTerminal, Write};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Receives the steps of an image build.
pub trait Progress {
    /// A new step begins (the previous one, if any, has succeeded).
    fn step(&mut self, name: &str);
    /// The last step has succeeded; the build is over.
    fn done(&mut self);
    /// The current step has failed; the build is over.
    fn fail(&mut self) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullProgress;

impl Progress for NullProgress {
    fn step(&mut self, _name: &str) {}
    fn done(&mut self) {}
}

/// Reports on stderr: a live line with the running step and its seconds when
/// stderr is a terminal, else one line per finished step.
pub struct TerminalProgress {
    label: String,
    live: bool,
    current: Option<Running>,
}

/// The step in progress.
struct Running {
    name: String,
    start: Instant,
    /// Stops the ticker that redraws the live line.
    ticker: Option<(Sender<()>, JoinHandle<()>)>,
}

impl TerminalProgress {
    /// Progress lines start with "agentvm: image".
    pub fn new() -> TerminalProgress {
        TerminalProgress::labeled("agentvm: image")
    }

    /// Progress lines start with `label` (e.g. "agentvm: image base").
    pub fn labeled(label: &str) -> TerminalProgress {
        TerminalProgress { label: label.to_string(), live: std::io::stderr().is_terminal(), current: None }
    }

    /// Ends the current step with `outcome` ("ok", "failed").
    fn finish(&mut self, outcome: &str) {
        let Some(running) = self.current.take() else {
            return;
        };
        if let Some((stop, handle)) = running.ticker {
            drop(stop);
            let _ = handle.join();
        }
        let secs = running.start.elapsed().as_secs_f64();
        let clear = if self.live { "\r\x1b[2K" } else { "" };
        eprintln!("{clear}{}: {} {outcome} ({secs:.1}s)", self.label, running.name);
    }
}

/// Redraws `label: name Ns` every half second until `stop` is dropped.
fn spawn_ticker(label: String, name: String, start: Instant) -> (Sender<()>, JoinHandle<()>) {
    let (stop, stopped) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || loop {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{label}: {name} {}s", start.elapsed().as_secs());
        let _ = err.flush();
        drop(err);
        match stopped.recv_timeout(Duration::from_millis(500)) {
            Err(RecvTimeoutError::Timeout) => continue,
            _ => break,
        }
    });
    (stop, handle)
}

impl Default for TerminalProgress {
    fn default() -> Self {
        TerminalProgress::new()
    }
}

impl Progress for TerminalProgress {
    fn step(&mut self, name: &str) {
        self.finish("ok");
        let start = Instant::now();
        let ticker = self.live.then(|| spawn_ticker(self.label.clone(), name.to_string(), start));
        self.current = Some(Running { name: name.to_string(), start, ticker });
    }

    fn done(&mut self) {
        self.finish("ok");
    }

    fn fail(&mut self) {
        self.finish("failed");
    }
}

impl Drop for TerminalProgress {
    fn drop(&mut self) {
        self.finish("stopped");
    }
}
