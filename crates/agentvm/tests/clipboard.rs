//! End-to-end tests of `--clipboard`: a real X server (Xvfb) holds the
//! host's clipboard, set and read with the real xclip as a user's desktop
//! would; the guest reads and (under `all`) sets it with its xclip, xsel,
//! wl-paste and wl-copy, as Claude Code and Gemini CLI run them.

use agentvm_testkit::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// An Xvfb of this test's own on a free display; killed on drop.
struct Xvfb {
    child: Child,
    display: String,
}

impl Xvfb {
    fn start() -> Result<Xvfb, Skip> {
        let xvfb = skip::tool("Xvfb")?;
        skip::tool("xclip")?;
        // -displayfd: Xvfb takes a free display itself and, once it
        // accepts clients, writes its number to stdout (no race with
        // other tests or desktops).
        let mut child = Command::new(&xvfb)
            .args(["-displayfd", "1", "-nolisten", "tcp", "-screen", "0", "64x64x24"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        let number: u32 = line.trim().parse().unwrap_or_else(|_| panic!("Xvfb -displayfd wrote {line:?}"));
        Ok(Xvfb { child, display: format!(":{number}") })
    }

    /// The host's xclip on this display.
    fn xclip(&self, args: &[&str]) -> Command {
        let mut c = Command::new("xclip");
        c.env("DISPLAY", &self.display).args(["-selection", "clipboard"]).args(args);
        c
    }

    /// Puts `data` on the clipboard as `target`, as a desktop app would
    /// (xclip stays behind as the owner until another takes over).
    fn set(&self, target: &str, data: &[u8]) {
        use std::io::Write;
        // Its output not piped: the xclip that stays behind would hold it open.
        let mut cmd = self.xclip(&["-t", target, "-i"]);
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(data).unwrap();
        assert!(child.wait().unwrap().success(), "host xclip -i failed");
    }

    fn get(&self, target: &str) -> Vec<u8> {
        let out = self.xclip(&["-t", target, "-o"]).output().unwrap();
        assert!(out.status.success(), "host xclip -o -t {target}: {}", stderr(&out));
        out.stdout
    }

    /// A launch of `script` with the host's session set to this display.
    fn launch(&self, script: &str) -> Launch {
        Launch::new().shell(script).env("DISPLAY", &self.display).env("WAYLAND_DISPLAY", "")
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        // SIGTERM: Xvfb then removes its lock file and socket.
        process::kill(self.child.id(), libc::SIGTERM);
        let _ = self.child.wait();
    }
}

/// A real PNG of `side`×`side` noisy pixels (stored, not compressed, so
/// every byte value shows up), as a screenshot tool would put it.
fn png(side: u32) -> Vec<u8> {
    let mut seed = 0x2545_f491u32;
    let mut noise = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed as u8
    };
    // Each row: filter type 0 (none), then its RGB bytes.
    let row_len = 1 + side as usize * 3;
    let raw: Vec<u8> = (0..side as usize * row_len).map(|i| if i % row_len == 0 { 0 } else { noise() }).collect();
    let mut zlib = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, block) in blocks.iter().enumerate() {
        zlib.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        zlib.extend_from_slice(&len.to_le_bytes());
        zlib.extend_from_slice(&(!len).to_le_bytes());
        zlib.extend_from_slice(block);
    }
    let (a, b) = raw.iter().fold((1u32, 0u32), |(a, b), &x| ((a + x as u32) % 65521, (b + a + x as u32) % 65521));
    zlib.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut ihdr = side.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(b"IHDR", ihdr), (b"IDAT", zlib), (b"IEND", Vec::new())] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let body = [kind.as_slice(), &data].concat();
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn read(l: &Launch, name: &str) -> Vec<u8> {
    std::fs::read(l.work.join(name)).unwrap_or_else(|e| panic!("{name} in the project: {e}"))
}

fn text(l: &Launch, name: &str) -> String {
    String::from_utf8_lossy(&read(l, name)).into_owned()
}

/// What Claude Code runs on Linux to find and save a pasted image (from
/// its binary, 2.1.x: `checkImage` and `saveImage`), and Gemini CLI's.
const AGENTS_COMMANDS: &str = r#"
p=/tmp/claude_cli_latest_screenshot.png
if xclip -selection clipboard -t TARGETS -o 2>/dev/null | grep -E "image/(png|jpeg|jpg|gif|webp|bmp)" || wl-paste -l 2>/dev/null | grep -E "image/(png|jpeg|jpg|gif|webp|bmp)"; then
  xclip -selection clipboard -t image/png -o > $p 2>/dev/null || wl-paste --type image/png > $p 2>/dev/null || xclip -selection clipboard -t image/bmp -o > $p 2>/dev/null || wl-paste --type image/bmp > $p
  cp $p /work/claude.png
fi
xclip -selection clipboard -t TARGETS -o > /work/gemini-targets.txt
wl-paste --list-types > /work/gemini-types.txt
wl-paste --no-newline --type image/png > /work/gemini.png
"#;

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn an_image_on_the_host_clipboard_is_read_back_byte_for_byte_and_text_is_refused() {
    let x = require!(Xvfb::start());
    let image = png(400); // ~470 KiB: more than one X transfer and channel message
    x.set("image/png", &image);
    let script = format!(
        "{AGENTS_COMMANDS}
        xclip -selection clipboard -t image/png -o > /work/xclip.png
        wl-paste --type image/png > /work/wl-paste.png
        xclip -selection clipboard -t text/plain -o > /work/text.out 2> /work/text.err; echo $? > /work/text.status
        echo hi | wl-copy 2> /work/copy.err; echo $? > /work/copy.status
        xclip -o 2> /work/primary.err; echo $? > /work/primary.status"
    );
    let l = x.launch(&script);
    let out = l.run_command(&mut l.command_with_flags(&["--clipboard"]));
    assert!(out.status.success(), "{}", stderr(&out));
    for file in ["xclip.png", "wl-paste.png", "claude.png", "gemini.png"] {
        assert!(read(&l, file) == image, "{file} differs from the host's image ({} bytes)", read(&l, file).len());
    }
    assert_eq!(text(&l, "gemini-targets.txt"), "TARGETS\nimage/png\n");
    assert_eq!(text(&l, "gemini-types.txt"), "image/png\n");
    // Text: refused by the host under `images`, whatever the clipboard holds.
    assert_eq!(text(&l, "text.status").trim(), "1");
    assert!(text(&l, "text.err").contains("--clipboard=all"), "{}", text(&l, "text.err"));
    assert_eq!(text(&l, "copy.status").trim(), "1");
    assert!(text(&l, "copy.err").contains("only with --clipboard=all"), "{}", text(&l, "copy.err"));
    assert_eq!(x.get("image/png"), image, "the guest's write changed the host's clipboard");
    assert_eq!(text(&l, "primary.status").trim(), "1");
    assert!(text(&l, "primary.err").contains("-selection clipboard"), "{}", text(&l, "primary.err"));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn off_gives_the_guest_no_clipboard_channel_and_no_tools() {
    let x = require!(Xvfb::start());
    x.set("UTF8_STRING", b"host secret text");
    let script = "cat /sys/class/virtio-ports/*/name; \
        for t in xclip xsel wl-paste wl-copy; do command -v $t || echo \"no $t\"; done; \
        ls /run/agentvm/clipboard.sock 2>&1 || true";
    let l = x.launch(script);
    let out = l.run();
    assert!(out.status.success(), "{}", stderr(&out));
    let got = stdout(&out);
    assert!(got.contains("org.agentvm.ctl") && !got.contains("org.agentvm.clip"), "{got}");
    for tool in ["xclip", "xsel", "wl-paste", "wl-copy"] {
        assert!(got.contains(&format!("no {tool}\n")), "{tool} is in the guest:\n{got}");
    }
    assert!(got.contains("No such file"), "{got}");
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn all_shares_text_and_lets_the_guest_set_the_host_clipboard() {
    let x = require!(Xvfb::start());
    x.set("UTF8_STRING", "héllo from the host".as_bytes());
    let image = png(16);
    let script = "xclip -selection clipboard -o > /work/xclip.txt
        xsel --clipboard --output > /work/xsel.txt
        wl-paste > /work/wl-paste.txt
        wl-paste --list-types > /work/types.txt
        head -c 33554433 /dev/zero | wl-copy 2> /work/big-copy.err; echo $? > /work/big-copy.status
        printf 'from the guest' | wl-copy --type text/plain && echo copied";
    let l = x.launch(script);
    let out = l.run_command(&mut l.command_with_flags(&["--clipboard=all"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(text(&l, "xclip.txt"), "héllo from the host");
    assert_eq!(text(&l, "xsel.txt"), "héllo from the host");
    assert_eq!(text(&l, "wl-paste.txt"), "héllo from the host\n", "wl-paste ends text with a newline");
    assert_eq!(text(&l, "types.txt"), "text/plain;charset=utf-8\ntext/plain\n");
    assert_eq!(x.get("UTF8_STRING"), b"from the guest");
    assert_eq!(text(&l, "big-copy.status").trim(), "1");
    assert!(text(&l, "big-copy.err").contains("over 32 MiB"), "{}", text(&l, "big-copy.err"));

    // An image from the guest, with xclip as a program would set it.
    let l = x.launch("xclip -selection clipboard -t image/png -i /work/image.png && echo set");
    std::fs::write(l.work.join("image.png"), &image).unwrap();
    let out = l.run_command(&mut l.command_with_flags(&["--clipboard=all"]));
    assert_eq!(stdout(&out), "set\n", "{}", stderr(&out));
    assert_eq!(x.get("image/png"), image);

    // More than the limit on the host's clipboard: refused, not cut short.
    x.set("image/png", &vec![7; (32 << 20) + 1]);
    let l = x.launch("xclip -selection clipboard -t image/png -o | wc -c");
    let out = l.run_command(&mut l.command_with_flags(&["--clipboard=all"]));
    assert_eq!(stdout(&out).trim(), "0", "{}", stderr(&out));
    assert!(stderr(&out).contains("xclip: the host's clipboard holds more than 32 MiB"), "{}", stderr(&out));
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn without_a_host_session_the_tools_fail_with_a_message() {
    let script = "xclip -selection clipboard -t image/png -o > /dev/null; echo \"xclip=$?\"; \
        wl-paste --list-types; echo \"wl-paste=$?\"";
    let l = Launch::new().shell(script).env("DISPLAY", "").env("WAYLAND_DISPLAY", "");
    let out = l.run_command(&mut l.command_with_flags(&["--clipboard"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "xclip=1\nwl-paste=1\n");
    let err = stderr(&out);
    assert!(err.contains("--clipboard: agentvm runs in no graphical session"), "no warning at launch: {err}");
    assert!(
        err.contains("xclip: no clipboard on the host: agentvm runs in no graphical session")
            && err.contains("wl-paste: no clipboard on the host"),
        "{err}"
    );
}

/// The API key the stand-in API takes; its last 20 characters are what
/// Claude Code records as approved.
const KEY: &str = "sk-ant-api03-clipboard-test-key-0123456789";

/// An agent home where Claude Code opens on its prompt (onboarding done,
/// the key approved, /work trusted), with stand-ins in `logbin` that log
/// each xclip and wl-paste call to /work/calls.log before running it.
fn claude_home(home: &std::path::Path) {
    let approved = &KEY[KEY.len() - 20..];
    let config = serde_json::json!({
        "hasCompletedOnboarding": true,
        "theme": "dark",
        "customApiKeyResponses": {"approved": [approved], "rejected": []},
        "projects": {"/work": {"hasTrustDialogAccepted": true, "hasCompletedProjectOnboarding": true}},
    });
    std::fs::create_dir_all(home.join("logbin")).unwrap();
    std::fs::write(home.join(".claude.json"), config.to_string()).unwrap();
    for tool in ["xclip", "wl-paste"] {
        let script = format!("#!/bin/sh\necho \"{tool} $*\" >> /work/calls.log\nexec /usr/local/bin/{tool} \"$@\"\n");
        let path = home.join("logbin").join(tool);
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            let c = if i <= chunk.len() { ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' };
            out.push(c);
        }
    }
    out
}

/// The images (base64) of every message the stand-in API was sent.
fn sent_images(requests: &servers::RequestLog) -> Vec<String> {
    let mut images = Vec::new();
    for (_, body) in requests.lock().unwrap().iter() {
        let Ok(request) = serde_json::from_str::<serde_json::Value>(body) else { continue };
        let messages = request["messages"].as_array().cloned().unwrap_or_default();
        for block in messages.iter().filter_map(|m| m["content"].as_array()).flatten() {
            if block["type"] == "image" {
                images.push(block["source"]["data"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    images
}

#[test]
#[ignore = "boots a VM: scripts/test runs it"]
fn claude_code_pastes_the_host_clipboard_image_with_ctrl_v_and_sends_it() {
    require!(skip::tool("tmux"));
    let x = require!(Xvfb::start());
    let image = png(32);
    x.set("image/png", &image);
    let (port, requests) = servers::messages_api_server("A small square of noise.");
    let l = Launch::new().env("DISPLAY", &x.display).env("WAYLAND_DISPLAY", "").env("ANTHROPIC_API_KEY", KEY);
    let home = l.dirs.path().join("claude-home");
    claude_home(&home);
    let (port, home) = (port.to_string(), home.display().to_string());
    let base_url = format!("ANTHROPIC_BASE_URL=http://host.agentvm.internal:{port}");
    let path = format!("PATH=/home/agent/logbin:{}", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let mut args = vec!["run", "--memory", "2G", "--clipboard", "--host-port", &port, "--home", &home];
    args.extend(["-e", "ANTHROPIC_API_KEY", "-e", &base_url, "-e", &path, "-e", "DISABLE_TELEMETRY=1"]);
    args.extend(["-e", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1", "claude"]);
    let t = Tmux::start(&l, 120, 40, &args);
    t.wait_for_within("? for shortcuts", Duration::from_secs(600));
    t.key("C-v"); // Claude Code's image paste on Linux
    t.wait_for_within("[Image #1]", Duration::from_secs(120));
    t.send("What is in this image?");
    let screen = t.wait_for_within("A small square of noise.", Duration::from_secs(300));
    eprintln!("Claude Code after the paste:\n{screen}");
    let calls = text(&l, "calls.log");
    assert!(
        calls.starts_with("xclip -selection clipboard -t TARGETS -o\nxclip -selection clipboard -t image/png -o\n"),
        "Claude Code asked otherwise:\n{calls}"
    );
    assert_eq!(sent_images(&requests), [base64(&image)], "the image Claude Code sent is not the host's");
    drop(t);
    l.assert_no_leftovers_within(Duration::from_secs(30));
}
