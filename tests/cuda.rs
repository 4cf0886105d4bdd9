//! CUDA against the CPU (compiled with `--features cuda`; run on a GPU machine by
//! `scripts/gpu-check.sh`). Without a GPU every test returns early, saying so.
#![cfg(feature = "cuda")]

mod common;

use sd_lora::prelude::*;

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("no CUDA GPU ({e}); skipped");
            None
        }
    }
}

/// max|a - b| / max|b| on the CPU.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    common::rel_err(&cpu(a), &cpu(b))
}

fn tiny(device: &Device, dtype: DType) -> StableDiffusion {
    StableDiffusion::load_with(&LoadOptions {
        source: "tiny".into(),
        dtype,
        device: device.clone(),
        ..Default::default()
    })
    .unwrap()
}

/// UNet output and LoRA gradients of one denoising loss, with a fixed non-zero LoRA.
fn unet_step(device: &Device, dtype: DType) -> (Tensor, Vec<(String, Tensor)>) {
    let mut sd = tiny(device, dtype);
    sd.unet
        .inject_lora(&LoraConfig::new(4, 8.0).with_seed(1), &VarMap::new())
        .unwrap();
    for (i, (_, v)) in sd.unet.lora_vars().unwrap().into_iter().enumerate() {
        let r = randn_seeded(100 + i as u64, v.dims(), 0.05, device).unwrap();
        v.set(&r).unwrap();
    }
    let x = randn_seeded(1, &[2, 4, 16, 16], 1.0, device)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let ctx = sd
        .encode_prompts(&["a red circle", "a blue square"])
        .unwrap();
    let t = Tensor::new(&[10u32, 700], device).unwrap();
    let out = sd
        .unet
        .forward(&x, &t, &ctx)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let loss = out.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = sd
        .unet
        .lora_vars()
        .unwrap()
        .into_iter()
        .map(|(n, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            (n, g.clone())
        })
        .collect();
    (out, g)
}

#[test]
fn unet_forward_and_lora_gradients_match_the_cpu() {
    let Some(dev) = gpu() else { return };
    let (cpu_out, cpu_g) = unet_step(&Device::Cpu, DType::F32);
    for (dtype, tol_out, tol_grad) in [(DType::F32, 1e-4, 1e-3), (DType::BF16, 3e-2, 1e-1)] {
        let (out, g) = unet_step(&dev, dtype);
        let e = rel(&out, &cpu_out);
        println!("{dtype:?}: UNet output relative error {e:.2e}");
        assert!(e < tol_out, "{dtype:?} output {e}");
        let mut worst = 0f32;
        for ((name, a), (_, b)) in g.iter().zip(&cpu_g) {
            let v: Vec<f32> = a
                .to_device(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{name}: non-finite gradient"
            );
            assert!(v.iter().any(|x| *x != 0.0), "{name}: zero gradient");
            worst = worst.max(rel(a, b));
        }
        println!(
            "{dtype:?}: {} LoRA gradients, worst relative error {worst:.2e}",
            g.len()
        );
        assert!(worst < tol_grad, "{dtype:?} gradients {worst}");
    }
}

#[test]
fn chunked_attention_matches_the_cpu() {
    let Some(dev) = gpu() else { return };
    let q = randn_seeded(1, &[4, 300, 40], 0.3, &Device::Cpu).unwrap();
    let k = randn_seeded(2, &[4, 77, 40], 0.3, &Device::Cpu).unwrap();
    let v = randn_seeded(3, &[4, 77, 40], 1.0, &Device::Cpu).unwrap();
    let want = sd_lora::ops::attention(&q, &k, &v, 64).unwrap();
    let qv = Var::from_tensor(&q.to_device(&dev).unwrap()).unwrap();
    let got = sd_lora::ops::attention(
        qv.as_tensor(),
        &k.to_device(&dev).unwrap(),
        &v.to_device(&dev).unwrap(),
        64,
    )
    .unwrap();
    assert!(rel(&got, &want) < 1e-4);
    let g = got.sum_all().unwrap().backward().unwrap();
    assert!(g.get(qv.as_tensor()).is_some());
}

#[test]
fn generation_on_the_gpu_matches_the_cpu() {
    let Some(dev) = gpu() else { return };
    let cfg = GenerateConfig {
        prompt: "a large red circle on a sky background".into(),
        steps: 10,
        seed: 3,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let cpu = tiny(&Device::Cpu, DType::F32).generate(&cfg).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let img = tiny(&dev, dtype).generate(&cfg).unwrap();
        let a: Vec<f32> = img
            .pixels
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            a.iter().all(|x| x.is_finite()),
            "{dtype:?}: NaN in the image"
        );
        let b: Vec<f32> = cpu.pixels.flatten_all().unwrap().to_vec1().unwrap();
        let mse = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            / a.len() as f32;
        let psnr = 10.0 * (1.0 / mse.max(1e-12)).log10();
        println!("{dtype:?}: PSNR vs CPU {psnr:.1} dB");
        assert!(
            psnr > if dtype == DType::F32 { 40.0 } else { 20.0 },
            "{dtype:?}: {psnr} dB"
        );
    }
}
