//! Kernel modules the guest init loads from its initramfs: which ones, and in
//! which order. Pure functions over the text of `modules.dep` and
//! `modules.builtin`.

use std::collections::{HashMap, HashSet};

/// Modules the guest needs before it can mount its root and shares.
pub const BOOT_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "squashfs",
    "overlay",
    "virtiofs",
    "virtio_console",
    "virtio_net",
];

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
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(module_name)
        .collect()
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
    let roots = required
        .iter()
        .chain(optional.iter().filter(|n| known(&module_name(n))));
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
        return if builtin.contains(name) {
            Ok(())
        } else {
            Err(name.to_string())
        };
    };
    // modprobe loads the listed dependencies last to first; follow it so the
    // order matches what a stock initramfs would do.
    for dep in entry.deps.iter().rev() {
        visit(dep, deps, builtin, seen, order)?;
    }
    order.push(BootModule {
        name: name.to_string(),
        path: entry.path.clone(),
    });
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

    #[test]
    fn module_name_strips_dir_suffix_and_dashes() {
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz"),
            "virtio_rng"
        );
        assert_eq!(module_name("overlay.ko"), "overlay");
        assert_eq!(module_name("x/fuse.ko.zst"), "fuse");
        assert_eq!(module_name("virtio-net"), "virtio_net");
    }

    #[test]
    fn parse_modules_dep_reads_paths_and_deps() {
        let deps = parse_modules_dep(DEP);
        assert_eq!(deps.len(), 8);
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
