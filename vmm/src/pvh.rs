//! The PVH boot protocol (Xen's, used by Linux's `pvh_start_xen`): an ELF kernel that carries a
//! `XEN_ELFNOTE_PHYS32_ENTRY` note is entered at that 32-bit entry, in protected mode without
//! paging, with `ebx` pointing at an `hvm_start_info` that names the command line, the initrd
//! (as module 0), the memory map and the RSDP. It skips the kernel's own 64-bit set-up path and
//! needs no zero page.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::{boot_params, layout};

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Version 1 has the memory-map fields.
const START_INFO_VERSION: u32 = 1;

/// Errors from writing the start info.
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// More memory-map entries than the area holds.
    #[error("the PVH memory map has {0} entries, more than fit")]
    TooManyEntries(usize),
    /// linux-loader could not write it into guest memory.
    #[error("cannot write the PVH start info")]
    Write(#[source] linux_loader::configurator::Error),
}

/// What the start info says about this boot.
#[derive(Clone, Copy, Debug)]
pub struct PvhInfo {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// The initrd's address and size, if there is one.
    pub initrd: Option<(u64, u64)>,
    /// Where the ACPI RSDP is.
    pub rsdp_addr: u64,
}

/// The start info, its module list and its memory map, as they go into guest memory.
pub fn build(
    info: &PvhInfo,
) -> (
    hvm_start_info,
    Vec<hvm_modlist_entry>,
    Vec<hvm_memmap_table_entry>,
) {
    let modules: Vec<_> = info
        .initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let memmap: Vec<_> = boot_params::e820_map(info.mem_size)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    // At most one module, and the memory map is checked against its room before it is written.
    #[allow(clippy::cast_possible_truncation)]
    let (nr_modules, memmap_entries) = (modules.len() as u32, memmap.len() as u32);
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: START_INFO_VERSION,
        nr_modules,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            layout::PVH_MODLIST
        },
        cmdline_paddr: layout::CMDLINE,
        rsdp_paddr: info.rsdp_addr,
        memmap_paddr: layout::PVH_MEMMAP,
        memmap_entries,
        ..Default::default()
    };
    (start_info, modules, memmap)
}

/// Writes the start info at [`layout::PVH_START_INFO`], with its module list and memory map,
/// through linux-loader's PVH configurator (which checks that each part lies in guest memory).
pub fn write(mem: &GuestMemoryMmap, info: &PvhInfo) -> Result<(), PvhError> {
    let (start_info, modules, memmap) = build(info);
    let room = const { layout::as_usize(layout::PVH_MEMMAP_END - layout::PVH_MEMMAP) }
        / std::mem::size_of::<hvm_memmap_table_entry>();
    if memmap.len() > room {
        return Err(PvhError::TooManyEntries(memmap.len()));
    }
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_START_INFO));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(layout::PVH_MODLIST));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(PvhError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_info_names_cmdline_initrd_memmap_and_rsdp() {
        let info = PvhInfo {
            mem_size: 128 << 20,
            initrd: Some((0x700_0000, 0x1234)),
            rsdp_addr: 0xe0000,
        };
        let (start, modules, memmap) = build(&info);
        assert_eq!((start.magic, start.version), (XEN_HVM_START_MAGIC, 1));
        assert_eq!(
            (start.cmdline_paddr, start.rsdp_paddr),
            (layout::CMDLINE, 0xe0000)
        );
        assert_eq!(
            (start.nr_modules, start.modlist_paddr),
            (1, layout::PVH_MODLIST)
        );
        assert_eq!((modules[0].paddr, modules[0].size), (0x700_0000, 0x1234));
        assert_eq!(start.memmap_entries as usize, memmap.len());
        let e820 = boot_params::e820_map(128 << 20);
        assert!(memmap
            .iter()
            .zip(&e820)
            .all(|(m, e)| (m.addr, m.size, m.type_) == *e));
    }

    #[test]
    fn no_initrd_means_no_module_list() {
        let (start, modules, _) = build(&PvhInfo {
            mem_size: 64 << 20,
            initrd: None,
            rsdp_addr: 0,
        });
        assert_eq!(
            (start.nr_modules, start.modlist_paddr, modules.len()),
            (0, 0, 0)
        );
    }

    #[test]
    fn written_start_info_reads_back() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let info = PvhInfo {
            mem_size: 6 << 30,
            initrd: None,
            rsdp_addr: 0xe0000,
        };
        write(&mem, &info).unwrap();
        use vm_memory::Bytes;
        let start: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_START_INFO)).unwrap();
        assert_eq!(start.memmap_entries, 5);
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(layout::PVH_MEMMAP + 4 * 24))
            .unwrap();
        assert_eq!((last.addr, last.size), (layout::HIGH_RAM_START, 3 << 30));
    }

    #[test]
    fn the_initrd_is_written_as_module_zero() {
        use vm_memory::Bytes;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let info = PvhInfo {
            mem_size: 1 << 20,
            initrd: Some((0x8_0000, 0x4321)),
            rsdp_addr: 0xe0000,
        };
        write(&mem, &info).unwrap();
        let start: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_START_INFO)).unwrap();
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(start.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x8_0000, 0x4321));
    }
}
