//! `agentvm run --print-plan [--json]`: the plan as a person or a script
//! (bench/run) reads it. The program's environment is redacted: values may
//! be secrets.

use std::fmt;
use std::time::Duration;

use agentvm_proto::LaunchSpec;
use serde::Serialize;

use super::fds::FdPlan;
use super::plan::Plan;
use super::resources::Resources;
use crate::net::plan::NetworkPlan;

/// What an environment value is shown as.
pub const REDACTED: &str = "<redacted>";

/// A launch's plan, for printing.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    /// The QEMU program and its arguments.
    pub qemu: String,
    pub qemu_args: Vec<String>,
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
    pub initramfs_bytes: usize,
    /// The launcher's time from its start to the plan, in milliseconds.
    pub plan_ms: f64,
    /// The launch spec, its environment's values redacted.
    pub spec: LaunchSpec,
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

impl PlanReport {
    pub fn new(plan: &Plan, res: &Resources, initramfs_bytes: usize, elapsed: Duration) -> PlanReport {
        let lossy = |s: &std::ffi::OsStr| s.to_string_lossy().into_owned();
        let mut spec = plan.spec.clone();
        for (_, value) in &mut spec.env {
            *value = REDACTED.into();
        }
        PlanReport {
            qemu: res.qemu.display().to_string(),
            qemu_args: plan.qemu_args().iter().map(|a| lossy(a)).collect(),
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
            initramfs_bytes,
            plan_ms: elapsed.as_secs_f64() * 1000.0,
            spec,
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
        writeln!(f, "initramfs     {} bytes", self.initramfs_bytes)?;
        writeln!(f, "planned in    {:.1} ms", self.plan_ms)?;
        let fds = &self.fds;
        writeln!(
            f,
            "fds           control {}, initramfs {}, network {}, forwarding {}, console {}",
            fds.control,
            fds.initramfs,
            optional_fd(fds.network),
            optional_fd(fds.forwarding),
            fds.console
        )?;
        write_network(f, &self.network)?;
        for s in &self.shares {
            let mode = if s.read_only { "ro" } else { "rw" };
            writeln!(f, "share         {} {} -> {} ({mode}, cache {})", s.tag, s.host_dir, s.guest_path, s.cache)?;
        }
        if let Some(s) = &self.sandbox {
            let from = format!("{} at {}", s.branch.as_deref().unwrap_or("detached HEAD"), s.commit);
            let when = if s.new { format!("new: a clone of {from}") } else { "existing".into() };
            writeln!(f, "sandbox       {} on {} -> {} ({when})", s.name, s.disk, agentvm_proto::guest::WORK)?;
        }
        writeln!(f, "modules       {}", self.spec.modules.join(" "))?;
        let env: Vec<&str> = self.spec.env.iter().map(|(name, _)| name.as_str()).collect();
        writeln!(f, "environment   {} (values redacted)", env.join(" "))?;
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
    if !net.published.is_empty() {
        let ports: Vec<String> = net.published.iter().map(ToString::to_string).collect();
        write!(f, ", published {} via {}", ports.join(" "), serde_name(net.published_via))?;
    }
    writeln!(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::plan::tests::{plan, resources, settings};

    fn report() -> PlanReport {
        let s = settings();
        let res = resources(&s);
        PlanReport::new(&plan(&s, &res), &res, 8192, Duration::from_micros(12_345))
    }

    #[test]
    fn text_names_every_part_and_never_a_secret() {
        let text = report().to_string();
        for part in
            ["accelerator   tcg", "memory        2052 MiB, 2 CPUs", "initramfs     8192 bytes", "planned in    12.3 ms"]
        {
            assert!(text.contains(part), "{part:?} missing in\n{text}");
        }
        assert!(text.contains("fds           control 3, initramfs 4, network 5, forwarding -, console 7"), "{text}");
        assert!(text.contains("network       open: passt (/usr/bin/passt)"), "{text}");
        assert!(text.contains("share         work /p/project -> /work (rw, cache auto)"), "{text}");
        assert!(text.contains("kernel        console=ttyS0"), "{text}");
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
        };
        let res = Resources { sandbox: Some(sandbox), ..resources(&s) };
        let text = PlanReport::new(&plan(&s, &res), &res, 1, Duration::ZERO).to_string();
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
    fn json_has_the_argv_and_the_fds_and_redacts_the_environment() {
        let json: serde_json::Value = serde_json::from_str(&report().to_json()).unwrap();
        assert_eq!(json["accel"], "tcg");
        assert_eq!(json["fds"]["control"], 3);
        assert_eq!(json["fds"]["network"], 5);
        assert_eq!(json["network"]["interface"]["passt"], "/usr/bin/passt");
        assert_eq!(json["initramfs_bytes"], 8192);
        assert!(json["qemu_args"].as_array().unwrap().iter().any(|a| a == "-kernel"));
        assert!(json["kernel_cmdline"].as_str().unwrap().contains("rdinit=/init"));
        assert_eq!(json["spec"]["env"][0], serde_json::json!(["API_KEY", REDACTED]));
        assert!(!json.to_string().contains("s3cr3t"));
    }
}
