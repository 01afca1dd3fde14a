//! Checked access to the guest's descriptor chains, and the standard queue loop.
//!
//! Everything here treats the guest as hostile. A chain is walked once, into a list of
//! [`Segment`]s, and judged: a loop, a dangling `next`, an unreadable descriptor table, a chain
//! longer than the device allows, or device-readable buffers after device-writable ones make it
//! *broken* (the device must then be reset). Whether each buffer lies in guest memory is a
//! separate check, so a device can still answer a request with bad buffers through a good
//! status byte. Devices then read and write the chain through virtio-queue's [`Reader`] and
//! [`Writer`] (two flat byte streams, whatever way the driver split them into descriptors),
//! built only once the walk and the memory check have passed; the segments stay for what must
//! outlive the borrow of guest memory (a transmit chain resumed later) and for virtio-blk's
//! zero-copy data path.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions};

use super::Interrupt;

/// Errors in a descriptor chain or a queue.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The chain has no descriptor (bad head index, or an empty indirect table).
    #[error("empty descriptor chain")]
    Empty,
    /// The chain does not end: a loop, a `next` out of range, or an unreadable descriptor.
    #[error("descriptor chain does not terminate")]
    Unterminated,
    /// More descriptors than the device accepts in one request.
    #[error("descriptor chain longer than {0}")]
    TooLong(usize),
    /// A device-readable descriptor after a device-writable one.
    #[error("readable descriptor after a writable one")]
    Order,
    /// The total length of the chain's buffers overflows.
    #[error("descriptor chain length overflows")]
    Overflow,
    /// A buffer outside guest memory.
    #[error("buffer at {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    /// The request has no device-writable byte in guest memory to report its status in.
    #[error("request has no status byte")]
    NoStatus,
    /// Guest memory could not be accessed although it was checked.
    #[error("guest memory access failed")]
    Memory,
    /// The driver published more new chains than the queue holds, or the rings are unreadable.
    #[error("virtqueue rings are corrupt")]
    Ring,
}

/// One guest buffer: `len` bytes at `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A walked descriptor chain: its readable and writable buffers.
#[derive(Debug, Default)]
pub struct Chain {
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
}

impl Chain {
    /// Walks `chain`, accepting at most `max_descriptors` descriptors.
    ///
    /// virtio-queue's iterator stops silently at a loop (it gives up after queue-size steps),
    /// a `next` out of range, or an unreadable descriptor; in each case the last descriptor it
    /// yielded still has `NEXT` set, which is how such chains are recognised here.
    pub fn walk<M>(chain: DescriptorChain<M>, max_descriptors: usize) -> Result<Self, ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut walked = Chain::default();
        let mut last: Option<Descriptor> = None;
        for (count, desc) in chain.enumerate() {
            if count >= max_descriptors {
                return Err(ChainError::TooLong(max_descriptors));
            }
            walked.push(&desc)?;
            last = Some(desc);
        }
        match last {
            None => Err(ChainError::Empty),
            Some(desc) if desc.has_next() => Err(ChainError::Unterminated),
            Some(_) => Ok(walked),
        }
    }

    fn push(&mut self, desc: &Descriptor) -> Result<(), ChainError> {
        let segment = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() {
            self.writable.push(segment);
        } else if self.writable.is_empty() {
            self.readable.push(segment);
        } else {
            return Err(ChainError::Order);
        }
        // Keeps every later length sum in range.
        total_len(&self.readable)
            .checked_add(total_len(&self.writable))
            .map(drop)
            .ok_or(ChainError::Overflow)
    }

    /// Total bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        total_len(&self.readable)
    }

    /// Total bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        total_len(&self.writable)
    }

    /// Checks that every buffer lies entirely in guest memory.
    pub fn check_memory(&self, mem: &GuestMemoryMmap) -> Result<(), ChainError> {
        let all = self
            .readable
            .iter()
            .zip(std::iter::repeat(Permissions::Read));
        let all = all.chain(
            self.writable
                .iter()
                .zip(std::iter::repeat(Permissions::Write)),
        );
        for (segment, access) in all {
            if !segment_in_memory(mem, segment, access) {
                return Err(ChainError::OutOfMemory {
                    addr: segment.addr.0,
                    len: segment.len,
                });
            }
        }
        Ok(())
    }

    /// The address of the last writable byte, if there is one and it lies in guest memory:
    /// where virtio-blk puts its status byte.
    pub fn last_writable_byte(&self, mem: &GuestMemoryMmap) -> Option<GuestAddress> {
        let last = self.writable.iter().rev().find(|s| s.len > 0)?;
        let addr = last.addr.0.checked_add(u64::from(last.len) - 1)?;
        mem.check_range(GuestAddress(addr), 1, Permissions::Write)
            .then_some(GuestAddress(addr))
    }
}

fn total_len(segments: &[Segment]) -> u64 {
    // At most 2^16 descriptors of at most 2^32 bytes each: no u64 overflow.
    segments.iter().map(|s| u64::from(s.len)).sum()
}

fn segment_in_memory(mem: &GuestMemoryMmap, segment: &Segment, access: Permissions) -> bool {
    segment.len == 0
        || (segment.addr.0.checked_add(u64::from(segment.len)).is_some()
            && mem.check_range(segment.addr, segment.len as usize, access))
}

/// The part `[offset, offset + len)` of the byte stream formed by `segments`, as segments.
///
/// Returns `None` when the stream is shorter than `offset + len`.
pub fn sub_range(segments: &[Segment], offset: u64, len: u64) -> Option<Vec<Segment>> {
    let end = offset.checked_add(len)?;
    let mut out = Vec::new();
    let mut pos = 0u64;
    for s in segments {
        let s_end = pos + u64::from(s.len);
        let from = offset.max(pos);
        let to = end.min(s_end);
        if from < to {
            out.push(Segment {
                addr: GuestAddress(s.addr.0.checked_add(from - pos)?),
                // `to - from` is at most `s.len`, a u32.
                len: u32::try_from(to - from).ok()?,
            });
        }
        pos = s_end;
    }
    (pos >= end).then_some(out)
}

/// Reads `buf.len()` bytes from the start of the byte stream formed by `segments`.
pub fn read_stream(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    buf: &mut [u8],
) -> Result<(), GuestMemoryError> {
    let parts =
        sub_range(segments, 0, buf.len() as u64).ok_or(GuestMemoryError::PartialBuffer {
            expected: buf.len(),
            completed: 0,
        })?;
    let mut done = 0;
    for part in parts {
        let n = part.len as usize;
        mem.read_slice(&mut buf[done..done + n], part.addr)?;
        done += n;
    }
    Ok(())
}

/// The readable part of a chain that passed the walk and the memory check, as a [`Reader`].
///
/// The crate reads the descriptor table again, so a driver that changes it after the walk
/// gets what it wrote; every access is still bounded by guest memory.
pub fn reader<'a>(
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<&'a GuestMemoryMmap>,
) -> Result<Reader<'a>, ChainError> {
    Reader::new(mem, chain).map_err(|_| ChainError::Memory)
}

/// The writable part of a chain that passed the walk and the memory check, as a [`Writer`]
/// (see [`reader`]).
pub fn writer<'a>(
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<&'a GuestMemoryMmap>,
) -> Result<Writer<'a>, ChainError> {
    Writer::new(mem, chain).map_err(|_| ChainError::Memory)
}

/// Walks a chain the driver offers for the device to fill (receive queues, entropy), checks
/// its buffers, and returns a [`Writer`] over them. Readable buffers in it break the queue.
/// How many bytes a device wrote into a chain, as the used ring holds it: a chain's buffers
/// total at most `u32::MAX` (a longer chain is refused as [`ChainError::Overflow`]).
pub fn used_len(written: usize) -> Result<u32, ChainError> {
    u32::try_from(written).map_err(|_| ChainError::Overflow)
}

pub fn writable_chain<'a>(
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<&'a GuestMemoryMmap>,
    max_descriptors: usize,
) -> Result<Writer<'a>, ChainError> {
    check_one_way(mem, chain.clone(), max_descriptors, true)?;
    writer(mem, chain)
}

/// Walks a chain the driver sends to the device (control messages), checks its buffers, and
/// returns a [`Reader`] over them. Writable buffers in it break the queue.
pub fn readable_chain<'a>(
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<&'a GuestMemoryMmap>,
    max_descriptors: usize,
) -> Result<Reader<'a>, ChainError> {
    check_one_way(mem, chain.clone(), max_descriptors, false)?;
    reader(mem, chain)
}

/// Walks `chain` and checks its buffers, which must all be device-writable (`writable`) or
/// all device-readable.
fn check_one_way(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    max_descriptors: usize,
    writable: bool,
) -> Result<(), ChainError> {
    let walked = Chain::walk(chain, max_descriptors)?;
    walked.check_memory(mem)?;
    let wrong_way = if writable {
        &walked.readable
    } else {
        &walked.writable
    };
    if !wrong_way.is_empty() {
        // The queue carries buffers one way only.
        return Err(ChainError::Order);
    }
    Ok(())
}

/// Runs the standard virtqueue loop on `queue`: take every available chain, hand it to
/// `handle` (which returns the number of bytes it wrote into the chain), put it on the used
/// ring, and notify the driver if it asked for it. Notifications stay disabled while
/// draining and are re-enabled at the end, with a re-check for chains that raced in.
///
/// An `Err` from `handle`, or corrupt rings, stops the loop with that error; the caller must
/// then mark the device as needing reset. Chains used before the error are still notified.
pub fn drain_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    mut handle: F,
) -> Result<(), ChainError>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> Result<u32, ChainError>,
{
    let mut used_any = false;
    let result = drain_loop(queue, mem, &mut handle, &mut used_any);
    if used_any {
        notify_used(queue, mem, interrupt);
    }
    result
}

fn drain_loop<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    handle: &mut F,
    used_any: &mut bool,
) -> Result<(), ChainError>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> Result<u32, ChainError>,
{
    loop {
        queue
            .disable_notification(mem)
            .map_err(|_| ChainError::Ring)?;
        while let Some(chain) = next_chain(queue, mem)? {
            let head = chain.head_index();
            let written = handle(chain)?;
            queue
                .add_used(mem, head, written)
                .map_err(|_| ChainError::Ring)?;
            *used_any = true;
        }
        if !queue
            .enable_notification(mem)
            .map_err(|_| ChainError::Ring)?
        {
            return Ok(());
        }
    }
}

/// The next available chain. Unlike `pop_descriptor_chain`, a corrupt available index is an
/// error rather than "nothing to do": `enable_notification` would keep reporting work and the
/// loop would never end.
pub fn next_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, ChainError> {
    let mut iter = queue.iter(mem).map_err(|_| ChainError::Ring)?;
    Ok(iter.next())
}

/// The next available chain for a device that fills buffers as it has data: when the ring is
/// empty, asks the driver for a kick when it adds one and looks again, in case it just did (so
/// no buffer added in between goes unnoticed). `None` means "wait for the kick".
pub fn next_chain_or_rearm<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, ChainError> {
    loop {
        if let Some(chain) = next_chain(queue, mem)? {
            return Ok(Some(chain));
        }
        if !queue
            .enable_notification(mem)
            .map_err(|_| ChainError::Ring)?
        {
            return Ok(None);
        }
    }
}

/// Raises the used-buffer interrupt if the driver wants it (always, without EVENT_IDX).
pub fn notify_used(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    // On a ring read error, notify anyway: a spurious interrupt is harmless, a lost one hangs
    // the driver.
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used();
    }
}

#[cfg(test)]
mod tests;
