//! `AutoencoderKL`, Stable Diffusion's VAE (diffusers' names and checkpoint keys): images to a
//! diagonal Gaussian over latents (mean and log-variance exposed, for caching and training) and
//! latents back to images.

pub mod blocks;
pub mod config;
pub mod ldm_names;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

pub use config::VaeConfig;

use crate::nn::Conv2d;
use crate::weights::{component_dir, open_weights, WeightSource};
use blocks::{Decoder, Encoder};

/// The latent distribution `N(mean, exp(logvar))` of an encoded image.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] like diffusers.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// `mean + exp(logvar / 2) · noise` with caller-supplied standard-normal `noise`.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        Ok((&self.mean + (self.logvar.affine(0.5, 0.0)?.exp()? * noise)?)?)
    }
    /// The mean (diffusers' `mode()`).
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }
}

#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dtype: DType,
}

impl AutoencoderKL {
    pub fn new(config: &VaeConfig, ws: &WeightSource) -> Result<Self> {
        config.validate()?;
        let lc = config.latent_channels;
        Ok(Self {
            config: config.clone(),
            encoder: Encoder::load(&ws.pp("encoder"), config)?,
            decoder: Decoder::load(&ws.pp("decoder"), config)?,
            quant_conv: if config.use_quant_conv {
                Some(Conv2d::load(&ws.pp("quant_conv"), 2 * lc, 2 * lc, 1, 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(Conv2d::load(&ws.pp("post_quant_conv"), lc, lc, 1, 1, 0)?)
            } else {
                None
            },
            dtype: ws.dtype(),
        })
    }

    /// Loads `config.json` and `diffusion_pytorch_model[.variant].safetensors` from a diffusers
    /// `vae/` folder (or a pipeline root containing one).
    pub fn load(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let dir = component_dir(dir.as_ref(), "vae");
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let ws = open_weights(&dir, "diffusion_pytorch_model", variant, dtype, device)?;
        Self::new(&config, &ws).with_context(|| format!("loading the VAE from {}", dir.display()))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Images `[B, C, H, W]` in [-1, 1] (H, W multiples of the downsampling factor).
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let (_, c, h, w) = images.dims4().context("VAE input must be [B, C, H, W]")?;
        let f = self.config.downsample_factor();
        if c != self.config.in_channels || h % f != 0 || w % f != 0 {
            bail!(
                "VAE input {:?}: expected {} channels and sides divisible by {f}",
                images.dims(),
                self.config.in_channels
            );
        }
        let mut m = self.encoder.forward(&images.to_dtype(self.dtype)?)?;
        if let Some(q) = &self.quant_conv {
            m = q.forward(&m)?;
        }
        let lc = self.config.latent_channels;
        Ok(DiagonalGaussian {
            mean: m.narrow(1, 0, lc)?,
            logvar: m.narrow(1, lc, lc)?.clamp(-30.0, 20.0)?,
        })
    }

    /// Latents `[B, latent_channels, h, w]` (unscaled) -> images (about [-1, 1]).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = latents.dims4().context("latents must be [B, C, h, w]")?;
        if c != self.config.latent_channels {
            bail!(
                "latents have {c} channels, the VAE expects {}",
                self.config.latent_channels
            );
        }
        let mut z = latents.to_dtype(self.dtype)?;
        if let Some(p) = &self.post_quant_conv {
            z = p.forward(&z)?;
        }
        self.decoder.forward(&z)
    }

    /// `(z - shift) · scaling_factor`: what the UNet works on.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let s = self.config.scaling_factor;
        Ok(match self.config.shift_factor {
            Some(sh) => z.affine(s, -sh * s)?,
            None => (z * s)?,
        })
    }

    /// Inverse of [`Self::scale_latents`].
    pub fn unscale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let s = self.config.scaling_factor;
        Ok(match self.config.shift_factor {
            Some(sh) => z.affine(1.0 / s, sh)?,
            None => (z / s)?,
        })
    }
}
