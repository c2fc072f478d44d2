//! Choosing the accelerator: KVM when it can really run a guest, else TCG.

use std::fmt;
use std::path::Path;

/// The accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// What the user asked for (`--accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// Why KVM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("/dev/kvm does not exist: the CPU's virtualization is off or kvm modules are not loaded (enable VT-x/AMD-V, `modprobe kvm_intel` or `kvm_amd`)")]
    NoDevice,
    #[error(
        "cannot open /dev/kvm: {0} (add yourself to the kvm group: `sudo usermod -aG kvm $USER`, then log in again)"
    )]
    NoAccess(#[source] std::io::Error),
    #[error("/dev/kvm is PVM (kvm_pvm), which cannot boot stock kernels")]
    Pvm,
    /// A step of the one-instruction test guest failed.
    #[error("KVM could not run a test guest: {step} failed: {source}")]
    Probe { step: &'static str, source: std::io::Error },
    /// /dev/kvm speaks another API than the stable one (no error lies under it).
    #[error("KVM could not run a test guest: /dev/kvm has KVM API version {0}, not 12")]
    ApiVersion(i32),
    /// The test guest stopped, but not at its `hlt`.
    #[error("KVM could not run a test guest: it stopped with KVM exit reason {0}, expected hlt")]
    NoHlt(u32),
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Resolves the user's choice. `Auto` probes KVM and falls back to TCG,
/// returning the reason as a warning; an explicit `Kvm` that cannot work is
/// an error.
pub fn choose(choice: AccelChoice) -> Result<(Accel, Option<AccelError>), AccelError> {
    match choice {
        AccelChoice::Tcg => Ok((Accel::Tcg, None)),
        AccelChoice::Kvm => probe_kvm().map(|()| (Accel::Kvm, None)),
        AccelChoice::Auto => match probe_kvm() {
            Ok(()) => Ok((Accel::Kvm, None)),
            Err(why) => Ok((Accel::Tcg, Some(why))),
        },
    }
}

/// Checks that KVM can run a guest: opens /dev/kvm and runs a one-instruction
/// (`hlt`) guest to completion.
pub fn probe_kvm() -> Result<(), AccelError> {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return Err(AccelError::NoDevice);
    }
    // PVM runs the tiny probe fine but hangs real kernels; rule it out first.
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(AccelError::Pvm);
    }
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open(dev).map_err(AccelError::NoAccess)?;
    Ok(crate::sys::kvm::run_hlt_guest(&kvm)?)
}

impl From<crate::sys::kvm::ProbeError> for AccelError {
    fn from(e: crate::sys::kvm::ProbeError) -> AccelError {
        use crate::sys::kvm::ProbeError;
        match e {
            ProbeError::Call { call, source } => AccelError::Probe { step: call, source },
            ProbeError::ApiVersion(version) => AccelError::ApiVersion(version),
            ProbeError::Exit(reason) => AccelError::NoHlt(reason),
        }
    }
}

/// The host's TSC frequency in kHz, for the guest's `tsc_early_khz`.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_mhz(&info).map(|mhz| (mhz * 1000.0).round() as u64)
}

fn parse_cpu_mhz(cpuinfo: &str) -> Option<f64> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_mhz_parses_from_cpuinfo() {
        let info = "processor\t: 0\ncpu MHz\t\t: 2445.406\ncache size\t: 512 KB\n";
        assert_eq!(parse_cpu_mhz(info), Some(2445.406));
        assert_eq!(parse_cpu_mhz("nothing"), None);
    }

    #[test]
    fn explicit_tcg_needs_no_probe() {
        assert!(matches!(choose(AccelChoice::Tcg), Ok((Accel::Tcg, None))));
    }

    #[test]
    fn auto_always_yields_an_accelerator() {
        let (accel, warning) = choose(AccelChoice::Auto).unwrap();
        assert_eq!(accel == Accel::Tcg, warning.is_some());
    }
}
