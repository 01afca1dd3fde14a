//! Guest RAM: one memfd, mapped shared, split around the 32-bit MMIO hole, on 2 MiB pages
//! where the host offers them (see [`huge_pages`]).
//!
//! A memfd (rather than anonymous memory) lets a vhost-user back end such as virtiofsd map the
//! same pages: VHOST_USER_SET_MEM_TABLE hands it file descriptors, not addresses.

pub mod huge_pages;

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

pub use huge_pages::{Backing, HostPages};

use crate::layout;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors from creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size the guest memory file to {size} bytes")]
    Resize { size: u64, source: std::io::Error },
    /// The host refused the mapping.
    #[error("cannot map {size} bytes of guest memory")]
    Map { size: u64, source: BoxError },
    /// The host refused the huge-page advice.
    #[error("madvise(MADV_HUGEPAGE) refused")]
    Advise(std::io::Error),
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory slot {slot}")]
    Register {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// Which backing [`create_reporting`] used, and why better ones were passed over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingReport {
    pub backing: Backing,
    /// Each backing tried before it, with the error that ruled it out.
    pub fell_back: Vec<(Backing, String)>,
}

impl std::fmt::Display for BackingReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest memory on {}", self.backing)?;
        for (backing, why) in &self.fell_back {
            write!(f, " (not {backing}: {why})")?;
        }
        Ok(())
    }
}

/// Creates `size` bytes of guest RAM backed by a memfd, on the best backing the host offers
/// (hugetlb, then shmem THP, then 4 KiB pages): each failure falls back to the next. Returns
/// which backing it got, for the run's report.
pub fn create_reporting(size: u64) -> Result<(GuestMemoryMmap, BackingReport), MemoryError> {
    let order = huge_pages::backings_to_try(size, &HostPages::read());
    create_first_of(size, &order)
}

/// [`create_reporting`], for callers that need not know the backing.
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    create_reporting(size).map(|(mem, _)| mem)
}

/// Tries each backing in `order`; the first that works wins. Returns the last error when none
/// does.
fn create_first_of(
    size: u64,
    order: &[Backing],
) -> Result<(GuestMemoryMmap, BackingReport), MemoryError> {
    let mut fell_back = Vec::new();
    let mut last_error = None;
    for &backing in order {
        match create_on(size, backing) {
            Ok(mem) => return Ok((mem, BackingReport { backing, fell_back })),
            Err(e) => {
                fell_back.push((backing, error_chain(&e)));
                last_error = Some(e);
            }
        }
    }
    Err(
        last_error.unwrap_or(MemoryError::Memfd(std::io::Error::from_raw_os_error(
            libc::EINVAL,
        ))),
    )
}

/// Creates guest RAM on exactly `backing`.
pub fn create_on(size: u64, backing: Backing) -> Result<GuestMemoryMmap, MemoryError> {
    let file = memfd("kvmbuild-guest-ram", backing == Backing::Hugetlb)?;
    file.set_len(size)
        .map_err(|source| MemoryError::Resize { size, source })?;
    let mut regions = Vec::new();
    let mut file_offset = 0;
    for (start, len) in layout::ram_ranges(size) {
        let file = file.try_clone().map_err(MemoryError::Memfd)?;
        let region = map_range(FileOffset::new(file, file_offset), len, backing)
            .map_err(|source| MemoryError::Map { size, source })?;
        if backing == Backing::ShmemThp {
            advise_huge_pages(region.as_ptr(), region.size())?;
        }
        let region =
            GuestRegionMmap::new(region, GuestAddress(start)).ok_or_else(|| MemoryError::Map {
                size,
                source: "guest address overflow".into(),
            })?;
        regions.push(region);
        file_offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map {
        size,
        source: e.into(),
    })
}

/// Maps `len` bytes of the memfd, shared. Hugetlb mappings reserve their pages now (no
/// MAP_NORESERVE), so a shortage fails here rather than as a SIGBUS when the guest touches
/// the page; shmem needs no reservation.
fn map_range(
    file_offset: FileOffset,
    len: u64,
    backing: Backing,
) -> Result<vm_memory::MmapRegion, BoxError> {
    let len = usize::try_from(len)?;
    let flags = match backing {
        Backing::Hugetlb => libc::MAP_SHARED,
        Backing::ShmemThp | Backing::SmallPages => libc::MAP_SHARED | libc::MAP_NORESERVE,
    };
    let region = MmapRegionBuilder::new(len)
        .with_file_offset(file_offset)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .with_hugetlbfs(backing == Backing::Hugetlb)
        .build()?;
    Ok(region)
}

/// Asks for transparent huge pages on a mapping (needed when `shmem_enabled` is `advise`,
/// harmless otherwise).
fn advise_huge_pages(addr: *mut u8, len: usize) -> Result<(), MemoryError> {
    // SAFETY: `addr..addr+len` is a mapping this module just created and still owns;
    // MADV_HUGEPAGE only changes how the kernel backs it, never its contents.
    let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        return Err(MemoryError::Advise(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}

/// Tells KVM about every region of `mem`, one memory slot each.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("a mapped region has a host address");
        let slot_desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region stays mapped for as long as `mem` lives, and the VM (which holds
        // the slot) is dropped before the memory in every caller (see `Vm`'s field order).
        unsafe { vm.set_user_memory_region(slot_desc) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

fn memfd(name: &str, hugetlb: bool) -> Result<File, MemoryError> {
    let name = std::ffi::CString::new(name).expect("no NUL in a literal name");
    let name: &CStr = &name;
    let flags = match hugetlb {
        true => libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        false => libc::MFD_CLOEXEC,
    };
    // SAFETY: `name` is a valid NUL-terminated string; the flags are plain constants.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    /// The `name:` fields (in kB) of the /proc/self/smaps entry that maps `addr`.
    fn smaps_kb(addr: usize, name: &str) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut total = 0;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((start, end)) = first.split_once('-') {
                if let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                ) {
                    inside = (start..end).contains(&addr);
                    continue;
                }
            }
            if inside && first == name {
                total += line
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
            }
        }
        total
    }

    /// Writes one byte in every 4 KiB page, as a guest touching its RAM would.
    fn touch(mem: &GuestMemoryMmap, size: u64) {
        for addr in (0..size).step_by(4096) {
            mem.write_obj(1u8, GuestAddress(addr)).unwrap();
        }
    }

    fn host_address(mem: &GuestMemoryMmap) -> usize {
        mem.get_host_address(GuestAddress(0)).unwrap() as usize
    }

    #[test]
    fn a_failed_backing_falls_back_to_the_next() {
        // A hugetlb file cannot be sized to 3 MiB (not a whole number of 2 MiB pages), on any
        // host: the fallback path runs for certain.
        let (mem, report) =
            create_first_of(3 * MIB, &[Backing::Hugetlb, Backing::SmallPages]).unwrap();
        assert_eq!(report.backing, Backing::SmallPages);
        assert_eq!(report.fell_back.len(), 1);
        assert_eq!(report.fell_back[0].0, Backing::Hugetlb);
        mem.write_obj(7u8, GuestAddress(3 * MIB - 1)).unwrap();
        assert!(report
            .to_string()
            .starts_with("guest memory on 4 KiB pages (not hugetlb"));
    }

    #[test]
    fn no_backing_left_is_the_last_error() {
        let err = create_first_of(3 * MIB, &[Backing::Hugetlb]).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::Resize { .. } | MemoryError::Memfd(_)
        ));
    }

    #[test]
    fn small_pages_are_small_in_smaps() {
        let mem = create_on(8 * MIB, Backing::SmallPages).unwrap();
        touch(&mem, 8 * MIB);
        let addr = host_address(&mem);
        assert_eq!(
            smaps_kb(addr, "Rss:"),
            8 * 1024,
            "all touched pages resident"
        );
        assert_eq!(smaps_kb(addr, "ShmemPmdMapped:"), 0);
    }

    /// Where the host offers huge pages (the test host's CI sets them up; this machine's
    /// shared host does not), the mapping really is on 2 MiB pages once touched.
    #[test]
    fn huge_backings_are_huge_in_smaps_where_offered() {
        let host = HostPages::read();
        let size = 16 * MIB;
        let mut checked = 0;
        if host.hugetlb_available >= size / huge_pages::HUGE_PAGE {
            let mem = create_on(size, Backing::Hugetlb).unwrap();
            touch(&mem, size);
            let addr = host_address(&mem);
            assert_eq!(addr % huge_pages::HUGE_PAGE as usize, 0);
            let hugetlb = smaps_kb(addr, "Shared_Hugetlb:") + smaps_kb(addr, "Private_Hugetlb:");
            assert_eq!(hugetlb, 16 * 1024, "hugetlb pages in smaps");
            checked += 1;
        }
        if host.shmem_thp != huge_pages::ShmemThp::Off {
            let mem = create_on(size, Backing::ShmemThp).unwrap();
            touch(&mem, size);
            let addr = host_address(&mem);
            assert_eq!(
                addr % huge_pages::HUGE_PAGE as usize,
                0,
                "mapping 2 MiB aligned"
            );
            let pmd = smaps_kb(addr, "ShmemPmdMapped:") + smaps_kb(addr, "FilePmdMapped:");
            assert!(
                pmd >= 8 * 1024,
                "only {pmd} kB of {size} bytes on 2 MiB pages"
            );
            checked += 1;
        }
        if checked == 0 {
            eprintln!("skipped: this host offers no huge pages for shmem or hugetlb ({host:?})");
        }
    }

    #[test]
    fn small_memory_is_one_region() {
        let mem = create(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }

    #[test]
    fn large_memory_skips_the_hole_and_stays_one_file() {
        let size = layout::MMIO_HOLE_START + (256 << 20);
        let mem = create(size).unwrap();
        let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(
            regions,
            vec![
                (0, layout::MMIO_HOLE_START),
                (layout::HIGH_RAM_START, 256 << 20)
            ]
        );
        assert!(!mem.address_in_range(GuestAddress(layout::MMIO_HOLE_START)));
        mem.write_obj(0xabu8, GuestAddress(layout::HIGH_RAM_START))
            .unwrap();
        let offsets: Vec<_> = mem
            .iter()
            .map(|r| r.file_offset().unwrap().start())
            .collect();
        assert_eq!(offsets, vec![0, layout::MMIO_HOLE_START]);
    }
}
