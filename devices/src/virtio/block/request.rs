//! One virtio-blk request: the chain checked, the header parsed, the request served on the
//! image, and the status byte written (the checks are listed in the [module
//! documentation](super)).

use std::sync::Arc;

use std::io::Write;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::endian::{Le32, Le64};
use vm_memory::{
    ByteValued, Bytes, GuestMemory, GuestMemoryMmap, Permissions, ReadVolatile, VolatileSlice,
    WriteVolatile,
};

use super::backend::{punch_hole, zero_range, FileAt};
use super::{DiskImage, MAX_DESCRIPTORS, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE};
use crate::virtio::chain::{reader, sub_range, writer, Chain, ChainError, Segment};
use crate::virtio::worker::RequestHandler;

/// Size of the request header: type, reserved, sector.
const HEADER_LEN: u64 = 16;
/// Size of one discard/write-zeroes segment: sector, num_sectors, flags.
const DISCARD_SEGMENT_LEN: u64 = 16;

/// The request header (virtio 1.2, section 5.2.6): type, reserved, sector.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct RequestHeader {
    kind: Le32,
    reserved: Le32,
    sector: Le64,
}

// SAFETY: little-endian integers laid out without padding (4 + 4 + 8 bytes, each aligned);
// every bit pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// One discard or write-zeroes segment (virtio 1.2, section 5.2.6).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct DiscardSegment {
    sector: Le64,
    num_sectors: Le32,
    flags: Le32,
}

// SAFETY: little-endian integers laid out without padding (8 + 4 + 4 bytes, each aligned);
// every bit pattern is a valid value.
unsafe impl ByteValued for DiscardSegment {}

const _: () = assert!(std::mem::size_of::<RequestHeader>() as u64 == HEADER_LEN);
const _: () = assert!(std::mem::size_of::<DiscardSegment>() as u64 == DISCARD_SEGMENT_LEN);

/// The status byte for a virtio-bindings status value.
#[allow(clippy::cast_possible_truncation)] // asserted to fit, at compile time for the consts
const fn status_byte(status: u32) -> u8 {
    assert!(status <= 0xff);
    // Checked above: the value fits.
    status as u8
}

pub(super) const S_OK: u8 = status_byte(VIRTIO_BLK_S_OK);
pub(super) const S_IOERR: u8 = status_byte(VIRTIO_BLK_S_IOERR);
pub(super) const S_UNSUPP: u8 = status_byte(VIRTIO_BLK_S_UNSUPP);

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
pub(in crate::virtio) struct Disk {
    pub(super) image: Arc<DiskImage>,
    pub(super) write_through: bool,
    pub(super) discard: bool,
    pub(super) write_zeroes: bool,
}

/// A request's outcome: bytes written into the guest's data buffers, or an error status.
type Outcome = Result<u32, u8>;

impl Disk {
    /// Serves one request chain; returns the bytes written into it, status byte included.
    pub(in crate::virtio) fn serve(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, ChainError> {
        let walked = Chain::walk(chain.clone(), MAX_DESCRIPTORS)?;
        let status_at = walked.last_writable_byte(mem).ok_or(ChainError::NoStatus)?;
        let outcome = match walked.check_memory(mem) {
            Ok(()) => self.execute(mem, &walked, chain),
            Err(_) => Err(S_IOERR),
        };
        let (status, written) = match outcome {
            Ok(n) => (S_OK, n),
            Err(status) => (status, 0),
        };
        // Written at its checked address, not through a Writer: none can be built over a
        // chain with a buffer outside guest memory, and that request must still be answered.
        mem.write_obj(status, status_at)
            .map_err(|_| ChainError::Memory)?;
        Ok(written.saturating_add(1))
    }

    /// Serves a request whose buffers are all in guest memory: `walked` is `chain` as the
    /// walk saw it. Headers, get-id and discard segments go through virtio-queue's Reader and
    /// Writer; read and write data moves between the file and the walked segments without a
    /// copy.
    fn execute(
        &self,
        mem: &GuestMemoryMmap,
        walked: &Chain,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        let mut reader = reader(mem, chain.clone()).map_err(|_| S_IOERR)?;
        let header = read_header(walked, &mut reader)?;
        let (kind, sector) = (header.kind.to_native(), header.sector.to_native());
        // The data the driver sends (after the header) and the room it gives for data back
        // (before the status byte, which the caller found).
        let payload = walked.readable_len() - HEADER_LEN;
        let room = walked.writable_len() - 1;
        let data_out = || sub_range(&walked.readable, HEADER_LEN, payload).ok_or(S_IOERR);
        let data_in = || sub_range(&walked.writable, 0, room).ok_or(S_IOERR);
        match kind {
            VIRTIO_BLK_T_IN if payload == 0 => self.read(mem, &data_in()?, sector, room),
            VIRTIO_BLK_T_OUT if room == 0 => self.write(mem, &data_out()?, sector, payload),
            // Data in the wrong direction.
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => Err(S_IOERR),
            VIRTIO_BLK_T_FLUSH => self.flush(),
            VIRTIO_BLK_T_GET_ID => self.get_id(writer(mem, chain).map_err(|_| S_IOERR)?, room),
            VIRTIO_BLK_T_DISCARD => self.unmap(&mut reader, payload, false),
            VIRTIO_BLK_T_WRITE_ZEROES => self.unmap(&mut reader, payload, true),
            _ => Err(S_UNSUPP),
        }
    }

    /// The file offset of `len` bytes at `sector`, if they are whole sectors inside the disk.
    pub(super) fn byte_range(&self, sector: u64, len: u64) -> Result<u64, u8> {
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

    /// Writes the id into the first `room` bytes of the writable buffers (the status byte
    /// follows them).
    fn get_id(&self, mut data: Writer, room: u64) -> Outcome {
        let room = usize::try_from(room).map_err(|_| S_IOERR)?;
        // What follows `room` is the status byte's, not the id's.
        data.split_at(room).map_err(|_| S_IOERR)?;
        let n = data.write(&self.image.id).map_err(|_| S_IOERR)?;
        // At most 20 bytes.
        u32::try_from(n).map_err(|_| S_IOERR)
    }

    /// Discard (`zeroes` false) or write-zeroes: checks every segment, then frees or zeroes
    /// their ranges.
    fn unmap(&self, data: &mut Reader, len: u64, zeroes: bool) -> Outcome {
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
        let ranges = self.unmap_ranges(data, len, zeroes)?;
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
        data: &mut Reader,
        len: u64,
        zeroes: bool,
    ) -> Result<Vec<(u64, u64, bool)>, u8> {
        let count = len / DISCARD_SEGMENT_LEN;
        if len % DISCARD_SEGMENT_LEN != 0 || count == 0 || count > u64::from(MAX_DISCARD_SEG) {
            return Err(S_IOERR);
        }
        (0..count)
            .map(|_| {
                let seg: DiscardSegment = data.read_obj().map_err(|_| S_IOERR)?;
                let sector = seg.sector.to_native();
                let sectors = seg.num_sectors.to_native();
                let flags = seg.flags.to_native();
                // Discard takes no flags; write-zeroes only UNMAP.
                let allowed = if zeroes {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                if flags & !allowed != 0 {
                    return Err(S_UNSUPP);
                }
                if sectors > MAX_DISCARD_SECTORS {
                    return Err(S_IOERR);
                }
                let bytes = u64::from(sectors) * SECTOR_SIZE;
                let offset = self.byte_range(sector, bytes)?;
                Ok((
                    offset,
                    bytes,
                    !zeroes || flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                ))
            })
            .collect()
    }
}

/// Reads the header from the start of the readable buffers, which the walk found to hold at
/// least one.
fn read_header(walked: &Chain, reader: &mut Reader) -> Result<RequestHeader, u8> {
    if walked.readable_len() < HEADER_LEN {
        return Err(S_IOERR);
    }
    reader.read_obj().map_err(|_| S_IOERR)
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
