//! Noise schedulers (diffusers' `DDPMScheduler`, `DDIMScheduler`,
//! `EulerAncestralDiscreteScheduler`): the forward process for training (`add_noise`, targets)
//! and reverse steps for sampling.
//!
//! One owned [`Scheduler`] value covers all three kinds. Steps are addressed by their index in
//! [`Scheduler::timesteps`]; random noise for the stochastic samplers (DDPM, Euler-ancestral) is
//! passed in, so runs are reproducible and comparable with other implementations.

mod config;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

pub use config::SchedulerConfig;

/// The sampling algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedulerKind {
    /// Ancestral DDPM (stochastic); the tutorial's sampler.
    Ddpm,
    /// DDIM with eta = 0 (deterministic).
    Ddim,
    /// Euler-ancestral (stochastic), good images in 20-30 steps.
    #[value(name = "euler-a", aliases = ["euler_a", "euler-ancestral", "euler_ancestral"])]
    EulerAncestral,
}

impl std::str::FromStr for SchedulerKind {
    type Err = anyhow::Error;
    /// The command line's names (`ddim`, `ddpm`, `euler-a` and its aliases), any case.
    fn from_str(s: &str) -> Result<Self> {
        <Self as clap::ValueEnum>::from_str(s, true)
            .map_err(|_| anyhow::anyhow!("unknown scheduler `{s}` (ddim, ddpm, euler-a)"))
    }
}

/// A scheduler with its inference timesteps set.
#[derive(Debug, Clone)]
pub struct Scheduler {
    pub kind: SchedulerKind,
    pub config: SchedulerConfig,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    /// Euler: sigma per inference step, with a trailing 0.
    sigmas: Vec<f64>,
}

fn sqrt_vec(v: impl Iterator<Item = f64>, x: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = v.map(|a| a as f32).collect();
    Ok(Tensor::new(v, x.device())?.to_dtype(x.dtype())?)
}

impl Scheduler {
    /// A scheduler of `kind` with `steps` inference steps.
    pub fn new(kind: SchedulerKind, config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.validate()?;
        let alphas_cumprod = config.alphas_cumprod();
        let mut s = Self {
            kind,
            config: config.clone(),
            alphas_cumprod,
            timesteps: vec![],
            sigmas: vec![],
        };
        s.set_timesteps(steps)?;
        Ok(s)
    }

    pub fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let euler = self.kind == SchedulerKind::EulerAncestral;
        self.timesteps = self
            .config
            .inference_timesteps(steps, self.spacing(), !euler)?;
        if euler {
            let train: Vec<f64> = self
                .alphas_cumprod
                .iter()
                .map(|a| ((1.0 - a) / a).sqrt())
                .collect();
            self.sigmas = self
                .timesteps
                .iter()
                .map(|&t| {
                    // linear interpolation over the training sigmas (np.interp)
                    let lo = (t.floor() as usize).min(train.len() - 1);
                    let hi = (lo + 1).min(train.len() - 1);
                    let f = t - lo as f64;
                    (train[lo] * (1.0 - f) + train[hi] * f) as f32 as f64
                })
                .chain(std::iter::once(0.0))
                .collect();
        }
        Ok(())
    }

    /// The timestep spacing in effect (the config's, else this kind's diffusers default).
    pub fn spacing(&self) -> &str {
        match (&self.config.timestep_spacing, self.kind) {
            (Some(s), _) => s,
            (None, SchedulerKind::EulerAncestral) => "linspace",
            (None, _) => "leading",
        }
    }

    /// Descending timesteps, one per inference step (what the UNet is given).
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// Standard deviation of the initial latent noise.
    pub fn init_noise_sigma(&self) -> f64 {
        match self.kind {
            SchedulerKind::EulerAncestral => {
                let max = self.sigmas.iter().cloned().fold(0.0, f64::max);
                if self.spacing() == "leading" {
                    (max * max + 1.0).sqrt()
                } else {
                    max
                }
            }
            _ => 1.0,
        }
    }

    /// Whether `step` needs a noise tensor.
    pub fn needs_noise(&self) -> bool {
        self.kind != SchedulerKind::Ddim
    }

    /// Scales the UNet input at step `i` (Euler: divides by `sqrt(sigma^2 + 1)`).
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        match self.kind {
            SchedulerKind::EulerAncestral => {
                let sigma = self.sigma(i)?;
                Ok((sample / (sigma * sigma + 1.0).sqrt())?)
            }
            _ => Ok(sample.clone()),
        }
    }

    fn sigma(&self, i: usize) -> Result<f64> {
        match self.sigmas.get(i) {
            Some(&s) if i < self.timesteps.len() => Ok(s),
            _ => bail!(
                "step index {i} out of range ({} steps)",
                self.timesteps.len()
            ),
        }
    }

    fn alpha(&self, t: f64) -> f64 {
        if t < 0.0 {
            1.0
        } else {
            self.alphas_cumprod[(t as usize).min(self.alphas_cumprod.len() - 1)]
        }
    }

    /// `(x0, eps)` predicted from the model output at cumulative alpha `a`.
    fn predict(&self, out: &Tensor, sample: &Tensor, a: f64) -> Result<(Tensor, Tensor)> {
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        let (x0, eps) = if self.config.prediction_type == "v_prediction" {
            (
                ((sample * sa)? - (out * sb)?)?,
                ((out * sa)? + (sample * sb)?)?,
            )
        } else {
            (((sample - (out * sb)?)? / sa)?, out.clone())
        };
        let x0 = if self.config.clip_sample && self.kind != SchedulerKind::EulerAncestral {
            let r = self.config.clip_sample_range;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        Ok((x0, eps))
    }

    /// One reverse step from inference step `i`: the sample at the next (lower) timestep.
    /// `noise` (same shape as `sample`, standard normal) is required when [`Self::needs_noise`].
    pub fn step(
        &self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        if i >= n {
            bail!("step index {i} out of range ({n} steps)");
        }
        let out = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        let need = |noise: Option<&Tensor>| -> Result<Tensor> {
            match noise {
                Some(z) => Ok(z.to_dtype(DType::F32)?),
                None => bail!(
                    "the {:?} scheduler needs a noise tensor for each step",
                    self.kind
                ),
            }
        };
        let t = self.timesteps[i];
        let prev = match self.kind {
            SchedulerKind::Ddim => {
                let prev_t = t - (self.config.num_train_timesteps / n) as f64;
                let a = self.alpha(t);
                let a_prev = if prev_t >= 0.0 {
                    self.alpha(prev_t)
                } else if self.config.set_alpha_to_one {
                    1.0
                } else {
                    self.alphas_cumprod[0]
                };
                let (x0, eps) = self.predict(&out, &x, a)?;
                ((x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?
            }
            SchedulerKind::Ddpm => {
                let prev_t = if i + 1 < n {
                    self.timesteps[i + 1]
                } else {
                    -1.0
                };
                let (a, a_prev) = (self.alpha(t), self.alpha(prev_t));
                let (b, b_prev) = (1.0 - a, 1.0 - a_prev);
                let cur_alpha = a / a_prev;
                let cur_beta = 1.0 - cur_alpha;
                let (x0, _) = self.predict(&out, &x, a)?;
                let mean = ((x0 * (a_prev.sqrt() * cur_beta / b))?
                    + (&x * (cur_alpha.sqrt() * b_prev / b))?)?;
                if t > 0.0 {
                    let var = if self.config.variance_type == "fixed_large" {
                        cur_beta
                    } else {
                        (b_prev / b * cur_beta).max(1e-20)
                    };
                    (mean + (need(noise)? * var.sqrt())?)?
                } else {
                    mean
                }
            }
            SchedulerKind::EulerAncestral => {
                let (sigma, sigma_to) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = if self.config.prediction_type == "v_prediction" {
                    let s2 = sigma * sigma + 1.0;
                    ((&out * (-sigma / s2.sqrt()))? + (&x / s2)?)?
                } else {
                    (&x - (&out * sigma)?)?
                };
                let up = (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to)
                    / (sigma * sigma))
                    .sqrt();
                let down = (sigma_to * sigma_to - up * up).sqrt();
                let derivative = ((&x - x0)? / sigma)?;
                let prev = (&x + (derivative * (down - sigma))?)?;
                (prev + (need(noise)? * up)?)?
            }
        };
        Ok(prev.to_dtype(sample.dtype())?)
    }

    /// Forward process: `sqrt(a_t)·x0 + sqrt(1 - a_t)·noise` with one timestep per sample
    /// (`timesteps [B]`, integer or float values in `0..num_train_timesteps`).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (sa, sb) = self.coefficients(timesteps, x0)?;
        Ok((x0.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?)
    }

    /// v-prediction target `sqrt(a_t)·noise - sqrt(1 - a_t)·x0`.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (sa, sb) = self.coefficients(timesteps, x0)?;
        Ok((noise.broadcast_mul(&sa)? - x0.broadcast_mul(&sb)?)?)
    }

    /// What the UNet should predict during training: the noise (epsilon) or the velocity.
    pub fn training_target(
        &self,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Result<Tensor> {
        if self.config.prediction_type == "v_prediction" {
            self.velocity(x0, noise, timesteps)
        } else {
            Ok(noise.clone())
        }
    }

    /// `(sqrt(a_t), sqrt(1 - a_t))` shaped `[B, 1, 1, ...]` to broadcast against `x`.
    fn coefficients(&self, timesteps: &Tensor, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let t: Vec<f64> = timesteps.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let b = x.dim(0)?;
        if t.len() != b {
            bail!("{} timesteps for a batch of {b}", t.len());
        }
        let max = self.config.num_train_timesteps;
        if let Some(bad) = t.iter().find(|&&v| v < 0.0 || v >= max as f64) {
            bail!("timestep {bad} outside 0..{max}");
        }
        let mut shape = vec![1usize; x.rank()];
        shape[0] = b;
        let a: Vec<f64> = t.iter().map(|&v| self.alpha(v.round())).collect();
        let sa = sqrt_vec(a.iter().map(|a| a.sqrt()), x)?.reshape(shape.clone())?;
        let sb = sqrt_vec(a.iter().map(|a| (1.0 - a).sqrt()), x)?.reshape(shape)?;
        Ok((sa, sb))
    }
}
