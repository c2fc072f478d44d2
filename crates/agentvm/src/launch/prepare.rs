//! The second stage: the host state a run keeps while it lasts: the agent
//! home, the project's container disk (locked), the sandbox (locked, its
//! disk made), and the instance's runtime dir with the metadata `ps` reads.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use super::resources::SandboxPlan;
use crate::config::Settings;
use crate::guest_env::cri;
use crate::guest_env::home::{self, VmFacts};
use crate::instance::{self, Instance, InstanceMeta};
use crate::sandbox::store::{self, StoreError};

/// The host state could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("cannot create the agent home {path}: {source}")]
    Home { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Cri(#[from] cri::CriError),
    #[error(transparent)]
    Instance(#[from] instance::InstanceError),
    #[error(transparent)]
    Sandbox(#[from] StoreError),
}

/// What the run holds until it ends: dropping it removes the instance dir
/// and unlocks the container disk.
pub struct Prepared {
    pub instance: Instance,
    pub meta: InstanceMeta,
    /// Locked for the whole run: one run of a project at a time uses it.
    pub cri_disk: Option<cri::Disk>,
    /// Locked for the whole run: one run at a time uses a sandbox.
    pub sandbox: Option<store::InUse>,
}

impl Prepared {
    /// Opens the sandbox, creates the agent home (and its notes), opens the
    /// container disk at `cri_disk`, and creates the instance.
    pub fn new(
        settings: &Settings,
        cri_disk: Option<&PathBuf>,
        sandbox: Option<&SandboxPlan>,
        warn: &mut dyn FnMut(String),
    ) -> Result<Prepared, PrepareError> {
        let sandbox = sandbox.map(|s| open_sandbox(settings, s, warn)).transpose()?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&settings.home_dir)
            .map_err(|source| PrepareError::Home { path: settings.home_dir.clone(), source })?;
        let facts = VmFacts { memory_mib: settings.memory_mib, cpus: settings.cpus };
        if let Err(e) = home::prepare(&settings.home_dir, &settings.flavor, &facts, home::host_git_identity) {
            warn(format!("could not prepare the agent home: {e}"));
        }
        let cri_disk = cri_disk.map(|path| cri::open_disk(path, settings.cri_disk_mib)).transpose()?;
        let instance = Instance::create(&crate::paths::runtime_base())?;
        let mut meta = instance_meta(settings, &instance.id);
        meta.sandbox = sandbox.as_ref().map(|s| s.name.to_string());
        instance.write_meta(&meta)?;
        Ok(Prepared { instance, meta, cri_disk, sandbox })
    }

    /// Records QEMU's pid for `agentvm ps` (memory use) and `agentvm stop`.
    pub fn record_qemu(&mut self, pid: u32) -> Result<(), PrepareError> {
        self.meta.qemu_pid = Some(pid);
        Ok(self.instance.write_meta(&self.meta)?)
    }
}

/// Locks the sandbox for this run and makes its disk if it is new.
fn open_sandbox(
    settings: &Settings,
    plan: &SandboxPlan,
    warn: &mut dyn FnMut(String),
) -> Result<store::InUse, StoreError> {
    let req = store::Request {
        name: &plan.name,
        project: &settings.work_dir,
        disk_mib: settings.clone_disk_mib.unwrap_or(store::DEFAULT_DISK_MIB),
        size_asked: settings.clone_disk_mib.is_some(),
        base: &plan.base,
    };
    store::open(&plan.paths, &req, warn)
}

fn instance_meta(settings: &Settings, id: &str) -> InstanceMeta {
    let pid = std::process::id();
    InstanceMeta {
        id: id.to_string(),
        pid,
        pid_start: instance::process_start_ticks(pid),
        flavor: settings.flavor.name.clone(),
        work_dir: settings.work_dir.clone(),
        memory_mib: settings.memory_mib,
        cpus: settings.cpus,
        started: instance::now_secs(),
        qemu_pid: None,
        ports: settings.ports.iter().map(ToString::to_string).collect(),
        host_ports: settings.host_ports.clone(),
        sandbox: None,
    }
}
