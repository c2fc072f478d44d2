//! The guest's end of the host clipboard (`--clipboard`, see
//! [`agentvm_proto::clipboard`]): the clipboard tools are links to this
//! binary in [`TOOLS_DIR`] (it answers to their names, see
//! [`crate::clipboard_tools`]), and a thread of the init passes their
//! requests, one at a time, from [`GUEST_SOCKET`] to the clipboard port
//! and the host's replies back.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use agentvm_proto::clipboard::{Reply, Request, GUEST_SOCKET, PORT_NAME};

use crate::console;
use crate::error::{Error, IoContext, Result};
use crate::port::{find_port, PORTS_SYSFS};

/// Where the tools' links go: first on the default PATH, so they win over
/// an image's own.
pub const TOOLS_DIR: &str = "/usr/local/bin";
/// The copy of this binary the links point at.
const TOOL_BINARY: &str = "/usr/local/libexec/agentvm-clipboard";
/// How long a tool may take to send its request (a stuck one must not hold
/// up the others).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Installs the clipboard tools and starts passing their requests to the
/// host, on a thread of its own.
pub fn start() -> Result<()> {
    let dev = find_port(Path::new(PORTS_SYSFS), PORT_NAME).ok_or_else(|| {
        Error::Clipboard(format!("the clipboard was asked for, but the virtio-serial port {PORT_NAME} is missing"))
    })?;
    let path = Path::new("/dev").join(dev);
    let port = OpenOptions::new().read(true).write(true).open(&path).ctx("open", &path)?;
    let socket = Path::new(GUEST_SOCKET);
    let dir = socket.parent().expect("an absolute path");
    fs::create_dir_all(dir).ctx("create directory", dir)?;
    let _ = fs::remove_file(socket);
    let listener = UnixListener::bind(socket).ctx("listen on", socket)?;
    // Every user of the guest may use it: the VM is one trust domain.
    fs::set_permissions(socket, fs::Permissions::from_mode(0o666)).ctx("chmod", socket)?;
    install_tools()?;
    std::thread::spawn(move || relay(listener, port));
    console::step(&format!("clipboard tools in {TOOLS_DIR}"));
    Ok(())
}

/// Copies this binary to [`TOOL_BINARY`] (after the switch of the root, its
/// own path is out of reach) and links each tool's name to it.
fn install_tools() -> Result<()> {
    let binary = Path::new(TOOL_BINARY);
    fs::create_dir_all(binary.parent().expect("an absolute path")).ctx("create the directory of", binary)?;
    fs::copy("/proc/self/exe", binary).ctx("copy the init to", binary)?;
    fs::set_permissions(binary, fs::Permissions::from_mode(0o755)).ctx("chmod", binary)?;
    fs::create_dir_all(TOOLS_DIR).ctx("create directory", TOOLS_DIR)?;
    for name in crate::clipboard_tools::NAMES {
        let link = Path::new(TOOLS_DIR).join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(TOOL_BINARY, &link).ctx("create symlink", &link)?;
    }
    Ok(())
}

/// Serves the tools one at a time until the port fails.
fn relay(listener: UnixListener, mut port: File) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if let Err(e) = serve_one(conn, &mut port) {
            console::line(&format!("clipboard relay stopped: {e}"));
            return;
        }
    }
}

/// Passes one tool's request to the host and the reply back. Only a broken
/// port is an error: a tool that goes away is not.
fn serve_one(mut conn: UnixStream, port: &mut File) -> io::Result<()> {
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    let request = match Request::read_from(&mut conn) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            let _ = Reply::Refused(e.to_string()).write_to(&mut conn);
            return Ok(());
        }
    };
    request.write_to(port)?;
    let reply = Reply::read_from(port)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the host closed the clipboard port"))?;
    let _ = reply.write_to(&mut conn);
    Ok(())
}
