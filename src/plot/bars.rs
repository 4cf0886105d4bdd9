//! Bar charts: one quantity per run, or the standard run comparison (trainable parameters,
//! seconds per step, peak memory) as three panels side by side.

use anyhow::{bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{err, series_colour, Figure, Plot, FONT};

/// What the comparison panels show for one run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunStats {
    pub label: String,
    pub trainable_params: usize,
    pub seconds_per_step: f64,
    /// Peak resident memory in MiB (`bench::peak_rss_mib`), if measured.
    pub peak_mib: Option<f64>,
}

#[derive(Debug, Clone)]
struct Panel {
    title: String,
    unit: String,
    values: Vec<(String, f64)>,
}

#[derive(Debug, Clone)]
pub(crate) struct BarsPlot {
    panels: Vec<Panel>,
}

/// One bar per `(label, value)`, each value printed above its bar.
pub fn bar_chart(title: &str, unit: &str, values: &[(String, f64)]) -> Result<Figure> {
    if values.is_empty() {
        bail!("no values for the bar chart `{title}`");
    }
    if let Some((l, v)) = values.iter().find(|(_, v)| !v.is_finite()) {
        bail!("bar `{l}` of `{title}` is not a finite number ({v})");
    }
    Ok(Figure::new(
        Plot::Bars(BarsPlot {
            panels: vec![Panel {
                title: title.into(),
                unit: unit.into(),
                values: values.to_vec(),
            }],
        }),
        520,
        380,
    ))
}

/// Trainable parameters, seconds per step and peak memory of several runs (a panel each;
/// the memory panel is left out when no run measured it).
pub fn run_comparison(runs: &[RunStats]) -> Result<Figure> {
    if runs.is_empty() {
        bail!("no runs to compare");
    }
    let mut panels = vec![
        Panel {
            title: "Trainable parameters".into(),
            unit: "parameters".into(),
            values: runs
                .iter()
                .map(|r| (r.label.clone(), r.trainable_params as f64))
                .collect(),
        },
        Panel {
            title: "Time per optimizer step".into(),
            unit: "seconds".into(),
            values: runs
                .iter()
                .map(|r| (r.label.clone(), r.seconds_per_step))
                .collect(),
        },
    ];
    if runs.iter().all(|r| r.peak_mib.is_some()) {
        panels.push(Panel {
            title: "Peak memory".into(),
            unit: "MiB".into(),
            values: runs
                .iter()
                .map(|r| (r.label.clone(), r.peak_mib.unwrap_or(0.0)))
                .collect(),
        });
    }
    let n = panels.len() as u32;
    Ok(Figure::new(Plot::Bars(BarsPlot { panels }), 360 * n, 380))
}

fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

impl BarsPlot {
    pub(crate) fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let areas = root.split_evenly((1, self.panels.len()));
        for (p, area) in self.panels.iter().zip(&areas) {
            let n = p.values.len();
            let top = p.values.iter().map(|(_, v)| *v).fold(0.0, f64::max);
            let top = if top > 0.0 { top * 1.15 } else { 1.0 };
            let mut chart = ChartBuilder::on(area)
                .caption(&p.title, (FONT, 18))
                .margin(10)
                .x_label_area_size(36)
                .y_label_area_size(62)
                .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..top)
                .map_err(err)?;
            let labels: Vec<String> = p.values.iter().map(|(l, _)| l.clone()).collect();
            chart
                .configure_mesh()
                .disable_x_mesh()
                .light_line_style(TRANSPARENT)
                .y_desc(&p.unit)
                .label_style((FONT, 13))
                .axis_desc_style((FONT, 14))
                .y_label_formatter(&|v| fmt_value(*v))
                .x_label_formatter(&|s| match s {
                    SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                    _ => String::new(),
                })
                .draw()
                .map_err(err)?;
            chart
                .draw_series(p.values.iter().enumerate().map(|(i, (_, v))| {
                    let mut bar = Rectangle::new(
                        [
                            (SegmentValue::Exact(i), 0.0),
                            (SegmentValue::Exact(i + 1), *v),
                        ],
                        series_colour(i).filled(),
                    );
                    bar.set_margin(0, 0, 8, 8);
                    bar
                }))
                .map_err(err)?;
            chart
                .draw_series(p.values.iter().enumerate().map(|(i, (_, v))| {
                    Text::new(
                        fmt_value(*v),
                        (SegmentValue::CenterOf(i), *v + top * 0.02),
                        (FONT, 13)
                            .into_font()
                            .color(&BLACK)
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )
                }))
                .map_err(err)?;
        }
        Ok(())
    }
}
