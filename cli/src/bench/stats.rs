//! One boot's phases from its timestamps, and min/median/max over many boots.

use std::time::{Duration, Instant};

use serde::Serialize;
use vmm::exit::{BootPhase, ExitReason};
use vmm::vm::RunReport;

/// The phases of one kvmbuild boot, in order.
pub const PHASES: [&str; 6] = ["setup", "kernel", "init", "command", "exit", "teardown"];

/// How a measured boot must end to count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// Power-off, or status 0 on the exit port.
    Exit,
    /// A reset (i8042 with `reboot=k`, the ACPI reset register, a triple fault).
    Reset,
    /// Either.
    Any,
}

impl Expect {
    /// Whether a boot that ended for `reason` counts as finished.
    pub fn accepts(self, reason: &ExitReason) -> bool {
        let exited = matches!(reason, ExitReason::PowerOff | ExitReason::GuestStatus(0));
        let reset = matches!(reason, ExitReason::Reset(_));
        match self {
            Expect::Exit => exited,
            Expect::Reset => reset,
            Expect::Any => exited || reset,
        }
    }
}

/// One boot's phase durations (None where the guest did not mark the phase) and its total.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub phases: [Option<Duration>; 6],
    pub total: Duration,
}

/// Splits one boot into [`PHASES`] from its timestamps.
pub fn sample(report: &RunReport, returned: Instant) -> Sample {
    let marked = |phase| report.marked(phase);
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

/// Min, median and max of some values (milliseconds, unless the field says otherwise).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stats {
    pub min_ms: f64,
    pub median_ms: f64,
    pub max_ms: f64,
    pub samples: usize,
}

pub fn stats(values: &[Duration]) -> Option<Stats> {
    let ms: Vec<f64> = values.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    stats_of(&ms)
}

/// [`Stats`] of plain numbers.
pub fn stats_of(values: &[f64]) -> Option<Stats> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    Some(Stats {
        min_ms: *v.first()?,
        median_ms: median(&v)?,
        max_ms: *v.last()?,
        samples: v.len(),
    })
}

/// The median of sorted values.
fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

#[derive(Debug, Serialize)]
pub struct PhaseStats {
    pub phase: &'static str,
    #[serde(flatten)]
    pub stats: Stats,
}

pub fn summarise(samples: &[Sample]) -> (Vec<PhaseStats>, Stats) {
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

/// How two VMMs compare over alternating runs: `a`'s time over `b`'s.
#[derive(Debug, PartialEq, Serialize)]
pub struct Ratio {
    pub pair: String,
    /// The median of run i's ratio, over the rounds (each pair ran back to back).
    pub median_of_pair_ratios: f64,
    /// Median over median.
    pub ratio_of_medians: f64,
}

/// Compares two series of wall times run in alternation (round i of each).
pub fn ratio(pair: String, a: &[Duration], b: &[Duration]) -> Option<Ratio> {
    let per_pair: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64().max(1e-9))
        .collect();
    let ratio_of_medians = stats(a)?.median_ms / stats(b)?.median_ms.max(1e-9);
    Some(Ratio {
        pair,
        median_of_pair_ratios: stats_of(&per_pair)?.median_ms,
        ratio_of_medians,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::exit::ResetSource;

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

    /// A run that started at `t0`, its guest `guest_started` later and ended `ended` after t0.
    fn report(
        reason: ExitReason,
        t0: Instant,
        (guest_started, ended): (Duration, Duration),
        markers: Vec<(BootPhase, Instant)>,
    ) -> RunReport {
        RunReport {
            reason,
            started: t0,
            guest_started: t0 + guest_started,
            ended: t0 + ended,
            markers,
            console_error: None,
            stuck_vcpus: Vec::new(),
            snapshot: None,
            restored: None,
            served_on_demand: None,
            memory_checked: None,
            timed_out_at: Vec::new(),
            memory_backing: vmm::memory::BackingReport {
                backing: vmm::memory::Backing::SmallPages,
                fell_back: Vec::new(),
            },
            remains: None,
        }
    }

    #[test]
    fn phases_follow_the_markers_and_add_up() {
        let t0 = Instant::now();
        let markers = vec![
            (BootPhase::InitStarted, t0 + ms(20)),
            (BootPhase::CommandStarted, t0 + ms(25)),
            (BootPhase::CommandFinished, t0 + ms(35)),
        ];
        let report = report(ExitReason::GuestStatus(0), t0, (ms(2), ms(40)), markers);
        let s = sample(&report, t0 + ms(41));
        let expected = [2, 18, 5, 10, 5, 1].map(|n| Some(ms(n)));
        assert_eq!(s.phases, expected);
        let sum: Duration = s.phases.iter().flatten().sum();
        assert_eq!((s.total, sum), (ms(41), ms(41)));
    }

    #[test]
    fn unmarked_phases_are_absent_not_zero() {
        let t0 = Instant::now();
        let report = report(ExitReason::PowerOff, t0, (ms(1), ms(9)), vec![]);
        let s = sample(&report, t0 + ms(10));
        assert_eq!(s.phases, [Some(ms(1)), None, None, None, None, Some(ms(1))]);
        let (phases, _) = summarise(&[s]);
        let names: Vec<_> = phases.iter().map(|p| p.phase).collect();
        assert_eq!(names, ["setup", "teardown"]);
    }

    #[test]
    fn expect_decides_which_endings_count() {
        let reset = ExitReason::Reset(ResetSource::I8042);
        let cases = [
            (ExitReason::PowerOff, [true, false, true]),
            (ExitReason::GuestStatus(0), [true, false, true]),
            (ExitReason::GuestStatus(3), [false, false, false]),
            (reset, [false, true, true]),
            (ExitReason::Timeout, [false, false, false]),
        ];
        for (reason, want) in cases {
            let got = [Expect::Exit, Expect::Reset, Expect::Any].map(|e| e.accepts(&reason));
            assert_eq!(got, want, "{reason:?}");
        }
    }

    #[test]
    fn ratios_pair_run_by_run_and_median_by_median() {
        let a = [ms(10), ms(20), ms(30)];
        let b = [ms(20), ms(20), ms(120)];
        let r = ratio("a/b".into(), &a, &b).unwrap();
        // Pair ratios 0.5, 1.0, 0.25: median 0.5. Medians 20 / 20: 1.0.
        assert_eq!(r.median_of_pair_ratios, 0.5);
        assert_eq!(r.ratio_of_medians, 1.0);
        assert_eq!(ratio("x".into(), &[], &[]), None);
    }
}
