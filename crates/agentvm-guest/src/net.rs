//! The guest's network interface: static address, route and name servers,
//! set with the kernel's interface and route ioctls (an `ip` process per
//! step cost about 50 ms each under TCG).

use std::net::Ipv4Addr;
use std::path::Path;

use agentvm_proto::Network;

use crate::console::step;
use crate::error::{Error, Result};
use crate::sys;

/// The interface virtio-net gets without udev renaming it.
const IFACE: &str = "eth0";

/// An IPv4 address with its prefix length (`10.0.2.15/24`): the address and
/// its netmask.
pub fn parse_address(text: &str) -> Result<(Ipv4Addr, Ipv4Addr)> {
    let bad = || Error::Network(format!("the address {text:?} is not an IPv4 address with a prefix (a.b.c.d/n)"));
    let (ip, prefix) = text.split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let prefix: u32 = prefix.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    Ok((ip, Ipv4Addr::from(mask)))
}

/// /etc/resolv.conf for `net`.
pub fn resolv_conf(net: &Network) -> String {
    let mut s = String::from("# written by agentvm\n");
    for server in &net.dns {
        s.push_str(&format!("nameserver {server}\n"));
    }
    s
}

/// Configures the interface and name resolution.
pub fn configure(net: &Network) -> Result<()> {
    step(&format!("network {} via {}", net.address, net.gateway));
    let (ip, netmask) = parse_address(&net.address)?;
    let gateway: Ipv4Addr = net
        .gateway
        .parse()
        .map_err(|_| Error::Network(format!("the gateway {:?} is not an IPv4 address", net.gateway)))?;
    let failed = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| Error::Network(format!("cannot {what} on {IFACE}: {e}"))
    };
    sys::set_ipv4_address(IFACE, ip, netmask).map_err(failed(&format!("set the address {}", net.address)))?;
    sys::interface_up(IFACE).map_err(failed("bring the interface up"))?;
    sys::add_default_route(IFACE, gateway).map_err(failed(&format!("add the default route via {gateway}")))?;
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
    fn an_address_with_a_prefix_gives_the_address_and_its_netmask() {
        let mask = |t: &str| parse_address(t).unwrap().1;
        assert_eq!(
            parse_address("10.0.2.15/24").unwrap(),
            (Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(255, 255, 255, 0))
        );
        assert_eq!(mask("10.0.2.15/32"), Ipv4Addr::BROADCAST);
        assert_eq!(mask("10.0.2.15/0"), Ipv4Addr::UNSPECIFIED);
        assert_eq!(mask("10.0.2.15/20"), Ipv4Addr::new(255, 255, 240, 0));
        for bad in ["10.0.2.15", "10.0.2.15/33", "10.0.2/24", "fd00::1/64", "10.0.2.15/x"] {
            let e = parse_address(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("a.b.c.d/n"), "{e}");
        }
    }

    #[test]
    fn resolv_conf_lists_each_server() {
        assert_eq!(resolv_conf(&net()), "# written by agentvm\nnameserver 10.0.2.3\n");
    }
}
