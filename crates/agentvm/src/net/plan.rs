//! The network plan: every decision about one launch's network, made once
//! from the settings and read by the launch spec, QEMU's command line, the
//! helpers and the guest's module list.

use std::path::PathBuf;

use agentvm_proto::Network;

use super::host_proxy::HostProxy;
use super::{egress, NetBackend, NetError, NetworkMode, PortSpec, Stack};

/// What is behind the guest's network interface.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Interface {
    /// No interface: only loopback (and the forwarding channel, if any).
    None,
    /// passt, at this path, over a socketpair.
    Passt(PathBuf),
    /// QEMU's built-in slirp.
    Slirp,
}

/// How published ports reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortPath {
    /// passt listens on the host (`--tcp-ports`, `--udp-ports`).
    Passt,
    /// QEMU's slirp listens on the host (`hostfwd`).
    Slirp,
    /// agentvm listens on the host and carries each connection over the
    /// forwarding channel (no interface under `--network allow`).
    Channel,
}

/// The network of one launch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NetworkPlan {
    pub mode: NetworkMode,
    pub interface: Interface,
    /// The allow-listing egress proxy, reached over the forwarding channel.
    pub proxy: bool,
    /// Host loopback ports the guest may reach over the forwarding channel
    /// (the user's, and a host proxy's on loopback under open).
    pub host_ports: Vec<u16>,
    /// The host's HTTP proxy: handed to the guest (open), or what the
    /// egress proxy connects through (allow).
    pub host_proxy: Option<HostProxy>,
    /// The guest's proxy variables for the host's proxy (open).
    #[serde(skip)]
    host_proxy_env: Vec<(String, String)>,
    /// Published ports and the path they take.
    pub published: Vec<PortSpec>,
    pub published_via: PortPath,
}

impl Interface {
    pub fn is_passt(&self) -> bool {
        matches!(self, Interface::Passt(_))
    }
}

impl NetworkPlan {
    /// Decides the network for `mode` and `backend`, given the host's
    /// proxy and where passt is (if installed). Returns a warning when the
    /// choice leaves the host's loopback open to the guest.
    pub fn decide(
        mode: NetworkMode,
        backend: NetBackend,
        published: &[PortSpec],
        host_ports: &[u16],
        host_proxy: Option<&HostProxy>,
        passt: Option<PathBuf>,
    ) -> Result<(NetworkPlan, Option<String>), NetError> {
        let (interface, warning) = match mode {
            NetworkMode::Open => match super::choose_stack(backend, passt)? {
                (Stack::Passt(bin), warning) => (Interface::Passt(bin), warning),
                (Stack::Slirp, warning) => (Interface::Slirp, warning),
            },
            NetworkMode::None | NetworkMode::Allow => (Interface::None, None),
        };
        let published_via = match interface {
            Interface::Passt(_) => PortPath::Passt,
            Interface::Slirp => PortPath::Slirp,
            Interface::None => PortPath::Channel,
        };
        if published_via == PortPath::Slirp {
            // Checked now, so the plan's QEMU command line cannot fail.
            super::slirp_netdev(published)?;
        }
        let host_proxy = host_proxy.filter(|_| mode != NetworkMode::None).cloned();
        let mut host_ports = host_ports.to_vec();
        let mut host_proxy_env = Vec::new();
        if let (Some(hp), NetworkMode::Open) = (&host_proxy, mode) {
            let (env, ports) = hp.guest_view(agentvm_proto::forward::HOST_NAME);
            host_ports.extend(ports.into_iter().filter(|p| !host_ports.contains(p)).collect::<Vec<_>>());
            host_proxy_env = env;
        }
        let plan = NetworkPlan {
            mode,
            interface,
            proxy: mode == NetworkMode::Allow,
            host_ports,
            host_proxy,
            host_proxy_env,
            published: published.to_vec(),
            published_via,
        };
        Ok((plan, warning))
    }

    /// Whether the guest has a network interface (and so needs the
    /// network's kernel modules).
    pub fn has_interface(&self) -> bool {
        self.interface != Interface::None
    }

    /// Whether the forwarding channel (a second virtio-serial port) is
    /// needed: for host ports, the proxy, or published ports without an
    /// interface.
    pub fn uses_channel(&self) -> bool {
        !self.host_ports.is_empty() || self.proxy
    }

    /// Ports agentvm listens on for the guest, over the channel.
    pub fn channel_published(&self) -> &[PortSpec] {
        if self.published_via == PortPath::Channel && self.uses_channel() {
            &self.published
        } else {
            &[]
        }
    }

    /// What the guest is told about its interface, if it has one.
    pub fn guest_interface(&self) -> Option<Network> {
        self.has_interface().then(super::guest_network)
    }

    /// The host ports the guest reaches over the channel: the user's, and
    /// the proxy's.
    pub fn guest_host_ports(&self) -> Vec<u16> {
        self.host_ports.iter().copied().chain(self.proxy.then_some(egress::PROXY_PORT)).collect()
    }

    /// Guest ports the host connects to over the channel.
    pub fn guest_published_ports(&self) -> Vec<u16> {
        self.channel_published().iter().map(|p| p.guest_port).collect()
    }

    /// The program's environment for this network: the egress proxy's
    /// variables (allow) or the host proxy's (open).
    pub fn guest_env(&self) -> Vec<(String, String)> {
        if self.proxy {
            egress::guest_env()
        } else {
            self.host_proxy_env.clone()
        }
    }

    /// What the egress proxy connects through (allow only).
    pub fn upstream_proxy(&self) -> Option<HostProxy> {
        self.host_proxy.clone().filter(|_| self.proxy)
    }

    /// QEMU's `-netdev` value, with passt on QEMU's inherited fd `passt_fd`.
    pub fn netdev(&self, passt_fd: Option<i32>) -> Option<String> {
        match (&self.interface, passt_fd) {
            (Interface::Passt(_), Some(fd)) => Some(super::passt_netdev(fd)),
            (Interface::Slirp, _) => Some(super::slirp_netdev(&self.published).expect("checked by decide")),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(s: &str) -> PortSpec {
        PortSpec::parse(s).unwrap()
    }

    fn decide(mode: NetworkMode, backend: NetBackend, passt: bool) -> NetworkPlan {
        let passt = passt.then(|| PathBuf::from("/usr/bin/passt"));
        NetworkPlan::decide(mode, backend, &[port("8080:80")], &[5432], None, passt).unwrap().0
    }

    #[test]
    fn open_network_uses_passt_when_installed_and_publishes_through_it() {
        let plan = decide(NetworkMode::Open, NetBackend::Auto, true);
        assert_eq!(plan.interface, Interface::Passt("/usr/bin/passt".into()));
        assert_eq!(plan.published_via, PortPath::Passt);
        assert!(plan.has_interface() && plan.uses_channel());
        assert_eq!(plan.netdev(Some(5)).unwrap(), "stream,id=net0,addr.type=fd,addr.str=5");
        assert_eq!(plan.guest_host_ports(), [5432]);
        assert!(plan.guest_published_ports().is_empty());
        assert!(plan.guest_env().is_empty());
    }

    #[test]
    fn slirp_publishes_with_hostfwd_and_warns() {
        let (plan, warning) =
            NetworkPlan::decide(NetworkMode::Open, NetBackend::Auto, &[port("8080:80")], &[], None, None).unwrap();
        assert_eq!(plan.interface, Interface::Slirp);
        assert!(warning.unwrap().contains("loopback"));
        assert!(plan.netdev(None).unwrap().contains("hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80"));
        assert!(!plan.uses_channel());
        let ipv6 = NetworkPlan::decide(NetworkMode::Open, NetBackend::Slirp, &[port("[::1]:8080:80")], &[], None, None);
        assert!(matches!(ipv6, Err(NetError::SlirpIpv6 { .. })));
    }

    #[test]
    fn allow_mode_has_no_interface_and_everything_on_the_channel() {
        let plan = decide(NetworkMode::Allow, NetBackend::Auto, true);
        assert_eq!(plan.interface, Interface::None);
        assert!(!plan.has_interface() && plan.uses_channel() && plan.proxy);
        assert_eq!(plan.netdev(Some(5)), None);
        assert_eq!(plan.guest_host_ports(), [5432, egress::PROXY_PORT]);
        assert_eq!(plan.guest_published_ports(), [80]);
        assert!(plan.guest_env().iter().any(|(k, _)| k == "HTTPS_PROXY" || k == "https_proxy"));
        assert_eq!(plan.guest_interface(), None);
    }

    #[test]
    fn no_network_has_no_interface_and_only_the_users_host_ports() {
        let plan = NetworkPlan::decide(NetworkMode::None, NetBackend::Auto, &[], &[], None, None).unwrap().0;
        assert!(!plan.has_interface() && !plan.uses_channel());
        assert!(plan.guest_host_ports().is_empty() && plan.guest_env().is_empty());
    }
}
