//! A test driver: plays the guest's virtio driver against a transport, through the same
//! register reads and writes and the same rings a real guest would use.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::{
    MmioTransport, DRIVER_FEATURES, DRIVER_FEATURES_SEL, QUEUE_AVAIL_LOW, QUEUE_DESC_LOW,
    QUEUE_NOTIFY_OFFSET, QUEUE_NUM, QUEUE_READY, QUEUE_SEL, QUEUE_USED_LOW, STATUS,
};
use super::state::TransportState;
use super::thread::DeviceThread;
use super::{status, MmioError, MmioTransport as Transport, VirtioDevice};
use crate::bus::BusDevice;

/// Guest memory size in tests.
pub const MEM_SIZE: u64 = 16 << 20;
/// Where queue 0's rings live; queue `i` is at `QUEUE_AREA + i * QUEUE_STRIDE`.
pub const QUEUE_AREA: u64 = 0x1_0000;
const QUEUE_STRIDE: u64 = 0x1_0000;
const AVAIL_OFFSET: u64 = 0x4000;
const USED_OFFSET: u64 = 0x8000;
/// An output whose bytes a test reads back (a console's host side).
#[derive(Clone, Default)]
pub struct Sink(std::sync::Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    /// Everything written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }

    /// Everything written once there are at least `len` bytes, or after 5 s.
    pub fn wait_len(&self, len: usize) -> Vec<u8> {
        let start = Instant::now();
        while self.0.lock().unwrap().len() < len && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.bytes()
    }
}

/// Start of the area tests use for data buffers.
pub const DATA: u64 = 0x10_0000;

/// A descriptor flag: the device writes this buffer.
pub const W: bool = true;
/// A descriptor flag: the device reads this buffer.
pub const R: bool = false;

#[derive(Default, Clone, Copy)]
struct DriverQueue {
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

/// Plays the guest driver of one device.
pub struct Driver {
    pub mem: GuestMemoryMmap,
    transport: Mutex<MmioTransport>,
    queues: Mutex<Vec<DriverQueue>>,
    // Dropped after the transport, which removes its worker from it.
    _thread: Option<DeviceThread>,
}

impl Driver {
    /// A driver for `device` on its own device thread.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let thread = DeviceThread::start().unwrap();
        let mut d = Self::with_thread(device, &thread);
        d._thread = Some(thread);
        d
    }

    /// A driver for `device` on `thread`.
    pub fn with_thread(device: Box<dyn VirtioDevice>, thread: &DeviceThread) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let transport = MmioTransport::new(device, mem.clone(), thread.handle()).unwrap();
        Self {
            mem,
            transport: Mutex::new(transport),
            queues: Mutex::new(Vec::new()),
            _thread: None,
        }
    }

    /// The transport's state, saved as the VMM saves it for a snapshot: the running worker's
    /// on its frozen device thread.
    pub fn save(&self) -> TransportState {
        let thread = self
            ._thread
            .as_ref()
            .expect("a driver with a thread of its own");
        self.with(|t| {
            let running = t.worker().map(|id| {
                let (mut saved, _frozen) = thread.handle().freeze(vec![id]).unwrap();
                saved.remove(0).unwrap()
            });
            t.save_registers(running)
        })
    }

    /// The same guest restored from `state` onto `device`: this transport and its device
    /// thread end, and a new pair takes over the same memory, which holds what it held at
    /// the save, as a restored snapshot's does.
    pub fn restore(
        self,
        device: Box<dyn VirtioDevice>,
        state: &TransportState,
    ) -> Result<Self, MmioError> {
        let Driver {
            mem,
            transport,
            queues,
            _thread,
        } = self;
        drop(transport);
        drop(_thread);
        let thread = DeviceThread::start().unwrap();
        let mut transport = Transport::new(device, mem.clone(), thread.handle()).unwrap();
        transport.restore(state)?;
        Ok(Self {
            mem,
            transport: Mutex::new(transport),
            queues,
            _thread: Some(thread),
        })
    }

    /// Runs `f` on the transport.
    pub fn with<T>(&self, f: impl FnOnce(&mut MmioTransport) -> T) -> T {
        f(&mut self.transport.lock().unwrap())
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        self.with(|t| t.read(offset, data));
    }

    pub fn write(&self, offset: u64, data: &[u8]) {
        self.with(|t| t.write(offset, data));
    }

    pub fn read32(&self, offset: u64) -> u32 {
        let mut word = [0u8; 4];
        self.read(offset, &mut word);
        u32::from_le_bytes(word)
    }

    pub fn write32(&self, offset: u64, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }

    pub fn is_active(&self) -> bool {
        self.with(|t| t.is_active())
    }

    fn add_status(&self, bit: u32) {
        let s = self.read32(STATUS);
        self.write32(STATUS, s | bit);
    }

    /// ACKNOWLEDGE, DRIVER, the driver features, FEATURES_OK; returns whether the device
    /// accepted the features.
    pub fn negotiate(&self, features: u64) -> bool {
        self.add_status(status::ACKNOWLEDGE);
        self.add_status(status::DRIVER);
        self.write32(DRIVER_FEATURES_SEL, 0);
        self.write32(DRIVER_FEATURES, features as u32);
        self.write32(DRIVER_FEATURES_SEL, 1);
        self.write32(DRIVER_FEATURES, (features >> 32) as u32);
        self.add_status(status::FEATURES_OK);
        self.read32(STATUS) & status::FEATURES_OK != 0
    }

    /// Programs queue `i` with `sizes[i]` entries at the test layout, and marks it ready.
    pub fn setup_queues(&self, sizes: &[u16]) {
        let mut queues = self.queues.lock().unwrap();
        queues.clear();
        for (i, &size) in (0u32..).zip(sizes) {
            let base = QUEUE_AREA + u64::from(i) * QUEUE_STRIDE;
            self.write32(QUEUE_SEL, i);
            self.write32(QUEUE_NUM, u32::from(size));
            for (reg, addr) in [
                (QUEUE_DESC_LOW, base),
                (QUEUE_AVAIL_LOW, base + AVAIL_OFFSET),
                (QUEUE_USED_LOW, base + USED_OFFSET),
            ] {
                self.write32(reg, addr as u32);
                self.write32(reg + 4, (addr >> 32) as u32);
            }
            self.write32(QUEUE_READY, 1);
            // The rings start zeroed, as a driver's freshly allocated ones would.
            let zero = vec![0u8; QUEUE_STRIDE as usize];
            self.mem.write_slice(&zero, GuestAddress(base)).unwrap();
            queues.push(DriverQueue {
                size,
                ..DriverQueue::default()
            });
        }
    }

    pub fn driver_ok(&self) {
        self.add_status(status::DRIVER_OK);
    }

    /// Full bring-up without checking the outcome.
    pub fn init_unchecked(&self, features: u64, sizes: &[u16]) {
        assert!(self.negotiate(features), "features refused");
        self.setup_queues(sizes);
        self.driver_ok();
    }

    /// Full bring-up; the device must be running afterwards.
    pub fn init(&self, features: u64, sizes: &[u16]) {
        self.init_unchecked(features, sizes);
        let s = self.read32(STATUS);
        assert_eq!(
            s & (status::DRIVER_OK | status::NEEDS_RESET),
            status::DRIVER_OK
        );
        assert!(self.is_active());
    }

    /// Writes 0 to the status register.
    pub fn reset(&self) {
        self.write32(STATUS, 0);
    }

    fn queue(&self, q: u16) -> DriverQueue {
        self.queues.lock().unwrap()[usize::from(q)]
    }

    fn ring_base(q: u16) -> u64 {
        QUEUE_AREA + u64::from(q) * QUEUE_STRIDE
    }

    /// Adds a chain of consecutive descriptors `(addr, len, writable)`; returns its head.
    pub fn push(&self, q: u16, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.queue(q).next_desc;
        let size = self.queue(q).size;
        let descs: Vec<_> = (0..)
            .zip(buffers)
            .map(|(i, &(addr, len, writable))| {
                let index = (head + i) % size;
                let last = usize::from(i) + 1 == buffers.len();
                let mut flags = if writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                (index, Descriptor::new(addr, len, flags, (index + 1) % size))
            })
            .collect();
        for (index, desc) in descs {
            self.store_desc(q, index, desc);
        }
        self.queues.lock().unwrap()[usize::from(q)].next_desc =
            (head + buffers.len() as u16) % size;
        self.publish(q, head);
        head
    }

    /// Adds a one-descriptor chain pointing at an indirect table at `table`, which holds
    /// `buffers` as consecutive descriptors; returns the head.
    pub fn push_indirect(&self, q: u16, table: u64, buffers: &[(u64, u32, bool)]) -> u16 {
        for (i, &(addr, len, writable)) in (0u16..).zip(buffers) {
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if usize::from(i) + 1 < buffers.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, i + 1));
            self.mem
                .write_obj(desc, GuestAddress(table + u64::from(i) * 16))
                .unwrap();
        }
        let head = self.queue(q).next_desc;
        let size = self.queue(q).size;
        let len = buffers.len() as u32 * 16;
        self.store_desc(
            q,
            head,
            Descriptor::new(table, len, VRING_DESC_F_INDIRECT as u16, 0),
        );
        self.queues.lock().unwrap()[usize::from(q)].next_desc = (head + 1) % size;
        self.publish(q, head);
        head
    }

    /// The features the device offers (DeviceFeatures, both halves).
    pub fn device_features(&self) -> u64 {
        self.write32(0x014, 0);
        let low = self.read32(0x010);
        self.write32(0x014, 1);
        let high = self.read32(0x010);
        u64::from(high) << 32 | u64::from(low)
    }

    /// Writes descriptor `index` of queue `q` as given.
    pub fn store_desc(&self, q: u16, index: u16, desc: Descriptor) {
        let addr = Self::ring_base(q) + u64::from(index) * 16;
        self.mem
            .write_obj(RawDescriptor::from(desc), GuestAddress(addr))
            .unwrap();
    }

    /// Puts `head` on the available ring.
    pub fn publish(&self, q: u16, head: u16) {
        let mut queues = self.queues.lock().unwrap();
        let dq = &mut queues[usize::from(q)];
        let avail = Self::ring_base(q) + AVAIL_OFFSET;
        let slot = avail + 4 + u64::from(dq.avail_idx % dq.size) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(dq.avail_idx, GuestAddress(avail + 2))
            .unwrap();
    }

    /// Sets the available index directly (for hostile tests).
    pub fn set_avail_idx(&self, q: u16, idx: u16) {
        let avail = Self::ring_base(q) + AVAIL_OFFSET;
        self.mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }

    /// Sets the used_event field (EVENT_IDX): interrupt only once the used index passes it.
    pub fn set_used_event(&self, q: u16, value: u16) {
        let size = self.queue(q).size;
        let at = Self::ring_base(q) + AVAIL_OFFSET + 4 + u64::from(size) * 2;
        self.mem.write_obj(value, GuestAddress(at)).unwrap();
    }

    /// Consumes a pending interrupt from the irqfd; false if none was raised.
    pub fn take_interrupt(&self) -> bool {
        self.with(|t| t.interrupt_event().read().is_ok())
    }

    /// Notifies queue `q` through the QueueNotify register.
    pub fn kick(&self, q: u16) {
        self.write32(QUEUE_NOTIFY_OFFSET, u32::from(q));
    }

    pub fn used_idx(&self, q: u16) -> u16 {
        let used = Self::ring_base(q) + USED_OFFSET;
        self.mem.read_obj(GuestAddress(used + 2)).unwrap()
    }

    /// Used ring entry `i`: (descriptor id, bytes written).
    pub fn used(&self, q: u16, i: u16) -> (u32, u32) {
        let size = self.queue(q).size;
        let entry = Self::ring_base(q) + USED_OFFSET + 4 + u64::from(i % size) * 8;
        let id: u32 = self.mem.read_obj(GuestAddress(entry)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(entry + 4)).unwrap();
        (id, len)
    }

    /// Waits until the used index of `q` reaches `count`; returns entry `count - 1`.
    pub fn wait_used(&self, q: u16, count: u16) -> (u32, u32) {
        let done = self.wait_for(|| self.used_idx(q) >= count);
        assert!(
            done,
            "used index stuck at {}, waiting for {count}",
            self.used_idx(q)
        );
        self.used(q, count - 1)
    }

    /// Waits until the device reports NEEDS_RESET.
    pub fn wait_needs_reset(&self) -> bool {
        self.wait_for(|| self.read32(STATUS) & status::NEEDS_RESET != 0)
    }

    /// Polls `cond` for up to five seconds.
    pub fn wait_for(&self, mut cond: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        cond()
    }

    /// Writes `data` at `addr`.
    pub fn put(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Reads `len` bytes at `addr`.
    pub fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
}
