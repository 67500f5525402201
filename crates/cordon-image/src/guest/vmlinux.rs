//! Turning a compressed x86 kernel (`vmlinuz`, a bzImage) into the uncompressed ELF `vmlinux`
//! QEMU can enter directly through the Xen PVH entry point: no real-mode setup code, no
//! in-guest decompression (issue 5 item 4: the largest single cost of a TCG boot).

use crate::guest::elf;
use crate::guest::lz4;

/// The ELF note that makes a vmlinux PVH-bootable: owner "Xen", XEN_ELFNOTE_PHYS32_ENTRY.
const PVH_NOTE_OWNER: &str = "Xen";
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Bound on the decompressed kernel (Debian's cloud kernel is about 50 MiB).
const VMLINUX_MAX: usize = 512 << 20;

/// The kernel's uncompressed ELF image, if `bzimage` holds an LZ4 payload that decompresses to
/// a PVH-bootable ELF; `None` otherwise (the caller then boots the bzImage as it is).
pub(crate) fn extract_pvh_vmlinux(bzimage: &[u8]) -> Option<Vec<u8>> {
    let payload = payload(bzimage)?;
    let vmlinux = lz4::decompress_legacy(payload, VMLINUX_MAX).ok()?;
    is_pvh_elf(&vmlinux).then_some(vmlinux)
}

/// Whether `image` is an ELF file with the PVH entry note.
pub(crate) fn is_pvh_elf(image: &[u8]) -> bool {
    elf::has_note(image, PVH_NOTE_OWNER, XEN_ELFNOTE_PHYS32_ENTRY)
}

/// The compressed payload of a bzImage (boot protocol ≥ 2.08: `payload_offset` and
/// `payload_length` in the setup header, the offset counted from the protected-mode code
/// that follows the `setup_sects` real-mode sectors).
fn payload(bzimage: &[u8]) -> Option<&[u8]> {
    if bzimage.get(0x202..0x206)? != b"HdrS" || elf::u16_at(bzimage, 0x206)? < 0x0208 {
        return None;
    }
    let setup_sects = match *bzimage.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let protected_mode = (setup_sects + 1) * 512;
    let offset = usize::try_from(elf::u32_at(bzimage, 0x248)?).ok()?;
    let length = usize::try_from(elf::u32_at(bzimage, 0x24c)?).ok()?;
    let start = protected_mode.checked_add(offset)?;
    bzimage.get(start..start.checked_add(length)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_kernels_are_not_extracted() {
        assert_eq!(extract_pvh_vmlinux(b""), None);
        assert_eq!(extract_pvh_vmlinux(&[0u8; 4096]), None);
        let mut header_only = vec![0u8; 4096];
        header_only[0x202..0x206].copy_from_slice(b"HdrS");
        header_only[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        header_only[0x248..0x250].copy_from_slice(&[0xff; 8]);
        assert_eq!(extract_pvh_vmlinux(&header_only), None);
    }

    /// The real thing, when a test has prepared the guest kernel on this host: the extracted
    /// image must be the PVH ELF.
    #[test]
    fn a_prepared_guest_kernel_is_pvh_bootable() {
        let Some(guest) =
            crate::guest::load_guest_kernel(std::path::Path::new(crate::guest::DEFAULT_CACHE_DIR))
        else {
            eprintln!("skipped: no prepared guest kernel (cordon prepare)");
            return;
        };
        if guest.boot == crate::guest::KernelBoot::PvhElf {
            let image = std::fs::read(&guest.kernel).unwrap();
            assert!(is_pvh_elf(&image));
        }
    }
}
