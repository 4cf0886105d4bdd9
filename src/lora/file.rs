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
    /// A `B·A` on a linear layer (or 1x1 convolution), with no DoRA magnitude or one per
    /// output row: loaded on linear layers as a trainable adapter (DoRA: with a trainable
    /// magnitude).
    pub fn is_plain_lora(&self) -> bool {
        match &self.weights {
            PatchWeights::Lora { down, up, mid } => {
                let out = up.dims().first().copied();
                let dora_ok = match &self.dora_scale {
                    None => true,
                    Some(d) => {
                        Some(d.elem_count()) == out
                            && (d.rank() == 1 || d.dims().first() == out.as_ref())
                    }
                };
                mid.is_none()
                    && dora_ok
                    && down.rank() >= 2
                    && down.dims()[2..].iter().all(|&d| d == 1)
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
        t.dims().iter().skip(2).any(|&d| d > 1)
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
    /// `key: why` for tensors of known parts that make no valid adapter (a `lora_down`
    /// without its `lora_up`, factors that do not chain, ...): refused like unknown keys.
    pub invalid: Vec<String>,
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
        let mut invalid = Vec::new();
        for ((component, module), parts) in groups {
            let keys: Vec<String> = parts.values().map(|(k, _)| k.clone()).collect();
            match build_entry(component, &module, parts, &alphas, format) {
                Ok(Some(e)) => entries.push(e),
                // only an alpha, a scalar or a magnitude with nothing to scale
                Ok(None) => unknown.extend(keys),
                Err(why) => invalid.push(format!("{} ({why:#})", keys.join(", "))),
            }
        }
        if entries.is_empty() {
            bail!(
                "{show}: no LoRA tensors found (expected kohya `lora_unet_*`/`lora_te_*` keys with lora_down/lora_up, hada_*, lokr_* or diff parts, or diffusers/PEFT `lora_A`/`lora_B`){}",
                if unknown.is_empty() && invalid.is_empty() {
                    String::new()
                } else {
                    let mut seen = invalid.clone();
                    seen.extend(unknown.iter().cloned());
                    format!("; keys seen: {}", list_names(&seen, 5))
                }
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            format,
            entries,
            unknown,
            invalid,
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
    check_ranks(&weights)?;
    if dora.is_some() && weights.kind() == AdapterKind::Full {
        bail!("a DoRA magnitude on a full difference (no such kind in LyCORIS)");
    }
    if let PatchWeights::LoKr {
        w2: KronFactor::Full(_),
        t2: Some(_),
        ..
    } = &weights
    {
        bail!("`lokr_t2` with a whole `lokr_w2` (the Tucker core needs `lokr_w2_a`/`lokr_w2_b`)");
    }
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

/// Every part but `diff_b` must be at least 2-D with a first dimension of 1 or more (a rank
/// of 0 would divide alpha by 0).
fn check_ranks(w: &PatchWeights) -> Result<()> {
    for (name, t) in w.named_parts() {
        let d = t.dims();
        if name != "diff_b" && (d.len() < 2 || d[0] == 0) {
            bail!("`{name}` has shape {d:?}: needs at least 2 dimensions and a rank of 1 or more");
        }
    }
    Ok(())
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
            let has_any = v
                .as_object()
                .is_some_and(|o| o.keys().any(|k| k.starts_with(prefix)));
            // PEFT's LoraConfig default when the key is absent
            let alpha = get("lora_alpha")
                .and_then(|a| a.as_f64())
                .or(has_any.then_some(8.0));
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
    /// Pattern keys match as PEFT's `(.*\.)?key$` does for plain names, with the module's
    /// name with and without `text_model.`; where several match, the longest (most specific)
    /// wins (PEFT takes the first in the file's order, which these names do not keep). A
    /// component with metadata but no `lora_alpha` gets PEFT's default, 8.
    fn alpha_for(&self, c: Component, module: &str, rank: Option<usize>) -> Option<f64> {
        let (alpha, pattern, rslora) = self.per.get(&c)?;
        let short = module.strip_prefix("text_model.").unwrap_or(module);
        let long = format!("text_model.{short}");
        let a = pattern
            .iter()
            .filter(|(p, _)| {
                [module, short, long.as_str()]
                    .iter()
                    .any(|m| super::config::target_matches(p, m))
            })
            .max_by_key(|(p, _)| p.len())
            .map(|(_, a)| *a)
            .or(*alpha);
        match (rslora, rank) {
            (true, Some(r)) => Some(a.unwrap_or(r as f64) * (r as f64).sqrt()),
            _ => a,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(keys: &[(&str, Vec<usize>)], meta: Option<&str>) -> LoraFile {
        let tensors = keys
            .iter()
            .map(|(k, s)| {
                (
                    k.to_string(),
                    Tensor::ones(s.as_slice(), DType::F32, &Device::Cpu).unwrap(),
                )
            })
            .collect();
        let mut m = HashMap::new();
        if let Some(j) = meta {
            m.insert("lora_adapter_metadata".to_string(), j.to_string());
        }
        LoraFile::from_tensors(Path::new("t.safetensors"), tensors, m).unwrap()
    }

    #[test]
    fn metadata_alphas_follow_peft() {
        let meta = r#"{"unet.lora_alpha": 8, "unet.alpha_pattern": {"to_k": 3, "attn2.to_k": 5},
                       "text_encoder.r": 4, "text_encoder.alpha_pattern": {"encoder.layers.0.mlp.fc1": 2}}"#;
        let f = file(
            &[
                ("unet.a.attn1.to_k.lora_A.weight", vec![4, 6]),
                ("unet.a.attn1.to_k.lora_B.weight", vec![6, 4]),
                ("unet.a.attn2.to_k.lora_A.weight", vec![4, 6]),
                ("unet.a.attn2.to_k.lora_B.weight", vec![6, 4]),
                ("unet.a.attn2.to_q.lora_A.weight", vec![4, 6]),
                ("unet.a.attn2.to_q.lora_B.weight", vec![6, 4]),
                (
                    "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight",
                    vec![4, 6],
                ),
                (
                    "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight",
                    vec![6, 4],
                ),
                (
                    "text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_A.weight",
                    vec![4, 6],
                ),
                (
                    "text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_B.weight",
                    vec![6, 4],
                ),
            ],
            Some(meta),
        );
        let alpha = |m: &str| file_alpha(&f, m);
        assert_eq!(alpha("a.attn1.to_k"), Some(3.0));
        assert_eq!(
            alpha("a.attn2.to_k"),
            Some(5.0),
            "the more specific pattern"
        );
        assert_eq!(alpha("a.attn2.to_q"), Some(8.0));
        assert_eq!(
            alpha("text_model.encoder.layers.0.mlp.fc1"),
            Some(2.0),
            "with text_model."
        );
        assert_eq!(
            alpha("text_model.encoder.layers.0.mlp.fc2"),
            Some(8.0),
            "PEFT's default"
        );
    }

    fn file_alpha(f: &LoraFile, module: &str) -> Option<f64> {
        f.entries
            .iter()
            .find(|e| e.module == module)
            .and_then(|e| e.alpha)
    }

    #[test]
    fn malformed_adapters_are_listed_not_fatal() {
        let f = file(
            &[
                ("lora_unet_a.lora_down.weight", vec![4, 6]),
                ("lora_unet_a.lora_up.weight", vec![6, 4]),
                ("lora_unet_b.lora_down.weight", vec![4, 6]),
                ("lora_unet_c.lora_down.weight", vec![0, 6]),
                ("lora_unet_c.lora_up.weight", vec![6, 0]),
                ("lora_unet_d.diff", vec![6]),
                ("lora_unet_e.lokr_w1", vec![2, 2]),
                ("lora_unet_e.lokr_w2", vec![3, 3]),
                ("lora_unet_e.lokr_t2", vec![2, 2, 3, 3]),
            ],
            None,
        );
        assert_eq!(f.entries.len(), 1);
        assert_eq!(f.invalid.len(), 4, "{:?}", f.invalid);
        assert!(f.invalid[0].contains("lora_unet_b.lora_down.weight"));
        assert!(f.invalid.iter().any(|x| x.contains("rank of 1")));
        assert!(f.invalid.iter().any(|x| x.contains("lokr_t2")));
    }
}
