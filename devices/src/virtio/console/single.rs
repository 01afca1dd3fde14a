//! The single-port console (no `VIRTIO_CONSOLE_F_MULTIPORT`): the guest's `/dev/hvc0`.
//!
//! Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq) the guest's output
//! to a host writer (stdout or a file). Output goes through the same writer thread and bounded
//! buffer as a multiport console's port ([`Output`]): the device thread never blocks on the
//! host writer, so a reader that stops reading holds back the guest's writes (back-pressure)
//! but neither the other devices nor the VM's end, whose flush waits until a deadline
//! ([`ConsoleFlush`]). A broken pipe ends the VM as it does for a port.
//!
//! Input comes from an optional file descriptor (e.g. a dup of stdin when it is a terminal),
//! watched on the device thread while the device runs. Bytes read wait in a bounded buffer
//! until the guest offers receive buffers; while that buffer is full, the descriptor is not
//! watched, so a guest that never reads cannot make the host buffer without bound.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::super::chain::{next_chain_or_rearm, notify_used, used_len, writable_chain, ChainError};
use super::super::{
    features, register_queue_events, ActivateError, Activation, DeviceWorker, Interrupt,
};
use super::flush::{ConsoleFlush, FlushState};
use super::output::{Output, OutputError};
use super::tx::Transmit;
#[cfg(test)]
use super::Console;
use super::{lock, ConsoleInput, QUEUE_SIZE};
use crate::exit::VmExit;

const RX: usize = 0;
const TX: usize = 1;
/// Event data tag of the input descriptor (queue events use their index).
const INPUT_TOKEN: u32 = 2;
/// Event data tag of the output's room event.
const ROOM_TOKEN: u32 = 3;
/// The port's name in messages about its output.
const NAME: &str = "hvc0";
/// Host input buffered for the guest at most.
const PENDING_MAX: usize = 64 << 10;
/// Bytes read from the input per wake-up.
const CHUNK: usize = 4096;
/// Size of the configuration space (cols, rows, max_nr_ports, emerg_wr).
pub(super) const CONFIG_LEN: usize = 12;

type SharedInput = Arc<Mutex<Box<dyn ConsoleInput>>>;

/// The host side of the single-port console, kept across device resets.
pub(super) struct SinglePort {
    output: Output,
    input: Option<SharedInput>,
    flush: Arc<FlushState>,
}

impl SinglePort {
    /// Starts the writer thread for `output`; a broken pipe requests
    /// [`ExitReason::OutputClosed`](crate::exit::ExitReason::OutputClosed) through `exit`, if
    /// given.
    pub(super) fn new(
        output: Box<dyn Write + Send>,
        exit: Option<Arc<VmExit>>,
    ) -> Result<Self, OutputError> {
        let output = Output::start(NAME, output, exit)?;
        Ok(Self {
            flush: Arc::new(FlushState::new(vec![output.clone()])),
            output,
            input: None,
        })
    }

    pub(super) fn flush_handle(&self) -> ConsoleFlush {
        ConsoleFlush::new(self.flush.clone())
    }

    pub(super) fn set_input(&mut self, input: Box<dyn ConsoleInput>) {
        self.input = Some(Arc::new(Mutex::new(input)));
    }

    pub(super) const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];

    pub(super) fn features() -> u64 {
        features::VERSION_1 | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX
    }

    /// The configuration space: all zero, as no feature that gives it meaning is offered.
    pub(super) fn config() -> [u8; CONFIG_LEN] {
        [0; CONFIG_LEN]
    }

    pub(super) fn activate(&self, a: Activation) -> Result<DeviceWorker, ActivateError> {
        a.expect_queues(2)?;
        a.expect_fresh()?;
        let input_fd = self.input.as_ref().map(|i| lock(i).as_raw_fd());
        let (queues, events): (Vec<_>, Vec<_>) = a.queues.into_iter().unzip();
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: 0,
            });
        };
        Ok(Box::new(ConsoleWorker {
            mem: a.mem,
            rx,
            tx,
            events,
            interrupt: a.interrupt,
            output: self.output.clone(),
            transmit: Transmit::new(),
            flush: self.flush.clone(),
            input: self.input.clone(),
            input_fd,
            input_watched: false,
            pending: VecDeque::new(),
            broken: false,
        }))
    }
}

impl Drop for SinglePort {
    fn drop(&mut self) {
        // Lets the writer thread end once it has written what it holds.
        self.flush.close_outputs();
    }
}

/// The running device.
struct ConsoleWorker {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    events: Vec<EventFd>,
    interrupt: Interrupt,
    output: Output,
    /// The transmit queue's chain waiting for room in the output, if any.
    transmit: Transmit,
    flush: Arc<FlushState>,
    input: Option<SharedInput>,
    /// The input descriptor while it is worth watching; `None` after end of file.
    input_fd: Option<RawFd>,
    input_watched: bool,
    /// Host input the guest has not taken yet.
    pending: VecDeque<u8>,
    /// Set once the guest broke a queue; nothing more is done until reset.
    broken: bool,
}

impl ConsoleWorker {
    fn fail(&mut self) {
        self.broken = true;
        self.interrupt.set_needs_reset();
    }

    /// Copies the transmit buffers to the output while it has room; a buffer left waiting is
    /// resumed by the output's room event.
    fn run_tx(&mut self) {
        if self.broken {
            return;
        }
        let mut used_any = false;
        let result = self
            .transmit
            .run(&mut self.tx, &self.mem, Some(&self.output), &mut used_any);
        if used_any {
            notify_used(&mut self.tx, &self.mem, &self.interrupt);
        }
        if result.is_err() {
            self.fail();
        }
    }

    /// At the VM's end: writes out the transmit buffers, waiting for room until `deadline`.
    fn drain_at_end(&mut self, deadline: std::time::Instant) {
        loop {
            self.run_tx();
            if self.broken || !self.transmit.is_waiting() {
                return;
            }
            if !self.output.wait_for_room(deadline) {
                self.flush.lost(format!(
                    "console port {NAME}: the guest's last output was not taken in time"
                ));
                return;
            }
        }
    }

    /// Reads what the input has (once per wake-up) into the pending buffer.
    fn read_input(&mut self, events: EventSet) {
        let Some(input) = &self.input else { return };
        if !events.contains(EventSet::IN) {
            // Hang-up or error without data: nothing more will come.
            self.input_fd = None;
            return;
        }
        let room = PENDING_MAX.saturating_sub(self.pending.len()).min(CHUNK);
        let mut buf = [0u8; CHUNK];
        match lock(input).read(&mut buf[..room]) {
            Ok(0) => self.input_fd = None,
            Ok(n) => self.pending.extend(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.input_fd = None,
        }
    }

    /// Moves pending input into the guest's receive buffers.
    fn deliver_input(&mut self) {
        let mut used_any = false;
        let result = self.fill_rx(&mut used_any);
        if used_any {
            notify_used(&mut self.rx, &self.mem, &self.interrupt);
        }
        if result.is_err() {
            self.fail();
        }
    }

    fn fill_rx(&mut self, used_any: &mut bool) -> Result<(), ChainError> {
        while !self.pending.is_empty() {
            let Some(chain) = next_chain_or_rearm(&mut self.rx, &self.mem)? else {
                return Ok(());
            };
            let head = chain.head_index();
            let n = receive(&self.mem, chain, &mut self.pending)?;
            self.rx
                .add_used(&self.mem, head, n)
                .map_err(|_| ChainError::Ring)?;
            *used_any = true;
        }
        Ok(())
    }

    /// Watches the input descriptor exactly while there is room for more input.
    fn update_input_watch(&mut self, ops: &mut EventOps) {
        let want = self.input_fd.is_some() && self.pending.len() < PENDING_MAX && !self.broken;
        if want == self.input_watched {
            return;
        }
        let Some(fd) = self
            .input_fd
            .or(self.input.as_ref().map(|i| lock(i).as_raw_fd()))
        else {
            return;
        };
        let events = Events::with_data_raw(fd, INPUT_TOKEN, EventSet::IN);
        let done = if want {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        if done.is_ok() {
            self.input_watched = want;
        } else if want {
            // An input that cannot be watched is treated as closed.
            self.input_fd = None;
        }
    }
}

/// Fills one receive chain from `pending`; returns the bytes written.
fn receive(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    pending: &mut VecDeque<u8>,
) -> Result<u32, ChainError> {
    let mut writer = writable_chain(mem, chain, usize::from(QUEUE_SIZE))?;
    let data = pending.make_contiguous();
    let n = writer.write(data).map_err(|_| ChainError::Memory)?;
    pending.drain(..n);
    used_len(n)
}

/// Not saved: hvc0 is `kvmbuild run`'s console, which no snapshot holds running.
impl crate::virtio::Worker for ConsoleWorker {}

impl MutEventSubscriber for ConsoleWorker {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == ROOM_TOKEN {
            // Clear the event (level-triggered) even when broken.
            let _ = self.output.room_event().read();
            self.run_tx();
        } else if !self.broken {
            match events.data() {
                INPUT_TOKEN => {
                    self.read_input(events.event_set());
                    self.deliver_input();
                }
                data => {
                    let queue = data as usize;
                    if let Some(e) = self.events.get(queue) {
                        // Clear the kick; a failed read only means there was none.
                        let _ = e.read();
                    }
                    match queue {
                        RX => self.deliver_input(),
                        TX => self.run_tx(),
                        _ => {}
                    }
                }
            }
        }
        self.update_input_watch(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let room = Events::with_data(self.output.room_event(), ROOM_TOKEN, EventSet::IN);
        if !register_queue_events(ops, &self.events) || ops.add(room).is_err() {
            self.fail();
            return;
        }
        // Output published before activation would otherwise wait for the next kick.
        self.run_tx();
        self.update_input_watch(ops);
    }
}

impl Drop for ConsoleWorker {
    fn drop(&mut self) {
        // Only once the VM has stopped for good: a worker dropped by a driver reset must not
        // touch rings that are no longer the device's.
        if let Some(deadline) = self.flush.deadline() {
            self.drain_at_end(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::ExitReason;
    use crate::virtio::testing::{Driver, Sink, DATA, MEM_SIZE, R, W};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    const FEATURES: u64 = features::VERSION_1 | features::RING_EVENT_IDX;

    fn console(input: Option<UnixStream>) -> (Driver, Sink) {
        let sink = Sink::default();
        let mut dev = Console::new(Box::new(sink.clone()), None).unwrap();
        if let Some(input) = input {
            dev = dev.with_input(Box::new(input));
        }
        let d = Driver::new(Box::new(dev));
        d.init(FEATURES, &[16, 16]);
        (d, sink)
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let (d, sink) = console(None);
        d.put(DATA, b"hello ");
        d.put(DATA + 0x100, b"world\n");
        d.push(1, &[(DATA, 6, R), (DATA + 0x100, 6, R)]);
        d.kick(1);
        assert_eq!(d.wait_used(1, 1), (0, 0));
        assert_eq!(sink.wait_len(12), b"hello world\n");
    }

    #[test]
    fn output_larger_than_a_chunk_is_complete() {
        let (d, sink) = console(None);
        let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        d.put(DATA, &big);
        d.push(1, &[(DATA, big.len() as u32, R)]);
        d.kick(1);
        d.wait_used(1, 1);
        assert_eq!(sink.wait_len(big.len()), big);
    }

    /// A console writing to `out`, with the handle that flushes it at the VM's end.
    fn console_to(
        out: impl Write + Send + 'static,
        exit: Option<Arc<VmExit>>,
    ) -> (Driver, ConsoleFlush) {
        let dev = Console::new(Box::new(out), exit).unwrap();
        let flush = dev.flush_handle();
        let d = Driver::new(Box::new(dev));
        d.init(FEATURES, &[16, 16]);
        (d, flush)
    }

    /// Publishes `data` on the transmit queue in `piece`-sized buffers, without a kick.
    fn publish(d: &Driver, data: &[u8], piece: usize) -> u16 {
        let mut addr = DATA;
        let mut count = 0;
        for part in data.chunks(piece) {
            d.put(addr, part);
            d.push(1, &[(addr, part.len() as u32, R)]);
            addr += part.len() as u64;
            count += 1;
        }
        count
    }

    #[test]
    fn a_reader_that_never_reads_holds_the_guest_back_and_the_flush_gives_up_in_time() {
        // Its socket buffer fills, then the writer thread blocks; the device thread must not.
        let (stuck, _never_read) = UnixStream::pair().unwrap();
        let (d, flush) = console_to(stuck, None);
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7) as u8).collect();
        let pushed = publish(&d, &data[..1 << 20], 64 << 10);
        d.kick(1);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            d.used_idx(1) < pushed,
            "a full output must hold back transmit buffers"
        );
        let started = Instant::now();
        flush.vm_stopped(started + Duration::from_millis(300));
        drop(d);
        let result = flush.finish();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?}");
        let err = result.unwrap_err();
        assert!(err.contains("console port hvc0"), "{err}");
    }

    #[test]
    fn the_flush_writes_out_what_is_left_in_the_ring() {
        let sink = Sink::default();
        let (d, flush) = console_to(sink.clone(), None);
        let data: Vec<u8> = (0..600_000u32).map(|i| (i * 13) as u8).collect();
        // Published but never kicked: the device has not seen it when the VM ends, and it is
        // more than the output buffers at once.
        publish(&d, &data, 60_000);
        assert_eq!(d.used_idx(1), 0);
        flush.vm_stopped(Instant::now() + Duration::from_secs(5));
        drop(d);
        assert_eq!(flush.finish(), Ok(()));
        assert!(sink.bytes() == data, "flushed output differs");
    }

    #[test]
    fn a_broken_pipe_ends_the_vm() {
        let (closed, reader) = UnixStream::pair().unwrap();
        drop(reader);
        let exit = Arc::new(VmExit::new().unwrap());
        let (d, _flush) = console_to(closed, Some(exit.clone()));
        publish(&d, b"y\n", 2);
        d.kick(1);
        assert!(d.wait_for(|| exit.reason().is_some()));
        assert_eq!(exit.reason(), Some(ExitReason::OutputClosed));
    }

    #[test]
    fn host_input_fills_receive_buffers() {
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        let (d, _) = console(Some(guest_side));
        host.write_all(b"typed").unwrap();
        // Input waits until the guest offers buffers.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(d.used_idx(0), 0);
        d.push(0, &[(DATA, 3, W)]);
        d.push(0, &[(DATA + 0x100, 64, W)]);
        d.kick(0);
        assert_eq!(d.wait_used(0, 1), (0, 3));
        assert_eq!(d.wait_used(0, 2), (1, 2));
        assert_eq!(d.get(DATA, 3), b"typ");
        assert_eq!(d.get(DATA + 0x100, 2), b"ed");
        // Input arriving while buffers wait is delivered at once.
        d.push(0, &[(DATA + 0x200, 64, W)]);
        d.kick(0);
        host.write_all(b"more").unwrap();
        assert_eq!(d.wait_used(0, 3), (2, 4));
        assert_eq!(d.get(DATA + 0x200, 4), b"more");
    }

    #[test]
    fn closed_input_is_harmless() {
        let (host, guest_side) = UnixStream::pair().unwrap();
        let (d, sink) = console(Some(guest_side));
        drop(host);
        d.put(DATA, b"still here");
        d.push(1, &[(DATA, 10, R)]);
        d.kick(1);
        d.wait_used(1, 1);
        assert_eq!(sink.wait_len(10), b"still here");
    }

    #[test]
    fn wrong_direction_or_bad_buffers_mark_needs_reset() {
        let cases: [(u16, (u64, u32, bool)); 3] = [
            (1, (DATA, 4, W)),
            (1, (MEM_SIZE - 2, 4, R)),
            (0, (DATA, 4, R)),
        ];
        for (q, buffer) in cases {
            let (mut host, guest_side) = UnixStream::pair().unwrap();
            let (d, _) = console(Some(guest_side));
            host.write_all(b"x").unwrap();
            d.push(q, &[buffer]);
            d.kick(q);
            assert!(d.wait_needs_reset(), "queue {q} {buffer:?}");
        }
    }
}
