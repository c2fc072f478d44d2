//! Where a run's files live: the work dir shared at /work and the agent
//! home, refused when sharing them would hand the guest the whole host,
//! the user's home or agentvm's own state.

use std::path::{Path, PathBuf};

use crate::config::options::Layers;
use crate::config::resources::parse_memory_mib;
use crate::config::trust::TrustStore;
use crate::config::SettingsError;
use crate::paths;
use crate::sandbox::{store, SandboxName};

/// The project dir a command other than `run` names: `dir`, else
/// `$WORK_DIR` (from `get_env`), else `.`.
pub fn project_dir(dir: Option<PathBuf>, get_env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    dir.or_else(|| get_env("WORK_DIR").filter(|d| !d.is_empty()).map(PathBuf::from)).unwrap_or_else(|| ".".into())
}

/// The work dir `asked` for (default: `.`), as a real path.
pub fn work_dir(asked: Option<PathBuf>, guarded: &GuardedDirs) -> Result<PathBuf, SettingsError> {
    let work_dir = real_work_dir(asked.unwrap_or_else(|| PathBuf::from(".")))?;
    guarded.check("work dir", &work_dir, "pass a project directory with --work-dir or WORK_DIR")?;
    Ok(work_dir)
}

/// The agent home: asked for, or the project's own under the data dir.
pub fn home(layers: &Layers, work_dir: &Path, guarded: &GuardedDirs) -> Result<PathBuf, SettingsError> {
    let home = match layers.value(|o| &o.home) {
        Some(h) => absolute(&h),
        None => paths::data_dir()?.join("homes").join(paths::project_home_name(work_dir)),
    };
    // It may not exist yet (it is created at launch).
    if home.exists() && !home.is_dir() {
        return Err(SettingsError::HomeNotADir { path: home });
    }
    if std::fs::canonicalize(&home).ok().as_deref() == Some(work_dir) {
        return Err(SettingsError::HomeIsWorkDir { path: home });
    }
    guarded.check("agent home", &home, "pass another directory with --home or AGENT_HOME")?;
    Ok(home)
}

/// The sandbox a run asks for (`--clone[=NAME]`, `clone = "NAME"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxChoice {
    pub name: SandboxName,
    /// The name was made up for this run (none was given).
    pub new_name: bool,
}

/// The sandbox asked for, its name checked, or a new name when none is
/// given; and the disk size asked for.
pub fn sandbox(layers: &Layers, work_dir: &Path) -> Result<(Option<SandboxChoice>, Option<u64>), SettingsError> {
    let disk_mib = match layers.value(|o| &o.clone_disk_size) {
        None => None,
        Some(size) => Some(parse_memory_mib(&size).map_err(|_| SettingsError::CloneDiskSize(size))?),
    };
    let choice = match layers.value(|o| &o.clone) {
        None => None,
        Some(name) if name.is_empty() => {
            let project = store::project_dir(&paths::data_dir()?, &paths::project_home_name(work_dir));
            let name = SandboxName::generate(|n| project.join(n.as_str()).exists());
            Some(SandboxChoice { name, new_name: true })
        }
        Some(name) => Some(SandboxChoice { name: SandboxName::parse(&name)?, new_name: false }),
    };
    Ok((choice, disk_mib))
}

/// Why a directory may not be shared with the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Exposure {
    #[error("is the root of the host's file system: the guest would get every host file read-write")]
    HostRoot,
    #[error("is your home directory: {HOME_REASON}")]
    UserHome,
    #[error("contains your home directory {}: {HOME_REASON}", .0.display())]
    ContainsUserHome(PathBuf),
    #[error("contains agentvm's {what} {}: {STATE_REASON}", path.display())]
    ContainsAgentvm { what: &'static str, path: PathBuf },
    #[error("is inside agentvm's {what} {}: {STATE_REASON}", path.display())]
    InsideAgentvm { what: &'static str, path: PathBuf },
}

const HOME_REASON: &str =
    "the guest would get all of it read-write (~/.ssh, shell startup files, agentvm's trust records)";
const STATE_REASON: &str = "the guest could change what later runs trust and get";

/// What a share (the work dir, the agent home) must not expose: the whole
/// host, the user's home, and agentvm's own state, config and images,
/// which decide what later runs get.
pub struct GuardedDirs {
    user_home: Option<PathBuf>,
    /// (what it is, where), each a real path as far as it exists.
    agentvm: Vec<(&'static str, PathBuf)>,
    /// The agent homes' dir (inside the data dir): shares may sit below it.
    homes: PathBuf,
}

impl GuardedDirs {
    /// The dirs of the user whose `HOME` `get_env` gives, with the user
    /// config at `user_config` and trust records in `trust`.
    pub fn new(
        get_env: &dyn Fn(&str) -> Option<String>,
        user_config: &Path,
        trust: &TrustStore,
    ) -> Result<GuardedDirs, SettingsError> {
        let data = paths::data_dir()?;
        Ok(GuardedDirs {
            user_home: get_env("HOME")
                .filter(|h| Path::new(h).is_absolute())
                .map(|h| real_as_far_as_exists(Path::new(&h))),
            agentvm: vec![
                ("trust records", real_as_far_as_exists(trust.dir())),
                ("data dir", real_as_far_as_exists(&data)),
                // The file, and where it points if it is a link (dotfile managers).
                ("config", real_parent(user_config)),
                ("config", real_as_far_as_exists(user_config)),
                ("image cache", real_as_far_as_exists(&paths::cache_dir()?)),
            ],
            homes: real_as_far_as_exists(&data.join("homes")),
        })
    }

    /// Refuses `dir` (shared read-write as `what`) if it exposes too much.
    fn check(&self, what: &'static str, dir: &Path, fix: &'static str) -> Result<(), SettingsError> {
        let dir = real_as_far_as_exists(dir);
        match self.exposure(&dir) {
            None => Ok(()),
            Some(why) => Err(SettingsError::ShareTooWide { what, path: dir, why, fix }),
        }
    }

    fn exposure(&self, dir: &Path) -> Option<Exposure> {
        if dir.parent().is_none() {
            return Some(Exposure::HostRoot);
        }
        if let Some(home) = self.user_home.as_deref().filter(|h| h.starts_with(dir)) {
            return Some(if home == dir { Exposure::UserHome } else { Exposure::ContainsUserHome(home.into()) });
        }
        for (what, guarded) in &self.agentvm {
            if guarded.starts_with(dir) {
                return Some(Exposure::ContainsAgentvm { what, path: guarded.clone() });
            }
            let in_a_home = dir.starts_with(&self.homes) && dir != self.homes;
            if dir.starts_with(guarded) && !in_a_home {
                return Some(Exposure::InsideAgentvm { what, path: guarded.clone() });
            }
        }
        None
    }
}

/// `p` in its parent's real path (a link `p` itself is not followed).
fn real_parent(p: &Path) -> PathBuf {
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) => real_as_far_as_exists(dir).join(name),
        _ => p.to_path_buf(),
    }
}

/// `p` with its longest existing ancestor resolved to a real path (the rest
/// may not exist yet).
pub(crate) fn real_as_far_as_exists(p: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut at = p;
    loop {
        if let Ok(real) = std::fs::canonicalize(at) {
            return missing.iter().rev().fold(real, |acc, name| acc.join(name));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name);
                at = parent;
            }
            _ => return p.to_path_buf(),
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    }
}

/// The work dir must exist, be a directory and be readable.
fn real_work_dir(path: PathBuf) -> Result<PathBuf, SettingsError> {
    let real = match std::fs::canonicalize(&path) {
        Ok(real) => real,
        Err(source) => return Err(SettingsError::WorkDir { path, source }),
    };
    if !real.is_dir() {
        return Err(SettingsError::WorkDirNotADir { path });
    }
    match std::fs::read_dir(&real) {
        Ok(_) => Ok(real),
        Err(source) => Err(SettingsError::WorkDirUnreadable { path, source }),
    }
}
