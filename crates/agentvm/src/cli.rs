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
    /// Boot a VM and run a flavor (default: shell) in it; its exit status
    /// becomes agentvm's.
    Run(RunArgs),
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
}

/// `agentvm run [OPTIONS] [FLAVOR] [-- ARGS...]`
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  agentvm run shell                   interactive bash in /work\n  agentvm run shell -- make test      one command; its exit status comes back\n  echo hi | agentvm run shell -- sh -c 'cat > /work/in.txt'")]
pub struct RunArgs {
    /// What to run: `shell` (bash; with ARGS, ARGS is the command).
    pub flavor: Option<String>,
    /// Arguments for the flavor (for `shell`: the command to run).
    #[arg(last = true)]
    pub args: Vec<String>,
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
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Accelerator: auto probes KVM and falls back to TCG [env: AGENTVM_ACCEL]
    #[arg(long, value_enum, value_name = "ACCEL")]
    pub accel: Option<AccelChoice>,
    /// Print the guest's boot log (kernel and init messages, with timings)
    /// to stderr when the VM stops.
    #[arg(short, long)]
    pub verbose: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the image (or reuse the cached one unless --force).
    Build {
        /// Rebuild even if a cached image matches the recipe.
        #[arg(long)]
        force: bool,
    },
    /// List cached images.
    Ls,
    /// Remove cached images by name, directory name or key prefix.
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove images no current recipe uses, and leftovers of failed builds.
    Prune,
}
