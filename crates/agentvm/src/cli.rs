//! The command line: parsing only; each command calls into the library.

use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::RunOptions;

/// Run AI coding agents (or any command) in fast, isolated microVMs.
///
/// The project directory is shared read-write at /work, the agent's home
/// persists per project, and nothing else of the host is reachable.
#[derive(Debug, Parser)]
#[command(name = "agentvm", version = crate::build_info::VERSION_LONG, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM and run a flavor (default: claude) in it; its exit status
    /// becomes agentvm's.
    #[command(
        after_help = "Examples:\n  agentvm run                         Claude Code in ./ (the default flavor)\n  agentvm run claude -- -p \"fix the failing test\"\n  agentvm run shell                   interactive bash in /work\n  agentvm run shell -- make test      one command; its exit status comes back\n  agentvm run --clone=fix claude      in a sandboxed clone; its work comes back as agentvm/fix\n  echo hi | agentvm run shell -- sh -c 'cat > /work/in.txt'"
    )]
    Run(Box<RunArgs>),
    /// Build, list and remove cached VM images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Check that this host has everything agentvm needs, and print the
    /// commands that install what is missing.
    Doctor {
        /// Run those commands: as root, or through sudo after asking (with
        /// no terminal to ask on, only print them).
        #[arg(long)]
        fix: bool,
    },
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
    /// Sandboxed clones (`run --clone=NAME`): list them, remove them, or
    /// bring one's work back as the branch agentvm/NAME now.
    #[command(
        subcommand,
        after_help = "Examples:\n  agentvm run --clone=fix-login claude   a sandbox of ./ (made on the first run)\n  agentvm sandbox ls\n  git log main..agentvm/fix-login        what it did\n  agentvm sandbox export fix-login       its work as agentvm/fix-login, now\n  agentvm sandbox rm fix-login           its disk goes; the branch stays"
    )]
    Sandbox(SandboxCommand),
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

/// The command line as agentvm parses it. `run`'s options declare the
/// environment variable each reads (`env = ...` in [`RunOptions`]), but
/// clap does not read them: [`crate::config`] does, below the config files
/// in precedence, with errors that name the variable, and from an
/// environment a test can pass in. clap only names them in the help.
pub fn command() -> clap::Command {
    Cli::command().mut_subcommand("run", |run| run.mut_args(env_in_help))
}

/// Parses the command line `args` (with the program name first).
pub fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Cli, clap::Error> {
    Cli::from_arg_matches(&command().try_get_matches_from(args)?)
}

/// `arg`, its environment variable named in its help instead of read.
fn env_in_help(arg: clap::Arg) -> clap::Arg {
    let Some(var) = arg.get_env().map(|v| v.to_string_lossy().into_owned()) else { return arg };
    let note = |help: Option<&clap::builder::StyledStr>| match help {
        Some(h) => format!("{h} [env: {var}]"),
        None => format!("[env: {var}]"),
    };
    let long = arg.get_long_help().map(|h| note(Some(h)));
    let help = note(arg.get_help());
    let arg = arg.env(None).help(help);
    match long {
        Some(long) => arg.long_help(long),
        None => arg,
    }
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
    let mut cmd = command();
    let mut path = vec!["agentvm".to_string()];
    for arg in args.iter().take_while(|a| *a != "--") {
        let Some(sub) = cmd.find_subcommand(arg).cloned() else { continue };
        path.push(arg.clone());
        cmd = sub;
    }
    path.join(" ")
}

/// `agentvm run`: the run options, and what to do with them.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub options: RunOptions,
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
pub enum SandboxCommand {
    /// List every sandbox: its project, branch, commits ahead of the host
    /// branch it started from, uncommitted work, disk use, whether it runs,
    /// and its last run (as of its last export).
    Ls {
        /// Print a JSON array (for scripts) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove sandboxes of the project: their disk and state (refused while
    /// one runs). Their branches agentvm/NAME stay.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        /// The project [env: WORK_DIR] [default: .]
        #[arg(short = 'w', long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
    },
    /// Bring a sandbox's work back as the branch agentvm/NAME now: asks the
    /// running VM for it, or boots one (after a crash or kill -9 of agentvm).
    Export {
        name: String,
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
        /// Also make the warm-start template of a plain `agentvm run FLAVOR`
        /// in this project for each flavor named (none named: of a plain
        /// `agentvm run`), so that no run waits for it.
        #[arg(long)]
        warm: bool,
    },
    /// List cached images and layers, with the agent versions they hold,
    /// and the warm-start templates.
    Ls,
    /// Remove cached images by name, directory name or key prefix; warm-start
    /// templates by name (template-KEY) or all of them (templates).
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove images no current recipe uses, templates of images gone or of
    /// another agentvm, and leftovers of failed builds.
    Prune,
}
