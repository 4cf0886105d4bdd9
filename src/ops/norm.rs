//! Layer norm with fused CPU forward and backward.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};
use num_traits::Float;
use rayon::prelude::*;

use super::cpu::{last_dim, run_kernel, CResult, Elem, Kernel};

pub(crate) fn cast<C: num_traits::Float>(v: f64) -> C {
    C::from(v).unwrap_or_else(C::nan)
}

pub(crate) fn row_stats<T: Elem>(r: &[T], eps: T::C) -> (T::C, T::C) {
    let n: T::C = cast(r.len() as f64);
    let mean = r.iter().map(|v| v.to_c()).sum::<T::C>() / n;
    let var = r
        .iter()
        .map(|v| {
            let d = v.to_c() - mean;
            d * d
        })
        .sum::<T::C>()
        / n;
    (mean, (var + eps).sqrt().recip())
}

fn layer_norm_rows<T: Elem>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let dim = w.len();
    let eps: T::C = cast(eps);
    let mut out = vec![T::from_c(<T::C as num_traits::Zero>::zero()); x.len()];
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, r)| {
            let (mean, rstd) = row_stats(r, eps);
            for (((o, v), w), b) in o.iter_mut().zip(r).zip(w).zip(b) {
                *o = T::from_c((v.to_c() - mean) * rstd * w.to_c() + b.to_c());
            }
        });
    out
}

/// dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)) per row.
fn layer_norm_bwd_rows<T: Elem>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let dim = w.len();
    let eps: T::C = cast(eps);
    let zero = <T::C as num_traits::Zero>::zero();
    let mut out = vec![T::from_c(zero); x.len()];
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim).zip(g.par_chunks(dim)))
        .for_each(|(o, (r, g))| {
            let (mean, rstd) = row_stats(r, eps);
            let n: T::C = cast(dim as f64);
            let (mut s1, mut s2) = (zero, zero);
            for ((v, w), g) in r.iter().zip(w).zip(g) {
                let gw = g.to_c() * w.to_c();
                s1 = s1 + gw;
                s2 = s2 + gw * (v.to_c() - mean) * rstd;
            }
            let (m1, m2) = (s1 / n, s2 / n);
            for (((o, v), w), g) in o.iter_mut().zip(r).zip(w).zip(g) {
                let xhat = (v.to_c() - mean) * rstd;
                *o = T::from_c(rstd * (g.to_c() * w.to_c() - m1 - xhat * m2));
            }
        });
    out
}

struct LnKernel(f64);
impl Kernel for LnKernel {
    fn run<T: Elem>(&self, x: &[&[T]]) -> Vec<T> {
        layer_norm_rows(x[0], x[1], x[2], self.0)
    }
}

struct LnBwdKernel(f64);
impl Kernel for LnBwdKernel {
    fn run<T: Elem>(&self, x: &[&[T]]) -> Vec<T> {
        layer_norm_bwd_rows(x[0], x[1], x[2], self.0)
    }
}

struct LayerNormOp {
    eps: f64,
}

fn check_ln(l1: &Layout, l2: &Layout) -> CResult<()> {
    let dim = last_dim(l1)?;
    if l2.shape().elem_count() != dim {
        candle_core::bail!(
            "layer_norm: weight has {} elements, input's last dim is {dim}",
            l2.shape().elem_count()
        )
    }
    Ok(())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "sd-lora-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        check_ln(l1, l2)?;
        check_ln(l1, l3)?;
        let out = run_kernel(
            &LnKernel(self.eps),
            "layer-norm",
            &[(s1, l1), (s2, l2), (s3, l3)],
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &LayerNormBwd { eps: self.eps })?;
        // Parameter gradients only when someone trains the norm (full fine-tuning).
        let rows = x.elem_count() / w.elem_count();
        let dim = w.elem_count();
        let dw = if w.track_op() {
            let xhat = layer_norm_composed(x, None, None, self.eps)?;
            Some((g.clone() * xhat)?.reshape((rows, dim))?.sum(0)?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(g.reshape((rows, dim))?.sum(0)?)
        } else {
            None
        };
        Ok((Some(dx), dw, db))
    }
}

pub(crate) struct LayerNormBwd {
    pub(crate) eps: f64,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "sd-lora-layer-norm-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        check_ln(l1, l2)?;
        let out = run_kernel(
            &LnBwdKernel(self.eps),
            "layer-norm-bwd",
            &[(s1, l1), (s2, l2), (s3, l3)],
        )?;
        Ok((out, l1.shape().clone()))
    }
}

/// Layer norm over the last dimension built from candle primitives (differentiable by candle).
/// `w`/`b` of `None` means the identity affine.
pub fn layer_norm_composed(
    x: &Tensor,
    w: Option<&Tensor>,
    b: Option<&Tensor>,
    eps: f64,
) -> CResult<Tensor> {
    let dtype = x.dtype();
    let x = if dtype == DType::F64 {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    };
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    if let Some(w) = w {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = b {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// Layer norm over the last dimension with affine weight and bias, with a backward pass.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> CResult<Tensor> {
    if x.device().is_cpu() {
        let w = w.to_dtype(x.dtype())?.contiguous()?;
        let b = b.to_dtype(x.dtype())?.contiguous()?;
        x.contiguous()?.apply_op3(&w, &b, LayerNormOp { eps })
    } else {
        layer_norm_composed(x, Some(w), Some(b), eps)
    }
}
