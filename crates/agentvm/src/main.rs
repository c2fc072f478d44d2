//! The `agentvm` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use agentvm::cli::{Cli, Command, ImageCommand, RunArgs};
use agentvm::image::{self, Recipe, Store};
use agentvm::{doctor, launch, settings};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run(args),
        Command::Image(cmd) => image_command(cmd),
        Command::Doctor => i32::from(!doctor::report(&doctor::run_checks())),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "agentvm", &mut std::io::stdout());
            0
        }
        Command::Man => match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
            Ok(()) => 0,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
            Err(e) => fail(e),
        },
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn fail(e: impl std::fmt::Display) -> i32 {
    eprintln!("agentvm: error: {e}");
    125
}

fn run(args: RunArgs) -> i32 {
    let req = settings::Request {
        work_dir: args.work_dir,
        home: args.home,
        memory: args.memory,
        cpus: args.cpus,
        accel: args.accel,
        flavor: args.flavor,
        args: args.args,
        verbose: args.verbose,
    };
    let settings = match settings::resolve(req) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    match launch::run(&settings) {
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
        ImageCommand::Build { force } => {
            let mut progress = image::TerminalProgress::new();
            let built = if force {
                store.build(&Recipe::base(), &mut progress)
            } else {
                store.ensure(&Recipe::base(), &mut progress)
            };
            built.map(|img| println!("{}", img.dir.display()))
        }
        ImageCommand::Ls => store.list().map(|images| {
            println!("{:<24} {:>7}  {:<17} {:<28} KEY", "NAME", "SIZE", "CREATED (UTC)", "KERNEL");
            for img in images {
                println!(
                    "{:<24} {:>6}M  {:<17} {:<28} {}",
                    img.dir.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
                    img.meta.size_bytes / (1 << 20),
                    agentvm::instance::format_utc(img.meta.created),
                    img.meta.kernel_release,
                    &img.meta.key[..16],
                );
            }
        }),
        ImageCommand::Rm { images } => images.iter().try_for_each(|name| {
            store.remove(name).map(|removed| {
                for img in removed {
                    println!("removed {}", img.dir.display());
                }
            })
        }),
        ImageCommand::Prune => store.prune(&[Recipe::base()]).map(|removed| {
            for p in removed {
                println!("removed {}", p.display());
            }
        }),
    };
    match result {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}
