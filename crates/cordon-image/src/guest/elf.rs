//! Just enough ELF64 (little-endian) reading for the guest kernel: a kernel module's
//! `.modinfo` section and a vmlinux's notes. Inputs come from a Debian package, but every
//! offset is still checked, so a damaged file is an error, never a panic.

/// The bytes of the section called `name`, if the file has one.
pub(crate) fn section<'a>(elf: &'a [u8], name: &str) -> Option<&'a [u8]> {
    check_header(elf)?;
    let shoff = usize::try_from(u64_at(elf, 0x28)?).ok()?;
    let shentsize = usize::from(u16_at(elf, 0x3a)?);
    let shnum = usize::from(u16_at(elf, 0x3c)?);
    let shstrndx = usize::from(u16_at(elf, 0x3e)?);
    let header = |index: usize| -> Option<(u32, &'a [u8])> {
        let at = shoff.checked_add(index.checked_mul(shentsize)?)?;
        let name = u32_at(elf, at)?;
        let offset = usize::try_from(u64_at(elf, at + 0x18)?).ok()?;
        let size = usize::try_from(u64_at(elf, at + 0x20)?).ok()?;
        Some((name, elf.get(offset..offset.checked_add(size)?)?))
    };
    let (_, names) = header(shstrndx)?;
    (0..shnum).find_map(|index| {
        let (name_at, bytes) = header(index)?;
        let rest = names.get(usize::try_from(name_at).ok()?..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        (&rest[..end] == name.as_bytes()).then_some(bytes)
    })
}

/// Whether the file has an ELF note with this owner name and type in a `PT_NOTE` segment.
pub(crate) fn has_note(elf: &[u8], owner: &str, note_type: u32) -> bool {
    notes(elf).is_some_and(|notes| {
        notes
            .into_iter()
            .any(|(name, kind)| name == owner.as_bytes() && kind == note_type)
    })
}

/// (owner name without its NUL, type) of every note in every `PT_NOTE` segment.
fn notes(elf: &[u8]) -> Option<Vec<(&[u8], u32)>> {
    const PT_NOTE: u32 = 4;
    check_header(elf)?;
    let phoff = usize::try_from(u64_at(elf, 0x20)?).ok()?;
    let phentsize = usize::from(u16_at(elf, 0x36)?);
    let phnum = usize::from(u16_at(elf, 0x38)?);
    let mut found = Vec::new();
    for index in 0..phnum {
        let at = phoff.checked_add(index.checked_mul(phentsize)?)?;
        if u32_at(elf, at)? != PT_NOTE {
            continue;
        }
        let offset = usize::try_from(u64_at(elf, at + 0x08)?).ok()?;
        let size = usize::try_from(u64_at(elf, at + 0x20)?).ok()?;
        let mut segment = elf.get(offset..offset.checked_add(size)?)?;
        while segment.len() >= 12 {
            let namesz = usize::try_from(u32_at(segment, 0)?).ok()?;
            let descsz = usize::try_from(u32_at(segment, 4)?).ok()?;
            let kind = u32_at(segment, 8)?;
            let name = segment.get(12..12 + namesz)?;
            found.push((name.strip_suffix(&[0]).unwrap_or(name), kind));
            let next = 12 + align4(namesz) + align4(descsz);
            segment = segment.get(next..).unwrap_or_default();
        }
    }
    Some(found)
}

fn check_header(elf: &[u8]) -> Option<()> {
    // Magic, 64-bit class, little-endian.
    (elf.get(..6)? == b"\x7fELF\x02\x01").then_some(())
}

fn align4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

pub(crate) fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

pub(crate) fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Test support: a minimal ELF64 file with the given sections (and no segments).
#[cfg(test)]
pub(crate) fn build_with_sections(sections: &[(&str, &[u8])]) -> Vec<u8> {
    let mut names = vec![0u8];
    let mut name_offsets = Vec::new();
    for (name, _) in sections.iter().copied().chain([(".shstrtab", &[][..])]) {
        name_offsets.push(names.len() as u32);
        names.extend_from_slice(name.as_bytes());
        names.push(0);
    }
    let mut data = Vec::new();
    let mut placed = Vec::new();
    for (_, bytes) in sections.iter().copied().chain([(".shstrtab", &names[..])]) {
        placed.push((64 + data.len() as u64, bytes.len() as u64));
        data.extend_from_slice(bytes);
    }
    let shoff = 64 + data.len() as u64;
    let shnum = sections.len() as u16 + 2; // null + sections + .shstrtab
    let mut elf = vec![0u8; 64];
    elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
    elf[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
    elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    elf[0x3c..0x3e].copy_from_slice(&shnum.to_le_bytes());
    elf[0x3e..0x40].copy_from_slice(&(shnum - 1).to_le_bytes());
    elf.extend_from_slice(&data);
    elf.extend_from_slice(&[0u8; 64]); // the null section
    for (name, (offset, size)) in name_offsets.iter().zip(placed) {
        let mut header = [0u8; 64];
        header[..4].copy_from_slice(&name.to_le_bytes());
        header[0x18..0x20].copy_from_slice(&offset.to_le_bytes());
        header[0x20..0x28].copy_from_slice(&size.to_le_bytes());
        elf.extend_from_slice(&header);
    }
    elf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_named_section() {
        let elf = build_with_sections(&[(".text", b"code"), (".modinfo", b"a=b\0")]);
        assert_eq!(section(&elf, ".modinfo"), Some(&b"a=b\0"[..]));
        assert_eq!(section(&elf, ".text"), Some(&b"code"[..]));
        assert_eq!(section(&elf, ".data"), None);
    }

    #[test]
    fn truncated_files_are_rejected_without_panicking() {
        let elf = build_with_sections(&[(".modinfo", b"a=b\0")]);
        for len in 0..elf.len() {
            let _ = section(&elf[..len], ".modinfo");
            let _ = has_note(&elf[..len], "Xen", 18);
        }
        assert!(!has_note(&elf, "Xen", 18));
    }
}
