//! Writes LoRA files made by sd-lora (both formats; plain LoRA, DoRA, LoCon, text encoder +
//! UNet) for tests/golden/make_golden_ours.py, which checks that diffusers (and LyCORIS, for
//! the kohya DoRA and LoCon files) load them with no missing or unexpected keys and records
//! their outputs.
//!
//!     cargo run --release --example make_ours_lora

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
    // LoCon: linear adapters plus conv adapters (rank 3, alpha 2) on every resnet/sampler conv
    let mut u = UNet2DConditionModel::load(root.join("unet_a"), None, DType::F32, &Device::Cpu)?;
    u.inject_lora(
        &LoraConfig::new(4, 6.0)
            .with_targets(&["to_q", "to_k", "to_v", "to_out.0", "proj_in"])
            .with_init(LoraInit::KaimingUniform)
            .with_seed(9)
            .with_conv(3, Some(2.0)),
        &VarMap::new(),
    )?;
    randomize_b(&u.lora_vars()?, &mut rng)?;
    for (fmt, f) in [
        (LoraFormat::Kohya, "locon_kohya.safetensors"),
        (LoraFormat::Peft, "locon_peft.safetensors"),
    ] {
        save_adapters(
            &u.adapted_layers()?,
            fmt,
            DType::F32,
            out.join(f),
            &Default::default(),
        )?;
    }
    // text encoder + UNet on the tiny pipeline (kohya's default text-encoder targets)
    let pipe = root.join("tiny_pipeline");
    let mut u = UNet2DConditionModel::load(&pipe, Some("fp16"), DType::F32, &Device::Cpu)?;
    let mut te = ClipTextModel::load(&pipe, Some("fp16"), DType::F32, &Device::Cpu)?;
    let cfg = LoraConfig::new(4, 8.0).with_seed(10);
    u.inject_lora(&cfg, &VarMap::new())?;
    te.inject_lora(&cfg.for_text_encoder(TEXT_INJECTABLE), &VarMap::new())?;
    randomize_b(&u.lora_vars()?, &mut rng)?;
    randomize_b(&te.lora_vars()?, &mut rng)?;
    let mut layers = u.adapted_layers()?;
    layers.extend(te.adapted_layers()?);
    for (fmt, f) in [
        (LoraFormat::Kohya, "te_unet_kohya.safetensors"),
        (LoraFormat::Peft, "te_unet_peft.safetensors"),
    ] {
        save_adapters(&layers, fmt, DType::F32, out.join(f), &Default::default())?;
    }
    println!("wrote {}", out.display());
    Ok(())
}

/// Sets every `lora_B` to N(0, 0.2^2) so the adapters change the output.
fn randomize_b(vars: &[(String, Var)], rng: &mut rand::rngs::StdRng) -> anyhow::Result<()> {
    for (name, v) in vars {
        if name.ends_with("lora_B.weight") {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| StandardNormal.sample(rng))
                .map(|x: f32| x * 0.2)
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu)?)?;
        }
    }
    Ok(())
}
