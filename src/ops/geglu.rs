//! GEGLU, `a · GELU(gate)` for `h = [a | gate]` split in halves on the last dimension (the
//! feed-forward activation of SD's transformer blocks), fused.
//!
//! As candle ops it is two `narrow`s, `gelu_erf` (libm's scalar `erf` per element), a product,
//! and in the backward about ten more element-wise passes plus the zero-padded halves that
//! `narrow`'s backward adds: ~85 ms per SD 1.5 transformer block at 32x32 latents, as much as
//! six times the block's feed-forward matrix products. Here the forward is one pass and the
//! backward one pass (both parallel over rows; f32 runs a vectorised `erfc`), with the exact
//! (erf) GELU PyTorch uses by default. Other devices use the candle composition.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu::{last_dim, run_kernel, CResult, Elem, Kernel};

/// `a · GELU(gate)` with `[a | gate] = h` split on the last dimension (which must be even);
/// differentiable.
pub fn geglu(h: &Tensor) -> CResult<Tensor> {
    let d = h.dim(D::Minus1)?;
    if d == 0 || d % 2 != 0 {
        candle_core::bail!("geglu: the last dimension must be even and non-zero, got {d}")
    }
    if h.device().is_cpu() {
        h.contiguous()?.apply_op1(Geglu)
    } else {
        let half = d / 2;
        h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?
    }
}

/// `(Φ(x), φ(x))`, the standard normal CDF and density, in f32: `erfc` from Abramowitz & Stegun
/// 7.1.26 (absolute error below 1.5e-7) with the vectorisable `exp`, branch-free.
#[inline(always)]
pub(crate) fn gauss_f32(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * z);
    let e = super::cpu::fast_exp(-z * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let half_erfc = 0.5 * poly * e;
    let cdf = if x >= 0.0 { 1.0 - half_erfc } else { half_erfc };
    // 1 / sqrt(2π)
    (cdf, e * 0.398_942_3)
}

/// `(Φ(x), φ(x))` in f64 from libm's `erfc`.
#[inline(always)]
pub(crate) fn gauss_f64(x: f64) -> (f64, f64) {
    let cdf = 0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2);
    // 1 / sqrt(2π)
    (cdf, (-0.5 * x * x).exp() * 0.398_942_280_401_432_7)
}

/// One row: `o = a · gate · Φ(gate)`.
#[inline(always)]
pub(crate) fn fwd_row<T: Elem>(o: &mut [T], a: &[T], gate: &[T]) {
    for ((o, a), g) in o.iter_mut().zip(a).zip(gate) {
        let g = g.to_c();
        let (cdf, _) = T::gauss_c(g);
        *o = T::from_c(a.to_c() * g * cdf);
    }
}

/// One row of the backward: `da = go · GELU(gate)`, `dgate = go · a · (Φ(gate) + gate · φ(gate))`.
#[inline(always)]
pub(crate) fn bwd_row<T: Elem>(da: &mut [T], dgate: &mut [T], a: &[T], gate: &[T], go: &[T]) {
    for ((((da, dg), a), g), go) in da.iter_mut().zip(dgate).zip(a).zip(gate).zip(go) {
        let (g, go) = (g.to_c(), go.to_c());
        let (cdf, pdf) = T::gauss_c(g);
        *da = T::from_c(go * g * cdf);
        *dg = T::from_c(go * a.to_c() * (cdf + g * pdf));
    }
}

struct Geglu;
struct FwdKernel(usize);
impl Kernel for FwdKernel {
    fn run<T: Elem>(&self, x: &[&[T]]) -> Vec<T> {
        let c = self.0;
        let zero = T::from_c(<T::C as num_traits::Zero>::zero());
        let mut out = vec![zero; x[0].len() / 2];
        out.par_chunks_mut(c)
            .zip(x[0].par_chunks(2 * c))
            .for_each(|(o, h)| T::geglu_fwd_row(o, &h[..c], &h[c..]));
        out
    }
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "sd-lora-geglu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let c = last_dim(l)? / 2;
        let out = run_kernel(&FwdKernel(c), "geglu", &[(s, l)])?;
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = c;
        }
        Ok((out, dims.into()))
    }
    fn bwd(&self, h: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(h.apply_op2_no_bwd(&g.contiguous()?, &GegluBwd)?))
    }
}

struct GegluBwd;
struct BwdKernel(usize);
impl Kernel for BwdKernel {
    fn run<T: Elem>(&self, x: &[&[T]]) -> Vec<T> {
        let c = self.0;
        let zero = T::from_c(<T::C as num_traits::Zero>::zero());
        let mut out = vec![zero; x[0].len()];
        out.par_chunks_mut(2 * c)
            .zip(x[0].par_chunks(2 * c).zip(x[1].par_chunks(c)))
            .for_each(|(dh, (h, go))| {
                let (da, dg) = dh.split_at_mut(c);
                T::geglu_bwd_row(da, dg, &h[..c], &h[c..], go)
            });
        out
    }
}

impl CustomOp2 for GegluBwd {
    fn name(&self) -> &'static str {
        "sd-lora-geglu-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let c = last_dim(l1)? / 2;
        if last_dim(l2)? != c || l1.shape().elem_count() != 2 * l2.shape().elem_count() {
            candle_core::bail!(
                "geglu backward: gradient {:?} does not match input {:?}",
                l2.dims(),
                l1.dims()
            )
        }
        let out = run_kernel(&BwdKernel(c), "geglu-bwd", &[(s1, l1), (s2, l2)])?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::cpu::test_util::{assert_close, value_and_grad};
    use super::*;
    use candle_core::{DType, Device};

    /// Values from -12 to 12 (GELU's tails included), `[3, 5, w]`.
    fn input(w: usize, dtype: DType) -> Tensor {
        let v: Vec<f64> = (0..3 * 5 * w)
            .map(|i| ((i * 7919) % 2401) as f64 / 100.0 - 12.0)
            .collect();
        Tensor::from_vec(v, (3, 5, w), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn composed(h: &Tensor) -> Tensor {
        let c = h.dim(D::Minus1).unwrap() / 2;
        (h.narrow(D::Minus1, 0, c).unwrap()
            * h.narrow(D::Minus1, c, c).unwrap().gelu_erf().unwrap())
        .unwrap()
    }

    /// Value and gradient of `sum(geglu(h) · r)` through the fused op and through candle's
    /// composition (which candle differentiates itself).
    fn both(h: &Tensor) -> [(Tensor, Tensor); 2] {
        let r = (input(h.dim(2).unwrap() / 2, h.dtype()) / 12.0).unwrap();
        [
            value_and_grad(h, &r, |h| geglu(h).unwrap()),
            value_and_grad(h, &r, composed),
        ]
    }

    /// f64: libm's erfc, so the value equals candle's `gelu_erf` composition to rounding and
    /// the gradient equals the exact derivative written out with candle ops; candle's own
    /// derivative of `gelu_erf` rounds 1/sqrt(2π) to 0.398942, hence its looser bound. An odd
    /// half-width of 37 exercises the row split.
    #[test]
    fn f64_matches_candles_composition_and_the_exact_derivative() {
        let h = input(2 * 37, DType::F64);
        let [(y, g), (y_ref, g_candle)] = both(&h);
        assert_eq!(y.dims(), &[3, 5, 37]);
        assert_close(&y, &y_ref, 1.0, 1e-12, "y vs y_ref");
        assert_close(&g, &g_candle, 1.0, 1e-5, "g vs g_candle");
        let r = (input(37, DType::F64) / 12.0).unwrap();
        let (a, x) = (h.narrow(2, 0, 37).unwrap(), h.narrow(2, 37, 37).unwrap());
        let cdf = (((&x / 2f64.sqrt()).unwrap().erf().unwrap() + 1.0).unwrap() * 0.5).unwrap();
        let pdf = ((x.sqr().unwrap() * -0.5).unwrap().exp().unwrap()
            * (1.0 / (2.0 * std::f64::consts::PI).sqrt()))
        .unwrap();
        let da = (&r * (&x * &cdf).unwrap()).unwrap();
        let dx = (&r * &a * (&cdf + (&x * &pdf).unwrap()).unwrap()).unwrap();
        let g_exact = Tensor::cat(&[da, dx], 2).unwrap();
        assert_close(&g, &g_exact, 1.0, 1e-12, "g vs g_exact");
    }

    /// f32: the A&S `erfc` keeps GELU and its derivative within 2e-6 of the f64 reference
    /// (relative to |x| up to 12); the test runs at the widest SIMD level this CPU has.
    #[test]
    fn f32_matches_the_f64_reference() {
        let h = input(2 * 64, DType::F64);
        let [(y_ref, g_ref), _] = both(&h);
        let [(y, g), _] = both(&h.to_dtype(DType::F32).unwrap());
        assert_close(&y, &y_ref, 12.0, 2e-6, "f32 value");
        assert_close(&g, &g_ref, 12.0, 2e-6, "f32 gradient");
        for x in [-12f32, -3.3, -0.5, 0.0, 1e-4, 0.7, 2.2, 12.0] {
            let (cdf, pdf) = gauss_f32(x);
            let (cdf64, pdf64) = gauss_f64(x as f64);
            assert!((cdf as f64 - cdf64).abs() < 2e-7, "cdf({x})");
            assert!((pdf as f64 - pdf64).abs() < 1e-7, "pdf({x})");
        }
    }

    #[test]
    fn odd_width_is_refused() {
        let h = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        let e = geglu(&h).unwrap_err().to_string();
        assert!(e.contains("even"), "{e}");
    }
}
