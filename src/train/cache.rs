//! The latent/text cache: every training image VAE-encoded once (and its mirror image when
//! flipping) and every distinct caption text-encoded once, so epochs after the first never run
//! the VAE or the text encoder. Optionally kept on disk, keyed by content hash, so a second run
//! on the same data (or a resumed run) skips the encoders entirely.
//!
//! Disk keys: `img.<h>.{mean,logvar}` (and `img.<h>.flip.*`) where `h` = SHA-256 of the model
//! fingerprint, the image's resized pixels and their size; `txt.<h>` where `h` = SHA-256 of the
//! fingerprint and the caption. The fingerprint hashes what the VAE and text encoder output for
//! a fixed probe, so another model (or dtype) never reuses stale latents. The file is written
//! atomically and only when something new was encoded.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::FlipW;
use crate::data::ImageFolder;
use crate::io::write_safetensors_atomic;
use crate::pipeline::StableDiffusion;

/// Encoded training data: VAE latent distributions (and of the flipped images) and text
/// embeddings.
#[derive(Debug, Clone)]
pub struct LatentCache {
    /// Per example: (mean, logvar), each `[C, h, w]`, f32.
    pub latents: Vec<(Tensor, Tensor)>,
    /// The same for horizontally flipped images (empty when flips are off).
    pub flipped: Vec<(Tensor, Tensor)>,
    /// Per example: text embedding `[T, D]`.
    pub embeddings: Vec<Tensor>,
    /// The embedding of the empty caption `[T, D]`: what caption dropout trains on, and the
    /// unconditional half of classifier-free guidance.
    pub empty: Tensor,
    /// Per example: its caption (encoded at every step when the text encoder trains).
    pub captions: Vec<String>,
    /// The training items of an epoch: example indices, each repeated per its folder's
    /// repeats (kohya's `<repeats>_<name>`); `0..n` without repeats.
    pub items: Vec<usize>,
}

/// What [`LatentCache::build_cached`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheStats {
    /// Images run through the VAE (0 when everything came from disk).
    pub images_encoded: usize,
    /// Images taken from the disk cache.
    pub images_reused: usize,
    /// Distinct captions run through the text encoder.
    pub texts_encoded: usize,
    /// Problems that did not stop the build (an unreadable cache file is rebuilt).
    pub warnings: Vec<String>,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// Identifies the encoders by their output on fixed probes (an `f x f` ramp image, one caption).
fn fingerprint(sd: &StableDiffusion) -> Result<Vec<u8>> {
    let f = sd.vae_scale_factor();
    let n = 3 * f * f;
    let ramp: Vec<f32> = (0..n).map(|i| i as f32 / n as f32 * 2.0 - 1.0).collect();
    let probe = Tensor::from_vec(ramp, (1, 3, f, f), &Device::Cpu)?
        .to_device(&sd.device)?
        .to_dtype(sd.dtype)?;
    let d = sd
        .vae
        .encode(&probe)
        .context("VAE-encoding the cache probe")?;
    let mut h = Sha256::new();
    h.update(b"sd-lora latent cache v1");
    h.update(tensor_bytes(&d.mean)?);
    h.update(tensor_bytes(&sd.encode_prompts(&["sd-lora cache probe"])?)?);
    Ok(h.finalize().to_vec())
}

fn encode(sd: &StableDiffusion, x: &Tensor) -> Result<(Tensor, Tensor)> {
    let d = sd.vae.encode(x)?;
    // detached: a VAE with trainable weights (pre-training) would otherwise keep every
    // encoding's autograd graph alive
    Ok((
        d.mean.squeeze(0)?.to_dtype(DType::F32)?.detach(),
        d.logvar.squeeze(0)?.to_dtype(DType::F32)?.detach(),
    ))
}

impl LatentCache {
    /// Encodes every image (and its mirror image when `flip`) and every distinct caption.
    pub fn build(sd: &StableDiffusion, data: &ImageFolder, flip: bool) -> Result<Self> {
        Ok(Self::build_cached(sd, data, flip, None)?.0)
    }

    /// [`Self::build`], reusing and extending the disk cache `file` when given.
    pub fn build_cached(
        sd: &StableDiffusion,
        data: &ImageFolder,
        flip: bool,
        file: Option<&Path>,
    ) -> Result<(Self, CacheStats)> {
        let mut stats = CacheStats::default();
        let mut disk: HashMap<String, Tensor> = HashMap::new();
        let print = match file {
            Some(_) => fingerprint(sd)?,
            None => Vec::new(),
        };
        if let Some(p) = file.filter(|p| p.exists()) {
            match candle_core::safetensors::load(p, &Device::Cpu) {
                Ok(t) => disk = t,
                Err(e) => stats.warnings.push(format!(
                    "latent cache {} is unreadable ({e}); rebuilding it",
                    p.display()
                )),
            }
        }
        let key = |parts: &[&[u8]]| {
            let mut h = Sha256::new();
            h.update(&print);
            for p in parts {
                h.update((p.len() as u64).to_le_bytes());
                h.update(p);
            }
            hex(&h.finalize())
        };
        let dev = &sd.device;
        let mut fresh = false;
        let get = |disk: &mut HashMap<String, Tensor>,
                   name: String,
                   make: &mut dyn FnMut() -> Result<(Tensor, Tensor)>|
         -> Result<((Tensor, Tensor), bool)> {
            let (m, l) = (format!("{name}.mean"), format!("{name}.logvar"));
            if let (Some(a), Some(b)) = (disk.get(&m), disk.get(&l)) {
                return Ok(((a.to_device(dev)?, b.to_device(dev)?), true));
            }
            let (a, b) = make()?;
            disk.insert(m, a.to_device(&Device::Cpu)?);
            disk.insert(l, b.to_device(&Device::Cpu)?);
            Ok(((a, b), false))
        };
        let mut latents = Vec::new();
        let mut flipped = Vec::new();
        let mut embeddings = Vec::new();
        let mut captions = Vec::new();
        let mut by_caption: HashMap<String, Tensor> = HashMap::new();
        // (embedding, whether the text encoder ran)
        let mut text =
            |caption: &str, disk: &mut HashMap<String, Tensor>| -> Result<(Tensor, bool)> {
                if let Some(e) = by_caption.get(caption) {
                    return Ok((e.clone(), false));
                }
                let mut ran = false;
                let name = format!("txt.{}", key(&[b"txt", caption.as_bytes()]));
                let e = match disk.get(&name) {
                    Some(e) => e.to_device(dev)?,
                    None => {
                        let e = sd
                            .encode_prompts(&[caption])
                            .with_context(|| format!("text-encoding {caption:?}"))?
                            .squeeze(0)?
                            .detach();
                        ran = true;
                        disk.insert(name, e.to_device(&Device::Cpu)?);
                        e
                    }
                };
                by_caption.insert(caption.to_string(), e.clone());
                Ok((e, ran))
            };
        let mut texts_encoded = 0;
        let (empty, ran) = text("", &mut disk)?;
        texts_encoded += ran as usize;
        for ex in &data.examples {
            let dims: Vec<u8> = ex
                .pixels
                .dims()
                .iter()
                .flat_map(|d| (*d as u64).to_le_bytes())
                .collect();
            let k = key(&[b"img", &dims, &tensor_bytes(&ex.pixels)?]);
            let x = ex.pixels.to_device(dev)?.to_dtype(sd.dtype)?.unsqueeze(0)?;
            let ctx = || format!("VAE-encoding {}", ex.path.display());
            let (pair, hit) = get(&mut disk, format!("img.{k}"), &mut || {
                encode(sd, &x).with_context(ctx)
            })?;
            latents.push(pair);
            if flip {
                let (pair, flip_hit) = get(&mut disk, format!("img.{k}.flip"), &mut || {
                    encode(sd, &x.flip_w()?).with_context(ctx)
                })?;
                flipped.push(pair);
                fresh |= !flip_hit;
            }
            if hit {
                stats.images_reused += 1;
            } else {
                stats.images_encoded += 1;
                fresh = true;
            }
            let (e, ran) = text(&ex.caption, &mut disk)?;
            texts_encoded += ran as usize;
            embeddings.push(e);
            captions.push(ex.caption.clone());
        }
        stats.texts_encoded = texts_encoded;
        fresh |= texts_encoded > 0;
        if let (Some(p), true) = (file, fresh) {
            let tensors: BTreeMap<String, Tensor> = disk.into_iter().collect();
            let mut meta = HashMap::new();
            meta.insert(
                "sd_lora_latent_cache".to_string(),
                "img.<sha256>.{mean,logvar}[.flip], txt.<sha256>; see sd_lora::train::cache".into(),
            );
            write_safetensors_atomic(&tensors, Some(meta), p)?;
        }
        Ok((
            Self {
                latents,
                flipped,
                embeddings,
                empty,
                captions,
                items: data
                    .examples
                    .iter()
                    .enumerate()
                    .flat_map(|(i, e)| std::iter::repeat_n(i, e.repeats.max(1)))
                    .collect(),
            },
            stats,
        ))
    }

    /// Training items per epoch (examples times their repeats).
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}
