//! A real terminal (tmux) for interactive sessions.

use crate::launch::Launch;
use crate::process;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// `agentvm` in a tmux session of its own; the server is killed on drop.
/// Tests that use it first `require!(skip::tool("tmux"))`.
pub struct Tmux {
    socket: PathBuf,
    /// Where the session writes agentvm's exit status, then the terminal's
    /// settings (`stty -a`), once agentvm exits.
    after: PathBuf,
}

/// The session's name.
const SESSION: &str = "t";

impl Tmux {
    /// Starts `agentvm ARGS` with `l`'s agentvm, environment and user, in
    /// its work dir, in a new tmux session of `width` × `height`.
    pub fn start(l: &Launch, width: u16, height: u16, args: &[&str]) -> Tmux {
        let socket = l.dirs.path().join("tmux.sock");
        let after = l.dirs.path().join("tmux-after.txt");
        let script_path = l.dirs.path().join("tmux-session.sh");
        let mut script = format!("cd '{}'\nunset WORK_DIR AGENT_HOME\n", l.work.display());
        for (k, v) in l.command().get_envs() {
            if let Some(v) = v {
                script.push_str(&format!("export {}='{}'\n", k.to_string_lossy(), v.to_string_lossy()));
            }
        }
        let user = match l.user {
            Some((uid, gid)) => format!("setpriv --reuid={uid} --regid={gid} --clear-groups "),
            None => String::new(),
        };
        script.push_str(&format!(
            "{user}'{}' {}\necho \"exit=$?\" > '{after}'\nstty -a >> '{after}'\nsleep 60\n",
            l.agentvm.display(),
            args.join(" "),
            after = after.display()
        ));
        std::fs::write(&script_path, script).unwrap();
        let t = Tmux { socket, after };
        let (width, height) = (width.to_string(), height.to_string());
        let shell = format!("sh '{}'", script_path.display());
        let out =
            t.command(&["new-session", "-d", "-s", SESSION, "-x", &width, "-y", &height, &shell]).output().unwrap();
        assert!(out.status.success(), "tmux new-session: {}", process::stderr(&out));
        t
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.socket).args(args);
        c
    }

    /// `tmux ARGS` on this session's server; its stdout.
    pub fn tmux(&self, args: &[&str]) -> String {
        process::stdout(&self.command(args).output().unwrap())
    }

    /// Types `line` and Enter.
    pub fn send(&self, line: &str) {
        self.tmux(&["send-keys", "-t", SESSION, line, "Enter"]);
    }

    /// Presses `key` (tmux's names: `C-c`, `Up`, ...).
    pub fn key(&self, key: &str) {
        self.tmux(&["send-keys", "-t", SESSION, key]);
    }

    pub fn resize(&self, width: u16, height: u16) {
        self.tmux(&["resize-window", "-t", SESSION, "-x", &width.to_string(), "-y", &height.to_string()]);
    }

    pub fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", SESSION])
    }

    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_for_within(needle, Duration::from_secs(180))
    }

    /// Waits until the screen shows `needle`, at most `limit`.
    pub fn wait_for_within(&self, needle: &str, limit: Duration) -> String {
        let every = Duration::from_millis(200);
        process::poll(limit, every, || Some(self.screen()).filter(|s| s.contains(needle)))
            .unwrap_or_else(|| panic!("{needle:?} never appeared; screen:\n{}", self.screen()))
    }

    /// Waits at most `limit` for agentvm to exit; returns `exit=STATUS`
    /// and the terminal's settings after it (`stty -a`).
    pub fn wait_exit(&self, limit: Duration) -> String {
        // stty's output always holds "icanon" (or "-icanon").
        let done = || std::fs::read_to_string(&self.after).ok().filter(|s| s.contains("icanon"));
        process::poll(limit, Duration::from_millis(200), done)
            .unwrap_or_else(|| panic!("agentvm did not exit within {limit:?}; screen:\n{}", self.screen()))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.tmux(&["kill-server"]);
    }
}
