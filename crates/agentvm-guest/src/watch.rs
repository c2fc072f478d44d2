//! The guest's end of host file watching (see [`agentvm_proto::watch`]): a
//! thread reads the host's change batches from the watch port and hands
//! each change to the kernel module's device, which raises the matching
//! inotify events on /work. It never writes to the port, and a change the
//! module refuses (a file gone again, a path it will not walk) is skipped.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::OnceLock;

use agentvm_proto::watch::{Change, DEVICE, MODULE_FILE, PORT_NAME};
use agentvm_proto::{Frame, FrameReader};

use crate::console;
use crate::port::{find_port, PORTS_SYSFS};

/// Why the module did not load, when it did not (see [`module_failed`]).
static LOAD_FAILURE: OnceLock<String> = OnceLock::new();

/// Whether `name` is the watch module, whose failure to load is not fatal.
pub fn is_module(name: &str) -> bool {
    name == MODULE_FILE
}

/// Remembers why the watch module did not load.
pub fn module_failed(why: String) {
    console::line(&format!("watch: {why}"));
    let _ = LOAD_FAILURE.set(why);
}

/// Starts passing the host's changes to the module, or says in one line
/// (returned, for the user's terminal) why watching is off.
pub fn start() -> Option<String> {
    match open() {
        Ok((port, device)) => {
            std::thread::spawn(move || relay(port, device));
            console::step("watching host changes under /work");
            None
        }
        Err(why) => {
            Some(format!("agentvm-guest: watch: off: {why}; file watchers in the VM see only its own changes\n"))
        }
    }
}

/// The watch port and the module's device.
fn open() -> Result<(File, File), String> {
    if let Some(why) = LOAD_FAILURE.get() {
        return Err(why.clone());
    }
    let device = OpenOptions::new().write(true).open(DEVICE).map_err(|e| format!("cannot open {DEVICE}: {e}"))?;
    let dev = find_port(Path::new(PORTS_SYSFS), PORT_NAME)
        .ok_or_else(|| format!("the virtio-serial port {PORT_NAME} is missing"))?;
    let path = Path::new("/dev").join(dev);
    let port = File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    Ok((port, device))
}

/// Reads batches until the port ends or carries something else.
fn relay(mut port: File, mut device: File) {
    let mut reader = FrameReader::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match port.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return console::line(&format!("watch: the port failed: {e}")),
        };
        reader.push(&buf[..n]);
        loop {
            match reader.next_frame() {
                Ok(Some(Frame::Changes(changes))) => raise(&mut device, &changes),
                Ok(None) => break,
                Ok(Some(_)) => return console::line("watch: the port carried another frame; stopped"),
                Err(e) => return console::line(&format!("watch: {e}; stopped")),
            }
        }
    }
}

/// One write per change: the module takes one record per write.
fn raise(device: &mut File, changes: &[Change]) {
    for change in changes {
        if let Err(e) = device.write(&change.device_record()) {
            console::step(&format!("watch: {change:?} not raised: {e}"));
        }
    }
}
