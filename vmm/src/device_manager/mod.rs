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
use devices::virtio::{
    ConsoleFlush, DeviceThread, Frozen, MmioError, SaveError, TransportState, WorkerId,
};
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
    /// Show the disks to the guest only from [`DeviceManager::reveal_per_run`] on: the VM is
    /// saved before its run is known.
    pub defer_per_run: bool,
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
        let virtio = mmio::attach(vm, mem, list, config.defer_per_run, exit)?;
        Ok(Self {
            pio,
            mmio: virtio.bus.clone(),
            serial,
            virtio,
        })
    }

    /// Every virtio device's state, for a snapshot, with the device thread held still until
    /// the returned guard is dropped: save guest memory before dropping it. Call it with the
    /// vCPUs stopped.
    pub fn save_virtio(&self) -> Result<(Vec<TransportState>, Option<Frozen>), SaveError> {
        let transports: Vec<_> = self.virtio.transports.iter().map(|t| lock(t)).collect();
        let running: Vec<WorkerId> = transports.iter().filter_map(|t| t.worker()).collect();
        let (mut workers, frozen) = match &self.virtio.thread {
            Some(thread) if !running.is_empty() => {
                let (workers, frozen) = thread
                    .handle()
                    .freeze(running)
                    .map_err(|_| SaveError::Thread)?;
                (workers.into_iter(), Some(frozen))
            }
            _ => (Vec::new().into_iter(), None),
        };
        let mut states = Vec::with_capacity(transports.len());
        for transport in &transports {
            let worker = match transport.worker() {
                Some(_) => Some(workers.next().ok_or(SaveError::Thread)??),
                None => None,
            };
            states.push(transport.save_registers(worker));
        }
        Ok((states, frozen))
    }

    /// Puts the virtio devices in a snapshot's `states` (in guest-visible order), restarting
    /// those a driver had started where they stood. Guest memory must hold the snapshot's.
    pub fn restore_virtio(&self, states: &[TransportState]) -> Result<(), MmioError> {
        if states.len() != self.virtio.transports.len() {
            return Err(MmioError::Mismatch("number of virtio devices"));
        }
        for (transport, state) in self.virtio.transports.iter().zip(states) {
            lock(transport).restore(state)?;
        }
        Ok(())
    }

    /// Shows the run's own devices (the disks) to the guest's next probe.
    pub fn reveal_per_run(&self) {
        for transport in &self.virtio.transports {
            lock(transport).reveal();
        }
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

/// Locks a transport, recovering from poisoning: its registers stay consistent, since every
/// change to them is a plain store.
fn lock(
    transport: &mmio::SharedTransport,
) -> std::sync::MutexGuard<'_, devices::virtio::MmioTransport> {
    transport.lock().unwrap_or_else(|p| p.into_inner())
}
