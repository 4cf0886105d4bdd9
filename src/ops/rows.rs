//! Row-wise fused kernels of the chunked attention ([`super::attention`]), gradient-free (they
//! run on detached tensors inside a forward that is recorded as one op, and inside its
//! hand-written backward).
//!
//! On the CPU each is one pass over the rows with the vectorisable [`super::cpu::fast_exp`]; the
//! compositions of candle ops they replace made four to five passes and called libm's scalar
//! `expf` (18% of a tiny training step in `perf`). Other devices use those compositions.
//! `s` is `[.., m]` and the per-row statistics are `[.., 1]`, all contiguous.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu::{last_dim, run_kernel, CResult, Elem, Kernel};
use super::softmax::{lane_max, lane_sum};

/// Row log-sum-exp: `max + ln(sum(exp(s - max)))`, shape `[.., 1]`.
pub fn logsumexp_rows(s: &Tensor) -> CResult<Tensor> {
    if s.device().is_cpu() {
        s.contiguous()?.apply_op1_no_bwd(&LogSumExp)
    } else {
        let max = s.max_keepdim(D::Minus1)?;
        max.clone()
            + s.broadcast_sub(&max)?
                .exp()?
                .sum_keepdim(D::Minus1)?
                .log()?
    }
}

/// `exp(s - l)` with `l` `[.., 1]` broadcast over each row (probabilities from a saved
/// log-sum-exp).
pub fn exp_sub_rows(s: &Tensor, l: &Tensor) -> CResult<Tensor> {
    if s.device().is_cpu() {
        s.contiguous()?.apply_op2_no_bwd(&l.contiguous()?, &ExpSub)
    } else {
        s.broadcast_sub(l)?.exp()
    }
}

/// `p · (dp - d)` with `d` `[.., 1]` broadcast over each row (the softmax backward with the
/// row dot products precomputed).
pub fn mul_sub_rows(p: &Tensor, dp: &Tensor, d: &Tensor) -> CResult<Tensor> {
    if p.device().is_cpu() {
        p.contiguous()?
            .apply_op3_no_bwd(&dp.contiguous()?, &d.contiguous()?, &MulSub)
    } else {
        p * dp.broadcast_sub(d)?
    }
}

fn row_shape(l: &Layout) -> CResult<Shape> {
    let mut dims = l.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = 1;
    }
    Ok(dims.into())
}

struct LogSumExp;
struct LogSumExpKernel(usize);
impl Kernel for LogSumExpKernel {
    fn run<T: Elem>(&self, x: &[&[T]]) -> Vec<T> {
        let zero = <T::C as num_traits::Zero>::zero();
        let rows = x[0].len() / self.0;
        let mut out = vec![T::from_c(zero); rows];
        out.par_iter_mut()
            .zip(x[0].par_chunks(self.0))
            .for_each_init(
                || vec![zero; self.0],
                |tmp, (o, r)| {
                    let max = lane_max::<T>(r);
                    T::exp_sub_c(tmp, r, max);
                    *o = T::from_c(max + num_traits::Float::ln(lane_sum::<T::C>(tmp)));
                },
            );
        out
    }
}
impl CustomOp1 for LogSumExp {
    fn name(&self) -> &'static str {
        "sd-lora-logsumexp-rows"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let out = run_kernel(&LogSumExpKernel(last_dim(l)?), "logsumexp", &[(s, l)])?;
        Ok((out, row_shape(l)?))
    }
}

struct ExpSub;
struct ExpSubKernel(usize);
impl Kernel for ExpSubKernel {
    fn run<T: Elem>(&self, x: &[&[T]]) -> Vec<T> {
        let mut out = vec![T::from_c(<T::C as num_traits::Zero>::zero()); x[0].len()];
        out.par_chunks_mut(self.0)
            .zip(x[0].par_chunks(self.0).zip(x[1].par_iter()))
            .for_each(|(o, (r, l))| T::exp_sub_row(o, r, l.to_c()));
        out
    }
}
impl CustomOp2 for ExpSub {
    fn name(&self) -> &'static str {
        "sd-lora-exp-sub-rows"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        check_rows(l1, l2, "exp-sub-rows")?;
        let out = run_kernel(
            &ExpSubKernel(last_dim(l1)?),
            "exp-sub-rows",
            &[(s1, l1), (s2, l2)],
        )?;
        Ok((out, l1.shape().clone()))
    }
}

struct MulSub;
struct MulSubKernel(usize);
impl Kernel for MulSubKernel {
    fn run<T: Elem>(&self, x: &[&[T]]) -> Vec<T> {
        let mut out = vec![T::from_c(<T::C as num_traits::Zero>::zero()); x[0].len()];
        out.par_chunks_mut(self.0)
            .zip(
                x[0].par_chunks(self.0)
                    .zip(x[1].par_chunks(self.0))
                    .zip(x[2].par_iter()),
            )
            .for_each(|(o, ((p, dp), d))| {
                let d = d.to_c();
                for ((o, p), dp) in o.iter_mut().zip(p).zip(dp) {
                    *o = T::from_c(p.to_c() * (dp.to_c() - d));
                }
            });
        out
    }
}
impl CustomOp3 for MulSub {
    fn name(&self) -> &'static str {
        "sd-lora-mul-sub-rows"
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
        if l1.dims() != l2.dims() {
            candle_core::bail!("mul-sub-rows: {:?} vs {:?}", l1.dims(), l2.dims());
        }
        check_rows(l1, l3, "mul-sub-rows")?;
        let out = run_kernel(
            &MulSubKernel(last_dim(l1)?),
            "mul-sub-rows",
            &[(s1, l1), (s2, l2), (s3, l3)],
        )?;
        Ok((out, l1.shape().clone()))
    }
}

fn check_rows(l: &Layout, rows: &Layout, op: &str) -> CResult<()> {
    if row_shape(l)?.dims() != rows.dims() {
        candle_core::bail!("{op}: row statistics {:?} for {:?}", rows.dims(), l.dims());
    }
    Ok(())
}
