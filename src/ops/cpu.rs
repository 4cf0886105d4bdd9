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
}
impl Elem for f32 {
    type C = f32;
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

/// Runs the closure matching the storage's float type; other types are rejected.
pub(crate) fn dispatch1(
    s: &CpuStorage,
    op: &'static str,
    f32f: impl FnOnce(&[f32]) -> CResult<Vec<f32>>,
    f64f: impl FnOnce(&[f64]) -> CResult<Vec<f64>>,
    f16f: impl FnOnce(&[half::f16]) -> CResult<Vec<half::f16>>,
    bf16f: impl FnOnce(&[half::bf16]) -> CResult<Vec<half::bf16>>,
) -> CResult<CpuStorage> {
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(f32f(v)?),
        CpuStorage::F64(v) => CpuStorage::F64(f64f(v)?),
        CpuStorage::F16(v) => CpuStorage::F16(f16f(v)?),
        CpuStorage::BF16(v) => CpuStorage::BF16(bf16f(v)?),
        other => return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), op)),
    })
}
