//! Gradient checkpointing: the same outputs and gradients as without (f32, 1e-6 relative) for
//! every kind of trainable adapter (LoRA, LoCon conv adapters, DoRA) on the fixture UNet, an
//! SD 1.5-structured UNet (four levels, two resnets and a transformer per level, 8 heads) and
//! the text encoder; training with it matches training without; a backward that would lose
//! the checkpointed blocks' gradients fails instead.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use common::{golden, tiny_pipeline};
use sd_lora::prelude::*;
use sd_lora::train::step::grads_of;
use sd_lora::unet::PerBlock;

fn randn(seed: u64, dims: &[usize], std: f64) -> Tensor {
    randn_seeded(seed, dims, std, &Device::Cpu).unwrap()
}

fn randomize_b(vars: &[(String, Var)], seed: u64) {
    for (i, (name, v)) in vars.iter().enumerate() {
        if name.contains("lora_B") || name.contains("lora_up") {
            v.set(&randn(seed * 1000 + i as u64, v.dims(), 0.05))
                .unwrap();
        }
    }
}

/// `||a - b|| / ||a||`: gradients reach tensors through different summation orders with and
/// without checkpointing (candle's backward sums a node's incoming gradients in graph order),
/// so single elements differ by a few f32 rounding steps (max-abs relative up to ~1e-6).
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let sq = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    (sq(&(a - b).unwrap()) / sq(a).max(f32::MIN_POSITIVE)).sqrt()
}

/// Output, and the gradients of `sum(out * w)` for every trainable tensor and the text states.
fn grads(
    u: &UNet2DConditionModel,
    x: &Tensor,
    t: &Tensor,
    ctx: &Var,
    w: &Tensor,
    ckpt: bool,
) -> (Tensor, Vec<Tensor>) {
    let mut vars = u.lora_vars().unwrap();
    vars.push(("ctx".into(), ctx.clone()));
    let out = u.forward_with(x, t, ctx.as_tensor(), ckpt).unwrap();
    let loss = (&out * w).unwrap().sum_all().unwrap();
    (out, grads_of(&loss, &vars).unwrap())
}

fn check(name: &str, u: &UNet2DConditionModel, latent: usize, cross: usize) {
    let dev = Device::Cpu;
    let x = randn(1, &[2, 4, latent, latent], 1.0);
    let t = Tensor::new(&[10u32, 700], &dev).unwrap();
    let ctx = Var::from_tensor(&randn(2, &[2, 7, cross], 1.0)).unwrap();
    let w = randn(3, &[2, 4, latent, latent], 1.0);
    let (y0, g0) = grads(u, &x, &t, &ctx, &w, false);
    let (y1, g1) = grads(u, &x, &t, &ctx, &w, true);
    assert_eq!(
        rel(&y0, &y1),
        0.0,
        "{name}: the forward is the same computation"
    );
    let n = u.lora_vars().unwrap().len();
    assert!(n > 0);
    let mut worst = 0f32;
    for (i, (a, b)) in g0.iter().zip(&g1).enumerate() {
        let e = rel(a, b);
        let norm = a
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name}: gradient {i} is zero");
        worst = worst.max(e);
    }
    assert!(
        worst <= 1e-6,
        "{name}: gradients differ by {worst:e} (relative L2)"
    );
    eprintln!(
        "{name}: {} gradients, worst relative difference {worst:e}",
        g0.len()
    );
}

#[test]
fn checkpointed_gradients_equal_plain_ones_for_every_adapter_kind() {
    // the fixture UNet with LoRA on attention, feed-forward and projections plus LoCon
    let mut u =
        UNet2DConditionModel::load(golden("unet_a"), None, DType::F32, &Device::Cpu).unwrap();
    let cfg = LoraConfig::new(4, 6.0)
        .with_targets(&["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"])
        .with_init(LoraInit::KaimingUniform)
        .with_seed(3)
        .with_conv(2, Some(3.0));
    u.inject_lora(&cfg, &VarMap::new()).unwrap();
    randomize_b(&u.lora_vars().unwrap(), 1);
    let cross = u.config.cross_dims().unwrap()[0];
    check("fixture UNet, LoRA + LoCon", &u, 8, cross);

    // SD 1.5's structure at narrow widths, DoRA adapters
    let sd = UNetConfig {
        block_out_channels: vec![32, 32, 64, 64],
        norm_num_groups: 8,
        cross_attention_dim: PerBlock::One(32),
        attention_head_dim: PerBlock::One(8),
        ..UNetConfig::sd_v1_5()
    };
    let mut u = UNet2DConditionModel::random(&sd, 5, DType::F32, &Device::Cpu).unwrap();
    let cfg = LoraConfig::new(4, 8.0)
        .with_targets(&["to_q", "to_k", "to_v", "to_out.0"])
        .with_init(LoraInit::KaimingUniform)
        .with_dora(true)
        .with_seed(4);
    u.inject_lora(&cfg, &VarMap::new()).unwrap();
    randomize_b(&u.lora_vars().unwrap(), 2);
    check("SD 1.5-structured UNet, DoRA", &u, 16, 32);
}

#[test]
fn the_text_encoder_checkpoints_with_the_same_gradients() {
    let dir = tiny_pipeline();
    let mut sd =
        StableDiffusion::from_folder(dir.path(), Some("fp16"), DType::F32, &Device::Cpu).unwrap();
    let cfg = LoraConfig::new(4, 4.0).for_text_encoder(TEXT_INJECTABLE);
    sd.text_encoder.inject_lora(&cfg, &VarMap::new()).unwrap();
    let vars = sd.text_encoder.lora_vars().unwrap();
    randomize_b(&vars, 3);
    let prompts = ["a red circle on a blue background", "a small green square"];
    let run = |ckpt: bool| {
        let e = sd.encode_prompts_with(&prompts, ckpt).unwrap();
        let w = Tensor::ones(e.dims(), DType::F32, &Device::Cpu).unwrap();
        let loss = (e.sqr().unwrap() * w).unwrap().sum_all().unwrap();
        (e, grads_of(&loss, &vars).unwrap())
    };
    let (e0, g0) = run(false);
    let (e1, g1) = run(true);
    assert_eq!(rel(&e0, &e1), 0.0);
    for (a, b) in g0.iter().zip(&g1) {
        assert!(rel(a, b) <= 1e-6, "{}", rel(a, b));
    }
}

#[test]
fn a_backward_that_would_drop_checkpointed_gradients_fails() {
    let mut u =
        UNet2DConditionModel::load(golden("unet_a"), None, DType::F32, &Device::Cpu).unwrap();
    u.inject_lora(&LoraConfig::new(2, 2.0), &VarMap::new())
        .unwrap();
    u.gradient_checkpointing = true;
    let cross = u.config.cross_dims().unwrap()[0];
    let x = randn(4, &[1, 4, 8, 8], 1.0);
    let ctx = randn(5, &[1, 7, cross], 1.0);
    let t = Tensor::new(&[5u32], &Device::Cpu).unwrap();
    let loss = u.forward(&x, &t, &ctx).unwrap().sum_all().unwrap();
    let err = loss.backward().unwrap_err().to_string();
    assert!(
        err.contains("gradient-checkpointed") && err.contains("grads_of"),
        "{err}"
    );
}

#[test]
fn training_with_checkpointing_follows_training_without() {
    let dir = tiny_pipeline();
    let data = common::tiny_dataset(dir.path());
    let run = |ckpt: bool| {
        let mut sd =
            StableDiffusion::from_folder(dir.path(), Some("fp16"), DType::F32, &Device::Cpu)
                .unwrap();
        sd.unet
            .inject_lora(&LoraConfig::new(4, 4.0), &VarMap::new())
            .unwrap();
        let cache = LatentCache::build(&sd, &data, true).unwrap();
        let cfg = TrainConfig {
            lr: 1e-3,
            batch_size: 2,
            grad_accum: 1,
            max_steps: Some(6),
            gradient_checkpointing: ckpt,
            ..Default::default()
        };
        let mut t = Trainer::new(&sd, cfg).unwrap();
        t.train(&sd, &cache, &mut |_| {}).unwrap();
        let losses: Vec<f64> = t.history.iter().map(|r| r.loss).collect();
        let w: Vec<Tensor> = sd
            .unet
            .lora_vars()
            .unwrap()
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        (losses, w)
    };
    let (l0, w0) = run(false);
    let (l1, w1) = run(true);
    for (a, b) in l0.iter().zip(&l1) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "losses {l0:?} vs {l1:?}");
    }
    for (a, b) in w0.iter().zip(&w1) {
        assert!(rel(a, b) <= 1e-5, "weights differ by {}", rel(a, b));
    }
}
