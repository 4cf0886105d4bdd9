//! `sd-lora generate`: text to image with a pipeline, optionally with stacked LoRA files, a
//! strength sweep in one grid, or merged LoRA weights.

use anyhow::{bail, Context, Result};
use candle_core::DType;
use std::path::PathBuf;

use super::args::{count, finite, ModelArgs};
use crate::lora::{LoraFile, LoraLoad, LoraModel};
use crate::pipeline::{GenerateConfig, LoadOptions, StableDiffusion};
use crate::scheduler::SchedulerKind;

/// `sd-lora generate`. Defaults are [`GenerateConfig::default`]'s.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to draw.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from ("" = unconditional, diffusers' default).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Denoising steps.
    #[arg(long, default_value_t = GenerateConfig::default().steps, value_parser = count)]
    pub steps: usize,
    /// Classifier-free guidance scale (<= 1 disables guidance).
    #[arg(long, default_value_t = GenerateConfig::default().guidance, value_parser = finite, allow_negative_numbers = true)]
    pub guidance: f64,
    /// Sampler.
    #[arg(long, value_enum, default_value_t = GenerateConfig::default().scheduler)]
    pub scheduler: SchedulerKind,
    /// Seeds the initial latents and the samplers' noise.
    #[arg(long, default_value_t = GenerateConfig::default().seed)]
    pub seed: u64,
    /// Image width in pixels (a multiple of the VAE factor, 8 for SD).
    #[arg(long, default_value_t = GenerateConfig::default().width, value_parser = count)]
    pub width: usize,
    /// Image height in pixels (a multiple of the VAE factor, 8 for SD).
    #[arg(long, default_value_t = GenerateConfig::default().height, value_parser = count)]
    pub height: usize,
    /// Images per prompt.
    #[arg(long, default_value_t = GenerateConfig::default().num_images, value_parser = count)]
    pub num_images: usize,
    /// A LoRA file (kohya/LyCORIS LoRA, LoCon, LoHa, LoKr, DoRA, full; PEFT/diffusers; A1111
    /// names), UNet and text-encoder parts; repeat to stack several.
    #[arg(long)]
    pub lora: Vec<PathBuf>,
    /// Load the tensors of each --lora that match and warn about the rest (unknown keys,
    /// modules this model lacks) instead of refusing the file.
    #[arg(long)]
    pub allow_partial_lora: bool,
    /// Strength of each --lora in order (0 = off; missing ones are 1.0).
    #[arg(long, value_parser = finite, allow_negative_numbers = true)]
    pub lora_scale: Vec<f64>,
    /// Comma-separated strengths (e.g. 0,0.5,1): renders the same seeds at each strength of the
    /// LoRA(s) and writes one grid to --out (a row per strength, a column per image).
    #[arg(long, value_delimiter = ',', value_parser = finite, allow_negative_numbers = true)]
    pub strengths: Vec<f64>,
    /// Fold the LoRA(s) into the weights (faster sampling).
    #[arg(long)]
    pub merge: bool,
    /// safetensors with tensor `latents` [N, 4, H/f, W/f] used instead of seeded noise.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Output PNG; several images become `<stem>-0.png`, `<stem>-1.png`, ...
    #[arg(long)]
    pub out: PathBuf,
}

impl GenerateArgs {
    /// The generation settings these flags describe (latents not read yet).
    pub fn config(&self) -> GenerateConfig {
        GenerateConfig {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler,
            seed: self.seed,
            width: self.width,
            height: self.height,
            num_images: self.num_images,
            latents: None,
        }
    }
}

/// Loads the pipeline (and LoRAs), generates, writes PNGs; returns the paths written.
pub fn generate(a: &GenerateArgs) -> Result<Vec<PathBuf>> {
    let (device, dtype) = a.model.resolve()?;
    if a.lora_scale.len() > a.lora.len() {
        bail!(
            "{} --lora-scale values for {} --lora files",
            a.lora_scale.len(),
            a.lora.len()
        );
    }
    if !a.strengths.is_empty() {
        if a.lora.is_empty() {
            bail!("--strengths compares LoRA strengths: give at least one --lora");
        }
        if a.merge {
            bail!(
                "--strengths and --merge exclude each other (merged weights have a fixed strength)"
            );
        }
    }
    let mut cfg = a.config();
    if let Some(p) = &a.latents {
        let t = candle_core::safetensors::load(p, &device)
            .with_context(|| format!("cannot read latents {}", p.display()))?;
        let l = t
            .get("latents")
            .with_context(|| format!("{} has no tensor `latents`", p.display()))?
            .to_dtype(DType::F32)?;
        let n = l
            .dim(0)
            .with_context(|| format!("`latents` in {} must be [N, C, h, w]", p.display()))?;
        if a.num_images != 1 && a.num_images != n {
            bail!(
                "--num-images {} but {} holds latents for {n} images",
                a.num_images,
                p.display()
            );
        }
        cfg.num_images = n;
        cfg.latents = Some(l);
    }
    let mut sd = StableDiffusion::load_with(&LoadOptions {
        source: a.model.model.clone(),
        variant: a.model.variant.clone(),
        dtype,
        device,
        cache_dir: None,
        single_file: a.model.single_file(),
    })?;
    for (i, path) in a.lora.iter().enumerate() {
        let file = LoraFile::open(path)?;
        let adapter = if i == 0 {
            crate::lora::DEFAULT_ADAPTER.to_string()
        } else {
            format!("lora{i}")
        };
        let opts = LoraLoad::named(&adapter)
            .with_strength(a.lora_scale.get(i).copied().unwrap_or(1.0))
            .partial(a.allow_partial_lora);
        let applied = sd.load_lora_file(&file, &opts)?;
        eprintln!("{}: {applied}", path.display());
    }
    if !a.strengths.is_empty() {
        let rows = sd.generate_at_strengths(&cfg, &a.strengths)?;
        let images: Vec<Vec<image::RgbImage>> = rows.into_iter().map(|r| r.images).collect();
        let row_labels: Vec<String> = a
            .strengths
            .iter()
            .map(|s| format!("strength {s}"))
            .collect();
        let col_labels: Vec<String> = (0..cfg.num_images)
            .map(|i| format!("image {i} (seed {})", cfg.seed))
            .collect();
        let title = format!("{:?}", cfg.prompt);
        crate::plot::labelled_grid(&images, &row_labels, &col_labels, Some(&title))?
            .save(&a.out)?;
        eprintln!(
            "grid rows = LoRA strengths {:?}, columns = images",
            a.strengths
        );
        return Ok(vec![a.out.clone()]);
    }
    if a.merge {
        if a.lora.is_empty() {
            eprintln!("warning: --merge without --lora: nothing to merge");
        } else {
            sd.unet.merge_lora()?;
        }
    }
    let started = std::time::Instant::now();
    let images = sd.generate_with_progress(&cfg, &mut |i, n| {
        eprint!(
            "\rdenoising {i}/{n} ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        if i == n {
            eprintln!();
        }
    })?;
    images.save(&a.out)
}
