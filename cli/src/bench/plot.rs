//! The bench report as an SVG, drawn with plotters: a bar per phase and VMM total (median,
//! with a line from min to max), and below it every run's total, run by run, per VMM.

use plotters::coord::ranged1d::{IntoSegmentedCoord, SegmentValue};
use plotters::prelude::*;

use super::stats::Stats;

const WIDTH: u32 = 960;
const ROW_HEIGHT: u32 = 30;
const SCATTER_HEIGHT: u32 = 340;

/// A bar: a phase or a total.
pub struct Bar<'a> {
    pub label: String,
    pub stats: &'a Stats,
}

/// One VMM's totals, run by run (ms).
pub struct Series {
    pub label: String,
    pub totals_ms: Vec<f64>,
}

/// A bar per phase, then one for the total, each labelled after `what`.
pub fn phase_bars<'a>(
    what: &str,
    phases: impl Iterator<Item = (&'a str, &'a Stats)>,
    (total_label, total): (&'a str, &'a Stats),
) -> Vec<Bar<'a>> {
    phases
        .chain([(total_label, total)])
        .map(|(phase, stats)| Bar {
            label: format!("{what} {phase}"),
            stats,
        })
        .collect()
}

/// Draws the bars and the scatter into one SVG document.
pub fn svg(bars: &[Bar], series: &[Series]) -> Result<String, String> {
    let bars_height =
        60 + ROW_HEIGHT * u32::try_from(bars.len()).unwrap_or(u32::MAX / ROW_HEIGHT / 2);
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, bars_height + SCATTER_HEIGHT))
            .into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(bars_height);
        draw_bars(&top, bars).map_err(|e| e.to_string())?;
        draw_scatter(&bottom, series).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// A bar's row as plotters counts them (a handful of bars: a huge count just stops growing).
fn row(index: usize) -> i32 {
    i32::try_from(index).unwrap_or(i32::MAX)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw_bars(area: &Area, bars: &[Bar]) -> DrawResult {
    let x_max = bars.iter().map(|b| b.stats.max_ms).fold(0.0, f64::max) * 1.15 + 1e-3;
    let rows = row(bars.len());
    let mut chart = ChartBuilder::on(area)
        .caption(
            "median per phase (bar), min to max (line), ms",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(25)
        .y_label_area_size(250)
        .build_cartesian_2d(0.0..x_max, (0..rows).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => usize::try_from(*i)
                .ok()
                .and_then(|i| bars.get(i))
                .map(|b| b.label.clone())
                .unwrap_or_default(),
            SegmentValue::Last => String::new(),
        })
        .x_desc("ms")
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, bar)| {
        let i = row(i);
        let mut rect = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (bar.stats.median_ms, SegmentValue::Exact(i + 1)),
            ],
            BLUE.mix(0.6).filled(),
        );
        rect.set_margin(4, 4, 0, 0);
        rect
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, bar)| {
        let y = SegmentValue::CenterOf(row(i));
        PathElement::new(
            vec![(bar.stats.min_ms, y.clone()), (bar.stats.max_ms, y)],
            BLACK.stroke_width(1),
        )
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, bar)| {
        Text::new(
            format!("{:.2}", bar.stats.median_ms),
            (
                bar.stats.max_ms + x_max * 0.01,
                SegmentValue::CenterOf(row(i)),
            ),
            ("sans-serif", 12),
        )
    }))?;
    Ok(())
}

fn draw_scatter(area: &Area, series: &[Series]) -> DrawResult {
    let runs = series.iter().map(|s| s.totals_ms.len()).max().unwrap_or(1);
    let y_max = series
        .iter()
        .flat_map(|s| s.totals_ms.iter().copied())
        .fold(0.0, f64::max)
        * 1.1
        + 1e-3;
    let mut chart = ChartBuilder::on(area)
        .caption("total per run, in run order, ms", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..runs as f64 - 0.5, 0.0..y_max)?;
    chart.configure_mesh().x_desc("run").y_desc("ms").draw()?;
    for (index, s) in series.iter().enumerate() {
        let colour = Palette99::pick(index).to_rgba();
        chart
            .draw_series(
                s.totals_ms
                    .iter()
                    .enumerate()
                    .map(move |(run, ms)| Circle::new((run as f64, *ms), 3, colour.filled())),
            )?
            .label(s.label.clone())
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, colour.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::stats_of;

    #[test]
    fn every_bar_and_series_is_drawn_and_labelled() {
        let setup = stats_of(&[1.0, 2.0, 4.0]).unwrap();
        let total = stats_of(&[10.0, 12.0, 30.0]).unwrap();
        let bars = [
            Bar {
                label: "kvmbuild setup".into(),
                stats: &setup,
            },
            Bar {
                label: "kvmbuild total".into(),
                stats: &total,
            },
        ];
        let series = [
            Series {
                label: "kvmbuild".into(),
                totals_ms: vec![10.0, 12.0, 30.0],
            },
            Series {
                label: "qemu".into(),
                totals_ms: vec![40.0, 41.0, 39.0],
            },
        ];
        let out = svg(&bars, &series).unwrap();
        assert!(out.starts_with("<svg") && out.trim_end().ends_with("</svg>"));
        for label in ["kvmbuild setup", "kvmbuild total", "qemu", "2.00", "12.00"] {
            assert!(out.contains(label), "{label} missing");
        }
        // Six points and two legend marks.
        assert_eq!(out.matches("<circle").count(), 8);
    }
}
