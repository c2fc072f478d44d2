//! Builds what the agentvm binary carries inside itself:
//!
//! - the guest init (crates/agentvm-guest), static and stripped, in release
//!   mode whatever agentvm's own profile: it becomes the VM's `/init`, and
//!   a smaller one boots faster (the kernel unpacks it at every start);
//! - the git commit agentvm is built from, for `agentvm --version` and the
//!   images it builds ("unknown" outside a git checkout; never an error).
//!
//! The guest is built by a nested cargo with a target dir of its own, so it
//! takes no lock the outer build holds; it shares the outer build's
//! jobserver (CARGO_MAKEFLAGS), so both together use the -j given.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest is an x86-64 Linux VM whatever the host builds for.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Static, so it runs as PID 1 before any root file system (and libc) is
/// mounted.
const GUEST_RUSTFLAGS: &str = "-Ctarget-feature=+crt-static";

/// What the outer build sets that must not reach the guest's build.
const OUTER_ONLY: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    // clippy's driver, when the outer command is `cargo clippy`.
    "RUSTC_WORKSPACE_WRAPPER",
];

fn main() {
    let manifest_dir = PathBuf::from(var("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(var("OUT_DIR"));
    let workspace = manifest_dir.join("../..");
    println!("cargo:rustc-env=AGENTVM_COMMIT={}", commit(&manifest_dir));
    let guest_src = workspace.join("crates/agentvm-guest");
    if !guest_src.join("Cargo.toml").is_file() {
        panic!(
            "the guest init's source is not at {}: agentvm is built from its workspace \
             (git clone, then `cargo install --path crates/agentvm`)",
            guest_src.display()
        );
    }
    for input in ["crates/agentvm-guest", "crates/agentvm-proto", "Cargo.lock", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", workspace.join(input).display());
    }
    let built = build_guest(&guest_src, &guest_target_dir(&out_dir));
    std::fs::copy(&built, out_dir.join("agentvm-guest"))
        .unwrap_or_else(|e| panic!("cannot copy {} to OUT_DIR: {e}", built.display()));
}

/// Where the guest is built: beside the outer profile's `build/` dir when
/// OUT_DIR is `<profile>/build/agentvm-<hash>/out`, so that `cargo build`,
/// `cargo clippy` and `cargo test` (each an OUT_DIR of its own) share one
/// guest build; else in OUT_DIR. The nested cargo's own lock keeps
/// concurrent builds apart.
fn guest_target_dir(out_dir: &Path) -> PathBuf {
    let build_dir = out_dir.parent().and_then(Path::parent);
    match build_dir {
        Some(dir) if dir.file_name().is_some_and(|n| n == "build") => dir.join("agentvm-guest-target"),
        _ => out_dir.join("guest-target"),
    }
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name} for build scripts"))
}

/// Builds the guest crate at `src` into `target_dir`; the binary's path.
fn build_guest(src: &Path, target_dir: &Path) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--target", GUEST_TARGET, "--manifest-path"])
        .arg(src.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", GUEST_RUSTFLAGS)
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols");
    for name in OUTER_ONLY {
        cmd.env_remove(name);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run cargo to build the guest init: {e}"));
    if !out.status.success() {
        panic!(
            "building the guest init (crates/agentvm-guest) failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    target_dir.join(GUEST_TARGET).join("release/agentvm-guest")
}

/// The commit HEAD names (12 hex digits), from git in a checkout or from
/// the `.cargo_vcs_info.json` of a packaged crate; else "unknown".
fn commit(manifest_dir: &Path) -> String {
    if let Some(commit) = git_commit(manifest_dir) {
        return commit;
    }
    let vcs_info = std::fs::read_to_string(manifest_dir.join(".cargo_vcs_info.json")).unwrap_or_default();
    vcs_info
        .split("\"sha1\"")
        .nth(1)
        .and_then(|rest| rest.split('"').nth(1))
        .filter(|sha| sha.len() >= 12 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
        .map_or_else(|| "unknown".to_string(), |sha| sha[..12].to_string())
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    out.status.success().then(|| text.trim().to_string())
}

/// HEAD's commit, and the files whose change moves it (HEAD, the branch's
/// ref, packed-refs) for cargo to watch.
fn git_commit(dir: &Path) -> Option<String> {
    let commit = git(dir, &["rev-parse", "--short=12", "HEAD"])?;
    let git_dir = PathBuf::from(git(dir, &["rev-parse", "--absolute-git-dir"])?);
    let common = git(dir, &["rev-parse", "--git-common-dir"]).map(|d| dir.join(d))?;
    let mut watched = vec![git_dir.join("HEAD"), common.join("packed-refs")];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(common.join(branch));
    }
    // A path that does not exist would make cargo rerun this every build.
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    Some(commit)
}
