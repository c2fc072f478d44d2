//! Container runtimes (`--cri`): their storage on the project's disk, their
//! daemons started before the program, and access for the agent user
//! without sudo.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentvm_proto::{Containers, User};

use crate::boot;
use crate::console;
use crate::error::{Error, Result};
use crate::etc;
use crate::sys;

/// Where the container disk is mounted; each runtime's state dir is a bind
/// mount of a directory on it.
const STORE: &str = "/var/lib/agentvm-cri";
const STATE_DIRS: &[(&str, &str)] =
    &[("docker", "/var/lib/docker"), ("containerd", "/var/lib/containerd"), ("containers", "/var/lib/containers")];
const DISK_WAIT: Duration = Duration::from_secs(10);
/// Daemons start slowly under TCG.
const SOCKET_WAIT: Duration = Duration::from_secs(180);
const DAEMON_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
const DOCKER_SOCKET: &str = "/run/docker.sock";
const PODMAN_SOCKET: &str = "/run/podman/podman.sock";

fn fail(what: String) -> Error {
    Error::Containers(what)
}

/// Mounts the storage, writes the runtimes' configuration and lets `user`
/// use them. Runs before the user's groups are read.
pub fn prepare(c: &Containers, user: &User) -> Result<()> {
    console::step(&format!("container storage on {}", c.disk));
    let disk = boot::wait_for_disk(&c.disk, DISK_WAIT)?;
    fs::create_dir_all(STORE).map_err(|e| Error::io("create directory", STORE, e))?;
    sys::mount(&disk, Path::new(STORE), "ext4", 0, None).map_err(|source| Error::Mount {
        fstype: "ext4".into(),
        what: disk.clone(),
        target: STORE.into(),
        source,
    })?;
    for (sub, target) in STATE_DIRS {
        let dir = Path::new(STORE).join(sub);
        fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
        fs::create_dir_all(target).map_err(|e| Error::io("create directory", target, e))?;
        sys::mount(&dir.to_string_lossy(), Path::new(target), "", libc::MS_BIND, None).map_err(|source| {
            Error::Mount { fstype: "bind".into(), what: dir.display().to_string(), target: target.to_string(), source }
        })?;
    }
    if has(c, "docker") {
        etc::add_to_group(Path::new("/"), "docker", &user.name)?;
    }
    if needs_containerd(c) {
        let dir = Path::new("/etc/containerd");
        fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        let config = containerd_config(user.gid, has(c, "crun"));
        fs::write(dir.join("config.toml"), config).map_err(|e| Error::io("write", dir.join("config.toml"), e))?;
    }
    if has(c, "containerd") || has(c, "crun") {
        let wrapper = Path::new(CTR_WRAPPER);
        fs::write(wrapper, ctr_wrapper(has(c, "crun"))).map_err(|e| Error::io("write", wrapper, e))?;
        fs::set_permissions(wrapper, fs::Permissions::from_mode(0o755)).map_err(|e| Error::io("chmod", wrapper, e))?;
    }
    Ok(())
}

fn has(c: &Containers, name: &str) -> bool {
    c.runtimes.iter().any(|r| r == name)
}

/// containerd's configuration: its socket usable by the agent's group, and
/// crun as the runtime binary when asked for.
pub fn containerd_config(gid: u32, crun: bool) -> String {
    let mut s = format!("version = 2\n\n[grpc]\n  address = \"{CONTAINERD_SOCKET}\"\n  gid = {gid}\n");
    if crun {
        s.push_str(
            "\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n  BinaryName = \"/usr/bin/crun\"\n",
        );
    }
    s
}

/// Where the `ctr` wrapper goes: before /usr/bin on the agent's PATH.
const CTR_WRAPPER: &str = "/usr/local/bin/ctr";

/// containerd's own client mounts snapshots itself (for `ctr run`), which
/// needs root; the wrapper runs it through sudo, which the agent may use in
/// the VM anyway, so `ctr` just works. With crun, `ctr run` uses crun.
pub fn ctr_wrapper(crun: bool) -> String {
    let mut s = String::from("#!/bin/sh\n# Written by agentvm: ctr needs root to mount snapshots.\n");
    if crun {
        s.push_str("if [ \"$1\" = run ]; then shift; set -- run --runc-binary /usr/bin/crun \"$@\"; fi\n");
    }
    s.push_str("exec sudo -n /usr/bin/ctr \"$@\"\n");
    s
}

/// Starts the daemons, waits until each socket answers, and returns what
/// the program's environment needs.
pub fn start(c: &Containers, user: &User) -> Result<Vec<(String, String)>> {
    let deadline = Instant::now() + SOCKET_WAIT;
    let mut env = Vec::new();
    // containerd first, and ready, so dockerd never runs into its own
    // timeout for starting one (a slow TCG guest hits it).
    if needs_containerd(c) {
        spawn("containerd", &["--config", "/etc/containerd/config.toml"])?;
        wait_ready("containerd", CONTAINERD_SOCKET, false, deadline)?;
    }
    let mut apis = Vec::new();
    if has(c, "docker") {
        spawn(
            "dockerd",
            &["--host", "unix:///run/docker.sock", "--group", "docker", "--containerd", CONTAINERD_SOCKET],
        )?;
        apis.push(("dockerd", DOCKER_SOCKET));
    }
    if has(c, "podman") {
        fs::create_dir_all("/run/podman").map_err(|e| Error::io("create directory", "/run/podman", e))?;
        spawn("podman", &["system", "service", "--time=0", &format!("unix://{PODMAN_SOCKET}")])?;
        apis.push(("podman", PODMAN_SOCKET));
        env.push(("CONTAINER_HOST".to_string(), format!("unix://{PODMAN_SOCKET}")));
    }
    for (daemon, socket) in apis {
        wait_ready(daemon, socket, true, deadline)?;
    }
    if has(c, "podman") {
        // The service runs as root; the socket is the agent's group's.
        std::os::unix::fs::chown(PODMAN_SOCKET, Some(0), Some(user.gid))
            .map_err(|e| Error::io("chown", PODMAN_SOCKET, e))?;
        fs::set_permissions(PODMAN_SOCKET, fs::Permissions::from_mode(0o660))
            .map_err(|e| Error::io("chmod", PODMAN_SOCKET, e))?;
    }
    Ok(env)
}

/// Waits until `daemon` answers on `socket`: a connection for containerd
/// (gRPC), a `GET /_ping` answered with 200 for the Docker-style APIs (their
/// socket accepts connections before the daemon is ready).
fn wait_ready(daemon: &str, socket: &str, ping: bool, deadline: Instant) -> Result<()> {
    loop {
        if let Ok(mut s) = UnixStream::connect(socket) {
            if !ping || pings(&mut s) {
                console::step(&format!("{daemon} answers on {socket}"));
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            let log = fs::read_to_string(log_path(daemon)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(fail(format!(
                "{daemon} did not answer on {socket} within {} s; its log ends:\n{}",
                SOCKET_WAIT.as_secs(),
                tail.join("\n")
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pings(s: &mut UnixStream) -> bool {
    use std::io::{Read, Write};
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut answer = [0u8; 12];
    s.write_all(b"GET /_ping HTTP/1.0\r\nHost: localhost\r\n\r\n").is_ok()
        && s.read_exact(&mut answer).is_ok()
        && answer.starts_with(b"HTTP/1.")
        && &answer[9..12] == b"200"
}

/// Docker uses the shared containerd too.
fn needs_containerd(c: &Containers) -> bool {
    has(c, "containerd") || has(c, "crun") || has(c, "docker")
}

fn log_path(daemon: &str) -> String {
    format!("/var/log/{daemon}.log")
}

/// Starts `program` as root in the background, its output in its log. The
/// init reaps it like any other child.
fn spawn(program: &str, args: &[&str]) -> Result<()> {
    console::step(&format!("start {program}"));
    let log_file = log_path(program);
    let log = fs::File::create(&log_file).map_err(|e| Error::io("create", &log_file, e))?;
    let err = log.try_clone().map_err(|e| Error::io("duplicate", &log_file, e))?;
    Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", DAEMON_PATH)
        .env("HOME", "/root")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| fail(format!("cannot start {program}: {e}; is its package in the image?")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_config_gives_the_socket_to_the_group_and_names_crun() {
        let c = containerd_config(1000, false);
        assert!(c.contains("gid = 1000") && !c.contains("crun"), "{c}");
        assert!(containerd_config(1000, true).contains("BinaryName = \"/usr/bin/crun\""));
    }

    #[test]
    fn ctr_wrapper_goes_through_sudo_and_picks_crun_for_run() {
        let plain = ctr_wrapper(false);
        assert!(plain.ends_with("exec sudo -n /usr/bin/ctr \"$@\"\n") && !plain.contains("crun"), "{plain}");
        assert!(ctr_wrapper(true).contains("set -- run --runc-binary /usr/bin/crun"));
    }
}
