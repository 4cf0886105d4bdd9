//! The small helpers the notebooks lean on: seeded random tensors, image <-> tensor,
//! `LoraLinear::new`, and caption dropout in the trainer's config.

mod common;

use sd_lora::prelude::*;

#[test]
fn randn_seeded_is_reproducible_and_has_the_asked_spread() {
    let dev = Device::Cpu;
    let a = randn_seeded(7, &[200, 50], 0.5, &dev).unwrap();
    let b = randn_seeded(7, &[200, 50], 0.5, &dev).unwrap();
    let c = randn_seeded(8, &[200, 50], 0.5, &dev).unwrap();
    let diff = common::max_abs_diff;
    assert_eq!(diff(&a, &b), 0.0);
    assert!(diff(&a, &c) > 0.1);
    let std = a
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    assert!((std - 0.5).abs() < 0.02, "std {std}");
    assert!(randn_seeded(1, &[2], -1.0, &dev).is_err());
}

#[test]
fn image_tensor_round_trip_is_exact() {
    let img = scenes(1, 3)[0].render(Look::Base);
    let t = image_to_tensor(&img, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[3, 64, 64]);
    assert_eq!(tensor_to_image(&t).unwrap(), img);
    // out-of-range values clip instead of wrapping
    let white = tensor_to_image(
        &(Tensor::ones((3, 2, 2), DType::F32, &Device::Cpu).unwrap() * 3.0).unwrap(),
    )
    .unwrap();
    assert!(white.as_raw().iter().all(|&v| v == 255));
    let err = tensor_to_image(&Tensor::zeros((4, 2, 2), DType::F32, &Device::Cpu).unwrap());
    assert!(format!("{:#}", err.unwrap_err()).contains("3 channels"));
}

#[test]
fn lora_linear_new_wraps_a_weight_and_checks_shapes() {
    let dev = Device::Cpu;
    let w = randn_seeded(1, &[6, 4], 1.0, &dev).unwrap();
    let x = randn_seeded(2, &[3, 4], 1.0, &dev).unwrap();
    let mut l = LoraLinear::new("toy", w.clone(), None).unwrap();
    let base = x.matmul(&w.t().unwrap()).unwrap();
    let d = (l.forward(&x).unwrap() - &base)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    // a non-zero adapter: h = W0 x + (alpha/r) B A x
    let a = randn_seeded(3, &[2, 4], 1.0, &dev).unwrap();
    let b = randn_seeded(4, &[6, 2], 1.0, &dev).unwrap();
    l.set_adapter(a.clone(), b.clone(), 4.0).unwrap();
    let want = (&base
        + (x.matmul(&a.t().unwrap())
            .unwrap()
            .matmul(&b.t().unwrap())
            .unwrap()
            * 2.0)
            .unwrap())
    .unwrap();
    let d = (l.forward(&x).unwrap() - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
    assert!(LoraLinear::new("bad", Tensor::zeros(4, DType::F32, &dev).unwrap(), None).is_err());
    let e =
        LoraLinear::new("bad", w, Some(Tensor::zeros(5, DType::F32, &dev).unwrap())).unwrap_err();
    assert!(e.to_string().contains("bad: bias"), "{e}");
}

#[test]
fn caption_dropout_outside_0_1_is_refused() {
    let sd = StableDiffusion::load(tiny_model_dir().to_str().unwrap()).unwrap();
    let mut sd = sd;
    sd.unet
        .inject_lora(&LoraConfig::new(2, 2.0), &VarMap::new())
        .unwrap();
    for p in [-0.1, 1.0, f64::NAN] {
        let cfg = TrainConfig {
            caption_dropout: p,
            ..Default::default()
        };
        let Err(e) = Trainer::new(&sd, cfg) else {
            panic!("caption dropout {p} accepted")
        };
        assert!(e.to_string().contains("caption dropout"), "{e}");
    }
}

#[test]
fn the_peak_rss_can_be_reset_for_a_per_run_peak() {
    let big = vec![1u8; 200 << 20];
    std::hint::black_box(&big);
    let high = peak_rss_mib().expect("VmHWM on Linux");
    drop(big);
    assert!(reset_peak_rss(), "/proc/self/clear_refs");
    let after = peak_rss_mib().unwrap();
    assert!(
        after < high - 150.0,
        "peak {high} MiB, after reset {after} MiB"
    );
}

#[test]
fn devices_parse_and_cuda_without_support_is_a_clear_error() {
    use sd_lora::device::{default_dtype, parse_device, parse_dtype_for};
    assert!(parse_device("cpu").unwrap().is_cpu());
    for bad in ["gpu", "cuda:x", "cuda:", "CPU"] {
        let e = parse_device(bad).unwrap_err().to_string();
        assert!(e.contains("unknown device"), "{bad}: {e}");
    }
    let cpu = Device::Cpu;
    assert_eq!(default_dtype(&cpu), DType::F32);
    assert_eq!(parse_dtype_for("auto", &cpu).unwrap(), DType::F32);
    assert_eq!(parse_dtype_for("f16", &cpu).unwrap(), DType::F16);
    assert!(parse_dtype_for("bf16", &cpu)
        .unwrap_err()
        .to_string()
        .contains("bf16"));
    if !candle_core::utils::cuda_is_available() {
        assert!(parse_device("auto").unwrap().is_cpu());
        let e = parse_device("cuda:1").unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}

/// The allocator setting every CPU pipeline applies: accepted by glibc, done once.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn cpu_allocator_tuning_is_applied_once() {
    if std::env::var("SD_LORA_MALLOC_TUNING").is_ok_and(|v| v == "0") {
        return;
    }
    let first = sd_lora::device::tune_cpu_allocator();
    assert!(first, "glibc refused the mmap/trim thresholds");
    assert_eq!(sd_lora::device::tune_cpu_allocator(), first);
}

/// The thread count CPU pipelines pin: candle's own count, in `RAYON_NUM_THREADS` (so candle
/// stops re-reading /proc/cpuinfo before every matrix product), stable across calls.
#[test]
fn cpu_thread_count_is_pinned_to_candles_count() {
    let n = sd_lora::device::tune_cpu_threads();
    assert!(n >= 1);
    assert_eq!(sd_lora::device::tune_cpu_threads(), n);
    let env: usize = std::env::var("RAYON_NUM_THREADS")
        .expect("RAYON_NUM_THREADS is set")
        .parse()
        .expect("a number");
    assert_eq!(candle_core::utils::get_num_threads(), env);
}

/// The committed notebooks carry the outputs of their current code (so a code host shows every
/// figure): each code cell's `metadata.sd_lora.source_sha256` is the SHA-256 of its source, as
/// stamped by `scripts/notebooks.sh --update`, and each notebook shows an SVG and a PNG figure.
#[test]
fn committed_notebook_outputs_are_current() {
    use sha2::{Digest, Sha256};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("notebooks");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "ipynb"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 3, "notebooks: {paths:?}");
    let mut stale = Vec::new();
    for p in &paths {
        let nb: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let mut mimes = std::collections::BTreeSet::new();
        for (i, cell) in nb["cells"].as_array().unwrap().iter().enumerate() {
            if cell["cell_type"] != "code" {
                continue;
            }
            let source = match &cell["source"] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
                _ => String::new(),
            };
            let want = format!("{:x}", Sha256::digest(source.as_bytes()));
            if cell["metadata"]["sd_lora"]["source_sha256"].as_str() != Some(want.as_str()) {
                stale.push(format!("{name} cell {i}"));
            }
            for o in cell["outputs"].as_array().into_iter().flatten() {
                if let Some(d) = o["data"].as_object() {
                    mimes.extend(d.keys().cloned());
                }
            }
        }
        for m in ["image/svg+xml", "image/png"] {
            if !mimes.contains(m) {
                stale.push(format!("{name}: no {m} figure in its committed outputs"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "committed notebook outputs are older than their code (run ./scripts/notebooks.sh --update and commit the notebooks): {}",
        stale.join(", ")
    );
}
