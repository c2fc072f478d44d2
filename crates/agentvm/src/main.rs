//! The `agentvm` binary: parses the command line, hands over to the
//! library and prints what comes back.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use agentvm::cli::{self, Command, CriCommand, FlavorCommand, ImageCommand, RunArgs, SandboxCommand};
use agentvm::commands::{self, Built, ImageBuild, Pruned};
use agentvm::config::{self, flavor, trust};
use agentvm::image::{Store, TerminalProgress};
use agentvm::instance::{exec, format_utc, ps};
use agentvm::{doctor, launch, paths};

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match cli::parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) if e.exit_code() == 0 => e.exit(),
        Err(e) => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            return ExitCode::from(fail(cli::usage_error(&e, &args)) as u8);
        }
    };
    let code = match cli.command {
        Command::Run(args) => run(*args, started),
        Command::Image(cmd) => done(image_command(cmd)),
        Command::Doctor => {
            let checks = doctor::run_checks();
            print!("{}", doctor::report(&checks));
            i32::from(!doctor::all_passed(&checks))
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut cli::command(), "agentvm", &mut std::io::stdout());
            0
        }
        Command::Man => match clap_mangen::Man::new(cli::command()).render(&mut std::io::stdout()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => fail(e),
            _ => 0,
        },
        Command::Ps { json } => {
            print!("{}", ps::ps(&paths::runtime_base(), json));
            0
        }
        Command::Stop { ids, all, timeout } => done(stop(&ids, all, timeout)),
        Command::Logs { id, follow, net } => {
            done(ps::logs(&paths::runtime_base(), &id, net, follow, &mut std::io::stdout()))
        }
        Command::Exec { id, tty, no_tty, command } => {
            let tty = (tty || no_tty).then_some(tty);
            exec_in(&id, exec::ExecOptions { argv: command, tty, no_input: false })
        }
        Command::Cri(CriCommand::Prune { work_dir }) => done(cri_prune(work_dir)),
        Command::Flavor(cmd) => done(flavor_command(cmd)),
        Command::Shell { id } => {
            let tty = Some(agentvm::sys::is_tty(std::io::stdin()));
            exec_in(&id, exec::ExecOptions { argv: Vec::new(), tty, no_input: false })
        }
        Command::Trust { dir, revoke, show } => done(trust_command(dir, revoke, show)),
        Command::Sandbox(cmd) => done(sandbox_command(cmd)),
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn fail(e: impl std::fmt::Display) -> i32 {
    eprintln!("agentvm: error: {e}");
    125
}

fn warn(warning: impl std::fmt::Display) {
    eprintln!("agentvm: warning: {warning}");
}

/// The exit status of a command that printed its own output.
fn done<E: std::fmt::Display>(result: Result<(), E>) -> i32 {
    result.map_or_else(fail, |()| 0)
}

/// The host's environment, as the library reads it.
fn host_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn run(args: RunArgs, started: Instant) -> i32 {
    let settings = match config::resolve(args.options) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    settings.warnings.iter().chain(&settings.guest_env.warnings).for_each(warn);
    if args.print_plan {
        return match launch::plan_only(&settings, started, &mut |w: String| warn(w)) {
            Ok(report) if args.json => {
                println!("{}", report.to_json());
                0
            }
            Ok(report) => {
                print!("{report}");
                0
            }
            Err(e) => fail(e),
        };
    }
    if let Some(clone) = settings.clone.as_ref().filter(|c| c.new_name) {
        eprintln!("agentvm: sandbox {} (its work comes back as the branch {})", clone.name, clone.name.branch());
    }
    match launch::run(&settings, started, &mut |w: String| warn(w)) {
        Ok(outcome) => {
            let code = report_outcome(&outcome, settings.verbose);
            report_sandbox(&outcome, &settings);
            code
        }
        Err(e) => {
            eprintln!("agentvm: error: {e}");
            e.exit_code()
        }
    }
}

/// Prints what `--verbose` asks for and the error, if any; the exit status.
fn report_outcome(outcome: &launch::Outcome, verbose: bool) -> i32 {
    if verbose {
        eprintln!("{}", outcome.timings_line());
    }
    if let Some(console) = &outcome.console {
        eprintln!("{}", console.heading());
        eprintln!("{}", String::from_utf8_lossy(&console.text));
    }
    if let Err(e) = &outcome.result {
        eprintln!("agentvm: error: {e}");
    }
    outcome.exit_code()
}

/// What became of the sandbox's work (`--clone`).
fn report_sandbox(outcome: &launch::Outcome, settings: &config::Settings) {
    match (&outcome.sandbox, &settings.clone) {
        (Some(Ok(imported)), _) => eprintln!("agentvm: {imported}"),
        (Some(Err(e)), _) => eprintln!("agentvm: error: {e}"),
        (None, Some(clone)) => eprintln!(
            "agentvm: sandbox {0} keeps its work on its disk: `agentvm sandbox export {0}` brings it back as {1}",
            clone.name,
            clone.name.branch()
        ),
        (None, None) => {}
    }
}

fn sandbox_command(cmd: SandboxCommand) -> Result<(), commands::CommandError> {
    match cmd {
        SandboxCommand::Ls { json: true } => {
            println!("{}", serde_json::to_string_pretty(&commands::sandbox_ls()?).expect("serializable"))
        }
        SandboxCommand::Ls { json: false } => print!("{}", commands::sandbox_table(&commands::sandbox_ls()?)),
        SandboxCommand::Rm { names, work_dir } => {
            commands::sandbox_rm(&names, work_dir, &host_env)?.iter().for_each(|d| println!("removed {}", d.display()))
        }
        SandboxCommand::Export { name, work_dir } => {
            let imported = commands::sandbox_export(&name, work_dir, &host_env, &mut |w: String| warn(w))?;
            println!("{imported}");
        }
    }
    Ok(())
}

fn image_command(cmd: ImageCommand) -> Result<(), commands::CommandError> {
    let store = Store::open(Store::default_dir()?);
    match cmd {
        ImageCommand::Build { flavors, refresh, base, cri } => {
            let (known, warning) = commands::flavors_here()?;
            warning.into_iter().for_each(warn);
            let build = ImageBuild::plan(&known, &flavors, refresh, base, cri)?;
            for built in build.run(&store, &mut TerminalProgress::new()) {
                match built? {
                    Built::Image(image) => println!("{}", image.dir.display()),
                    Built::Layer(layer) => println!("{} ({})", layer.dir.display(), versions(&layer.meta.versions)),
                }
            }
        }
        ImageCommand::Ls => list_images(&store)?,
        ImageCommand::Rm { images } => {
            for name in images {
                store.remove(&name)?.iter().for_each(|entry| println!("removed {}", entry.dir.display()));
            }
        }
        ImageCommand::Prune => {
            let (removed, warning) = commands::image_prune(&store)?;
            warning.into_iter().for_each(warn);
            removed.iter().for_each(|p| println!("removed {}", p.display()));
        }
    }
    Ok(())
}

/// `package@version, ...`
fn versions<'a>(versions: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    versions.into_iter().map(|(p, v)| format!("{p}@{v}")).collect::<Vec<_>>().join(", ")
}

fn list_images(store: &Store) -> Result<(), agentvm::image::ImageError> {
    let name = |dir: &std::path::Path| dir.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
    println!("{:<30} {:>7}  {:<17} CONTENTS", "NAME", "SIZE", "CREATED (UTC)");
    for img in store.list()? {
        let (size, created) = (img.meta.size_bytes >> 20, format_utc(img.meta.created));
        println!("{:<30} {size:>6}M  {created:<17} kernel {}", name(&img.dir), img.meta.kernel_release);
    }
    for layer in store.list_layers()? {
        let (size, created) = (layer.meta.size_bytes >> 20, format_utc(layer.meta.created));
        println!("{:<30} {size:>6}M  {created:<17} {}", name(&layer.dir), versions(&layer.meta.versions));
    }
    Ok(())
}

fn stop(ids: &[String], all: bool, timeout: u64) -> Result<(), ps::InstancesError> {
    for s in ps::stop(&paths::runtime_base(), ids, all, Duration::from_secs(timeout))? {
        if s.killed {
            println!("{} (killed: it did not stop within {timeout} s)", s.id);
        } else {
            println!("{}", s.id);
        }
    }
    Ok(())
}

fn flavor_command(cmd: FlavorCommand) -> Result<(), commands::CommandError> {
    let (flavors, warning) = commands::flavors_here()?;
    warning.into_iter().for_each(warn);
    match cmd {
        FlavorCommand::Ls => flavors.values().for_each(|f| println!("{:<12} {}", f.name, f.description)),
        FlavorCommand::Show { name } => print!("{}", flavor::describe(&flavor::resolve(&flavors, &name)?)),
    }
    Ok(())
}

fn trust_command(dir: Option<std::path::PathBuf>, revoke: bool, show: bool) -> Result<(), commands::CommandError> {
    let action = match (revoke, show) {
        (true, _) => trust::Action::Revoke,
        (false, true) => trust::Action::Show,
        (false, false) => trust::Action::Trust,
    };
    print!("{}", commands::trust(action, dir, &host_env)?);
    Ok(())
}

fn cri_prune(work_dir: Option<std::path::PathBuf>) -> Result<(), commands::CommandError> {
    match commands::cri_prune(work_dir, &host_env)? {
        Pruned::Removed(disk) => println!("removed {}", disk.display()),
        Pruned::NoDisk(project) => println!("no container disk for {}", project.display()),
    }
    Ok(())
}

fn exec_in(id: &str, opts: exec::ExecOptions) -> i32 {
    match exec::exec(&paths::runtime_base(), id, opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentvm: error: {e}");
            e.exit_code()
        }
    }
}
