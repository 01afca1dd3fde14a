//! The boot sequence, as one list, and the wait for the VM to end.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::acpi_pm::{AcpiPm, ACPI_PM_BASE, ACPI_PM_LEN};
use devices::bus::{Bus, BusError};
use devices::exit::{BootPhase, ExitReason, VmExit};
use devices::exit_port::{ExitPort, EXIT_PORT_BASE, EXIT_PORT_LEN};
use devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use devices::ports;
use devices::serial::{Serial, SerialInput, SERIAL_LEN};
use devices::virtio::DeviceThread;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiError};
use crate::boot_params::{self, BootInfo, BootParamsError};
use crate::cpuid;
use crate::firmware;
use crate::kvm::{self, KvmError};
use crate::layout;
use crate::loader::{self, LoaderError};
use crate::memory::{self, MemoryError};
use crate::pvh::{self, PvhError, PvhInfo};
use crate::release::{self, Remains};
use crate::vcpu::{self, BootEntry, VcpuContext, VcpuError};
use crate::virtio_mmio::{
    self, ConsoleConfig, DiskConfig, ShareConfig, VirtioDevices, VirtioMmioError,
};

/// The most vCPUs kvmbuild gives a guest: xAPIC IDs and the MADT's entries are 8 bits wide.
pub const MAX_VCPUS: u8 = 254;

/// What to boot and how.
pub struct VmConfig {
    /// The kernel: a bzImage or an ELF vmlinux.
    pub kernel: PathBuf,
    /// An initrd, copied into guest memory.
    pub initrd: Option<PathBuf>,
    /// Bytes loaded in front of the initrd as part of it: a small cpio archive of per-run
    /// settings before a cached image (empty for none; ignored without an initrd).
    pub initrd_prefix: Vec<u8>,
    /// The kernel command line, passed as given.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Where the serial console's output goes.
    pub console: Box<dyn Write + Send>,
    /// What the guest reads from the serial port (the user's terminal), if anything.
    pub serial_input: Option<std::fs::File>,
    /// Raw disk images for virtio-blk, in order (the first is /dev/vda).
    pub disks: Vec<DiskConfig>,
    /// File systems shared through vhost-user back ends (virtio-fs).
    pub shares: Vec<ShareConfig>,
    /// A virtio-console (hvc0, or named ports), if the guest gets one.
    pub virtio_console: Option<ConsoleConfig>,
    /// Whether the guest gets a virtio-rng.
    pub rng: bool,
    /// Whether the guest gets an in-kernel i8254 PIT. Linux on this machine (hardware-reduced
    /// ACPI, LAPIC and IOAPIC, kvmclock and the TSC) does not use one; guests that calibrate
    /// against the PIT or need it as their timer do. Creating it cost 0.1-2.3 ms here, and its
    /// clean-up adds an SRCU wait to the VM's destruction.
    pub pit: bool,
    /// End the VM after this long.
    pub timeout: Option<Duration>,
}

/// How a run ended.
#[derive(Debug)]
pub struct RunReport {
    /// Why the VM ended.
    pub reason: ExitReason,
    /// When set-up began (before KVM was opened).
    pub started: Instant,
    /// Just before the first vCPU thread was started.
    pub guest_started: Instant,
    /// When the exit was noticed.
    pub ended: Instant,
    /// Boot phases the guest marked, with host timestamps.
    pub markers: Vec<(BootPhase, Instant)>,
    /// A problem writing the console, noticed at exit: a write error, or output of the
    /// multiport virtio-console that its reader did not take within the flush grace period.
    pub console_error: Option<String>,
    /// vCPUs that did not leave `KVM_RUN` when the VM ended (stuck in the host kernel); the
    /// process should exit rather than wait for them.
    pub stuck_vcpus: Vec<usize>,
}

/// Errors that stop a VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM is missing or unusable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The kernel, initrd or command line cannot be used.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// `--mem` is out of range.
    #[error("--mem {0} MiB: {1}")]
    BadMemorySize(u64, String),
    /// `--cpus` is out of range.
    #[error("--cpus {0}: {1}")]
    BadVcpuCount(u64, String),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A KVM VM-level ioctl failed.
    #[error("cannot {what}")]
    KvmIoctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// A vCPU could not be configured or started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A device could not be created or attached.
    #[error("cannot attach the {what}: {reason}")]
    Device { what: &'static str, reason: String },
    /// The ACPI tables could not be built.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// The zero page could not be built.
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    /// The PVH start info could not be written.
    #[error(transparent)]
    Pvh(#[from] PvhError),
    /// A virtio device could not be attached.
    #[error(transparent)]
    Virtio(#[from] VirtioMmioError),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write the boot structures into guest memory: {0}")]
    BootStructures(vm_memory::GuestMemoryError),
}

/// The class of a [`VmError`], which decides the process exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// KVM is absent or unusable.
    KvmUnavailable,
    /// The user's arguments or input files are wrong.
    BadInput,
    /// Anything else: a bug or a host failure.
    Internal,
}

impl VmError {
    /// Which exit status this error deserves.
    pub fn class(&self) -> ErrorClass {
        match self {
            VmError::Kvm(_) => ErrorClass::KvmUnavailable,
            VmError::Loader(LoaderError::GuestWrite { .. }) => ErrorClass::Internal,
            VmError::Loader(_)
            | VmError::BadMemorySize(..)
            | VmError::BadVcpuCount(..)
            | VmError::Virtio(
                VirtioMmioError::Disk { .. }
                | VirtioMmioError::Share(_)
                | VirtioMmioError::TooMany(_),
            ) => ErrorClass::BadInput,
            _ => ErrorClass::Internal,
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmIoctl { what, source }
}

fn device_err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> VmError {
    move |e| VmError::Device {
        what,
        reason: e.to_string(),
    }
}

/// Checks `--mem` before anything is allocated: at least enough for the boot structures and
/// a kernel, at most the host's RAM.
fn check_memory_size(mem_mib: u64) -> Result<u64, VmError> {
    const MIN_MIB: u64 = 4;
    let bad = |why: String| VmError::BadMemorySize(mem_mib, why);
    if mem_mib < MIN_MIB {
        return Err(bad(format!("a guest needs at least {MIN_MIB} MiB")));
    }
    let host_mib = host_ram_bytes() >> 20;
    if mem_mib > host_mib {
        return Err(bad(format!("more than the host's {host_mib} MiB of RAM")));
    }
    Ok(mem_mib << 20)
}

fn host_ram_bytes() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as u64).saturating_mul(page_size.max(0) as u64)
}

fn check_vcpu_count(kvm: &Kvm, vcpus: u8) -> Result<(), VmError> {
    let bad = |why: String| VmError::BadVcpuCount(u64::from(vcpus), why);
    if vcpus == 0 {
        return Err(bad("a guest needs at least one vCPU".into()));
    }
    let limit = kvm.get_max_vcpus().min(usize::from(MAX_VCPUS));
    if usize::from(vcpus) > limit {
        return Err(bad(format!("more than the {limit} vCPUs KVM allows here")));
    }
    Ok(())
}

/// Validates a `--cpus` value that may not fit a `u8`.
pub fn vcpu_count(requested: u64) -> Result<u8, VmError> {
    u8::try_from(requested)
        .ok()
        .filter(|&n| n <= MAX_VCPUS)
        .ok_or_else(|| {
            VmError::BadVcpuCount(
                requested,
                format!("kvmbuild supports at most {MAX_VCPUS} vCPUs"),
            )
        })
}

/// A VM whose devices and memory are set up, ready to start its vCPUs.
struct Vm {
    // Field order matters: the VM (and its memory slots) is dropped before the memory.
    fd: VmFd,
    mem: GuestMemoryMmap,
    pio: Bus,
    virtio: VirtioDevices,
    serial: Arc<Mutex<Serial>>,
    exit: Arc<VmExit>,
}

/// Creates the VM with its memory, TSS, irqchip and (if `pit`) PIT, in that order: guest
/// memory is registered first because a memory slot added once the irqchip and PIT exist
/// waits for an SRCU grace period (4.6-7.4 ms measured on this project's PVM host, against
/// 0.25-0.4 ms when registered first).
fn create_vm(kvm: &Kvm, mem_size: u64, pit: bool) -> Result<(VmFd, GuestMemoryMmap), VmError> {
    let fd = kvm.create_vm().map_err(kvm_err("create the VM"))?;
    let mem = memory::create(mem_size)?;
    memory::register(&fd, &mem)?;
    fd.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(kvm_err("set the TSS address"))?;
    fd.create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    if pit {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(kvm_err("create the in-kernel PIT"))?;
    }
    Ok((fd, mem))
}

fn attach_legacy_devices(
    fd: &VmFd,
    console: Box<dyn Write + Send>,
    exit: &Arc<VmExit>,
) -> Result<(Bus, Arc<Mutex<Serial>>), VmError> {
    let mut pio = Bus::new();
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(device_err("serial port"))?;
    fd.register_irqfd(&irq, ports::SERIAL_COM1_IRQ)
        .map_err(kvm_err("route the serial interrupt"))?;
    let serial = Arc::new(Mutex::new(
        Serial::new(irq, console).map_err(device_err("serial port"))?,
    ));
    let attach = |pio: &mut Bus, dev, base, len, what| {
        pio.insert(dev, base, len)
            .map_err(|e: BusError| VmError::Device {
                what,
                reason: e.to_string(),
            })
    };
    attach(
        &mut pio,
        serial.clone(),
        u64::from(ports::SERIAL_COM1),
        SERIAL_LEN,
        "serial port",
    )?;
    attach(
        &mut pio,
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        I8042_BASE,
        I8042_LEN,
        "i8042",
    )?;
    attach(
        &mut pio,
        Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
        ACPI_PM_BASE,
        ACPI_PM_LEN,
        "ACPI registers",
    )?;
    attach(
        &mut pio,
        Arc::new(Mutex::new(ExitPort::new(exit.clone()))),
        EXIT_PORT_BASE,
        EXIT_PORT_LEN,
        "exit port",
    )?;
    Ok((pio, serial))
}

/// Loads the kernel, command line and initrd, and writes what the entry protocol wants: the
/// PVH start info for an ELF kernel with a PVH note, the zero page otherwise. Returns how the
/// boot vCPU enters the kernel.
fn load_guest(vm: &Vm, config: &VmConfig, mem_size: u64) -> Result<BootEntry, VmError> {
    let kernel = loader::load_kernel(&vm.mem, &config.kernel)?;
    let cmdline = format!("{}{}", config.cmdline, vm.virtio.cmdline);
    let cmdline_len = loader::load_cmdline(&vm.mem, &kernel, &cmdline)?;
    let initrd = match &config.initrd {
        Some(path) => Some(loader::load_initrd(
            &vm.mem,
            mem_size,
            &kernel,
            path,
            &config.initrd_prefix,
        )?),
        None => None,
    };
    let initrd = initrd.map(|p| (p.addr, p.size));
    let rsdp_addr = acpi::write_acpi_tables(&vm.mem, config.vcpus, &vm.virtio.acpi)?.0;
    vcpu::write_boot_tables(&vm.mem)?;
    firmware::write_reset_vector(&vm.mem).map_err(VmError::BootStructures)?;
    if let Some(entry) = kernel.pvh_entry {
        pvh::write(
            &vm.mem,
            &PvhInfo {
                mem_size,
                initrd,
                rsdp_addr,
            },
        )?;
        return Ok(BootEntry::Pvh(entry));
    }
    let params = boot_params::build(&BootInfo {
        mem_size,
        setup_header: kernel.setup_header,
        cmdline_len,
        initrd,
        rsdp_addr,
    })?;
    vm.mem
        .write_obj(params, GuestAddress(layout::ZERO_PAGE))
        .map_err(VmError::BootStructures)?;
    Ok(BootEntry::Linux64(kernel.entry))
}

/// Creates and configures every vCPU, then starts their threads. Returns the threads and the
/// moment just before the first one started.
fn start_vcpus(
    kvm: &Kvm,
    vm: &Vm,
    count: u8,
    entry: BootEntry,
) -> Result<(Vec<std::thread::JoinHandle<()>>, Instant), VmError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("read the supported CPUID"))?;
    let extras = cpuid::Extras {
        tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
    };
    let ctx = VcpuContext {
        pio: Arc::new(vm.pio.clone()),
        mmio: Arc::new(vm.virtio.bus.clone()),
        exit: vm.exit.clone(),
        mem: vm.mem.clone(),
    };
    // Create and configure every vCPU before starting any, so a failure leaves nothing running.
    let mut fds = Vec::with_capacity(usize::from(count));
    for index in 0..count {
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("create a vCPU"))?;
        vcpu::configure(&fd, index, count, &cpuid, extras, entry)?;
        fds.push(fd);
    }
    // Stamped before the first thread starts: a quick guest marks its first phase at once.
    let started = Instant::now();
    let mut threads = Vec::with_capacity(fds.len());
    for (index, fd) in (0..).zip(fds) {
        threads.push(vcpu::spawn(fd, index, ctx.clone())?);
    }
    Ok((threads, started))
}

/// While a VM runs, the eventfd through which [`stop_from_signal`] stops it (else -1).
static STOP_EVENT: AtomicI32 = AtomicI32::new(-1);
/// The signal that asked the VM to stop.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Asks the running VM, if any, to stop because the process received `signal`. Safe to call
/// from a signal handler: it only stores an integer and writes to an eventfd.
pub fn stop_from_signal(signal: i32) {
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
    let fd = STOP_EVENT.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to an fd; write(2) is async-signal-safe. If
        // the VM has just ended and the fd was closed, the write fails harmlessly (EBADF).
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Waits until something requests an exit, a signal asks kvmbuild to stop, or the timeout
/// passes.
fn wait_for_exit(exit: &VmExit, stop: &EventFd, timeout: Option<Duration>) -> ExitReason {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        // A signal that arrived while the VM was being set up counts too.
        let signal = STOP_SIGNAL.load(Ordering::SeqCst);
        if signal != 0 {
            exit.request(ExitReason::Signal(signal));
        }
        if let Some(reason) = exit.reason() {
            return reason;
        }
        let wait_ms = match deadline {
            None => -1,
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) => left.as_millis().min(i32::MAX as u128) as i32,
                None => {
                    exit.request(ExitReason::Timeout);
                    continue;
                }
            },
        };
        let mut fds = [exit.event().as_raw_fd(), stop.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is an array of valid pollfds that outlives the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        let _ = exit.event().read();
    }
}

/// Boots the guest and runs it until it ends.
///
/// Returns once the vCPUs and devices have stopped and the consoles are flushed. The VM fd
/// and guest RAM are left pending: releasing them waits for the kernel (see [`release`]); the
/// next `run` releases them before its clock starts, and a process about to exit hands them
/// to [`release::release_after_exit`].
pub fn run(mut config: VmConfig) -> Result<RunReport, VmError> {
    release::release_pending();
    let started = Instant::now();
    STOP_SIGNAL.store(0, Ordering::SeqCst);
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(device_err("stop event"))?;
    let kvm = kvm::open()?;
    check_vcpu_count(&kvm, config.vcpus)?;
    let mem_size = check_memory_size(config.mem_mib)?;
    let (fd, mem) = create_vm(&kvm, mem_size, config.pit)?;
    let exit = Arc::new(VmExit::new().map_err(device_err("exit channel"))?);
    let console = std::mem::replace(&mut config.console, Box::new(std::io::sink()));
    let (pio, serial) = attach_legacy_devices(&fd, console, &exit)?;
    let virtio_list = virtio_mmio::build_devices(
        &config.disks,
        &config.shares,
        config.virtio_console.take(),
        config.rng,
        &exit,
    )?;
    let virtio = virtio_mmio::attach(&fd, &mem, virtio_list)?;
    let mut vm = Vm {
        fd,
        mem,
        pio,
        virtio,
        serial,
        exit,
    };
    let entry = load_guest(&vm, &config, mem_size)?;
    if let Some(input) = config.serial_input.take() {
        start_serial_input(&mut vm, input)?;
    }
    let (threads, guest_started) = start_vcpus(&kvm, &vm, config.vcpus, entry)?;

    STOP_EVENT.store(stop.as_raw_fd(), Ordering::SeqCst);
    let reason = wait_for_exit(&vm.exit, &stop, config.timeout);
    STOP_EVENT.store(-1, Ordering::SeqCst);
    let ended = Instant::now();
    let markers = vm.exit.markers();
    let TearDown {
        stuck_vcpus,
        console_error,
        remains,
    } = tear_down(vm, threads);
    if let Some(remains) = remains {
        release::keep(remains);
    }
    Ok(RunReport {
        reason,
        started,
        guest_started,
        ended,
        markers,
        console_error,
        stuck_vcpus,
    })
}

/// Serves `input` to the serial port from the device thread, starting that thread if no
/// virtio device did.
fn start_serial_input(vm: &mut Vm, input: std::fs::File) -> Result<(), VmError> {
    let worker = SerialInput::new(input, vm.serial.clone(), vm.exit.clone())
        .map_err(device_err("serial input"))?;
    let thread = match &mut vm.virtio.thread {
        Some(thread) => thread,
        slot @ None => slot.insert(DeviceThread::start().map_err(device_err("serial input"))?),
    };
    thread
        .handle()
        .add(Box::new(worker))
        .map_err(device_err("serial input"))?;
    Ok(())
}

/// How long vCPU threads get to leave `KVM_RUN` once the VM has ended. They take
/// microseconds; one that takes longer is stuck in the host kernel, and waiting on it would
/// turn a finished VM into a hung kvmbuild.
const VCPU_STOP_GRACE: Duration = Duration::from_secs(5);
/// vCPUs still running are kicked again this often, so a kick lost in a race with entering
/// `KVM_RUN` (or any other way) costs this long, not the whole grace period.
const REKICK_INTERVAL: Duration = Duration::from_millis(10);

/// Kicks the vCPU threads out of `KVM_RUN` and joins them. Returns the indices of those still
/// running after `grace`; they are left behind (detached) for process exit to end.
fn stop_vcpus(threads: Vec<std::thread::JoinHandle<()>>, grace: Duration) -> Vec<usize> {
    let started = Instant::now();
    let mut running: Vec<_> = threads.into_iter().enumerate().collect();
    let mut last_kick: Option<Instant> = None;
    let mut pause = Duration::from_micros(20);
    loop {
        // Threads that have already finished (a vCPU that ended the VM itself) cost no sleep.
        let (finished, still): (Vec<_>, Vec<_>) =
            running.into_iter().partition(|(_, t)| t.is_finished());
        finished.into_iter().for_each(|(_, thread)| {
            let _ = thread.join();
        });
        running = still;
        if running.is_empty() || started.elapsed() >= grace {
            break;
        }
        if last_kick.is_none_or(|at| at.elapsed() >= REKICK_INTERVAL) {
            running.iter().for_each(|(_, thread)| vcpu::kick(thread));
            last_kick = Some(Instant::now());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(REKICK_INTERVAL);
    }
    running.into_iter().map(|(index, _)| index).collect()
}

/// How long the guest's last console output may take to reach its readers once the VM has
/// ended; a reader that never reads must not hang kvmbuild.
const CONSOLE_FLUSH_GRACE: Duration = Duration::from_secs(2);

/// Stops the vCPU threads and the device thread, and flushes the consoles (the serial port,
/// and the multiport virtio-console's rings and writers). Returns what went wrong on the way,
/// for the caller to report.
fn tear_down(mut vm: Vm, threads: Vec<std::thread::JoinHandle<()>>) -> TearDown {
    let stuck_vcpus = stop_vcpus(threads, VCPU_STOP_GRACE);
    if !stuck_vcpus.is_empty() {
        // The device thread and guest memory stay as they are: a stuck vCPU may still use them.
        std::mem::forget(vm);
        return TearDown {
            stuck_vcpus,
            console_error: None,
            remains: None,
        };
    }
    // No vCPU runs now, so no driver can reset the console: stopping the device thread drops
    // its worker, which then writes out the output still in its rings.
    let console_flush = vm.virtio.console_flush.take();
    if let Some(flush) = &console_flush {
        flush.vm_stopped(Instant::now() + CONSOLE_FLUSH_GRACE);
    }
    if let Some(thread) = vm.virtio.thread.take() {
        // The guest is gone; a device thread that cannot stop cleanly changes nothing for it.
        let _ = thread.stop();
    }
    let virtio_console = console_flush.map_or(Ok(()), |flush| flush.finish());
    let serial_console = (vm.serial.lock().unwrap_or_else(|p| p.into_inner()))
        .flush()
        .map_err(|e| e.to_string());
    let problems: Vec<String> = [serial_console, virtio_console]
        .into_iter()
        .filter_map(Result::err)
        .collect();
    // The devices are dropped here, with the VM still open; its fd and memory are not.
    let Vm { fd, mem, .. } = vm;
    TearDown {
        stuck_vcpus: Vec::new(),
        console_error: (!problems.is_empty()).then(|| problems.join("; ")),
        remains: Some(Remains { fd, mem }),
    }
}

/// What [`tear_down`] could not do cleanly, and what it left to release.
struct TearDown {
    stuck_vcpus: Vec<usize>,
    console_error: Option<String>,
    remains: Option<Remains>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn finished_vcpu_threads_are_joined_and_stuck_ones_reported() {
        vcpu::install_kick_handler().unwrap();
        let release = Arc::new(AtomicBool::new(false));
        let quick = std::thread::spawn(|| {});
        let stuck = std::thread::spawn({
            let release = release.clone();
            move || {
                while !release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        let started = Instant::now();
        let grace = Duration::from_millis(200);
        assert_eq!(stop_vcpus(vec![quick, stuck], grace), vec![1]);
        let waited = started.elapsed();
        assert!(waited >= grace && waited < grace * 10, "{waited:?}");
        release.store(true, Ordering::SeqCst);
    }

    #[test]
    fn threads_that_stop_at_once_cost_no_grace() {
        vcpu::install_kick_handler().unwrap();
        let threads = (0..4).map(|_| std::thread::spawn(|| {})).collect();
        let started = Instant::now();
        assert!(stop_vcpus(threads, Duration::from_secs(5)).is_empty());
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
