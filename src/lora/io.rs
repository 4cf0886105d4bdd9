//! Writing LoRA files in the two layouts other tools load: kohya (`lora_unet_*` with
//! `.alpha`, for A1111 and ComfyUI) and PEFT/diffusers (`unet.<module>.lora_A.weight` with
//! `lora_adapter_metadata`). Reading every layout is [`super::file`].

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::keys::Component;
use super::linear::{LoraAdapter, LoraLinear};
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
/// The layers are the UNet's; [`save_adapters`] writes any model's (text encoder, LoCon).
pub fn save_lora_as(
    layers: &[LoraLinear],
    format: LoraFormat,
    dtype: DType,
    path: impl AsRef<Path>,
    extra: &HashMap<String, String>,
) -> Result<()> {
    let layers: Vec<AdaptedLayer> = layers
        .iter()
        .filter_map(|l| AdaptedLayer::of_linear(Component::Unet, l))
        .collect();
    save_adapters(&layers, format, dtype, path, extra)
}

/// One layer's main trainable adapter, as a file stores it.
#[derive(Debug, Clone)]
pub struct AdaptedLayer {
    pub component: Component,
    /// Module path as files name it (the text encoder's with `text_model.`).
    pub module: String,
    pub adapter: LoraAdapter,
    /// A linear layer stored as a 1x1 convolution (SD 1.x's `proj_in`/`proj_out`).
    pub conv1x1: bool,
    pub out_dim: usize,
}

impl AdaptedLayer {
    /// The main adapter (`default`, else the first) of a linear layer of `component`.
    pub fn of_linear(component: Component, l: &LoraLinear) -> Option<Self> {
        Some(Self {
            component,
            module: file_module(component, l.name()),
            adapter: l.adapter()?.clone(),
            conv1x1: l.is_conv1x1(),
            out_dim: l.out_dim(),
        })
    }
}

/// The module name files use: the text encoder's always with `text_model.`.
pub fn file_module(component: Component, name: &str) -> String {
    match component {
        Component::TextEncoder | Component::TextEncoder2 if !name.starts_with("text_model.") => {
            format!("text_model.{name}")
        }
        _ => name.to_string(),
    }
}

fn kohya_prefix(c: Component) -> Result<&'static str> {
    match c {
        Component::Unet => Ok("lora_unet_"),
        Component::TextEncoder => Ok("lora_te_"),
        Component::TextEncoder2 => bail!("writing SDXL's second text encoder is not supported"),
    }
}

fn peft_prefix(c: Component) -> &'static str {
    match c {
        Component::Unet => "unet",
        Component::TextEncoder => "text_encoder",
        Component::TextEncoder2 => "text_encoder_2",
    }
}

/// The most common rank among `layers` and the alpha of the first layer with it.
fn main_rank_alpha<'a>(layers: impl Iterator<Item = &'a AdaptedLayer>) -> (usize, f64) {
    let mut ranks: BTreeMap<usize, (usize, f64)> = BTreeMap::new();
    for l in layers {
        ranks
            .entry(l.adapter.rank())
            .or_insert((0, l.adapter.alpha))
            .0 += 1;
    }
    ranks
        .iter()
        .max_by_key(|(_, (n, _))| *n)
        .map(|(r, (_, a))| (*r, *a))
        .unwrap_or((0, 0.0))
}

/// Writes trained adapters of any components in `format` and `dtype` (see [`save_lora_as`]):
/// kohya `lora_unet_*` / `lora_te_*` with `.alpha` (conv adapters as `lora_down [r, in, k, k]`,
/// `lora_up [out, r, 1, 1]`, DoRA as `dora_scale`), `ss_network_*` metadata; PEFT
/// `unet.*` / `text_encoder.*` with `lora_adapter_metadata` per component.
pub fn save_adapters(
    layers: &[AdaptedLayer],
    format: LoraFormat,
    dtype: DType,
    path: impl AsRef<Path>,
    extra: &HashMap<String, String>,
) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        bail!("LoRA files can be saved as f32, f16 or bf16, not {dtype:?}");
    }
    if layers.is_empty() {
        bail!("no LoRA adapters to save (inject or load LoRA first)");
    }
    let path = path.as_ref();
    let cpu = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.to_dtype(dtype)?) };
    let mut tensors = BTreeMap::new();
    for l in layers {
        let ad = &l.adapter;
        let (mut a, mut b) = (cpu(ad.a.as_tensor())?, cpu(ad.b.as_tensor())?);
        if l.conv1x1 {
            a = a.unsqueeze(2)?.unsqueeze(3)?;
            b = b.unsqueeze(2)?.unsqueeze(3)?;
        }
        let conv = l.conv1x1 || ad.is_conv();
        let magnitude = match &ad.magnitude {
            Some(m) => Some(cpu(m.as_tensor())?),
            None => None,
        };
        match format {
            LoraFormat::Peft => {
                let k = format!("{}.{}", peft_prefix(l.component), l.module);
                tensors.insert(format!("{k}.lora_A.weight"), a);
                tensors.insert(format!("{k}.lora_B.weight"), b);
                if let Some(m) = magnitude {
                    // PEFT's shapes: [out] for linear layers, [1, out, 1, 1] for convs
                    let m = if conv {
                        m.reshape((1, l.out_dim, 1, 1))?
                    } else {
                        m
                    };
                    tensors.insert(format!("{k}.lora_magnitude_vector"), m);
                }
            }
            LoraFormat::Kohya => {
                let k = format!(
                    "{}{}",
                    kohya_prefix(l.component)?,
                    l.module.replace('.', "_")
                );
                if let Some(m) = magnitude {
                    // LyCORIS' output-axis layout: [out, 1] (linear) or [out, 1, 1, 1]
                    let m = if conv {
                        m.reshape((l.out_dim, 1, 1, 1))?
                    } else {
                        m.reshape((l.out_dim, 1))?
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
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    match format {
        LoraFormat::Peft => {
            meta.insert("lora_adapter_metadata".into(), peft_metadata(layers)?);
        }
        _ => kohya_network_metadata(layers, &mut meta),
    }
    for (k, v) in extra {
        meta.insert(k.clone(), v.clone());
    }
    write_safetensors_atomic(&tensors, Some(meta), path)
}

/// diffusers' `lora_adapter_metadata`: PEFT's `LoraConfig` per component, prefixed
/// `unet.` / `text_encoder.`.
fn peft_metadata(layers: &[AdaptedLayer]) -> Result<String> {
    let mut m = serde_json::Map::new();
    let mut components: Vec<Component> = layers.iter().map(|l| l.component).collect();
    components.dedup();
    components.sort_by_key(|c| peft_prefix(*c));
    components.dedup();
    for c in components {
        let of_c: Vec<&AdaptedLayer> = layers.iter().filter(|l| l.component == c).collect();
        let dora = of_c
            .iter()
            .filter(|l| l.adapter.magnitude.is_some())
            .count();
        if dora > 0 && dora < of_c.len() {
            bail!("PEFT cannot hold DoRA and plain LoRA layers in one adapter; save as kohya");
        }
        let (r, alpha) = main_rank_alpha(of_c.iter().copied());
        // module paths as PEFT matches them (suffixes): the text encoder's without
        // `text_model.`, which transformers 5's CLIPTextModel no longer has and 4's matches
        let target = |l: &AdaptedLayer| -> String {
            l.module
                .strip_prefix("text_model.")
                .unwrap_or(&l.module)
                .to_string()
        };
        let mut rank_pattern = serde_json::Map::new();
        let mut alpha_pattern = serde_json::Map::new();
        for l in &of_c {
            if l.adapter.rank() != r {
                rank_pattern.insert(target(l), l.adapter.rank().into());
            }
            if l.adapter.alpha != alpha {
                alpha_pattern.insert(target(l), l.adapter.alpha.into());
            }
        }
        let mut targets: Vec<String> = of_c.iter().map(|l| target(l)).collect();
        targets.sort();
        let p = peft_prefix(c);
        let fields = serde_json::json!({
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "target_modules": targets,
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": false,
            "use_dora": dora > 0,
            "init_lora_weights": true,
            "peft_type": "LORA",
        });
        if let serde_json::Value::Object(f) = fields {
            for (k, v) in f {
                m.insert(format!("{p}.{k}"), v);
            }
        }
    }
    Ok(serde_json::to_string_pretty(&serde_json::Value::Object(m))?)
}

/// kohya's `ss_network_*` entries describing the adapters: module, dim/alpha of the linear
/// layers, `conv_dim`/`conv_alpha` (LoCon) and DoRA in `ss_network_args`, whether the text
/// encoder is trained.
fn kohya_network_metadata(layers: &[AdaptedLayer], meta: &mut HashMap<String, String>) {
    let use_dora = layers.iter().any(|l| l.adapter.magnitude.is_some());
    let (r, alpha) = main_rank_alpha(layers.iter().filter(|l| !l.adapter.is_conv()));
    let (conv_r, conv_alpha) = main_rank_alpha(layers.iter().filter(|l| l.adapter.is_conv()));
    let mut args = serde_json::Map::new();
    if use_dora {
        // kohya's own networks.lora has no DoRA; LyCORIS' kohya module reads it
        meta.insert("ss_network_module".into(), "lycoris.kohya".into());
        for (k, v) in [
            ("algo", "lora"),
            ("dora_wd", "True"),
            ("wd_on_output", "True"),
        ] {
            args.insert(k.into(), v.into());
        }
    } else {
        meta.insert("ss_network_module".into(), "networks.lora".into());
    }
    if conv_r > 0 {
        args.insert("conv_dim".into(), conv_r.to_string().into());
        args.insert("conv_alpha".into(), conv_alpha.to_string().into());
    }
    if !args.is_empty() {
        meta.insert(
            "ss_network_args".into(),
            serde_json::Value::Object(args).to_string(),
        );
    }
    meta.insert("ss_network_dim".into(), r.to_string());
    meta.insert("ss_network_alpha".into(), alpha.to_string());
    let te = layers.iter().any(|l| l.component != Component::Unet);
    let unet = layers.iter().any(|l| l.component == Component::Unet);
    meta.insert(
        "ss_network_train_unet_only".into(),
        if te { "False" } else { "True" }.into(),
    );
    meta.insert(
        "ss_network_train_text_encoder_only".into(),
        if unet { "False" } else { "True" }.into(),
    );
    meta.insert("ss_base_model_version".into(), "sd_v1".into());
}

/// kohya sd-scripts' `ss_*` training metadata, written into kohya-format files beside the
/// tensors (A1111's and ComfyUI's LoRA browsers show these fields).
#[derive(Debug, Clone, PartialEq)]
pub struct KohyaTrainingMetadata {
    /// The UNet's rate (`ss_learning_rate`, `ss_unet_lr`).
    pub learning_rate: f64,
    /// The text encoder's rate when it trains (`ss_text_encoder_lr`; "None" otherwise).
    pub text_encoder_lr: Option<f64>,
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
            (
                "ss_text_encoder_lr",
                self.text_encoder_lr
                    .map_or("None".into(), |l| l.to_string()),
            ),
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
