//! The third stage, pure: from the settings and the resolved resources to
//! everything the launch will do: the shares, the launch spec, the
//! network plan, the fd plan, and QEMU's command line. Nothing here touches
//! the host, so all of it is unit-tested, and `agentvm run --print-plan`
//! shows it without booting.

use std::ffi::OsString;
use std::path::Path;

use agentvm_proto::{guest, Containers, LaunchSpec, Mount, Sandbox, User};

use super::fds::FdPlan;
use super::resources::{Resources, SandboxPlan};
use crate::clipboard::ClipboardMode;
use crate::config::Settings;
use crate::image::kmod;
use crate::net::plan::NetworkPlan;
use crate::vm::share::{self, CacheMode, Share};
use crate::vm::{self, VmConfig};
use crate::watch::WatchPlan;

/// One launch, decided.
#[derive(Debug, Clone)]
pub struct Plan {
    pub shares: Vec<Share>,
    pub network: NetworkPlan,
    pub fds: FdPlan,
    /// What of the host's clipboard the guest gets (its own port when on).
    pub clipboard: ClipboardMode,
    /// Whether the host's changes under the project reach the guest's
    /// file watchers (their own port when on).
    pub watch: WatchPlan,
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
        let shares = shares(settings, res.nix_store.as_deref(), res.sandbox.as_ref());
        let network = res.network.clone();
        let watch = watch_plan(settings, res);
        let fds = FdPlan::new(
            network.interface.is_passt(),
            network.uses_channel(),
            settings.clipboard.is_on(),
            watch.is_on(),
        );
        let spec = spec(settings, res, &shares, instance.id, watch.is_on());
        let vm = vm_config(settings, res, &shares, &fds, instance);
        Plan { shares, network, fds, clipboard: settings.clipboard, watch, spec, vm }
    }

    /// QEMU's argument vector (without the program).
    pub fn qemu_args(&self) -> Vec<OsString> {
        vm::qemu_args(&self.vm)
    }
}

/// The directories shared into the guest: the project (read-only beside
/// the sandbox's export dir for `--clone`, whose /work is its disk), the
/// agent home, and the host's Nix store (read-only) when the dev shell
/// needs it.
pub fn shares(settings: &Settings, nix_store: Option<&Path>, sandbox: Option<&SandboxPlan>) -> Vec<Share> {
    let project = |guest_path: &str, read_only| Share {
        tag: "work".into(),
        host_dir: settings.work_dir.clone(),
        guest_path: guest_path.into(),
        read_only,
        cache: settings.work_cache,
    };
    let mut shares = match sandbox {
        None => vec![project(guest::WORK, false)],
        Some(s) => vec![
            project(guest::SANDBOX_HOST_REPO, true),
            Share {
                tag: "export".into(),
                host_dir: s.paths.export(),
                guest_path: guest::SANDBOX_EXPORT.into(),
                read_only: false,
                cache: CacheMode::Auto,
            },
        ],
    };
    shares.extend([
        // Other instances of the project share the home: keep revalidating.
        Share {
            tag: "home".into(),
            host_dir: settings.home_dir.clone(),
            guest_path: guest::HOME.into(),
            read_only: false,
            cache: CacheMode::Auto,
        },
    ]);
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

/// Whether the host's changes reach the guest: asked for (the default),
/// the project shared as /work (a clone's /work is its own disk), and the
/// image has the guest's module.
fn watch_plan(s: &Settings, res: &Resources) -> WatchPlan {
    let off = |why: &str, tell| WatchPlan::Off { why: why.to_string(), tell };
    if !s.watch {
        return off("watch = false", false);
    }
    if res.sandbox.is_some() {
        return off("--clone: /work is the clone's own disk", false);
    }
    match &res.image.meta.watch_module {
        Some(_) => WatchPlan::On { project: s.work_dir.clone() },
        None => WatchPlan::Off {
            why: format!(
                "the image {} has no {} (built before agentvm had it, or its build failed: see its build.log); \
                 file watchers in the VM see only the VM's own changes; `agentvm image build --refresh --base` makes a new one",
                res.image.dir.display(),
                agentvm_proto::watch::MODULE_FILE
            ),
            tell: true,
        },
    }
}

/// The guest's view of this launch.
fn spec(s: &Settings, res: &Resources, shares: &[Share], id: &str, watch: bool) -> LaunchSpec {
    let net = &res.network;
    let mut modules = kmod::modules_for_launch(&res.image.meta.modules, net.has_interface());
    if let Some(module) = res.image.meta.watch_module.as_ref().filter(|_| watch) {
        modules.push(module.clone());
    }
    LaunchSpec {
        hostname: format!("agentvm-{}", &id[..6]),
        modules,
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
        sandbox: res.sandbox.as_ref().map(|sb| Sandbox {
            name: sb.name.to_string(),
            disk: format!("serial:{}", vm::SANDBOX_SERIAL),
            branch: sb.base.branch.clone(),
            commit: sb.base.commit.clone(),
            held: sb.held.clone(),
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
        // Later wins: the program's own variables (e.g. `-e SSL_CERT_FILE`)
        // over the trust store's.
        env: res
            .trust
            .guest_env()
            .into_iter()
            .chain(clipboard_env(s))
            .chain(res.env.iter().cloned())
            .chain(net.guest_env())
            .collect(),
        clipboard: s.clipboard.is_on(),
        watch,
        ca_trust: res.trust.spec(),
        tty: res.tty,
        winsize: res.winsize,
        verbose: s.verbose,
        template: false,
    }
}

/// With the clipboard shared, `XDG_SESSION_TYPE=x11`: Gemini CLI looks
/// for a clipboard tool only in a session it knows (Claude Code just tries
/// xclip and wl-paste). Not `DISPLAY`: programs would try to open it.
fn clipboard_env(s: &Settings) -> Option<(String, String)> {
    s.clipboard.is_on().then(|| ("XDG_SESSION_TYPE".to_string(), "x11".to_string()))
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
        clipboard_fd: fds.clipboard,
        watch_fd: fds.watch,
        data_disks: data_disks(res),
        memory_file: None,
        qmp_fd: None,
        incoming: false,
    }
}

/// The writable disks: the sandbox's, the container storage.
fn data_disks(res: &Resources) -> Vec<(String, std::path::PathBuf)> {
    let sandbox = res.sandbox.as_ref().map(|s| (vm::SANDBOX_SERIAL.to_string(), s.paths.disk()));
    let cri = res.cri_disk.as_ref().map(|d| (vm::DATA_SERIAL.to_string(), d.clone()));
    sandbox.into_iter().chain(cri).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::envvars::GuestEnv;
    use crate::config::flavor::builtin_flavors;
    use crate::guest_env::host_ca::GuestTrust;
    use crate::image::{Image, ImageMeta, Recipe};
    use crate::net::plan::Interface;
    use crate::net::{NetBackend, NetworkMode, PortSpec};
    use crate::vm::share::IdMap;
    use crate::vm::{Accel, AccelChoice};
    use rustls::pki_types::CertificateDer;

    pub fn settings() -> Settings {
        Settings {
            work_dir: "/p/project".into(),
            home_dir: "/data/homes/project".into(),
            login: Default::default(),
            flavor: builtin_flavors()["shell"].clone(),
            argv: vec!["make".into(), "test".into()],
            guest_env: GuestEnv { vars: vec![("API_KEY".into(), "s3cr3t".into())], warnings: Vec::new() },
            network: NetworkMode::Open,
            net_backend: NetBackend::Auto,
            work_cache: CacheMode::Auto,
            watch: true,
            ports: Vec::new(),
            host_ports: Vec::new(),
            host_ca: Default::default(),
            clipboard: Default::default(),
            allow: Default::default(),
            shield_secrets: false,
            host_proxy: None,
            cri: Vec::new(),
            cri_disk_mib: 0,
            clone: None,
            clone_disk_mib: None,
            memory_mib: 2048,
            cpus: 2,
            accel: AccelChoice::Tcg,
            devshell: Default::default(),
            devshell_files: Vec::new(),
            verbose: false,
            start: Default::default(),
            warnings: Vec::new(),
        }
    }

    pub fn resources(s: &Settings) -> Resources {
        let modules = ["virtio_mmio.ko", "virtiofs.ko", "failover.ko", "net_failover.ko", "virtio_net.ko"];
        let meta = ImageMeta {
            name: "base".into(),
            key: "0".repeat(64),
            recipe: Recipe::base(),
            kernel_release: "6.12".into(),
            modules: modules.iter().map(|m| m.to_string()).collect(),
            watch_module: Some("agentvm_notify.ko".into()),
            created: 0,
            size_bytes: 0,
            compressor: "lz4".into(),
            package_versions: Default::default(),
            built_by: String::new(),
        };
        let passt = Some(PathBuf::from("/usr/bin/passt"));
        let network =
            NetworkPlan::decide(s.network, s.net_backend, &s.ports, &s.host_ports, s.host_proxy.as_ref(), passt)
                .expect("a valid network")
                .0;
        Resources {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            guest_init: crate::tools::GuestInit::BuiltIn,
            accel: Accel::Tcg,
            tsc_khz: Some(2_400_000),
            kernel: "/img/vmlinuz".into(),
            image: Image { dir: "/img".into(), meta },
            layers: Vec::new(),
            nix_store: None,
            network,
            env: s.guest_env.vars.clone(),
            trust: Default::default(),
            cri_disk: None,
            sandbox: None,
            login: None,
            ids: IdMap::for_host(1001, 1002),
            clipboard: None,
            tty: false,
            winsize: None,
        }
    }

    pub fn plan(s: &Settings, res: &Resources) -> Plan {
        Plan::new(s, res, InstanceRef { id: "0123456789ab", dir: Path::new("/run/agentvm/0123456789ab") })
    }

    fn args(plan: &Plan) -> Vec<String> {
        plan.qemu_args().into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    fn value_of(args: &[String], flag: &str) -> Vec<String> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].clone()).collect()
    }

    /// The value the guest sees: the last one.
    fn env_of<'a>(plan: &'a Plan, name: &str) -> Option<&'a str> {
        plan.spec.env.iter().rfind(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn tcg_plan_has_the_tsc_hint_and_cpu_max_and_kvm_plan_has_the_host_cpu() {
        let s = settings();
        let tcg = plan(&s, &resources(&s));
        let a = args(&tcg);
        assert_eq!(value_of(&a, "-accel"), ["tcg,thread=multi"]);
        assert_eq!(value_of(&a, "-cpu"), ["max"]);
        assert!(tcg.vm.cmdline.contains("tsc_early_khz=2400000"), "{}", tcg.vm.cmdline);
        // 2 GiB is nudged past the initrd clash.
        assert_eq!(value_of(&a, "-m"), ["2052M"]);
        let kvm = plan(&s, &Resources { accel: Accel::Kvm, tsc_khz: None, ..resources(&s) });
        let a = args(&kvm);
        assert_eq!(value_of(&a, "-accel"), ["kvm"]);
        assert_eq!(value_of(&a, "-cpu"), ["host"]);
        assert!(!kvm.vm.cmdline.contains("tsc_early_khz"));
    }

    #[test]
    fn fds_in_the_argv_are_the_fd_plans() {
        let s = Settings { host_ports: vec![5432], ..settings() };
        let p = plan(&s, &resources(&s));
        assert_eq!(
            (p.fds.control, p.fds.initramfs, p.fds.network, p.fds.forwarding, p.fds.console),
            (3, 4, Some(5), Some(6), 7)
        );
        let a = args(&p);
        assert_eq!(value_of(&a, "-initrd"), ["/proc/self/fd/4"]);
        assert!(value_of(&a, "-chardev").contains(&"socket,id=ctl,fd=3".to_string()));
        assert!(value_of(&a, "-chardev").contains(&"socket,id=fwd,fd=6".to_string()));
        assert_eq!(value_of(&a, "-netdev"), ["stream,id=net0,addr.type=fd,addr.str=5"]);
        assert_eq!(value_of(&a, "-add-fd"), ["fd=7,set=1,opaque=console"]);
    }

    #[test]
    fn open_network_with_passt_loads_the_network_modules_and_configures_the_interface() {
        let s = settings();
        let p = plan(&s, &resources(&s));
        assert!(matches!(p.network.interface, Interface::Passt(_)));
        assert!(p.spec.modules.contains(&"virtio_net.ko".to_string()));
        assert!(p.spec.network.is_some());
        assert_eq!(p.fds.forwarding, None);
        assert!(!value_of(&args(&p), "-chardev").iter().any(|c| c.contains("id=fwd")));
    }

    #[test]
    fn slirp_has_no_passt_fd_and_forwards_ports_in_qemu() {
        let s =
            Settings { net_backend: NetBackend::Slirp, ports: vec![PortSpec::parse("8080:80").unwrap()], ..settings() };
        let mut res = resources(&s);
        res.network = NetworkPlan::decide(s.network, s.net_backend, &s.ports, &[], None, None).unwrap().0;
        let p = plan(&s, &res);
        assert_eq!(p.fds.network, None);
        let netdev = value_of(&args(&p), "-netdev");
        assert!(
            netdev[0].starts_with("user,id=net0") && netdev[0].contains("hostfwd=tcp:127.0.0.1:8080"),
            "{netdev:?}"
        );
        assert!(p.spec.published_ports.is_empty());
    }

    #[test]
    fn the_clipboard_is_a_port_of_its_own_and_off_leaves_none() {
        let s = Settings { clipboard: ClipboardMode::Images, ..settings() };
        let p = plan(&s, &resources(&s));
        assert!(p.spec.clipboard);
        assert_eq!(p.fds.clipboard, Some(8));
        assert!(value_of(&args(&p), "-chardev").contains(&"socket,id=clip,fd=8".to_string()));
        assert_eq!(env_of(&p, "XDG_SESSION_TYPE"), Some("x11"), "Gemini CLI looks for xclip only in a session");
        let off = plan(&settings(), &resources(&settings()));
        assert!(!off.spec.clipboard && off.fds.clipboard.is_none() && env_of(&off, "XDG_SESSION_TYPE").is_none());
        assert!(!value_of(&args(&off), "-device").iter().any(|d| d.contains("org.agentvm.clip")));
    }

    #[test]
    fn watching_loads_the_module_last_and_has_a_port_of_its_own() {
        let p = plan(&settings(), &resources(&settings()));
        assert_eq!(p.watch, WatchPlan::On { project: "/p/project".into() });
        assert!(p.spec.watch && p.spec.modules.last().map(String::as_str) == Some("agentvm_notify.ko"));
        assert_eq!(p.fds.watch, Some(9));
        assert!(value_of(&args(&p), "-device").contains(&"virtserialport,chardev=watch,name=org.agentvm.watch".into()));
    }

    #[test]
    fn watching_is_off_when_asked_for_a_clone_or_without_the_module_and_only_the_last_is_told() {
        let s = Settings { watch: false, ..settings() };
        let off = plan(&s, &resources(&s));
        assert!(matches!(off.watch, WatchPlan::Off { tell: false, .. }));
        assert!(!off.spec.watch && !off.spec.modules.iter().any(|m| m.contains("notify")) && off.fds.watch.is_none());
        assert!(!value_of(&args(&off), "-device").iter().any(|d| d.contains("org.agentvm.watch")));
        let mut res = resources(&settings());
        res.image.meta.watch_module = None;
        let WatchPlan::Off { why, tell: true } = plan(&settings(), &res).watch else { panic!("on without a module") };
        assert!(
            why.contains("has no agentvm_notify.ko") && why.contains("agentvm image build --refresh --base"),
            "{why}"
        );
    }

    #[test]
    fn no_network_has_no_interface_no_network_modules_and_no_channel() {
        let s = Settings { network: NetworkMode::None, ..settings() };
        let p = plan(&s, &resources(&s));
        assert!(value_of(&args(&p), "-netdev").is_empty());
        assert!(!p.spec.modules.iter().any(|m| m.contains("net")), "{:?}", p.spec.modules);
        assert_eq!(p.spec.network, None);
        assert_eq!((p.fds.network, p.fds.forwarding), (None, None));
    }

    #[test]
    fn allow_mode_has_only_the_channel_with_the_proxy_and_published_ports() {
        let s =
            Settings { network: NetworkMode::Allow, ports: vec![PortSpec::parse("8080:80").unwrap()], ..settings() };
        let p = plan(&s, &resources(&s));
        assert!(value_of(&args(&p), "-netdev").is_empty());
        assert_eq!(p.fds.forwarding, Some(6));
        assert_eq!(p.spec.host_ports, [crate::net::egress::PROXY_PORT]);
        assert_eq!(p.spec.published_ports, [80]);
        assert!(env_of(&p, "HTTPS_PROXY").is_some());
    }

    fn host_proxy(vars: &[(&str, &str)]) -> Option<crate::net::host_proxy::HostProxy> {
        let get = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        crate::net::host_proxy::HostProxy::from_env(&get).unwrap()
    }

    #[test]
    fn open_network_hands_the_host_proxy_to_the_guest_a_loopback_one_over_the_channel() {
        let proxy = host_proxy(&[("HTTPS_PROXY", "http://127.0.0.1:3128"), ("HTTP_PROXY", "http://proxy.corp:8080")]);
        let s = Settings { host_ports: vec![5432], host_proxy: proxy, ..settings() };
        let p = plan(&s, &resources(&s));
        assert_eq!(p.spec.host_ports, [5432, 3128]);
        assert_eq!(p.fds.forwarding, Some(6), "the channel carries the proxy's port");
        assert_eq!(env_of(&p, "https_proxy"), Some("http://host.agentvm.internal:3128"));
        assert_eq!(env_of(&p, "HTTP_PROXY"), Some("http://proxy.corp:8080"));
        assert!(env_of(&p, "NO_PROXY").unwrap().ends_with("localhost,127.0.0.1,::1,host.agentvm.internal"));
        assert_eq!(p.network.upstream_proxy(), None);
    }

    #[test]
    fn allow_mode_chains_through_the_host_proxy_and_the_guest_sees_only_agentvms() {
        let proxy = host_proxy(&[("HTTPS_PROXY", "http://me:hunter2@127.0.0.1:3129")]);
        let s = Settings { network: NetworkMode::Allow, host_proxy: proxy, ..settings() };
        let p = plan(&s, &resources(&s));
        assert_eq!(p.spec.host_ports, [crate::net::egress::PROXY_PORT], "the host proxy's port stays closed");
        assert_eq!(env_of(&p, "HTTPS_PROXY"), Some("http://host.agentvm.internal:3128"));
        assert!(p.network.upstream_proxy().unwrap().https.unwrap().has_credentials());
        assert!(!p.spec.env.iter().any(|(_, v)| v.contains("hunter2")));
        let initramfs = crate::launch::initramfs::Initramfs { bytes: Vec::new(), modules: Vec::new() };
        let text =
            crate::launch::print::PlanReport::new(&p, &resources(&s), &initramfs, Default::default()).to_string();
        assert!(
            text.contains("host proxy http://127.0.0.1:3129 (from HTTPS_PROXY)") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[test]
    fn shares_are_the_project_the_home_and_the_nix_store_when_asked() {
        let s = settings();
        let p = plan(&s, &resources(&s));
        let tags: Vec<&str> = p.shares.iter().map(|s| s.tag.as_str()).collect();
        assert_eq!(tags, ["work", "home"]);
        assert_eq!(p.spec.mounts[0].path, guest::WORK);
        assert_eq!(p.spec.mounts[1].path, guest::HOME);
        assert_eq!(p.vm.shares[0], ("work".into(), "/run/agentvm/0123456789ab/work.sock".into()));
        let res = Resources { nix_store: Some("/nix/store".into()), ..resources(&s) };
        let p = plan(&s, &res);
        let nix = p.shares.iter().find(|s| s.tag == "nixstore").unwrap();
        assert!(nix.read_only);
        assert_eq!(nix.guest_path, guest::NIX_STORE);
    }

    #[test]
    fn spec_runs_the_program_as_the_agent_in_work_with_the_host_users_ids() {
        let s = settings();
        let p = plan(&s, &resources(&s));
        assert_eq!(p.spec.argv, ["make", "test"]);
        assert_eq!(p.spec.cwd, guest::WORK);
        assert_eq!((p.spec.user.name.as_str(), p.spec.user.uid, p.spec.user.gid), (guest::USER, 1001, 1002));
        assert_eq!(p.spec.hostname, "agentvm-012345");
    }

    #[test]
    fn spec_environment_without_the_shield_has_the_real_value_and_no_ca() {
        let s = settings();
        let p = plan(&s, &resources(&s));
        assert_eq!(env_of(&p, "API_KEY"), Some("s3cr3t"));
        assert!(p.spec.ca_trust.is_empty());
        assert_eq!(env_of(&p, "SSL_CERT_FILE"), None);
    }

    /// A stand-in certificate (the plan only carries it).
    fn cert(tag: &[u8]) -> CertificateDer<'static> {
        CertificateDer::from(tag.to_vec())
    }

    #[test]
    fn spec_environment_with_the_shield_has_the_placeholder_and_trusts_the_ca() {
        let s = Settings { network: NetworkMode::Allow, shield_secrets: true, ..settings() };
        let mut res = resources(&s);
        res.env = vec![("API_KEY".into(), "agentvm-shielded-00".into())];
        res.trust = GuestTrust { public: Vec::new(), extra: vec![cert(b"instance CA")] };
        let p = plan(&s, &res);
        assert_eq!(env_of(&p, "API_KEY"), Some("agentvm-shielded-00"));
        assert!(!p.spec.env.iter().any(|(_, v)| v == "s3cr3t"));
        assert_eq!((p.spec.ca_trust.bundle.len(), p.spec.ca_trust.extra.len()), (0, 1));
        assert_eq!(env_of(&p, "NODE_EXTRA_CA_CERTS"), Some(agentvm_proto::spec::EXTRA_CA_PATH));
    }

    #[test]
    fn the_hosts_cas_make_the_guests_bundle_and_the_programs_own_variables_win() {
        let s = settings();
        let mut res = resources(&s);
        res.trust = GuestTrust { public: vec![cert(b"public root")], extra: vec![cert(b"company CA")] };
        let p = plan(&s, &res);
        assert_eq!(p.spec.ca_trust, res.trust.spec());
        assert!(p.spec.ca_trust.bundle[0].starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(env_of(&p, "SSL_CERT_FILE"), Some(agentvm_proto::spec::SYSTEM_BUNDLE));
        assert_eq!(env_of(&p, "REQUESTS_CA_BUNDLE"), Some(agentvm_proto::spec::SYSTEM_BUNDLE));
        assert_eq!(env_of(&p, "NODE_EXTRA_CA_CERTS"), Some(agentvm_proto::spec::EXTRA_CA_PATH));

        res.env.push(("SSL_CERT_FILE".into(), "/work/mine.pem".into()));
        assert_eq!(env_of(&plan(&s, &res), "SSL_CERT_FILE"), Some("/work/mine.pem"));
        res.trust.extra.clear();
        assert_eq!(env_of(&plan(&s, &res), "NODE_EXTRA_CA_CERTS"), None, "Node has the public roots");
    }

    #[test]
    fn layers_and_the_container_disk_are_disks_with_their_serials() {
        let s = Settings { cri: vec![crate::guest_env::cri::Runtime::Docker], ..settings() };
        let res = Resources {
            layers: vec!["/img/layer.squashfs".into()],
            cri_disk: Some("/data/cri/project.ext4".into()),
            ..resources(&s)
        };
        let p = plan(&s, &res);
        assert_eq!(p.spec.layers, ["serial:agentvm-layer0"]);
        assert_eq!(p.spec.containers.as_ref().unwrap().runtimes, ["docker"]);
        let drives = value_of(&args(&p), "-drive");
        assert_eq!(drives.len(), 3);
        assert!(drives[2].ends_with("file=/data/cri/project.ext4"));
    }

    #[test]
    fn a_sandbox_has_its_disk_the_project_read_only_its_export_dir_and_no_writable_project() {
        use crate::sandbox::{repo::RepoBase, store::SandboxPaths, SandboxName};
        let s = Settings { cri: vec![crate::guest_env::cri::Runtime::Docker], ..settings() };
        let name = SandboxName::parse("fix-1").unwrap();
        let paths = SandboxPaths::new(Path::new("/data"), "project-0", &name);
        let base = RepoBase { branch: None, commit: "c0ffee".into() };
        let res = Resources {
            cri_disk: Some(paths.containers()),
            sandbox: Some(SandboxPlan { name, paths, base, held: None }),
            ..resources(&s)
        };
        let p = plan(&s, &res);
        let mounts: Vec<(&str, &str, bool)> =
            p.spec.mounts.iter().map(|m| (m.tag.as_str(), m.path.as_str(), m.read_only)).collect();
        assert_eq!(
            mounts,
            [
                ("work", guest::SANDBOX_HOST_REPO, true),
                ("export", guest::SANDBOX_EXPORT, false),
                ("home", guest::HOME, false)
            ]
        );
        assert_eq!(p.shares[0].host_dir, s.work_dir);
        assert_eq!(p.shares[1].host_dir, Path::new("/data/sandboxes/project-0/fix-1/export"));
        let sandbox = p.spec.sandbox.as_ref().unwrap();
        assert_eq!(
            (sandbox.name.as_str(), sandbox.branch.as_deref(), sandbox.commit.as_str()),
            ("fix-1", None, "c0ffee")
        );
        assert_eq!(sandbox.disk, "serial:agentvm-work");
        let drives = value_of(&args(&p), "-drive");
        assert!(drives[1].starts_with("id=agentvm-work,") && drives[1].ends_with("fix-1/disk.ext4"), "{drives:?}");
        assert!(drives[2].starts_with("id=agentvm-cri,") && drives[2].ends_with("fix-1/containers.ext4"), "{drives:?}");
        assert_eq!(p.spec.cwd, guest::WORK);
    }
}
