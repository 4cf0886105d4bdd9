//! Weight patches: the adapters of LoRA files that are not a plain trainable `B·A` on a linear
//! layer (LoCon on convolutions, Tucker LoCon, LoHa, LoKr, DoRA, full differences). Each one
//! rebuilds its `ΔW` exactly as LyCORIS' forward does (`lycoris-lora` 4.x, the reference our
//! fixtures come from) and the layer computes with `W' = patches(W)`, kept beside the exact base
//! weight so that strength changes and removal are exact.
//!
//! Semantics, per patch at strength `s` (applied in load order, as ComfyUI patches weights):
//! - additive kinds: `W' = W + s·ΔW`, `b' = b + s·Δb` (full `diff_b` only);
//! - with a DoRA magnitude `m`: `V = W + ΔW`, `W_d = V · m / (‖V‖ + ε)` with the norm per output
//!   row (`m` shaped `[out, 1, ..]`, LyCORIS >= 3.2 and PEFT) or per input column (`m` shaped
//!   `[1, in, ..]`, older LyCORIS and most files in circulation), `ε` = f32 epsilon, then
//!   `W' = W + s·(W_d − W)`. At `s = 1` this is LyCORIS' and ComfyUI's result; for `s ≠ 1` we
//!   follow ComfyUI/A1111 (a linear blend, `s = 0` is the base model) rather than LyCORIS'
//!   `V·(s·(m/‖V‖ − 1) + 1)`, which keeps the full `ΔW` even at `s = 0`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

use super::linear::LoraAdapter;

/// One factor of a LoKr Kronecker product: stored whole or as `a·b`.
#[derive(Debug, Clone)]
pub enum KronFactor {
    Full(Tensor),
    /// `a [o, r]`, `b [r, i]` (or `b [r, i, k, k]` for the second factor of a conv).
    LowRank(Tensor, Tensor),
}

/// The tensors of one adapter, as the file stores them (any dtype; converted at use).
#[derive(Debug, Clone)]
pub enum PatchWeights {
    /// LoRA / LoCon: `up [out, r(,1,1)]`, `down [r, in(,k,k)]`; with `mid [r, r, k, k]` Tucker
    /// LoCon (`down [r, in, 1, 1]`).
    Lora {
        down: Tensor,
        up: Tensor,
        mid: Option<Tensor>,
    },
    /// LoHa: `(w1a·w1b) ⊙ (w2a·w2b)`; with `t1`/`t2` the Tucker form (`w*a [r, out]`,
    /// `w*b [r, in]`).
    LoHa {
        w1a: Tensor,
        w1b: Tensor,
        w2a: Tensor,
        w2b: Tensor,
        t: Option<(Tensor, Tensor)>,
    },
    /// LoKr: `kron(w1, w2)`, `w2` optionally Tucker (`t2`).
    LoKr {
        w1: KronFactor,
        w2: KronFactor,
        t2: Option<Tensor>,
    },
    /// A full difference `diff` (and bias difference `diff_b`).
    Full {
        diff: Tensor,
        diff_b: Option<Tensor>,
    },
}

/// The kinds of adapter a file can hold (for reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum AdapterKind {
    Lora,
    LoHa,
    LoKr,
    Full,
}

impl std::fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AdapterKind::Lora => "LoRA",
            AdapterKind::LoHa => "LoHa",
            AdapterKind::LoKr => "LoKr",
            AdapterKind::Full => "full",
        })
    }
}

impl PatchWeights {
    pub fn kind(&self) -> AdapterKind {
        match self {
            PatchWeights::Lora { .. } => AdapterKind::Lora,
            PatchWeights::LoHa { .. } => AdapterKind::LoHa,
            PatchWeights::LoKr { .. } => AdapterKind::LoKr,
            PatchWeights::Full { .. } => AdapterKind::Full,
        }
    }

    /// The rank `alpha` is divided by; `None` where alpha does not apply (full differences,
    /// LoKr with both factors whole).
    pub fn rank(&self) -> Option<usize> {
        match self {
            PatchWeights::Lora { down, .. } => down.dims().first().copied(),
            PatchWeights::LoHa { w1b, .. } => w1b.dims().first().copied(),
            // the first dimension of `w1_b`, else of `w2_b` (ComfyUI's rule, and LyCORIS' at
            // training time; LyCORIS' file loader reads `w2_a.size(1)`, which for Tucker
            // factors is the output size, not the rank)
            PatchWeights::LoKr { w1, w2, .. } => match (w1, w2) {
                (KronFactor::LowRank(_, b), _) | (_, KronFactor::LowRank(_, b)) => {
                    b.dims().first().copied()
                }
                _ => None,
            },
            PatchWeights::Full { .. } => None,
        }
    }

    /// The multiplier of the rebuilt product: `alpha / rank` (alpha absent or 0 means
    /// alpha = rank, as kohya and LyCORIS read it), 1 for full differences and whole LoKr.
    pub fn alpha_scale(&self, alpha: Option<f64>) -> f64 {
        match self.rank() {
            None => 1.0,
            Some(r) => match alpha {
                Some(a) if a != 0.0 => a / r as f64,
                _ => 1.0,
            },
        }
    }

    /// The number of stored values.
    pub fn num_params(&self) -> usize {
        self.named_parts().iter().map(|(_, t)| t.elem_count()).sum()
    }

    /// The tensors under their LyCORIS/kohya part names (`lora_down.weight`, `hada_w1_a`,
    /// `lokr_w2_b`, `diff_b`, ...), in that layout's order.
    pub fn named_parts(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v: Vec<(&'static str, &Tensor)> = Vec::new();
        match self {
            PatchWeights::Lora { down, up, mid } => {
                v.extend([("lora_down.weight", down), ("lora_up.weight", up)]);
                v.extend(mid.iter().map(|m| ("lora_mid.weight", m)));
            }
            PatchWeights::LoHa {
                w1a,
                w1b,
                w2a,
                w2b,
                t,
            } => {
                v.extend([
                    ("hada_w1_a", w1a),
                    ("hada_w1_b", w1b),
                    ("hada_w2_a", w2a),
                    ("hada_w2_b", w2b),
                ]);
                if let Some((t1, t2)) = t {
                    v.extend([("hada_t1", t1), ("hada_t2", t2)]);
                }
            }
            PatchWeights::LoKr { w1, w2, t2 } => {
                for (f, [whole, a_name, b_name]) in [
                    (w1, ["lokr_w1", "lokr_w1_a", "lokr_w1_b"]),
                    (w2, ["lokr_w2", "lokr_w2_a", "lokr_w2_b"]),
                ] {
                    match f {
                        KronFactor::Full(t) => v.push((whole, t)),
                        KronFactor::LowRank(a, b) => v.extend([(a_name, a), (b_name, b)]),
                    }
                }
                v.extend(t2.iter().map(|t| ("lokr_t2", t)));
            }
            PatchWeights::Full { diff, diff_b } => {
                v.push(("diff", diff));
                v.extend(diff_b.iter().map(|b| ("diff_b", b)));
            }
        }
        v
    }

    /// The shape [`Self::product`] will have, checking that the factors fit each other,
    /// without computing anything.
    fn product_shape(&self) -> Result<Vec<usize>> {
        fn inner(a: &Tensor, ai: usize, b: &Tensor, bi: usize, what: &str) -> Result<()> {
            let (x, y) = (a.dims().get(ai).copied(), b.dims().get(bi).copied());
            if x.is_none() || x != y {
                bail!(
                    "{what}: shapes {:?} and {:?} do not chain",
                    a.dims(),
                    b.dims()
                );
            }
            Ok(())
        }
        let dims = |t: &Tensor| t.dims().to_vec();
        let second = |t: &Tensor| -> Result<usize> {
            t.dims()
                .get(1)
                .copied()
                .with_context(|| format!("a Tucker factor of shape {:?} is not 2-D", t.dims()))
        };
        Ok(match self {
            PatchWeights::Lora { down, up, mid } => match mid {
                None => {
                    inner(up, 1, down, 0, "lora_up x lora_down")?;
                    let mut s = vec![up.dims()[0]];
                    s.extend_from_slice(&down.dims()[1..]);
                    s
                }
                Some(m) => {
                    inner(up, 1, m, 0, "lora_up x lora_mid")?;
                    inner(m, 1, down, 0, "lora_mid x lora_down")?;
                    let mut s = vec![up.dims()[0], down.dims().get(1).copied().unwrap_or(0)];
                    s.extend_from_slice(&m.dims()[2..]);
                    s
                }
            },
            PatchWeights::LoHa {
                w1a,
                w1b,
                w2a,
                w2b,
                t,
            } => {
                let half = |a: &Tensor, b: &Tensor, t: Option<&Tensor>| -> Result<Vec<usize>> {
                    match t {
                        None => {
                            inner(a, 1, b, 0, "hada_w_a x hada_w_b")?;
                            let n: usize = b.dims()[1..].iter().product();
                            Ok(vec![a.dims()[0], n])
                        }
                        Some(t) => {
                            inner(t, 0, a, 0, "hada_t x hada_w_a")?;
                            inner(t, 1, b, 0, "hada_t x hada_w_b")?;
                            let mut s = vec![second(a)?, second(b)?];
                            s.extend_from_slice(&t.dims()[2..]);
                            Ok(s)
                        }
                    }
                };
                let s1 = half(w1a, w1b, t.as_ref().map(|x| &x.0))?;
                let s2 = half(w2a, w2b, t.as_ref().map(|x| &x.1))?;
                if s1 != s2 {
                    bail!("the two LoHa halves rebuild {s1:?} and {s2:?}");
                }
                s1
            }
            PatchWeights::LoKr { w1, w2, t2 } => {
                let s1 = match w1 {
                    KronFactor::Full(t) => dims(t),
                    KronFactor::LowRank(a, b) => {
                        inner(a, 1, b, 0, "lokr_w1_a x lokr_w1_b")?;
                        vec![a.dims()[0], b.dims()[1..].iter().product()]
                    }
                };
                let s2 = match (w2, t2) {
                    (KronFactor::Full(t), _) => dims(t),
                    (KronFactor::LowRank(a, b), None) => {
                        inner(a, 1, b, 0, "lokr_w2_a x lokr_w2_b")?;
                        let mut s = vec![a.dims()[0]];
                        s.extend_from_slice(&b.dims()[1..]);
                        s
                    }
                    (KronFactor::LowRank(a, b), Some(t)) => {
                        inner(t, 0, a, 0, "lokr_t2 x lokr_w2_a")?;
                        inner(t, 1, b, 0, "lokr_t2 x lokr_w2_b")?;
                        let mut s = vec![second(a)?, second(b)?];
                        s.extend_from_slice(&t.dims()[2..]);
                        s
                    }
                };
                if s1.len() != 2 || s2.len() < 2 {
                    bail!("LoKr factors {s1:?} and {s2:?} are not matrices");
                }
                let mut s = vec![s1[0] * s2[0], s1[1] * s2[1]];
                s.extend_from_slice(&s2[2..]);
                s
            }
            PatchWeights::Full { diff, .. } => dims(diff),
        })
    }

    /// `ΔW` without alpha, f32 on `device`, in its natural shape (`[out, in(, k, k)]`).
    fn product(&self, device: &Device) -> Result<Tensor> {
        let f = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(DType::F32)?) };
        let flat = |t: &Tensor| -> Result<Tensor> {
            let t = f(t)?;
            let d0 = t.dim(0)?;
            Ok(t.reshape((d0, ()))?)
        };
        Ok(match self {
            PatchWeights::Lora { down, up, mid } => {
                let u = flat(up)?;
                match mid {
                    None => {
                        let d = flat(down)?;
                        let mut shape = vec![u.dim(0)?];
                        shape.extend_from_slice(&down.dims()[1..]);
                        u.matmul(&d)?.reshape(shape)?
                    }
                    Some(m) => tucker(&f(m)?, &u.t()?, &flat(down)?)?,
                }
            }
            PatchWeights::LoHa {
                w1a,
                w1b,
                w2a,
                w2b,
                t,
            } => match t {
                None => {
                    let p1 = flat(w1a)?.matmul(&flat(w1b)?)?;
                    let p2 = flat(w2a)?.matmul(&flat(w2b)?)?;
                    (p1 * p2)?
                }
                Some((t1, t2)) => {
                    let p1 = tucker(&f(t1)?, &f(w1a)?, &f(w1b)?)?;
                    let p2 = tucker(&f(t2)?, &f(w2a)?, &f(w2b)?)?;
                    (p1 * p2)?
                }
            },
            PatchWeights::LoKr { w1, w2, t2 } => {
                let w1 = match w1 {
                    KronFactor::Full(t) => f(t)?,
                    KronFactor::LowRank(a, b) => f(a)?.matmul(&flat(b)?)?,
                };
                let w2 = match (w2, t2) {
                    (KronFactor::Full(t), _) => f(t)?,
                    (KronFactor::LowRank(a, b), None) => {
                        let mut shape = vec![a.dim(0)?];
                        shape.extend_from_slice(&b.dims()[1..]);
                        f(a)?.matmul(&flat(b)?)?.reshape(shape)?
                    }
                    (KronFactor::LowRank(a, b), Some(t)) => tucker(&f(t)?, &f(a)?, &f(b)?)?,
                };
                kron(&w1, &w2)?
            }
            PatchWeights::Full { diff, .. } => f(diff)?,
        })
    }
}

/// `Σ_ij t[i, j, ..] a[i, p] b[j, q]` -> `[p, q, ..]` (LyCORIS' `rebuild_tucker`):
/// `t [r1, r2, ..]`, `a [r1, out]`, `b [r2, in]`.
fn tucker(t: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    if dims.len() < 2 {
        bail!("a Tucker core must have at least 2 dimensions, got {dims:?}");
    }
    let (r1, r2) = (dims[0], dims[1]);
    let spatial: Vec<usize> = dims[2..].to_vec();
    let s: usize = spatial.iter().product();
    let (p, q) = (a.dim(1)?, b.dim(1)?);
    // [S, r1, r2]
    let ts = t.reshape((r1, r2, s))?.permute((2, 0, 1))?.contiguous()?;
    let at = a
        .t()?
        .contiguous()?
        .unsqueeze(0)?
        .broadcast_as((s, p, r1))?;
    let bb = b.contiguous()?.unsqueeze(0)?.broadcast_as((s, r2, q))?;
    let out = at.contiguous()?.matmul(&ts)?.matmul(&bb.contiguous()?)?; // [S, p, q]
    let out = out.permute((1, 2, 0))?.contiguous()?;
    let mut shape = vec![p, q];
    shape.extend(spatial);
    Ok(out.reshape(shape)?)
}

/// `torch.kron(w1, w2)` with `w1 [o1, i1]` and `w2 [o2, i2, ..]` -> `[o1·o2, i1·i2, ..]`.
fn kron(w1: &Tensor, w2: &Tensor) -> Result<Tensor> {
    let (o1, i1) = w1.dims2().context("the first LoKr factor must be 2-D")?;
    let d2 = w2.dims().to_vec();
    if d2.len() < 2 {
        bail!("the second LoKr factor must be at least 2-D, got {d2:?}");
    }
    let (o2, i2) = (d2[0], d2[1]);
    let rest = &d2[2..];
    let ones = vec![1usize; rest.len()];
    let mut s1 = vec![o1, 1, i1, 1];
    s1.extend(&ones);
    let mut s2 = vec![1, o2, 1, i2];
    s2.extend(rest);
    let prod = w1.reshape(s1)?.broadcast_mul(&w2.reshape(s2)?)?;
    let mut shape = vec![o1 * o2, i1 * i2];
    shape.extend(rest);
    Ok(prod.reshape(shape)?)
}

/// A loaded adapter that patches a layer's weight (see the module docs).
#[derive(Debug, Clone)]
pub struct WeightPatch {
    /// The adapter (file) name, shared with the file's plain LoRA layers.
    pub adapter: String,
    pub weights: PatchWeights,
    /// The file's alpha (`None`: not stored).
    pub alpha: Option<f64>,
    /// DoRA magnitude (`[out, 1, ..]` or `[1, in, ..]`, or PEFT's `[out]`).
    pub dora_scale: Option<Tensor>,
    /// Runtime strength (1 = as trained).
    pub scale: f64,
    pub enabled: bool,
}

impl WeightPatch {
    pub fn new(
        adapter: &str,
        weights: PatchWeights,
        alpha: Option<f64>,
        dora: Option<Tensor>,
    ) -> Self {
        Self {
            adapter: adapter.to_string(),
            weights,
            alpha,
            dora_scale: dora,
            scale: 1.0,
            enabled: true,
        }
    }

    pub fn is_active(&self) -> bool {
        self.enabled && self.scale != 0.0
    }

    /// `ΔW·(alpha/rank)`, f32, reshaped to `shape` (the layer's weight shape).
    pub fn delta(&self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let d = self.weights.product(device)?;
        let n: usize = shape.iter().product();
        if d.elem_count() != n {
            bail!(
                "the {} adapter rebuilds a weight of shape {:?}, the layer's is {:?}",
                self.weights.kind(),
                d.dims(),
                shape
            );
        }
        Ok((d.reshape(shape)? * self.weights.alpha_scale(self.alpha))?)
    }

    /// Checks the patch against a layer's weight shape (so that loading fails early and
    /// names the layer, not at the first forward).
    pub fn check(&self, shape: &[usize], bias: Option<usize>) -> Result<()> {
        let rebuilt = self.weights.product_shape()?;
        // the same number of values, the same outputs, and the same inputs unless the
        // adapter stores the kernel flattened into them (`[out, in·k·k]`)
        let fits = rebuilt.iter().product::<usize>() == shape.iter().product::<usize>()
            && rebuilt.first() == shape.first()
            && (rebuilt.len() == 2 || rebuilt.get(1) == shape.get(1));
        if !fits {
            bail!(
                "the {} adapter rebuilds a weight of shape {rebuilt:?}, the layer's is {shape:?}",
                self.weights.kind()
            );
        }
        if let Some(m) = &self.dora_scale {
            dora_magnitude(m, shape)?;
        }
        if let PatchWeights::Full {
            diff_b: Some(db), ..
        } = &self.weights
        {
            match bias {
                Some(n) if db.elem_count() == n => {}
                Some(n) => bail!(
                    "diff_b has {} values, the layer's bias {n}",
                    db.elem_count()
                ),
                None => bail!("diff_b given for a layer without bias"),
            }
        }
        Ok(())
    }

    /// Applies the patch (at its strength) to an f32 weight and bias.
    pub fn apply(&self, w: &Tensor, b: Option<Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let s = self.scale;
        let dw = self.delta(w.dims(), w.device())?;
        let b = match (&self.weights, b) {
            (
                PatchWeights::Full {
                    diff_b: Some(db), ..
                },
                Some(b),
            ) => {
                let db = db.to_device(b.device())?.to_dtype(DType::F32)?;
                let db = (db.reshape(b.shape())? * s)?;
                Some((b + db)?)
            }
            (_, b) => b,
        };
        let w = match &self.dora_scale {
            None => (w + (dw * s)?)?,
            Some(m) => {
                let (m, on_out) = dora_magnitude(m, w.dims())?;
                let m = m.to_device(w.device())?.to_dtype(DType::F32)?;
                let v = (w + dw)?;
                let norm = if on_out {
                    let out = w.dim(0)?;
                    let n = v
                        .reshape((out, ()))?
                        .sqr()?
                        .sum_keepdim(D::Minus1)?
                        .sqrt()?;
                    n.reshape(m.shape())?
                } else {
                    // per input column: norm over the output axis and the kernel
                    let (out, inp) = (w.dim(0)?, w.dim(1)?);
                    let n = v
                        .reshape((out, inp, ()))?
                        .sqr()?
                        .sum_keepdim(2)?
                        .sum_keepdim(0)?
                        .sqrt()?;
                    n.reshape(m.shape())?
                };
                let norm = (norm + f32::EPSILON as f64)?;
                let wd = v.broadcast_mul(&m.broadcast_div(&norm)?)?;
                (w + ((wd - w)? * s)?)?
            }
        };
        Ok((w, b))
    }
}

/// The DoRA magnitude reshaped to broadcast against a weight of `shape`, and whether it is on
/// the output axis.
fn dora_magnitude(m: &Tensor, shape: &[usize]) -> Result<(Tensor, bool)> {
    let (out, inp) = (shape[0], shape.get(1).copied().unwrap_or(1));
    let mut s = vec![1usize; shape.len()];
    let dims = m.dims();
    let n = m.elem_count();
    let on_out = if n == out && (dims.first() == Some(&out) || dims.len() == 1) {
        s[0] = out;
        true
    } else if n == inp && dims.len() >= 2 && dims[0] == 1 {
        s[1] = inp;
        false
    } else {
        bail!(
            "dora_scale {dims:?} fits neither the output axis ([{out}, 1, ..]) nor the input axis ([1, {inp}, ..]) of a weight {shape:?}"
        );
    };
    Ok((m.reshape(s)?, on_out))
}

/// The patches of one layer and the weight they produce.
#[derive(Debug, Clone, Default)]
pub struct PatchSet {
    patches: Vec<WeightPatch>,
    effective: Option<(Tensor, Option<Tensor>)>,
}

impl PatchSet {
    pub fn list(&self) -> &[WeightPatch] {
        &self.patches
    }
    pub fn is_empty(&self) -> bool {
        self.patches.is_empty()
    }
    /// The patched weight and bias, when a patch is active.
    pub fn effective(&self) -> Option<&(Tensor, Option<Tensor>)> {
        self.effective.as_ref()
    }

    /// Adds a patch (checked by the caller) and recomputes.
    pub fn push(&mut self, p: WeightPatch, base: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        self.patches.push(p);
        if let Err(e) = self.refresh(base, bias) {
            self.patches.pop();
            self.refresh(base, bias)?;
            return Err(e);
        }
        Ok(())
    }

    /// Changes patches (strength, on/off) through `f`, then recomputes.
    pub fn update(
        &mut self,
        base: &Tensor,
        bias: Option<&Tensor>,
        f: &mut dyn FnMut(&mut WeightPatch),
    ) -> Result<()> {
        let mut changed = false;
        for p in &mut self.patches {
            let before = (p.scale, p.enabled);
            f(p);
            changed |= before != (p.scale, p.enabled);
        }
        if changed {
            self.refresh(base, bias)?;
        }
        Ok(())
    }

    /// Drops every patch.
    pub fn clear(&mut self) {
        self.patches.clear();
        self.effective = None;
    }

    /// Recomputes the patched weight from `base` (after the base weight changed, e.g. a merge).
    pub fn refresh(&mut self, base: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        if !self.patches.iter().any(|p| p.is_active()) {
            self.effective = None;
            return Ok(());
        }
        let mut w = base.to_dtype(DType::F32)?;
        let mut b = match bias {
            Some(b) => Some(b.to_dtype(DType::F32)?),
            None => None,
        };
        for p in self.patches.iter().filter(|p| p.is_active()) {
            (w, b) = p.apply(&w, b)?;
        }
        let b = match b {
            Some(b) => Some(b.to_dtype(base.dtype())?),
            None => None,
        };
        self.effective = Some((w.to_dtype(base.dtype())?, b));
        Ok(())
    }
}

/// A layer whose weight loaded adapters can patch: every `LoraLinear` and the UNet's
/// convolutions.
pub trait Patchable {
    /// Module path (diffusers checkpoint key without `.weight`).
    fn name(&self) -> &str;
    /// The weight's shape as the layer uses it (`[out, in]` or `[out, in, k, k]`).
    fn weight_shape(&self) -> Vec<usize>;
    /// The bias length, if the layer has one.
    fn bias_len(&self) -> Option<usize>;
    fn patches(&self) -> &PatchSet;
    /// Adds a patch (checked against the layer first).
    fn add_patch(&mut self, p: WeightPatch) -> Result<()>;
    /// Changes the patches through `f` and recomputes the weight.
    fn update_patches(&mut self, f: &mut dyn FnMut(&mut WeightPatch)) -> Result<()>;
    /// Removes every patch (the base weight is used again).
    fn clear_patches(&mut self);
    /// True for convolutions with a k x k kernel (k > 1) or 1x1 convolutions.
    fn is_conv(&self) -> bool;
    /// The layer's trainable LoRA adapters (linear: `A [r, in]`, `B [out, r]`; convolution:
    /// `A [r, in, k, k]`, `B [out, r, 1, 1]`).
    fn lora_adapters(&self) -> &[LoraAdapter];
    fn lora_adapters_mut(&mut self) -> &mut [LoraAdapter];
    /// Adds a trainable adapter built for this layer (see [`LoraAdapter::new_conv`]); fails on
    /// a duplicate name or shapes that do not fit.
    fn push_lora_adapter(&mut self, ad: LoraAdapter) -> Result<()>;
    /// Removes every trainable adapter (unmerging first where that applies).
    fn clear_lora_adapters(&mut self) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn kron_is_torch_kron() {
        // kron([[1,2],[3,4]], [[0,5],[6,7]]) by hand
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[0f32, 5.], [6., 7.]], &Device::Cpu).unwrap();
        let k = kron(&a, &b).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(k[0], vec![0., 5., 0., 10.]);
        assert_eq!(k[1], vec![6., 7., 12., 14.]);
        assert_eq!(k[3], vec![18., 21., 24., 28.]);
    }

    #[test]
    fn tucker_without_spatial_is_a_product() {
        // t [r1, r2], a [r1, p], b [r2, q]: a^T t b
        let (core, a, b) = (t(&[2, 3]), t(&[2, 4]), t(&[3, 5]));
        let want = a.t().unwrap().matmul(&core).unwrap().matmul(&b).unwrap();
        let got = tucker(&core, &a, &b).unwrap();
        let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn checks_refuse_what_does_not_fit() {
        let full = |d: Tensor| {
            WeightPatch::new(
                "x",
                PatchWeights::Full {
                    diff: d,
                    diff_b: None,
                },
                None,
                None,
            )
        };
        // transposed: same count, other layout
        assert!(full(t(&[4, 6])).check(&[6, 4], None).is_err());
        assert!(full(t(&[6, 4])).check(&[6, 4], None).is_ok());
        // LoHa stores convolutions flattened: [out, in·k·k] fits [out, in, k, k]
        let loha = WeightPatch::new(
            "x",
            PatchWeights::LoHa {
                w1a: t(&[8, 2]),
                w1b: t(&[2, 36]),
                w2a: t(&[8, 2]),
                w2b: t(&[2, 36]),
                t: None,
            },
            Some(1.0),
            None,
        );
        assert!(loha.check(&[8, 4, 3, 3], Some(8)).is_ok());
        assert!(loha.check(&[8, 36], None).is_ok());
        assert!(loha.check(&[4, 8, 3, 3], None).is_err());
        // factors that do not chain
        let bad = WeightPatch::new(
            "x",
            PatchWeights::Lora {
                down: t(&[3, 6]),
                up: t(&[4, 2]),
                mid: None,
            },
            None,
            None,
        );
        assert!(format!("{:#}", bad.check(&[4, 6], None).unwrap_err()).contains("chain"));
        // diff_b for a layer without bias
        let with_b = WeightPatch::new(
            "x",
            PatchWeights::Full {
                diff: t(&[4, 6]),
                diff_b: Some(t(&[4])),
            },
            None,
            None,
        );
        assert!(with_b.check(&[4, 6], None).is_err());
        assert!(with_b.check(&[4, 6], Some(4)).is_ok());
    }

    #[test]
    fn dora_strength_blends_linearly_and_zero_is_the_base() {
        let w = t(&[4, 6]);
        let mut p = WeightPatch::new(
            "x",
            PatchWeights::Lora {
                down: t(&[2, 6]),
                up: t(&[4, 2]),
                mid: None,
            },
            Some(2.0),
            Some((t(&[4, 1]).abs().unwrap() + 1.0).unwrap()),
        );
        let (full, _) = p.apply(&w, None).unwrap();
        p.scale = 0.0;
        let (zero, _) = p.apply(&w, None).unwrap();
        p.scale = 0.5;
        let (half, _) = p.apply(&w, None).unwrap();
        let max = |x: Tensor| {
            x.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(max((zero - &w).unwrap()), 0.0);
        let mid = ((&w + &full).unwrap() * 0.5).unwrap();
        assert!(max((half - mid).unwrap()) < 1e-6);
        // the output axis: each row of W' has the norm m
        let norms = full.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
        let m = (t(&[4, 1]).abs().unwrap() + 1.0).unwrap();
        assert!(max((norms - m).unwrap()) < 1e-5);
    }
}
