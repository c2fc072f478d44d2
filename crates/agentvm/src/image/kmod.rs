//! Kernel modules the guest init loads from its initramfs: which ones, and in
//! which order. Pure functions over the text of `modules.dep` and
//! `modules.builtin`.

use std::collections::{HashMap, HashSet};

/// Modules the guest needs before it can mount its root and shares.
pub const BOOT_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    // Free page reporting: freed guest memory goes back to the host.
    "virtio_balloon",
    "squashfs",
    "overlay",
    "virtiofs",
    "virtio_console",
    "virtio_net",
];

/// Boot modules only the network interface needs: `virtio_net` and what it
/// pulls in. A launch without an interface leaves them out (about 0.1 s under TCG).
pub const NETWORK_MODULES: &[&str] = &["virtio_net", "net_failover", "failover"];

/// Boot modules taken when the kernel has them (PCI transport, for machines other than microvm).
pub const OPTIONAL_BOOT_MODULES: &[&str] = &["virtio_pci"];

/// The canonical name of a module from its file name or path:
/// `kernel/drivers/char/hw_random/virtio-rng.ko.xz` -> `virtio_rng`.
/// File names use `-` and `_` interchangeably; the kernel treats them as equal.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = match base.find(".ko") {
        Some(i) => &base[..i],
        None => base,
    };
    stem.replace('-', "_")
}

/// The image's boot module files (e.g. `virtio_net.ko`) a launch loads:
/// all of them, less [`NETWORK_MODULES`] when the guest gets no interface.
pub fn modules_for_launch(files: &[String], network: bool) -> Vec<String> {
    files.iter().filter(|f| network || !NETWORK_MODULES.contains(&module_name(f).as_str())).cloned().collect()
}

/// The trailer the kernel's sign-file appends after a module's signature.
const SIGNATURE_MAGIC: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature`: five bytes, three of padding, then the
/// signature's length as a big-endian u32.
const SIGNATURE_INFO_LEN: usize = 12;

/// `ko` without its appended signature (unchanged when it has none or the
/// trailer does not add up).
///
/// The guest kernel checks every signature against its built-in key, which
/// costs about 0.3 s under TCG for the boot modules. It adds nothing here:
/// the modules come from the image agentvm built from apt-verified packages
/// and travel in the same initramfs as the init, which could do anything. A
/// kernel booted without Secure Boot lockdown loads unsigned modules (it only
/// marks itself tainted).
pub fn strip_signature(ko: &[u8]) -> &[u8] {
    let Some(rest) = ko.strip_suffix(SIGNATURE_MAGIC) else {
        return ko;
    };
    let Some(info_at) = rest.len().checked_sub(SIGNATURE_INFO_LEN) else {
        return ko;
    };
    let info = &rest[info_at..];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    match info_at.checked_sub(sig_len) {
        Some(end) => &ko[..end],
        None => ko,
    }
}

/// One loadable module of `modules.dep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// Path relative to `lib/modules/<release>/`, e.g. `kernel/fs/overlayfs/overlay.ko.xz`.
    pub path: String,
    /// Names of the modules it needs, as listed (all of them, not only direct ones).
    pub deps: Vec<String>,
}

/// `modules.dep` parsed: module name -> entry.
pub type ModuleDeps = HashMap<String, ModuleEntry>;

/// Parses `modules.dep` (lines `path: dep-path dep-path ...`).
pub fn parse_modules_dep(text: &str) -> ModuleDeps {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(path, deps)| {
            let path = path.trim().to_string();
            let deps = deps.split_whitespace().map(module_name).collect();
            (module_name(&path), ModuleEntry { path, deps })
        })
        .collect()
}

/// Parses `modules.builtin` (one path per line) into module names.
pub fn parse_modules_builtin(text: &str) -> HashSet<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(module_name).collect()
}

/// A module to load, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootModule {
    /// Canonical name (`_` only).
    pub name: String,
    /// Path relative to `lib/modules/<release>/`.
    pub path: String,
}

/// The modules to load for `required` and the `optional` ones the kernel
/// has, with all their dependencies, dependencies first and each once.
/// Built-in modules are skipped. `Err` names a required module (or a
/// dependency) that is neither in `deps` nor built in.
pub fn load_order(
    deps: &ModuleDeps,
    builtin: &HashSet<String>,
    required: &[&str],
    optional: &[&str],
) -> Result<Vec<BootModule>, String> {
    let known = |n: &str| deps.contains_key(n) || builtin.contains(n);
    let roots = required.iter().chain(optional.iter().filter(|n| known(&module_name(n))));
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for root in roots {
        visit(&module_name(root), deps, builtin, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// Depth-first, post-order: a module is pushed after everything it needs.
fn visit(
    name: &str,
    deps: &ModuleDeps,
    builtin: &HashSet<String>,
    seen: &mut HashSet<String>,
    order: &mut Vec<BootModule>,
) -> Result<(), String> {
    if !seen.insert(name.to_string()) {
        return Ok(());
    }
    let Some(entry) = deps.get(name) else {
        return if builtin.contains(name) { Ok(()) } else { Err(name.to_string()) };
    };
    // modprobe loads the listed dependencies last to first; follow it so the
    // order matches what a stock initramfs would do.
    for dep in entry.deps.iter().rev() {
        visit(dep, deps, builtin, seen, order)?;
    }
    order.push(BootModule { name: name.to_string(), path: entry.path.clone() });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/squashfs/squashfs.ko.xz:
kernel/fs/overlayfs/overlay.ko.xz:
kernel/drivers/virtio/virtio_mmio.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz:
kernel/drivers/virtio/virtio_balloon.ko.xz:
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/net/core/failover.ko.xz:
kernel/drivers/char/hw_random/virtio-rng.ko.xz:
";
    const BUILTIN: &str = "\
kernel/fs/fuse/fuse.ko
kernel/fs/fuse/virtiofs.ko
kernel/drivers/virtio/virtio.ko
kernel/drivers/char/virtio_console.ko
kernel/drivers/virtio/virtio_pci.ko
";

    fn names(order: &[BootModule]) -> Vec<&str> {
        order.iter().map(|m| m.name.as_str()).collect()
    }

    fn signed(body: &[u8], sig: &[u8]) -> Vec<u8> {
        let mut ko = body.to_vec();
        ko.extend_from_slice(sig);
        ko.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        ko.extend_from_slice(&(sig.len() as u32).to_be_bytes());
        ko.extend_from_slice(SIGNATURE_MAGIC);
        ko
    }

    #[test]
    fn strip_signature_keeps_only_the_module_body() {
        let body = b"\x7fELF module body";
        assert_eq!(strip_signature(&signed(body, &[7u8; 515])), body);
        assert_eq!(strip_signature(&signed(body, &[])), body);
    }

    #[test]
    fn strip_signature_leaves_unsigned_or_inconsistent_modules_alone() {
        assert_eq!(strip_signature(b"\x7fELF plain"), b"\x7fELF plain");
        let mut short = SIGNATURE_MAGIC.to_vec();
        assert_eq!(strip_signature(&short), &short[..]);
        // A signature length larger than the file.
        short = signed(b"x", b"sig");
        let at = short.len() - SIGNATURE_MAGIC.len() - 4;
        short[at..at + 4].copy_from_slice(&1000u32.to_be_bytes());
        assert_eq!(strip_signature(&short), &short[..]);
    }

    #[test]
    fn network_modules_are_left_out_without_an_interface() {
        let files: Vec<String> = ["virtio_mmio.ko", "overlay.ko", "failover.ko", "net_failover.ko", "virtio_net.ko"]
            .map(String::from)
            .into();
        assert_eq!(modules_for_launch(&files, true), files);
        assert_eq!(modules_for_launch(&files, false), ["virtio_mmio.ko", "overlay.ko"]);
    }

    #[test]
    fn network_modules_are_virtio_net_and_its_dependencies() {
        let deps = parse_modules_dep(DEP);
        let order = load_order(&deps, &HashSet::new(), &["virtio_net"], &[]).unwrap();
        let mut want: Vec<&str> = NETWORK_MODULES.to_vec();
        want.sort_unstable();
        let mut got = names(&order);
        got.sort_unstable();
        assert_eq!(got, want);
    }

    #[test]
    fn module_name_strips_dir_suffix_and_dashes() {
        assert_eq!(module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz"), "virtio_rng");
        assert_eq!(module_name("overlay.ko"), "overlay");
        assert_eq!(module_name("x/fuse.ko.zst"), "fuse");
        assert_eq!(module_name("virtio-net"), "virtio_net");
    }

    #[test]
    fn parse_modules_dep_reads_paths_and_deps() {
        let deps = parse_modules_dep(DEP);
        assert_eq!(deps.len(), 9);
        let net = &deps["virtio_net"];
        assert_eq!(net.path, "kernel/drivers/net/virtio_net.ko.xz");
        assert_eq!(net.deps, vec!["net_failover", "failover"]);
        assert!(deps["squashfs"].deps.is_empty());
        assert!(deps.contains_key("virtio_rng"));
    }

    #[test]
    fn load_order_puts_dependencies_first() {
        let deps = parse_modules_dep(DEP);
        let order = load_order(&deps, &HashSet::new(), &["virtio_net"], &[]).unwrap();
        assert_eq!(names(&order), ["failover", "net_failover", "virtio_net"]);
        assert_eq!(order[0].path, "kernel/net/core/failover.ko.xz");
    }

    #[test]
    fn load_order_skips_builtin_and_lists_each_once() {
        let deps = parse_modules_dep(DEP);
        let builtin = parse_modules_builtin(BUILTIN);
        let order = load_order(&deps, &builtin, BOOT_MODULES, OPTIONAL_BOOT_MODULES).unwrap();
        assert_eq!(
            names(&order),
            [
                "virtio_mmio",
                "virtio_blk",
                "virtio_balloon",
                "squashfs",
                "overlay",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
    }

    #[test]
    fn load_order_missing_required_module_errs() {
        let deps = parse_modules_dep(DEP);
        let err = load_order(&deps, &HashSet::new(), &["virtiofs"], &[]).unwrap_err();
        assert_eq!(err, "virtiofs");
    }

    #[test]
    fn load_order_missing_optional_module_is_skipped() {
        let deps = parse_modules_dep(DEP);
        let order = load_order(&deps, &HashSet::new(), &["squashfs"], &["virtio_pci"]).unwrap();
        assert_eq!(names(&order), ["squashfs"]);
    }

    #[test]
    fn load_order_accepts_dashed_request_names() {
        let deps = parse_modules_dep(DEP);
        let order = load_order(&deps, &HashSet::new(), &["virtio-rng"], &[]).unwrap();
        assert_eq!(names(&order), ["virtio_rng"]);
    }

    #[test]
    fn load_order_survives_dependency_cycles() {
        let deps = parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n");
        let order = load_order(&deps, &HashSet::new(), &["a"], &[]).unwrap();
        assert_eq!(names(&order), ["b", "a"]);
    }
}
