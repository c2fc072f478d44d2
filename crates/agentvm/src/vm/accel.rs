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
    hlt_guest::run(&kvm)
}

mod hlt_guest {
    //! A guest of one `hlt` at the x86 reset vector (0xfffffff0), so no
    //! register set-up is needed.
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::AccelError;

    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    const KVM_GET_VCPU_MMAP_SIZE: libc::c_ulong = 0xAE04;
    const KVM_CREATE_VCPU: libc::c_ulong = 0xAE41;
    const KVM_RUN: libc::c_ulong = 0xAE80;
    const KVM_SET_USER_MEMORY_REGION: libc::c_ulong = 0x4020_AE46;
    const KVM_EXIT_HLT: u32 = 5;
    const PAGE: usize = 4096;
    const PAGE_GPA: u64 = 0xffff_f000;

    #[repr(C)]
    struct MemoryRegion {
        slot: u32,
        flags: u32,
        guest_phys_addr: u64,
        memory_size: u64,
        userspace_addr: u64,
    }

    fn ioctl(fd: i32, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<i32> {
        // SAFETY: plain KVM ioctls on fds we own; pointer args point to live,
        // correctly laid-out structs.
        let r = unsafe { libc::ioctl(fd, req as _, arg) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    fn owned(fd: i32) -> OwnedFd {
        // SAFETY: fd was just returned by a successful ioctl and is ours.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    struct Mapping(*mut libc::c_void, usize);
    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmapping a mapping we created, once.
            unsafe { libc::munmap(self.0, self.1) };
        }
    }

    fn map(len: usize, fd: i32) -> io::Result<Mapping> {
        let flags = if fd < 0 { libc::MAP_PRIVATE | libc::MAP_ANONYMOUS } else { libc::MAP_SHARED };
        // SAFETY: a fresh mapping; the kernel picks the address.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping(p, len))
    }

    /// What failed in `step`.
    fn failed(step: &'static str) -> impl FnOnce(io::Error) -> AccelError {
        move |source| AccelError::Probe { step, source }
    }

    pub fn run(kvm: &File) -> Result<(), AccelError> {
        let kfd = kvm.as_raw_fd();
        let version = ioctl(kfd, KVM_GET_API_VERSION, 0).map_err(failed("KVM_GET_API_VERSION"))?;
        if version != 12 {
            return Err(AccelError::ApiVersion(version));
        }
        let vm = owned(ioctl(kfd, KVM_CREATE_VM, 0).map_err(failed("KVM_CREATE_VM"))?);
        let mem = map(PAGE, -1).map_err(failed("mapping the guest's memory"))?;
        // SAFETY: the page is PAGE bytes long and writable.
        unsafe { *(mem.0 as *mut u8).add(0xff0) = 0xf4 }; // hlt
        let region = MemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: PAGE_GPA,
            memory_size: PAGE as u64,
            userspace_addr: mem.0 as u64,
        };
        ioctl(vm.as_raw_fd(), KVM_SET_USER_MEMORY_REGION, &region as *const _ as libc::c_ulong)
            .map_err(failed("KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = owned(ioctl(vm.as_raw_fd(), KVM_CREATE_VCPU, 0).map_err(failed("KVM_CREATE_VCPU"))?);
        let run_size = ioctl(kfd, KVM_GET_VCPU_MMAP_SIZE, 0).map_err(failed("KVM_GET_VCPU_MMAP_SIZE"))? as usize;
        let run = map(run_size, vcpu.as_raw_fd()).map_err(failed("mapping the vCPU's run structure"))?;
        ioctl(vcpu.as_raw_fd(), KVM_RUN, 0).map_err(failed("KVM_RUN"))?;
        // SAFETY: struct kvm_run starts with two u8 flags, 6 pad bytes, then
        // the u32 exit_reason at offset 8, within the mapping.
        let exit_reason = unsafe { *((run.0 as *const u8).add(8) as *const u32) };
        if exit_reason == KVM_EXIT_HLT {
            Ok(())
        } else {
            Err(AccelError::NoHlt(exit_reason))
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
