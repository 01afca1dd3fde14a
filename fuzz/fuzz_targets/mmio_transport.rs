//! The virtio-mmio transport: arbitrary sequences of register and configuration reads and
//! writes, ring set-ups, guest memory writes and kicks, against virtio-rng or virtio-blk (on
//! a small image) running on a real device thread.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use devices::bus::BusDevice;
use devices::virtio::{Block, DeviceThread, DeviceThreadHandle, MmioTransport, Rng, VirtioDevice};
use kvmbuild_fuzz::{memory, Ring, AVAIL_RING, DESC_TABLE, USED_RING};
use libfuzzer_sys::fuzz_target;

/// The registers a driver uses (virtio 1.2, table 4.1).
const REGISTERS: [u64; 26] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0b0, 0x0b8, 0x0bc, 0x0fc,
];
const STATUS: u64 = 0x070;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A 32-bit read of a known register.
    Read(u8),
    /// A 32-bit write of a known register.
    Write(u8, u32),
    /// Any access: offset, width, value.
    ReadAny(u16, u8),
    WriteAny(u16, Vec<u8>),
    /// Adds status bits, as a driver does step by step.
    AddStatus(u8),
    /// Points queue 0 at the fuzz ring layout with this size, and marks it ready.
    SetupQueue(u16),
    /// Writes rings and data into guest memory.
    Memory(Ring),
    /// Kicks queue `n` through the QueueNotify register.
    Kick(u32),
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// 0: rng; 1: writable disk; 2: read-only disk.
    device: u8,
    ops: Vec<Op>,
}

fn thread() -> DeviceThreadHandle {
    static THREAD: OnceLock<DeviceThread> = OnceLock::new();
    THREAD
        .get_or_init(|| DeviceThread::start().unwrap())
        .handle()
}

fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| kvmbuild_fuzz::scratch_file("mmio.img", 64 * 512))
}

fuzz_target!(|input: Input| {
    let device: Box<dyn VirtioDevice> = match input.device % 3 {
        0 => Box::new(Rng::new()),
        n => Box::new(Block::new(image(), n == 2).unwrap()),
    };
    let mem = memory();
    let mut t = MmioTransport::new(device, mem.clone(), thread()).unwrap();
    for op in input.ops.into_iter().take(256) {
        match op {
            Op::Read(r) => {
                let mut word = [0u8; 4];
                t.read(REGISTERS[usize::from(r) % REGISTERS.len()], &mut word);
            }
            Op::Write(r, value) => t.write(
                REGISTERS[usize::from(r) % REGISTERS.len()],
                &value.to_le_bytes(),
            ),
            Op::ReadAny(offset, width) => {
                let mut data = vec![0u8; usize::from(width % 9)];
                t.read(u64::from(offset) % 0x1000, &mut data);
            }
            Op::WriteAny(offset, data) => t.write(u64::from(offset) % 0x1000, &data),
            Op::AddStatus(bits) => {
                let mut word = [0u8; 4];
                t.read(STATUS, &mut word);
                let status = u32::from_le_bytes(word) | u32::from(bits);
                t.write(STATUS, &status.to_le_bytes());
            }
            Op::SetupQueue(size) => {
                for (reg, value) in [
                    (0x030, 0),
                    (0x038, u32::from(size)),
                    (0x080, DESC_TABLE as u32),
                    (0x084, 0),
                    (0x090, AVAIL_RING as u32),
                    (0x094, 0),
                    (0x0a0, USED_RING as u32),
                    (0x0a4, 0),
                    (0x044, 1),
                ] {
                    t.write(reg, &u32::to_le_bytes(value));
                }
            }
            Op::Memory(ring) => {
                // Only the memory writes: the transport's queue is the device's.
                let _ = ring.install(&mem);
            }
            Op::Kick(n) => t.write(0x050, &n.to_le_bytes()),
        }
        // The status register only ever holds bits the state machine allows.
        let mut word = [0u8; 4];
        t.read(STATUS, &mut word);
        let status = u32::from_le_bytes(word);
        assert_eq!(status & !0xcf, 0, "status {status:#x}");
        if t.is_active() {
            assert!(status & 0x4 != 0, "active without DRIVER_OK");
        }
    }
    // Dropping the transport takes its worker off the device thread.
    drop(t);
});
