//! `sd-lora pretrain-tiny`: pre-trains the embedded tiny Stable Diffusion with our own code, in
//! three resumable phases through the one training engine ([`Trainer::run`]), and writes a
//! diffusers-layout folder (f16 weights).
//!
//! 1. **VAE** (full-parameter): reconstruction MSE + `kl_weight`·KL on both looks of the
//!    synthetic scenes (so the latent space can express photos and cel shading alike). Then the
//!    latent `scaling_factor` is set to 1 / std of the latents, as SD's 0.18215 was chosen.
//!    Phase 1b fine-tunes the **VAE decoder** alone (L1 + MSE on posterior samples of the
//!    frozen encoder).
//! 2. **UNet** (full-parameter): epsilon-prediction denoising on the base look with its
//!    captions, text embeddings from a CLIP text encoder that stays at its seeded random
//!    initialisation (frozen), tokenized with the real CLIP BPE.
//!
//! Each phase checkpoints to `work/<phase>/` every `save_every` steps (the trainer's checkpoint
//! format, the newest two kept) and continues from there when run again, so the job survives
//! interruptions and spans sessions. Every phase: AdamW, linear warm-up over 50 steps, then
//! cosine to 10% of its learning rate, batches from a fresh shuffle each epoch.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha12Rng;
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use super::args::count;
use crate::data::{Example, ImageFolder};
use crate::pipeline::StableDiffusion;
use crate::scheduler::SchedulerConfig;
use crate::text::{ClipTextModel, ClipTokenizer};
use crate::tiny::model::{tiny_configs, write_json, write_model};
use crate::tiny::scenes::{scenes, Look};
use crate::train::{checkpoint, Checkpoints, LatentCache, LrSchedule, Objective, Progress};
use crate::train::{ProgressMode, StepHook, StepRecord, TrainConfig, Trainer};
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::weights::{randn_from, NamedVars, WeightSource};

/// Settings of the pre-training job. `Default` is what produced `assets/tiny-sd`.
#[derive(Debug, Clone)]
pub struct PretrainConfig {
    /// The finished model folder.
    pub out: PathBuf,
    /// Checkpoints and logs.
    pub work: PathBuf,
    /// Seeds the scenes and every initialisation. Default 20250.
    pub seed: u64,
    /// Scenes per look. Default 2000.
    pub scenes: usize,
    pub vae_steps: usize,
    pub vae_batch: usize,
    pub vae_lr: f64,
    /// Weight of the KL term (per-element means). Default 1e-4.
    pub kl_weight: f64,
    /// Phase 1b: steps fine-tuning the VAE decoder alone (encoder, and so the latent space the
    /// UNet learns, frozen) with an L1 + MSE reconstruction loss, which keeps flat fills and
    /// thin dark outlines sharper than phase 1's short MSE training. Default 1500.
    pub vae_decoder_steps: usize,
    pub vae_decoder_lr: f64,
    pub unet_steps: usize,
    pub unet_batch: usize,
    pub unet_lr: f64,
    /// Fraction of UNet examples trained on the empty caption, so that classifier-free
    /// guidance has a learned unconditional prediction. Default 0.1.
    pub caption_dropout: f64,
    pub save_every: usize,
    /// The final colour check: held-out prompts and DDIM steps. Default 60 and 20.
    pub quality_prompts: usize,
    pub quality_steps: usize,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            out: crate::io::tiny_model_dir(),
            work: PathBuf::from(".pretrain"),
            seed: 20250,
            scenes: 2000,
            vae_steps: 600,
            vae_batch: 16,
            vae_lr: 1e-3,
            kl_weight: 1e-4,
            vae_decoder_steps: 1500,
            vae_decoder_lr: 5e-4,
            unet_steps: 3000,
            unet_batch: 16,
            unet_lr: 1e-3,
            caption_dropout: 0.1,
            save_every: 100,
            quality_prompts: 60,
            quality_steps: 20,
        }
    }
}

/// `sd-lora pretrain-tiny`. Unset options take [`PretrainConfig::default`]'s values.
#[derive(Debug, Clone, clap::Args)]
pub struct PretrainArgs {
    /// The finished model folder.
    #[arg(long, default_value = "assets/tiny-sd")]
    pub out: PathBuf,
    /// Checkpoints (continue by running the same command again).
    #[arg(long, default_value = ".pretrain")]
    pub work: PathBuf,
    /// VAE steps (phase 1) [default: 600].
    #[arg(long)]
    pub vae_steps: Option<usize>,
    /// Decoder-only VAE fine-tune steps (phase 1b; 0 skips it) [default: 1500].
    #[arg(long)]
    pub vae_decoder_steps: Option<usize>,
    /// UNet steps (phase 2) [default: 3000].
    #[arg(long)]
    pub unet_steps: Option<usize>,
    /// Scenes per look [default: 2000].
    #[arg(long, value_parser = count)]
    pub scenes: Option<usize>,
}

impl PretrainArgs {
    pub fn config(&self) -> PretrainConfig {
        let d = PretrainConfig::default();
        PretrainConfig {
            out: self.out.clone(),
            work: self.work.clone(),
            vae_steps: self.vae_steps.unwrap_or(d.vae_steps),
            vae_decoder_steps: self.vae_decoder_steps.unwrap_or(d.vae_decoder_steps),
            unet_steps: self.unet_steps.unwrap_or(d.unet_steps),
            scenes: self.scenes.unwrap_or(d.scenes),
            ..d
        }
    }
}

fn to_tensor(img: &image::RgbImage) -> Result<Tensor> {
    crate::data::image_to_tensor(img, &Device::Cpu)
}

/// One phase's trainer settings: `steps` optimizer steps of `batch` examples, AdamW at `lr`
/// with 50 warm-up steps then cosine to 10%, no gradient clipping.
fn phase_config(cfg: &PretrainConfig, steps: usize, batch: usize, lr: f64) -> TrainConfig {
    TrainConfig {
        lr,
        weight_decay: 0.0,
        max_steps: Some(steps),
        batch_size: batch,
        grad_accum: 1,
        schedule: LrSchedule::Cosine { floor: 0.1 * lr },
        warmup_steps: 50,
        max_grad_norm: None,
        seed: cfg.seed,
        ..Default::default()
    }
}

/// Runs a phase through the engine: resumes from `work/<dir>/`, checkpoints every
/// `save_every` steps (keeping the newest two), reports progress through `log`. `extra` hooks
/// run after the progress line.
fn run_phase(
    name: &str,
    cfg: &PretrainConfig,
    trainer: &mut Trainer,
    objective: &dyn Objective,
    log: &mut dyn FnMut(&str),
    extra: &mut dyn StepHook,
) -> Result<()> {
    let dir = cfg.work.join(name.to_lowercase().replace(' ', "-"));
    checkpoint::remove_stale_temp_files(&dir)?;
    if let Some(p) = checkpoint::latest(&dir)? {
        let steps = trainer.config.max_steps;
        trainer.load_checkpoint(&p)?;
        // the command line may extend (or cut short) the run
        trainer.config.max_steps = steps;
        log(&format!("{name}: resumed at step {}", trainer.step));
    }
    let mut ckpt = Checkpoints::new(dir, cfg.save_every);
    ckpt.keep_last = Some(2);
    let mut progress = Progress::new(
        &format!("{name} "),
        ProgressMode::Lines { every: 20 },
        |s: &str| log(s),
    );
    trainer.run(objective, &mut [&mut progress, extra, &mut ckpt])
}

/// A hook that does nothing.
struct NoHook;
impl StepHook for NoHook {
    fn after_step(&mut self, _: &Trainer, _: &StepRecord, _: usize) -> Result<()> {
        Ok(())
    }
}

/// Phase 1: reconstruction MSE + `kl_weight`·KL of a posterior sample.
struct VaeLoss<'a> {
    vae: &'a AutoencoderKL,
    data: &'a Tensor,
    kl_weight: f64,
}

impl Objective for VaeLoss<'_> {
    fn len(&self) -> usize {
        self.data.dim(0).unwrap_or(0)
    }

    fn loss(&self, batch: &[usize], rng: &mut ChaCha12Rng) -> Result<Tensor> {
        let x = self.data.index_select(&indices(batch)?, 0)?;
        let d = self.vae.encode(&x)?;
        let z = d.sample(&randn_from(rng, d.mean.dims(), &Device::Cpu)?)?;
        let mse = (self.vae.decode(&z)? - &x)?.sqr()?.mean_all()?;
        let kl = ((d.mean.sqr()? + d.logvar.exp()?)? - 1.0)?
            .sub(&d.logvar)?
            .mean_all()?
            .affine(0.5, 0.0)?;
        Ok((&mse + (kl * self.kl_weight)?)?)
    }
}

/// Phase 1b: L1 + MSE of the decoder on posterior samples of the frozen encoder.
struct DecoderLoss<'a> {
    vae: &'a AutoencoderKL,
    data: &'a Tensor,
    means: Tensor,
    stds: Tensor,
}

impl Objective for DecoderLoss<'_> {
    fn len(&self) -> usize {
        self.data.dim(0).unwrap_or(0)
    }

    fn loss(&self, batch: &[usize], rng: &mut ChaCha12Rng) -> Result<Tensor> {
        let idx = indices(batch)?;
        let x = self.data.index_select(&idx, 0)?;
        let mean = self.means.index_select(&idx, 0)?;
        let eps = randn_from(rng, mean.dims(), &Device::Cpu)?;
        let z = (&mean + (self.stds.index_select(&idx, 0)? * eps)?)?;
        let diff = (self.vae.decode(&z)? - &x)?;
        Ok((diff.abs()?.mean_all()? + diff.sqr()?.mean_all()?)?)
    }
}

fn indices(batch: &[usize]) -> Result<Tensor> {
    let idx: Vec<u32> = batch.iter().map(|&i| i as u32).collect();
    Ok(Tensor::from_vec(idx, batch.len(), &Device::Cpu)?)
}

/// Trains the VAE (phase 1). Returns it with its trainable tensors.
fn train_vae(
    cfg: &PretrainConfig,
    vae_cfg: &crate::vae::VaeConfig,
    data: &Tensor,
    log: &mut dyn FnMut(&str),
) -> Result<(AutoencoderKL, NamedVars)> {
    let ws = WeightSource::random(cfg.seed + 1, DType::F32, &Device::Cpu).trainable();
    let vae = AutoencoderKL::new(vae_cfg, &ws)?;
    let vars = ws.vars();
    let tcfg = phase_config(cfg, cfg.vae_steps, cfg.vae_batch, cfg.vae_lr);
    let mut trainer = Trainer::for_vars(tcfg, vars.clone())?;
    let objective = VaeLoss {
        vae: &vae,
        data,
        kl_weight: cfg.kl_weight,
    };
    run_phase("VAE", cfg, &mut trainer, &objective, log, &mut NoHook)?;
    Ok((vae, vars))
}

/// The mean style score (see [`crate::tiny::metrics`]) of a batch of images [B, 3, H, W].
fn style(t: &Tensor) -> Result<f64> {
    let imgs = (0..t.dim(0)?)
        .map(|i| crate::data::tensor_to_image(&t.get(i)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(crate::tiny::metrics::mean_style_score(&imgs).score)
}

/// Logs the round-trip style score of the anime probe every `every` steps.
struct ProbeHook<'a, 'b> {
    probe: &'a dyn Fn() -> Result<f64>,
    every: usize,
    log: &'a RefCell<&'b mut dyn FnMut(&str)>,
}

impl StepHook for ProbeHook<'_, '_> {
    fn after_step(&mut self, _: &Trainer, r: &StepRecord, _: usize) -> Result<()> {
        if r.step.is_multiple_of(self.every) {
            let line = format!(
                "VAE decoder step {}: round-trip style {:.3}",
                r.step,
                (self.probe)()?
            );
            (*self.log.borrow_mut())(&line);
        }
        Ok(())
    }
}

/// Phase 1b: fine-tunes the decoder (and `post_quant_conv`) on latents sampled from the frozen
/// encoder's posteriors, with L1 + MSE. Logs the style score of anime-look scenes after a
/// round trip, the figure this phase exists to raise.
fn train_vae_decoder(
    cfg: &PretrainConfig,
    vae: &AutoencoderKL,
    vars: &NamedVars,
    data: &Tensor,
    log: &mut dyn FnMut(&str),
) -> Result<()> {
    if cfg.vae_decoder_steps == 0 {
        return Ok(());
    }
    let decoder: NamedVars = vars
        .iter()
        .filter(|(k, _)| k.starts_with("decoder.") || k.starts_with("post_quant_conv."))
        .cloned()
        .collect();
    // the encoder is frozen: its posteriors once, detached
    let (mut means, mut stds) = (Vec::new(), Vec::new());
    let n = data.dim(0)?;
    for start in (0..n).step_by(64) {
        let d = vae.encode(&data.narrow(0, start, (n - start).min(64))?)?;
        means.push(d.mean.detach().contiguous()?);
        stds.push(d.logvar.affine(0.5, 0.0)?.exp()?.detach().contiguous()?);
    }
    let objective = DecoderLoss {
        vae,
        data,
        means: Tensor::cat(&means, 0)?,
        stds: Tensor::cat(&stds, 0)?,
    };
    // round-trip probe: the first (up to) 64 anime-look scenes (odd rows of `data`)
    let rows: Vec<u32> = (0..(n / 2).min(64) as u32).map(|i| 2 * i + 1).collect();
    let probe = Tensor::new(rows, &Device::Cpu)?;
    let (originals, probe_means) = (
        data.index_select(&probe, 0)?,
        objective.means.index_select(&probe, 0)?,
    );
    let probe_score = || style(&vae.decode(&probe_means)?.detach());
    log(&format!(
        "VAE decoder: anime-look style score {:.3} originals, {:.3} after a round trip",
        style(&originals)?,
        probe_score()?
    ));
    let tcfg = phase_config(
        cfg,
        cfg.vae_decoder_steps,
        cfg.vae_batch,
        cfg.vae_decoder_lr,
    );
    let mut trainer = Trainer::for_vars(tcfg, decoder)?;
    let shared = RefCell::new(log);
    let mut hook = ProbeHook {
        probe: &probe_score,
        every: cfg.save_every,
        log: &shared,
    };
    let mut phase_log = |s: &str| (*shared.borrow_mut())(s);
    run_phase(
        "VAE decoder",
        cfg,
        &mut trainer,
        &objective,
        &mut phase_log,
        &mut hook,
    )?;
    let log = shared.into_inner();
    log(&format!(
        "VAE decoder: anime-look style score after a round trip {:.3}",
        probe_score()?
    ));
    Ok(())
}

/// Runs all phases (each resumes from its checkpoint) and writes the model folder.
pub fn pretrain_tiny(
    cfg: &PretrainConfig,
    bpe: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    std::fs::create_dir_all(&cfg.work)
        .with_context(|| format!("cannot create {}", cfg.work.display()))?;
    let (unet_cfg, mut vae_cfg, text_cfg) = tiny_configs();
    let all = scenes(cfg.scenes, cfg.seed);
    // phase 1: the VAE on both looks
    let mut imgs = Vec::new();
    for s in &all {
        imgs.push(to_tensor(&s.render(Look::Base))?);
        imgs.push(to_tensor(&s.render(Look::Anime))?);
    }
    let data = Tensor::stack(&imgs, 0)?;
    drop(imgs);
    let (vae, vae_vars) = train_vae(cfg, &vae_cfg, &data, log)?;
    train_vae_decoder(cfg, &vae, &vae_vars, &data, log)?;
    vae_cfg.scaling_factor = latent_scale(&vae, &data)?;
    log(&format!(
        "latent scaling_factor {:.5}",
        vae_cfg.scaling_factor
    ));
    drop(data);
    // the frozen text encoder and the tokenizer
    let tok_dir = cfg.out.join("tokenizer");
    crate::text::write_clip_vocab(bpe, &tok_dir)?;
    let text_ws = WeightSource::random(cfg.seed + 3, DType::F32, &Device::Cpu).trainable();
    let text = ClipTextModel::new(&text_cfg, &text_ws)?;
    let text_vars = text_ws.vars();
    // phase 2: the UNet on the base look
    let unet_ws = WeightSource::random(cfg.seed + 2, DType::F32, &Device::Cpu);
    let (unet, unet_vars) = UNet2DConditionModel::new_trainable(&unet_cfg, &unet_ws)?;
    let mut vae = vae;
    vae.config = vae_cfg.clone();
    let sd = StableDiffusion {
        tokenizer: ClipTokenizer::from_dir(&tok_dir)?,
        text_encoder: text,
        vae,
        unet,
        scheduler_config: SchedulerConfig::sd_v1_5(),
        root: cfg.out.clone(),
        device: Device::Cpu,
        dtype: DType::F32,
    };
    let unet_steps = train_unet(cfg, &sd, &all, &unet_vars, log)?;
    write_model(&cfg.out, &sd, &unet_vars, &vae_vars, &text_vars)?;
    quality_check(cfg, unet_steps, log)?;
    Ok(cfg.out.clone())
}

/// 1 / std of the VAE's latent means over `data` (as SD's 0.18215 was chosen).
fn latent_scale(vae: &AutoencoderKL, data: &Tensor) -> Result<f64> {
    let mut sq = 0.0f64;
    let mut count = 0usize;
    for chunk in 0..data.dim(0)?.div_ceil(64) {
        let x = data.narrow(0, chunk * 64, (data.dim(0)? - chunk * 64).min(64))?;
        let m = vae.encode(&x)?.mean;
        sq += m.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        count += m.elem_count();
    }
    Ok(1.0 / (sq / count as f64).sqrt())
}

/// Phase 2: the UNet's denoising loss on the base look (caption dropout, flips, weight decay
/// 1e-2, gradient clipping at 1). Returns the steps done.
fn train_unet(
    cfg: &PretrainConfig,
    sd: &StableDiffusion,
    all: &[crate::tiny::scenes::Scene],
    unet_vars: &NamedVars,
    log: &mut dyn FnMut(&str),
) -> Result<usize> {
    let examples = all
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let pixels = to_tensor(&s.render(Look::Base))?;
            let d = pixels.dims().to_vec();
            Ok(Example {
                path: PathBuf::from(format!("scene-{i:05}")),
                pixels,
                caption: s.caption(),
                original_size: (d[2], d[1]),
                crop_top_left: (0, 0),
                repeats: 1,
                dataset_dir: "scenes".into(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let folder = ImageFolder {
        root: cfg.work.clone(),
        examples,
        warnings: Vec::new(),
    };
    let (cache, _) = LatentCache::build_cached(sd, &folder, true, None)?;
    drop(folder);
    let tcfg = TrainConfig {
        weight_decay: 1e-2,
        max_grad_norm: TrainConfig::default().max_grad_norm,
        caption_dropout: cfg.caption_dropout,
        ..phase_config(cfg, cfg.unet_steps, cfg.unet_batch, cfg.unet_lr)
    };
    let mut trainer = Trainer::for_vars(tcfg, unet_vars.to_vec())?;
    let objective = crate::train::Denoising::new(sd, &cache, &trainer.config)?;
    run_phase("UNet", cfg, &mut trainer, &objective, log, &mut NoHook)?;
    Ok(trainer.step)
}

/// The base-quality check on the written (f16) model, to `quality.json`.
fn quality_check(cfg: &PretrainConfig, unet_steps: usize, log: &mut dyn FnMut(&str)) -> Result<()> {
    let shipped = StableDiffusion::from_folder(&cfg.out, None, DType::F32, &Device::Cpu)?;
    let acc =
        crate::tiny::eval::colour_accuracy(&shipped, cfg.quality_prompts, 123, cfg.quality_steps)?;
    log(&format!(
        "colour match over {} held-out prompts: {:.0}%",
        cfg.quality_prompts,
        acc * 100.0
    ));
    write_json(
        &cfg.out.join("quality.json"),
        &serde_json::json!({
            "colour_match": acc,
            "prompts": cfg.quality_prompts,
            "prompt_seed": 123,
            "sample_steps": cfg.quality_steps,
            "vae_steps": cfg.vae_steps,
            "vae_decoder_steps": cfg.vae_decoder_steps,
            "unet_steps": unet_steps,
            "caption_dropout": cfg.caption_dropout,
            "guidance": 7.5,
            "scenes": cfg.scenes,
            "seed": cfg.seed,
            "check": "sd_lora::tiny::eval::colour_accuracy",
        }),
    )
}
