//! Loss curves: the raw loss of every optimizer step (thin, faint), a smoothed line, the
//! learning rate on a secondary axis and epoch boundaries; or several runs overlaid.
//!
//! Smoothing is TensorBoard's: an exponential moving average with weight [`EMA_WEIGHT`] (0.9),
//! debiased so the first points are not pulled towards zero: `s_t = m_t / (1 - w^t)`,
//! `m_t = w·m_{t-1} + (1-w)·loss_t`.

use anyhow::{bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::{err, padded, series_colour, Figure, Plot, FONT};
use crate::train::StepRecord;

/// Weight of the smoothing EMA (TensorBoard's default slider value 0.9).
pub const EMA_WEIGHT: f64 = 0.9;

/// Debiased exponential moving average of `v` with weight `w`.
pub fn ema(v: &[f64], w: f64) -> Vec<f64> {
    let mut m = 0.0;
    let mut wt = 1.0;
    v.iter()
        .map(|&x| {
            m = w * m + (1.0 - w) * x;
            wt *= w;
            m / (1.0 - wt)
        })
        .collect()
}

/// One training run: its label and per-step records (e.g. `Trainer::history`).
#[derive(Debug, Clone)]
pub struct LossRun {
    pub label: String,
    pub history: Vec<StepRecord>,
}

impl LossRun {
    pub fn new(label: impl Into<String>, history: &[StepRecord]) -> Self {
        Self {
            label: label.into(),
            history: history.to_vec(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct LossPlot {
    runs: Vec<LossRun>,
    title: String,
    /// Single run: LR axis and epoch lines.
    detail: bool,
}

/// The loss curve of one run: raw loss, smoothed loss, LR (right axis), epoch boundaries.
pub fn loss_curve(history: &[StepRecord]) -> Result<Figure> {
    if history.is_empty() {
        bail!("no training steps to plot (the history is empty)");
    }
    Ok(Figure::new(
        Plot::Loss(LossPlot {
            runs: vec![LossRun::new("loss", history)],
            title: "Training loss".into(),
            detail: true,
        }),
        800,
        450,
    ))
}

/// Several runs overlaid (e.g. a rank sweep), a colour and legend entry each.
pub fn loss_curves(runs: &[LossRun]) -> Result<Figure> {
    if runs.is_empty() || runs.iter().any(|r| r.history.is_empty()) {
        bail!("every run needs at least one training step to plot");
    }
    Ok(Figure::new(
        Plot::Loss(LossPlot {
            runs: runs.to_vec(),
            title: "Training loss (smoothed; raw faint)".into(),
            detail: false,
        }),
        800,
        450,
    ))
}

impl LossPlot {
    pub(crate) fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let steps = |r: &LossRun| r.history.iter().map(|h| h.step as f64).collect::<Vec<_>>();
        let all: Vec<&StepRecord> = self.runs.iter().flat_map(|r| &r.history).collect();
        let fold = |f: fn(&StepRecord) -> f64| {
            all.iter()
                .map(|h| f(h))
                .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)))
        };
        let (x0, x1) = fold(|h| h.step as f64);
        let (y0, y1) = fold(|h| h.loss);
        let (l0, l1) = fold(|h| h.lr);
        let xr = (x0.min(1.0) - 0.5)..(x1 + 0.5);
        let mut b = ChartBuilder::on(root);
        b.caption(&self.title, (FONT, 22))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(64);
        if self.detail {
            b.right_y_label_area_size(72);
        }
        let mut chart = b
            .build_cartesian_2d(xr.clone(), padded(y0, y1))
            .map_err(err)?
            .set_secondary_coord(xr, padded(l0.min(0.0), l1));
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss (MSE)")
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .light_line_style(TRANSPARENT)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(err)?;
        if self.detail {
            chart
                .configure_secondary_axes()
                .y_desc("learning rate")
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 16))
                .y_label_formatter(&|v| format!("{v:.1e}"))
                .draw()
                .map_err(err)?;
            // epoch boundaries: between the last step of an epoch and the next one
            let h = &self.runs[0].history;
            let bounds: Vec<f64> = h
                .windows(2)
                .filter(|w| w[1].epoch != w[0].epoch)
                .map(|w| (w[0].step + w[1].step) as f64 / 2.0)
                .collect();
            let (ya, yb) = (padded(y0, y1).start, padded(y0, y1).end);
            chart
                .draw_series(bounds.iter().map(|&x| {
                    PathElement::new(
                        vec![(x, ya), (x, yb)],
                        RGBColor(215, 215, 215).stroke_width(1),
                    )
                }))
                .map_err(err)?
                .label("epoch boundary")
                .legend(|(x, y)| {
                    PathElement::new(
                        vec![(x, y), (x + 20, y)],
                        RGBColor(215, 215, 215).stroke_width(3),
                    )
                });
        }
        for (i, run) in self.runs.iter().enumerate() {
            let c = if self.detail {
                series_colour(0)
            } else {
                series_colour(i)
            };
            let xs = steps(run);
            let raw: Vec<f64> = run.history.iter().map(|h| h.loss).collect();
            let smooth = ema(&raw, EMA_WEIGHT);
            if !self.detail {
                chart
                    .draw_series(LineSeries::new(
                        xs.iter().copied().zip(raw.iter().copied()),
                        c.mix(0.25).stroke_width(1),
                    ))
                    .map_err(err)?;
            }
            let label = if self.detail {
                format!("loss, smoothed (EMA {EMA_WEIGHT})")
            } else {
                run.label.clone()
            };
            chart
                .draw_series(LineSeries::new(
                    xs.iter().copied().zip(smooth.iter().copied()),
                    c.stroke_width(2),
                ))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            if self.detail {
                chart
                    .draw_series(LineSeries::new(
                        xs.iter().copied().zip(raw.iter().copied()),
                        c.mix(0.35),
                    ))
                    .map_err(err)?
                    .label("loss, raw")
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.mix(0.35)));
                let lr_c = series_colour(1);
                chart
                    .draw_secondary_series(LineSeries::new(
                        run.history.iter().map(|h| (h.step as f64, h.lr)),
                        lr_c.stroke_width(2),
                    ))
                    .map_err(err)?
                    .label("learning rate (right axis)")
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], lr_c.stroke_width(2))
                    });
            }
        }
        super::legend(&mut chart)
    }
}
