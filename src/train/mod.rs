//! LoRA training: a latent/text cache built once, then AdamW over the LoRA tensors only with
//! gradient accumulation, clipping, LR schedules, min-SNR weighting and noise offset, reporting
//! the true (unscaled) loss of every optimizer step.

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod optim;

use crate::weights::randn_from;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use std::time::Instant;

pub use cache::{CacheStats, LatentCache};
pub use config::{LrSchedule, TrainConfig};
pub use optim::AdamW;

use crate::lora::LoraModel;
use crate::pipeline::StableDiffusion;
use crate::scheduler::{Scheduler, SchedulerKind};

/// One optimizer step, as the callback and the history see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRecord {
    /// 1-based optimizer step.
    pub step: usize,
    /// 0-based epoch.
    pub epoch: usize,
    /// Mean MSE over the step's micro-batches (not divided by the accumulation factor).
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub seconds: f64,
}

pub(crate) trait FlipW {
    fn flip_w(&self) -> Result<Tensor>;
}
impl FlipW for Tensor {
    /// Reverses the last dimension.
    fn flip_w(&self) -> Result<Tensor> {
        let w = self.dim(candle_core::D::Minus1)?;
        let idx = Tensor::from_vec((0..w as u32).rev().collect::<Vec<_>>(), w, self.device())?;
        Ok(self.index_select(&idx, self.rank() - 1)?)
    }
}

/// The LoRA trainer. Plain owned state: keep it across notebook cells.
#[derive(Debug, Clone)]
pub struct Trainer {
    pub config: TrainConfig,
    pub optimizer: AdamW,
    /// Optimizer steps done.
    pub step: usize,
    pub epoch: usize,
    pub history: Vec<StepRecord>,
    /// The current epoch's shuffled example order and how many of its optimizer steps are done
    /// (so a resumed run continues mid-epoch exactly).
    pub(crate) epoch_order: Option<Vec<usize>>,
    pub(crate) group_pos: usize,
    /// Write a checkpoint to this folder every N optimizer steps and at the end.
    pub checkpoints: Option<(std::path::PathBuf, usize)>,
    pub(crate) rng: rand_chacha::ChaCha12Rng,
    noise: Scheduler,
}

impl Trainer {
    /// A trainer for the LoRA tensors of `sd.unet` (inject or load LoRA first).
    pub fn new(sd: &StableDiffusion, config: TrainConfig) -> Result<Self> {
        Self::with_vars(sd, config, sd.unet.lora_vars()?)
    }

    /// A trainer for an explicit list of tensors, e.g. every UNet weight in full-parameter
    /// mode ([`crate::unet::UNet2DConditionModel::new_trainable`]); the loss is the same.
    pub fn with_vars(
        sd: &StableDiffusion,
        config: TrainConfig,
        vars: Vec<(String, candle_core::Var)>,
    ) -> Result<Self> {
        if vars.is_empty() {
            bail!("nothing to train: inject LoRA or build the UNet in full-parameter mode");
        }
        if config.batch_size == 0 || config.grad_accum == 0 {
            bail!("batch size and gradient accumulation must be at least 1");
        }
        if !(config.lr.is_finite() && config.lr > 0.0) {
            bail!("learning rate must be a positive number, got {}", config.lr);
        }
        if !(0.0..1.0).contains(&config.caption_dropout) {
            bail!(
                "caption dropout is a probability in [0, 1), got {}",
                config.caption_dropout
            );
        }
        let optimizer = AdamW::new(vars, config.betas, config.eps, config.weight_decay)?;
        Ok(Self {
            rng: rand_chacha::ChaCha12Rng::seed_from_u64(config.seed),
            noise: Scheduler::new(SchedulerKind::Ddpm, &sd.scheduler_config, 1)?,
            config,
            optimizer,
            step: 0,
            epoch: 0,
            history: Vec::new(),
            epoch_order: None,
            group_pos: 0,
            checkpoints: None,
        })
    }

    /// Denoising loss of `sd.unet` on examples `idx` of `cache` (true MSE, min-SNR weighted
    /// when configured), drawing flips, latent samples, noise and timesteps from `rng`.
    pub fn loss<R: Rng>(
        &self,
        sd: &StableDiffusion,
        cache: &LatentCache,
        idx: &[usize],
        rng: &mut R,
    ) -> Result<Tensor> {
        let dev = &sd.device;
        let mut z = Vec::new();
        let mut ctx = Vec::new();
        for &i in idx {
            let use_flip = !cache.flipped.is_empty() && rng.random_bool(0.5);
            let (m, lv) = if use_flip {
                &cache.flipped[i]
            } else {
                &cache.latents[i]
            };
            let eps = randn_from(rng, m.dims(), dev)?;
            z.push((m + (lv.affine(0.5, 0.0)?.exp()? * eps)?)?);
            // drawn only when enabled, so runs without dropout keep their random stream
            let drop = self.config.caption_dropout > 0.0
                && rng.random_bool(self.config.caption_dropout.min(1.0));
            ctx.push(
                if drop {
                    &cache.empty
                } else {
                    &cache.embeddings[i]
                }
                .clone(),
            );
        }
        let x0 = sd.vae.scale_latents(&Tensor::stack(&z, 0)?)?;
        let ctx = Tensor::stack(&ctx, 0)?;
        let b = idx.len();
        let mut noise = randn_from(rng, x0.dims(), dev)?;
        if self.config.noise_offset != 0.0 {
            let off = randn_from(rng, &[b, x0.dim(1)?, 1, 1], dev)?;
            noise = noise.broadcast_add(&(off * self.config.noise_offset)?)?;
        }
        let n_train = sd.scheduler_config.num_train_timesteps;
        let t: Vec<u32> = (0..b)
            .map(|_| rng.random_range(0..n_train as u32))
            .collect();
        let tt = Tensor::new(t.clone(), dev)?;
        let noisy = self.noise.add_noise(&x0, &noise, &tt)?;
        let target = self.noise.training_target(&x0, &noise, &tt)?;
        let pred = sd.unet.forward(&noisy, &tt, &ctx)?.to_dtype(DType::F32)?;
        let per_sample = (pred - target)?.sqr()?.flatten_from(1)?.mean(1)?;
        match self.config.min_snr_gamma {
            None => Ok(per_sample.mean_all()?),
            Some(gamma) => {
                let ac = self.noise.alphas_cumprod();
                let v_pred = sd.scheduler_config.prediction_type == "v_prediction";
                let w: Vec<f32> = t
                    .iter()
                    .map(|&t| {
                        let a = ac[t as usize];
                        let snr = a / (1.0 - a);
                        (snr.min(gamma) / if v_pred { snr + 1.0 } else { snr }) as f32
                    })
                    .collect();
                Ok((per_sample * Tensor::new(w, dev)?)?.mean_all()?)
            }
        }
    }

    /// Trains over `cache` until `max_steps` / `epochs` are done, calling `on_step` after every
    /// optimizer step. Fails (naming the step) on a non-finite loss, before any update is applied.
    pub fn train(
        &mut self,
        sd: &StableDiffusion,
        cache: &LatentCache,
        on_step: &mut dyn FnMut(&StepRecord),
    ) -> Result<()> {
        let n = cache.len();
        if n == 0 {
            bail!("the training set is empty");
        }
        let cfg = self.config.clone();
        let total = cfg.total_steps(n);
        while self.step < total {
            let order = match &self.epoch_order {
                Some(o) if o.len() == n => o.clone(),
                _ => {
                    let mut order: Vec<usize> = (0..n).collect();
                    for i in (1..n).rev() {
                        order.swap(i, self.rng.random_range(0..=i));
                    }
                    self.epoch_order = Some(order.clone());
                    self.group_pos = 0;
                    order
                }
            };
            let batches: Vec<Vec<usize>> =
                order.chunks(cfg.batch_size).map(|c| c.to_vec()).collect();
            for group in batches.chunks(cfg.grad_accum).skip(self.group_pos) {
                if self.step >= total {
                    break;
                }
                let started = Instant::now();
                let lr = cfg.lr_at(self.step, self.epoch, total);
                let mut sum: Option<Vec<Tensor>> = None;
                let mut loss_sum = 0.0;
                let mut rng = self.rng.clone();
                for batch in group {
                    let loss = self.loss(sd, cache, batch, &mut rng)?;
                    let lv = loss.to_scalar::<f32>()? as f64;
                    if !lv.is_finite() {
                        bail!(
                            "loss became {lv} at step {} (epoch {}): training stopped; try a lower learning rate (now {lr:.2e})",
                            self.step + 1,
                            self.epoch
                        );
                    }
                    loss_sum += lv;
                    let grads = loss.backward()?;
                    let g: Vec<Tensor> = self
                        .optimizer
                        .vars
                        .iter()
                        .map(|(name, v)| match grads.get(v.as_tensor()) {
                            Some(g) => Ok(g.clone()),
                            None => bail!("no gradient reached {name}"),
                        })
                        .collect::<Result<_>>()?;
                    sum = Some(match sum {
                        None => g,
                        Some(s) => s
                            .iter()
                            .zip(&g)
                            .map(|(a, b)| a + b)
                            .collect::<candle_core::Result<_>>()?,
                    });
                }
                self.rng = rng;
                let k = group.len() as f64;
                let mut grads: Vec<Tensor> = sum
                    .context("empty step")?
                    .iter()
                    .map(|g| g / k)
                    .collect::<candle_core::Result<_>>()?;
                let norm = grads
                    .iter()
                    .map(|g| g.sqr()?.sum_all()?.to_scalar::<f32>())
                    .sum::<candle_core::Result<f32>>()?
                    .sqrt() as f64;
                if let Some(max) = cfg.max_grad_norm {
                    if norm > max {
                        let s = max / (norm + 1e-6);
                        grads = grads
                            .iter()
                            .map(|g| g * s)
                            .collect::<candle_core::Result<_>>()?;
                    }
                }
                self.optimizer.step(&grads, lr)?;
                self.step += 1;
                self.group_pos += 1;
                let rec = StepRecord {
                    step: self.step,
                    epoch: self.epoch,
                    loss: loss_sum / k,
                    lr,
                    grad_norm: norm,
                    seconds: started.elapsed().as_secs_f64(),
                };
                self.history.push(rec);
                on_step(&rec);
                if let Some((dir, every)) = &self.checkpoints {
                    if *every > 0 && self.step.is_multiple_of(*every) && self.step < total {
                        self.save_checkpoint(&dir.join(checkpoint::file_name(self.step)))?;
                    }
                }
            }
            if self.group_pos >= batches.len().div_ceil(cfg.grad_accum) {
                self.epoch += 1;
                self.epoch_order = None;
                self.group_pos = 0;
            }
        }
        if let Some((dir, _)) = &self.checkpoints {
            self.save_checkpoint(&dir.join(checkpoint::file_name(self.step)))?;
        }
        Ok(())
    }
}
