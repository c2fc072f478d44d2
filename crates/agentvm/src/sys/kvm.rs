//! The KVM probe: a guest of one `hlt` at the x86 reset vector
//! (0xfffffff0), so no register set-up is needed.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
const KVM_GET_VCPU_MMAP_SIZE: libc::c_ulong = 0xAE04;
const KVM_CREATE_VCPU: libc::c_ulong = 0xAE41;
const KVM_RUN: libc::c_ulong = 0xAE80;
const KVM_SET_USER_MEMORY_REGION: libc::c_ulong = 0x4020_AE46;
const KVM_EXIT_HLT: u32 = 5;
const KVM_API_VERSION: i32 = 12;
const PAGE: usize = 4096;
const PAGE_GPA: u64 = 0xffff_f000;

/// Why the test guest did not run to its `hlt`.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{call}: {source}")]
    Call { call: &'static str, source: io::Error },
    #[error("unexpected KVM API version {0}")]
    ApiVersion(i32),
    #[error("test guest stopped with KVM exit reason {0}, expected hlt")]
    Exit(u32),
}

#[repr(C)]
struct MemoryRegion {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

fn ioctl(fd: &impl AsRawFd, call: &'static str, req: libc::c_ulong, arg: libc::c_ulong) -> Result<i32, ProbeError> {
    // SAFETY: KVM ioctls on fds we own; the only pointer argument passed
    // (KVM_SET_USER_MEMORY_REGION) points to a live, correctly laid-out struct.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 {
        Err(ProbeError::Call { call, source: io::Error::last_os_error() })
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

fn map(call: &'static str, len: usize, fd: Option<&OwnedFd>) -> Result<Mapping, ProbeError> {
    let (flags, fd) = match fd {
        None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
    };
    // SAFETY: a fresh mapping; the kernel picks the address.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(ProbeError::Call { call, source: io::Error::last_os_error() });
    }
    Ok(Mapping(p, len))
}

/// Runs the one-instruction guest on the opened `/dev/kvm` to completion.
pub fn run_hlt_guest(kvm: &File) -> Result<(), ProbeError> {
    let version = ioctl(kvm, "KVM_GET_API_VERSION", KVM_GET_API_VERSION, 0)?;
    if version != KVM_API_VERSION {
        return Err(ProbeError::ApiVersion(version));
    }
    let vm = owned(ioctl(kvm, "KVM_CREATE_VM", KVM_CREATE_VM, 0)?);
    let mem = map("mapping the guest's memory", PAGE, None)?;
    // SAFETY: the page is PAGE bytes long and writable.
    unsafe { *(mem.0 as *mut u8).add(0xff0) = 0xf4 }; // hlt
    let region = MemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: PAGE_GPA,
        memory_size: PAGE as u64,
        userspace_addr: mem.0 as u64,
    };
    let region_ptr = &region as *const MemoryRegion as libc::c_ulong;
    ioctl(&vm, "KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION, region_ptr)?;
    let vcpu = owned(ioctl(&vm, "KVM_CREATE_VCPU", KVM_CREATE_VCPU, 0)?);
    let run_size = ioctl(kvm, "KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE, 0)? as usize;
    let run = map("mapping the vCPU's run structure", run_size, Some(&vcpu))?;
    ioctl(&vcpu, "KVM_RUN", KVM_RUN, 0)?;
    // SAFETY: struct kvm_run starts with two u8 flags, 6 pad bytes, then
    // the u32 exit_reason at offset 8, within the mapping.
    let exit_reason = unsafe { *((run.0 as *const u8).add(8) as *const u32) };
    if exit_reason == KVM_EXIT_HLT {
        Ok(())
    } else {
        Err(ProbeError::Exit(exit_reason))
    }
}
