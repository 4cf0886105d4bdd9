//! Text-to-image generation: classifier-free guidance with a negative prompt, seeded latents
//! (or latents from a file), DDIM / DDPM / Euler-ancestral, decoded to RGB images.

use crate::weights::randn_from;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use std::path::{Path, PathBuf};

use super::StableDiffusion;
use crate::scheduler::{Scheduler, SchedulerKind};

/// Settings of one generation call. `Default` matches diffusers' pipeline defaults where they
/// exist (50 steps there; 30 here with DDIM, which is plenty), 512 px.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub prompt: String,
    /// What to steer away from; "" = unconditional (diffusers' default).
    pub negative_prompt: String,
    /// Default 30.
    pub steps: usize,
    /// Classifier-free guidance scale; <= 1 disables guidance. Default 7.5.
    pub guidance: f64,
    /// Default DDIM.
    pub scheduler: SchedulerKind,
    /// Seeds the initial latents and the samplers' noise. Default 0.
    pub seed: u64,
    /// Multiples of the VAE factor (8 for SD). Default 512 x 512.
    pub width: usize,
    pub height: usize,
    /// Images per call. Default 1.
    pub num_images: usize,
    /// Initial latents `[num_images, C, H/f, W/f]` instead of seeded noise (they are scaled by
    /// the scheduler's initial sigma, like diffusers does).
    pub latents: Option<Tensor>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 30,
            guidance: 7.5,
            scheduler: SchedulerKind::Ddim,
            seed: 0,
            width: 512,
            height: 512,
            num_images: 1,
            latents: None,
        }
    }
}

/// Generated images (RGB, 8 bit) with the float pixels they came from.
#[derive(Debug, Clone)]
pub struct Images {
    pub images: Vec<image::RgbImage>,
    /// `[N, H, W, 3]` in [0, 1] (diffusers' `output_type="np"`).
    pub pixels: Tensor,
}

impl Images {
    /// Writes the images as PNG: one image to `path` itself; several to `stem-0.png`,
    /// `stem-1.png`, ... beside it. Returns the paths written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
        let path = path.as_ref();
        let paths: Vec<PathBuf> = if self.images.len() == 1 {
            vec![path.to_path_buf()]
        } else {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "image".into());
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_string())
                .unwrap_or_else(|| "png".into());
            (0..self.images.len())
                .map(|i| path.with_file_name(format!("{stem}-{i}.{ext}")))
                .collect()
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        for (img, p) in self.images.iter().zip(&paths) {
            img.save(p)
                .with_context(|| format!("cannot write {}", p.display()))?;
        }
        Ok(paths)
    }
}

impl StableDiffusion {
    /// Generates `cfg.num_images` images for `cfg.prompt` (the tutorial's `generate_images`).
    #[doc(alias = "generate_images")]
    pub fn generate(&self, cfg: &GenerateConfig) -> Result<Images> {
        self.generate_with_progress(cfg, &mut |_, _| {})
    }

    /// As [`Self::generate`], calling `progress(step, steps)` after every denoising step.
    pub fn generate_with_progress(
        &self,
        cfg: &GenerateConfig,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Images> {
        let f = self.vae_scale_factor();
        if cfg.width == 0
            || cfg.height == 0
            || !cfg.width.is_multiple_of(f)
            || !cfg.height.is_multiple_of(f)
        {
            bail!(
                "width and height must be positive multiples of {f} (the VAE factor), got {}x{}",
                cfg.width,
                cfg.height
            );
        }
        if cfg.num_images == 0 {
            bail!("num_images must be at least 1");
        }
        let n = cfg.num_images;
        let lc = self.unet.config.in_channels;
        let shape = [n, lc, cfg.height / f, cfg.width / f];
        let sched = Scheduler::new(cfg.scheduler, &self.scheduler_config, cfg.steps)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let latents = match &cfg.latents {
            Some(l) => {
                if l.dims() != shape {
                    bail!("initial latents have shape {:?}, expected {shape:?} for {n} image(s) of {}x{}", l.dims(), cfg.width, cfg.height);
                }
                l.to_device(&self.device)?.to_dtype(DType::F32)?
            }
            None => randn_from(&mut rng, &shape, &self.device)?,
        };
        let mut latents = (latents * sched.init_noise_sigma())?;

        let guided = cfg.guidance > 1.0;
        let cond = self.encode_prompts(&vec![cfg.prompt.as_str(); n])?;
        let ctx = if guided {
            let uncond = self.encode_prompts(&vec![cfg.negative_prompt.as_str(); n])?;
            Tensor::cat(&[uncond, cond], 0)?
        } else {
            cond
        };
        let steps = sched.timesteps().len();
        for (i, &t) in sched.timesteps().iter().enumerate() {
            let x = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let x = sched.scale_model_input(&x, i)?;
            let tt = Tensor::new(vec![t as f32; x.dim(0)?], &self.device)?;
            let pred = self.unet.forward(&x, &tt, &ctx)?.to_dtype(DType::F32)?;
            let pred = if guided {
                let (u, c) = (pred.narrow(0, 0, n)?, pred.narrow(0, n, n)?);
                (&u + ((c - &u)? * cfg.guidance)?)?
            } else {
                pred
            };
            let noise = if sched.needs_noise() {
                Some(randn_from(&mut rng, &shape, &self.device)?)
            } else {
                None
            };
            latents = sched.step(&pred, i, &latents, noise.as_ref())?;
            progress(i + 1, steps);
        }
        self.decode_latents(&latents)
    }

    /// Scaled latents -> images.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Images> {
        let z = self.vae.unscale_latents(latents)?;
        let x = self.vae.decode(&z)?.to_dtype(DType::F32)?;
        let pixels = ((x / 2.0)? + 0.5)?
            .clamp(0.0, 1.0)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        let (n, h, w, _) = pixels.dims4()?;
        let bytes: Vec<u8> = (pixels.clone() * 255.0)?
            .round()?
            .flatten_all()?
            .to_dtype(DType::U8)?
            .to_vec1()?;
        let images = (0..n)
            .map(|i| {
                let chunk = bytes[i * h * w * 3..(i + 1) * h * w * 3].to_vec();
                image::RgbImage::from_raw(w as u32, h as u32, chunk).context("image buffer size")
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Images {
            images,
            pixels: pixels.to_device(&Device::Cpu)?,
        })
    }

    /// The same seeds at several LoRA strengths (0 = base model): one [`Images`] per strength.
    /// Replaces the tutorial's second UNet: the adapter is only rescaled.
    pub fn generate_at_strengths(
        &mut self,
        cfg: &GenerateConfig,
        strengths: &[f64],
    ) -> Result<Vec<Images>> {
        let mut out = Vec::new();
        for &s in strengths {
            self.set_lora_scale(s)?;
            out.push(self.generate(cfg)?);
        }
        self.set_lora_scale(1.0)?;
        Ok(out)
    }
}
