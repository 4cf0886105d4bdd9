//! Writes LoRA files made by sd-lora (both formats; plain LoRA and DoRA) for
//! tests/golden/make_golden_ours.py, which checks that diffusers (and LyCORIS, for the kohya
//! DoRA file) load them with no missing or unexpected keys and records their outputs.
//!
//!     cargo run --release --example make_ours_lora

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use sd_lora::lora::io::save_lora;
use sd_lora::prelude::*;

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/data");
    let mut u = UNet2DConditionModel::load(root.join("unet_a"), None, DType::F32, &Device::Cpu)?;
    let cfg = LoraConfig::new(4, 6.0)
        .with_targets(&["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"])
        .with_init(LoraInit::KaimingUniform)
        .with_seed(7);
    u.inject_lora(&cfg, &VarMap::new())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (name, v) in u.lora_vars()? {
        if name.ends_with("lora_B.weight") {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| StandardNormal.sample(&mut rng))
                .collect::<Vec<f32>>()
                .iter()
                .map(|x| x * 0.2)
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu)?)?;
        }
    }
    let out = root.join("ours");
    std::fs::create_dir_all(&out)?;
    save_lora(
        &u.linears()?,
        LoraFormat::Kohya,
        out.join("lora_kohya.safetensors"),
    )?;
    save_lora(
        &u.linears()?,
        LoraFormat::Peft,
        out.join("lora_peft.safetensors"),
    )?;
    // DoRA: random B, magnitudes moved off their initial row norms
    let mut u = UNet2DConditionModel::load(root.join("unet_a"), None, DType::F32, &Device::Cpu)?;
    u.inject_lora(
        &LoraConfig::new(4, 6.0)
            .with_targets(&["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"])
            .with_init(LoraInit::KaimingUniform)
            .with_seed(8)
            .with_dora(true),
        &VarMap::new(),
    )?;
    for (name, v) in u.lora_vars()? {
        let noise: Vec<f32> = (0..v.elem_count())
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let noise = Tensor::from_vec(noise, v.shape(), &Device::Cpu)?;
        if name.ends_with("lora_B.weight") {
            v.set(&(noise * 0.2)?)?;
        } else if name.ends_with("lora_magnitude_vector") {
            v.set(&(v.as_tensor() * ((noise * 0.1)? + 1.0)?)?)?;
        }
    }
    for (fmt, f) in [
        (LoraFormat::Kohya, "dora_kohya.safetensors"),
        (LoraFormat::Peft, "dora_peft.safetensors"),
    ] {
        save_lora(&u.linears()?, fmt, out.join(f))?;
    }
    println!("wrote {}", out.display());
    Ok(())
}
