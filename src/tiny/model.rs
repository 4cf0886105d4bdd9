//! The tiny model's architecture and how its diffusers folder is written (configs, f16
//! weights; the tokenizer is written before training).

use anyhow::{Context, Result};
use candle_core::DType;
use std::path::Path;

use crate::pipeline::StableDiffusion;
use crate::text::ClipTextConfig;
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;
use crate::weights::{save_weights, NamedVars};

/// The tiny architecture: SD's blocks, small widths (UNet `UNetConfig::tiny()`, a VAE of
/// widths 16/32/32, CLIP 2 layers x 64). Latents 16 x 16 x 4 for 64 px images.
pub fn tiny_configs() -> (UNetConfig, VaeConfig, ClipTextConfig) {
    (
        UNetConfig::tiny(),
        VaeConfig {
            block_out_channels: vec![16, 32, 32],
            ..VaeConfig::tiny()
        },
        ClipTextConfig::tiny(),
    )
}

pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

fn with_class(mut v: serde_json::Value, class: &str) -> serde_json::Value {
    if let Some(m) = v.as_object_mut() {
        m.insert("_class_name".into(), class.into());
        m.insert("_diffusers_version".into(), "0.42.1".into());
    }
    v
}

/// The diffusers folder `out`: configs, f16 weights, tokenizer (already written).
pub fn write_model(
    out: &Path,
    sd: &StableDiffusion,
    unet: &NamedVars,
    vae: &NamedVars,
    text: &NamedVars,
) -> Result<()> {
    write_json(
        &out.join("model_index.json"),
        &serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    )?;
    write_json(
        &out.join("unet/config.json"),
        &with_class(
            serde_json::to_value(&sd.unet.config)?,
            "UNet2DConditionModel",
        ),
    )?;
    save_weights(
        unet,
        DType::F16,
        &out.join("unet/diffusion_pytorch_model.safetensors"),
    )?;
    let v = &sd.vae.config;
    write_json(
        &out.join("vae/config.json"),
        &serde_json::json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.42.1",
            "act_fn": "silu",
            "block_out_channels": v.block_out_channels,
            "down_block_types": v.down_block_types,
            "up_block_types": v.up_block_types,
            "in_channels": v.in_channels,
            "out_channels": v.out_channels,
            "latent_channels": v.latent_channels,
            "layers_per_block": v.layers_per_block,
            "norm_num_groups": v.norm_num_groups,
            "sample_size": super::scenes::SIZE,
            "scaling_factor": v.scaling_factor,
            "shift_factor": null,
            "force_upcast": false,
            "mid_block_add_attention": true,
            "use_quant_conv": true,
            "use_post_quant_conv": true,
        }),
    )?;
    save_weights(
        vae,
        DType::F16,
        &out.join("vae/diffusion_pytorch_model.safetensors"),
    )?;
    let t = &sd.text_encoder.config;
    write_json(
        &out.join("text_encoder/config.json"),
        &serde_json::json!({
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "eos_token_id": t.eos_token_id,
            "pad_token_id": 1,
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "layer_norm_eps": t.layer_norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "projection_dim": t.hidden_size,
            "vocab_size": t.vocab_size,
        }),
    )?;
    save_weights(
        text,
        DType::F16,
        &out.join("text_encoder/model.safetensors"),
    )?;
    let mut sched = serde_json::to_value(&sd.scheduler_config)?;
    if let Some(m) = sched.as_object_mut() {
        m.insert("clip_sample".into(), false.into());
        m.insert("set_alpha_to_one".into(), false.into());
        m.insert("steps_offset".into(), 1.into());
    }
    write_json(
        &out.join("scheduler/scheduler_config.json"),
        &with_class(sched, "DDIMScheduler"),
    )?;
    Ok(())
}
