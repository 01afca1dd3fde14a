//! Descriptor-chain tests: hostile rings built with virtio-queue's mock queue.

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
fn walk(mem: &GuestMemoryMmap, descs: &[RawDescriptor], max: usize) -> Result<Chain, ChainError> {
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
