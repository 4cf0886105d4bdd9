//! The configs a single-file checkpoint implies, read from its tensor shapes: levels, channels,
//! resnets per level, attention and transformer depth, cross-attention width, projection kind
//! (SD 1.x conv, SD 2.x linear), text encoder width/depth/activation, VAE levels. What weights
//! cannot tell is SD's convention: 32 norm groups, 8 UNet heads (SD 1.x) or 64-dim heads (SD
//! 2.x), 64-dim text heads, VAE scaling 0.18215; models of other widths are refused (give
//! `--config`) rather than guessed.

use anyhow::{bail, Context, Result};

use super::checkpoint_file::{CheckpointHeader, Family};
use crate::text::ClipTextConfig;
use crate::unet::config::PerBlock;
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;

const UNET: &str = "model.diffusion_model.";

/// The UNet config SD 1.x/2.x files imply (SD's 32 norm groups; heads: 8 for SD 1.x, 64-dim
/// for SD 2.x). Errors name what is missing.
pub fn infer_unet_config(h: &CheckpointHeader, family: Family) -> Result<UNetConfig> {
    let shape = |k: &str| -> Result<&[usize]> {
        h.shape(&format!("{UNET}{k}"))
            .with_context(|| format!("{}: no tensor `{UNET}{k}`", h.path.display()))
    };
    let conv_in = shape("input_blocks.0.0.weight")?;
    let (mc, in_channels) = (conv_in[0], conv_in[1]);
    let mut levels: Vec<(usize, bool, usize)> = Vec::new(); // (channels, attention, depth)
    let mut layers = Vec::new();
    let (mut i, mut in_level) = (1, 0);
    loop {
        let b = format!("{UNET}input_blocks.{i}");
        if h.has(&format!("{b}.0.op.weight")) {
            layers.push(in_level);
            in_level = 0;
        } else if let Some(s) = h.shape(&format!("{b}.0.in_layers.2.weight")) {
            let depth = h.count(&format!("{b}.1.transformer_blocks."), ".attn1.to_q.weight");
            if in_level == 0 {
                levels.push((s[0], depth > 0, depth));
            }
            in_level += 1;
        } else {
            layers.push(in_level);
            break;
        }
        i += 1;
    }
    if levels.is_empty() || layers.iter().any(|l| *l != layers[0]) {
        bail!(
            "{}: cannot infer the UNet's blocks (resnets per level {layers:?}); give --config",
            h.path.display()
        );
    }
    let per_level = layers[0];
    let first_attn = (1..i)
        .find_map(|j| {
            h.shape(&format!(
                "{UNET}input_blocks.{j}.1.transformer_blocks.0.attn2.to_k.weight"
            ))
        })
        .context("no cross-attention in the UNet")?;
    let proj_in = (1..i)
        .find_map(|j| h.shape(&format!("{UNET}input_blocks.{j}.1.proj_in.weight")))
        .context("no proj_in in the UNet")?;
    let n = levels.len();
    let up_attn: Vec<bool> = (0..n)
        .map(|u| {
            let idx = u * (per_level + 1);
            h.has(&format!("{UNET}output_blocks.{idx}.1.proj_in.weight"))
        })
        .collect();
    let depth: Vec<usize> = levels.iter().map(|l| l.2.max(1)).collect();
    let mut cfg = UNetConfig {
        in_channels,
        out_channels: shape("out.2.weight")?[0],
        down_block_types: levels
            .iter()
            .map(|l| {
                if l.1 {
                    "CrossAttnDownBlock2D"
                } else {
                    "DownBlock2D"
                }
                .into()
            })
            .collect(),
        up_block_types: up_attn
            .iter()
            .map(|a| {
                if *a {
                    "CrossAttnUpBlock2D"
                } else {
                    "UpBlock2D"
                }
                .into()
            })
            .collect(),
        block_out_channels: levels.iter().map(|l| l.0).collect(),
        layers_per_block: PerBlock::One(per_level),
        cross_attention_dim: PerBlock::One(first_attn[1]),
        transformer_layers_per_block: if depth.iter().all(|d| *d == depth[0]) {
            PerBlock::One(depth[0])
        } else {
            PerBlock::Each(depth)
        },
        use_linear_projection: proj_in.len() == 2,
        ..UNetConfig::sd_v1_5()
    };
    if let Some(c) = levels.iter().map(|l| l.0).find(|c| c % 32 != 0) {
        bail!(
            "{}: a UNet level has {c} channels, not a multiple of SD's 32 norm groups: not a standard SD 1.x/2.x model, so its config cannot be inferred; give --config",
            h.path.display()
        );
    }
    if levels[0].0 != mc {
        bail!(
            "{}: conv_in has {mc} channels, the first level {}",
            h.path.display(),
            levels[0].0
        );
    }
    if family == Family::Sd2 {
        cfg.attention_head_dim =
            PerBlock::Each(cfg.block_out_channels.iter().map(|c| c / 64).collect());
    }
    Ok(cfg)
}

/// The VAE config a file's `prefix`ed LDM VAE implies (SD's 32 norm groups and scaling 0.18215).
pub fn infer_vae_config(h: &CheckpointHeader, prefix: &str) -> Result<VaeConfig> {
    let shape = |k: &str| -> Result<&[usize]> {
        h.shape(&format!("{prefix}{k}"))
            .with_context(|| format!("{}: no tensor `{prefix}{k}`", h.path.display()))
    };
    let levels = h.count(&format!("{prefix}encoder.down."), ".block.0.conv1.weight");
    if levels == 0 {
        bail!("{}: no LDM VAE under `{prefix}`", h.path.display());
    }
    let channels = (0..levels)
        .map(|i| Ok(shape(&format!("encoder.down.{i}.block.0.conv2.weight"))?[0]))
        .collect::<Result<Vec<_>>>()?;
    if let Some(c) = channels.iter().find(|c| *c % 32 != 0) {
        bail!(
            "{}: a VAE level has {c} channels, not a multiple of SD's 32 norm groups: its config cannot be inferred; give --config",
            h.path.display()
        );
    }
    Ok(VaeConfig {
        in_channels: shape("encoder.conv_in.weight")?[1],
        out_channels: shape("decoder.conv_out.weight")?[0],
        down_block_types: vec!["DownEncoderBlock2D".into(); levels],
        up_block_types: vec!["UpDecoderBlock2D".into(); levels],
        block_out_channels: channels,
        layers_per_block: h.count(&format!("{prefix}encoder.down.0.block."), ".conv1.weight"),
        latent_channels: shape("encoder.conv_out.weight")?[0] / 2,
        use_quant_conv: h.has(&format!("{prefix}quant_conv.weight")),
        use_post_quant_conv: h.has(&format!("{prefix}post_quant_conv.weight")),
        ..VaeConfig::sd_v1_5()
    })
}

/// The text encoder config a file implies (64-dim heads; SD 2.x: the penultimate of OpenCLIP's
/// layers, GELU, as diffusers converts it).
pub fn infer_clip_config(h: &CheckpointHeader, family: Family) -> Result<ClipTextConfig> {
    let p = h.path.display();
    let get = |k: &str| -> Result<&[usize]> {
        h.shape(k).with_context(|| format!("{p}: no tensor `{k}`"))
    };
    Ok(match family {
        Family::Sd1 => {
            // older files lack transformers' `text_model.` level
            let t = if h.any_prefix("cond_stage_model.transformer.text_model.") {
                "cond_stage_model.transformer.text_model."
            } else {
                "cond_stage_model.transformer."
            };
            let tok = get(&format!("{t}embeddings.token_embedding.weight"))?;
            ClipTextConfig {
                vocab_size: tok[0],
                hidden_size: tok[1],
                intermediate_size: get(&format!("{t}encoder.layers.0.mlp.fc1.weight"))?[0],
                num_hidden_layers: h.count(&format!("{t}encoder.layers."), ".mlp.fc1.weight"),
                num_attention_heads: tok[1] / 64,
                max_position_embeddings: get(&format!("{t}embeddings.position_embedding.weight"))?
                    [0],
                ..ClipTextConfig::sd_v1_5()
            }
        }
        Family::Sd2 => {
            let t = "cond_stage_model.model.";
            let tok = get(&format!("{t}token_embedding.weight"))?;
            let blocks = h.count(&format!("{t}transformer.resblocks."), ".mlp.c_fc.weight");
            ClipTextConfig {
                vocab_size: tok[0],
                hidden_size: tok[1],
                intermediate_size: get(&format!("{t}transformer.resblocks.0.mlp.c_fc.weight"))?[0],
                num_hidden_layers: blocks.saturating_sub(1),
                num_attention_heads: tok[1] / 64,
                max_position_embeddings: get(&format!("{t}positional_embedding"))?[0],
                hidden_act: "gelu".into(),
                ..ClipTextConfig::sd_v1_5()
            }
        }
    })
}
