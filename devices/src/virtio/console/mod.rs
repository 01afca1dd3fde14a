//! virtio-console (device id 3), in one of two modes.
//!
//! - **Single port** ([`Console::new`]): no `VIRTIO_CONSOLE_F_MULTIPORT`, two queues, and the
//!   guest sees the port as `/dev/hvc0` (see `single.rs`). Its output goes through a writer
//!   thread like a port's.
//! - **Multiport** ([`Console::with_ports`]): `VIRTIO_CONSOLE_F_MULTIPORT` with named *generic*
//!   ports, which the guest sees as `/dev/vportNpM` (no tty line discipline: byte-exact) and
//!   finds by name in `/sys/class/virtio-ports/vport*/name`. Each port carries one stream:
//!   host input with end of file, or guest output to a host writer through a writer thread
//!   (see `multiport/`, `control.rs`, `input.rs`).
//!
//! Both move transmit buffers into a bounded buffer (`tx.rs`) that a writer thread per output
//! empties (`output.rs`), and both flush it, for a bounded time, when the VM ends (`flush.rs`).

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use super::VirtioDevice;
use super::{device_type, read_config_bytes, ActivateError, Activation, DeviceWorker};
use crate::exit::VmExit;

mod control;
mod flush;
mod input;
mod multiport;
mod output;
mod single;
#[cfg(test)]
mod tests;
mod tx;

pub use flush::ConsoleFlush;
pub use multiport::MultiportState;
pub use output::OutputError;

use multiport::Ports;
use single::SinglePort;

/// `VIRTIO_CONSOLE_F_MULTIPORT`: several ports and a control queue pair.
pub const F_MULTIPORT: u64 = 1 << 1;
/// Entries in each queue of either console.
const QUEUE_SIZE: u16 = 128;
/// The most ports a multiport console has here.
pub const MAX_PORTS: usize = 16;
/// The longest port name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// A host input source for the console: readable, pollable, and movable to the device thread.
///
/// Pass an unbuffered descriptor (a `File` from a dup of stdin, a pipe, a socket): the device
/// reads only after epoll reports it readable, so a buffered reader would strand its buffer.
/// In multiport mode a source epoll refuses (a regular file, `/dev/null`) is read directly
/// whenever the port has room.
pub trait ConsoleInput: Read + AsRawFd + Send {}

impl<T: Read + AsRawFd + Send> ConsoleInput for T {}

/// One port of a multiport console. A port usually carries one direction: `input` for what
/// the guest reads (ending with end of file), `output` for what it writes. Output of a port
/// without `output` is discarded; a port without `input` never ends its input.
pub struct PortConfig {
    /// The name the guest finds in `/sys/class/virtio-ports/vport*/name`.
    pub name: String,
    /// What the guest reads from the port.
    pub input: Option<Box<dyn ConsoleInput>>,
    /// Where the guest's writes to the port go.
    pub output: Option<Box<dyn Write + Send>>,
}

/// Errors from building a multiport console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// No ports, or more than [`MAX_PORTS`].
    #[error("a multiport console has 1 to {MAX_PORTS} ports, not {0}")]
    PortCount(usize),
    /// A name that is empty, too long, or has a NUL, `/` or a control character.
    #[error(
        "console port name {0:?} must be 1 to {MAX_NAME_LEN} bytes without NUL, '/' or control characters"
    )]
    BadName(String),
    /// Two ports with one name.
    #[error("two console ports are named {0:?}")]
    DuplicateName(String),
    /// A port's writer thread could not start.
    #[error(transparent)]
    Output(#[from] OutputError),
}

enum Mode {
    Single(SinglePort),
    Ports(Ports),
}

/// The virtio-console device model.
pub struct Console {
    mode: Mode,
}

impl Console {
    /// A single-port console (hvc0) whose guest output goes to `output`, with no input.
    /// Starts the output's writer thread; a broken pipe ends the VM through `exit`, if given,
    /// with [`ExitReason::OutputClosed`](crate::exit::ExitReason::OutputClosed).
    pub fn new(
        output: Box<dyn Write + Send>,
        exit: Option<Arc<VmExit>>,
    ) -> Result<Self, ConsoleError> {
        Ok(Self {
            mode: Mode::Single(SinglePort::new(output, exit)?),
        })
    }

    /// Feeds the single-port console's guest from `input` (see [`ConsoleInput`]). A
    /// multiport console takes its inputs in [`PortConfig`] and ignores this.
    pub fn with_input(mut self, input: Box<dyn ConsoleInput>) -> Self {
        if let Mode::Single(port) = &mut self.mode {
            port.set_input(input);
        }
        self
    }

    /// A multiport console with `ports`, whose ids are their indices. Starts each output's
    /// writer thread; a broken pipe on an output ends the VM through `exit`, if given, with
    /// [`ExitReason::OutputClosed`](crate::exit::ExitReason::OutputClosed).
    pub fn with_ports(
        ports: Vec<PortConfig>,
        exit: Option<Arc<VmExit>>,
    ) -> Result<Self, ConsoleError> {
        check_ports(&ports)?;
        Ok(Self {
            mode: Mode::Ports(Ports::new(ports, exit)?),
        })
    }

    /// The handle that flushes the console's output when the VM ends (see [`ConsoleFlush`]).
    pub fn flush_handle(&self) -> ConsoleFlush {
        match &self.mode {
            Mode::Single(port) => port.flush_handle(),
            Mode::Ports(ports) => ports.flush_handle(),
        }
    }
}

fn check_ports(ports: &[PortConfig]) -> Result<(), ConsoleError> {
    if ports.is_empty() || ports.len() > MAX_PORTS {
        return Err(ConsoleError::PortCount(ports.len()));
    }
    for (i, port) in ports.iter().enumerate() {
        let name = &port.name;
        let bad = |c: char| c == '/' || c.is_control();
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains(bad) {
            return Err(ConsoleError::BadName(name.clone()));
        }
        if ports[..i].iter().any(|p| p.name == *name) {
            return Err(ConsoleError::DuplicateName(name.clone()));
        }
    }
    Ok(())
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        match &self.mode {
            Mode::Single(_) => &SinglePort::QUEUE_SIZES,
            Mode::Ports(ports) => ports.queue_sizes(),
        }
    }

    fn features(&self) -> u64 {
        match &self.mode {
            Mode::Single(_) => SinglePort::features(),
            Mode::Ports(_) => SinglePort::features() | F_MULTIPORT,
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = match &self.mode {
            Mode::Single(_) => SinglePort::config(),
            Mode::Ports(ports) => ports.config(),
        };
        read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<DeviceWorker, ActivateError> {
        match &self.mode {
            Mode::Single(port) => port.activate(a),
            Mode::Ports(ports) => ports.activate(a),
        }
    }
}

/// Locks a shared endpoint, recovering from poisoning: a console whose previous user panicked
/// is still worth writing to.
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
