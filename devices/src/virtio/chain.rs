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
                len: (to - from) as u32,
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
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Writes `descs` at the start of the table, publishes the chain at 0 and takes it.
    fn publish<'a>(
        mem: &'a GuestMemoryMmap,
        descs: &[RawDescriptor],
    ) -> DescriptorChain<&'a GuestMemoryMmap> {
        let vq = MockSplitQueue::new(mem, 16);
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        next_chain(&mut q, mem).unwrap().unwrap()
    }

    /// Publishes `descs` and walks the chain.
    fn walk(
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        max: usize,
    ) -> Result<Chain, ChainError> {
        Chain::walk(publish(mem, descs), max)
    }

    #[test]
    fn writers_span_segments_and_stop_at_the_end() {
        use std::io::Write;
        let mem = memory();
        let two = [desc(0x1000, 3, NEXT | WRITE, 1), desc(0x2000, 5, WRITE, 0)];
        let mut w = writable_chain(&mem, publish(&mem, &two), 8).unwrap();
        assert_eq!(w.write(b"abcdefghij").unwrap(), 8);
        assert_eq!(w.write(b"k").unwrap(), 0);
        let mut buf = [0u8; 8];
        mem.read_slice(&mut buf[..3], GuestAddress(0x1000)).unwrap();
        mem.read_slice(&mut buf[3..], GuestAddress(0x2000)).unwrap();
        assert_eq!(&buf, b"abcdefgh");
    }

    #[test]
    fn readers_span_segments() {
        use std::io::Read;
        let mem = memory();
        mem.write_slice(b"abc", GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"defgh", GuestAddress(0x2000)).unwrap();
        let two = [desc(0x1000, 3, NEXT, 1), desc(0x2000, 5, 0, 0)];
        let mut r = readable_chain(&mem, publish(&mem, &two), 8).unwrap();
        assert_eq!(r.available_bytes(), 8);
        let mut buf = [0u8; 6];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"abcdef");
        assert!(r.read_exact(&mut [0u8; 3]).is_err());
    }

    #[test]
    fn one_way_chains_refuse_the_other_direction_broken_chains_and_bad_buffers() {
        let mem = memory();
        let both = [desc(0x1000, 16, NEXT, 1), desc(0x2000, 16, WRITE, 0)];
        let err = writable_chain(&mem, publish(&mem, &both), 8).err();
        assert_eq!(err, Some(ChainError::Order));
        let err = readable_chain(&mem, publish(&mem, &both), 8).err();
        assert_eq!(err, Some(ChainError::Order));
        let looped = [
            desc(0x1000, 16, NEXT | WRITE, 1),
            desc(0x2000, 16, NEXT | WRITE, 0),
        ];
        let err = writable_chain(&mem, publish(&mem, &looped), 64).err();
        assert_eq!(err, Some(ChainError::Unterminated));
        let outside = [desc(0xf_ff00, 0x200, WRITE, 0)];
        let err = writable_chain(&mem, publish(&mem, &outside), 8).err();
        assert!(
            matches!(err, Some(ChainError::OutOfMemory { .. })),
            "{err:?}"
        );
        let outside = [desc(0xf_ff00, 0x200, 0, 0)];
        let err = readable_chain(&mem, publish(&mem, &outside), 8).err();
        assert!(
            matches!(err, Some(ChainError::OutOfMemory { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn walks_a_well_formed_chain() {
        let mem = memory();
        let c = walk(
            &mem,
            &[
                desc(0x1000, 16, NEXT, 1),
                desc(0x2000, 512, NEXT | WRITE, 2),
                desc(0x3000, 1, WRITE, 0),
            ],
            8,
        )
        .unwrap();
        assert_eq!(c.readable_len(), 16);
        assert_eq!(c.writable_len(), 513);
        assert_eq!(c.check_memory(&mem), Ok(()));
        assert_eq!(c.last_writable_byte(&mem), Some(GuestAddress(0x3000)));
    }

    #[test]
    fn rejects_loops_dangling_next_long_chains_and_bad_order() {
        let mem = memory();
        let looped = [desc(0x1000, 16, NEXT, 1), desc(0x2000, 16, NEXT, 0)];
        assert_eq!(
            walk(&mem, &looped, 64).unwrap_err(),
            ChainError::Unterminated
        );
        let self_loop = [desc(0x1000, 16, NEXT, 0)];
        assert_eq!(
            walk(&mem, &self_loop, 64).unwrap_err(),
            ChainError::Unterminated
        );
        let dangling = [desc(0x1000, 16, NEXT, 100)];
        assert_eq!(
            walk(&mem, &dangling, 64).unwrap_err(),
            ChainError::Unterminated
        );
        let long = [
            desc(0x1000, 16, NEXT, 1),
            desc(0x1000, 16, NEXT, 2),
            desc(0x1000, 16, 0, 0),
        ];
        assert_eq!(walk(&mem, &long, 2).unwrap_err(), ChainError::TooLong(2));
        let order = [desc(0x1000, 16, NEXT | WRITE, 1), desc(0x2000, 16, 0, 0)];
        assert_eq!(walk(&mem, &order, 8).unwrap_err(), ChainError::Order);
    }

    #[test]
    fn rejects_bad_indirect_tables() {
        let mem = memory();
        // An indirect table outside guest memory yields nothing.
        let outside = [desc(0x10_0000_0000, 32, VRING_DESC_F_INDIRECT as u16, 0)];
        assert_eq!(walk(&mem, &outside, 8).unwrap_err(), ChainError::Empty);
        // A looping indirect table.
        mem.write_obj(desc(0x1000, 16, NEXT, 1), GuestAddress(0x8000))
            .unwrap();
        mem.write_obj(desc(0x1000, 16, NEXT, 0), GuestAddress(0x8010))
            .unwrap();
        let looped = [desc(0x8000, 32, VRING_DESC_F_INDIRECT as u16, 0)];
        assert_eq!(
            walk(&mem, &looped, 64).unwrap_err(),
            ChainError::Unterminated
        );
        // A good one.
        mem.write_obj(desc(0x1000, 16, 0, 0), GuestAddress(0x8010))
            .unwrap();
        let good = walk(&mem, &looped, 64).unwrap();
        assert_eq!(good.readable_len(), 32);
    }

    #[test]
    fn finds_buffers_outside_memory() {
        let mem = memory();
        let c = walk(
            &mem,
            &[desc(0xf_ff00, 0x200, NEXT, 1), desc(0x3000, 1, WRITE, 0)],
            8,
        )
        .unwrap();
        assert_eq!(
            c.check_memory(&mem),
            Err(ChainError::OutOfMemory {
                addr: 0xf_ff00,
                len: 0x200
            })
        );
        assert_eq!(c.last_writable_byte(&mem), Some(GuestAddress(0x3000)));
        let wraps = walk(&mem, &[desc(u64::MAX - 1, 16, WRITE, 0)], 8).unwrap();
        assert!(wraps.check_memory(&mem).is_err());
        assert_eq!(wraps.last_writable_byte(&mem), None);
    }

    #[test]
    fn streams_span_segments() {
        let mem = memory();
        let segs = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 5,
            },
        ];
        mem.write_slice(b"abc", GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"defgh", GuestAddress(0x2000)).unwrap();
        let mut buf = [0u8; 6];
        read_stream(&mem, &segs, &mut buf).unwrap();
        assert_eq!(&buf, b"abcdef");
        let mid = sub_range(&segs, 2, 4).unwrap();
        assert_eq!(
            mid,
            vec![
                Segment {
                    addr: GuestAddress(0x1002),
                    len: 1
                },
                Segment {
                    addr: GuestAddress(0x2000),
                    len: 3
                }
            ]
        );
        assert!(sub_range(&segs, 2, 7).is_none());
        assert!(sub_range(&segs, u64::MAX, 2).is_none());
        assert!(read_stream(&mem, &segs, &mut [0u8; 9]).is_err());
    }

    #[test]
    fn drains_every_chain_and_notifies() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [
            desc(0x1000, 16, 0, 0),
            desc(0x2000, 16, 0, 0),
            desc(0x3000, 16, WRITE, 0),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let irq = Interrupt::new().unwrap();
        let mut seen = Vec::new();
        drain_queue(&mut q, &mem, &irq, |chain| {
            seen.push(chain.head_index());
            Ok(7)
        })
        .unwrap();
        assert_eq!(seen, [0, 1, 2]);
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(vq.used().ring().ref_at(2).unwrap().load().len(), 7);
        assert_eq!(irq.event().read().unwrap(), 1);
    }

    #[test]
    fn corrupt_avail_index_is_an_error_not_a_spin() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        vq.avail().idx().store(100);
        let irq = Interrupt::new().unwrap();
        let result = drain_queue(&mut q, &mem, &irq, |_| Ok(0));
        assert_eq!(result, Err(ChainError::Ring));
    }
}
