//! The host session's clipboard tool: `wl-paste`/`wl-copy` under Wayland
//! (`WAYLAND_DISPLAY`), else `xclip` or `xsel` under X (`DISPLAY`), found
//! on agentvm's PATH at launch. Each request runs it once with a fixed
//! argument vector (the type from [`Kind`]'s fixed names, never a shell),
//! a deadline, and at most [`MAX_DATA`] bytes read.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agentvm_proto::clipboard::{Kind, MAX_DATA};

use crate::sys::process::{supervise_child, Inherited};
use crate::tools::find_in_path;

/// How long one run of the host's tool may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of the tool's error output a refusal quotes.
const ERROR_BYTES: usize = 512;

/// Why the host's clipboard gave nothing (the guest's tool prints it).
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("no clipboard on the host: {0}")]
    NoClipboard(String),
    #[error("cannot run the host's {tool}: {source}")]
    Spawn { tool: String, source: std::io::Error },
    #[error("the host's {tool} failed ({status}): {message}")]
    Failed { tool: String, status: String, message: String },
    #[error("the host's {tool} did not answer within {} s", TOOL_TIMEOUT.as_secs())]
    Timeout { tool: String },
    #[error("the host's clipboard holds more than {} MiB, the most agentvm passes on", MAX_DATA >> 20)]
    TooBig,
    #[error("the host's clipboard tool is xsel, which knows only text: install xclip for images")]
    XselTextOnly,
    #[error("the host has wl-paste but no wl-copy: install wl-clipboard")]
    NoWlCopy,
}

/// The tool that reaches the host's clipboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostTool {
    /// wl-clipboard; `copy` is wl-copy, when installed.
    Wayland {
        paste: PathBuf,
        copy: Option<PathBuf>,
    },
    Xclip(PathBuf),
    /// Text only: xsel knows no other types.
    Xsel(PathBuf),
}

/// The host's clipboard, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostClipboard {
    tool: Result<(HostTool, String), String>,
}

impl HostClipboard {
    /// The tool for the session `env` names (`WAYLAND_DISPLAY`, `DISPLAY`),
    /// looked up in `path`.
    pub fn detect(env: &dyn Fn(&str) -> Option<String>, path: &OsStr) -> HostClipboard {
        let var = |name: &str| env(name).filter(|v| !v.is_empty()).map(|v| format!("{name}={v}"));
        let find = |name: &str| find_in_path(name, path);
        let (wayland, x) = (var("WAYLAND_DISPLAY"), var("DISPLAY"));
        let tool = match (&wayland, &x) {
            (Some(session), _) if find("wl-paste").is_some() => {
                let paste = find("wl-paste").expect("found");
                Ok((HostTool::Wayland { paste, copy: find("wl-copy") }, session.clone()))
            }
            (_, Some(session)) if find("xclip").is_some() => {
                Ok((HostTool::Xclip(find("xclip").expect("found")), session.clone()))
            }
            (_, Some(session)) if find("xsel").is_some() => {
                Ok((HostTool::Xsel(find("xsel").expect("found")), session.clone()))
            }
            (Some(session), None) => Err(format!("{session} is set, but wl-paste is not installed (wl-clipboard)")),
            (_, Some(session)) => Err(format!("{session} is set, but neither xclip nor xsel is installed")),
            (None, None) => {
                Err("agentvm runs in no graphical session (neither WAYLAND_DISPLAY nor DISPLAY is set)".into())
            }
        };
        HostClipboard { tool }
    }

    /// A clipboard that refuses every request with `why`.
    pub fn missing(why: String) -> HostClipboard {
        HostClipboard { tool: Err(why) }
    }

    /// Why there is no clipboard, if there is none.
    pub fn problem(&self) -> Option<&str> {
        self.tool.as_ref().err().map(String::as_str)
    }

    /// The tool and the session, for the plan.
    pub fn describe(&self) -> String {
        match &self.tool {
            Ok((HostTool::Wayland { paste, .. }, session)) => format!("{} ({session})", paste.display()),
            Ok((HostTool::Xclip(p) | HostTool::Xsel(p), session)) => format!("{} ({session})", p.display()),
            Err(why) => format!("none: {why}"),
        }
    }

    fn tool(&self) -> Result<&HostTool, ToolError> {
        self.tool.as_ref().map(|(t, _)| t).map_err(|why| ToolError::NoClipboard(why.clone()))
    }

    /// The shared kinds the clipboard holds.
    pub fn types(&self) -> Result<Vec<Kind>, ToolError> {
        let listing = match self.tool()? {
            HostTool::Wayland { paste, .. } => run(paste, &["--list-types"], None)?,
            HostTool::Xclip(xclip) => run(xclip, &["-selection", "clipboard", "-t", "TARGETS", "-o"], None)?,
            HostTool::Xsel(xsel) => {
                let text = run(xsel, &["--clipboard", "--output"], None)?;
                return Ok(if text.is_empty() { Vec::new() } else { vec![Kind::Text] });
            }
        };
        Ok(parse_types(&String::from_utf8_lossy(&listing)))
    }

    /// The clipboard's content as `kind`.
    pub fn read(&self, kind: Kind) -> Result<Vec<u8>, ToolError> {
        match self.tool()? {
            HostTool::Wayland { paste, .. } => {
                // "text" lets wl-paste take whichever text type is offered.
                let wanted = if kind == Kind::Text { "text" } else { kind.mime() };
                run(paste, &["--no-newline", "--type", wanted], None)
            }
            HostTool::Xclip(xclip) => run(xclip, &["-selection", "clipboard", "-t", x_target(kind), "-o"], None),
            HostTool::Xsel(xsel) if kind == Kind::Text => run(xsel, &["--clipboard", "--output"], None),
            HostTool::Xsel(_) => Err(ToolError::XselTextOnly),
        }
    }

    /// Sets the clipboard to `data` as `kind`.
    pub fn write(&self, kind: Kind, data: &[u8]) -> Result<(), ToolError> {
        let written = match self.tool()? {
            HostTool::Wayland { copy: Some(copy), .. } => run(copy, &["--type", kind.mime()], Some(data)),
            HostTool::Wayland { copy: None, .. } => return Err(ToolError::NoWlCopy),
            HostTool::Xclip(xclip) => run(xclip, &["-selection", "clipboard", "-t", x_target(kind), "-i"], Some(data)),
            HostTool::Xsel(xsel) if kind == Kind::Text => run(xsel, &["--clipboard", "--input"], Some(data)),
            HostTool::Xsel(_) => return Err(ToolError::XselTextOnly),
        };
        written.map(drop)
    }
}

/// The X target xclip asks for.
fn x_target(kind: Kind) -> &'static str {
    match kind {
        Kind::Text => "UTF8_STRING",
        other => other.mime(),
    }
}

/// The shared kinds a type listing names, each once, in its order.
fn parse_types(listing: &str) -> Vec<Kind> {
    let mut kinds = Vec::new();
    for kind in listing.lines().filter_map(Kind::from_name) {
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    kinds
}

/// Runs `program args` and returns its output. With `input`, it is fed
/// `input` and its output is not read: xclip and wl-copy stay behind to
/// serve the selection, holding whatever they inherited.
fn run(program: &std::path::Path, args: &[&str], input: Option<&[u8]>) -> Result<Vec<u8>, ToolError> {
    let tool = program.file_name().map_or_else(|| program.display().to_string(), |n| n.to_string_lossy().into_owned());
    let spawn_failed = |source| ToolError::Spawn { tool: tool.clone(), source };
    let piped = |yes: bool| if yes { Stdio::piped() } else { Stdio::null() };
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(piped(input.is_some())).stdout(piped(input.is_none())).stderr(piped(input.is_none()));
    let inherited = Inherited::new(&[]).map_err(spawn_failed)?;
    supervise_child(&mut cmd, &inherited);
    let mut child = cmd.spawn().map_err(spawn_failed)?;
    if let (Some(mut stdin), Some(data)) = (child.stdin.take(), input) {
        let data = data.to_vec();
        std::thread::spawn(move || stdin.write_all(&data));
    }
    let over = Arc::new(AtomicBool::new(false));
    let out = child.stdout.take().map(|s| read_capped(s, MAX_DATA, Some(over.clone())));
    let err = child.stderr.take().map(|s| read_capped(s, ERROR_BYTES, None));
    let status = wait(&mut child, &over);
    let out = out.map(|t| t.join().unwrap_or_default()).unwrap_or_default();
    let err = err.map(|t| t.join().unwrap_or_default()).unwrap_or_default();
    if over.load(Ordering::Relaxed) {
        return Err(ToolError::TooBig);
    }
    match status {
        Some(s) if s.success() => Ok(out),
        Some(s) => Err(ToolError::Failed { tool, status: crate::vm::process::describe(s), message: last_line(&err) }),
        None => Err(ToolError::Timeout { tool }),
    }
}

/// Reads `r` to its end on a thread, keeping at most `cap` bytes; past
/// that it stops and sets `over`.
fn read_capped(r: impl Read + Send + 'static, cap: usize, over: Option<Arc<AtomicBool>>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.take(cap as u64 + 1).read_to_end(&mut buf);
        if buf.len() > cap {
            buf.truncate(cap);
            if let Some(flag) = over {
                flag.store(true, Ordering::Relaxed);
            }
        }
        buf
    })
}

/// The child's exit status; None when it had to be killed (past the
/// deadline, or its output over the limit).
fn wait(child: &mut Child, over: &AtomicBool) -> Option<ExitStatus> {
    let deadline = Instant::now() + TOOL_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline && !over.load(Ordering::Relaxed) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// The last line of a tool's error output, for the message.
fn last_line(err: &[u8]) -> String {
    let text = String::from_utf8_lossy(err);
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
    crate::escape::log_line(line.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
    }

    /// A directory of stand-in tools, each a script.
    fn bin(tools: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, script) in tools {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir
    }

    #[test]
    fn the_session_picks_the_tool_and_its_absence_is_explained() {
        let dir = bin(&[("wl-paste", ""), ("xclip", "")]);
        let path = dir.path().as_os_str();
        let both = HostClipboard::detect(&env(&[("WAYLAND_DISPLAY", "wayland-0"), ("DISPLAY", ":0")]), path);
        assert!(
            matches!(both.tool, Ok((HostTool::Wayland { copy: None, .. }, ref s)) if s == "WAYLAND_DISPLAY=wayland-0")
        );
        let x = HostClipboard::detect(&env(&[("DISPLAY", ":0")]), path);
        assert!(matches!(x.tool, Ok((HostTool::Xclip(_), _))));
        let none = HostClipboard::detect(&env(&[("DISPLAY", "")]), path);
        assert!(none.problem().unwrap().contains("neither WAYLAND_DISPLAY nor DISPLAY"), "{none:?}");
        let empty = tempfile::tempdir().unwrap();
        let no_tool = HostClipboard::detect(&env(&[("DISPLAY", ":0")]), empty.path().as_os_str());
        assert!(no_tool.problem().unwrap().contains("neither xclip nor xsel"), "{no_tool:?}");
        assert!(no_tool.read(Kind::Png).unwrap_err().to_string().starts_with("no clipboard on the host"));
    }

    #[test]
    fn listings_keep_the_shared_kinds_once() {
        let listing = "TARGETS\nimage/png\nUTF8_STRING\nimage/bmp\nSTRING\ntext/plain\n";
        assert_eq!(parse_types(listing), [Kind::Png, Kind::Text]);
    }

    #[test]
    fn a_failing_tool_is_quoted_and_a_big_one_is_cut_off() {
        let dir = bin(&[
            ("fails", "echo 'Error: target image/png not available' >&2; exit 1"),
            ("big", &format!("head -c {} /dev/zero", MAX_DATA + 10)),
            ("echoes", "printf '%s' \"$*\""),
        ]);
        let at = |name: &str| dir.path().join(name);
        let e = run(&at("fails"), &[], None).unwrap_err().to_string();
        assert!(e.contains("the host's fails failed") && e.contains("target image/png not available"), "{e}");
        let e = run(&at("big"), &[], None).unwrap_err().to_string();
        assert!(e.contains("more than 32 MiB"), "{e}");
        assert_eq!(run(&at("echoes"), &["-t", "image/png"], None).unwrap(), b"-t image/png");
    }
}
