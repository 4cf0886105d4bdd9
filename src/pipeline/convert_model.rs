//! `sd-lora convert-model`: a single-file checkpoint written out as a diffusers pipeline folder
//! (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) that
//! diffusers' `from_pretrained` loads. Tensors keep the file's dtype; the folder appears whole
//! or not at all (written beside it, then renamed).

use anyhow::{bail, Context, Result};
use candle_core::{safetensors::MmapedSafetensors, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::single_file::{records_of, SingleFileOptions, SingleFilePlan};
use crate::io::write_safetensors_atomic;
use crate::text::ClipTextModel;
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::weights::Remap;

/// A folder removed on drop unless kept (a failed conversion leaves nothing behind).
struct TempDir(std::path::PathBuf, bool);

impl TempDir {
    fn new(parent: &Path) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = parent.join(format!(".convert-model-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&p)
            .with_context(|| format!("cannot create a temporary folder in {}", parent.display()))?;
        Ok(Self(p, false))
    }

    fn keep(mut self) -> std::path::PathBuf {
        self.1 = true;
        self.0.clone()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// (sub-folder, file name, our key -> file key, our shapes) of one component.
type Part<'a> = (
    &'a str,
    &'a str,
    &'a HashMap<String, Remap>,
    Vec<(String, Vec<usize>)>,
);

/// Reads every tensor of `map` from `st` under our key, in the file's dtype and our shape.
fn gather(
    st: &MmapedSafetensors,
    map: &HashMap<String, Remap>,
    shapes: &[(String, Vec<usize>)],
    file: &Path,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (ours, shape) in shapes {
        let r = map
            .get(ours)
            .with_context(|| format!("no single-file name for `{ours}`"))?;
        let mut t = st.load(&r.key, &Device::Cpu).with_context(|| {
            format!(
                "{}: tensor `{}` (for `{ours}`) is missing",
                file.display(),
                r.key
            )
        })?;
        if let Some((start, len)) = r.rows {
            t = t.narrow(0, start, len)?;
        }
        if t.dims() != shape.as_slice() {
            if t.elem_count() != shape.iter().product::<usize>() {
                bail!(
                    "{}: tensor `{}` has shape {:?}, `{ours}` needs {shape:?}",
                    file.display(),
                    r.key,
                    t.dims()
                );
            }
            t = t.reshape(shape.as_slice())?;
        }
        out.insert(ours.clone(), t.contiguous()?);
    }
    Ok(out)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(path.parent().context("no parent folder")?)?;
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `value` (a serialised config) with `extra` fields added.
fn with(value: impl serde::Serialize, extra: serde_json::Value) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(value)?;
    if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    Ok(v)
}

/// Writes the diffusers folder `out` for single file `file` (see the module docs). Fails,
/// writing nothing, when `out` exists and is not empty.
pub fn convert_to_diffusers(file: &Path, opts: &SingleFileOptions, out: &Path) -> Result<String> {
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{} exists and is not empty; choose a new folder",
            out.display()
        );
    }
    let plan = SingleFilePlan::new(file, opts)?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = TempDir::new(parent)?;
    let dir = tmp.0.as_path();
    // SAFETY: mapped read-only; the file is not written while mapped.
    let st = unsafe { MmapedSafetensors::new(file) }
        .with_context(|| format!("cannot read {}", file.display()))?;
    let parts: [Part; 3] = [
        (
            "unet",
            "diffusion_pytorch_model.safetensors",
            &plan.unet_map,
            records_of(|ws| UNet2DConditionModel::new(&plan.unet, ws).map(|_| ()))?,
        ),
        (
            "vae",
            "diffusion_pytorch_model.safetensors",
            &plan.vae_map,
            records_of(|ws| AutoencoderKL::new(&plan.vae, ws).map(|_| ()))?,
        ),
        (
            "text_encoder",
            "model.safetensors",
            &plan.text_map,
            records_of(|ws| ClipTextModel::new(&plan.text, ws).map(|_| ()))?,
        ),
    ];
    let mut count = 0;
    for (sub, name, map, shapes) in &parts {
        let tensors = gather(&st, map, shapes, file)?;
        count += tensors.len();
        std::fs::create_dir_all(dir.join(sub))?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        write_safetensors_atomic(&tensors, Some(meta), &dir.join(sub).join(name))?;
    }
    match &opts.config {
        Some(cfg) => {
            for f in [
                "model_index.json",
                "unet/config.json",
                "vae/config.json",
                "text_encoder/config.json",
                "scheduler/scheduler_config.json",
            ] {
                let to = dir.join(f);
                std::fs::create_dir_all(to.parent().context("no parent")?)?;
                std::fs::copy(cfg.join(f), &to)
                    .with_context(|| format!("cannot copy {}", cfg.join(f).display()))?;
            }
        }
        None => {
            let v = env!("CARGO_PKG_VERSION");
            write_json(
                &dir.join("unet/config.json"),
                &with(
                    &plan.unet,
                    serde_json::json!({"_class_name": "UNet2DConditionModel", "_sd_lora_version": v}),
                )?,
            )?;
            write_json(
                &dir.join("vae/config.json"),
                &with(
                    &plan.vae,
                    serde_json::json!({"_class_name": "AutoencoderKL"}),
                )?,
            )?;
            write_json(
                &dir.join("text_encoder/config.json"),
                &with(
                    &plan.text,
                    serde_json::json!({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                        "bos_token_id": 0, "pad_token_id": 1, "projection_dim": plan.text.hidden_size}),
                )?,
            )?;
            write_json(
                &dir.join("scheduler/scheduler_config.json"),
                &with(
                    &crate::scheduler::SchedulerConfig {
                        // DDIM's own default, which diffusers needs spelled out
                        timestep_spacing: Some(
                            plan.scheduler
                                .timestep_spacing
                                .clone()
                                .unwrap_or_else(|| "leading".into()),
                        ),
                        ..plan.scheduler.clone()
                    },
                    serde_json::json!({"_class_name": "DDIMScheduler"}),
                )?,
            )?;
            write_json(
                &dir.join("model_index.json"),
                &serde_json::json!({
                    "_class_name": "StableDiffusionPipeline",
                    "text_encoder": ["transformers", "CLIPTextModel"],
                    "tokenizer": ["transformers", "CLIPTokenizer"],
                    "unet": ["diffusers", "UNet2DConditionModel"],
                    "vae": ["diffusers", "AutoencoderKL"],
                    "scheduler": ["diffusers", "DDIMScheduler"],
                    "safety_checker": [null, null],
                    "feature_extractor": [null, null],
                    "requires_safety_checker": false
                }),
            )?;
        }
    }
    let tok = dir.join("tokenizer");
    std::fs::create_dir_all(&tok)?;
    // the config's tokenizer files; the built-in CLIP vocabulary where it has none
    let builtin = crate::io::tiny_model_dir().join("tokenizer");
    let vocab_from = if super::single_file::has_vocab(&plan.tokenizer_dir) {
        &plan.tokenizer_dir
    } else {
        &builtin
    };
    for (from, f) in [
        (vocab_from, "vocab.json"),
        (vocab_from, "merges.txt"),
        (vocab_from, "tokenizer.json"),
        (&plan.tokenizer_dir, "tokenizer_config.json"),
        (&plan.tokenizer_dir, "special_tokens_map.json"),
    ] {
        if from.join(f).is_file() {
            std::fs::copy(from.join(f), tok.join(f))?;
        }
    }
    if !tok.join("tokenizer_config.json").is_file() {
        // transformers needs model_max_length; SD 2.x pads with "!"
        let pad = if plan.family == super::checkpoint_file::Family::Sd2 {
            "!"
        } else {
            "<|endoftext|>"
        };
        write_json(
            &tok.join("tokenizer_config.json"),
            &serde_json::json!({"pad_token": pad, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
                "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}),
        )?;
    }
    if out.exists() {
        std::fs::remove_dir(out)
            .with_context(|| format!("cannot replace empty {}", out.display()))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, out)
        .with_context(|| format!("cannot move the converted folder to {}", out.display()))?;
    Ok(format!(
        "{}: {} ({}) -> diffusers folder {} ({count} tensors, configs {})",
        file.display(),
        plan.family,
        plan.header.main_dtype(),
        out.display(),
        if opts.config.is_some() {
            "copied"
        } else {
            "inferred"
        }
    ))
}
