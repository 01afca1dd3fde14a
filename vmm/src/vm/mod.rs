//! A VM in three steps: [`Vm::build`] creates it with its memory, devices and vCPUs and loads
//! the guest; [`Vm::run`] runs it until it ends (the caller owns the stop event and the
//! deadline); [`Vm::teardown`] stops the devices, flushes the consoles and hands back what
//! is left to release. [`run`] does all three for a caller that only wants the outcome.
//!
//! The boot sequence reads top to bottom in [`Vm::build`].

mod error;
mod restore;
mod wait;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::exit::{BootPhase, ExitReason, VmExit};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

pub use error::{vcpu_count, ConfigField, VmError, MAX_VCPUS};
pub use restore::{Fill, Restored};

use crate::acpi;
use crate::boot_params::{self, BootInfo};
use crate::cpuid;
use crate::device_manager::{ConsoleConfig, DeviceConfig, DeviceManager, DiskConfig, ShareConfig};
use crate::firmware;
use crate::kvm;
use crate::layout;
use crate::loader;
use crate::memory::{self, BackingReport};
use crate::pvh::{self, PvhInfo};
use crate::release::Remains;
use crate::seccomp;
use crate::snapshot::check::{HeldInput, MemoryCheck};
use crate::snapshot::on_demand::{OnDemand, Served};
use crate::snapshot::{self, SavedState, Snapshot, SnapshotError, VcpuState};
use crate::vcpu::{self, BootEntry, VcpuContext, VcpuPosition};

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
    /// When set-up must be over (the run's timeout, counted from the front end's start): a
    /// vhost-user back end that has not answered by then is given up on.
    pub setup_deadline: Option<Instant>,
    /// Save the VM into this snapshot directory, for this key (see [`Snapshot::open`]), when
    /// the guest writes the snapshot port (else the port is ignored); then run on.
    pub snapshot_to: Option<(PathBuf, String)>,
    /// With `snapshot_to`: show the disks to the guest only after its snapshot point, so that
    /// the snapshot holds none of this run's disks (whose sizes and contents are the run's)
    /// and later runs attach theirs (see [`devices::virtio::MmioTransport::defer`]).
    pub defer_per_run: bool,
    /// Start from this snapshot instead of booting `kernel` and `initrd` (which are then not
    /// read): its memory, vCPUs, interrupt controllers, clock and COM1, with the virtio devices
    /// made from this configuration put in the saved transports' states (a device a driver
    /// had started goes on from where it stood).
    pub restore: Option<Snapshot>,
    /// Input a restored guest must not get before its memory passed the check: the run's
    /// settings, which `exec` holds back so that the check runs beside the guest
    /// ([`snapshot::check`]). Released at once when the VM was not restored or its memory
    /// was copied (checked first).
    pub held_input: Option<HeldInput>,
    /// The seccomp filters every thread of this VM confines itself with as it starts (see
    /// [`crate::seccomp`]); `None` leaves them unfiltered.
    pub seccomp: Option<Arc<seccomp::Filters>>,
    /// With `seccomp`: [`Vm::run`] confines its calling thread with the runner's deny list
    /// before the guest starts ([`seccomp::Filters::confine_runner`]). For callers that run one
    /// VM and start no process or socket after it; the confinement outlives the VM.
    pub confine_runner: bool,
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
    /// What backs guest RAM (huge pages or not, and why), for `-v`.
    pub memory_backing: BackingReport,
    /// How saving the snapshot went (see [`RunOutcome::snapshot`]).
    pub snapshot: Option<Result<(), SnapshotError>>,
    /// What restoring the snapshot took, when the VM started from one.
    pub restored: Option<Restored>,
    /// What the server of a restored VM's memory did, when it had one.
    pub served_on_demand: Option<Served>,
    /// How long checking a restored VM's memory beside the guest took, when it was.
    pub memory_checked: Option<Duration>,
    /// Where each vCPU was when the run timed out (empty otherwise).
    pub timed_out_at: Vec<VcpuPosition>,
    /// The VM fd and guest RAM, still to be released (see [`crate::release`]); `None` when a
    /// stuck vCPU may still use them.
    pub remains: Option<Remains>,
}

impl RunReport {
    /// When the guest marked `phase`, if it did.
    pub fn marked(&self, phase: BootPhase) -> Option<Instant> {
        self.markers
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, at)| *at)
    }
}

/// How long the guest's last console output may take to reach its readers once the VM has
/// ended; a reader that never reads must not hang kvmbuild.
const CONSOLE_FLUSH_GRACE: Duration = Duration::from_secs(2);

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmIoctl { what, source }
}

/// A VM: its memory, devices and vCPUs, and the guest loaded into it.
pub struct Vm {
    kvm: Kvm,
    memory_backing: BackingReport,
    pit: bool,
    snapshot_to: Option<(PathBuf, String)>,
    /// Present from [`Vm::build`] until [`Vm::teardown`] stops them.
    devices: Option<DeviceManager>,
    /// Present while no vCPU thread runs them.
    vcpus: Vec<VcpuFd>,
    vcpu_count: u8,
    exit: Arc<VmExit>,
    started: Instant,
    restored: Option<Restored>,
    /// Serves a restored VM's memory as it is touched; dropped (stopped) only once no vCPU or
    /// device thread can touch guest memory any more.
    on_demand: Option<OnDemand>,
    /// Checks a restored VM's memory beside the guest and releases the held input.
    memory_check: Option<MemoryCheck>,
    /// vCPUs that did not come back from their threads: they may still use memory and devices.
    stuck: Vec<usize>,
    /// The filters to confine [`Vm::run`]'s caller with, until it has been.
    confine_runner: Option<Arc<seccomp::Filters>>,
    // Field order matters: the VM (and its memory slots) is dropped before the memory.
    fd: VmFd,
    mem: GuestMemoryMmap,
}

/// The outcome of [`Vm::run`].
#[derive(Debug)]
pub struct RunOutcome {
    /// Why the VM ended.
    pub reason: ExitReason,
    /// Just before the first vCPU thread was started.
    pub guest_started: Instant,
    /// When the exit was noticed.
    pub ended: Instant,
    /// Boot phases the guest marked, with host timestamps.
    pub markers: Vec<(BootPhase, Instant)>,
    /// vCPUs that did not leave `KVM_RUN` (see [`RunReport::stuck_vcpus`]).
    pub stuck_vcpus: Vec<usize>,
    /// Whether the snapshot the configuration asked for was saved; `None` when none was
    /// asked for or the guest never reached its snapshot point.
    pub snapshot: Option<Result<(), SnapshotError>>,
    /// Where each vCPU was when the run timed out (empty otherwise).
    pub timed_out_at: Vec<VcpuPosition>,
}

/// What [`Vm::teardown`] reports.
pub struct Teardown {
    /// A problem writing the consoles' last output.
    pub console_error: Option<String>,
    /// The VM fd and guest RAM to release, unless a stuck vCPU may still use them.
    pub remains: Option<Remains>,
    /// What the server of a restored VM's memory did, when it had one.
    pub served_on_demand: Option<Served>,
    /// How the check of a restored VM's memory beside the guest went (see
    /// [`RunReport::memory_checked`]), when there was one: a failure means the snapshot was
    /// damaged, whatever the guest did.
    pub memory_check: Option<Result<Option<Duration>, SnapshotError>>,
}

impl Vm {
    /// Creates the VM and everything in it, and loads the guest (or restores the snapshot),
    /// ready to run.
    pub fn build(mut config: VmConfig, stop: &EventFd) -> Result<Vm, VmError> {
        let started = Instant::now();
        let kvm = kvm::open()?;
        error::check_vcpu_count(&kvm, config.vcpus)?;
        let mem_size = error::check_memory_size(config.mem_mib)?;
        let restore = config.restore.take();
        if let Some(snapshot) = &restore {
            snapshot.check_machine(mem_size, config.vcpus)?;
            restore::check_host_cpu(&kvm, &snapshot.state)?;
        }
        let (fd, mem, memory_backing) = create_vm(&kvm, mem_size, config.pit)?;
        let exit = Arc::new(VmExit::new().map_err(|e| VmError::Setup("exit channel", e))?);
        exit.set_stop_event(stop)
            .map_err(|e| VmError::Setup("stop event", e))?;
        exit.set_deadline(config.setup_deadline);
        if let Some(filters) = &config.seccomp {
            exit.set_thread_start(filters.thread_start());
        }
        let held_input = config.held_input.take();
        let (restored, on_demand, memory_check) = match &restore {
            Some(snapshot) => {
                let memory = restore::restore_memory(
                    &mem,
                    snapshot,
                    &memory_backing.backing,
                    held_input,
                    &exit,
                )?;
                (Some(memory.restored), memory.on_demand, memory.check)
            }
            None => {
                let release = held_input.map(|held| MemoryCheck::start(None, held, &exit));
                (None, None, release.transpose()?)
            }
        };
        if config.snapshot_to.is_some() {
            exit.pause_at_snapshot_point();
        }
        let mut devices = DeviceManager::attach(
            &fd,
            &mem,
            DeviceConfig {
                console: std::mem::replace(&mut config.console, Box::new(std::io::sink())),
                disks: std::mem::take(&mut config.disks),
                shares: std::mem::take(&mut config.shares),
                virtio_console: config.virtio_console.take(),
                rng: config.rng,
                serial_state: restore.as_ref().map(|s| s.state.serial.clone()),
                defer_per_run: config.defer_per_run && config.snapshot_to.is_some(),
            },
            &exit,
        )?;
        let vcpus = match &restore {
            Some(snapshot) => {
                let vcpus = restore::restore_vcpus(&fd, &snapshot.state)?;
                // After the interrupt controllers: what the restarted devices raise must
                // land in the restored ones, not be overwritten by them.
                devices
                    .restore_virtio(&snapshot.state.virtio)
                    .map_err(SnapshotError::Devices)?;
                vcpus
            }
            None => {
                let entry = load_guest(&mem, &devices, &config, mem_size)?;
                create_vcpus(&kvm, &fd, config.vcpus, entry)?
            }
        };
        if let Some(input) = config.serial_input.take() {
            devices.serve_serial_input(input, &exit)?;
        }
        Ok(Vm {
            kvm,
            memory_backing,
            pit: config.pit,
            snapshot_to: config.snapshot_to.take(),
            devices: Some(devices),
            vcpus,
            vcpu_count: config.vcpus,
            exit,
            started,
            restored,
            on_demand,
            memory_check,
            stuck: Vec::new(),
            confine_runner: config.seccomp.clone().filter(|_| config.confine_runner),
            fd,
            mem,
        })
    }

    /// Saves the stopped VM into the snapshot directory `dir` for `key` (see [`snapshot`]).
    /// [`Vm::run`] calls it at the snapshot point when the configuration asks for it.
    pub fn save_snapshot(&self, dir: &std::path::Path, key: &str) -> Result<(), SnapshotError> {
        if self.vcpus.len() != usize::from(self.vcpu_count) {
            return Err(SnapshotError::VcpusRunning);
        }
        if self.on_demand.is_some() {
            return Err(SnapshotError::ServedOnDemand);
        }
        // Held still (frozen) until the memory is saved, so both describe one instant.
        let (virtio, _frozen) = self
            .devices()
            .save_virtio()
            .map_err(SnapshotError::Device)?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in &self.vcpus {
            let cpuid =
                vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                    .map_err(|source| SnapshotError::Kvm {
                        what: "read CPUID",
                        source,
                    })?;
            vcpus.push(VcpuState::save(&self.kvm, vcpu, &cpuid)?);
        }
        let state = SavedState {
            key: key.to_owned(),
            mem_size: self.mem.iter().map(|r| r.len()).sum(),
            vcpus,
            vm: snapshot::VmState::save(&self.fd, self.pit)?,
            serial: self.devices().serial_state(),
            virtio,
            memory_crc: 0,
            host_cpuid: restore::supported_cpuid(&self.kvm)?.as_slice().to_vec(),
        };
        snapshot::write(dir, state, |file| snapshot::memory::save(&self.mem, file))
    }

    /// Lets a VM stopped at the snapshot point run on. Returns false when it had ended.
    fn resume(&self) -> bool {
        self.exit.resume()
    }

    /// Runs the guest until it ends: it exits, fails, `stop` is signalled (before or during
    /// the run) or `timeout` passes. When the configuration asked for a snapshot, the VM is
    /// saved at the guest's snapshot point on the way (the outcome says how that went) and
    /// runs on. Returns once every vCPU thread has stopped (or been given up as stuck); the
    /// devices keep running until [`Vm::teardown`].
    pub fn run(
        &mut self,
        stop: &EventFd,
        timeout: Option<Duration>,
    ) -> Result<RunOutcome, VmError> {
        if let Some(filters) = self.confine_runner.take() {
            filters.confine_runner()?;
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        self.exit.set_deadline(deadline);
        // Stamped before the first thread starts: a quick guest marks its first phase at once.
        let guest_started = Instant::now();
        let mut snapshot = None;
        loop {
            let reason = self.run_vcpus(stop, deadline);
            let ended = Instant::now();
            if reason == ExitReason::SnapshotPoint && self.stuck.is_empty() {
                if let Some((dir, key)) = &self.snapshot_to {
                    snapshot = Some(self.save_snapshot(dir, key));
                }
                // Saved or not, the guest now probes this run's disks.
                self.devices().reveal_per_run();
                if self.resume() {
                    continue;
                }
            }
            let timed_out_at = match reason {
                ExitReason::Timeout => self.vcpu_positions(),
                _ => Vec::new(),
            };
            return Ok(RunOutcome {
                reason,
                guest_started,
                ended,
                markers: self.exit.markers(),
                stuck_vcpus: self.stuck.clone(),
                snapshot,
                timed_out_at,
            });
        }
    }

    /// Where the vCPUs are, while no thread runs them.
    fn vcpu_positions(&self) -> Vec<VcpuPosition> {
        (0..)
            .zip(&self.vcpus)
            .filter_map(|(index, fd)| VcpuPosition::read(fd, index))
            .collect()
    }

    /// Starts a thread per vCPU, waits for the VM to stop and takes the vCPUs back.
    fn run_vcpus(&mut self, stop: &EventFd, deadline: Option<Instant>) -> ExitReason {
        let ctx = VcpuContext {
            pio: Arc::new(self.devices().pio.clone()),
            mmio: Arc::new(self.devices().mmio.clone()),
            exit: self.exit.clone(),
            mem: self.mem.clone(),
        };
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (index, fd) in (0..).zip(std::mem::take(&mut self.vcpus)) {
            match vcpu::spawn(fd, index, ctx.clone()) {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    self.exit.request(ExitReason::Internal(e.to_string()));
                    break;
                }
            }
        }
        let reason = wait::wait_for_exit(&self.exit, stop, deadline);
        let (joined, stuck) = wait::stop_vcpus(threads, wait::VCPU_STOP_GRACE);
        match wait::all_returned(joined, usize::from(self.vcpu_count)) {
            Some(vcpus) => self.vcpus = vcpus,
            None => self.stuck = stuck,
        }
        reason
    }

    /// Stops the devices and writes out the consoles' last output. The VM fd and guest RAM are
    /// not released here (that waits for the kernel, see [`crate::release`]): they are handed
    /// back, unless a stuck vCPU may still use them, in which case everything is left as it is
    /// for the process's exit to end.
    pub fn teardown(mut self) -> Teardown {
        if !self.stuck.is_empty() {
            std::mem::forget(self);
            return Teardown {
                console_error: None,
                remains: None,
                served_on_demand: None,
                memory_check: None,
            };
        }
        let console_error = self
            .devices
            .take()
            .and_then(|devices| devices.stop(Instant::now() + CONSOLE_FLUSH_GRACE));
        // Nothing touches guest memory any more: its server can stop.
        let served_on_demand = self.on_demand.take().map(OnDemand::finish);
        let memory_check = self.memory_check.take().map(MemoryCheck::finish);
        let Vm { fd, mem, .. } = self;
        Teardown {
            console_error,
            remains: Some(Remains { fd, mem }),
            served_on_demand,
            memory_check,
        }
    }

    /// What backs guest RAM (huge pages or not, and why).
    pub fn memory_backing(&self) -> &BackingReport {
        &self.memory_backing
    }

    /// When [`Vm::build`] began.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// What restoring the snapshot's memory took, when the VM started from one.
    pub fn restored(&self) -> Option<Restored> {
        self.restored.clone()
    }

    fn devices(&self) -> &DeviceManager {
        self.devices
            .as_ref()
            .expect("devices are only taken by teardown, which consumes the VM")
    }
}

/// Builds, runs and tears down a VM: the whole life of a one-shot guest.
pub fn run(
    config: VmConfig,
    stop: &EventFd,
    timeout: Option<Duration>,
) -> Result<RunReport, VmError> {
    let mut vm = Vm::build(config, stop)?;
    let started = vm.started();
    let memory_backing = vm.memory_backing().clone();
    let restored = vm.restored();
    let outcome = vm.run(stop, timeout)?;
    let Teardown {
        console_error,
        remains,
        served_on_demand,
        memory_check,
    } = vm.teardown();
    let memory_checked = match memory_check {
        Some(Err(damaged)) => return Err(damaged.into()),
        Some(Ok(took)) => took,
        None => None,
    };
    Ok(RunReport {
        reason: outcome.reason,
        started,
        guest_started: outcome.guest_started,
        ended: outcome.ended,
        markers: outcome.markers,
        console_error,
        stuck_vcpus: outcome.stuck_vcpus,
        snapshot: outcome.snapshot,
        restored,
        served_on_demand,
        memory_checked,
        timed_out_at: outcome.timed_out_at,
        memory_backing,
        remains,
    })
}

/// Creates the VM with its memory, TSS, irqchip and (if `pit`) PIT, in that order: guest
/// memory is registered first because a memory slot added once the irqchip and PIT exist
/// waits for an SRCU grace period (4.6-7.4 ms measured on this project's PVM host, against
/// 0.25-0.4 ms when registered first).
fn create_vm(
    kvm: &Kvm,
    mem_size: u64,
    pit: bool,
) -> Result<(VmFd, GuestMemoryMmap, BackingReport), VmError> {
    let fd = kvm.create_vm().map_err(kvm_err("create the VM"))?;
    let (mem, backing) = memory::create_reporting(mem_size)?;
    memory::register(&fd, &mem)?;
    fd.set_tss_address(const { layout::as_usize(layout::KVM_TSS_ADDR) })
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
    Ok((fd, mem, backing))
}

/// Loads the kernel, command line and initrd, and writes what the entry protocol wants: the
/// PVH start info for an ELF kernel with a PVH note, the zero page otherwise. Returns how the
/// boot vCPU enters the kernel.
fn load_guest(
    mem: &GuestMemoryMmap,
    devices: &DeviceManager,
    config: &VmConfig,
    mem_size: u64,
) -> Result<BootEntry, VmError> {
    let kernel = loader::load_kernel(mem, &config.kernel)?;
    let cmdline = format!("{}{}", config.cmdline, devices.cmdline_entries());
    let cmdline_len = loader::load_cmdline(mem, &kernel, &cmdline)?;
    let initrd = match &config.initrd {
        Some(path) => Some(loader::load_initrd(
            mem,
            mem_size,
            &kernel,
            path,
            &config.initrd_prefix,
        )?),
        None => None,
    };
    let initrd = initrd.map(|p| (p.addr, p.size));
    let rsdp_addr = acpi::write_acpi_tables(mem, config.vcpus, devices.acpi_devices())?.0;
    vcpu::write_boot_tables(mem)?;
    firmware::write_reset_vector(mem).map_err(VmError::BootStructures)?;
    if let Some(entry) = kernel.pvh_entry {
        pvh::write(
            mem,
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
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE))
        .map_err(VmError::BootStructures)?;
    Ok(BootEntry::Linux64(kernel.entry))
}

/// Creates and configures every vCPU, so a failure leaves nothing running.
fn create_vcpus(kvm: &Kvm, vm: &VmFd, count: u8, entry: BootEntry) -> Result<Vec<VcpuFd>, VmError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("read the supported CPUID"))?;
    let extras = cpuid::Extras {
        tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
    };
    let mut fds = Vec::with_capacity(usize::from(count));
    for index in 0..count {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("create a vCPU"))?;
        vcpu::configure(&fd, index, count, &cpuid, extras, entry)?;
        fds.push(fd);
    }
    Ok(fds)
}
