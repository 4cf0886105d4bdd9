//! A second, Python-free oracle: candle-transformers' Stable Diffusion CLIP text transformer and
//! VAE decoder (SD 1.5 configs, the same random weights) against ours. candle-transformers cannot
//! serve as our implementation (no backward through its softmax/LayerNorm, private fields, no
//! latent mean/log-variance), but its forward passes are an independent check at full size.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::models::stable_diffusion as ct;
use common::rel_err;
use sd_lora::text::{ClipTextConfig, ClipTextModel};
use sd_lora::vae::{AutoencoderKL, VaeConfig};
use sd_lora::weights::{ParamRecord, WeightSource};
use std::collections::HashMap;

/// Random weights for every recorded tensor, written to a safetensors file.
fn random_checkpoint(records: &[ParamRecord], dir: &std::path::Path) -> std::path::PathBuf {
    let dev = Device::Cpu;
    let mut map = HashMap::new();
    for r in records {
        let dims = r.shape.dims();
        let t = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            (Tensor::randn(0f32, 1.0, dims, &dev).unwrap() / (fan_in as f64).sqrt()).unwrap()
        } else if r.path.contains("norm") && r.path.ends_with("weight") {
            (Tensor::randn(0f32, 0.1, dims, &dev).unwrap() + 1.0).unwrap()
        } else {
            Tensor::randn(0f32, 0.05, dims, &dev).unwrap()
        };
        map.insert(r.path.clone(), t);
    }
    let p = dir.join("weights.safetensors");
    candle_core::safetensors::save(&map, &p).unwrap();
    p
}

#[test]
fn sd15_text_encoder_matches_candle_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let meta = WeightSource::meta(DType::F32);
    ClipTextModel::new(&ClipTextConfig::sd_v1_5(), &meta).unwrap();
    let file = random_checkpoint(&meta.records(), dir.path());
    let ws = WeightSource::from_safetensors(std::slice::from_ref(&file), DType::F32, &Device::Cpu)
        .unwrap();
    let ours = ClipTextModel::new(&ClipTextConfig::sd_v1_5(), &ws).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, &Device::Cpu).unwrap()
    };
    let theirs = ct::clip::ClipTextTransformer::new(vb, &ct::clip::Config::v1_5()).unwrap();
    let mut ids: Vec<u32> = vec![49406, 320, 1125, 539, 320, 2368, 49407];
    ids.resize(77, 49407);
    let ids = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = ours.forward(&ids).unwrap().last_hidden_state;
    let b = theirs.forward(&ids).unwrap();
    let e = rel_err(&a, &b);
    println!("SD 1.5 text encoder vs candle-transformers: rel err {e:.2e}");
    assert!(e < 1e-4, "{e}");
}

#[test]
fn sd15_vae_decoder_matches_candle_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let meta = WeightSource::meta(DType::F32);
    AutoencoderKL::new(&VaeConfig::sd_v1_5(), &meta).unwrap();
    let file = random_checkpoint(&meta.records(), dir.path());
    let ws = WeightSource::from_safetensors(std::slice::from_ref(&file), DType::F32, &Device::Cpu)
        .unwrap();
    let ours = AutoencoderKL::new(&VaeConfig::sd_v1_5(), &ws).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, &Device::Cpu).unwrap()
    };
    let cfg = ct::vae::AutoEncoderKLConfig {
        block_out_channels: vec![128, 256, 512, 512],
        layers_per_block: 2,
        latent_channels: 4,
        norm_num_groups: 32,
        use_quant_conv: true,
        use_post_quant_conv: true,
    };
    let theirs = ct::vae::AutoEncoderKL::new(vb, 3, 3, cfg).unwrap();
    let z = Tensor::randn(0f32, 1.0, (1, 4, 6, 8), &Device::Cpu).unwrap();
    let e = rel_err(&ours.decode(&z).unwrap(), &theirs.decode(&z).unwrap());
    println!("SD 1.5 VAE decoder vs candle-transformers: rel err {e:.2e}");
    assert!(e < 1e-4, "{e}");
}
