//! `agentvm doctor`: checks every host requirement and says how to fix
//! each one that fails.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::guest_env::host_ca::{self, HostCas};
use crate::image::subids;
use crate::net::dns::{self, Resolver};
use crate::net::host_proxy::HostProxy;
use crate::{paths, tools, vm::accel, vm::share};

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
}

const SETUP: &str = "run scripts/setup-host (as root) from the agentvm source tree";

/// Oldest QEMU known to run our microvm set-up (ACPI virtio-mmio discovery).
const MIN_QEMU: (u32, u32) = (7, 2);
/// How long the network checks may wait for an answer.
const NET_PROBE: Duration = Duration::from_secs(2);

fn ok(name: &'static str, detail: impl Into<String>) -> Check {
    Check { name, status: Status::Ok, detail: detail.into(), fix: None }
}

fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name, status: Status::Fail, detail: detail.into(), fix: Some(fix.into()) }
}

/// Runs every check.
pub fn run_checks() -> Vec<Check> {
    vec![
        check_qemu(),
        check_virtiofsd(),
        check_program("mmdebstrap", "mmdebstrap", "builds the image"),
        check_program("tar2sqfs", "tar2sqfs", "makes the image's root file system (squashfs-tools-ng)"),
        check_program("passt", "passt", "gives the guest its network with the host's loopback closed; without it agentvm falls back to QEMU's slirp, which leaves it open"),
        check_program("npm", "npm", "installs the agents into their image layers"),
        check_program("mkfs.ext4", "mkfs.ext4", "makes the container disk for --cri (e2fsprogs)"),
        check_optional("direnv", "direnv", "--devshell with an .envrc needs it", SETUP),
        check_optional("nix", "nix", "--devshell with a flake.nix or devenv.nix needs it", "install Nix (https://nixos.org/download), or run scripts/setup-host"),
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
    ]
}

/// Parses "QEMU emulator version 10.0.2 (...)" into (10, 0).
pub fn parse_qemu_version(out: &str) -> Option<(u32, u32)> {
    let v = out.split("version ").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

fn check_qemu() -> Check {
    let name = "qemu";
    let Some(bin) = tools::find_qemu() else {
        return fail(name, "qemu-system-x86_64 not found", SETUP);
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
                fail(name, format!("{} lacks the microvm machine", bin.display()), SETUP)
            }
        }
        Some(v) => fail(
            name,
            format!("QEMU {}.{} at {} is older than {}.{}", v.0, v.1, bin.display(), MIN_QEMU.0, MIN_QEMU.1),
            format!("install a newer QEMU ({SETUP} uses bookworm-backports on Debian 12)"),
        ),
        None => fail(name, format!("{} --version printed no version", bin.display()), SETUP),
    }
}

fn check_virtiofsd() -> Check {
    match share::find_virtiofsd() {
        Some(bin) => {
            let v = Command::new(&bin).arg("--version").output();
            let v = v.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
            ok("virtiofsd", format!("{v} at {}", bin.display()))
        }
        None => fail(
            "virtiofsd",
            "not found on PATH, /usr/libexec or /usr/lib/qemu",
            format!("{SETUP} (installs the package, or builds it with cargo)"),
        ),
    }
}

fn check_program(name: &'static str, program: &str, why: &str) -> Check {
    match tools::find_program(program, &[]) {
        Some(p) => ok(name, p.display().to_string()),
        None => fail(name, format!("{program} not found ({why})"), SETUP),
    }
}

/// A program only some features need: missing is a warning.
fn check_optional(name: &'static str, program: &str, why: &str, fix: &str) -> Check {
    match tools::find_program(program, &[]) {
        Some(p) => ok(name, p.display().to_string()),
        None => Check {
            name,
            status: Status::Warn,
            detail: format!("{program} not found ({why})"),
            fix: Some(fix.to_string()),
        },
    }
}

fn check_guest_init() -> Check {
    match tools::find_guest_init() {
        Some(p) => ok("guest init", p.display().to_string()),
        None => fail(
            "guest init",
            "agentvm-guest not found next to the agentvm binary",
            "build the whole workspace (cargo build --release --workspace) or set AGENTVM_GUEST_INIT",
        ),
    }
}

fn check_accel() -> Check {
    match accel::probe_kvm() {
        Ok(()) => ok("accelerator", "KVM runs guests"),
        Err(why) => Check {
            name: "accelerator",
            status: Status::Warn,
            detail: format!("no usable KVM ({why}); VMs run under TCG emulation, several times slower"),
            fix: Some("use a host with hardware virtualization and kvm_intel/kvm_amd loaded".into()),
        },
    }
}

fn check_kvm_access() -> Check {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return Check {
            name: "/dev/kvm",
            status: Status::Warn,
            detail: "missing".into(),
            fix: Some("load kvm_intel or kvm_amd (TCG works without it, slowly)".into()),
        };
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => ok("/dev/kvm", "readable and writable"),
        Err(e) => Check {
            name: "/dev/kvm",
            status: Status::Warn,
            detail: format!("cannot open: {e}"),
            fix: Some("sudo usermod -aG kvm $USER, then log in again".into()),
        },
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
            return Check {
                name,
                status: Status::Warn,
                detail: format!("cannot connect to {p}: {why}"),
                fix: Some(format!("start the proxy, or unset {} for agentvm", p.var)),
            };
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
        Err(why) => Check {
            name: "dns",
            status: Status::Warn,
            detail: format!("no name server of {} answers: {why}", dns::RESOLV_CONF),
            fix: Some(format!(
                "--network allow resolves names with the name servers of {}: fix it or the network (names a host proxy resolves need no DNS here)",
                dns::RESOLV_CONF
            )),
        },
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
    Check {
        name,
        status: Status::Warn,
        detail: format!("{detail}; {}", cas.warnings.join("; ")),
        fix: Some(
            "fix or unset what the warning names; --host-ca=off gives the guest its image's public roots only".into(),
        ),
    }
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
            Check { name: "/dev/kvm", status: Status::Warn, detail: "missing".into(), fix: Some("load kvm".into()) },
            fail("npm", "npm not found", SETUP),
        ];
        let text = report(&checks);
        assert_eq!(
            text,
            format!(
                "ok   qemu              QEMU 10.0\nwarn /dev/kvm          missing\n     {:<17} fix: load kvm\n\
                 FAIL npm               npm not found\n     {:<17} fix: {SETUP}\n1 requirement(s) missing.\n",
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
