//! `kvmbuild bench`: boots the same kernel and initrd many times and reports each phase of the
//! boot as min/median/max, as JSON and as an SVG plot, optionally beside QEMU and Firecracker;
//! or (`--exec`) times `kvmbuild exec` of a command as a process.
//!
//! kvmbuild's phases come from host-clock timestamps: `run()` called, first vCPU started, the
//! guest's boot markers on port 0x6f0 (init started, command started, command finished), exit
//! noticed, `run()` returned. Each such boot runs in this process, so process start and exit
//! are not in them. With `--compare`, every round also runs `kvmbuild run` and each other VMM
//! as processes, one after the other, timed spawn to exit with their CPU time and peak RSS
//! (`wait4`); the other VMMs do not see the markers.

mod exec_mode;
mod others;
mod plot;
mod process;
mod stats;

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use vmm::vm::{self, VmConfig, VmError};
use vmm_sys_util::eventfd::EventFd;

pub use exec_mode::marks_line;
use exec_mode::measure_exec;
use others::{Guest, Kind, Vmm};
use process::ProcessRun;
use stats::{stats, stats_of, Expect, PhaseStats, Ratio, Sample, Stats};

use crate::output::create_output;
use crate::{exit_code, fail, vm_error};

pub const BENCH_HELP: &str = "\
Examples:
  kvmbuild bench --kernel bzImage --initrd initrd.img \\
      --cmdline 'console=ttyS0 quiet kvmbuild.cmd=/bin/true' --runs 20 --json boot.json --svg boot.svg
  kvmbuild bench --kernel vmlinux --initrd initrd.img --cmdline '...' --compare qemu,firecracker=./fc
  kvmbuild bench --kernel reboot.elf --expect reset --runs 30
  kvmbuild bench --kernel bzImage --compare qemu --qemu-arg=-cpu --qemu-arg=host,-arch-capabilities
  kvmbuild bench --exec --runs 5 --svg exec.svg -- true
  kvmbuild bench --exec --warm --runs 10 --json warm.json -- true

Each boot must end as --expect says (exit: power-off or status 0; reset: a reset; any: either).
Phases need kvmbuild's init (or any guest that writes the markers 1, 2, 3 to port 0x6f0);
without them only set-up, guest and teardown are reported. Firecracker only stops when the
guest resets (reboot=k): compare with it using --expect reset or any.";

#[derive(Args)]
pub struct BenchArgs {
    /// Kernel to boot: a bzImage or an ELF vmlinux (with --exec: passed to kvmbuild exec).
    #[arg(long, value_name = "PATH", required_unless_present = "exec")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line, as for `kvmbuild run`.
    #[arg(
        long,
        value_name = "STR",
        default_value = "console=ttyS0 panic=1 quiet"
    )]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u64,
    /// Measured boots.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Boots run first and not measured.
    #[arg(long, value_name = "N", default_value_t = 2)]
    warmup: u32,
    /// Write the report as JSON here (else it goes to stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write an SVG plot of the phases and of every run here.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Also time this QEMU binary booting the same guest (the same as --compare qemu=BINARY).
    #[arg(long, value_name = "BINARY")]
    qemu: Option<PathBuf>,
    /// Also time these VMMs as processes, in alternation with `kvmbuild run`: qemu,
    /// firecracker, each as NAME or NAME=BINARY.
    #[arg(long, value_name = "VMM[=BINARY],...", value_delimiter = ',')]
    compare: Vec<Vmm>,
    /// An extra argument for QEMU, after kvmbuild's (a later `-cpu` replaces `-cpu host`);
    /// repeatable, e.g. --qemu-arg=-bios --qemu-arg=qboot.rom.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    qemu_arg: Vec<String>,
    /// How each boot must end to count.
    #[arg(long, value_enum, default_value_t = Expect::Exit)]
    expect: Expect,
    /// Give up on a boot after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
    /// Time `kvmbuild exec -- COMMAND` as a process instead (process start, command started,
    /// command done, process exit); --mem, --cpus and --kernel are passed on.
    #[arg(long)]
    exec: bool,
    /// With --exec: an extra option for `kvmbuild exec`, after bench's own; repeatable, e.g.
    /// --exec-arg=--modules=DIR --exec-arg=--share=.:/src.
    #[arg(
        long,
        value_name = "ARG",
        allow_hyphen_values = true,
        requires = "exec"
    )]
    exec_arg: Vec<OsString>,
    /// With --exec: also time `kvmbuild exec --warm` (restored from a snapshot, saved by one
    /// unmeasured run first), alternating with the cold runs round by round, and report cold
    /// over warm to "command started".
    #[arg(long, requires = "exec")]
    warm: bool,
    /// The command for --exec.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

impl BenchArgs {
    fn kernel(&self) -> &Path {
        self.kernel
            .as_deref()
            .expect("clap requires --kernel without --exec")
    }

    fn limit(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }

    /// The VMMs timed as processes besides kvmbuild's in-process boots: `kvmbuild run` first
    /// (the fair side of the comparison), then the others; none without --compare or --qemu.
    fn processes(&self) -> anyhow::Result<Vec<Vmm>> {
        let mut others = self.compare.clone();
        if let Some(qemu) = &self.qemu {
            others.push(Vmm {
                kind: Kind::Qemu,
                binary: qemu.clone(),
            });
        }
        if others.is_empty() {
            return Ok(others);
        }
        let me = std::env::current_exe().context("cannot find kvmbuild's own binary")?;
        let mut all = vec![Vmm {
            kind: Kind::Kvmbuild,
            binary: me,
        }];
        all.extend(others);
        Ok(all)
    }
}

fn boot_once(args: &BenchArgs) -> anyhow::Result<Sample> {
    let config = VmConfig {
        kernel: args.kernel().to_path_buf(),
        initrd: args.initrd.clone(),
        initrd_prefix: Vec::new(),
        cmdline: args.cmdline.clone(),
        mem_mib: args.mem,
        vcpus: vm::vcpu_count(args.cpus)?,
        console: Box::new(std::io::sink()),
        serial_input: None,
        disks: Vec::new(),
        shares: Vec::new(),
        virtio_console: None,
        rng: false,
        pit: false,
        snapshot_to: None,
        defer_per_run: false,
        restore: None,
        held_input: None,
        // Bench bounds a boot with its own limit below.
        setup_deadline: None,
        seccomp: crate::seccomp_filters(),
        // Bench runs many VMs, and other programs, from this thread.
        confine_runner: false,
    };
    // Nothing stops a bench run but its timeout.
    let stop = EventFd::new(libc::EFD_NONBLOCK)?;
    let mut report = vm::run(config, &stop, Some(args.limit()))?;
    let returned = Instant::now();
    // Released off the clock: the previous VM goes now, this one after the next boot.
    crate::keep_finished_vm(report.remains.take());
    if !args.expect.accepts(&report.reason) {
        bail!(
            "a boot did not end as --expect {:?} asks: {:?}",
            args.expect,
            report.reason
        );
    }
    Ok(stats::sample(&report, returned))
}

/// One VMM's runs as a process, summarised.
#[derive(Serialize)]
struct ProcessStats {
    vmm: &'static str,
    binary: PathBuf,
    /// Spawn to exit.
    wall: Stats,
    /// User plus system time.
    cpu: Stats,
    /// Peak RSS, MiB (the fields say ms; they are MiB).
    peak_rss_mib: Stats,
}

fn process_stats(vmm: &Vmm, runs: &[ProcessRun]) -> Option<ProcessStats> {
    let rss: Vec<f64> = runs
        .iter()
        .map(|r| r.peak_rss_kib as f64 / 1024.0)
        .collect();
    Some(ProcessStats {
        vmm: vmm.kind.name(),
        binary: vmm.binary.clone(),
        wall: stats(&runs.iter().map(|r| r.wall).collect::<Vec<_>>())?,
        cpu: stats(&runs.iter().map(|r| r.cpu).collect::<Vec<_>>())?,
        peak_rss_mib: stats_of(&rss)?,
    })
}

#[derive(Serialize)]
struct Report {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    mem_mib: u64,
    cpus: u64,
    runs: u32,
    expect: Expect,
    /// Per phase, over the boots that marked it.
    kvmbuild_phases: Vec<PhaseStats>,
    /// `run()` called to `run()` returned, in this process.
    kvmbuild_in_process_total: Stats,
    /// QEMU spawned to QEMU exited (whole process; QEMU does not see the markers).
    qemu_process_total: Option<Stats>,
    /// Every VMM timed as a process: `kvmbuild run` and the ones compared.
    processes: Vec<ProcessStats>,
    /// kvmbuild's process wall time over each other VMM's.
    ratios: Vec<Ratio>,
}

/// The report files, opened before any boot: a bad path fails at once, and neither may be
/// an input.
struct Outputs {
    json: Option<File>,
    svg: Option<File>,
}

impl Outputs {
    /// The SVG, drawn when --svg asked for one.
    fn draw(&self, bars: &[plot::Bar], series: &[plot::Series]) -> anyhow::Result<Option<String>> {
        self.svg
            .as_ref()
            .map(|_| plot::svg(bars, series))
            .transpose()
            .map_err(|e| anyhow::anyhow!("--svg: cannot draw it: {e}"))
    }
}

fn open_outputs(args: &BenchArgs) -> anyhow::Result<Outputs> {
    let mut inputs: Vec<&Path> = args.kernel.iter().map(PathBuf::as_path).collect();
    inputs.extend(args.initrd.as_deref());
    let open = |path: &Option<PathBuf>, what| {
        path.as_deref()
            .map(|p| create_output(p, &inputs, what))
            .transpose()
    };
    Ok(Outputs {
        json: open(&args.json, "--json")?,
        svg: open(&args.svg, "--svg")?,
    })
}

/// Why `bench` failed, and so its exit status.
enum BenchError {
    /// The arguments or input files (64).
    BadInput(anyhow::Error),
    /// A boot failed (the VM's own class decides) or anything else (70).
    Run(anyhow::Error),
}

fn bench(args: &BenchArgs) -> Result<(), BenchError> {
    let outputs = open_outputs(args).map_err(BenchError::BadInput)?;
    if args.exec {
        if args.command.is_empty() {
            return Err(BenchError::BadInput(anyhow::anyhow!(
                "--exec needs a command after --"
            )));
        }
        return measure_exec(args, outputs).map_err(BenchError::Run);
    }
    if !args.command.is_empty() {
        return Err(BenchError::BadInput(anyhow::anyhow!(
            "a command after -- needs --exec"
        )));
    }
    let processes = args.processes().map_err(BenchError::BadInput)?;
    for vmm in processes.iter().filter(|v| v.kind != Kind::Kvmbuild) {
        others::check_version(vmm).map_err(BenchError::BadInput)?;
    }
    measure_and_report(args, &processes, outputs).map_err(BenchError::Run)
}

/// Each round: one boot in this process, then one in each process VMM, so that all see the
/// same machine load over time.
fn measure_and_report(args: &BenchArgs, vmms: &[Vmm], outputs: Outputs) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let guest = Guest {
        kernel: args.kernel(),
        initrd: args.initrd.as_deref(),
        cmdline: &args.cmdline,
        mem_mib: args.mem,
        cpus: args.cpus,
        timeout: args.limit(),
        expect: args.expect,
        qemu_args: &args.qemu_arg,
        scratch: scratch.path(),
    };
    let mut samples = Vec::new();
    let mut runs: Vec<Vec<ProcessRun>> = vmms.iter().map(|_| Vec::new()).collect();
    for round in 0..args.warmup + args.runs {
        let measured = round >= args.warmup;
        let sample = boot_once(args)?;
        if measured {
            samples.push(sample);
        }
        for (vmm, runs) in vmms.iter().zip(&mut runs) {
            let run = others::boot(vmm, &guest)?;
            if measured {
                runs.push(run);
            }
        }
    }
    let (kvmbuild_phases, total) = stats::summarise(&samples);
    let processes: Vec<_> = vmms
        .iter()
        .zip(&runs)
        .filter_map(|(vmm, runs)| process_stats(vmm, runs))
        .collect();
    let walls = |runs: &[ProcessRun]| runs.iter().map(|r| r.wall).collect::<Vec<_>>();
    let ratios = vmms
        .iter()
        .zip(&runs)
        .skip(1)
        .filter_map(|(vmm, theirs)| {
            let pair = format!("kvmbuild/{}", vmm.kind.name());
            stats::ratio(pair, &walls(&runs[0]), &walls(theirs))
        })
        .collect();
    let qemu_process_total = processes
        .iter()
        .find(|p| p.vmm == Kind::Qemu.name())
        .map(|p| p.wall.clone());
    let mut series = vec![plot::Series {
        label: "kvmbuild in process".into(),
        totals_ms: samples
            .iter()
            .map(|s| s.total.as_secs_f64() * 1e3)
            .collect(),
    }];
    series.extend(vmms.iter().zip(&runs).map(|(vmm, runs)| plot::Series {
        label: format!("{} process", vmm.kind.name()),
        totals_ms: runs.iter().map(|r| r.wall.as_secs_f64() * 1e3).collect(),
    }));
    let mut bars = plot::phase_bars(
        "kvmbuild",
        kvmbuild_phases.iter().map(|p| (p.phase, &p.stats)),
        ("total (in process)", &total),
    );
    bars.extend(processes.iter().map(|p| plot::Bar {
        label: format!("{} total (process)", p.vmm),
        stats: &p.wall,
    }));
    let plot = outputs.draw(&bars, &series)?;
    let report = Report {
        kernel: args.kernel().to_path_buf(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        mem_mib: args.mem,
        cpus: args.cpus,
        runs: args.runs,
        expect: args.expect,
        kvmbuild_phases,
        kvmbuild_in_process_total: total,
        qemu_process_total,
        processes,
        ratios,
    };
    write_outputs(args, outputs, &serde_json::to_string_pretty(&report)?, plot)
}

fn write_outputs(
    args: &BenchArgs,
    outputs: Outputs,
    json: &str,
    plot: Option<String>,
) -> anyhow::Result<()> {
    if let (Some(mut file), Some(path), Some(plot)) = (outputs.svg, &args.svg, plot) {
        file.write_all(plot.as_bytes())
            .with_context(|| format!("--svg {}: cannot write it", path.display()))?;
    }
    match (outputs.json, &args.json) {
        (Some(mut file), Some(path)) => file
            .write_all(format!("{json}\n").as_bytes())
            .with_context(|| format!("--json {}: cannot write it", path.display()))?,
        _ => println!("{json}"),
    }
    Ok(())
}

pub fn run_bench(args: BenchArgs) -> ExitCode {
    match bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(BenchError::BadInput(e)) => fail(exit_code::BAD_INPUT, format!("bench: {e:#}")),
        Err(BenchError::Run(e)) => fail(run_error_code(&e), format!("bench: {e:#}")),
    }
}

/// A failed boot's status: a VM error keeps its class (a bad kernel is the user's input, 64;
/// no KVM is 69), anything else is 70.
fn run_error_code(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<VmError>()
        .map_or(exit_code::INTERNAL, vm_error::status)
}
