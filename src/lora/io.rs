//! Writing LoRA files in the two layouts other tools load: kohya (`lora_unet_*` with
//! `.alpha`, for A1111 and ComfyUI) and PEFT/diffusers (`unet.<module>.lora_A.weight` with
//! `lora_adapter_metadata`). Reading every layout is [`super::file`].

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::linear::LoraLinear;
use crate::io::write_safetensors_atomic;

/// The on-disk layout of a LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoraFormat {
    /// diffusers' `save_lora_weights` / PEFT: `unet.<module>.lora_A.weight`.
    #[value(alias = "diffusers")]
    Peft,
    /// kohya sd-scripts, A1111, ComfyUI: `lora_unet_<module>.lora_down.weight` + `.alpha`.
    #[value(aliases = ["a1111", "comfyui"])]
    Kohya,
    /// diffusers' older `unet.<module>.lora.down.weight` (read only).
    #[value(skip)]
    DiffusersOld,
}

impl std::str::FromStr for LoraFormat {
    type Err = anyhow::Error;
    /// The writable formats by their command-line names (`peft`/`diffusers`,
    /// `kohya`/`a1111`/`comfyui`).
    fn from_str(s: &str) -> Result<Self> {
        <Self as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| anyhow::anyhow!("unknown LoRA format `{s}` (peft or kohya)"))
    }
}

/// Saves each layer's main adapter (`default`, else its first) in `format` (`Peft` writes
/// diffusers' `save_lora_weights` layout with `lora_adapter_metadata`; `Kohya` writes
/// `lora_unet_*` with `.alpha`).
pub fn save_lora(layers: &[LoraLinear], format: LoraFormat, path: impl AsRef<Path>) -> Result<()> {
    save_lora_with_metadata(layers, format, path, &HashMap::new())
}

/// [`save_lora`] plus extra safetensors metadata (e.g. kohya's `ss_*` training settings).
pub fn save_lora_with_metadata(
    layers: &[LoraLinear],
    format: LoraFormat,
    path: impl AsRef<Path>,
    extra: &HashMap<String, String>,
) -> Result<()> {
    save_lora_as(layers, format, DType::F32, path, extra)
}

/// [`save_lora_with_metadata`] storing every tensor (kohya's `.alpha` scalars included, as
/// kohya's `--save_precision` does) in `dtype`: F32 (default), F16 (half the size) or BF16.
pub fn save_lora_as(
    layers: &[LoraLinear],
    format: LoraFormat,
    dtype: DType,
    path: impl AsRef<Path>,
    extra: &HashMap<String, String>,
) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        bail!("LoRA files can be saved as f32, f16 or bf16, not {dtype:?}");
    }
    let path = path.as_ref();
    let mut tensors = BTreeMap::new();
    let mut ranks: BTreeMap<usize, usize> = BTreeMap::new();
    let mut alphas: Vec<(String, usize, f64)> = Vec::new();
    let mut dora: Vec<bool> = Vec::new();
    for l in layers {
        let Some(ad) = l.adapter() else { continue };
        let (mut a, mut b) = (
            ad.a.as_tensor().to_device(&Device::Cpu)?.to_dtype(dtype)?,
            ad.b.as_tensor().to_device(&Device::Cpu)?.to_dtype(dtype)?,
        );
        if l.is_conv1x1() {
            a = a.unsqueeze(2)?.unsqueeze(3)?;
            b = b.unsqueeze(2)?.unsqueeze(3)?;
        }
        *ranks.entry(ad.rank()).or_default() += 1;
        alphas.push((l.name().to_string(), ad.rank(), ad.alpha));
        let magnitude = match &ad.magnitude {
            Some(m) => Some(m.as_tensor().to_device(&Device::Cpu)?.to_dtype(dtype)?),
            None => None,
        };
        dora.push(magnitude.is_some());
        match format {
            LoraFormat::Peft => {
                tensors.insert(format!("unet.{}.lora_A.weight", l.name()), a);
                tensors.insert(format!("unet.{}.lora_B.weight", l.name()), b);
                if let Some(m) = magnitude {
                    // PEFT's shapes: [out] for linear layers, [1, out, 1, 1] for 1x1 convs
                    let m = if l.is_conv1x1() {
                        m.reshape((1, l.out_dim(), 1, 1))?
                    } else {
                        m
                    };
                    tensors.insert(format!("unet.{}.lora_magnitude_vector", l.name()), m);
                }
            }
            LoraFormat::Kohya => {
                let k = format!("lora_unet_{}", l.name().replace('.', "_"));
                if let Some(m) = magnitude {
                    // LyCORIS' output-axis layout: [out, 1] (linear) or [out, 1, 1, 1]
                    let m = if l.is_conv1x1() {
                        m.reshape((l.out_dim(), 1, 1, 1))?
                    } else {
                        m.reshape((l.out_dim(), 1))?
                    };
                    tensors.insert(format!("{k}.dora_scale"), m);
                }
                tensors.insert(
                    format!("{k}.alpha"),
                    Tensor::new(ad.alpha as f32, &Device::Cpu)?.to_dtype(dtype)?,
                );
                tensors.insert(format!("{k}.lora_down.weight"), a);
                tensors.insert(format!("{k}.lora_up.weight"), b);
            }
            LoraFormat::DiffusersOld => {
                bail!("writing the old diffusers LoRA format is not supported; use peft or kohya")
            }
        }
    }
    if alphas.is_empty() {
        bail!("no LoRA adapters to save (inject or load LoRA first)");
    }
    let use_dora = dora.iter().any(|d| *d);
    if use_dora && format == LoraFormat::Peft && !dora.iter().all(|d| *d) {
        bail!("PEFT cannot hold DoRA and plain LoRA layers in one adapter; save as kohya");
    }
    let r = ranks
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(r, _)| *r)
        .unwrap_or(0);
    let alpha = alphas
        .iter()
        .find(|(_, rk, _)| *rk == r)
        .map(|(_, _, a)| *a)
        .unwrap_or(r as f64);
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    match format {
        LoraFormat::Peft => {
            let mut rank_pattern = serde_json::Map::new();
            let mut alpha_pattern = serde_json::Map::new();
            for (name, rk, a) in &alphas {
                if *rk != r {
                    rank_pattern.insert(name.clone(), (*rk).into());
                }
                if *a != alpha {
                    alpha_pattern.insert(name.clone(), (*a).into());
                }
            }
            let mut targets: Vec<String> = alphas.iter().map(|(n, _, _)| n.clone()).collect();
            targets.sort();
            let m = serde_json::json!({
                "unet.r": r,
                "unet.lora_alpha": alpha,
                "unet.rank_pattern": rank_pattern,
                "unet.alpha_pattern": alpha_pattern,
                "unet.target_modules": targets,
                "unet.lora_dropout": 0.0,
                "unet.bias": "none",
                "unet.use_rslora": false,
                "unet.use_dora": use_dora,
                "unet.init_lora_weights": true,
                "unet.peft_type": "LORA",
            });
            meta.insert(
                "lora_adapter_metadata".into(),
                serde_json::to_string_pretty(&m)?,
            );
        }
        _ => {
            if use_dora {
                // kohya's own networks.lora has no DoRA; LyCORIS' kohya module reads it
                meta.insert("ss_network_module".into(), "lycoris.kohya".into());
                meta.insert(
                    "ss_network_args".into(),
                    r#"{"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}"#.into(),
                );
            } else {
                meta.insert("ss_network_module".into(), "networks.lora".into());
            }
            meta.insert("ss_network_dim".into(), r.to_string());
            meta.insert("ss_network_alpha".into(), alpha.to_string());
            meta.insert("ss_base_model_version".into(), "sd_v1".into());
        }
    }
    for (k, v) in extra {
        meta.insert(k.clone(), v.clone());
    }
    write_safetensors_atomic(&tensors, Some(meta), path)
}

/// kohya sd-scripts' `ss_*` training metadata, written into kohya-format files beside the
/// tensors (A1111's and ComfyUI's LoRA browsers show these fields).
#[derive(Debug, Clone, PartialEq)]
pub struct KohyaTrainingMetadata {
    pub learning_rate: f64,
    pub num_epochs: usize,
    pub max_train_steps: usize,
    pub train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// The schedule as text, e.g. `CosineEpoch { eta_min: 1e-6 }`.
    pub lr_scheduler: String,
    pub lr_warmup_steps: usize,
    pub seed: u64,
    pub num_train_images: usize,
    /// (width, height) in pixels.
    pub resolution: (usize, usize),
    pub min_snr_gamma: Option<f64>,
    pub noise_offset: f64,
    pub caption_dropout_rate: f64,
    /// The precision the file is saved in.
    pub save_precision: DType,
}

impl KohyaTrainingMetadata {
    /// The `ss_*` entries (strings, as kohya writes them).
    pub fn to_metadata(&self) -> HashMap<String, String> {
        [
            ("ss_learning_rate", self.learning_rate.to_string()),
            ("ss_unet_lr", self.learning_rate.to_string()),
            ("ss_num_epochs", self.num_epochs.to_string()),
            ("ss_max_train_steps", self.max_train_steps.to_string()),
            ("ss_train_batch_size", self.train_batch_size.to_string()),
            (
                "ss_gradient_accumulation_steps",
                self.gradient_accumulation_steps.to_string(),
            ),
            ("ss_lr_scheduler", self.lr_scheduler.clone()),
            ("ss_lr_warmup_steps", self.lr_warmup_steps.to_string()),
            ("ss_seed", self.seed.to_string()),
            ("ss_num_train_images", self.num_train_images.to_string()),
            (
                "ss_resolution",
                format!("({}, {})", self.resolution.0, self.resolution.1),
            ),
            (
                "ss_min_snr_gamma",
                self.min_snr_gamma.map_or("None".into(), |g| g.to_string()),
            ),
            ("ss_noise_offset", self.noise_offset.to_string()),
            (
                "ss_caption_dropout_rate",
                self.caption_dropout_rate.to_string(),
            ),
            ("ss_training_comment", "trained with sd-lora".into()),
            (
                "ss_save_precision",
                format!("{:?}", self.save_precision).to_lowercase(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}
