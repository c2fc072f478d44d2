//! What the build put into the agentvm binary: its version, the git
//! commit it was built from, and the guest init (see build.rs).

/// agentvm's version, from its Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit agentvm was built from (12 hex digits), or "unknown".
pub const COMMIT: &str = env!("AGENTVM_COMMIT");

/// `0.1.0 (commit 0123456789ab)`: what `agentvm --version` prints after
/// the name, and what an image records of the agentvm that built it.
pub const VERSION_LONG: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("AGENTVM_COMMIT"), ")");

/// The guest init (crates/agentvm-guest), static and stripped: the VM's
/// `/init` unless AGENTVM_GUEST_INIT names another.
pub static GUEST_INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/agentvm-guest"));

#[cfg(test)]
mod tests {
    use super::*;

    /// The `p_type` of each of the ELF64 file's program headers.
    fn program_header_types(elf: &[u8]) -> Vec<u32> {
        let u16_at = |at: usize| usize::from(u16::from_le_bytes([elf[at], elf[at + 1]]));
        let table = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
        let (size, count) = (u16_at(54), u16_at(56));
        (0..count).map(|i| u32::from_le_bytes(elf[table + i * size..][..4].try_into().unwrap())).collect()
    }

    #[test]
    fn the_built_in_guest_init_is_a_static_x86_64_executable() {
        assert_eq!(&GUEST_INIT[..4], b"\x7fELF");
        assert_eq!(GUEST_INIT[4], 2, "64-bit");
        assert_eq!(u16::from_le_bytes([GUEST_INIT[18], GUEST_INIT[19]]), 62, "x86-64");
        // No PT_INTERP (3): it asks for no ld.so, since nothing but the
        // initramfs exists when it starts.
        let types = program_header_types(GUEST_INIT);
        assert!(types.contains(&1), "it has loadable segments: {types:?}");
        assert!(!types.contains(&3), "it is dynamically linked: {types:?}");
    }

    #[test]
    fn the_version_names_the_commit() {
        assert!(VERSION_LONG.starts_with(VERSION));
        assert!(
            COMMIT == "unknown" || (COMMIT.len() == 12 && COMMIT.bytes().all(|b| b.is_ascii_hexdigit())),
            "{COMMIT}"
        );
    }
}
