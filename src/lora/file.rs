//! Reading a LoRA file: every tensor is grouped by (component, module) into one adapter of a
//! known kind ([`LoraEntry`]), or listed in [`LoraFile::unknown`]. Nothing is matched against a
//! model here (see [`super::apply`]), so one read serves the UNet and the text encoder.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::io::LoraFormat;
use super::keys::{parse_key, Component, Part};
use super::patch::{AdapterKind, KronFactor, PatchWeights};

/// One adapted module of a file.
#[derive(Debug, Clone)]
pub struct LoraEntry {
    pub component: Component,
    /// The module as the file names it, component prefix removed (underscores for kohya
    /// layouts, dots for diffusers/PEFT; diffusers or CompVis module names).
    pub module: String,
    /// The file's keys of this adapter, sorted.
    pub keys: Vec<String>,
    pub weights: PatchWeights,
    /// Alpha from the file (`.alpha`, or diffusers' `lora_adapter_metadata`); `None` when
    /// absent (alpha = rank).
    pub alpha: Option<f64>,
    /// DoRA magnitude (`dora_scale` or PEFT's `lora_magnitude_vector`).
    pub dora_scale: Option<Tensor>,
}

impl LoraEntry {
    pub fn kind(&self) -> AdapterKind {
        self.weights.kind()
    }
    /// A plain `B·A` on a linear layer (or 1x1 convolution): loaded as a trainable adapter.
    pub fn is_plain_lora(&self) -> bool {
        match &self.weights {
            PatchWeights::Lora { down, mid, .. } => {
                mid.is_none()
                    && self.dora_scale.is_none()
                    && (down.rank() == 2 || down.dims()[2..].iter().all(|&d| d == 1))
            }
            _ => false,
        }
    }
    /// True when the adapter's tensors are shaped for a k x k convolution (k > 1).
    pub fn is_spatial(&self) -> bool {
        let t = match &self.weights {
            PatchWeights::Lora { down, mid, .. } => mid.as_ref().unwrap_or(down),
            PatchWeights::LoHa { w1b, t, .. } => t.as_ref().map(|(a, _)| a).unwrap_or(w1b),
            PatchWeights::LoKr { w2, t2, .. } => match (t2, w2) {
                (Some(t), _) => t,
                (None, KronFactor::Full(t)) | (None, KronFactor::LowRank(_, t)) => t,
            },
            PatchWeights::Full { diff, .. } => diff,
        };
        t.dims()[2..].iter().any(|&d| d > 1)
    }
    /// The alpha that applies (`None` for kinds without alpha).
    pub fn effective_alpha(&self) -> Option<f64> {
        self.weights.rank().map(|r| match self.alpha {
            Some(a) if a != 0.0 => a,
            _ => r as f64,
        })
    }
}

/// A LoRA file, read but not yet matched against a model.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    /// The naming family (`Peft` for `lora_A`/`lora_B`, `Kohya` for `lora_unet_*` with LoRA,
    /// LyCORIS or full parts, `DiffusersOld` for `lora.down`).
    pub format: LoraFormat,
    pub entries: Vec<LoraEntry>,
    /// Keys that are no part of any adapter kind we know (refused unless a partial load is
    /// asked for).
    pub unknown: Vec<String>,
    /// The safetensors header metadata.
    pub metadata: HashMap<String, String>,
    /// The tensors' storage dtype(s).
    pub dtypes: Vec<DType>,
}

impl LoraFile {
    /// Reads a LoRA safetensors file of any supported layout and kind.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read LoRA file {}", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is not a safetensors file: {e}", path.display()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .with_context(|| format!("cannot decode tensors of {}", path.display()))?;
        Self::from_tensors(path, tensors, metadata)
    }

    /// As [`LoraFile::open`] from tensors already in memory (`path` names them in messages).
    pub fn from_tensors(
        path: &Path,
        tensors: HashMap<String, Tensor>,
        metadata: HashMap<String, String>,
    ) -> Result<Self> {
        let show = path.display();
        let alphas = MetaAlphas::from_metadata(&metadata)
            .with_context(|| format!("{show}: `lora_adapter_metadata`"))?;
        let mut groups: BTreeMap<(Component, String), BTreeMap<Part, (String, Tensor)>> =
            BTreeMap::new();
        let mut unknown = Vec::new();
        let mut dtypes = Vec::new();
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        for key in keys {
            let t = &tensors[key];
            if !dtypes.contains(&t.dtype()) {
                dtypes.push(t.dtype());
            }
            match parse_key(key) {
                Some(p) => {
                    let g = groups.entry((p.component, p.module)).or_default();
                    if let Some((other, _)) = g.insert(p.part, (key.clone(), t.clone())) {
                        bail!("{show}: `{key}` and `{other}` are the same tensor of one module");
                    }
                }
                None => unknown.push(key.clone()),
            }
        }
        let format = if tensors.keys().any(|k| k.contains(".lora_A.")) {
            LoraFormat::Peft
        } else if tensors.keys().any(|k| {
            k.contains(".lora.down.")
                || k.contains("lora_linear_layer")
                || k.contains("_lora.down.")
        }) {
            LoraFormat::DiffusersOld
        } else {
            LoraFormat::Kohya
        };
        let mut entries = Vec::new();
        for ((component, module), parts) in groups {
            let keys: Vec<String> = parts.values().map(|(k, _)| k.clone()).collect();
            let e = build_entry(component, &module, parts, &alphas, format)
                .with_context(|| format!("{show}: module `{module}` ({})", keys.join(", ")))?;
            match e {
                Some(e) => entries.push(e),
                // only an alpha, a scalar or a magnitude with nothing to scale
                None => unknown.extend(keys),
            }
        }
        if entries.is_empty() {
            bail!(
                "{show}: no LoRA tensors found (expected kohya `lora_unet_*`/`lora_te_*` keys with lora_down/lora_up, hada_*, lokr_* or diff parts, or diffusers/PEFT `lora_A`/`lora_B`){}",
                if unknown.is_empty() {
                    String::new()
                } else {
                    format!("; keys seen: {}", list_names(&unknown, 5))
                }
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            format,
            entries,
            unknown,
            metadata,
            dtypes,
        })
    }

    /// The entries for `component`.
    pub fn entries_for(&self, component: Component) -> impl Iterator<Item = &LoraEntry> {
        self.entries
            .iter()
            .filter(move |e| e.component == component)
    }
}

/// `a, b, c and 7 more`.
pub fn list_names(names: &[String], first: usize) -> String {
    let shown: Vec<&str> = names.iter().take(first).map(|s| s.as_str()).collect();
    let mut s = shown
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > first {
        s.push_str(&format!(" and {} more", names.len() - first));
    }
    s
}

fn build_entry(
    component: Component,
    module: &str,
    mut parts: BTreeMap<Part, (String, Tensor)>,
    alphas: &MetaAlphas,
    format: LoraFormat,
) -> Result<Option<LoraEntry>> {
    let keys: Vec<String> = parts.values().map(|(k, _)| k.clone()).collect();
    let take =
        |parts: &mut BTreeMap<Part, (String, Tensor)>, p: Part| parts.remove(&p).map(|(_, t)| t);
    let stored = match take(&mut parts, Part::Alpha) {
        Some(a) => Some(scalar(&a).context("`alpha` must be one finite number")?),
        None => None,
    };
    // LyCORIS folds `scalar` into lora_up / w1 when saving and resets it to 1 when loading.
    let _ = take(&mut parts, Part::Scalar);
    // PEFT's magnitude is per output channel whatever its stored shape (`[out]`, or
    // `[1, out, 1, 1]` for convolutions): kept 1-D, which means the output axis
    let dora = match (
        take(&mut parts, Part::DoraScale),
        take(&mut parts, Part::Magnitude),
    ) {
        (Some(_), Some(_)) => bail!("both `dora_scale` and `lora_magnitude_vector`"),
        (Some(d), None) => Some(d),
        (None, Some(m)) => Some(m.flatten_all()?),
        (None, None) => None,
    };
    let weights = if let Some(down) = take(&mut parts, Part::Down) {
        let up = take(&mut parts, Part::Up)
            .context("a `lora_down`/`lora_A` without its `lora_up`/`lora_B`")?;
        PatchWeights::Lora {
            down,
            up,
            mid: take(&mut parts, Part::Mid),
        }
    } else if let Some(w1a) = take(&mut parts, Part::HadaW1A) {
        let mut need =
            |p: Part, n: &str| take(&mut parts, p).with_context(|| format!("a LoHa without `{n}`"));
        let (w1b, w2a, w2b) = (
            need(Part::HadaW1B, "hada_w1_b")?,
            need(Part::HadaW2A, "hada_w2_a")?,
            need(Part::HadaW2B, "hada_w2_b")?,
        );
        let t = match (
            take(&mut parts, Part::HadaT1),
            take(&mut parts, Part::HadaT2),
        ) {
            (Some(a), Some(b)) => Some((a, b)),
            (None, None) => None,
            _ => bail!("a Tucker LoHa needs both `hada_t1` and `hada_t2`"),
        };
        PatchWeights::LoHa {
            w1a,
            w1b,
            w2a,
            w2b,
            t,
        }
    } else if parts.keys().any(|p| {
        matches!(
            p,
            Part::LokrW1
                | Part::LokrW1A
                | Part::LokrW2
                | Part::LokrW2A
                | Part::LokrW1B
                | Part::LokrW2B
        )
    }) {
        let mut factor = |full: Part, a: Part, b: Part, n: &str| -> Result<KronFactor> {
            match (
                take(&mut parts, full),
                take(&mut parts, a),
                take(&mut parts, b),
            ) {
                (Some(w), None, None) => Ok(KronFactor::Full(w)),
                (None, Some(a), Some(b)) => Ok(KronFactor::LowRank(a, b)),
                _ => bail!("a LoKr needs `lokr_{n}` or both `lokr_{n}_a` and `lokr_{n}_b`"),
            }
        };
        let w1 = factor(Part::LokrW1, Part::LokrW1A, Part::LokrW1B, "w1")?;
        let w2 = factor(Part::LokrW2, Part::LokrW2A, Part::LokrW2B, "w2")?;
        PatchWeights::LoKr {
            w1,
            w2,
            t2: take(&mut parts, Part::LokrT2),
        }
    } else if let Some(diff) = take(&mut parts, Part::Diff) {
        PatchWeights::Full {
            diff,
            diff_b: take(&mut parts, Part::DiffB),
        }
    } else if parts.is_empty() {
        return Ok(None);
    } else {
        bail!("tensors of no complete adapter");
    };
    let alpha = match (stored, format) {
        (Some(a), _) => Some(a),
        (None, LoraFormat::Kohya) => None,
        (None, _) => alphas.alpha_for(component, module, weights.rank()),
    };
    if !parts.is_empty() {
        let left: Vec<String> = parts.values().map(|(k, _)| k.clone()).collect();
        bail!(
            "{} tensors that do not belong with a {} adapter: {}",
            left.len(),
            weights.kind(),
            list_names(&left, 5)
        );
    }
    Ok(Some(LoraEntry {
        component,
        module: module.to_string(),
        keys,
        weights,
        alpha,
        dora_scale: dora,
    }))
}

fn scalar(t: &Tensor) -> Result<f64> {
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    match v.as_slice() {
        [x] if x.is_finite() => Ok(*x),
        _ => bail!("got a tensor of shape {:?}", t.dims()),
    }
}

/// Alphas from diffusers' `lora_adapter_metadata` JSON, per component (`unet.lora_alpha`,
/// `text_encoder.alpha_pattern`, or keys without prefix).
#[derive(Debug, Default)]
struct MetaAlphas {
    per: HashMap<Component, ComponentAlphas>,
}

/// `lora_alpha`, `alpha_pattern` and `use_rslora` of one component.
type ComponentAlphas = (Option<f64>, Vec<(String, f64)>, bool);

impl MetaAlphas {
    fn from_metadata(meta: &HashMap<String, String>) -> Result<Self> {
        let mut out = Self::default();
        let Some(raw) = meta.get("lora_adapter_metadata") else {
            return Ok(out);
        };
        let v: serde_json::Value = serde_json::from_str(raw).context("not valid JSON")?;
        for (c, prefix) in [
            (Component::Unet, "unet."),
            (Component::TextEncoder, "text_encoder."),
            (Component::TextEncoder2, "text_encoder_2."),
        ] {
            let get = |k: &str| {
                v.get(format!("{prefix}{k}"))
                    .or_else(|| (c == Component::Unet).then(|| v.get(k)).flatten())
            };
            let alpha = get("lora_alpha").and_then(|a| a.as_f64());
            let rslora = get("use_rslora").and_then(|a| a.as_bool()).unwrap_or(false);
            let mut pattern = Vec::new();
            if let Some(p) = get("alpha_pattern").and_then(|p| p.as_object()) {
                for (k, a) in p {
                    let a = a
                        .as_f64()
                        .with_context(|| format!("alpha_pattern `{k}` is not a number"))?;
                    pattern.push((k.clone(), a));
                }
            }
            out.per.insert(c, (alpha, pattern, rslora));
        }
        Ok(out)
    }

    /// Alpha such that `alpha / rank` is PEFT's scaling (with rsLoRA, `alpha / sqrt(rank)`).
    fn alpha_for(&self, c: Component, module: &str, rank: Option<usize>) -> Option<f64> {
        let (alpha, pattern, rslora) = self.per.get(&c)?;
        let a = pattern
            .iter()
            .find(|(p, _)| super::config::target_matches(p, module))
            .map(|(_, a)| *a)
            .or(*alpha);
        match (rslora, rank) {
            (true, Some(r)) => Some(a.unwrap_or(r as f64) * (r as f64).sqrt()),
            _ => a,
        }
    }
}
