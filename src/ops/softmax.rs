//! Softmax over the last dimension with a fused backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};
use num_traits::Float;
use rayon::prelude::*;

use super::cpu::{last_dim, run_kernel, CResult, Elem, Kernel};

const LANES: usize = 8;

/// Max over a row with 8 independent accumulators, so the loop vectorises.
pub(crate) fn lane_max<T: Elem>(r: &[T]) -> T::C {
    let mut acc = [T::C::neg_infinity(); LANES];
    let mut chunks = r.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            let v = v.to_c();
            *a = if v > *a { v } else { *a };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(T::C::neg_infinity(), |m, v| m.max(v.to_c()));
    acc.iter().fold(tail, |m, &a| m.max(a))
}

/// Sum with 8 independent accumulators (vectorises; a different rounding order than a plain
/// left-to-right sum, equally accurate).
pub(crate) fn lane_sum<C: Float>(r: &[C]) -> C {
    let zero = C::zero();
    let mut acc = [zero; LANES];
    let mut chunks = r.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = *a + v;
        }
    }
    let tail = chunks.remainder().iter().fold(zero, |s, &v| s + v);
    acc.iter().fold(tail, |s, &a| s + a)
}

fn softmax_rows<T: Elem>(x: &[T], dim: usize) -> Vec<T> {
    let zero = <T::C as num_traits::Zero>::zero();
    let mut out = vec![T::from_c(zero); x.len()];
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each_init(
            || vec![zero; dim],
            |tmp, (o, r)| {
                let max = lane_max::<T>(r);
                T::exp_sub_c(tmp, r, max);
                let inv = lane_sum::<T::C>(tmp).recip();
                for (o, &e) in o.iter_mut().zip(tmp.iter()) {
                    *o = T::from_c(e * inv);
                }
            },
        );
    out
}

/// dx = y * (g - sum(g * y)) per row.
fn softmax_bwd_rows<T: Elem>(y: &[T], g: &[T], dim: usize) -> Vec<T> {
    let mut out = vec![T::from_c(<T::C as num_traits::Zero>::zero()); y.len()];
    out.par_chunks_mut(dim)
        .zip(y.par_chunks(dim).zip(g.par_chunks(dim)))
        .for_each(|(o, (y, g))| {
            let dot: T::C = y.iter().zip(g).map(|(y, g)| y.to_c() * g.to_c()).sum();
            for ((o, y), g) in o.iter_mut().zip(y).zip(g) {
                *o = T::from_c(y.to_c() * (g.to_c() - dot));
            }
        });
    out
}

struct Softmax;

struct SoftmaxKernel(usize);
impl Kernel for SoftmaxKernel {
    fn run<T: Elem>(&self, x: &[&[T]]) -> Vec<T> {
        softmax_rows(x[0], self.0)
    }
}

struct SoftmaxBwdKernel(usize);
impl Kernel for SoftmaxBwdKernel {
    fn run<T: Elem>(&self, x: &[&[T]]) -> Vec<T> {
        softmax_bwd_rows(x[0], x[1], self.0)
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "sd-lora-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let out = run_kernel(&SoftmaxKernel(last_dim(l)?), "softmax", &[(s, l)])?;
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(&g, &SoftmaxBwd)?))
    }
}

struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "sd-lora-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let out = run_kernel(
            &SoftmaxBwdKernel(last_dim(l1)?),
            "softmax-bwd",
            &[(s1, l1), (s2, l2)],
        )?;
        Ok((out, l1.shape().clone()))
    }
}

/// Softmax over the last dimension, with a backward pass.
pub fn softmax_last_dim(x: &Tensor) -> CResult<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }
}
