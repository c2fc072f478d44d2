//! The per-launch initramfs: a newc cpio archive built in memory.
//!
//! The kernel unpacks it into its initial root: our guest init as `/init`,
//! the boot modules and the launch spec. It is handed to QEMU through a
//! memfd, so the spec (which may hold secrets) never touches the disk.

use std::io;
use std::path::{Path, PathBuf};

use agentvm_proto::{LaunchSpec, MODULES_DIR, SPEC_PATH};

use crate::image::{kmod, Image};

/// A file of the initramfs could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path} for the initramfs: {source}")]
pub struct InitramfsError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// A built initramfs and the image files it took.
#[derive(Debug)]
pub struct Initramfs {
    pub bytes: Vec<u8>,
    /// The boot modules, in load order.
    pub modules: Vec<PackedModule>,
}

/// A boot module as the initramfs holds it: the first `unsigned_len` bytes
/// of `path`, its appended signature left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedModule {
    /// Its file name, e.g. `virtio_mmio.ko`.
    pub file: String,
    pub path: PathBuf,
    pub unsigned_len: usize,
}

/// The initramfs: guest init as /init, the spec's boot modules (without
/// their signatures), the spec.
pub fn build(guest_init: &Path, image: &Image, spec: &LaunchSpec) -> Result<Initramfs, InitramfsError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InitramfsError { path, source }
    };
    let mut c = Cpio::new();
    c.file_from("init", 0o755, guest_init).map_err(read_err(guest_init))?;
    c.dir("agentvm", 0o700).dir(MODULES_DIR, 0o700);
    let mut modules = Vec::new();
    for name in &spec.modules {
        let path = image.module_path(name);
        let ko = std::fs::read(&path).map_err(read_err(&path))?;
        let unsigned = kmod::strip_signature(&ko);
        c.file(&format!("{MODULES_DIR}/{name}"), 0o600, unsigned);
        modules.push(PackedModule { file: name.clone(), unsigned_len: unsigned.len(), path });
    }
    c.file(SPEC_PATH, 0o600, &spec.to_bytes().expect("spec serializes"));
    // QEMU loads the initrd page-aligned just under the top of low RAM,
    // where microvm's firmware also keeps the ACPI tables (under 1 KiB). A
    // size that is a whole number of pages leaves the top page to them;
    // otherwise the archive's tail can overwrite them and the guest boots
    // without ACPI: one vCPU, no devices, no power-off.
    Ok(Initramfs { bytes: c.finish_padded(4096), modules })
}

/// Builds a newc ("070701") cpio archive.
#[derive(Debug, Default)]
pub struct Cpio {
    buf: Vec<u8>,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

impl Cpio {
    pub fn new() -> Self {
        Self { buf: Vec::new(), next_ino: 1 }
    }

    /// Adds a directory (parents are not implied: add them first).
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.entry(path, S_IFDIR | (mode & 0o7777), &[]);
        self
    }

    /// Adds a regular file with the given contents.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | (mode & 0o7777), data);
        self
    }

    /// Adds a regular file read from the host.
    pub fn file_from(&mut self, path: &str, mode: u32, src: &Path) -> io::Result<&mut Self> {
        let data = std::fs::read(src)?;
        Ok(self.file(path, mode, &data))
    }

    /// The archive, its size padded with zeros to a multiple of `align`
    /// (the kernel skips zeros after an archive).
    pub fn finish_padded(self, align: usize) -> Vec<u8> {
        let mut out = self.finish();
        out.resize(out.len().next_multiple_of(align), 0);
        out
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) {
        let name = path.trim_start_matches('/');
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        // Fields: magic, ino, mode, uid, gid, nlink, mtime, filesize,
        // devmajor, devminor, rdevmajor, rdevminor, namesize, check.
        let fields = [ino, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
    }

    fn pad4(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::plan::tests::{plan, resources, settings};
    use std::process::{Command, Stdio};

    /// `body` with a signature appended as the kernel's sign-file does.
    fn signed(body: &[u8]) -> Vec<u8> {
        let sig = [9u8; 300];
        let mut ko = body.to_vec();
        ko.extend_from_slice(&sig);
        ko.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        ko.extend_from_slice(&(sig.len() as u32).to_be_bytes());
        ko.extend_from_slice(b"~Module signature appended~\n");
        ko
    }

    #[test]
    fn build_packs_modules_unsigned_and_says_which_bytes_it_took() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("modules")).unwrap();
        let (body, plain) = (b"\x7fELF signed body", b"\x7fELF plain");
        std::fs::write(dir.path().join("modules/signed.ko"), signed(body)).unwrap();
        std::fs::write(dir.path().join("modules/plain.ko"), plain).unwrap();
        std::fs::write(dir.path().join("init"), b"init").unwrap();
        let s = settings();
        let mut res = resources(&s);
        res.image.dir = dir.path().to_path_buf();
        let mut spec = plan(&s, &res).spec;
        spec.modules = vec!["signed.ko".into(), "plain.ko".into()];

        let built = build(&dir.path().join("init"), &res.image, &spec).unwrap();
        let packed = |file: &str, len: usize| PackedModule {
            file: file.into(),
            path: dir.path().join("modules").join(file),
            unsigned_len: len,
        };
        assert_eq!(built.modules, [packed("signed.ko", body.len()), packed("plain.ko", plain.len())]);
        let has = |needle: &[u8]| built.bytes.windows(needle.len()).any(|w| w == needle);
        assert!(has(body) && has(plain));
        assert!(!has(b"~Module signature appended~"));
        assert_eq!(built.bytes.len() % 4096, 0);
    }

    #[test]
    fn header_fields_are_hex_and_padded_to_four() {
        let mut c = Cpio::new();
        c.file("/a", 0o755, b"xyz");
        let bytes = c.finish();
        assert_eq!(&bytes[..6], b"070701");
        // mode field (third) of the first entry
        assert_eq!(&bytes[14..22], b"000081ed");
        // header 110 + "a\0" = 112, data 3 -> padded to 116
        assert_eq!(&bytes[112..115], b"xyz");
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn padded_archive_is_a_whole_number_of_pages_ending_in_zeros() {
        let mut c = Cpio::new();
        c.file("init", 0o755, &[7; 5000]);
        let plain = {
            let mut c = Cpio::new();
            c.file("init", 0o755, &[7; 5000]);
            c.finish()
        };
        let bytes = c.finish_padded(4096);
        assert_eq!(bytes.len(), 8192);
        assert_eq!(&bytes[..plain.len()], &plain[..]);
        assert!(bytes[plain.len()..].iter().all(|&b| b == 0));
    }

    /// The real cpio tool must read back what we wrote (skipped if absent).
    #[test]
    fn archive_is_readable_by_gnu_cpio() {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("cpio not installed; skipping");
            return;
        }
        let mut c = Cpio::new();
        c.dir("agentvm", 0o755).file("agentvm/spec.json", 0o600, b"{}").file("init", 0o755, &[7; 1001]);
        let bytes = c.finish();
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        assert!(listing.contains("agentvm/spec.json"), "{listing}");
        assert!(listing.contains("1001"), "{listing}");
        assert!(listing.contains("-rwxr-xr-x"), "{listing}");
    }
}
