//! The guest's share of the host: memory, vCPUs, the accelerator.

use crate::config::options::Layers;
use crate::config::SettingsError;
use crate::vm::AccelChoice;

/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u64 = 4096;
/// Smallest guest memory that boots our image with room for a program.
pub const MIN_MEMORY_MIB: u64 = 256;
/// Default vCPUs: the smaller of this and the host's cores.
pub const DEFAULT_MAX_CPUS: u32 = 4;
/// Default guest memory when container runtimes are on (unless the user
/// set one): image builds and several containers need room.
pub const CRI_MEMORY_MIB: u64 = 8192;

/// Facts about the host that bound the settings.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    pub cores: u32,
    pub memory_mib: u64,
}

impl HostLimits {
    pub fn detect() -> HostLimits {
        let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map(|kb| kb / 1024)
            .unwrap_or(u64::MAX);
        HostLimits { cores, memory_mib }
    }
}

/// What the guest gets of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: AccelChoice,
}

/// The guest's resources within `host`'s; `containers`: container runtimes
/// will run (they raise the default memory).
pub fn resolve(layers: &Layers, host: HostLimits, containers: bool) -> Result<Resources, SettingsError> {
    let memory_mib = match layers.value(|o| &o.memory) {
        None => {
            let want = if containers { CRI_MEMORY_MIB } else { DEFAULT_MEMORY_MIB };
            want.min(host.memory_mib / 2).max(MIN_MEMORY_MIB)
        }
        Some(m) => {
            let mib = parse_memory_mib(&m)?;
            if mib < MIN_MEMORY_MIB {
                return Err(SettingsError::MemoryTooSmall { value: m });
            }
            if mib > host.memory_mib {
                return Err(SettingsError::MemoryTooLarge { value: m, host_mib: host.memory_mib });
            }
            mib
        }
    };
    let cpus = layers.value(|o| &o.cpus).unwrap_or(DEFAULT_MAX_CPUS.min(host.cores));
    if cpus == 0 || cpus > host.cores {
        return Err(SettingsError::Cpus { value: cpus, max: host.cores });
    }
    Ok(Resources { memory_mib, cpus, accel: layers.value(|o| &o.accel).unwrap_or_default() })
}

/// Parses a memory size into MiB: `4G`, `4GiB`, `512M`, `512MiB`, `2048`.
pub fn parse_memory_mib(s: &str) -> Result<u64, SettingsError> {
    let err = || SettingsError::MemoryFormat(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        _ => return Err(err()),
    };
    n.checked_mul(factor).ok_or_else(err)
}
