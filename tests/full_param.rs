//! Full-parameter mode: every UNet weight a trainable `Var`. Gradients checked against central
//! finite differences in f64 (relative error <= 1e-4); the trainer lowers the loss; weights
//! saved under checkpoint keys load back to the same model.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::tiny_pipeline;
use sd_lora::pipeline::StableDiffusion;
use sd_lora::train::{LatentCache, LrSchedule, TrainConfig, Trainer};
use sd_lora::unet::{UNet2DConditionModel, UNetConfig};
use sd_lora::weights::{save_weights, WeightSource};

fn loss(u: &UNet2DConditionModel, x: &Tensor, t: &Tensor, e: &Tensor, r: &Tensor) -> Tensor {
    (u.forward(x, t, e).unwrap() * r)
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn every_weight_gets_the_finite_difference_gradient() {
    let dev = Device::Cpu;
    let cfg = UNetConfig::tiny();
    let (u, vars) =
        UNet2DConditionModel::new_trainable(&cfg, &WeightSource::random(3, DType::F64, &dev))
            .unwrap();
    let n_weights: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    println!("{} tensors, {n_weights} weights", vars.len());
    let meta = UNet2DConditionModel::meta(&cfg).unwrap();
    use sd_lora::lora::LoraModel;
    assert_eq!(
        n_weights,
        meta.lora_summary().unwrap().total_params,
        "every weight of the tiny UNet is trainable"
    );
    let x = Tensor::randn(0f64, 1.0, (1, 4, 8, 8), &dev).unwrap();
    let t = Tensor::new(&[321f64], &dev).unwrap();
    let e = Tensor::randn(0f64, 1.0, (1, 5, 64), &dev).unwrap();
    let r = Tensor::randn(0f64, 1.0, (1, 4, 8, 8), &dev).unwrap();
    let grads = loss(&u, &x, &t, &e, &r).backward().unwrap();
    let mut worst = (0.0f64, String::new());
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        let gv: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(gv.iter().all(|x| x.is_finite()), "{name}: non-finite grad");
        let (i, gi) = gv
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        assert!(*gi != 0.0, "{name}: zero gradient");
        // central difference on the element with the largest gradient
        let orig = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let h = 1e-5 * orig[i].abs().max(1.0);
        let eval = |d: f64| {
            let mut p = orig.clone();
            p[i] += d;
            v.set(&Tensor::from_vec(p, v.shape(), &dev).unwrap())
                .unwrap();
            loss(&u, &x, &t, &e, &r).to_scalar::<f64>().unwrap()
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h);
        set(v, &orig, &dev);
        let rel = (fd - gi).abs() / gi.abs().max(1e-8);
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    println!("worst relative error {:.2e} at {}", worst.0, worst.1);
    assert!(worst.0 < 1e-4, "{worst:?}");
}

fn set(v: &Var, values: &[f64], dev: &Device) {
    v.set(&Tensor::from_vec(values.to_vec(), v.shape(), dev).unwrap())
        .unwrap();
}

#[test]
fn full_parameter_training_lowers_the_loss_and_saves_a_loadable_unet() {
    let dir = tiny_pipeline();
    let dev = Device::Cpu;
    let mut sd = StableDiffusion::from_folder(dir.path(), Some("fp16"), DType::F32, &dev).unwrap();
    let ws = sd_lora::weights::open_weights(
        &dir.path().join("unet"),
        "diffusion_pytorch_model",
        Some("fp16"),
        DType::F32,
        &dev,
    )
    .unwrap();
    let (unet, vars) = UNet2DConditionModel::new_trainable(&sd.unet.config, &ws).unwrap();
    sd.unet = unet;
    let data = common::tiny_dataset(dir.path());
    let cache = LatentCache::build(&sd, &data, true).unwrap();
    let cfg = TrainConfig {
        lr: 1e-3,
        batch_size: 4,
        grad_accum: 1,
        max_steps: Some(30),
        schedule: LrSchedule::Constant,
        ..Default::default()
    };
    let mut t = Trainer::with_vars(&sd, cfg, vars.clone()).unwrap();
    let eval = |t: &Trainer| {
        let mut rng = <rand_chacha::ChaCha12Rng as rand::SeedableRng>::seed_from_u64(9);
        (0..6)
            .map(|_| {
                t.loss(&sd, &cache, &[0, 1, 2, 3], &mut rng)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64
            })
            .sum::<f64>()
            / 6.0
    };
    let before = eval(&t);
    t.train(&sd, &cache, &mut |_| {}).unwrap();
    let after = eval(&t);
    println!("full-parameter eval loss {before:.4} -> {after:.4}");
    assert!(after < 0.8 * before, "{before} -> {after}");
    // saved under checkpoint keys, loads back into an identical UNet
    let out = tempfile::tempdir().unwrap();
    let f = out.path().join("diffusion_pytorch_model.safetensors");
    save_weights(&vars, DType::F32, &f).unwrap();
    std::fs::copy(
        dir.path().join("unet/config.json"),
        out.path().join("config.json"),
    )
    .unwrap();
    let back = UNet2DConditionModel::load(out.path(), None, DType::F32, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).unwrap();
    let tt = Tensor::new(&[500f32], &dev).unwrap();
    let e = cache.embeddings[0].unsqueeze(0).unwrap();
    let (a, b) = (
        sd.unet.forward(&x, &tt, &e).unwrap(),
        back.forward(&x, &tt, &e).unwrap(),
    );
    // the reloaded model runs the frozen fast paths (another summation order): 1e-5 relative
    let err = common::rel_err(&b, &a);
    println!("reloaded vs trained: rel err {err:.2e}");
    assert!(err < 1e-5, "{err}");
}
