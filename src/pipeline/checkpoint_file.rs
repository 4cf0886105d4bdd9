//! A single-file checkpoint's header, read and checked without loading any tensor: every
//! tensor's dtype, shape and byte range (a truncated or corrupt file is refused naming the
//! first bad tensor), and what kind of model the keys describe. Pickles (`.ckpt`, `.pt`,
//! `.bin`, `.pth`) are refused: unpickling can run arbitrary code.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// safetensors dtype name (`F16`, `F32`, `BF16`, `I64`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// The header of a `.safetensors` file.
#[derive(Debug, Clone)]
pub struct CheckpointHeader {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

fn dtype_size(d: &str) -> Option<usize> {
    Some(match d {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

impl CheckpointHeader {
    /// Reads and checks the header of `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") {
            bail!(
                "{}: a pickle checkpoint (.{ext}); sd-lora never unpickles files (loading a pickle can run any code). Convert it to .safetensors first (e.g. with the `safetensors` Python package in a sandbox)",
                path.display()
            );
        }
        let mut f = std::fs::File::open(path)
            .with_context(|| format!("cannot open checkpoint {}", path.display()))?;
        let size = f.metadata()?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n)
            .with_context(|| format!("{}: too short for a safetensors file", path.display()))?;
        if n[0] == 0x80 || &n[..2] == b"PK" {
            bail!(
                "{}: a pickle/zip checkpoint, not safetensors; sd-lora never unpickles files",
                path.display()
            );
        }
        let n = u64::from_le_bytes(n);
        if n == 0 || n > 100_000_000 || 8 + n > size {
            bail!(
                "{}: not a safetensors file (header length {n} for a {size}-byte file)",
                path.display()
            );
        }
        let mut buf = vec![0u8; n as usize];
        f.read_exact(&mut buf)?;
        let json: serde_json::Value = serde_json::from_slice(&buf).with_context(|| {
            format!(
                "{}: the safetensors header is not valid JSON",
                path.display()
            )
        })?;
        let obj = json.as_object().with_context(|| {
            format!(
                "{}: the safetensors header is not an object",
                path.display()
            )
        })?;
        let data_len = size - 8 - n;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        let mut ranges: Vec<(u64, u64, String)> = Vec::new();
        for (k, v) in obj {
            if k == "__metadata__" {
                if let Some(m) = v.as_object() {
                    for (mk, mv) in m {
                        metadata.insert(mk.clone(), mv.as_str().unwrap_or_default().to_string());
                    }
                }
                continue;
            }
            let bad = |why: &str| anyhow::anyhow!("{}: tensor `{k}`: {why}", path.display());
            let dtype = v["dtype"]
                .as_str()
                .ok_or_else(|| bad("no dtype"))?
                .to_string();
            let shape: Vec<usize> = v["shape"]
                .as_array()
                .ok_or_else(|| bad("no shape"))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("shape is not a list of sizes"))?;
            let off = v["data_offsets"]
                .as_array()
                .filter(|o| o.len() == 2)
                .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
                .ok_or_else(|| bad("no data_offsets"))?;
            let elem = dtype_size(&dtype).ok_or_else(|| bad(&format!("unknown dtype {dtype}")))?;
            let want = shape.iter().product::<usize>() as u64 * elem as u64;
            if off.1 < off.0 || off.1 - off.0 != want {
                return Err(bad(&format!(
                    "{dtype} {shape:?} needs {want} bytes, its offsets give {}",
                    off.1.saturating_sub(off.0)
                )));
            }
            ranges.push((off.0, off.1, k.clone()));
            tensors.insert(k.clone(), TensorInfo { dtype, shape });
        }
        ranges.sort();
        for (_, end, k) in &ranges {
            if *end > data_len {
                bail!(
                    "{}: truncated or corrupt: tensor `{k}` ends at byte {end} of a {data_len}-byte data section (the first tensor past the end of the file)",
                    path.display()
                );
            }
        }
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                bail!(
                    "{}: corrupt: tensors `{}` and `{}` overlap",
                    path.display(),
                    w[0].2,
                    w[1].2
                );
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            metadata,
        })
    }

    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|t| t.shape.as_slice())
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// Whether any key starts with `prefix`.
    pub fn any_prefix(&self, prefix: &str) -> bool {
        self.tensors
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix))
    }

    /// How many `prefix{i}{suffix}` keys exist for i = 0, 1, ... (stops at the first gap).
    pub fn count(&self, prefix: &str, suffix: &str) -> usize {
        (0..)
            .take_while(|i| self.has(&format!("{prefix}{i}{suffix}")))
            .count()
    }

    /// The dtype most tensors have.
    pub fn main_dtype(&self) -> String {
        let mut n: BTreeMap<&str, usize> = BTreeMap::new();
        for t in self.tensors.values() {
            *n.entry(t.dtype.as_str()).or_default() += 1;
        }
        n.into_iter()
            .max_by_key(|(_, c)| *c)
            .map(|(d, _)| d.to_string())
            .unwrap_or_default()
    }
}

/// What a single file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: LDM UNet, CLIP ViT-L text encoder (transformers layout).
    Sd1,
    /// SD 2.x: LDM UNet with linear projections, OpenCLIP ViT-H text encoder.
    Sd2,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
        })
    }
}

/// The family of a whole-pipeline LDM checkpoint; anything else is refused saying what the
/// file looks like.
pub fn detect_family(h: &CheckpointHeader) -> Result<Family> {
    let p = h.path.display();
    let unet = h.has("model.diffusion_model.input_blocks.0.0.weight");
    if h.any_prefix("conditioner.embedders.") || h.any_prefix("model.diffusion_model.label_emb.") {
        bail!("{p}: an SDXL checkpoint (conditioner.embedders / label_emb); SDXL single files are not supported yet");
    }
    if h.any_prefix("model.diffusion_model.joint_blocks.") {
        bail!("{p}: a Stable Diffusion 3 checkpoint (joint_blocks); not supported");
    }
    if h.any_prefix("double_blocks.") || h.any_prefix("model.diffusion_model.double_blocks.") {
        bail!("{p}: a Flux checkpoint (double_blocks); not supported");
    }
    if h.tensors.keys().any(|k| {
        k.starts_with("lora_unet_")
            || k.starts_with("lora_te")
            || k.contains(".lora_down.")
            || k.contains(".lora_A.")
    }) {
        bail!("{p}: a LoRA file, not a base model; load it with --lora on top of a model");
    }
    if !unet {
        if h.has("encoder.down.0.block.0.conv1.weight")
            || h.has("encoder.down_blocks.0.resnets.0.conv1.weight")
        {
            bail!("{p}: a VAE file, not a whole model; give it with --vae");
        }
        if h.has("conv_in.weight") && h.any_prefix("down_blocks.") {
            bail!("{p}: a diffusers UNet weights file; give the diffusers folder it belongs to instead");
        }
        bail!(
            "{p}: not a Stable Diffusion checkpoint in the LDM layout (no `model.diffusion_model.input_blocks.0.0.weight`; {} tensors)",
            h.tensors.len()
        );
    }
    if h.any_prefix("cond_stage_model.transformer.") {
        return Ok(Family::Sd1);
    }
    if h.any_prefix("cond_stage_model.model.transformer.resblocks.") {
        return Ok(Family::Sd2);
    }
    bail!("{p}: the UNet is in LDM layout but the text encoder is missing (no `cond_stage_model.transformer.*` or `cond_stage_model.model.*`)");
}
