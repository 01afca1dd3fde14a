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
//!
//! The pieces: this module is the device model (features, configuration space, activation);
//! [`request`] parses and serves one request chain; [`backend`] moves data between the image
//! file and guest memory and frees or zeroes its ranges; [`lock`] keeps other processes off
//! the image while the VM runs.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use vm_memory::endian::{Le16, Le32, Le64};
use vm_memory::ByteValued;

use crate::host_file::{open_input, InputKind};

use super::worker::SingleQueueWorker;
use super::{
    device_type, features, read_config_bytes, ActivateError, Activation, DeviceWorker, VirtioDevice,
};

mod backend;
mod lock;
mod request;

use backend::punch_hole;
use lock::lock_image;
pub(super) use request::Disk;

/// Sector size of the virtio-blk protocol (always 512, whatever `blk_size` says).
pub const SECTOR_SIZE: u64 = 512;
/// The block size the config space offers: one sector.
const BLK_SIZE: u32 = 512;
const _: () = assert!(BLK_SIZE as u64 == SECTOR_SIZE);
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
/// Length of the get-id answer.
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// The feature bit for a virtio-bindings feature number.
const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// The configuration space (virtio 1.2, section 5.2.4) up to the write-zeroes fields, as the
/// driver reads it: little-endian, packed, 60 bytes.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, packed)]
struct VirtioBlockConfig {
    capacity: Le64,
    size_max: Le32,
    seg_max: Le32,
    /// cylinders (le16), heads, sectors: unused, no geometry is offered.
    geometry: [u8; 4],
    blk_size: Le32,
    /// physical_block_exp, alignment_offset, min_io_size (le16), opt_io_size (le32): unused.
    topology: [u8; 8],
    writeback: u8,
    unused0: u8,
    num_queues: Le16,
    max_discard_sectors: Le32,
    max_discard_seg: Le32,
    discard_sector_alignment: Le32,
    max_write_zeroes_sectors: Le32,
    max_write_zeroes_seg: Le32,
    write_zeroes_may_unmap: u8,
    unused1: [u8; 3],
}

const _: () = assert!(std::mem::size_of::<VirtioBlockConfig>() == 60);

// SAFETY: a packed struct of little-endian integers and byte arrays: no padding, and every bit
// pattern is a valid value.
unsafe impl ByteValued for VirtioBlockConfig {}

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
            write_through: features & bit(VIRTIO_BLK_F_FLUSH) == 0,
            discard: features & bit(VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: features & bit(VIRTIO_BLK_F_WRITE_ZEROES) != 0,
        }
    }

    fn config(&self) -> VirtioBlockConfig {
        let mut config = VirtioBlockConfig {
            capacity: self.image.sectors.into(),
            seg_max: SEG_MAX.into(),
            blk_size: BLK_SIZE.into(),
            num_queues: 1.into(),
            ..Default::default()
        };
        if self.image.can_punch {
            config.max_discard_sectors = MAX_DISCARD_SECTORS.into();
            config.max_discard_seg = MAX_DISCARD_SEG.into();
            config.discard_sector_alignment = 1.into();
            config.max_write_zeroes_sectors = MAX_DISCARD_SECTORS.into();
            config.max_write_zeroes_seg = MAX_DISCARD_SEG.into();
            config.write_zeroes_may_unmap = 1;
        }
        config
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
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH);
        if self.image.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        }
        if self.image.can_punch {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config().as_slice(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<DeviceWorker, ActivateError> {
        let disk = self.disk(a.features);
        Ok(Box::new(SingleQueueWorker::new(disk, a)?))
    }
}

#[cfg(test)]
mod tests;
