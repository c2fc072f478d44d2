//! The sixth stage: relaying until QEMU exits, while watching the helpers
//! and the guest's word on the program.

use std::time::{Duration, Instant};

use agentvm_proto::Frame;

use super::outcome::{End, HelperDeath, QemuExit, CONSOLE_TAIL_LINES};
use crate::relay::{Event, Relay};
use crate::vm::process::{self, Helper};

/// How long the guest may take to power off after the program ended, or to
/// react to a stop request, before QEMU is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long QEMU may take to stop after a helper died.
const HELPER_DEATH_GRACE: Duration = Duration::from_secs(2);
/// How long QEMU may outlive an exited helper before the helper is blamed.
const HELPER_BLAME_DELAY: Duration = Duration::from_secs(1);
/// How often the helpers are looked at while nothing else happens.
const TICK: Duration = Duration::from_millis(100);

/// The watch's state between two looks.
struct Watch<'q> {
    qemu: &'q mut Helper,
    end: End,
    /// When QEMU is killed unless it exited by then.
    kill_at: Option<Instant>,
    /// When a helper was first seen gone.
    helper_gone_at: Option<Instant>,
}

/// Relays until QEMU exits and returns how the run ended.
pub fn watch(relay: &mut Relay<'_>, qemu: &mut Helper, helpers: &mut [Helper]) -> End {
    let mut w = Watch { qemu, end: End::default(), kill_at: None, helper_gone_at: None };
    loop {
        if let Some(status) = w.qemu.poll() {
            for event in relay.drain() {
                w.on_event(event, relay);
            }
            w.end.qemu = Some(QemuExit { status, log: w.qemu.log_tail(CONSOLE_TAIL_LINES) });
            w.end.heard_from_guest = relay.heard_from_guest();
            return w.end;
        }
        w.blame_helpers(helpers);
        if w.kill_at.is_some_and(|t| Instant::now() >= t) {
            w.kill_qemu();
        }
        for event in relay.wait(Some(TICK)) {
            w.on_event(event, relay);
        }
    }
}

impl Watch<'_> {
    fn on_event(&mut self, event: Event, relay: &mut Relay<'_>) {
        match event {
            Event::Frame(Frame::Exit(code)) => {
                self.end.exit = Some(code);
                self.end_the_vm();
            }
            Event::Frame(Frame::InitError(message)) => {
                self.end.init_error = Some(message);
                self.grant_grace();
            }
            Event::Corrupt(e) => {
                self.end.init_error.get_or_insert(format!("corrupt data from the guest: {e}"));
                self.grant_grace();
            }
            // A stop asked for before the guest could listen still counts.
            Event::Frame(Frame::Started) => {
                if let Some(sig) = self.end.stop_signal {
                    relay.send(&Frame::Signal(sig as u8));
                }
            }
            Event::Frame(_) | Event::Closed => {}
            // Asked twice: stop now.
            Event::Stop(_) if self.end.stop_signal.is_some() => self.kill_qemu(),
            Event::Stop(sig) => {
                self.end.stop_signal = Some(sig);
                relay.send(&Frame::Signal(sig as u8));
                self.kill_at = Some(Instant::now() + STOP_GRACE);
            }
        }
    }

    /// The guest stopped its processes and wrote its file systems out
    /// before it sent the exit status: ending QEMU now skips only the
    /// kernel's power-off (60-100 ms of every run under TCG).
    fn end_the_vm(&mut self) {
        self.qemu.signal(libc::SIGTERM);
        self.end.we_stopped_qemu = true;
        self.grant_grace();
    }

    /// The guest powers off by itself once the program ended; give it time.
    fn grant_grace(&mut self) {
        self.kill_at.get_or_insert(Instant::now() + STOP_GRACE);
    }

    fn kill_qemu(&mut self) {
        self.qemu.signal(libc::SIGKILL);
        self.end.we_stopped_qemu = true;
    }

    /// A helper that exits is to blame only if QEMU is still running a
    /// moment later: when QEMU ends, virtiofsd ends too, and the two exits
    /// may be seen in either order.
    fn blame_helpers(&mut self, helpers: &mut [Helper]) {
        if self.end.helper_died.is_some() {
            return;
        }
        let Some(h) = helpers.iter_mut().find_map(|h| h.poll().map(|_| h)) else { return };
        let since = *self.helper_gone_at.get_or_insert_with(Instant::now);
        if since.elapsed() < HELPER_BLAME_DELAY {
            return;
        }
        let status = process::describe(h.poll().expect("exited"));
        self.end.helper_died = Some(HelperDeath { helper: h.name.clone(), status, log: h.log_tail(10) });
        self.qemu.signal(libc::SIGTERM);
        self.end.we_stopped_qemu = true;
        self.kill_at.get_or_insert(Instant::now() + HELPER_DEATH_GRACE);
    }
}
