//! `VaeConfig`: diffusers' `AutoencoderKL` config (`vae/config.json`).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

fn d3() -> usize {
    3
}
fn d_one() -> usize {
    1
}
fn d4() -> usize {
    4
}
fn d32() -> usize {
    32
}
fn d_scale() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}
fn d_silu() -> String {
    "silu".into()
}

/// Field names as in diffusers. `scaling_factor` (SD 1.x: 0.18215) multiplies latents before
/// the UNet sees them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d3")]
    pub in_channels: usize,
    #[serde(default = "d3")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d4")]
    pub latent_channels: usize,
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_scale")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    /// Stable Diffusion 1.5's VAE.
    pub fn sd_v1_5() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }

    /// A miniature VAE for CPU experiments: 32/64/64 channels, one resnet per level, 8 groups,
    /// factor 4 (64 px images to 16x16x4 latents).
    pub fn tiny() -> Self {
        Self {
            down_block_types: vec!["DownEncoderBlock2D".into(); 3],
            up_block_types: vec!["UpDecoderBlock2D".into(); 3],
            block_out_channels: vec![32, 64, 64],
            layers_per_block: 1,
            norm_num_groups: 8,
            ..Self::sd_v1_5()
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read VAE config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid AutoencoderKL config", path.display()))?;
        cfg.validate()
            .with_context(|| format!("unsupported VAE config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!("`down_block_types`, `up_block_types` and `block_out_channels` must have the same non-zero length");
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            bail!("`down_block_types`: unsupported `{t}` (DownEncoderBlock2D)");
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            bail!("`up_block_types`: unsupported `{t}` (UpDecoderBlock2D)");
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            bail!("`act_fn` `{}` is not supported (silu)", self.act_fn);
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| !c.is_multiple_of(self.norm_num_groups))
        {
            bail!(
                "`block_out_channels` entry {c} is not divisible by `norm_num_groups` {}",
                self.norm_num_groups
            );
        }
        Ok(())
    }

    /// Pixels per latent cell: `2^(levels - 1)` (8 for SD), as diffusers derives it.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}
