//! Shared helpers of the fused CPU kernels: element types and layout checks.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout};

pub(crate) type CResult<T> = candle_core::Result<T>;

/// Element types the fused CPU kernels accept, with the type they compute in (f64 for f64,
/// f32 for everything else).
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    type C: num_traits::Float + std::iter::Sum + Send + Sync;
    fn to_c(self) -> Self::C;
    fn from_c(v: Self::C) -> Self;
    /// `exp` in the compute type (a vectorisable polynomial for f32, libm for f64).
    fn exp_c(v: Self::C) -> Self::C;
    /// The storage's data when it holds this type.
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    /// `o[i] = exp(r[i] - m)` in the compute type (f32: [`super::simd::exp_sub`]).
    #[inline(always)]
    fn exp_sub_c(o: &mut [Self::C], r: &[Self], m: Self::C) {
        for (o, v) in o.iter_mut().zip(r) {
            *o = Self::exp_c(v.to_c() - m);
        }
    }
    /// `o[i] = exp(r[i] - m)` stored in this type (f32: [`super::simd::exp_sub`]).
    #[inline(always)]
    fn exp_sub_row(o: &mut [Self], r: &[Self], m: Self::C) {
        for (o, v) in o.iter_mut().zip(r) {
            *o = Self::from_c(Self::exp_c(v.to_c() - m));
        }
    }
    /// `(Φ(x), φ(x))`, the standard normal CDF and density, in the compute type.
    fn gauss_c(x: Self::C) -> (Self::C, Self::C);
    /// One GEGLU row ([`super::geglu`]; f32: compiled per SIMD level).
    #[inline(always)]
    fn geglu_fwd_row(o: &mut [Self], a: &[Self], gate: &[Self]) {
        super::geglu::fwd_row(o, a, gate)
    }
    /// SiLU over a slice ([`super::silu`]; f32: compiled per SIMD level).
    #[inline(always)]
    fn silu_fwd_row(o: &mut [Self], x: &[Self]) {
        super::silu::fwd_row(o, x)
    }
    /// SiLU's backward over a slice ([`super::silu`]; f32: compiled per SIMD level).
    #[inline(always)]
    fn silu_bwd_row(dx: &mut [Self], x: &[Self], g: &[Self]) {
        super::silu::bwd_row(dx, x, g)
    }
    /// One GEGLU backward row ([`super::geglu`]; f32: compiled per SIMD level).
    #[inline(always)]
    fn geglu_bwd_row(da: &mut [Self], dgate: &mut [Self], a: &[Self], gate: &[Self], go: &[Self]) {
        super::geglu::bwd_row(da, dgate, a, gate, go)
    }
}

/// `e^x` for f32 to ~2e-7 relative error: `x = n·ln2 + r`, a degree-6 polynomial for `e^r`,
/// `2^n` from the exponent bits. Branch-free, so loops over it vectorise (libm's `expf` does not).
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to an integer
    let x = x.clamp(-87.3, 88.7);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer, read from t's mantissa bits (`n as i32` would add saturation checks
    // that keep the loop scalar)
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits((ni.wrapping_add(127) as u32) << 23)
}
impl Elem for f32 {
    type C = f32;
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    #[inline(always)]
    fn exp_c(v: f32) -> f32 {
        fast_exp(v)
    }
    fn exp_sub_c(o: &mut [f32], r: &[f32], m: f32) {
        super::simd::exp_sub(o, r, m)
    }
    fn exp_sub_row(o: &mut [f32], r: &[f32], m: f32) {
        super::simd::exp_sub(o, r, m)
    }
    #[inline(always)]
    fn gauss_c(x: f32) -> (f32, f32) {
        super::geglu::gauss_f32(x)
    }
    fn geglu_fwd_row(o: &mut [f32], a: &[f32], gate: &[f32]) {
        super::simd::geglu_fwd(o, a, gate)
    }
    fn geglu_bwd_row(da: &mut [f32], dgate: &mut [f32], a: &[f32], gate: &[f32], go: &[f32]) {
        super::simd::geglu_bwd(da, dgate, a, gate, go)
    }
    fn silu_fwd_row(o: &mut [f32], x: &[f32]) {
        super::simd::silu_fwd(o, x)
    }
    fn silu_bwd_row(dx: &mut [f32], x: &[f32], g: &[f32]) {
        super::simd::silu_bwd(dx, x, g)
    }
    #[inline(always)]
    fn to_c(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_c(v: f32) -> Self {
        v
    }
}
impl Elem for f64 {
    type C = f64;
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    #[inline(always)]
    fn exp_c(v: f64) -> f64 {
        v.exp()
    }
    #[inline(always)]
    fn gauss_c(x: f64) -> (f64, f64) {
        super::geglu::gauss_f64(x)
    }
    #[inline(always)]
    fn to_c(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_c(v: f64) -> Self {
        v
    }
}
impl Elem for half::f16 {
    type C = f32;
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F16(v) => Some(v),
            _ => None,
        }
    }
    #[inline(always)]
    fn exp_c(v: f32) -> f32 {
        fast_exp(v)
    }
    #[inline(always)]
    fn gauss_c(x: f32) -> (f32, f32) {
        super::geglu::gauss_f32(x)
    }
    #[inline(always)]
    fn to_c(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_c(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}
impl Elem for half::bf16 {
    type C = f32;
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::BF16(v) => Some(v),
            _ => None,
        }
    }
    #[inline(always)]
    fn exp_c(v: f32) -> f32 {
        fast_exp(v)
    }
    #[inline(always)]
    fn gauss_c(x: f32) -> (f32, f32) {
        super::geglu::gauss_f32(x)
    }
    #[inline(always)]
    fn to_c(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_c(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

pub(crate) fn contiguous<'a, T: Elem>(
    v: &'a [T],
    l: &Layout,
    op: &'static str,
) -> CResult<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op })?;
    Ok(&v[a..b])
}

pub(crate) fn last_dim(l: &Layout) -> CResult<usize> {
    match l.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!("fused op needs a tensor with a non-empty last dimension"),
    }
}

/// A fused CPU kernel over one or more same-typed contiguous inputs, generic in the element.
pub(crate) trait Kernel {
    fn run<T: Elem>(&self, inputs: &[&[T]]) -> Vec<T>;
}

fn run_typed<T: Elem, K: Kernel>(
    k: &K,
    op: &'static str,
    args: &[(&CpuStorage, &Layout)],
) -> CResult<Vec<T>> {
    let slices = args
        .iter()
        .map(|(s, l)| match T::slice(s) {
            Some(v) => contiguous(v, l, op),
            None => Err(candle_core::Error::UnsupportedDTypeForOp(s.dtype(), op)),
        })
        .collect::<CResult<Vec<_>>>()?;
    Ok(k.run(&slices))
}

/// Runs `k` on the inputs' element type (f32, f64, f16 or bf16; all inputs alike).
pub(crate) fn run_kernel<K: Kernel>(
    k: &K,
    op: &'static str,
    args: &[(&CpuStorage, &Layout)],
) -> CResult<CpuStorage> {
    Ok(match args[0].0 {
        CpuStorage::F32(_) => CpuStorage::F32(run_typed(k, op, args)?),
        CpuStorage::F64(_) => CpuStorage::F64(run_typed(k, op, args)?),
        CpuStorage::F16(_) => CpuStorage::F16(run_typed(k, op, args)?),
        CpuStorage::BF16(_) => CpuStorage::BF16(run_typed(k, op, args)?),
        other => return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), op)),
    })
}

/// Helpers of the fused ops' tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{DType, Tensor, Var};

    /// `max |a - b|` in f64.
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Panics with both numbers unless `max |a - b| / scale < tol`.
    pub(crate) fn assert_close(a: &Tensor, b: &Tensor, scale: f64, tol: f64, what: &str) {
        let d = max_abs_diff(a, b) / scale;
        assert!(d < tol, "{what}: {d} >= {tol}");
    }

    /// `f(x)` and the gradient of `sum(f(x) · r)` with respect to `x`.
    pub(crate) fn value_and_grad(
        x: &Tensor,
        r: &Tensor,
        f: impl Fn(&Tensor) -> Tensor,
    ) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor());
        let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(v.as_tensor()).unwrap().clone())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_exp_relative_error() {
        let mut worst = (0f64, 0f32);
        let mut x = -87.0f32;
        while x < 88.0 {
            let e = ((super::fast_exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            if e > worst.0 {
                worst = (e, x);
            }
            x += 0.0137;
        }
        assert!(
            worst.0 < 3e-7,
            "worst relative error {} at {}",
            worst.0,
            worst.1
        );
    }
}
