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
        Command::Doctor { fix } => doctor(fix),
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

/// `agentvm doctor [--fix]`: the report, the commands that install what is
/// missing, and with `--fix` their run (asking first unless root).
fn doctor(fix: bool) -> i32 {
    let checks = doctor::run_checks();
    print!("{}", doctor::report(&checks));
    let release = agentvm::host_setup::Release::this_host();
    let installer = doctor::installer(&release);
    let steps = doctor::fix_steps(&checks, &release, &installer);
    let failed = i32::from(!doctor::all_passed(&checks));
    if steps.is_empty() {
        return failed;
    }
    let commands = doctor::steps_text(&steps, installer.as_root);
    if !fix {
        print!("To install what is missing (`agentvm doctor --fix` runs these):\n{commands}");
        return failed;
    }
    if !installer.as_root && !agentvm::sys::is_tty(std::io::stdin()) {
        print!("No terminal to ask on: run these yourself, then `agentvm doctor` again:\n{commands}");
        return 1;
    }
    if !installer.as_root && !confirm(&format!("These commands install what is missing:\n{commands}Run them? [y/N] ")) {
        return failed;
    }
    if let Err(e) = doctor::run_steps(&steps, installer.as_root) {
        return fail(e);
    }
    let checks = doctor::run_checks();
    print!("{}", doctor::report(&checks));
    i32::from(!doctor::all_passed(&checks))
}

/// Asks `question` on the terminal; whether the answer is yes.
fn confirm(question: &str) -> bool {
    use std::io::Write;
    print!("{question}");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).is_ok() && matches!(answer.trim(), "y" | "Y" | "yes")
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
        ImageCommand::Build { flavors, refresh, base, cri, warm } => {
            let (known, warning) = commands::flavors_here()?;
            warning.into_iter().for_each(warn);
            let build = ImageBuild::plan(&known, &flavors, refresh, base, cri)?;
            for built in build.run(&store, &mut TerminalProgress::new()) {
                match built? {
                    Built::Image(image) => println!("{}", image.dir.display()),
                    Built::Layer(layer) => {
                        println!("{} ({})", layer.dir.display(), commands::versions(&layer.meta.versions))
                    }
                }
            }
            if warm {
                for (flavor, template) in commands::warm_templates(&flavors, &mut |w: String| warn(w))? {
                    println!("{} (warm start of {flavor})", template.dir.display());
                }
            }
        }
        ImageCommand::Ls => {
            let (listed, warning) = commands::image_list(&store)?;
            warning.into_iter().for_each(warn);
            print!("{}", image_table(&listed));
        }
        ImageCommand::Rm { images } => {
            for name in images {
                commands::image_remove(&store, &name)?.iter().for_each(|dir| println!("removed {}", dir.display()));
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

/// `agentvm image ls`: a row per image and layer, then what an old one means.
fn image_table(listed: &[commands::Listed]) -> String {
    let name = |dir: &std::path::Path| dir.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
    let mut out = format!(
        "{:<30} {:>7}  {:<17} {:<10}  {:<28} CONTENTS\n",
        "NAME", "SIZE", "CREATED (UTC)", "RECIPE", "BUILT BY"
    );
    for l in listed {
        let (size, created) = (l.size_bytes >> 20, format_utc(l.created));
        let built_by = if l.built_by.is_empty() { "-" } else { &l.built_by };
        out.push_str(&format!(
            "{:<30} {size:>6}M  {created:<17} {:<10}  {built_by:<28} {}\n",
            name(&l.dir),
            l.state.as_str(),
            l.contents
        ));
    }
    if listed.iter().any(|l| l.state != commands::RecipeState::Current) {
        out.push_str("old: no recipe of this agentvm (and its flavors) builds it; a run builds anew, `agentvm image prune` removes it\n");
    }
    out
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
