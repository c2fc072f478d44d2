//! The guest's network interface: static address, route and name servers,
//! set with the image's own `ip` (iproute2) so no netlink code is needed.

use std::path::Path;
use std::process::Command;

use agentvm_proto::Network;

use crate::console::step;
use crate::error::{Error, Result};

/// The interface virtio-net gets without udev renaming it.
const IFACE: &str = "eth0";

/// The `ip` invocations that configure `net` on [`IFACE`].
pub fn ip_commands(net: &Network) -> Vec<Vec<String>> {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        v(&["link", "set", IFACE, "up"]),
        v(&["addr", "add", &net.address, "dev", IFACE]),
        v(&["route", "add", "default", "via", &net.gateway, "dev", IFACE]),
    ]
}

/// /etc/resolv.conf for `net`.
pub fn resolv_conf(net: &Network) -> String {
    let mut s = String::from("# written by agentvm\n");
    for server in &net.dns {
        s.push_str(&format!("nameserver {server}\n"));
    }
    s
}

fn find_ip() -> Option<&'static str> {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].into_iter().find(|p| Path::new(p).exists())
}

/// Configures the interface and name resolution.
pub fn configure(net: &Network) -> Result<()> {
    step(&format!("network {} via {}", net.address, net.gateway));
    let ip = find_ip().ok_or_else(|| Error::Network("the image has no `ip` command (iproute2)".into()))?;
    for args in ip_commands(net) {
        let out = Command::new(ip).args(&args).output().map_err(|e| Error::Network(format!("cannot run {ip}: {e}")))?;
        if !out.status.success() {
            return Err(Error::Network(format!(
                "`ip {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    // The image's resolv.conf may be a dangling symlink (systemd-resolved).
    let path = Path::new("/etc/resolv.conf");
    let _ = std::fs::remove_file(path);
    std::fs::write(path, resolv_conf(net)).map_err(|e| Error::Network(format!("cannot write /etc/resolv.conf: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Network {
        Network { address: "10.0.2.15/24".into(), gateway: "10.0.2.2".into(), dns: vec!["10.0.2.3".into()] }
    }

    #[test]
    fn ip_commands_bring_up_address_then_route() {
        let c = ip_commands(&net());
        assert_eq!(c[0], ["link", "set", "eth0", "up"]);
        assert_eq!(c[1], ["addr", "add", "10.0.2.15/24", "dev", "eth0"]);
        assert_eq!(c[2], ["route", "add", "default", "via", "10.0.2.2", "dev", "eth0"]);
    }

    #[test]
    fn resolv_conf_lists_each_server() {
        assert_eq!(resolv_conf(&net()), "# written by agentvm\nnameserver 10.0.2.3\n");
    }
}
