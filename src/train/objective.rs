//! What the engine minimises. An [`Objective`] turns a batch of example indices into a scalar
//! loss; the engine ([`super::Trainer::run`]) does the rest (epochs, accumulation, clipping,
//! AdamW, schedule, hooks). [`Denoising`] is Stable Diffusion's noise-prediction loss over a
//! [`LatentCache`]; `sd-lora pretrain-tiny` brings its own for the VAE.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use rand::Rng;
use rand_chacha::ChaCha12Rng;

use super::{LatentCache, TrainConfig};
use crate::pipeline::StableDiffusion;
use crate::scheduler::{Scheduler, SchedulerKind};
use crate::weights::randn_from;

/// A loss over a fixed set of examples, indexed `0..len()`.
pub trait Objective {
    /// Number of examples; the engine shuffles `0..len()` once per epoch.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The (differentiable, scalar) loss of examples `batch`, drawing any randomness from
    /// `rng`, the trainer's own stream (checkpointed, so a resumed run draws the same numbers).
    fn loss(&self, batch: &[usize], rng: &mut ChaCha12Rng) -> Result<Tensor>;
    /// The bucket of each example when a batch must hold one bucket only (examples of
    /// different shapes: aspect-ratio buckets). Default None: any examples can share a batch.
    fn buckets(&self) -> Option<Vec<usize>> {
        None
    }
}

/// An example's conditioning: a caption encoded this step, or a cached embedding.
enum Cond {
    Caption(String),
    Embedding(Tensor),
}

/// The denoising loss of `sd.unet` on cached latents and text embeddings: a random flip, a
/// latent sample from the VAE posterior, noise (with the configured offset), a uniform random
/// timestep, the scheduler's training target (epsilon or v), MSE (min-SNR weighted when
/// configured), with caption dropout.
pub struct Denoising<'a> {
    pub sd: &'a StableDiffusion,
    pub cache: &'a LatentCache,
    pub noise: Scheduler,
    pub caption_dropout: f64,
    pub noise_offset: f64,
    pub min_snr_gamma: Option<f64>,
    /// Encode each batch's captions with the (trainable) text encoder instead of taking the
    /// cached embeddings.
    pub train_text_encoder: bool,
    /// kohya's per-step caption processing (`shuffle_caption`, `keep_tokens`,
    /// `caption_tag_dropout_rate`); when on, captions are encoded every step.
    pub shuffle_caption: bool,
    pub keep_tokens: usize,
    pub caption_tag_dropout: f64,
    /// Gradient checkpointing of the UNet (and the text encoder when it trains), on top of
    /// what the models' own switches say.
    pub gradient_checkpointing: bool,
}

impl<'a> Denoising<'a> {
    pub fn new(sd: &'a StableDiffusion, cache: &'a LatentCache, cfg: &TrainConfig) -> Result<Self> {
        Ok(Self {
            sd,
            cache,
            noise: Scheduler::new(SchedulerKind::Ddpm, &sd.scheduler_config, 1)?,
            caption_dropout: cfg.caption_dropout,
            noise_offset: cfg.noise_offset,
            min_snr_gamma: cfg.min_snr_gamma,
            train_text_encoder: cfg.train_text_encoder,
            shuffle_caption: cfg.shuffle_caption,
            keep_tokens: cfg.keep_tokens,
            caption_tag_dropout: cfg.caption_tag_dropout,
            gradient_checkpointing: cfg.gradient_checkpointing,
        })
    }

    /// [`Objective::loss`] with any random source.
    pub fn loss_with<R: Rng>(&self, idx: &[usize], rng: &mut R) -> Result<Tensor> {
        let examples: Vec<(&LatentCache, usize)> = idx.iter().map(|&i| (self.cache, i)).collect();
        let (mse, t) = self.per_sample(&examples, rng)?;
        self.weighted_mean(&mse, &t)
    }

    /// The unweighted MSE of each example `(cache, training item)` (`[n]`, f32) and the
    /// timestep drawn for it. Examples of one latent size share one UNet forward (a batch
    /// mixing sizes, e.g. bucketed instance images beside square class images, runs one
    /// forward per size); the random draws of a one-size batch are: per example the flip,
    /// the latent sample, caption dropout and caption processing, then the batch's noise,
    /// noise offset and timesteps.
    pub fn per_sample<R: Rng>(
        &self,
        examples: &[(&LatentCache, usize)],
        rng: &mut R,
    ) -> Result<(Tensor, Vec<u32>)> {
        let sd = self.sd;
        let dev = &sd.device;
        let per_step =
            self.train_text_encoder || self.shuffle_caption || self.caption_tag_dropout > 0.0;
        // per example: its latent sample, and its caption (per step) or cached embedding
        let mut z = Vec::with_capacity(examples.len());
        let mut text: Vec<Cond> = Vec::with_capacity(examples.len());
        for &(cache, item) in examples {
            // an item is an example, repeated per its folder's repeats
            let i = *cache
                .items
                .get(item)
                .with_context(|| format!("training item {item} is not in the latent cache"))?;
            let use_flip = !cache.flipped.is_empty() && rng.random_bool(0.5);
            let (m, lv) = if use_flip {
                &cache.flipped[i]
            } else {
                &cache.latents[i]
            };
            let eps = randn_from(rng, m.dims(), dev)?;
            z.push((m + (lv.affine(0.5, 0.0)?.exp()? * eps)?)?);
            // drawn only when enabled, so runs without dropout keep their random stream
            let drop = self.caption_dropout > 0.0 && rng.random_bool(self.caption_dropout.min(1.0));
            if per_step {
                let c = cache.captions.get(i).with_context(|| {
                    format!("captions are encoded per step but the latent cache has no caption for example {i}")
                })?;
                text.push(Cond::Caption(if drop {
                    String::new()
                } else {
                    crate::data::kohya::process_caption(
                        c,
                        self.shuffle_caption,
                        self.keep_tokens,
                        self.caption_tag_dropout,
                        rng,
                    )
                }));
            } else {
                text.push(Cond::Embedding(if drop {
                    cache.empty.clone()
                } else {
                    cache.embeddings[i].clone()
                }));
            }
        }
        // positions grouped by latent size, in order of first appearance
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (p, zi) in z.iter().enumerate() {
            match groups.iter_mut().find(|g| z[g[0]].dims() == zi.dims()) {
                Some(g) => g.push(p),
                None => groups.push(vec![p]),
            }
        }
        let mut losses = Vec::with_capacity(groups.len());
        let mut t_at = vec![0u32; examples.len()];
        for g in &groups {
            let zs: Vec<Tensor> = g.iter().map(|&p| z[p].clone()).collect();
            let x0 = sd.vae.scale_latents(&Tensor::stack(&zs, 0)?)?;
            let ctx = if per_step {
                let refs: Vec<&str> = g
                    .iter()
                    .map(|&p| match &text[p] {
                        Cond::Caption(c) => c.as_str(),
                        Cond::Embedding(_) => "",
                    })
                    .collect();
                let ckpt = self.gradient_checkpointing || sd.text_encoder.gradient_checkpointing;
                let e = sd.encode_prompts_with(&refs, ckpt && self.train_text_encoder)?;
                // a frozen text encoder's output needs no graph
                if self.train_text_encoder {
                    e
                } else {
                    e.detach()
                }
            } else {
                let embs: Vec<Tensor> = g
                    .iter()
                    .filter_map(|&p| match &text[p] {
                        Cond::Embedding(e) => Some(e.clone()),
                        Cond::Caption(_) => None,
                    })
                    .collect();
                Tensor::stack(&embs, 0)?
            };
            let b = g.len();
            let mut noise = randn_from(rng, x0.dims(), dev)?;
            if self.noise_offset != 0.0 {
                let off = randn_from(rng, &[b, x0.dim(1)?, 1, 1], dev)?;
                noise = noise.broadcast_add(&(off * self.noise_offset)?)?;
            }
            let n_train = sd.scheduler_config.num_train_timesteps;
            let t: Vec<u32> = (0..b)
                .map(|_| rng.random_range(0..n_train as u32))
                .collect();
            for (&p, &ti) in g.iter().zip(&t) {
                t_at[p] = ti;
            }
            let tt = Tensor::new(t, dev)?;
            let noisy = self.noise.add_noise(&x0, &noise, &tt)?;
            let target = self.noise.training_target(&x0, &noise, &tt)?;
            let ckpt = self.gradient_checkpointing || sd.unet.gradient_checkpointing;
            let pred = sd
                .unet
                .forward_with(&noisy, &tt, &ctx, ckpt)?
                .to_dtype(DType::F32)?;
            losses.push((pred - target)?.sqr()?.flatten_from(1)?.mean(1)?);
        }
        if groups.len() == 1 {
            return Ok((losses.remove(0), t_at));
        }
        // back to the examples' order
        let order: Vec<usize> = groups.concat();
        let mut inverse = vec![0u32; order.len()];
        for (k, &p) in order.iter().enumerate() {
            inverse[p] = k as u32;
        }
        let all = Tensor::cat(&losses, 0)?;
        Ok((all.index_select(&Tensor::new(inverse, dev)?, 0)?, t_at))
    }

    /// The mean of per-example losses `mse` (min-SNR weighted by their timesteps `t` when
    /// configured).
    pub fn weighted_mean(&self, mse: &Tensor, t: &[u32]) -> Result<Tensor> {
        let Some(gamma) = self.min_snr_gamma else {
            return Ok(mse.mean_all()?);
        };
        let ac = self.noise.alphas_cumprod();
        let v_pred = self.sd.scheduler_config.prediction_type == "v_prediction";
        let w: Vec<f32> = t
            .iter()
            .map(|&t| {
                let a = ac[t as usize];
                let snr = a / (1.0 - a);
                (snr.min(gamma) / if v_pred { snr + 1.0 } else { snr }) as f32
            })
            .collect();
        Ok((mse * Tensor::new(w, mse.device())?)?.mean_all()?)
    }
}

impl Objective for Denoising<'_> {
    fn len(&self) -> usize {
        self.cache.len()
    }

    fn loss(&self, batch: &[usize], rng: &mut ChaCha12Rng) -> Result<Tensor> {
        self.loss_with(batch, rng)
    }

    /// Examples grouped by latent size (sorted sizes numbered 0, 1, ...), when there are
    /// several.
    fn buckets(&self) -> Option<Vec<usize>> {
        let sizes: Vec<Vec<usize>> = self
            .cache
            .items
            .iter()
            .filter_map(|&i| self.cache.latents.get(i))
            .map(|(m, _)| m.dims().to_vec())
            .collect();
        let mut distinct = sizes.clone();
        distinct.sort();
        distinct.dedup();
        (distinct.len() > 1).then(|| {
            sizes
                .iter()
                .map(|s| distinct.binary_search(s).unwrap_or(0))
                .collect()
        })
    }
}
