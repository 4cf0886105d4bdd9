//! The one training engine. [`Trainer`] holds the state (config, AdamW, step, epoch plan, RNG,
//! history); [`Trainer::run`] drives any [`Objective`] through epochs of shuffled batches with
//! gradient accumulation, clipping, the LR schedule and AdamW ([`step`]), calling
//! [`StepHook`]s after each optimizer step (checkpoints, metrics CSV, progress, samples).
//! `sd-lora train`, `demo`, `pretrain-tiny` (VAE and UNet phases), the notebooks and the
//! training benchmark all run through it; [`Trainer::train`] is the denoising LoRA case.

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod dreambooth;
pub mod hooks;
pub mod memory;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod progress;
pub mod scaler;
pub mod step;

use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};

pub use cache::{CacheStats, LatentCache};
pub use config::{LrSchedule, LrSchedulerKind, TrainConfig};
pub use dreambooth::{ClassImages, ClassImagesReport, PriorPreservation};
pub use hooks::{Checkpoints, OnStep, StepHook};
pub use metrics::{read_metrics, MetricsCsv};
pub use objective::{Denoising, Objective};
pub use optim::AdamW;
pub use progress::{Progress, ProgressMode};
pub use scaler::{GradScaler, LossScaling};

use crate::lora::LoraModel;
use crate::pipeline::StableDiffusion;

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

/// The trainer: the engine's whole state. Plain owned data: keep it across notebook cells.
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
    pub(crate) rng: rand_chacha::ChaCha12Rng,
    /// Dynamic loss scaling (f16 training; see [`scaler`]). None = off.
    pub scaler: Option<GradScaler>,
}

impl Trainer {
    /// A trainer for the LoRA tensors of `sd.unet` (inject or load LoRA first), and of
    /// `sd.text_encoder` when `config.train_text_encoder` (named `text_encoder.<var>`, trained
    /// at `config.text_encoder_lr`).
    pub fn new(sd: &StableDiffusion, config: TrainConfig) -> Result<Self> {
        let mut te = Vec::new();
        if config.train_text_encoder {
            te = sd.text_encoder.lora_vars()?;
            if te.is_empty() {
                bail!(
                    "train_text_encoder is set but the text encoder has no LoRA adapters: inject them first (sd.text_encoder.inject_lora(&cfg.for_text_encoder(TEXT_INJECTABLE), ..))"
                );
            }
        }
        let te = te
            .into_iter()
            .map(|(n, v)| (format!("text_encoder.{n}"), v))
            .collect();
        let auto = sd.dtype == candle_core::DType::F16;
        let mut t = Self::for_var_groups(config, vec![sd.unet.lora_vars()?, te])?;
        if t.config.loss_scaling == LossScaling::Auto && auto {
            t.scaler = Some(GradScaler::default());
        }
        Ok(t)
    }

    /// A trainer for parameter groups: group 0 at `config.lr`, group 1 at
    /// `config.text_encoder_lr` (see [`TrainConfig::group_lrs`]).
    pub fn for_var_groups(
        config: TrainConfig,
        groups: Vec<Vec<(String, candle_core::Var)>>,
    ) -> Result<Self> {
        if groups.len() > 2 {
            bail!(
                "{} parameter groups; the schedule has rates for 2",
                groups.len()
            );
        }
        let ids: Vec<usize> = groups
            .iter()
            .enumerate()
            .flat_map(|(g, v)| std::iter::repeat_n(g, v.len()))
            .collect();
        let mut t = Self::for_vars(config, groups.into_iter().flatten().collect())?;
        t.optimizer.groups = ids;
        Ok(t)
    }

    /// A trainer for an explicit list of tensors, e.g. every UNet weight in full-parameter
    /// mode ([`crate::unet::UNet2DConditionModel::new_trainable`]); the loss is the same.
    pub fn with_vars(
        _sd: &StableDiffusion,
        config: TrainConfig,
        vars: Vec<(String, candle_core::Var)>,
    ) -> Result<Self> {
        Self::for_vars(config, vars)
    }

    /// A trainer for `vars` under any [`Objective`] (see [`Trainer::run`]).
    pub fn for_vars(config: TrainConfig, vars: Vec<(String, candle_core::Var)>) -> Result<Self> {
        if vars.is_empty() {
            bail!("nothing to train: inject LoRA or build the UNet in full-parameter mode");
        }
        config.validate()?;
        let config_scaling = config.loss_scaling;
        let optimizer = AdamW::new(vars, config.betas, config.eps, config.weight_decay)?;
        Ok(Self {
            rng: rand_chacha::ChaCha12Rng::seed_from_u64(config.seed),
            config,
            optimizer,
            step: 0,
            epoch: 0,
            history: Vec::new(),
            epoch_order: None,
            group_pos: 0,
            scaler: (config_scaling == LossScaling::Dynamic).then(GradScaler::default),
        })
    }

    /// Denoising loss of `sd.unet` on examples `idx` of `cache` (see [`Denoising`]), drawing
    /// flips, latent samples, noise and timesteps from `rng`.
    pub fn loss<R: Rng>(
        &self,
        sd: &StableDiffusion,
        cache: &LatentCache,
        idx: &[usize],
        rng: &mut R,
    ) -> Result<Tensor> {
        Denoising::new(sd, cache, &self.config)?.loss_with(idx, rng)
    }

    /// Trains `sd.unet`'s trainable tensors on `cache` with the denoising loss until
    /// `max_steps` / `epochs` are done, calling `on_step` after every optimizer step.
    pub fn train(
        &mut self,
        sd: &StableDiffusion,
        cache: &LatentCache,
        on_step: &mut dyn FnMut(&StepRecord),
    ) -> Result<()> {
        self.train_with(sd, cache, &mut [&mut OnStep(on_step)])
    }

    /// [`Trainer::train`] with any hooks (checkpoints, metrics CSV, progress, samples).
    pub fn train_with(
        &mut self,
        sd: &StableDiffusion,
        cache: &LatentCache,
        hooks: &mut [&mut dyn StepHook],
    ) -> Result<()> {
        let objective = Denoising::new(sd, cache, &self.config)?;
        self.run(&objective, hooks)
    }

    /// The engine: optimizer steps over shuffled epochs of `objective` until the configured
    /// steps are done, each followed by every hook. Fails, naming the step, on a non-finite
    /// loss before any update of that step is applied.
    pub fn run(
        &mut self,
        objective: &dyn Objective,
        hooks: &mut [&mut dyn StepHook],
    ) -> Result<()> {
        let n = objective.len();
        if n == 0 {
            bail!("the training set is empty");
        }
        let total = self.total_steps(objective);
        let buckets = objective.buckets();
        while self.step < total {
            let groups = match &buckets {
                Some(b) => self.bucket_plan(b),
                None => self.epoch_plan(n),
            };
            for group in groups.iter().skip(self.group_pos) {
                if self.step >= total {
                    break;
                }
                let rec = self.optimizer_step(objective, group, total)?;
                for h in hooks.iter_mut() {
                    h.after_step(self, &rec, total)?;
                }
            }
            if self.group_pos >= groups.len() {
                self.epoch += 1;
                self.epoch_order = None;
                self.group_pos = 0;
            }
        }
        for h in hooks.iter_mut() {
            h.after_training(self)?;
        }
        Ok(())
    }
}
