//! `sd-lora convert`: any readable LoRA file to kohya or PEFT/diffusers layout, in f32, f16 or
//! bf16.

use anyhow::Result;
use candle_core::DType;
use std::path::PathBuf;

use super::args::{SaveDType, StructureArgs};
use crate::lora::{apply, LoraFile, LoraFormat};

/// `sd-lora convert`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertArgs {
    /// The LoRA file to read (any layout and kind `inspect-lora` lists). To kohya: every
    /// kind, diffusers-named; to PEFT: LoRA, LoCon and output-axis DoRA, UNet and text encoder.
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

/// Reads `a.input`, matches it against the model structure (every tensor, shapes included)
/// and writes it in `a.to` layout; returns a one-line report.
pub fn convert(a: &ConvertArgs) -> Result<String> {
    let file = LoraFile::open(&a.input)?;
    let m = a.structure.match_file(&file)?;
    let (ui, ti) = (&m.unet_index, &m.te_index);
    // unknown or malformed keys, unmatched or misfitting adapters: refused with the names
    let plan = apply::plan(&file, &[ui, ti], false)?;
    let dtype: DType = a.save_dtype.into();
    let n = crate::lora::convert::convert_file(&file, &plan, &[ui, ti], a.to, dtype, &a.out)?;
    Ok(format!(
        "wrote {} ({:?}, {dtype:?}, {n} adapters: {})",
        a.out.display(),
        a.to,
        apply::kind_table(&file, &[ui, ti])
            .iter()
            .map(|(k, row)| format!("{} {k}", row.layers))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}
