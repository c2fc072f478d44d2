//! Ending the VM: stopping every process, power-off, and the fatal-error path.

use crate::console;
use crate::port;
use crate::sys;
use agentvm_proto::Frame;
use std::time::{Duration, Instant};

/// How long processes get between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(1);

/// Reaps children until none are left or `timeout` passed.
fn reap_all(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        match sys::reap_one() {
            Ok(Some(_)) => continue,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => return, // ECHILD: nothing left; or time is up
        }
    }
}

/// Stops every process but this one: SIGTERM, a grace period, SIGKILL.
pub fn stop_all() {
    console::step("stopping all processes");
    if sys::kill(-1, libc::SIGTERM).is_ok() {
        reap_all(TERM_GRACE);
    }
    if sys::kill(-1, libc::SIGKILL).is_ok() {
        reap_all(TERM_GRACE);
    }
}

/// Writes every file system's dirty data out.
pub fn sync() {
    console::step("sync");
    sys::sync();
}

/// Stops every process, syncs and powers off.
pub fn shutdown() -> ! {
    stop_all();
    sync();
    console::step("power off");
    let err = sys::power_off();
    console::line(&format!("power-off failed: {err}; halting here"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Reports `msg` on the console and to the host (InitError), then powers off.
pub fn fatal(msg: &str) -> ! {
    console::line(msg);
    port::send_last_words(&Frame::InitError(msg.to_owned()));
    shutdown()
}

/// Makes a panic report and power off like any other fatal error, so PID 1
/// never dies (which would panic the kernel). A panic in a forked child
/// (not PID 1) only ends that child.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("panic: {info}");
        if sys::getpid() == 1 {
            fatal(&msg);
        }
        console::line(&msg);
        sys::child::exit(crate::program::EXIT_NOT_EXECUTABLE);
    }));
}
