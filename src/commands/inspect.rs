//! `sd-lora inspect-model` and `sd-lora inspect-lora`: what a LoRA would add to a model, and
//! what a LoRA file holds. Both read structures only, never weights.

use anyhow::{Context, Result};
use candle_nn::VarMap;
use std::path::PathBuf;

use super::args::{count, StructureArgs};
use crate::lora::{LoraConfig, LoraFile, LoraModel, LoraSummary};
use crate::unet::{UNet2DConditionModel, UNetConfig};

/// `sd-lora inspect-model`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectModelArgs {
    #[command(flatten)]
    pub structure: StructureArgs,
    /// LoRA rank r.
    #[arg(long, default_value_t = LoraConfig::default().rank, value_parser = count)]
    pub rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank) [default: 2 x rank].
    #[arg(long, value_parser = super::args::positive, allow_negative_numbers = true)]
    pub alpha: Option<f64>,
    /// Comma-separated module targets (`to_q,to_k,to_v`; shorthands attn, ff, all).
    #[arg(long, default_value = "to_q,to_k,to_v")]
    pub targets: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also list every adapted layer.
    #[arg(long)]
    pub layers: bool,
}

/// Builds the UNet structure without weights, injects LoRA and returns the summary.
pub fn lora_summary(model: &str, cfg: &LoraConfig) -> Result<LoraSummary> {
    let mut unet = UNet2DConditionModel::meta(&UNetConfig::for_model(model)?)?;
    unet.inject_lora(cfg, &VarMap::new())
}

/// The report `inspect-model` prints (text, or JSON with `--json`).
pub fn inspect_model(a: &InspectModelArgs) -> Result<String> {
    let alpha = a.alpha.unwrap_or(LoraConfig::default_alpha(a.rank));
    let cfg = LoraConfig::new(a.rank, alpha).with_targets(&LoraConfig::parse_targets(&a.targets));
    let summary = lora_summary(&a.structure.model, &cfg)?;
    if a.json {
        let mut v = summary.to_json();
        if !a.layers {
            if let Some(o) = v.as_object_mut() {
                o.remove("layers");
            }
        }
        return Ok(v.to_string());
    }
    let mut out = summary.to_string();
    if a.layers {
        for l in &summary.layers {
            out += &format!(
                "\n  {} [{} -> {}] rank {} alpha {}",
                l.name, l.in_dim, l.out_dim, l.rank, l.alpha
            );
        }
    }
    Ok(out)
}

/// `sd-lora inspect-lora`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectLoraArgs {
    /// The LoRA file (.safetensors; PEFT/diffusers, kohya/A1111/ComfyUI or old diffusers).
    pub file: PathBuf,
    #[command(flatten)]
    pub structure: StructureArgs,
}

/// Format, layers, ranks, alphas, targets, parameters and metadata of a LoRA file.
pub fn inspect_lora(a: &InspectLoraArgs) -> Result<String> {
    let path = &a.file;
    let unet = UNet2DConditionModel::meta(&UNetConfig::for_model(&a.structure.model)?)?;
    let file = LoraFile::read(path, &unet.linear_names()?)?;
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v.dedup();
        v
    };
    let mut ranks: Vec<usize> = file.modules.iter().map(|m| m.a.dims()[0]).collect();
    ranks.sort();
    ranks.dedup();
    let alphas = sorted(
        file.modules
            .iter()
            .map(|m| format!("{}", m.alpha))
            .collect(),
    );
    let kinds = sorted(
        file.modules
            .iter()
            .filter_map(|m| {
                crate::lora::INJECTABLE
                    .iter()
                    .find(|k| crate::lora::target_matches(k, &m.module))
                    .map(|k| k.to_string())
            })
            .collect(),
    );
    let params: usize = file
        .modules
        .iter()
        .map(|m| m.a.elem_count() + m.b.elem_count())
        .sum();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut meta: Vec<(String, String)> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    meta.sort();
    let mut out = format!(
        "file:        {}\nformat:      {:?}\nlayers:      {}\nrank:        {}\nalpha:       {}\ntargets:     {}\nparameters:  {}\n",
        path.display(),
        file.format,
        file.modules.len(),
        ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
        alphas.join(", "),
        kinds.join(", "),
        crate::lora::group_digits(params)
    );
    if !file.skipped.is_empty() {
        out += &format!(
            "text encoder tensors (not applied): {}\n",
            file.skipped.len()
        );
    }
    for (k, v) in meta {
        let v = match v.char_indices().nth(200) {
            Some((cut, _)) => format!("{}...", &v[..cut]),
            None => v,
        };
        out += &format!("meta {k}: {v}\n");
    }
    Ok(out)
}
