//! The relay loop: frames from the host to the program, its output back,
//! the exec sessions alongside, and reaping every process (PID 1 inherits
//! orphans).

use crate::error::{Error, Result};
use crate::exec::ExecPorts;
use crate::port::{Input, Port};
use crate::program::Child;
use crate::session::{pollfd, Session};
use crate::sys;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

/// How the relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The program exited with this code (128+N for signal N).
    Exited(i32),
    /// The host closed the port.
    HostGone,
}

/// Relays between the port and `child` until the child exited and its output
/// is drained, or the host is gone; serves the exec ports meanwhile. Reaps
/// every child of the init.
pub fn run(port: &mut Port, child: Child, sigchld: &OwnedFd, exec: &mut ExecPorts) -> Result<Outcome> {
    let sigfd = sigchld.as_raw_fd();
    let mut main = Session::new(child);
    loop {
        let now = Instant::now();
        if let Some(code) = main.finished(now) {
            return Ok(Outcome::Exited(code));
        }
        let timeout = [main.timeout(now), exec.timeout(now)].into_iter().flatten().min();

        let port_events = if main.wants_input() { libc::POLLIN } else { 0 };
        let mut fds = vec![pollfd(sigfd, libc::POLLIN), pollfd(port.raw_fd(), port_events)];
        let mut slots = Vec::new();
        main.poll_fds(true, &mut slots);
        fds.extend(slots.iter().map(|(p, _)| *p));
        let exec_start = fds.len();
        let tokens = exec.poll_fds(&mut fds);
        sys::poll(&mut fds, timeout).map_err(|e| Error::sys("poll", e))?;

        if fds[0].revents != 0 {
            sys::drain_signalfd(sigfd);
            while let Ok(Some((pid, status))) = sys::reap_one() {
                if pid == main.pid() {
                    main.exited(status);
                } else {
                    exec.exited(pid, status);
                }
            }
        }
        if fds[1].revents != 0 {
            match port.receive()? {
                Input::Closed => return Ok(Outcome::HostGone),
                Input::Frames(frames) => frames.into_iter().for_each(|f| main.on_host_frame(f)),
            }
        }
        for (i, (_, slot)) in slots.iter().enumerate() {
            if fds[2 + i].revents != 0 {
                if let Some(frame) = main.ready(*slot) {
                    port.send(&frame)?;
                }
            }
        }
        // Output of the main program must not wait for an exec client:
        // exec ports only ever take what they can without blocking.
        exec.ready(&fds[exec_start..], &tokens);
        exec.tick(Instant::now());
    }
}
