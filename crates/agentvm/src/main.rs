//! The `agentvm` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use std::path::PathBuf;

use agentvm::cli::{Cli, Command, CriCommand, FlavorCommand, ImageCommand, RunArgs};
use agentvm::image::{self, Recipe, Store};
use agentvm::{config, doctor, launch};

fn main() -> ExitCode {
    let started = std::time::Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.exit_code() == 0 => e.exit(),
        Err(e) => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            return ExitCode::from(fail(agentvm::cli::usage_error(&e, &args)) as u8);
        }
    };
    let code = match cli.command {
        Command::Run(args) => run(*args, started),
        Command::Image(cmd) => image_command(cmd),
        Command::Doctor => {
            let checks = doctor::run_checks();
            print!("{}", doctor::report(&checks));
            i32::from(!doctor::all_passed(&checks))
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "agentvm", &mut std::io::stdout());
            0
        }
        Command::Man => match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
            Ok(()) => 0,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
            Err(e) => fail(e),
        },
        Command::Ps { json } => {
            print!("{}", agentvm::instance::ps::ps(&agentvm::paths::runtime_base(), json));
            0
        }
        Command::Stop { ids, all, timeout } => stop(&ids, all, timeout),
        Command::Logs { id, follow, net } => {
            match agentvm::instance::ps::logs(&agentvm::paths::runtime_base(), &id, net, follow, &mut std::io::stdout())
            {
                Ok(()) => 0,
                Err(e) => fail(e),
            }
        }
        Command::Exec { id, tty, no_tty, command } => {
            let tty = if tty {
                Some(true)
            } else if no_tty {
                Some(false)
            } else {
                None
            };
            exec(&id, agentvm::instance::exec::ExecOptions { argv: command, tty })
        }
        Command::Cri(CriCommand::Prune { work_dir }) => cri_prune(work_dir),
        Command::Flavor(cmd) => flavor_command(cmd),
        Command::Shell { id } => {
            let tty = Some(agentvm::console::is_tty(0));
            exec(&id, agentvm::instance::exec::ExecOptions { argv: Vec::new(), tty })
        }
        Command::Trust { dir, revoke, show } => trust(dir, revoke, show),
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn fail(e: impl std::fmt::Display) -> i32 {
    eprintln!("agentvm: error: {e}");
    125
}

fn run(args: RunArgs, started: std::time::Instant) -> i32 {
    let req = config::Request {
        work_dir: args.work_dir,
        home: args.home,
        memory: args.memory,
        cpus: args.cpus,
        accel: args.accel,
        flavor: args.flavor,
        args: args.args,
        env: args.env,
        env_files: args.env_files,
        network: args.network,
        net_backend: args.net_backend,
        publish: args.publish,
        host_ports: args.host_ports,
        allow: args.allow,
        shield_secrets: args.shield_secrets,
        cri: args.cri,
        cri_disk_size: args.cri_disk_size,
        devshell: args.devshell,
        verbose: args.verbose,
    };
    let settings = match config::resolve(req) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    for warning in settings.warnings.iter().chain(&settings.guest_env.warnings) {
        eprintln!("agentvm: warning: {warning}");
    }
    match launch::run(&settings, started) {
        Ok(code) => code,
        Err(e) => {
            let code = e.exit_code();
            eprintln!("agentvm: error: {e}");
            code
        }
    }
}

fn image_command(cmd: ImageCommand) -> i32 {
    let store = match Store::default_dir() {
        Ok(dir) => Store::open(dir),
        Err(e) => return fail(e),
    };
    let result = match cmd {
        ImageCommand::Build { flavors, refresh, base, cri } => build_images(&store, &flavors, refresh, base, cri),
        ImageCommand::Ls => list_images(&store),
        ImageCommand::Rm { images } => images.iter().try_for_each(|name| {
            let removed = store.remove(name).map_err(|e| e.to_string())?;
            for entry in removed {
                println!("removed {}", entry.dir.display());
            }
            Ok(())
        }),
        ImageCommand::Prune => prune_recipes().and_then(|(bases, layers)| {
            for p in store.prune(&bases, &layers).map_err(|e| e.to_string())? {
                println!("removed {}", p.display());
            }
            Ok(())
        }),
    };
    match result {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

fn stop(ids: &[String], all: bool, timeout: u64) -> i32 {
    let base = agentvm::paths::runtime_base();
    match agentvm::instance::ps::stop(&base, ids, all, std::time::Duration::from_secs(timeout)) {
        Ok(stopped) => {
            for s in stopped {
                if s.killed {
                    println!("{} (killed: it did not stop within {timeout} s)", s.id);
                } else {
                    println!("{}", s.id);
                }
            }
            0
        }
        Err(e) => fail(e),
    }
}

fn flavor_command(cmd: FlavorCommand) -> i32 {
    let flavors = match flavors_here() {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    match cmd {
        FlavorCommand::Ls => {
            for f in flavors.values() {
                println!("{:<12} {}", f.name, f.description);
            }
            0
        }
        FlavorCommand::Show { name } => match agentvm::config::flavor::resolve(&flavors, &name) {
            Ok(f) => {
                print!("{}", agentvm::config::flavor::describe(&f));
                0
            }
            Err(e) => fail(e),
        },
    }
}

/// The flavors as seen from the current directory (a project config only
/// if trusted; the warning when it is not).
fn flavors_here() -> Result<std::collections::BTreeMap<String, agentvm::config::flavor::Flavor>, String> {
    let cwd = std::env::current_dir().map_err(|e| format!("cannot read the current directory: {e}"))?;
    let (flavors, warning) = config::flavors_for(&cwd).map_err(|e| e.to_string())?;
    if let Some(w) = warning {
        eprintln!("agentvm: warning: {w}");
    }
    Ok(flavors)
}

/// The project dir a command names: DIR, else $WORK_DIR, else `.`.
fn project_dir(dir: Option<PathBuf>) -> PathBuf {
    dir.or_else(|| std::env::var_os("WORK_DIR").map(Into::into)).unwrap_or_else(|| ".".into())
}

fn trust(dir: Option<PathBuf>, revoke: bool, show: bool) -> i32 {
    use agentvm::config::trust::Action;
    let action = if revoke {
        Action::Revoke
    } else if show {
        Action::Show
    } else {
        Action::Trust
    };
    // The user's devshell_files are dev shell files too (forgetting needs none).
    let user_files = match action {
        Action::Revoke => Vec::new(),
        _ => match config::user_layer() {
            Ok(layer) => layer.devshell_files,
            Err(e) => return fail(e),
        },
    };
    match agentvm::config::trust::command(action, &project_dir(dir), &user_files) {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => fail(e),
    }
}

fn cri_prune(work_dir: Option<PathBuf>) -> i32 {
    let dir = project_dir(work_dir);
    let real = match dir.canonicalize() {
        Ok(r) => r,
        Err(e) => return fail(format!("work dir {}: {e}; pass an existing directory with --work-dir", dir.display())),
    };
    let data = match agentvm::paths::data_dir() {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let disk = agentvm::guest_env::cri::disk_path(&data, &agentvm::paths::project_home_name(&real));
    match agentvm::guest_env::cri::remove_disk(&disk) {
        Ok(true) => {
            println!("removed {}", disk.display());
            0
        }
        Ok(false) => {
            println!("no container disk for {}", real.display());
            0
        }
        Err(e) => fail(e),
    }
}

fn exec(id: &str, opts: agentvm::instance::exec::ExecOptions) -> i32 {
    match agentvm::instance::exec::exec(&agentvm::paths::runtime_base(), id, opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentvm: error: {e}");
            e.exit_code()
        }
    }
}

/// The recipes of every flavor known here (built-in and configured), which
/// `image prune` keeps.
fn prune_recipes() -> Result<(Vec<Recipe>, Vec<image::LayerRecipe>), String> {
    let flavors = flavors_here()?;
    // With and without the container runtimes: both are in use.
    let bases = flavors.values().flat_map(|f| [launch::base_recipe(f, false), launch::base_recipe(f, true)]).collect();
    let layers = flavors.values().filter_map(launch::layer_recipe).collect();
    Ok((bases, layers))
}

fn build_images(store: &Store, names: &[String], refresh: bool, base: bool, cri: bool) -> Result<(), String> {
    let flavors = flavors_here()?;
    let chosen = names
        .iter()
        .map(|n| agentvm::config::flavor::resolve(&flavors, n))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let mut progress = image::TerminalProgress::new();
    let mut bases = vec![Recipe::base()];
    bases.extend(chosen.iter().map(|f| launch::base_recipe(f, false)));
    if cri {
        let shell = agentvm::config::flavor::resolve(&flavors, "shell").map_err(|e| e.to_string())?;
        bases.push(launch::base_recipe(&shell, true));
        bases.extend(chosen.iter().map(|f| launch::base_recipe(f, true)));
    }
    bases.dedup();
    for recipe in &bases {
        let img =
            if refresh && base { store.build(recipe, &mut progress) } else { store.ensure(recipe, &mut progress) };
        println!("{}", img.map_err(|e| e.to_string())?.dir.display());
    }
    for recipe in chosen.iter().filter_map(launch::layer_recipe) {
        let layer = if refresh {
            store.build_layer(&recipe, &mut progress)
        } else {
            store.ensure_layer(&recipe, &mut progress)
        };
        let layer = layer.map_err(|e| e.to_string())?;
        let versions: Vec<String> = layer.meta.versions.iter().map(|(p, v)| format!("{p}@{v}")).collect();
        println!("{} ({})", layer.dir.display(), versions.join(", "));
    }
    Ok(())
}

fn list_images(store: &Store) -> Result<(), String> {
    let images = store.list().map_err(|e| e.to_string())?;
    let layers = store.list_layers().map_err(|e| e.to_string())?;
    println!("{:<30} {:>7}  {:<17} CONTENTS", "NAME", "SIZE", "CREATED (UTC)");
    for img in images {
        println!(
            "{:<30} {:>6}M  {:<17} kernel {}",
            img.dir.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
            img.meta.size_bytes / (1 << 20),
            agentvm::instance::format_utc(img.meta.created),
            img.meta.kernel_release,
        );
    }
    for layer in layers {
        let versions: Vec<String> = layer.meta.versions.iter().map(|(p, v)| format!("{p}@{v}")).collect();
        println!(
            "{:<30} {:>6}M  {:<17} {}",
            layer.dir.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
            layer.meta.size_bytes / (1 << 20),
            agentvm::instance::format_utc(layer.meta.created),
            versions.join(", "),
        );
    }
    Ok(())
}
