//! Placing virtio-mmio devices: a 4 KiB window and a GSI each, KVM's ioeventfds and irqfds, and
//! the two announcements Linux needs (the ACPI DSDT and the kernel command line).
//!
//! Queue notifications are KVM ioeventfds on each window's QueueNotify register and interrupts
//! are irqfds, so neither ever passes through a vCPU thread; the devices' work runs on the one
//! device thread.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::exit::VmExit;
use devices::virtio::vhost_user_fs::VhostUserFs;
pub use devices::virtio::PortConfig;
use devices::virtio::{
    Block, Console, ConsoleError, ConsoleFlush, ConsoleInput, DeviceThread, MmioTransport, Rng,
    VirtioDevice, MMIO_WINDOW_LEN, QUEUE_NOTIFY_OFFSET,
};

/// A transport, shared between the MMIO bus and the snapshot code.
pub type SharedTransport = Arc<Mutex<MmioTransport>>;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::acpi::MmioDeviceAcpi;

/// Errors from attaching virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// A disk image cannot be used.
    #[error("disk")]
    Disk {
        path: PathBuf,
        source: devices::virtio::BlockError,
    },
    /// A vhost-user-fs back end cannot be used.
    #[error("virtio-fs share {tag:?} (back end {})", socket.display())]
    Share {
        tag: String,
        socket: PathBuf,
        source: devices::virtio::vhost_user_fs::VhostUserFsError,
    },
    /// The virtio-console cannot be set up.
    #[error("cannot set up the virtio-console")]
    Console(#[source] ConsoleError),
    /// More devices than free GSIs.
    #[error("too many virtio devices: at most {0}")]
    TooMany(u32),
    /// The device thread could not start.
    #[error("cannot start the virtio device thread: {0}")]
    Thread(devices::virtio::ThreadError),
    /// The transport could not be created.
    #[error("cannot create a virtio-mmio transport: {0}")]
    Transport(devices::virtio::MmioError),
    /// KVM refused an ioeventfd or irqfd.
    #[error("cannot {what} for the virtio device at {addr:#x}")]
    Kvm {
        what: &'static str,
        addr: u64,
        source: kvm_ioctls::Error,
    },
    /// Two windows overlap on the bus (a bug in the placement).
    #[error("cannot map the virtio device at {addr:#x}")]
    Bus {
        addr: u64,
        source: devices::bus::BusError,
    },
}

/// A raw disk image for virtio-blk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// Attach read-only (`VIRTIO_BLK_F_RO`).
    pub read_only: bool,
}

/// A file system shared through a vhost-user back end (virtiofsd) for virtio-fs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareConfig {
    /// The back end's Unix socket.
    pub socket: PathBuf,
    /// The tag the guest mounts (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
}

/// A virtio-console.
pub enum ConsoleConfig {
    /// One port, the guest's hvc0.
    Hvc0 {
        /// Where the guest's output goes. A broken pipe ends the VM with
        /// `ExitReason::OutputClosed`, as for a port.
        output: Box<dyn std::io::Write + Send>,
        /// What the guest reads, if anything: an unbuffered descriptor such as a dup of stdin.
        input: Option<Box<dyn ConsoleInput>>,
    },
    /// Named generic ports (`VIRTIO_CONSOLE_F_MULTIPORT`), the guest's `/dev/vportNpM`, each
    /// carrying one stream byte-exact; port ids are the indices. A broken pipe on a port's
    /// output ends the VM with `ExitReason::OutputClosed`.
    Ports(Vec<PortConfig>),
}

/// The virtio devices to attach, in guest-visible order.
pub struct DeviceList {
    /// The devices.
    pub devices: Vec<Box<dyn VirtioDevice>>,
    /// How many of the first devices belong to one run (the disks, whose size and content
    /// are the run's; a share's tag is fixed by its place, its files are behind virtiofsd): those a
    /// VM saved before its run is known defers (see [`MmioTransport::defer`]).
    pub per_run: usize,
    /// Flushes the virtio-console's output when the VM ends, if there is one.
    pub console_flush: Option<ConsoleFlush>,
}

/// The virtio devices of one VM, once attached.
pub struct VirtioDevices {
    /// The MMIO bus holding every transport.
    pub bus: Bus,
    /// What the DSDT must describe.
    pub acpi: Vec<MmioDeviceAcpi>,
    /// `virtio_mmio.device=` entries to append to the command line.
    pub cmdline: String,
    /// The thread that runs the devices; None when there are none (the VM starts it for
    /// serial input then).
    pub thread: Option<DeviceThread>,
    /// Flushes the virtio-console's output when the VM ends, if there is one.
    pub console_flush: Option<ConsoleFlush>,
    /// Every transport, in guest-visible order.
    pub transports: Vec<SharedTransport>,
}

/// Base of the MMIO space handed to virtio-mmio devices, in the 32-bit hole below the IOAPIC.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = MMIO_WINDOW_LEN;
/// First GSI free for devices other than the legacy ISA ones.
pub const FIRST_DEVICE_GSI: u32 = 5;
/// The highest GSI the in-kernel IOAPIC routes (24 pins).
pub const LAST_DEVICE_GSI: u32 = 23;

/// The `index`th device's window and GSI.
fn placement(index: u32) -> Result<(u64, u32), VirtioError> {
    let gsi = FIRST_DEVICE_GSI + index;
    if gsi > LAST_DEVICE_GSI {
        return Err(VirtioError::TooMany(LAST_DEVICE_GSI - FIRST_DEVICE_GSI + 1));
    }
    Ok((VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE, gsi))
}

/// The kernel command-line entry announcing one device.
fn cmdline_entry(addr: u64, gsi: u32) -> String {
    format!(
        "virtio_mmio.device={}K@{addr:#x}:{gsi}",
        MMIO_WINDOW_LEN / 1024
    )
}

/// Builds the devices in their guest-visible order: disks first (so the first is /dev/vda),
/// then the shares, the console and the RNG. A share's back end that goes away, or a console
/// port's reader that does, ends the VM through `exit`.
pub fn build_devices(
    disks: &[DiskConfig],
    shares: &[ShareConfig],
    console: Option<ConsoleConfig>,
    rng: bool,
    exit: &Arc<VmExit>,
) -> Result<DeviceList, VirtioError> {
    let mut list: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for disk in disks {
        let block = Block::new(&disk.path, disk.read_only).map_err(|source| VirtioError::Disk {
            path: disk.path.clone(),
            source,
        })?;
        list.push(Box::new(block));
    }
    for share in shares {
        let fs =
            VhostUserFs::connect(&share.socket, &share.tag, exit.clone()).map_err(|source| {
                VirtioError::Share {
                    tag: share.tag.clone(),
                    socket: share.socket.clone(),
                    source,
                }
            })?;
        list.push(Box::new(fs));
    }
    let mut console_flush = None;
    let console = match console {
        Some(ConsoleConfig::Hvc0 { output, input }) => {
            let console = Console::new(output, Some(exit.clone())).map_err(VirtioError::Console)?;
            Some(match input {
                Some(input) => console.with_input(input),
                None => console,
            })
        }
        Some(ConsoleConfig::Ports(ports)) => {
            Some(Console::with_ports(ports, Some(exit.clone())).map_err(VirtioError::Console)?)
        }
        None => None,
    };
    if let Some(console) = console {
        console_flush = Some(console.flush_handle());
        list.push(Box::new(console));
    }
    if rng {
        list.push(Box::new(Rng::new()));
    }
    Ok(DeviceList {
        devices: list,
        per_run: disks.len(),
        console_flush,
    })
}

/// Attaches `list` to the VM: transports on the MMIO bus, notifications and interrupts wired
/// through KVM. With `defer_per_run`, the run's own devices read as empty slots until
/// revealed.
/// The device thread starts as `exit`'s VM says its threads start.
pub fn attach(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    list: DeviceList,
    defer_per_run: bool,
    exit: &VmExit,
) -> Result<VirtioDevices, VirtioError> {
    let mut devices = VirtioDevices {
        bus: Bus::new(),
        acpi: Vec::new(),
        cmdline: String::new(),
        thread: None,
        console_flush: list.console_flush,
        transports: Vec::new(),
    };
    let deferred = if defer_per_run { list.per_run } else { 0 };
    let list = list.devices;
    if list.is_empty() {
        return Ok(devices);
    }
    let thread = DeviceThread::start_with(exit.thread_start()).map_err(VirtioError::Thread)?;
    for (index, device) in (0u32..).zip(list) {
        let (addr, gsi) = placement(index)?;
        let mut transport = MmioTransport::new(device, mem.clone(), thread.handle())
            .map_err(VirtioError::Transport)?;
        if index < u32::try_from(deferred).unwrap_or(u32::MAX) {
            transport.defer();
        }
        let kvm_err = |what| move |source| VirtioError::Kvm { what, addr, source };
        vm.register_irqfd(transport.interrupt_event(), gsi)
            .map_err(kvm_err("route the interrupt"))?;
        let notify = IoEventAddress::Mmio(addr + QUEUE_NOTIFY_OFFSET);
        for (queue, event) in (0u32..).zip(transport.queue_notify_events()) {
            vm.register_ioevent(event, &notify, queue)
                .map_err(kvm_err("register a queue notification"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        devices
            .bus
            .insert(transport.clone(), addr, MMIO_WINDOW_LEN)
            .map_err(|source| VirtioError::Bus { addr, source })?;
        devices.transports.push(transport);
        devices.acpi.push(MmioDeviceAcpi {
            addr,
            len: MMIO_WINDOW_LEN,
            gsi,
        });
        devices.cmdline.push(' ');
        devices.cmdline.push_str(&cmdline_entry(addr, gsi));
    }
    devices.thread = Some(thread);
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_get_consecutive_windows_and_gsis_up_to_the_ioapics_last_pin() {
        assert_eq!(placement(0).unwrap(), (0xd000_0000, 5));
        assert_eq!(placement(2).unwrap(), (0xd000_2000, 7));
        assert_eq!(placement(18).unwrap(), (0xd001_2000, 23));
        assert!(matches!(placement(19), Err(VirtioError::TooMany(19))));
    }

    #[test]
    fn windows_stay_in_the_mmio_hole_below_the_ioapic() {
        let (last, _) = placement(18).unwrap();
        const { assert!(VIRTIO_MMIO_BASE >= crate::layout::MMIO_HOLE_START) };
        assert!(last + MMIO_WINDOW_LEN <= crate::layout::IOAPIC_ADDR);
    }

    #[test]
    fn command_line_entry_is_what_virtio_mmio_parses() {
        assert_eq!(
            cmdline_entry(0xd000_1000, 6),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    #[test]
    fn a_missing_disk_is_named() {
        let disk = DiskConfig {
            path: "/nonexistent/disk.img".into(),
            read_only: false,
        };
        let exit = Arc::new(VmExit::new().unwrap());
        let err = build_devices(&[disk], &[], None, false, &exit)
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "disk");
        let cause = std::error::Error::source(&err).expect("the block device's error is the cause");
        assert!(
            cause.to_string().contains("/nonexistent/disk.img"),
            "{cause}"
        );
    }
}
