//! The options of `agentvm run`, each declared once, in [`RunOptions`]: a
//! field is a flag or argument (clap's `#[arg]`, or `#[arg(skip)]` when it
//! has none), a config key (serde; `#[serde(skip)]` when it has none) and,
//! where its `#[arg]` says `env = "NAME"`, an environment variable.
//! [`Layers`] stacks what each source set.
//!
//! clap never reads those variables itself: [`RunOptions::from_env`] does,
//! from an environment passed in, with errors that name the variable; the
//! command line shows them in the help (`crate::cli::command`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, FromArgMatches};
use serde::Deserialize;

use crate::clipboard::ClipboardMode;
use crate::config::file_pattern::FilePattern;
use crate::config::flavor::FlavorOverride;
use crate::guest_env::devshell;
use crate::guest_env::host_ca::HostCa;
use crate::guest_env::login::LoginMode;
use crate::launch::warm::StartMode;
use crate::net::{NetBackend, NetworkMode};
use crate::vm::share::CacheMode;
use crate::vm::AccelChoice;

/// What one source (a config file, the environment, the command line) set
/// for `agentvm run`; `None` and empty lists: not set.
#[derive(Debug, Default, Clone, PartialEq, Eq, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunOptions {
    /// What to run: claude (default), gemini, codex, shell, or a flavor
    /// from [flavors.NAME] in the config
    #[arg(env = "AGENTVM_FLAVOR")]
    pub flavor: Option<String>,
    /// Arguments for the flavor's program (for `shell`: the command to run).
    #[arg(last = true)]
    #[serde(skip)]
    pub args: Vec<String>,
    /// Pass NAME from the host, or set NAME=VALUE, in the program's
    /// environment (repeatable). A VALUE here is visible to other users in
    /// `ps`: pass secrets as `-e NAME` or in an --env-file.
    #[arg(short = 'e', long = "env", value_name = "NAME[=VALUE]")]
    #[serde(skip)]
    pub env: Vec<String>,
    /// Read NAME=VALUE lines from FILE into the program's environment
    /// (repeatable).
    #[arg(long = "env-file", value_name = "FILE")]
    #[serde(skip)]
    pub env_files: Vec<PathBuf>,
    /// Publish a guest port on the host: [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]
    /// (repeatable; the host side binds 127.0.0.1 unless an address is given).
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    pub ports: Vec<String>,
    /// Let the guest reach this host name under --network allow (repeatable;
    /// *.example.com for the names below it); on top of the flavor's preset
    /// (agentvm flavor show NAME). Implies --network allow.
    #[arg(long = "allow", value_name = "NAME")]
    pub allow: Vec<String>,
    /// Give the guest placeholders instead of the flavor's API keys; the
    /// egress proxy puts the real keys into requests to the flavor's API
    /// hosts only, in the headers its key_headers name (TLS through a
    /// per-instance CA the guest trusts). Implies --network allow.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub shield_secrets: Option<bool>,
    /// Whether the guest trusts the CA certificates the host trusts (its
    /// system bundle and what SSL_CERT_FILE, SSL_CERT_DIR and
    /// NODE_EXTRA_CA_CERTS name), read at each launch, so HTTPS verifies
    /// behind a network that re-signs TLS as the host's does; off: the
    /// image's public roots only [default: on]
    #[arg(long, value_enum, value_name = "MODE", env = "AGENTVM_HOST_CA")]
    pub host_ca: Option<HostCa>,
    /// Share the host's clipboard with the guest's xclip, xsel, wl-paste and
    /// wl-copy (read on the host, only when a tool in the guest asks):
    /// images (PNG, JPEG; what --clipboard alone means), all (text too, and
    /// the guest may set the host's clipboard), off [default: off]
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "images",
        env = "AGENTVM_CLIPBOARD"
    )]
    pub clipboard: Option<ClipboardMode>,
    /// Open one port of the host's loopback to the guest, where it is
    /// host.agentvm.internal:PORT (repeatable), e.g. a local database or
    /// MCP server. Works with --network none too.
    #[arg(long = "host-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub host_ports: Vec<u16>,
    /// `open`: internet through the host (the host's own services stay
    /// closed); `none`: only loopback in the guest; `allow`: no interface
    /// either, HTTP(S) through agentvm's proxy to the allowed names only.
    /// A host proxy in HTTPS_PROXY/HTTP_PROXY (NO_PROXY) is handed to the
    /// guest (open) or connected through (allow).
    #[arg(long, value_enum, value_name = "MODE")]
    pub network: Option<NetworkMode>,
    /// Start container runtimes in the guest: a comma-separated list of
    /// docker, podman, containerd, crun. Their storage persists per project
    /// on a disk of its own.
    #[arg(long, value_name = "LIST", env = "ENABLE_CRI")]
    pub cri: Option<String>,
    /// Size of the project's container disk when it is first created
    /// (sparse: it takes only what is written) [default: 32G]
    #[arg(long, value_name = "SIZE")]
    pub cri_disk_size: Option<String>,
    /// Run in a sandbox: a git clone of the project (history, branch and
    /// uncommitted work) on a disk of its own at /work, kept between runs
    /// of NAME; the project is only read. When the program ends, its work
    /// comes back as the branch agentvm/NAME. Without NAME, a new one.
    #[arg(long = "clone", value_name = "NAME", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    pub clone: Option<String>,
    /// Size of the sandbox's disk (sparse); larger than it is grows it
    /// [default: 64G]
    #[arg(long, value_name = "SIZE")]
    pub clone_disk_size: Option<String>,
    /// The user-mode network stack: passt (keeps the host's loopback
    /// closed), slirp (QEMU's own; cannot close it), or auto (passt when
    /// installed, else slirp with a warning) [default: auto]
    #[arg(long, value_enum, value_name = "BACKEND", env = "AGENTVM_NET_BACKEND")]
    pub net_backend: Option<NetBackend>,
    /// How long the guest caches /work's names, attributes and data:
    /// auto (revalidates after a second), always (fastest; host changes
    /// may look stale), metadata, never [default: auto]
    #[arg(long, value_enum, value_name = "MODE", env = "AGENTVM_WORK_CACHE")]
    pub work_cache: Option<CacheMode>,
    /// Tell the guest's file watchers (dev servers, jest --watch, tsc
    /// --watch) what changes on the host under /work, which virtiofs does
    /// not: agentvm watches the project, less .git and what .gitignore
    /// ignores, and the guest raises the events (--watch=false: only the
    /// guest's own changes) [default: true]
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        env = "AGENTVM_WATCH"
    )]
    pub watch: Option<bool>,
    /// How the VM starts: cold (boots) or warm (restored from a template
    /// of the VM's shape, made on its first use; a cold start, with a line
    /// saying why, when no template can serve) [default: warm]
    #[arg(long, value_enum, value_name = "MODE", env = "AGENTVM_START")]
    pub start: Option<StartMode>,
    /// Same as --start=warm (--warm=false: --start=cold); `warm = false`
    /// in a config is `start = "cold"`
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        conflicts_with_all = ["start", "cold"]
    )]
    pub warm: Option<bool>,
    /// Same as --start=cold
    #[arg(long, conflicts_with = "start")]
    #[serde(skip)]
    pub cold: bool,
    /// Project directory shared at /work [default: .]
    #[arg(short = 'w', long, value_name = "DIR", env = "WORK_DIR")]
    #[serde(skip)]
    pub work_dir: Option<PathBuf>,
    /// Where the agent's login (e.g. Claude Code's OAuth credentials, the
    /// flavor's login_files) lives: shared (log in once: every project's
    /// home gets the same login, kept by agentvm outside the projects, and
    /// a refresh in one VM reaches the others) or per-project (each agent
    /// home keeps its own) [default: shared]
    #[arg(long, value_enum, value_name = "MODE", env = "AGENTVM_LOGIN")]
    pub login: Option<LoginMode>,
    /// Persistent agent home, shared at /home/agent (in a config file:
    /// relative to the file's directory) [default: per project under
    /// $XDG_DATA_HOME/agentvm/homes]
    #[arg(long, value_name = "DIR", env = "AGENT_HOME")]
    pub home: Option<PathBuf>,
    /// Guest memory, e.g. 4G or 2048M [default: 4G]
    #[arg(short, long, value_name = "SIZE", env = "AGENTVM_MEMORY")]
    pub memory: Option<String>,
    /// Virtual CPUs [default: min(4, host cores)]
    #[arg(long, value_name = "N", allow_negative_numbers = true, env = "AGENTVM_CPUS")]
    pub cpus: Option<u32>,
    /// Accelerator: auto probes KVM and falls back to TCG
    #[arg(long, value_enum, value_name = "ACCEL", env = "AGENTVM_ACCEL")]
    pub accel: Option<AccelChoice>,
    /// Apply the project's dev shell to the program: a Nix flake
    /// (`nix print-dev-env` on a private copy of the trusted Nix files and
    /// the `devshell_files` of the config, cached until one changes),
    /// devenv, or an `.envrc` that direnv allows. Nix files must be as
    /// trusted with `agentvm trust`. `--devshell` stops before
    /// boot if it fails; `--devshell=try` warns and goes on without it;
    /// DIRENV_ALLOW=1 is `--devshell` [default: off]
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "on",
        env = DIRENV_ALLOW,
    )]
    pub devshell: Option<devshell::Mode>,
    /// Project files the dev shell reads besides the Nix files (trusted,
    /// copied and cached with them).
    #[arg(skip)]
    pub devshell_files: Vec<FilePattern>,
    /// Print the guest's boot log (kernel and init messages, with timings)
    /// and the launcher's own timings (one line, `agentvm: timings {JSON}`)
    /// to stderr when the VM stops.
    #[arg(short, long)]
    #[serde(skip)]
    pub verbose: bool,
    /// `[flavors.NAME]` tables: new flavors or changes to existing ones.
    /// They merge field by field ([`crate::config::flavor::merge`]).
    #[arg(skip)]
    pub flavors: BTreeMap<String, FlavorOverride>,
}

/// The original tool's switch for the dev shell, which says 1 or 0 where
/// `--devshell` says on or off.
const DIRENV_ALLOW: &str = "DIRENV_ALLOW";

/// An environment variable whose value its option does not take. Never
/// holds more of the environment than that value.
#[derive(Debug, thiserror::Error)]
pub enum EnvVarError {
    #[error("{var}={value:?} is invalid: {}", hint(.source))]
    Invalid { var: String, value: String, source: clap::Error },
    #[error("{DIRENV_ALLOW}={0:?} is invalid: use 1 to turn the dev shell on, 0 to leave it off")]
    DirenvAllow(String),
}

/// What clap's `e` says is wrong with one value, as the end of a sentence.
fn hint(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    match (e.get(ContextKind::ValidValue), std::error::Error::source(e)) {
        (Some(ContextValue::Strings(valid)), _) => match valid.split_last() {
            Some((last, [])) => format!("use {last}"),
            Some((last, rest)) => format!("use {} or {last}", rest.join(", ")),
            None => e.kind().to_string(),
        },
        (_, Some(inner)) if inner.is::<std::num::ParseIntError>() => "not a number".into(),
        (_, Some(inner)) => inner.to_string(),
        _ => e.kind().to_string(),
    }
}

impl RunOptions {
    /// The options set in the environment `get`: each variable an option
    /// declares, parsed as the option's flag would be (but in any case).
    /// An empty variable counts as unset.
    pub fn from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<RunOptions, EnvVarError> {
        let parser = RunOptions::augment_args(clap::Command::new("environment"))
            .no_binary_name(true)
            .disable_help_flag(true)
            .mut_args(|arg| {
                let takes_values = arg.get_action().takes_values();
                arg.env(None).ignore_case(takes_values)
            });
        let mut layer = RunOptions::default();
        for (var, arg) in declared_env() {
            let Some(value) = get(&var).filter(|v| !v.is_empty()) else { continue };
            let word = match (arg.get_long(), flag_value(&var, &value)?) {
                (Some(long), v) => format!("--{long}={v}"),
                (None, v) => v,
            };
            let invalid = |source| EnvVarError::Invalid { var: var.clone(), value: value.clone(), source };
            let matches = parser.clone().try_get_matches_from([word]).map_err(invalid)?;
            layer.update_from_arg_matches(&matches).map_err(invalid)?;
        }
        Ok(layer)
    }
}

/// The environment variables the options declare, each with its option.
fn declared_env() -> Vec<(String, clap::Arg)> {
    let declared = RunOptions::augment_args(clap::Command::new("run"));
    declared.get_arguments().filter_map(|a| Some((a.get_env()?.to_str()?.to_string(), a.clone()))).collect()
}

/// `value` of the variable `var` as its option's flag takes it.
fn flag_value(var: &str, value: &str) -> Result<String, EnvVarError> {
    if var != DIRENV_ALLOW {
        return Ok(value.to_string());
    }
    match value.trim() {
        "1" | "true" | "yes" | "on" => Ok("on".into()),
        "0" | "false" | "no" | "off" => Ok("off".into()),
        _ => Err(EnvVarError::DirenvAllow(value.trim().to_string())),
    }
}

/// Where a value came from. Later sources win.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// `~/.config/agentvm/config.toml`.
    UserConfig,
    /// The project's `.agentvm.toml`, trusted.
    ProjectConfig,
    Environment,
    /// The command line.
    Flags,
}

/// What each source set, lowest precedence first (built-in defaults are
/// the resolvers' own). An option's value is the one of the latest source
/// that sets it; a list option gathers every source's items, in order.
///
/// A generic stack rather than a merge into one `RunOptions`: each field
/// is read where it is resolved (so a new option needs no merge line), a
/// field's type says how it merges (`Option`: the latest wins; `Vec`:
/// they add up), a value still knows its source for errors, and nothing
/// goes through a serialized form (which would refuse a non-UTF-8 path
/// given on the command line).
#[derive(Debug, Clone)]
pub struct Layers {
    /// Indexed by [`Origin`].
    layers: [(Origin, RunOptions); 4],
}

impl Layers {
    pub fn new(user: RunOptions, project: RunOptions, env: RunOptions, flags: RunOptions) -> Layers {
        let layers = [
            (Origin::UserConfig, user),
            (Origin::ProjectConfig, project),
            (Origin::Environment, env),
            (Origin::Flags, flags),
        ];
        Layers { layers }
    }

    /// The latest value of the option `field`, with its source.
    pub fn value_from<T: Clone>(&self, field: impl Fn(&RunOptions) -> &Option<T>) -> Option<(T, Origin)> {
        self.layers.iter().rev().find_map(|(origin, layer)| field(layer).as_ref().map(|v| (v.clone(), *origin)))
    }

    /// The latest value of the option `field`.
    pub fn value<T: Clone>(&self, field: impl Fn(&RunOptions) -> &Option<T>) -> Option<T> {
        self.value_from(field).map(|(v, _)| v)
    }

    /// The items of the list option `field` from every source, in order.
    pub fn list<T: Clone>(&self, field: impl Fn(&RunOptions) -> &Vec<T>) -> Vec<T> {
        self.layers.iter().flat_map(|(_, layer)| field(layer).iter().cloned()).collect()
    }

    /// What the source `origin` set.
    pub fn layer(&self, origin: Origin) -> &RunOptions {
        &self.layers[origin as usize].1
    }

    /// Each source's options, lowest precedence first.
    pub fn iter(&self) -> impl Iterator<Item = &RunOptions> {
        self.layers.iter().map(|(_, layer)| layer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::trust::{self, TrustStore};
    use crate::config::{resolve_with, HostLimits, Settings, PROJECT_CONFIG};
    use crate::guest_env::cri::Runtime;
    use std::path::Path;
    use toml::Value;

    /// A source an option can come from.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Source {
        Flag,
        Env,
        UserConfig,
        ProjectConfig,
    }

    /// The directories one resolve works in.
    struct Fixture {
        _dir: tempfile::TempDir,
        project: PathBuf,
        other_project: PathBuf,
        home: PathBuf,
        env_file: PathBuf,
        user_config: PathBuf,
        trust: TrustStore,
        free_port: u16,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let path = |name: &str| dir.path().join(name);
            for d in ["project", "other", "home"] {
                std::fs::create_dir(path(d)).unwrap();
            }
            std::fs::write(path("vars.env"), "FROM_FILE=1\n").unwrap();
            let free_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            Fixture {
                project: path("project").canonicalize().unwrap(),
                other_project: path("other").canonicalize().unwrap(),
                home: path("home"),
                env_file: path("vars.env"),
                user_config: path("config.toml"),
                trust: TrustStore::at(path("trust")),
                free_port,
                _dir: dir,
            }
        }

        /// Resolves with `key` set to `value` in `source` (and the work
        /// dir given by flag, unless `key` is the work dir).
        fn resolve(&self, key: &str, value: &Value, source: Source) -> Settings {
            let mut argv = vec!["agentvm".to_string(), "run".to_string()];
            if key != "work_dir" {
                argv.extend(["--work-dir".to_string(), self.project.display().to_string()]);
            }
            let mut env = Vec::new();
            match source {
                Source::Flag => argv.extend(flag_words(key, value)),
                Source::Env => env.push((env_var(key), text(value))),
                Source::UserConfig => std::fs::write(&self.user_config, config_text(key, value)).unwrap(),
                Source::ProjectConfig => self.trusted_project_config(&config_text(key, value)),
            }
            let flags = match crate::cli::parse(argv.iter().map(Into::into)) {
                Ok(crate::cli::Cli { command: crate::cli::Command::Run(flags) }) => flags.options,
                other => panic!("{argv:?}: {other:?}"),
            };
            let get = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
            let host = HostLimits { cores: 8, memory_mib: 16384 };
            resolve_with(flags, &get, &self.user_config, &self.trust, host)
                .unwrap_or_else(|e| panic!("{key} from {source:?}: {e}"))
        }

        fn trusted_project_config(&self, text: &str) {
            std::fs::write(self.project.join(PROJECT_CONFIG), text).unwrap();
            let files = [(PROJECT_CONFIG.to_string(), trust::digest(text.as_bytes()))];
            self.trust.save(&trust::Record::new(&self.project, files)).unwrap();
        }
    }

    /// The `run` arguments, as clap declares them.
    fn declared_args() -> Vec<clap::Arg> {
        RunOptions::augment_args(clap::Command::new("run")).get_arguments().cloned().collect()
    }

    fn arg(key: &str) -> clap::Arg {
        declared_args().into_iter().find(|a| a.get_id() == key).unwrap_or_else(|| panic!("{key} is no argument"))
    }

    fn env_var(key: &str) -> String {
        arg(key).get_env().unwrap_or_else(|| panic!("{key} declares no variable")).to_str().unwrap().to_string()
    }

    /// The command-line words that set the argument `key` to `value`.
    fn flag_words(key: &str, value: &Value) -> Vec<String> {
        let arg = arg(key);
        let items: Vec<String> = match value {
            Value::Array(items) => items.iter().map(text).collect(),
            single => vec![text(single)],
        };
        match (arg.get_long(), arg.get_action().takes_values()) {
            (Some(long), false) => vec![format!("--{long}")],
            (Some(long), true) => items.iter().map(|v| format!("--{long}={v}")).collect(),
            (None, _) if arg.is_last_set() => ["--".to_string()].into_iter().chain(items).collect(),
            (None, _) => items,
        }
    }

    /// A scalar as a flag or variable writes it.
    fn text(value: &Value) -> String {
        match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    fn config_text(key: &str, value: &Value) -> String {
        toml::to_string(&toml::Table::from_iter([(key.to_string(), value.clone())])).unwrap()
    }

    /// The config keys of [`RunOptions`], as serde sees them.
    fn config_keys() -> &'static [&'static str] {
        use serde::de::{self, Visitor};
        struct Keys(Option<&'static [&'static str]>);
        impl<'de> de::Deserializer<'de> for &mut Keys {
            type Error = de::value::Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(de::Error::custom("only a struct's field names are read"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                visitor: V,
            ) -> Result<V::Value, Self::Error> {
                self.0 = Some(fields);
                self.deserialize_any(visitor)
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
                unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
            }
        }
        let mut keys = Keys(None);
        let _ = RunOptions::deserialize(&mut keys);
        keys.0.expect("RunOptions deserializes as a struct")
    }

    /// A value for each option and a check that the settings took it.
    type Case = (&'static str, fn(&Fixture) -> Value, fn(&Settings, &Fixture) -> bool);

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    fn path(p: &Path) -> Value {
        Value::String(p.display().to_string())
    }

    const CASES: &[Case] = &[
        ("flavor", |_| "shell".into(), |s, _| s.flavor.name == "shell"),
        ("args", |_| strings(&["make"]), |s, _| s.argv == ["claude", "make"]),
        ("env", |_| strings(&["FROM_FLAG=1"]), |s, _| s.guest_env.get("FROM_FLAG") == Some("1")),
        ("env_files", |f| Value::Array(vec![path(&f.env_file)]), |s, _| s.guest_env.get("FROM_FILE") == Some("1")),
        (
            "ports",
            |f| strings(&[&format!("127.0.0.1:{}:80", f.free_port)]),
            |s, f| s.ports.iter().map(|p| p.host_port).eq([f.free_port]),
        ),
        ("allow", |_| strings(&["example.org"]), |s, _| s.allow.allows("example.org")),
        ("shield_secrets", |_| true.into(), |s, _| s.shield_secrets),
        ("host_ca", |_| "off".into(), |s, _| s.host_ca == HostCa::Off),
        ("host_ports", |_| Value::Array(vec![5432.into()]), |s, _| s.host_ports == [5432]),
        ("clipboard", |_| "all".into(), |s, _| s.clipboard == ClipboardMode::All),
        ("network", |_| "none".into(), |s, _| s.network == NetworkMode::None),
        ("cri", |_| "docker".into(), |s, _| s.cri == [Runtime::Docker]),
        ("cri_disk_size", |_| "1G".into(), |s, _| s.cri_disk_mib == 1024),
        ("clone", |_| "t1".into(), |s, _| s.clone.as_ref().is_some_and(|c| c.name.as_str() == "t1" && !c.new_name)),
        ("clone_disk_size", |_| "1G".into(), |s, _| s.clone_disk_mib == Some(1024)),
        ("net_backend", |_| "slirp".into(), |s, _| s.net_backend == NetBackend::Slirp),
        ("work_cache", |_| "always".into(), |s, _| s.work_cache == CacheMode::Always),
        ("watch", |_| false.into(), |s, _| !s.watch),
        ("start", |_| "cold".into(), |s, _| s.start == StartMode::Cold),
        ("warm", |_| false.into(), |s, _| s.start == StartMode::Cold),
        ("cold", |_| true.into(), |s, _| s.start == StartMode::Cold),
        ("work_dir", |f| path(&f.other_project), |s, f| s.work_dir == f.other_project),
        ("home", |f| path(&f.home), |s, f| s.home_dir == f.home),
        ("login", |_| "per-project".into(), |s, _| s.login == LoginMode::PerProject),
        ("memory", |_| "1G".into(), |s, _| s.memory_mib == 1024),
        ("cpus", |_| 2.into(), |s, _| s.cpus == 2),
        ("accel", |_| "tcg".into(), |s, _| s.accel == AccelChoice::Tcg),
        ("devshell", |_| "on".into(), |s, _| s.devshell == devshell::Mode::On),
        (
            "devshell_files",
            |_| strings(&["rust-toolchain.toml"]),
            |s, _| s.devshell_files.iter().map(ToString::to_string).eq(["rust-toolchain.toml"]),
        ),
        ("verbose", |_| true.into(), |s, _| s.verbose),
        (
            "flavors",
            |_| toml::toml! { claude = { description = "from a layer" } }.into(),
            |s, _| s.flavor.description == "from a layer",
        ),
    ];

    #[test]
    fn every_option_comes_from_every_source_it_declares() {
        let args = declared_args();
        let keys = config_keys();
        let mut options: Vec<&str> = args.iter().map(|a| a.get_id().as_str()).chain(keys.iter().copied()).collect();
        options.sort();
        options.dedup();
        for (key, _, _) in CASES {
            assert!(options.contains(key), "the case {key} is no option");
        }
        for key in options {
            let (_, value, applied) =
                CASES.iter().find(|(k, ..)| *k == key).unwrap_or_else(|| panic!("no test value for the option {key}"));
            let arg = args.iter().find(|a| a.get_id() == key);
            let sources = [
                (Source::Flag, arg.is_some()),
                (Source::Env, arg.is_some_and(|a| a.get_env().is_some())),
                (Source::UserConfig, keys.contains(&key)),
                (Source::ProjectConfig, keys.contains(&key)),
            ];
            for (source, _) in sources.iter().filter(|(_, declared)| *declared) {
                let f = Fixture::new();
                let settings = f.resolve(key, &value(&f), *source);
                assert!(applied(&settings, &f), "{key} from {source:?} did not apply: {settings:?}");
            }
        }
    }

    #[test]
    fn a_bad_variable_is_named_with_its_value_and_what_it_takes() {
        let bad = |var: &str, value: &str| {
            let e = RunOptions::from_env(&|n| (n == var).then(|| value.to_string())).unwrap_err();
            e.to_string()
        };
        assert_eq!(bad("AGENTVM_ACCEL", "fast"), "AGENTVM_ACCEL=\"fast\" is invalid: use auto, kvm or tcg");
        assert_eq!(bad("AGENTVM_CPUS", "two"), "AGENTVM_CPUS=\"two\" is invalid: not a number");
        assert_eq!(
            bad("DIRENV_ALLOW", "maybe"),
            "DIRENV_ALLOW=\"maybe\" is invalid: use 1 to turn the dev shell on, 0 to leave it off"
        );
        let empty = RunOptions::from_env(&|_| Some(String::new())).unwrap();
        assert_eq!(empty, RunOptions::default(), "an empty variable is unset");
    }

    #[test]
    fn a_value_comes_from_the_latest_source_and_lists_add_up() {
        let with = |memory: &str, port: u16| RunOptions {
            memory: Some(memory.into()),
            host_ports: vec![port],
            ..RunOptions::default()
        };
        let layers = Layers::new(with("1G", 1), with("2G", 2), RunOptions::default(), with("3G", 3));
        assert_eq!(layers.value_from(|o| &o.memory), Some(("3G".to_string(), Origin::Flags)));
        assert_eq!(layers.list(|o| &o.host_ports), [1, 2, 3]);
        assert_eq!(layers.value(|o| &o.cpus), None);
    }
}
