//! The command line: parsing only; each command calls into the library.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::vm::AccelChoice;

/// Run AI coding agents (or any command) in fast, isolated microVMs.
///
/// The project directory is shared read-write at /work, the agent's home
/// persists per project, and nothing else of the host is reachable.
#[derive(Debug, Parser)]
#[command(name = "agentvm", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM and run a flavor (default: claude) in it; its exit status
    /// becomes agentvm's.
    Run(Box<RunArgs>),
    /// Build, list and remove cached VM images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Check that this host has everything agentvm needs.
    Doctor,
    /// Print a shell completion script (e.g. `agentvm completions bash >
    /// ~/.local/share/bash-completion/completions/agentvm`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `agentvm man | man -l -`.
    Man,
    /// List the running instances (VMs) of this user.
    Ps {
        /// Print a JSON array (for scripts) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop running instances: the program gets SIGTERM, the VM powers off;
    /// whatever has not stopped after the timeout is killed.
    Stop {
        /// Instance ids (or unique prefixes), as `agentvm ps` shows them.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Stop every running instance.
        #[arg(short, long)]
        all: bool,
        /// Seconds to wait before killing.
        #[arg(short, long, value_name = "SECS", default_value_t = 15)]
        timeout: u64,
    },
    /// Print an instance's console log (kernel and guest init messages).
    Logs {
        /// Instance id or unique prefix.
        id: String,
        /// Keep printing new output until the instance ends.
        #[arg(short, long)]
        follow: bool,
        /// The network log instead: each connection the egress proxy allowed
        /// or denied (--network allow).
        #[arg(long)]
        net: bool,
    },
    /// Run a command in a running instance, as the agent user in /work; its
    /// exit status becomes agentvm's.
    #[command(
        after_help = "Examples:\n  agentvm exec 3f2a -- git status\n  echo hi | agentvm exec 3f2a -- sh -c 'cat > /work/in.txt'"
    )]
    Exec {
        /// Instance id or unique prefix.
        id: String,
        /// Run on a terminal even when stdin and stdout are not terminals.
        #[arg(short = 't', long, conflicts_with = "no_tty")]
        tty: bool,
        /// Never run on a terminal.
        #[arg(short = 'T', long)]
        no_tty: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List the flavors, or show one: its command, packages, keys and the
    /// names it may reach under --network allow.
    #[command(subcommand)]
    Flavor(FlavorCommand),
    /// Container storage: `agentvm cri prune` removes the project's
    /// container disk (images, containers, volumes) to reclaim its space.
    #[command(subcommand)]
    Cri(CriCommand),
    /// Open a login shell in a running instance.
    Shell {
        /// Instance id or unique prefix.
        id: String,
    },
    /// Trust the project's .agentvm.toml and dev shell files (every *.nix
    /// file, flake.lock, devenv.yaml, devenv.lock, the devshell_files of
    /// your config and of that .agentvm.toml) as they are now, after
    /// reviewing them. The guest can write them: a new or changed one is
    /// ignored (the config) or stops --devshell, until trusted again.
    #[command(
        after_help = "Examples:\n  agentvm trust              trust ./.agentvm.toml (and ./flake.nix ...) as they are\n  agentvm trust --show ~/src/app\n  agentvm trust --revoke"
    )]
    Trust {
        /// The project [env: WORK_DIR] [default: .]
        dir: Option<PathBuf>,
        /// Forget what was trusted in the project.
        #[arg(long, conflicts_with = "show")]
        revoke: bool,
        /// Show what is trusted, and whether each file is unchanged.
        #[arg(long)]
        show: bool,
    },
}

/// A command line (`args`, without the program name) that cannot be
/// parsed, as one line: what was wrong, with which input, and whose help
/// to read. The caller exits 125, as for agentvm's other errors.
pub fn usage_error(e: &clap::Error, args: &[String]) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let help = format!("see `{} --help`", command_path(args));
    if matches!(e.kind(), ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand) {
        return format!("a command is missing; {help}");
    }
    // clap's first paragraph, e.g. "error: invalid value 'x' for '--network
    // <MODE>'" and "[possible values: ...]"; its tips and usage follow.
    let rendered = e.render().to_string();
    let first: Vec<&str> = rendered.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
    let mut line = first.join(" ");
    if let Some(rest) = line.strip_prefix("error: ") {
        line = rest.to_string();
    }
    if let Some(ContextValue::Strings(similar)) = e.get(ContextKind::SuggestedSubcommand) {
        line.push_str(&format!(" (did you mean {}?)", similar.join(" or ")));
    }
    format!("{line}; {help}")
}

/// `agentvm` and the subcommands named in `args`, e.g. `agentvm image build`.
fn command_path(args: &[String]) -> String {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut path = vec!["agentvm".to_string()];
    for arg in args.iter().take_while(|a| *a != "--") {
        let Some(sub) = cmd.find_subcommand(arg).cloned() else { continue };
        path.push(arg.clone());
        cmd = sub;
    }
    path.join(" ")
}

/// `agentvm run [OPTIONS] [FLAVOR] [-- ARGS...]`
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  agentvm run                         Claude Code in ./ (the default flavor)\n  agentvm run claude -- -p \"fix the failing test\"\n  agentvm run shell                   interactive bash in /work\n  agentvm run shell -- make test      one command; its exit status comes back\n  echo hi | agentvm run shell -- sh -c 'cat > /work/in.txt'"
)]
pub struct RunArgs {
    /// What to run: claude (default), gemini, codex, shell, or a flavor
    /// from [flavors.NAME] in the config [env: AGENTVM_FLAVOR]
    pub flavor: Option<String>,
    /// Arguments for the flavor's program (for `shell`: the command to run).
    #[arg(last = true)]
    pub args: Vec<String>,
    /// Pass NAME from the host, or set NAME=VALUE, in the program's
    /// environment (repeatable). A VALUE here is visible to other users in
    /// `ps`: pass secrets as `-e NAME` or in an --env-file.
    #[arg(short = 'e', long = "env", value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,
    /// Read NAME=VALUE lines from FILE into the program's environment
    /// (repeatable).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_files: Vec<PathBuf>,
    /// Publish a guest port on the host: [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]
    /// (repeatable; the host side binds 127.0.0.1 unless an address is given).
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    pub publish: Vec<String>,
    /// Let the guest reach this host name under --network allow (repeatable;
    /// *.example.com for the names below it); on top of the flavor's preset
    /// (agentvm flavor show NAME). Implies --network allow.
    #[arg(long = "allow", value_name = "NAME")]
    pub allow: Vec<String>,
    /// Give the guest placeholders instead of the flavor's API keys; the
    /// egress proxy puts the real keys into requests to the flavor's API
    /// hosts only, in the headers its key_headers name (TLS through a
    /// per-instance CA the guest trusts). Implies --network allow.
    #[arg(long)]
    pub shield_secrets: bool,
    /// Open one port of the host's loopback to the guest, where it is
    /// host.agentvm.internal:PORT (repeatable), e.g. a local database or
    /// MCP server. Works with --network none too.
    #[arg(long = "host-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub host_ports: Vec<u16>,
    /// `open`: internet through the host (the host's own services stay
    /// closed); `none`: only loopback in the guest; `allow`: no interface
    /// either, HTTP(S) through agentvm's proxy to the allowed names only.
    #[arg(long, value_enum, value_name = "MODE")]
    pub network: Option<crate::net::NetworkMode>,
    /// Start container runtimes in the guest: a comma-separated list of
    /// docker, podman, containerd, crun [env: ENABLE_CRI]. Their storage
    /// persists per project on a disk of its own.
    #[arg(long, value_name = "LIST")]
    pub cri: Option<String>,
    /// Size of the project's container disk when it is first created
    /// (sparse: it takes only what is written) [default: 32G]
    #[arg(long, value_name = "SIZE")]
    pub cri_disk_size: Option<String>,
    /// The user-mode network stack: passt (keeps the host's loopback
    /// closed), slirp (QEMU's own; cannot close it), or auto (passt when
    /// installed, else slirp with a warning) [default: auto]
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub net_backend: Option<crate::net::NetBackend>,
    /// Project directory shared at /work [env: WORK_DIR] [default: .]
    #[arg(short = 'w', long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Persistent agent home, shared at /home/agent [env: AGENT_HOME]
    /// [default: per project under $XDG_DATA_HOME/agentvm/homes]
    #[arg(long, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Guest memory, e.g. 4G or 2048M [env: AGENTVM_MEMORY] [default: 4G]
    #[arg(short, long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Virtual CPUs [env: AGENTVM_CPUS] [default: min(4, host cores)]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub cpus: Option<u32>,
    /// Accelerator: auto probes KVM and falls back to TCG [env: AGENTVM_ACCEL]
    #[arg(long, value_enum, value_name = "ACCEL")]
    pub accel: Option<AccelChoice>,
    /// Apply the project's dev shell to the program: a Nix flake
    /// (`nix print-dev-env` on a private copy of the trusted Nix files and
    /// the `devshell_files` of the config, cached until one changes),
    /// devenv, or an `.envrc` that direnv allows. Nix files must be as
    /// trusted with `agentvm trust`. `--devshell` stops before
    /// boot if it fails; `--devshell=try` warns and goes on without it
    /// [env: DIRENV_ALLOW=1] [default: off]
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "on"
    )]
    pub devshell: Option<crate::guest_env::devshell::Mode>,
    /// Print the guest's boot log (kernel and init messages, with timings)
    /// to stderr when the VM stops.
    #[arg(short, long)]
    pub verbose: bool,
    /// Print the launch plan (QEMU's command line, kernel command line,
    /// accelerator, memory, fds, network, shares, initramfs size) and exit
    /// without booting. Environment values are not shown.
    #[arg(long)]
    pub print_plan: bool,
    /// With --print-plan: print it as JSON.
    #[arg(long, requires = "print_plan")]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum FlavorCommand {
    /// List the flavors (built-in and from the config files).
    Ls,
    /// Show one flavor in full.
    Show { name: String },
}

#[derive(Debug, Subcommand)]
pub enum CriCommand {
    /// Remove the project's container disk (refused while a run uses it).
    Prune {
        /// The project [env: WORK_DIR] [default: .]
        #[arg(short = 'w', long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the image (or reuse the cached one unless --force).
    /// The base image and the layers of the named flavors (default: the base
    /// only); reuses cached ones unless --refresh.
    Build {
        /// Flavors whose layers to build, e.g. `claude codex`.
        flavors: Vec<String>,
        /// Rebuild even if cached: picks up the latest version of unpinned
        /// agent packages (and rebuilds the base with --base).
        #[arg(long)]
        refresh: bool,
        /// With --refresh, also rebuild the base image.
        #[arg(long, requires = "refresh")]
        base: bool,
        /// Also build the image with the container runtimes (for --cri).
        #[arg(long)]
        cri: bool,
    },
    /// List cached images and layers, with the agent versions they hold.
    Ls,
    /// Remove cached images by name, directory name or key prefix.
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove images no current recipe uses, and leftovers of failed builds.
    Prune,
}
