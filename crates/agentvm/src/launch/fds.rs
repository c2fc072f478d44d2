//! The file descriptors QEMU inherits, numbered in one place: the QEMU
//! command line names them and the spawn puts them there.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;

/// Which fd number QEMU finds each channel at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FdPlan {
    /// The control port's socket (frames to and from the guest init).
    pub control: RawFd,
    /// The initramfs, a memfd QEMU reads as `/proc/self/fd/N`.
    pub initramfs: RawFd,
    /// The socket to passt, when the guest's interface is behind passt.
    pub network: Option<RawFd>,
    /// The forwarding channel's socket (host ports, proxy, published ports).
    pub forwarding: Option<RawFd>,
    /// The write end of the serial console's pipe.
    pub console: RawFd,
    /// The clipboard channel's socket (`--clipboard`).
    pub clipboard: Option<RawFd>,
    /// The watch channel's socket (host changes for the guest's watchers).
    pub watch: Option<RawFd>,
}

/// Where QEMU finds a warm start's QMP socket and RAM copy: after every
/// number of [`FdPlan`].
pub const QMP_FD: RawFd = 10;
pub const RAM_FD: RawFd = 11;

impl FdPlan {
    /// The numbers for a launch with or without passt, the forwarding
    /// channel, the clipboard channel and the watch channel.
    pub fn new(passt: bool, forwarding: bool, clipboard: bool, watch: bool) -> FdPlan {
        FdPlan {
            control: 3,
            initramfs: 4,
            network: passt.then_some(5),
            forwarding: forwarding.then_some(6),
            console: 7,
            clipboard: clipboard.then_some(8),
            watch: watch.then_some(9),
        }
    }

    /// The path QEMU opens the initramfs by.
    pub fn initrd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.initramfs))
    }

    /// Pairs each of our descriptors with the number QEMU sees it as.
    pub fn pass<'a>(&self, ends: &'a QemuEnds) -> Vec<(BorrowedFd<'a>, RawFd)> {
        let mut pass = vec![(ends.control.as_fd(), self.control), (ends.initramfs.as_fd(), self.initramfs)];
        if let (Some(fd), Some(target)) = (&ends.network, self.network) {
            pass.push((fd.as_fd(), target));
        }
        if let (Some(fd), Some(target)) = (&ends.forwarding, self.forwarding) {
            pass.push((fd.as_fd(), target));
        }
        pass.push((ends.console.as_fd(), self.console));
        if let (Some(fd), Some(target)) = (&ends.clipboard, self.clipboard) {
            pass.push((fd.as_fd(), target));
        }
        if let (Some(fd), Some(target)) = (&ends.watch, self.watch) {
            pass.push((fd.as_fd(), target));
        }
        pass
    }
}

/// QEMU's ends of its channels, held until QEMU has them.
#[derive(Debug)]
pub struct QemuEnds {
    pub control: OwnedFd,
    pub initramfs: OwnedFd,
    pub network: Option<OwnedFd>,
    pub forwarding: Option<OwnedFd>,
    pub console: OwnedFd,
    pub clipboard: Option<OwnedFd>,
    pub watch: Option<OwnedFd>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_fixed_and_optional_channels_absent_when_unused() {
        let all = FdPlan::new(true, true, true, true);
        assert_eq!((all.control, all.initramfs, all.network, all.forwarding, all.console), (3, 4, Some(5), Some(6), 7));
        assert_eq!((all.clipboard, all.watch), (Some(8), Some(9)));
        let none = FdPlan::new(false, false, false, false);
        assert_eq!((none.network, none.forwarding, none.clipboard, none.watch), (None, None, None, None));
        assert_eq!(none.initrd_path(), PathBuf::from("/proc/self/fd/4"));
    }

    #[test]
    fn pass_maps_each_end_to_its_number() {
        let end = || crate::sys::memfd_with("t", b"").unwrap();
        let ends = QemuEnds {
            control: end(),
            initramfs: end(),
            network: None,
            forwarding: Some(end()),
            console: end(),
            clipboard: Some(end()),
            watch: Some(end()),
        };
        let targets: Vec<RawFd> = FdPlan::new(false, true, true, true).pass(&ends).iter().map(|(_, t)| *t).collect();
        assert_eq!(targets, [3, 4, 6, 7, 8, 9]);
    }
}
