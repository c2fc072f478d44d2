//! The third stage, pure: from the settings and the resolved resources to
//! everything the launch will do: the shares, the launch spec, the
//! network plan, the fd plan, and QEMU's command line. Nothing here touches
//! the host, so all of it is unit-tested, and `agentvm run --print-plan`
//! shows it without booting.

use std::ffi::OsString;
use std::path::Path;

use agentvm_proto::{guest, Containers, LaunchSpec, Mount, User};

use super::fds::FdPlan;
use super::resources::Resources;
use crate::config::Settings;
use crate::image::kmod;
use crate::net::plan::NetworkPlan;
use crate::net::shield;
use crate::vm::share::{self, CacheMode, Share};
use crate::vm::{self, VmConfig};

/// One launch, decided.
#[derive(Debug, Clone)]
pub struct Plan {
    pub shares: Vec<Share>,
    pub network: NetworkPlan,
    pub fds: FdPlan,
    /// What the guest init is told (in the initramfs).
    pub spec: LaunchSpec,
    pub vm: VmConfig,
}

/// Where the instance's files go.
#[derive(Debug, Clone, Copy)]
pub struct InstanceRef<'a> {
    pub id: &'a str,
    pub dir: &'a Path,
}

impl Plan {
    pub fn new(settings: &Settings, res: &Resources, instance: InstanceRef<'_>) -> Plan {
        let shares = shares(settings, res.nix_store.as_deref());
        let network = res.network.clone();
        let fds = FdPlan::new(network.interface.is_passt(), network.uses_channel());
        let spec = spec(settings, res, &shares, instance.id);
        let vm = vm_config(settings, res, &shares, &fds, instance);
        Plan { shares, network, fds, spec, vm }
    }

    /// QEMU's argument vector (without the program).
    pub fn qemu_args(&self) -> Vec<OsString> {
        vm::qemu_args(&self.vm)
    }
}

/// The directories shared into the guest: the project, the agent home, and
/// the host's Nix store (read-only) when the dev shell needs it.
pub fn shares(settings: &Settings, nix_store: Option<&Path>) -> Vec<Share> {
    let mut shares = vec![
        Share {
            tag: "work".into(),
            host_dir: settings.work_dir.clone(),
            guest_path: guest::WORK.into(),
            read_only: false,
            cache: settings.work_cache,
        },
        // Other instances of the project share the home: keep revalidating.
        Share {
            tag: "home".into(),
            host_dir: settings.home_dir.clone(),
            guest_path: guest::HOME.into(),
            read_only: false,
            cache: CacheMode::Auto,
        },
    ];
    if let Some(store) = nix_store {
        shares.push(Share {
            tag: "nixstore".into(),
            host_dir: store.to_path_buf(),
            guest_path: guest::NIX_STORE.into(),
            read_only: true,
            cache: CacheMode::Auto,
        });
    }
    shares
}

/// The guest's view of this launch.
fn spec(s: &Settings, res: &Resources, shares: &[Share], id: &str) -> LaunchSpec {
    let net = &res.network;
    LaunchSpec {
        hostname: format!("agentvm-{}", &id[..6]),
        modules: kmod::modules_for_launch(&res.image.meta.modules, net.has_interface()),
        root_device: format!("serial:{}", vm::ROOT_SERIAL),
        root_fstype: "squashfs".into(),
        layers: (0..res.layers.len()).map(|i| format!("serial:{}", vm::layer_serial(i))).collect(),
        network: net.guest_interface(),
        host_ports: net.guest_host_ports(),
        published_ports: net.guest_published_ports(),
        containers: (!s.cri.is_empty()).then(|| Containers {
            runtimes: s.cri.iter().map(|r| r.name().to_string()).collect(),
            disk: format!("serial:{}", vm::DATA_SERIAL),
        }),
        mounts: shares
            .iter()
            .map(|sh| Mount { tag: sh.tag.clone(), path: sh.guest_path.clone(), read_only: sh.read_only })
            .collect(),
        user: User {
            name: guest::USER.into(),
            uid: res.ids.guest_uid,
            gid: res.ids.guest_gid,
            home: guest::HOME.into(),
        },
        cwd: guest::WORK.into(),
        argv: s.argv.clone(),
        env: res
            .env
            .iter()
            .cloned()
            .chain(net.guest_env())
            .chain(if res.ca_pem.is_some() { shield::guest_env() } else { Vec::new() })
            .collect(),
        ca_certs: res.ca_pem.iter().cloned().collect(),
        tty: res.tty,
        winsize: res.winsize,
        verbose: s.verbose,
    }
}

/// What QEMU is given.
fn vm_config(s: &Settings, res: &Resources, shares: &[Share], fds: &FdPlan, instance: InstanceRef<'_>) -> VmConfig {
    VmConfig {
        name: format!("agentvm-{}", instance.id),
        accel: res.accel,
        cpus: s.cpus,
        memory_mib: vm::qemu_memory_mib(s.memory_mib),
        kernel: res.kernel.clone(),
        initrd: fds.initrd_path(),
        cmdline: vm::kernel_cmdline(res.tsc_khz, s.verbose),
        root_image: res.image.root(),
        layers: res.layers.clone(),
        console_fd: fds.console,
        control_fd: fds.control,
        shares: shares.iter().map(|sh| (sh.tag.clone(), share::socket_path(instance.dir, &sh.tag))).collect(),
        exec_sockets: (0..agentvm_proto::EXEC_PORTS).map(|i| instance.dir.join(format!("exec-{i}.sock"))).collect(),
        sandbox: true,
        netdev: res.network.netdev(fds.network),
        forward_fd: fds.forwarding,
        data_disk: res.cri_disk.clone(),
    }
}
