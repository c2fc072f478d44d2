//! What the host needs installed, and the commands that install it, from
//! `host-packages.txt`: the list scripts/setup-host reads too, so that
//! `agentvm doctor` and the script cannot disagree.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The list, as built into agentvm.
pub const HOST_PACKAGES: &str = include_str!("../host-packages.txt");

/// A line of the list that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("host-packages.txt line {line}: {what}")]
pub struct ListError {
    pub line: usize,
    pub what: String,
}

/// How much agentvm needs a requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// `agentvm doctor` fails without it.
    Required,
    /// A feature needs it: a warning.
    Optional,
    /// The test suite and bench/run only: doctor does not check it.
    Test,
}

/// Where a requirement's packages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Apt,
    /// Debian's `<codename>-backports`.
    Backports,
    /// `cargo install` of the first package; the others are apt packages
    /// it needs to build.
    Cargo,
}

/// One line of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// A program on PATH, or an absolute path that must exist; or several
    /// (separated by spaces), any one of which will do.
    pub check: String,
    pub need: Need,
    /// `*` or `ID-VERSION_ID` (e.g. `debian-12`).
    pub release: String,
    pub source: Source,
    pub packages: Vec<String>,
    pub why: String,
}

/// Parses the list: `check | need | release | from | packages | why`.
pub fn parse(text: &str) -> Result<Vec<Requirement>, ListError> {
    let mut list = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |what: String| ListError { line: i + 1, what };
        let fields: Vec<&str> = line.split('|').map(str::trim).collect();
        let [check, need, release, source, packages, why] = fields[..] else {
            return Err(err(format!("{} fields, not 6: {line}", fields.len())));
        };
        let need = match need {
            "required" => Need::Required,
            "optional" => Need::Optional,
            "test" => Need::Test,
            other => return Err(err(format!("need {other:?} is not required, optional or test"))),
        };
        let source = match source {
            "apt" => Source::Apt,
            "backports" => Source::Backports,
            "cargo" => Source::Cargo,
            other => return Err(err(format!("from {other:?} is not apt, backports or cargo"))),
        };
        let packages: Vec<String> = packages.split_whitespace().map(String::from).collect();
        if check.is_empty() || packages.is_empty() {
            return Err(err("a check and at least one package are needed".into()));
        }
        let (check, release, why) = (check.to_string(), release.to_string(), why.to_string());
        list.push(Requirement { check, need, release, source, packages, why });
    }
    Ok(list)
}

/// The built-in list (a unit test proves it parses).
pub fn builtin() -> &'static [Requirement] {
    static LIST: std::sync::LazyLock<Vec<Requirement>> =
        std::sync::LazyLock::new(|| parse(HOST_PACKAGES).expect("host-packages.txt parses"));
    &LIST
}

impl Requirement {
    /// What doctor calls it: the first of its checks.
    pub fn name(&self) -> &str {
        self.check.split_whitespace().next().unwrap_or_default()
    }

    /// What a person calls it: the program, or for a file the package
    /// that brings it.
    pub fn label(&self) -> &str {
        match self.name().starts_with('/') {
            true => &self.packages[0],
            false => self.name(),
        }
    }

    /// Whether any of its checks is there, looking for programs in `path`.
    pub fn is_present(&self, path: Option<&OsStr>) -> bool {
        self.check.split_whitespace().any(|check| is_present(check, path))
    }
}

/// The host's distribution, from `/etc/os-release`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Release {
    pub id: String,
    pub version_id: String,
    /// e.g. `bookworm`, for its backports.
    pub codename: String,
    /// Debian, Ubuntu or a derivative: apt installs the list's packages.
    pub apt: bool,
}

impl Release {
    /// Reads the `KEY=value` lines of an os-release file.
    pub fn parse(os_release: &str) -> Release {
        let field = |name: &str| {
            os_release
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
                .unwrap_or_default()
        };
        let (id, like) = (field("ID"), field("ID_LIKE"));
        let apt = [id.as_str()].into_iter().chain(like.split_whitespace()).any(|w| w == "debian" || w == "ubuntu");
        Release { id, version_id: field("VERSION_ID"), codename: field("VERSION_CODENAME"), apt }
    }

    /// This host's (`/etc/os-release`; unknown if unreadable).
    pub fn this_host() -> Release {
        Release::parse(&std::fs::read_to_string("/etc/os-release").unwrap_or_default())
    }

    /// What the list's `release` column names this release by.
    pub fn key(&self) -> String {
        format!("{}-{}", self.id, self.version_id)
    }
}

/// For each check (by its first name), the first line that applies to
/// `release`, in the list's order.
pub fn for_release<'a>(list: &'a [Requirement], release: &Release) -> Vec<&'a Requirement> {
    let key = release.key();
    let mut chosen: Vec<&Requirement> = Vec::new();
    for req in list.iter().filter(|r| r.release == "*" || r.release == key) {
        if !chosen.iter().any(|c| c.name() == req.name()) {
            chosen.push(req);
        }
    }
    chosen
}

/// Whether `check` is there: an absolute path that exists, or a program in
/// the directories of `path`.
fn is_present(check: &str, path: Option<&OsStr>) -> bool {
    if check.starts_with('/') {
        return Path::new(check).exists();
    }
    path.and_then(|p| crate::tools::find_in_path(check, p)).is_some()
}

/// One command that installs part of what is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Runs as root (through sudo for a normal user).
    Root(String),
    /// Runs as whoever asked (a build with that user's cargo).
    User(String),
}

impl Step {
    /// The command as a user types it: a root command through sudo when
    /// the user is not root.
    pub fn command_line(&self, as_root: bool) -> String {
        match self {
            Step::Root(cmd) if !as_root => format!("sudo {cmd}"),
            Step::Root(cmd) | Step::User(cmd) => cmd.clone(),
        }
    }
}

/// Who installs, and what the host already has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installer {
    /// Running as root (else root commands go through sudo).
    pub as_root: bool,
    /// The release's backports are in apt's sources already.
    pub backports_configured: bool,
    /// Where a normal user's `cargo install` puts binaries.
    pub cargo_bin: PathBuf,
}

const APT_INSTALL: &str = "apt-get install -y --no-install-recommends";

impl Installer {
    /// The commands that install `missing` on `release`: the same that
    /// scripts/setup-host runs (as root).
    pub fn steps(&self, missing: &[&Requirement], release: &Release) -> Vec<Step> {
        let of = |source: Source| missing.iter().filter(move |r| r.source == source);
        let backports: Vec<&str> = of(Source::Backports).flat_map(|r| r.packages.iter().map(String::as_str)).collect();
        let mut apt: Vec<&str> = of(Source::Apt).flat_map(|r| r.packages.iter().map(String::as_str)).collect();
        apt.extend(of(Source::Cargo).flat_map(|r| r.packages[1..].iter().map(String::as_str)));
        dedup_in_order(&mut apt);
        let mut steps = Vec::new();
        let suite = format!("{}-backports", release.codename);
        if !backports.is_empty() && !self.backports_configured {
            steps.push(Step::Root(format!(
                "echo 'deb http://deb.debian.org/debian {suite} main' > /etc/apt/sources.list.d/{suite}.list"
            )));
        }
        if !backports.is_empty() || !apt.is_empty() {
            steps.push(Step::Root("apt-get update".into()));
        }
        if !backports.is_empty() {
            steps.push(Step::Root(format!("{APT_INSTALL} -t {suite} {}", backports.join(" "))));
        }
        if !apt.is_empty() {
            steps.push(Step::Root(format!("{APT_INSTALL} {}", apt.join(" "))));
        }
        for krate in of(Source::Cargo).map(|r| &r.packages[0]) {
            if self.as_root {
                steps.push(Step::Root(format!("cargo install --locked --root /usr/local {krate}")));
            } else {
                let built = self.cargo_bin.join(krate);
                steps.push(Step::User(format!("cargo install --locked {krate}")));
                steps.push(Step::Root(format!("install -m 0755 {} /usr/local/bin/{krate}", built.display())));
            }
        }
        steps
    }
}

fn dedup_in_order(items: &mut Vec<&str>) {
    let mut seen = std::collections::HashSet::new();
    items.retain(|item| seen.insert(*item));
}

/// Whether apt's sources name `suite` (e.g. `bookworm-backports`).
pub fn apt_has_suite(suite: &str) -> bool {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.flatten().map(|e| e.path()));
    }
    files.iter().any(|f| std::fs::read_to_string(f).is_ok_and(|text| text.contains(suite)))
}

/// Where `cargo install` puts binaries for this user: `$CARGO_HOME/bin`,
/// else `~/.cargo/bin`.
pub fn cargo_bin() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME").filter(|v| !v.is_empty()).map(PathBuf::from);
    let home = home.unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    home.join("bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_12: &str =
        "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\nID=debian\n";
    const UBUNTU_24: &str =
        "NAME=\"Ubuntu\"\nVERSION_ID=\"24.04\"\nVERSION_CODENAME=noble\nID=ubuntu\nID_LIKE=debian\n";

    fn root() -> Installer {
        Installer { as_root: true, backports_configured: false, cargo_bin: "/home/u/.cargo/bin".into() }
    }

    #[test]
    fn the_built_in_list_parses_and_names_each_check_for_any_release() {
        let list = builtin();
        let generic = for_release(list, &Release::default());
        for check in ["qemu-system-x86_64", "virtiofsd", "mmdebstrap", "tar2sqfs", "passt", "npm", "direnv", "nix"] {
            assert!(generic.iter().any(|r| r.name() == check), "{check} missing from host-packages.txt");
        }
        assert_eq!(generic.len(), list.iter().map(Requirement::name).collect::<std::collections::HashSet<_>>().len());
    }

    #[test]
    fn os_release_gives_the_release_and_whether_apt_installs() {
        let debian = Release::parse(DEBIAN_12);
        assert_eq!((debian.key().as_str(), debian.codename.as_str(), debian.apt), ("debian-12", "bookworm", true));
        assert!(Release::parse(UBUNTU_24).apt);
        assert!(!Release::parse("ID=fedora\nVERSION_ID=41\n").apt);
        assert!(Release::parse("ID=linuxmint\nID_LIKE=\"ubuntu debian\"\n").apt);
    }

    #[test]
    fn a_release_specific_line_wins_over_the_generic_one() {
        let list = builtin();
        let virtiofsd =
            |release: &Release| for_release(list, release).into_iter().find(|r| r.name() == "virtiofsd").unwrap();
        assert_eq!(virtiofsd(&Release::parse(DEBIAN_12)).source, Source::Cargo);
        assert_eq!(virtiofsd(&Release::parse(UBUNTU_24)).source, Source::Apt);
    }

    #[test]
    fn steps_add_backports_update_then_install_and_build_with_cargo() {
        let list = builtin();
        let debian = Release::parse(DEBIAN_12);
        let missing: Vec<&Requirement> = for_release(list, &debian)
            .into_iter()
            .filter(|r| ["qemu-system-x86_64", "virtiofsd", "tar2sqfs"].contains(&r.name()))
            .collect();
        let steps = root().steps(&missing, &debian);
        let lines: Vec<String> = steps.iter().map(|s| s.command_line(true)).collect();
        assert_eq!(
            lines,
            [
                "echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/bookworm-backports.list",
                "apt-get update",
                "apt-get install -y --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-system-common qemu-system-data",
                "apt-get install -y --no-install-recommends squashfs-tools-ng libseccomp-dev libcap-ng-dev pkg-config gcc",
                "cargo install --locked --root /usr/local virtiofsd",
            ]
        );
        let user = Installer { as_root: false, backports_configured: true, ..root() };
        let lines: Vec<String> = user.steps(&missing, &debian).iter().map(|s| s.command_line(false)).collect();
        assert_eq!(lines[0], "sudo apt-get update", "backports are there already");
        assert_eq!(
            lines[3..],
            [
                "cargo install --locked virtiofsd".to_string(),
                "sudo install -m 0755 /home/u/.cargo/bin/virtiofsd /usr/local/bin/virtiofsd".to_string()
            ],
            "the user builds, root installs"
        );
        assert!(root().steps(&[], &debian).is_empty(), "nothing missing, nothing to run");
    }

    #[test]
    fn a_bad_line_is_named() {
        let e = parse("# c\nnpm | required | * | apt | npm\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = parse("npm | needed | * | apt | npm | x\n").unwrap_err();
        assert!(e.to_string().contains("need \"needed\""), "{e}");
        assert!(parse("npm | required | * | snap | npm | x\n").is_err());
        assert!(parse("npm | required | * | apt |  | x\n").is_err());
    }

    /// `scripts/setup-host --dry-run` on `os_release`, with `list` (else
    /// the repo's) and a PATH of `bin`: its status and the commands it
    /// prints.
    fn setup_host(os_release: &str, list: Option<&Path>, bin: &Path) -> (i32, Vec<String>) {
        let tmp = tempfile::tempdir().unwrap();
        let os_release_file = tmp.path().join("os-release");
        std::fs::write(&os_release_file, os_release).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/setup-host");
        let mut cmd = std::process::Command::new(script);
        cmd.arg("--dry-run").env("PATH", bin).env("OS_RELEASE_FILE", &os_release_file);
        if let Some(list) = list {
            cmd.env("AGENTVM_HOST_PACKAGES", list);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        (out.status.code().unwrap_or(-1), stdout.lines().map(String::from).collect())
    }

    /// A PATH dir with what setup-host itself runs, and `extra` programs.
    fn bin_dir(extra: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for program in ["bash", "grep", "dirname"].iter().chain(extra) {
            let found = crate::tools::find_program(program, &[]).unwrap();
            std::os::unix::fs::symlink(found, dir.path().join(program)).unwrap();
        }
        dir
    }

    #[test]
    fn setup_host_runs_the_commands_doctor_prints_for_each_release() {
        let bin = bin_dir(&["passt"]);
        let path = std::ffi::OsString::from(bin.path());
        let trixie = "ID=debian\nVERSION_ID=\"13\"\nVERSION_CODENAME=trixie\n";
        for os_release in [DEBIAN_12, trixie, UBUNTU_24] {
            let release = Release::parse(os_release);
            let missing: Vec<&Requirement> =
                for_release(builtin(), &release).into_iter().filter(|r| !r.is_present(Some(&path))).collect();
            let suite = format!("{}-backports", release.codename);
            let installer = Installer { backports_configured: apt_has_suite(&suite), ..root() };
            let expected: Vec<String> =
                installer.steps(&missing, &release).iter().map(|s| s.command_line(true)).collect();
            assert!(expected.iter().any(|c| c.contains(" mmdebstrap ")), "{expected:?}");
            assert!(!expected.iter().any(|c| c.contains("passt")), "passt is on PATH: {expected:?}");
            assert_eq!(setup_host(os_release, None, bin.path()), (0, expected), "{}", release.key());
        }
        let (status, printed) = setup_host("ID=fedora\nVERSION_ID=41\n", None, bin.path());
        assert_eq!((status, printed), (1, Vec::new()), "elsewhere it lists the packages and installs nothing");
    }

    #[test]
    fn setup_host_reads_the_list_when_it_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let list = tmp.path().join("host-packages.txt");
        std::fs::write(&list, "# a list of one\nno-such-program-agentvm | test | * | apt | agentvm-test-package | x\n")
            .unwrap();
        let bin = bin_dir(&[]);
        let printed = setup_host(UBUNTU_24, Some(&list), bin.path());
        let install = "apt-get install -y --no-install-recommends agentvm-test-package";
        assert_eq!(printed, (0, vec!["apt-get update".to_string(), install.to_string()]));
    }

    #[test]
    fn presence_is_a_path_that_exists_or_a_program_on_the_path() {
        let path = std::ffi::OsString::from("/usr/bin:/bin");
        assert!(is_present("sh", Some(&path)));
        assert!(!is_present("sh", Some(OsStr::new("/nonexistent"))));
        assert!(is_present("/", None));
        assert!(!is_present("/nonexistent/agentvm", None));
        let either = parse("no-such-program-agentvm / | required | * | apt | x | y").unwrap();
        assert!(either[0].is_present(None), "any one of the checks will do");
        assert_eq!(either[0].name(), "no-such-program-agentvm");
    }
}
