//! Training variants beyond UNet LoRA on linear layers: LoCon (conv adapters) and text-encoder
//! LoRA. Gradients reach every adapter; the trained forward equals what the written files mean
//! to us, to LyCORIS and to diffusers (fixtures: examples/make_ours_lora.rs +
//! tests/golden/make_golden_ours.py); a text encoder + UNet run lowers the loss.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use common::{golden, load, pipeline_config, psnr, rel_err, tiny_pipeline};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use sd_lora::prelude::*;
use sd_lora::train::step::grads_of;

fn unet_a() -> UNet2DConditionModel {
    UNet2DConditionModel::load(golden("unet_a"), None, DType::F32, &Device::Cpu).unwrap()
}

fn run(u: &UNet2DConditionModel) -> Tensor {
    let t = load("unet_a/inputs_square_b2.safetensors");
    u.forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"])
        .unwrap()
}

/// Every `lora_B` to N(0, std^2).
fn randomize_b(vars: &[(String, Var)], seed: u64, std: f32) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (name, v) in vars {
        if name.ends_with("lora_B.weight") {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| StandardNormal.sample(&mut rng))
                .map(|x: f32| x * std)
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

fn locon_config() -> LoraConfig {
    LoraConfig::new(4, 6.0)
        .with_targets(&["to_q", "to_k", "to_v", "to_out.0", "proj_in"])
        .with_init(LoraInit::KaimingUniform)
        .with_seed(9)
        .with_conv(3, Some(2.0))
}

#[test]
fn locon_adapts_exactly_the_resnet_and_sampler_convolutions() {
    let mut u = unet_a();
    let s = u.inject_lora(&locon_config(), &VarMap::new()).unwrap();
    let convs: Vec<_> = s.layers.iter().filter(|l| l.conv).collect();
    let expected: Vec<String> = u
        .convs()
        .iter()
        .map(|c| c.name.clone())
        .filter(|n| n != "conv_in" && n != "conv_out")
        .collect();
    assert_eq!(convs.len(), expected.len());
    assert!(convs.iter().all(|l| l.rank == 3 && l.alpha == 2.0));
    assert!(expected.iter().any(|n| n.contains("downsamplers.0.conv")));
    assert!(expected.iter().any(|n| n.contains("conv_shortcut")));
    // B = 0: the injected model is the base model
    let e = rel_err(&run(&u), &run(&unet_a()));
    assert_eq!(e, 0.0);
    // conv adapter A [r, in, k, k], B [out, r, 1, 1]; parameters counted
    let c1 = s
        .layers
        .iter()
        .find(|l| l.name == "down_blocks.0.resnets.0.conv1")
        .unwrap();
    assert_eq!(c1.params, 3 * c1.in_dim + c1.out_dim * 3);
    assert_eq!(c1.in_dim % 9, 0, "in·3·3");
    // DoRA on convolutions is refused, not ignored
    let err = unet_a()
        .inject_lora(&locon_config().with_dora(true), &VarMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("DoRA on convolutions"), "{err}");
}

#[test]
fn every_locon_adapter_gets_a_finite_nonzero_gradient() {
    let mut u = unet_a();
    u.inject_lora(&locon_config(), &VarMap::new()).unwrap();
    randomize_b(&u.lora_vars().unwrap(), 3, 0.2);
    let vars = u.lora_vars().unwrap();
    assert!(vars
        .iter()
        .any(|(n, _)| n.contains("resnets.0.conv1.lora_A")));
    let y = run(&u);
    let loss = y.sqr().unwrap().mean_all().unwrap();
    let grads = grads_of(&loss, &vars).unwrap();
    for ((name, _), g) in vars.iter().zip(&grads) {
        let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(v.iter().any(|x| *x != 0.0), "{name}: zero gradient");
    }
}

#[test]
fn conv_adapter_gradient_matches_finite_differences() {
    // one 3x3 stride-2 convolution with an adapter, f32: d/dA and d/dB of sum(y ⊙ r)
    let mut u = unet_a();
    u.inject_lora(&locon_config(), &VarMap::new()).unwrap();
    randomize_b(&u.lora_vars().unwrap(), 4, 0.3);
    let conv = u
        .convs()
        .into_iter()
        .find(|c| c.name.contains("downsamplers.0.conv"))
        .unwrap()
        .clone();
    let ad = sd_lora::lora::Patchable::lora_adapters(&conv)[0].clone();
    let cin = conv.weight.dims()[1];
    let x = Tensor::randn(0f32, 1.0, (1, cin, 6, 6), &Device::Cpu).unwrap();
    let y0 = conv.forward(&x).unwrap();
    let r = Tensor::randn(0f32, 1.0, y0.dims(), &Device::Cpu).unwrap();
    let f = |c: &sd_lora::nn::Conv2d| -> f64 {
        (c.forward(&x).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let loss = (y0 * &r).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    for (var, label) in [(&ad.a, "A"), (&ad.b, "B")] {
        let grad: Vec<f32> = g
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in [0, base.len() / 3, base.len() - 1] {
            let h = 1e-2f32;
            let at = |d: f32| {
                let mut v = base.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                f(&conv)
            };
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            at(0.0);
            let an = grad[i] as f64;
            assert!(
                (fd - an).abs() <= 2e-2 * an.abs().max(1.0),
                "{label}[{i}]: finite difference {fd}, autograd {an}"
            );
        }
    }
}

#[test]
fn locon_files_round_trip_and_match_lycoris_and_diffusers() {
    // our trained-adapter forward = the written files read back, both layouts
    let mut u = unet_a();
    u.inject_lora(&locon_config(), &VarMap::new()).unwrap();
    randomize_b(&u.lora_vars().unwrap(), 5, 0.2);
    let y = run(&u);
    assert!(rel_err(&y, &run(&unet_a())) > 1e-2, "the adapters act");
    let tmp = tempfile::tempdir().unwrap();
    for fmt in [LoraFormat::Kohya, LoraFormat::Peft] {
        let p = tmp.path().join(format!("{fmt:?}.safetensors"));
        save_adapters(
            &u.adapted_layers().unwrap(),
            fmt,
            DType::F32,
            &p,
            &Default::default(),
        )
        .unwrap();
        let mut fresh = unet_a();
        fresh
            .apply_lora_file(&LoraFile::open(&p).unwrap(), &VarMap::new())
            .unwrap();
        let e = rel_err(&run(&fresh), &y);
        assert!(e < 1e-5, "{fmt:?} round trip: {e}");
    }
    // the fixtures' files in LyCORIS' loader (kohya) and diffusers (PEFT)
    let want = load("ours/locon_output.safetensors");
    for (fmt, reference) in [("kohya", "lycoris"), ("peft", "diffusers")] {
        let mut fresh = unet_a();
        let lf = LoraFile::open(golden(&format!("ours/locon_{fmt}.safetensors"))).unwrap();
        let s = fresh.apply_lora_file(&lf, &VarMap::new()).unwrap();
        assert!(s.patched_layers >= 20, "{fmt}: conv adapters applied");
        let e = rel_err(&run(&fresh), &want[reference]);
        println!("our LoCon {fmt} file: {reference} rel err {e:.2e}");
        assert!(e < 1e-4, "{fmt} vs {reference}: {e}");
    }
}

fn te_pipeline() -> (tempfile::TempDir, StableDiffusion) {
    let dir = tiny_pipeline();
    let sd =
        StableDiffusion::from_folder(dir.path(), Some("fp16"), DType::F32, &Device::Cpu).unwrap();
    (dir, sd)
}

#[test]
fn diffusers_pipeline_reproduces_our_text_encoder_and_unet_files() {
    // make_golden_ours.py: diffusers' load_lora_weights took every TE and UNet layer of both
    // files and generated these images
    let want = load("ours/te_unet_images.safetensors");
    let r = load("tiny_pipeline/reference.safetensors");
    let cfg = pipeline_config(&r["pipe.latents"]);
    for fmt in ["kohya", "peft"] {
        let (_dir, mut sd) = te_pipeline();
        let base = psnr(&sd.generate(&cfg).unwrap().pixels, &want[fmt]);
        let applied = sd
            .load_lora(
                golden(&format!("ours/te_unet_{fmt}.safetensors")),
                &LoraLoad::default(),
            )
            .unwrap();
        assert!(applied.not_loaded.is_empty() && applied.left_out.is_empty());
        let p = psnr(&sd.generate(&cfg).unwrap().pixels, &want[fmt]);
        sd.text_encoder.set_lora_scale(0.0).unwrap();
        let unet_only = psnr(&sd.generate(&cfg).unwrap().pixels, &want[fmt]);
        println!("{fmt}: PSNR {p:.1} dB (UNet part only {unet_only:.1}, base {base:.1})");
        assert!(p >= 40.0, "{fmt}: PSNR {p}");
        assert!(
            unet_only < 35.0 && base < 35.0,
            "{fmt}: the TE part matters"
        );
    }
}

#[test]
fn text_encoder_lora_round_trips_through_both_layouts() {
    let (_dir, mut sd) = te_pipeline();
    let cfg = LoraConfig::new(4, 8.0).with_seed(3);
    sd.unet.inject_lora(&cfg, &VarMap::new()).unwrap();
    let s = sd
        .text_encoder
        .inject_lora(&cfg.for_text_encoder(TEXT_INJECTABLE), &VarMap::new())
        .unwrap();
    assert_eq!(s.lora_layers, 6 * 2, "q,k,v,out_proj,fc1,fc2 of 2 layers");
    randomize_b(&sd.unet.lora_vars().unwrap(), 6, 0.2);
    randomize_b(&sd.text_encoder.lora_vars().unwrap(), 7, 0.2);
    let prompt = ["a red circle on a blue background"];
    let e0 = sd.encode_prompts(&prompt).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for fmt in [LoraFormat::Kohya, LoraFormat::Peft] {
        let p = tmp.path().join(format!("{fmt:?}.safetensors"));
        sd.save_lora(&p, fmt, DType::F32, &Default::default())
            .unwrap();
        let (_d, mut fresh) = te_pipeline();
        let applied = fresh.load_lora(&p, &LoraLoad::default()).unwrap();
        assert!(applied.not_loaded.is_empty(), "{applied}");
        let e = rel_err(&fresh.encode_prompts(&prompt).unwrap(), &e0);
        assert!(e < 1e-6, "{fmt:?}: text encoder output {e}");
    }
}

#[test]
fn text_encoder_and_unet_training_reaches_every_adapter_and_lowers_the_loss() {
    let (dir, mut sd) = te_pipeline();
    let cfg = LoraConfig::new(4, 4.0).with_targets(&["to_q", "to_k", "to_v", "to_out.0"]);
    sd.unet.inject_lora(&cfg, &VarMap::new()).unwrap();
    sd.text_encoder
        .inject_lora(&cfg.for_text_encoder(TEXT_INJECTABLE), &VarMap::new())
        .unwrap();
    let data = common::tiny_dataset(dir.path());
    let cache = LatentCache::build(&sd, &data, true).unwrap();
    let tc = TrainConfig {
        lr: 3e-3,
        text_encoder_lr: Some(1e-3),
        train_text_encoder: true,
        batch_size: 2,
        grad_accum: 2,
        max_steps: Some(40),
        schedule: LrSchedule::Constant,
        ..Default::default()
    };
    let mut t = Trainer::new(&sd, tc.clone()).unwrap();
    let te_vars: Vec<_> = t
        .optimizer
        .vars
        .iter()
        .zip(&t.optimizer.groups)
        .filter(|(_, g)| **g == 1)
        .map(|((n, _), _)| n.clone())
        .collect();
    assert_eq!(te_vars.len(), 12 * 2);
    assert!(te_vars.iter().all(|n| n.starts_with("text_encoder.")));
    // gradients: finite and non-zero for every adapter, text encoder included
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    randomize_b(&sd.text_encoder.lora_vars().unwrap(), 8, 0.01);
    randomize_b(&sd.unet.lora_vars().unwrap(), 9, 0.01);
    let loss = t.loss(&sd, &cache, &[0, 1], &mut rng).unwrap();
    let grads = grads_of(&loss, &t.optimizer.vars).unwrap();
    for ((name, _), g) in t.optimizer.vars.iter().zip(&grads) {
        let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()) && v.iter().any(|x| *x != 0.0),
            "{name}: no usable gradient"
        );
    }
    let eval = |t: &Trainer| -> f64 {
        (0..8)
            .map(|s| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + s);
                t.loss(&sd, &cache, &[0, 1, 2, 3], &mut rng)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64
            })
            .sum::<f64>()
            / 8.0
    };
    let te_before = sd.text_encoder.lora_vars().unwrap()[1]
        .1
        .as_tensor()
        .copy()
        .unwrap();
    let before = eval(&t);
    let mut lrs = Vec::new();
    t.train(&sd, &cache, &mut |r| lrs.push(r.lr)).unwrap();
    let after = eval(&t);
    println!("TE + UNet LoRA: eval loss {before:.4} -> {after:.4}");
    assert!(after < before * 0.9, "{before} -> {after}");
    assert!(
        lrs.iter().all(|l| *l == 3e-3),
        "the UNet's rate is recorded"
    );
    let te_after = sd.text_encoder.lora_vars().unwrap()[1]
        .1
        .as_tensor()
        .copy()
        .unwrap();
    assert!(
        rel_err(&te_after, &te_before) > 1e-3,
        "the text encoder trained"
    );
    assert_eq!(tc.group_lrs(0, 0, 40), [3e-3, 1e-3]);
    // no text-encoder adapters: refused, not silently UNet-only
    let (_d, plain) = te_pipeline();
    let err = Trainer::new(&plain, tc).unwrap_err().to_string();
    assert!(err.contains("text encoder has no LoRA adapters"), "{err}");
}
