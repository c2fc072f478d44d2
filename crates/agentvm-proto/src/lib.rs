//! The contract between the agentvm launcher (host) and its guest init (PID 1).
//!
//! * [`spec`]: the launch spec, written by the launcher into the per-launch
//!   initramfs at [`spec::SPEC_PATH`] and read by the guest init at boot.
//! * [`frame`]: the framed byte protocol both sides speak over one
//!   virtio-serial port named [`frame::PORT_NAME`]: the program's stdin,
//!   stdout, stderr, terminal size, signals and exit status.
//! * [`guest`]: the guest's paths and user, which both sides rely on.
//! * [`forward`]: TCP connections from the guest to the host ports the user
//!   opened, over a second virtio-serial port.
//! * [`clipboard`]: the host's clipboard for the guest's clipboard tools,
//!   over a virtio-serial port of its own.
//! * [`watch`]: changes the host saw under the project, for the guest's
//!   file watchers, over a virtio-serial port of its own.

pub mod clipboard;
pub mod forward;
pub mod frame;
pub mod guest;
pub mod spec;
pub mod watch;

pub use frame::{exec_port_name, Frame, FrameError, FrameReader, EXEC_PORTS, PORT_NAME};
pub use spec::{
    CaTrust, Containers, ExecRequest, LaunchSpec, Mount, Network, Sandbox, SpecError, User, WarmLaunch, DEFAULT_PATH,
    MODULES_DIR, SPEC_PATH,
};
