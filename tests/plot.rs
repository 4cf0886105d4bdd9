//! Renderers: SVG that parses and names its series, PNGs of the right size that are not blank,
//! evcxr display strings, a reference picture, and the anatomy's linear algebra.
//!
//! `SD_LORA_PLOT_PREVIEW=dir cargo test --release --test plot` also writes every picture to
//! `dir` for looking at; `SD_LORA_UPDATE_REFERENCE=1` rewrites tests/data/reference_loss.png.

use sd_lora::plot::*;
use sd_lora::train::StepRecord;

fn history(n: usize, per_epoch: usize, scale: f64) -> Vec<StepRecord> {
    (1..=n)
        .map(|s| {
            let epoch = (s - 1) / per_epoch;
            StepRecord {
                step: s,
                epoch,
                loss: scale * (0.3 + 0.5 * (-(s as f64) / 20.0).exp())
                    + 0.08 * ((s as f64) * 1.7).sin() * ((s as f64) * 0.31).cos(),
                lr: 1e-6
                    + (1e-4 - 1e-6)
                        * 0.5
                        * (1.0 + (std::f64::consts::PI * epoch as f64 / 15.0).cos()),
                grad_norm: 1.0,
                seconds: 0.5,
            }
        })
        .collect()
}

fn preview(name: &str, f: impl FnOnce(&std::path::Path)) {
    if let Ok(dir) = std::env::var("SD_LORA_PLOT_PREVIEW") {
        std::fs::create_dir_all(&dir).unwrap();
        f(&std::path::Path::new(&dir).join(name));
    }
}

/// Texts of the SVG's `<text>` elements; panics if the SVG is not well-formed XML.
fn svg_texts(svg: &Svg) -> Vec<String> {
    let doc = roxmltree::Document::parse(&svg.0).expect("SVG is not well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| n.text().unwrap_or("").trim().to_string())
        .collect()
}

fn count(svg: &Svg, tag: &str) -> usize {
    roxmltree::Document::parse(&svg.0)
        .unwrap()
        .descendants()
        .filter(|n| n.has_tag_name(tag))
        .count()
}

/// Distinct colours and fraction of non-white pixels.
fn ink(png: &Png) -> (usize, f64) {
    let img = png.to_image().unwrap();
    let mut colours = std::collections::HashSet::new();
    let mut non_white = 0usize;
    for p in img.pixels() {
        colours.insert(p.0);
        if p.0 != [255, 255, 255] {
            non_white += 1;
        }
    }
    (
        colours.len(),
        non_white as f64 / (img.width() * img.height()) as f64,
    )
}

#[test]
fn loss_curve_svg_png_and_display() {
    let h = history(60, 4, 1.0);
    let fig = loss_curve(&h).unwrap();
    let svg = fig.svg().unwrap();
    let texts = svg_texts(&svg);
    for want in [
        "Training loss",
        "optimizer step",
        "loss (MSE)",
        "learning rate",
        "loss, smoothed (EMA 0.9)",
        "loss, raw",
        "learning rate (right axis)",
        "epoch boundary",
    ] {
        assert!(
            texts.iter().any(|t| t == want),
            "missing `{want}` in {texts:?}"
        );
    }
    // raw + smoothed + lr lines, 14 epoch boundaries (15 epochs), plus legend samples
    assert!(
        count(&svg, "polyline") >= 3 + 14,
        "{}",
        count(&svg, "polyline")
    );
    let png = fig.png().unwrap();
    assert_eq!((png.width, png.height), (800, 450));
    let (colours, frac) = ink(&png);
    assert!(
        colours > 20 && frac > 0.02 && frac < 0.5,
        "{colours} {frac}"
    );
    // evcxr protocol
    let d = svg.display_string();
    assert!(d.starts_with("EVCXR_BEGIN_CONTENT image/svg+xml\n<svg"));
    assert!(d.ends_with("</svg>\nEVCXR_END_CONTENT\n"));
    let d = png.display_string();
    assert!(
        d.starts_with("EVCXR_BEGIN_CONTENT image/png\niVBORw0KGgo"),
        "base64 PNG"
    );
    assert!(d.ends_with("\nEVCXR_END_CONTENT\n"));
    // save by extension
    let dir = tempfile::tempdir().unwrap();
    fig.save(dir.path().join("loss.svg")).unwrap();
    fig.save(dir.path().join("loss.png")).unwrap();
    assert!(std::fs::read_to_string(dir.path().join("loss.svg"))
        .unwrap()
        .starts_with("<svg"));
    assert_eq!(
        image::open(dir.path().join("loss.png")).unwrap().width(),
        800
    );
    let e = fig
        .save(dir.path().join("loss.gif"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("loss.gif") && e.contains(".svg or .png"), "{e}");
    assert!(loss_curve(&[]).is_err());
    preview("loss.png", |p| fig.save(p).unwrap());
    preview("loss.svg", |p| fig.save(p).unwrap());
}

#[test]
fn ema_is_debiased() {
    let s = ema(&[2.0, 2.0, 2.0], 0.9);
    assert!(s.iter().all(|x| (x - 2.0).abs() < 1e-12), "{s:?}");
    let s = ema(&[0.0, 10.0], 0.5);
    // m1 = 0, m2 = 5; debiased: 0 / 0.5, 5 / 0.75
    assert!((s[1] - 5.0 / 0.75).abs() < 1e-12);
}

#[test]
fn a_chart_matches_its_reference_picture() {
    let fig = loss_curve(&history(40, 5, 1.0))
        .unwrap()
        .with_size(400, 240);
    let img = fig.png().unwrap().to_image().unwrap();
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/reference_loss.png");
    if std::env::var("SD_LORA_UPDATE_REFERENCE").is_ok() {
        img.save(&path).unwrap();
    }
    let reference = image::open(&path).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), reference.dimensions());
    // tolerance: anti-aliasing may differ by a few levels across platforms; at most 0.5% of
    // the pixels may differ by more than 48 levels in any channel
    let bad = img
        .pixels()
        .zip(reference.pixels())
        .filter(|(a, b)| a.0.iter().zip(b.0.iter()).any(|(x, y)| x.abs_diff(*y) > 48))
        .count();
    let frac = bad as f64 / (img.width() * img.height()) as f64;
    assert!(
        frac < 0.005,
        "{:.3}% of pixels differ from the reference",
        frac * 100.0
    );
}

#[test]
fn overlaid_runs_bars_and_comparison() {
    let runs: Vec<LossRun> = [4, 8, 16, 32]
        .iter()
        .enumerate()
        .map(|(i, r)| LossRun::new(format!("rank {r}"), &history(50, 5, 1.0 - 0.1 * i as f64)))
        .collect();
    let fig = loss_curves(&runs).unwrap();
    let texts = svg_texts(&fig.svg().unwrap());
    for r in ["rank 4", "rank 8", "rank 16", "rank 32"] {
        assert!(texts.iter().any(|t| t == r), "legend lacks {r}");
    }
    preview("runs.png", |p| fig.save(p).unwrap());
    let stats: Vec<RunStats> = [
        (4, 0.8, 900.0),
        (8, 0.85, 910.0),
        (16, 0.9, 930.0),
        (32, 1.0, 980.0),
    ]
    .iter()
    .map(|&(r, s, m)| RunStats {
        label: format!("r{r}"),
        trainable_params: 149_376 * r,
        seconds_per_step: s,
        peak_mib: Some(m),
    })
    .collect();
    let fig = run_comparison(&stats).unwrap();
    assert_eq!(fig.width, 3 * 360);
    let texts = svg_texts(&fig.svg().unwrap());
    for want in [
        "Trainable parameters",
        "Time per optimizer step",
        "Peak memory",
        "r32",
        "4.78M",
        "0.850",
    ] {
        assert!(
            texts.iter().any(|t| t == want),
            "missing `{want}` in {texts:?}"
        );
    }
    preview("comparison.png", |p| fig.save(p).unwrap());
    let e = bar_chart("x", "s", &[("a".into(), f64::NAN)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("`a`"), "{e}");
}

fn tile(c: [u8; 3]) -> image::RgbImage {
    image::RgbImage::from_fn(32, 32, |x, y| {
        if (x / 8 + y / 8) % 2 == 0 {
            image::Rgb(c)
        } else {
            image::Rgb([c[2], c[0], c[1]])
        }
    })
}

#[test]
fn labelled_grids_and_strength_strips() {
    let rows = vec![
        vec![
            tile([200, 30, 30]),
            tile([30, 200, 30]),
            tile([30, 30, 200]),
        ],
        vec![tile([90, 90, 90]), tile([250, 200, 0]), tile([0, 120, 120])],
    ];
    let png = labelled_grid(
        &rows,
        &["before (strength 0)".into(), "after (strength 1)".into()],
        &[
            "a red circle".into(),
            "a green square on a very long caption that gets cut".into(),
            "seed 2".into(),
        ],
        Some("Before / after"),
    )
    .unwrap();
    // 32 px images are scaled x4 to 128 px cells
    let img = png.to_image().unwrap();
    assert_eq!((img.width(), img.height()), (png.width, png.height));
    assert!(img.width() > 3 * 128 && img.height() > 2 * 128);
    // the label band is not blank: text was drawn left of the first image
    let band = (0..img.height()).flat_map(|y| (0..40).map(move |x| (x, y)));
    assert!(
        band.filter(|&(x, y)| img.get_pixel(x, y).0 != [255, 255, 255])
            .count()
            > 50
    );
    preview("grid.png", |p| png.save(p).unwrap());
    let strip = strength_strip(&rows[0], &[0.0, 0.5, 1.0], None).unwrap();
    assert!(strip.width >= 3 * 128);
    assert!(strength_strip(&rows[0], &[0.0], None).is_err());
    assert!(labelled_grid(&rows, &["one".into()], &[], None)
        .unwrap_err()
        .to_string()
        .contains("row labels"));
    let mixed = vec![vec![tile([0, 0, 0]), image::RgbImage::new(8, 8)]];
    assert!(labelled_grid(&mixed, &[], &[], None).is_err());
    preview("strip.png", |p| strip.save(p).unwrap());
}

#[test]
fn singular_values_of_a_known_low_rank_product() {
    // B = U·diag(s) with orthonormal U [6, 3]; A = Vᵀ with orthonormal V [5, 3]
    let u = orthonormal(6, 3, 1);
    let v = orthonormal(5, 3, 2);
    let s = [3.0, 0.5, 0.0];
    let b: Vec<f64> = (0..6)
        .flat_map(|o| (0..3).map(move |k| (o, k)))
        .map(|(o, k)| u[o * 3 + k] * s[k])
        .collect();
    let a: Vec<f64> = (0..3)
        .flat_map(|k| (0..5).map(move |i| (k, i)))
        .map(|(k, i)| v[i * 3 + k])
        .collect();
    let got = sd_lora::plot::anatomy::low_rank_singular_values(&b, &a, 3);
    for (g, w) in got.iter().zip(s) {
        assert!((g - w).abs() < 1e-9, "{got:?}");
    }
    assert!((sd_lora::plot::anatomy::effective_rank(&[1.0, 1.0, 1.0, 1.0]) - 4.0).abs() < 1e-12);
    assert!((sd_lora::plot::anatomy::effective_rank(&[2.0, 0.0]) - 1.0).abs() < 1e-12);
}

/// Gram-Schmidt on a deterministic pseudo-random matrix `[n, k]` (row-major).
fn orthonormal(n: usize, k: usize, seed: u64) -> Vec<f64> {
    let mut x: Vec<f64> = (0..n * k)
        .map(|i| (((i as u64 + 1) * 2654435761 * (seed + 7)) % 1000) as f64 / 500.0 - 1.0)
        .collect();
    for j in 0..k {
        for p in 0..j {
            let d: f64 = (0..n).map(|i| x[i * k + j] * x[i * k + p]).sum();
            for i in 0..n {
                x[i * k + j] -= d * x[i * k + p];
            }
        }
        let norm: f64 = (0..n).map(|i| x[i * k + j].powi(2)).sum::<f64>().sqrt();
        for i in 0..n {
            x[i * k + j] /= norm;
        }
    }
    x
}

#[test]
fn anatomy_of_a_trained_looking_unet() {
    use candle_core::{DType, Device, Tensor};
    use sd_lora::lora::{LoraConfig, LoraModel};
    use sd_lora::unet::{UNet2DConditionModel, UNetConfig};
    let dev = Device::Cpu;
    let mut u = UNet2DConditionModel::random(&UNetConfig::tiny(), 0, DType::F32, &dev).unwrap();
    let summary = u
        .inject_lora(&LoraConfig::new(4, 8.0), &candle_nn::VarMap::new())
        .unwrap();
    // B = 0 at injection: every update is zero
    let a0 = LoraAnatomy::of(&u).unwrap();
    assert!(a0.layers.iter().all(|l| l.norm == 0.0));
    assert_eq!(a0.mean_effective_rank(), 0.0);
    // give B values; check norms against dW formed explicitly
    for (i, (name, v)) in u.lora_vars().unwrap().into_iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            v.set(
                &(Tensor::randn(0f32, 0.01, v.shape(), &dev).unwrap() * (1.0 + i as f64 * 0.05))
                    .unwrap(),
            )
            .unwrap();
        }
    }
    let an = LoraAnatomy::of(&u).unwrap();
    assert_eq!(an.layers.len(), summary.lora_layers);
    let with_lora: Vec<_> = u
        .linears()
        .unwrap()
        .into_iter()
        .filter(|l| l.adapter().is_some())
        .collect();
    for (l, lin) in an.layers.iter().zip(with_lora) {
        assert_eq!(l.name, lin.name());
        let dw = lin.adapter().unwrap().delta_weight().unwrap();
        let fro = dw
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt() as f64;
        assert!(
            (l.norm - fro).abs() < 1e-4 * fro,
            "{}: {} vs {fro}",
            l.name,
            l.norm
        );
        assert_eq!(l.singular_values.len(), 4);
        assert!(l.effective_rank() > 1.0 && l.effective_rank() <= 4.0);
    }
    let fig = an.heatmap().unwrap();
    let texts = svg_texts(&fig.svg().unwrap());
    for want in [
        "down_blocks.0.attentions.0",
        "up_blocks.2.attentions.0",
        "attn1.to_q",
        "attn2.to_v",
    ] {
        assert!(
            texts.iter().any(|t| t == want),
            "heatmap lacks `{want}`: {texts:?}"
        );
    }
    preview("anatomy.png", |p| fig.save(p).unwrap());
    let sp = spectra_chart(&[("rank 4".into(), an.clone()), ("zero".into(), a0)]).unwrap();
    let texts = svg_texts(&sp.svg().unwrap());
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("rank 4 (effective rank")),
        "{texts:?}"
    );
    preview("spectra.png", |p| sp.save(p).unwrap());
}

#[test]
fn the_sd15_heatmap_has_a_row_per_attention_block() {
    use sd_lora::lora::{LoraConfig, LoraModel};
    use sd_lora::unet::{UNet2DConditionModel, UNetConfig};
    let mut u = UNet2DConditionModel::meta(&UNetConfig::sd_v1_5()).unwrap();
    u.inject_lora(&LoraConfig::new(16, 32.0), &candle_nn::VarMap::new())
        .unwrap();
    let layers: Vec<LayerAnatomy> = u
        .linears()
        .unwrap()
        .iter()
        .filter(|l| l.adapter().is_some())
        .enumerate()
        .map(|(i, l)| LayerAnatomy {
            name: l.name().to_string(),
            rank: 16,
            alpha: 32.0,
            norm: (i % 7) as f64 * 0.1,
            singular_values: vec![1.0; 16],
        })
        .collect();
    assert_eq!(layers.len(), 96);
    let fig = LoraAnatomy { layers }.heatmap().unwrap();
    let texts = svg_texts(&fig.svg().unwrap());
    let rows = texts
        .iter()
        .filter(|t| t.contains("blocks.") || t.starts_with("mid_block"))
        .count();
    assert_eq!(rows, 16, "{texts:?}");
    preview("anatomy_sd15.png", |p| fig.save(p).unwrap());
}
