//! SiLU, `x · σ(x)`, with a fused backward.
//!
//! candle's `silu` is one pass forward, but its derivative is composed of five element-wise
//! ops, each allocating a full-size tensor: ~2.7 ms per SD 1.5 resnet activation at 32x32
//! latents, two per resnet. Here the backward is one pass over `(x, dL/dy)`, on the CPU (f32 in
//! the vectorisable `exp`, compiled per SIMD level); other devices use candle's op.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{run_kernel, CResult, Elem, Kernel};

/// Elements per parallel work item.
const CHUNK: usize = 16 * 1024;

/// `x · σ(x)`, differentiable.
pub fn silu(x: &Tensor) -> CResult<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(Silu)
    } else {
        x.silu()
    }
}

#[inline(always)]
fn sigmoid<T: Elem>(x: T::C) -> T::C {
    let one = <T::C as num_traits::One>::one();
    one / (one + T::exp_c(-x))
}

/// `o = x · σ(x)`.
#[inline(always)]
pub(crate) fn fwd_row<T: Elem>(o: &mut [T], x: &[T]) {
    for (o, x) in o.iter_mut().zip(x) {
        let x = x.to_c();
        *o = T::from_c(x * sigmoid::<T>(x));
    }
}

/// `dx = g · σ(x) · (1 + x · (1 - σ(x)))`.
#[inline(always)]
pub(crate) fn bwd_row<T: Elem>(dx: &mut [T], x: &[T], g: &[T]) {
    let one = <T::C as num_traits::One>::one();
    for ((dx, x), g) in dx.iter_mut().zip(x).zip(g) {
        let x = x.to_c();
        let s = sigmoid::<T>(x);
        *dx = T::from_c(g.to_c() * s * (one + x * (one - s)));
    }
}

struct Silu;
struct FwdKernel;
impl Kernel for FwdKernel {
    fn run<T: Elem>(&self, x: &[&[T]]) -> Vec<T> {
        let mut out = vec![T::from_c(<T::C as num_traits::Zero>::zero()); x[0].len()];
        out.par_chunks_mut(CHUNK)
            .zip(x[0].par_chunks(CHUNK))
            .for_each(|(o, x)| T::silu_fwd_row(o, x));
        out
    }
}

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "sd-lora-silu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        Ok((
            run_kernel(&FwdKernel, "silu", &[(s, l)])?,
            l.shape().clone(),
        ))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &SiluBwd)?))
    }
}

struct SiluBwd;
struct BwdKernel;
impl Kernel for BwdKernel {
    fn run<T: Elem>(&self, x: &[&[T]]) -> Vec<T> {
        let mut out = vec![T::from_c(<T::C as num_traits::Zero>::zero()); x[0].len()];
        out.par_chunks_mut(CHUNK)
            .zip(x[0].par_chunks(CHUNK).zip(x[1].par_chunks(CHUNK)))
            .for_each(|(dx, (x, g))| T::silu_bwd_row(dx, x, g));
        out
    }
}

impl CustomOp2 for SiluBwd {
    fn name(&self) -> &'static str {
        "sd-lora-silu-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "silu backward: gradient {:?} does not match input {:?}",
                l2.dims(),
                l1.dims()
            )
        }
        let out = run_kernel(&BwdKernel, "silu-bwd", &[(s1, l1), (s2, l2)])?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::cpu::test_util::{assert_close, value_and_grad};
    use super::*;
    use candle_core::{DType, Device};

    fn values(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| ((i * 7919) % 4001) as f64 / 100.0 - 20.0)
            .collect()
    }

    /// Value and gradient of `sum(silu(x) · r)`, fused and through candle's `silu`.
    fn both(x: &Tensor) -> [(Tensor, Tensor); 2] {
        let r = (Tensor::from_vec(values(x.elem_count()), x.shape(), x.device())
            .unwrap()
            .to_dtype(x.dtype())
            .unwrap()
            / 20.0)
            .unwrap();
        [
            value_and_grad(x, &r, |x| silu(x).unwrap()),
            value_and_grad(x, &r, |x| x.silu().unwrap()),
        ]
    }

    /// f64 matches candle's op and its derivative to rounding; f32 (the polynomial `exp`) to
    /// 2e-6 relative to |x| <= 20; sizes above and below the parallel chunk.
    #[test]
    fn matches_candles_silu_and_its_derivative() {
        for n in [7, 3 * CHUNK + 5] {
            let x = Tensor::from_vec(values(n), (n,), &Device::Cpu).unwrap();
            let [(y, g), (y_ref, g_ref)] = both(&x);
            assert_close(&y, &y_ref, 1.0, 1e-12, "y vs y_ref");
            assert_close(&g, &g_ref, 1.0, 1e-12, "g vs g_ref");
            let [(y32, g32), _] = both(&x.to_dtype(DType::F32).unwrap());
            assert_close(&y32, &y_ref, 20.0, 2e-6, "y32 vs y_ref");
            assert_close(&g32, &g_ref, 1.0, 2e-6, "g32 vs g_ref");
        }
    }
}
