//! Helpers shared by the fuzz targets: a small guest memory and a split virtqueue laid out in
//! it from fuzzer-chosen descriptors and ring entries.

use arbitrary::Arbitrary;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM of the virtio targets: 1 MiB from address 0.
pub const MEM_SIZE: u64 = 1 << 20;
/// The descriptor table (up to 256 entries of 16 bytes).
pub const DESC_TABLE: u64 = 0x0;
/// The available ring.
pub const AVAIL_RING: u64 = 0x1000;
/// The used ring.
pub const USED_RING: u64 = 0x2000;
/// Where indirect descriptor tables go.
pub const INDIRECT: u64 = 0x3000;
/// The start of the data area that most buffers point into.
pub const DATA: u64 = 0x4000;

/// Descriptor flags (virtio 1.2, 2.7.5).
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// A guest memory of [`MEM_SIZE`] bytes.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("1 MiB of anonymous memory")
}

/// A buffer address, mostly in the data area, sometimes at the edge of memory or anywhere.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Addr {
    Data(u16),
    Indirect(u8),
    EndOfMemory(u8),
    Raw(u64),
}

impl Addr {
    pub fn get(self) -> u64 {
        match self {
            Addr::Data(off) => DATA + u64::from(off),
            Addr::Indirect(i) => INDIRECT + 16 * u64::from(i % 64),
            Addr::EndOfMemory(back) => MEM_SIZE - u64::from(back),
            Addr::Raw(a) => a,
        }
    }
}

/// A buffer length: mostly small, sometimes anything.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Len {
    Small(u8),
    Sectors(u8),
    Mid(u16),
    Raw(u32),
}

impl Len {
    pub fn get(self) -> u32 {
        match self {
            Len::Small(n) => u32::from(n),
            Len::Sectors(n) => 512 * u32::from(n % 16),
            Len::Mid(n) => u32::from(n),
            Len::Raw(n) => n,
        }
    }
}

/// One descriptor as the fuzzer writes it.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Desc {
    pub addr: Addr,
    pub len: Len,
    /// NEXT, WRITE and INDIRECT in the low three bits; any other bits too when the fourth is set.
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    fn raw(self) -> [u8; 16] {
        let flags = if self.flags & 8 != 0 {
            self.flags
        } else {
            self.flags & (F_NEXT | F_WRITE | F_INDIRECT)
        };
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&self.addr.get().to_le_bytes());
        d[8..12].copy_from_slice(&self.len.get().to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&self.next.to_le_bytes());
        d
    }
}

/// A split virtqueue and the memory around it, as the fuzzer sets them up.
#[derive(Arbitrary, Debug)]
pub struct Ring {
    /// The queue size is `1 << (size_log2 % 9)`: 1 to 256.
    pub size_log2: u8,
    /// The descriptor table from index 0.
    pub descs: Vec<Desc>,
    /// Descriptors at [`INDIRECT`], for indirect tables.
    pub indirect: Vec<Desc>,
    /// The available ring's entries (head indices).
    pub avail: Vec<u16>,
    /// The available index; `None` publishes exactly `avail`.
    pub avail_idx: Option<u16>,
    pub event_idx: bool,
    /// Bytes written into the data area at these offsets (request headers, payloads).
    pub writes: Vec<(u16, Vec<u8>)>,
}

impl Ring {
    /// The queue size.
    pub fn size(&self) -> u16 {
        1 << (self.size_log2 % 9)
    }

    /// Writes the rings into `mem` and returns a ready queue over them.
    pub fn install(&self, mem: &GuestMemoryMmap) -> Queue {
        let size = self.size();
        for (i, d) in self.descs.iter().take(usize::from(size)).enumerate() {
            mem.write_slice(&d.raw(), GuestAddress(DESC_TABLE + 16 * i as u64))
                .expect("descriptor table in memory");
        }
        for (i, d) in self.indirect.iter().take(64).enumerate() {
            mem.write_slice(&d.raw(), GuestAddress(INDIRECT + 16 * i as u64))
                .expect("indirect table in memory");
        }
        for (offset, bytes) in &self.writes {
            let at = DATA + u64::from(*offset);
            let room = (MEM_SIZE - at) as usize;
            mem.write_slice(&bytes[..bytes.len().min(room)], GuestAddress(at))
                .expect("data in memory");
        }
        let entries = &self.avail[..self.avail.len().min(usize::from(size))];
        for (i, head) in entries.iter().enumerate() {
            mem.write_obj(*head, GuestAddress(AVAIL_RING + 4 + 2 * i as u64))
                .expect("avail ring in memory");
        }
        let idx = self.avail_idx.unwrap_or(entries.len() as u16);
        mem.write_obj(idx, GuestAddress(AVAIL_RING + 2))
            .expect("avail ring in memory");

        let mut queue = Queue::new(256).expect("a valid maximum size");
        queue.try_set_size(size).expect("a power of two up to 256");
        queue
            .try_set_desc_table_address(GuestAddress(DESC_TABLE))
            .expect("aligned");
        queue
            .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
            .expect("aligned");
        queue
            .try_set_used_ring_address(GuestAddress(USED_RING))
            .expect("aligned");
        queue.set_event_idx(self.event_idx);
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        queue
    }
}

/// A file in a RAM-backed directory (`/dev/shm` when there is one) filled with `len` bytes of
/// a pattern; the caller may unlink it once it has opened it.
pub fn scratch_file(name: &str, len: usize) -> std::path::PathBuf {
    let dir = std::path::Path::new("/dev/shm");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("kvmbuild-fuzz-{}-{name}", std::process::id()));
    let data: Vec<u8> = (0..len).map(|i| (i / 512) as u8).collect();
    std::fs::write(&path, data).expect("a scratch file");
    path
}
