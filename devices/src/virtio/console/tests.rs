//! Multiport console tests: the test driver plays Linux's virtio_console driver.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::control::{self, Message};
use super::{Console, ConsoleError, ConsoleFlush, ConsoleInput, PortConfig, F_MULTIPORT};
use crate::exit::{ExitReason, VmExit};
use crate::virtio::testing::{Driver, Sink, DATA, MEM_SIZE, R, W};
use crate::virtio::{features, VirtioDevice};

const FEATURES: u64 = features::VERSION_1 | features::RING_EVENT_IDX | F_MULTIPORT;
const CTRL_RX: u16 = 2;
const CTRL_TX: u16 = 3;
const RX_BUF: u32 = 4096;

fn rx(port: u16) -> u16 {
    if port == 0 {
        0
    } else {
        2 * port + 2
    }
}

fn tx(port: u16) -> u16 {
    rx(port) + 1
}

fn port(name: &str) -> PortConfig {
    PortConfig {
        name: name.into(),
        input: None,
        output: None,
    }
}

fn output_port(name: &str, out: impl Write + Send + 'static) -> PortConfig {
    PortConfig {
        output: Some(Box::new(out)),
        ..port(name)
    }
}

fn input_port(name: &str, input: impl ConsoleInput + 'static) -> PortConfig {
    PortConfig {
        input: Some(Box::new(input)),
        ..port(name)
    }
}

fn binary(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(salt) ^ (i >> 8) as u8)
        .collect()
}

/// The guest's side: the driver plus the buffers it posted.
struct Guest {
    d: Driver,
    flush: ConsoleFlush,
    ports: u16,
    next_addr: u64,
    /// (queue, head) → buffer address, for buffers the device writes.
    posted: HashMap<(u16, u16), u64>,
    /// Used entries consumed so far, per queue.
    seen: HashMap<u16, u16>,
    /// Chains published, per queue.
    pushed: HashMap<u16, u16>,
}

impl Guest {
    fn new(ports: Vec<PortConfig>, exit: Option<Arc<VmExit>>) -> Self {
        let count = ports.len() as u16;
        let console = Console::with_ports(ports, exit).unwrap();
        let flush = console.flush_handle();
        let d = Driver::new(Box::new(console));
        d.init(FEATURES, &vec![64; usize::from(2 * count + 2)]);
        Self {
            d,
            flush,
            ports: count,
            next_addr: DATA,
            posted: HashMap::new(),
            seen: HashMap::new(),
            pushed: HashMap::new(),
        }
    }

    /// The same guest restored from a snapshot taken now, with `ports` (this run's streams)
    /// behind the console.
    fn save_and_restore(self, ports: Vec<PortConfig>) -> Self {
        let state = self.d.save();
        let console = Console::with_ports(ports, None).unwrap();
        let flush = console.flush_handle();
        let d = self.d.restore(Box::new(console), &state).unwrap();
        Self { d, flush, ..self }
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_addr;
        self.next_addr += u64::from(len).next_multiple_of(16);
        assert!(self.next_addr < MEM_SIZE, "test memory exhausted");
        addr
    }

    fn push(&mut self, q: u16, buffers: &[(u64, u32, bool)]) -> u16 {
        *self.pushed.entry(q).or_default() += 1;
        self.d.push(q, buffers)
    }

    /// Offers `count` device-writable buffers of `len` bytes on `q`.
    fn post(&mut self, q: u16, count: usize, len: u32) {
        for _ in 0..count {
            let addr = self.alloc(len);
            let head = self.push(q, &[(addr, len, W)]);
            self.posted.insert((q, head), addr);
        }
        self.d.kick(q);
    }

    /// The next used buffer of `q`, if the device has used one.
    fn take_used(&mut self, q: u16) -> Option<Vec<u8>> {
        let seen = self.seen.entry(q).or_default();
        if self.d.used_idx(q) == *seen {
            return None;
        }
        let (head, len) = self.d.used(q, *seen);
        *seen += 1;
        let addr = self
            .posted
            .remove(&(q, head as u16))
            .expect("used an unposted buffer");
        Some(self.d.get(addr, len as usize))
    }

    /// Sends a control message and waits until the device has used it.
    fn send_raw(&mut self, bytes: &[u8]) {
        let addr = self.alloc(bytes.len() as u32);
        self.d.put(addr, bytes);
        self.push(CTRL_TX, &[(addr, bytes.len() as u32, R)]);
        self.d.kick(CTRL_TX);
        let count = self.pushed[&CTRL_TX];
        self.d.wait_used(CTRL_TX, count);
    }

    fn send(&mut self, id: u32, event: u16, value: u16) {
        self.send_raw(&Message::new(id, event, value).encode());
    }

    /// The next control message from the device, waiting for it.
    fn recv(&mut self) -> (Message, Vec<u8>) {
        let mut got = None;
        let start = Instant::now();
        while got.is_none() && start.elapsed() < Duration::from_secs(5) {
            got = self.take_used(CTRL_RX);
            std::thread::sleep(Duration::from_micros(200));
        }
        let bytes = got.expect("no control message");
        (Message::decode(&bytes).unwrap(), bytes[8..].to_vec())
    }

    /// Asserts that no control message comes for a while.
    fn no_message(&mut self) {
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(self.take_used(CTRL_RX), None);
    }

    /// Linux's probe and port set-up; returns each port's name in id order.
    fn handshake(&mut self) -> Vec<String> {
        self.post(CTRL_RX, 32, 256);
        self.send(u32::MAX, control::DEVICE_READY, 1);
        for id in 0..u32::from(self.ports) {
            let (add, _) = self.recv();
            assert_eq!((add.id, add.event), (id, control::DEVICE_ADD));
        }
        let mut names = Vec::new();
        for id in 0..u32::from(self.ports) {
            // Linux fills the port's receive queue, then reports it ready.
            self.send(id, control::PORT_READY, 1);
            let (name, payload) = self.recv();
            assert_eq!((name.id, name.event), (id, control::PORT_NAME));
            let (open, _) = self.recv();
            assert_eq!(
                (open.id, open.event, open.value),
                (id, control::PORT_OPEN, 1)
            );
            names.push(String::from_utf8(payload).unwrap());
        }
        names
    }

    /// Writes `data` to port `p` in `piece`-byte transmit buffers and kicks.
    fn write(&mut self, p: u16, data: &[u8], piece: usize) {
        for part in data.chunks(piece) {
            let addr = self.alloc(part.len() as u32);
            self.d.put(addr, part);
            self.push(tx(p), &[(addr, part.len() as u32, R)]);
        }
        self.d.kick(tx(p));
    }

    /// Reads port `p` until the device closes its side, re-posting receive buffers as they
    /// fill. At the moment PORT_OPEN(p, 0) arrives, every byte must already be used.
    fn read_to_eof(&mut self, p: u16) -> Vec<u8> {
        let mut data = Vec::new();
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < Duration::from_secs(5), "no end of file");
            while let Some(chunk) = self.take_used(rx(p)) {
                data.extend(chunk);
                self.post(rx(p), 1, RX_BUF);
            }
            if let Some(bytes) = self.take_used(CTRL_RX) {
                let m = Message::decode(&bytes).unwrap();
                assert_eq!(
                    (m.id, m.event, m.value),
                    (u32::from(p), control::PORT_OPEN, 0)
                );
                // Everything was used before the close was sent.
                while let Some(chunk) = self.take_used(rx(p)) {
                    data.extend(chunk);
                }
                self.no_more_rx(p);
                return data;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn no_more_rx(&mut self, p: u16) {
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(self.take_used(rx(p)), None, "data after end of file");
    }
}

#[test]
fn only_the_multiport_console_offers_multiport() {
    assert_eq!(
        Console::new(Box::new(Sink::default()), None)
            .unwrap()
            .features()
            & F_MULTIPORT,
        0
    );
    let console = Console::with_ports(vec![port("a"), port("b")], None).unwrap();
    assert_ne!(console.features() & F_MULTIPORT, 0);
    assert_eq!(console.queue_max_sizes().len(), 6);
    let mut max_nr_ports = [0u8; 4];
    console.read_config(4, &mut max_nr_ports);
    assert_eq!(u32::from_le_bytes(max_nr_ports), 2);
}

#[test]
fn bad_port_lists_are_refused() {
    let refused = |ports: Vec<PortConfig>| Console::with_ports(ports, None).err().unwrap();
    assert!(matches!(refused(vec![]), ConsoleError::PortCount(0)));
    assert!(matches!(
        refused(vec![port("a/b")]),
        ConsoleError::BadName(_)
    ));
    assert!(matches!(refused(vec![port("")]), ConsoleError::BadName(_)));
    assert!(matches!(
        refused(vec![port("a\0")]),
        ConsoleError::BadName(_)
    ));
    assert!(matches!(
        refused(vec![port("x"), port("x")]),
        ConsoleError::DuplicateName(_)
    ));
}

#[test]
fn handshake_adds_names_and_opens_every_port() {
    let mut g = Guest::new(vec![port("stdin"), port("stdout"), port("stderr")], None);
    assert_eq!(g.handshake(), ["stdin", "stdout", "stderr"]);
    // Nothing else: no CONSOLE_PORT, no close.
    g.no_message();
    // A repeated DEVICE_READY or PORT_READY changes nothing.
    g.send(u32::MAX, control::DEVICE_READY, 1);
    g.send(1, control::PORT_READY, 1);
    g.no_message();
}

#[test]
fn output_on_two_ports_is_separate_and_byte_exact() {
    let (out, err) = (Sink::default(), Sink::default());
    let mut g = Guest::new(
        vec![
            port("stdin"),
            output_port("stdout", out.clone()),
            output_port("stderr", err.clone()),
        ],
        None,
    );
    g.handshake();
    let a = binary(100_000, 7);
    let b = binary(70_000, 13);
    // Interleaved, as two guest processes writing at once.
    let (mut pa, mut pb) = (a.chunks(32 << 10), b.chunks(9000));
    loop {
        let (x, y) = (pa.next(), pb.next());
        if x.is_none() && y.is_none() {
            break;
        }
        if let Some(x) = x {
            g.write(1, x, 32 << 10);
        }
        if let Some(y) = y {
            g.write(2, y, 9000);
        }
    }
    g.d.wait_used(tx(1), g.pushed[&tx(1)]);
    g.d.wait_used(tx(2), g.pushed[&tx(2)]);
    assert!(out.wait_len(a.len()) == a, "stdout differs");
    assert!(err.wait_len(b.len()) == b, "stderr differs");
    assert_eq!(g.d.read32(0x70) & 0x40, 0, "no reset needed");
}

#[test]
fn input_is_delivered_once_opened_then_ends_after_its_last_byte() {
    let (mut host, guest_side) = UnixStream::pair().unwrap();
    let mut g = Guest::new(vec![input_port("stdin", guest_side)], None);
    g.handshake();
    let data = binary(10_000, 3);
    host.write_all(&data).unwrap();
    drop(host);
    // Two buffers: less than the input, so the device must wait for more.
    g.post(rx(0), 2, RX_BUF);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(
        g.d.used_idx(rx(0)),
        0,
        "delivered before the guest opened the port"
    );
    g.send(0, control::PORT_OPEN, 1);
    g.d.wait_used(rx(0), 2);
    // The input has ended, but not all of it is in the guest: no close yet.
    g.no_message();
    assert_eq!(g.read_to_eof(0), data);
}

#[test]
fn regular_files_and_dev_null_are_read_to_their_end() {
    use std::io::Seek;
    let data = binary(150_000, 5);
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&data).unwrap();
    file.rewind().unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    let mut g = Guest::new(
        vec![input_port("file", file), input_port("null", null)],
        None,
    );
    g.handshake();
    g.post(rx(1), 4, RX_BUF);
    g.send(1, control::PORT_OPEN, 1);
    assert_eq!(g.read_to_eof(1), b"");
    g.post(rx(0), 8, RX_BUF);
    g.send(0, control::PORT_OPEN, 1);
    assert!(g.read_to_eof(0) == data, "file input differs");
}

#[test]
fn a_blocked_writer_stalls_only_its_port_and_the_flush_gives_up_in_time() {
    // A reader that never reads: its socket buffer fills, then the writer thread blocks.
    let (stuck, _never_read) = UnixStream::pair().unwrap();
    let out = Sink::default();
    let mut g = Guest::new(
        vec![
            output_port("stuck", stuck),
            output_port("stdout", out.clone()),
        ],
        None,
    );
    g.handshake();
    let big = binary(2 << 20, 11);
    g.write(0, &big[..32 << 10], 32 << 10);
    for part in big.chunks(32 << 10).skip(1).take(60) {
        g.write(0, part, 32 << 10);
    }
    std::thread::sleep(Duration::from_millis(100));
    let used = g.d.used_idx(tx(0));
    assert!(
        used < g.pushed[&tx(0)],
        "a full output must hold back transmit buffers"
    );
    // The other port still works.
    g.write(1, b"still alive", 64);
    g.d.wait_used(tx(1), 1);
    assert_eq!(out.wait_len(11), b"still alive");
    // At the VM's end the flush gives up at its deadline.
    let started = Instant::now();
    g.flush.vm_stopped(started + Duration::from_millis(300));
    let flush = g.flush.clone();
    drop(g);
    let result = flush.finish();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
    let err = result.unwrap_err();
    assert!(err.contains("console port stuck"), "{err}");
    assert!(!err.contains("stdout"), "{err}");
}

#[test]
fn the_flush_writes_out_what_is_left_in_the_rings() {
    let out = Sink::default();
    let mut g = Guest::new(vec![output_port("stdout", out.clone())], None);
    g.handshake();
    let data = binary(300_000, 17);
    // Published but never kicked: the device has not seen it when the VM ends.
    for part in data.chunks(32 << 10) {
        let addr = g.alloc(part.len() as u32);
        g.d.put(addr, part);
        g.push(tx(0), &[(addr, part.len() as u32, R)]);
    }
    assert_eq!(g.d.used_idx(tx(0)), 0);
    g.flush.vm_stopped(Instant::now() + Duration::from_secs(2));
    let flush = g.flush.clone();
    drop(g);
    assert_eq!(flush.finish(), Ok(()));
    assert!(out.bytes() == data, "flushed output differs");
}

#[test]
fn a_driver_reset_does_not_flush() {
    let out = Sink::default();
    let mut g = Guest::new(vec![output_port("stdout", out.clone())], None);
    g.handshake();
    let addr = g.alloc(4);
    g.d.put(addr, b"left");
    g.push(tx(0), &[(addr, 4, R)]);
    g.d.reset();
    assert_eq!(g.d.used_idx(tx(0)), 0);
    assert_eq!(out.bytes(), b"");
}

#[test]
fn a_broken_pipe_ends_the_vm_silently() {
    let (closed, reader) = UnixStream::pair().unwrap();
    drop(reader);
    let exit = Arc::new(VmExit::new().unwrap());
    let mut g = Guest::new(vec![output_port("stdout", closed)], Some(exit.clone()));
    g.handshake();
    g.write(0, b"y\n", 2);
    assert!(g.d.wait_for(|| exit.reason().is_some()));
    assert_eq!(exit.reason(), Some(ExitReason::OutputClosed));
    // Later output is dropped; the guest keeps running.
    g.write(0, b"more", 4);
    g.d.wait_used(tx(0), 2);
    g.flush.vm_stopped(Instant::now() + Duration::from_secs(1));
    let flush = g.flush.clone();
    drop(g);
    assert_eq!(
        flush.finish(),
        Ok(()),
        "a broken pipe is the exit status's to report"
    );
}

#[test]
fn hostile_control_messages_are_ignored() {
    let mut g = Guest::new(vec![port("a"), port("b")], None);
    g.post(CTRL_RX, 32, 256);
    // Before DEVICE_READY, and nonsense: nothing answers.
    g.send(0, control::PORT_READY, 1);
    g.send(7, 99, 1);
    g.send_raw(&[1, 2, 3, 4]);
    g.send(u32::MAX, control::DEVICE_READY, 0);
    g.send(0, control::DEVICE_ADD, 1);
    g.send(0, control::PORT_NAME, 1);
    g.no_message();
    g.send(u32::MAX, control::DEVICE_READY, 1);
    for id in 0..2 {
        assert_eq!(g.recv().0.id, id);
    }
    // Bad ids and floods stay bounded: one answer per port, ever.
    for _ in 0..200 {
        g.send(u32::MAX, control::DEVICE_READY, 1);
        g.send(1000, control::PORT_READY, 1);
        g.send(1000, control::PORT_OPEN, 1);
    }
    g.no_message();
    g.send(1, control::PORT_READY, 1);
    assert_eq!(g.recv().1, b"b");
    assert_eq!(g.recv().0.event, control::PORT_OPEN);
    g.no_message();
    assert_eq!(g.d.read32(0x70) & 0x40, 0, "no reset needed");
}

#[test]
fn buffers_in_the_wrong_direction_or_outside_memory_need_a_reset() {
    let cases: [(u16, (u64, u32, bool)); 4] = [
        (CTRL_TX, (DATA, 8, W)),
        (tx(1), (DATA, 8, W)),
        (tx(0), (MEM_SIZE - 2, 8, R)),
        (CTRL_TX, (MEM_SIZE - 4, 8, R)),
    ];
    for (q, buffer) in cases {
        let mut g = Guest::new(vec![output_port("a", Sink::default()), port("b")], None);
        g.handshake();
        g.push(q, &[buffer]);
        g.d.kick(q);
        assert!(g.d.wait_needs_reset(), "queue {q} {buffer:?}");
    }
    // A control receive buffer the device would have to read: found when it has a message.
    let mut g = Guest::new(vec![port("a")], None);
    let addr = g.alloc(64);
    g.push(CTRL_RX, &[(addr, 64, R)]);
    g.send(u32::MAX, control::DEVICE_READY, 1);
    assert!(
        g.d.wait_needs_reset(),
        "control receive buffer the device reads"
    );
}

#[test]
fn a_restored_console_keeps_its_handshake_and_serves_the_next_runs_streams() {
    let mut g = Guest::new(vec![port("stdin"), port("stdout")], None);
    g.handshake();
    // Linux keeps receive buffers posted on an open port.
    g.post(rx(0), 2, RX_BUF);
    let (mut host, guest_side) = UnixStream::pair().unwrap();
    let out = Sink::default();
    let mut g = g.save_and_restore(vec![
        input_port("stdin", guest_side),
        output_port("stdout", out.clone()),
    ]);
    // No second DEVICE_ADD, PORT_NAME or PORT_OPEN: the guest's driver already has them.
    g.post(CTRL_RX, 4, 256);
    g.no_message();
    let data = binary(3000, 5);
    host.write_all(&data).unwrap();
    drop(host);
    g.send(0, control::PORT_OPEN, 1);
    assert_eq!(g.read_to_eof(0), data);
    g.write(1, b"after the restore", 5);
    assert_eq!(out.wait_len(17), b"after the restore");
}

#[test]
fn control_messages_unsent_at_the_save_are_sent_after_the_restore() {
    let mut g = Guest::new(vec![port("a"), port("b")], None);
    // DEVICE_READY without control receive buffers: both DEVICE_ADDs wait in the device.
    g.send(u32::MAX, control::DEVICE_READY, 1);
    let mut g = g.save_and_restore(vec![port("a"), port("b")]);
    g.post(CTRL_RX, 8, 256);
    for id in 0..2 {
        let (add, _) = g.recv();
        assert_eq!((add.id, add.event), (id, control::DEVICE_ADD));
    }
    g.send(1, control::PORT_READY, 1);
    let (name, payload) = g.recv();
    assert_eq!(
        (name.id, name.event, payload),
        (1, control::PORT_NAME, b"b".to_vec())
    );
}

#[test]
fn a_restore_onto_other_ports_is_refused() {
    let mut g = Guest::new(vec![port("a"), port("b")], None);
    g.handshake();
    let state = g.d.save();
    let console = Console::with_ports(vec![port("a")], None).unwrap();
    assert!(g.d.restore(Box::new(console), &state).is_err());
}
