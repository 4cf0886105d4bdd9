//! LoRA files: reading the three formats in the wild and writing the two that other tools
//! load.
//!
//! - **PEFT / diffusers** (`unet.<module>.lora_A.weight`, `.lora_B.weight`; also without the
//!   `unet.` prefix or with PEFT's `base_model.model.`): alpha from the `lora_adapter_metadata`
//!   JSON in the safetensors header (`unet.lora_alpha`, `unet.alpha_pattern`, `use_rslora`),
//!   else alpha = rank.
//! - **kohya / A1111 / ComfyUI** (`lora_unet_<module path with _>.lora_down.weight`,
//!   `.lora_up.weight`, scalar `.alpha`; alpha = rank when absent).
//! - **old diffusers** (`unet.<module>.lora.down.weight` / `.lora.up.weight`, and the
//!   attention-processor form `...attn1.processor.to_q_lora.down.weight`), alpha = rank unless
//!   a `<module>.alpha` tensor is present.
//!
//! Text-encoder tensors (`text_encoder.*`, `lora_te_*`) are listed in [`LoraFile::skipped`]
//! for the caller to apply or report.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

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

/// One adapted module read from a file.
#[derive(Debug, Clone)]
pub struct LoraModuleWeights {
    /// diffusers module path (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`),
    /// or for kohya files until resolved against a model, the underscore form.
    pub module: String,
    /// The file's key of the `A`/down tensor (for error messages).
    pub source_key: String,
    /// `[rank, in]` (or `[rank, in, 1, 1]`).
    pub a: Tensor,
    /// `[out, rank]` (or `[out, rank, 1, 1]`).
    pub b: Tensor,
    pub alpha: f64,
}

/// The UNet part of a LoRA file.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub format: LoraFormat,
    pub modules: Vec<LoraModuleWeights>,
    /// Keys not for the UNet (text encoder), left for the caller.
    pub skipped: Vec<String>,
}

fn is_text_encoder(key: &str) -> bool {
    key.starts_with("text_encoder") || key.starts_with("lora_te")
}

impl LoraFile {
    /// Reads a LoRA safetensors file. `known_modules` (the model's LoRA-capable module paths)
    /// resolves kohya's underscore names; pass the model's `linear_names()`.
    pub fn read(path: impl AsRef<Path>, known_modules: &[String]) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read LoRA file {}", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is not a safetensors file: {e}", path.display()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .with_context(|| format!("cannot decode tensors of {}", path.display()))?;
        let format = if tensors.keys().any(|k| k.ends_with(".lora_A.weight")) {
            LoraFormat::Peft
        } else if tensors.keys().any(|k| k.ends_with(".lora_down.weight")) {
            LoraFormat::Kohya
        } else if tensors
            .keys()
            .any(|k| k.ends_with(".lora.down.weight") || k.ends_with("_lora.down.weight"))
        {
            LoraFormat::DiffusersOld
        } else {
            bail!(
                "{}: no LoRA tensors found (expected keys ending in .lora_A.weight, .lora_down.weight or .lora.down.weight)",
                path.display()
            );
        };
        let (down_sfx, up_sfx) = match format {
            LoraFormat::Peft => (".lora_A.weight", ".lora_B.weight"),
            LoraFormat::Kohya => (".lora_down.weight", ".lora_up.weight"),
            LoraFormat::DiffusersOld => (".down.weight", ".up.weight"),
        };
        let alphas = PeftAlphas::from_metadata(&meta, path)?;
        let kohya_names: HashMap<String, String> = known_modules
            .iter()
            .map(|n| (n.replace('.', "_"), n.clone()))
            .collect();
        let mut modules = Vec::new();
        let mut skipped = Vec::new();
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        for key in keys {
            if is_text_encoder(key) {
                skipped.push(key.clone());
                continue;
            }
            let Some(stem) = key.strip_suffix(down_sfx) else {
                continue;
            };
            let up_key = format!("{stem}{up_sfx}");
            let b = tensors.get(&up_key).with_context(|| {
                format!("{}: `{key}` has no matching `{up_key}`", path.display())
            })?;
            let a = &tensors[key];
            let rank = *a.dims().first().context("empty LoRA tensor")? as f64;
            let (module, alpha) = match format {
                LoraFormat::Peft => {
                    let m = strip_prefixes(stem);
                    let alpha = alphas.alpha_for(&m, rank);
                    (m, alpha)
                }
                LoraFormat::Kohya => {
                    let raw = stem.strip_prefix("lora_unet_").with_context(|| {
                        format!(
                            "{}: unexpected kohya key `{key}` (expected lora_unet_*)",
                            path.display()
                        )
                    })?;
                    let m = kohya_names
                        .get(raw)
                        .cloned()
                        .unwrap_or_else(|| raw.to_string());
                    let alpha =
                        scalar_alpha(&tensors, &format!("{stem}.alpha"), path)?.unwrap_or(rank);
                    (m, alpha)
                }
                LoraFormat::DiffusersOld => {
                    let m = old_module_name(stem);
                    let alpha = scalar_alpha(&tensors, &format!("{stem}.alpha"), path)?
                        .or(scalar_alpha(&tensors, &format!("unet.{m}.alpha"), path)?)
                        .unwrap_or(rank);
                    (m, alpha)
                }
            };
            modules.push(LoraModuleWeights {
                module,
                source_key: key.clone(),
                a: a.clone(),
                b: b.clone(),
                alpha,
            });
        }
        if modules.is_empty() {
            bail!(
                "{}: no UNet LoRA tensors (only text-encoder ones?)",
                path.display()
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            format,
            modules,
            skipped,
        })
    }
}

fn strip_prefixes(stem: &str) -> String {
    let s = stem.strip_prefix("base_model.model.").unwrap_or(stem);
    s.strip_prefix("unet.").unwrap_or(s).to_string()
}

/// `unet.X.to_q.lora` -> `X.to_q`; `unet.X.attn1.processor.to_out_lora` -> `X.attn1.to_out.0`.
fn old_module_name(stem: &str) -> String {
    let s = strip_prefixes(stem);
    if let Some(m) = s.strip_suffix(".lora") {
        return m.to_string();
    }
    if let Some((parent, last)) = s.rsplit_once(".processor.") {
        let proj = last.strip_suffix("_lora").unwrap_or(last);
        let proj = if proj == "to_out" { "to_out.0" } else { proj };
        return format!("{parent}.{proj}");
    }
    s
}

fn scalar_alpha(t: &HashMap<String, Tensor>, key: &str, path: &Path) -> Result<Option<f64>> {
    match t.get(key) {
        None => Ok(None),
        Some(a) => {
            let v = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            match v.as_slice() {
                [x] if x.is_finite() => Ok(Some(*x)),
                _ => bail!(
                    "{}: `{key}` must be one finite number, got {:?}",
                    path.display(),
                    a.dims()
                ),
            }
        }
    }
}

/// Alpha settings from diffusers' `lora_adapter_metadata` (keys with or without `unet.`).
struct PeftAlphas {
    alpha: Option<f64>,
    pattern: Vec<(String, f64)>,
    rslora: bool,
}

impl PeftAlphas {
    fn from_metadata(meta: &HashMap<String, String>, path: &Path) -> Result<Self> {
        let mut out = Self {
            alpha: None,
            pattern: Vec::new(),
            rslora: false,
        };
        let Some(raw) = meta.get("lora_adapter_metadata") else {
            return Ok(out);
        };
        let v: serde_json::Value = serde_json::from_str(raw).with_context(|| {
            format!(
                "{}: `lora_adapter_metadata` is not valid JSON",
                path.display()
            )
        })?;
        let get = |k: &str| v.get(format!("unet.{k}")).or_else(|| v.get(k));
        if get("use_dora").and_then(|d| d.as_bool()) == Some(true) {
            bail!(
                "{}: DoRA adapters (use_dora = true) are not supported",
                path.display()
            );
        }
        out.alpha = get("lora_alpha").and_then(|a| a.as_f64());
        out.rslora = get("use_rslora").and_then(|a| a.as_bool()).unwrap_or(false);
        if let Some(p) = get("alpha_pattern").and_then(|p| p.as_object()) {
            for (k, a) in p {
                if let Some(a) = a.as_f64() {
                    out.pattern.push((k.clone(), a));
                }
            }
        }
        Ok(out)
    }

    /// Alpha such that `alpha / rank` equals PEFT's scaling for this module.
    fn alpha_for(&self, module: &str, rank: f64) -> f64 {
        let a = self
            .pattern
            .iter()
            .find(|(p, _)| super::config::target_matches(p, module))
            .map(|(_, a)| *a)
            .or(self.alpha)
            .unwrap_or(rank);
        if self.rslora {
            a * rank.sqrt() // PEFT's rsLoRA scaling alpha / sqrt(r), written as alpha' / r
        } else {
            a
        }
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
        match format {
            LoraFormat::Peft => {
                tensors.insert(format!("unet.{}.lora_A.weight", l.name()), a);
                tensors.insert(format!("unet.{}.lora_B.weight", l.name()), b);
            }
            LoraFormat::Kohya => {
                let k = format!("lora_unet_{}", l.name().replace('.', "_"));
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
                "unet.use_dora": false,
                "unet.init_lora_weights": true,
                "unet.peft_type": "LORA",
            });
            meta.insert(
                "lora_adapter_metadata".into(),
                serde_json::to_string_pretty(&m)?,
            );
        }
        _ => {
            meta.insert("ss_network_module".into(), "networks.lora".into());
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
