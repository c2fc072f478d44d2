//! Container runtimes in the guest (`--cri`) and the project's disk for them.

use crate::config::options::{Layers, Origin};
use crate::config::resources::parse_memory_mib;
use crate::config::SettingsError;
use crate::guest_env::cri::{self, CriError, Runtime};

/// The container runtimes to start and the size of their disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Containers {
    /// In the order given; none: no container disk either.
    pub runtimes: Vec<Runtime>,
    /// Size of the project's container disk when it is created.
    pub disk_mib: u64,
}

pub fn resolve(layers: &Layers) -> Result<Containers, SettingsError> {
    let runtimes = match layers.value_from(|o| &o.cri) {
        None => Vec::new(),
        Some((list, origin)) => {
            let source = match origin {
                Origin::Flags => "--cri",
                Origin::Environment => "ENABLE_CRI",
                Origin::UserConfig | Origin::ProjectConfig => "cri in a config file",
            };
            cri::parse_list(&list, source)?
        }
    };
    let disk_mib = match layers.value(|o| &o.cri_disk_size) {
        None => cri::DEFAULT_DISK_MIB,
        Some(size) => parse_memory_mib(&size).map_err(|_| CriError::DiskSize(size))?,
    };
    Ok(Containers { runtimes, disk_mib })
}
