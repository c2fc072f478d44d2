//! An `agentvm` running in the background while the test acts on it.

use crate::process::{self, stderr, stdout};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output};
use std::time::Duration;

/// A background `agentvm`, killed and reaped if the test ends (or fails)
/// before it does.
pub struct Background {
    child: Option<Child>,
    /// The runtime dir of its launch: guest consoles for failure messages.
    runtime: PathBuf,
}

impl Background {
    /// Takes over `child`, an agentvm whose runtime dir is `runtime`.
    pub fn new(child: Child, runtime: &Path) -> Background {
        Background { child: Some(child), runtime: runtime.to_path_buf() }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("the child is still owned")
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("the child is still owned").id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to agentvm.
    pub fn signal(&self, signal: i32) {
        process::kill(self.id(), signal);
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child().try_wait().unwrap()
    }

    /// Waits until `path` exists (the guest writes a marker into /work);
    /// panics with agentvm's output and the guest consoles if agentvm exits
    /// first or `limit` passes.
    pub fn wait_for_file(&mut self, path: &Path, limit: Duration) {
        let mut exited = None;
        let appeared = process::poll(limit, Duration::from_millis(100), || {
            exited = self.try_wait();
            (path.exists() || exited.is_some()).then_some(path.exists())
        });
        if appeared == Some(true) {
            return;
        }
        let consoles = consoles(&self.runtime);
        let why = match exited {
            Some(status) => format!("agentvm exited with {status}"),
            None => format!("{limit:?} passed"),
        };
        let child = self.child.take().expect("the child is still owned");
        let out = kill_and_collect(child);
        panic!("{} never appeared ({why}):\n{}\n{}\n{consoles}", path.display(), stdout(&out), stderr(&out));
    }

    /// Waits for agentvm to exit and returns its output, printed.
    pub fn wait_with_output(mut self) -> Output {
        let out = self.child.take().expect("the child is still owned").wait_with_output().unwrap();
        process::show("background agentvm", &out);
        out
    }

    /// Waits at most `limit` for agentvm to exit; kills it and panics if it
    /// does not.
    pub fn wait_exit(mut self, limit: Duration) -> Output {
        if process::poll(limit, Duration::from_millis(50), || self.try_wait()).is_none() {
            let out = kill_and_collect(self.child.take().expect("the child is still owned"));
            panic!("agentvm did not exit within {limit:?}; stderr:\n{}", stderr(&out));
        }
        self.wait_with_output()
    }

    /// Kills agentvm with SIGKILL (it cannot clean up) and reaps it.
    pub fn kill(mut self) {
        let mut child = self.child.take().expect("the child is still owned");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            kill_and_collect(child);
        }
    }
}

fn kill_and_collect(mut child: Child) -> Output {
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

/// The guest consoles of the instances in the runtime dir `runtime`, for
/// failure messages.
pub(crate) fn consoles(runtime: &Path) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(runtime.join("agentvm")).into_iter().flatten().flatten() {
        let log = std::fs::read(e.path().join("console.log")).unwrap_or_default();
        s.push_str(&format!("--- {}:\n{}\n", e.path().display(), String::from_utf8_lossy(&log)));
    }
    s
}
