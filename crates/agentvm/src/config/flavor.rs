//! Flavors: what `agentvm run FLAVOR` runs, as data.
//!
//! A flavor names the npm packages and Debian packages its image needs, the
//! command to start, the host variables to pass in (API keys), extra guest
//! environment and where its agent reads a memory note. The built-in flavors
//! ([`BUILTIN_TOML`]) are written in the same TOML users write in
//! `~/.config/agentvm/config.toml` or `<project>/.agentvm.toml`:
//!
//! ```toml
//! [flavors.claude]          # extends the built-in one, field by field
//! version = "1.0.30"
//!
//! [flavors.aider]           # a new flavor: `command` is required
//! description = "aider in a VM"
//! apt = ["python3-pip"]
//! command = ["aider"]
//! keys = ["OPENAI_API_KEY"]
//! ```
//!
//! Layers, later wins: built-in < user config < project config. Within a
//! table for an existing flavor, each given field replaces the old one,
//! except `env`, which is merged name by name. An empty `version` or
//! `memory_file` string removes the pin or the note.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::envvars::{self, FlavorVars, VarNameError};
use crate::config::toml_error::{self, TomlError};
use crate::net::egress::{AllowList, EgressError};

/// The flavor `agentvm run` starts when none is named.
pub const DEFAULT_FLAVOR: &str = "claude";

/// The built-in flavors, in the format of a config file.
pub const BUILTIN_TOML: &str = r#"
[flavors.claude]
description = "Claude Code, Anthropic's coding agent"
npm = ["@anthropic-ai/claude-code"]
command = ["claude"]
keys = ["ANTHROPIC_API_KEY"]
key_headers = { ANTHROPIC_API_KEY = ["x-api-key: {key}", "authorization: Bearer {key}"] }
secret_hosts = ["api.anthropic.com"]
allow = ["api.anthropic.com", "console.anthropic.com", "statsig.anthropic.com", "claude.ai", "*.claude.ai", "registry.npmjs.org"]
memory_file = ".claude/CLAUDE.md"
login_files = [".claude/.credentials.json"]
env = { DISABLE_AUTOUPDATER = "1" }

[flavors.gemini]
description = "Gemini CLI, Google's coding agent"
npm = ["@google/gemini-cli"]
command = ["gemini"]
keys = ["GEMINI_API_KEY", "GOOGLE_API_KEY"]
key_headers = { GEMINI_API_KEY = ["x-goog-api-key: {key}"], GOOGLE_API_KEY = ["x-goog-api-key: {key}"] }
secret_hosts = ["generativelanguage.googleapis.com"]
allow = ["generativelanguage.googleapis.com", "cloudcode-pa.googleapis.com", "oauth2.googleapis.com", "accounts.google.com", "registry.npmjs.org"]
memory_file = ".gemini/GEMINI.md"
login_files = [".gemini/oauth_creds.json"]

[flavors.codex]
description = "Codex CLI, OpenAI's coding agent"
npm = ["@openai/codex"]
command = ["codex"]
keys = ["OPENAI_API_KEY"]
key_headers = { OPENAI_API_KEY = ["authorization: Bearer {key}"] }
secret_hosts = ["api.openai.com"]
allow = ["api.openai.com", "auth.openai.com", "chatgpt.com", "registry.npmjs.org"]
memory_file = ".codex/AGENTS.md"
login_files = [".codex/auth.json"]

[flavors.shell]
description = "a login shell (bash); with ARGS, ARGS is the command"
command = []
"#;

/// Longest flavor name accepted.
const MAX_NAME_LEN: usize = 64;
/// Most login files a flavor may list, and the longest path of one.
pub const MAX_LOGIN_FILES: usize = 16;
const MAX_LOGIN_PATH_LEN: usize = 256;

/// A resolved flavor.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Flavor {
    /// The name used on the command line (the config table's key).
    pub name: String,
    /// One line for listings.
    pub description: String,
    /// npm specs installed in the image layer, e.g. `@openai/codex` or
    /// `@openai/codex@0.1.0`.
    pub npm: Vec<String>,
    /// Extra Debian packages on top of the base image.
    pub apt: Vec<String>,
    /// Program and fixed arguments; empty: a login shell.
    pub command: Vec<String>,
    /// Host variables passed into the guest when set (API keys).
    pub keys: Vec<String>,
    /// Host names the flavor needs under `--network allow` (its API and
    /// login hosts, its package registry).
    #[serde(default)]
    pub allow: Vec<String>,
    /// The hosts that may receive the real keys under `--shield-secrets`
    /// (the agent's API).
    #[serde(default)]
    pub secret_hosts: Vec<String>,
    /// For each key, the headers it travels in under `--shield-secrets`,
    /// as `name: text{key}text` (e.g. `authorization: Bearer {key}`): only
    /// there is the placeholder replaced by the real key.
    #[serde(default)]
    pub key_headers: BTreeMap<String, Vec<String>>,
    /// Extra guest environment.
    pub env: BTreeMap<String, String>,
    /// Path under the agent home of the agent's memory note, e.g.
    /// `.claude/CLAUDE.md`.
    pub memory_file: Option<String>,
    /// Paths under the agent home of the agent's login (OAuth) files, e.g.
    /// `.claude/.credentials.json`: with `--login=shared` one copy serves
    /// every project.
    #[serde(default)]
    pub login_files: Vec<String>,
    /// Version pin of the first npm spec (which then must carry none).
    pub version: Option<String>,
}

/// One `[flavors.NAME]` table of a config file: every field optional.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FlavorOverride {
    pub description: Option<String>,
    pub npm: Option<Vec<String>>,
    pub apt: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    pub keys: Option<Vec<String>>,
    pub allow: Option<Vec<String>>,
    pub secret_hosts: Option<Vec<String>>,
    pub key_headers: Option<BTreeMap<String, Vec<String>>>,
    pub env: Option<BTreeMap<String, String>>,
    pub memory_file: Option<String>,
    pub login_files: Option<Vec<String>>,
    pub version: Option<String>,
}

/// A flavor that cannot be used, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum FlavorError {
    #[error("config {path} is invalid: {source}")]
    Parse { path: PathBuf, source: TomlError },
    #[error("in {path}: {source}")]
    InFile { path: PathBuf, source: Box<FlavorError> },
    #[error("flavor name {name:?} is invalid: use lowercase letters, digits, '-' and '_', starting with a letter or digit (at most {MAX_NAME_LEN} characters)")]
    BadName { name: String },
    #[error("flavor {flavor:?}: {field}: {problem}")]
    Invalid { flavor: String, field: &'static str, problem: FieldError },
    #[error("flavor {flavor:?} is new and has no `command`: add command = [\"program\", \"arg\", ...] to [flavors.{flavor}] (or command = [] for a login shell)")]
    MissingCommand { flavor: String },
    #[error("unknown flavor {name:?}: available flavors are: {}; or define [flavors.{name}] in ~/.config/agentvm/config.toml or .agentvm.toml", available.join(", "))]
    Unknown { name: String, available: Vec<String> },
}

/// What is wrong with one field of a flavor.
#[derive(Debug, thiserror::Error)]
pub enum FieldError {
    #[error("{0:?} is not an npm package spec (e.g. \"@openai/codex\" or \"cowsay@1.6.0\")")]
    NpmSpec(String),
    #[error("{0:?} is not a Debian package name (e.g. \"python3-pip\" or \"jq=1.7.1-3\")")]
    AptName(String),
    #[error("an empty string is not a program or argument; remove it")]
    EmptyArgument,
    #[error(transparent)]
    VarName(#[from] VarNameError),
    /// `why` is the shield's own account of the form.
    #[error("{key}: {why}")]
    KeyForm { key: String, why: String },
    #[error("{0} is not one of the flavor's keys; add it to `keys` or remove it here")]
    NotAKey(String),
    #[error("{0:?} must be a relative path under the agent home without '..', e.g. \".claude/CLAUDE.md\"")]
    MemoryFile(String),
    #[error("{0:?} must be a relative path of a file under the agent home without '..' (at most {MAX_LOGIN_PATH_LEN} bytes), e.g. \".claude/.credentials.json\"")]
    LoginFile(String),
    #[error("{0} files are listed; at most {MAX_LOGIN_FILES} are allowed")]
    TooManyLoginFiles(usize),
    #[error("{0:?} is listed twice; list it once")]
    LoginFileTwice(String),
    #[error("{0:?} is not an npm version (e.g. \"1.0.30\", \"latest\")")]
    Version(String),
    #[error("{0:?} pins nothing: the flavor has no npm package; remove `version`")]
    PinsNothing(String),
    #[error("{version:?} conflicts with the version in npm spec {spec:?}; keep only one of them")]
    TwoVersions { version: String, spec: String },
    #[error(transparent)]
    Hosts(#[from] EgressError),
}

fn invalid(flavor: &str, field: &'static str, problem: impl Into<FieldError>) -> FlavorError {
    FlavorError::Invalid { flavor: flavor.to_string(), field, problem: problem.into() }
}

/// The built-in flavors, parsed from [`BUILTIN_TOML`].
pub fn builtin_flavors() -> BTreeMap<String, Flavor> {
    let layer = parse_flavor_tables(BUILTIN_TOML, Path::new("<built-in flavors>")).expect("built-in flavors parse");
    merge(BTreeMap::new(), &layer).expect("built-in flavors are valid")
}

/// Reads the `[flavors.*]` tables of a whole config file's text. Other
/// top-level keys are ignored (settings validates them); unknown keys inside
/// a flavor table, bad names and bad values are errors naming `path`.
pub fn parse_flavor_tables(toml_text: &str, path: &Path) -> Result<BTreeMap<String, FlavorOverride>, FlavorError> {
    #[derive(Deserialize)]
    struct ConfigFile {
        #[serde(default)]
        flavors: BTreeMap<String, FlavorOverride>,
    }
    let file: ConfigFile =
        toml_error::from_str(toml_text).map_err(|source| FlavorError::Parse { path: path.to_path_buf(), source })?;
    check_tables(&file.flavors, path)?;
    Ok(file.flavors)
}

/// Checks each `[flavors.NAME]` table of the config file at `path` on its
/// own: names and values (the whole flavors are checked when merged).
pub fn check_tables(tables: &BTreeMap<String, FlavorOverride>, path: &Path) -> Result<(), FlavorError> {
    for (name, o) in tables {
        check_override(name, o).map_err(|e| FlavorError::InFile { path: path.to_path_buf(), source: Box::new(e) })?;
    }
    Ok(())
}

/// Lays `layer` over `base`: new names become flavors (they need a
/// `command`), existing ones change field by field. Every resulting flavor
/// is validated.
pub fn merge(
    mut base: BTreeMap<String, Flavor>,
    layer: &BTreeMap<String, FlavorOverride>,
) -> Result<BTreeMap<String, Flavor>, FlavorError> {
    for (name, o) in layer {
        check_override(name, o)?;
        let flavor = match base.remove(name) {
            Some(old) => apply(old, o),
            None => {
                if o.command.is_none() {
                    return Err(FlavorError::MissingCommand { flavor: name.clone() });
                }
                let empty = Flavor {
                    name: name.clone(),
                    description: String::new(),
                    npm: Vec::new(),
                    apt: Vec::new(),
                    command: Vec::new(),
                    keys: Vec::new(),
                    allow: Vec::new(),
                    secret_hosts: Vec::new(),
                    key_headers: BTreeMap::new(),
                    env: BTreeMap::new(),
                    memory_file: None,
                    login_files: Vec::new(),
                    version: None,
                };
                apply(empty, o)
            }
        };
        check_flavor(&flavor)?;
        base.insert(name.clone(), flavor);
    }
    Ok(base)
}

fn apply(mut f: Flavor, o: &FlavorOverride) -> Flavor {
    let non_empty = |s: &String| Some(s.clone()).filter(|s| !s.is_empty());
    if let Some(v) = &o.description {
        f.description = v.clone();
    }
    if let Some(v) = &o.npm {
        f.npm = v.clone();
    }
    if let Some(v) = &o.apt {
        f.apt = v.clone();
    }
    if let Some(v) = &o.command {
        f.command = v.clone();
    }
    if let Some(v) = &o.keys {
        f.keys = v.clone();
    }
    if let Some(v) = &o.allow {
        f.allow = v.clone();
    }
    if let Some(v) = &o.secret_hosts {
        f.secret_hosts = v.clone();
    }
    if let Some(v) = &o.key_headers {
        f.key_headers = v.clone();
    }
    if let Some(env) = &o.env {
        f.env.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    if let Some(v) = &o.memory_file {
        f.memory_file = non_empty(v);
    }
    if let Some(v) = &o.login_files {
        f.login_files = v.clone();
    }
    if let Some(v) = &o.version {
        f.version = non_empty(v);
    }
    f
}

/// The flavor called `name`.
pub fn resolve(flavors: &BTreeMap<String, Flavor>, name: &str) -> Result<Flavor, FlavorError> {
    flavors
        .get(name)
        .cloned()
        .ok_or_else(|| FlavorError::Unknown { name: name.to_string(), available: flavors.keys().cloned().collect() })
}

impl Flavor {
    /// What the flavor puts in the guest's environment.
    pub fn vars(&self) -> FlavorVars<'_> {
        FlavorVars { flavor: &self.name, env: &self.env, keys: &self.keys }
    }

    /// The guest argv for `agentvm run FLAVOR -- ARGS`: the command followed
    /// by ARGS; for a flavor without a command, ARGS itself (empty: a login
    /// shell).
    pub fn argv(&self, args: &[String]) -> Vec<String> {
        self.command.iter().chain(args).cloned().collect()
    }

    /// The npm specs to install, with [`Flavor::version`] applied to the
    /// first one.
    pub fn npm_specs(&self) -> Vec<String> {
        let mut specs = self.npm.clone();
        if let (Some(first), Some(v)) = (specs.first_mut(), &self.version) {
            if npm_version(first).is_none() {
                first.push('@');
                first.push_str(v);
            }
        }
        specs
    }
}

/// The version part of an npm spec (`pkg@1.2`, `@scope/pkg@1.2`), if any.
fn npm_version(spec: &str) -> Option<&str> {
    let skip = usize::from(spec.starts_with('@'));
    spec[skip..].find('@').map(|i| &spec[skip + i + 1..])
}

/// A multi-line description for `agentvm flavor show`. Values of variables
/// that look like secrets are not shown.
pub fn describe(f: &Flavor) -> String {
    let list = |v: &[String]| if v.is_empty() { "(none)".to_string() } else { v.join(" ") };
    let mut out = format!("{}: {}\n", f.name, f.description);
    let command = if f.command.is_empty() { "(login shell; ARGS is the command)".into() } else { list(&f.command) };
    let _ = writeln!(out, "  command:     {command}");
    let _ = writeln!(out, "  npm:         {}", list(&f.npm_specs()));
    let _ = writeln!(out, "  apt:         {}", list(&f.apt));
    let _ = writeln!(out, "  keys:        {}", list(&f.keys));
    let _ = writeln!(out, "  allow:       {}", list(&f.allow));
    let _ = writeln!(out, "  secret hosts: {}", list(&f.secret_hosts));
    let forms: Vec<String> =
        f.key_headers.iter().map(|(k, forms)| format!("{k} in \"{}\"", forms.join("\", \""))).collect();
    let _ = writeln!(out, "  key headers: {}", if forms.is_empty() { "(none)".into() } else { forms.join("; ") });
    let env: Vec<String> = f
        .env
        .iter()
        .map(|(k, v)| if f.keys.contains(k) || looks_secret(k) { format!("{k}=(hidden)") } else { format!("{k}={v}") })
        .collect();
    let _ = writeln!(out, "  env:         {}", list(&env));
    let note = f.memory_file.as_deref().map_or("(none)".to_string(), |m| format!("~/{m}"));
    let _ = writeln!(out, "  memory note: {note}");
    let logins: Vec<String> = f.login_files.iter().map(|p| format!("~/{p}")).collect();
    let _ = writeln!(out, "  login files: {}", list(&logins));
    out
}

pub(crate) fn looks_secret(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    ["KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL"].iter().any(|w| n.contains(w))
}

/// A valid flavor name: `[a-z0-9][a-z0-9_-]*`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_LEN
        && chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Checks what one table says, on its own.
fn check_override(name: &str, o: &FlavorOverride) -> Result<(), FlavorError> {
    if !valid_name(name) {
        return Err(FlavorError::BadName { name: name.to_string() });
    }
    let err = |field, problem: FieldError| invalid(name, field, problem);
    if let Some(spec) =
        o.npm.iter().flatten().find(|s| s.is_empty() || s.starts_with('-') || s.chars().any(char::is_whitespace))
    {
        return Err(err("npm", FieldError::NpmSpec(spec.clone())));
    }
    if let Some(pkg) = o.apt.iter().flatten().find(|p| !valid_apt(p)) {
        return Err(err("apt", FieldError::AptName(pkg.clone())));
    }
    if o.command.iter().flatten().any(|a| a.is_empty()) {
        return Err(err("command", FieldError::EmptyArgument));
    }
    for key in o.keys.iter().flatten() {
        envvars::check_guest_name(key).map_err(|e| err("keys", e.into()))?;
    }
    for (key, forms) in o.key_headers.iter().flatten() {
        envvars::check_guest_name(key).map_err(|e| err("key_headers", e.into()))?;
        for form in forms {
            crate::net::shield::parse_key_form(form)
                .map_err(|why| err("key_headers", FieldError::KeyForm { key: key.clone(), why }))?;
        }
    }
    for var in o.env.iter().flat_map(|e| e.keys()) {
        envvars::check_guest_name(var).map_err(|e| err("env", e.into()))?;
    }
    if let Some(m) = o.memory_file.as_deref().filter(|m| !m.is_empty()) {
        if !home_relative(m) {
            return Err(err("memory_file", FieldError::MemoryFile(m.to_string())));
        }
    }
    if let Some(files) = &o.login_files {
        check_login_files(files).map_err(|e| err("login_files", e))?;
    }
    if let Some(v) = &o.version {
        if v.starts_with('-') || v.chars().any(char::is_whitespace) || v.contains('@') {
            return Err(err("version", FieldError::Version(v.clone())));
        }
    }
    Ok(())
}

/// A path of the agent home: relative, with plain names only (no `.`,
/// `..` or root).
fn home_relative(path: &str) -> bool {
    !path.is_empty() && Path::new(path).components().all(|c| matches!(c, Component::Normal(_)))
}

/// The login files: each a file's path under the home, listed once, and
/// not too many (the host keeps and syncs each).
fn check_login_files(files: &[String]) -> Result<(), FieldError> {
    if files.len() > MAX_LOGIN_FILES {
        return Err(FieldError::TooManyLoginFiles(files.len()));
    }
    for (i, f) in files.iter().enumerate() {
        if !home_relative(f) || f.ends_with('/') || f.len() > MAX_LOGIN_PATH_LEN {
            return Err(FieldError::LoginFile(f.clone()));
        }
        if files[..i].iter().any(|earlier| Path::new(earlier) == Path::new(f)) {
            return Err(FieldError::LoginFileTwice(f.clone()));
        }
    }
    Ok(())
}

/// Checks a whole flavor (after merging).
fn check_flavor(f: &Flavor) -> Result<(), FlavorError> {
    AllowList::new(&f.allow).map_err(|e| invalid(&f.name, "allow", e))?;
    AllowList::new(&f.secret_hosts).map_err(|e| invalid(&f.name, "secret_hosts", e))?;
    if let Some(key) = f.key_headers.keys().find(|k| !f.keys.contains(k)) {
        return Err(invalid(&f.name, "key_headers", FieldError::NotAKey(key.clone())));
    }
    match (&f.version, f.npm.first()) {
        (Some(v), None) => Err(invalid(&f.name, "version", FieldError::PinsNothing(v.clone()))),
        (Some(v), Some(first)) if npm_version(first).is_some() => {
            Err(invalid(&f.name, "version", FieldError::TwoVersions { version: v.clone(), spec: first.clone() }))
        }
        _ => Ok(()),
    }
}

/// `name` or `name=version`, Debian style.
fn valid_apt(pkg: &str) -> bool {
    let (name, version) = match pkg.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (pkg, None),
    };
    let mut chars = name.chars();
    let name_ok = name.len() >= 2
        && chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    let version_ok = match version {
        None => true,
        Some(v) => !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || ".+~:-".contains(c)),
    };
    name_ok && version_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(text: &str) -> BTreeMap<String, FlavorOverride> {
        parse_flavor_tables(text, Path::new("test.toml")).unwrap()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn builtins_parse_with_expected_fields() {
        let all = builtin_flavors();
        assert_eq!(all.keys().collect::<Vec<_>>(), ["claude", "codex", "gemini", "shell"]);
        let claude = &all["claude"];
        assert_eq!(claude.name, "claude");
        assert_eq!(claude.npm, ["@anthropic-ai/claude-code"]);
        assert_eq!(claude.command, ["claude"]);
        assert_eq!(claude.keys, ["ANTHROPIC_API_KEY"]);
        assert_eq!(claude.env.get("DISABLE_AUTOUPDATER").map(String::as_str), Some("1"));
        assert_eq!(claude.memory_file.as_deref(), Some(".claude/CLAUDE.md"));
        assert_eq!(all["gemini"].keys, ["GEMINI_API_KEY", "GOOGLE_API_KEY"]);
        assert_eq!(all["codex"].memory_file.as_deref(), Some(".codex/AGENTS.md"));
        let shell = &all["shell"];
        assert!(shell.command.is_empty() && shell.npm.is_empty() && shell.keys.is_empty());
        assert!(all.contains_key(DEFAULT_FLAVOR));
    }

    #[test]
    fn version_override_pins_first_npm_spec() {
        let all = merge(builtin_flavors(), &layer("[flavors.claude]\nversion = \"1.0.30\"\n")).unwrap();
        let claude = &all["claude"];
        assert_eq!(claude.npm_specs(), ["@anthropic-ai/claude-code@1.0.30"]);
        assert_eq!(claude.command, ["claude"], "other fields are kept");
        assert_eq!(builtin_flavors()["claude"].npm_specs(), ["@anthropic-ai/claude-code"]);
    }

    #[test]
    fn project_overrides_user_overrides_builtin() {
        let user = layer(
            "[flavors.claude]\nversion = \"1.0.1\"\ndescription = \"mine\"\nenv = { A = \"user\", B = \"user\" }\n",
        );
        let project = layer("[flavors.claude]\nversion = \"2.0.0\"\nenv = { B = \"project\" }\n");
        let all = merge(merge(builtin_flavors(), &user).unwrap(), &project).unwrap();
        let c = &all["claude"];
        assert_eq!(c.version.as_deref(), Some("2.0.0"));
        assert_eq!(c.description, "mine");
        assert_eq!(c.env["A"], "user");
        assert_eq!(c.env["B"], "project");
        assert_eq!(c.env["DISABLE_AUTOUPDATER"], "1", "env merges name by name");
    }

    #[test]
    fn empty_strings_remove_pin_and_note() {
        let l1 = layer("[flavors.claude]\nversion = \"1\"\n");
        let l2 = layer("[flavors.claude]\nversion = \"\"\nmemory_file = \"\"\n");
        let all = merge(merge(builtin_flavors(), &l1).unwrap(), &l2).unwrap();
        assert_eq!(all["claude"].version, None);
        assert_eq!(all["claude"].memory_file, None);
    }

    #[test]
    fn new_flavor_needs_command() {
        let e = merge(builtin_flavors(), &layer("[flavors.aider]\napt = [\"python3\"]\n")).unwrap_err();
        assert!(matches!(e, FlavorError::MissingCommand { .. }), "{e}");
        assert!(e.to_string().contains("[flavors.aider]"), "{e}");
        let all = merge(builtin_flavors(), &layer("[flavors.aider]\ncommand = [\"aider\", \"--yes\"]\n")).unwrap();
        assert_eq!(all["aider"].argv(&strings(&["x"])), ["aider", "--yes", "x"]);
        let all = merge(builtin_flavors(), &layer("[flavors.sh2]\ncommand = []\n")).unwrap();
        assert!(all["sh2"].command.is_empty());
    }

    #[test]
    fn unknown_key_is_error_naming_file() {
        let e = parse_flavor_tables("[flavors.claude]\nverison = \"1\"\n", Path::new("/p/.agentvm.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/p/.agentvm.toml") && e.contains("verison"), "{e}");
    }

    #[test]
    fn other_top_level_keys_are_ignored() {
        let l =
            parse_flavor_tables("memory = \"2G\"\ncpus = 2\n[flavors.shell]\ndescription = \"x\"\n", Path::new("c"))
                .unwrap();
        assert_eq!(l.len(), 1);
        assert!(parse_flavor_tables("memory = \"2G\"\n", Path::new("c")).unwrap().is_empty());
    }

    #[test]
    fn bad_names_and_values_are_refused() {
        let bad = |t: &str| parse_flavor_tables(t, Path::new("cfg.toml")).unwrap_err().to_string();
        let e = bad("[flavors.Claude]\ncommand = [\"x\"]\n");
        assert!(e.contains("\"Claude\"") && e.contains("cfg.toml"), "{e}");
        assert!(bad("[flavors.-x]\ncommand = [\"x\"]\n").contains("invalid"));
        assert!(bad("[flavors.x]\ncommand = [\"\"]\n").contains("command"));
        assert!(bad("[flavors.x]\ncommand = [\"a\"]\nenv = { \"1BAD\" = \"v\" }\n").contains("env"));
        assert!(bad("[flavors.x]\ncommand = [\"a\"]\nenv = { HOME = \"/root\" }\n").contains("HOME"));
        assert!(bad("[flavors.x]\ncommand = [\"a\"]\nkeys = [\"A-B\"]\n").contains("keys"));
        assert!(bad("[flavors.x]\ncommand = [\"a\"]\nkeys = [\"K\"]\nkey_headers = { K = [\"x-api-key\"] }\n")
            .contains("key_headers"));
        assert!(bad("[flavors.x]\ncommand = [\"a\"]\nmemory_file = \"../x\"\n").contains("memory_file"));
        assert!(bad("[flavors.x]\ncommand = [\"a\"]\nmemory_file = \"/etc/x\"\n").contains("memory_file"));
        assert!(bad("[flavors.x]\ncommand = [\"a\"]\nnpm = [\"--global\"]\n").contains("npm"));
        assert!(bad("[flavors.x]\ncommand = [\"a\"]\napt = [\"Bad Pkg\"]\n").contains("apt"));
        assert!(bad("[flavors]\nx = 1\n").contains("cfg.toml"));
    }

    #[test]
    fn builtin_login_files_are_each_agents_oauth_file() {
        let all = builtin_flavors();
        assert_eq!(all["claude"].login_files, [".claude/.credentials.json"]);
        assert_eq!(all["gemini"].login_files, [".gemini/oauth_creds.json"]);
        assert_eq!(all["codex"].login_files, [".codex/auth.json"]);
        assert!(all["shell"].login_files.is_empty());
        assert!(describe(&all["claude"]).contains("login files: ~/.claude/.credentials.json"));
        let all = merge(all, &layer("[flavors.mine]\ncommand = []\nlogin_files = [\"a/b.json\", \".c\"]\n")).unwrap();
        assert_eq!(all["mine"].login_files, ["a/b.json", ".c"]);
        let all = merge(all, &layer("[flavors.claude]\nlogin_files = []\n")).unwrap();
        assert!(all["claude"].login_files.is_empty(), "an empty list shares nothing");
    }

    #[test]
    fn login_files_outside_the_home_twice_or_too_many_are_refused_naming_flavor_and_field() {
        let bad = |files: &str| {
            parse_flavor_tables(&format!("[flavors.x]\ncommand = []\nlogin_files = {files}\n"), Path::new("c.toml"))
                .unwrap_err()
                .to_string()
        };
        for files in [
            r#"["../x"]"#,
            r#"["/etc/shadow"]"#,
            r#"["a/../../x"]"#,
            r#"["./a"]"#,
            r#"[""]"#,
            r#"["dir/"]"#,
            r#"[".claude/.credentials.json", ".claude//.credentials.json"]"#,
        ] {
            let e = bad(files);
            assert!(e.contains("flavor \"x\": login_files") && e.contains("c.toml"), "{files}: {e}");
        }
        assert!(bad(r#"["a", "a"]"#).contains("listed twice"));
        assert!(bad(&format!("[\"{}\"]", "a".repeat(257))).contains("at most 256 bytes"));
        let many: Vec<String> = (0..=MAX_LOGIN_FILES).map(|i| format!("\"f{i}\"")).collect();
        assert!(bad(&format!("[{}]", many.join(","))).contains("17 files are listed; at most 16"));
    }

    #[test]
    fn version_conflicting_with_spec_is_refused() {
        let l = layer("[flavors.claude]\nnpm = [\"@anthropic-ai/claude-code@1.0.0\"]\nversion = \"2.0.0\"\n");
        let e = merge(builtin_flavors(), &l).unwrap_err().to_string();
        assert!(e.contains("keep only one"), "{e}");
        let e = merge(builtin_flavors(), &layer("[flavors.shell]\nversion = \"1\"\n")).unwrap_err().to_string();
        assert!(e.contains("pins nothing"), "{e}");
    }

    #[test]
    fn npm_version_detects_scoped_and_plain_specs() {
        assert_eq!(npm_version("@a/b"), None);
        assert_eq!(npm_version("@a/b@1.2"), Some("1.2"));
        assert_eq!(npm_version("cowsay"), None);
        assert_eq!(npm_version("cowsay@latest"), Some("latest"));
    }

    #[test]
    fn argv_shell_without_and_with_args() {
        let all = builtin_flavors();
        assert!(all["shell"].argv(&[]).is_empty());
        assert_eq!(all["shell"].argv(&strings(&["make", "test"])), ["make", "test"]);
    }

    #[test]
    fn argv_claude_appends_args() {
        let all = builtin_flavors();
        assert_eq!(all["claude"].argv(&[]), ["claude"]);
        assert_eq!(all["claude"].argv(&strings(&["-p", "fix it"])), ["claude", "-p", "fix it"]);
    }

    #[test]
    fn unknown_flavor_lists_available() {
        let e = resolve(&builtin_flavors(), "emacs").unwrap_err().to_string();
        assert!(e.contains("\"emacs\"") && e.contains("claude, codex, gemini, shell"), "{e}");
        assert_eq!(resolve(&builtin_flavors(), "codex").unwrap().command, ["codex"]);
    }

    #[test]
    fn key_headers_say_where_each_key_travels() {
        let all = builtin_flavors();
        assert_eq!(all["claude"].key_headers["ANTHROPIC_API_KEY"], ["x-api-key: {key}", "authorization: Bearer {key}"]);
        assert_eq!(all["gemini"].key_headers["GOOGLE_API_KEY"], ["x-goog-api-key: {key}"]);
        assert_eq!(all["codex"].key_headers["OPENAI_API_KEY"], ["authorization: Bearer {key}"]);
        assert!(describe(&all["claude"])
            .contains("key headers: ANTHROPIC_API_KEY in \"x-api-key: {key}\", \"authorization: Bearer {key}\""));
        let e = merge(all.clone(), &layer("[flavors.claude]\nkey_headers = { OTHER_KEY = [\"x-api-key: {key}\"] }\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_headers") && e.contains("OTHER_KEY is not one of the flavor's keys"), "{e}");
        let all =
            merge(all, &layer("[flavors.claude]\nkey_headers = { ANTHROPIC_API_KEY = [\"x-api-key: {key}\"] }\n"))
                .unwrap();
        assert_eq!(
            all["claude"].key_headers["ANTHROPIC_API_KEY"],
            ["x-api-key: {key}"],
            "the table replaces the old one"
        );
    }

    #[test]
    fn describe_hides_secret_looking_values() {
        let l = layer("[flavors.claude]\nenv = { MY_TOKEN = \"s3cret\" }\n");
        let all = merge(builtin_flavors(), &l).unwrap();
        let d = describe(&all["claude"]);
        assert!(d.contains("DISABLE_AUTOUPDATER=1") && d.contains("MY_TOKEN=(hidden)"), "{d}");
        assert!(!d.contains("s3cret"));
        assert!(d.contains("~/.claude/CLAUDE.md"));
        assert!(describe(&all["shell"]).contains("login shell"));
    }
}
