//! Checks and samples on the tiny model: held-out scene prompts, one seeded sample per
//! prompt, the colour check ("does a red circle come out red?") and the VAE round trip. Used by
//! the demo, the pre-training job and the notebooks.

use anyhow::{Context, Result};

use super::metrics::dominant_colour;
use super::scenes::{scenes, COLOURS};
use crate::pipeline::{GenerateConfig, StableDiffusion};

/// `n` captions of held-out scenes (seed 99), e.g. "a large red circle on a sky background".
pub fn demo_prompts(n: usize) -> Vec<String> {
    scenes(n, 99).iter().map(|s| s.caption()).collect()
}

/// The fraction of `images` whose foreground colour (see [`super::metrics::dominant_colour`]) is
/// the colour named in the prompt beside it.
pub fn colour_match(images: &[image::RgbImage], prompts: &[String]) -> f64 {
    let hits = images
        .iter()
        .zip(prompts)
        .filter(|(img, p)| {
            dominant_colour(img).is_some_and(|c| p.split_whitespace().any(|w| w == COLOURS[c].0))
        })
        .count();
    hits as f64 / images.len().max(1) as f64
}

/// The base-quality check: `n` held-out scene captions (scene seed `seed`), one sample each
/// (seed = index, `steps` DDIM steps, guidance 7.5), and the fraction whose foreground colour
/// (see [`super::metrics::dominant_colour`]) is the prompt's.
pub fn colour_accuracy(sd: &StableDiffusion, n: usize, seed: u64, steps: usize) -> Result<f64> {
    let prompts: Vec<String> = scenes(n, seed).iter().map(|s| s.caption()).collect();
    let images = sample_prompts(sd, &prompts, steps)?;
    Ok(colour_match(&images, &prompts))
}

/// Each image encoded (latent mean) and decoded by the pipeline's VAE.
pub fn vae_round_trip(
    sd: &StableDiffusion,
    images: &[image::RgbImage],
) -> Result<Vec<image::RgbImage>> {
    images
        .iter()
        .map(|img| {
            let x = crate::data::image_to_tensor(img, &sd.device)?
                .to_dtype(sd.dtype)?
                .unsqueeze(0)?;
            let y = sd.vae.decode(&sd.vae.encode(&x)?.mean)?;
            crate::data::tensor_to_image(&y.squeeze(0)?)
        })
        .collect()
}

/// One image per prompt, seed = prompt index.
pub fn sample_prompts(
    sd: &StableDiffusion,
    prompts: &[String],
    steps: usize,
) -> Result<Vec<image::RgbImage>> {
    let jobs: Vec<(String, u64)> = prompts.iter().cloned().zip(0..).collect();
    sample_seeded(sd, &jobs, steps)
}

/// One image per (prompt, seed).
pub fn sample_seeded(
    sd: &StableDiffusion,
    jobs: &[(String, u64)],
    steps: usize,
) -> Result<Vec<image::RgbImage>> {
    let px = super::scenes::SIZE as usize;
    jobs.iter()
        .map(|(p, seed)| {
            let imgs = sd.generate(&GenerateConfig {
                prompt: p.clone(),
                steps,
                seed: *seed,
                width: px,
                height: px,
                ..Default::default()
            })?;
            imgs.images.into_iter().next().context("no image")
        })
        .collect()
}

/// Standard error of the mean of `v` (0 for fewer than two values).
pub fn stderr(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    if v.len() < 2 {
        return 0.0;
    }
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (var / n).sqrt()
}
