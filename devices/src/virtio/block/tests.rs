//! virtio-blk tests: the test plays the guest driver against real image files in a temporary
//! directory, through the MMIO registers and the rings.

use super::request::{S_IOERR, S_OK, S_UNSUPP};
use super::*;
use crate::virtio::chain::drain_queue;
use crate::virtio::testing::{Driver, DATA, MEM_SIZE, R, W};
use crate::virtio::thread::DeviceThread;
use crate::virtio::{status, Interrupt};
use std::fs;
use std::time::Duration;
use tempfile::TempDir;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;

/// Sectors in the test images.
const SECTORS: u64 = 64;
/// Where requests keep their header and status byte.
const HEADER_AT: u64 = DATA;
const STATUS_AT: u64 = DATA + 0x800;
/// Where data buffers start.
const BUF: u64 = DATA + 0x1000;

/// An image whose sector `n` is filled with byte `n`.
fn image(dir: &TempDir, name: &str) -> PathBuf {
    let path = dir.path().join(name);
    let data: Vec<u8> = (0..SECTORS * SECTOR_SIZE)
        .map(|i| (i / SECTOR_SIZE) as u8)
        .collect();
    fs::write(&path, data).unwrap();
    path
}

fn contents(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap()
}

fn sector_bytes(n: u64) -> Vec<u8> {
    vec![n as u8; SECTOR_SIZE as usize]
}

/// A running block device on `path`, with every offered feature accepted.
fn start(path: &Path, read_only: bool) -> Driver {
    start_device(Block::new(path, read_only).unwrap())
}

fn start_device(block: Block) -> Driver {
    let d = Driver::new(Box::new(block));
    let offered = d.device_features();
    d.init(offered, &[16]);
    d
}

/// A header for `kind` at `sector`.
fn header(d: &Driver, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    d.put(HEADER_AT, &h);
}

/// Sends one request with `data` buffers between the header and the status byte; returns
/// (bytes the device reported written, status).
fn request(d: &Driver, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u32, u8) {
    header(d, kind, sector);
    d.put(STATUS_AT, &[0xff]);
    let mut chain = vec![(HEADER_AT, 16, R)];
    chain.extend_from_slice(data);
    chain.push((STATUS_AT, 1, W));
    submit(d, &chain)
}

/// Publishes `chain` and waits for its answer: (used length, status byte).
fn submit(d: &Driver, chain: &[(u64, u32, bool)]) -> (u32, u8) {
    let count = d.used_idx(0) + 1;
    let head = d.push(0, chain);
    d.kick(0);
    let (id, len) = d.wait_used(0, count);
    assert_eq!(id, u32::from(head));
    (len, d.get(STATUS_AT, 1)[0])
}

fn discard_segment(d: &Driver, at: u64, sector: u64, sectors: u32, flags: u32) {
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
    seg[12..].copy_from_slice(&flags.to_le_bytes());
    d.put(at, &seg);
}

fn read_config_u32(d: &Driver, offset: u64) -> u32 {
    d.read32(0x100 + offset)
}

#[test]
fn offers_features_and_config_space() {
    let dir = TempDir::new().unwrap();
    let d = start(&image(&dir, "disk"), false);
    let f = d.device_features();
    for bit in [
        bit(VIRTIO_BLK_F_SEG_MAX),
        bit(VIRTIO_BLK_F_BLK_SIZE),
        bit(VIRTIO_BLK_F_FLUSH),
        features::VERSION_1,
    ] {
        assert_ne!(f & bit, 0, "feature {bit:#x}");
    }
    assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
    // ext4, tmpfs, xfs and btrfs all punch holes.
    assert_ne!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(f & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert_eq!(d.read32(0x008), 2);
    let mut cap = [0u8; 8];
    d.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    assert_eq!(read_config_u32(&d, 12), SEG_MAX);
    assert_eq!(read_config_u32(&d, 20), 512);
    assert_eq!(read_config_u32(&d, 36), MAX_DISCARD_SECTORS);
    assert_eq!(read_config_u32(&d, 40), MAX_DISCARD_SEG);
    assert_eq!(read_config_u32(&d, 44), 1);
    assert_eq!(read_config_u32(&d, 48), MAX_DISCARD_SECTORS);
    let mut unmap = [0u8; 1];
    d.read(0x100 + 56, &mut unmap);
    assert_eq!(unmap, [1]);
}

#[test]
fn capacity_ignores_a_trailing_partial_sector() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("odd");
    fs::write(&path, vec![7u8; 1000]).unwrap();
    let block = Block::new(&path, true).unwrap();
    assert_eq!(block.capacity(), 1);
    assert!(block.is_read_only());
    assert_eq!(block.path(), path);
}

#[test]
fn open_errors_name_the_path() {
    let err = Block::new("/nonexistent/disk.img", false).err().unwrap();
    assert!(err.to_string().contains("/nonexistent/disk.img"));
}

#[test]
fn writers_exclude_everyone_and_readers_share() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk");
    let writer = Block::new(&path, false).unwrap();
    for read_only in [false, true] {
        let err = Block::new(&path, read_only).err().unwrap();
        assert!(
            matches!(err, BlockError::Locked { held: "write", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("in use by another process"));
    }
    drop(writer);
    let readers = [
        Block::new(&path, true).unwrap(),
        Block::new(&path, true).unwrap(),
    ];
    let err = Block::new(&path, false).err().unwrap();
    assert!(
        matches!(err, BlockError::Locked { held: "read", .. }),
        "{err}"
    );
    drop(readers);
    Block::new(&path, false).expect("the lock goes with the last reader");
}

#[test]
fn reads_sectors_into_scattered_buffers() {
    let dir = TempDir::new().unwrap();
    let d = start(&image(&dir, "disk"), false);
    let (len, status) = request(
        &d,
        VIRTIO_BLK_T_IN,
        3,
        &[(BUF, 512, W), (BUF + 0x2000, 1024, W)],
    );
    assert_eq!((len, status), (1537, S_OK));
    assert_eq!(d.get(BUF, 512), sector_bytes(3));
    assert_eq!(d.get(BUF + 0x2000, 512), sector_bytes(4));
    assert_eq!(d.get(BUF + 0x2200, 512), sector_bytes(5));
    // The last sector, and an empty read.
    assert_eq!(
        request(&d, VIRTIO_BLK_T_IN, SECTORS - 1, &[(BUF, 512, W)]),
        (513, S_OK)
    );
    assert_eq!(d.get(BUF, 512), sector_bytes(SECTORS - 1));
    assert_eq!(request(&d, VIRTIO_BLK_T_IN, SECTORS, &[]), (1, S_OK));
}

#[test]
fn writes_reach_the_file_and_nothing_else() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk");
    let d = start(&path, false);
    d.put(BUF, &[0xaa; 512]);
    d.put(BUF + 0x3000, &[0xbb; 512]);
    let (len, status) = request(
        &d,
        VIRTIO_BLK_T_OUT,
        10,
        &[(BUF, 512, R), (BUF + 0x3000, 512, R)],
    );
    assert_eq!((len, status), (1, S_OK));
    let mut want: Vec<u8> = contents(&image(&TempDir::new().unwrap(), "fresh"));
    want[10 * 512..11 * 512].fill(0xaa);
    want[11 * 512..12 * 512].fill(0xbb);
    assert_eq!(contents(&path), want);
    // And reads see them.
    assert_eq!(
        request(&d, VIRTIO_BLK_T_IN, 11, &[(BUF + 0x5000, 512, W)]),
        (513, S_OK)
    );
    assert_eq!(d.get(BUF + 0x5000, 512), vec![0xbb; 512]);
}

#[test]
fn flush_succeeds() {
    let dir = TempDir::new().unwrap();
    let d = start(&image(&dir, "disk"), false);
    assert_eq!(request(&d, VIRTIO_BLK_T_FLUSH, 0, &[]), (1, S_OK));
}

#[test]
fn get_id_returns_twenty_bytes() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk");
    let d = start(&path, false);
    let (len, status) = request(&d, VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 20, W)]);
    assert_eq!((len, status), (21, S_OK));
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(d.get(BUF, 20), derive_id(meta.dev(), meta.ino()));
    drop(d);
    let named = start_device(
        Block::new(&path, false)
            .unwrap()
            .with_id("kvmbuild-disk-0123456789"),
    );
    request(&named, VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 20, W)]);
    assert_eq!(named.get(BUF, 20), b"kvmbuild-disk-012345");
}

#[test]
fn discard_punches_holes_keeping_the_size() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk");
    let d = start(&path, false);
    discard_segment(&d, BUF, 8, 16, 0);
    discard_segment(&d, BUF + 16, 40, 1, 0);
    assert_eq!(
        request(&d, VIRTIO_BLK_T_DISCARD, 0, &[(BUF, 32, R)]),
        (1, S_OK)
    );
    let data = contents(&path);
    assert_eq!(data.len() as u64, SECTORS * SECTOR_SIZE);
    assert!(data[8 * 512..24 * 512].iter().all(|&b| b == 0));
    assert!(data[40 * 512..41 * 512].iter().all(|&b| b == 0));
    assert_eq!(&data[7 * 512..8 * 512], &sector_bytes(7)[..]);
    assert_eq!(&data[24 * 512..25 * 512], &sector_bytes(24)[..]);
    assert_eq!(&data[41 * 512..42 * 512], &sector_bytes(41)[..]);
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk");
    let d = start(&path, false);
    discard_segment(&d, BUF, 2, 2, 0);
    assert_eq!(
        request(&d, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(BUF, 16, R)]),
        (1, S_OK)
    );
    discard_segment(&d, BUF, 30, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        request(&d, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(BUF, 16, R)]),
        (1, S_OK)
    );
    let data = contents(&path);
    assert!(data[2 * 512..4 * 512].iter().all(|&b| b == 0));
    assert!(data[30 * 512..33 * 512].iter().all(|&b| b == 0));
    assert_eq!(&data[4 * 512..5 * 512], &sector_bytes(4)[..]);
    assert_eq!(&data[33 * 512..34 * 512], &sector_bytes(33)[..]);
}

#[test]
fn discard_and_write_zeroes_check_their_segments() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk");
    let before = contents(&path);
    let d = start(&path, false);
    let cases: [(&str, u32, u64, u32, u32, u32, u8); 7] = [
        (
            "beyond the end",
            VIRTIO_BLK_T_DISCARD,
            SECTORS - 1,
            2,
            0,
            16,
            S_IOERR,
        ),
        (
            "overflowing sector",
            VIRTIO_BLK_T_DISCARD,
            u64::MAX / 512,
            2,
            0,
            16,
            S_IOERR,
        ),
        (
            "flags on discard",
            VIRTIO_BLK_T_DISCARD,
            0,
            1,
            1,
            16,
            S_UNSUPP,
        ),
        (
            "unknown write-zeroes flag",
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            1,
            2,
            16,
            S_UNSUPP,
        ),
        (
            "too many sectors",
            VIRTIO_BLK_T_DISCARD,
            0,
            MAX_DISCARD_SECTORS + 1,
            0,
            16,
            S_IOERR,
        ),
        (
            "partial segment",
            VIRTIO_BLK_T_DISCARD,
            0,
            1,
            0,
            12,
            S_IOERR,
        ),
        ("no segment", VIRTIO_BLK_T_DISCARD, 0, 1, 0, 0, S_IOERR),
    ];
    for (what, kind, sector, sectors, flags, len, want) in cases {
        discard_segment(&d, BUF, sector, sectors, flags);
        let data: &[(u64, u32, bool)] = if len == 0 { &[] } else { &[(BUF, len, R)] };
        assert_eq!(request(&d, kind, 0, data), (1, want), "{what}");
    }
    // Too many segments.
    let n = MAX_DISCARD_SEG + 1;
    for i in 0..u64::from(n) {
        discard_segment(&d, BUF + i * 16, i, 1, 0);
    }
    assert_eq!(
        request(&d, VIRTIO_BLK_T_DISCARD, 0, &[(BUF, n * 16, R)]),
        (1, S_IOERR)
    );
    // A bad segment anywhere means no segment is applied.
    discard_segment(&d, BUF, 0, 1, 0);
    discard_segment(&d, BUF + 16, SECTORS, 1, 0);
    assert_eq!(
        request(&d, VIRTIO_BLK_T_DISCARD, 0, &[(BUF, 32, R)]),
        (1, S_IOERR)
    );
    assert_eq!(contents(&path), before);
}

#[test]
fn read_only_disks_refuse_every_change() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk");
    let before = contents(&path);
    let d = start(&path, true);
    let f = d.device_features();
    assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        f & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)),
        0
    );
    d.put(BUF, &[0xcc; 512]);
    assert_eq!(
        request(&d, VIRTIO_BLK_T_OUT, 0, &[(BUF, 512, R)]),
        (1, S_IOERR)
    );
    discard_segment(&d, BUF, 0, 4, 0);
    assert_eq!(
        request(&d, VIRTIO_BLK_T_DISCARD, 0, &[(BUF, 16, R)]),
        (1, S_IOERR)
    );
    assert_eq!(
        request(&d, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(BUF, 16, R)]),
        (1, S_IOERR)
    );
    assert_eq!(request(&d, VIRTIO_BLK_T_FLUSH, 0, &[]), (1, S_OK));
    assert_eq!(
        request(&d, VIRTIO_BLK_T_IN, 2, &[(BUF, 512, W)]),
        (513, S_OK)
    );
    assert_eq!(d.get(BUF, 512), sector_bytes(2));
    assert_eq!(contents(&path), before);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let dir = TempDir::new().unwrap();
    let d = start(&image(&dir, "disk"), false);
    for kind in [2, 7, 14, 0x8000_0000] {
        assert_eq!(request(&d, kind, 0, &[]), (1, S_UNSUPP), "type {kind}");
    }
}

#[test]
fn discard_is_unsupported_when_not_negotiated() {
    let dir = TempDir::new().unwrap();
    let d = Driver::new(Box::new(Block::new(image(&dir, "disk"), false).unwrap()));
    let offered = d.device_features();
    d.init(
        offered
            & !(bit(VIRTIO_BLK_F_DISCARD)
                | bit(VIRTIO_BLK_F_WRITE_ZEROES)
                | bit(VIRTIO_BLK_F_FLUSH)),
        &[16],
    );
    discard_segment(&d, BUF, 0, 1, 0);
    assert_eq!(
        request(&d, VIRTIO_BLK_T_DISCARD, 0, &[(BUF, 16, R)]),
        (1, S_UNSUPP)
    );
    assert_eq!(
        request(&d, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(BUF, 16, R)]),
        (1, S_UNSUPP)
    );
    // Without FLUSH, writes are synchronous, and still succeed.
    d.put(BUF, &[1; 512]);
    assert_eq!(
        request(&d, VIRTIO_BLK_T_OUT, 0, &[(BUF, 512, R)]),
        (1, S_OK)
    );
}

#[test]
fn bad_requests_are_answered_with_ioerr_and_leave_the_file_alone() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk");
    let before = contents(&path);
    let d = start(&path, false);
    d.put(BUF, &[0xee; 4096]);
    let max_sector = u64::MAX / SECTOR_SIZE;
    type Case = (&'static str, u32, u64, Vec<(u64, u32, bool)>);
    let cases: [Case; 11] = [
        (
            "sector beyond capacity",
            VIRTIO_BLK_T_OUT,
            SECTORS,
            vec![(BUF, 512, R)],
        ),
        (
            "range crossing the end",
            VIRTIO_BLK_T_OUT,
            SECTORS - 1,
            vec![(BUF, 1024, R)],
        ),
        (
            "sector * 512 overflows",
            VIRTIO_BLK_T_OUT,
            u64::MAX,
            vec![(BUF, 512, R)],
        ),
        (
            "sector + len overflows",
            VIRTIO_BLK_T_OUT,
            max_sector,
            vec![(BUF, 1024, R)],
        ),
        ("partial sector", VIRTIO_BLK_T_OUT, 0, vec![(BUF, 100, R)]),
        (
            "read beyond capacity",
            VIRTIO_BLK_T_IN,
            SECTORS,
            vec![(BUF, 512, W)],
        ),
        (
            "read overflow",
            VIRTIO_BLK_T_IN,
            u64::MAX,
            vec![(BUF, 512, W)],
        ),
        (
            "write data outside memory",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(MEM_SIZE - 256, 512, R)],
        ),
        (
            "read data outside memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![(MEM_SIZE - 256, 512, W)],
        ),
        (
            "read with readable data",
            VIRTIO_BLK_T_IN,
            0,
            vec![(BUF, 512, R)],
        ),
        (
            "write with writable data",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(BUF, 512, R), (BUF + 0x1000, 512, W)],
        ),
    ];
    for (what, kind, sector, data) in cases {
        assert_eq!(request(&d, kind, sector, &data), (1, S_IOERR), "{what}");
    }
    // A wrapping buffer address.
    assert_eq!(
        request(&d, VIRTIO_BLK_T_IN, 0, &[(u64::MAX - 100, 512, W)]),
        (1, S_IOERR)
    );
    assert_eq!(contents(&path), before);
    // A header shorter than 16 bytes.
    header(&d, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        submit(&d, &[(HEADER_AT, 8, R), (STATUS_AT, 1, W)]),
        (1, S_IOERR)
    );
    // No header at all.
    assert_eq!(submit(&d, &[(STATUS_AT, 1, W)]), (1, S_IOERR));
    // The device still works.
    assert_eq!(
        request(&d, VIRTIO_BLK_T_IN, 1, &[(BUF, 512, W)]),
        (513, S_OK)
    );
    assert_eq!(contents(&path), before);
}

#[test]
fn header_split_across_descriptors_is_understood() {
    let dir = TempDir::new().unwrap();
    let d = start(&image(&dir, "disk"), false);
    header(&d, VIRTIO_BLK_T_IN, 9);
    d.put(STATUS_AT, &[0xff]);
    let chain = [
        (HEADER_AT, 5, R),
        (HEADER_AT + 5, 11, R),
        (BUF, 512, W),
        (STATUS_AT, 1, W),
    ];
    assert_eq!(submit(&d, &chain), (513, S_OK));
    assert_eq!(d.get(BUF, 512), sector_bytes(9));
}

#[test]
fn indirect_descriptors_work() {
    let dir = TempDir::new().unwrap();
    let d = start(&image(&dir, "disk"), false);
    header(&d, VIRTIO_BLK_T_IN, 6);
    let table = DATA + 0x10_0000;
    d.push_indirect(
        0,
        table,
        &[(HEADER_AT, 16, R), (BUF, 512, W), (STATUS_AT, 1, W)],
    );
    d.kick(0);
    assert_eq!(d.wait_used(0, 1), (0, 513));
    assert_eq!(d.get(STATUS_AT, 1), [S_OK]);
    assert_eq!(d.get(BUF, 512), sector_bytes(6));
}

#[test]
fn many_requests_wrap_the_ring() {
    let dir = TempDir::new().unwrap();
    let d = start(&image(&dir, "disk"), false);
    for i in 0..100u64 {
        let sector = i % SECTORS;
        assert_eq!(
            request(&d, VIRTIO_BLK_T_IN, sector, &[(BUF, 512, W)]),
            (513, S_OK)
        );
        assert_eq!(d.get(BUF, 1), [sector as u8]);
    }
}

#[test]
fn batched_requests_are_all_answered() {
    let dir = TempDir::new().unwrap();
    let d = start(&image(&dir, "disk"), false);
    // Five requests published before a single kick.
    for i in 0..5u64 {
        let at = BUF + i * 0x1000;
        let mut h = [0u8; 16];
        h[8..].copy_from_slice(&i.to_le_bytes());
        d.put(at, &h);
        d.push(0, &[(at, 16, R), (at + 0x100, 512, W), (at + 0x400, 1, W)]);
    }
    d.kick(0);
    d.wait_used(0, 5);
    for i in 0..5u64 {
        let at = BUF + i * 0x1000;
        assert_eq!(d.get(at + 0x400, 1), [S_OK]);
        assert_eq!(d.get(at + 0x100, 512), sector_bytes(i));
    }
}

/// Brings up a fresh device, runs `spoil` to publish something hostile, and expects
/// NEEDS_RESET; then checks that a reset brings the device back.
fn expect_needs_reset(what: &str, spoil: impl FnOnce(&Driver)) {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk");
    let before = contents(&path);
    let d = start(&path, false);
    spoil(&d);
    d.kick(0);
    assert!(d.wait_needs_reset(), "{what}: no NEEDS_RESET");
    assert_ne!(d.read32(0x060) & 2, 0, "{what}: no config interrupt");
    // Dead until reset: a good request now goes unanswered.
    let used = d.used_idx(0);
    header(&d, VIRTIO_BLK_T_IN, 0);
    d.push(0, &[(HEADER_AT, 16, R), (BUF, 512, W), (STATUS_AT, 1, W)]);
    d.kick(0);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.used_idx(0), used, "{what}: device kept running");
    d.reset();
    let offered = d.device_features();
    d.init(offered, &[16]);
    assert_eq!(
        request(&d, VIRTIO_BLK_T_IN, 1, &[(BUF, 512, W)]),
        (513, S_OK),
        "{what}"
    );
    assert_eq!(contents(&path), before, "{what}");
}

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

#[test]
fn chains_without_a_status_byte_need_reset() {
    expect_needs_reset("all readable", |d| {
        header(d, VIRTIO_BLK_T_IN, 0);
        d.push(0, &[(HEADER_AT, 16, R), (BUF, 512, R)]);
    });
    expect_needs_reset("status outside memory", |d| {
        header(d, VIRTIO_BLK_T_IN, 0);
        d.push(0, &[(HEADER_AT, 16, R), (MEM_SIZE, 1, W)]);
    });
}

#[test]
fn broken_chains_need_reset() {
    expect_needs_reset("descriptor loop", |d| {
        header(d, VIRTIO_BLK_T_OUT, 0);
        d.store_desc(0, 8, Descriptor::new(HEADER_AT, 16, NEXT, 9));
        d.store_desc(0, 9, Descriptor::new(BUF, 512, NEXT, 8));
        d.publish(0, 8);
    });
    expect_needs_reset("next out of range", |d| {
        header(d, VIRTIO_BLK_T_IN, 0);
        d.store_desc(0, 8, Descriptor::new(HEADER_AT, 16, NEXT, 200));
        d.publish(0, 8);
    });
    expect_needs_reset("head out of range", |d| d.publish(0, 40));
    expect_needs_reset("readable after writable", |d| {
        header(d, VIRTIO_BLK_T_IN, 0);
        d.push(0, &[(HEADER_AT, 16, R), (STATUS_AT, 1, W), (BUF, 512, R)]);
    });
    expect_needs_reset("chain too long", |d| {
        header(d, VIRTIO_BLK_T_IN, 0);
        let mut chain = vec![(HEADER_AT, 16, R)];
        chain.extend((0..MAX_DESCRIPTORS as u64).map(|i| (BUF + i * 512, 512, W)));
        chain.push((STATUS_AT, 1, W));
        d.push_indirect(0, DATA + 0x20_0000, &chain);
    });
    expect_needs_reset("indirect table outside memory", |d| {
        d.store_desc(
            0,
            3,
            Descriptor::new(MEM_SIZE, 48, VRING_DESC_F_INDIRECT_U16, 0),
        );
        d.publish(0, 3);
    });
    expect_needs_reset("available index too far ahead", |d| d.set_avail_idx(0, 17));
    expect_needs_reset("loop through writable descriptors", |d| {
        header(d, VIRTIO_BLK_T_IN, 0);
        d.store_desc(0, 5, Descriptor::new(HEADER_AT, 16, NEXT, 6));
        d.store_desc(0, 6, Descriptor::new(STATUS_AT, 1, NEXT | WRITE, 6));
        d.publish(0, 5);
    });
}

const VRING_DESC_F_INDIRECT_U16: u16 =
    virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

#[test]
fn reset_stops_the_queue() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk");
    let before = contents(&path);
    let d = start(&path, false);
    assert_eq!(
        request(&d, VIRTIO_BLK_T_IN, 0, &[(BUF, 512, W)]),
        (513, S_OK)
    );
    d.reset();
    assert_eq!(d.read32(0x070), 0);
    // The old rings are still in memory; a write request published and kicked now must not
    // be served.
    d.put(BUF, &[0x55; 512]);
    header(&d, VIRTIO_BLK_T_OUT, 0);
    d.push(0, &[(HEADER_AT, 16, R), (BUF, 512, R), (STATUS_AT, 1, W)]);
    d.kick(0);
    d.with(|t| t.queue_notify_events()[0].write(1).unwrap());
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(d.used_idx(0), 1);
    assert_eq!(contents(&path), before);
}

#[test]
fn several_disks_are_independent() {
    let dir = TempDir::new().unwrap();
    let (a, b) = (image(&dir, "a"), image(&dir, "b"));
    let thread = DeviceThread::start().unwrap();
    let da = Driver::with_thread(Box::new(Block::new(&a, false).unwrap()), &thread);
    let db = Driver::with_thread(Box::new(Block::new(&b, true).unwrap()), &thread);
    for d in [&da, &db] {
        let offered = d.device_features();
        d.init(offered, &[16]);
    }
    da.put(BUF, &[0x11; 512]);
    assert_eq!(
        request(&da, VIRTIO_BLK_T_OUT, 5, &[(BUF, 512, R)]),
        (1, S_OK)
    );
    db.put(BUF, &[0x22; 512]);
    assert_eq!(
        request(&db, VIRTIO_BLK_T_OUT, 5, &[(BUF, 512, R)]),
        (1, S_IOERR)
    );
    assert_eq!(&contents(&a)[5 * 512..6 * 512], &[0x11; 512][..]);
    assert_eq!(&contents(&b)[5 * 512..6 * 512], &sector_bytes(5)[..]);
    request(&da, VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 20, W)]);
    request(&db, VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 20, W)]);
    assert_ne!(da.get(BUF, 20), db.get(BUF, 20));
    drop((da, db));
    thread.stop().unwrap();
}

#[test]
fn requests_published_before_driver_ok_are_served() {
    let dir = TempDir::new().unwrap();
    let d = Driver::new(Box::new(Block::new(image(&dir, "disk"), false).unwrap()));
    let offered = d.device_features();
    assert!(d.negotiate(offered));
    d.setup_queues(&[16]);
    header(&d, VIRTIO_BLK_T_IN, 4);
    d.push(0, &[(HEADER_AT, 16, R), (BUF, 512, W), (STATUS_AT, 1, W)]);
    d.driver_ok();
    assert_eq!(d.read32(0x070) & status::DRIVER_OK, status::DRIVER_OK);
    assert_eq!(d.wait_used(0, 1), (0, 513));
    assert_eq!(d.get(BUF, 512), sector_bytes(4));
}

#[test]
fn byte_ranges_are_checked_without_overflow() {
    let dir = TempDir::new().unwrap();
    let block = Block::new(image(&dir, "disk"), false).unwrap();
    let disk = Disk {
        image: block.image.clone(),
        write_through: false,
        discard: true,
        write_zeroes: true,
    };
    assert_eq!(disk.byte_range(0, 512), Ok(0));
    assert_eq!(disk.byte_range(SECTORS - 1, 512), Ok((SECTORS - 1) * 512));
    assert_eq!(disk.byte_range(SECTORS, 0), Ok(SECTORS * 512));
    assert_eq!(disk.byte_range(SECTORS, 512), Err(S_IOERR));
    assert_eq!(disk.byte_range(0, 511), Err(S_IOERR));
    assert_eq!(disk.byte_range(u64::MAX, 0), Err(S_IOERR));
    assert_eq!(disk.byte_range(u64::MAX / 512, 1024), Err(S_IOERR));
}

#[test]
fn interrupts_respect_used_event() {
    let dir = TempDir::new().unwrap();
    let d = start(&image(&dir, "disk"), false);
    assert_eq!(request(&d, VIRTIO_BLK_T_FLUSH, 0, &[]), (1, S_OK));
    assert!(d.wait_for(|| d.read32(0x060) & 1 == 1));
    assert!(d.take_interrupt());
    d.write32(0x064, 1);
    assert_eq!(d.read32(0x060), 0);
    // The driver wants an interrupt only after the used index passes 3.
    d.set_used_event(0, 3);
    for n in 2..=3 {
        assert_eq!(request(&d, VIRTIO_BLK_T_FLUSH, 0, &[]), (1, S_OK));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!d.take_interrupt(), "request {n}");
    }
    assert_eq!(request(&d, VIRTIO_BLK_T_FLUSH, 0, &[]), (1, S_OK));
    assert!(d.wait_for(|| d.take_interrupt()));
}

#[test]
fn without_event_idx_every_batch_interrupts() {
    let dir = TempDir::new().unwrap();
    let d = Driver::new(Box::new(Block::new(image(&dir, "disk"), false).unwrap()));
    d.init(features::VERSION_1 | bit(VIRTIO_BLK_F_FLUSH), &[16]);
    for _ in 0..3 {
        assert_eq!(request(&d, VIRTIO_BLK_T_FLUSH, 0, &[]), (1, S_OK));
        assert!(d.wait_for(|| d.take_interrupt()));
    }
}

/// A small deterministic generator for the random-ring test.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// An address that is often a sensible buffer, sometimes near or past the end of memory.
    fn addr(&mut self) -> u64 {
        match self.next() % 8 {
            0 => MEM_SIZE - self.next() % 64,
            1 => self.next(),
            2 => DATA + 0x2_0000 + (self.next() % 0x100) * 16,
            _ => DATA + self.next() % 0x8_0000,
        }
    }
}

#[test]
fn random_rings_never_panic_or_escape_the_file() {
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk");
    let block = Block::new(&path, false).unwrap();
    let disk = Disk {
        image: block.image.clone(),
        write_through: false,
        discard: true,
        write_zeroes: true,
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let irq = Interrupt::new().unwrap();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..2000 {
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        for i in 0..16 {
            // NEXT and WRITE half of the time each, INDIRECT now and then.
            let flags = (rng.next() % 4) as u16 | if rng.next() % 16 == 0 { 4 } else { 0 };
            let len = match rng.next() % 4 {
                0 => rng.next() as u32,
                1 => 16,
                _ => (rng.next() % 4096) as u32,
            };
            let desc = Descriptor::new(rng.addr(), len, flags, (rng.next() % 20) as u16);
            vq.desc_table()
                .store(i, virtio_queue::desc::RawDescriptor::from(desc))
                .unwrap();
        }
        // Random indirect tables, headers and segments in the data area.
        let mut junk = vec![0u8; 0x1000];
        junk.iter_mut().for_each(|b| *b = rng.next() as u8);
        mem.write_slice(&junk, GuestAddress(DATA + 0x2_0000))
            .unwrap();
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&[0u32, 1, 4, 8, 11, 13][(rng.next() % 6) as usize].to_le_bytes());
        hdr[8..].copy_from_slice(&(rng.next() % (SECTORS + 4)).to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(DATA + 0x2_0000))
            .unwrap();
        for slot in 0..16 {
            vq.avail()
                .ring()
                .ref_at(slot)
                .unwrap()
                .store((rng.next() % 17) as u16);
        }
        vq.avail().idx().store((rng.next() % 20) as u16);
        let mut queue: Queue = vq.create_queue().unwrap();
        let _ = drain_queue(&mut queue, &mem, &irq, |chain| disk.serve(&mem, chain));
    }
    assert_eq!(fs::metadata(&path).unwrap().len(), SECTORS * SECTOR_SIZE);
}

#[test]
fn config_fields_sit_at_the_specs_offsets() {
    use std::mem::offset_of;
    assert_eq!(offset_of!(VirtioBlockConfig, capacity), 0);
    assert_eq!(offset_of!(VirtioBlockConfig, seg_max), 12);
    assert_eq!(offset_of!(VirtioBlockConfig, blk_size), 20);
    assert_eq!(offset_of!(VirtioBlockConfig, num_queues), 34);
    assert_eq!(offset_of!(VirtioBlockConfig, max_discard_sectors), 36);
    assert_eq!(offset_of!(VirtioBlockConfig, discard_sector_alignment), 44);
    assert_eq!(offset_of!(VirtioBlockConfig, max_write_zeroes_seg), 52);
    assert_eq!(offset_of!(VirtioBlockConfig, write_zeroes_may_unmap), 56);
}
