//! UNet forward and forward+backward (LoRA rank 16 / alpha 32 on q,k,v, MSE loss) on CPU.
//!
//!     cargo bench --bench unet                 # tiny preset and SD 1.5, 32x32 latents
//!     cargo bench --bench unet -- tiny         # only configs whose name contains "tiny"
//!
//! Weights are random (seeded): timings do not depend on values. Prints a Markdown table.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use sd_lora::prelude::*;
use std::time::Instant;

struct Case {
    name: &'static str,
    config: UNetConfig,
    batch: usize,
    latent: usize,
    tokens: usize,
    iters: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64, f64)> {
    f()?; // warm-up
    let mut t = Vec::new();
    for _ in 0..iters {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    let (min, max) = (
        t.iter().cloned().fold(f64::MAX, f64::min),
        t.iter().cloned().fold(0.0, f64::max),
    );
    Ok((median(&mut t), min, max))
}

fn main() -> Result<()> {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let cases = [
        Case {
            name: "tiny b4 32x32",
            config: UNetConfig::tiny(),
            batch: 4,
            latent: 32,
            tokens: 77,
            iters: 5,
        },
        Case {
            name: "sd15 b1 32x32",
            config: UNetConfig::sd_v1_5(),
            batch: 1,
            latent: 32,
            tokens: 77,
            iters: 3,
        },
    ];
    let dev = Device::Cpu;
    println!("threads: {}", candle_core::utils::get_num_threads());
    println!("| case | params | forward s (min-max) | fwd+bwd s (min-max) |");
    println!("|---|---|---|---|");
    for c in cases
        .iter()
        .filter(|c| filter.is_empty() || filter.iter().any(|f| c.name.contains(f.as_str())))
    {
        let mut u = UNet2DConditionModel::random(&c.config, 0, DType::F32, &dev)?;
        let s = u.inject_lora(&LoraConfig::new(16, 32.0), &VarMap::new())?;
        for (name, v) in u.lora_vars()? {
            if name.ends_with("lora_B.weight") {
                v.set(&Tensor::randn(0f32, 0.01, v.shape(), &dev)?)?;
            }
        }
        let ctx = c.config.cross_dims()?[0];
        let x = Tensor::randn(0f32, 1.0, (c.batch, 4, c.latent, c.latent), &dev)?;
        let t = Tensor::new(vec![500f32; c.batch], &dev)?;
        let e = Tensor::randn(0f32, 1.0, (c.batch, c.tokens, ctx), &dev)?;
        let noise = Tensor::randn(0f32, 1.0, x.shape(), &dev)?;
        let fwd = time(c.iters, || {
            let _ = u.forward(&x, &t, &e)?;
            Ok(())
        })?;
        let bwd = time(c.iters, || {
            let loss = (u.forward(&x, &t, &e)? - &noise)?.sqr()?.mean_all()?;
            let _ = loss.backward()?;
            Ok(())
        })?;
        println!(
            "| {} | {} | {:.3} ({:.3}-{:.3}) | {:.3} ({:.3}-{:.3}) |",
            c.name,
            group_digits(s.total_params),
            fwd.0,
            fwd.1,
            fwd.2,
            bwd.0,
            bwd.1,
            bwd.2
        );
    }
    Ok(())
}
