//! `agentvm run --print-plan [--json]`: the plan as a person or a script
//! (bench/run) reads it. The program's environment is redacted: values may
//! be secrets.

use std::fmt;
use std::time::Duration;

use agentvm_proto::LaunchSpec;
use serde::Serialize;

use super::fds::FdPlan;
use super::initramfs::Initramfs;
use super::plan::Plan;
use super::resources::Resources;
use crate::guest_env::host_ca::{self, GuestTrust};
use crate::net::plan::NetworkPlan;

/// What an environment value is shown as.
pub const REDACTED: &str = "<redacted>";

/// A launch's plan, for printing.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    /// The QEMU program and its arguments.
    pub qemu: String,
    pub qemu_args: Vec<String>,
    /// The start of `qemu_args` that sets up the machine, accelerator, CPUs,
    /// memory and sandbox (no kernel, no devices): what a baseline VM shares.
    pub qemu_machine_args: Vec<String>,
    /// The kernel QEMU boots.
    pub kernel: String,
    pub kernel_cmdline: String,
    pub accel: String,
    /// Guest RAM as given to QEMU, in MiB.
    pub memory_mib: u64,
    pub cpus: u32,
    pub fds: FdPlan,
    pub network: NetworkPlan,
    pub shares: Vec<ShareReport>,
    /// The sandboxed clone (`--clone`), whose disk is /work.
    pub sandbox: Option<SandboxReport>,
    /// The login files shared with every project (`--login=shared`).
    pub login: Option<LoginReport>,
    /// What of the host's clipboard the guest gets and the host tool that
    /// reads it, e.g. `images: /usr/bin/xclip (DISPLAY=:0)`; None: off.
    pub clipboard: Option<String>,
    /// Whether the host's changes reach the guest's file watchers, e.g.
    /// `on: /p/project -> /work` or `off: watch = false`.
    pub watch: String,
    pub image: ImageReport,
    pub initramfs_bytes: usize,
    /// The guest init in it: built in, or the file AGENTVM_GUEST_INIT names.
    pub guest_init: String,
    /// The launcher's time from its start to the plan, in milliseconds.
    pub plan_ms: f64,
    pub trust: TrustReport,
    /// The launch spec, its environment's values redacted and its
    /// certificates left out (see `trust`).
    pub spec: LaunchSpec,
    /// How the VM starts (`--start`).
    pub start: StartReport,
}

/// How the VM starts: booted, or restored from a template.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StartReport {
    /// `warm` or `cold`.
    pub mode: String,
    /// The template's key, when warm.
    pub template_key: Option<String>,
    /// Whether that template is made already (else the run makes it first).
    pub template_ready: bool,
    /// Why a warm start asked for would start cold.
    pub cold_because: Option<String>,
}

impl fmt::Display for StartReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.mode)?;
        if let Some(key) = &self.template_key {
            let made = if self.template_ready { "made" } else { "made by this run" };
            write!(f, " from template {key} ({made})")?;
        }
        match &self.cold_because {
            Some(why) => write!(f, " (warm asked for: {why})"),
            None => Ok(()),
        }
    }
}

/// The CA certificates the guest trusts.
#[derive(Debug, Clone, Serialize)]
pub struct TrustReport {
    /// The host's public roots, making up the guest's bundle (0: the
    /// image's bundle stays).
    pub public_roots: usize,
    /// The names of the others (the host's company or local CAs, the
    /// instance CA), which join it.
    pub extra: Vec<String>,
}

impl TrustReport {
    fn new(trust: &GuestTrust) -> TrustReport {
        TrustReport { public_roots: trust.public.len(), extra: trust.extra.iter().map(host_ca::display_name).collect() }
    }
}

impl fmt::Display for TrustReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.public_roots {
            0 => write!(f, "the image's public roots")?,
            n => write!(f, "the host's {n} public roots")?,
        }
        match self.extra.as_slice() {
            [] => Ok(()),
            [one] => write!(f, " + {one}"),
            more => write!(f, " + {} other CAs (`agentvm doctor` names them)", more.len()),
        }
    }
}

/// The image the launch boots.
#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    pub dir: String,
    /// The compressed kernel (bzImage), whether or not it is the one booted.
    pub bzimage: String,
    /// The boot modules the initramfs holds, in load order.
    pub boot_modules: Vec<ModuleReport>,
}

/// A boot module: the initramfs holds the first `unsigned_len` bytes of
/// `path` (the module without its appended signature).
#[derive(Debug, Clone, Serialize)]
pub struct ModuleReport {
    pub file: String,
    pub path: String,
    pub unsigned_len: usize,
}

/// One share, for printing.
#[derive(Debug, Clone, Serialize)]
pub struct ShareReport {
    pub tag: String,
    pub host_dir: String,
    pub guest_path: String,
    pub read_only: bool,
    pub cache: String,
}

/// A sandbox, for printing.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxReport {
    pub name: String,
    pub disk: String,
    /// Its disk is made by this run, which clones the project onto it.
    pub new: bool,
    /// Where a new one starts: the project's branch (none: detached) and commit.
    pub branch: Option<String>,
    pub commit: String,
}

/// The shared login: its files, kept in step between the agent home and
/// the store.
#[derive(Debug, Clone, Serialize)]
pub struct LoginReport {
    pub store: String,
    pub files: Vec<String>,
}

impl PlanReport {
    pub fn new(plan: &Plan, res: &Resources, initramfs: &Initramfs, elapsed: Duration) -> PlanReport {
        let lossy = |s: &std::ffi::OsStr| s.to_string_lossy().into_owned();
        let mut spec = plan.spec.clone();
        spec.ca_trust = Default::default();
        for (_, value) in &mut spec.env {
            *value = REDACTED.into();
        }
        PlanReport {
            qemu: res.qemu.display().to_string(),
            qemu_args: plan.qemu_args().iter().map(|a| lossy(a)).collect(),
            qemu_machine_args: crate::vm::qemu_machine_args(&plan.vm).iter().map(|a| lossy(a)).collect(),
            kernel: plan.vm.kernel.display().to_string(),
            kernel_cmdline: plan.vm.cmdline.clone(),
            accel: plan.vm.accel.to_string(),
            memory_mib: plan.vm.memory_mib,
            cpus: plan.vm.cpus,
            fds: plan.fds,
            network: plan.network.clone(),
            shares: plan
                .shares
                .iter()
                .map(|s| ShareReport {
                    tag: s.tag.clone(),
                    host_dir: s.host_dir.display().to_string(),
                    guest_path: s.guest_path.clone(),
                    read_only: s.read_only,
                    cache: s.cache.as_str().into(),
                })
                .collect(),
            sandbox: res.sandbox.as_ref().map(|s| SandboxReport {
                name: s.name.to_string(),
                disk: s.paths.disk().display().to_string(),
                new: !s.paths.exists(),
                branch: s.base.branch.clone(),
                commit: s.base.commit.clone(),
            }),
            login: res
                .login
                .as_ref()
                .map(|l| LoginReport { store: l.store.display().to_string(), files: l.files.clone() }),
            clipboard: res.clipboard.as_ref().map(|host| format!("{}: {}", plan.clipboard.name(), host.describe())),
            watch: plan.watch.describe(),
            image: ImageReport {
                dir: res.image.dir.display().to_string(),
                bzimage: res.image.bzimage().display().to_string(),
                boot_modules: initramfs
                    .modules
                    .iter()
                    .map(|m| ModuleReport {
                        file: m.file.clone(),
                        path: m.path.display().to_string(),
                        unsigned_len: m.unsigned_len,
                    })
                    .collect(),
            },
            initramfs_bytes: initramfs.bytes.len(),
            guest_init: res.guest_init.to_string(),
            plan_ms: elapsed.as_secs_f64() * 1000.0,
            trust: TrustReport::new(&res.trust),
            spec,
            start: StartReport { mode: "cold".into(), ..Default::default() },
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the plan serializes")
    }
}

/// The name a unit variant has in the JSON (e.g. `open`, `passt`).
fn serde_name(value: impl Serialize) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

/// `arg` as a shell reads it back as one word.
fn shell_quoted(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || ",.=/:_+-@%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn optional_fd(fd: Option<i32>) -> String {
    fd.map_or_else(|| "-".into(), |fd| fd.to_string())
}

impl fmt::Display for PlanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "accelerator   {}", self.accel)?;
        writeln!(f, "memory        {} MiB, {} CPUs", self.memory_mib, self.cpus)?;
        writeln!(f, "initramfs     {} bytes, guest init {}", self.initramfs_bytes, self.guest_init)?;
        writeln!(f, "planned in    {:.1} ms", self.plan_ms)?;
        writeln!(f, "start         {}", self.start)?;
        let fds = &self.fds;
        writeln!(
            f,
            "fds           control {}, initramfs {}, network {}, forwarding {}, console {}, clipboard {}, watch {}",
            fds.control,
            fds.initramfs,
            optional_fd(fds.network),
            optional_fd(fds.forwarding),
            fds.console,
            optional_fd(fds.clipboard),
            optional_fd(fds.watch)
        )?;
        write_network(f, &self.network)?;
        for s in &self.shares {
            let mode = if s.read_only { "ro" } else { "rw" };
            writeln!(f, "share         {} {} -> {} ({mode}, cache {})", s.tag, s.host_dir, s.guest_path, s.cache)?;
        }
        if let Some(l) = &self.login {
            writeln!(f, "login         shared with {}: {}", l.store, l.files.join(" "))?;
        }
        if let Some(clipboard) = &self.clipboard {
            writeln!(f, "clipboard     {clipboard}")?;
        }
        writeln!(f, "watch         {}", self.watch)?;
        writeln!(f, "image         {}", self.image.dir)?;
        if let Some(s) = &self.sandbox {
            let from = format!("{} at {}", s.branch.as_deref().unwrap_or("detached HEAD"), s.commit);
            let when = if s.new { format!("new: a clone of {from}") } else { "existing".into() };
            writeln!(f, "sandbox       {} on {} -> {} ({when})", s.name, s.disk, agentvm_proto::guest::WORK)?;
        }
        writeln!(f, "modules       {}", self.spec.modules.join(" "))?;
        let env: Vec<&str> = self.spec.env.iter().map(|(name, _)| name.as_str()).collect();
        writeln!(f, "environment   {} (values redacted)", env.join(" "))?;
        writeln!(f, "trusted CAs   {}", self.trust)?;
        writeln!(f, "kernel        {}", self.kernel_cmdline)?;
        write!(f, "qemu          {}", self.qemu)?;
        for arg in &self.qemu_args {
            if arg.starts_with('-') {
                write!(f, " \\\n                {arg}")?;
            } else {
                write!(f, " {}", shell_quoted(arg))?;
            }
        }
        writeln!(f)
    }
}

fn write_network(f: &mut fmt::Formatter<'_>, net: &NetworkPlan) -> fmt::Result {
    let interface = match &net.interface {
        crate::net::plan::Interface::None => "no interface".to_string(),
        crate::net::plan::Interface::Passt(bin) => format!("passt ({})", bin.display()),
        crate::net::plan::Interface::Slirp => "slirp".to_string(),
    };
    write!(f, "network       {}: {interface}", serde_name(net.mode))?;
    if net.proxy {
        write!(f, ", egress proxy")?;
    }
    if !net.host_ports.is_empty() {
        write!(f, ", host ports {:?}", net.host_ports)?;
    }
    if let Some(hp) = &net.host_proxy {
        write!(f, ", host proxy {hp}")?;
    }
    if !net.published.is_empty() {
        let ports: Vec<String> = net.published.iter().map(ToString::to_string).collect();
        write!(f, ", published {} via {}", ports.join(" "), serde_name(net.published_via))?;
    }
    writeln!(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::initramfs::PackedModule;
    use crate::launch::plan::tests::{plan, resources, settings};

    fn report() -> PlanReport {
        let s = settings();
        let res = resources(&s);
        let module = PackedModule {
            file: "virtio_mmio.ko".into(),
            path: "/img/modules/virtio_mmio.ko".into(),
            unsigned_len: 4000,
        };
        let initramfs = Initramfs { bytes: vec![0; 8192], modules: vec![module] };
        PlanReport::new(&plan(&s, &res), &res, &initramfs, Duration::from_micros(12_345))
    }

    #[test]
    fn text_names_every_part_and_never_a_secret() {
        let text = report().to_string();
        for part in
            ["accelerator   tcg", "memory        2052 MiB, 2 CPUs", "initramfs     8192 bytes", "planned in    12.3 ms"]
        {
            assert!(text.contains(part), "{part:?} missing in\n{text}");
        }
        assert!(
            text.contains(
                "fds           control 3, initramfs 4, network 5, forwarding -, console 7, clipboard -, watch 9"
            ),
            "{text}"
        );
        assert!(text.contains("network       open: passt (/usr/bin/passt)"), "{text}");
        assert!(text.contains("watch         on: /p/project -> /work"), "{text}");
        assert!(text.contains("share         work /p/project -> /work (rw, cache auto)"), "{text}");
        assert!(text.contains("kernel        console=ttyS0"), "{text}");
        assert!(text.contains("image         /img\n"), "{text}");
        assert!(text.contains("-append 'console=ttyS0 "), "{text}");
        assert!(
            text.contains("qemu          /usr/bin/qemu-system-x86_64 \\\n                -name agentvm-0123456789ab"),
            "{text}"
        );
        assert!(text.contains("environment   API_KEY (values redacted)"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    #[test]
    fn a_sandbox_shows_its_disk_and_the_project_read_only() {
        use crate::launch::resources::SandboxPlan;
        use crate::sandbox::{repo::RepoBase, store::SandboxPaths, SandboxName};
        let s = settings();
        let name = SandboxName::parse("fix-1").unwrap();
        let sandbox = SandboxPlan {
            paths: SandboxPaths::new(std::path::Path::new("/data"), "project-0", &name),
            name,
            base: RepoBase { branch: Some("main".into()), commit: "c0ffee".into() },
            held: None,
        };
        let res = Resources { sandbox: Some(sandbox), ..resources(&s) };
        let text =
            PlanReport::new(&plan(&s, &res), &res, &Initramfs { bytes: vec![0], modules: Vec::new() }, Duration::ZERO)
                .to_string();
        for part in [
            "share         work /p/project -> /agentvm/host (ro, cache auto)",
            "share         export /data/sandboxes/project-0/fix-1/export -> /agentvm/export (rw, cache auto)",
            "sandbox       fix-1 on /data/sandboxes/project-0/fix-1/disk.ext4 -> /work (new: a clone of main at c0ffee)",
            "file=/data/sandboxes/project-0/fix-1/disk.ext4",
        ] {
            assert!(text.contains(part), "{part:?} missing in\n{text}");
        }
        assert!(!text.contains("-> /work (rw"), "{text}");
    }

    #[test]
    fn a_shared_login_shows_its_store_and_files() {
        let s = settings();
        assert!(!report().to_string().contains("login "), "none without login files");
        let login = crate::guest_env::login::Places {
            home: s.home_dir.clone(),
            store: "/data/logins/claude".into(),
            files: vec![".claude/.credentials.json".into()],
        };
        let res = Resources { login: Some(login), ..resources(&s) };
        let report =
            PlanReport::new(&plan(&s, &res), &res, &Initramfs { bytes: vec![0], modules: Vec::new() }, Duration::ZERO);
        let text = report.to_string();
        assert!(text.contains("login         shared with /data/logins/claude: .claude/.credentials.json\n"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["login"]["files"][0], ".claude/.credentials.json");
    }

    #[test]
    fn a_shared_clipboard_shows_its_mode_and_the_host_tool() {
        let s = crate::config::Settings { clipboard: crate::clipboard::ClipboardMode::All, ..settings() };
        let mut res = resources(&s);
        res.clipboard = Some(crate::clipboard::HostClipboard::missing("no session".into()));
        let initramfs = Initramfs { bytes: Vec::new(), modules: Vec::new() };
        let text = PlanReport::new(&plan(&s, &res), &res, &initramfs, Duration::ZERO).to_string();
        assert!(text.contains("clipboard     all: none: no session"), "{text}");
        assert!(text.contains("console 7, clipboard 8"), "{text}");
        assert!(!report().to_string().contains("clipboard     "), "off shows no clipboard line");
    }

    #[test]
    fn the_trust_store_is_summed_up_not_dumped() {
        let s = settings();
        let mut res = resources(&s);
        assert!(report().to_string().contains("trusted CAs   the image's public roots\n"));
        let company = host_ca::tests::ca_named("Example Company Inspection CA");
        res.trust = GuestTrust { public: vec![company.clone(); 3], extra: vec![company.clone()] };
        let initramfs = Initramfs { bytes: vec![0; 4096], modules: Vec::new() };
        let report = PlanReport::new(&plan(&s, &res), &res, &initramfs, Duration::ZERO);
        assert!(
            report.to_string().contains("trusted CAs   the host's 3 public roots + Example Company Inspection CA\n"),
            "{report}"
        );
        let json = report.to_json();
        assert!(!json.contains("BEGIN CERTIFICATE"), "{json}");
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(json["trust"], serde_json::json!({ "public_roots": 3, "extra": ["Example Company Inspection CA"] }));
        res.trust.extra = vec![company; 2];
        let report = PlanReport::new(&plan(&s, &res), &res, &initramfs, Duration::ZERO);
        assert!(report.to_string().contains(" + 2 other CAs (`agentvm doctor` names them)\n"), "{report}");
    }

    #[test]
    fn json_has_the_argv_and_the_fds_and_redacts_the_environment() {
        let json: serde_json::Value = serde_json::from_str(&report().to_json()).unwrap();
        assert_eq!(json["accel"], "tcg");
        assert_eq!(json["fds"]["control"], 3);
        assert_eq!(json["fds"]["network"], 5);
        assert_eq!(json["network"]["interface"]["passt"], "/usr/bin/passt");
        assert_eq!(json["initramfs_bytes"], 8192);
        assert!(json["guest_init"].as_str().unwrap().starts_with("built in ("), "{json}");
        assert!(json["qemu_args"].as_array().unwrap().iter().any(|a| a == "-kernel"));
        assert!(json["kernel_cmdline"].as_str().unwrap().contains("rdinit=/init"));
        assert_eq!(json["kernel"], "/img/vmlinuz");
        assert_eq!(json["image"]["dir"], "/img");
        assert_eq!(json["image"]["bzimage"], "/img/vmlinuz");
        assert_eq!(
            json["image"]["boot_modules"],
            serde_json::json!([{ "file": "virtio_mmio.ko", "path": "/img/modules/virtio_mmio.ko", "unsigned_len": 4000 }])
        );
        // The machine part is where the whole command line starts.
        let (machine, all) = (json["qemu_machine_args"].as_array().unwrap(), json["qemu_args"].as_array().unwrap());
        assert!(machine.iter().any(|a| a == "-accel") && all.starts_with(machine), "{machine:?}");
        assert!(!machine.iter().any(|a| a == "-kernel"), "{machine:?}");
        assert_eq!(json["spec"]["env"][0], serde_json::json!(["API_KEY", REDACTED]));
        assert!(!json.to_string().contains("s3cr3t"));
    }
}
