//! The user's input to the serial port (ttyS0), served on the device thread.
//!
//! The 8250 has a 64-byte receive FIFO and no flow control towards the host. [`SerialInput`]
//! reads the host side (the terminal, normally) when epoll reports it readable and puts what
//! it read into the FIFO. When the FIFO is full it stops watching the input, keeps the rest of
//! what it read, and waits for the UART's input-drained event (the guest read the FIFO's last
//! byte) to offer it again: keystrokes are never dropped, a paste larger than the FIFO
//! arrives whole and in order, and nothing polls or sleeps. At end of input (or a read error)
//! it stops watching for good, and once the VM is ending it reads nothing more, so what is
//! typed then stays for the shell.

use std::fs::File;
use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::Serial;
use crate::exit::VmExit;

/// Bytes read per read(2): what may wait outside the FIFO at most.
const READ_CHUNK: usize = 256;

/// Event data of the host input.
const INPUT: u32 = 0;
/// Event data of the UART's input-drained event.
const DRAINED: u32 = 1;

/// Feeds the serial port's receive FIFO from a host file; a device-thread subscriber.
pub struct SerialInput {
    input: File,
    serial: Arc<Mutex<Serial>>,
    exit: Arc<VmExit>,
    drained: EventFd,
    /// Read from the input, not yet taken by the FIFO; at most [`READ_CHUNK`] bytes.
    pending: Vec<u8>,
    /// Whether the input is registered with the event loop.
    watching: bool,
    /// The input ended, failed, or the UART did: nothing more is read.
    ended: bool,
}

impl SerialInput {
    /// A subscriber that copies `input` into `serial`'s receive FIFO until `exit` is
    /// requested. `input` should be an unbuffered descriptor epoll accepts (a terminal or a
    /// pipe, e.g. a dup of stdin).
    pub fn new(input: File, serial: Arc<Mutex<Serial>>, exit: Arc<VmExit>) -> io::Result<Self> {
        let drained = lock(&serial).input_drained_event()?;
        Ok(Self {
            input,
            serial,
            exit,
            drained,
            pending: Vec::with_capacity(READ_CHUNK),
            watching: false,
            ended: false,
        })
    }

    /// Reads once from the input (epoll said it is readable), then offers what was read.
    fn read_input(&mut self, ops: &mut EventOps) {
        if self.exit.is_requested() {
            self.end(ops);
            return;
        }
        let mut buf = [0u8; READ_CHUNK];
        // Epoll reported the input readable, so this read returns at once; the descriptor is
        // not made non-blocking because its file description is shared with the terminal.
        match self.input.read(&mut buf) {
            Ok(0) => self.end(ops),
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                self.offer(ops);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(_) => self.end(ops),
        }
    }

    /// Puts as much pending input in the FIFO as fits; watches the input only while nothing
    /// is pending, so a full FIFO holds the rest back in the host's buffers.
    fn offer(&mut self, ops: &mut EventOps) {
        if !self.pending.is_empty() {
            let taken = lock(&self.serial).enqueue_input(&self.pending);
            match taken {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(_) => {
                    self.pending.clear();
                    self.end(ops);
                }
            }
        }
        let want = self.pending.is_empty() && !self.ended;
        self.set_watching(ops, want);
    }

    fn set_watching(&mut self, ops: &mut EventOps, want: bool) {
        if want == self.watching {
            return;
        }
        let events = Events::with_data(&self.input, INPUT, EventSet::IN);
        let result = if want {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.watching = want,
            // An input epoll refuses cannot be served without polling; it is left unread.
            Err(_) if want => self.ended = true,
            Err(_) => {}
        }
    }

    /// Stops reading the input for good (what is pending is still delivered).
    fn end(&mut self, ops: &mut EventOps) {
        self.ended = true;
        self.set_watching(ops, false);
    }
}

fn lock(serial: &Mutex<Serial>) -> std::sync::MutexGuard<'_, Serial> {
    // A vCPU that panicked holding the UART left its registers consistent: each access is
    // one register read or write.
    serial.lock().unwrap_or_else(|p| p.into_inner())
}

/// On the device thread beside the virtio workers; never part of a snapshot (COM1's registers
/// are saved on their own).
impl crate::virtio::Worker for SerialInput {}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            INPUT => self.read_input(ops),
            DRAINED => {
                // Clear the wake-up; a failed read only means there was none.
                let _ = self.drained.read();
                self.offer(ops);
            }
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let drained = Events::with_data(&self.drained, DRAINED, EventSet::IN);
        if ops.add(drained).is_err() {
            // Without the drained event a full FIFO could never be refilled.
            self.ended = true;
            return;
        }
        self.set_watching(ops, true);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{DATA as RBR, LSR, LSR_DATA_READY as DATA_READY};
    use super::*;
    use crate::bus::BusDevice;
    use event_manager::{EventManager, SubscriberOps};
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::time::{Duration, Instant};

    /// The 16550A's receive FIFO.
    const FIFO_LEN: usize = 64;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are fresh and owned by nothing else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    /// Bytes waiting in a pipe, not yet read by anyone.
    fn unread(pipe: &File) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int to the valid pointer.
        let rc = unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0);
        usize::try_from(n).unwrap()
    }

    fn running() -> Arc<VmExit> {
        Arc::new(VmExit::new().unwrap())
    }

    fn serial() -> Arc<Mutex<Serial>> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Arc::new(Mutex::new(Serial::new(irq, Box::new(io::sink())).unwrap()))
    }

    /// An event loop running only the input of `serial` for a VM that ends on `exit`, read
    /// from a new pipe; returns the loop, the pipe's write end, and a clone of its read end.
    fn input_loop_until(
        serial: &Arc<Mutex<Serial>>,
        exit: Arc<VmExit>,
    ) -> (EventManager<SerialInput>, File, File) {
        let (reader, writer) = pipe();
        let probe = reader.try_clone().unwrap();
        let mut manager = EventManager::new().unwrap();
        manager.add_subscriber(SerialInput::new(reader, serial.clone(), exit).unwrap());
        (manager, writer, probe)
    }

    fn input_loop(serial: &Arc<Mutex<Serial>>) -> (EventManager<SerialInput>, File, File) {
        input_loop_until(serial, running())
    }

    /// Whether the guest would see a byte, and the byte it reads then.
    fn guest_read(serial: &Mutex<Serial>) -> Option<u8> {
        let mut uart = serial.lock().unwrap();
        let mut status = [0u8];
        uart.read(LSR, &mut status);
        if status[0] & DATA_READY == 0 {
            return None;
        }
        let mut byte = [0u8];
        uart.read(RBR, &mut byte);
        Some(byte[0])
    }

    /// Runs the loop and reads what the guest would, until `want` bytes or a quiet second.
    fn guest_reads(
        manager: &mut EventManager<SerialInput>,
        serial: &Mutex<Serial>,
        want: usize,
    ) -> Vec<u8> {
        let mut got = Vec::new();
        let mut last = Instant::now();
        while got.len() < want && last.elapsed() < Duration::from_secs(1) {
            manager.run_with_timeout(10).unwrap();
            while let Some(byte) = guest_read(serial) {
                got.push(byte);
                last = Instant::now();
            }
        }
        got
    }

    #[test]
    fn input_larger_than_the_fifo_arrives_whole_and_in_order() {
        let serial = serial();
        let (mut manager, mut writer, _) = input_loop(&serial);
        let sent: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        writer.write_all(&sent).unwrap();
        assert_eq!(guest_reads(&mut manager, &serial, sent.len()), sent);
    }

    #[test]
    fn a_full_fifo_holds_the_rest_in_the_pipe_without_waking_the_loop() {
        let serial = serial();
        let (mut manager, mut writer, probe) = input_loop(&serial);
        let sent: Vec<u8> = (0..4 * READ_CHUNK as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        writer.write_all(&sent).unwrap();
        // The FIFO fills; the loop then sleeps although the pipe still holds input.
        while manager.run_with_timeout(50).unwrap() > 0 {}
        assert!(
            unread(&probe) >= sent.len() - READ_CHUNK,
            "read past one chunk"
        );
        assert_eq!(
            manager.run_with_timeout(50).unwrap(),
            0,
            "woken by a full FIFO"
        );
        // Draining the FIFO wakes it, and everything arrives in order.
        let mut got = Vec::new();
        while let Some(byte) = guest_read(&serial) {
            got.push(byte);
        }
        assert_eq!(got.len(), FIFO_LEN);
        got.extend(guest_reads(&mut manager, &serial, sent.len() - FIFO_LEN));
        assert_eq!(got, sent);
    }

    #[test]
    fn end_of_input_delivers_what_came_before_and_stops_watching() {
        let serial = serial();
        let (mut manager, mut writer, _) = input_loop(&serial);
        writer.write_all(b"last words").unwrap();
        drop(writer);
        assert_eq!(guest_reads(&mut manager, &serial, 10), b"last words");
        // Reading the last byte signalled the drained event once; after that, a closed pipe
        // (always readable) still being watched would wake the loop at once.
        manager.run_with_timeout(0).unwrap();
        assert_eq!(manager.run_with_timeout(50).unwrap(), 0);
    }

    #[test]
    fn nothing_is_read_once_the_vm_is_ending() {
        let serial = serial();
        let exit = running();
        let (mut manager, mut writer, probe) = input_loop_until(&serial, exit.clone());
        writer.write_all(b"ls\r").unwrap();
        assert_eq!(guest_reads(&mut manager, &serial, 3), b"ls\r");
        exit.request(crate::exit::ExitReason::PowerOff);
        writer.write_all(b"exit\r").unwrap();
        manager.run_with_timeout(50).unwrap();
        assert_eq!(unread(&probe), 5, "typed after the VM ended, and read");
        assert_eq!(guest_read(&serial), None);
        // And the input is no longer watched.
        assert_eq!(manager.run_with_timeout(50).unwrap(), 0);
    }

    #[test]
    fn serves_input_on_the_device_thread() {
        let serial = serial();
        let (reader, mut writer) = pipe();
        let thread = crate::virtio::DeviceThread::start().unwrap();
        let input = SerialInput::new(reader, serial.clone(), running()).unwrap();
        thread.handle().add(Box::new(input)).unwrap();
        let sent: Vec<u8> = (0..300u32).map(|i| (i % 241) as u8).collect();
        writer.write_all(&sent).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < sent.len() && Instant::now() < deadline {
            match guest_read(&serial) {
                Some(byte) => got.push(byte),
                None => std::thread::sleep(Duration::from_micros(200)),
            }
        }
        assert_eq!(got, sent);
        thread.stop().unwrap();
    }
}
