//! `TrainConfig`: the trainer's settings. Defaults are the tutorial's.

use serde::{Deserialize, Serialize};

/// Learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum LrSchedule {
    /// The base rate after warm-up.
    Constant,
    /// Cosine from the base rate to `floor` over all optimizer steps, after linear warm-up.
    Cosine { floor: f64 },
    /// The tutorial's `CosineAnnealingLR(T_max = epochs, eta_min)` stepped once per epoch.
    CosineEpoch { eta_min: f64 },
}

impl LrSchedule {
    /// The tutorial's `eta_min` for the per-epoch cosine.
    pub const TUTORIAL_ETA_MIN: f64 = 1e-6;
}

/// `--lr-scheduler`: the schedule families a command line can choose (floors are fixed: the
/// tutorial's 1e-6 for the per-epoch cosine, 0 for the per-step one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LrSchedulerKind {
    /// The tutorial's `CosineAnnealingLR(T_max = epochs, eta_min = 1e-6)`, stepped per epoch.
    CosineEpoch,
    /// Cosine to 0 over all optimizer steps, after the warm-up.
    Cosine,
    /// The base rate after the warm-up.
    Constant,
}

impl LrSchedulerKind {
    /// The family of `schedule`.
    pub const fn of(schedule: &LrSchedule) -> Self {
        match schedule {
            LrSchedule::CosineEpoch { .. } => Self::CosineEpoch,
            LrSchedule::Cosine { .. } => Self::Cosine,
            LrSchedule::Constant => Self::Constant,
        }
    }

    /// The schedule of this family with the command line's fixed floor.
    pub fn schedule(self) -> LrSchedule {
        match self {
            Self::CosineEpoch => LrSchedule::CosineEpoch {
                eta_min: LrSchedule::TUTORIAL_ETA_MIN,
            },
            Self::Cosine => LrSchedule::Cosine { floor: 0.0 },
            Self::Constant => LrSchedule::Constant,
        }
    }
}

/// Trainer settings. `Default` reproduces the tutorial: AdamW lr 1e-4, weight decay 1e-2,
/// 20 epochs, batch 4, gradient accumulation 4, per-epoch cosine to 1e-6, seed 202509.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub lr: f64,
    pub weight_decay: f64,
    /// AdamW betas and epsilon (PyTorch defaults 0.9, 0.999, 1e-8).
    pub betas: (f64, f64),
    pub eps: f64,
    pub epochs: usize,
    /// Train exactly this many optimizer steps (running as many epochs as that takes) instead
    /// of `epochs`.
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    /// Micro-batches per optimizer step; gradients are averaged over them. A partial group at
    /// the end of an epoch still makes a step (averaged over what it has), never carried over.
    pub grad_accum: usize,
    pub schedule: LrSchedule,
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this (None = off). Default 1.0 (diffusers' scripts).
    pub max_grad_norm: Option<f64>,
    /// Min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is common). Default off.
    pub min_snr_gamma: Option<f64>,
    /// Noise offset (adds `offset · N(0, 1)` per sample and channel). Default 0.
    pub noise_offset: f64,
    /// Probability of training an example on the empty caption instead of its own (kohya's
    /// `caption_dropout_rate`, diffusers' `proportion_empty_prompts`). It teaches the
    /// unconditional prediction that classifier-free guidance subtracts; 0.1 is common when
    /// training a model from scratch. Default 0 (LoRA fine-tunes keep the base model's).
    #[serde(default)]
    pub caption_dropout: f64,
    /// Also train the text encoder's LoRA adapters (kohya's default; diffusers'
    /// `--train_text_encoder`): captions are then encoded at every step instead of once.
    /// Default false (the tutorial trains the UNet only).
    #[serde(default)]
    pub train_text_encoder: bool,
    /// The text encoder's learning rate (kohya's `--text_encoder_lr`; it follows the same
    /// schedule from its own base rate). Default None = `lr`.
    #[serde(default)]
    pub text_encoder_lr: Option<f64>,
    /// Shuffle each caption's comma-separated tags at every step (kohya's `shuffle_caption`;
    /// captions are then encoded every step). Default false.
    #[serde(default)]
    pub shuffle_caption: bool,
    /// Leading tags kept in place by shuffling and tag dropout (kohya's `keep_tokens`).
    /// Default 0.
    #[serde(default)]
    pub keep_tokens: usize,
    /// Probability of dropping each (not kept) tag at every step (kohya's
    /// `caption_tag_dropout_rate`). Default 0.
    #[serde(default)]
    pub caption_tag_dropout: f64,
    /// Recompute the UNet's resnets and transformer blocks (and the text encoder's layers when
    /// it trains) during backward instead of keeping their activations (diffusers'
    /// `--gradient_checkpointing`): less memory, about one more forward pass per step, the
    /// same gradients. Default false.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Dynamic loss scaling ([`super::scaler`]): `Auto` (the default) scales when the model's
    /// weights are f16 ([`super::Trainer::new`]), `Off` never, `Dynamic` always.
    #[serde(default)]
    pub loss_scaling: super::LossScaling,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            weight_decay: 1e-2,
            betas: (0.9, 0.999),
            eps: 1e-8,
            epochs: 20,
            max_steps: None,
            batch_size: 4,
            grad_accum: 4,
            schedule: LrSchedule::CosineEpoch {
                eta_min: LrSchedule::TUTORIAL_ETA_MIN,
            },
            warmup_steps: 0,
            max_grad_norm: Some(1.0),
            min_snr_gamma: None,
            noise_offset: 0.0,
            caption_dropout: 0.0,
            train_text_encoder: false,
            text_encoder_lr: None,
            shuffle_caption: false,
            keep_tokens: 0,
            caption_tag_dropout: 0.0,
            gradient_checkpointing: false,
            loss_scaling: super::LossScaling::Auto,
            seed: 202509,
        }
    }
}

impl TrainConfig {
    /// Refuses settings no run can use, naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.batch_size == 0 || self.grad_accum == 0 {
            anyhow::bail!("batch size and gradient accumulation must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            anyhow::bail!("learning rate must be a positive number, got {}", self.lr);
        }
        if let Some(lr) = self.text_encoder_lr {
            if !(lr.is_finite() && lr > 0.0) {
                anyhow::bail!("text encoder learning rate must be a positive number, got {lr}");
            }
        }
        if !(0.0..1.0).contains(&self.caption_tag_dropout) {
            anyhow::bail!(
                "caption tag dropout is a probability in [0, 1), got {}",
                self.caption_tag_dropout
            );
        }
        if !(0.0..1.0).contains(&self.caption_dropout) {
            anyhow::bail!(
                "caption dropout is a probability in [0, 1), got {}",
                self.caption_dropout
            );
        }
        Ok(())
    }

    /// Optimizer steps in one epoch of `n` examples.
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.batch_size.max(1))
            .div_ceil(self.grad_accum.max(1))
    }

    /// Total optimizer steps for `n` examples.
    pub fn total_steps(&self, n: usize) -> usize {
        self.max_steps
            .unwrap_or(self.epochs * self.steps_per_epoch(n))
    }

    /// Learning rate at optimizer step `step` (0-based) in epoch `epoch`, `total` steps in all.
    pub fn lr_at(&self, step: usize, epoch: usize, total: usize) -> f64 {
        self.lr_from(self.lr, step, epoch, total)
    }

    /// The rate of each parameter group at a step: `[UNet, text encoder]` (the text encoder's
    /// follows the schedule from its own base rate, like PyTorch param groups).
    pub fn group_lrs(&self, step: usize, epoch: usize, total: usize) -> [f64; 2] {
        let te = self.text_encoder_lr.unwrap_or(self.lr);
        [
            self.lr_at(step, epoch, total),
            self.lr_from(te, step, epoch, total),
        ]
    }

    /// The schedule from base rate `base`.
    fn lr_from(&self, base: f64, step: usize, epoch: usize, total: usize) -> f64 {
        if step < self.warmup_steps {
            return base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            LrSchedule::Constant => base,
            LrSchedule::Cosine { floor } => {
                let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
                let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
                floor + (base - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
            LrSchedule::CosineEpoch { eta_min } => {
                let t = epoch as f64 / self.epochs.max(1) as f64;
                eta_min + (base - eta_min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}
