//! `sd-lora unet-forward`: one UNet evaluation on tensors from a file (with an optional LoRA),
//! for parity checks against diffusers.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use std::collections::BTreeMap;
use std::path::PathBuf;

use super::args::ModelArgs;
use crate::io::write_safetensors_atomic;
use crate::lora::{LoraFile, LoraLoad, LoraModel};
use crate::unet::UNet2DConditionModel;

/// `sd-lora unet-forward`.
#[derive(Debug, Clone, clap::Args)]
#[command(mut_arg("model", |a| a.required(true).default_value(None::<&str>)))]
pub struct UnetForwardArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// safetensors with `sample` `[B,4,H,W]`, `timestep` `[B]` and `encoder_hidden_states` `[B,T,C]`.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Output safetensors; gets tensor `sample` (f32).
    #[arg(long)]
    pub out: PathBuf,
    /// A LoRA file (any layout and kind `inspect-lora` lists; its text-encoder part is counted
    /// and not used here).
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// Load the tensors of --lora that match and warn about the rest (unknown keys, modules
    /// this model lacks) instead of refusing the file.
    #[arg(long)]
    pub allow_partial_lora: bool,
    /// Strength of the LoRA (0 = base model, 1 = as trained).
    #[arg(long, default_value_t = 1.0, value_parser = super::args::finite, allow_negative_numbers = true)]
    pub lora_scale: f64,
}

/// Reads `sample`, `timestep`, `encoder_hidden_states` from `inputs`, runs the UNet (with an
/// optional LoRA at `lora_scale`) and writes `sample` to `out`. Returns a one-line report.
pub fn unet_forward(a: &UnetForwardArgs) -> Result<String> {
    let (device, dtype) = a.model.resolve()?;
    let inputs = &a.inputs;
    let tensors = candle_core::safetensors::load(inputs, &device)
        .with_context(|| format!("cannot read inputs {}", inputs.display()))?;
    let get = |name: &str| -> Result<Tensor> {
        tensors.get(name).cloned().with_context(|| {
            let mut have: Vec<_> = tensors.keys().cloned().collect();
            have.sort();
            format!(
                "inputs {} have no tensor `{name}` (found: {})",
                inputs.display(),
                have.join(", ")
            )
        })
    };
    let (sample, t, ehs) = (
        get("sample")?,
        get("timestep")?,
        get("encoder_hidden_states")?,
    );
    let single = crate::pipeline::single_file::is_single_file(&a.model.model);
    let allowed: &[&str] = if single {
        &["--config", "--use-ema"]
    } else {
        &[]
    };
    a.model.refuse_unused("unet-forward", allowed)?;
    let mut unet = if single {
        let sf = a.model.single_file().resolved(None)?;
        crate::pipeline::single_file::load_unet(
            std::path::Path::new(&a.model.model),
            &sf,
            dtype,
            &device,
        )?
    } else {
        let dir = crate::io::resolve_model(&a.model.model, a.model.variant.as_deref(), None)?;
        UNet2DConditionModel::load(&dir, a.model.variant.as_deref(), dtype, &device)?
    };
    let mut note = String::new();
    if a.lora.is_none() && a.lora_scale != 1.0 {
        eprintln!(
            "warning: --lora-scale {} without --lora has no effect",
            a.lora_scale
        );
    }
    if let Some(path) = &a.lora {
        let file = LoraFile::open(path)?;
        let opts = LoraLoad::default()
            .with_strength(a.lora_scale)
            .partial(a.allow_partial_lora);
        let applied = unet.load_lora_file(&file, &opts, &VarMap::new())?;
        note = format!(
            ", {:?} file: {applied}, scale {}",
            file.format, a.lora_scale
        );
    }
    let y = unet
        .forward(&sample, &t, &ehs)
        .with_context(|| format!("running the UNet on {}", inputs.display()))?
        .to_dtype(DType::F32)?;
    let mut map = BTreeMap::new();
    map.insert("sample".to_string(), y.clone());
    write_safetensors_atomic(&map, None, &a.out)?;
    Ok(format!("wrote {} {:?}{note}", a.out.display(), y.dims()))
}
