//! Where a model's tensors come from: safetensors files, a seeded random init, or shape-only
//! placeholders for counting parameters without loading gigabytes.
//!
//! Every tensor handed out is recorded (path and shape), so parameter counts and listings come
//! from the model as built, not from a hand-kept table.

use anyhow::{bail, Context, Result};
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Shape, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// How a parameter is initialised when weights are random (mirrors PyTorch's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Uniform in +-1/sqrt(fan_in), PyTorch's default for Linear and Conv weights and biases.
    FanIn(usize),
    /// All ones (norm scales).
    Ones,
    /// All zeros (norm shifts).
    Zeros,
}

/// Where a tensor lives in a checkpoint of another layout (an LDM single file): its key there,
/// and optionally a block of rows of it (`(start, len)` along dimension 0: OpenCLIP stores
/// q, k and v as one `in_proj_weight`).
#[derive(Debug, Clone, PartialEq)]
pub struct Remap {
    pub key: String,
    pub rows: Option<(usize, usize)>,
}

impl Remap {
    pub fn key(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            rows: None,
        }
    }
}

enum Backend {
    Files {
        st: MmapedSafetensors,
        files: Vec<PathBuf>,
        /// Our checkpoint key -> where the file keeps it (None: the file uses our keys).
        remap: Option<HashMap<String, Remap>>,
    },
    Random {
        rng: Box<RefCell<rand::rngs::StdRng>>,
    },
    /// Shape-only tensors (one element broadcast to the shape): for counting, never for compute.
    Meta,
}

/// A record of one tensor handed out by a [`WeightSource`].
#[derive(Debug, Clone)]
pub struct ParamRecord {
    pub path: String,
    pub shape: Shape,
}

/// Trainable tensors by checkpoint key.
pub type NamedVars = Vec<(String, Var)>;

/// A source of model tensors under a path prefix (diffusers checkpoint key layout).
#[derive(Clone)]
pub struct WeightSource {
    backend: Rc<Backend>,
    prefix: String,
    dtype: DType,
    device: Device,
    records: Rc<RefCell<Vec<ParamRecord>>>,
    /// Full-parameter mode: every tensor handed out is a `Var`, listed here by checkpoint key.
    vars: Option<Rc<RefCell<NamedVars>>>,
}

impl WeightSource {
    fn new(backend: Backend, dtype: DType, device: &Device) -> Self {
        Self {
            backend: Rc::new(backend),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            records: Rc::new(RefCell::new(Vec::new())),
            vars: None,
        }
    }

    /// Full-parameter mode: every tensor this source (and its views) hands out from now on is
    /// a trainable `Var`, so a model built from it trains all its weights (the frozen fast
    /// paths step aside for tracked weights). Collect them with [`Self::vars`].
    pub fn trainable(mut self) -> Self {
        self.vars = Some(Rc::new(RefCell::new(Vec::new())));
        self
    }

    /// The trainable tensors handed out so far, by checkpoint key (empty unless
    /// [`Self::trainable`]).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars
            .as_ref()
            .map(|v| v.borrow().clone())
            .unwrap_or_default()
    }

    /// Memory-maps safetensors files (several for sharded checkpoints). Tensors are converted
    /// to `dtype` on load, whatever their stored float type (f32, f16, bf16).
    pub fn from_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        for f in files {
            if !f.is_file() {
                bail!("weights file {} does not exist", f.display());
            }
        }
        // SAFETY: the files are memory-mapped read-only; we never write to them while mapped.
        let st = unsafe { MmapedSafetensors::multi(files) }.with_context(|| {
            format!(
                "cannot read safetensors file(s) {}",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        Ok(Self::new(
            Backend::Files {
                st,
                files: files.to_vec(),
                remap: None,
            },
            dtype,
            device,
        ))
    }

    /// [`Self::from_safetensors`] for a file in another layout: our key `k` is read from
    /// `remap[k]` (a key not in `remap` is missing).
    pub fn from_safetensors_remapped(
        file: &Path,
        remap: HashMap<String, Remap>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut ws = Self::from_safetensors(&[file.to_path_buf()], dtype, device)?;
        if let Some(Backend::Files { remap: r, .. }) = Rc::get_mut(&mut ws.backend) {
            *r = Some(remap);
        }
        Ok(ws)
    }

    /// Seeded random weights with PyTorch-like initialisation (for tests, benches, pre-training).
    pub fn random(seed: u64, dtype: DType, device: &Device) -> Self {
        Self::new(
            Backend::Random {
                rng: Box::new(RefCell::new(rand::rngs::StdRng::seed_from_u64(seed))),
            },
            dtype,
            device,
        )
    }

    /// Shape-only placeholders: builds a model's structure for counting without any weights.
    pub fn meta(dtype: DType) -> Self {
        Self::new(Backend::Meta, dtype, &Device::Cpu)
    }

    pub fn is_meta(&self) -> bool {
        matches!(*self.backend, Backend::Meta)
    }

    /// A view of this source under `prefix.name`.
    pub fn pp(&self, name: impl AsRef<str>) -> Self {
        let name = name.as_ref();
        let mut s = self.clone();
        s.prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        s
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the checkpoint holds `name` under this prefix (always true for random/meta).
    pub fn contains(&self, name: &str) -> bool {
        match &*self.backend {
            Backend::Files {
                st, remap: Some(r), ..
            } => r
                .get(&self.path_of(name))
                .is_some_and(|m| st.get(&m.key).is_ok()),
            Backend::Files { st, .. } => st.get(&self.path_of(name)).is_ok(),
            _ => true,
        }
    }

    /// Full checkpoint key of `name` under this source's prefix.
    pub fn path_of(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Every tensor handed out so far (by this source and all views sharing it).
    pub fn records(&self) -> Vec<ParamRecord> {
        self.records.borrow().clone()
    }

    /// Fetches tensor `name` with the expected `shape`. Stored tensors of the same element
    /// count in another layout (a 1x1 conv `[o, i, 1, 1]` for a linear `[o, i]`) are reshaped.
    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let path = self.path_of(name);
        let t = match &*self.backend {
            Backend::Files { st, files, remap } => {
                let (key, rows) = match remap {
                    Some(r) => {
                        let m = r.get(&path).with_context(|| {
                            format!(
                                "tensor `{path}` (expected shape {shape:?}) has no counterpart in {}",
                                list(files)
                            )
                        })?;
                        (m.key.as_str(), m.rows)
                    }
                    None => (path.as_str(), None),
                };
                let t = st.load(key, &Device::Cpu).map_err(|_| {
                    let theirs = if key == path {
                        String::new()
                    } else {
                        format!(" (stored as `{key}`)")
                    };
                    anyhow::anyhow!(
                        "tensor `{path}`{theirs} (expected shape {shape:?}) is missing from {}",
                        list(files)
                    )
                })?;
                let t = match rows {
                    Some((start, len)) if start + len <= t.dim(0).unwrap_or(0) => {
                        t.narrow(0, start, len)?
                    }
                    Some((start, len)) => bail!(
                        "tensor `{key}` in {} has shape {:?}: rows {start}..{} do not exist",
                        list(files),
                        t.dims(),
                        start + len
                    ),
                    None => t,
                };
                if !t.dtype().is_float() {
                    bail!(
                        "tensor `{path}` in {} has dtype {:?}, expected a float type",
                        list(files),
                        t.dtype()
                    );
                }
                let t = if t.shape() != &shape {
                    if t.elem_count() == shape.elem_count()
                        && squeezed(t.dims()) == squeezed(shape.dims())
                    {
                        t.reshape(&shape)?
                    } else {
                        bail!(
                            "tensor `{path}` in {} has shape {:?}, expected {:?} (a checkpoint for another model config?)",
                            list(files),
                            t.dims(),
                            shape.dims()
                        );
                    }
                } else {
                    t
                };
                t.to_dtype(self.dtype)?.to_device(&self.device)?
            }
            Backend::Random { rng } => {
                let n = shape.elem_count();
                let data: Vec<f32> = match init {
                    Init::Ones => vec![1.0; n],
                    Init::Zeros => vec![0.0; n],
                    Init::FanIn(fan_in) => {
                        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                        let mut rng = rng.borrow_mut();
                        (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                    }
                };
                Tensor::from_vec(data, &shape, &Device::Cpu)?
                    .to_dtype(self.dtype)?
                    .to_device(&self.device)?
            }
            Backend::Meta => Tensor::zeros((), self.dtype, &Device::Cpu)?.broadcast_as(&shape)?,
        };
        let t = match &self.vars {
            Some(vars) if !self.is_meta() => {
                let v = Var::from_tensor(&t)?;
                vars.borrow_mut().push((path.clone(), v.clone()));
                v.as_tensor().clone()
            }
            _ => t,
        };
        self.records.borrow_mut().push(ParamRecord { path, shape });
        Ok(t)
    }
}

/// A tensor of normal samples with standard deviation `std`, reproducible from `seed` (candle's
/// own `Tensor::randn` cannot be seeded on the CPU). f32.
pub fn randn_seeded(seed: u64, dims: &[usize], std: f64, device: &Device) -> Result<Tensor> {
    use rand_distr::{Distribution, Normal};
    if !(std.is_finite() && std >= 0.0) {
        bail!("randn_seeded: the standard deviation must be a finite number >= 0, got {std}");
    }
    let d = Normal::new(0.0, std).with_context(|| format!("invalid standard deviation {std}"))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| d.sample(&mut rng) as f32).collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?.to_device(device)?)
}

/// Standard-normal f32 samples drawn from `rng` in flight (noise of training steps and
/// sampling; the same stream whatever the device).
pub(crate) fn randn_from<R: Rng + ?Sized>(
    rng: &mut R,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    use rand_distr::{Distribution, StandardNormal};
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?)
}

/// Writes trainable tensors (full-parameter mode) under their checkpoint keys to a safetensors
/// file, atomically, in `dtype`: a model folder that every loader here (and diffusers) reads.
pub fn save_weights(vars: &[(String, Var)], dtype: DType, path: &Path) -> Result<()> {
    let mut tensors = std::collections::BTreeMap::new();
    for (name, v) in vars {
        tensors.insert(
            name.clone(),
            v.as_tensor().to_device(&Device::Cpu)?.to_dtype(dtype)?,
        );
    }
    crate::io::write_safetensors_atomic(&tensors, None, path)
}

fn squeezed(d: &[usize]) -> Vec<usize> {
    d.iter().copied().filter(|&x| x != 1).collect()
}

fn list(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A diffusers component folder: `dir/<sub>` when it exists (a pipeline root), else `dir`.
pub fn component_dir(dir: &Path, sub: &str) -> PathBuf {
    if dir.join(sub).is_dir() {
        dir.join(sub)
    } else {
        dir.to_path_buf()
    }
}

/// Memory-maps a component's `<stem>[.variant].safetensors` (or its shards) as a
/// [`WeightSource`] converting to `dtype` on `device`.
pub fn open_weights(
    dir: &Path,
    stem: &str,
    variant: Option<&str>,
    dtype: DType,
    device: &Device,
) -> Result<WeightSource> {
    WeightSource::from_safetensors(&find_weight_files(dir, stem, variant)?, dtype, device)
}

/// Finds a diffusers model's weights in `dir`: `<stem>.safetensors`, its `.fp16` variant,
/// or a sharded `<stem>.safetensors.index.json`.
pub fn find_weight_files(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let name = match variant {
        Some(v) => format!("{stem}.{v}.safetensors"),
        None => format!("{stem}.safetensors"),
    };
    let single = dir.join(&name);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(format!("{name}.index.json"));
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no `weight_map` object", index.display()))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let mut hint = String::new();
    if variant.is_none() && dir.join(format!("{stem}.fp16.safetensors")).is_file() {
        hint = " (only the fp16 variant is present: ask for variant \"fp16\")".into();
    }
    bail!(
        "no weights in {}: expected {name} or {name}.index.json{hint}",
        dir.display()
    )
}
