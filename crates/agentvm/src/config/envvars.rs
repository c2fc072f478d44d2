//! The guest program's environment: what the flavor sets, the API keys taken
//! from the host, `--env-file` files and `-e` flags.
//!
//! Precedence, later wins: the host's `TERM`/`COLORTERM` < the flavor's
//! `env` < the flavor's `keys` taken from the host < env files (in order) <
//! `-e` flags (in order). `LANG` is left to the guest init, which sets
//! `C.UTF-8` unless a source here sets it (the host's locale may not exist
//! in the guest, so it is not copied).
//!
//! `HOME`, `USER` and `LOGNAME` belong to the guest's agent user and cannot
//! be set. `PATH` can be set to an explicit value (`-e PATH=...`, an env
//! file, a flavor's `env`), but `-e PATH` without a value is refused: the
//! host's PATH names host directories that do not exist in the guest.
//!
//! Values may be secrets: nothing here puts a value into an error, a
//! warning or `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Variables the guest init sets for the agent user; never overridden.
pub const RESERVED: [&str; 3] = ["HOME", "USER", "LOGNAME"];

/// Terminal variables copied from the host when set.
pub const TERMINAL_VARS: [&str; 2] = ["TERM", "COLORTERM"];

/// The environment to put in the launch spec, and warnings for the user.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct GuestEnv {
    /// Unique names, each with its winning value, in first-seen order.
    pub vars: Vec<(String, String)>,
    /// Things the user should know (printed by the caller as warnings).
    pub warnings: Vec<String>,
}

impl GuestEnv {
    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Sets `name`, replacing an earlier value in place.
    fn set(&mut self, name: &str, value: String) {
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name.to_string(), value)),
        }
    }
}

impl fmt::Debug for GuestEnv {
    /// Names only: values may be API keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Redacted<'a>(&'a [(String, String)]);
        impl fmt::Debug for Redacted<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map().entries(self.0.iter().map(|(n, _)| (n, "<redacted>"))).finish()
            }
        }
        f.debug_struct("GuestEnv").field("vars", &Redacted(&self.vars)).field("warnings", &self.warnings).finish()
    }
}

/// An environment that cannot be passed, with what to do about it. Never
/// holds a value.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("{origin}: {source}")]
    Name { origin: String, source: VarNameError },
    #[error("-e PATH would pass the host's PATH, whose directories do not exist in the guest: give a guest value, e.g. -e PATH=/home/agent/.local/bin:/usr/local/bin:/usr/bin:/bin")]
    HostPath,
    #[error("{origin}: the value of {name} contains a NUL byte, which an environment cannot hold")]
    Nul { origin: String, name: String },
    #[error("cannot read env file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("env file {path}, line {line}: {problem}")]
    FileLine { path: PathBuf, line: usize, problem: EnvLineError },
}

/// A variable name that cannot be set in the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VarNameError {
    #[error("{0:?} is not a variable name: use letters, digits and '_', not starting with a digit")]
    NotAName(String),
    #[error("{0} is set by the guest for the agent user and cannot be overridden")]
    Reserved(String),
}

/// A line of an env file that is not `NAME=VALUE`. Never holds a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvLineError {
    #[error("expected NAME=VALUE (or a # comment)")]
    NotAnAssignment,
    #[error(transparent)]
    Name(#[from] VarNameError),
    #[error("the value of {name} has no closing {quote}")]
    Unclosed { name: String, quote: char },
    #[error("unexpected text after the closing {quote} of {name}'s value (quotes inside a value are not supported)")]
    AfterQuote { name: String, quote: char },
}

/// A valid variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks that `name` may be set in the guest; the error says why not.
pub fn check_guest_name(name: &str) -> Result<(), VarNameError> {
    if !valid_name(name) {
        return Err(VarNameError::NotAName(name.to_string()));
    }
    if RESERVED.contains(&name) {
        return Err(VarNameError::Reserved(name.to_string()));
    }
    Ok(())
}

/// What a flavor puts in the environment (see `Flavor::vars`).
#[derive(Debug, Clone, Copy)]
pub struct FlavorVars<'a> {
    /// The flavor's name, for errors and warnings.
    pub flavor: &'a str,
    /// Fixed variables.
    pub env: &'a BTreeMap<String, String>,
    /// Host variables passed in when set (API keys).
    pub keys: &'a [String],
}

/// Builds the guest environment for `flavor` from the `-e` flags
/// (`NAME` or `NAME=VALUE`), the env files and the host environment `host`.
pub fn build(
    flavor: FlavorVars<'_>,
    cli_env: &[String],
    env_files: &[PathBuf],
    host: &dyn Fn(&str) -> Option<String>,
) -> Result<GuestEnv, EnvError> {
    let mut env = GuestEnv::default();
    for name in TERMINAL_VARS {
        if let Some(v) = host(name) {
            env.put(&|| "host terminal".into(), name, v)?;
        }
    }
    for (name, value) in flavor.env {
        env.put(&|| format!("flavor {} env", flavor.flavor), name, value.clone())?;
    }
    for name in flavor.keys {
        if let Some(v) = host(name).filter(|v| !v.is_empty()) {
            env.put(&|| format!("flavor {} keys", flavor.flavor), name, v)?;
        }
    }
    for path in env_files {
        let text = std::fs::read_to_string(path).map_err(|source| EnvError::ReadFile { path: path.clone(), source })?;
        for (line, name, value) in parse_env_file(&text, path)? {
            env.put(&|| format!("env file {}, line {line}", path.display()), &name, value)?;
        }
    }
    for arg in cli_env {
        env.put_flag(arg, host)?;
    }
    if let Some(warning) = missing_key(&flavor, &env) {
        env.warnings.push(warning);
    }
    Ok(env)
}

impl GuestEnv {
    /// Sets `name` (from `origin`, for errors) if the guest may have it.
    fn put(&mut self, origin: &dyn Fn() -> String, name: &str, value: String) -> Result<(), EnvError> {
        check_guest_name(name).map_err(|source| EnvError::Name { origin: origin(), source })?;
        if value.contains('\0') {
            return Err(EnvError::Nul { origin: origin(), name: name.to_string() });
        }
        self.set(name, value);
        Ok(())
    }

    /// Applies one `-e NAME[=VALUE]`; `NAME` alone takes the host's value.
    fn put_flag(&mut self, arg: &str, host: &dyn Fn(&str) -> Option<String>) -> Result<(), EnvError> {
        match arg.split_once('=') {
            Some((name, value)) => self.put(&|| format!("-e {name}"), name, value.to_string()),
            None if arg == "PATH" => Err(EnvError::HostPath),
            None => match host(arg) {
                Some(v) => self.put(&|| format!("-e {arg}"), arg, v),
                None => {
                    check_guest_name(arg).map_err(|source| EnvError::Name { origin: format!("-e {arg}"), source })?;
                    self.warnings.push(format!("-e {arg}: {arg} is not set on the host; not passed"));
                    Ok(())
                }
            },
        }
    }
}

/// The warning when the flavor has keys and none reached `env`.
fn missing_key(flavor: &FlavorVars<'_>, env: &GuestEnv) -> Option<String> {
    let which = match flavor.keys {
        [] => return None,
        _ if flavor.keys.iter().any(|k| env.get(k).is_some_and(|v| !v.is_empty())) => return None,
        [one] => format!("{one} is not set"),
        many => format!("none of {} is set", many.join(", ")),
    };
    Some(format!("{which}; {} will ask you to log in (its login persists in the agent home)", flavor.flavor))
}

/// Parses an env file: `NAME=VALUE` or `export NAME=VALUE` lines, `#`
/// comment lines and blank lines. A value may be wrapped in single or
/// double quotes, taken literally inside (no escapes, no expansion), and
/// may then be followed by a `#` comment; an unquoted value is the rest of
/// the line, trimmed, `#` included. Returns (line number, name, value).
pub fn parse_env_file(text: &str, path: &Path) -> Result<Vec<(usize, String, String)>, EnvError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |problem: EnvLineError| EnvError::FileLine { path: path.to_path_buf(), line, problem };
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let l = match l.strip_prefix("export") {
            Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
            _ => l,
        };
        let Some((name, value)) = l.split_once('=') else {
            return Err(err(EnvLineError::NotAnAssignment));
        };
        let name = name.trim_end();
        if !valid_name(name) {
            return Err(err(VarNameError::NotAName(name.to_string()).into()));
        }
        let value = value.trim_start();
        let value = match value.chars().next() {
            Some(q @ ('"' | '\'')) => {
                let inner = &value[1..];
                let Some(end) = inner.find(q) else {
                    return Err(err(EnvLineError::Unclosed { name: name.to_string(), quote: q }));
                };
                let rest = inner[end + 1..].trim_start();
                if !(rest.is_empty() || rest.starts_with('#')) {
                    return Err(err(EnvLineError::AfterQuote { name: name.to_string(), quote: q }));
                }
                &inner[..end]
            }
            _ => value.trim_end(),
        };
        out.push((line, name.to_string(), value.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A flavor's variables, as a built-in flavor's.
    struct Flavor {
        name: &'static str,
        env: BTreeMap<String, String>,
        keys: Vec<String>,
    }

    impl Flavor {
        fn vars(&self) -> FlavorVars<'_> {
            FlavorVars { flavor: self.name, env: &self.env, keys: &self.keys }
        }
    }

    fn flavor(name: &'static str, env: &[(&str, &str)], keys: &[&str]) -> Flavor {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Flavor { name, env, keys: args(keys) }
    }

    fn claude() -> Flavor {
        flavor("claude", &[("DISABLE_AUTOUPDATER", "1")], &["ANTHROPIC_API_KEY"])
    }

    fn gemini() -> Flavor {
        flavor("gemini", &[], &["GEMINI_API_KEY", "GOOGLE_API_KEY"])
    }

    fn shell() -> Flavor {
        flavor("shell", &[], &[])
    }

    fn host(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn parse(text: &str) -> Result<Vec<(String, String)>, EnvError> {
        parse_env_file(text, Path::new("my.env")).map(|v| v.into_iter().map(|(_, n, v)| (n, v)).collect())
    }

    #[test]
    fn env_file_quotes_export_and_comments() {
        let text = "# comment\n\nA=1\nexport B = two words \n  C=\"quoted # not a comment\"  # comment\nD='single \"x\"'\nE=\nF=a#b\nexportG=x\nH=\"\"\r\n";
        let got = parse(text).unwrap();
        let want = [
            ("A", "1"),
            ("B", "two words"),
            ("C", "quoted # not a comment"),
            ("D", "single \"x\""),
            ("E", ""),
            ("F", "a#b"),
            ("exportG", "x"),
            ("H", ""),
        ];
        let want: Vec<(String, String)> = want.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn env_file_bad_line_names_file_and_line() {
        let e = parse("A=1\n# c\nnot a pair\n").unwrap_err().to_string();
        assert!(e.contains("my.env") && e.contains("line 3"), "{e}");
        let e = parse("A=1\n1X=2\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("1X"), "{e}");
        let e = parse("A=\"open\n").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("closing"), "{e}");
        let e = parse("A=\"x\" y\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn env_file_errors_do_not_show_values() {
        let e = parse("SECRET=\"sk-123 trailing\" junk\n").unwrap_err().to_string();
        assert!(!e.contains("sk-123"), "{e}");
        let e = parse("sk-abcdef\n").unwrap_err().to_string();
        assert!(!e.contains("sk-abcdef"), "{e}");
    }

    #[test]
    fn precedence_flavor_keys_files_flags() {
        let d = tempfile::tempdir().unwrap();
        let f1 = d.path().join("a.env");
        let f2 = d.path().join("b.env");
        std::fs::write(&f1, "DISABLE_AUTOUPDATER=file1\nFROM_FILE=1\nANTHROPIC_API_KEY=file-key\n").unwrap();
        std::fs::write(&f2, "FROM_FILE=2\n").unwrap();
        let claude = claude();
        let claude = claude.vars();
        let h = host(&[("ANTHROPIC_API_KEY", "host-key"), ("TERM", "xterm-256color"), ("X", "hostx")]);

        let env = build(claude, &[], &[], &h).unwrap();
        assert_eq!(env.get("DISABLE_AUTOUPDATER"), Some("1"));
        assert_eq!(env.get("ANTHROPIC_API_KEY"), Some("host-key"));
        assert_eq!(env.get("TERM"), Some("xterm-256color"));
        assert_eq!(env.get("COLORTERM"), None);
        assert!(env.warnings.is_empty(), "{:?}", env.warnings);

        let env = build(claude, &[], &[f1.clone(), f2.clone()], &h).unwrap();
        assert_eq!(env.get("DISABLE_AUTOUPDATER"), Some("file1"));
        assert_eq!(env.get("ANTHROPIC_API_KEY"), Some("file-key"));
        assert_eq!(env.get("FROM_FILE"), Some("2"));

        let flags = args(&["FROM_FILE=flag", "X", "TERM=dumb", "EMPTY="]);
        let env = build(claude, &flags, &[f1, f2], &h).unwrap();
        assert_eq!(env.get("FROM_FILE"), Some("flag"));
        assert_eq!(env.get("X"), Some("hostx"));
        assert_eq!(env.get("TERM"), Some("dumb"));
        assert_eq!(env.get("EMPTY"), Some(""));
        let names: Vec<&str> = env.vars.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.iter().filter(|n| **n == "FROM_FILE").count(), 1, "names are unique");
    }

    #[test]
    fn missing_key_warns_once_with_flavor_name() {
        let env = build(claude().vars(), &[], &[], &host(&[])).unwrap();
        assert_eq!(
            env.warnings,
            ["ANTHROPIC_API_KEY is not set; claude will ask you to log in (its login persists in the agent home)"]
        );
        let env = build(gemini().vars(), &[], &[], &host(&[("ANTHROPIC_API_KEY", "x")])).unwrap();
        assert!(env.warnings[0].starts_with("none of GEMINI_API_KEY, GOOGLE_API_KEY is set"), "{:?}", env.warnings);
        let env = build(gemini().vars(), &[], &[], &host(&[("GOOGLE_API_KEY", "g")])).unwrap();
        assert!(env.warnings.is_empty());
        assert_eq!(env.get("GOOGLE_API_KEY"), Some("g"));
        // A key given with -e counts too; an empty host key does not.
        let env =
            build(claude().vars(), &args(&["ANTHROPIC_API_KEY=k"]), &[], &host(&[("ANTHROPIC_API_KEY", "")])).unwrap();
        assert!(env.warnings.is_empty());
        assert!(build(shell().vars(), &[], &[], &host(&[])).unwrap().warnings.is_empty());
    }

    #[test]
    fn unset_host_var_is_skipped_with_warning() {
        let env = build(shell().vars(), &args(&["NOPE"]), &[], &host(&[])).unwrap();
        assert_eq!(env.get("NOPE"), None);
        assert!(env.warnings[0].contains("NOPE is not set on the host"), "{:?}", env.warnings);
    }

    #[test]
    fn reserved_and_bad_names_are_refused() {
        let shell = shell();
        let shell = shell.vars();
        let h = host(&[("HOME", "/home/me"), ("PATH", "/usr/bin")]);
        for bad in ["HOME=/x", "USER", "LOGNAME=x", "1A=b", "A-B=c", "=v"] {
            let e = build(shell, &args(&[bad]), &[], &h).unwrap_err().to_string();
            assert!(e.starts_with("-e "), "{bad}: {e}");
        }
        let e = build(shell, &args(&["HOME=/x"]), &[], &h).unwrap_err().to_string();
        assert!(e.contains("cannot be overridden"), "{e}");
        assert!(matches!(build(shell, &args(&["PATH"]), &[], &h), Err(EnvError::HostPath)));
        let env = build(shell, &args(&["PATH=/opt/bin:/usr/bin"]), &[], &h).unwrap();
        assert_eq!(env.get("PATH"), Some("/opt/bin:/usr/bin"));

        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("e.env");
        std::fs::write(&f, "OK=1\nUSER=root\n").unwrap();
        let e = build(shell, &[], &[f], &h).unwrap_err().to_string();
        assert!(e.contains("e.env, line 2") && e.contains("USER"), "{e}");
        let e = build(shell, &[], &[d.path().join("missing.env")], &h).unwrap_err().to_string();
        assert!(e.contains("missing.env"), "{e}");
    }

    #[test]
    fn debug_redacts_values() {
        let env = build(
            claude().vars(),
            &args(&["OTHER=visible-not"]),
            &[],
            &host(&[("ANTHROPIC_API_KEY", "sk-ant-supersecret")]),
        )
        .unwrap();
        let dbg = format!("{env:?}");
        assert!(dbg.contains("ANTHROPIC_API_KEY") && dbg.contains("<redacted>"), "{dbg}");
        assert!(!dbg.contains("sk-ant-supersecret") && !dbg.contains("visible-not"), "{dbg}");
    }
}
