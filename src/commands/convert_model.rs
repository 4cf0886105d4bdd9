//! `sd-lora convert-model`: a single-file checkpoint (A1111/LDM layout) as a diffusers folder.

use anyhow::Result;
use std::path::PathBuf;

use crate::pipeline::convert_model::convert_to_diffusers;
use crate::pipeline::single_file::SingleFileOptions;

/// `sd-lora convert-model FILE --out DIR`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertModelArgs {
    /// The single-file checkpoint (.safetensors, SD 1.x or 2.x in the LDM layout).
    pub file: PathBuf,
    /// The diffusers folder to write (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// A diffusers folder or Hub id whose configs, tokenizer and scheduler to copy [default:
    /// inferred from the file's shapes].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Write the UNet from the file's EMA copy (`model_ema.*`).
    #[arg(long)]
    pub use_ema: bool,
    /// What the UNet predicts, written into the scheduler config [default: epsilon for SD 1.x,
    /// v_prediction for SD 2.x].
    #[arg(long, value_parser = ["epsilon", "v_prediction"])]
    pub prediction_type: Option<String>,
}

/// Converts and returns the one-line report.
pub fn convert_model(a: &ConvertModelArgs) -> Result<String> {
    if a.config.is_some() && a.prediction_type.is_some() {
        anyhow::bail!("--prediction-type with --config: the config's scheduler is copied as it is; edit it instead");
    }
    convert_to_diffusers(
        &a.file,
        &SingleFileOptions {
            config: a.config.clone(),
            vae: None,
            prediction_type: a.prediction_type.clone(),
            use_ema: a.use_ema,
        }
        .resolved(None)?,
        &a.out,
    )
}
