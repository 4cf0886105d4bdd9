//! Command-line pieces shared by several subcommands: the model quartet ([`ModelArgs`]), closed
//! sets as `ValueEnum`s, and value parsers that refuse out-of-range numbers with the range.

use anyhow::Result;
use candle_core::{DType, Device};
use std::path::PathBuf;

pub use crate::device::{ComputeDType, DeviceSpec};

/// Which model, in which precision, where. Flattened into `generate`, `train`, `unet-forward`
/// and `bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// `sd15` (Stable Diffusion 1.5 from the Hugging Face cache), `tiny` (the embedded model),
    /// a diffusers folder, a Hugging Face repo id (owner/name), or a single-file checkpoint
    /// (`.safetensors` in the A1111/LDM layout, SD 1.x or 2.x).
    #[arg(long, default_value = "sd15")]
    pub model: String,
    /// Weights variant, e.g. `fp16` reads `*.fp16.safetensors`.
    #[arg(long)]
    pub variant: Option<String>,
    /// Compute dtype of the frozen weights and activations (auto = f32 on the CPU, bf16 on
    /// GPUs). LoRA weights, optimizer state and the loss are f32 always.
    #[arg(long, value_enum, default_value_t = ComputeDType::Auto)]
    pub dtype: ComputeDType,
    /// Where to run: cpu, cuda, cuda:N, or auto (the GPU when this build has CUDA and there is
    /// one).
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Single-file --model: a diffusers folder or Hub id whose configs, tokenizer and
    /// scheduler to use [default: inferred from the file's shapes, built-in tokenizer].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Another VAE: a diffusers folder or a .safetensors file (LDM or diffusers keys).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// What the UNet predicts (weights cannot tell) [default: the config's; single SD 2.x
    /// files without --config: v_prediction].
    #[arg(long, value_parser = ["epsilon", "v_prediction"])]
    pub prediction_type: Option<String>,
    /// Single-file --model: read the UNet from the file's EMA copy (`model_ema.*`).
    #[arg(long)]
    pub use_ema: bool,
}

impl ModelArgs {
    /// The single-file / VAE / prediction-type options these flags give.
    pub fn single_file(&self) -> crate::pipeline::single_file::SingleFileOptions {
        crate::pipeline::single_file::SingleFileOptions {
            config: self.config.clone(),
            vae: self.vae.clone(),
            prediction_type: self.prediction_type.clone(),
            use_ema: self.use_ema,
        }
    }

    /// Refuses flags that `command` would not use (it reads `allowed` of --config, --vae,
    /// --prediction-type, --use-ema), naming them.
    pub fn refuse_unused(&self, command: &str, allowed: &[&str]) -> Result<()> {
        let given = [
            ("--config", self.config.is_some()),
            ("--vae", self.vae.is_some()),
            ("--prediction-type", self.prediction_type.is_some()),
            ("--use-ema", self.use_ema),
        ];
        let bad: Vec<&str> = given
            .iter()
            .filter(|(f, on)| *on && !allowed.contains(f))
            .map(|(f, _)| *f)
            .collect();
        if !bad.is_empty() {
            anyhow::bail!("{} has no effect on `{command}`", bad.join(", "));
        }
        Ok(())
    }

    /// Opens the device and settles the dtype (bf16 is refused on the CPU).
    pub fn resolve(&self) -> Result<(Device, DType)> {
        let device = self.device.open()?;
        let dtype = self.dtype.resolve(&device)?;
        Ok((device, dtype))
    }
}

impl Default for ModelArgs {
    fn default() -> Self {
        Self {
            model: "sd15".into(),
            variant: None,
            dtype: ComputeDType::Auto,
            device: DeviceSpec::Auto,
            config: None,
            vae: None,
            prediction_type: None,
            use_ema: false,
        }
    }
}

/// A model's structure only (no weights): what LoRA module names resolve against.
#[derive(Debug, Clone, clap::Args)]
pub struct StructureArgs {
    /// Model structure: `sd15`, `tiny`, a diffusers folder (pipeline root or its unet/), a
    /// UNet `config.json`, or a single-file checkpoint (structure inferred from its shapes).
    #[arg(long, default_value = "sd15")]
    pub model: String,
    /// With a single-file --model: a diffusers folder (or cached repo id) whose configs
    /// describe it, instead of inferring them from its shapes.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// A LoRA file matched against a `--model` structure (see [`StructureArgs::match_file`]).
pub struct MatchedFile {
    pub unet_index: crate::lora::ModuleIndex,
    pub te_index: crate::lora::ModuleIndex,
    /// Every match, shapes checked, before any judgement.
    pub matching: crate::lora::apply::Matching,
}

impl StructureArgs {
    /// Matches `file` against [`StructureArgs::models`], shapes included.
    pub fn match_file(&self, file: &crate::lora::LoraFile) -> anyhow::Result<MatchedFile> {
        use crate::lora::LoraModel;
        let (unet, te) = self.models()?;
        let (ui, ti) = (unet.module_index()?, te.module_index()?);
        let matching = crate::lora::apply::match_entries(file, &[&ui, &ti])?;
        Ok(MatchedFile {
            unet_index: ui,
            te_index: ti,
            matching,
        })
    }

    /// The UNet and the text encoder of `--model`, structure only (no weights read): the text
    /// encoder's from `text_encoder/config.json` in a pipeline folder, else tiny's for `tiny`
    /// and SD 1.5's otherwise.
    pub fn models(
        &self,
    ) -> anyhow::Result<(
        crate::unet::UNet2DConditionModel,
        crate::text::ClipTextModel,
    )> {
        use crate::text::ClipTextModel;
        let (ucfg, cfg) =
            crate::pipeline::single_file::structure_configs(&self.model, self.config.as_deref())?;
        let unet = crate::unet::UNet2DConditionModel::meta(&ucfg)?;
        let te = ClipTextModel::new(
            &cfg,
            &crate::weights::WeightSource::meta(candle_core::DType::F32),
        )?;
        Ok((unet, te))
    }
}

/// `--save-dtype`: the precision of written LoRA files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaveDType {
    #[value(alias = "fp32")]
    F32,
    /// Half the size; what most shared SD 1.5 LoRAs use.
    #[value(alias = "fp16")]
    F16,
    Bf16,
}

impl From<SaveDType> for DType {
    fn from(d: SaveDType) -> DType {
        match d {
            SaveDType::F32 => DType::F32,
            SaveDType::F16 => DType::F16,
            SaveDType::Bf16 => DType::BF16,
        }
    }
}

/// `--resolution`: `512` (square) or `WIDTHxHEIGHT`, multiples of 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    pub width: usize,
    pub height: usize,
}

impl std::str::FromStr for Resolution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |v: &str| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0 && n.is_multiple_of(8))
                .ok_or_else(|| format!("`{s}`: expected a multiple of 8 such as 512 or 640x480"))
        };
        let (width, height) = match s.split_once(['x', 'X']) {
            Some((w, h)) => (parse(w)?, parse(h)?),
            None => parse(s).map(|n| (n, n))?,
        };
        Ok(Self { width, height })
    }
}

impl std::fmt::Display for Resolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.width == self.height {
            write!(f, "{}", self.width)
        } else {
            write!(f, "{}x{}", self.width, self.height)
        }
    }
}

/// A count of at least 1 (`--rank`, `--batch-size`, `--steps`, ...).
pub fn count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}`: expected a whole number, at least 1")),
    }
}

/// A learning rate: a finite number > 0.
pub fn learning_rate(s: &str) -> Result<f64, String> {
    positive(s).map_err(|_| format!("`{s}`: the learning rate must be a number > 0"))
}

/// A finite number > 0 (learning rates).
pub fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{s}`: expected a number > 0")),
    }
}

/// A finite number >= 0 (weight decay, noise offset, min-SNR gamma).
pub fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("`{s}`: expected a number >= 0")),
    }
}

/// A probability in [0, 1) (caption dropout).
pub fn probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}`: expected a probability in [0, 1)")),
    }
}

/// Any finite number (LoRA strengths may be negative or above 1).
pub fn finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("`{s}`: expected a finite number")),
    }
}
