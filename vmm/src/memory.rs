//! Guest RAM: one memfd, mapped shared, split around the 32-bit MMIO hole.
//!
//! A memfd (rather than anonymous memory) lets a vhost-user back end such as virtiofsd map the
//! same pages: VHOST_USER_SET_MEM_TABLE hands it file descriptors, not addresses.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout;

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
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory slot {slot}")]
    Register {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// Creates `size` bytes of guest RAM backed by a memfd.
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let file = memfd("kvmbuild-guest-ram")?;
    file.set_len(size)
        .map_err(|source| MemoryError::Resize { size, source })?;
    let mut file_offset = 0;
    let ranges: Vec<_> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| {
            let range = (
                GuestAddress(start),
                len as usize,
                Some(FileOffset::new(
                    file.try_clone().expect("dup of a memfd we own"),
                    file_offset,
                )),
            );
            file_offset += len;
            range
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|source| MemoryError::Map { size, source })
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

fn memfd(name: &str) -> Result<File, MemoryError> {
    let name = std::ffi::CString::new(name).expect("no NUL in a literal name");
    let name: &CStr = &name;
    // SAFETY: `name` is a valid NUL-terminated string; the flags are plain constants.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
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
