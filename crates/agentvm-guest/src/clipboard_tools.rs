//! `xclip`, `xsel`, `wl-paste` and `wl-copy` in the guest (`--clipboard`):
//! this binary, called by one of those names, reads or sets the host's
//! clipboard through the guest init ([`agentvm_proto::clipboard`]). They
//! take the options programs use: Claude Code runs
//! `xclip -selection clipboard -t TARGETS -o`, `wl-paste -l` and
//! `xclip -selection clipboard -t image/png -o > FILE`; Gemini CLI
//! `xclip ... -t TARGETS -o`, `wl-paste --list-types`,
//! `wl-paste --no-newline --type image/png`, and for text
//! `xsel --clipboard --output` and `wl-copy --type text/plain`.
//!
//! Only the clipboard selection is shared (not X's primary one), and only
//! PNG, JPEG and text. Like the real tools, a failure prints a message
//! and exits with status 1 (2 for a command line they do not take).

use std::ffi::OsString;
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;

use agentvm_proto::clipboard::{Kind, Reply, Request, GUEST_SOCKET, MAX_DATA};

/// The names this binary answers to.
pub const NAMES: [&str; 4] = ["xclip", "xsel", "wl-paste", "wl-copy"];

/// How a tool names clipboard types when it lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Naming {
    /// X targets (xclip's `-t TARGETS`).
    X,
    /// MIME types (wl-paste's `--list-types`).
    Wayland,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    /// Print the clipboard's types, one a line.
    List(Naming),
    /// Print the content as `kind` (none given: text if there is any, else
    /// the first kind there is).
    Paste { kind: Option<Kind>, trim_newline: bool, add_newline: bool },
    /// Set the clipboard (no kind given: PNG or JPEG by their magic bytes,
    /// else text).
    Copy { kind: Option<Kind>, input: Input, trim_newline: bool, echo: bool },
    /// Print this (help, version).
    Print(String),
}

/// Where the content to copy comes from.
#[derive(Debug, PartialEq, Eq)]
enum Input {
    Stdin,
    Files(Vec<OsString>),
    Text(String),
}

/// A failure: its message and exit status.
#[derive(Debug, PartialEq, Eq)]
struct Failure(String, i32);

fn usage(msg: impl Into<String>) -> Failure {
    Failure(msg.into(), 2)
}

fn failed(msg: impl Into<String>) -> Failure {
    Failure(msg.into(), 1)
}

const ONLY_CLIPBOARD: &str = "only the clipboard is shared with the host (agentvm), not the primary selection";

/// Runs the tool `args[0]` names, if it is one of [`NAMES`]: its exit status.
pub fn run_if_tool(args: &[OsString]) -> Option<i32> {
    let name = std::path::Path::new(args.first()?).file_name()?.to_str()?;
    let parse = match name {
        "xclip" => parse_xclip,
        "xsel" => parse_xsel,
        "wl-paste" => parse_wl_paste,
        "wl-copy" => parse_wl_copy,
        _ => return None,
    };
    let words: Vec<String> = args[1..].iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let stdin_is_terminal = io::stdin().is_terminal();
    let result = parse(&words, stdin_is_terminal).and_then(|action| perform(action, &mut io::stdout().lock()));
    Some(match result {
        Ok(()) => 0,
        Err(Failure(msg, code)) => {
            eprintln!("{name}: {msg}");
            code
        }
    })
}

/// The option of `table` that `word` (after its dashes) names: the first
/// whose name it begins, as xclip takes abbreviations.
fn abbreviation<'a>(word: &str, table: &[&'a str]) -> Option<&'a str> {
    let bare = word.trim_start_matches('-');
    (!bare.is_empty()).then(|| table.iter().find(|name| name.starts_with(bare)).copied()).flatten()
}

fn parse_xclip(words: &[String], _stdin_is_terminal: bool) -> Result<Action, Failure> {
    // In xclip's order, so that one letter means what it means there.
    const OPTIONS: &[&str] = &[
        "selection",
        "target",
        "out",
        "in",
        "filter",
        "rmlastnl",
        "loops",
        "display",
        "noutf8",
        "quiet",
        "silent",
        "sensitive",
        "verbose",
        "version",
        "help",
        "wait",
    ];
    let (mut out, mut target, mut trim, mut echo, mut files) = (false, None::<String>, false, false, Vec::new());
    let mut it = words.iter();
    while let Some(word) = it.next() {
        if !word.starts_with('-') || word == "-" {
            files.push(OsString::from(word));
            continue;
        }
        let mut value = || it.next().cloned().ok_or_else(|| usage(format!("{word} needs a value")));
        match abbreviation(word, OPTIONS).ok_or_else(|| usage(format!("unknown option {word}")))? {
            "selection" => clipboard_selection(&value()?)?,
            "target" => target = Some(value()?),
            "out" => out = true,
            "in" => out = false,
            "filter" => echo = true,
            "rmlastnl" => trim = true,
            "loops" | "display" | "wait" => drop(value()?),
            "version" => return Ok(Action::Print("xclip (agentvm's, for the host clipboard)\n".into())),
            "help" => return Ok(Action::Print(XCLIP_HELP.into())),
            _ => {}
        }
    }
    if !words.iter().any(|w| abbreviation(w, OPTIONS) == Some("selection")) {
        clipboard_selection("primary")?;
    }
    let kind = target.as_deref().filter(|t| *t != "TARGETS").map(x_kind).transpose()?;
    Ok(match (out, target.as_deref()) {
        (true, Some("TARGETS")) => Action::List(Naming::X),
        (true, _) => Action::Paste { kind: kind.or(Some(Kind::Text)), trim_newline: trim, add_newline: false },
        (false, _) => {
            let input = if files.is_empty() { Input::Stdin } else { Input::Files(files) };
            Action::Copy { kind: kind.or(Some(Kind::Text)), input, trim_newline: trim, echo }
        }
    })
}

/// Only xclip's clipboard selection (`c`, `clip`, ... abbreviated) is shared.
fn clipboard_selection(name: &str) -> Result<(), Failure> {
    match !name.is_empty() && "clipboard".starts_with(name) {
        true => Ok(()),
        false => Err(failed(format!("{ONLY_CLIPBOARD}: use -selection clipboard"))),
    }
}

const XCLIP_HELP: &str = "Usage: xclip -selection clipboard [-o] [-t TYPE] [-rmlastnl] [-f] [FILE...]\n\
    agentvm's xclip: reads (-o) or sets the host's clipboard; -t TARGETS -o lists its types.\n";

/// The kind an X target names, or xclip's own error.
fn x_kind(target: &str) -> Result<Kind, Failure> {
    Kind::from_name(target).ok_or_else(|| failed(format!("Error: target {target} not available")))
}

fn parse_xsel(words: &[String], stdin_is_terminal: bool) -> Result<Action, Failure> {
    let (mut input, mut output, mut clipboard, mut trim) = (false, false, false, false);
    let words = separate_letters(words);
    let mut it = words.iter();
    while let Some(word) = it.next() {
        let mut skip_value = || it.next().map(drop).ok_or_else(|| usage(format!("{word} needs a value")));
        match word.as_str() {
            "-i" | "--input" => input = true,
            "-o" | "--output" => output = true,
            "-b" | "--clipboard" => clipboard = true,
            "-p" | "--primary" | "-s" | "--secondary" => clipboard = false,
            "--trim" => trim = true,
            "-n" | "--nodetach" | "-k" | "--keep" | "-v" | "--verbose" | "-z" | "--zeroflush" => {}
            "--display" | "-t" | "--selectionTimeout" | "-l" | "--logfile" | "-w" | "--windowName" => skip_value()?,
            "-a" | "--append" | "-f" | "--follow" | "-c" | "--clear" | "-d" | "--delete" | "-x" | "--exchange" => {
                return Err(usage(format!("{word} is not supported by agentvm's xsel")))
            }
            "-h" | "--help" => return Ok(Action::Print(XSEL_HELP.into())),
            "--version" => return Ok(Action::Print("xsel (agentvm's, for the host clipboard)\n".into())),
            _ => return Err(usage(format!("unknown option {word}"))),
        }
    }
    if !clipboard {
        return Err(failed(format!("{ONLY_CLIPBOARD}: use --clipboard (-b)")));
    }
    // As xsel: with neither, input when stdin is not a terminal.
    if input || (!output && !stdin_is_terminal) {
        return Ok(Action::Copy { kind: Some(Kind::Text), input: Input::Stdin, trim_newline: trim, echo: false });
    }
    Ok(Action::Paste { kind: Some(Kind::Text), trim_newline: trim, add_newline: false })
}

/// `-bo` as `-b -o`: xsel's one-letter switches written together.
fn separate_letters(words: &[String]) -> Vec<String> {
    let together = |w: &str| w.len() > 2 && w.starts_with('-') && w[1..].chars().all(|c| "iobpsnkvz".contains(c));
    words
        .iter()
        .flat_map(|w| match together(w) {
            true => w[1..].chars().map(|c| format!("-{c}")).collect(),
            false => vec![w.clone()],
        })
        .collect()
}

const XSEL_HELP: &str = "Usage: xsel --clipboard [--input | --output] [--trim]\n\
    agentvm's xsel: reads or sets the host's clipboard (text).\n";

/// `--type=T`, `--type T` or `-t T`: T.
fn type_value(word: &str, it: &mut std::slice::Iter<'_, String>) -> Result<Option<String>, Failure> {
    if let Some(v) = word.strip_prefix("--type=") {
        return Ok(Some(v.to_string()));
    }
    if word == "-t" || word == "--type" {
        return it.next().cloned().map(Some).ok_or_else(|| usage(format!("{word} needs a type")));
    }
    Ok(None)
}

fn parse_wl_paste(words: &[String], _stdin_is_terminal: bool) -> Result<Action, Failure> {
    let (mut list, mut kind, mut no_newline) = (false, None, false);
    let mut it = words.iter();
    while let Some(word) = it.next() {
        if let Some(t) = type_value(word, &mut it)? {
            kind = Some(
                Kind::from_name(&t)
                    .ok_or_else(|| failed(format!("Clipboard content is not available as requested type \"{t}\"")))?,
            );
            continue;
        }
        match word.as_str() {
            "-l" | "--list-types" => list = true,
            "-n" | "--no-newline" => no_newline = true,
            "-p" | "--primary" => return Err(failed(ONLY_CLIPBOARD)),
            "-s" | "--seat" => drop(it.next()),
            "-w" | "--watch" => return Err(usage("--watch is not supported by agentvm's wl-paste")),
            "-h" | "--help" => return Ok(Action::Print(WL_PASTE_HELP.into())),
            "-v" | "--version" => return Ok(Action::Print("wl-paste (agentvm's, for the host clipboard)\n".into())),
            _ => return Err(usage(format!("unknown option {word}"))),
        }
    }
    if list {
        return Ok(Action::List(Naming::Wayland));
    }
    Ok(Action::Paste { kind, trim_newline: false, add_newline: !no_newline })
}

const WL_PASTE_HELP: &str = "Usage: wl-paste [--list-types] [--type TYPE] [--no-newline]\n\
    agentvm's wl-paste: reads the host's clipboard.\n";

fn parse_wl_copy(words: &[String], _stdin_is_terminal: bool) -> Result<Action, Failure> {
    let (mut kind, mut trim, mut text) = (None, false, Vec::new());
    let mut it = words.iter();
    while let Some(word) = it.next() {
        if let Some(t) = type_value(word, &mut it)? {
            kind = Some(Kind::from_name(&t).ok_or_else(|| {
                failed(format!("type {t} is not shared with the host (agentvm shares image/png, image/jpeg and text)"))
            })?);
            continue;
        }
        match word.as_str() {
            "-n" | "--trim-newline" => trim = true,
            "-o" | "--paste-once" | "-f" | "--foreground" => {}
            "-s" | "--seat" => drop(it.next()),
            "-p" | "--primary" => return Err(failed(ONLY_CLIPBOARD)),
            "-c" | "--clear" => return Err(usage("--clear is not supported by agentvm's wl-copy")),
            "-h" | "--help" => return Ok(Action::Print(WL_COPY_HELP.into())),
            "-v" | "--version" => return Ok(Action::Print("wl-copy (agentvm's, for the host clipboard)\n".into())),
            "--" => text.extend(it.by_ref().cloned()),
            w if w.starts_with('-') && w.len() > 1 => return Err(usage(format!("unknown option {word}"))),
            _ => text.push(word.clone()),
        }
    }
    let input = if text.is_empty() { Input::Stdin } else { Input::Text(text.join(" ")) };
    Ok(Action::Copy { kind, input, trim_newline: trim, echo: false })
}

const WL_COPY_HELP: &str = "Usage: wl-copy [--type TYPE] [--trim-newline] [TEXT...]\n\
    agentvm's wl-copy: sets the host's clipboard (with --clipboard=all).\n";

/// Does what `action` says, printing to `out`.
fn perform(action: Action, out: &mut impl Write) -> Result<(), Failure> {
    let written = |r: io::Result<()>| r.map_err(|e| failed(format!("cannot write the output: {e}")));
    match action {
        Action::Print(text) => written(out.write_all(text.as_bytes())),
        Action::List(naming) => {
            let Reply::Types(kinds) = ask(&Request::Types)? else { return Err(unexpected()) };
            written(out.write_all(listing(naming, &kinds).as_bytes()))
        }
        Action::Paste { kind, trim_newline, add_newline } => {
            let kind = match kind {
                Some(k) => k,
                None => pick(&kinds()?).ok_or_else(|| failed("Nothing is copied"))?,
            };
            let Reply::Data(mut data) = ask(&Request::Read(kind))? else { return Err(unexpected()) };
            if trim_newline && data.ends_with(b"\n") {
                data.pop();
            }
            if add_newline && kind == Kind::Text && !data.ends_with(b"\n") {
                data.push(b'\n');
            }
            written(out.write_all(&data))
        }
        Action::Copy { kind, input, trim_newline, echo } => {
            let mut data = read_input(input)?;
            if echo {
                written(out.write_all(&data))?;
            }
            if trim_newline && data.ends_with(b"\n") {
                data.pop();
            }
            let kind = kind.unwrap_or_else(|| sniff(&data));
            match ask(&Request::Write(kind, data))? {
                Reply::Done => Ok(()),
                _ => Err(unexpected()),
            }
        }
    }
}

fn kinds() -> Result<Vec<Kind>, Failure> {
    match ask(&Request::Types)? {
        Reply::Types(kinds) => Ok(kinds),
        _ => Err(unexpected()),
    }
}

fn unexpected() -> Failure {
    failed("the host's answer does not fit the request")
}

/// Text if the clipboard holds any, else its first kind.
fn pick(kinds: &[Kind]) -> Option<Kind> {
    kinds.iter().copied().find(|k| *k == Kind::Text).or_else(|| kinds.first().copied())
}

/// The kind content looks like: PNG and JPEG by their first bytes.
fn sniff(data: &[u8]) -> Kind {
    if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        Kind::Png
    } else if data.starts_with(&[0xff, 0xd8, 0xff]) {
        Kind::Jpeg
    } else {
        Kind::Text
    }
}

/// The types a tool lists for `kinds`, one a line.
fn listing(naming: Naming, kinds: &[Kind]) -> String {
    let mut names = Vec::new();
    if naming == Naming::X {
        names.push("TARGETS");
    }
    for kind in kinds {
        match (kind, naming) {
            (Kind::Text, Naming::X) => names.extend(["UTF8_STRING", "STRING", "TEXT", "text/plain", kind.mime()]),
            (Kind::Text, Naming::Wayland) => names.extend([kind.mime(), "text/plain"]),
            (k, _) => names.push(k.mime()),
        }
    }
    names.iter().map(|n| format!("{n}\n")).collect()
}

/// The content to copy, at most [`MAX_DATA`] bytes.
fn read_input(input: Input) -> Result<Vec<u8>, Failure> {
    let over = || failed(format!("the content is over {} MiB, the most the host clipboard takes", MAX_DATA >> 20));
    let mut data = Vec::new();
    let mut take = |r: &mut dyn Read, what: &str| -> Result<(), Failure> {
        r.take((MAX_DATA - data.len()) as u64 + 1)
            .read_to_end(&mut data)
            .map_err(|e| failed(format!("cannot read {what}: {e}")))?;
        if data.len() > MAX_DATA {
            return Err(over());
        }
        Ok(())
    };
    match input {
        Input::Stdin => take(&mut io::stdin().lock(), "the standard input")?,
        Input::Files(files) => {
            for f in files {
                let shown = f.to_string_lossy().into_owned();
                let mut file = std::fs::File::open(&f).map_err(|e| failed(format!("{shown}: {e}")))?;
                take(&mut file, &shown)?;
            }
        }
        Input::Text(text) => take(&mut text.as_bytes(), "the text")?,
    }
    Ok(data)
}

/// Sends `request` to the guest init and waits for the host's reply; a
/// refusal is a failure with the host's reason.
fn ask(request: &Request) -> Result<Reply, Failure> {
    let relay_down = |e: io::Error| failed(format!("cannot reach agentvm's clipboard relay at {GUEST_SOCKET}: {e}"));
    let mut conn = UnixStream::connect(GUEST_SOCKET).map_err(relay_down)?;
    request.write_to(&mut conn).map_err(relay_down)?;
    match Reply::read_from(&mut conn) {
        Ok(Some(Reply::Refused(why))) => Err(failed(why)),
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err(failed("agentvm's clipboard relay closed without an answer")),
        Err(e) => Err(failed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn xclip_takes_what_claude_code_and_gemini_cli_run() {
        let p = |s| parse_xclip(&words(s), true);
        assert_eq!(p("-selection clipboard -t TARGETS -o"), Ok(Action::List(Naming::X)));
        let png = Action::Paste { kind: Some(Kind::Png), trim_newline: false, add_newline: false };
        assert_eq!(p("-selection clipboard -t image/png -o"), Ok(png));
        assert_eq!(p("-sel c -target image/png -out"), p("-selection clipboard -t image/png -o"));
        let text = Action::Paste { kind: Some(Kind::Text), trim_newline: false, add_newline: false };
        assert_eq!(p("-selection clipboard -t text/plain -o"), Ok(text));
        let copy = Action::Copy { kind: Some(Kind::Text), input: Input::Stdin, trim_newline: false, echo: false };
        assert_eq!(p("-selection clipboard"), Ok(copy));
    }

    #[test]
    fn xclip_refuses_the_primary_selection_unknown_targets_and_options() {
        let p = |s| parse_xclip(&words(s), true);
        assert_eq!(p("-o").unwrap_err().1, 1, "xclip's default selection is the primary one");
        assert!(p("-selection primary -o").unwrap_err().0.contains("-selection clipboard"));
        assert_eq!(p("-selection clipboard -t image/bmp -o").unwrap_err().0, "Error: target image/bmp not available");
        assert_eq!(p("-selection clipboard -bogus").unwrap_err().1, 2);
    }

    #[test]
    fn xsel_reads_and_writes_text_of_the_clipboard() {
        let paste = Action::Paste { kind: Some(Kind::Text), trim_newline: false, add_newline: false };
        assert_eq!(parse_xsel(&words("--clipboard --output"), false), Ok(paste));
        let copy = Action::Copy { kind: Some(Kind::Text), input: Input::Stdin, trim_newline: false, echo: false };
        assert_eq!(parse_xsel(&words("--clipboard --input"), true), Ok(copy));
        assert_eq!(parse_xsel(&words("-bi"), true), parse_xsel(&words("-b -i"), true));
        assert_eq!(parse_xsel(&words("-o"), true).unwrap_err().1, 1, "the primary selection");
    }

    #[test]
    fn wl_paste_lists_and_reads_types() {
        let p = |s| parse_wl_paste(&words(s), true);
        assert_eq!(p("--list-types"), Ok(Action::List(Naming::Wayland)));
        assert_eq!(p("-l"), Ok(Action::List(Naming::Wayland)));
        let png = Action::Paste { kind: Some(Kind::Png), trim_newline: false, add_newline: false };
        assert_eq!(p("--no-newline --type image/png"), Ok(png));
        assert_eq!(p("--type=image/png -n"), p("-n -t image/png"));
        assert_eq!(p(""), Ok(Action::Paste { kind: None, trim_newline: false, add_newline: true }));
        assert_eq!(p("--primary").unwrap_err().1, 1);
    }

    #[test]
    fn wl_copy_takes_a_type_or_sniffs_it_and_words_as_text() {
        let copy = parse_wl_copy(&words("--type text/plain"), true).unwrap();
        assert_eq!(
            copy,
            Action::Copy { kind: Some(Kind::Text), input: Input::Stdin, trim_newline: false, echo: false }
        );
        let words_copy = parse_wl_copy(&words("hello world"), true).unwrap();
        assert!(matches!(words_copy, Action::Copy { input: Input::Text(ref t), kind: None, .. } if t == "hello world"));
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nrest"), Kind::Png);
        assert_eq!(sniff(&[0xff, 0xd8, 0xff, 0xe0]), Kind::Jpeg);
        assert_eq!(sniff(b"text"), Kind::Text);
    }

    #[test]
    fn listings_name_kinds_as_each_tool_does() {
        assert_eq!(listing(Naming::X, &[Kind::Png]), "TARGETS\nimage/png\n");
        assert_eq!(
            listing(Naming::Wayland, &[Kind::Png, Kind::Text]),
            "image/png\ntext/plain;charset=utf-8\ntext/plain\n"
        );
        assert_eq!(pick(&[Kind::Png, Kind::Text]), Some(Kind::Text));
        assert_eq!(pick(&[Kind::Jpeg]), Some(Kind::Jpeg));
    }
}
