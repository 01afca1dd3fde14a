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

use devices::host_file::{open_input, InputKind};
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
/// The most bytes of ELF notes a kernel may carry in one `PT_NOTE` segment. Linux's are a few
/// hundred bytes; linux-loader walks them 12 bytes at a time, so a gigabyte-sized (sparse)
/// segment of empty notes would keep it busy for hours.
const MAX_ELF_NOTES: u64 = 1 << 20;
/// ELF program header type of a note segment.
const PT_NOTE: u32 = 4;
/// Size of an ELF64 program header.
const ELF64_PHDR_SIZE: usize = 56;
const ELF64_PHDR_LEN: u64 = ELF64_PHDR_SIZE as u64;

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
    /// The initrd file is empty: a failed build, most likely, which the kernel would not
    /// notice.
    #[error("{0}: the initrd is empty")]
    EmptyInitrd(PathBuf),
    /// An ELF kernel's note segment lies outside the file or is implausibly large.
    #[error("{path}: an ELF note segment of {size} bytes at offset {offset:#x} does not fit the file's {file_size} bytes or the {MAX_ELF_NOTES}-byte limit")]
    BadNotes {
        path: PathBuf,
        offset: u64,
        size: u64,
        file_size: u64,
    },
    /// The kernel's entry point is not in guest RAM, where the vCPU would start.
    #[error("{path}: the {what} entry point {entry:#x} is outside guest RAM")]
    EntryOutsideRam {
        path: PathBuf,
        what: &'static str,
        entry: u64,
    },
    /// The kernel's image (with its zero-filled part, an ELF segment's memory size) reaches
    /// past guest RAM: the kernel would use memory that is not there.
    #[error("{path}: the kernel's image ends at {end:#x}, beyond guest RAM")]
    ImageBeyondRam { path: PathBuf, end: u64 },
    /// The bzImage ends before its 64-bit entry point.
    #[error("{0}: the bzImage is truncated: it ends before its 64-bit entry point")]
    TruncatedBzImage(PathBuf),
    /// The initrd does not fit in the guest's low memory.
    #[error("{path}: the initrd is {size} bytes and does not fit in guest memory below {limit:#x} above the kernel; give the guest more memory")]
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
            let entry = result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET;
            // linux-loader loads whatever follows the setup sectors, however short.
            if entry >= result.kernel_end {
                return Err(LoaderError::TruncatedBzImage(path.to_path_buf()));
            }
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
                entry: GuestAddress(entry),
                pvh_entry: None,
                end: result.kernel_end,
                setup_header: Some(hdr),
                cmdline_limit,
                initrd_addr_max: u64::from(hdr.initrd_addr_max),
            })
        }
        KernelFormat::Elf => {
            check_elf_notes(path, &mut file)?;
            let result = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            let pvh_entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => Some(entry),
                _ => None,
            };
            // The vCPU starts at the entry the boot takes; outside RAM it would fault at once.
            let (what, used) = match pvh_entry {
                Some(entry) => ("PVH", entry),
                None => ("ELF", result.kernel_load),
            };
            if !mem.address_in_range(used) {
                return Err(LoaderError::EntryOutsideRam {
                    path: path.to_path_buf(),
                    what,
                    entry: used.0,
                });
            }
            // linux-loader writes each segment's file bytes into RAM but takes its memory size
            // (the zero-filled rest, .bss) on trust when it reports where the image ends.
            check_image_in_ram(mem, path, result.kernel_end)?;
            Ok(LoadedKernel {
                format,
                entry: result.kernel_load,
                pvh_entry,
                end: result.kernel_end,
                setup_header: None,
                cmdline_limit: ELF_CMDLINE_SIZE,
                // A 64-bit kernel takes an initrd anywhere below 4 GiB.
                initrd_addr_max: layout::MMIO_HOLE_START - 1,
            })
        }
    }
}

/// Refuses a kernel image that ends (exclusive `end`) past guest RAM.
fn check_image_in_ram(mem: &GuestMemoryMmap, path: &Path, end: u64) -> Result<(), LoaderError> {
    let last = end.checked_sub(1).map(GuestAddress);
    if last.is_some_and(|last| !mem.address_in_range(last)) {
        return Err(LoaderError::ImageBeyondRam {
            path: path.to_path_buf(),
            end,
        });
    }
    Ok(())
}

/// Refuses an ELF kernel whose `PT_NOTE` segments lie outside the file or exceed
/// [`MAX_ELF_NOTES`], before linux-loader walks them. Headers it cannot read are left for
/// linux-loader to reject with its own error.
fn check_elf_notes(path: &Path, file: &mut File) -> Result<(), LoaderError> {
    let read_err = |source| LoaderError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file_size = file.metadata().map_err(read_err)?.len();
    let mut ehdr = [0u8; 64];
    file.rewind().map_err(read_err)?;
    if file.read_exact(&mut ehdr).is_err() {
        return Ok(());
    }
    let phoff = u64::from_le_bytes(ehdr[0x20..0x28].try_into().expect("8 bytes"));
    let phnum = u64::from(u16::from_le_bytes([ehdr[0x38], ehdr[0x39]]));
    // At most 65535 headers of 56 bytes: bounded by the format, and by the file below.
    let table_len = phnum * ELF64_PHDR_LEN;
    if phoff
        .checked_add(table_len)
        .is_none_or(|end| end > file_size)
    {
        return Ok(());
    }
    let Ok(table_len) = usize::try_from(table_len) else {
        return Ok(());
    };
    let mut table = vec![0u8; table_len];
    file.seek(SeekFrom::Start(phoff)).map_err(read_err)?;
    file.read_exact(&mut table).map_err(read_err)?;
    for phdr in table.chunks_exact(ELF64_PHDR_SIZE) {
        let field = |at: usize| u64::from_le_bytes(phdr[at..at + 8].try_into().expect("8 bytes"));
        if u32::from_le_bytes(phdr[0..4].try_into().expect("4 bytes")) != PT_NOTE {
            continue;
        }
        let (offset, size) = (field(8), field(32));
        let inside = offset.checked_add(size).is_some_and(|end| end <= file_size);
        if !inside || size > MAX_ELF_NOTES {
            return Err(LoaderError::BadNotes {
                path: path.to_path_buf(),
                offset,
                size,
                file_size,
            });
        }
    }
    Ok(())
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
    if file_size == 0 {
        return Err(LoaderError::EmptyInitrd(path.to_path_buf()));
    }
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
    let too_large = || LoaderError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        limit: mem_size,
    };
    let mut slice = mem
        .get_slice(
            GuestAddress(placement.addr + prefix_len),
            usize::try_from(file_size).map_err(|_| too_large())?,
        )
        .map_err(guest_write)?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    Ok(placement)
}

/// Checks the command line against the kernel's limit and writes it, NUL-terminated, at
/// [`layout::CMDLINE`].
///
/// Not linux-loader's `Cmdline`: it accepts only printable ASCII and splits the line at `--`
/// into boot and init arguments it joins again, while kvmbuild passes the line byte for byte
/// as the front end gave it (vmTools' `-append`, a user's `--cmdline`), as QEMU does. The
/// kernel's own rules are the ones checked here: its length limit and no NUL.
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
    let limit = kernel_limit.min(const { layout::as_usize(layout::CMDLINE_MAX) } - 1);
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

/// Opens a kernel or initrd the one way inputs are opened: without waiting on a FIFO, and
/// only if it is a regular file (a directory, FIFO or `/dev/zero` has no size to load).
fn open(path: &Path) -> Result<File, LoaderError> {
    open_input(path, InputKind::Regular, false).map_err(|source| LoaderError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests;
