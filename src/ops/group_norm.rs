//! Group norm with per-channel affine: one fused CPU pass forward, and a backward that computes
//! only the input gradient when the affine parameters are frozen (as in LoRA training).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{run_kernel, CResult, Elem, Kernel};
use super::norm::{cast, layer_norm, layer_norm_composed, row_stats, LayerNormBwd};

struct GroupNormOp {
    /// Frozen affine, kept as a tensor for the backward and as numbers for the kernel.
    w: Tensor,
    wv: Vec<f64>,
    bv: Vec<f64>,
    groups: usize,
    eps: f64,
}

/// `x` is `[B, C, S]` flattened; each (batch, group) chunk of `C/groups · S` values is
/// normalised, then scaled and shifted per channel.
fn group_norm_fwd<T: Elem>(
    x: &[T],
    s: usize,
    groups: usize,
    w: &[f64],
    b: &[f64],
    eps: f64,
) -> Vec<T> {
    let pg = w.len() / groups;
    let len = (pg * s).max(1);
    let zero = <T::C as num_traits::Zero>::zero();
    let mut out = vec![T::from_c(zero); x.len()];
    out.par_chunks_mut(len)
        .zip(x.par_chunks(len))
        .enumerate()
        .for_each(|(k, (o, r))| {
            let g = k % groups;
            let (mean, rstd) = row_stats(r, cast(eps));
            for ci in 0..pg {
                let ch = g * pg + ci;
                let scale = rstd * cast::<T::C>(w[ch]);
                let shift = cast::<T::C>(b[ch]) - mean * scale;
                for (o, v) in o[ci * s..(ci + 1) * s]
                    .iter_mut()
                    .zip(&r[ci * s..(ci + 1) * s])
                {
                    *o = T::from_c(v.to_c() * scale + shift);
                }
            }
        });
    out
}

struct GnKernel<'a> {
    s: usize,
    op: &'a GroupNormOp,
}
impl Kernel for GnKernel<'_> {
    fn run<T: Elem>(&self, x: &[&[T]]) -> Vec<T> {
        let o = self.op;
        group_norm_fwd(x[0], self.s, o.groups, &o.wv, &o.bv, o.eps)
    }
}

impl CustomOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        "sd-lora-group-norm"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let dims = l.dims();
        let s = l.shape().elem_count() / (dims[0] * dims[1]).max(1);
        let out = run_kernel(&GnKernel { s, op: self }, "group-norm", &[(st, l)])?;
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        // d/dx of group norm = layer-norm backward per group applied to g·w (frozen affine).
        let dims = x.dims();
        let mut wshape = vec![1usize; dims.len()];
        wshape[1] = dims[1];
        let gw = grad.broadcast_mul(&self.w.to_dtype(grad.dtype())?.reshape(wshape)?)?;
        let xg = x.reshape((dims[0], self.groups, ()))?;
        let gwg = gw.reshape((dims[0], self.groups, ()))?.contiguous()?;
        let ones = Tensor::ones(xg.dim(2)?, x.dtype(), x.device())?;
        let dx = xg.apply_op3_no_bwd(&ones, &gwg, &LayerNormBwd { eps: self.eps })?;
        Ok(Some(dx.reshape(dims)?))
    }
}

/// Group norm over `[B, C, ...]` with `groups` groups and per-channel affine (computed in f32,
/// or f64 for f64 input), with a backward pass.
pub fn group_norm(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f64) -> CResult<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!(
            "group_norm: {} channels not divisible into {groups} groups",
            dims.get(1).copied().unwrap_or(0)
        )
    }
    if w.elem_count() != dims[1] || b.elem_count() != dims[1] {
        candle_core::bail!(
            "group_norm: affine parameters must have {} elements",
            dims[1]
        )
    }
    if x.device().is_cpu() && !w.track_op() && !b.track_op() {
        let wv = w.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let bv = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        return x.contiguous()?.apply_op1(GroupNormOp {
            w: w.clone(),
            wv,
            bv,
            groups,
            eps,
        });
    }
    // trainable affine (full fine-tuning) or other devices: normalise, then affine with
    // candle ops so the parameters get gradients
    let (bsz, c) = (dims[0], dims[1]);
    let dtype = x.dtype();
    let cdt = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let xg = x.to_dtype(cdt)?.reshape((bsz, groups, ()))?;
    let y = if x.device().is_cpu() {
        let row = xg.dim(2)?;
        let ones = Tensor::ones(row, cdt, x.device())?;
        let zeros = Tensor::zeros(row, cdt, x.device())?;
        layer_norm(&xg, &ones, &zeros, eps)?
    } else {
        layer_norm_composed(&xg, None, None, eps)?
    };
    let mut bshape = vec![1usize; dims.len()];
    bshape[1] = c;
    let y = y.reshape(dims)?.to_dtype(dtype)?;
    y.broadcast_mul(&w.reshape(bshape.clone())?)?
        .broadcast_add(&b.reshape(bshape)?)
}
