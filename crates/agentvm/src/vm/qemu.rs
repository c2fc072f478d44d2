//! The QEMU command line, built by a pure function from a [`VmConfig`].

use std::ffi::OsString;
use std::path::PathBuf;

use super::accel::Accel;

/// Everything QEMU needs to know about one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Shown in `ps` output and QEMU's window title.
    pub name: String,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    /// The initramfs; normally `/proc/self/fd/N` of an inherited memfd.
    pub initrd: PathBuf,
    pub cmdline: String,
    /// Read-only root image (virtio-blk disk with serial [`ROOT_SERIAL`]).
    pub root_image: PathBuf,
    /// Read-only layers above the root, topmost first (serials from
    /// [`layer_serial`]).
    pub layers: Vec<PathBuf>,
    /// File descriptor (inherited by QEMU) of the write end of a pipe that
    /// takes the guest's serial console (kernel and init messages).
    pub console_fd: i32,
    /// File descriptor (inherited by QEMU) of a connected stream socket for
    /// the control port.
    pub control_fd: i32,
    /// virtiofs shares: tag and vhost-user socket path.
    pub shares: Vec<(String, PathBuf)>,
    /// Socket paths QEMU listens on for the exec ports (`agentvm exec`),
    /// one per port `org.agentvm.exec.<i>`, in order.
    pub exec_sockets: Vec<PathBuf>,
    /// Use QEMU's seccomp sandbox.
    pub sandbox: bool,
    /// The `-netdev` value of the guest's network (id `net0`), if any.
    pub netdev: Option<String>,
    /// Writable disks: serial ([`DATA_SERIAL`], [`SANDBOX_SERIAL`]) and
    /// image file.
    pub data_disks: Vec<(String, PathBuf)>,
    /// The inherited socket of the host-port forwarding channel, if any.
    pub forward_fd: Option<i32>,
    /// The inherited socket of the clipboard channel (`--clipboard`), if any.
    pub clipboard_fd: Option<i32>,
    /// The inherited socket of the watch channel (host changes), if any.
    pub watch_fd: Option<i32>,
    /// Guest RAM in this file (`memory-backend-file`, shared) instead of an
    /// anonymous memfd: a warm-start template's RAM, or a restored VM's
    /// copy of it.
    pub memory_file: Option<PathBuf>,
    /// The inherited socket of a QMP monitor (saving and restoring VMs).
    pub qmp_fd: Option<i32>,
    /// Wait for a saved state (`-incoming defer`, then QMP) instead of booting.
    pub incoming: bool,
}

/// The guest RAM to give QEMU for a requested size. With exactly 2 GiB, the
/// linuxboot option ROM puts the initrd's end on the 2 GiB boundary, inside
/// the ACPI tables at the top of RAM, and the archive's tail is corrupted
/// (seen as a kernel module whose signature "was rejected"). A few MiB more
/// moves the tables above the initrd limit.
pub fn qemu_memory_mib(requested: u64) -> u64 {
    if requested == 2048 {
        2052
    } else {
        requested
    }
}

/// The fd set (`-add-fd`) holding the console pipe.
const CONSOLE_FDSET: u32 = 1;

/// Serial number of the root image's disk.
pub const ROOT_SERIAL: &str = "agentvm-root";
/// Serial of the container disk.
pub const DATA_SERIAL: &str = "agentvm-cri";
/// Serial of a sandbox's disk (`--clone`).
pub const SANDBOX_SERIAL: &str = "agentvm-work";

/// Serial number of the disk of layer `i`.
pub fn layer_serial(i: usize) -> String {
    format!("agentvm-layer{i}")
}

/// Builds QEMU's argument vector (without the program name).
pub fn qemu_args(cfg: &VmConfig) -> Vec<OsString> {
    let mut a = Args::default();
    machine(&mut a, cfg);
    boot(&mut a, cfg);
    serial_console(&mut a, cfg);
    virtio_serial_ports(&mut a, cfg);
    disks(&mut a, cfg);
    // Free page reporting: the guest hands pages it frees back to the host.
    a.flag("-device").val("virtio-balloon-device,free-page-reporting=on");
    data_disk(&mut a, cfg);
    network(&mut a, cfg);
    shares(&mut a, cfg);
    monitor(&mut a, cfg);
    a.0
}

/// The part of [`qemu_args`] that sets up the machine, the accelerator,
/// the CPUs, the memory and the sandbox, without a kernel or devices: what
/// a baseline VM shares with agentvm's (bench/run reads it from
/// `--print-plan --json`).
pub fn qemu_machine_args(cfg: &VmConfig) -> Vec<OsString> {
    let mut a = Args::default();
    machine(&mut a, cfg);
    a.0
}

/// The machine, accelerator, CPUs, memory and sandbox.
fn machine(a: &mut Args, cfg: &VmConfig) {
    a.flag("-name").val(format!("{},debug-threads=on", cfg.name));
    // microvm: no PCI, no firmware, virtio-mmio found through ACPI (keep ACPI
    // on: it is also how guest power-off ends QEMU).
    a.flag("-machine").val("microvm,acpi=on,pit=off,pic=off,rtc=on,isa-serial=on,memory-backend=mem");
    a.flag("-accel").val(match cfg.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg,thread=multi",
    });
    a.flag("-cpu").val(match cfg.accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    });
    a.flag("-smp").val(cfg.cpus.to_string());
    a.flag("-m").val(format!("{}M", cfg.memory_mib));
    // vhost-user (virtiofsd) needs guest RAM in shareable memory.
    match &cfg.memory_file {
        None => a.flag("-object").val(format!("memory-backend-memfd,id=mem,size={}M,share=on", cfg.memory_mib)),
        Some(file) => {
            let mut backend =
                OsString::from(format!("memory-backend-file,id=mem,size={}M,share=on,mem-path=", cfg.memory_mib));
            backend.push(escape_commas(file));
            a.flag("-object").val(backend)
        }
    };
    a.flag("-nodefaults").flag("-no-user-config").flag("-no-reboot");
    a.flag("-display").val("none");
    if cfg.sandbox {
        a.flag("-sandbox").val("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
    }
}

/// Kernel, initramfs and command line.
fn boot(a: &mut Args, cfg: &VmConfig) {
    a.flag("-kernel").val(&cfg.kernel);
    a.flag("-initrd").val(&cfg.initrd);
    a.flag("-append").val(&cfg.cmdline);
}

/// The serial console, on its inherited pipe.
fn serial_console(a: &mut Args, cfg: &VmConfig) {
    // A file chardev on the inherited pipe: QEMU makes it non-blocking, and
    // a pipe packs the serial port's one-byte writes into pages (a socket
    // takes a buffer per write and fills after a few hundred bytes).
    // QEMU's file chardev opens an fd set only in append mode.
    a.flag("-add-fd").val(format!("fd={},set={CONSOLE_FDSET},opaque=console", cfg.console_fd));
    a.flag("-chardev").val(format!("file,id=console,path=/dev/fdset/{CONSOLE_FDSET},append=on"));
    a.flag("-serial").val("chardev:console");
}

/// The control port, the exec ports, the forwarding and clipboard channels.
fn virtio_serial_ports(a: &mut Args, cfg: &VmConfig) {
    // Port 0 is reserved for a console; the control port, then the exec ports.
    let channels = [cfg.forward_fd, cfg.clipboard_fd, cfg.watch_fd];
    let ports = 2 + cfg.exec_sockets.len() + channels.iter().flatten().count();
    a.flag("-device").val(format!("virtio-serial-device,max_ports={ports}"));
    a.flag("-chardev").val(format!("socket,id=ctl,fd={}", cfg.control_fd));
    a.flag("-device").val(format!("virtserialport,chardev=ctl,name={}", agentvm_proto::PORT_NAME));
    for (i, socket) in cfg.exec_sockets.iter().enumerate() {
        // A listening socket: one client at a time, the next waits in the backlog.
        let mut chardev = OsString::from(format!("socket,id=exec{i},server=on,wait=off,path="));
        chardev.push(escape_commas(socket));
        a.flag("-chardev").val(chardev);
        a.flag("-device").val(format!("virtserialport,chardev=exec{i},name={}", agentvm_proto::exec_port_name(i)));
    }
    if let Some(fd) = cfg.forward_fd {
        a.flag("-chardev").val(format!("socket,id=fwd,fd={fd}"));
        a.flag("-device").val(format!("virtserialport,chardev=fwd,name={}", agentvm_proto::forward::PORT_NAME));
    }
    if let Some(fd) = cfg.clipboard_fd {
        a.flag("-chardev").val(format!("socket,id=clip,fd={fd}"));
        a.flag("-device").val(format!("virtserialport,chardev=clip,name={}", agentvm_proto::clipboard::PORT_NAME));
    }
    if let Some(fd) = cfg.watch_fd {
        a.flag("-chardev").val(format!("socket,id=watch,fd={fd}"));
        a.flag("-device").val(format!("virtserialport,chardev=watch,name={}", agentvm_proto::watch::PORT_NAME));
    }
}

/// The root image and the layers, read-only.
fn disks(a: &mut Args, cfg: &VmConfig) {
    // Disks carry serials so the guest finds each one whatever the probe
    // order; they are shared read-only by every VM using the image.
    let disks = std::iter::once((ROOT_SERIAL.to_string(), &cfg.root_image))
        .chain(cfg.layers.iter().enumerate().map(|(i, p)| (layer_serial(i), p)));
    for (serial, image) in disks {
        let mut drive = OsString::from(format!("id={serial},if=none,format=raw,read-only=on,file.locking=off,file="));
        drive.push(escape_commas(image));
        a.flag("-drive").val(drive);
        a.flag("-device").val(format!("virtio-blk-device,drive={serial},serial={serial}"));
    }
}

/// The writable data disks.
fn data_disk(a: &mut Args, cfg: &VmConfig) {
    for (serial, disk) in &cfg.data_disks {
        // Locked by QEMU too: a second VM cannot open it behind our back.
        let mut drive = OsString::from(format!("id={serial},if=none,format=raw,discard=unmap,file="));
        drive.push(escape_commas(disk));
        a.flag("-drive").val(drive);
        a.flag("-device").val(format!("virtio-blk-device,drive={serial},serial={serial}"));
    }
}

/// The network interface, if any.
fn network(a: &mut Args, cfg: &VmConfig) {
    if let Some(netdev) = &cfg.netdev {
        a.flag("-netdev").val(netdev);
        a.flag("-device").val("virtio-net-device,netdev=net0");
    }
}

/// One vhost-user-fs device per share.
fn shares(a: &mut Args, cfg: &VmConfig) {
    for (tag, socket) in &cfg.shares {
        let mut chardev = OsString::from(format!("socket,id=fs-{tag},path="));
        chardev.push(escape_commas(socket));
        a.flag("-chardev").val(chardev);
        a.flag("-device").val(format!("vhost-user-fs-device,chardev=fs-{tag},tag={tag}"));
    }
}

/// The QMP monitor and the wait for a saved state, when asked for.
fn monitor(a: &mut Args, cfg: &VmConfig) {
    if let Some(fd) = cfg.qmp_fd {
        a.flag("-chardev").val(format!("socket,id=qmp,fd={fd}"));
        a.flag("-mon").val("chardev=qmp,mode=control");
    }
    if cfg.incoming {
        a.flag("-incoming").val("defer");
    }
}

/// The kernel command line for our guest init.
pub fn kernel_cmdline(tsc_khz: Option<u64>, verbose: bool) -> String {
    let mut c = vec![
        "console=ttyS0".to_string(),
        "panic=-1".into(),
        "rdinit=/init".into(),
        // microvm has no PCI bus: do not probe for one.
        "pci=off".into(),
        // No PS/2 controller on microvm: skip probing it.
        "i8042.noaux".into(),
        "i8042.nomux".into(),
        "i8042.nopnp".into(),
        "i8042.dumbkbd".into(),
        // The crypto self-tests take about 0.5 s of a TCG boot. They check
        // the kernel's own algorithm implementations, not anything an
        // attacker controls, and the same kernel passed them upstream.
        "cryptomgr.notests".into(),
    ];
    if !verbose {
        c.push("quiet".into());
    }
    // Under TCG the kernel may fail to calibrate the TSC and hang; tell it.
    if let Some(khz) = tsc_khz {
        c.push(format!("tsc_early_khz={khz}"));
    }
    c.join(" ")
}

/// QEMU option values separate on `,`; a literal comma is written `,,`.
fn escape_commas(p: &std::path::Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::new();
    for &b in p.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

#[derive(Debug, Default)]
struct Args(Vec<OsString>);

impl Args {
    fn flag(&mut self, f: &str) -> &mut Self {
        self.0.push(f.into());
        self
    }
    fn val(&mut self, v: impl Into<OsString>) -> &mut Self {
        self.0.push(v.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            name: "agentvm-abc".into(),
            accel: Accel::Tcg,
            cpus: 2,
            memory_mib: 4096,
            kernel: "/img/vmlinuz".into(),
            initrd: "/proc/self/fd/5".into(),
            cmdline: "console=ttyS0".into(),
            root_image: "/img/root,1.squashfs".into(),
            layers: vec![],
            console_fd: 7,
            control_fd: 4,
            shares: vec![("work".into(), "/run/x/work.sock".into())],
            exec_sockets: vec![],
            sandbox: true,
            netdev: None,
            forward_fd: None,
            clipboard_fd: None,
            watch_fd: None,
            data_disks: Vec::new(),
            memory_file: None,
            qmp_fd: None,
            incoming: false,
        }
    }

    fn strings(cfg: &VmConfig) -> Vec<String> {
        qemu_args(cfg).into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    fn value_of(args: &[String], flag: &str) -> Vec<String> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].clone()).collect()
    }

    #[test]
    fn tcg_uses_cpu_max_and_kvm_uses_host() {
        let args = strings(&cfg());
        assert_eq!(value_of(&args, "-accel"), ["tcg,thread=multi"]);
        assert_eq!(value_of(&args, "-cpu"), ["max"]);
        let kvm = VmConfig { accel: Accel::Kvm, ..cfg() };
        let args = strings(&kvm);
        assert_eq!(value_of(&args, "-accel"), ["kvm"]);
        assert_eq!(value_of(&args, "-cpu"), ["host"]);
    }

    #[test]
    fn memory_backend_is_shared_and_sized_like_ram() {
        let args = strings(&cfg());
        assert_eq!(value_of(&args, "-m"), ["4096M"]);
        assert!(value_of(&args, "-object").contains(&"memory-backend-memfd,id=mem,size=4096M,share=on".to_string()));
        assert!(value_of(&args, "-machine")[0].contains("memory-backend=mem"));
    }

    #[test]
    fn a_memory_file_replaces_the_memfd_and_restores_wait_on_qmp() {
        let c = VmConfig { memory_file: Some("/t/ram,1".into()), qmp_fd: Some(8), incoming: true, ..cfg() };
        let args = strings(&c);
        let objects = value_of(&args, "-object");
        assert_eq!(objects, ["memory-backend-file,id=mem,size=4096M,share=on,mem-path=/t/ram,,1"]);
        assert!(value_of(&args, "-chardev").contains(&"socket,id=qmp,fd=8".to_string()));
        assert_eq!(value_of(&args, "-mon"), ["chardev=qmp,mode=control"]);
        assert_eq!(value_of(&args, "-incoming"), ["defer"]);
        assert!(value_of(&strings(&cfg()), "-incoming").is_empty());
    }

    #[test]
    fn root_and_layers_are_read_only_disks_with_serials() {
        let c = VmConfig { layers: vec!["/img/claude.squashfs".into()], ..cfg() };
        let args = strings(&c);
        let drives = value_of(&args, "-drive");
        assert_eq!(drives.len(), 2);
        assert!(drives.iter().all(|d| d.contains("read-only=on")));
        assert!(drives[1].ends_with("file=/img/claude.squashfs"));
        let devices = value_of(&args, "-device");
        assert!(devices.contains(&"virtio-blk-device,drive=agentvm-root,serial=agentvm-root".to_string()));
        assert!(devices.contains(&"virtio-blk-device,drive=agentvm-layer0,serial=agentvm-layer0".to_string()));
    }

    #[test]
    fn freed_guest_memory_is_reported_to_the_host() {
        let devices = value_of(&strings(&cfg()), "-device");
        assert!(devices.contains(&"virtio-balloon-device,free-page-reporting=on".to_string()));
    }

    #[test]
    fn forwarding_channel_is_one_more_port_on_its_inherited_socket() {
        let c = VmConfig { forward_fd: Some(6), ..cfg() };
        let args = strings(&c);
        assert!(value_of(&args, "-chardev").contains(&"socket,id=fwd,fd=6".to_string()));
        let devices = value_of(&args, "-device");
        assert!(devices.contains(&"virtserialport,chardev=fwd,name=org.agentvm.fwd".to_string()));
        assert!(devices.contains(&"virtio-serial-device,max_ports=3".to_string()));
        assert!(!value_of(&strings(&cfg()), "-chardev").iter().any(|c| c.contains("id=fwd")));
    }

    #[test]
    fn clipboard_channel_is_a_port_only_when_shared() {
        let c = VmConfig { forward_fd: Some(6), clipboard_fd: Some(8), ..cfg() };
        let args = strings(&c);
        assert!(value_of(&args, "-chardev").contains(&"socket,id=clip,fd=8".to_string()));
        let devices = value_of(&args, "-device");
        assert!(devices.contains(&"virtserialport,chardev=clip,name=org.agentvm.clip".to_string()));
        assert!(devices.contains(&"virtio-serial-device,max_ports=4".to_string()));
        let off = strings(&cfg());
        assert!(!value_of(&off, "-device").iter().any(|d| d.contains("org.agentvm.clip")));
    }

    #[test]
    fn watch_channel_is_a_port_only_when_on() {
        let c = VmConfig { clipboard_fd: Some(8), watch_fd: Some(9), ..cfg() };
        let args = strings(&c);
        assert!(value_of(&args, "-chardev").contains(&"socket,id=watch,fd=9".to_string()));
        let devices = value_of(&args, "-device");
        assert!(devices.contains(&"virtserialport,chardev=watch,name=org.agentvm.watch".to_string()));
        assert!(devices.contains(&"virtio-serial-device,max_ports=4".to_string()), "{devices:?}");
        assert!(!value_of(&strings(&cfg()), "-device").iter().any(|d| d.contains("org.agentvm.watch")));
    }

    #[test]
    fn data_disk_is_writable_with_its_serial() {
        let c = VmConfig { data_disks: vec![(DATA_SERIAL.into(), "/d/p,1.ext4".into())], ..cfg() };
        let args = strings(&c);
        let drive = value_of(&args, "-drive").into_iter().find(|d| d.contains(DATA_SERIAL)).unwrap();
        assert!(!drive.contains("read-only"), "{drive}");
        assert!(drive.ends_with("file=/d/p,,1.ext4"), "{drive}");
        assert!(
            value_of(&args, "-device").contains(&"virtio-blk-device,drive=agentvm-cri,serial=agentvm-cri".to_string())
        );
    }

    #[test]
    fn two_gib_is_nudged_past_the_initrd_clash_and_others_are_kept() {
        assert_eq!(qemu_memory_mib(2048), 2052);
        assert_eq!(qemu_memory_mib(512), 512);
        assert_eq!(qemu_memory_mib(4096), 4096);
    }

    #[test]
    fn network_device_only_with_a_netdev() {
        assert!(value_of(&strings(&cfg()), "-netdev").is_empty());
        let c = VmConfig { netdev: Some("stream,id=net0,addr.type=fd,addr.str=5".into()), ..cfg() };
        let args = strings(&c);
        assert_eq!(value_of(&args, "-netdev"), ["stream,id=net0,addr.type=fd,addr.str=5"]);
        assert!(value_of(&args, "-device").contains(&"virtio-net-device,netdev=net0".to_string()));
    }

    #[test]
    fn commas_in_paths_are_doubled() {
        let args = strings(&cfg());
        assert!(value_of(&args, "-drive")[0].ends_with("file=/img/root,,1.squashfs"));
    }

    #[test]
    fn each_share_gets_a_chardev_and_a_device() {
        let mut c = cfg();
        c.shares.push(("home".into(), "/run/x/home.sock".into()));
        let args = strings(&c);
        let devices = value_of(&args, "-device");
        assert!(devices.contains(&"vhost-user-fs-device,chardev=fs-work,tag=work".to_string()));
        assert!(devices.contains(&"vhost-user-fs-device,chardev=fs-home,tag=home".to_string()));
        assert!(value_of(&args, "-chardev").contains(&"socket,id=fs-home,path=/run/x/home.sock".to_string()));
    }

    #[test]
    fn control_port_uses_the_inherited_fd_and_the_protocol_name() {
        let args = strings(&cfg());
        assert!(value_of(&args, "-chardev").contains(&"socket,id=ctl,fd=4".to_string()));
        assert!(value_of(&args, "-device")
            .contains(&format!("virtserialport,chardev=ctl,name={}", agentvm_proto::PORT_NAME)));
    }

    #[test]
    fn exec_ports_listen_on_their_sockets_and_raise_max_ports() {
        let c = VmConfig { exec_sockets: vec!["/run/x/exec-0.sock".into(), "/run/x/exec-1.sock".into()], ..cfg() };
        let args = strings(&c);
        let devices = value_of(&args, "-device");
        assert!(devices.contains(&"virtio-serial-device,max_ports=4".to_string()));
        assert!(devices.contains(&"virtserialport,chardev=exec1,name=org.agentvm.exec.1".to_string()));
        assert!(value_of(&args, "-chardev")
            .contains(&"socket,id=exec0,server=on,wait=off,path=/run/x/exec-0.sock".to_string()));
        assert!(value_of(&strings(&cfg()), "-device").contains(&"virtio-serial-device,max_ports=2".to_string()));
    }

    #[test]
    fn serial_console_goes_to_its_inherited_pipe() {
        let args = strings(&cfg());
        assert_eq!(value_of(&args, "-add-fd"), ["fd=7,set=1,opaque=console"]);
        assert!(value_of(&args, "-chardev").contains(&"file,id=console,path=/dev/fdset/1,append=on".to_string()));
        assert_eq!(value_of(&args, "-serial"), ["chardev:console"]);
    }

    #[test]
    fn machine_args_begin_the_command_line_and_hold_no_kernel_or_device() {
        let c = cfg();
        let machine: Vec<String> = qemu_machine_args(&c).into_iter().map(|a| a.into_string().unwrap()).collect();
        let all = strings(&c);
        assert_eq!(all[..machine.len()], machine[..]);
        for flag in ["-machine", "-accel", "-cpu", "-smp", "-m", "-object", "-sandbox"] {
            assert!(machine.iter().any(|a| a == flag), "{flag} missing in {machine:?}");
        }
        for flag in ["-kernel", "-initrd", "-append", "-device", "-drive", "-chardev", "-serial"] {
            assert!(!machine.iter().any(|a| a == flag), "{flag} in {machine:?}");
        }
    }

    #[test]
    fn sandbox_flag_is_optional() {
        assert_eq!(value_of(&strings(&cfg()), "-sandbox").len(), 1);
        let c = VmConfig { sandbox: false, ..cfg() };
        assert!(value_of(&strings(&c), "-sandbox").is_empty());
    }

    #[test]
    fn cmdline_has_tsc_hint_and_quiet_unless_verbose() {
        let c = kernel_cmdline(Some(2_400_000), false);
        assert!(c.contains("tsc_early_khz=2400000"));
        assert!(c.contains("quiet"));
        assert!(!kernel_cmdline(None, true).contains("quiet"));
    }
}
