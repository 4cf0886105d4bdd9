//! `sd-lora pretrain-tiny`: pre-trains the embedded tiny Stable Diffusion with our own code, in
//! two resumable phases, and writes a diffusers-layout folder (f16 weights).
//!
//! 1. **VAE** (full-parameter): reconstruction MSE + `kl_weight`·KL on both looks of the
//!    synthetic scenes (so the latent space can express photos and cel shading alike). Then the
//!    latent `scaling_factor` is set to 1 / std of the latents, as SD's 0.18215 was chosen.
//! 2. **UNet** (full-parameter, `Trainer::with_vars`): epsilon-prediction denoising on the base
//!    look with its captions, text embeddings from a CLIP text encoder that stays at its seeded
//!    random initialisation (frozen), tokenized with the real CLIP BPE.
//!
//! Each phase checkpoints to `work/` every `save_every` steps (atomic writes) and continues from
//! there when run again, so the job survives interruptions and spans sessions.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::scenes::{scenes, Look};
use crate::data::{Example, ImageFolder};
use crate::lora::io::write_safetensors_atomic;
use crate::pipeline::StableDiffusion;
use crate::scheduler::SchedulerConfig;
use crate::text::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use crate::train::{AdamW, LatentCache, LrSchedule, TrainConfig, Trainer};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::weights::{randn_from, save_weights, NamedVars, WeightSource};

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
            out: super::tiny_model_dir(),
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

/// The tiny architecture: SD's blocks, small widths (UNet `UNetConfig::tiny()`, a VAE of
/// widths 16/32/32, CLIP 2 layers x 64). Latents 16 x 16 x 4 for 64 px images.
pub fn tiny_configs() -> (UNetConfig, VaeConfig, ClipTextConfig) {
    (
        UNetConfig::tiny(),
        VaeConfig {
            block_out_channels: vec![16, 32, 32],
            ..VaeConfig::tiny()
        },
        ClipTextConfig::tiny(),
    )
}

fn to_tensor(img: &image::RgbImage) -> Result<Tensor> {
    crate::data::image_to_tensor(img, &Device::Cpu)
}

/// Linear warm-up (50 steps), then cosine to 10% of `lr`.
fn lr_at(step: usize, total: usize, lr: f64) -> f64 {
    if step < 50 {
        return lr * (step + 1) as f64 / 50.0;
    }
    let t = (step - 50) as f64 / (total.saturating_sub(50)).max(1) as f64;
    0.1 * lr + 0.9 * lr * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
}

fn save_phase(path: &Path, opt: &AdamW, step: usize) -> Result<()> {
    let mut t = BTreeMap::new();
    for (i, (name, v)) in opt.vars.iter().enumerate() {
        t.insert(format!("w.{name}"), v.as_tensor().clone());
        t.insert(format!("m.{name}"), opt.m[i].clone());
        t.insert(format!("v.{name}"), opt.v[i].clone());
    }
    let mut meta = std::collections::HashMap::new();
    meta.insert("step".to_string(), step.to_string());
    meta.insert("adam_t".to_string(), opt.t.to_string());
    write_safetensors_atomic(&t, Some(meta), path)
}

/// Restores a phase checkpoint; returns the step it was taken at.
fn load_phase(path: &Path, opt: &mut AdamW) -> Result<usize> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a checkpoint: {e}", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let num = |k: &str| -> Result<usize> {
        meta.get(k)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{}: metadata `{k}` missing", path.display()))
    };
    let (step, t) = (num("step")?, num("adam_t")?);
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let get = |k: String| {
        tensors
            .get(&k)
            .cloned()
            .with_context(|| format!("{}: tensor `{k}` missing", path.display()))
    };
    for i in 0..opt.vars.len() {
        let name = opt.vars[i].0.clone();
        opt.vars[i].1.set(&get(format!("w.{name}"))?)?;
        opt.m[i] = get(format!("m.{name}"))?;
        opt.v[i] = get(format!("v.{name}"))?;
    }
    opt.t = t;
    Ok(step)
}

/// The optimisation loop both VAE phases share: resumes from `ckpt`, then for each remaining
/// step asks `loss_at(step)` for the loss (and a log line), updates every var of `opt`,
/// checkpoints every `save_every` steps and logs every 20.
fn run_phase(
    name: &str,
    opt: &mut AdamW,
    ckpt: &Path,
    (total, lr, save_every): (usize, f64, usize),
    log: &mut dyn FnMut(&str),
    loss_at: &mut dyn FnMut(usize) -> Result<(Tensor, String)>,
) -> Result<()> {
    let mut step = if ckpt.is_file() {
        load_phase(ckpt, opt)?
    } else {
        0
    };
    if step > 0 {
        log(&format!("{name}: resumed at step {step}"));
    }
    let started = std::time::Instant::now();
    let first = step;
    while step < total {
        let (loss, line) = loss_at(step)?;
        let lv = loss.to_scalar::<f32>()?;
        if !lv.is_finite() {
            bail!("{name} loss became {lv} at step {step}; lower the learning rate");
        }
        let grads = loss.backward()?;
        let g: Vec<Tensor> = opt
            .vars
            .iter()
            .map(|(k, v)| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .with_context(|| format!("{name}: no gradient reached {k}"))
            })
            .collect::<Result<_>>()?;
        opt.step(&g, lr_at(step, total, lr))?;
        step += 1;
        if step.is_multiple_of(save_every) || step == total {
            save_phase(ckpt, opt, step)?;
        }
        if step.is_multiple_of(20) || step == total {
            log(&format!(
                "{name} step {step}/{total} {line} ({:.2} s/step)",
                started.elapsed().as_secs_f64() / (step - first).max(1) as f64
            ));
        }
    }
    Ok(())
}

fn batch_indices(seed: u64, step: usize, batch: usize, n: usize) -> Result<(ChaCha8Rng, Tensor)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (step as u64).wrapping_mul(0x9E37_79B9));
    let idx: Vec<u32> = (0..batch)
        .map(|_| rand::Rng::random_range(&mut rng, 0..n as u32))
        .collect();
    let len = idx.len();
    Ok((rng, Tensor::from_vec(idx, len, &Device::Cpu)?))
}

/// Trains the VAE (phase 1). Returns its trainable tensors.
fn train_vae(
    cfg: &PretrainConfig,
    vae_cfg: &VaeConfig,
    data: &Tensor,
    log: &mut dyn FnMut(&str),
) -> Result<(AutoencoderKL, NamedVars)> {
    let ws = WeightSource::random(cfg.seed + 1, DType::F32, &Device::Cpu).trainable();
    let vae = AutoencoderKL::new(vae_cfg, &ws)?;
    let vars = ws.vars();
    let mut opt = AdamW::new(vars.clone(), (0.9, 0.999), 1e-8, 0.0)?;
    let n = data.dim(0)?;
    run_phase(
        "VAE",
        &mut opt,
        &cfg.work.join("vae.safetensors"),
        (cfg.vae_steps, cfg.vae_lr, cfg.save_every),
        log,
        &mut |step| {
            let (mut rng, idx) = batch_indices(cfg.seed, step, cfg.vae_batch, n)?;
            let x = data.index_select(&idx, 0)?;
            let d = vae.encode(&x)?;
            let z = d.sample(&randn_from(&mut rng, d.mean.dims(), &Device::Cpu)?)?;
            let mse = (vae.decode(&z)? - &x)?.sqr()?.mean_all()?;
            let kl = ((d.mean.sqr()? + d.logvar.exp()?)? - 1.0)?
                .sub(&d.logvar)?
                .mean_all()?
                .affine(0.5, 0.0)?;
            let line = format!(
                "recon MSE {:.5} KL {:.3}",
                mse.to_scalar::<f32>()?,
                kl.to_scalar::<f32>()?
            );
            Ok(((&mse + (kl * cfg.kl_weight)?)?, line))
        },
    )?;
    Ok((vae, vars))
}

/// Phase 1b: fine-tunes the decoder (and `post_quant_conv`) on latents sampled from the frozen
/// encoder's posteriors, with L1 + MSE. Logs the style score (see [`super::metrics`]) of
/// anime-look scenes after a round trip, the figure this phase exists to raise.
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
    let mut opt = AdamW::new(decoder, (0.9, 0.999), 1e-8, 0.0)?;
    // the encoder is frozen: its posteriors once, detached
    let (mut means, mut stds) = (Vec::new(), Vec::new());
    let n = data.dim(0)?;
    for start in (0..n).step_by(64) {
        let d = vae.encode(&data.narrow(0, start, (n - start).min(64))?)?;
        means.push(d.mean.detach().contiguous()?);
        stds.push(d.logvar.affine(0.5, 0.0)?.exp()?.detach().contiguous()?);
    }
    let (means, stds) = (Tensor::cat(&means, 0)?, Tensor::cat(&stds, 0)?);
    // round-trip probe: the first (up to) 64 anime-look scenes (odd rows of `data`)
    let rows: Vec<u32> = (0..(n / 2).min(64) as u32).map(|i| 2 * i + 1).collect();
    let probe = Tensor::new(rows, &Device::Cpu)?;
    let probe = (
        data.index_select(&probe, 0)?,
        means.index_select(&probe, 0)?,
    );
    // mean style score of a batch of images [B, 3, H, W]
    let style = |t: &Tensor| -> Result<f64> {
        let imgs = (0..t.dim(0)?)
            .map(|i| crate::data::tensor_to_image(&t.get(i)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(super::metrics::mean_style_score(&imgs).score)
    };
    let probe_score = |vae: &AutoencoderKL| style(&vae.decode(&probe.1)?.detach());
    log(&format!(
        "VAE decoder: anime-look style score {:.3} originals, {:.3} after a round trip",
        style(&probe.0)?,
        probe_score(vae)?
    ));
    run_phase(
        "VAE decoder",
        &mut opt,
        &cfg.work.join("vae-decoder.safetensors"),
        (cfg.vae_decoder_steps, cfg.vae_decoder_lr, cfg.save_every),
        log,
        &mut |step| {
            let (mut rng, idx) = batch_indices(cfg.seed ^ 0xDEC0DE, step, cfg.vae_batch, n)?;
            let x = data.index_select(&idx, 0)?;
            let mean = means.index_select(&idx, 0)?;
            let z = (&mean
                + (stds.index_select(&idx, 0)?
                    * randn_from(&mut rng, mean.dims(), &Device::Cpu)?)?)?;
            let diff = (vae.decode(&z)? - &x)?;
            let l1 = diff.abs()?.mean_all()?;
            let mse = diff.sqr()?.mean_all()?;
            let mut line = format!(
                "L1 {:.4} MSE {:.5}",
                l1.to_scalar::<f32>()?,
                mse.to_scalar::<f32>()?
            );
            if (step + 1).is_multiple_of(cfg.save_every) {
                line += &format!(" round-trip style {:.3}", probe_score(vae)?);
            }
            Ok(((l1 + mse)?, line))
        },
    )?;
    log(&format!(
        "VAE decoder: anime-look style score after a round trip {:.3}",
        probe_score(vae)?
    ));
    Ok(())
}

/// Runs both phases (each resumes from its checkpoint) and writes the model folder.
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
    // the latent scale: 1 / std of the latent means
    let mut sq = 0.0f64;
    let mut count = 0usize;
    for chunk in 0..data.dim(0)?.div_ceil(64) {
        let x = data.narrow(0, chunk * 64, (data.dim(0)? - chunk * 64).min(64))?;
        let m = vae.encode(&x)?.mean;
        sq += m.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        count += m.elem_count();
    }
    vae_cfg.scaling_factor = 1.0 / (sq / count as f64).sqrt();
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
    let examples = all
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Ok(Example {
                path: PathBuf::from(format!("scene-{i:05}")),
                pixels: to_tensor(&s.render(Look::Base))?,
                caption: s.caption(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let folder = ImageFolder {
        root: cfg.work.clone(),
        examples,
        warnings: Vec::new(),
    };
    let (cache, _) = LatentCache::build_cached(&sd, &folder, true, None)?;
    drop(folder);
    let tcfg = TrainConfig {
        lr: cfg.unet_lr,
        weight_decay: 1e-2,
        max_steps: Some(cfg.unet_steps),
        batch_size: cfg.unet_batch,
        grad_accum: 1,
        schedule: LrSchedule::Cosine {
            floor: 0.1 * cfg.unet_lr,
        },
        warmup_steps: 50,
        caption_dropout: cfg.caption_dropout,
        seed: cfg.seed,
        ..Default::default()
    };
    let mut trainer = Trainer::with_vars(&sd, tcfg, unet_vars.clone())?;
    let ckpts = cfg.work.join("unet");
    crate::train::checkpoint::remove_stale_temp_files(&ckpts)?;
    if let Some(p) = crate::train::checkpoint::latest(&ckpts)? {
        trainer.load_checkpoint(&p)?;
        // the command line may extend (or cut short) the run
        trainer.config.max_steps = Some(cfg.unet_steps);
        trainer.config.caption_dropout = cfg.caption_dropout;
        log(&format!("UNet: resumed at step {}", trainer.step));
    }
    trainer.checkpoints = Some((ckpts, cfg.save_every));
    let started = std::time::Instant::now();
    let first = trainer.step;
    let mut window = Vec::new();
    trainer.train(&sd, &cache, &mut |r| {
        window.push(r.loss);
        if r.step.is_multiple_of(20) || r.step == cfg.unet_steps {
            let mean = window.iter().sum::<f64>() / window.len() as f64;
            window.clear();
            log(&format!(
                "UNet step {}/{} loss {mean:.4} lr {:.2e} ({:.2} s/step)",
                r.step,
                cfg.unet_steps,
                r.lr,
                started.elapsed().as_secs_f64() / (r.step - first).max(1) as f64
            ));
        }
    })?;
    write_model(cfg, &sd, &unet_vars, &vae_vars, &text_vars)?;
    // the base-quality check on the written (f16) model
    let shipped = StableDiffusion::from_folder(&cfg.out, None, DType::F32, &Device::Cpu)?;
    let acc = super::demo::colour_accuracy(&shipped, cfg.quality_prompts, 123, cfg.quality_steps)?;
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
            "unet_steps": trainer.step,
            "caption_dropout": cfg.caption_dropout,
            "guidance": 7.5,
            "scenes": cfg.scenes,
            "seed": cfg.seed,
            "check": "sd_lora::tiny::demo::colour_accuracy",
        }),
    )?;
    Ok(cfg.out.clone())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

fn with_class(mut v: serde_json::Value, class: &str) -> serde_json::Value {
    if let Some(m) = v.as_object_mut() {
        m.insert("_class_name".into(), class.into());
        m.insert("_diffusers_version".into(), "0.42.1".into());
    }
    v
}

/// The diffusers folder: configs, f16 weights, tokenizer (already written).
fn write_model(
    cfg: &PretrainConfig,
    sd: &StableDiffusion,
    unet: &NamedVars,
    vae: &NamedVars,
    text: &NamedVars,
) -> Result<()> {
    let out = &cfg.out;
    write_json(
        &out.join("model_index.json"),
        &serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    )?;
    write_json(
        &out.join("unet/config.json"),
        &with_class(
            serde_json::to_value(&sd.unet.config)?,
            "UNet2DConditionModel",
        ),
    )?;
    save_weights(
        unet,
        DType::F16,
        &out.join("unet/diffusion_pytorch_model.safetensors"),
    )?;
    let v = &sd.vae.config;
    write_json(
        &out.join("vae/config.json"),
        &serde_json::json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.42.1",
            "act_fn": "silu",
            "block_out_channels": v.block_out_channels,
            "down_block_types": v.down_block_types,
            "up_block_types": v.up_block_types,
            "in_channels": v.in_channels,
            "out_channels": v.out_channels,
            "latent_channels": v.latent_channels,
            "layers_per_block": v.layers_per_block,
            "norm_num_groups": v.norm_num_groups,
            "sample_size": super::scenes::SIZE,
            "scaling_factor": v.scaling_factor,
            "shift_factor": null,
            "force_upcast": false,
            "mid_block_add_attention": true,
            "use_quant_conv": true,
            "use_post_quant_conv": true,
        }),
    )?;
    save_weights(
        vae,
        DType::F16,
        &out.join("vae/diffusion_pytorch_model.safetensors"),
    )?;
    let t = &sd.text_encoder.config;
    write_json(
        &out.join("text_encoder/config.json"),
        &serde_json::json!({
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "eos_token_id": t.eos_token_id,
            "pad_token_id": 1,
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "layer_norm_eps": t.layer_norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "projection_dim": t.hidden_size,
            "vocab_size": t.vocab_size,
        }),
    )?;
    save_weights(
        text,
        DType::F16,
        &out.join("text_encoder/model.safetensors"),
    )?;
    let mut sched = serde_json::to_value(&sd.scheduler_config)?;
    if let Some(m) = sched.as_object_mut() {
        m.insert("clip_sample".into(), false.into());
        m.insert("set_alpha_to_one".into(), false.into());
        m.insert("steps_offset".into(), 1.into());
    }
    write_json(
        &out.join("scheduler/scheduler_config.json"),
        &with_class(sched, "DDIMScheduler"),
    )?;
    Ok(())
}
