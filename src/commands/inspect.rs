//! `sd-lora inspect-model` and `sd-lora inspect-lora`: what a LoRA would add to a model, and
//! what a LoRA file holds. Both read structures only, never weights.

use anyhow::Result;
use candle_nn::VarMap;
use std::path::PathBuf;

use super::args::{count, StructureArgs};
use crate::lora::{apply, LoraConfig, LoraFile, LoraModel, LoraSummary};
use crate::unet::UNet2DConditionModel;

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

/// Builds the UNet structure without weights (from `config` for a single file, when given),
/// injects LoRA and returns the summary.
pub fn lora_summary(
    model: &str,
    config: Option<&std::path::Path>,
    cfg: &LoraConfig,
) -> Result<LoraSummary> {
    let (ucfg, _) = crate::pipeline::single_file::structure_configs(model, config)?;
    let mut unet = UNet2DConditionModel::meta(&ucfg)?;
    unet.inject_lora(cfg, &VarMap::new())
}

/// The report `inspect-model` prints (text, or JSON with `--json`).
pub fn inspect_model(a: &InspectModelArgs) -> Result<String> {
    let alpha = a.alpha.unwrap_or(LoraConfig::default_alpha(a.rank));
    let cfg = LoraConfig::new(a.rank, alpha).with_targets(&LoraConfig::parse_targets(&a.targets));
    let summary = lora_summary(&a.structure.model, a.structure.config.as_deref(), &cfg)?;
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

/// Layout, dtype, adapter kinds (per component, linear/conv, LoRA/LoHa/LoKr/full, DoRA) with
/// their ranks and alphas, how the file matches the model structure, unknown keys, metadata.
pub fn inspect_lora(a: &InspectLoraArgs) -> Result<String> {
    let path = &a.file;
    let model = &a.structure.model;
    let file = LoraFile::open(path)?;
    let m = a.structure.match_file(&file)?;
    let (ui, ti) = (&m.unet_index, &m.te_index);
    let (plan, unmatched) = (&m.matching.plan, &m.matching.unmatched);
    let params: usize = file.entries.iter().map(|e| e.weights.num_params()).sum();
    let mut out =
        format!(
        "file:        {}\nlayout:      {:?}\ndtype:       {}\nadapters:    {} layers, {} values\n",
        path.display(),
        file.format,
        file.dtypes.iter().map(|d| format!("{d:?}").to_lowercase()).collect::<Vec<_>>().join(", "),
        file.entries.len(),
        crate::lora::group_digits(params)
    );
    for (kind, row) in apply::kind_table(&file, &[ui, ti]) {
        let ranks: Vec<String> = row.ranks.iter().map(|r| r.to_string()).collect();
        out += &format!(
            "  {kind}: {} layers, rank {}, alpha {}\n",
            row.layers,
            if ranks.is_empty() {
                "-".into()
            } else {
                ranks.join("/")
            },
            row.alphas.join("/")
        );
        // where ranks or alphas vary: which layers have which
        for ((r, a), modules) in &row.groups {
            out += &format!(
                "    rank {}, alpha {a}: {} layers ({})\n",
                r.map_or("-".to_string(), |r| r.to_string()),
                modules.len(),
                crate::lora::file::list_names(modules, 3)
            );
        }
    }
    let matched: usize = plan.targets.values().map(|v| v.len()).sum();
    out += &format!(
        "matches {model}: {matched} of {} adapters",
        file.entries.len()
    );
    for (c, (n, _)) in &plan.not_loaded {
        out += &format!(", {n} for the {c} (not part of {model})");
    }
    out += "\n";
    if !unmatched.is_empty() {
        out += &format!(
            "NOT MATCHED ({}; refused unless --allow-partial-lora): {}\n",
            unmatched.len(),
            crate::lora::file::list_names(unmatched, 10)
        );
    }
    let mismatched = &m.matching.misfits;
    if !mismatched.is_empty() {
        out += &format!(
            "SHAPE MISMATCH ({}; refused unless --allow-partial-lora): {}\n",
            mismatched.len(),
            mismatched
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    if !file.invalid.is_empty() {
        out += &format!(
            "MALFORMED ({}; refused unless --allow-partial-lora): {}\n",
            file.invalid.len(),
            crate::lora::file::list_names(&file.invalid, 5)
        );
    }
    if !file.unknown.is_empty() {
        out += &format!(
            "UNKNOWN keys ({}; refused unless --allow-partial-lora): {}\n",
            file.unknown.len(),
            crate::lora::file::list_names(&file.unknown, 10)
        );
    }
    let mut meta: Vec<(String, String)> = file.metadata.clone().into_iter().collect();
    meta.sort();
    for (k, v) in meta {
        let v = match v.char_indices().nth(200) {
            Some((cut, _)) => format!("{}...", &v[..cut]),
            None => v,
        };
        out += &format!("meta {k}: {v}\n");
    }
    Ok(out)
}
