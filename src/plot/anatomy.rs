//! LoRA anatomy: where an adapter changed the model and how much of its rank it uses.
//!
//! Per injected layer, the learned update `dW = (alpha/r)·B·A` (`[out, in]`, rank <= r) gives
//! - its Frobenius norm `||dW||_F`, shown as a heatmap over the UNet's blocks (rows) and the
//!   projections inside them (columns);
//! - its singular values, computed without forming `dW`: with `G = BᵀB` and `H = A·Aᵀ` (both
//!   r x r), the squared singular values of `B·A` are the eigenvalues of `G^½ H G^½`
//!   (symmetric, so two small Jacobi eigen-decompositions suffice).
//!
//! Effective rank is Roy & Vetterli's (2007): `exp(entropy(p))` with `p_i = σ_i / Σσ` — 1 when
//! one direction carries everything, r when all r are equal.

use anyhow::{bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{err, padded, series_colour, Figure, Plot, FONT};
use crate::lora::LoraModel;

/// One injected layer's update.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerAnatomy {
    /// Module path (diffusers key), e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub name: String,
    pub rank: usize,
    pub alpha: f64,
    /// `||(alpha/r)·B·A||_F`.
    pub norm: f64,
    /// Singular values of `(alpha/r)·B·A`, largest first (`rank` of them).
    pub singular_values: Vec<f64>,
}

impl LayerAnatomy {
    /// `exp(entropy(σ / Σσ))`; 0 for an all-zero update.
    pub fn effective_rank(&self) -> f64 {
        effective_rank(&self.singular_values)
    }
}

pub fn effective_rank(s: &[f64]) -> f64 {
    let total: f64 = s.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let h: f64 = s
        .iter()
        .map(|&x| x / total)
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    h.exp()
}

/// The anatomy of every LoRA layer of a model (its main adapter).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraAnatomy {
    pub layers: Vec<LayerAnatomy>,
}

/// Eigen-decomposition of a symmetric `n x n` matrix (row-major) by cyclic Jacobi rotations:
/// eigenvalues and eigenvectors (columns of the returned row-major matrix).
pub fn symmetric_eigen(n: usize, a: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        let scale: f64 = a.iter().map(|x| x * x).sum::<f64>().max(1e-300);
        if off <= 1e-30 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

fn matmul(n: usize, x: &[f64], y: &[f64]) -> Vec<f64> {
    let mut z = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..n {
            let xik = x[i * n + k];
            for j in 0..n {
                z[i * n + j] += xik * y[k * n + j];
            }
        }
    }
    z
}

/// Singular values (descending) of `B·A` for `b: [out, r]`, `a: [r, in]` (row-major f64).
pub fn low_rank_singular_values(b: &[f64], a: &[f64], r: usize) -> Vec<f64> {
    let (out, inp) = (b.len() / r.max(1), a.len() / r.max(1));
    let mut g = vec![0.0; r * r]; // BᵀB
    let mut h = vec![0.0; r * r]; // A Aᵀ
    for i in 0..r {
        for j in 0..r {
            g[i * r + j] = (0..out).map(|o| b[o * r + i] * b[o * r + j]).sum();
            h[i * r + j] = (0..inp).map(|k| a[i * inp + k] * a[j * inp + k]).sum();
        }
    }
    let (ev, vecs) = symmetric_eigen(r, &g);
    // G^½ = V diag(sqrt(max(λ, 0))) Vᵀ
    let mut root = vec![0.0; r * r];
    for i in 0..r {
        for j in 0..r {
            root[i * r + j] = (0..r)
                .map(|k| vecs[i * r + k] * ev[k].max(0.0).sqrt() * vecs[j * r + k])
                .sum();
        }
    }
    let m = matmul(r, &matmul(r, &root, &h), &root);
    let (mut s2, _) = symmetric_eigen(r, &m);
    s2.sort_by(|x, y| y.total_cmp(x));
    s2.into_iter().map(|x| x.max(0.0).sqrt()).collect()
}

fn to_f64(t: &candle_core::Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?)
}

impl LoraAnatomy {
    /// Measures every LoRA layer of `model` (its main adapter; runtime scale not included).
    pub fn of<M: LoraModel>(model: &M) -> Result<Self> {
        let mut layers = Vec::new();
        for l in model.linears()? {
            let Some(ad) = l.adapter() else { continue };
            let r = ad.rank();
            let f = ad.alpha / r as f64;
            let s =
                low_rank_singular_values(&to_f64(ad.b.as_tensor())?, &to_f64(ad.a.as_tensor())?, r);
            let s: Vec<f64> = s.iter().map(|x| x * f.abs()).collect();
            layers.push(LayerAnatomy {
                name: l.name().to_string(),
                rank: r,
                alpha: ad.alpha,
                norm: s.iter().map(|x| x * x).sum::<f64>().sqrt(),
                singular_values: s,
            });
        }
        if layers.is_empty() {
            bail!("the model has no LoRA layers (inject or load LoRA first)");
        }
        Ok(Self { layers })
    }

    /// Mean effective rank over layers with a non-zero update.
    pub fn mean_effective_rank(&self) -> f64 {
        let v: Vec<f64> = self
            .layers
            .iter()
            .map(|l| l.effective_rank())
            .filter(|&e| e > 0.0)
            .collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }

    /// Mean over layers of `σ_i / σ_1` (the normalised spectrum), index 0 = largest.
    pub fn mean_normalised_spectrum(&self) -> Vec<f64> {
        let r = self.layers.iter().map(|l| l.rank).max().unwrap_or(0);
        let live: Vec<&LayerAnatomy> = self
            .layers
            .iter()
            .filter(|l| l.singular_values.first().is_some_and(|&s| s > 0.0))
            .collect();
        (0..r)
            .map(|i| {
                live.iter()
                    .map(|l| {
                        l.singular_values.get(i).copied().unwrap_or(0.0) / l.singular_values[0]
                    })
                    .sum::<f64>()
                    / live.len().max(1) as f64
            })
            .collect()
    }

    /// `||dW||_F` per layer as a heatmap: a row per block, a column per projection.
    pub fn heatmap(&self) -> Result<Figure> {
        let mut rows: Vec<String> = Vec::new();
        let mut cols: Vec<String> = Vec::new();
        let mut cells = Vec::new();
        for l in &self.layers {
            let (row, col) = match l.name.split_once(".transformer_blocks.") {
                Some((block, rest)) => {
                    let (n, kind) = rest.split_once('.').unwrap_or(("0", rest));
                    let row = if n == "0" {
                        block.to_string()
                    } else {
                        format!("{block} [{n}]")
                    };
                    (row, kind.to_string())
                }
                None => match l.name.rsplit_once('.') {
                    Some((p, leaf)) => (p.to_string(), leaf.to_string()),
                    None => (String::new(), l.name.clone()),
                },
            };
            let ri = rows.iter().position(|r| *r == row).unwrap_or_else(|| {
                rows.push(row);
                rows.len() - 1
            });
            let ci = cols.iter().position(|c| *c == col).unwrap_or_else(|| {
                cols.push(col);
                cols.len() - 1
            });
            cells.push((ri, ci, l.norm));
        }
        let h = (90 + 26 * rows.len()).clamp(240, 1400) as u32;
        let w = (300 + 110 * cols.len()).clamp(500, 1600) as u32;
        Ok(Figure::new(
            Plot::Heatmap(HeatmapPlot { rows, cols, cells }),
            w,
            h,
        ))
    }

    /// The normalised singular-value spectrum (see [`spectra_chart`]).
    pub fn spectrum(&self, label: &str) -> Result<Figure> {
        spectra_chart(&[(label.to_string(), self.clone())])
    }
}

/// Normalised spectra `σ_i / σ_1` (mean over layers) of several runs, e.g. ranks 4 ... 32:
/// a run whose curve drops to ~0 after a few indices does not use its extra rank.
pub fn spectra_chart(runs: &[(String, LoraAnatomy)]) -> Result<Figure> {
    if runs.is_empty() {
        bail!("no runs for the spectrum chart");
    }
    let series = runs
        .iter()
        .map(|(label, a)| {
            (
                format!("{label} (effective rank {:.1})", a.mean_effective_rank()),
                a.mean_normalised_spectrum(),
            )
        })
        .collect();
    Ok(Figure::new(Plot::Spectra(SpectraPlot { series }), 760, 430))
}

#[derive(Debug, Clone)]
pub(crate) struct HeatmapPlot {
    rows: Vec<String>,
    cols: Vec<String>,
    cells: Vec<(usize, usize, f64)>,
}

/// Viridis, by linear interpolation between 6 anchors.
fn viridis(t: f64) -> RGBColor {
    const A: [(f64, f64, f64); 6] = [
        (68.0, 1.0, 84.0),
        (65.0, 68.0, 135.0),
        (42.0, 120.0, 142.0),
        (34.0, 168.0, 132.0),
        (122.0, 209.0, 81.0),
        (253.0, 231.0, 37.0),
    ];
    let x = t.clamp(0.0, 1.0) * 5.0;
    let i = (x.floor() as usize).min(4);
    let f = x - i as f64;
    let (a, b) = (A[i], A[i + 1]);
    let m = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
    RGBColor(m(a.0, b.0), m(a.1, b.1), m(a.2, b.2))
}

impl HeatmapPlot {
    pub(crate) fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let max = self.cells.iter().map(|c| c.2).fold(0.0, f64::max);
        let (nr, nc) = (self.rows.len(), self.cols.len());
        let label_w = self.rows.iter().map(|r| r.len()).max().unwrap_or(4) as u32 * 8 + 16;
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!("Frobenius norm of the LoRA update ΔW per layer (max {max:.3})"),
                (FONT, 20),
            )
            .margin(12)
            .x_label_area_size(34)
            .y_label_area_size(label_w)
            .build_cartesian_2d(
                (0..nc.max(1) - 1).into_segmented(),
                (0..nr.max(1) - 1).into_segmented(),
            )
            .map_err(err)?;
        let (rows, cols) = (self.rows.clone(), self.cols.clone());
        chart
            .configure_mesh()
            .disable_mesh()
            .label_style((FONT, 13))
            .x_labels(nc)
            .y_labels(nr)
            .x_label_formatter(&|s| match s {
                SegmentValue::CenterOf(i) => cols.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .y_label_formatter(&|s| match s {
                // first block at the top
                SegmentValue::CenterOf(i) => rows.get(nr - 1 - *i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(err)?;
        let norm = |v: f64| if max > 0.0 { v / max } else { 0.0 };
        chart
            .draw_series(self.cells.iter().map(|&(r, c, v)| {
                let y = nr - 1 - r;
                let mut rect = Rectangle::new(
                    [
                        (SegmentValue::Exact(c), SegmentValue::Exact(y)),
                        (SegmentValue::Exact(c + 1), SegmentValue::Exact(y + 1)),
                    ],
                    viridis(norm(v)).filled(),
                );
                rect.set_margin(1, 1, 1, 1);
                rect
            }))
            .map_err(err)?;
        chart
            .draw_series(self.cells.iter().map(|&(r, c, v)| {
                let y = nr - 1 - r;
                let colour = if norm(v) > 0.6 { BLACK } else { WHITE };
                Text::new(
                    format!("{v:.3}"),
                    (SegmentValue::CenterOf(c), SegmentValue::CenterOf(y)),
                    (FONT, 12)
                        .into_font()
                        .color(&colour)
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                )
            }))
            .map_err(err)?;
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SpectraPlot {
    series: Vec<(String, Vec<f64>)>,
}

impl SpectraPlot {
    pub(crate) fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let r = self
            .series
            .iter()
            .map(|s| s.1.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut chart = ChartBuilder::on(root)
            .caption(
                "Singular values of ΔW (σ_i / σ_1, mean over layers)",
                (FONT, 20),
            )
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(56)
            .build_cartesian_2d(padded(1.0, r as f64), 0.0..1.05)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("singular value index i")
            .y_desc("σ_i / σ_1")
            .light_line_style(TRANSPARENT)
            .x_labels(r.min(16))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .draw()
            .map_err(err)?;
        for (k, (label, s)) in self.series.iter().enumerate() {
            let c = series_colour(k);
            let pts: Vec<(f64, f64)> = s
                .iter()
                .enumerate()
                .map(|(i, v)| ((i + 1) as f64, *v))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(err)?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(err)?;
        }
        super::legend(&mut chart)
    }
}
