//! `sd-lora train`: a LoRA from an image folder, into a run folder: `lora.safetensors` (kohya,
//! with `ss_*` metadata), `lora_peft.safetensors`, `checkpoints/`, `metrics.csv`, `loss.svg`,
//! `anatomy.svg`, `spectrum.svg`, `samples/`. Resumable (`--resume`), also after `kill -9`.

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use std::path::PathBuf;

use super::args::{count, learning_rate, non_negative, positive, probability, ModelArgs};
use super::args::{Resolution, SaveDType};
use crate::data::buckets::BucketConfig;
use crate::data::{CaptionSource, DataConfig, ImageFolder};
use crate::lora::{LoraConfig, LoraModel};
use crate::pipeline::{LoadOptions, StableDiffusion};
use crate::train::{checkpoint, Checkpoints, Denoising, LatentCache, LrSchedulerKind, MetricsCsv};
use crate::train::{Objective, PriorPreservation};
use crate::train::{Progress, TrainConfig, Trainer};

/// `--network`: the kind of adapter trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Network {
    /// Plain LoRA.
    Lora,
    /// Weight-decomposed LoRA.
    Dora,
    /// LoRA plus conv adapters on the resnets' and samplers' convolutions (kohya `conv_dim`).
    Locon,
}

/// `sd-lora train`. Every default is the library's ([`TrainConfig`], [`LoraConfig`],
/// [`DataConfig`]), so `--help` shows what a notebook gets too.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image folder (png, jpg, jpeg, webp).
    #[arg(long)]
    pub data: PathBuf,
    /// Run folder: lora.safetensors (kohya), lora_peft.safetensors, checkpoints/, metrics.csv.
    #[arg(long)]
    pub out: PathBuf,
    /// LoRA rank r.
    #[arg(long, default_value_t = LoraConfig::default().rank, value_parser = count)]
    pub rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank) [default: 2 x rank].
    #[arg(long, value_parser = positive, allow_negative_numbers = true)]
    pub alpha: Option<f64>,
    /// Comma-separated module targets (`to_q,to_k,to_v`; shorthands attn, ff, all).
    #[arg(long, default_value = "to_q,to_k,to_v")]
    pub targets: String,
    /// The adapter: `lora` (B·A), `dora` (B·A plus a learned magnitude per output row;
    /// LyCORIS `dora_wd`, PEFT `use_dora`) or `locon` (LoRA plus conv adapters on the
    /// resnets' and samplers' convolutions; kohya `conv_dim`).
    #[arg(long, value_enum, default_value_t = Network::Lora)]
    pub network: Network,
    /// LoCon: rank of the conv adapters (kohya `conv_dim`) [default: --rank].
    #[arg(long, value_parser = count)]
    pub conv_rank: Option<usize>,
    /// LoCon: alpha of the conv adapters (kohya `conv_alpha`) [default: 2 x conv rank].
    #[arg(long, value_parser = positive, allow_negative_numbers = true)]
    pub conv_alpha: Option<f64>,
    /// Also train LoRA on the text encoder (captions are then encoded at every step).
    #[arg(long)]
    pub train_text_encoder: bool,
    /// Text-encoder modules to adapt with --train-text-encoder (comma-separated suffixes).
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,out_proj,fc1,fc2",
        requires = "train_text_encoder"
    )]
    pub text_encoder_targets: String,
    /// The text encoder's learning rate [default: --lr].
    #[arg(long, value_parser = learning_rate, allow_negative_numbers = true, requires = "train_text_encoder")]
    pub text_encoder_lr: Option<f64>,
    /// The UNet's learning rate [default: --lr].
    #[arg(long, value_parser = learning_rate, allow_negative_numbers = true)]
    pub unet_lr: Option<f64>,
    /// Passes over the data set.
    #[arg(long, default_value_t = TrainConfig::default().epochs, value_parser = count)]
    pub epochs: usize,
    /// Train this many optimizer steps instead of --epochs.
    #[arg(long, value_parser = count)]
    pub max_steps: Option<usize>,
    /// Images per micro-batch.
    #[arg(long, default_value_t = TrainConfig::default().batch_size, value_parser = count)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradients averaged).
    #[arg(long, default_value_t = TrainConfig::default().grad_accum, value_parser = count)]
    pub grad_accum: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = TrainConfig::default().lr, value_parser = learning_rate, allow_negative_numbers = true)]
    pub lr: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = TrainConfig::default().weight_decay, value_parser = non_negative, allow_negative_numbers = true)]
    pub weight_decay: f64,
    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value_t = LrSchedulerKind::of(&TrainConfig::default().schedule))]
    pub lr_scheduler: LrSchedulerKind,
    /// Linear warm-up over this many optimizer steps.
    #[arg(long, default_value_t = TrainConfig::default().warmup_steps)]
    pub warmup_steps: usize,
    /// Training resolution in pixels: `512` (square) or `WIDTHxHEIGHT` (multiples of 8).
    #[arg(long, default_value = "512")]
    pub resolution: Resolution,
    /// Also read images in sub-folders.
    #[arg(long)]
    pub recursive: bool,
    /// Extension of caption sidecars for `--caption sidecar` (kohya uses `.caption`).
    #[arg(long, default_value = ".txt")]
    pub caption_extension: String,
    /// Shuffle each caption's comma-separated tags at every step (captions are then encoded
    /// every step).
    #[arg(long)]
    pub shuffle_caption: bool,
    /// Leading tags that shuffling and tag dropout leave in place (e.g. a trigger word).
    #[arg(long, default_value_t = 0)]
    pub keep_tokens: usize,
    /// Drop each (not kept) tag with this probability at every step.
    #[arg(long, default_value_t = 0.0, value_parser = probability, allow_negative_numbers = true)]
    pub caption_tag_dropout: f64,
    /// Aspect-ratio buckets (kohya's): each image trains at the bucket of its aspect ratio
    /// (area <= the resolution's), each batch from one bucket.
    #[arg(long)]
    pub enable_bucket: bool,
    /// Smallest bucket side in pixels.
    #[arg(long, default_value_t = BucketConfig::default().min_reso, value_parser = count, requires = "enable_bucket")]
    pub min_bucket_reso: usize,
    /// Largest bucket side in pixels.
    #[arg(long, default_value_t = BucketConfig::default().max_reso, value_parser = count, requires = "enable_bucket")]
    pub max_bucket_reso: usize,
    /// Bucket sides are multiples of this (a multiple of 8).
    #[arg(long, default_value_t = BucketConfig::default().steps, value_parser = count, requires = "enable_bucket")]
    pub bucket_reso_steps: usize,
    /// Never enlarge images: buckets come from each image's own size.
    #[arg(long, requires = "enable_bucket")]
    pub bucket_no_upscale: bool,
    /// Captions: `empty`, `sidecar` (`<image>.txt`), `sidecar:FALLBACK` (the text for images
    /// without one), or any other text as the caption of every image.
    #[arg(long, default_value = "empty", value_parser = caption_source)]
    pub caption: CaptionSource,
    /// Seed of the LoRA initialisation, shuffling, noise and timesteps.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,
    /// Checkpoint every N optimizer steps (and always at the end) [default: only at the end].
    #[arg(long, value_parser = count)]
    pub save_every: Option<usize>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Do not train on horizontally flipped copies (flips are on by default, p = 0.5).
    #[arg(long)]
    pub no_flip: bool,
    /// Skip unreadable images with a warning instead of stopping.
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is common) [default: off].
    #[arg(long, value_parser = positive, allow_negative_numbers = true)]
    pub min_snr_gamma: Option<f64>,
    /// Noise offset: adds offset x N(0, 1) per sample and channel to the noise.
    #[arg(long, default_value_t = TrainConfig::default().noise_offset, value_parser = non_negative, allow_negative_numbers = true)]
    pub noise_offset: f64,
    /// Train this fraction of examples on the empty caption (teaches the unconditional
    /// prediction that guidance uses; 0.1 is common for training from scratch).
    #[arg(long, default_value_t = TrainConfig::default().caption_dropout, value_parser = probability, allow_negative_numbers = true)]
    pub caption_dropout: f64,
    /// Write sample images to RUN_DIR/samples every N optimizer steps (and at the end).
    #[arg(long, value_parser = count, requires = "sample_prompt")]
    pub sample_every: Option<usize>,
    /// Prompt for the samples; repeat for several (each gets its own fixed seed).
    #[arg(long, requires = "sample_every")]
    pub sample_prompt: Vec<String>,
    /// Denoising steps per sample.
    #[arg(long, default_value_t = 20, value_parser = count, requires = "sample_every")]
    pub sample_steps: usize,
    /// Precision of the saved LoRA files.
    #[arg(long, value_enum, default_value_t = SaveDType::F32)]
    pub save_dtype: SaveDType,
    /// Do not keep the VAE latents / text embeddings in RUN_DIR/cache.
    #[arg(long)]
    pub no_disk_cache: bool,
    /// Recompute the UNet's blocks (and the text encoder's layers) during backward instead of
    /// keeping their activations: less memory, one more forward pass per step.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    #[command(flatten)]
    pub dreambooth: super::train_dreambooth::DreamBoothArgs,
}

fn caption_source(s: &str) -> Result<CaptionSource, std::convert::Infallible> {
    Ok(CaptionSource::parse(s))
}

/// Everything `sd-lora train` needs, as library configs (what a notebook would build).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub model: String,
    pub variant: Option<String>,
    /// Single-file checkpoints, another VAE, the prediction type.
    pub single_file: crate::pipeline::single_file::SingleFileOptions,
    /// Where to train, and the dtype of the frozen weights (LoRA and optimizer state are f32).
    pub device: Device,
    pub dtype: DType,
    pub data: PathBuf,
    pub out: PathBuf,
    pub lora: LoraConfig,
    /// The text encoder's LoRA when it trains (`train.train_text_encoder`).
    pub text_encoder_lora: Option<LoraConfig>,
    pub data_config: DataConfig,
    pub train: TrainConfig,
    /// Checkpoint every N optimizer steps (and always at the end).
    pub save_every: Option<usize>,
    pub resume: bool,
    /// Sample images during training (None = off).
    pub samples: Option<SampleOptions>,
    /// Precision of the LoRA files (F32, F16 or BF16).
    pub save_dtype: DType,
    /// Keep latents and text embeddings in `RUN_DIR/cache/` for the next run.
    pub disk_cache: bool,
    /// DreamBooth prior preservation: class images and the prior loss's weight (None = off).
    pub prior: Option<super::train_dreambooth::PriorOptions>,
}

/// Samples during training: every `every` optimizer steps and at the end, one image per prompt
/// (seed = its index, so the same prompt always starts from the same noise), DDIM, guidance
/// 7.5, at the training resolution, to `RUN_DIR/samples/step-NNNNNN-<prompt index>.png`.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub every: usize,
    pub prompts: Vec<String>,
    /// Denoising steps per sample. CLI default 20.
    pub steps: usize,
}

impl TrainArgs {
    /// The library configs these flags describe (opens the device).
    pub fn options(&self) -> Result<TrainOptions> {
        let (device, dtype) = self.model.resolve()?;
        let alpha = self.alpha.unwrap_or(LoraConfig::default_alpha(self.rank));
        if self.network != Network::Locon && (self.conv_rank.is_some() || self.conv_alpha.is_some())
        {
            anyhow::bail!("--conv-rank/--conv-alpha need --network locon");
        }
        let mut lora = LoraConfig::new(self.rank, alpha)
            .with_targets(&LoraConfig::parse_targets(&self.targets))
            .with_seed(self.seed)
            .with_dora(self.network == Network::Dora);
        if self.network == Network::Locon {
            lora = lora.with_conv(self.conv_rank.unwrap_or(self.rank), self.conv_alpha);
        }
        let text_encoder_lora = self
            .train_text_encoder
            .then(|| lora.for_text_encoder(&LoraConfig::parse_targets(&self.text_encoder_targets)));
        Ok(TrainOptions {
            model: self.model.model.clone(),
            variant: self.model.variant.clone(),
            single_file: self.model.single_file(),
            device,
            dtype,
            data: self.data.clone(),
            out: self.out.clone(),
            lora,
            text_encoder_lora,
            data_config: DataConfig {
                width: self.resolution.width,
                height: self.resolution.height,
                flip: !self.no_flip,
                captions: self.dreambooth.captions().unwrap_or(self.caption.clone()),
                recursive: self.recursive,
                skip_bad_images: self.skip_bad_images,
                caption_extension: self.caption_extension.clone(),
                buckets: self.enable_bucket.then_some(BucketConfig {
                    resolution: (self.resolution.width, self.resolution.height),
                    min_reso: self.min_bucket_reso,
                    max_reso: self.max_bucket_reso,
                    steps: self.bucket_reso_steps,
                    no_upscale: self.bucket_no_upscale,
                }),
            },
            train: TrainConfig {
                lr: self.unet_lr.unwrap_or(self.lr),
                train_text_encoder: self.train_text_encoder,
                text_encoder_lr: self
                    .train_text_encoder
                    .then_some(self.text_encoder_lr.unwrap_or(self.lr)),
                weight_decay: self.weight_decay,
                epochs: self.epochs,
                max_steps: self.max_steps,
                batch_size: self.batch_size,
                grad_accum: self.grad_accum,
                schedule: self.lr_scheduler.schedule(),
                warmup_steps: self.warmup_steps,
                min_snr_gamma: self.min_snr_gamma,
                noise_offset: self.noise_offset,
                caption_dropout: self.caption_dropout,
                shuffle_caption: self.shuffle_caption,
                keep_tokens: self.keep_tokens,
                caption_tag_dropout: self.caption_tag_dropout,
                gradient_checkpointing: self.gradient_checkpointing,
                seed: self.seed,
                ..Default::default()
            },
            save_every: self.save_every,
            resume: self.resume,
            samples: self.sample_every.map(|every| SampleOptions {
                every,
                prompts: self.sample_prompt.clone(),
                steps: self.sample_steps,
            }),
            save_dtype: self.save_dtype.into(),
            disk_cache: !self.no_disk_cache,
            prior: self
                .dreambooth
                .prior(self.resolution.width, self.resolution.height, self.seed),
        })
    }
}

/// Trains a LoRA and writes the run folder. Returns a one-line summary.
pub fn train(opts: &TrainOptions) -> Result<String> {
    if let Some(s) = &opts.samples {
        anyhow::ensure!(
            !s.prompts.is_empty() && s.every > 0,
            "--sample-every needs N >= 1 and at least one --sample-prompt"
        );
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create run folder {}", opts.out.display()))?;
    let data = load_data(opts)?;
    let mut sd = StableDiffusion::load_with(&LoadOptions {
        source: opts.model.clone(),
        variant: opts.variant.clone(),
        dtype: opts.dtype,
        device: opts.device.clone(),
        cache_dir: None,
        single_file: opts.single_file.clone(),
    })?;
    // class images come from the base model, before any LoRA
    let class = super::train_dreambooth::class_data(opts, &sd)?;
    eprintln!("{}", sd.unet.inject_lora(&opts.lora, &VarMap::new())?);
    if let Some(te) = &opts.text_encoder_lora {
        anyhow::ensure!(
            opts.train.train_text_encoder,
            "a text-encoder LoRA config is given but train.train_text_encoder is off"
        );
        let s = sd.text_encoder.inject_lora(te, &VarMap::new())?;
        eprintln!("text encoder:\n{s}");
    } else {
        anyhow::ensure!(
            !opts.train.train_text_encoder,
            "train.train_text_encoder is on but no text-encoder LoRA config is given"
        );
    }
    match super::estimate::train_estimate(opts, &sd) {
        Ok(line) => eprintln!("{line}"),
        Err(e) => eprintln!("warning: no memory estimate: {e:#}"),
    }
    let cache = build_cache(opts, &sd, &data, "")?;
    let class_cache = match &class {
        Some(c) => Some(build_cache(opts, &sd, c, "class images' ")?),
        None => None,
    };
    let mut trainer = Trainer::new(&sd, opts.train.clone())?;
    if let Some(s) = &trainer.scaler {
        eprintln!(
            "f16: dynamic loss scaling from {} (x{} after {} clean steps, x{} and the step skipped on overflow)",
            s.scale, s.growth_factor, s.growth_interval, s.backoff_factor
        );
    }
    let ckpt_dir = opts.out.join("checkpoints");
    if opts.resume {
        resume(opts, &mut trainer, &ckpt_dir)?;
    }
    let denoising = Denoising::new(&sd, &cache, &trainer.config)?;
    let objective: Box<dyn Objective> = match (&class_cache, &opts.prior) {
        (Some(cc), Some(p)) => Box::new(PriorPreservation {
            instance: denoising,
            class: cc,
            prior_loss_weight: p.prior_loss_weight,
        }),
        _ => Box::new(denoising),
    };
    let total = trainer.total_steps(objective.as_ref());
    if let Some(b) = super::train_outputs::bucket_info(opts, &data) {
        eprintln!("{}", b.0);
    }
    let mut checkpoints = Checkpoints::new(ckpt_dir, opts.save_every.unwrap_or(total.max(1)));
    let mut metrics = MetricsCsv::create(opts.out.join("metrics.csv"), &trainer.history)?;
    let mut samples = super::train_outputs::Samples { opts, sd: &sd };
    if trainer.step == 0 {
        samples.write(0).context("writing the step-0 samples")?;
    }
    let mut progress = Progress::stderr("");
    trainer.run(
        objective.as_ref(),
        &mut [&mut metrics, &mut progress, &mut samples, &mut checkpoints],
    )?;
    let outputs = super::train_outputs::RunData {
        data: &data,
        class: class.as_ref(),
    };
    super::train_outputs::write_outputs(opts, &sd, &trainer, &outputs, total)?;
    let last = trainer.history.last().map_or(f64::NAN, |r| r.loss);
    if let Some(s) = trainer.scaler.filter(|s| s.skipped > 0) {
        eprintln!(
            "f16 loss scaling: {} steps skipped for gradient overflow; scale now {}",
            s.skipped, s.scale
        );
    }
    Ok(format!(
        "trained {} steps on {} images{}; last loss {last:.4}; wrote {}/lora.safetensors and lora_peft.safetensors",
        trainer.step,
        data.len(),
        class
            .as_ref()
            .map_or(String::new(), |c| format!(" and {} class images", c.len())),
        opts.out.display()
    ))
}

fn load_data(opts: &TrainOptions) -> Result<ImageFolder> {
    let data = ImageFolder::load(&opts.data, &opts.data_config)?;
    for w in &data.warnings {
        eprintln!("warning: {w}");
    }
    if data.len() < opts.train.batch_size {
        eprintln!(
            "warning: {} images for a batch size of {}: every batch is the whole (smaller) set",
            data.len(),
            opts.train.batch_size
        );
    }
    Ok(data)
}

fn build_cache(
    opts: &TrainOptions,
    sd: &StableDiffusion,
    data: &ImageFolder,
    label: &str,
) -> Result<LatentCache> {
    let (w, h) = (opts.data_config.width, opts.data_config.height);
    let file = opts.out.join(format!("cache/latents-{w}x{h}.safetensors"));
    let on_disk = opts.disk_cache.then_some(file.as_path());
    let (cache, stats) = LatentCache::build_cached(sd, data, opts.data_config.flip, on_disk)?;
    for w in &stats.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "{label}latent cache: {} images encoded, {} from {}, {} captions encoded",
        stats.images_encoded,
        stats.images_reused,
        if opts.disk_cache {
            file.display().to_string()
        } else {
            "disk (off)".into()
        },
        stats.texts_encoded
    );
    if opts.train.train_text_encoder && label.is_empty() {
        eprintln!("the text encoder trains: captions are encoded at every step (the cached embeddings are not used)");
    }
    Ok(cache)
}

/// Continues from the newest checkpoint (after clearing what killed writes left behind).
fn resume(opts: &TrainOptions, trainer: &mut Trainer, ckpt_dir: &std::path::Path) -> Result<()> {
    for d in [&opts.out, ckpt_dir, &opts.out.join("cache")] {
        checkpoint::remove_stale_temp_files(d)?;
    }
    match checkpoint::latest(ckpt_dir)? {
        Some(p) => {
            trainer.load_checkpoint(&p)?;
            // the command line may extend the run
            trainer.config.max_steps = opts.train.max_steps.or(trainer.config.max_steps);
            trainer.config.epochs = opts.train.epochs;
            eprintln!("resumed from {} (step {})", p.display(), trainer.step);
        }
        None => eprintln!("no checkpoint in {}: starting fresh", ckpt_dir.display()),
    }
    Ok(())
}
