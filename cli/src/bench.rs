//! `kvmbuild bench`: boots the same kernel and initrd many times and reports each phase of the
//! boot as min/median/max, as JSON and as an SVG plot, optionally beside QEMU.
//!
//! kvmbuild's phases come from host-clock timestamps: `run()` called, first vCPU started, the
//! guest's boot markers on port 0x6f0 (init started, command started, command finished), exit
//! noticed, `run()` returned. Each boot runs in this process, so process start and exit are not
//! in them. QEMU does not see the markers; it is timed as a whole process, spawn to exit, which
//! the report labels as such.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use vmm::exit::{BootPhase, ExitReason};
use vmm::vm::{self, RunReport, VmConfig, VmError};
use vmm_sys_util::eventfd::EventFd;

use crate::output::create_output;
use crate::{exit_code, fail, vm_error};

/// How long `QEMU --version` may take: it prints one line and exits.
const QEMU_PROBE_LIMIT: Duration = Duration::from_secs(10);
/// What `qemu-system-* --version` prints first.
const QEMU_VERSION_PREFIX: &str = "QEMU emulator version";

pub const BENCH_HELP: &str = "\
Examples:
  kvmbuild bench --kernel bzImage --initrd initrd.img \\
      --cmdline 'console=ttyS0 quiet kvmbuild.cmd=/bin/true' --runs 20 --json boot.json --svg boot.svg
  kvmbuild bench --kernel bzImage --initrd initrd.img --cmdline '...' --qemu qemu-system-x86_64

Each boot must end cleanly (status 0). Phases need kvmbuild's init (or any guest that writes the
markers 1, 2, 3 to port 0x6f0); without them only set-up, guest and teardown are reported.";

#[derive(Args)]
pub struct BenchArgs {
    /// Kernel to boot: a bzImage or an ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
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
    /// Write an SVG plot of the phases here.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Also time this QEMU binary booting the same kernel and initrd (microvm, KVM).
    #[arg(long, value_name = "BINARY")]
    qemu: Option<PathBuf>,
    /// Give up on a boot after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
}

/// The phases of one kvmbuild boot, in order.
const PHASES: [&str; 6] = ["setup", "kernel", "init", "command", "exit", "teardown"];

/// One boot's phase durations (None where the guest did not mark the phase) and its total.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    phases: [Option<Duration>; 6],
    total: Duration,
}

/// Splits one boot into [`PHASES`] from its timestamps.
fn sample(report: &RunReport, returned: Instant) -> Sample {
    let marked = |phase| {
        report
            .markers
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, t)| *t)
    };
    let init = marked(BootPhase::InitStarted);
    let command = marked(BootPhase::CommandStarted);
    let finished = marked(BootPhase::CommandFinished);
    let between = |a: Option<Instant>, b: Option<Instant>| b?.checked_duration_since(a?);
    let start = Some(report.guest_started);
    let end = Some(report.ended);
    Sample {
        phases: [
            Some(report.guest_started - report.started),
            between(start, init),
            between(init, command),
            between(command, finished),
            between(finished, end),
            Some(returned - report.ended),
        ],
        total: returned - report.started,
    }
}

/// Min, median and max of some durations, in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
struct Stats {
    min_ms: f64,
    median_ms: f64,
    max_ms: f64,
    samples: usize,
}

fn stats(values: &[Duration]) -> Option<Stats> {
    let mut ms: Vec<f64> = values.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    let median = match n {
        0 => return None,
        _ if n % 2 == 1 => ms[n / 2],
        _ => (ms[n / 2 - 1] + ms[n / 2]) / 2.0,
    };
    Some(Stats {
        min_ms: ms[0],
        median_ms: median,
        max_ms: ms[n - 1],
        samples: n,
    })
}

#[derive(Serialize)]
struct PhaseStats {
    phase: &'static str,
    #[serde(flatten)]
    stats: Stats,
}

#[derive(Serialize)]
struct Report {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    mem_mib: u64,
    cpus: u64,
    runs: u32,
    /// Per phase, over the boots that marked it.
    kvmbuild_phases: Vec<PhaseStats>,
    /// `run()` called to `run()` returned, in this process.
    kvmbuild_in_process_total: Stats,
    /// QEMU spawned to QEMU exited (whole process; QEMU does not see the markers).
    qemu_process_total: Option<Stats>,
}

fn summarise(samples: &[Sample]) -> (Vec<PhaseStats>, Stats) {
    let phases = PHASES
        .iter()
        .enumerate()
        .filter_map(|(i, &phase)| {
            let values: Vec<_> = samples.iter().filter_map(|s| s.phases[i]).collect();
            Some(PhaseStats {
                phase,
                stats: stats(&values)?,
            })
        })
        .collect();
    let totals: Vec<_> = samples.iter().map(|s| s.total).collect();
    (phases, stats(&totals).expect("at least one run"))
}

fn boot_once(args: &BenchArgs) -> anyhow::Result<Sample> {
    let config = VmConfig {
        kernel: args.kernel.clone(),
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
        setup_deadline: None,
        snapshot_to: None,
        restore: None,
    };
    // Nothing stops a bench run but its timeout.
    let stop = EventFd::new(libc::EFD_NONBLOCK)?;
    let mut report = vm::run(config, &stop, Some(Duration::from_secs(args.timeout)))?;
    let returned = Instant::now();
    // Released off the clock: the previous VM goes now, this one after the next boot.
    crate::keep_finished_vm(report.remains.take());
    match &report.reason {
        ExitReason::PowerOff | ExitReason::GuestStatus(0) => Ok(sample(&report, returned)),
        other => bail!("a boot did not end cleanly: {other:?}"),
    }
}

fn qemu_once(qemu: &Path, args: &BenchArgs) -> anyhow::Result<Duration> {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-M",
        "microvm,acpi=on",
        "-enable-kvm",
        "-cpu",
        "host",
        "-nodefaults",
        "-no-reboot",
    ])
    .args(["-display", "none", "-serial", "null", "-m"])
    .arg(args.mem.to_string())
    .arg("-smp")
    .arg(args.cpus.to_string())
    // The guest's status on kvmbuild's exit port ends QEMU too (status 0 -> exit code 1).
    .args(["-device", "isa-debug-exit,iobase=0x6f1,iosize=1", "-kernel"])
    .arg(&args.kernel)
    .args(["-append", &args.cmdline]);
    if let Some(initrd) = &args.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    let limit = Duration::from_secs(args.timeout);
    let (out, elapsed) =
        run_bounded(&mut cmd, limit).with_context(|| format!("--qemu {}", qemu.display()))?;
    // isa-debug-exit turns the guest's status 0 into exit code 1, which is also QEMU's own code
    // for "could not start": a boot counts only if QEMU printed no error of its own.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let qemu_error = stderr
        .lines()
        .find(|l| l.contains(": ") && !l.contains("warning"));
    match (out.status.code(), qemu_error) {
        (Some(0 | 1), None) => Ok(elapsed),
        (code, error) => bail!(
            "{} did not boot cleanly (exit {code:?}): {}",
            qemu.display(),
            error.unwrap_or("no message")
        ),
    }
}

/// Runs `cmd` to its end, or kills it after `limit`. Returns its output and how long it ran,
/// spawn to exit, timed by the thread that waits for it (no polling delay in the time).
fn run_bounded(cmd: &mut Command, limit: Duration) -> anyhow::Result<(Output, Duration)> {
    let started = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start it")?;
    let pid = child.id() as libc::pid_t;
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let result = child.wait_with_output();
        let _ = done.send((result, started.elapsed()));
    });
    let (result, elapsed) = match finished.recv_timeout(limit) {
        Ok(finished) => finished,
        Err(_) => {
            // The waiting thread has not reaped the child, so `pid` is still the child's (a
            // zombie at worst, which ignores the signal).
            // SAFETY: kill(2) with a pid and a signal number; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = finished.recv_timeout(QEMU_PROBE_LIMIT);
            bail!("still running after {limit:?}; killed it");
        }
    };
    Ok((result.context("cannot wait for it")?, elapsed))
}

/// Checks that `qemu` is QEMU, so that a wrong binary (one that exits 1 at once, as QEMU does
/// when the guest reports 0 through isa-debug-exit) is not timed as a successful boot.
fn check_qemu(qemu: &Path) -> anyhow::Result<()> {
    let (out, _) = run_bounded(Command::new(qemu).arg("--version"), QEMU_PROBE_LIMIT)
        .with_context(|| format!("--qemu {}", qemu.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.starts_with(QEMU_VERSION_PREFIX) {
        bail!(
            "--qemu {}: not QEMU (`--version` did not print \"{QEMU_VERSION_PREFIX} ...\"; it exited {})",
            qemu.display(),
            out.status
        );
    }
    Ok(())
}

/// A horizontal bar per phase (median), with a line from min to max.
fn svg(phases: &[PhaseStats], total: &Stats, qemu: Option<&Stats>) -> String {
    let mut rows: Vec<(String, &Stats)> = phases
        .iter()
        .map(|p| (format!("kvmbuild {}", p.phase), &p.stats))
        .collect();
    rows.push(("kvmbuild total (in process)".into(), total));
    if let Some(q) = qemu {
        rows.push(("QEMU total (process)".into(), q));
    }
    let scale_max = rows
        .iter()
        .map(|(_, s)| s.max_ms)
        .fold(0.0, f64::max)
        .max(0.001);
    let (label_w, plot_w, row_h) = (230.0, 520.0, 26.0);
    let x = |ms: f64| label_w + ms / scale_max * plot_w;
    let height = row_h * rows.len() as f64 + 40.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n",
        label_w + plot_w + 120.0
    );
    for (i, (label, s)) in rows.iter().enumerate() {
        let y = 10.0 + i as f64 * row_h;
        out += &format!("<text x=\"4\" y=\"{}\">{label}</text>\n", y + 14.0);
        out += &format!(
            "<rect x=\"{label_w}\" y=\"{}\" width=\"{:.1}\" height=\"16\" fill=\"#4a7ebb\"/>\n",
            y + 2.0,
            x(s.median_ms) - label_w
        );
        out += &format!(
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
            x(s.min_ms),
            x(s.max_ms),
            y + 10.0,
            y + 10.0
        );
        out += &format!(
            "<text x=\"{:.1}\" y=\"{}\">{:.2} ms</text>\n",
            x(s.max_ms) + 6.0,
            y + 14.0,
            s.median_ms
        );
    }
    let axis_y = 10.0 + rows.len() as f64 * row_h + 16.0;
    out += &format!(
        "<text x=\"{label_w}\" y=\"{axis_y}\">bars: median; lines: min to max; scale 0 to {scale_max:.2} ms</text>\n</svg>\n"
    );
    out
}

/// The report files, opened before any boot: a bad path fails at once, and neither may be
/// the kernel or the initrd.
struct Outputs {
    json: Option<File>,
    svg: Option<File>,
}

fn open_outputs(args: &BenchArgs) -> anyhow::Result<Outputs> {
    let mut inputs: Vec<&Path> = vec![&args.kernel];
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
    if let Some(qemu) = &args.qemu {
        check_qemu(qemu).map_err(BenchError::BadInput)?;
    }
    measure_and_report(args, outputs).map_err(BenchError::Run)
}

fn measure_and_report(args: &BenchArgs, outputs: Outputs) -> anyhow::Result<()> {
    for _ in 0..args.warmup {
        boot_once(args)?;
    }
    let samples = (0..args.runs)
        .map(|_| boot_once(args))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (kvmbuild_phases, total) = summarise(&samples);
    let qemu = match &args.qemu {
        None => None,
        Some(bin) => {
            for _ in 0..args.warmup {
                qemu_once(bin, args)?;
            }
            let times = (0..args.runs)
                .map(|_| qemu_once(bin, args))
                .collect::<anyhow::Result<Vec<_>>>()?;
            stats(&times)
        }
    };
    if let (Some(mut file), Some(path)) = (outputs.svg, &args.svg) {
        file.write_all(svg(&kvmbuild_phases, &total, qemu.as_ref()).as_bytes())
            .with_context(|| format!("--svg {}: cannot write it", path.display()))?;
    }
    let report = Report {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        mem_mib: args.mem,
        cpus: args.cpus,
        runs: args.runs,
        kvmbuild_phases,
        kvmbuild_in_process_total: total,
        qemu_process_total: qemu,
    };
    let json = serde_json::to_string_pretty(&report)? + "\n";
    match (outputs.json, &args.json) {
        (Some(mut file), Some(path)) => file
            .write_all(json.as_bytes())
            .with_context(|| format!("--json {}: cannot write it", path.display()))?,
        _ => print!("{json}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn stats_are_min_median_max() {
        let s = stats(&[ms(5), ms(1), ms(3)]).unwrap();
        assert_eq!(
            (s.min_ms, s.median_ms, s.max_ms, s.samples),
            (1.0, 3.0, 5.0, 3)
        );
        assert_eq!(
            stats(&[ms(1), ms(2), ms(4), ms(10)]).unwrap().median_ms,
            3.0
        );
        assert_eq!(stats(&[]), None);
    }

    #[test]
    fn phases_follow_the_markers_and_add_up() {
        let t0 = Instant::now();
        let report = RunReport {
            reason: ExitReason::GuestStatus(0),
            started: t0,
            guest_started: t0 + ms(2),
            ended: t0 + ms(40),
            markers: vec![
                (BootPhase::InitStarted, t0 + ms(20)),
                (BootPhase::CommandStarted, t0 + ms(25)),
                (BootPhase::CommandFinished, t0 + ms(35)),
            ],
            console_error: None,
            stuck_vcpus: Vec::new(),
            snapshot: None,
            remains: None,
        };
        let s = sample(&report, t0 + ms(41));
        let expected = [2, 18, 5, 10, 5, 1].map(|n| Some(ms(n)));
        assert_eq!(s.phases, expected);
        let sum: Duration = s.phases.iter().flatten().sum();
        assert_eq!((s.total, sum), (ms(41), ms(41)));
    }

    #[test]
    fn unmarked_phases_are_absent_not_zero() {
        let t0 = Instant::now();
        let report = RunReport {
            reason: ExitReason::PowerOff,
            started: t0,
            guest_started: t0 + ms(1),
            ended: t0 + ms(9),
            markers: vec![],
            console_error: None,
            stuck_vcpus: Vec::new(),
            snapshot: None,
            remains: None,
        };
        let s = sample(&report, t0 + ms(10));
        assert_eq!(s.phases, [Some(ms(1)), None, None, None, None, Some(ms(1))]);
        let (phases, _) = summarise(&[s]);
        let names: Vec<_> = phases.iter().map(|p| p.phase).collect();
        assert_eq!(names, ["setup", "teardown"]);
    }

    #[test]
    fn svg_has_a_bar_per_row() {
        let s = stats(&[ms(1), ms(2)]).unwrap();
        let phases = vec![PhaseStats {
            phase: "setup",
            stats: s.clone(),
        }];
        let out = svg(&phases, &s, Some(&s));
        assert!(out.starts_with("<svg") && out.trim_end().ends_with("</svg>"));
        assert_eq!(out.matches("<rect").count(), 3);
        assert!(out.contains("QEMU total (process)"));
    }
}
