//! Dynamic loss scaling for f16 training (PyTorch's `torch.amp.GradScaler`): the loss is
//! multiplied by a large scale before backward so that small gradients flowing back through
//! f16 activations do not underflow to zero; the gradients are divided by it again before
//! clipping and AdamW. A step whose unscaled gradients hold an inf or NaN (the scale was too
//! large) is skipped and the scale halved; after `growth_interval` clean steps in a row it
//! doubles. bf16 has f32's exponent range and needs none of this.

use serde::{Deserialize, Serialize};

/// When the trainer scales the loss ([`super::TrainConfig::loss_scaling`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum LossScaling {
    /// Dynamic scaling when the model's weights (and so its activations) are f16, else none.
    #[default]
    Auto,
    /// Never scale.
    Off,
    /// Always scale dynamically.
    Dynamic,
}

/// The scaler's settings and state (saved in checkpoints, so a resumed run continues with the
/// same scale). `Default`: PyTorch's (initial scale 2^16, growth 2 after 2,000 clean steps,
/// backoff 0.5).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: usize,
    /// Clean steps since the scale last changed.
    pub growth_tracker: usize,
    /// Steps skipped so far because their gradients overflowed.
    pub skipped: usize,
}

impl Default for GradScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            growth_tracker: 0,
            skipped: 0,
        }
    }
}

impl GradScaler {
    /// After a step: `found_inf` (the unscaled gradients were not all finite, so the step was
    /// skipped) halves the scale; otherwise the clean-step count grows, doubling the scale when
    /// it reaches `growth_interval`.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
            self.skipped += 1;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker >= self.growth_interval {
                self.scale *= self.growth_factor;
                self.growth_tracker = 0;
            }
        }
    }
}
