//! `SchedulerConfig`: diffusers' `scheduler/scheduler_config.json`, and the noise schedule
//! (betas, cumulative alphas) every scheduler shares.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

fn d_train() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_linear() -> String {
    "linear".into()
}
fn d_one() -> f64 {
    1.0
}
fn d_true() -> bool {
    true
}
fn d_eps() -> String {
    "epsilon".into()
}
fn d_fixed_small() -> String {
    "fixed_small".into()
}

/// Noise-schedule settings, field names as in diffusers. `Default` is diffusers' default;
/// [`SchedulerConfig::sd_v1_5`] is Stable Diffusion 1.5's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "d_train")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    /// `linear`, `scaled_linear` (SD) or `squaredcos_cap_v2`.
    #[serde(default = "d_linear")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// Added to every inference timestep ("leading" spacing). SD: 1.
    #[serde(default)]
    pub steps_offset: usize,
    /// Clamp the predicted x0 to +-`clip_sample_range` (DDPM/DDIM; SD sets false).
    #[serde(default = "d_true")]
    pub clip_sample: bool,
    #[serde(default = "d_one")]
    pub clip_sample_range: f64,
    /// DDIM: alpha of the step after the last is 1 (true) or `alphas_cumprod[0]` (false, SD).
    #[serde(default = "d_true")]
    pub set_alpha_to_one: bool,
    /// `epsilon` (SD 1.x) or `v_prediction` (SD 2.x 768); `sample` is not supported.
    #[serde(default = "d_eps")]
    pub prediction_type: String,
    /// `leading`, `trailing` or `linspace`. When absent each scheduler uses its diffusers
    /// default: `leading` for DDPM/DDIM, `linspace` for Euler-ancestral.
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    /// DDPM sampling noise: `fixed_small` (default) or `fixed_large`.
    #[serde(default = "d_fixed_small")]
    pub variance_type: String,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

impl SchedulerConfig {
    /// Stable Diffusion 1.5 (`scheduler/scheduler_config.json`): 1000 steps, scaled-linear betas
    /// 0.00085..0.012, offset 1, epsilon prediction.
    pub fn sd_v1_5() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            steps_offset: 1,
            clip_sample: false,
            set_alpha_to_one: false,
            ..Self::default()
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scheduler config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid scheduler config", path.display()))?;
        cfg.validate()
            .with_context(|| format!("unsupported scheduler config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_train_timesteps == 0 {
            bail!("`num_train_timesteps` must be positive");
        }
        if !matches!(
            self.beta_schedule.as_str(),
            "linear" | "scaled_linear" | "squaredcos_cap_v2"
        ) && self.trained_betas.is_none()
        {
            bail!(
                "`beta_schedule` `{}` is not supported (linear, scaled_linear, squaredcos_cap_v2)",
                self.beta_schedule
            );
        }
        if !matches!(self.prediction_type.as_str(), "epsilon" | "v_prediction") {
            bail!(
                "`prediction_type` `{}` is not supported (epsilon, v_prediction)",
                self.prediction_type
            );
        }
        if let Some(sp) = &self.timestep_spacing {
            if !matches!(sp.as_str(), "leading" | "trailing" | "linspace") {
                bail!("`timestep_spacing` `{sp}` is not supported (leading, trailing, linspace)");
            }
        }
        if !matches!(self.variance_type.as_str(), "fixed_small" | "fixed_large") {
            bail!(
                "`variance_type` `{}` is not supported (fixed_small, fixed_large)",
                self.variance_type
            );
        }
        if self.thresholding || self.rescale_betas_zero_snr {
            bail!("`thresholding` and `rescale_betas_zero_snr` are not supported");
        }
        Ok(())
    }

    /// Betas as diffusers computes them (float32), widened to f64.
    pub fn betas(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        if let Some(b) = &self.trained_betas {
            return b.iter().map(|&x| x as f32 as f64).collect();
        }
        let lin = |a: f64, b: f64| -> Vec<f64> {
            (0..n)
                .map(|i| {
                    if n == 1 {
                        a
                    } else {
                        a + (b - a) * i as f64 / (n - 1) as f64
                    }
                })
                .collect()
        };
        let betas: Vec<f64> = match self.beta_schedule.as_str() {
            "scaled_linear" => lin(self.beta_start.sqrt(), self.beta_end.sqrt())
                .iter()
                .map(|x| x * x)
                .collect(),
            "squaredcos_cap_v2" => {
                let f = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        (1.0 - f((i + 1) as f64 / n as f64) / f(i as f64 / n as f64)).min(0.999)
                    })
                    .collect()
            }
            _ => lin(self.beta_start, self.beta_end),
        };
        betas.into_iter().map(|x| x as f32 as f64).collect()
    }

    /// `prod_{s<=t} (1 - beta_s)`, accumulated in f32 like diffusers.
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let mut acc = 1f32;
        self.betas()
            .into_iter()
            .map(|b| {
                acc *= 1.0 - b as f32;
                acc as f64
            })
            .collect()
    }

    /// Inference timesteps (descending) for `n` steps with `spacing`. `round`: whether
    /// "linspace" values are rounded to integers (DDPM/DDIM) or kept fractional (Euler).
    pub fn inference_timesteps(&self, n: usize, spacing: &str, round: bool) -> Result<Vec<f64>> {
        let train = self.num_train_timesteps;
        if n == 0 || n > train {
            bail!("number of inference steps must be in 1..={train}, got {n}");
        }
        Ok(match spacing {
            "linspace" => (0..n)
                .rev()
                .map(|i| {
                    let v = if n == 1 {
                        0.0
                    } else {
                        (train - 1) as f64 * i as f64 / (n - 1) as f64
                    };
                    if round {
                        v.round_ties_even()
                    } else {
                        v as f32 as f64
                    }
                })
                .collect(),
            "trailing" => {
                let ratio = train as f64 / n as f64;
                (0..n)
                    .map(|i| ((train as f64 - i as f64 * ratio).round_ties_even() - 1.0).max(0.0))
                    .collect()
            }
            _ => {
                let ratio = train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + self.steps_offset) as f64)
                    .collect()
            }
        })
    }
}
