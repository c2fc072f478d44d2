//! The guest's network: its mode and user-mode stack, the ports published
//! from it, the host ports opened to it, the names it may reach, the keys
//! kept from it, and the host's HTTP proxy.

use crate::config::flavor::Flavor;
use crate::config::options::{Layers, Origin};
use crate::config::SettingsError;
use crate::net::egress::{AllowList, EgressError, PROXY_PORT};
use crate::net::host_proxy::{self, HostProxy};
use crate::net::shield::{self, ShieldError};
use crate::net::{self, forwarding, NetBackend, NetworkMode, PortSpec, Proto};

/// The network settings of one launch, checked together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub mode: NetworkMode,
    pub backend: NetBackend,
    /// Published ports: valid, unique, free now.
    pub ports: Vec<PortSpec>,
    /// Host loopback ports opened to the guest, each once.
    pub host_ports: Vec<u16>,
    /// The flavor's names (its secret hosts included) and the user's.
    pub allow: AllowList,
    pub shield_secrets: bool,
    /// The host's HTTP proxy, for the guest (open) or the egress proxy (allow).
    pub host_proxy: Option<HostProxy>,
}

/// The network for `flavor`, given agentvm's environment (`get_env`) and
/// the variables passed to the guest (`passed`).
pub fn resolve(
    layers: &Layers,
    flavor: &Flavor,
    get_env: &dyn Fn(&str) -> Option<String>,
    passed: &[(String, String)],
) -> Result<Network, SettingsError> {
    let shield_secrets = layers.value(|o| &o.shield_secrets).unwrap_or(false);
    let mode = mode(layers, shield_secrets)?;
    if shield_secrets {
        shield::check_flavor(&flavor.name, &flavor.keys, &flavor.secret_hosts, &flavor.key_headers)?;
    }
    let specs = layers.list(|o| &o.ports);
    let ports = net::check_ports(&specs, crate::sys::is_root())?;
    if mode == NetworkMode::None && !ports.is_empty() {
        return Err(SettingsError::PortsWithoutNetwork(specs.join(", ")));
    }
    let host_ports = forwarding::check(&layers.list(|o| &o.host_ports))?;
    // Secret hosts must be reachable to be of use.
    let names: Vec<String> =
        flavor.allow.iter().chain(&flavor.secret_hosts).cloned().chain(layers.list(|o| &o.allow)).collect();
    let allow = AllowList::new(&names)?;
    if mode == NetworkMode::Allow {
        if host_ports.contains(&PROXY_PORT) {
            return Err(EgressError::ProxyPortTaken.into());
        }
        if let Some(p) = ports.iter().find(|p| p.proto == Proto::Udp) {
            return Err(EgressError::UdpPublished(p.to_string()).into());
        }
    }
    let backend = layers.value(|o| &o.net_backend).unwrap_or_default();
    let host_proxy = host_proxy(mode, get_env, passed)?;
    Ok(Network { mode, backend, ports, host_ports, allow, shield_secrets, host_proxy })
}

/// The host's proxy that `mode` uses: none without a network. Under
/// `--network open`, none when the user passes a proxy variable himself
/// (his choice wins), and credentials are refused: they would go to the
/// guest.
fn host_proxy(
    mode: NetworkMode,
    get_env: &dyn Fn(&str) -> Option<String>,
    passed: &[(String, String)],
) -> Result<Option<HostProxy>, SettingsError> {
    if mode == NetworkMode::None {
        return Ok(None);
    }
    let Some(found) = HostProxy::from_env(get_env)? else { return Ok(None) };
    if mode == NetworkMode::Open {
        if passed.iter().any(|(name, _)| host_proxy::is_proxy_var(name)) {
            return Ok(None);
        }
        found.check_for_guest()?;
    }
    Ok(Some(found))
}

/// The mode asked for. `--allow` or shielding alone means `--network
/// allow`; with another mode it is a mistake.
fn mode(layers: &Layers, shield_secrets: bool) -> Result<NetworkMode, SettingsError> {
    let allow_flags = !layers.layer(Origin::Flags).allow.is_empty();
    match (layers.value(|o| &o.network), allow_flags) {
        (Some(m), _) if shield_secrets && m != NetworkMode::Allow => {
            Err(ShieldError::NeedsAllowMode(format!("{m:?}").to_lowercase()).into())
        }
        (None, _) if shield_secrets => Ok(NetworkMode::Allow),
        (None, true) => Ok(NetworkMode::Allow),
        (Some(m), true) if m != NetworkMode::Allow => Err(EgressError::AllowWithoutAllowMode.into()),
        (m, _) => Ok(m.unwrap_or_default()),
    }
}
