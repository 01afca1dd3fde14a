//! Putting the kernel, the initrd and the command line into guest memory.
//!
//! Both kernel formats go through linux-loader and both are entered at their 64-bit entry
//! point: a bzImage at its protected-mode code + 0x200 (boot protocol "64-bit boot"), an ELF
//! vmlinux at `e_entry`. The limits the kernel states about itself (command line size, highest
//! initrd address) are checked here, so a bad combination is a clear error before the guest
//! runs rather than a guest that silently truncates or cannot find its initrd.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};

use crate::layout;

/// The boot protocol's magic "HdrS" at offset 0x202 of a bzImage.
const BZIMAGE_MAGIC: u32 = 0x5372_6448;
/// Offset of the setup header's magic within a bzImage.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
/// bzImage `xloadflags` bit: the kernel has a 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Boot protocol 2.06 added `cmdline_size`; older kernels accept 255 bytes.
const PROTOCOL_WITH_CMDLINE_SIZE: u16 = 0x206;
/// x86 Linux's COMMAND_LINE_SIZE, the limit for an ELF kernel, which carries no setup header.
const ELF_CMDLINE_SIZE: usize = 2048;

/// Errors from loading the kernel, initrd or command line.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel or initrd could not be opened or read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The kernel file is neither format.
    #[error("{0}: not a bzImage or ELF kernel")]
    UnknownFormat(PathBuf),
    /// linux-loader rejected the kernel.
    #[error("{path}: cannot load the kernel")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    /// A bzImage without a 64-bit entry point.
    #[error("{0}: the bzImage has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")]
    No64BitEntry(PathBuf),
    /// The initrd does not fit in the guest's low memory.
    #[error("{path}: the initrd is {size} bytes and does not fit in guest memory below {limit:#x} above the kernel; give the guest more --mem")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    /// The command line exceeds the kernel's limit.
    #[error("the command line is {len} bytes; the kernel accepts at most {limit}")]
    CmdlineTooLong { len: usize, limit: usize },
    /// The command line contains a NUL byte.
    #[error("the command line contains a NUL byte")]
    CmdlineNul,
    /// Writing into guest memory failed (a bug: addresses are checked before writing).
    #[error("cannot write the {what} into guest memory")]
    GuestWrite {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// The kernel formats kvmbuild boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A compressed bzImage (as /boot/vmlinuz-* are).
    BzImage,
    /// An uncompressed ELF vmlinux.
    Elf,
}

/// What the rest of the boot needs to know about a loaded kernel.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    /// How the kernel was packaged.
    pub format: KernelFormat,
    /// The 64-bit entry point.
    pub entry: GuestAddress,
    /// The 32-bit PVH entry point, for an ELF kernel with a `XEN_ELFNOTE_PHYS32_ENTRY` note.
    pub pvh_entry: Option<GuestAddress>,
    /// First guest address past the kernel image.
    pub end: u64,
    /// A bzImage's setup header, copied into the zero page.
    pub setup_header: Option<setup_header>,
    /// The longest command line (without NUL) the kernel accepts.
    pub cmdline_limit: usize,
    /// The highest address the initrd may occupy.
    pub initrd_addr_max: u64,
}

/// Where the initrd was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest address of its first byte (page-aligned).
    pub addr: u64,
    /// Its length in bytes.
    pub size: u64,
}

/// Recognises the kernel format from the file's first bytes.
pub fn detect_format(path: &Path, file: &mut File) -> Result<KernelFormat, LoaderError> {
    let read_err = |source| LoaderError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut elf_magic = [0u8; 4];
    let mut hdrs = [0u8; 4];
    file.rewind().map_err(read_err)?;
    if file.read_exact(&mut elf_magic).is_ok() && elf_magic == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))
        .map_err(read_err)?;
    if file.read_exact(&mut hdrs).is_ok() && u32::from_le_bytes(hdrs) == BZIMAGE_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(LoaderError::UnknownFormat(path.to_path_buf()))
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let mut file = open(path)?;
    let format = detect_format(path, &mut file)?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let load_err = |source| LoaderError::Load {
        path: path.to_path_buf(),
        source,
    };
    match format {
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            let hdr = result
                .setup_header
                .expect("linux-loader returns a bzImage's header");
            let (version, xloadflags) = (hdr.version, hdr.xloadflags);
            if xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LoaderError::No64BitEntry(path.to_path_buf()));
            }
            let cmdline_limit = if version >= PROTOCOL_WITH_CMDLINE_SIZE {
                hdr.cmdline_size as usize
            } else {
                255
            };
            Ok(LoadedKernel {
                format,
                entry: GuestAddress(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
                pvh_entry: None,
                end: result.kernel_end,
                setup_header: Some(hdr),
                cmdline_limit,
                initrd_addr_max: u64::from(hdr.initrd_addr_max),
            })
        }
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                format,
                entry: result.kernel_load,
                pvh_entry: match result.pvh_boot_cap {
                    PvhBootCapability::PvhEntryPresent(entry) => Some(entry),
                    _ => None,
                },
                end: result.kernel_end,
                setup_header: None,
                cmdline_limit: ELF_CMDLINE_SIZE,
                // A 64-bit kernel takes an initrd anywhere below 4 GiB.
                initrd_addr_max: layout::MMIO_HOLE_START - 1,
            })
        }
    }
}

/// Chooses the initrd's address: page-aligned, as high as the kernel allows in low memory.
pub fn place_initrd(mem_size: u64, kernel: &LoadedKernel, size: u64) -> Option<InitrdPlacement> {
    let low_ram_end = mem_size.min(layout::MMIO_HOLE_START);
    let top = low_ram_end.min(kernel.initrd_addr_max.saturating_add(1));
    let addr = top.checked_sub(size)? & !0xfff;
    (addr >= kernel.end.max(layout::HIMEM_START)).then_some(InitrdPlacement { addr, size })
}

/// Copies `prefix` followed by the initrd at `path` into `mem`, as one initrd placed by
/// [`place_initrd`]. The prefix is for a small uncompressed cpio archive (per-run settings) in
/// front of a cached image: the kernel unpacks concatenated archives in order.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    path: &Path,
    prefix: &[u8],
) -> Result<InitrdPlacement, LoaderError> {
    let mut file = open(path)?;
    let read_err = |source| LoaderError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file_size = file.metadata().map_err(read_err)?.len();
    let prefix_len = prefix.len() as u64;
    let size = file_size.saturating_add(prefix_len);
    let placement =
        place_initrd(mem_size, kernel, size).ok_or_else(|| LoaderError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            limit: mem_size.min(kernel.initrd_addr_max.saturating_add(1)),
        })?;
    let guest_write = |source| LoaderError::GuestWrite {
        what: "initrd",
        source,
    };
    mem.write_slice(prefix, GuestAddress(placement.addr))
        .map_err(guest_write)?;
    // The placement fits in guest RAM, so the file's size fits a usize.
    let mut slice = mem
        .get_slice(
            GuestAddress(placement.addr + prefix_len),
            file_size as usize,
        )
        .map_err(guest_write)?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    Ok(placement)
}

/// Checks the command line against the kernel's limit and writes it, NUL-terminated, at
/// [`layout::CMDLINE`].
pub fn load_cmdline(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &str,
) -> Result<usize, LoaderError> {
    check_cmdline(cmdline, kernel.cmdline_limit)?;
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE))
        .map_err(|source| LoaderError::GuestWrite {
            what: "command line",
            source,
        })?;
    Ok(cmdline.len())
}

/// The command line's length and content rules, without touching memory.
pub fn check_cmdline(cmdline: &str, kernel_limit: usize) -> Result<(), LoaderError> {
    let limit = kernel_limit.min(layout::CMDLINE_MAX as usize - 1);
    if cmdline.len() > limit {
        return Err(LoaderError::CmdlineTooLong {
            len: cmdline.len(),
            limit,
        });
    }
    if cmdline.contains('\0') {
        return Err(LoaderError::CmdlineNul);
    }
    Ok(())
}

fn open(path: &Path) -> Result<File, LoaderError> {
    let file = File::open(path).map_err(|source| LoaderError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // Opening a directory succeeds; reading it does not. Say so now, with the path.
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        return Err(LoaderError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::from_raw_os_error(libc::EISDIR),
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(end: u64, initrd_addr_max: u64) -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::BzImage,
            entry: GuestAddress(layout::HIMEM_START + 0x200),
            pvh_entry: None,
            end,
            setup_header: None,
            cmdline_limit: 2048,
            initrd_addr_max,
        }
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top_of_low_memory() {
        let k = kernel(0x200_0000, 0x7fff_ffff);
        let p = place_initrd(128 << 20, &k, 0x1234).unwrap();
        assert_eq!(p.addr % 0x1000, 0);
        assert_eq!(p.addr, ((128 << 20) - 0x1234) & !0xfff);
        assert!(p.addr + p.size <= 128 << 20);
    }

    #[test]
    fn initrd_respects_the_kernels_highest_address_and_the_hole() {
        let k = kernel(0x200_0000, 0x37ff_ffff);
        let p = place_initrd(2 << 30, &k, 0x1000).unwrap();
        assert_eq!(p.addr + p.size, 0x3800_0000);
        let k = kernel(0x200_0000, u64::from(u32::MAX));
        let p = place_initrd(8 << 30, &k, 0x1000).unwrap();
        assert_eq!(p.addr + p.size, layout::MMIO_HOLE_START);
    }

    #[test]
    fn initrd_that_would_overlap_the_kernel_does_not_fit() {
        let k = kernel(0x300_0000, 0x7fff_ffff);
        assert_eq!(place_initrd(64 << 20, &k, 32 << 20), None);
        assert_eq!(place_initrd(16 << 20, &k, 1 << 40), None);
    }

    #[test]
    fn command_line_limits_are_the_kernels() {
        assert!(check_cmdline(&"a".repeat(2048), 2048).is_ok());
        let err = check_cmdline(&"a".repeat(2049), 2048).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the command line is 2049 bytes; the kernel accepts at most 2048"
        );
        assert!(matches!(
            check_cmdline("a\0b", 2048),
            Err(LoaderError::CmdlineNul)
        ));
    }

    #[test]
    fn unknown_files_are_named_in_the_error() {
        let path = std::env::temp_dir().join(format!("kvmbuild-notakernel-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let mut file = File::open(&path).unwrap();
        let err = detect_format(&path, &mut file).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(err.to_string().ends_with("not a bzImage or ELF kernel"));
    }
}
