//! The guest's address map, and the devices on it: one owner for every port-I/O range, MMIO
//! window and GSI, for what the DSDT says about them and for the `virtio_mmio.device=` entries
//! on the command line.
//!
//! [`legacy`] places the PC devices on port I/O; [`mmio`] places the virtio-mmio transports in
//! the 32-bit MMIO hole, each with a 4 KiB window and a GSI of its own. The devices themselves
//! (the `devices` crate) only know register offsets.

pub mod legacy;
pub mod mmio;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::bus::Bus;
use devices::exit::VmExit;
use devices::serial::{Serial, SerialInput};
use devices::virtio::{ConsoleFlush, DeviceThread};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use crate::acpi::MmioDeviceAcpi;
pub use mmio::{ConsoleConfig, DiskConfig, PortConfig, ShareConfig};

/// Errors from creating and placing devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A device could not be created.
    #[error("cannot create the {what}: {reason}")]
    Create { what: &'static str, reason: String },
    /// KVM refused to route a legacy device's interrupt.
    #[error("cannot {what}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// A virtio device could not be created or attached.
    #[error(transparent)]
    Virtio(#[from] mmio::VirtioError),
}

/// The devices a VM is built with, as its configuration gives them.
pub struct DeviceConfig {
    /// Where the serial console's output goes.
    pub console: Box<dyn std::io::Write + Send>,
    /// Raw disk images for virtio-blk, in order (the first is /dev/vda).
    pub disks: Vec<DiskConfig>,
    /// File systems shared through vhost-user back ends (virtio-fs).
    pub shares: Vec<ShareConfig>,
    /// A virtio-console, if the guest gets one.
    pub virtio_console: Option<ConsoleConfig>,
    /// Whether the guest gets a virtio-rng.
    pub rng: bool,
    /// COM1's registers as a snapshot saved them, for a restored VM.
    pub serial_state: Option<devices::serial::SerialState>,
}

/// Every device of one VM, where it sits, and the thread that runs the virtio ones.
pub struct DeviceManager {
    /// The port-I/O bus.
    pub pio: Bus,
    /// The MMIO bus (the virtio-mmio windows).
    pub mmio: Bus,
    serial: Arc<Mutex<Serial>>,
    virtio: mmio::VirtioDevices,
}

impl DeviceManager {
    /// Creates every device, places it and wires its interrupts and notifications through KVM.
    pub fn attach(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        config: DeviceConfig,
        exit: &Arc<VmExit>,
    ) -> Result<Self, DeviceError> {
        let mut pio = Bus::new();
        let serial = legacy::attach(
            vm,
            &mut pio,
            config.console,
            config.serial_state.as_ref(),
            exit,
        )?;
        let list = mmio::build_devices(
            &config.disks,
            &config.shares,
            config.virtio_console,
            config.rng,
            exit,
        )?;
        let virtio = mmio::attach(vm, mem, list, exit)?;
        Ok(Self {
            pio,
            mmio: virtio.bus.clone(),
            serial,
            virtio,
        })
    }

    /// The first virtio device a driver has started (its status register is not 0), by its
    /// position; `None` while every device is as reset, which is all a snapshot may hold.
    pub fn virtio_device_in_use(&self) -> Option<usize> {
        self.virtio.acpi.iter().position(|device| {
            let mut status = [0u8; 4];
            let register = u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS);
            self.mmio.read(device.addr + register, &mut status);
            u32::from_le_bytes(status) != 0
        })
    }

    /// COM1's registers, for a snapshot.
    pub fn serial_state(&self) -> devices::serial::SerialState {
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state()
    }

    /// Serves `input` (the user's terminal) to COM1 from the device thread, starting that
    /// thread if no virtio device did.
    pub fn serve_serial_input(
        &mut self,
        input: std::fs::File,
        exit: &Arc<VmExit>,
    ) -> Result<(), DeviceError> {
        let create = |e: std::io::Error| DeviceError::Create {
            what: "serial input",
            reason: e.to_string(),
        };
        let worker = SerialInput::new(input, self.serial.clone(), exit.clone()).map_err(create)?;
        let thread = match &mut self.virtio.thread {
            Some(thread) => thread,
            slot @ None => {
                slot.insert(DeviceThread::start_with(exit.thread_start()).map_err(|e| {
                    DeviceError::Create {
                        what: "device thread",
                        reason: e.to_string(),
                    }
                })?)
            }
        };
        thread
            .handle()
            .add(Box::new(worker))
            .map(|_| ())
            .map_err(|e| DeviceError::Create {
                what: "serial input",
                reason: e.to_string(),
            })
    }

    /// What the DSDT must describe of the virtio-mmio devices.
    pub fn acpi_devices(&self) -> &[MmioDeviceAcpi] {
        &self.virtio.acpi
    }

    /// The `virtio_mmio.device=` entries to append to the kernel command line (each with a
    /// leading space; empty without virtio devices).
    pub fn cmdline_entries(&self) -> &str {
        &self.virtio.cmdline
    }

    /// Stops the device thread and writes out the consoles' last output, waiting at most until
    /// `flush_deadline` for slow readers. Call it once no vCPU runs: then no driver can reset
    /// a device while its output drains. Returns what went wrong, for the caller to report.
    pub fn stop(mut self, flush_deadline: Instant) -> Option<String> {
        let console_flush: Option<ConsoleFlush> = self.virtio.console_flush.take();
        if let Some(flush) = &console_flush {
            flush.vm_stopped(flush_deadline);
        }
        if let Some(thread) = self.virtio.thread.take() {
            // The guest is gone; a device thread that cannot stop cleanly changes nothing for
            // it. Stopping drops the workers, which write out what is still in their rings.
            let _ = DeviceThread::stop(thread);
        }
        let virtio_console = console_flush.map_or(Ok(()), |flush| flush.finish());
        let serial_console = (self.serial.lock().unwrap_or_else(|p| p.into_inner()))
            .flush()
            .map_err(|e| e.to_string());
        let problems: Vec<String> = [serial_console, virtio_console]
            .into_iter()
            .filter_map(Result::err)
            .collect();
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}
