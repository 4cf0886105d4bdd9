//! `sd-lora bench`: the time of one LoRA training step (forward, MSE, backward, AdamW) or of one
//! 20-step generation, median / min / max after warm-up, and the process's peak resident memory.
//! Weights are random (seeded) unless a full pipeline folder is given: timings do not depend on
//! values. The peers in `benches/peer/` run the same workloads in diffusers + PEFT.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand_chacha::ChaCha12Rng;
use std::time::Instant;

use super::args::{count, ModelArgs};
use crate::device::peak_rss_mib;
use crate::lora::{LoraConfig, LoraModel, TEXT_INJECTABLE};
use crate::pipeline::{GenerateConfig, StableDiffusion};
use crate::text::{ClipTextConfig, ClipTextModel};
use crate::train::{Objective, TrainConfig, Trainer};
use crate::unet::{UNet2DConditionModel, UNetConfig};

/// What `sd-lora bench` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchKind {
    /// One LoRA training step (forward, MSE, backward, clipping, AdamW) through the engine.
    Train,
    /// A 20-step text-to-image generation with guidance, text encoding and VAE decoding.
    Generate,
    /// Reading and applying --lora to the UNet and text encoder (every adapter's weight
    /// rebuilt), then removing it.
    LoraLoad,
}

/// `sd-lora bench`.
#[derive(Debug, Clone, clap::Args)]
#[command(mut_arg("model", |a| a.default_value("tiny")
    .help("tiny, sd15, a UNet config.json or a diffusers folder (random weights unless a full pipeline folder for `generate`)")))]
pub struct BenchArgs {
    /// What to time.
    #[arg(value_enum)]
    pub what: BenchKind,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Latent side; pixels = latent x the VAE factor.
    #[arg(long, default_value_t = BenchConfig::default().latent, value_parser = count)]
    pub latent: usize,
    /// Images per step.
    #[arg(long, default_value_t = BenchConfig::default().batch, value_parser = count)]
    pub batch: usize,
    /// Timed steps after one warm-up.
    #[arg(long, default_value_t = BenchConfig::default().steps, value_parser = count)]
    pub steps: usize,
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    /// The LoRA file `lora-load` applies (any layout and kind).
    #[arg(long)]
    pub lora: Option<std::path::PathBuf>,
    /// `train`: DoRA adapters instead of plain LoRA (`sd-lora train --network dora`).
    #[arg(long)]
    pub dora: bool,
    /// `train`: LoCon, conv adapters of this rank (alpha 2 x rank) on the resnets' and
    /// samplers' convolutions next to the q/k/v ones (`sd-lora train --network locon`).
    #[arg(long, value_parser = count)]
    pub conv_rank: Option<usize>,
    /// `train`: also train LoRA on a random text encoder of the model's size (`tiny` or SD
    /// 1.5's CLIP), run on 77 fixed token ids each step (`sd-lora train --train-text-encoder`).
    #[arg(long)]
    pub train_text_encoder: bool,
    /// `train`: gradient checkpointing (resnets, transformer blocks and text-encoder layers
    /// recomputed during backward; `sd-lora train --gradient-checkpointing`).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Attention score bytes materialised at once, MiB (default 4 on the CPU, 256 on GPUs;
    /// larger layers run in query chunks). A huge value keeps every score matrix whole.
    #[arg(long, value_parser = count)]
    pub attention_chunk_mib: Option<usize>,
    /// Use the reference attention on the CPU (whole score matrices, or chunks of candle
    /// ops) instead of the fused kernel, to compare them.
    #[arg(long)]
    pub reference_attention: bool,
}

/// Runs the benchmark `a` describes (sets the attention chunk size first when given).
pub fn bench(a: &BenchArgs) -> Result<BenchReport> {
    if let Some(mib) = a.attention_chunk_mib {
        crate::ops::set_attention_chunk_bytes(mib.saturating_mul(1 << 20));
    }
    if a.reference_attention {
        crate::ops::set_fused_attention(false);
    }
    a.model.refuse_unused("bench", &[])?;
    let (device, dtype) = a.model.resolve()?;
    let cfg = BenchConfig {
        model: a.model.model.clone(),
        latent: a.latent,
        batch: a.batch,
        steps: a.steps,
        warmup: 1,
        device,
        dtype,
        variant: a.model.variant.clone(),
        dora: a.dora,
        conv_rank: a.conv_rank,
        train_text_encoder: a.train_text_encoder,
        gradient_checkpointing: a.gradient_checkpointing,
    };
    let train_only = a.dora || a.conv_rank.is_some() || a.train_text_encoder;
    if (train_only || a.gradient_checkpointing) && a.what != BenchKind::Train {
        bail!("--dora, --conv-rank, --train-text-encoder and --gradient-checkpointing are for `bench train`");
    }
    match (a.what, &a.lora) {
        (BenchKind::Train, None) => bench_train(&cfg),
        (BenchKind::Generate, None) => bench_generate(&cfg),
        (BenchKind::LoraLoad, Some(f)) => bench_lora_load(&cfg, f),
        (BenchKind::LoraLoad, None) => bail!("bench lora-load needs --lora FILE"),
        (k, Some(_)) => bail!("--lora is for `bench lora-load`, not {k:?}"),
    }
}

/// What to measure. CLI defaults: 32x32 latents, batch 1, 5 timed steps after 1 warm-up.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// `tiny` or `sd15` (random weights), a diffusers UNet `config.json` or a folder with
    /// `unet/config.json` (random weights); for `generate`, a full pipeline folder is loaded.
    pub model: String,
    /// Latent side (pixels = latent x VAE factor).
    pub latent: usize,
    pub batch: usize,
    /// Timed repetitions.
    pub steps: usize,
    pub warmup: usize,
    /// Default CPU.
    pub device: Device,
    /// Frozen weights and activations; LoRA, optimizer state and loss stay f32. Default f32.
    pub dtype: DType,
    /// Weights variant of a pipeline folder (`generate` only; the training step uses random
    /// weights). Default none.
    pub variant: Option<String>,
    /// `train`: DoRA adapters (a magnitude per output row) instead of plain LoRA. Default false.
    pub dora: bool,
    /// `train`: LoCon conv adapters of this rank. Default None.
    pub conv_rank: Option<usize>,
    /// `train`: also train a text-encoder LoRA. Default false.
    pub train_text_encoder: bool,
    /// `train`: gradient checkpointing. Default false.
    pub gradient_checkpointing: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            model: "tiny".into(),
            latent: 32,
            batch: 1,
            steps: 5,
            warmup: 1,
            device: Device::Cpu,
            dtype: DType::F32,
            variant: None,
            dora: false,
            conv_rank: None,
            train_text_encoder: false,
            gradient_checkpointing: false,
        }
    }
}

/// One benchmark's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// `train` or `generate`.
    pub kind: String,
    pub model: String,
    pub latent: usize,
    pub batch: usize,
    pub steps: usize,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    /// Peak resident set of the whole process (VmHWM), MiB; null where unavailable.
    pub peak_rss_mib: Option<f64>,
    pub trainable_params: usize,
    pub total_params: usize,
    pub threads: usize,
    /// `cpu` or `cuda:N`, and the compute dtype.
    pub device: String,
    pub dtype: String,
    /// GPU memory in use after the timed steps (see [`crate::device::gpu_memory_used_mib`]).
    pub gpu_mem_mib: Option<f64>,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} latent {}x{} batch {}: median {:.3} s (min {:.3}, max {:.3}) over {} steps; peak RSS {}; {} threads; {} {}{}",
            self.kind,
            self.model,
            self.latent,
            self.latent,
            self.batch,
            self.median_s,
            self.min_s,
            self.max_s,
            self.steps,
            self.peak_rss_mib
                .map_or("n/a".into(), |m| format!("{m:.0} MiB")),
            self.threads,
            self.device,
            self.dtype,
            self.gpu_mem_mib
                .map_or(String::new(), |m| format!(", GPU memory in use {m:.0} MiB"))
        )
    }
}

impl BenchReport {
    /// A report of `kind` for `cfg` with `(median, min, max)` seconds and parameter counts;
    /// memory and thread figures read now.
    fn new(
        kind: &str,
        cfg: &BenchConfig,
        (median_s, min_s, max_s): (f64, f64, f64),
        trainable_params: usize,
        total_params: usize,
    ) -> Self {
        Self {
            kind: kind.into(),
            model: cfg.model.clone(),
            latent: cfg.latent,
            batch: cfg.batch,
            steps: cfg.steps,
            median_s,
            min_s,
            max_s,
            peak_rss_mib: peak_rss_mib(),
            trainable_params,
            total_params,
            threads: candle_core::utils::get_num_threads(),
            device: device_name(&cfg.device),
            dtype: format!("{:?}", cfg.dtype).to_lowercase(),
            gpu_mem_mib: crate::device::gpu_memory_used_mib(&cfg.device),
        }
    }
}

fn timed(cfg: &BenchConfig, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64, f64)> {
    if cfg.steps == 0 {
        bail!("--steps must be at least 1");
    }
    for _ in 0..cfg.warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(cfg.steps);
    for _ in 0..cfg.steps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok((t[t.len() / 2], t[0], t[t.len() - 1]))
}

/// The benchmark's loss: fixed random latents, text states (or token ids through a trainable
/// text encoder), noise and timesteps.
struct FixedBatch<'a> {
    unet: &'a UNet2DConditionModel,
    text_encoder: Option<(&'a ClipTextModel, Tensor)>,
    x: Tensor,
    e: Tensor,
    noise: Tensor,
    t: Tensor,
}

impl Objective for FixedBatch<'_> {
    fn len(&self) -> usize {
        self.x.dim(0).unwrap_or(0)
    }

    fn loss(&self, _: &[usize], _: &mut ChaCha12Rng) -> Result<Tensor> {
        let e = match &self.text_encoder {
            Some((te, ids)) => te.forward(ids)?.last_hidden_state,
            None => self.e.clone(),
        };
        let pred = self
            .unet
            .forward(&self.x, &self.t, &e)?
            .to_dtype(DType::F32)?;
        Ok((pred - &self.noise)?.sqr()?.mean_all()?)
    }
}

/// The random text encoder of `model`'s size: the tiny one for `tiny`, SD 1.5's otherwise.
fn bench_text_encoder(model: &str, dt: DType, dev: &Device) -> Result<ClipTextModel> {
    let tcfg = match crate::io::ModelName::parse(model)? {
        crate::io::ModelName::Tiny => ClipTextConfig::tiny(),
        _ => ClipTextConfig::sd_v1_5(),
    };
    ClipTextModel::new(&tcfg, &crate::weights::WeightSource::random(3, dt, dev))
}

/// LoRA rank 16 / alpha 32 on q,k,v (the tutorial's; DoRA, LoCon conv adapters and a
/// text-encoder LoRA on request); one optimizer step of the training engine (gradient
/// clipping at 1, AdamW lr 1e-4, weight decay 1e-2); 77 text tokens; uniform random timesteps.
pub fn bench_train(cfg: &BenchConfig) -> Result<BenchReport> {
    let (dev, dt) = (&cfg.device, cfg.dtype);
    if let Some(v) = &cfg.variant {
        bail!("--variant {v}: the training benchmark uses random weights (variants apply to `bench generate` with a pipeline folder)");
    }
    let ucfg = crate::pipeline::single_file::structure_configs(&cfg.model, None)?.0;
    let mut unet = UNet2DConditionModel::random(&ucfg, 0, dt, dev)?;
    let mut lora = LoraConfig::new(16, 32.0).with_dora(cfg.dora);
    if let Some(r) = cfg.conv_rank {
        lora = lora.with_conv(r, None);
    }
    let summary = unet.inject_lora(&lora, &VarMap::new())?;
    unet.gradient_checkpointing = cfg.gradient_checkpointing;
    let (mut trainable, mut total) = (summary.trainable_params, summary.total_params);
    let tcfg = TrainConfig {
        lr: 1e-4,
        schedule: crate::train::LrSchedule::Constant,
        train_text_encoder: cfg.train_text_encoder,
        // as `sd-lora train` does for f16 weights
        loss_scaling: if dt == DType::F16 {
            crate::train::LossScaling::Dynamic
        } else {
            crate::train::LossScaling::Auto
        },
        ..Default::default()
    };
    let te = if cfg.train_text_encoder {
        let mut te = bench_text_encoder(&cfg.model, dt, dev)?;
        let s = te.inject_lora(&lora.for_text_encoder(TEXT_INJECTABLE), &VarMap::new())?;
        te.gradient_checkpointing = cfg.gradient_checkpointing;
        (trainable, total) = (trainable + s.trainable_params, total + s.total_params);
        Some(te)
    } else {
        None
    };
    let te_vars = match &te {
        Some(te) => te.lora_vars()?,
        None => Vec::new(),
    };
    let mut trainer = Trainer::for_var_groups(tcfg, vec![unet.lora_vars()?, te_vars])?;
    let ctx = ucfg.cross_dims()?[0];
    let (b, l) = (cfg.batch, cfg.latent);
    let ids = Tensor::rand(0f32, 49_000.0, (b, 77), dev)?
        .floor()?
        .to_dtype(DType::U32)?;
    let objective = FixedBatch {
        unet: &unet,
        text_encoder: te.as_ref().map(|te| (te, ids)),
        x: Tensor::randn(0f32, 1.0, (b, 4, l, l), dev)?.to_dtype(dt)?,
        e: Tensor::randn(0f32, 1.0, (b, 77, ctx), dev)?.to_dtype(dt)?,
        noise: Tensor::randn(0f32, 1.0, (b, 4, l, l), dev)?,
        t: Tensor::rand(0f32, 1000.0, b, dev)?.floor()?,
    };
    let group = vec![(0..b).collect::<Vec<_>>()];
    let (median_s, min_s, max_s) = timed(cfg, || {
        trainer.optimizer_step(&objective, &group, usize::MAX)?;
        crate::device::synchronize(dev)
    })?;
    let mut kind = String::from("train");
    if cfg.dora {
        kind.push_str("-dora");
    }
    if cfg.conv_rank.is_some() {
        kind.push_str("-locon");
    }
    if cfg.train_text_encoder {
        kind.push_str("+te");
    }
    if cfg.gradient_checkpointing {
        kind.push_str("+gc");
    }
    Ok(BenchReport::new(
        &kind,
        cfg,
        (median_s, min_s, max_s),
        trainable,
        total,
    ))
}

/// Applies `lora` to a random-weight pipeline (`tiny` or `sd15`) and removes it again, per
/// timed step; the file is read once, outside the timing.
pub fn bench_lora_load(cfg: &BenchConfig, lora: &std::path::Path) -> Result<BenchReport> {
    use crate::lora::{LoraFile, LoraLoad};
    // no latents here: the report says so
    let cfg = &BenchConfig {
        latent: 0,
        batch: 1,
        ..cfg.clone()
    };
    let dev = &cfg.device;
    let mut sd = random_pipeline(&cfg.model, cfg.dtype, dev)?;
    let file = LoraFile::open(lora)?;
    let mut applied = None;
    let (median_s, min_s, max_s) = timed(cfg, || {
        applied = Some(sd.load_lora_file(&file, &LoraLoad::default())?);
        crate::device::synchronize(dev)?;
        sd.remove_lora()
    })?;
    if let Some(a) = applied {
        eprintln!("{}: {a}", lora.display());
    }
    Ok(BenchReport::new(
        "lora-load",
        cfg,
        (median_s, min_s, max_s),
        0,
        sd.unet.lora_summary()?.total_params,
    ))
}

/// A random-weight pipeline of `tiny` or `sd15` structure (the tokenizer from the CLIP BPE).
fn random_pipeline(model: &str, dtype: DType, dev: &Device) -> Result<StableDiffusion> {
    use crate::io::ModelName;
    if dtype != DType::F32 {
        bail!("random-weight pipelines are made in f32, not {dtype:?} (use a pipeline folder)");
    }
    use crate::text::ClipTextConfig;
    use crate::vae::VaeConfig;
    let (u, v, t) = match ModelName::parse(model)? {
        ModelName::Tiny => (
            UNetConfig::tiny(),
            VaeConfig::tiny(),
            ClipTextConfig::tiny(),
        ),
        ModelName::Sd15 => (
            UNetConfig::sd_v1_5(),
            VaeConfig::sd_v1_5(),
            ClipTextConfig::sd_v1_5(),
        ),
        _ => bail!("`{model}`: random-weight pipelines are tiny or sd15"),
    };
    let tok = std::env::temp_dir().join(format!("sd-lora-bench-tok-{}", std::process::id()));
    let bpe = crate::text::default_clip_bpe();
    crate::text::write_clip_vocab(&bpe, &tok).with_context(|| {
        format!(
            "building a CLIP tokenizer from {} (run scripts/fetch-clip-bpe.sh)",
            bpe.display()
        )
    })?;
    let sd = StableDiffusion::random(&u, &v, &t, &tok, 0, dev);
    let _ = std::fs::remove_dir_all(&tok);
    sd
}

fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

/// Text to image: classifier-free guidance 7.5 (UNet batch 2 per image), DDIM, 20 steps,
/// `batch` images, text encoding and VAE decoding included.
pub fn bench_generate(cfg: &BenchConfig) -> Result<BenchReport> {
    let dev = &cfg.device;
    use crate::io::ModelName;
    let name = ModelName::parse(&cfg.model)?;
    if let (Some(v), false) = (&cfg.variant, matches!(name, ModelName::Local(_))) {
        bail!(
            "--variant {v}: `{}` runs on random weights; variants apply to a pipeline folder",
            cfg.model
        );
    }
    let sd = match name {
        ModelName::Tiny | ModelName::Sd15 => random_pipeline(&cfg.model, DType::F32, dev)?,
        ModelName::Local(dir) => {
            StableDiffusion::from_folder(&dir, cfg.variant.as_deref(), cfg.dtype, dev)?
        }
        ModelName::Hub(repo) => {
            bail!("bench generate: `{repo}`: give tiny, sd15 or a local pipeline folder")
        }
    };
    let px = cfg.latent * sd.vae_scale_factor();
    let gen = GenerateConfig {
        prompt: "a photo of a cat".into(),
        steps: 20,
        width: px,
        height: px,
        num_images: cfg.batch,
        ..Default::default()
    };
    let (median_s, min_s, max_s) = timed(cfg, || {
        sd.generate(&gen)?;
        crate::device::synchronize(dev)
    })?;
    let total = sd.unet.lora_summary()?.total_params;
    Ok(BenchReport::new(
        "generate",
        cfg,
        (median_s, min_s, max_s),
        0,
        total,
    ))
}
