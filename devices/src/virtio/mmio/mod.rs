//! The virtio-mmio transport (virtio 1.2, section 4.2; version 2 only, no legacy interface).
//!
//! The VMM maps one [`MmioTransport`] per device at a [`MMIO_WINDOW_LEN`] window and tells the
//! guest about it (ACPI `LNRO0005` and `virtio_mmio.device=4K@ADDR:GSI`). Two `EventFd`s cross
//! the boundary to KVM:
//! - [`MmioTransport::queue_notify_events`]: one per queue, each to be registered as an
//!   ioeventfd at window base + [`QUEUE_NOTIFY_OFFSET`], 4 bytes, datamatch = the queue index,
//!   so the guest's kicks go straight to the device thread. A QueueNotify write that does reach
//!   the transport signals the same `EventFd`.
//! - [`MmioTransport::interrupt_event`]: to be registered as the irqfd of the device's GSI.
//!
//! The driver's status writes drive the state machine ACKNOWLEDGE → DRIVER → FEATURES_OK →
//! DRIVER_OK; a step out of order is ignored (the driver sees the bit unset), FEATURES_OK is
//! refused for features the device does not offer or without VERSION_1, and writing 0 resets
//! the device. At DRIVER_OK the queues are validated and the device activated on the device
//! thread; if that fails the device is marked as needing reset.
//!
//! Snapshots: [`MmioTransport::save_registers`] and [`MmioTransport::restore`] carry the
//! registers and the running device's state ([`super::state`]). A *deferred* transport
//! ([`MmioTransport::defer`]) reads as device ID 0, which Linux's virtio-mmio driver takes for
//! an empty slot, until [`MmioTransport::reveal`]: a device that belongs to one run (a disk,
//! whose size and content are the run's) stays out of a snapshot taken before the run is
//! known, and the guest probes it afterwards.

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::state::{TransportState, WorkerState};
use super::thread::{DeviceThreadHandle, ThreadError, WorkerId};
use super::{features, status, ActivateError, Activation, Interrupt, VirtioDevice};
use crate::bus::BusDevice;

mod queue;

use queue::QueueConfig;

/// The size of a device's MMIO window.
pub const MMIO_WINDOW_LEN: u64 = 0x1000;
/// Offset of the QueueNotify register, where the VMM places the ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// The non-legacy interface.
const VERSION: u32 = 2;
/// PCI-SIG vendor id space is not used by virtio-mmio; Linux ignores this value.
const VENDOR_ID: u32 = 0;

// Register offsets (virtio 1.2, table 4.1); the test driver writes them too.
const MAGIC_VALUE: u64 = 0x000;
const VERSION_REG: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID_REG: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
pub(crate) const DRIVER_FEATURES: u64 = 0x020;
pub(crate) const DRIVER_FEATURES_SEL: u64 = 0x024;
pub(crate) const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
pub(crate) const QUEUE_NUM: u64 = 0x038;
pub(crate) const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = QUEUE_NOTIFY_OFFSET;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
pub(crate) const STATUS: u64 = 0x070;
pub(crate) const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
pub(crate) const QUEUE_AVAIL_LOW: u64 = 0x090;
const QUEUE_AVAIL_HIGH: u64 = 0x094;
pub(crate) const QUEUE_USED_LOW: u64 = 0x0a0;
const QUEUE_USED_HIGH: u64 = 0x0a4;
const SHM_LEN_LOW: u64 = 0x0b0;
const SHM_BASE_HIGH: u64 = 0x0bc;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

/// The status steps in the order a driver must take them.
const STATUS_STEPS: [u32; 5] = [
    status::ACKNOWLEDGE,
    status::DRIVER,
    status::FEATURES_OK,
    status::DRIVER_OK,
    status::FAILED,
];

/// Errors from activating a device at DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The driver did not mark a queue ready.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// A queue size that is zero, not a power of two, or above the maximum.
    #[error("queue {0} has an invalid size")]
    QueueSize(usize),
    /// Misaligned ring addresses, or rings outside guest memory.
    #[error("queue {0} has invalid ring addresses")]
    QueueAddress(usize),
    /// The notification or interrupt `EventFd`s could not be had.
    #[error("cannot create the device's eventfds")]
    EventFd(#[source] std::io::Error),
    /// The device refused to start.
    #[error("device activation failed")]
    Activate(#[source] ActivateError),
    /// The device thread refused the device's worker.
    #[error("cannot run the device")]
    Thread(#[source] ThreadError),
    /// A snapshot's transport state is not for this device.
    #[error("the saved state does not fit: its {0} differs")]
    Mismatch(&'static str),
}

/// A virtio device behind its virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    thread: DeviceThreadHandle,
    interrupt: Interrupt,
    notify: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    worker: Option<WorkerId>,
    last_error: Option<MmioError>,
    /// Reads as an empty slot until revealed (see the module's documentation).
    deferred: bool,
}

impl MmioTransport {
    /// Puts `device` behind a register window; its worker will run on `thread` and reach the
    /// guest through `mem`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        thread: DeviceThreadHandle,
    ) -> Result<Self, MmioError> {
        let queues: Vec<_> = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueConfig::new(max))
            .collect();
        let notify = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<_, _>>()
            .map_err(MmioError::EventFd)?;
        Ok(Self {
            device,
            mem,
            thread,
            interrupt: Interrupt::new().map_err(MmioError::EventFd)?,
            notify,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            worker: None,
            last_error: None,
            deferred: false,
        })
    }

    /// Shows the slot as empty (device ID 0) and ignores the driver until [`Self::reveal`].
    pub fn defer(&mut self) {
        self.deferred = true;
    }

    /// Shows the device to the guest's next probe of the slot.
    pub fn reveal(&mut self) {
        self.deferred = false;
    }

    /// The running device's worker, whose state [`Self::save_registers`] needs beside it.
    pub fn worker(&self) -> Option<WorkerId> {
        self.worker
    }

    /// The registers, for a snapshot, with the state of the running device's worker (saved
    /// on the device thread, see [`DeviceThreadHandle::freeze`]).
    pub fn save_registers(&self, running: Option<WorkerState>) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queues: self.queues.iter().map(QueueConfig::registers).collect(),
            interrupt_status: self.interrupt.status(),
            running,
        }
    }

    /// Puts a fresh transport in the state a snapshot saved, restarting its device where it
    /// stood when a driver had started it, and raising its interrupt again if the driver had
    /// not yet acknowledged it. The guest's memory and interrupt controllers must hold the
    /// snapshot's, and its irqfd must be registered.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), MmioError> {
        if state.device_type != self.device.device_type() {
            return Err(MmioError::Mismatch("device type"));
        }
        if state.queues.len() != self.queues.len() {
            return Err(MmioError::Mismatch("queue count"));
        }
        let running = state.status & status::DRIVER_OK != 0;
        if running != state.running.is_some() {
            return Err(MmioError::Mismatch("device status"));
        }
        for (q, saved) in self.queues.iter_mut().zip(&state.queues) {
            q.set_registers(saved);
        }
        self.queue_sel = state.queue_sel;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.status = state.status;
        if let Some(worker) = &state.running {
            self.activate(Some(worker.clone()))?;
        }
        self.interrupt.restore_status(state.interrupt_status);
        Ok(())
    }

    /// The virtio device id of the device behind this window.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// One `EventFd` per queue, in queue order: register each as an ioeventfd at window base +
    /// [`QUEUE_NOTIFY_OFFSET`] with datamatch = its index (as a u32).
    pub fn queue_notify_events(&self) -> &[EventFd] {
        &self.notify
    }

    /// The `EventFd` to register as the irqfd of the device's GSI.
    pub fn interrupt_event(&self) -> &EventFd {
        self.interrupt.event()
    }

    /// Why the last activation failed, for diagnostics (the guest only sees NEEDS_RESET).
    pub fn last_error(&self) -> Option<&MmioError> {
        self.last_error.as_ref()
    }

    /// Whether the device is running (DRIVER_OK and activated).
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    fn read_register(&self, offset: u64) -> u32 {
        // An empty slot: its magic and version, and device ID 0.
        if self.deferred && !matches!(offset, MAGIC_VALUE | VERSION_REG) {
            return 0;
        }
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION_REG => VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID_REG => VENDOR_ID,
            DEVICE_FEATURES => self.device_features_window(),
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.interrupt_status(),
            STATUS => self.status_register(),
            // No shared memory regions: their length and base read as all ones (-1).
            SHM_LEN_LOW..=SHM_BASE_HIGH => u32::MAX,
            // The configuration never changes under the driver, so its generation stays 0.
            CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        if self.deferred {
            return;
        }
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NOTIFY => self.notify_queue(value),
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.write_status(value),
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW..=QUEUE_USED_HIGH => {
                self.write_queue_register(offset, value)
            }
            _ => {}
        }
    }

    fn interrupt_status(&self) -> u32 {
        let bypass = self.worker.is_some() && self.device.signals_irqfd_directly();
        if bypass {
            self.interrupt.status() | super::INT_USED_BUFFER
        } else {
            self.interrupt.status()
        }
    }

    fn status_register(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::NEEDS_RESET
        } else {
            self.status
        }
    }

    #[allow(clippy::cast_possible_truncation)] // the low and high halves: truncation is the point
    fn device_features_window(&self) -> u32 {
        let features = self.device.features();
        match self.device_features_sel {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features may change only between DRIVER and FEATURES_OK.
        if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.driver_features &= !(u64::from(u32::MAX) << shift);
        self.driver_features |= u64::from(value) << shift;
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        // A running queue's settings are fixed until reset.
        if self.status & status::DRIVER_OK != 0 {
            return;
        }
        let Some(q) = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
        else {
            return;
        };
        let set_low = |field: &mut u64| *field = (*field & !0xffff_ffff) | u64::from(value);
        let set_high = |field: &mut u64| *field = (*field & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            QUEUE_NUM => q.size = value,
            QUEUE_READY => q.ready = value & 1 == 1,
            QUEUE_DESC_LOW => set_low(&mut q.desc),
            QUEUE_DESC_HIGH => set_high(&mut q.desc),
            QUEUE_AVAIL_LOW => set_low(&mut q.avail),
            QUEUE_AVAIL_HIGH => set_high(&mut q.avail),
            QUEUE_USED_LOW => set_low(&mut q.used),
            QUEUE_USED_HIGH => set_high(&mut q.used),
            _ => {}
        }
    }

    fn notify_queue(&mut self, index: u32) {
        if let Some(event) = usize::try_from(index).ok().and_then(|i| self.notify.get(i)) {
            // A saturated counter already means "kicked".
            let _ = event.write(1);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // NEEDS_RESET is the device's to set; the driver may only add bits, never clear them.
        let value = value & 0xff & !status::NEEDS_RESET;
        if self.status & !value != 0 {
            return;
        }
        for step in STATUS_STEPS {
            if value & step == 0 || self.status & step != 0 {
                continue;
            }
            if !self.accept_step(step) {
                break;
            }
            self.status |= step;
        }
    }

    /// Whether the driver may set `step` now; performs negotiation and activation.
    fn accept_step(&mut self, step: u32) -> bool {
        let current = self.status;
        if current & status::FAILED != 0 {
            return false;
        }
        match step {
            status::ACKNOWLEDGE => true,
            status::DRIVER => current & status::ACKNOWLEDGE != 0,
            status::FEATURES_OK => current & status::DRIVER != 0 && self.features_acceptable(),
            status::DRIVER_OK => {
                if current & status::FEATURES_OK == 0 {
                    return false;
                }
                if let Err(e) = self.activate(None) {
                    self.last_error = Some(e);
                    self.interrupt.set_needs_reset();
                }
                true
            }
            status::FAILED => true,
            _ => false,
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        self.driver_features & !offered == 0 && self.driver_features & features::VERSION_1 != 0
    }

    /// Starts the device on the driver's queues: fresh, or where a snapshot's `resume` left
    /// it.
    fn activate(&mut self, resume: Option<WorkerState>) -> Result<(), MmioError> {
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        if resume
            .as_ref()
            .is_some_and(|r| r.queues.len() != self.queues.len())
        {
            return Err(MmioError::Mismatch("queue count"));
        }
        let progress = resume.as_ref().map(|r| r.queues.as_slice());
        let queues = (0..)
            .zip(self.queues.iter().zip(&self.notify))
            .map(|(i, (q, notify))| {
                let mut queue = q.build(i, &self.mem, event_idx)?;
                if let Some(at) = progress.and_then(|p| p.get(i)) {
                    queue.set_next_avail(at.next_avail);
                    queue.set_next_used(at.next_used);
                }
                Ok((queue, notify.try_clone().map_err(MmioError::EventFd)?))
            })
            .collect::<Result<Vec<_>, MmioError>>()?;
        let worker = self
            .device
            .activate(Activation {
                mem: self.mem.clone(),
                queues,
                interrupt: self.interrupt.clone(),
                features: self.driver_features,
                resume: resume.map(|r| r.device),
            })
            .map_err(MmioError::Activate)?;
        self.worker = Some(self.thread.add(worker).map_err(MmioError::Thread)?);
        Ok(())
    }

    /// Device reset: stops the worker (waiting until it is off the device thread), and returns
    /// the device and every register to the initial state.
    fn reset(&mut self) {
        self.stop_worker();
        self.device.reset();
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        for event in &self.notify {
            // Forget kicks from before the reset.
            let _ = event.read();
        }
        self.interrupt.clear();
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
    }

    fn stop_worker(&mut self) {
        if let Some(id) = self.worker.take() {
            // Fails only when the device thread has ended, and then the worker is gone too.
            let _ = self.thread.remove(id);
        }
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            match self.deferred {
                true => data.fill(0),
                false => self.device.read_config(offset - CONFIG, data),
            }
            return;
        }
        // Registers are 32 bits wide and aligned; anything else reads as zero.
        if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            if !self.deferred {
                self.device.write_config(offset - CONFIG, data);
            }
            return;
        }
        if let (Ok(word), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_register(offset, u32::from_le_bytes(word));
        }
    }
}

#[cfg(test)]
mod tests;
