//! The zero page (`struct boot_params`) and its e820 memory map.
//!
//! Pure functions: they compute the structure, and the caller writes it to
//! [`layout::ZERO_PAGE`]. See the kernel's Documentation/arch/x86/boot.rst and zero-page.rst.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use crate::layout;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved space (the MMIO hole).
pub const E820_RESERVED: u32 = 2;
/// e820 type of ACPI tables (reclaimable once parsed).
pub const E820_ACPI: u32 = 3;

/// `boot_flag` value the kernel checks for.
const BOOT_FLAG: u16 = 0xaa55;
/// "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: 0xff means "undefined", the right answer for a loader with no assigned id.
const LOADER_UNDEFINED: u8 = 0xff;
/// Physical alignment an ELF kernel (which has no header of its own) is told it has.
const ELF_KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// Errors from building the zero page.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootParamsError {
    /// More e820 entries than the zero page holds.
    #[error("the e820 map has more than {0} entries")]
    TooManyE820Entries(usize),
    /// A value too large for its 32-bit field in the setup header.
    #[error("the {0} does not fit the zero page's 32-bit field")]
    Not32Bit(&'static str),
}

/// Everything the zero page says about this boot.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// The kernel's setup header, for a bzImage.
    pub setup_header: Option<setup_header>,
    /// Length of the command line at [`layout::CMDLINE`], without its NUL.
    pub cmdline_len: usize,
    /// The initrd's address and size, if there is one.
    pub initrd: Option<(u64, u64)>,
    /// Where the ACPI RSDP is.
    pub rsdp_addr: u64,
}

/// The e820 map for `mem_size` bytes of RAM: low RAM, ACPI tables, RAM from 1 MiB, the MMIO
/// hole when RAM reaches it, and RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, layout::LOW_RAM_END, E820_RAM),
        (
            layout::ACPI_START,
            layout::ACPI_END - layout::ACPI_START,
            E820_ACPI,
        ),
    ];
    for (start, len) in layout::ram_ranges(mem_size) {
        if start == 0 {
            map.push((layout::HIMEM_START, len - layout::HIMEM_START, E820_RAM));
        } else {
            map.push((
                layout::MMIO_HOLE_START,
                layout::MMIO_HOLE_END - layout::MMIO_HOLE_START,
                E820_RESERVED,
            ));
            map.push((start, len, E820_RAM));
        }
    }
    map
}

/// Builds the zero page.
pub fn build(info: &BootInfo) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    let hdr = &mut params.hdr;
    match info.setup_header {
        Some(kernel_hdr) => *hdr = kernel_hdr,
        None => hdr.kernel_alignment = ELF_KERNEL_ALIGNMENT,
    }
    hdr.boot_flag = BOOT_FLAG;
    hdr.header = HDRS_MAGIC;
    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.cmd_line_ptr = const { layout::as_u32(layout::CMDLINE) };
    hdr.cmdline_size = fit_u32(info.cmdline_len as u64, "command line's length")?;
    if let Some((addr, size)) = info.initrd {
        // Both fit in 32 bits when the initrd lies below the MMIO hole, as the loader puts it.
        hdr.ramdisk_image = fit_u32(addr, "initrd's address")?;
        hdr.ramdisk_size = fit_u32(size, "initrd's size")?;
    }
    params.acpi_rsdp_addr = info.rsdp_addr;

    let map = e820_map(info.mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootParamsError::TooManyE820Entries(params.e820_table.len()));
    }
    for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = u8::try_from(map.len())
        .map_err(|_| BootParamsError::TooManyE820Entries(params.e820_table.len()))?;
    Ok(params)
}

fn fit_u32(value: u64, what: &'static str) -> Result<u32, BootParamsError> {
    u32::try_from(value).map_err(|_| BootParamsError::Not32Bit(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(mem_size: u64) -> BootInfo {
        BootInfo {
            mem_size,
            setup_header: None,
            cmdline_len: 11,
            initrd: Some((0x7ff_f000, 0x1000)),
            rsdp_addr: layout::ACPI_START,
        }
    }

    #[test]
    fn small_guest_map_has_low_ram_acpi_and_high_ram() {
        assert_eq!(
            e820_map(128 << 20),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0xe0000, 0x20000, E820_ACPI),
                (0x100000, (128 << 20) - 0x100000, E820_RAM),
            ]
        );
    }

    #[test]
    fn large_guest_map_reserves_the_hole_and_continues_above_4g() {
        let map = e820_map(6 << 30);
        assert_eq!(map[2], (0x100000, 0xc000_0000 - 0x100000, E820_RAM));
        assert_eq!(map[3], (0xc000_0000, 0x4000_0000, E820_RESERVED));
        assert_eq!(map[4], (0x1_0000_0000, 3 << 30, E820_RAM));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (6 << 30) - 0x100000 + 0x9fc00);
    }

    #[test]
    fn zero_page_points_at_cmdline_initrd_and_rsdp() {
        let p = build(&info(128 << 20)).unwrap();
        let (boot_flag, header, loader) = (p.hdr.boot_flag, p.hdr.header, p.hdr.type_of_loader);
        assert_eq!((boot_flag, header, loader), (0xaa55, HDRS_MAGIC, 0xff));
        let (ptr, len) = (p.hdr.cmd_line_ptr, p.hdr.cmdline_size);
        assert_eq!((u64::from(ptr), len), (layout::CMDLINE, 11));
        let (image, size) = (p.hdr.ramdisk_image, p.hdr.ramdisk_size);
        assert_eq!((image, size), (0x7ff_f000, 0x1000));
        let rsdp = p.acpi_rsdp_addr;
        assert_eq!(rsdp, layout::ACPI_START);
        assert_eq!(p.e820_entries, 3);
        let alignment = p.hdr.kernel_alignment;
        assert_eq!(alignment, ELF_KERNEL_ALIGNMENT);
    }

    #[test]
    fn bzimage_header_is_kept() {
        let hdr = setup_header {
            version: 0x20f,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let p = build(&BootInfo {
            setup_header: Some(hdr),
            initrd: None,
            ..info(64 << 20)
        })
        .unwrap();
        let (version, alignment, image) =
            (p.hdr.version, p.hdr.kernel_alignment, p.hdr.ramdisk_image);
        assert_eq!((version, alignment, image), (0x20f, 0x20_0000, 0));
    }
}
