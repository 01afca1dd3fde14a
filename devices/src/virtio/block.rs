//! virtio-blk (device id 2) on a raw disk image file.
//!
//! Requests: read, write, flush (`fdatasync`), get-id, and — when the file system under the
//! image can punch holes — discard and write-zeroes. A read-only disk offers
//! `VIRTIO_BLK_F_RO` and answers every request that would change the file with
//! `VIRTIO_BLK_S_IOERR`. Data moves between the file and guest memory with `pread`/`pwrite`
//! straight into the guest's buffers, without a copy.
//!
//! Every request is checked before it touches the file: the chain's shape (see
//! [`super::chain`]), every buffer inside guest memory, a header of at least 16 bytes, data in
//! the right direction, whole sectors, and `sector + length` inside the disk without
//! overflow. A request that fails these checks is answered with IOERR (or UNSUPP for an
//! unknown type); one without a status byte to answer in, or a broken chain, marks the device
//! as needing reset.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestMemory, GuestMemoryMmap, Permissions, ReadVolatile, VolatileMemoryError,
    VolatileSlice, WriteVolatile,
};

use crate::host_file::{open_input, InputKind};

use super::chain::{read_stream, sub_range, write_stream, Chain, ChainError, Segment};
use super::worker::{RequestHandler, SingleQueueWorker};
use super::{
    device_type, features, read_config_bytes, ActivateError, Activation, DeviceWorker, VirtioDevice,
};

/// Sector size of the virtio-blk protocol (always 512, whatever `blk_size` says).
pub const SECTOR_SIZE: u64 = 512;
/// Entries in the request queue.
const QUEUE_SIZE: u16 = 256;
/// Data segments per request (`seg_max`): a request also needs a header and a status
/// descriptor, and must fit in the queue.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The longest chain accepted: data segments plus header and status.
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Sectors per discard or write-zeroes segment (2 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Segments per discard or write-zeroes request.
const MAX_DISCARD_SEG: u32 = 32;
/// Size of the request header: type, reserved, sector.
const HEADER_LEN: u64 = 16;
/// Size of one discard/write-zeroes segment: sector, num_sectors, flags.
const DISCARD_SEGMENT_LEN: u64 = 16;
/// Length of the get-id answer.
const ID_LEN: usize = 20;
/// Length of the configuration space as far as kvmbuild fills it.
const CONFIG_LEN: usize = 60;

// Feature bits (virtio 1.2, section 5.2.3).
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

// Status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// The write-zeroes flag that allows deallocation.
const WRITE_ZEROES_UNMAP: u32 = 1;

/// Errors from opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The image's size or identity could not be read.
    #[error("cannot read the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another process holds a conflicting lock on the image.
    #[error("disk image {path} is in use by another process (it holds a {held} lock on it)")]
    Locked { path: PathBuf, held: &'static str },
    /// Taking the lock failed for another reason.
    #[error("cannot lock disk image {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The open image, shared between the device model and its running worker.
struct DiskImage {
    file: File,
    read_only: bool,
    /// Size in 512-byte sectors; a trailing partial sector is not part of the disk.
    sectors: u64,
    /// Whether the file system can punch holes in the image.
    can_punch: bool,
    id: [u8; ID_LEN],
}

/// The virtio-blk device model for one disk image.
pub struct Block {
    image: Arc<DiskImage>,
    path: PathBuf,
}

impl Block {
    /// Opens the raw image at `path`, read-write unless `read_only`.
    pub fn new(path: impl AsRef<Path>, read_only: bool) -> Result<Self, BlockError> {
        let path = path.as_ref().to_path_buf();
        let mut file =
            open_input(&path, InputKind::Disk, !read_only).map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?;
        lock_image(&file, read_only, &path)?;
        let size_err = |source| BlockError::Size {
            path: path.clone(),
            source,
        };
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let bytes = file.seek(SeekFrom::End(0)).map_err(size_err)?;
        let meta = file.metadata().map_err(size_err)?;
        let can_punch = !read_only && punch_hole(&file, bytes.next_multiple_of(4096), 4096).is_ok();
        Ok(Self {
            image: Arc::new(DiskImage {
                file,
                read_only,
                sectors: bytes / SECTOR_SIZE,
                can_punch,
                id: derive_id(meta.dev(), meta.ino()),
            }),
            path,
        })
    }

    /// Replaces the serial the guest reads with get-id (`/sys/block/vdX/serial`); longer ids
    /// are cut to 20 bytes.
    pub fn with_id(mut self, id: &str) -> Self {
        let mut bytes = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        // Only the transport holds clones while the device runs, and that is after setup.
        if let Some(image) = Arc::get_mut(&mut self.image) {
            image.id = bytes;
        }
        self
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.image.sectors
    }

    /// Whether the guest may only read the disk.
    pub fn is_read_only(&self) -> bool {
        self.image.read_only
    }

    /// The image as a driver that accepted `features` sees it.
    pub(super) fn disk(&self, features: u64) -> Disk {
        Disk {
            image: self.image.clone(),
            // Without the FLUSH feature the driver assumes a write-through disk.
            write_through: features & F_FLUSH == 0,
            discard: features & F_DISCARD != 0,
            write_zeroes: features & F_WRITE_ZEROES != 0,
        }
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            c[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &self.image.sectors.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &1u16.to_le_bytes());
        if self.image.can_punch {
            put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(40, &MAX_DISCARD_SEG.to_le_bytes());
            put(44, &1u32.to_le_bytes());
            put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(52, &MAX_DISCARD_SEG.to_le_bytes());
            put(56, &[1]);
        }
        c
    }
}

/// A 20-byte serial from the image's device and inode numbers, unique per host file.
fn derive_id(dev: u64, ino: u64) -> [u8; ID_LEN] {
    let text = format!("{dev:x}-{ino:x}");
    let mut id = [0u8; ID_LEN];
    let n = text.len().min(ID_LEN);
    id[..n].copy_from_slice(&text.as_bytes()[..n]);
    id
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = features::VERSION_1
            | features::RING_INDIRECT_DESC
            | features::RING_EVENT_IDX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH;
        if self.image.read_only {
            f |= F_RO;
        }
        if self.image.can_punch {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<DeviceWorker, ActivateError> {
        let disk = self.disk(a.features);
        Ok(Box::new(SingleQueueWorker::new(disk, a)?))
    }
}

impl RequestHandler for Disk {
    fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, ChainError> {
        self.serve(mem, chain)
    }
}

/// The image as one activation negotiated it.
pub(super) struct Disk {
    image: Arc<DiskImage>,
    write_through: bool,
    discard: bool,
    write_zeroes: bool,
}

/// A request's outcome: bytes written into the guest's data buffers, or an error status.
type Outcome = Result<u32, u8>;

/// The parsed request header.
struct Header {
    kind: u32,
    sector: u64,
}

impl Disk {
    /// Serves one request chain; returns the bytes written into it, status byte included.
    pub(super) fn serve(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, ChainError> {
        let chain = Chain::walk(chain, MAX_DESCRIPTORS)?;
        let status_at = chain.last_writable_byte(mem).ok_or(ChainError::NoStatus)?;
        let outcome = match chain.check_memory(mem) {
            Ok(()) => self.execute(mem, &chain),
            Err(_) => Err(S_IOERR),
        };
        let (status, written) = match outcome {
            Ok(n) => (S_OK, n),
            Err(status) => (status, 0),
        };
        mem.write_obj(status, status_at)
            .map_err(|_| ChainError::Memory)?;
        Ok(written.saturating_add(1))
    }

    fn execute(&self, mem: &GuestMemoryMmap, chain: &Chain) -> Outcome {
        let header = read_header(mem, chain)?;
        // The data the driver sends (after the header) and the room it gives for data back
        // (before the status byte).
        let payload = chain.readable_len() - HEADER_LEN;
        let room = chain.writable_len() - 1;
        let data_out = || sub_range(&chain.readable, HEADER_LEN, payload).ok_or(S_IOERR);
        let data_in = || sub_range(&chain.writable, 0, room).ok_or(S_IOERR);
        match header.kind {
            T_IN if payload == 0 => self.read(mem, &data_in()?, header.sector, room),
            T_OUT if room == 0 => self.write(mem, &data_out()?, header.sector, payload),
            // Data in the wrong direction.
            T_IN | T_OUT => Err(S_IOERR),
            T_FLUSH => self.flush(),
            T_GET_ID => self.get_id(mem, &data_in()?),
            T_DISCARD => self.unmap(mem, &data_out()?, payload, false),
            T_WRITE_ZEROES => self.unmap(mem, &data_out()?, payload, true),
            _ => Err(S_UNSUPP),
        }
    }

    /// The file offset of `len` bytes at `sector`, if they are whole sectors inside the disk.
    fn byte_range(&self, sector: u64, len: u64) -> Result<u64, u8> {
        if len % SECTOR_SIZE != 0 {
            return Err(S_IOERR);
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(S_IOERR)?;
        let end = offset.checked_add(len).ok_or(S_IOERR)?;
        if end > self.image.sectors * SECTOR_SIZE {
            return Err(S_IOERR);
        }
        Ok(offset)
    }

    fn read(&self, mem: &GuestMemoryMmap, data: &[Segment], sector: u64, len: u64) -> Outcome {
        let offset = self.byte_range(sector, len)?;
        let written = u32::try_from(len).map_err(|_| S_IOERR)?;
        let mut file = FileAt::new(&self.image.file, offset);
        for s in data {
            for slice in slices(mem, s, Permissions::Write)? {
                let mut slice = slice.map_err(|_| S_IOERR)?;
                file.read_exact_volatile(&mut slice).map_err(|_| S_IOERR)?;
            }
        }
        Ok(written)
    }

    fn write(&self, mem: &GuestMemoryMmap, data: &[Segment], sector: u64, len: u64) -> Outcome {
        if self.image.read_only {
            return Err(S_IOERR);
        }
        let offset = self.byte_range(sector, len)?;
        let mut file = FileAt::new(&self.image.file, offset);
        for s in data {
            for slice in slices(mem, s, Permissions::Read)? {
                let slice = slice.map_err(|_| S_IOERR)?;
                file.write_all_volatile(&slice).map_err(|_| S_IOERR)?;
            }
        }
        if self.write_through {
            self.flush()?;
        }
        Ok(0)
    }

    fn flush(&self) -> Outcome {
        if self.image.read_only {
            return Ok(0);
        }
        self.image.file.sync_data().map_err(|_| S_IOERR)?;
        Ok(0)
    }

    fn get_id(&self, mem: &GuestMemoryMmap, data: &[Segment]) -> Outcome {
        let n = write_stream(mem, data, &self.image.id).map_err(|_| S_IOERR)?;
        // At most 20.
        Ok(n as u32)
    }

    /// Discard (`zeroes` false) or write-zeroes: checks every segment, then frees or zeroes
    /// their ranges.
    fn unmap(&self, mem: &GuestMemoryMmap, data: &[Segment], len: u64, zeroes: bool) -> Outcome {
        if self.image.read_only {
            return Err(S_IOERR);
        }
        if !(if zeroes {
            self.write_zeroes
        } else {
            self.discard
        }) {
            return Err(S_UNSUPP);
        }
        let ranges = self.unmap_ranges(mem, data, len, zeroes)?;
        for (offset, bytes, unmap) in ranges {
            let done = if unmap {
                punch_hole(&self.image.file, offset, bytes)
            } else {
                zero_range(&self.image.file, offset, bytes)
            };
            done.map_err(|_| S_IOERR)?;
        }
        Ok(0)
    }

    /// Parses and checks the segments of a discard or write-zeroes request into
    /// `(offset, length, may deallocate)` byte ranges.
    fn unmap_ranges(
        &self,
        mem: &GuestMemoryMmap,
        data: &[Segment],
        len: u64,
        zeroes: bool,
    ) -> Result<Vec<(u64, u64, bool)>, u8> {
        let count = len / DISCARD_SEGMENT_LEN;
        if len % DISCARD_SEGMENT_LEN != 0 || count == 0 || count > u64::from(MAX_DISCARD_SEG) {
            return Err(S_IOERR);
        }
        let mut raw = vec![0u8; len as usize];
        read_stream(mem, data, &mut raw).map_err(|_| S_IOERR)?;
        raw.chunks_exact(DISCARD_SEGMENT_LEN as usize)
            .map(|seg| {
                let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
                let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
                // Discard takes no flags; write-zeroes only UNMAP.
                let allowed = if zeroes { WRITE_ZEROES_UNMAP } else { 0 };
                if flags & !allowed != 0 {
                    return Err(S_UNSUPP);
                }
                if sectors > MAX_DISCARD_SECTORS {
                    return Err(S_IOERR);
                }
                let bytes = u64::from(sectors) * SECTOR_SIZE;
                let offset = self.byte_range(sector, bytes)?;
                Ok((offset, bytes, !zeroes || flags & WRITE_ZEROES_UNMAP != 0))
            })
            .collect()
    }
}

fn read_header(mem: &GuestMemoryMmap, chain: &Chain) -> Result<Header, u8> {
    if chain.readable_len() < HEADER_LEN {
        return Err(S_IOERR);
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    read_stream(mem, &chain.readable, &mut raw).map_err(|_| S_IOERR)?;
    let [k0, k1, k2, k3, _, _, _, _, s @ ..] = raw;
    Ok(Header {
        kind: u32::from_le_bytes([k0, k1, k2, k3]),
        sector: u64::from_le_bytes(s),
    })
}

/// The host memory behind a guest buffer, as (possibly several) volatile slices.
fn slices<'a>(
    mem: &'a GuestMemoryMmap,
    s: &Segment,
    access: Permissions,
) -> Result<impl Iterator<Item = vm_memory::guest_memory::Result<VolatileSlice<'a, ()>>>, u8> {
    mem.get_slices(s.addr, s.len as usize, access)
        .map_err(|_| S_IOERR)
}

/// A file read or written with `pread`/`pwrite` from a moving offset, so that vm-memory's
/// volatile copy loops can move data straight between the file and guest memory.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl<'a> FileAt<'a> {
    fn new(file: &'a File, offset: u64) -> Self {
        Self { file, offset }
    }

    fn offset(&self) -> Result<libc::off64_t, VolatileMemoryError> {
        libc::off64_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::from(io::ErrorKind::InvalidInput)))
    }

    fn advance(&mut self, n: isize) -> Result<usize, VolatileMemoryError> {
        let n = usize::try_from(n)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::last_os_error()))?;
        self.offset += n as u64;
        Ok(n)
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the file descriptor is open for the borrow of `self.file`; the destination
        // is valid for writes of `buf.len()` bytes while `guard` lives (VolatileSlice's
        // invariant), and pread writes at most that many.
        let n = unsafe {
            libc::pread64(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        // A failed read may have written part of the buffer.
        buf.bitmap()
            .mark_dirty(0, usize::try_from(n).unwrap_or(buf.len()));
        self.advance(n)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard();
        // SAFETY: the file descriptor is open for the borrow of `self.file`; the source is
        // valid for reads of `buf.len()` bytes while `guard` lives (VolatileSlice's
        // invariant), and pwrite reads at most that many.
        let n = unsafe {
            libc::pwrite64(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        self.advance(n)
    }
}

/// Locks the whole image for as long as `file` stays open: shared for a read-only disk,
/// exclusive for a writable one, so that two VMs never write one image and none reads an
/// image another is writing. Open-file-description locks rather than `flock`, because QEMU
/// takes these (on a few bytes of the image) and a whole-file lock conflicts with them both
/// ways. A file system without lock support gets no lock, as with QEMU.
fn lock_image(file: &File, read_only: bool, path: &Path) -> Result<(), BlockError> {
    let kind = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    };
    let lock = whole_file_lock(kind);
    // SAFETY: F_OFD_SETLK reads the flock we pass and does not keep the pointer; the fd is
    // open for the duration of the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Err(BlockError::Locked {
            path: path.to_path_buf(),
            held: conflicting_lock(file, kind),
        }),
        Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::EINVAL) => Ok(()),
        _ => Err(BlockError::Lock {
            path: path.to_path_buf(),
            source: error,
        }),
    }
}

/// A `kind` lock (`F_RDLCK` or `F_WRLCK`) on the whole file: `l_start` and `l_len` 0 cover it
/// however it grows.
fn whole_file_lock(kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value, and the fields that matter are
    // set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock
}

/// Names the kind of lock that blocks a `kind` lock on the whole of `file`.
fn conflicting_lock(file: &File, kind: libc::c_int) -> &'static str {
    let mut probe = whole_file_lock(kind);
    // SAFETY: F_OFD_GETLK fills in the flock we pass and does not keep the pointer.
    let found = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) } == 0;
    match (found, i32::from(probe.l_type)) {
        (true, libc::F_RDLCK) => "read",
        (true, libc::F_WRLCK) => "write",
        _ => "conflicting",
    }
}

/// Deallocates `[offset, offset + len)` of `file`, keeping its size; reads return zeroes.
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Zeroes `[offset, offset + len)` of `file` keeping it allocated, where the file system can;
/// punches a hole otherwise (reads return zeroes either way).
fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let flags = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, flags, offset, len) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
            punch_hole(file, offset, len)
        }
        other => other,
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let invalid = |_| io::Error::from(io::ErrorKind::InvalidInput);
    let offset = libc::off64_t::try_from(offset).map_err(invalid)?;
    let len = libc::off64_t::try_from(len).map_err(invalid)?;
    // SAFETY: fallocate only reads its integer arguments; the descriptor is open for the
    // borrow of `file`.
    let rc = unsafe { libc::fallocate64(file.as_raw_fd(), mode, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests;
