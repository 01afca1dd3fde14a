//! The user's input to the guest's serial port (ttyS0): a thread that reads the host side (the
//! terminal, normally) and feeds the UART's receive FIFO as fast as the guest drains it.
//!
//! The 8250 has a 64-byte FIFO and no flow control the host can wait on, so when it is full the
//! pump waits a little and tries again: keystrokes are never dropped, and a paste larger than
//! the FIFO arrives whole, in order. The thread ends at the end of the input, on a read error,
//! or within [`POLL_INTERVAL`] of the VM ending.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::exit::VmExit;
use devices::serial::Serial;

/// How often the pump looks at whether the VM has ended while it waits for input.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long it waits before retrying a full receive FIFO (the guest drains it on an interrupt).
const FIFO_RETRY: Duration = Duration::from_millis(2);

/// Starts the thread that copies `input` into `serial` until the input ends or `exit` is
/// requested.
pub fn start(
    input: File,
    serial: Arc<Mutex<Serial>>,
    exit: Arc<VmExit>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("serial-input".into())
        .spawn(move || pump(input, &serial, &exit))
}

/// Waits for the pump to notice that the VM has ended, so that it reads nothing more from the
/// terminal once kvmbuild is done with it. Bounded: a pump stuck in a read is left behind.
pub fn wait_stopped(pump: JoinHandle<()>) {
    let deadline = Instant::now() + POLL_INTERVAL * 10;
    while !pump.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn pump(mut input: File, serial: &Mutex<Serial>, exit: &VmExit) {
    let mut buf = [0u8; 256];
    while !exit.is_requested() {
        match wait_readable(&input, POLL_INTERVAL) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(_) => return,
        }
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !deliver(&buf[..n], serial, exit) {
            return;
        }
    }
}

/// Hands `bytes` to the UART, waiting while its FIFO is full. False if the VM ended first or
/// the UART failed.
fn deliver(mut bytes: &[u8], serial: &Mutex<Serial>, exit: &VmExit) -> bool {
    while !bytes.is_empty() {
        if exit.is_requested() {
            return false;
        }
        let taken = serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(bytes);
        match taken {
            Ok(0) => std::thread::sleep(FIFO_RETRY),
            Ok(n) => bytes = &bytes[n..],
            Err(_) => return false,
        }
    }
    true
}

/// Whether `file` has input (or its end) within `timeout`.
fn wait_readable(file: &File, timeout: Duration) -> io::Result<bool> {
    let mut fd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd that outlives the call.
    match unsafe { libc::poll(&mut fd, 1, ms) } {
        n if n < 0 => {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => Ok(false),
                _ => Err(e),
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::bus::BusDevice;
    use devices::exit::ExitReason;
    use std::io::Write;
    use vmm_sys_util::eventfd::EventFd;

    /// Receiver buffer and line status registers, and LSR's data-ready bit.
    const RBR: u64 = 0;
    const LSR: u64 = 5;
    const DATA_READY: u8 = 1;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are fresh and owned by nothing else.
        unsafe {
            use std::os::fd::FromRawFd;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        }
    }

    fn serial() -> Arc<Mutex<Serial>> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Arc::new(Mutex::new(Serial::new(irq, Box::new(io::sink()))))
    }

    /// Reads what the guest would, byte by byte, until `want` bytes or a quiet second.
    fn guest_reads(serial: &Mutex<Serial>, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut last = Instant::now();
        while got.len() < want && last.elapsed() < Duration::from_secs(1) {
            let mut uart = serial.lock().unwrap();
            let mut status = [0u8];
            uart.read(LSR, &mut status);
            if status[0] & DATA_READY != 0 {
                let mut byte = [0u8];
                uart.read(RBR, &mut byte);
                got.push(byte[0]);
                last = Instant::now();
            } else {
                drop(uart);
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        got
    }

    #[test]
    fn input_larger_than_the_fifo_arrives_whole_and_in_order() {
        let (reader, mut writer) = pipe();
        let serial = serial();
        let exit = Arc::new(VmExit::new().unwrap());
        let thread = start(reader, serial.clone(), exit.clone()).unwrap();
        let sent: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        writer.write_all(&sent).unwrap();
        assert_eq!(guest_reads(&serial, sent.len()), sent);
        drop(writer);
        thread.join().unwrap();
    }

    #[test]
    fn the_pump_ends_soon_after_the_vm() {
        let (reader, _writer) = pipe();
        let exit = Arc::new(VmExit::new().unwrap());
        let thread = start(reader, serial(), exit.clone()).unwrap();
        exit.request(ExitReason::PowerOff);
        let asked = Instant::now();
        thread.join().unwrap();
        assert!(asked.elapsed() < POLL_INTERVAL * 10);
    }

    #[test]
    fn a_full_fifo_does_not_keep_the_pump_after_the_vm() {
        let (reader, mut writer) = pipe();
        let exit = Arc::new(VmExit::new().unwrap());
        let thread = start(reader, serial(), exit.clone()).unwrap();
        // Nobody drains the FIFO: the pump waits on it until the VM ends.
        writer.write_all(&[b'x'; 200]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        exit.request(ExitReason::PowerOff);
        thread.join().unwrap();
    }
}
