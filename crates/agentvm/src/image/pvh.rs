//! The uncompressed kernel for a PVH boot. A bzImage spends about a second
//! and a half of a TCG boot decompressing itself; QEMU can instead load the
//! ELF `vmlinux` inside it straight at its PVH entry point, when the kernel
//! was built with one (CONFIG_PVH). Pure functions over the bytes; the
//! build runs the decompressor.

/// How a bzImage's payload is compressed, by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Xz,
    Gzip,
}

impl Compression {
    /// The command-line tool that decompresses it with `-dc`, and its Debian package.
    pub fn tool(self) -> (&'static str, &'static str) {
        match self {
            Compression::Zstd => ("zstd", "zstd"),
            Compression::Xz => ("xz", "xz-utils"),
            Compression::Gzip => ("gzip", "gzip"),
        }
    }
}

/// The compressed `vmlinux` in a bzImage.
#[derive(Debug, PartialEq, Eq)]
pub struct Payload<'a> {
    pub compression: Compression,
    /// The compressed stream, without the size the kernel build appends.
    pub data: &'a [u8],
    /// The uncompressed size the kernel build appended.
    pub size: u32,
}

// Offsets in the bzImage's setup header (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Finds the compressed kernel in a bzImage. `Err` says why it is not one
/// this code can unpack.
pub fn payload(bzimage: &[u8]) -> Result<Payload<'_>, String> {
    if bzimage.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS") {
        return Err("no bzImage setup header".into());
    }
    // 0 setup sectors means 4, for old boot loaders' sake.
    let setup_sects = match bzimage[SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let (Some(offset), Some(length)) = (u32_at(bzimage, PAYLOAD_OFFSET), u32_at(bzimage, PAYLOAD_LENGTH)) else {
        return Err("setup header too short".into());
    };
    let start = (setup_sects + 1) * 512 + offset as usize;
    let stream =
        bzimage.get(start..start + length as usize).filter(|s| s.len() > 4).ok_or("payload outside the file")?;
    let compression = match stream {
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Compression::Xz,
        [0x1f, 0x8b, ..] => Compression::Gzip,
        _ => return Err(format!("payload compressed in an unsupported format (magic {:02x?})", &stream[..4])),
    };
    let (data, size) = stream.split_at(stream.len() - 4);
    Ok(Payload { compression, data, size: u32_at(size, 0).unwrap_or(0) })
}

const PT_NOTE: u32 = 4;
/// Xen's ELF note naming the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Whether `elf` is a 64-bit little-endian ELF with a PVH entry note.
pub fn has_pvh_entry(elf: &[u8]) -> bool {
    pvh_entry_note(elf).unwrap_or(false)
}

fn pvh_entry_note(elf: &[u8]) -> Option<bool> {
    // ELFCLASS64, ELFDATA2LSB.
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return Some(false);
    }
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(elf, ph)? != PT_NOTE {
            continue;
        }
        let offset = usize::try_from(u64_at(ph + 8)?).ok()?;
        let size = usize::try_from(u64_at(ph + 32)?).ok()?;
        let notes = elf.get(offset..offset.checked_add(size)?)?;
        if notes_have(notes, b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY) {
            return Some(true);
        }
    }
    Some(false)
}

/// Walks ELF notes (namesz, descsz, type, name, desc; 4-byte aligned).
fn notes_have(mut notes: &[u8], name: &[u8], kind: u32) -> bool {
    let align = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let (Some(namesz), Some(descsz), Some(t)) = (u32_at(notes, 0), u32_at(notes, 4), u32_at(notes, 8)) else {
            return false;
        };
        let name_end = 12 + namesz as usize;
        if notes.get(12..name_end) == Some(name) && t == kind {
            return true;
        }
        let next = align(name_end) + align(descsz as usize);
        match notes.get(next..) {
            Some(rest) => notes = rest,
            None => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bzimage(setup_sects: u8, stream: &[u8], appended: u32) -> Vec<u8> {
        let mut b = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        b[SETUP_SECTS] = setup_sects;
        b[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        let offset = 100u32;
        b[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&offset.to_le_bytes());
        let len = stream.len() as u32 + 4;
        b[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&[0xaa; 100]); // decompressor code before the payload
        b.extend_from_slice(stream);
        b.extend_from_slice(&appended.to_le_bytes());
        b.extend_from_slice(&[0xbb; 64]); // what follows the payload
        b
    }

    #[test]
    fn payload_is_found_after_the_setup_sectors_without_the_appended_size() {
        let stream = [0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3];
        let img = bzimage(30, &stream, 57_575_096);
        let p = payload(&img).unwrap();
        assert_eq!(p, Payload { compression: Compression::Zstd, data: &stream, size: 57_575_096 });
    }

    #[test]
    fn payload_compression_comes_from_its_magic() {
        let xz = [0xfd, b'7', b'z', b'X', b'Z', 0, 9];
        assert_eq!(payload(&bzimage(4, &xz, 1)).unwrap().compression, Compression::Xz);
        assert_eq!(payload(&bzimage(4, &[0x1f, 0x8b, 8, 0], 1)).unwrap().compression, Compression::Gzip);
        assert!(payload(&bzimage(4, b"LZ4?data", 1)).unwrap_err().contains("unsupported"));
    }

    #[test]
    fn payload_rejects_what_is_not_a_bzimage() {
        assert!(payload(b"\x7fELF not a bzImage").is_err());
        let mut img = bzimage(4, &[0x28, 0xb5, 0x2f, 0xfd, 0], 1);
        img.truncate(img.len() - 70);
        assert!(payload(&img).unwrap_err().contains("outside"));
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend_from_slice(desc);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n
    }

    /// An ELF64 header, one PT_LOAD and one PT_NOTE program header, then the notes.
    fn elf(notes: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 2 * 56];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        e[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        let ph = 64 + 56;
        e[ph..ph + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        let notes_at = e.len() as u64;
        e[ph + 8..ph + 16].copy_from_slice(&notes_at.to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        e.extend_from_slice(notes);
        e
    }

    #[test]
    fn pvh_entry_note_is_found_among_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1; 20]);
        notes.extend(note(b"Xen\0", 6, b"linux\0"));
        notes.extend(note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &0x100_0b20u64.to_le_bytes()));
        assert!(has_pvh_entry(&elf(&notes)));
    }

    #[test]
    fn kernels_without_the_note_or_not_elf64_have_no_pvh_entry() {
        let mut notes = note(b"GNU\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 8]);
        notes.extend(note(b"Xen\0", 6, b"linux\0"));
        assert!(!has_pvh_entry(&elf(&notes)));
        assert!(!has_pvh_entry(b"MZ bzImage"));
        let mut truncated = elf(&note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 8]));
        truncated.truncate(100);
        assert!(!has_pvh_entry(&truncated));
    }
}
