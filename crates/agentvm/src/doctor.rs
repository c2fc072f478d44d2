//! `agentvm doctor`: checks every host requirement and says how to fix
//! each one that fails; `--fix` installs the missing packages, with the
//! commands of host-packages.txt (the list scripts/setup-host reads too).

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::guest_env::host_ca::{self, HostCas};
use crate::host_setup::{self, Installer, Need, Release, Requirement, Source, Step};
use crate::image::subids;
use crate::net::dns::{self, Resolver};
use crate::net::host_proxy::HostProxy;
use crate::{paths, tools, vm::accel, vm::share};

/// A command of `--fix` that failed.
#[derive(Debug, thiserror::Error)]
pub enum FixError {
    #[error("cannot run `{command}`: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("`{command}` failed ({status}); fix what it says, then run `agentvm doctor --fix` again")]
    Failed { command: String, status: std::process::ExitStatus },
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but worse than it could (e.g. TCG instead of KVM).
    Warn,
    Fail,
}

/// One requirement, checked.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do when it is not Ok.
    pub fix: Option<String>,
    /// The list's entry whose packages fix it, when some do.
    pub installs: Option<&'static Requirement>,
}

/// Oldest QEMU known to run our microvm set-up (ACPI virtio-mmio discovery).
const MIN_QEMU: (u32, u32) = (7, 2);
/// How long the network checks may wait for an answer.
const NET_PROBE: Duration = Duration::from_secs(2);

fn ok(name: &'static str, detail: impl Into<String>) -> Check {
    Check { name, status: Status::Ok, detail: detail.into(), fix: None, installs: None }
}

fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name, status: Status::Fail, detail: detail.into(), fix: Some(fix.into()), installs: None }
}

fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { status: Status::Warn, ..fail(name, detail, fix) }
}

/// Runs every check, on this host's release.
pub fn run_checks() -> Vec<Check> {
    let release = Release::this_host();
    let mut checks: Vec<Check> = host_setup::for_release(host_setup::builtin(), &release)
        .into_iter()
        .filter(|req| req.need != Need::Test)
        .map(|req| match req.name() {
            "qemu-system-x86_64" => check_qemu(req),
            "virtiofsd" => check_virtiofsd(req),
            _ => check_requirement(req),
        })
        .collect();
    checks.extend([
        check_guest_init(),
        check_accel(),
        check_kvm_access(),
        check_userns(),
        check_subids(),
        check_dir("cache dir", paths::cache_dir()),
        check_dir("data dir", paths::data_dir()),
        check_runtime_dir(),
        check_host_proxy(&|k| std::env::var(k).ok()),
        check_dns(&Resolver::system()),
        host_ca_check(&HostCas::load(&|var| std::env::var(var).ok())),
    ]);
    checks
}

/// What installs `req`, in a few words.
fn install_hint(req: &Requirement) -> String {
    let packages = req.packages.join(" ");
    match req.source {
        Source::Apt => format!("install {packages}"),
        Source::Backports => format!("install {packages} from backports"),
        Source::Cargo => format!("build it: cargo install {} (needs {})", req.packages[0], req.packages[1..].join(" ")),
    }
}

/// `check` failed (or, when optional, warns), and `req`'s packages fix it.
fn missing(req: &'static Requirement, detail: String) -> Check {
    let check = fail(req.label(), detail, install_hint(req));
    let status = if req.need == Need::Optional { Status::Warn } else { Status::Fail };
    Check { status, installs: Some(req), ..check }
}

/// A program or file of the list, found or not.
fn check_requirement(req: &'static Requirement) -> Check {
    let path = std::env::var_os("PATH");
    let found = req.check.split_whitespace().find_map(|c| match c.starts_with('/') {
        true => Some(std::path::PathBuf::from(c)).filter(|p| p.exists()),
        false => path.as_deref().and_then(|p| tools::find_in_path(c, p)),
    });
    match found {
        Some(at) => ok(req.label(), at.display().to_string()),
        None => missing(req, format!("{} not found ({})", req.name(), req.why)),
    }
}

/// Parses "QEMU emulator version 10.0.2 (...)" into (10, 0).
pub fn parse_qemu_version(out: &str) -> Option<(u32, u32)> {
    let v = out.split("version ").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

fn check_qemu(req: &'static Requirement) -> Check {
    let name = "qemu";
    let outdated = |detail: String| Check { name, ..missing(req, detail) };
    let Some(bin) = tools::find_qemu() else {
        return outdated(format!("qemu-system-x86_64 not found ({})", req.why));
    };
    let out = Command::new(&bin).arg("--version").output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    match parse_qemu_version(&text) {
        Some(v) if v >= MIN_QEMU => {
            let machines = Command::new(&bin).args(["-machine", "help"]).output();
            let has_microvm = machines.map(|o| String::from_utf8_lossy(&o.stdout).contains("microvm")).unwrap_or(false);
            if has_microvm {
                ok(name, format!("QEMU {}.{} at {}", v.0, v.1, bin.display()))
            } else {
                outdated(format!("{} lacks the microvm machine", bin.display()))
            }
        }
        Some(v) => {
            outdated(format!("QEMU {}.{} at {} is older than {}.{}", v.0, v.1, bin.display(), MIN_QEMU.0, MIN_QEMU.1))
        }
        None => outdated(format!("{} --version printed no version", bin.display())),
    }
}

fn check_virtiofsd(req: &'static Requirement) -> Check {
    match share::find_virtiofsd() {
        Some(bin) => {
            let v = Command::new(&bin).arg("--version").output();
            let v = v.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
            ok("virtiofsd", format!("{v} at {}", bin.display()))
        }
        None => missing(req, format!("not found on PATH, /usr/libexec or /usr/lib/qemu ({})", req.why)),
    }
}

fn check_guest_init() -> Check {
    match tools::guest_init() {
        tools::GuestInit::File(path) if !path.is_file() => fail(
            "guest init",
            format!("AGENTVM_GUEST_INIT={} is not a file", path.display()),
            "unset AGENTVM_GUEST_INIT to use the guest init built into agentvm",
        ),
        init => ok("guest init", init.to_string()),
    }
}

fn check_accel() -> Check {
    match accel::probe_kvm() {
        Ok(()) => ok("accelerator", "KVM runs guests"),
        Err(why) => warn(
            "accelerator",
            format!("no usable KVM ({why}); VMs run under TCG emulation, several times slower"),
            "use a host with hardware virtualization and kvm_intel/kvm_amd loaded",
        ),
    }
}

fn check_kvm_access() -> Check {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return warn("/dev/kvm", "missing", "load kvm_intel or kvm_amd (TCG works without it, slowly)");
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => ok("/dev/kvm", "readable and writable"),
        Err(e) => warn("/dev/kvm", format!("cannot open: {e}"), "sudo usermod -aG kvm $USER, then log in again"),
    }
}

fn check_userns() -> Check {
    if crate::sys::process::userns_works() {
        ok("user namespaces", "available")
    } else {
        fail(
            "user namespaces",
            "this user cannot create user namespaces",
            "enable them: sysctl kernel.unprivileged_userns_clone=1 (Debian) or user.max_user_namespaces=15000",
        )
    }
}

fn check_subids() -> Check {
    let uid = crate::sys::uid();
    if uid == 0 {
        return ok("subordinate ids", "not needed as root");
    }
    let user = subids::user_name(uid);
    match subids::check(user.as_deref(), uid) {
        Ok(()) => ok(
            "subordinate ids",
            format!(
                "{} has ranges of at least {} ids in /etc/subuid and /etc/subgid",
                user.unwrap_or_else(|| uid.to_string()),
                subids::NEEDED
            ),
        ),
        Err(shortfall) => fail("subordinate ids", shortfall.to_string(), shortfall.fix()),
    }
}

fn check_dir(name: &'static str, dir: Result<std::path::PathBuf, paths::PathsError>) -> Check {
    let dir = match dir {
        Ok(d) => d,
        Err(e) => return fail(name, e.to_string(), "set HOME"),
    };
    let probe = dir.join(format!(".doctor-{}", std::process::id()));
    let result = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&probe, b"ok"));
    let _ = std::fs::remove_file(&probe);
    match result {
        Ok(()) => ok(name, format!("{} is writable", dir.display())),
        Err(e) => fail(
            name,
            format!("{}: {e}", dir.display()),
            format!("make {} writable, or point the XDG variable elsewhere", dir.display()),
        ),
    }
}

fn check_runtime_dir() -> Check {
    let base = paths::runtime_base();
    match crate::instance::ensure_private_dir(&base) {
        Ok(()) => ok("runtime dir", format!("{} is private and writable", base.display())),
        Err(e) => fail("runtime dir", e.to_string(), "remove it, or set XDG_RUNTIME_DIR to a private directory"),
    }
}

/// The host's HTTP proxy in the environment `get`: where it is (never its
/// credentials), and whether it accepts a connection.
fn check_host_proxy(get: &dyn Fn(&str) -> Option<String>) -> Check {
    let name = "host proxy";
    let found = match HostProxy::from_env(get) {
        Ok(Some(found)) => found,
        Ok(None) => return ok(name, "none (no HTTPS_PROXY or HTTP_PROXY): the guest connects directly"),
        Err(e) => return fail(name, e.to_string(), "fix or unset the variable"),
    };
    let resolver = Resolver::system();
    for p in found.http.iter().chain(&found.https) {
        let addrs = resolver.lookup(&p.host).map_err(|e| e.to_string());
        let reached = addrs.and_then(|ips| {
            let mut last = "no address".to_string();
            for ip in ips {
                match TcpStream::connect_timeout(&SocketAddr::new(ip, p.port), NET_PROBE) {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(last)
        });
        if let Err(why) = reached {
            return warn(
                name,
                format!("cannot connect to {p}: {why}"),
                format!("start the proxy, or unset {} for agentvm", p.var),
            );
        }
    }
    let creds = found.http.iter().chain(&found.https).any(|p| p.has_credentials());
    let note = if creds { " (with credentials: --network allow only, they stay on the host)" } else { "" };
    ok(name, format!("{found}{note}: --network open hands it to the guest, --network allow connects through it"))
}

/// Whether a name server of resolv.conf answers (`--network allow`
/// resolves names itself, with no help from the C library).
fn check_dns(resolver: &Resolver) -> Check {
    match resolver.probe(NET_PROBE) {
        Ok(server) => ok("dns", format!("{} answers ({} first, then {})", server.ip(), dns::HOSTS, dns::RESOLV_CONF)),
        Err(why) => warn(
            "dns",
            format!("no name server of {} answers: {why}", dns::RESOLV_CONF),
            format!(
                "--network allow resolves names with the name servers of {}: fix it or the network (names a host proxy resolves need no DNS here)",
                dns::RESOLV_CONF
            ),
        ),
    }
}

/// Where the guest's trust store comes from (`--host-ca`), and the CAs
/// the host trusts beyond the public web roots (a company's that inspects
/// TLS, a local one).
pub fn host_ca_check(cas: &HostCas) -> Check {
    let name = "host CAs";
    let sources: Vec<String> = cas
        .sources
        .iter()
        .map(|s| match s.held {
            None => format!("{} (read already)", s.label),
            Some(held) if held == s.new => format!("{} ({held})", s.label),
            Some(held) => format!("{} ({held}, {} new)", s.label, s.new),
        })
        .collect();
    let extra: Vec<String> = cas.extra().map(|c| host_ca::display_name(&c.der)).collect();
    let detail = match (sources.is_empty(), extra.len()) {
        (true, _) => "none found".to_string(),
        (false, 0) => format!("{}: {} for the guest, all public web roots", sources.join(", "), cas.certs.len()),
        // A distribution may still ship roots Mozilla has dropped: they count here too.
        (false, n) => format!(
            "{}: {} for the guest, {n} not among the current public web roots (webpki-roots): {}",
            sources.join(", "),
            cas.certs.len(),
            extra.join(", ")
        ),
    };
    if cas.warnings.is_empty() {
        return ok(name, detail);
    }
    warn(
        name,
        format!("{detail}; {}", cas.warnings.join("; ")),
        "fix or unset what the warning names; --host-ca=off gives the guest its image's public roots only",
    )
}

/// What `agentvm doctor` prints: a line per check, with the fix under each
/// one that is not Ok, then the verdict.
pub fn report(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let tag = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("{tag} {:<17} {}\n", c.name, c.detail));
        if let Some(fix) = c.fix.as_ref().filter(|_| c.status != Status::Ok) {
            out.push_str(&format!("     {:<17} fix: {fix}\n", ""));
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    out.push_str(&match failed {
        0 => "agentvm is ready.\n".to_string(),
        n => format!("{n} requirement(s) missing.\n"),
    });
    out
}

/// Whether no check failed (warnings allowed).
pub fn all_passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.status != Status::Fail)
}

/// Who installs on this host: root, or this user with sudo.
pub fn installer(release: &Release) -> Installer {
    Installer {
        as_root: crate::sys::is_root(),
        backports_configured: host_setup::apt_has_suite(&format!("{}-backports", release.codename)),
        cargo_bin: host_setup::cargo_bin(),
    }
}

/// The commands that install the packages of every check that is not Ok
/// (none where apt does not install: there the fixes name the packages).
pub fn fix_steps(checks: &[Check], release: &Release, installer: &Installer) -> Vec<Step> {
    if !release.apt {
        return Vec::new();
    }
    let missing: Vec<&Requirement> =
        checks.iter().filter(|c| c.status != Status::Ok).filter_map(|c| c.installs).collect();
    installer.steps(&missing, release)
}

/// The commands as `agentvm doctor` prints them, one a line, indented.
pub fn steps_text(steps: &[Step], as_root: bool) -> String {
    steps.iter().map(|s| format!("    {}\n", s.command_line(as_root))).collect()
}

/// Runs `steps` in order, root's through sudo unless `as_root`; stops at
/// the first that fails.
pub fn run_steps(steps: &[Step], as_root: bool) -> Result<(), FixError> {
    for step in steps {
        let mut cmd = match step {
            Step::Root(line) if !as_root => {
                let mut c = Command::new("sudo");
                c.args(["sh", "-c", line]);
                c
            }
            Step::Root(line) | Step::User(line) => {
                let mut c = Command::new("sh");
                c.args(["-c", line]);
                c
            }
        };
        let command = step.command_line(as_root);
        eprintln!("agentvm: running {command}");
        let status = cmd.status().map_err(|source| FixError::Spawn { command: command.clone(), source })?;
        if !status.success() {
            return Err(FixError::Failed { command, status });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_version_parses() {
        assert_eq!(parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds)\n"), Some((10, 0)));
        assert_eq!(parse_qemu_version("QEMU emulator version 7.2.15\n"), Some((7, 2)));
        assert_eq!(parse_qemu_version("garbage"), None);
    }

    #[test]
    fn host_cas_name_their_sources_and_the_cas_beyond_the_public_roots() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle.crt");
        let company = host_ca::pem_of(&host_ca::tests::ca_named("Example Company Inspection CA"));
        std::fs::write(&bundle, &company).unwrap();
        let own = dir.path().join("own.pem");
        std::fs::write(&own, [company.as_str(), &host_ca::pem_of(&host_ca::tests::ca_named("Own CA"))].concat())
            .unwrap();
        let get = |var: &str| match var {
            "SSL_CERT_FILE" => Some(own.display().to_string()),
            "NODE_EXTRA_CA_CERTS" => Some(bundle.display().to_string()),
            _ => None,
        };
        let check = host_ca_check(&HostCas::load_from(&[&bundle], &get));
        assert_eq!(check.status, Status::Ok);
        assert_eq!(
            check.detail,
            format!(
                "{b} (1), SSL_CERT_FILE={o} (2, 1 new), NODE_EXTRA_CA_CERTS={b} (read already): 2 for the guest, \
                 2 not among the current public web roots (webpki-roots): Example Company Inspection CA, Own CA",
                b = bundle.display(),
                o = own.display()
            )
        );
        let check = host_ca_check(&HostCas::load_from(&[&dir.path().join("none")], &|_| None));
        assert_eq!(check.status, Status::Warn);
        assert!(check.detail.starts_with("none found; --host-ca: no system CA bundle"));
    }

    #[test]
    fn report_shows_fixes_for_what_is_not_ok_and_the_verdict() {
        let checks = [
            ok("qemu", "QEMU 10.0"),
            warn("/dev/kvm", "missing", "load kvm"),
            fail("npm", "npm not found", "install npm"),
        ];
        let text = report(&checks);
        assert_eq!(
            text,
            format!(
                "ok   qemu              QEMU 10.0\nwarn /dev/kvm          missing\n     {:<17} fix: load kvm\n\
                 FAIL npm               npm not found\n     {:<17} fix: install npm\n1 requirement(s) missing.\n",
                "", ""
            )
        );
        assert!(!all_passed(&checks));
        assert!(all_passed(&checks[..2]));
        assert!(report(&checks[..2]).ends_with("agentvm is ready.\n"));
    }

    #[test]
    fn the_host_proxy_is_reported_without_credentials_and_checked_for_a_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = format!("http://me:hunter2@127.0.0.1:{port}");
        let vars = [("HTTPS_PROXY", url.as_str())];
        let c = check_host_proxy(&|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()));
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(
            c.detail.starts_with(&format!("http://127.0.0.1:{port} (from HTTPS_PROXY) (with credentials")),
            "{c:?}"
        );
        assert!(!c.detail.contains("hunter2"));
        drop(listener);
        let c = check_host_proxy(&|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()));
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.detail.contains("cannot connect") && !c.detail.contains("hunter2"), "{c:?}");
        assert_eq!(check_host_proxy(&|_| None).status, Status::Ok);
        let c = check_host_proxy(&|k| (k == "http_proxy").then(|| "socks5://x:1".to_string()));
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.detail.contains("http_proxy"), "{c:?}");
    }

    #[test]
    fn dns_is_reported_working_when_a_name_server_answers() {
        let dns = crate::net::dns::tests::StandInDns::start(crate::net::dns::tests::example_zone, false);
        let c = check_dns(&dns.resolver());
        assert_eq!(c.status, Status::Ok, "{c:?}");
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let conf = dns::ResolvConf { nameservers: vec![silent.local_addr().unwrap()], ..Default::default() };
        let c = check_dns(&Resolver::new(conf, String::new()));
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.detail.contains("no name server"), "{c:?}");
    }
}
