//! The kernel loaders (bzImage, ELF and its PVH note) on arbitrary kernel files into a small
//! guest memory, then what the boot builds from the result: the initrd placement, the
//! command line, the zero page and the PVH start info. Nothing may panic, and whatever loads
//! must lie inside guest memory.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::boot_params::{self, BootInfo};
use vmm::layout;
use vmm::loader::{self, KernelFormat};
use vmm::pvh::{self, PvhInfo};

/// Guest RAM: 16 MiB from 0, the kernel going in at 1 MiB.
const MEM_SIZE: u64 = 16 << 20;

fn kernel_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| kvmbuild_fuzz::scratch_file("kernel", 0))
}

fuzz_target!(|data: &[u8]| {
    // The last 16 bytes pick an initrd size and command line length; the rest is the kernel.
    let (kernel, knobs) = data.split_at(data.len().saturating_sub(16));
    let mut k = [0u8; 16];
    k[..knobs.len()].copy_from_slice(knobs);
    let initrd_size = u64::from_le_bytes(k[..8].try_into().unwrap()) % (32 << 20);
    let cmdline_len = u16::from_le_bytes(k[8..10].try_into().unwrap()) as usize % 5000;

    let path = kernel_path();
    std::fs::write(path, kernel).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let Ok(loaded) = loader::load_kernel(&mem, path) else {
        return;
    };

    // The image and its entry points are in RAM.
    assert!(loaded.end <= MEM_SIZE, "kernel ends at {:#x}", loaded.end);
    assert!(mem.address_in_range(loaded.entry) || loaded.format == KernelFormat::Elf);
    match loaded.format {
        KernelFormat::BzImage => {
            assert!(loaded.setup_header.is_some());
            assert!(loaded.entry.0 < loaded.end);
        }
        KernelFormat::Elf => {
            let used = loaded.pvh_entry.unwrap_or(loaded.entry);
            assert!(mem.address_in_range(used));
        }
    }

    // The initrd goes page-aligned above the kernel, inside RAM and the kernel's limit.
    let initrd = loader::place_initrd(MEM_SIZE, &loaded, initrd_size);
    if let Some(p) = initrd {
        assert_eq!(p.addr % 0x1000, 0);
        assert!(p.addr >= loaded.end.max(layout::HIMEM_START));
        assert!(p.addr + p.size <= MEM_SIZE);
        assert!(p.addr + p.size <= loaded.initrd_addr_max.saturating_add(1));
    }

    let cmdline = "a".repeat(cmdline_len);
    let cmdline_written = loader::load_cmdline(&mem, &loaded, &cmdline).ok();
    if cmdline_written.is_some() {
        assert!(cmdline_len <= loaded.cmdline_limit);
    }

    let initrd = initrd.map(|p| (p.addr, p.size));
    let params = boot_params::build(&BootInfo {
        mem_size: MEM_SIZE,
        setup_header: loaded.setup_header,
        cmdline_len: cmdline_written.unwrap_or(0),
        initrd,
        rsdp_addr: layout::ACPI_START,
    })
    .unwrap();
    assert!(usize::from(params.e820_entries) <= params.e820_table.len());
    if loaded.pvh_entry.is_some() {
        pvh::write(
            &mem,
            &PvhInfo {
                mem_size: MEM_SIZE,
                initrd,
                rsdp_addr: layout::ACPI_START,
            },
        )
        .unwrap();
    }
});
