//! virtio-blk through the device model against the same I/O done directly: 4 KiB random
//! reads and writes and 1 MiB sequential ones, each request a three-descriptor chain (header,
//! data, status) taken off a split queue and served synchronously, as the device thread does;
//! and the cost of one request that touches no data (GET_ID), the queue work alone.
//!
//! The driver negotiates VIRTIO_BLK_F_FLUSH, as Linux does.
//!
//! `cargo bench -p kvmbuild-devices --bench block`. The image is a 64 MiB file in /var/tmp
//! (page cache, so both sides measure the copy path rather than the disk).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use devices::virtio::fuzzing::{next_chain, serve_block_request};
use devices::virtio::Block;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const IMAGE_SIZE: u64 = 64 << 20;
const QUEUE_SIZE: u16 = 256;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const HEADER: u64 = 0x3000;
const STATUS: u64 = 0x3100;
const DATA: u64 = 0x10_0000;
const MEM_SIZE: usize = 4 << 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_GET_ID: u32 = 8;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const GET_ID_LEN: u32 = 20;
/// VIRTIO_BLK_F_FLUSH, as Linux negotiates it: writes go to the page cache (write-back), as
/// raw pwrite does. Without it the device must write through (fdatasync every write).
const F_FLUSH: u64 = 1 << 9;

/// A guest with one queue and one request chain (descriptors 0, 1, 2) that each iteration
/// re-posts with a new header.
struct Ring {
    mem: GuestMemoryMmap,
    queue: Queue,
    posted: u16,
}

impl Ring {
    fn new() -> Ring {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(DESC_TABLE))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(USED_RING))
            .unwrap();
        queue.set_ready(true);
        Ring {
            mem,
            queue,
            posted: 0,
        }
    }

    fn descriptor(&self, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC_TABLE + 16 * index;
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Posts a request of `kind` at `sector` with `len` data bytes.
    fn post(&mut self, kind: u32, sector: u64, len: u32) {
        self.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        self.mem
            .write_obj(sector, GuestAddress(HEADER + 8))
            .unwrap();
        let data_flags = if kind == T_OUT { 0 } else { F_WRITE };
        self.descriptor(0, HEADER, 16, F_NEXT, 1);
        self.descriptor(1, DATA, len, data_flags | F_NEXT, 2);
        self.descriptor(2, STATUS, 1, F_WRITE, 0);
        let slot = u64::from(self.posted % QUEUE_SIZE);
        self.mem
            .write_obj(0u16, GuestAddress(AVAIL_RING + 4 + 2 * slot))
            .unwrap();
        self.posted = self.posted.wrapping_add(1);
        self.mem
            .write_obj(self.posted, GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    /// Takes the request off the queue, serves it and puts it on the used ring.
    fn serve(&mut self, block: &Block) {
        let chain = next_chain(&mut self.queue, &self.mem).unwrap().unwrap();
        let head = chain.head_index();
        let written = serve_block_request(block, F_FLUSH, &self.mem, chain).unwrap();
        self.queue.add_used(&self.mem, head, written).unwrap();
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(status, 0, "request failed");
    }
}

fn image() -> (PathBuf, File) {
    let path = std::env::temp_dir().join(format!("kvmbuild-bench-{}.img", std::process::id()));
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for offset in (0..IMAGE_SIZE).step_by(chunk.len()) {
        file.write_all_at(&chunk, offset).unwrap();
    }
    (path, file)
}

/// A small xorshift: the same "random" offsets on both sides, without a dependency.
struct Offsets(u64);

impl Offsets {
    fn next_4k(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % (IMAGE_SIZE / 4096)) * 4096
    }
}

fn throughput(c: &mut Criterion) {
    let (path, raw) = image();
    let block = Block::new(&path, false).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for (name, len, random) in [
        ("4k_random", 4096u32, true),
        ("1m_sequential", 1 << 20, false),
    ] {
        let mut group = c.benchmark_group(format!("blk_{name}"));
        group.throughput(Throughput::Bytes(u64::from(len)));
        for (op, kind) in [("read", T_IN), ("write", T_OUT)] {
            let mut offsets = Offsets(0x9e37_79b9_7f4a_7c15);
            let mut sequential = 0u64;
            let mut next = move || {
                if random {
                    offsets.next_4k()
                } else {
                    sequential = (sequential + u64::from(len)) % IMAGE_SIZE;
                    sequential
                }
            };
            let mut ring = Ring::new();
            group.bench_function(format!("device_{op}"), |b| {
                b.iter(|| {
                    ring.post(kind, next() / 512, len);
                    ring.serve(&block);
                })
            });
            let data = &mut buf[..len as usize];
            group.bench_function(format!("raw_p{op}"), |b| {
                b.iter(|| {
                    let at = next();
                    let done = match kind {
                        T_IN => raw.read_at(data, at).unwrap(),
                        _ => raw.write_at(data, at).unwrap(),
                    };
                    assert_eq!(done, data.len());
                })
            });
        }
        group.finish();
    }
    std::fs::remove_file(path).unwrap();
}

fn per_request(c: &mut Criterion) {
    let (path, _raw) = image();
    let block = Block::new(&path, false).unwrap().with_id("bench");
    let mut ring = Ring::new();
    c.bench_function("blk_queue_get_id_request", |b| {
        b.iter_batched(
            || (),
            |()| {
                ring.post(T_GET_ID, 0, GET_ID_LEN);
                ring.serve(&block);
            },
            BatchSize::SmallInput,
        )
    });
    std::fs::remove_file(path).unwrap();
}

criterion_group!(benches, throughput, per_request);
criterion_main!(benches);
