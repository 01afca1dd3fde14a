//! Where things live in guest physical memory.
//!
//! The low megabyte follows the PC conventions Linux expects; RAM above it is split around the
//! 32-bit MMIO hole when the guest has more than [`MMIO_HOLE_START`] bytes of it.

/// `v` as a u32, for a layout constant that a 32-bit field holds (checked where evaluated in a
/// const, that is at compile time).
#[allow(clippy::cast_possible_truncation)] // asserted to fit
pub const fn as_u32(v: u64) -> u32 {
    assert!(v <= u32::MAX as u64);
    v as u32
}

/// `v` as a usize, for a layout constant that a length or an ioctl argument takes.
#[allow(clippy::cast_possible_truncation)] // asserted to fit
pub const fn as_usize(v: u64) -> usize {
    assert!(v <= usize::MAX as u64);
    v as usize
}

/// GDT used to enter long mode.
pub const BOOT_GDT: u64 = 0x500;
/// An empty IDT, loaded so an early exception triple-faults instead of jumping at random.
pub const BOOT_IDT: u64 = 0x520;
/// PVH boot: the `hvm_start_info`, passed to the kernel in `ebx`.
pub const PVH_START_INFO: u64 = 0x6000;
/// PVH boot: the module list (the initrd).
pub const PVH_MODLIST: u64 = 0x6040;
/// PVH boot: the memory map, up to [`PVH_MEMMAP_END`].
pub const PVH_MEMMAP: u64 = 0x6080;
/// End of the PVH memory map's room.
pub const PVH_MEMMAP_END: u64 = ZERO_PAGE;
/// The zero page (`struct boot_params`), passed to the kernel in `rsi`.
pub const ZERO_PAGE: u64 = 0x7000;
/// Identity-map page tables: PML4, then one PDPT, then one PD of 2 MiB pages (first 1 GiB).
pub const PML4: u64 = 0x9000;
/// The page-directory-pointer table.
pub const PDPT: u64 = 0xa000;
/// The page directory.
pub const PD: u64 = 0xb000;
/// Initial stack pointer for the boot vCPU (grows down, below the page tables).
pub const BOOT_STACK: u64 = 0x8ff0;
const _: () = assert!(BOOT_STACK < PML4 && BOOT_STACK > ZERO_PAGE + 0x1000);
/// The kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Room reserved for the command line (the kernel's own limit may be lower).
pub const CMDLINE_MAX: u64 = 0x10000;
/// End of conventional low memory (start of the EBDA), as the e820 map reports it.
pub const LOW_RAM_END: u64 = 0x9fc00;
/// ACPI tables, starting with the RSDP, which Linux also finds by scanning 0xe0000..0x100000.
pub const ACPI_START: u64 = 0xe0000;
/// End of the area the e820 map reports as ACPI (the PC's BIOS area ends here too).
pub const ACPI_END: u64 = 0x10_0000;
/// The x86 reset vector (f000:fff0), where kvmbuild puts its reset stub (see `firmware`).
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// The ACPI tables must end before the reset stub.
pub const ACPI_TABLES_END: u64 = RESET_VECTOR;
/// Where the protected-mode kernel of a bzImage is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; RAM beyond this continues at [`HIGH_RAM_START`].
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Where RAM resumes above the hole.
pub const HIGH_RAM_START: u64 = MMIO_HOLE_END;
/// The IOAPIC's MMIO base (fixed by KVM's in-kernel irqchip).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// The TSS KVM needs on Intel hosts (three pages), high in the hole, away from every device.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// The ranges of guest physical address space backed by RAM, for `size` bytes of memory.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (HIGH_RAM_START, size - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_stays_out_of_the_mmio_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, 1 << 30)]
        );
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (BOOT_GDT, 0x20),
            (BOOT_IDT, 0x10),
            (PVH_START_INFO, PVH_MEMMAP_END - PVH_START_INFO),
            (ZERO_PAGE, 0x1000),
            (PML4, 0x1000),
            (PDPT, 0x1000),
            (PD, 0x1000),
            (CMDLINE, CMDLINE_MAX),
        ];
        for (i, a) in areas.iter().enumerate() {
            assert!(a.0 + a.1 <= LOW_RAM_END);
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }
}
