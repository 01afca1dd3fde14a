//! `kvmbuild bench --exec -- CMD`: times `kvmbuild exec` as users run it, as a process:
//! process start → command started → command done → process exit.
//!
//! The middle two come from the guest's boot markers, which `kvmbuild exec -v` prints as
//! CLOCK_MONOTONIC timestamps (the clock behind `Instant` on Linux, shared by all processes),
//! so they line up with this process's own clock. A run restored from a snapshot
//! (`exec --warm`) also says how much memory it restored and how long that took.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use super::others::{Kind, Vmm};
use super::process::{run_process, ProcessRun};
use super::stats::{self, stats, stats_of, Ratio, Stats};
use super::{plot, process_stats, write_outputs, BenchArgs, Outputs, ProcessStats};

/// The start of the `-v` line that carries the timestamps.
const MARKS_PREFIX: &str = "boot marks (CLOCK_MONOTONIC ns): command started ";

/// What `kvmbuild exec -v` says about a restore: vmm's `Restored`, as displayed.
const RESTORED_PREFIX: &str = "kvmbuild: restored ";

/// The phases of one `kvmbuild exec`.
pub const EXEC_PHASES: [&str; 3] = ["start", "command", "exit"];

/// CLOCK_MONOTONIC now, in nanoseconds.
fn monotonic_now_ns() -> u128 {
    // SAFETY: timespec is plain old data; all zeroes is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes one timespec, owned by this frame.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// `at` on CLOCK_MONOTONIC, in nanoseconds (through its distance from now).
fn monotonic_ns(at: Instant) -> u128 {
    let (now, clock) = (Instant::now(), monotonic_now_ns());
    match at.checked_duration_since(now) {
        Some(ahead) => clock + ahead.as_nanos(),
        None => clock.saturating_sub(now.duration_since(at).as_nanos()),
    }
}

/// The `-v` line `kvmbuild exec` prints about its command's start and end.
pub fn marks_line(command_started: Instant, command_finished: Instant) -> String {
    format!(
        "{MARKS_PREFIX}{}, command finished {}",
        monotonic_ns(command_started),
        monotonic_ns(command_finished)
    )
}

/// The two timestamps of [`marks_line`], found in some stderr.
fn parse_marks(stderr: &str) -> Option<(u128, u128)> {
    let line = stderr.lines().find_map(|l| l.split_once(MARKS_PREFIX))?.1;
    let (started, finished) = line.split_once(", command finished ")?;
    Some((started.trim().parse().ok()?, finished.trim().parse().ok()?))
}

/// The restore a `-v` stderr reports, if the run started from a snapshot: (MiB, time).
fn parse_restored(stderr: &str) -> Option<(u64, Duration)> {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix(RESTORED_PREFIX))?;
    let (mib, rest) = line.split_once(" MiB of guest memory in ")?;
    let (ms, _how) = rest.split_once(" ms")?;
    Some((mib.parse().ok()?, Duration::from_millis(ms.parse().ok()?)))
}

/// One `kvmbuild exec` split into [`EXEC_PHASES`].
#[derive(Debug, PartialEq)]
pub struct ExecSample {
    pub phases: [Duration; 3],
    pub wall: Duration,
    /// MiB restored and the time it took, for a run that started from a snapshot.
    pub restored: Option<(u64, Duration)>,
}

fn split(
    spawned_ns: u128,
    run: &ProcessRun,
    marks: (u128, u128),
    restored: Option<(u64, Duration)>,
) -> Option<ExecSample> {
    let exited_ns = spawned_ns + run.wall.as_nanos();
    let ns = |a: u128, b: u128| Some(Duration::from_nanos(u64::try_from(b.checked_sub(a)?).ok()?));
    Some(ExecSample {
        phases: [
            ns(spawned_ns, marks.0)?,
            ns(marks.0, marks.1)?,
            ns(marks.1, exited_ns)?,
        ],
        wall: run.wall,
        restored,
    })
}

/// Runs `kvmbuild exec -v [OPTIONS] -- COMMAND` once.
pub fn exec_once(
    kvmbuild: &Path,
    options: &[OsString],
    command: &[OsString],
    limit: Duration,
) -> anyhow::Result<(ExecSample, ProcessRun)> {
    let mut cmd = Command::new(kvmbuild);
    cmd.args(["exec", "-v"])
        .args(options)
        .arg("--")
        .args(command);
    let run = run_process(&mut cmd, limit).context("kvmbuild exec")?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    if run.code != Some(0) {
        let last = stderr.lines().last().unwrap_or("no message");
        bail!("kvmbuild exec exited {:?}: {last}", run.code);
    }
    let marks = parse_marks(&stderr).context("kvmbuild exec -v printed no boot marks")?;
    let sample = split(
        monotonic_ns(run.started),
        &run,
        marks,
        parse_restored(&stderr),
    )
    .context("kvmbuild exec's boot marks are outside its run")?;
    Ok((sample, run))
}

#[derive(Serialize)]
pub struct ExecPhaseStats {
    pub phase: &'static str,
    #[serde(flatten)]
    pub stats: Stats,
}

/// Per phase over all runs, and the process totals.
pub fn summarise_exec(samples: &[ExecSample]) -> (Vec<ExecPhaseStats>, Option<Stats>) {
    let phases = EXEC_PHASES
        .iter()
        .enumerate()
        .filter_map(|(i, &phase)| {
            let values: Vec<_> = samples.iter().map(|s| s.phases[i]).collect();
            Some(ExecPhaseStats {
                phase,
                stats: stats(&values)?,
            })
        })
        .collect();
    let walls: Vec<f64> = samples.iter().map(|s| s.wall.as_secs_f64() * 1e3).collect();
    (phases, stats_of(&walls))
}

#[derive(Serialize)]
struct ExecReport {
    command: Vec<String>,
    kernel: Option<PathBuf>,
    mem_mib: u64,
    cpus: u64,
    runs: u32,
    /// process start → command started → command done → process exit.
    exec_phases: Vec<ExecPhaseStats>,
    process: ProcessStats,
    /// With --warm: the runs restored from a snapshot, each right after a cold one.
    warm: Option<WarmReport>,
}

/// `exec --warm` beside cold `exec`.
#[derive(Serialize)]
struct WarmReport {
    exec_phases: Vec<ExecPhaseStats>,
    process: ProcessStats,
    /// Reading and checking the snapshot's memory (part of "start").
    restore: Stats,
    /// The memory restored, MiB.
    restored_mib: Stats,
    /// Cold over warm, process start → command started.
    cold_over_warm_to_command: Ratio,
}

/// One series of `kvmbuild exec` runs: cold, or warm.
#[derive(Default)]
struct ExecSeries {
    samples: Vec<ExecSample>,
    runs: Vec<ProcessRun>,
}

impl ExecSeries {
    fn push(&mut self, (sample, run): (ExecSample, ProcessRun)) {
        self.samples.push(sample);
        self.runs.push(run);
    }

    fn to_command(&self) -> Vec<Duration> {
        self.samples.iter().map(|s| s.phases[0]).collect()
    }
}

/// `kvmbuild exec`'s options for the runs `bench --exec` times.
fn exec_options(args: &BenchArgs) -> Vec<OsString> {
    let mut options: Vec<OsString> = vec![
        "--mem".into(),
        args.mem.to_string().into(),
        "--cpus".into(),
        args.cpus.to_string().into(),
        "--timeout".into(),
        args.timeout.to_string().into(),
    ];
    if let Some(kernel) = &args.kernel {
        options.extend(["--kernel".into(), kernel.clone().into_os_string()]);
    }
    options.extend(args.exec_arg.iter().cloned());
    options
}

/// One `exec --warm` run, which must have started from the snapshot.
fn warm_exec_once(
    me: &Path,
    options: &[OsString],
    args: &BenchArgs,
) -> anyhow::Result<(ExecSample, ProcessRun)> {
    let (sample, run) = exec_once(me, options, &args.command, args.limit())?;
    if sample.restored.is_none() {
        bail!("a --warm run booted cold instead of restoring its snapshot (see kvmbuild exec --warm -v)");
    }
    Ok((sample, run))
}

pub(super) fn measure_exec(args: &BenchArgs, outputs: Outputs) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("cannot find kvmbuild's own binary")?;
    let options = exec_options(args);
    let warm_options: Vec<OsString> = options.iter().cloned().chain(["--warm".into()]).collect();
    if args.warm {
        // Saves the snapshot (or finds it saved), then restores it once, which gives it its
        // hot list (the blocks to place ahead of the guest): the measured runs are the steady
        // state. Neither is measured.
        exec_once(&me, &warm_options, &args.command, args.limit())?;
        warm_exec_once(&me, &warm_options, args)?;
    }
    let mut cold = ExecSeries::default();
    let mut warm_series = ExecSeries::default();
    for round in 0..args.warmup + args.runs {
        let measured = round >= args.warmup;
        let run = exec_once(&me, &options, &args.command, args.limit())?;
        if measured {
            cold.push(run);
        }
        if args.warm {
            let run = warm_exec_once(&me, &warm_options, args)?;
            if measured {
                warm_series.push(run);
            }
        }
    }
    let vmm = Vmm {
        kind: Kind::Kvmbuild,
        binary: me,
    };
    let (exec_phases, _) = summarise_exec(&cold.samples);
    let process = process_stats(&vmm, &cold.runs).context("no runs")?;
    let warm = args
        .warm
        .then(|| warm_report(&vmm, &cold, &warm_series))
        .transpose()?;
    let mut bars = exec_bars("exec", &exec_phases, &process);
    let mut series = vec![exec_series("kvmbuild exec", &cold)];
    if let Some(warm) = &warm {
        bars.extend(exec_bars("exec --warm", &warm.exec_phases, &warm.process));
        series.push(exec_series("kvmbuild exec --warm", &warm_series));
    }
    let plot = outputs.draw(&bars, &series)?;
    let report = ExecReport {
        command: args
            .command
            .iter()
            .map(|a| a.to_string_lossy().into())
            .collect(),
        kernel: args.kernel.clone(),
        mem_mib: args.mem,
        cpus: args.cpus,
        runs: args.runs,
        exec_phases,
        process,
        warm,
    };
    write_outputs(args, outputs, &serde_json::to_string_pretty(&report)?, plot)
}

fn warm_report(vmm: &Vmm, cold: &ExecSeries, warm: &ExecSeries) -> anyhow::Result<WarmReport> {
    let (exec_phases, _) = summarise_exec(&warm.samples);
    let restores: Vec<(u64, Duration)> = warm.samples.iter().filter_map(|s| s.restored).collect();
    let mib: Vec<f64> = restores.iter().map(|&(mib, _)| mib as f64).collect();
    let took: Vec<Duration> = restores.iter().map(|&(_, took)| took).collect();
    Ok(WarmReport {
        exec_phases,
        process: process_stats(vmm, &warm.runs).context("no warm runs")?,
        restore: stats(&took).context("no warm runs")?,
        restored_mib: stats_of(&mib).context("no warm runs")?,
        cold_over_warm_to_command: stats::ratio(
            "cold/warm to command started".into(),
            &cold.to_command(),
            &warm.to_command(),
        )
        .context("no warm runs")?,
    })
}

/// A bar per phase of `exec_phases` and one for the whole process.
fn exec_bars<'a>(
    what: &str,
    exec_phases: &'a [ExecPhaseStats],
    process: &'a ProcessStats,
) -> Vec<plot::Bar<'a>> {
    plot::phase_bars(
        what,
        exec_phases.iter().map(|p| (p.phase, &p.stats)),
        ("total (process)", &process.wall),
    )
}

fn exec_series(label: &str, series: &ExecSeries) -> plot::Series {
    plot::Series {
        label: label.into(),
        totals_ms: series
            .runs
            .iter()
            .map(|r| r.wall.as_secs_f64() * 1e3)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marks_line_round_trips_on_the_shared_clock() {
        let started = Instant::now();
        let finished = started + Duration::from_millis(7);
        let stderr = format!(
            "kvmbuild: kernel x\nkvmbuild: {}\nkvmbuild: done\n",
            marks_line(started, finished)
        );
        let (a, b) = parse_marks(&stderr).unwrap();
        // Each timestamp is converted on its own, a few microseconds apart at most.
        assert!((b - a).abs_diff(7_000_000) < 100_000, "{} ns apart", b - a);
        let near = monotonic_ns(started).abs_diff(a);
        assert!(near < 1_000_000, "{near} ns apart");
        assert_eq!(parse_marks("kvmbuild: nothing\n"), None);
    }

    #[test]
    fn a_run_splits_into_start_command_exit() {
        let run = ProcessRun {
            started: Instant::now(),
            wall: Duration::from_millis(100),
            code: Some(0),
            cpu: Duration::ZERO,
            peak_rss_kib: 0,
            stdout: vec![],
            stderr: vec![],
        };
        let ms = |n: u128| n * 1_000_000;
        let s = split(ms(1000), &run, (ms(1060), ms(1090)), None).unwrap();
        assert_eq!(s.phases.map(|d| d.as_millis()), [60, 30, 10]);
        // Marks outside the run (clock trouble) are refused, not turned into negative time.
        assert_eq!(split(ms(1000), &run, (ms(1060), ms(1200)), None), None);
    }

    #[test]
    fn the_restore_line_is_read_as_vmm_writes_it() {
        let restored = vmm::vm::Restored {
            bytes: 66 << 20,
            took: Duration::from_millis(48),
            fill: vmm::vm::Fill::OnDemand {
                ahead: 0,
                beside: true,
            },
        };
        let stderr = format!("kvmbuild: kernel x\nkvmbuild: {restored}\nkvmbuild: done\n");
        assert_eq!(
            parse_restored(&stderr),
            Some((66, Duration::from_millis(48)))
        );
        assert_eq!(parse_restored("kvmbuild: VM set up in 3 ms\n"), None);
    }
}
