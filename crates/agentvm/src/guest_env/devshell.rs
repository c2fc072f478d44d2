//! Project dev shells: the environment of a Nix flake, a devenv project or a
//! direnv `.envrc`, evaluated on the host and applied to the guest program.
//!
//! What is evaluated, first match in the work dir:
//!
//! | file                | command                                                    |
//! |---------------------|------------------------------------------------------------|
//! | `.devenv.flake.nix` | `devenv print-dev-env`                                     |
//! | `devenv.nix`        | `nix print-dev-env --no-update-lock-file --impure path:.`  |
//! | `flake.nix`         | `nix print-dev-env --no-update-lock-file path:.`           |
//! | `.envrc`            | `direnv export json` (only if allowed in direnv)           |
//!
//! The guest can write these files, and Nix evaluates them on the host:
//! the dev shell's sources (every `*.nix` file in the project, the
//! [`DATA_FILES`], and the files the `devshell_files` setting names, see
//! [`trust::devshell_sources`]) must be as the user trusted them (`agentvm
//! trust`), or the dev shell is refused before anything runs. Nix and
//! devenv then run in a private copy of exactly those bytes
//! (`private_copy`), not in the work dir: Nix evaluates
//! nothing the user did not trust, and runs no git in the project (git
//! runs programs named by the repository's config, which the guest can
//! write). When Nix fails looking for a project file that is not in the
//! copy, the error names it and says to add it to `devshell_files`. An
//! `.envrc` is left to direnv's own allow list, which works the
//! same way; direnv runs in the work dir, and the Nix sources must be
//! trusted for it too (an `.envrc` with `use nix` has nix-shell evaluate
//! `shell.nix` and run its hooks on the host). What else an allowed
//! `.envrc` runs or reads in the project is the user's to judge.
//!
//! Nix output is cached in the project's state dir, keyed by a hash of the
//! command and of the sources (the bytes the trust check hashed), and
//! reused until one of them changes; the cache is written (atomically)
//! only after the command succeeded. direnv is run every time: it decides
//! itself what an `.envrc` depends on.
//!
//! Only exported string variables are applied. Shell internals and
//! variables that describe the host or the build sandbox (HOME, PWD, TMPDIR,
//! ...) are dropped, paths under the host's work dir are rewritten to
//! `/work`, and the dev shell's PATH entries go in front of the guest's
//! default PATH. A Nix `shellHook` is not run.
//!
//! The host's Nix store is `/nix/store` (`$AGENTVM_NIX_STORE` names
//! another directory, for tests).
//!
//! The variables are the user's own environment and may hold secrets:
//! they travel in the launch spec (in memory), are written only to the
//! cache in the project's state dir (mode 0600), and never appear in an
//! error or warning.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::GUEST_WORK;
use crate::config::envvars;
use crate::config::trust::{self, FilePattern, Record, Sources, TrustError};
use crate::image::Progress;
use crate::tools;

/// Whether and how to use the project's dev shell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No dev shell.
    #[default]
    Off,
    /// Apply the dev shell; if it cannot be evaluated, stop before boot.
    On,
    /// Apply the dev shell if it can be evaluated, else warn and go on
    /// without it.
    Try,
}

/// The dev shell files at the top of the work dir. With every other
/// `*.nix` file in the tree and the `devshell_files` they are the dev
/// shell's sources ([`trust::devshell_sources`]): they must be trusted, and
/// key the cache.
pub const KEY_FILES: [&str; 6] =
    ["flake.nix", "flake.lock", ".devenv.flake.nix", "devenv.nix", "devenv.yaml", "devenv.lock"];

/// The [`KEY_FILES`] that are not `*.nix` files.
pub const DATA_FILES: [&str; 3] = ["flake.lock", "devenv.yaml", "devenv.lock"];

/// The cache file's name in the project's state dir.
pub const CACHE_FILE: &str = "devshell.json";

/// Where the Nix store is, on the host and in the guest.
pub const NIX_STORE: &str = "/nix/store";

/// Lines of a failed command's output shown in the error.
const ERROR_LINES: usize = 60;

/// Bumped when the cache's meaning changes, so old entries are not reused.
const CACHE_VERSION: u32 = 3;

/// Variables never taken from a dev shell: they belong to the shell that
/// evaluated it, to the build sandbox, or to the guest.
const DROPPED: [&str; 30] = [
    "BASHOPTS",
    "SHELLOPTS",
    "BASHPID",
    "BASH_ARGV0",
    "PWD",
    "OLDPWD",
    "HOME",
    "USER",
    "LOGNAME",
    "TERM",
    "SHLVL",
    "SHELL",
    "PPID",
    "UID",
    "EUID",
    "HOSTNAME",
    "HOSTTYPE",
    "MACHTYPE",
    "OSTYPE",
    "IFS",
    "_",
    "TZ",
    "NIX_BUILD_TOP",
    "NIX_LOG_FD",
    "NIX_ENFORCE_PURITY",
    "NIX_REMOTE",
    "NIX_BUILD_CORES",
    "SSL_CERT_FILE",
    "DIRENV_DIFF",
    "DIRENV_WATCHES",
];

/// Temporary-directory variables: kept only when they point into the work dir.
const TEMP_VARS: [&str; 4] = ["TMP", "TEMP", "TMPDIR", "TEMPDIR"];

/// Whether `path` is the guest's work dir or below it.
fn is_in_guest_work(path: &str) -> bool {
    path.strip_prefix(GUEST_WORK).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The certificate placeholder of Nix's build sandbox.
const NO_CERT_FILE: &str = "/no-cert-file.crt";

/// The PATH of Nix's build sandbox when the derivation sets none.
const NO_PATH: &str = "/path-not-set";

/// What defines the project's dev shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `.devenv.flake.nix`: `devenv print-dev-env`.
    DevenvFlake,
    /// `devenv.nix`: `nix print-dev-env --impure`.
    DevenvNix,
    /// `flake.nix`: `nix print-dev-env`.
    Flake,
    /// `.envrc`: `direnv export json`.
    Direnv,
}

impl Source {
    /// The file that selected this source.
    pub fn file(self) -> &'static str {
        match self {
            Source::DevenvFlake => ".devenv.flake.nix",
            Source::DevenvNix => "devenv.nix",
            Source::Flake => "flake.nix",
            Source::Direnv => ".envrc",
        }
    }

    /// Whether the environment comes from Nix (and so names /nix/store).
    pub fn is_nix(self) -> bool {
        self != Source::Direnv
    }

    fn program(self) -> &'static str {
        match self {
            Source::DevenvFlake => "devenv",
            Source::DevenvNix | Source::Flake => "nix",
            Source::Direnv => "direnv",
        }
    }

    fn install_hint(self) -> &'static str {
        match self {
            Source::DevenvFlake => "install devenv (https://devenv.sh/getting-started/)",
            Source::DevenvNix | Source::Flake => "install Nix (https://nixos.org/download)",
            Source::Direnv => "install direnv (e.g. `apt install direnv`)",
        }
    }
}

/// The dev shell source of `work_dir`, if it has one.
pub fn detect(work_dir: &Path) -> Option<Source> {
    [Source::DevenvFlake, Source::DevenvNix, Source::Flake, Source::Direnv]
        .into_iter()
        .find(|s| work_dir.join(s.file()).is_file())
}

/// What [`load`] needs to know about the host.
#[derive(Debug, Clone)]
pub struct Request {
    /// The project (a real path).
    pub work_dir: PathBuf,
    /// The project's own state dir, holding the cache.
    pub state_dir: PathBuf,
    /// The environment nix, devenv and direnv run with; its PATH finds them.
    pub host_env: Vec<(OsString, OsString)>,
    /// The host's Nix store, shared read-only at /nix/store when it exists
    /// and the dev shell needs it.
    pub nix_store: PathBuf,
    /// What the user trusted in the project: the Nix files must match it.
    pub trusted: Option<Record>,
    /// The `devshell_files` setting: project files the dev shell reads
    /// besides the Nix files.
    pub devshell_files: Vec<FilePattern>,
}

impl Request {
    /// A request for `work_dir` with this process's environment and the
    /// real Nix store (`$AGENTVM_NIX_STORE` overrides where it is, for tests).
    pub fn for_host(
        work_dir: &Path,
        state_dir: PathBuf,
        trusted: Option<Record>,
        devshell_files: Vec<FilePattern>,
    ) -> Request {
        Request {
            work_dir: work_dir.to_path_buf(),
            state_dir,
            host_env: std::env::vars_os().collect(),
            nix_store: std::env::var_os("AGENTVM_NIX_STORE").map_or_else(|| NIX_STORE.into(), PathBuf::from),
            trusted,
            devshell_files,
        }
    }

    fn env(&self, name: &str) -> Option<&OsString> {
        self.host_env.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// An evaluated dev shell, ready for the guest.
#[derive(Clone, PartialEq, Eq)]
pub struct DevShell {
    pub source: Source,
    /// Guest variables, without PATH.
    pub vars: Vec<(String, String)>,
    /// The dev shell's own PATH entries (guest paths), in order.
    pub path: Vec<String>,
    /// The host's Nix store, to share read-only at /nix/store.
    pub nix_store: Option<PathBuf>,
    /// The Nix result came from the cache.
    pub from_cache: bool,
    /// Things the user should know (printed by the caller).
    pub warnings: Vec<String>,
}

impl std::fmt::Debug for DevShell {
    /// Names only: values may be secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevShell")
            .field("source", &self.source)
            .field("vars", &self.vars.iter().map(|(n, _)| n).collect::<Vec<_>>())
            .field("path", &self.path)
            .field("nix_store", &self.nix_store)
            .field("from_cache", &self.from_cache)
            .finish()
    }
}

/// A dev shell that cannot be used, with what to do about it. Never holds
/// a variable's value (the command's own output is shown as it is).
#[derive(Debug, thiserror::Error)]
pub enum DevshellError {
    #[error("{dir}/{file} needs `{program}`, which is not on PATH: {hint}, or run without --devshell")]
    NoProgram { dir: PathBuf, file: &'static str, program: &'static str, hint: &'static str },
    #[error("cannot start `{command}`: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("the dev shell of {dir} could not be evaluated: `{command}` ended with {status}\n--- its output (last lines) ---\n{output}\n--- to reproduce: cd {dir} && {command}\n{note}fix the error above, or pass --devshell=try to start without the dev shell")]
    Failed { dir: PathBuf, command: String, status: String, output: String, note: String },
    #[error("cannot write the private copy of the dev shell files at {path}: {source}")]
    Copy { path: PathBuf, source: std::io::Error },
    #[error("{dir}/.envrc is blocked: direnv has not been allowed to load it. Review it, then run `direnv allow {dir}` (or start without --devshell)")]
    Blocked { dir: PathBuf },
    #[error("cannot read the output of `{command}` ({source}); to see it: cd {dir} && {command}")]
    Output { dir: PathBuf, command: String, source: OutputError },
    #[error("the dev shell of {dir} is not trusted: {files} {are} new, changed or removed since `agentvm trust` (the guest can write {them}), and --devshell evaluates {them} on this host. Review {them}, then run `agentvm trust {dir}`, or run without --devshell", are = if *count == 1 { "is" } else { "are" }, them = if *count == 1 { "it" } else { "them" })]
    Untrusted { dir: PathBuf, files: String, count: usize },
    #[error("the dev shell files of {dir} changed while `{command}` evaluated them, so its result is not used: review them, then run `agentvm trust {dir}`")]
    ChangedDuringEvaluation { dir: PathBuf, command: String },
    #[error("dev shell: {0}")]
    Trust(#[from] TrustError),
}

/// Why a dev shell command's output cannot be read (the source of
/// [`DevshellError::Output`]).
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("not UTF-8")]
    NotUtf8(#[source] std::string::FromUtf8Error),
    #[error("not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("not direnv's JSON: {0}")]
    NotDirenvJson(#[source] serde_json::Error),
    #[error("no \"variables\" object")]
    NoVariables,
    /// The variable whose value has no closing quote.
    #[error("unterminated value of {0}")]
    UnterminatedValue(String),
    #[error("unterminated array")]
    UnterminatedArray,
}

/// The format of a dev shell command's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `nix print-dev-env --json`.
    NixJson,
    /// `nix print-dev-env` (a bash script), also `devenv print-dev-env`.
    NixBash,
}

/// One cached Nix result: the command's raw output, parsed on every use.
#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    version: u32,
    work_dir: PathBuf,
    key: String,
    command: Vec<String>,
    format: Format,
    output: String,
}

/// Evaluates the dev shell of `req.work_dir` (or takes it from the cache);
/// a Nix evaluation is a step of `progress`. `Ok(None)`: the project has no
/// dev shell file.
pub fn load(req: &Request, progress: &mut dyn Progress) -> Result<Option<DevShell>, DevshellError> {
    let Some(source) = detect(&req.work_dir) else { return Ok(None) };
    let mut warnings = Vec::new();
    // An .envrc too may evaluate the project's Nix files (`use nix`).
    let sources = trusted_sources(req)?;
    let (raw, base_path, from_cache) = if source.is_nix() {
        let (raw, from_cache) = nix_env(req, source, &sources, &mut warnings, progress)?;
        (raw, None, from_cache)
    } else {
        let (raw, base_path) = direnv_env(req, &find_program(req, source)?)?;
        // direnv reads them in the work dir: a result of other files is not used.
        if trust::devshell_sources(&req.work_dir, &req.devshell_files)? != sources {
            return Err(DevshellError::ChangedDuringEvaluation {
                dir: req.work_dir.clone(),
                command: "direnv export json".into(),
            });
        }
        (raw, Some(base_path), false)
    };
    let (vars, path) = guest_vars(raw, &req.work_dir, base_path.as_deref());
    let uses_store = source.is_nix()
        || vars.iter().any(|(_, v)| v.contains("/nix/store/"))
        || path.iter().any(|p| p.starts_with("/nix/store/"));
    let nix_store = (uses_store && req.nix_store.is_dir())
        .then(|| std::fs::canonicalize(&req.nix_store).unwrap_or_else(|_| req.nix_store.clone()));
    if source.is_nix() && nix_store.is_none() {
        warnings.push(format!(
            "dev shell: the host has no Nix store at {}; its /nix/store paths will not exist in the guest",
            req.nix_store.display()
        ));
    }
    Ok(Some(DevShell { source, vars, path, nix_store, from_cache, warnings }))
}

/// The guest environment: the dev shell's variables under `env` (which
/// wins), and PATH as the dev shell's entries, then the guest's default
/// PATH, unless `env` sets PATH itself.
pub fn apply(env: &[(String, String)], shell: &DevShell) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = shell.vars.clone();
    for (name, value) in env {
        match out.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value.clone(),
            None => out.push((name.clone(), value.clone())),
        }
    }
    if !out.iter().any(|(n, _)| n == "PATH") && !shell.path.is_empty() {
        out.push(("PATH".into(), merge_path(&shell.path, agentvm_proto::DEFAULT_PATH)));
    }
    out
}

/// `first` entries, then those of `rest` not already there, `:`-joined.
pub fn merge_path(first: &[String], rest: &str) -> String {
    let mut entries: Vec<&str> = Vec::new();
    for e in first.iter().map(String::as_str).chain(rest.split(':')) {
        if !e.is_empty() && !entries.contains(&e) {
            entries.push(e);
        }
    }
    entries.join(":")
}

/// The program that evaluates `source`, found on the request's PATH.
fn find_program(req: &Request, source: Source) -> Result<PathBuf, DevshellError> {
    let found = req.env("PATH").and_then(|path| tools::find_in_path(source.program(), path));
    found.ok_or(DevshellError::NoProgram {
        dir: req.work_dir.clone(),
        file: source.file(),
        program: source.program(),
        hint: source.install_hint(),
    })
}

/// The Nix command for `source`, without `--json` (the cache key's form).
/// It runs in the private copy of the sources (`private_copy`). The
/// flake is `path:.`: given a bare path inside a git repository, Nix would
/// run git there; `path:` reads the directory itself (and a `path:` URL
/// cannot hold every path, `.` can).
pub fn nix_command(source: Source) -> Vec<String> {
    let mut cmd: Vec<String> = match source {
        Source::DevenvFlake => return vec!["devenv".into(), "print-dev-env".into()],
        _ => ["nix", "--extra-experimental-features", "nix-command flakes", "print-dev-env", "--no-update-lock-file"]
            .map(String::from)
            .to_vec(),
    };
    if source == Source::DevenvNix {
        cmd.push("--impure".into());
    }
    cmd.push("path:.".into());
    cmd
}

/// Writes `sources` into a new private directory in the state dir, which
/// is what Nix evaluates: exactly the bytes that were trusted, and no
/// `.git` (Nix runs git in a flake's repository, and git runs programs
/// that the repository's config names, which the guest can write).
fn private_copy(req: &Request, sources: &Sources) -> Result<tempfile::TempDir, DevshellError> {
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DevshellError::Copy { path, source }
    };
    let state = &req.state_dir;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(state).map_err(fail(state))?;
    let copy = tempfile::Builder::new().prefix("devshell-src.").tempdir_in(state).map_err(fail(state))?;
    for (name, file) in sources {
        // `name` is made of directory entry names below the work dir:
        // relative, without `..`.
        let path = copy.path().join(name);
        let dir = path.parent().expect("below the copy");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(fail(dir))?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(&file.bytes))
            .map_err(fail(&path))?;
    }
    Ok(copy)
}

/// The project's dev shell sources (see [`trust::devshell_sources`]) if
/// each is as the user trusted it.
fn trusted_sources(req: &Request) -> Result<Sources, DevshellError> {
    let sources = trust::devshell_sources(&req.work_dir, &req.devshell_files)?;
    let untrusted = Record::untrusted_devshell_files(req.trusted.as_ref(), &sources);
    if !untrusted.is_empty() {
        return Err(DevshellError::Untrusted {
            dir: req.work_dir.clone(),
            files: name_list(&untrusted),
            count: untrusted.len(),
        });
    }
    Ok(sources)
}

/// Up to ten names, then how many more.
fn name_list(names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut list = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        list.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    list
}

/// The cache key: a hash of the command and of each source's name and hash.
pub fn cache_key(sources: &Sources, command: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(format!("agentvm-devshell-v{CACHE_VERSION}\0"));
    for arg in command {
        h.update(arg.as_bytes());
        h.update(b"\0");
    }
    for (name, file) in sources {
        h.update(format!("{name}\0{}\0", file.hash));
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The Nix dev shell's variables, from the cache or a fresh evaluation (a
/// cached result needs no nix on PATH).
fn nix_env(
    req: &Request,
    source: Source,
    sources: &Sources,
    warnings: &mut Vec<String>,
    progress: &mut dyn Progress,
) -> Result<(Vec<(String, String)>, bool), DevshellError> {
    let command = nix_command(source);
    let key = cache_key(sources, &command);
    let cache_path = req.state_dir.join(CACHE_FILE);
    if let Some(entry) = read_cache(&cache_path, &req.work_dir, &key) {
        if let Ok(raw) = parse_nix(entry.format, &entry.output) {
            return Ok((raw, true));
        }
    }
    let program = find_program(req, source)?;
    let display = shell_words(&command);
    let files = match req.devshell_files.is_empty() {
        true => "a *.nix file, flake.lock, devenv.yaml or devenv.lock",
        false => "a *.nix file, flake.lock, devenv.yaml, devenv.lock or a devshell_files file",
    };
    progress.step(&format!("evaluating the dev shell: {display} (cached until {files} changes)"));
    let evaluated = evaluate_nix(req, source, &program, &command, sources);
    match &evaluated {
        Ok(_) => progress.done(),
        Err(_) => progress.fail(),
    }
    let (format, output) = evaluated?;
    let raw = parse_nix(format, &output).map_err(|source| DevshellError::Output {
        dir: req.work_dir.clone(),
        command: display,
        source,
    })?;
    let entry = CacheEntry { version: CACHE_VERSION, work_dir: req.work_dir.clone(), key, command, format, output };
    if let Err(e) = write_cache(&cache_path, &entry) {
        warnings.push(format!(
            "dev shell: cannot write the cache {}: {e}; it is evaluated again next time",
            cache_path.display()
        ));
    }
    Ok((raw, false))
}

/// Runs the Nix command in a private copy of the `sources`; its output
/// with the copy's paths as the project's.
fn evaluate_nix(
    req: &Request,
    source: Source,
    program: &Path,
    command: &[String],
    sources: &Sources,
) -> Result<(Format, String), DevshellError> {
    let copy = private_copy(req, sources)?;
    let (format, output) = run_nix(req, source, program, command, copy.path(), sources)?;
    let output = output.replace(&copy.path().display().to_string(), &req.work_dir.display().to_string());
    Ok((format, output))
}

/// Runs the Nix command in the private `copy` of the `sources`: `nix ...
/// --json` first, without `--json` if this nix does not know the flag;
/// devenv always prints bash.
fn run_nix(
    req: &Request,
    source: Source,
    program: &Path,
    command: &[String],
    copy: &Path,
    sources: &Sources,
) -> Result<(Format, String), DevshellError> {
    let run = |argv: &[String]| {
        run(req, program, &argv[1..], copy, argv).map_err(|e| match e {
            DevshellError::Failed { dir, command, status, output, .. } => {
                let note = copy_note(req, &missing_from_copy(&output, copy, req, sources));
                DevshellError::Failed { dir, command, status, output, note }
            }
            e => e,
        })
    };
    if source == Source::DevenvFlake {
        return Ok((Format::NixBash, run(command)?));
    }
    let mut with_json = command.to_vec();
    with_json.insert(with_json.len() - 1, "--json".into());
    match run(&with_json) {
        Ok(out) => Ok((Format::NixJson, out)),
        Err(DevshellError::Failed { output, .. }) if json_unsupported(&output) => Ok((Format::NixBash, run(command)?)),
        Err(e) => Err(e),
    }
}

/// What a failed Nix evaluation's error adds: what Nix could see, and
/// for each of the project's `missing` files, how to let it see them.
fn copy_note(req: &Request, missing: &[String]) -> String {
    let mut note = String::from(
        "agentvm evaluated a private copy of the trusted files only (every *.nix file, flake.lock, devenv.yaml, \
         devenv.lock, the devshell_files; no .git): a dev shell that reads other files of the project does not find them\n",
    );
    if missing.is_empty() {
        return note;
    }
    let entries: Vec<String> = missing
        .iter()
        .map(|rel| if req.work_dir.join(rel).is_dir() { format!("\"{rel}/*\"") } else { format!("\"{rel}\"") })
        .collect();
    note.push_str(&format!(
        "the dev shell reads {} of the project, which {} not in that copy: if it needs {}, add {} to devshell_files \
         (devshell_files = [{}] in ~/.config/agentvm/config.toml or the project's .agentvm.toml), then run `agentvm trust {}`\n",
        name_list(missing),
        if missing.len() == 1 { "is" } else { "are" },
        if missing.len() == 1 { "it" } else { "them" },
        if missing.len() == 1 { "it" } else { "them" },
        entries.join(", "),
        req.work_dir.display()
    ));
    note
}

/// The project files Nix's `output` says it did not find in the private
/// `copy` of the `sources`, as paths in the project, if the project has
/// them. Nix names such a file by its place in the copy (`<copy>/rel`) or
/// in the store path it copied it to (`/nix/store/<hash>-source/rel`), on
/// a line that says it does not exist (`getting status of '...': No such
/// file or directory`, `path '...' does not exist`).
fn missing_from_copy(output: &str, copy: &Path, req: &Request, sources: &Sources) -> Vec<String> {
    let copy = copy.display().to_string();
    let mut found: Vec<String> = Vec::new();
    let lines = output.lines().filter(|l| l.contains("No such file or directory") || l.contains("does not exist"));
    for line in lines {
        let in_copy = line.match_indices(&copy).map(|(at, _)| &line[at + copy.len()..]);
        let in_store = line.match_indices("/nix/store/").filter_map(|(at, m)| store_source_rest(&line[at + m.len()..]));
        for rest in in_copy.chain(in_store) {
            let Some(rest) = rest.strip_prefix('»').unwrap_or(rest).strip_prefix('/') else { continue };
            let rel = &rest[..rest.find(['\'', '"', '`', '»']).unwrap_or(rest.len())];
            let rel = rel.trim_end();
            let in_project = FilePattern::try_from(rel.to_string()).is_ok()
                && !rel.contains('*')
                && !sources.contains_key(rel)
                && std::fs::symlink_metadata(req.work_dir.join(rel)).is_ok();
            if in_project && !found.iter().any(|f| f == rel) {
                found.push(rel.to_string());
            }
        }
    }
    found
}

/// After `/nix/store/`: the rest after `<hash>-source`, the name Nix
/// gives a flake's source tree in the store.
fn store_source_rest(after_store: &str) -> Option<&str> {
    const HASH_LEN: usize = 32;
    let hash = after_store.get(..HASH_LEN)?;
    if !hash.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        return None;
    }
    after_store[HASH_LEN..].strip_prefix("-source")
}

/// Whether nix's error output says it does not know `--json`.
pub fn json_unsupported(stderr: &str) -> bool {
    (stderr.contains("unrecognised flag") || stderr.contains("unrecognized flag")) && stderr.contains("--json")
}

/// Runs `program args` in `cwd` with the request's environment; its stdout,
/// or [`DevshellError::Failed`] with its output.
fn run(req: &Request, program: &Path, args: &[String], cwd: &Path, shown: &[String]) -> Result<String, DevshellError> {
    run_with_env(program, args, cwd, &req.host_env, shown, &req.work_dir)
}

fn run_with_env(
    program: &Path,
    args: &[String],
    cwd: &Path,
    env: &[(OsString, OsString)],
    shown: &[String],
    dir: &Path,
) -> Result<String, DevshellError> {
    let command = shell_words(shown);
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("PWD", cwd)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| DevshellError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(DevshellError::Failed {
            dir: dir.to_path_buf(),
            command,
            status: crate::vm::process::describe(out.status),
            output: crate::vm::process::tail_lines(
                strip_ansi(&String::from_utf8_lossy(&out.stderr)).as_bytes(),
                ERROR_LINES,
            ),
            note: String::new(),
        });
    }
    String::from_utf8(out.stdout).map_err(|e| DevshellError::Output {
        dir: dir.to_path_buf(),
        command,
        source: OutputError::NotUtf8(e),
    })
}

/// direnv's environment for the work dir, and the PATH it started from.
///
/// If this process runs in a shell where direnv has loaded something
/// already, its changes are first undone (direnv unloads when run where
/// there is no `.envrc`), so the result holds everything the `.envrc` sets
/// and its PATH additions can be told apart from the host's PATH.
fn direnv_env(req: &Request, program: &Path) -> Result<(Vec<(String, String)>, String), DevshellError> {
    let mut env: BTreeMap<OsString, OsString> = req.host_env.iter().cloned().collect();
    let shown: Vec<String> = ["direnv", "export", "json"].map(String::from).to_vec();
    let args = &shown[1..];
    if env.contains_key(&OsString::from("DIRENV_DIFF")) {
        let flat: Vec<(OsString, OsString)> = env.clone().into_iter().collect();
        let undo = run_with_env(program, args, Path::new("/"), &flat, &shown, &req.work_dir)?;
        let undo = parse_direnv_json(&undo).map_err(|source| DevshellError::Output {
            dir: req.work_dir.clone(),
            command: shell_words(&shown),
            source,
        })?;
        for (name, value) in undo {
            match value {
                Some(v) => env.insert(name.into(), v.into()),
                None => env.remove(&OsString::from(name)),
            };
        }
    }
    for name in ["DIRENV_DIR", "DIRENV_FILE", "DIRENV_DIFF", "DIRENV_WATCHES"] {
        env.remove(&OsString::from(name));
    }
    let base_path = env.get(&OsString::from("PATH")).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let flat: Vec<(OsString, OsString)> = env.into_iter().collect();
    let out = run_with_env(program, args, &req.work_dir, &flat, &shown, &req.work_dir).map_err(|e| match e {
        DevshellError::Failed { ref output, .. } if output.contains("is blocked") => {
            DevshellError::Blocked { dir: req.work_dir.clone() }
        }
        e => e,
    })?;
    let diff = parse_direnv_json(&out).map_err(|source| DevshellError::Output {
        dir: req.work_dir.clone(),
        command: shell_words(&shown),
        source,
    })?;
    // A null is a variable the .envrc unsets: the dev shell just does not set it.
    let set = diff.into_iter().filter_map(|(n, v)| v.map(|v| (n, v))).collect();
    Ok((set, base_path))
}

/// The cache entry at `path` if it is for this work dir and key.
fn read_cache(path: &Path, work_dir: &Path, key: &str) -> Option<CacheEntry> {
    let entry: CacheEntry = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (entry.version == CACHE_VERSION && entry.work_dir == work_dir && entry.key == key).then_some(entry)
}

/// Writes the cache atomically: a private temporary file, then a rename.
fn write_cache(path: &Path, entry: &CacheEntry) -> std::io::Result<()> {
    let dir = path.parent().expect("cache file has a dir");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let tmp = dir.join(format!(".{CACHE_FILE}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec(entry).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The exported string variables of a Nix dev shell output.
pub fn parse_nix(format: Format, output: &str) -> Result<Vec<(String, String)>, OutputError> {
    match format {
        Format::NixJson => parse_nix_json(output),
        Format::NixBash => parse_nix_bash(output),
    }
}

/// `nix print-dev-env --json`: `{"variables": {NAME: {"type": "exported",
/// "value": "..."}, ...}, "bashFunctions": ...}`; only `exported` ones count.
pub fn parse_nix_json(output: &str) -> Result<Vec<(String, String)>, OutputError> {
    let doc: serde_json::Value = serde_json::from_str(output).map_err(OutputError::NotJson)?;
    let vars = doc.get("variables").and_then(|v| v.as_object()).ok_or(OutputError::NoVariables)?;
    Ok(vars
        .iter()
        .filter(|(_, v)| v.get("type").and_then(|t| t.as_str()) == Some("exported"))
        .filter_map(|(name, v)| Some((name.clone(), v.get("value")?.as_str()?.to_string())))
        .collect())
}

/// `nix print-dev-env` without `--json`: a bash script in which a variable
/// is `NAME='value'` (single-quoted, `'\''` for a quote) and, if exported,
/// followed by `export NAME`. Arrays (`declare -a`), functions and other
/// statements are skipped.
pub fn parse_nix_bash(output: &str) -> Result<Vec<(String, String)>, OutputError> {
    let mut values: Vec<(String, String)> = Vec::new();
    let mut exported: Vec<String> = Vec::new();
    let mut rest = output;
    let mut in_function = false;
    while !rest.is_empty() {
        let line_end = rest.find('\n').unwrap_or(rest.len());
        let line = &rest[..line_end];
        if in_function {
            in_function = line != "}";
        } else if let Some(name) = line.strip_prefix("export ").filter(|n| envvars::valid_name(n.trim())) {
            exported.push(name.trim().to_string());
        } else if let Some((name, quoted)) = line.split_once("='").filter(|(n, _)| envvars::valid_name(n)) {
            let start = line.len() - quoted.len();
            let (value, used) =
                single_quoted(&rest[start..]).ok_or_else(|| OutputError::UnterminatedValue(name.to_string()))?;
            match values.iter_mut().find(|(n, _)| n == name) {
                Some(slot) => slot.1 = value,
                None => values.push((name.to_string(), value)),
            }
            rest = &rest[start + used..];
            rest = rest.strip_prefix('\n').unwrap_or(rest);
            continue;
        } else if line.starts_with("declare -") && line.contains("=(") {
            let start = line.find("=(").expect("checked") + 2;
            let used = skip_array(&rest[start..]).ok_or(OutputError::UnterminatedArray)?;
            rest = &rest[start + used..];
            rest = rest.strip_prefix('\n').unwrap_or(rest);
            continue;
        } else if line.ends_with(" ()") {
            in_function = true;
        }
        rest = rest.get(line_end + 1..).unwrap_or("");
    }
    Ok(values.into_iter().filter(|(n, _)| exported.contains(n)).collect())
}

/// Reads the rest of a single-quoted bash word whose opening quote was just
/// consumed: `abc'` or `it'\''s'`. Returns the value and the bytes used.
fn single_quoted(s: &str) -> Option<(String, usize)> {
    let mut value = String::new();
    let mut i = 0;
    loop {
        let close = s[i..].find('\'')? + i;
        value.push_str(&s[i..close]);
        if s[close..].starts_with("'\\''") {
            value.push('\'');
            i = close + 4;
        } else {
            return Some((value, close + 1));
        }
    }
}

/// Skips the body of `declare -a NAME=(...)` after the `(`; bytes used.
fn skip_array(s: &str) -> Option<usize> {
    let mut i = 0;
    let bytes = s.as_bytes();
    while i < bytes.len() {
        match bytes[i] {
            b')' => return Some(i + 1),
            b'\'' => i += single_quoted(&s[i + 1..])?.1 + 1,
            b'"' => i += s[i + 1..].find('"')? + 2,
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

/// `direnv export json`: `{NAME: "value" | null}` (null: unset); empty
/// output means no change.
pub fn parse_direnv_json(output: &str) -> Result<Vec<(String, Option<String>)>, OutputError> {
    if output.trim().is_empty() {
        return Ok(Vec::new());
    }
    let map: BTreeMap<String, Option<String>> = serde_json::from_str(output).map_err(OutputError::NotDirenvJson)?;
    Ok(map.into_iter().collect())
}

/// Turns a dev shell's variables into guest ones: drops the shell's and
/// the host's own (see [`DROPPED`]), invalid names, NUL bytes and host
/// temp dirs, rewrites paths under `work_dir` to `/work`, and splits off
/// PATH as the entries the dev shell adds: all of them, or with
/// `base_path` (the PATH it started from), those not already in it.
pub fn guest_vars(
    raw: Vec<(String, String)>,
    work_dir: &Path,
    base_path: Option<&str>,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut vars = Vec::new();
    let mut path = Vec::new();
    let host_work = work_dir.to_string_lossy();
    for (name, value) in raw {
        if DROPPED.contains(&name.as_str())
            || name.starts_with("BASH_")
            || envvars::check_guest_name(&name).is_err()
            || value.contains('\0')
            || value == NO_CERT_FILE
        {
            continue;
        }
        if name == "PATH" {
            let base: Vec<&str> = base_path.map(|b| b.split(':').collect()).unwrap_or_default();
            for entry in value.split(':').filter(|e| !e.is_empty() && *e != NO_PATH && !base.contains(e)) {
                let entry = to_guest_path(entry, &host_work);
                if !path.contains(&entry) {
                    path.push(entry);
                }
            }
            continue;
        }
        let value = value.split(':').map(|p| to_guest_path(p, &host_work)).collect::<Vec<_>>().join(":");
        if TEMP_VARS.contains(&name.as_str()) && !is_in_guest_work(&value) {
            continue;
        }
        match name.as_str() {
            // Where direnv's environment came from, in guest terms.
            "DIRENV_DIR" => vars.push((name, format!("-{GUEST_WORK}"))),
            _ => vars.push((name, value)),
        }
    }
    (vars, path)
}

/// `p` with the host's work dir prefix replaced by `/work`.
fn to_guest_path(p: &str, host_work: &str) -> String {
    match p.strip_prefix(host_work) {
        Some("") => GUEST_WORK.to_string(),
        Some(rest) if rest.starts_with('/') => format!("{GUEST_WORK}{rest}"),
        _ => p.to_string(),
    }
}

/// A command line as a user would type it in a POSIX shell.
pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `s` without ANSI escape sequences (direnv colours its errors).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::NullProgress;
    use std::os::unix::fs::PermissionsExt;

    fn load(req: &Request) -> Result<Option<DevShell>, DevshellError> {
        super::load(req, &mut NullProgress)
    }

    fn s(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    /// A project dir, a state dir and a bin dir with a stand-in program.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let f = Fixture { dir: tempfile::tempdir().unwrap() };
            for d in ["p", "state", "bin"] {
                std::fs::create_dir(f.dir.path().join(d)).unwrap();
            }
            // The stand-ins' PATH is this dir alone, so a real nix or
            // direnv on the host is never run; they need only cat.
            std::os::unix::fs::symlink("/bin/cat", f.dir.path().join("bin/cat")).unwrap();
            f
        }
        fn work(&self) -> PathBuf {
            self.dir.path().join("p").canonicalize().unwrap()
        }
        fn file(&self, name: &str, text: &str) {
            std::fs::write(self.work().join(name), text).unwrap();
        }
        /// A stand-in `name` that logs its arguments and runs `script`.
        fn program(&self, name: &str, script: &str) {
            let p = self.dir.path().join("bin").join(name);
            let log = self.dir.path().join("calls.log");
            std::fs::write(&p, format!("#!/bin/sh\necho \"$*\" >> '{}'\n{script}\n", log.display())).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        fn calls(&self) -> Vec<String> {
            std::fs::read_to_string(self.dir.path().join("calls.log"))
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect()
        }
        /// A request that trusts the dev shell files as they are now.
        fn request(&self) -> Request {
            Request { trusted: Some(self.trust_now()), ..self.untrusted_request() }
        }
        fn untrusted_request(&self) -> Request {
            let path = self.dir.path().join("bin");
            Request {
                work_dir: self.work(),
                state_dir: self.dir.path().join("state"),
                host_env: vec![("PATH".into(), path.into())],
                nix_store: self.dir.path().join("no-store"),
                trusted: None,
                devshell_files: Vec::new(),
            }
        }
        /// What `agentvm trust` would record now.
        fn trust_now(&self) -> Record {
            self.trust_now_with(&[])
        }
        /// What `agentvm trust` would record now with these `devshell_files`.
        fn trust_now_with(&self, files: &[FilePattern]) -> Record {
            let sources = trust::devshell_sources(&self.work(), files).unwrap();
            Record::new(&self.work(), sources.into_iter().map(|(name, file)| (name, file.hash)))
        }
    }

    const NIX_JSON: &str = r#"{"bashFunctions":{"f":"echo"},"variables":{
        "GREETING":{"type":"exported","value":"it's \"quoted\"\nand multi-line"},
        "PATH":{"type":"exported","value":"/nix/store/aaa-hello/bin:/nix/store/bbb-coreutils/bin"},
        "HOME":{"type":"exported","value":"/homeless-shelter"},
        "TMPDIR":{"type":"exported","value":"/build"},
        "NIX_SSL_CERT_FILE":{"type":"exported","value":"/no-cert-file.crt"},
        "BASHOPTS":{"type":"var","value":"checkwinsize"},
        "notExported":{"type":"var","value":"x"},
        "arr":{"type":"array","value":["a","b"]}}}"#;

    #[test]
    fn nix_json_keeps_exported_strings_only() {
        let mut v = parse_nix_json(NIX_JSON).unwrap();
        v.sort();
        let names: Vec<&str> = v.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["GREETING", "HOME", "NIX_SSL_CERT_FILE", "PATH", "TMPDIR"]);
        assert_eq!(v[0].1, "it's \"quoted\"\nand multi-line");
        assert!(parse_nix_json("[]").is_err());
        assert!(parse_nix_json("no").is_err());
    }

    #[test]
    fn nix_bash_keeps_exported_assignments_and_skips_arrays_and_functions() {
        let script = "unset shellHook\nPATH=${PATH:-}\nnix_saved_PATH=\"$PATH\"\n\
            GREETING='it'\\''s\nmulti-line'\nexport GREETING\n\
            LOCAL='not exported'\n\
            declare -a arr=('a)' 'b'\\''c' )\n\
            PATH='/nix/store/aaa-hello/bin:/nix/store/bbb/bin'\nexport PATH\n\
            genericBuild ()\n{\n    FAKE='inside a function'\n    export FAKE\n}\n\
            AFTER='1'\nexport AFTER\n\
            PATH=\"$PATH${nix_saved_PATH:+:$nix_saved_PATH}\"\n\
            export NIX_BUILD_TOP=\"$(mktemp -d -t nix-shell.XXXXXX)\"\neval \"${shellHook:-}\"\n";
        let v = parse_nix_bash(script).unwrap();
        assert_eq!(
            v,
            s(&[
                ("GREETING", "it's\nmulti-line"),
                ("PATH", "/nix/store/aaa-hello/bin:/nix/store/bbb/bin"),
                ("AFTER", "1")
            ])
        );
        assert!(parse_nix_bash("A='open\nexport A\n").is_err());
    }

    #[test]
    fn direnv_json_has_values_and_unsets() {
        let v = parse_direnv_json(r#"{"A":"1","B":null}"#).unwrap();
        assert_eq!(v, [("A".to_string(), Some("1".to_string())), ("B".to_string(), None)]);
        assert!(parse_direnv_json("\n").unwrap().is_empty());
        assert!(parse_direnv_json("{").is_err());
    }

    #[test]
    fn guest_vars_drop_host_and_shell_vars_and_rewrite_the_work_dir() {
        let raw = s(&[
            ("GREETING", "hi"),
            ("HOME", "/homeless-shelter"),
            ("PWD", "/p"),
            ("SHLVL", "1"),
            ("BASH_VERSINFO", "5"),
            ("TMPDIR", "/build"),
            ("TMP", "/p/.tmp"),
            ("NIX_SSL_CERT_FILE", "/no-cert-file.crt"),
            ("DIRENV_DIFF", "eJx"),
            ("DIRENV_DIR", "-/p"),
            ("DIRENV_FILE", "/p/.envrc"),
            ("PROJECT_ROOT", "/p"),
            ("DATA", "/p/data:/elsewhere:/pp"),
            ("bad-name", "x"),
            ("PATH", "/p/bin:/nix/store/x/bin:/usr/bin:/p/bin:/path-not-set"),
        ]);
        let (vars, path) = guest_vars(raw.clone(), Path::new("/p"), None);
        assert_eq!(
            vars,
            s(&[
                ("GREETING", "hi"),
                ("TMP", "/work/.tmp"),
                ("DIRENV_DIR", "-/work"),
                ("DIRENV_FILE", "/work/.envrc"),
                ("PROJECT_ROOT", "/work"),
                ("DATA", "/work/data:/elsewhere:/pp"),
            ])
        );
        assert_eq!(path, ["/work/bin", "/nix/store/x/bin", "/usr/bin"]);
        // With the PATH direnv started from, only the added entries count.
        let (_, path) = guest_vars(raw, Path::new("/p"), Some("/usr/local/bin:/usr/bin"));
        assert_eq!(path, ["/work/bin", "/nix/store/x/bin"]);
    }

    #[test]
    fn path_puts_dev_shell_first_then_guest_default_and_flags_win() {
        let shell = DevShell {
            source: Source::Flake,
            vars: s(&[("GREETING", "shell"), ("ONLY_SHELL", "1")]),
            path: vec!["/nix/store/a/bin".into(), "/usr/bin".into()],
            nix_store: None,
            from_cache: false,
            warnings: Vec::new(),
        };
        let env = apply(&s(&[("GREETING", "flag"), ("TERM", "xterm")]), &shell);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("GREETING"), Some("flag"));
        assert_eq!(get("ONLY_SHELL"), Some("1"));
        assert_eq!(get("PATH"), Some("/nix/store/a/bin:/usr/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/sbin:/bin"));
        let env = apply(&s(&[("PATH", "/mine")]), &shell);
        assert_eq!(env.iter().filter(|(n, _)| n == "PATH").map(|(_, v)| v.as_str()).collect::<Vec<_>>(), ["/mine"]);
        assert!(!format!("{shell:?}").contains("flag") && !format!("{shell:?}").contains("shell\""));
    }

    #[test]
    fn detect_prefers_devenv_then_flake_then_envrc() {
        let f = Fixture::new();
        assert_eq!(detect(&f.work()), None);
        f.file(".envrc", "");
        assert_eq!(detect(&f.work()), Some(Source::Direnv));
        f.file("flake.nix", "{}");
        assert_eq!(detect(&f.work()), Some(Source::Flake));
        f.file("devenv.nix", "{}");
        assert_eq!(detect(&f.work()), Some(Source::DevenvNix));
        assert!(nix_command(Source::DevenvNix).contains(&"--impure".to_string()));
        assert!(!nix_command(Source::Flake).contains(&"--impure".to_string()));
        f.file(".devenv.flake.nix", "{}");
        assert_eq!(detect(&f.work()), Some(Source::DevenvFlake));
        assert_eq!(nix_command(Source::DevenvFlake), ["devenv", "print-dev-env"]);
    }

    #[test]
    fn cache_key_changes_with_each_key_file_and_the_command() {
        let f = Fixture::new();
        let cmd = nix_command(Source::Flake);
        let key = |cmd: &[String]| cache_key(&trust::devshell_sources(&f.work(), &[]).unwrap(), cmd);
        let k0 = key(&cmd);
        assert_eq!(k0, key(&cmd), "stable");
        let mut seen = vec![k0];
        std::fs::create_dir(f.work().join("nix")).unwrap();
        for name in KEY_FILES.iter().chain(&["nix/shell.nix"]) {
            f.file(name, "a");
            let k = key(&cmd);
            assert!(!seen.contains(&k), "{name} changes the key");
            seen.push(k);
        }
        f.file("flake.lock", "b");
        let k = key(&cmd);
        assert!(!seen.contains(&k), "new flake.lock contents change the key");
        f.file("README", "unrelated");
        assert_eq!(key(&cmd), k, "other files do not");
        assert_ne!(key(&nix_command(Source::DevenvNix)), k);
    }

    fn fake_nix_json(f: &Fixture) {
        f.program("nix", &format!("cat <<'JSON'\n{NIX_JSON}\nJSON"));
    }

    #[test]
    fn nix_result_is_cached_reused_and_invalidated_by_flake_lock() {
        let f = Fixture::new();
        f.file("flake.nix", "{ outputs = _: {}; }");
        fake_nix_json(&f);
        let shell = load(&f.request()).unwrap().unwrap();
        assert!(!shell.from_cache);
        assert_eq!(shell.vars, s(&[("GREETING", "it's \"quoted\"\nand multi-line")]));
        assert_eq!(shell.path, ["/nix/store/aaa-hello/bin", "/nix/store/bbb-coreutils/bin"]);
        let calls = f.calls();
        assert_eq!(calls.len(), 1);
        assert!(calls[0].contains("print-dev-env --no-update-lock-file --json path:."), "{calls:?}");
        let cache = f.dir.path().join("state").join(CACHE_FILE);
        let mode = cache.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let again = load(&f.request()).unwrap().unwrap();
        assert!(again.from_cache);
        assert_eq!((again.vars, again.path), (shell.vars.clone(), shell.path.clone()));
        assert_eq!(f.calls().len(), 1, "reused, not run again");

        // A cached result needs no nix.
        std::fs::remove_file(f.dir.path().join("bin/nix")).unwrap();
        assert!(load(&f.request()).unwrap().unwrap().from_cache);
        fake_nix_json(&f);

        f.file("flake.lock", "{\"version\": 7}");
        let third = load(&f.request()).unwrap().unwrap();
        assert!(!third.from_cache);
        assert_eq!(f.calls().len(), 2, "flake.lock changed: evaluated again");
    }

    /// Remembers the steps it is told of, and how each ended.
    #[derive(Default)]
    struct Steps(Vec<String>);

    impl Progress for Steps {
        fn step(&mut self, name: &str) {
            self.0.push(name.to_string());
        }
        fn done(&mut self) {
            self.0.push("done".into());
        }
        fn fail(&mut self) {
            self.0.push("failed".into());
        }
    }

    #[test]
    fn a_nix_evaluation_is_a_progress_step_and_a_cache_hit_is_none() {
        let f = Fixture::new();
        f.file("flake.nix", "{ outputs = _: {}; }");
        fake_nix_json(&f);
        let mut steps = Steps::default();
        super::load(&f.request(), &mut steps).unwrap().unwrap();
        assert_eq!(steps.0.len(), 2, "{:?}", steps.0);
        assert!(steps.0[0].starts_with("evaluating the dev shell: nix "), "{:?}", steps.0);
        assert!(steps.0[0].ends_with("(cached until a *.nix file, flake.lock, devenv.yaml or devenv.lock changes)"));
        assert_eq!(steps.0[1], "done");
        let mut again = Steps::default();
        super::load(&f.request(), &mut again).unwrap().unwrap();
        assert!(again.0.is_empty(), "{:?}", again.0);
    }

    #[test]
    fn cache_is_not_taken_from_another_project() {
        let a = Fixture::new();
        a.file("flake.nix", "{}");
        fake_nix_json(&a);
        load(&a.request()).unwrap().unwrap();
        // Same key files, same state dir, other work dir: not reused.
        let b = Fixture::new();
        b.file("flake.nix", "{}");
        b.program("nix", "exit 3");
        let req = Request { state_dir: a.dir.path().join("state"), ..b.request() };
        assert!(matches!(load(&req), Err(DevshellError::Failed { .. })));
    }

    #[test]
    fn failing_nix_shows_its_output_and_the_command_and_writes_no_cache() {
        let f = Fixture::new();
        f.file("flake.nix", "{");
        f.program("nix", "echo 'error: syntax error, unexpected end of file' >&2; exit 1");
        let e = load(&f.request()).unwrap_err().to_string();
        assert!(e.contains("error: syntax error, unexpected end of file"), "{e}");
        assert!(e.contains(&format!("cd {} && nix", f.work().display())), "{e}");
        assert!(e.contains("print-dev-env") && e.contains("--devshell=try"), "{e}");
        assert!(e.contains("private copy of the trusted files only"), "what nix could not see is explained: {e}");
        assert!(!f.dir.path().join("state").join(CACHE_FILE).exists());
        // Output that is not the expected format is an error too.
        f.program("nix", "echo garbage");
        let e = load(&f.request()).unwrap_err().to_string();
        assert!(e.contains("cannot read the output") && e.contains("print-dev-env"), "{e}");
        assert!(!f.dir.path().join("state").join(CACHE_FILE).exists());
    }

    #[test]
    fn old_nix_without_json_falls_back_to_the_bash_output() {
        let f = Fixture::new();
        f.file("flake.nix", "{}");
        f.program(
            "nix",
            "case \"$*\" in *--json*) echo \"error: unrecognised flag '--json'\" >&2; exit 1;; esac\n\
             printf \"A='1'\\nexport A\\nB='2'\\n\"",
        );
        let shell = load(&f.request()).unwrap().unwrap();
        assert_eq!(shell.vars, s(&[("A", "1")]));
        assert_eq!(f.calls().len(), 2);
        assert!(json_unsupported("error: unrecognised flag '--json'"));
        assert!(!json_unsupported("error: flake has no devShell"));
    }

    #[test]
    fn missing_program_names_the_file_and_how_to_install() {
        let f = Fixture::new();
        f.file("flake.nix", "{}");
        let e = load(&f.request()).unwrap_err().to_string();
        assert!(e.contains("flake.nix") && e.contains("install Nix"), "{e}");
        assert!(load(&Request { work_dir: f.dir.path().join("bin"), ..f.request() }).unwrap().is_none());
    }

    #[test]
    fn nix_store_is_shared_only_when_the_host_has_one() {
        let f = Fixture::new();
        f.file("flake.nix", "{}");
        fake_nix_json(&f);
        let shell = load(&f.request()).unwrap().unwrap();
        assert_eq!(shell.nix_store, None);
        assert!(shell.warnings.iter().any(|w| w.contains("no Nix store")), "{:?}", shell.warnings);
        let store = f.dir.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let shell = load(&Request { nix_store: store.clone(), ..f.request() }).unwrap().unwrap();
        assert_eq!(shell.nix_store, Some(store.canonicalize().unwrap()));
    }

    #[test]
    fn shell_words_quote_what_a_shell_would_split() {
        let argv: Vec<String> = ["nix", "--x", "nix-command flakes", "it's", "/a/b"].map(String::from).to_vec();
        assert_eq!(shell_words(&argv), "nix --x 'nix-command flakes' 'it'\\''s' /a/b");
        assert_eq!(strip_ansi("\u{1b}[31mdirenv: error\u{1b}[0m x"), "direnv: error x");
        let names: Vec<String> = (0..12).map(|i| format!("f{i}.nix")).collect();
        assert_eq!(name_list(&names[..2]), "f0.nix, f1.nix");
        assert!(name_list(&names).ends_with("f9.nix and 2 more"), "{}", name_list(&names));
    }

    #[test]
    fn untrusted_or_changed_nix_files_are_refused_before_nix_runs_and_the_cache_is_not_used() {
        let f = Fixture::new();
        f.file("flake.nix", "{ outputs = _: {}; }");
        fake_nix_json(&f);
        let e = load(&f.untrusted_request()).unwrap_err().to_string();
        assert!(
            e.contains("flake.nix is new, changed or removed")
                && e.contains(&format!("agentvm trust {}", f.work().display())),
            "{e}"
        );
        assert!(f.calls().is_empty(), "nix did not run");

        // Trusted: evaluated and cached. Then the guest changes flake.lock.
        let trusted = f.trust_now();
        let req = || Request { trusted: Some(trusted.clone()), ..f.untrusted_request() };
        assert!(!load(&req()).unwrap().unwrap().from_cache);
        assert!(load(&req()).unwrap().unwrap().from_cache);
        f.file("flake.lock", "{\"nodes\": {}}");
        let e = load(&req()).unwrap_err().to_string();
        assert!(e.contains("flake.lock is new, changed or removed"), "{e}");
        // Back to the trusted content: the cached result is good again.
        std::fs::remove_file(f.work().join("flake.lock")).unwrap();
        assert!(load(&req()).unwrap().unwrap().from_cache);
    }

    #[test]
    fn nix_evaluates_a_private_copy_of_the_trusted_files_and_its_paths_become_project_paths() {
        let f = Fixture::new();
        f.file("flake.nix", "{ outputs = _: import ./nix/shell.nix; }");
        f.file("flake.lock", "{}");
        f.file("README", "not a source");
        for dir in ["nix", ".git"] {
            std::fs::create_dir(f.work().join(dir)).unwrap();
        }
        f.file("nix/shell.nix", "{ }");
        f.file(".git/config", "[core]\n\tfsmonitor = ./evil.sh\n");
        let seen = f.dir.path().join("seen");
        // The stand-in lists where it runs and what is there, and gives a
        // variable naming a path in it; then the guest swaps flake.nix.
        f.program(
            "nix",
            &format!(
                "echo \"$PWD\" > '{seen}'; /usr/bin/find . | /usr/bin/sort >> '{seen}'; /bin/cat flake.nix >> '{seen}'\n\
                 echo '{{ evil }}' > '{work}/flake.nix'\n\
                 printf '{{\"variables\":{{\"ROOT\":{{\"type\":\"exported\",\"value\":\"%s/sub\"}}}}}}' \"$PWD\"",
                seen = seen.display(),
                work = f.work().display()
            ),
        );
        let shell = load(&f.request()).unwrap().unwrap();
        assert_eq!(shell.vars, s(&[("ROOT", "/work/sub")]));
        let seen = std::fs::read_to_string(seen).unwrap();
        let mut lines = seen.lines();
        let copy = PathBuf::from(lines.next().unwrap());
        assert!(
            copy.starts_with(f.dir.path().join("state"))
                && copy.file_name().unwrap().to_str().unwrap().starts_with("devshell-src."),
            "{seen}"
        );
        assert_eq!(
            lines.collect::<Vec<_>>(),
            [
                ".",
                "./flake.lock",
                "./flake.nix",
                "./nix",
                "./nix/shell.nix",
                "{ outputs = _: import ./nix/shell.nix; }"
            ]
        );
        assert!(f.calls()[0].ends_with(" --json path:."), "{:?}", f.calls());
        assert!(!copy.exists(), "the copy is removed");
    }

    #[test]
    fn an_imported_nix_file_changed_after_trust_is_refused_and_trusted_anew_is_evaluated_again() {
        let f = Fixture::new();
        f.file("flake.nix", "{ outputs = _: import ./nix/shell.nix; }");
        std::fs::create_dir(f.work().join("nix")).unwrap();
        f.file("nix/shell.nix", "{ }");
        fake_nix_json(&f);
        let trusted = f.trust_now();
        let req = |trusted: &Record| Request { trusted: Some(trusted.clone()), ..f.untrusted_request() };
        assert!(!load(&req(&trusted)).unwrap().unwrap().from_cache);
        assert_eq!(f.calls().len(), 1);

        // The guest edits the file the trusted flake imports.
        f.file("nix/shell.nix", "{ evil = builtins.readFile /etc/shadow; }");
        let e = load(&req(&trusted)).unwrap_err().to_string();
        assert!(e.contains("nix/shell.nix is new, changed or removed") && e.contains("agentvm trust"), "{e}");
        assert_eq!(f.calls().len(), 1, "nix did not run, the cache was not used");
        // The user trusts the new content: it is evaluated, not taken from the cache.
        let retrusted = f.trust_now();
        assert!(!load(&req(&retrusted)).unwrap().unwrap().from_cache);
        assert_eq!(f.calls().len(), 2);
    }

    #[test]
    fn an_envrc_runs_only_with_trusted_nix_files_and_not_if_they_change_meanwhile() {
        let f = Fixture::new();
        f.file(".envrc", "use nix\n");
        f.file("shell.nix", "{ }");
        f.program("direnv", "echo '{\"A\":\"1\"}'");
        let e = load(&f.untrusted_request()).unwrap_err().to_string();
        assert!(e.contains("shell.nix is new, changed or removed") && e.contains("agentvm trust"), "{e}");
        assert!(f.calls().is_empty(), "direnv did not run");
        let shell = load(&f.request()).unwrap().unwrap();
        assert_eq!((shell.source, shell.vars), (Source::Direnv, s(&[("A", "1")])));
        // Swapped while direnv ran: the result is not used.
        let trusted = f.request();
        f.program("direnv", &format!("echo '{{ evil }}' > '{}/shell.nix'; echo '{{}}'", f.work().display()));
        let e = load(&trusted).unwrap_err().to_string();
        assert!(e.contains("changed while `direnv export json`"), "{e}");
    }

    #[test]
    fn envrc_needs_no_agentvm_trust_direnv_decides() {
        let f = Fixture::new();
        f.file(".envrc", "export A=1\n");
        f.program("direnv", "echo '{\"A\":\"1\"}'");
        let shell = load(&f.untrusted_request()).unwrap().unwrap();
        assert_eq!((shell.source, shell.vars), (Source::Direnv, s(&[("A", "1")])));
    }

    /// A stand-in nix that reads `extra.txt` into a variable as a flake's
    /// `builtins.readFile ./extra.txt` would, failing as nix 2.8 does when
    /// the file is not in the tree it evaluates.
    fn nix_reading_extra_txt(f: &Fixture) {
        f.program(
            "nix",
            "if [ -e extra.txt ]; then printf '{\"variables\":{\"EXTRA\":{\"type\":\"exported\",\"value\":\"%s\"}}}' \"$(cat extra.txt)\"\n\
             else echo \"error: getting status of '/nix/store/0123456789abcdfghijklmnpqrsvwxyz-source/extra.txt': No such file or directory\" >&2; exit 1; fi",
        );
    }

    #[test]
    fn a_project_file_the_flake_reads_is_copied_trusted_and_cached_once_named_in_devshell_files() {
        let f = Fixture::new();
        f.file("flake.nix", "{ outputs = _: builtins.readFile ./extra.txt; }");
        f.file("extra.txt", "first");
        nix_reading_extra_txt(&f);

        // Not named: nix does not find it, and the error says what to do.
        let e = load(&f.request()).unwrap_err().to_string();
        let hint = e.lines().find(|l| l.contains("devshell_files =")).unwrap_or_else(|| panic!("no hint: {e}"));
        assert!(hint.contains("reads extra.txt of the project") && hint.contains("[\"extra.txt\"]"), "{hint}");
        assert!(
            hint.contains(&format!("agentvm trust {}", f.work().display())) && !hint.contains("/nix/store"),
            "{hint}"
        );

        // Named and trusted: copied for nix, and its content keys the cache.
        let files = vec![FilePattern::try_from("extra.txt".to_string()).unwrap()];
        let req = |trusted: &Record| Request {
            trusted: Some(trusted.clone()),
            devshell_files: files.clone(),
            ..f.untrusted_request()
        };
        let trusted = f.trust_now_with(&files);
        assert!(trusted.files.contains_key("extra.txt"));
        let shell = load(&req(&trusted)).unwrap().unwrap();
        assert_eq!((shell.vars, shell.from_cache), (s(&[("EXTRA", "first")]), false));
        assert!(load(&req(&trusted)).unwrap().unwrap().from_cache);
        let calls = f.calls().len();

        // The guest edits it: refused before nix runs, the cache unused.
        f.file("extra.txt", "from the guest");
        let e = load(&req(&trusted)).unwrap_err().to_string();
        assert!(e.contains("extra.txt is new, changed or removed") && e.contains("agentvm trust"), "{e}");
        assert_eq!(f.calls().len(), calls);
        // Trusted anew: evaluated again, not taken from the cache.
        let shell = load(&req(&f.trust_now_with(&files))).unwrap().unwrap();
        assert_eq!((shell.vars, shell.from_cache), (s(&[("EXTRA", "from the guest")]), false));
    }

    #[test]
    fn missing_files_are_named_as_project_paths_only_if_the_project_has_them_outside_the_copy() {
        let f = Fixture::new();
        f.file("flake.nix", "{}");
        f.file("rust-toolchain.toml", "");
        std::fs::create_dir(f.work().join("data")).unwrap();
        let sources = trust::devshell_sources(&f.work(), &[]).unwrap();
        let copy = f.dir.path().join("state/devshell-src.abc");
        let req = f.request();
        let store = "/tmp/x/nix/store/0123456789abcdfghijklmnpqrsvwxyz-source";
        let output = format!(
            "error: getting status of '{store}/rust-toolchain.toml': No such file or directory\n\
             error: path '{copy}/data' does not exist\n\
             error: path '«path:{copy}»/rust-toolchain.toml' does not exist\n\
             error: getting status of '{store}/not-in-project.txt': No such file or directory\n\
             error: getting status of '{store}/flake.nix': No such file or directory\n\
             error: getting status of '{store}/../etc/passwd': No such file or directory\n\
             error: getting status of '{store}/.git/config': No such file or directory\n\
             warning: '{store}/data' is mentioned on a line that says nothing is missing\n",
            copy = copy.display()
        );
        let missing = missing_from_copy(&output, &copy, &req, &sources);
        assert_eq!(missing, ["rust-toolchain.toml", "data"]);
        let note = copy_note(&req, &missing);
        assert!(
            note.contains("devshell_files = [\"rust-toolchain.toml\", \"data/*\"]") && note.contains("which are not"),
            "{note}"
        );
        assert!(copy_note(&req, &[]).contains("private copy") && !copy_note(&req, &[]).contains("devshell_files ="));
    }
}
