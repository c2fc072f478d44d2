//! The virtual machine: accelerator choice, QEMU's command line, and running it.

pub mod accel;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod share;
pub mod share_filter;

pub use accel::{Accel, AccelChoice, AccelError};
pub use qemu::{
    kernel_cmdline, layer_serial, qemu_args, qemu_machine_args, qemu_memory_mib, VmConfig, DATA_SERIAL, ROOT_SERIAL,
    SANDBOX_SERIAL,
};
