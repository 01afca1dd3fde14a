//! Virtio devices over the virtio-mmio transport (virtio 1.x, MMIO version 2).
//!
//! The pieces, and who runs them:
//! - [`MmioTransport`] is the register window a vCPU thread reads and writes through the MMIO
//!   bus. It keeps the status, feature and queue state machine and, when the driver sets
//!   DRIVER_OK, validates the queues and *activates* its device.
//! - A [`VirtioDevice`] (one of [`Block`], [`Console`], [`Rng`]) is the device model. Activation
//!   turns it into a [`DeviceWorker`]: an event-manager subscriber owning the live queues.
//! - The [`DeviceThread`] runs every worker on one event loop, never on a vCPU thread. Workers
//!   are added at activation and removed at reset.
//!
//! Notifications reach a worker on the transport's per-queue `EventFd`s (which the VMM
//! registers as ioeventfds), and interrupts leave on the transport's [`Interrupt`] `EventFd`
//! (which the VMM registers as an irqfd). A worker never locks the transport, so a vCPU thread
//! holding the transport may wait for the device thread without deadlock.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod block;
mod chain;
pub mod console;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod mmio;
pub mod rng;
pub mod state;
pub mod thread;
pub mod vhost_user_fs;
mod worker;

#[cfg(test)]
mod testing;

pub use block::{Block, BlockError};
pub use console::{Console, ConsoleError, ConsoleFlush, ConsoleInput, PortConfig};
pub use mmio::{MmioError, MmioTransport, MMIO_WINDOW_LEN, QUEUE_NOTIFY_OFFSET};
pub use rng::Rng;
pub use state::{DeviceState, QueueProgress, SaveError, TransportState, WorkerState};
pub use thread::{DeviceThread, DeviceThreadHandle, Frozen, ThreadError, WorkerId};

/// Virtio device ids (virtio 1.2, section 5).
pub mod device_type {
    /// virtio-blk.
    pub const BLOCK: u32 = 2;
    /// virtio-console.
    pub const CONSOLE: u32 = 3;
    /// virtio-rng (entropy source).
    pub const RNG: u32 = 4;
    /// virtio-fs.
    pub const FS: u32 = 26;
}

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and the device may run.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from; the driver must reset it.
    pub const NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Feature bits shared by every device (virtio 1.2, section 6).
pub mod features {
    /// Descriptors may point at indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// Notification suppression through the used_event/avail_event fields.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.x: required, kvmbuild has no legacy interface.
    pub const VERSION_1: u64 = 1 << 32;
}

/// InterruptStatus bit: the device used buffers.
pub const INT_USED_BUFFER: u32 = 1;
/// InterruptStatus bit: the device configuration (or device status) changed.
pub const INT_CONFIG_CHANGE: u32 = 2;

/// A running device: the event-manager subscriber that activation returns.
pub type DeviceWorker = Box<dyn Worker>;

/// A device's running half, on the device thread.
pub trait Worker: MutEventSubscriber + Send {
    /// Where the device stands, for a snapshot (see [`state`]): called on the device thread,
    /// with the guest stopped. By default the device cannot be saved.
    fn save(&self) -> Result<WorkerState, SaveError> {
        Err(SaveError::Unsupported)
    }
}

/// Errors from activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport handed over a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    /// A host resource (an fd clone) could not be had.
    #[error("cannot set up the device")]
    Io(#[source] io::Error),
    /// The driver did not accept a feature the device needs.
    #[error("the driver did not accept {0}")]
    FeatureNotAccepted(&'static str),
    /// An external back end (vhost-user) refused the set-up.
    #[error("the back end refused the set-up: {0}")]
    Backend(String),
    /// A snapshot's state for the device is not one it can go on from.
    #[error("the saved device state does not fit the device")]
    ResumeState,
}

/// Everything a device needs to run, handed over at activation.
pub struct Activation {
    /// Guest memory, for the rings and buffers.
    pub mem: GuestMemoryMmap,
    /// The validated, ready queues in device queue order, each with the `EventFd` its
    /// notifications arrive on (a clone of the transport's).
    pub queues: Vec<(Queue, EventFd)>,
    /// The device's interrupt line.
    pub interrupt: Interrupt,
    /// The features the driver accepted.
    pub features: u64,
    /// For a device restored from a snapshot: its own state then (the queues already stand
    /// where they stood). `None` for a driver's fresh start.
    pub resume: Option<DeviceState>,
}

impl Activation {
    /// Checks that the transport handed over `expected` queues.
    pub fn expect_queues(&self, expected: usize) -> Result<(), ActivateError> {
        let got = self.queues.len();
        if got != expected {
            return Err(ActivateError::QueueCount { expected, got });
        }
        Ok(())
    }

    /// Checks that a restored device has no state of its own to go on from (the rings hold
    /// all of it).
    pub fn expect_stateless(&self) -> Result<(), ActivateError> {
        match self.resume {
            None | Some(DeviceState::Stateless) => Ok(()),
            Some(_) => Err(ActivateError::ResumeState),
        }
    }

    /// Checks that the device is started fresh, for devices a snapshot never holds running.
    pub fn expect_fresh(&self) -> Result<(), ActivateError> {
        match self.resume {
            None => Ok(()),
            Some(_) => Err(ActivateError::ResumeState),
        }
    }
}

/// Where each queue stands, for [`Worker::save`].
pub fn queue_progress<'a>(queues: impl IntoIterator<Item = &'a Queue>) -> Vec<QueueProgress> {
    use virtio_queue::QueueT;
    queues
        .into_iter()
        .map(|q| QueueProgress {
            next_avail: q.next_avail(),
            next_used: q.next_used(),
        })
        .collect()
}

/// A virtio device model, as the MMIO transport sees it.
pub trait VirtioDevice: Send {
    /// The virtio device id (see [`device_type`]).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The features the device offers (including [`features::VERSION_1`]).
    fn features(&self) -> u64;

    /// Reads the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space; read-only by default.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }

    /// Starts the device on validated queues, returning the worker that the transport puts on
    /// the device thread.
    fn activate(&mut self, activation: Activation) -> Result<DeviceWorker, ActivateError>;

    /// Returns the device to its initial state after its worker was removed.
    fn reset(&mut self) {}

    /// True for devices whose backend signals the irqfd itself (vhost-user: the
    /// [`Interrupt::event`] is the vring "call" fd), so [`Interrupt::signal_used`] is never
    /// called. InterruptStatus then always reports "used buffer" while the device runs, or
    /// the guest would discard those interrupts as not its own.
    fn signals_irqfd_directly(&self) -> bool {
        false
    }
}

/// Registers each queue's notification `EventFd` with the device thread, tagged with its
/// queue index. Returns false if one could not be registered (the device cannot run then).
pub fn register_queue_events(ops: &mut EventOps, events: &[EventFd]) -> bool {
    (0..)
        .zip(events)
        .all(|(i, e)| ops.add(Events::with_data(e, i, EventSet::IN)).is_ok())
}

/// Copies the bytes of a configuration space at `offset` into `data`; bytes past its end
/// read as zero, so a driver probing beyond it sees nothing rather than a panic.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

struct InterruptState {
    status: AtomicU32,
    needs_reset: AtomicBool,
    event: EventFd,
}

/// A device's interrupt line: the InterruptStatus bits plus the irqfd that raises the GSI.
///
/// Shared between the transport (which reads and acknowledges the bits) and the device's
/// worker (which sets them), without a lock.
#[derive(Clone)]
pub struct Interrupt(Arc<InterruptState>);

impl Interrupt {
    /// A new line with no interrupt pending.
    pub fn new() -> io::Result<Self> {
        Ok(Self(Arc::new(InterruptState {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            event: EventFd::new(EFD_NONBLOCK)?,
        })))
    }

    /// The `EventFd` to register as the device's irqfd.
    pub fn event(&self) -> &EventFd {
        &self.0.event
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.0.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.0.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Reports used buffers to the driver.
    pub fn signal_used(&self) {
        self.raise(INT_USED_BUFFER);
    }

    /// Reports a configuration (or device status) change to the driver.
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG_CHANGE);
    }

    /// Marks the device as needing a reset (status bit 0x40) and tells the driver.
    pub fn set_needs_reset(&self) {
        self.0.needs_reset.store(true, Ordering::Release);
        self.signal_config();
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.0.needs_reset.load(Ordering::Acquire)
    }

    /// Sets the InterruptStatus bits a snapshot saved and, if any is set, raises the line
    /// again: an interrupt signalled just before the save may not have reached the interrupt
    /// controllers whose state was saved, and one that did costs the driver only a look at
    /// its rings.
    pub(crate) fn restore_status(&self, bits: u32) {
        self.0.status.fetch_or(bits, Ordering::AcqRel);
        if bits != 0 {
            // A saturated counter already means "raised".
            let _ = self.0.event.write(1);
        }
    }

    /// Forgets pending bits and the reset request (device reset).
    pub(crate) fn clear(&self) {
        self.0.status.store(0, Ordering::Release);
        self.0.needs_reset.store(false, Ordering::Release);
    }

    fn raise(&self, bit: u32) {
        self.0.status.fetch_or(bit, Ordering::AcqRel);
        // The only failure is a saturated counter, which means an interrupt is already pending.
        let _ = self.0.event.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bytes_are_zero_past_the_end() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn interrupt_bits_are_set_acked_and_signalled() {
        let irq = Interrupt::new().unwrap();
        irq.signal_used();
        assert_eq!(irq.status(), INT_USED_BUFFER);
        assert_eq!(irq.event().read().unwrap(), 1);
        irq.set_needs_reset();
        assert!(irq.needs_reset());
        assert_eq!(irq.status(), INT_USED_BUFFER | INT_CONFIG_CHANGE);
        irq.ack(INT_USED_BUFFER);
        assert_eq!(irq.status(), INT_CONFIG_CHANGE);
        irq.clear();
        assert_eq!(irq.status(), 0);
        assert!(!irq.needs_reset());
    }
}
