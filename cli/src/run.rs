//! `kvmbuild run`: boot a kernel and run the guest until it ends.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use initrd::guest::error_chain;
use vmm::device_manager::{ConsoleConfig, DiskConfig, ShareConfig};
use vmm::exit::{ExitReason, ResetSource};
use vmm::snapshot::Snapshot;
use vmm::vcpu::VcpuPosition;
use vmm::vm::{self, RunReport, VmConfig};

use crate::vm_error::{self, OptionNames};

use crate::output::create_output;
use crate::terminal::{self, RawishStdin};
use crate::{exit_code, fail};

/// What follows `console=ttyS0` or `console=hvc0` when `--cmdline` is not given.
const DEFAULT_CMDLINE: &str = "panic=1";

pub const RUN_HELP: &str = concat!(
    "Examples:
  kvmbuild run --kernel bzImage --initrd initrd.img --cmdline 'console=ttyS0 panic=1'
  kvmbuild run --kernel vmlinux --mem 2048 --cpus 2 --console boot.log --timeout 60
  kvmbuild run --kernel bzImage --initrd initrd.img --disk disk.img --disk base.img,ro --rng

",
    exit_code::help_table!()
);

#[derive(Args)]
pub struct RunArgs {
    /// Kernel to boot: a bzImage or an ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    pub(crate) kernel: PathBuf,
    /// Initial ramdisk to load.
    #[arg(long, value_name = "PATH")]
    pub(crate) initrd: Option<PathBuf>,
    /// Kernel command line, passed as given (kvmbuild appends its virtio_mmio.device= entries)
    /// [default: "console=ttyS0 panic=1", or console=hvc0 with --console-device hvc0].
    #[arg(long, value_name = "STR")]
    pub(crate) cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    pub(crate) mem: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub(crate) cpus: u64,
    /// Where the console goes: stdout, none, or a path (a file, truncated; or a FIFO with a
    /// reader, a terminal, a device). Never one of the run's input files.
    #[arg(long, value_name = "stdout|none|PATH", default_value = "stdout")]
    pub(crate) console: String,
    /// Which device carries the console: the serial port (ttyS0) or a virtio-console (hvc0).
    /// Both write to --console.
    #[arg(long, value_enum, default_value_t = ConsoleDevice::Ttys0)]
    pub(crate) console_device: ConsoleDevice,
    /// A raw disk image on virtio-blk, `,ro` for read-only; repeat for more (the first is
    /// /dev/vda).
    #[arg(long, value_name = "PATH[,ro]", value_parser = parse_disk)]
    pub(crate) disk: Vec<DiskConfig>,
    /// Share a file system served by a running vhost-user back end (virtiofsd) at SOCKET,
    /// mounted in the guest by TAG; repeatable.
    #[arg(long, value_name = "SOCKET,tag=TAG", value_parser = parse_share)]
    pub(crate) vhost_user_fs: Vec<ShareConfig>,
    /// Give the guest a virtio-rng fed from the host's getrandom.
    #[arg(long)]
    pub(crate) rng: bool,
    /// Give the guest an in-kernel i8254 PIT, for kernels that need one (old ones, or ones
    /// that calibrate against it). Linux with kvmclock does not; it makes ending the VM slower.
    #[arg(long)]
    pub(crate) pit: bool,
    /// End the guest after this many seconds (fractions allowed).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub(crate) timeout: Option<Duration>,
    /// Say what kvmbuild did: the guest memory's backing (huge pages or not).
    #[arg(short, long)]
    pub(crate) verbose: bool,
    /// Save the VM into DIR (which must not exist) when the guest writes kvmbuild's snapshot
    /// port (0x6f2), then let it run on. For guests that write it before any virtio driver
    /// starts a device.
    #[arg(long, value_name = "DIR")]
    pub(crate) snapshot: Option<PathBuf>,
    /// Start from the snapshot in DIR instead of booting: same --kernel, --cmdline, --mem and
    /// --cpus as when it was saved; devices are this run's.
    #[arg(long, value_name = "DIR", conflicts_with = "snapshot")]
    pub(crate) restore: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ConsoleDevice {
    /// The 8250 serial port, COM1.
    #[value(name = "ttyS0")]
    Ttys0,
    /// A virtio-console.
    #[value(name = "hvc0")]
    Hvc0,
}

pub(crate) fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("'{s}' is not a positive number of seconds"))
}

fn parse_share(s: &str) -> Result<ShareConfig, String> {
    let (socket, tag) = s
        .rsplit_once(",tag=")
        .ok_or_else(|| format!("'{s}' is not SOCKET,tag=TAG"))?;
    Ok(ShareConfig {
        socket: socket.into(),
        tag: tag.to_string(),
    })
}

pub(crate) fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let (path, read_only) = match s.rsplit_once(',') {
        Some((path, "ro")) => (path, true),
        Some((_, option)) => return Err(format!("unknown disk option '{option}' (only 'ro')")),
        None => (s, false),
    };
    Ok(DiskConfig {
        path: path.into(),
        read_only,
    })
}

/// The console destination, opened once and shared by every device that writes to it.
enum ConsoleSink {
    Stdout,
    Nowhere,
    File(File),
}

impl ConsoleSink {
    /// Opens the console; a path must be none of `inputs` (the run's kernel, initrd and
    /// disks), and a FIFO must already have its reader (opening never waits).
    fn open(spec: &str, inputs: &[&Path]) -> anyhow::Result<Self> {
        Ok(match spec {
            "stdout" => Self::Stdout,
            "none" => Self::Nowhere,
            path => Self::File(create_output(Path::new(path), inputs, "--console")?),
        })
    }

    fn writer(&self) -> anyhow::Result<Box<dyn Write + Send>> {
        Ok(match self {
            Self::Stdout => Box::new(std::io::stdout()),
            Self::Nowhere => Box::new(std::io::sink()),
            Self::File(f) => Box::new(f.try_clone().context("--console: cannot share the file")?),
        })
    }
}

fn vm_config(
    args: RunArgs,
    stdin: Option<&RawishStdin>,
    names: &OptionNames,
) -> Result<VmConfig, ExitCode> {
    let mut inputs: Vec<&Path> = vec![&args.kernel];
    inputs.extend(args.initrd.as_deref());
    inputs.extend(args.disk.iter().map(|d| d.path.as_path()));
    let sink = ConsoleSink::open(&args.console, &inputs)
        .map_err(|e| fail(exit_code::BAD_INPUT, format!("{e:#}")))?;
    let hvc0 = args.console_device == ConsoleDevice::Hvc0;
    let writer = || {
        sink.writer()
            .map_err(|e| fail(exit_code::INTERNAL, format!("{e:#}")))
    };
    let vcpus = vm::vcpu_count(args.cpus).map_err(|e| vm_error::report(&e, names))?;
    // What is typed goes to the console device: the serial port, or hvc0.
    let mut terminal_input = stdin.and_then(|t| t.input().ok());
    let cmdline = args.cmdline.unwrap_or_else(|| {
        let console = if hvc0 { "hvc0" } else { "ttyS0" };
        format!("console={console} {DEFAULT_CMDLINE}")
    });
    let key = snapshot_key(&args.kernel, &cmdline);
    let restore = match &args.restore {
        Some(dir) => Some(Snapshot::open(dir, &key).map_err(|e| {
            fail(
                exit_code::BAD_INPUT,
                format!("--restore {}: {}", dir.display(), error_chain(&e)),
            )
        })?),
        None => None,
    };
    Ok(VmConfig {
        snapshot_to: args.snapshot.map(|dir| (dir, key)),
        defer_per_run: false,
        restore,
        held_input: None,
        kernel: args.kernel,
        initrd: args.initrd,
        initrd_prefix: Vec::new(),
        cmdline,
        mem_mib: args.mem,
        vcpus,
        console: writer()?,
        serial_input: if hvc0 { None } else { terminal_input.take() },
        disks: args.disk,
        shares: args.vhost_user_fs,
        virtio_console: match hvc0 {
            true => Some(ConsoleConfig::Hvc0 {
                output: writer()?,
                input: terminal_input.map(|f| Box::new(f) as _),
            }),
            false => None,
        },
        rng: args.rng,
        pit: args.pit,
        setup_deadline: args.timeout.map(|t| std::time::Instant::now() + t),
        seccomp: crate::seccomp_filters(),
        confine_runner: true,
    })
}

pub fn run(args: RunArgs) -> ExitCode {
    run_as(args, &vm_error::RUN)
}

/// Runs a VM for a front end that names its options `names` (`run`, the QEMU entry point).
pub(crate) fn run_as(args: RunArgs, names: &OptionNames) -> ExitCode {
    let timeout = args.timeout;
    match run_vm(args, names) {
        Ok(report) => report_outcome(&report, timeout),
        Err(code) => code,
    }
}

/// Boots and runs the guest; an error is the exit status, its message already printed.
/// Front ends that read outcomes differently (qemu-compat's `-no-reboot`) start here.
pub(crate) fn run_vm(args: RunArgs, names: &OptionNames) -> Result<RunReport, ExitCode> {
    let timeout = args.timeout;
    let verbose = args.verbose;
    let stop = terminal::stop_vm_on_signals()?;
    // The terminal feeds the console device (the serial port or hvc0); it is restored when
    // `stdin` drops, before any message below is printed.
    let stdin = RawishStdin::enter();
    let config = vm_config(args, stdin.as_ref(), names)?;
    if vmm::kvm::is_pvm_host() {
        eprintln!("kvmbuild: warning: {}", vmm::kvm::PVM_WARNING);
    }
    let result = vm::run(config, stop, timeout);
    drop(stdin);
    match result {
        Ok(mut report) => {
            if verbose {
                eprintln!("kvmbuild: {}", report.memory_backing);
                if let Some(restored) = &report.restored {
                    eprintln!("kvmbuild: {restored}");
                }
                if let Some(served) = &report.served_on_demand {
                    eprintln!("kvmbuild: {}", served_line(served.bytes));
                }
            }
            crate::keep_finished_vm(report.remains.take());
            Ok(report)
        }
        Err(e) => Err(vm_error::report(&e, names)),
    }
}

/// What a `run` snapshot is for: the same kernel (by path) and command line.
fn snapshot_key(kernel: &Path, cmdline: &str) -> String {
    let kernel = std::fs::canonicalize(kernel).unwrap_or_else(|_| kernel.to_path_buf());
    format!("run kernel={} cmdline={cmdline}", kernel.display())
}

/// How the guest reset itself, for messages.
pub(crate) fn reset_how(source: &ResetSource) -> &'static str {
    match source {
        ResetSource::I8042 => "through the i8042 controller",
        ResetSource::AcpiReset => "through the ACPI reset register",
        ResetSource::TripleFault => "by triple-faulting",
    }
}

/// " (vCPU 0 halted at RIP …, …)": where a timed-out guest was, or nothing if KVM did not say.
fn where_vcpus_were(positions: &[VcpuPosition]) -> String {
    if positions.is_empty() {
        return String::new();
    }
    let each: Vec<String> = positions.iter().map(ToString::to_string).collect();
    format!(" ({})", each.join(", "))
}

pub(crate) fn report_outcome(report: &RunReport, timeout: Option<Duration>) -> ExitCode {
    if let Some(Err(e)) = &report.snapshot {
        eprintln!(
            "kvmbuild: warning: no snapshot was saved: {}",
            error_chain(e)
        );
    }
    if let Some(e) = &report.console_error {
        eprintln!("kvmbuild: warning: console output was lost: {e}");
    }
    for index in &report.stuck_vcpus {
        eprintln!(
            "kvmbuild: warning: vCPU {index} did not leave KVM_RUN after the VM ended (stuck in the host kernel); exiting without it"
        );
    }
    match &report.reason {
        ExitReason::PowerOff => ExitCode::from(exit_code::SUCCESS),
        ExitReason::GuestStatus(status) => ExitCode::from(*status),
        ExitReason::Reset(source) => fail(
            exit_code::GUEST_RESET,
            format!(
                "the guest reset itself {}; kvmbuild does not reboot guests",
                reset_how(source)
            ),
        ),
        ExitReason::Timeout => fail(
            exit_code::TIMEOUT,
            format!(
                "the guest was stopped after the {:?} timeout{}",
                timeout.unwrap_or_default(),
                where_vcpus_were(&report.timed_out_at)
            ),
        ),
        ExitReason::Internal(message) => fail(exit_code::INTERNAL, message),
        // A reader of the guest's output went away: end as a process in a pipeline would on
        // SIGPIPE, silently.
        ExitReason::OutputClosed => ExitCode::from(exit_code::OUTPUT_CLOSED),
        // Vm::run saves and runs on at the snapshot point; it never ends there.
        ExitReason::SnapshotPoint => {
            fail(exit_code::INTERNAL, "the VM stopped at its snapshot point")
        }
        ExitReason::Stopped => {
            let signal = terminal::stop_signal().unwrap_or(libc::SIGTERM);
            fail(
                u8::try_from(128 + signal).unwrap_or(u8::MAX),
                format!("stopped the guest on {}", terminal::signal_name(signal)),
            )
        }
    }
}

/// The `-v` line on how much of a snapshot's memory a restored guest touched.
pub fn served_line(served: u64) -> String {
    format!(
        "served {} KiB of the snapshot's memory as the guest touched it",
        served >> 10
    )
}
