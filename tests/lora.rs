//! LoRA injection, counting, gradients, initialisation and file round trips.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use common::{golden, load, max_abs_diff, rel_err};
use sd_lora::lora::io::save_lora;
use sd_lora::prelude::*;
use std::path::Path;

fn counts(cfg: &UNetConfig, rank: usize, targets: &[&str]) -> LoraSummary {
    let mut u = UNet2DConditionModel::meta(cfg).unwrap();
    let lc = LoraConfig::new(rank, 2.0 * rank as f64).with_targets(targets);
    u.inject_lora(&lc, &VarMap::new()).unwrap()
}

#[test]
fn sd15_counts_reproduce_the_tutorial() {
    let qkv = ["to_q", "to_k", "to_v"];
    for cfg in [
        UNetConfig::sd_v1_5(),
        UNetConfig::from_file(Path::new("tests/data/sd15_unet_config.json")).unwrap(),
    ] {
        assert_eq!(
            cfg,
            UNetConfig::sd_v1_5(),
            "config.json parses to the preset"
        );
        let s = counts(&cfg, 16, &qkv);
        assert_eq!(
            (s.lora_layers, s.trainable_params, s.total_params),
            (96, 2_390_016, 861_910_980)
        );
        assert_eq!(format!("{:.2}%", 100.0 * s.trainable_ratio()), "0.28%");
        assert_eq!(
            s.total_params - s.trainable_params,
            859_520_964,
            "the UNet's own parameters"
        );
        assert_eq!(counts(&cfg, 4, &qkv).trainable_params, 597_504);
        assert_eq!(counts(&cfg, 32, &qkv).trainable_params, 4_780_032);
        let s = counts(&cfg, 8, &["to_q", "to_k", "to_v", "to_out.0"]);
        assert_eq!((s.lora_layers, s.trainable_params), (128, 1_594_368));
    }
}

#[test]
fn sd21_counts_match_diffusers_and_peft() {
    // numbers printed by diffusers 0.42.1 + peft 0.21.2 for this config (meta device)
    let cfg = UNetConfig::from_file(Path::new("tests/data/sd21_unet_config.json")).unwrap();
    assert_eq!(
        cfg.heads().unwrap(),
        vec![5, 10, 20, 20],
        "attention_head_dim list = heads per block"
    );
    let s = counts(&cfg, 16, &["to_q", "to_k", "to_v"]);
    assert_eq!(
        (s.lora_layers, s.trainable_params, s.total_params),
        (96, 2_521_088, 868_431_812)
    );
}

#[test]
fn target_selection() {
    let cfg = UNetConfig::sd_v1_5();
    assert_eq!(
        counts(&cfg, 4, &["attn1.to_q", "attn1.to_k", "attn1.to_v"]).lora_layers,
        48
    );
    assert_eq!(counts(&cfg, 4, &["attn2.to_k"]).lora_layers, 16);
    assert_eq!(counts(&cfg, 4, &["proj_in", "proj_out"]).lora_layers, 32);
    assert_eq!(
        counts(&cfg, 4, &["ff.net.0.proj", "ff.net.2"]).lora_layers,
        32
    );
    let all = LoraConfig::parse_targets("all");
    let all: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
    assert_eq!(counts(&cfg, 4, &all).lora_layers, 16 * 12);
    let mut u = UNet2DConditionModel::meta(&cfg).unwrap();
    let err = u
        .inject_lora(
            &LoraConfig::default().with_targets(&["to_z"]),
            &VarMap::new(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("to_z"), "{err}");
    let err = u
        .inject_lora(
            &LoraConfig::default().with_targets(&["attn3.to_q"]),
            &VarMap::new(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("attn3.to_q"), "{err}");
}

fn tiny(linear_projection: bool) -> UNet2DConditionModel {
    let mut cfg = UNetConfig::tiny();
    cfg.use_linear_projection = linear_projection;
    UNet2DConditionModel::random(&cfg, 7, DType::F32, &Device::Cpu).unwrap()
}

fn tiny_inputs(u: &UNet2DConditionModel) -> (Tensor, Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let ctx = u.config.cross_dims().unwrap()[0];
    let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
    let t = Tensor::new(&[10f32, 700.0], &dev).unwrap();
    let c = Tensor::randn(0f32, 1.0, (2, 5, ctx), &dev).unwrap();
    let target = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
    (x, t, c, target)
}

#[test]
fn every_lora_tensor_gets_a_finite_nonzero_gradient_and_nothing_else_is_trainable() {
    for linear_projection in [false, true] {
        let mut u = tiny(linear_projection);
        let vm = VarMap::new();
        let s = u
            .inject_lora(
                &LoraConfig::new(4, 8.0).with_targets(&LoraConfig::parse_targets("all")),
                &vm,
            )
            .unwrap();
        assert_eq!(
            s.lora_layers,
            7 * 12,
            "7 transformers x 12 linears (8 kinds, q/k/v/out twice)"
        );
        // B = 0 at init makes dL/dA exactly zero; give B values as after a few steps.
        for (name, v) in u.lora_vars().unwrap() {
            if name.ends_with("lora_B.weight") {
                v.set(&Tensor::randn(0f32, 0.05, v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let (x, t, c, target) = tiny_inputs(&u);
        let loss = (u.forward(&x, &t, &c).unwrap() - target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let vars = u.lora_vars().unwrap();
        assert_eq!(vars.len(), 2 * s.lora_layers);
        assert_eq!(
            vm.all_vars().len(),
            vars.len(),
            "the VarMap holds exactly the LoRA tensors"
        );
        // every variable reachable from the loss is a LoRA tensor: no base weight is a Var
        let ids: Vec<_> = vars.iter().map(|(_, v)| v.as_tensor().id()).collect();
        for node in loss.sorted_nodes() {
            if node.is_variable() {
                assert!(
                    ids.contains(&node.id()),
                    "a non-LoRA variable is in the graph"
                );
            }
        }
        for l in u.linears().unwrap() {
            assert!(
                !l.weight().is_variable() && !l.weight().track_op(),
                "{} base weight is trainable",
                l.name()
            );
        }
        let grads = loss.backward().unwrap();
        for (name, v) in &vars {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{name}: non-finite gradient"
            );
            assert!(g.iter().any(|x| *x != 0.0), "{name}: zero gradient");
        }
    }
}

#[test]
fn fresh_adapter_leaves_the_model_unchanged_and_b_gets_gradient() {
    let mut u = tiny(false);
    let (x, t, c, target) = tiny_inputs(&u);
    let before = u.forward(&x, &t, &c).unwrap();
    u.inject_lora(&LoraConfig::default(), &VarMap::new())
        .unwrap();
    let after = u.forward(&x, &t, &c).unwrap();
    let d = max_abs_diff(&before, &after);
    assert_eq!(d, 0.0, "B = 0 must give exactly the base output");
    let loss = (after - target).unwrap().sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in u.lora_vars().unwrap() {
        let g = grads
            .get(v.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if name.ends_with("lora_B.weight") {
            assert!(g > 0.0, "{name}");
        } else {
            assert_eq!(g, 0.0, "{name}: with B = 0, dL/dA = 0");
        }
    }
}

#[test]
fn initialisations_have_the_documented_statistics() {
    let mut u = UNet2DConditionModel::meta(&UNetConfig::sd_v1_5()).unwrap();
    u.inject_lora(
        &LoraConfig::new(16, 32.0)
            .with_targets(&["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]),
        &VarMap::new(),
    )
    .unwrap();
    let a = &u.lora_vars().unwrap()[0].1;
    let v: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    assert!((std - 0.01).abs() < 0.001, "tutorial init std {std}");
    let mut u = UNet2DConditionModel::meta(&UNetConfig::sd_v1_5()).unwrap();
    let lc = LoraConfig::new(16, 32.0)
        .with_init(LoraInit::KaimingUniform)
        .with_targets(&["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]);
    u.inject_lora(&lc, &VarMap::new()).unwrap();
    let v: Vec<f32> = u.lora_vars().unwrap()[0]
        .1
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let bound = 1.0 / (320f32).sqrt();
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(
        max <= bound && max > 0.95 * bound,
        "kaiming-uniform bound {bound}, max {max}"
    );
    let b = &u.lora_vars().unwrap()[1].1;
    assert_eq!(
        b.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

#[test]
fn saved_lora_files_round_trip_in_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let load_a =
        || UNet2DConditionModel::load(golden("unet_a"), None, DType::F32, &Device::Cpu).unwrap();
    let mut u = load_a();
    // mixed ranks and alphas, conv (1x1) and linear layers
    u.inject_lora(
        &LoraConfig::new(4, 6.0).with_targets(&["to_q", "proj_in", "ff.net.2"]),
        &VarMap::new(),
    )
    .unwrap();
    u.inject_lora(
        &LoraConfig::new(2, 5.0).with_targets(&["attn2.to_k"]),
        &VarMap::new(),
    )
    .unwrap();
    for (_, v) in u.lora_vars().unwrap() {
        v.set(&Tensor::randn(0f32, 0.2, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let t = load("unet_a/inputs_square_b2.safetensors");
    let y = u
        .forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"])
        .unwrap();
    for (fmt, name) in [
        (LoraFormat::Peft, "peft.safetensors"),
        (LoraFormat::Kohya, "kohya.safetensors"),
    ] {
        let path = dir.path().join(name);
        save_lora(&u.linears().unwrap(), fmt, &path).unwrap();
        let mut v = load_a();
        let lf = LoraFile::open(&path).unwrap();
        assert_eq!(lf.format, fmt);
        v.apply_lora_file(&lf, &VarMap::new()).unwrap();
        let (s1, s2) = (u.lora_summary().unwrap(), v.lora_summary().unwrap());
        assert_eq!(s1.trainable_params, s2.trainable_params);
        for (a, b) in s1.layers.iter().zip(&s2.layers) {
            assert_eq!((&a.name, a.rank, a.alpha), (&b.name, b.rank, b.alpha));
        }
        let y2 = v
            .forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"])
            .unwrap();
        assert!(rel_err(&y2, &y) < 1e-6, "{fmt:?} round trip");
    }
    // the PEFT file carries diffusers' metadata with the per-module patterns
    let bytes = std::fs::read(dir.path().join("peft.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let m: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["lora_adapter_metadata"]).unwrap();
    assert_eq!(m["unet.r"], 4);
    assert_eq!(m["unet.lora_alpha"], 6.0);
    assert_eq!(
        m["unet.alpha_pattern"].as_object().unwrap().len(),
        7,
        "the 7 attn2.to_k layers: {m}"
    );
    assert_eq!(m["unet.rank_pattern"].as_object().unwrap().len(), 7, "{m}");
}

#[test]
fn lora_for_another_architecture_is_rejected_with_file_and_tensor() {
    let mut u =
        UNet2DConditionModel::load(golden("unet_a"), None, DType::F32, &Device::Cpu).unwrap();
    let path = golden("unet_b/lora_peft.safetensors");
    let lf = LoraFile::open(&path).unwrap();
    let err = u
        .apply_lora_file(&lf, &VarMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unet_b/lora_peft.safetensors") && err.contains("lora_A.weight"),
        "{err}"
    );
    assert_eq!(
        u.lora_summary().unwrap().lora_layers,
        0,
        "a failed load leaves the model unchanged"
    );
    // same module names, wrong shapes: unet_a's file onto a model with other widths
    let mut cfg = u.config.clone();
    cfg.cross_attention_dim = sd_lora::unet::PerBlock::One(32);
    let mut w = UNet2DConditionModel::random(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let path = golden("unet_a/lora_kohya.safetensors");
    let lf = LoraFile::open(&path).unwrap();
    let err = w
        .apply_lora_file(&lf, &VarMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lora_kohya.safetensors") && err.contains("attn2.to_k"),
        "{err}"
    );
    assert_eq!(w.lora_summary().unwrap().lora_layers, 0);
}

#[test]
fn half_precision_sources_load() {
    let dir = tempfile::tempdir().unwrap();
    let src = golden("unet_a/unet");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let w = candle_core::safetensors::load(
        src.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let bf: std::collections::HashMap<_, _> = w
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&bf, dir.path().join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let t = load("unet_a/inputs_square_b2.safetensors");
    let reference = load("unet_a/base_square_b2.safetensors")["sample"].clone();
    for dtype in [DType::F32, DType::F16] {
        let u = UNet2DConditionModel::load(dir.path(), None, dtype, &Device::Cpu).unwrap();
        assert_eq!(u.dtype(), dtype);
        let y = u
            .forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"])
            .unwrap();
        let e = rel_err(&y, &reference);
        assert!(e < 0.05, "bf16 weights ({dtype:?} compute): rel err {e}");
    }
    // asking for the fp16 variant where there is none names what is missing
    let err =
        UNet2DConditionModel::load(dir.path(), Some("fp16"), DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        format!("{err:#}").contains("diffusion_pytorch_model.fp16.safetensors"),
        "{err:#}"
    );
}

#[test]
fn lora_linear_computes_the_documented_formula() {
    let dev = Device::Cpu;
    let ws = WeightSource::random(3, DType::F32, &dev).pp("layer");
    let mut l = LoraLinear::load(&ws, 6, 5, true, false).unwrap();
    let a = Tensor::randn(0f32, 1.0, (2, 6), &dev).unwrap();
    let b = Tensor::randn(0f32, 1.0, (5, 2), &dev).unwrap();
    l.set_adapter(a.clone(), b.clone(), 3.0).unwrap();
    l.adapter_mut().unwrap().scale = 0.5;
    let x = Tensor::randn(0f32, 1.0, (3, 4, 6), &dev).unwrap();
    let y = l.forward(&x).unwrap();
    let x2 = x.reshape((12, 6)).unwrap();
    let base = x2
        .matmul(&l.weight().t().unwrap())
        .unwrap()
        .broadcast_add(l.bias().unwrap())
        .unwrap();
    let delta = (x2
        .matmul(&a.t().unwrap())
        .unwrap()
        .matmul(&b.t().unwrap())
        .unwrap()
        * (0.5 * 3.0 / 2.0))
        .unwrap();
    let expect = (base + delta).unwrap().reshape((3, 4, 5)).unwrap();
    assert!(rel_err(&y, &expect) < 1e-6);
    assert!(l.adapter().unwrap().a.as_tensor().is_variable());
    let _ = Var::from_tensor(&a); // A and B are Vars; the base is not
    assert!(!l.weight().is_variable());
}

#[test]
fn diffusers_reproduces_our_unet_output_from_our_files() {
    // tests/golden/make_golden_ours.py: diffusers loaded these files (written by
    // examples/make_ours_lora.rs) with no missing/unexpected layers and recorded its output
    let t = load("unet_a/inputs_square_b2.safetensors");
    let want = load("ours/diffusers_output.safetensors");
    for fmt in ["kohya", "peft"] {
        let mut u =
            UNet2DConditionModel::load(golden("unet_a"), None, DType::F32, &Device::Cpu).unwrap();
        let lf = LoraFile::open(golden(&format!("ours/lora_{fmt}.safetensors"))).unwrap();
        let s = u.apply_lora_file(&lf, &VarMap::new()).unwrap();
        assert_eq!(
            s.lora_layers,
            7 * 10,
            "{fmt}: q,k,v,out of 2 attentions + proj_in + ff.net.2, 7 transformers"
        );
        let y = u
            .forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"])
            .unwrap();
        let e = rel_err(&y, &want[fmt]);
        assert!(e < 1e-4, "{fmt}: {e}");
    }
}

#[test]
fn lycoris_and_diffusers_reproduce_our_dora_files() {
    // tests/golden/make_golden_ours.py: LyCORIS' loader read our kohya DoRA file and diffusers
    // our PEFT one (examples/make_ours_lora.rs), every magnitude accounted for
    let t = load("unet_a/inputs_square_b2.safetensors");
    let want = load("ours/dora_output.safetensors");
    for (fmt, reference) in [("kohya", "lycoris"), ("peft", "diffusers")] {
        let mut u =
            UNet2DConditionModel::load(golden("unet_a"), None, DType::F32, &Device::Cpu).unwrap();
        let lf = LoraFile::open(golden(&format!("ours/dora_{fmt}.safetensors"))).unwrap();
        let s = u.apply_lora_file(&lf, &VarMap::new()).unwrap();
        assert_eq!(
            s.lora_layers,
            7 * 9,
            "{fmt}: q,k,v,out of 2 attentions + ff.net.2"
        );
        assert!(s.layers.iter().all(|l| l.params > 0));
        let y = u
            .forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"])
            .unwrap();
        let e = rel_err(&y, &want[reference]);
        println!("our DoRA {fmt} file: {reference} rel err {e:.2e}");
        assert!(e < 1e-4, "{fmt} vs {reference}: {e}");
    }
}

/// `sum(y ⊙ r)` of a DoRA layer for fixed random `x`, `r`.
fn dora_loss(l: &LoraLinear, x: &Tensor, r: &Tensor) -> Tensor {
    (l.forward(x).unwrap() * r).unwrap().sum_all().unwrap()
}

#[test]
fn dora_gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.5, (5, 4), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.1, 5, &dev).unwrap();
    let mut l = LoraLinear::new("l", w, Some(b)).unwrap();
    l.set_adapter(
        Tensor::randn(0f32, 0.5, (2, 4), &dev).unwrap(),
        Tensor::randn(0f32, 0.5, (5, 2), &dev).unwrap(),
        3.0,
    )
    .unwrap();
    l.set_magnitude("default", None).unwrap();
    let ad = l.adapter().unwrap().clone();
    let m = ad.magnitude.clone().unwrap();
    m.set(&(m.as_tensor() * 1.3).unwrap()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap();
    let r = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap();
    let grads = dora_loss(&l, &x, &r).backward().unwrap();
    let eps = 1e-2f32;
    for (name, v) in [("A", &ad.a), ("B", &ad.b), ("m", &m)] {
        let g = grads.get(v.as_tensor()).unwrap();
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let p0: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..p0.len() {
            let at = |d: f32| {
                let mut p = p0.clone();
                p[i] += d;
                v.set(&Tensor::from_vec(p, v.shape(), &dev).unwrap())
                    .unwrap();
                let y = dora_loss(&l, &x, &r).to_scalar::<f32>().unwrap();
                v.set(&Tensor::from_vec(p0.clone(), v.shape(), &dev).unwrap())
                    .unwrap();
                y
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() <= 2e-2 * (1.0 + fd.abs()),
                "d/d{name}[{i}]: backward {} vs central difference {fd}",
                g[i]
            );
        }
    }
}

#[test]
fn dora_injection_starts_at_the_base_model_trains_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let load_a =
        || UNet2DConditionModel::load(golden("unet_a"), None, DType::F32, &Device::Cpu).unwrap();
    let t = load("unet_a/inputs_square_b2.safetensors");
    let run = |u: &UNet2DConditionModel| {
        u.forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"])
            .unwrap()
    };
    let mut u = load_a();
    let base = run(&u);
    let vm = VarMap::new();
    let s = u
        .inject_lora(
            &LoraConfig::new(4, 8.0)
                .with_targets(&["to_q", "to_v", "proj_in", "ff.net.2"])
                .with_dora(true),
            &vm,
        )
        .unwrap();
    assert!(
        rel_err(&run(&u), &base) < 1e-6,
        "B = 0 and m = ‖W‖: the base model"
    );
    let vars = u.lora_vars().unwrap();
    assert_eq!(
        vars.len(),
        3 * s.lora_layers,
        "A, B and the magnitude per layer"
    );
    assert_eq!(vm.all_vars().len(), vars.len());
    for (name, v) in &vars {
        if !name.ends_with("lora_A.weight") {
            v.set(
                &(v.as_tensor() + Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).unwrap())
                    .unwrap(),
            )
            .unwrap();
        }
    }
    let y = run(&u);
    let grads = (&y * 1.0)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, v) in &vars {
        let g: Vec<f32> = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            g.iter().all(|x| x.is_finite()) && g.iter().any(|x| *x != 0.0),
            "{name}"
        );
    }
    // strength 0 is the base, merge keeps the output
    u.set_lora_scale(0.0).unwrap();
    assert!(rel_err(&run(&u), &base) < 1e-6);
    u.set_lora_scale(1.0).unwrap();
    u.merge_lora().unwrap();
    assert!(rel_err(&run(&u), &y) < 1e-5, "merged");
    u.unmerge_lora().unwrap();
    // both layouts reload as DoRA adapters with the same output
    for (fmt, name, key) in [
        (LoraFormat::Kohya, "k.safetensors", ".dora_scale"),
        (LoraFormat::Peft, "p.safetensors", ".lora_magnitude_vector"),
    ] {
        let path = dir.path().join(name);
        save_lora(&u.linears().unwrap(), fmt, &path).unwrap();
        let file = LoraFile::open(&path).unwrap();
        assert!(file.entries.iter().all(|e| e.dora_scale.is_some()));
        assert!(file.entries[0].keys.iter().any(|k| k.ends_with(key)));
        let mut v = load_a();
        v.apply_lora_file(&file, &VarMap::new()).unwrap();
        assert_eq!(
            v.lora_vars().unwrap().len(),
            vars.len(),
            "{fmt:?}: trainable again"
        );
        let e = rel_err(&run(&v), &y);
        assert!(e < 1e-5, "{fmt:?}: {e}");
    }
}
