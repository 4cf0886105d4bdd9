//! The Stable Diffusion pipeline: tokenizer, text encoder, VAE, UNet and scheduler loaded
//! together, text-to-image generation with classifier-free guidance, and LoRA on/off without
//! reloading anything.

pub mod checkpoint_file;
pub mod convert_model;
pub mod generate;
pub mod infer_config;
pub mod lora;
pub mod single_file;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

pub use crate::io::{resolve_model, DEFAULT_MODEL};
pub use generate::{GenerateConfig, Images};

use crate::scheduler::SchedulerConfig;
use crate::text::{ClipTextModel, ClipTokenizer};
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;

/// How to load a pipeline.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A diffusers folder or a Hub repo id. Default [`DEFAULT_MODEL`].
    pub source: String,
    /// Weights variant (`fp16` reads `*.fp16.safetensors`). Default none.
    pub variant: Option<String>,
    /// Compute dtype. Default f32 (CPU); f16/bf16 on GPUs.
    pub dtype: DType,
    pub device: Device,
    /// Hub cache folder; default `HF_HOME` / `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Single-file checkpoints (`source` a `.safetensors` file): configs, EMA; and for any
    /// source: another VAE, the prediction type. Default: none of them.
    pub single_file: single_file::SingleFileOptions,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            source: DEFAULT_MODEL.into(),
            variant: None,
            dtype: DType::F32,
            device: Device::Cpu,
            cache_dir: None,
            single_file: Default::default(),
        }
    }
}

/// A loaded Stable Diffusion pipeline. Plain owned fields: keep it across notebook cells.
#[derive(Debug, Clone)]
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub vae: AutoencoderKL,
    pub unet: UNet2DConditionModel,
    pub scheduler_config: SchedulerConfig,
    /// The folder the pipeline was read from.
    pub root: PathBuf,
    pub device: Device,
    pub dtype: DType,
}

impl StableDiffusion {
    /// Loads from a folder or Hub id on the CPU in f32 (see [`StableDiffusion::load_with`]).
    pub fn load(source: &str) -> Result<Self> {
        Self::load_with(&LoadOptions {
            source: source.into(),
            ..Default::default()
        })
    }

    /// Loads a diffusers folder, a Hub id or a single-file checkpoint (a `.safetensors` file
    /// in the LDM layout; what it held and what was set aside is printed to stderr), with the
    /// options' VAE and prediction type.
    pub fn load_with(opts: &LoadOptions) -> Result<Self> {
        let variant = opts.variant.as_deref();
        let sf = &opts.single_file;
        let file = Path::new(&opts.source);
        if file.is_file() {
            if variant.is_some() {
                anyhow::bail!(
                    "--variant is for diffusers folders, not single files like {}",
                    file.display()
                );
            }
            let sf = sf.resolved(opts.cache_dir.as_deref())?;
            let (sd, report) = Self::from_single_file(file, &sf, opts.dtype, &opts.device)?;
            eprintln!("{report}");
            return Ok(sd);
        }
        if sf.config.is_some() || sf.use_ema {
            anyhow::bail!(
                "--config and --use-ema are for single-file checkpoints; {} is a folder or Hub id",
                opts.source
            );
        }
        let root = resolve_model(&opts.source, variant, opts.cache_dir.as_deref())?;
        let mut sd = Self::from_folder(&root, variant, opts.dtype, &opts.device)?;
        if let Some(v) = &sf.vae {
            sd.vae = single_file::load_vae(v, &sd.vae.config, opts.dtype, &opts.device)?;
        }
        if let Some(p) = &sf.prediction_type {
            single_file::check_prediction_type(p)?;
            sd.scheduler_config.prediction_type = p.clone();
        }
        Ok(sd)
    }

    /// Loads every component from a diffusers pipeline folder. On the CPU this also settles
    /// the allocator and the thread count for tensor work
    /// ([`crate::device::tune_cpu_allocator`], [`crate::device::tune_cpu_threads`]).
    pub fn from_folder(
        root: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if device.is_cpu() {
            crate::device::tune_cpu_allocator();
            crate::device::tune_cpu_threads();
        }
        let tokenizer = ClipTokenizer::from_dir(&root.join("tokenizer"))?;
        let text_encoder = ClipTextModel::load(root.join("text_encoder"), variant, dtype, device)?;
        let vae = AutoencoderKL::load(root.join("vae"), variant, dtype, device)?;
        let unet = UNet2DConditionModel::load(root.join("unet"), variant, dtype, device)?;
        let scheduler_config =
            SchedulerConfig::from_file(&root.join("scheduler").join("scheduler_config.json"))?;
        let ctx = unet.config.cross_dims()?[0];
        if ctx != text_encoder.config.hidden_size {
            anyhow::bail!(
                "{}: the UNet expects {ctx}-dim text embeddings, the text encoder gives {}",
                root.display(),
                text_encoder.config.hidden_size
            );
        }
        Ok(Self {
            tokenizer,
            text_encoder,
            vae,
            unet,
            scheduler_config,
            root: root.to_path_buf(),
            device: device.clone(),
            dtype,
        })
    }

    /// A pipeline with seeded random weights for the given configs (benchmarks, tests) and a
    /// tokenizer folder.
    pub fn random(
        unet: &crate::unet::UNetConfig,
        vae: &crate::vae::VaeConfig,
        text: &crate::text::ClipTextConfig,
        tokenizer_dir: &Path,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        use crate::weights::WeightSource;
        if device.is_cpu() {
            crate::device::tune_cpu_allocator();
            crate::device::tune_cpu_threads();
        }
        let dtype = DType::F32;
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(tokenizer_dir)?,
            text_encoder: ClipTextModel::new(text, &WeightSource::random(seed, dtype, device))?,
            vae: AutoencoderKL::new(vae, &WeightSource::random(seed + 1, dtype, device))?,
            unet: UNet2DConditionModel::new(unet, &WeightSource::random(seed + 2, dtype, device))?,
            scheduler_config: SchedulerConfig::sd_v1_5(),
            root: tokenizer_dir.to_path_buf(),
            device: device.clone(),
            dtype,
        })
    }

    /// Text embeddings `[N, 77, D]` for `prompts` (the last hidden state, as SD uses it).
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor> {
        self.encode_prompts_with(prompts, self.text_encoder.gradient_checkpointing)
    }

    /// [`Self::encode_prompts`], the text encoder gradient-checkpointed when `checkpointing`.
    pub fn encode_prompts_with(&self, prompts: &[&str], checkpointing: bool) -> Result<Tensor> {
        let ids = self.tokenizer.encode_batch(prompts, &self.device)?;
        let out = self
            .text_encoder
            .forward_with(&ids, checkpointing)
            .context("running the text encoder")?;
        Ok(out.last_hidden_state)
    }

    /// Switches gradient checkpointing of the UNet and the text encoder (diffusers'
    /// `enable_gradient_checkpointing`); see
    /// [`crate::unet::UNet2DConditionModel::gradient_checkpointing`].
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.unet.gradient_checkpointing = on;
        self.text_encoder.gradient_checkpointing = on;
    }

    /// Pixels per latent cell (8 for SD), from the VAE config.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config.downsample_factor()
    }
}
