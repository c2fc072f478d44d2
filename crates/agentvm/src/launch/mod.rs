//! One `agentvm run`: from resolved settings to the program's exit status,
//! as a pipeline of named stages, each in its own file:
//!
//! 1. [`resources`]: what the host brings (programs, accelerator, dev
//!    shell, image, network plan, the program's environment).
//! 2. [`prepare`]: the host state the run keeps (agent home, container
//!    disk, instance dir); the shared login comes into the home and is
//!    kept in step with the store while the VM runs.
//! 3. [`plan`] (pure): shares, spec, network and fd plans, QEMU's argv.
//! 4. [`initramfs`]: the guest init, modules and spec, in memory.
//! 5. [`start`]: the helpers and QEMU; dropping them stops and reaps all.
//! 6. [`watch`]: the relay until QEMU exits.
//! 7. [`outcome`]: the exit status, or why there is none.

pub mod fds;
pub mod initramfs;
pub mod outcome;
pub mod plan;
pub mod prepare;
pub mod print;
pub mod resources;
pub mod start;
pub mod warm;
pub mod watch;

use std::os::fd::OwnedFd;
use std::time::Instant;

pub use outcome::{EndError, Outcome};
pub use plan::Plan;

use outcome::ConsoleDump;
use plan::InstanceRef;
use prepare::Prepared;
use resources::Resources;
use start::{Egress, Started};
use warm::{StartMode, WarmPlan};

use crate::config::Settings;
use crate::guest_env::login;
use crate::image::template::Template;
use crate::sandbox::import::{ImportError, Imported};

/// A launch that failed before the program could run; the program's own
/// failures are exit codes instead.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Resolve(Box<resources::ResolveError>),
    #[error(transparent)]
    Prepare(#[from] prepare::PrepareError),
    #[error(transparent)]
    Initramfs(#[from] initramfs::InitramfsError),
    #[error(transparent)]
    Start(#[from] start::StartError),
    #[error("warm-start template: {0}")]
    Template(Box<warm::WarmError>),
}

impl From<resources::ResolveError> for LaunchError {
    fn from(e: resources::ResolveError) -> LaunchError {
        LaunchError::Resolve(Box::new(e))
    }
}

impl From<warm::WarmError> for LaunchError {
    fn from(e: warm::WarmError) -> LaunchError {
        LaunchError::Template(Box::new(e))
    }
}

impl LaunchError {
    /// 125: agentvm itself failed, as `docker run` does.
    pub fn exit_code(&self) -> i32 {
        125
    }
}

/// Runs the settings' program in a new VM. `clock` is when agentvm
/// started; `warn` is told what the user should know as it happens.
pub fn run(settings: &Settings, clock: Instant, warn: &mut dyn FnMut(String)) -> Result<Outcome, LaunchError> {
    let resolved = Resources::resolve(settings, warn)?;
    let res = &resolved.resources;
    let mut prepared = Prepared::new(settings, res.cri_disk.as_ref(), res.sandbox.as_ref(), warn)?;
    let login = share_login(res.login.clone(), &settings.work_dir, warn);
    let instance = InstanceRef { id: &prepared.instance.id, dir: &prepared.instance.dir };
    let plan = Plan::new(settings, res, instance);
    let planned = clock.elapsed();

    let egress = Egress { allow: &settings.allow, shield: resolved.shield.clone() };
    let watch = start::watch_channel(&plan, warn)?;
    let vm = VmStart { mode: settings.start, plan: &plan, res, egress, watch: watch.as_ref().map(|w| &w.qemu) };
    let mut started = start_vm(vm, &prepared.instance.dir, warn)?;
    if let Some(watch) = watch {
        watch.serve();
    }
    let qemu_started = clock.elapsed();
    prepared.record_qemu(started.qemu.child.id())?;

    let end = started.relay(res.tty)?;
    let (console_log, total) = started.stop();
    if let Some((running, reported)) = login {
        running.finish().into_iter().skip(reported).for_each(warn);
    }
    let console = settings.verbose.then(|| ConsoleDump::read(console_log, total));
    let result = end.into_result(outcome::console_tail(console_log));
    drop(started);
    // The guest wrote its results before it reported the exit status.
    let sandbox = prepared.sandbox.as_ref().filter(|_| result.is_ok()).map(|s| import(s, settings));
    drop(prepared);
    Ok(Outcome { result, planned, qemu_started, console, sandbox })
}

/// With `--login=shared`, the flavor's login files brought from the store
/// into the home and kept in step while the VM runs; and how many problems
/// were told already.
fn share_login(
    places: Option<login::Places>,
    work_dir: &std::path::Path,
    warn: &mut dyn FnMut(String),
) -> Option<(login::Running, usize)> {
    let sync = login::LoginSync::start(places?, work_dir);
    sync.problems().iter().for_each(|p| warn(p.clone()));
    let reported = sync.problems().len();
    Some((sync.spawn(), reported))
}

/// What starting the VM takes.
struct VmStart<'a> {
    mode: StartMode,
    plan: &'a Plan,
    res: &'a Resources,
    egress: Egress<'a>,
    /// QEMU's end of the watch channel, when watching.
    watch: Option<&'a OwnedFd>,
}

/// Starts the VM warm when asked and a template can serve, else cold (with
/// one line saying why a warm start was asked for and did not happen).
fn start_vm(vm: VmStart<'_>, dir: &std::path::Path, warn: &mut dyn FnMut(String)) -> Result<Started, LaunchError> {
    let VmStart { mode, plan, res, egress, watch } = vm;
    if mode == StartMode::Warm {
        match start_warm(plan, res, egress.clone(), dir, watch) {
            Ok(started) => return Ok(started),
            Err(e) => warn(format!("warm start: {e}; starting cold")),
        }
        // The attempt's helpers are gone; their sockets are in the way.
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|e| e == "sock") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let initramfs = initramfs::build(&res.guest_init, &res.image, &plan.spec)?;
    Ok(Started::start(plan, res, egress, dir, &initramfs.bytes, None, watch)?)
}

/// A VM restored from the template of `plan`'s shape (made first if missing).
fn start_warm(
    plan: &Plan,
    res: &Resources,
    egress: Egress<'_>,
    dir: &std::path::Path,
    watch: Option<&OwnedFd>,
) -> Result<Started, start::StartError> {
    let warm = WarmPlan::new(plan, res)?;
    let template = warm::ensure_template(&warm, plan, res)?;
    let plan = Plan { vm: warm::restore_vm(&plan.vm), ..plan.clone() };
    Started::start(&plan, res, egress, dir, &warm.initramfs.bytes, Some(&template), watch)
}

/// Brings the sandbox's result back into the project.
fn import(s: &crate::sandbox::store::InUse, settings: &Settings) -> Result<Imported, ImportError> {
    crate::sandbox::import::import(&s.paths, &s.name, &settings.work_dir)
}

/// The warm-start template of the settings' run, made now (one cold boot
/// and a save) unless the store has it: what the run's first warm start
/// would do (`agentvm image build --warm`).
pub fn make_template(settings: &Settings, warn: &mut dyn FnMut(String)) -> Result<Template, LaunchError> {
    let resolved = Resources::resolve(settings, warn)?;
    let res = &resolved.resources;
    let id = crate::instance::new_id();
    let dir = crate::paths::runtime_base().join(&id);
    let plan = Plan::new(settings, res, InstanceRef { id: &id, dir: &dir });
    let warm = WarmPlan::new(&plan, res)?;
    Ok(warm::ensure_template(&warm, &plan, res)?)
}

/// Resolves and plans a launch without starting anything (`--print-plan`).
pub fn plan_only(
    settings: &Settings,
    clock: Instant,
    warn: &mut dyn FnMut(String),
) -> Result<print::PlanReport, LaunchError> {
    let resolved = Resources::resolve(settings, warn)?;
    let res = &resolved.resources;
    let id = crate::instance::new_id();
    let dir = crate::paths::runtime_base().join(&id);
    let plan = Plan::new(settings, res, InstanceRef { id: &id, dir: &dir });
    let initramfs = initramfs::build(&res.guest_init, &res.image, &plan.spec)?;
    let mut report = print::PlanReport::new(&plan, res, &initramfs, clock.elapsed());
    if settings.start == StartMode::Warm {
        report.start = match WarmPlan::new(&plan, res) {
            Ok(warm) => print::StartReport {
                mode: "warm".into(),
                template_ready: warm::find_template(&warm.key).is_some(),
                template_key: Some(warm.key),
                cold_because: None,
            },
            Err(e) => {
                print::StartReport { mode: "cold".into(), cold_because: Some(e.to_string()), ..Default::default() }
            }
        };
    }
    Ok(report)
}
