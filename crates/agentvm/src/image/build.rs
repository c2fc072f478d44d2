//! Building an image into a directory: mmdebstrap, kernel extraction,
//! squashfs, boot modules, metadata. The store publishes the result.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::error::ImageError;
use super::kmod::{self, BOOT_MODULES, OPTIONAL_BOOT_MODULES};
use super::meta::{self, ImageMeta, KERNEL_FILE, LOG_FILE, META_FILE, MODULES_DIR, PVH_KERNEL_FILE, ROOT_FILE};
use super::progress::Progress;
use super::pvh;
use super::recipe::Recipe;
use super::subids::{self, user_name};
use super::watch_module;
use crate::tools;

/// The tarball mmdebstrap writes, deleted once the squashfs exists.
const ROOT_TAR: &str = "root.tar";
/// Where all of the kernel's modules are unpacked before the boot ones are picked.
const ALL_MODULES_DIR: &str = "kmods";
/// Per-step logs, concatenated into `build.log` at the end.
const LOGS_DIR: &str = "logs";
/// Lines of a failed step's log shown in the error.
const TAIL_LINES: usize = 20;

/// Paths dpkg does not unpack: documentation and translations an agent does
/// not need, and the initramfs hook (we build our own initramfs per launch).
const DPKG_EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/etc/kernel/postinst.d/initramfs-tools",
];

/// How mmdebstrap gets the privileges to create a root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// We are root.
    Root,
    /// A user namespace with subordinate ids (normal user).
    Unshare,
}

impl Mode {
    pub(super) fn as_arg(self) -> &'static str {
        match self {
            Mode::Root => "--mode=root",
            Mode::Unshare => "--mode=unshare",
        }
    }
}

/// Checks that the host can build: the tools are installed and, for a
/// normal user, subordinate ids exist. Returns the mmdebstrap mode to use.
pub(crate) fn check_host() -> Result<Mode, ImageError> {
    for (tool, package) in
        [("mmdebstrap", "mmdebstrap"), ("mmtarfilter", "mmdebstrap"), ("tar2sqfs", "squashfs-tools-ng")]
    {
        require_tool(tool, package)?;
    }
    if crate::sys::is_root() {
        return Ok(Mode::Root);
    }
    require_tool("newuidmap", "uidmap")?;
    require_tool("newgidmap", "uidmap")?;
    let uid = crate::sys::uid();
    let user = user_name(uid);
    subids::check(user.as_deref(), uid).map_err(ImageError::NoSubordinateIds)?;
    Ok(Mode::Unshare)
}

/// `Err(MissingTool)` unless `tool` is an executable on `$PATH`.
pub(super) fn require_tool(tool: &'static str, package: &'static str) -> Result<PathBuf, ImageError> {
    tools::find_program(tool, &[]).ok_or(ImageError::MissingTool { tool, package })
}

/// Builds the image of `recipe` into the empty directory `dir`, ending with
/// its `image.json`. On error `dir` keeps the logs of the steps run.
pub(crate) fn build_in(
    dir: &Path,
    recipe: &Recipe,
    mode: Mode,
    progress: &mut dyn Progress,
) -> Result<ImageMeta, ImageError> {
    let mut steps = Steps::new(dir, progress)?;
    run_mmdebstrap(&mut steps, dir, recipe, mode)?;

    steps.begin("extract kernel");
    let root = Extracted::from_tar(&dir.join(ROOT_TAR), dir)?;

    let compressor = pick_compressor(root.config.as_deref().unwrap_or(""));
    make_squashfs(&mut steps, dir, compressor)?;
    remove_file(&dir.join(ROOT_TAR))?;

    steps.begin("uncompressed kernel");
    unpack_pvh_kernel(&mut steps, dir)?;

    steps.begin("boot modules");
    let modules = install_boot_modules(&mut steps, dir, &root)?;
    remove_dir(&dir.join(ALL_MODULES_DIR))?;

    steps.begin("watch module");
    let watch_module = watch_module::install(&mut steps, dir, recipe, mode, &root.release)?;

    steps.begin("metadata");
    collect_logs(dir)?;
    make_world_readable(dir)?;
    let mut meta = ImageMeta {
        name: recipe.name.clone(),
        key: recipe.key(),
        recipe: recipe.clone(),
        kernel_release: root.release.clone(),
        modules,
        watch_module,
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        size_bytes: 0,
        compressor: compressor.to_string(),
        package_versions: meta::installed_versions(&root.dpkg_status, &recipe.packages),
        built_by: crate::build_info::VERSION_LONG.to_string(),
    };
    meta.size_bytes = dir_size(dir)?;
    write_meta(dir, &meta)?;
    Ok(meta)
}

/// Removes what a failed build leaves that is large (the tar, the squashfs,
/// the unpacked modules); the logs stay for the user to read.
pub(crate) fn discard_bulk(dir: &Path) {
    let _ = fs::remove_file(dir.join(ROOT_TAR));
    let _ = fs::remove_file(dir.join(ROOT_FILE));
    let _ = fs::remove_file(dir.join(format!("{PVH_KERNEL_FILE}.packed")));
    let _ = fs::remove_file(dir.join(format!("{PVH_KERNEL_FILE}.tmp")));
    let _ = fs::remove_file(dir.join(PVH_KERNEL_FILE));
    let _ = fs::remove_dir_all(dir.join(ALL_MODULES_DIR));
}

/// Step 1: the root as a tarball.
fn run_mmdebstrap(steps: &mut Steps, dir: &Path, recipe: &Recipe, mode: Mode) -> Result<(), ImageError> {
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=minbase")
        .arg(mode.as_arg())
        .arg("--format=tar")
        .arg(format!("--include={}", recipe.include_list()));
    for opt in DPKG_EXCLUDES {
        cmd.arg(format!("--dpkgopt={opt}"));
    }
    cmd.arg(&recipe.suite).arg(dir.join(ROOT_TAR)).arg(&recipe.mirror);
    steps.begin("mmdebstrap");
    steps.run(&mut cmd)
}

/// Step 3: the read-only root. mmtarfilter drops the `system.*` extended
/// attributes (POSIX ACLs, e.g. on /var/log/journal) that squashfs cannot store.
fn make_squashfs(steps: &mut Steps, dir: &Path, compressor: &str) -> Result<(), ImageError> {
    let tar = dir.join(ROOT_TAR);
    let mut filter = Command::new("mmtarfilter");
    filter.args([
        "--pax-exclude=*",
        "--pax-include=SCHILY.xattr.user.*",
        "--pax-include=SCHILY.xattr.trusted.*",
        "--pax-include=SCHILY.xattr.security.*",
    ]);
    let mut squash = tar2sqfs(compressor, &dir.join(ROOT_FILE));
    steps.begin("squashfs");
    steps.run_pipe(Some(&tar), &mut filter, &mut squash)
}

/// `tar2sqfs` reading a tar on stdin and writing the squashfs `out`, on all
/// cores, failing on anything it cannot represent (`--no-skip`).
pub(crate) fn tar2sqfs(compressor: &str, out: &Path) -> Command {
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut squash = Command::new("tar2sqfs");
    squash
        .args(["--quiet", "--no-skip", "--force", "--compressor", compressor])
        .arg(format!("--num-jobs={jobs}"))
        .arg(out);
    squash
}

/// The squashfs compressor: lz4 decompresses fastest (it matters under TCG);
/// fall back to what the kernel config says it supports.
pub(crate) fn pick_compressor(kernel_config: &str) -> &'static str {
    let has = |opt: &str| kernel_config.lines().any(|l| l.trim() == format!("CONFIG_SQUASHFS_{opt}=y"));
    if kernel_config.is_empty() {
        return "lz4";
    }
    [("LZ4", "lz4"), ("ZSTD", "zstd"), ("XZ", "xz")]
        .into_iter()
        .find(|(opt, _)| has(opt))
        .map_or("gzip", |(_, name)| name)
}

/// Step 4: the boot modules' closure, uncompressed into `modules/`.
/// Returns their file names in load order.
fn install_boot_modules(steps: &mut Steps, dir: &Path, root: &Extracted) -> Result<Vec<String>, ImageError> {
    let deps = kmod::parse_modules_dep(&root.modules_dep);
    let builtin = kmod::parse_modules_builtin(&root.modules_builtin);
    let order = kmod::load_order(&deps, &builtin, BOOT_MODULES, OPTIONAL_BOOT_MODULES)
        .map_err(|module| ImageError::MissingModule { module, release: root.release.clone() })?;
    let out_dir = dir.join(MODULES_DIR);
    fs::create_dir(&out_dir).map_err(ImageError::io("cannot create", &out_dir))?;
    let src_dir = dir.join(ALL_MODULES_DIR).join(&root.release);
    let mut names = Vec::new();
    for module in order {
        let file = format!("{}.ko", module.name);
        decompress(steps, &src_dir.join(&module.path), &out_dir.join(&file))?;
        names.push(file);
    }
    Ok(names)
}

/// Writes the bzImage's `vmlinux` beside it when the kernel has a PVH entry,
/// so QEMU can load it directly and the guest skips decompressing itself.
/// A kernel that cannot be unpacked (another format, a missing tool, no PVH
/// entry) is booted as the bzImage instead; the reason goes to the build log.
fn unpack_pvh_kernel(steps: &mut Steps, dir: &Path) -> Result<(), ImageError> {
    let bz_path = dir.join(KERNEL_FILE);
    let bz = fs::read(&bz_path).map_err(ImageError::io("cannot read", &bz_path))?;
    let payload = match pvh::payload(&bz) {
        Ok(p) => p,
        Err(why) => return steps.note(&format!("booting the bzImage: {why}")),
    };
    let (tool, package) = payload.compression.tool();
    if tools::find_program(tool, &[]).is_none() {
        return steps.note(&format!("booting the bzImage: no {tool} to unpack it (install {package})"));
    }
    let packed = dir.join(format!("{PVH_KERNEL_FILE}.packed"));
    let unpacked = dir.join(format!("{PVH_KERNEL_FILE}.tmp"));
    fs::write(&packed, payload.data).map_err(ImageError::io("cannot write", &packed))?;
    let out = File::create(&unpacked).map_err(ImageError::io("cannot create", &unpacked))?;
    let ran = steps.run_to(Command::new(tool).arg("-dc").arg(&packed), out);
    remove_file(&packed)?;
    ran?;
    let elf = fs::read(&unpacked).map_err(ImageError::io("cannot read", &unpacked))?;
    let unusable = if elf.len() != payload.size as usize {
        Some(format!("the unpacked kernel has {} bytes, the bzImage says {}", elf.len(), payload.size))
    } else if !pvh::has_pvh_entry(&elf) {
        Some("the kernel has no PVH entry (CONFIG_PVH)".to_string())
    } else {
        None
    };
    if let Some(why) = unusable {
        remove_file(&unpacked)?;
        return steps.note(&format!("booting the bzImage: {why}"));
    }
    let dst = dir.join(PVH_KERNEL_FILE);
    fs::rename(&unpacked, &dst).map_err(ImageError::io("cannot rename", &unpacked))
}

/// Writes the uncompressed content of a `.ko`, `.ko.xz`, `.ko.zst` or `.ko.gz` to `dst`.
fn decompress(steps: &mut Steps, src: &Path, dst: &Path) -> Result<(), ImageError> {
    let name = src.to_string_lossy();
    let (tool, package) = if name.ends_with(".xz") {
        ("xz", "xz-utils")
    } else if name.ends_with(".zst") {
        ("zstd", "zstd")
    } else if name.ends_with(".gz") {
        ("gzip", "gzip")
    } else {
        fs::copy(src, dst).map_err(ImageError::io("cannot copy", src))?;
        return Ok(());
    };
    require_tool(tool, package)?;
    let out = File::create(dst).map_err(ImageError::io("cannot create", dst))?;
    let mut cmd = Command::new(tool);
    cmd.arg("-dc").arg(src);
    steps.run_to(&mut cmd, out)
}

/// What step 2 takes out of the root tarball.
#[derive(Debug, Default)]
struct Extracted {
    /// Kernel release (from `boot/vmlinuz-<release>`).
    release: String,
    /// `boot/config-<release>`, if present.
    config: Option<String>,
    /// `lib/modules/<release>/modules.dep`.
    modules_dep: String,
    /// `lib/modules/<release>/modules.builtin`.
    modules_builtin: String,
    /// `var/lib/dpkg/status`.
    dpkg_status: String,
}

impl Extracted {
    /// Reads the tarball once: the kernel goes to `<dir>/vmlinuz`, the
    /// module files under `<dir>/kmods/`, small text files into memory.
    fn from_tar(tar_path: &Path, dir: &Path) -> Result<Extracted, ImageError> {
        let file = File::open(tar_path).map_err(ImageError::io("cannot open", tar_path))?;
        let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, file));
        let mut kernels = Vec::new();
        let mut configs = BTreeMap::new();
        let mut module_files: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut dpkg_status = String::new();
        let entries = archive.entries().map_err(ImageError::io("cannot read tar", tar_path))?;
        for entry in entries {
            let mut entry = entry.map_err(ImageError::io("cannot read tar", tar_path))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry.path().map_err(ImageError::io("cannot read tar", tar_path))?;
            let path = path.to_string_lossy().trim_start_matches("./").to_string();
            match classify(&path) {
                Member::Kernel(release) => {
                    let dst = dir.join(KERNEL_FILE);
                    entry.unpack(&dst).map_err(ImageError::io("cannot unpack kernel to", &dst))?;
                    kernels.push(release);
                }
                Member::Config(release) => {
                    configs.insert(release, read_text(&mut entry, tar_path)?);
                }
                Member::ModuleMeta(release, name) => {
                    let text = read_text(&mut entry, tar_path)?;
                    module_files.entry(release).or_default().insert(name, text);
                }
                Member::Module(release, rel) => {
                    let dst = dir.join(ALL_MODULES_DIR).join(&release).join(&rel);
                    if let Some(parent) = dst.parent() {
                        fs::create_dir_all(parent).map_err(ImageError::io("cannot create", parent))?;
                    }
                    entry.unpack(&dst).map_err(ImageError::io("cannot unpack module to", &dst))?;
                }
                Member::DpkgStatus => dpkg_status = read_text(&mut entry, tar_path)?,
                Member::Other => {}
            }
        }
        let release = match kernels.as_slice() {
            [one] => one.clone(),
            [] => return Err(ImageError::Kernel { reason: "no boot/vmlinuz-* file".into() }),
            many => return Err(ImageError::Kernel { reason: format!("several kernels ({})", many.join(", ")) }),
        };
        let mut meta = module_files.remove(&release).unwrap_or_default();
        let Some(modules_dep) = meta.remove("modules.dep") else {
            return Err(ImageError::Kernel { reason: format!("no lib/modules/{release}/modules.dep") });
        };
        Ok(Extracted {
            config: configs.remove(&release),
            modules_builtin: meta.remove("modules.builtin").unwrap_or_default(),
            modules_dep,
            dpkg_status,
            release,
        })
    }
}

/// The tar members step 2 cares about.
#[derive(Debug, PartialEq, Eq)]
enum Member {
    /// `boot/vmlinuz-<release>`.
    Kernel(String),
    /// `boot/config-<release>`.
    Config(String),
    /// `modules.dep` or `modules.builtin` of `<release>`.
    ModuleMeta(String, String),
    /// A module file: release, path under the release's directory.
    Module(String, String),
    /// `var/lib/dpkg/status`.
    DpkgStatus,
    /// Anything else.
    Other,
}

/// Sorts a tar path (without a leading `./`). Accepts modules under
/// `usr/lib/modules` (merged /usr, trixie) and `lib/modules` (older layouts).
fn classify(path: &str) -> Member {
    if let Some(release) = path.strip_prefix("boot/vmlinuz-") {
        return Member::Kernel(release.to_string());
    }
    if let Some(release) = path.strip_prefix("boot/config-") {
        return Member::Config(release.to_string());
    }
    if path == "var/lib/dpkg/status" {
        return Member::DpkgStatus;
    }
    let in_modules = path.strip_prefix("usr/lib/modules/").or_else(|| path.strip_prefix("lib/modules/"));
    let Some((release, rest)) = in_modules.and_then(|p| p.split_once('/')) else {
        return Member::Other;
    };
    match rest {
        "modules.dep" | "modules.builtin" => Member::ModuleMeta(release.to_string(), rest.to_string()),
        _ if rest.contains(".ko") && !rest.contains("..") => Member::Module(release.to_string(), rest.to_string()),
        _ => Member::Other,
    }
}

/// Reads a tar member as UTF-8 text (lossily).
fn read_text(entry: &mut impl Read, tar_path: &Path) -> Result<String, ImageError> {
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes).map_err(ImageError::io("cannot read tar", tar_path))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Runs build commands, each with its output in its own log file under
/// `<dir>/logs/`; [`collect_logs`] joins them into `build.log`.
pub(super) struct Steps<'a> {
    logs: PathBuf,
    progress: &'a mut dyn Progress,
    step: String,
    count: usize,
}

impl<'a> Steps<'a> {
    /// Steps of a build in `dir`, reported to `progress`.
    pub(super) fn new(dir: &Path, progress: &'a mut dyn Progress) -> Result<Steps<'a>, ImageError> {
        let logs = dir.join(LOGS_DIR);
        fs::create_dir_all(&logs).map_err(ImageError::io("cannot create", &logs))?;
        Ok(Steps { logs, progress, step: String::new(), count: 0 })
    }

    /// Starts a step: shows it and opens its log.
    pub(super) fn begin(&mut self, step: &str) {
        self.progress.step(step);
        self.step = step.to_string();
        self.count += 1;
    }

    /// The current step's log file.
    fn log_path(&self) -> PathBuf {
        self.logs.join(format!("{:02}-{}.log", self.count, self.step.replace(' ', "-")))
    }

    /// Opens the current step's log for appending (a step may run several commands).
    fn log_file(&self, command: &str) -> Result<File, ImageError> {
        use std::io::Write;
        let path = self.log_path();
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(ImageError::io("cannot write", &path))?;
        let _ = writeln!(file, "$ {command}");
        Ok(file)
    }

    /// Writes a remark to the step's log.
    pub(super) fn note(&self, text: &str) -> Result<(), ImageError> {
        self.log_file(&format!("# {text}")).map(drop)
    }

    /// Runs `cmd` to completion with stdout and stderr in the step's log.
    pub(super) fn run(&mut self, cmd: &mut Command) -> Result<(), ImageError> {
        let log = self.log_file(&show_command(cmd))?;
        let out = log.try_clone().map_err(ImageError::io("cannot write", self.log_path()))?;
        self.run_logged(cmd, out, log)
    }

    /// Runs `cmd` to completion with stdout into `out` and stderr in the step's log.
    fn run_to(&mut self, cmd: &mut Command, out: File) -> Result<(), ImageError> {
        let log = self.log_file(&show_command(cmd))?;
        self.run_logged(cmd, out, log)
    }

    fn run_logged(&mut self, cmd: &mut Command, out: File, log: File) -> Result<(), ImageError> {
        let command = show_command(cmd);
        cmd.stdin(Stdio::null()).stdout(out).stderr(log);
        let status = cmd.status().map_err(|source| self.spawn_error(&command, source))?;
        self.check(&command, status)
    }

    /// Runs `first < input | second` (`first` reads nothing without an
    /// input); both log their stderr to the step's log.
    pub(super) fn run_pipe(
        &mut self,
        input: Option<&Path>,
        first: &mut Command,
        second: &mut Command,
    ) -> Result<(), ImageError> {
        let redirect = input.map_or(String::new(), |i| format!(" < {}", i.display()));
        let command = format!("{}{redirect} | {}", show_command(first), show_command(second));
        let log = self.log_file(&command)?;
        let clone = |f: &File| f.try_clone().map_err(ImageError::io("cannot write", self.log_path()));
        let stdin = match input {
            Some(input) => Stdio::from(File::open(input).map_err(ImageError::io("cannot open", input))?),
            None => Stdio::null(),
        };
        let mut head = first
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(clone(&log)?)
            .spawn()
            .map_err(|source| self.spawn_error(&command, source))?;
        let pipe = head.stdout.take().expect("stdout is piped");
        let tail = second.stdin(pipe).stdout(clone(&log)?).stderr(log).status();
        let head_status = head.wait();
        let tail_status = tail.map_err(|source| self.spawn_error(&command, source))?;
        let head_status = head_status.map_err(|source| self.spawn_error(&command, source))?;
        self.check(&command, head_status)?;
        self.check(&command, tail_status)
    }

    fn spawn_error(&self, command: &str, source: std::io::Error) -> ImageError {
        ImageError::Spawn { step: self.step.clone(), command: command.to_string(), source }
    }

    /// `Err(StepFailed)` with the log's tail unless `status` is success.
    fn check(&self, command: &str, status: std::process::ExitStatus) -> Result<(), ImageError> {
        if status.success() {
            return Ok(());
        }
        let log = self.log_path();
        Err(ImageError::StepFailed {
            step: self.step.clone(),
            command: command.to_string(),
            status: status.to_string(),
            tail: tail_lines(&fs::read_to_string(&log).unwrap_or_default(), TAIL_LINES),
            log,
        })
    }
}

/// A command line for people: program and arguments, quoted where needed.
fn show_command(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.chars().any(|c| c.is_whitespace() || "*?'\"$;&|<>".contains(c)) {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last `n` lines of `text`.
fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Concatenates the step logs into `build.log` and removes them.
pub(super) fn collect_logs(dir: &Path) -> Result<(), ImageError> {
    let logs = dir.join(LOGS_DIR);
    let mut names: Vec<PathBuf> = fs::read_dir(&logs)
        .map_err(ImageError::io("cannot read", &logs))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    let mut all = String::new();
    for path in &names {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        all.push_str(&format!("==> {name} <==\n"));
        all.push_str(&fs::read_to_string(path).unwrap_or_default());
    }
    let out = dir.join(LOG_FILE);
    fs::write(&out, all).map_err(ImageError::io("cannot write", &out))?;
    remove_dir(&logs)
}

/// Makes the tree readable by everyone (0755 dirs, 0644 files), so another
/// user whose cache points here can boot the image.
pub(crate) fn make_world_readable(dir: &Path) -> Result<(), ImageError> {
    let set = |path: &Path, mode: u32| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(ImageError::io("cannot chmod", path))
    };
    set(dir, 0o755)?;
    for entry in fs::read_dir(dir).map_err(ImageError::io("cannot read", dir))? {
        let entry = entry.map_err(ImageError::io("cannot read", dir))?;
        let kind = entry.file_type().map_err(ImageError::io("cannot stat", entry.path()))?;
        if kind.is_dir() {
            make_world_readable(&entry.path())?;
        } else if kind.is_file() {
            set(&entry.path(), 0o644)?;
        }
    }
    Ok(())
}

/// Total size of the regular files under `dir`.
pub(crate) fn dir_size(dir: &Path) -> Result<u64, ImageError> {
    let mut total = 0;
    for entry in fs::read_dir(dir).map_err(ImageError::io("cannot read", dir))? {
        let entry = entry.map_err(ImageError::io("cannot read", dir))?;
        let meta = entry.metadata().map_err(ImageError::io("cannot stat", entry.path()))?;
        total += if meta.is_dir() { dir_size(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}

/// Writes `image.json` (0644), the last file of a build.
fn write_meta(dir: &Path, meta: &ImageMeta) -> Result<(), ImageError> {
    write_json(&dir.join(META_FILE), meta)
}

/// Writes `value` as pretty JSON to `path` (0644).
pub(super) fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), ImageError> {
    let json = serde_json::to_string_pretty(value).expect("metadata serializes");
    fs::write(path, json + "\n").map_err(ImageError::io("cannot write", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(ImageError::io("cannot chmod", path))
}

fn remove_file(path: &Path) -> Result<(), ImageError> {
    fs::remove_file(path).map_err(ImageError::io("cannot remove", path))
}

pub(super) fn remove_dir(path: &Path) -> Result<(), ImageError> {
    fs::remove_dir_all(path).map_err(ImageError::io("cannot remove", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_finds_kernel_modules_and_status_in_both_layouts() {
        assert_eq!(classify("boot/vmlinuz-6.12-cloud"), Member::Kernel("6.12-cloud".into()));
        assert_eq!(classify("boot/config-6.12-cloud"), Member::Config("6.12-cloud".into()));
        assert_eq!(
            classify("usr/lib/modules/6.12/modules.dep"),
            Member::ModuleMeta("6.12".into(), "modules.dep".into())
        );
        assert_eq!(
            classify("lib/modules/6.12/kernel/fs/overlayfs/overlay.ko.xz"),
            Member::Module("6.12".into(), "kernel/fs/overlayfs/overlay.ko.xz".into())
        );
        assert_eq!(classify("usr/lib/modules/6.12/modules.alias"), Member::Other);
        assert_eq!(classify("var/lib/dpkg/status"), Member::DpkgStatus);
        assert_eq!(classify("usr/bin/git"), Member::Other);
    }

    #[test]
    fn pick_compressor_prefers_lz4_then_falls_back() {
        assert_eq!(pick_compressor("CONFIG_SQUASHFS_LZ4=y\nCONFIG_SQUASHFS_XZ=y\n"), "lz4");
        assert_eq!(pick_compressor("# CONFIG_SQUASHFS_LZ4 is not set\nCONFIG_SQUASHFS_ZSTD=y\n"), "zstd");
        assert_eq!(pick_compressor("CONFIG_SQUASHFS_ZLIB=y\n"), "gzip");
        assert_eq!(pick_compressor(""), "lz4");
    }

    #[test]
    fn tail_lines_keeps_the_end() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
    }

    #[test]
    fn show_command_quotes_globs() {
        let mut cmd = Command::new("tar2sqfs");
        cmd.args(["--pax-exclude=*", "plain"]);
        assert_eq!(show_command(&cmd), "tar2sqfs '--pax-exclude=*' plain");
    }
}
