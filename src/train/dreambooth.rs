//! DreamBooth with prior preservation (Ruiz et al. 2022; diffusers' `train_dreambooth_lora.py`):
//! the instance images teach a rare token ("a photo of sks dog"), class images of the same
//! class made by the base model ("a photo of dog") keep the model's prior for the class.
//!
//! - [`ClassImages::ensure`] tops a class folder up to `num_images` with images the base model
//!   generates from the class prompt: each written atomically as soon as it is done, image `k`
//!   seeded with `seed + k`, so an interrupted run resumes where it stopped and makes the same
//!   images an uninterrupted one would.
//! - [`PriorPreservation`] is the objective: each batch of `B` instance items is followed by
//!   `B` class items (item `i` takes instance `i mod n_instance` and class `i mod n_class`, an
//!   epoch has `max(n_instance, n_class)` items, as diffusers' dataset), and the loss is
//!   `mse(instance half) + prior_loss_weight * mse(class half)`. Min-SNR weighting, when on,
//!   weights the instance half only (diffusers' SDXL DreamBooth script).

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use rand_chacha::ChaCha12Rng;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{Denoising, LatentCache, Objective, ProgressMode};
use crate::pipeline::{GenerateConfig, StableDiffusion};

/// The prior-preservation objective (see the module docs).
pub struct PriorPreservation<'a> {
    /// The denoising loss over the instance images (its settings apply to both halves).
    pub instance: Denoising<'a>,
    /// The class images, encoded with the class prompt.
    pub class: &'a LatentCache,
    /// Weight of the class half's loss (diffusers' `--prior_loss_weight`, default 1).
    pub prior_loss_weight: f64,
}

impl PriorPreservation<'_> {
    /// The instance and class items of a batch of epoch items: `[instance..., class...]`.
    pub fn examples(&self, batch: &[usize]) -> Vec<(&LatentCache, usize)> {
        let (ni, nc) = (self.instance.cache.len().max(1), self.class.len().max(1));
        let inst = batch.iter().map(|&i| (self.instance.cache, i % ni));
        let class = batch.iter().map(|&i| (self.class, i % nc));
        inst.chain(class).collect()
    }

    /// The loss of a batch and its two parts `(instance, prior)`, each a scalar tensor.
    pub fn loss_parts(
        &self,
        batch: &[usize],
        rng: &mut ChaCha12Rng,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (mse, t) = self.instance.per_sample(&self.examples(batch), rng)?;
        let b = batch.len();
        let instance = self
            .instance
            .weighted_mean(&mse.narrow(0, 0, b)?, &t[..b])?;
        let prior = mse.narrow(0, b, b)?.mean_all()?;
        let total = (&instance + (&prior * self.prior_loss_weight)?)?;
        Ok((total, instance, prior))
    }
}

impl Objective for PriorPreservation<'_> {
    fn len(&self) -> usize {
        if self.class.is_empty() {
            return 0;
        }
        self.instance.cache.len().max(self.class.len())
    }

    fn loss(&self, batch: &[usize], rng: &mut ChaCha12Rng) -> Result<Tensor> {
        Ok(self.loss_parts(batch, rng)?.0)
    }

    /// Batches follow the instance images' buckets.
    fn buckets(&self) -> Option<Vec<usize>> {
        let b = self.instance.buckets()?;
        Some((0..self.len()).map(|i| b[i % b.len()]).collect())
    }
}

/// A class folder and how to fill it (diffusers' `--class_data_dir`, `--class_prompt`,
/// `--num_class_images`; generation uses [`GenerateConfig`]'s sampler and defaults).
#[derive(Debug, Clone)]
pub struct ClassImages {
    /// Created when missing; images already there count towards `num_images`.
    pub dir: PathBuf,
    /// The caption of every class image and the prompt that generates them.
    pub prompt: String,
    /// Images wanted (diffusers' default 100). A folder holding more uses the first
    /// `num_images` in path order.
    pub num_images: usize,
    /// Generation: prompt, steps, guidance, scheduler, size, seed (image `k` uses `seed + k`).
    pub generation: GenerateConfig,
}

/// What [`ClassImages::ensure`] found and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClassImagesReport {
    /// Images in the folder before generating.
    pub existing: usize,
    /// Images generated now, in order.
    pub generated: Vec<PathBuf>,
}

impl ClassImages {
    /// The file name of generated class image `k`.
    pub fn file_name(k: usize) -> String {
        format!("class-{k:05}.png")
    }

    /// Generates the missing class images with `sd` (the base model: call it before any LoRA
    /// is applied), reporting progress through `out` (see [`super::progress::to_stderr`]).
    pub fn ensure(
        &self,
        sd: &StableDiffusion,
        mode: ProgressMode,
        out: &mut dyn FnMut(&str),
    ) -> Result<ClassImagesReport> {
        if self.prompt.trim().is_empty() {
            bail!("class images need a class prompt (--class-prompt)");
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create class folder {}", self.dir.display()))?;
        remove_partial_images(&self.dir)?;
        let existing = crate::data::image_paths(&self.dir)?.len();
        let missing = self.num_images.saturating_sub(existing);
        let mut report = ClassImagesReport {
            existing,
            generated: Vec::new(),
        };
        if missing == 0 {
            return Ok(report);
        }
        let g = &self.generation;
        out(&format!(
            "class images: {existing} in {}, generating {missing} more ({:?}, {}x{}, {} steps, guidance {}) from {:?}",
            self.dir.display(),
            g.scheduler,
            g.width,
            g.height,
            g.steps,
            g.guidance,
            self.prompt
        ));
        let started = Instant::now();
        for (j, k) in (existing..self.num_images).enumerate() {
            let path = self.dir.join(Self::file_name(k));
            if path.exists() {
                bail!(
                    "{} exists but was not counted as an image of {}; move it away",
                    path.display(),
                    self.dir.display()
                );
            }
            let cfg = GenerateConfig {
                prompt: self.prompt.clone(),
                seed: g.seed.wrapping_add(k as u64),
                num_images: 1,
                latents: None,
                ..g.clone()
            };
            let eta = |done: f64| {
                let per = started.elapsed().as_secs_f64() / done.max(1e-9);
                (per, per * (missing as f64 - done))
            };
            let images = sd.generate_with_progress(&cfg, &mut |step, steps| {
                if mode == ProgressMode::Bar {
                    let done = j as f64 + step as f64 / steps.max(1) as f64;
                    let (per, left) = eta(done);
                    out(&format!(
                        "\rclass image {}/{missing} step {step}/{steps} {per:.1} s/image ETA {left:.0} s   ",
                        j + 1
                    ));
                }
            })?;
            let img = images
                .images
                .first()
                .context("the pipeline returned no image")?;
            write_png_atomic(img, &path)?;
            report.generated.push(path);
            if let ProgressMode::Lines { .. } = mode {
                let (per, left) = eta((j + 1) as f64);
                out(&format!(
                    "class image {}/{missing} written ({per:.1} s/image, ETA {left:.0} s)",
                    j + 1
                ));
            }
        }
        if mode == ProgressMode::Bar {
            out("\n");
        }
        Ok(report)
    }
}

/// Writes `img` as PNG to `path` through a temporary file beside it, so a killed run never
/// leaves a partial image that a later run would train on.
fn write_png_atomic(img: &image::RgbImage, path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("class image path has no file name")?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

/// Removes `.class-*.png.tmp` files a killed generation left behind.
fn remove_partial_images(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(".class-") && name.ends_with(".png.tmp") {
            std::fs::remove_file(&p)
                .with_context(|| format!("cannot remove partial image {}", p.display()))?;
        }
    }
    Ok(())
}
