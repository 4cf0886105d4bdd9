//! `sd-lora convert`: any readable LoRA file to kohya or PEFT/diffusers layout, in f32, f16 or
//! bf16.

use anyhow::{bail, Result};
use candle_core::DType;
use candle_nn::VarMap;
use std::path::PathBuf;

use super::args::{SaveDType, StructureArgs};
use crate::lora::{LoraFile, LoraFormat, LoraModel};
use crate::unet::{UNet2DConditionModel, UNetConfig};

/// `sd-lora convert`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertArgs {
    /// The LoRA file to read (PEFT/diffusers, kohya/A1111/ComfyUI or old diffusers).
    pub input: PathBuf,
    /// The layout to write.
    #[arg(long, value_enum)]
    pub to: LoraFormat,
    /// Output .safetensors.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub structure: StructureArgs,
    /// Precision of the written tensors.
    #[arg(long, value_enum, default_value_t = SaveDType::F32)]
    pub save_dtype: SaveDType,
}

/// Reads `a.input` against the model structure, writes `a.out`; returns a one-line report.
pub fn convert(a: &ConvertArgs) -> Result<String> {
    let mut unet = UNet2DConditionModel::meta(&UNetConfig::for_model(&a.structure.model)?)?;
    let file = LoraFile::open(&a.input)?;
    let others: Vec<&crate::lora::LoraEntry> =
        file.entries.iter().filter(|e| !e.is_plain_lora()).collect();
    if let Some(e) = others.first() {
        bail!(
            "{}: {} of its adapters are not plain LoRA on linear layers (e.g. `{}`: {}), which neither written layout here expresses; only LoRA (kohya <-> PEFT) converts. The file loads as it is in `generate` and `unet-forward`",
            a.input.display(),
            others.len(),
            e.keys[0],
            crate::lora::apply::layer_kind(e.component, e, e.is_spatial())
        );
    }
    if let Some(e) = file
        .entries
        .iter()
        .find(|e| e.component != crate::lora::Component::Unet)
    {
        bail!(
            "{}: has {} adapters (e.g. `{}`); convert writes UNet adapters only and would drop them",
            a.input.display(),
            e.component,
            e.keys[0]
        );
    }
    let s = unet.apply_lora_file(&file, &VarMap::new())?;
    let dtype: DType = a.save_dtype.into();
    let layers = unet.linears()?;
    crate::lora::io::save_lora_as(&layers, a.to, dtype, &a.out, &Default::default())?;
    Ok(format!(
        "wrote {} ({:?}, {dtype:?}, {} layers, {} parameters)",
        a.out.display(),
        a.to,
        s.lora_layers,
        s.trainable_params
    ))
}
