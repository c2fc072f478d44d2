//! Template boots and warm starts (issue 17).
//!
//! A template boot does every step of a boot that is the same for all
//! launches of one shape (modules, the root and layers, the system mounts)
//! with virtio driver autoprobe off, so only the control port, the balloon
//! and the image's disks get drivers. It then tells the host it is ready and
//! waits: the host saves the VM there. Each VM restored from the saved state
//! wakes up in that wait, receives its launch over the control port, makes
//! itself its own (clock, random seed, hostname, machine id), binds the
//! remaining devices (network, shares) and goes on as a cold boot does.

use crate::boot;
use crate::console::step;
use crate::error::{Error, IoContext, Result};
use crate::port::{Input, Port};
use crate::sys;
use agentvm_proto::{Frame, LaunchSpec, WarmLaunch};
use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

/// The virtio bus's switch for binding drivers to new devices.
const AUTOPROBE: &str = "/sys/bus/virtio/drivers_autoprobe";
const VIRTIO_DEVICES: &str = "/sys/bus/virtio/devices";

/// Virtio device types (the spec's device IDs) and their Linux drivers.
const NET: (u32, &str) = (1, "virtio_net");
const BLOCK: (u32, &str) = (2, "virtio_blk");
const CONSOLE: (u32, &str) = (3, "virtio_console");
const BALLOON: (u32, &str) = (5, "virtio_balloon");
const FS: (u32, &str) = (26, "virtiofs");

/// How long to wait for the control port after binding its driver.
const PORT_WAIT: Duration = Duration::from_secs(5);

/// Boots the template of `template`'s shape, waits for a launch (the host
/// saves the VM meanwhile), and returns it with the control port once this
/// VM is its own and its devices are bound.
pub fn boot_template(template: &LaunchSpec) -> Result<(LaunchSpec, Port)> {
    // Before the transport's module: its devices must find no driver.
    fs::write(AUTOPROBE, "0").ctx("write", AUTOPROBE)?;
    boot::load_modules(&template.modules)?;
    for kind in [CONSOLE, BALLOON, BLOCK] {
        bind(kind)?;
    }
    step("find the control port");
    let mut port = Port::open(PORT_WAIT)?;
    boot::mount_root(template)?;
    boot::switch_root()?;
    boot::system_mounts()?;
    // The host's public roots (the same for every launch of this template).
    step("install the trust store");
    crate::etc::install_trust(Path::new("/"), &template.ca_trust)?;
    preload_the_c_library();
    port.send(&Frame::TemplateReady)?;
    step("template ready");
    let launch = wait_for_launch(&mut port)?;
    step("restored");
    port.send(&Frame::Resumed)?;
    make_own(&launch)?;
    for kind in [NET, FS] {
        bind(kind)?;
    }
    Ok((launch.spec, port))
}

/// Runs a dynamically linked program once, so that the dynamic loader and
/// the C library every program needs are in the page cache of each VM
/// restored from the template: reading them from the compressed image took
/// each warm start's program tens of ms under TCG. An image without it
/// only misses the gain.
fn preload_the_c_library() {
    step("preload the C library");
    let _ = std::process::Command::new("/usr/bin/true").env_clear().status();
}

/// Reads the control port until the host sends the launch.
fn wait_for_launch(port: &mut Port) -> Result<WarmLaunch> {
    loop {
        let mut p = [libc::pollfd { fd: port.raw_fd(), events: libc::POLLIN, revents: 0 }];
        sys::poll(&mut p, None).map_err(|e| Error::sys("poll(control port)", e))?;
        if p[0].revents & libc::POLLIN == 0 {
            // No host on the other end (being saved or restored): pace the retries.
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        match port.receive()? {
            Input::Frames(frames) => {
                if let Some(launch) = frames.into_iter().find_map(|f| match f {
                    Frame::Warm(launch) => Some(launch),
                    _ => None,
                }) {
                    return Ok(*launch);
                }
            }
            Input::Closed => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Makes this VM its own rather than a copy of the template: the host's
/// clock, a fresh random stream, its hostname and machine id.
fn make_own(launch: &WarmLaunch) -> Result<()> {
    crate::console::set_verbose(launch.spec.verbose);
    sys::set_realtime(launch.clock_ns).map_err(|e| Error::sys("clock_settime(CLOCK_REALTIME)", e))?;
    let seed = parse_seed(&launch.seed)?;
    let urandom = Path::new("/dev/urandom");
    let fd = sys::open(urandom, libc::O_RDWR).ctx("open", urandom)?;
    sys::add_entropy_and_reseed(fd.as_raw_fd(), &seed).map_err(|e| Error::sys("reseed the RNG (RNDADDENTROPY)", e))?;
    if launch.machine_id.len() != 32 || !launch.machine_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::BadSpec(format!("machine id {:?} is not 32 hex digits", launch.machine_id)));
    }
    let machine_id = Path::new("/etc/machine-id");
    let _ = fs::remove_file(machine_id);
    fs::write(machine_id, format!("{}\n", launch.machine_id)).ctx("write", machine_id)?;
    boot::name_and_loopback(&launch.spec)
}

/// The 32 bytes of a seed written as 64 hex digits.
fn parse_seed(hex: &str) -> Result<[u8; 32]> {
    let bad = || Error::BadSpec("the warm start's seed is not 64 hex digits".into());
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut seed = [0u8; 32];
    for (byte, pair) in seed.iter_mut().zip(hex.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
    }
    Ok(seed)
}

/// Binds every virtio device of type `kind` that has no driver to its
/// driver (autoprobe is off).
fn bind((id, driver): (u32, &str)) -> Result<()> {
    step(&format!("bind {driver}"));
    let dir = Path::new(VIRTIO_DEVICES);
    for entry in fs::read_dir(dir).ctx("read", dir)?.flatten() {
        let path = entry.path();
        let device = fs::read_to_string(path.join("device")).unwrap_or_default();
        let bound = path.join("driver").exists();
        if bound || parse_device_id(&device) != Some(id) {
            continue;
        }
        let bind = format!("/sys/bus/virtio/drivers/{driver}/bind");
        fs::write(&bind, entry.file_name().as_encoded_bytes()).ctx("write", &bind)?;
    }
    Ok(())
}

/// A device's type as sysfs writes it (`0x0003`).
fn parse_device_id(text: &str) -> Option<u32> {
    u32::from_str_radix(text.trim().strip_prefix("0x")?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_is_64_hex_digits() {
        let seed = parse_seed(&"0a".repeat(32)).unwrap();
        assert_eq!(seed, [10u8; 32]);
        assert!(parse_seed("0a").is_err());
        assert!(parse_seed(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn device_ids_are_sysfs_hex() {
        assert_eq!(parse_device_id("0x001a\n"), Some(FS.0));
        assert_eq!(parse_device_id("0x0003"), Some(CONSOLE.0));
        assert_eq!(parse_device_id("3"), None);
    }
}
