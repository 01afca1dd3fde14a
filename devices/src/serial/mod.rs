//! The COM1 8250/16550A UART that carries the kernel console (`console=ttyS0`).
//!
//! Register emulation is vm-superio's; this module connects it to kvmbuild: the interrupt
//! leaves through an `EventFd` that the VMM registers as an irqfd for
//! the UART's interrupt line (COM1's IRQ 4 on kvmbuild's machine), and the guest's output goes to a
//! host writer (stdout, a file, or `std::io::sink()`).
//!
//! **Output buffering.** vm-superio writes and flushes every byte the guest transmits. One
//! host `write(2)` per byte would cost more than the guest's own PIO exit for it, so output is
//! kept in a line buffer and handed to the writer (and flushed) at each `'\n'`, or when the
//! buffer fills. Every complete console line therefore reaches the host at once and survives a
//! killed VMM; only a trailing partial line (a prompt, the last words of a panic) waits. The
//! VMM must call [`Serial::flush`] when the VM ends (and may call it whenever it wants partial
//! lines shown, e.g. before blocking for input). Dropping the device flushes too.
//!
//! **Input.** What the user types reaches the receive FIFO through [`SerialInput`], a
//! subscriber on the device thread. The UART tells it when the guest has emptied the FIFO
//! (vm-superio's `SerialEvents::in_buffer_empty`) on an `EventFd`, so a FIFO that is full
//! is waited on, not polled.

use std::io::{self, Write};

/// The UART's registers and receive FIFO, as vm-superio saves and restores them.
pub use vm_superio::serial::SerialState;
use vm_superio::serial::{Error as UartError, SerialEvents};
use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

mod input;

pub use input::SerialInput;

/// Length of the UART's I/O port range (from 0x3f8 for COM1).
pub const SERIAL_LEN: u64 = 8;

/// Output is handed to the host writer once a line is this long, even without a newline.
const LINE_CAPACITY: usize = 4096;

/// Errors from the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The interrupt eventfd could not be signalled.
    #[error("cannot raise the serial interrupt")]
    Interrupt(#[source] io::Error),
    /// Writing guest output to the host failed; the output was dropped.
    #[error("serial output lost")]
    Output(#[source] io::Error),
    /// A saved state the UART cannot have had (a receive FIFO over its 64 bytes).
    #[error("the saved serial state is impossible")]
    BadState,
}

/// Raises the UART interrupt by signalling the irqfd.
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the input side, on an `EventFd`, that the guest emptied the receive FIFO.
struct InputDrained(EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}

    fn out_byte(&self) {}

    fn tx_lost_byte(&self) {}

    fn in_buffer_empty(&self) {
        // The only failure is a saturated counter: the wake-up is already pending.
        let _ = self.0.write(1);
    }
}

/// The host side of the UART's transmitter: a line buffer in front of the real writer.
///
/// It never reports an error to vm-superio: the guest can do nothing about a closed stdout or
/// a full disk, and must keep running so its exit status still arrives. The first error is
/// kept for [`Serial::flush`] to report instead.
struct ConsoleOutput {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    error: Option<io::Error>,
}

impl ConsoleOutput {
    /// Hands the buffered bytes to the writer and flushes it.
    fn emit(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let result = self
            .out
            .write_all(&self.line)
            .and_then(|()| self.out.flush());
        // Dropped on failure rather than retried, so a dead writer cannot grow the buffer.
        self.line.clear();
        if let Err(e) = result {
            self.error.get_or_insert(e);
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.line.len() >= LINE_CAPACITY {
            self.emit();
        }
        Ok(buf.len())
    }

    /// Deliberately does nothing: vm-superio calls this after every byte, and the line
    /// boundary in `write` is where output is flushed (see the module documentation).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleOutput {
    fn drop(&mut self) {
        self.emit();
    }
}

/// The COM1 UART as a device on the PIO bus.
///
/// Register it at the UART's base port (0x3f8 for COM1) with length [`SERIAL_LEN`].
pub struct Serial {
    uart: Uart<IrqTrigger, InputDrained, ConsoleOutput>,
}

impl Serial {
    /// A UART that raises its interrupt on `irq` and writes guest output to `out`.
    ///
    /// `irq` is meant to be registered as an irqfd for GSI 4; see [`Serial::irq`]. Fails only
    /// when the input-drained `EventFd` cannot be created.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> io::Result<Self> {
        let drained = InputDrained(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok(Self {
            uart: Uart::with_events(IrqTrigger(irq), drained, Self::output(out)),
        })
    }

    /// A UART whose registers start as `state` (saved by [`Serial::state`]). Fails for a
    /// state whose receive FIFO holds more than a 16550A's.
    pub fn with_state(
        irq: EventFd,
        out: Box<dyn Write + Send>,
        state: &SerialState,
    ) -> Result<Self, SerialError> {
        let drained =
            InputDrained(EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::Interrupt)?);
        let uart =
            Uart::from_state(state, IrqTrigger(irq), drained, Self::output(out)).map_err(|e| {
                match e {
                    UartError::Trigger(e) => SerialError::Interrupt(e),
                    UartError::IOError(e) => SerialError::Output(e),
                    UartError::FullFifo => SerialError::BadState,
                }
            })?;
        Ok(Self { uart })
    }

    fn output(out: Box<dyn Write + Send>) -> ConsoleOutput {
        ConsoleOutput {
            out,
            line: Vec::with_capacity(256),
            error: None,
        }
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// The interrupt eventfd, for registering it as an irqfd.
    pub fn irq(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// A clone of the `EventFd` signalled each time the guest reads the last byte of the
    /// receive FIFO: the moment to offer it more input.
    pub fn input_drained_event(&self) -> io::Result<EventFd> {
        self.uart.events().0.try_clone()
    }

    /// Queues bytes for the guest to read, raising the receive interrupt if it is enabled.
    ///
    /// Returns how many bytes fit in the receive FIFO; 0 means it is full and the caller
    /// should retry the rest once the guest has read some.
    pub fn enqueue_input(&mut self, input: &[u8]) -> Result<usize, SerialError> {
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => Ok(n),
            Err(UartError::FullFifo) => Ok(0),
            Err(UartError::Trigger(e)) => Err(SerialError::Interrupt(e)),
            Err(UartError::IOError(e)) => Err(SerialError::Output(e)),
        }
    }

    /// Writes out any partial line and reports the first output error since the last call.
    pub fn flush(&mut self) -> Result<(), SerialError> {
        let out = self.uart.writer_mut();
        out.emit();
        match out.error.take() {
            Some(e) => Err(SerialError::Output(e)),
            None => Ok(()),
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data, u8::try_from(offset)) {
            ([byte], Ok(offset)) if u64::from(offset) < SERIAL_LEN => {
                *byte = self.uart.read(offset);
            }
            // The UART's registers are bytes; wider or stray reads see an absent device.
            (data, _) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let ([value], Ok(offset)) = (data, u8::try_from(offset)) else {
            return;
        };
        if u64::from(offset) < SERIAL_LEN {
            // Output errors never surface here (ConsoleOutput keeps them for `flush`). A failed
            // interrupt write means the eventfd counter is saturated, so an interrupt is
            // already pending: nothing is lost by ignoring it.
            let _ = self.uart.write(offset, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    // UART register offsets and bits used by the tests (16550A data sheet).
    pub(super) const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    pub(super) const LSR: u64 = 5;
    const SCR: u64 = 7;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    pub(super) const LSR_DATA_READY: u8 = 0x01;

    /// A writer the test can inspect, counting the writer-level flushes.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.lock().unwrap().1 += 1;
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> Vec<u8> {
            self.0.lock().unwrap().0.clone()
        }
        fn flushes(&self) -> usize {
            self.0.lock().unwrap().1
        }
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial_with(out: Box<dyn Write + Send>) -> Serial {
        Serial::new(EventFd::new(EFD_NONBLOCK).unwrap(), out).unwrap()
    }

    fn put(serial: &mut Serial, text: &[u8]) {
        for &b in text {
            serial.write(DATA, &[b]);
        }
    }

    fn get(serial: &mut Serial, offset: u64) -> u8 {
        let mut b = [0];
        serial.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn output_is_written_and_flushed_per_line() {
        let out = Shared::default();
        let mut serial = serial_with(Box::new(out.clone()));
        put(&mut serial, b"Linux version");
        assert_eq!(out.text(), b"");
        put(&mut serial, b" 6.1\r\nlogin: ");
        assert_eq!(out.text(), b"Linux version 6.1\r\n");
        assert_eq!(out.flushes(), 1);
        serial.flush().unwrap();
        assert_eq!(out.text(), b"Linux version 6.1\r\nlogin: ");
        // Nothing pending: no further writer flush.
        serial.flush().unwrap();
        assert_eq!(out.flushes(), 2);
    }

    #[test]
    fn long_lines_are_emitted_when_the_buffer_fills() {
        let out = Shared::default();
        let mut serial = serial_with(Box::new(out.clone()));
        put(&mut serial, &[b'x'; LINE_CAPACITY + 1]);
        assert_eq!(out.text().len(), LINE_CAPACITY);
    }

    #[test]
    fn dropping_the_device_writes_the_partial_line() {
        let out = Shared::default();
        let mut serial = serial_with(Box::new(out.clone()));
        put(&mut serial, b"Kernel panic");
        drop(serial);
        assert_eq!(out.text(), b"Kernel panic");
    }

    #[test]
    fn output_errors_are_reported_by_flush_not_to_the_guest() {
        let mut serial = serial_with(Box::new(Broken));
        put(&mut serial, b"lost\n");
        // The guest still sees an empty transmitter and can keep going.
        assert_ne!(get(&mut serial, LSR) & 0x20, 0);
        assert!(matches!(serial.flush(), Err(SerialError::Output(_))));
        serial.flush().unwrap();
    }

    #[test]
    fn transmit_raises_the_interrupt_when_enabled() {
        let mut serial = serial_with(Box::new(io::sink()));
        serial.write(IER, &[IER_THRE]);
        // Enabling THRE with an empty transmitter asserts it at once.
        assert_eq!(serial.irq().read().unwrap(), 1);
        assert_eq!(get(&mut serial, IIR) & 0x0f, 0x02);
        put(&mut serial, b"a");
        assert_eq!(serial.irq().read().unwrap(), 1);
    }

    #[test]
    fn input_is_read_back_by_the_guest() {
        let mut serial = serial_with(Box::new(io::sink()));
        serial.write(IER, &[IER_RDA]);
        assert_eq!(serial.enqueue_input(b"hi").unwrap(), 2);
        assert_eq!(serial.irq().read().unwrap(), 1);
        assert_ne!(get(&mut serial, LSR) & LSR_DATA_READY, 0);
        assert_eq!(get(&mut serial, DATA), b'h');
        assert_eq!(get(&mut serial, DATA), b'i');
        assert_eq!(get(&mut serial, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn reading_the_last_input_byte_signals_the_drained_event() {
        let mut serial = serial_with(Box::new(io::sink()));
        let drained = serial.input_drained_event().unwrap();
        serial.enqueue_input(b"ab").unwrap();
        assert_eq!(get(&mut serial, DATA), b'a');
        assert!(drained.read().is_err(), "signalled with a byte left");
        assert_eq!(get(&mut serial, DATA), b'b');
        assert_eq!(drained.read().unwrap(), 1);
    }

    #[test]
    fn a_full_fifo_accepts_nothing_more() {
        let mut serial = serial_with(Box::new(io::sink()));
        let big = [b'z'; 1024];
        let taken = serial.enqueue_input(&big).unwrap();
        assert!(taken > 0 && taken < big.len());
        assert_eq!(serial.enqueue_input(b"more").unwrap(), 0);
        assert_eq!(serial.enqueue_input(b"").unwrap(), 0);
    }

    #[test]
    fn registers_keep_their_values() {
        let mut serial = serial_with(Box::new(io::sink()));
        serial.write(SCR, &[0x5a]);
        assert_eq!(get(&mut serial, SCR), 0x5a);
        serial.write(LCR, &[0x03]);
        assert_eq!(get(&mut serial, LCR), 0x03);
    }

    #[test]
    fn sits_on_the_pio_bus_at_com1() {
        let out = Shared::default();
        let serial: crate::bus::SharedDevice =
            Arc::new(Mutex::new(serial_with(Box::new(out.clone()))));
        let mut bus = crate::bus::Bus::new();
        let com1 = 0x3f8;
        bus.insert(serial, com1, SERIAL_LEN).unwrap();
        for &b in b"ok\n" {
            assert!(bus.write(com1 + DATA, &[b]));
        }
        assert_eq!(out.text(), b"ok\n");
    }

    #[test]
    fn odd_sizes_and_offsets_are_harmless() {
        let out = Shared::default();
        let mut serial = serial_with(Box::new(out.clone()));
        serial.write(SCR, &[0x11]);
        let mut wide = [0u8; 4];
        serial.read(SCR, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        serial.read(SCR, &mut []);
        for offset in [8, 0x100, u64::MAX] {
            assert_eq!(get(&mut serial, offset), 0xff);
            serial.write(offset, b"!\n");
            serial.write(offset, b"\n");
        }
        serial.write(DATA, b"a\n");
        serial.write(DATA, &[]);
        serial.write(SCR, &[1, 2]);
        serial.flush().unwrap();
        assert_eq!(out.text(), b"");
        assert_eq!(get(&mut serial, SCR), 0x11);
    }
}
