//! `LoraLinear`: a frozen linear layer (or 1x1 convolution) with an optional LoRA adapter,
//! computing `W0·x (+ b) + scale·(alpha/rank)·B(A(x))`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};

use super::config::LoraInit;
use super::patch::{PatchSet, Patchable, WeightPatch};
use crate::weights::{Init, WeightSource};

/// Name of the adapter that `inject_lora` creates and training updates.
pub const DEFAULT_ADAPTER: &str = "default";

/// A LoRA adapter: trainable `A [rank, in]` and `B [out, rank]`, always f32.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `default` for the trained adapter; loaded files get their own names so several can
    /// stack on one layer.
    pub name: String,
    pub a: Var,
    pub b: Var,
    pub alpha: f64,
    /// Runtime strength multiplying `alpha/rank`; 0 switches the adapter off.
    pub scale: f64,
    /// When false the layer computes the base model only.
    pub enabled: bool,
    /// DoRA: a trainable magnitude per output row, `[out]` f32. The layer then computes
    /// `W' = m · V / ‖V‖` with `V = W + (alpha/rank)·B·A` and the norm per output row
    /// (LyCORIS `dora_wd`, PEFT `use_dora`; gradients flow through the norm as in LyCORIS,
    /// PEFT detaches it), blended as `W + scale·(W' − W)`.
    pub magnitude: Option<Var>,
}

/// `n` values of a fresh `A` with fan-in `fan_in`, per `init`, seeded by `seed`.
fn init_values(init: LoraInit, n: usize, fan_in: usize, seed: u64) -> Result<Vec<f32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Ok(match init {
        LoraInit::Normal { std } => {
            let d =
                Normal::new(0.0, std).with_context(|| format!("invalid LoRA init std {std}"))?;
            (0..n).map(|_| d.sample(&mut rng) as f32).collect()
        }
        LoraInit::KaimingUniform => {
            let bound = 1.0 / (fan_in as f64).sqrt();
            let d = Uniform::new(-bound, bound)?;
            (0..n).map(|_| d.sample(&mut rng) as f32).collect()
        }
    })
}

impl LoraAdapter {
    /// A fresh trainable adapter for a convolution with weight `[out, in, k, k]` (LoCon,
    /// kohya's `conv_dim`): `A [rank, in, k, k]` (the down-projection convolves with the
    /// layer's own stride and padding) initialised per `init` with fan-in `in·k·k`, and
    /// `B [out, rank, 1, 1] = 0`, so the layer starts as the base layer. f32, on `device`.
    pub fn new_conv(
        name: &str,
        weight_shape: &[usize],
        rank: usize,
        alpha: f64,
        init: LoraInit,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let &[out, cin, kh, kw] = weight_shape else {
            bail!("a conv adapter needs a [out, in, k, k] weight, got {weight_shape:?}");
        };
        if rank == 0 {
            bail!("LoRA rank must be at least 1");
        }
        let a = init_values(init, rank * cin * kh * kw, cin * kh * kw, seed)?;
        let a = Tensor::from_vec(a, (rank, cin, kh, kw), &Device::Cpu)?.to_device(device)?;
        let b = Tensor::zeros((out, rank, 1, 1), DType::F32, device)?;
        Ok(Self {
            name: name.to_string(),
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            alpha,
            scale: 1.0,
            enabled: true,
            magnitude: None,
        })
    }

    /// True for a convolution's adapter (`A [r, in, k, k]`).
    pub fn is_conv(&self) -> bool {
        self.a.rank() == 4
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `scale * alpha / rank`, the factor in front of `B A x`.
    pub fn factor(&self) -> f64 {
        self.scale * self.alpha / self.rank() as f64
    }

    /// `dW = (alpha/rank) · B · A` (without the runtime scale), f32: `[out, in]`, or
    /// `[out, in, k, k]` for a convolution's adapter.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let f = self.alpha / self.rank() as f64;
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        if !self.is_conv() {
            return Ok((b.matmul(a)? * f)?);
        }
        let &[r, cin, kh, kw] = a.dims() else {
            bail!("conv adapter A must be [r, in, k, k]");
        };
        let out = b.dims()[0];
        let d = b
            .reshape((out, r))?
            .matmul(&a.reshape((r, cin * kh * kw))?)?;
        Ok((d.reshape((out, cin, kh, kw))? * f)?)
    }

    pub fn num_params(&self) -> usize {
        self.a.elem_count()
            + self.b.elem_count()
            + self.magnitude.as_ref().map_or(0, |m| m.elem_count())
    }

    /// `m / ‖W + (alpha/rank)·B·A‖` per output row, `[out]` (DoRA adapters only).
    fn dora_gain(&self, w: &Tensor, m: &Var) -> Result<Tensor> {
        let c = self.alpha / self.rank() as f64;
        let v = (w.to_dtype(DType::F32)? + (self.b.as_tensor().matmul(self.a.as_tensor())? * c)?)?;
        let norm = (v.sqr()?.sum(1)?.sqrt()? + f32::EPSILON as f64)?;
        Ok(m.as_tensor().div(&norm)?)
    }
}

/// A frozen linear layer with any number of LoRA adapters (usually one), whose updates add up:
/// the tutorial's `LoRALayer` inside its `LinearWithLoRA`.
#[doc(alias = "LoRALayer", alias = "LinearWithLoRA")]
#[derive(Debug, Clone)]
pub struct LoraLinear {
    name: String,
    weight: Tensor,
    bias: Option<Tensor>,
    conv1x1: bool,
    adapters: Vec<LoraAdapter>,
    /// The base weight before `merge`, restored bit-exactly by `unmerge`.
    unmerged: Option<Tensor>,
    /// Adapters of loaded files that patch the weight (LoHa, LoKr, DoRA, full, ...).
    patches: PatchSet,
}

impl LoraLinear {
    /// Loads `weight [out, in]` (and `bias [out]`) from `ws`. With `conv1x1`, checkpoints store
    /// the weight as a 1x1 convolution `[out, in, 1, 1]` (SD 1.x's `proj_in`/`proj_out`).
    pub fn load(
        ws: &WeightSource,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        conv1x1: bool,
    ) -> Result<Self> {
        let wshape: Vec<usize> = if conv1x1 {
            vec![out_dim, in_dim, 1, 1]
        } else {
            vec![out_dim, in_dim]
        };
        let weight = ws.get(wshape, "weight", Init::FanIn(in_dim))?;
        let weight = if ws.is_meta() {
            Tensor::zeros((), weight.dtype(), weight.device())?.broadcast_as((out_dim, in_dim))?
        } else {
            weight.reshape((out_dim, in_dim))?
        };
        let bias = if bias {
            Some(ws.get(out_dim, "bias", Init::FanIn(in_dim))?)
        } else {
            None
        };
        Ok(Self {
            name: ws.prefix().to_string(),
            weight,
            bias,
            conv1x1,
            adapters: Vec::new(),
            unmerged: None,
            patches: PatchSet::default(),
        })
    }

    /// Wraps an existing weight `[out, in]` (and bias `[out]`) as a frozen layer named `name`,
    /// without adapters.
    pub fn new(name: &str, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, _) = weight
            .dims2()
            .with_context(|| format!("{name}: the weight must be 2-D [out, in]"))?;
        if let Some(b) = &bias {
            if b.dims() != [out_dim] {
                bail!("{name}: bias {:?} does not fit {out_dim} outputs", b.dims());
            }
        }
        Ok(Self {
            name: name.to_string(),
            weight: weight.detach(),
            bias: bias.map(|b| b.detach()),
            conv1x1: false,
            adapters: Vec::new(),
            unmerged: None,
            patches: PatchSet::default(),
        })
    }

    /// Module path, equal to the diffusers checkpoint key without `.weight`.
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }
    /// True for layers stored as 1x1 convolutions.
    pub fn is_conv1x1(&self) -> bool {
        self.conv1x1
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// The first adapter (the `default` one when present).
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapters
            .iter()
            .find(|a| a.name == DEFAULT_ADAPTER)
            .or(self.adapters.first())
    }
    pub fn adapter_mut(&mut self) -> Option<&mut LoraAdapter> {
        let i = self
            .adapters
            .iter()
            .position(|a| a.name == DEFAULT_ADAPTER)
            .unwrap_or(0);
        self.adapters.get_mut(i)
    }
    pub fn adapters(&self) -> &[LoraAdapter] {
        &self.adapters
    }
    pub fn adapters_mut(&mut self) -> &mut [LoraAdapter] {
        &mut self.adapters
    }
    pub fn adapter_named(&self, name: &str) -> Option<&LoraAdapter> {
        self.adapters.iter().find(|a| a.name == name)
    }
    pub fn is_merged(&self) -> bool {
        self.unmerged.is_some()
    }
    pub fn num_base_params(&self) -> usize {
        self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }

    /// Attaches a fresh adapter (`B = 0`) initialised per `init`, seeded by `seed`.
    pub fn init_adapter(
        &mut self,
        rank: usize,
        alpha: f64,
        init: LoraInit,
        seed: u64,
        device: &Device,
    ) -> Result<&LoraAdapter> {
        let (out_dim, in_dim) = (self.out_dim(), self.in_dim());
        let a = init_values(init, rank * in_dim, in_dim, seed)?;
        let a = Tensor::from_vec(a, (rank, in_dim), &Device::Cpu)?.to_device(device)?;
        let b = Tensor::zeros((out_dim, rank), DType::F32, device)?;
        self.set_adapter(a, b, alpha)
    }

    /// Attaches the `default` adapter with given `A [rank, in]` and `B [out, rank]` (see
    /// [`Self::add_adapter`]).
    pub fn set_adapter(&mut self, a: Tensor, b: Tensor, alpha: f64) -> Result<&LoraAdapter> {
        self.add_adapter(DEFAULT_ADAPTER, a, b, alpha)
    }

    /// Attaches adapter `name` with `A [rank, in]` and `B [out, rank]` (converted to f32 `Var`s
    /// on the base weight's device). Fails if the layer already has an adapter of that name.
    pub fn add_adapter(
        &mut self,
        name: &str,
        a: Tensor,
        b: Tensor,
        alpha: f64,
    ) -> Result<&LoraAdapter> {
        if self.adapters.iter().any(|x| x.name == name) {
            bail!(
                "{} already has a LoRA adapter named `{name}` (remove it first)",
                self.name
            );
        }
        if self.is_merged() {
            bail!(
                "{}: cannot replace the adapter while it is merged; unmerge first",
                self.name
            );
        }
        let a = squeeze_1x1(a)?;
        let b = squeeze_1x1(b)?;
        let (ra, ia) = a
            .dims2()
            .with_context(|| format!("{}: LoRA A must be 2-D", self.name))?;
        let (ob, rb) = b
            .dims2()
            .with_context(|| format!("{}: LoRA B must be 2-D", self.name))?;
        if ia != self.in_dim() || ob != self.out_dim() || ra != rb {
            bail!(
                "{}: LoRA shapes A {:?} / B {:?} do not fit a layer {} -> {} (expected A [r, {}], B [{}, r])",
                self.name, a.dims(), b.dims(), self.in_dim(), self.out_dim(), self.in_dim(), self.out_dim()
            );
        }
        let dev = self.weight.device().clone();
        let a = Var::from_tensor(&a.to_dtype(DType::F32)?.to_device(&dev)?)?;
        let b = Var::from_tensor(&b.to_dtype(DType::F32)?.to_device(&dev)?)?;
        self.adapters.push(LoraAdapter {
            name: name.to_string(),
            a,
            b,
            alpha,
            scale: 1.0,
            enabled: true,
            magnitude: None,
        });
        Ok(self.adapters.last().expect("adapter just added"))
    }

    /// Makes adapter `name` a DoRA adapter with magnitude `m` (`[out]` or any shape of `out`
    /// values, as files store it); `None` starts from the base weight's row norms, so a fresh
    /// DoRA adapter with `B = 0` computes the base model.
    pub fn set_magnitude(&mut self, name: &str, m: Option<Tensor>) -> Result<&LoraAdapter> {
        let out = self.out_dim();
        let dev = self.weight.device().clone();
        let m = match m {
            Some(m) if m.elem_count() == out => m.reshape(out)?,
            Some(m) => bail!(
                "{}: a DoRA magnitude of shape {:?} for {out} outputs",
                self.name,
                m.dims()
            ),
            None => self.weight.to_dtype(DType::F32)?.sqr()?.sum(1)?.sqrt()?,
        };
        let m = Var::from_tensor(&m.to_dtype(DType::F32)?.to_device(&dev)?)?;
        let layer = self.name.clone();
        let ad = self
            .adapters
            .iter_mut()
            .find(|a| a.name == name)
            .with_context(|| format!("{layer}: no adapter named `{name}`"))?;
        ad.magnitude = Some(m);
        Ok(ad)
    }

    /// Removes every adapter (unmerging first if needed).
    pub fn remove_adapters(&mut self) -> Result<Vec<LoraAdapter>> {
        self.unmerge()?;
        self.patches.clear();
        Ok(std::mem::take(&mut self.adapters))
    }

    /// Folds every active adapter's `scale·(alpha/rank)·B·A` into the base weight; the forward
    /// then skips the LoRA branches (for inference: gradients no longer reach A and B).
    pub fn merge(&mut self) -> Result<()> {
        let active: Vec<&LoraAdapter> = self
            .adapters
            .iter()
            .filter(|a| a.enabled && a.scale != 0.0)
            .collect();
        if self.is_merged() || active.is_empty() {
            return Ok(());
        }
        if self
            .patches
            .list()
            .iter()
            .any(|p| p.is_active() && p.dora_scale.is_some())
        {
            bail!(
                "{}: a DoRA patch normalises the weight without the LoRA adapters beside it; merging them would change that (keep them unmerged)",
                self.name
            );
        }
        let base = self.weight.to_dtype(DType::F32)?;
        let mut merged = base.clone();
        for ad in active {
            let d = match &ad.magnitude {
                // W + s·(g·(W + cBA) − W)
                Some(m) => {
                    let g = ad.dora_gain(&base, m)?.unsqueeze(1)?;
                    let v = (&base + ad.delta_weight()?)?;
                    (v.broadcast_mul(&g)? - &base)?
                }
                None => ad.delta_weight()?,
            };
            merged = (merged + (d * ad.scale)?)?;
        }
        let merged = merged.to_dtype(self.weight.dtype())?;
        self.unmerged = Some(std::mem::replace(&mut self.weight, merged));
        self.patches.refresh(&self.weight, self.bias.as_ref())
    }

    /// Restores the exact base weight saved by `merge`.
    pub fn unmerge(&mut self) -> Result<()> {
        if let Some(w) = self.unmerged.take() {
            self.weight = w;
            self.patches.refresh(&self.weight, self.bias.as_ref())?;
        }
        Ok(())
    }

    /// `x [..., in] -> [..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, bias) = match self.patches.effective() {
            Some((w, b)) => (w, b.as_ref()),
            None => (&self.weight, self.bias.as_ref()),
        };
        let active: Vec<&LoraAdapter> = if self.is_merged() {
            Vec::new()
        } else {
            self.adapters
                .iter()
                .filter(|a| a.enabled && a.scale != 0.0)
                .collect()
        };
        // DoRA needs x·Wᵀ without the bias: computed once, shared with the base output
        let (mut y, xw) = if active.iter().any(|a| a.magnitude.is_some()) {
            let xw = linear(x, w, None)?;
            let y = match bias {
                Some(b) => xw.broadcast_add(b)?,
                None => xw.clone(),
            };
            (y, Some(xw.to_dtype(DType::F32)?))
        } else {
            (linear(x, w, bias)?, None)
        };
        if active.is_empty() {
            return Ok(y);
        }
        let xf = x.to_dtype(DType::F32)?;
        for ad in active {
            if let (Some(m), Some(xw)) = (&ad.magnitude, &xw) {
                // y += s·((g − 1)·xWᵀ + g·c·BAx), g = m/‖W + cBA‖ per output
                let g = ad.dora_gain(w, m)?;
                let c = ad.alpha / ad.rank() as f64;
                let bax = linear(
                    &(linear(&xf, ad.a.as_tensor(), None)? * c)?,
                    ad.b.as_tensor(),
                    None,
                )?;
                let term =
                    ((xw.broadcast_mul(&(&g - 1.0)?)? + bax.broadcast_mul(&g)?)? * ad.scale)?;
                y = (y + term.to_dtype(x.dtype())?)?;
                continue;
            }
            // the scale goes on the rank-r intermediate, a pass over N·r values instead of
            // N·out (forward and backward)
            let down = (linear(&xf, ad.a.as_tensor(), None)? * ad.factor())?;
            let h = linear(&down, ad.b.as_tensor(), None)?;
            y = (y + h.to_dtype(x.dtype())?)?;
        }
        Ok(y)
    }
}

impl Patchable for LoraLinear {
    fn name(&self) -> &str {
        &self.name
    }
    fn weight_shape(&self) -> Vec<usize> {
        self.weight.dims().to_vec()
    }
    fn bias_len(&self) -> Option<usize> {
        self.bias.as_ref().map(|b| b.elem_count())
    }
    fn patches(&self) -> &PatchSet {
        &self.patches
    }
    fn add_patch(&mut self, p: WeightPatch) -> Result<()> {
        p.check(self.weight.dims(), self.bias_len())
            .with_context(|| self.name.to_string())?;
        self.patches.push(p, &self.weight, self.bias.as_ref())
    }
    fn update_patches(&mut self, f: &mut dyn FnMut(&mut WeightPatch)) -> Result<()> {
        self.patches.update(&self.weight, self.bias.as_ref(), f)
    }
    fn clear_patches(&mut self) {
        self.patches.clear();
    }
    fn is_conv(&self) -> bool {
        self.conv1x1
    }
    fn lora_adapters(&self) -> &[LoraAdapter] {
        &self.adapters
    }
    fn lora_adapters_mut(&mut self) -> &mut [LoraAdapter] {
        &mut self.adapters
    }
    fn push_lora_adapter(&mut self, ad: LoraAdapter) -> Result<()> {
        let m = ad.magnitude.as_ref().map(|m| m.as_tensor().clone());
        self.add_adapter(
            &ad.name,
            ad.a.as_tensor().clone(),
            ad.b.as_tensor().clone(),
            ad.alpha,
        )?;
        if m.is_some() {
            self.set_magnitude(&ad.name, m)?;
        }
        Ok(())
    }
    fn clear_lora_adapters(&mut self) -> Result<()> {
        self.unmerge()?;
        self.adapters.clear();
        Ok(())
    }
}

fn squeeze_1x1(t: Tensor) -> Result<Tensor> {
    match t.dims() {
        [o, i, 1, 1] => Ok(t.reshape((*o, *i))?),
        _ => Ok(t),
    }
}

/// `x @ w^T + b` over any number of leading dimensions (no weight gradient when `w` is frozen).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = *dims.last().context("linear: input has no dimensions")?;
    let rows = x.elem_count() / in_dim.max(1);
    let out_dim = w.dims()[0];
    let y = crate::ops::frozen_linear(&x.reshape((rows, in_dim))?, w, b)?;
    let mut out_shape = dims.to_vec();
    *out_shape.last_mut().expect("non-empty dims") = out_dim;
    Ok(y.reshape(out_shape)?)
}
