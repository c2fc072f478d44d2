//! agentvm-guest: PID 1 of an agentvm guest.
//!
//! Boots from the per-launch initramfs (mounts, modules, overlay root), sets
//! up the system and the user, runs the program described by the launch spec
//! on a pty or pipes, relays its I/O over the control port, reports its exit
//! code, and powers the VM off. See `agentvm_proto` for the contract.

mod boot;
mod clipboard;
mod clipboard_tools;
mod console;
mod containers;
mod error;
mod etc;
mod exec;
mod forward;
mod net;
mod port;
mod power;
mod program;
mod relay;
mod sandbox;
mod session;
mod sys;
mod warm;
mod watch;

use agentvm_proto::Frame;
use error::{Error, Result};
use std::path::Path;
use std::time::Duration;

/// How long to wait for the control port to show up after module loading.
const PORT_WAIT: Duration = Duration::from_secs(5);

fn main() {
    // Called as a clipboard tool (a link the init made with --clipboard).
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = clipboard_tools::run_if_tool(&args) {
        std::process::exit(code);
    }
    if sys::getpid() != 1 {
        eprintln!("agentvm-guest: must run as PID 1 inside an agentvm guest (it powers the machine off)");
        std::process::exit(2);
    }
    power::install_panic_hook();
    match run() {
        Ok(relay::Outcome::Exited(_)) | Ok(relay::Outcome::HostGone) => power::shutdown(),
        Err(e) => power::fatal(&e.to_string()),
    }
}

/// The whole life of the guest up to power-off.
fn run() -> Result<relay::Outcome> {
    boot::early_mounts()?;
    let spec = boot::read_spec()?;
    console::set_verbose(spec.verbose);
    console::step("spec read");
    let (mut spec, mut port) = if spec.template { warm::boot_template(&spec)? } else { cold_boot(spec)? };
    boot::mount_shares(&spec.mounts)?;
    if let Some(net) = &spec.network {
        net::configure(net)?;
    }
    console::step(&format!("user {}", spec.user.name));
    etc::setup_user(Path::new("/"), &spec.user)?;
    etc::setup_login_path(Path::new("/"), &spec.env)?;
    // Before the container runtimes start: their daemons verify registries.
    console::step("install the trust store");
    etc::install_trust(Path::new("/"), &spec.ca_trust)?;
    let sandbox = spec.sandbox.as_ref().map(|s| sandbox::open(s, &spec.user)).transpose()?;
    if let Some(c) = &spec.containers {
        containers::prepare(c, &spec.user)?;
        let env = containers::start(c, &spec.user)?;
        spec.env.extend(env);
    }
    let groups = etc::user_groups(Path::new("/"), &spec.user)?;
    let sigchld = sys::sigchld_fd().map_err(|e| Error::sys("signalfd(SIGCHLD)", e))?;
    // After SIGCHLD is blocked: its threads inherit the mask, so the signal
    // stays for the signalfd instead of being discarded by one of them.
    forward::start(&spec.host_ports, &spec.published_ports)?;
    if spec.clipboard {
        clipboard::start()?;
    }
    let watch_off = if spec.watch { watch::start() } else { None };
    let mut exec = exec::ExecPorts::open(&spec, groups.clone());
    if let Some(line) = watch_off {
        port.send(&Frame::Stderr(line.into_bytes()))?;
    }
    port.send(&Frame::Started)?;
    console::step("start the program");
    let child = program::spawn(&spec, groups)?;
    let outcome = relay::run(&mut port, child, &sigchld, &mut exec)?;
    if let relay::Outcome::Exited(code) = outcome {
        console::step(&format!("program exited with {code}"));
        // Everything is stopped and written before the exit status: the
        // host ends the VM as soon as it has it, without waiting for the
        // kernel's power-off.
        power::stop_all();
        if let (Some(s), Some(disk)) = (&spec.sandbox, sandbox) {
            // The host reads the results once it has the exit status. No
            // process is left to write to the disk meanwhile.
            if let Err(e) = disk.export(s, &spec.user) {
                console::line(&e.to_string());
                let _ = port.send(&Frame::Stderr(format!("agentvm-guest: {e}\n").into_bytes()));
            }
            disk.close();
        }
        power::sync();
        // The host may already be gone; powering off is all that is left either way.
        let _ = port.send(&Frame::Exit(code));
    } else {
        console::step("host closed the control port");
    }
    Ok(outcome)
}

/// A boot from the initramfs' spec: modules, control port, root, system.
fn cold_boot(spec: agentvm_proto::LaunchSpec) -> Result<(agentvm_proto::LaunchSpec, port::Port)> {
    boot::load_modules(&spec.modules)?;
    console::step("find the control port");
    let port = port::Port::open(PORT_WAIT)?;
    boot::mount_root(&spec)?;
    boot::switch_root()?;
    boot::setup_system(&spec)?;
    Ok((spec, port))
}
