//! The `exp` row loop of the fused CPU kernels, compiled three times (AVX-512, AVX2 + FMA,
//! baseline x86-64) and picked once at run time.
//!
//! The crate is built for baseline x86-64, where the vectorised [`super::cpu::fast_exp`] runs
//! 4 lanes wide (SSE2). The attention's row kernels spend most of their time in this loop (a
//! score matrix is exponentiated three times per training step), so it gets wider copies for
//! the CPUs that have them. `SD_LORA_SIMD=base|avx2|avx512` caps the level (for comparisons);
//! a level the CPU lacks is never chosen.

use std::sync::OnceLock;

use super::cpu::fast_exp;

/// Vector instruction sets the row loops are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Base,
    Avx2,
    Avx512,
}

/// The widest level this CPU runs (capped by `SD_LORA_SIMD`), detected once.
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("SD_LORA_SIMD").as_deref() {
            Ok("base") => SimdLevel::Base,
            Ok("avx2") => SimdLevel::Avx2,
            _ => SimdLevel::Avx512,
        };
        detected().min(cap)
    })
}

/// What the CPU has (std caches the feature checks, so this is cheap to repeat).
fn detected() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return SimdLevel::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Base
}

#[inline(always)]
fn exp_sub_body(o: &mut [f32], r: &[f32], m: f32) {
    for (o, v) in o.iter_mut().zip(r) {
        *o = fast_exp(*v - m);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn exp_sub_avx512(o: &mut [f32], r: &[f32], m: f32) {
    exp_sub_body(o, r, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_sub_avx2(o: &mut [f32], r: &[f32], m: f32) {
    exp_sub_body(o, r, m)
}

/// `o[i] = exp(r[i] - m)` at the given level; a level the CPU lacks is lowered to
/// the one it has.
pub(crate) fn exp_sub_at(level: SimdLevel, o: &mut [f32], r: &[f32], m: f32) {
    match level.min(detected()) {
        // SAFETY: the CPU has these features (checked by `detected`).
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { exp_sub_avx512(o, r, m) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { exp_sub_avx2(o, r, m) },
        _ => exp_sub_body(o, r, m),
    }
}

/// `o[i] = exp(r[i] - m)` at [`simd_level`].
#[inline]
pub(crate) fn exp_sub(o: &mut [f32], r: &[f32], m: f32) {
    exp_sub_at(simd_level(), o, r, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn geglu_fwd_avx512(o: &mut [f32], a: &[f32], gate: &[f32]) {
    super::geglu::fwd_row(o, a, gate)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn geglu_fwd_avx2(o: &mut [f32], a: &[f32], gate: &[f32]) {
    super::geglu::fwd_row(o, a, gate)
}

/// One GEGLU row (`o = a · GELU(gate)`) at [`simd_level`].
pub(crate) fn geglu_fwd(o: &mut [f32], a: &[f32], gate: &[f32]) {
    match simd_level() {
        // SAFETY: `simd_level` never exceeds what the CPU has.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { geglu_fwd_avx512(o, a, gate) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { geglu_fwd_avx2(o, a, gate) },
        _ => super::geglu::fwd_row(o, a, gate),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn geglu_bwd_avx512(da: &mut [f32], dg: &mut [f32], a: &[f32], gate: &[f32], go: &[f32]) {
    super::geglu::bwd_row(da, dg, a, gate, go)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn geglu_bwd_avx2(da: &mut [f32], dg: &mut [f32], a: &[f32], gate: &[f32], go: &[f32]) {
    super::geglu::bwd_row(da, dg, a, gate, go)
}

/// One GEGLU backward row at [`simd_level`].
pub(crate) fn geglu_bwd(da: &mut [f32], dg: &mut [f32], a: &[f32], gate: &[f32], go: &[f32]) {
    match simd_level() {
        // SAFETY: `simd_level` never exceeds what the CPU has.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { geglu_bwd_avx512(da, dg, a, gate, go) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { geglu_bwd_avx2(da, dg, a, gate, go) },
        _ => super::geglu::bwd_row(da, dg, a, gate, go),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn silu_fwd_avx512(o: &mut [f32], x: &[f32]) {
    super::silu::fwd_row(o, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_fwd_avx2(o: &mut [f32], x: &[f32]) {
    super::silu::fwd_row(o, x)
}

/// `o = x · σ(x)` at [`simd_level`].
pub(crate) fn silu_fwd(o: &mut [f32], x: &[f32]) {
    match simd_level() {
        // SAFETY: `simd_level` never exceeds what the CPU has.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { silu_fwd_avx512(o, x) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { silu_fwd_avx2(o, x) },
        _ => super::silu::fwd_row(o, x),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn silu_bwd_avx512(dx: &mut [f32], x: &[f32], g: &[f32]) {
    super::silu::bwd_row(dx, x, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_bwd_avx2(dx: &mut [f32], x: &[f32], g: &[f32]) {
    super::silu::bwd_row(dx, x, g)
}

/// SiLU's backward at [`simd_level`].
pub(crate) fn silu_bwd(dx: &mut [f32], x: &[f32], g: &[f32]) {
    match simd_level() {
        // SAFETY: `simd_level` never exceeds what the CPU has.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { silu_bwd_avx512(dx, x, g) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { silu_bwd_avx2(dx, x, g) },
        _ => super::silu::bwd_row(dx, x, g),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every level this CPU has gives the baseline's values (the same polynomial; FMA is not
    /// used implicitly, so bit-for-bit) and matches f64 `exp` of the f32 difference to 3e-7 relative.
    #[test]
    fn every_level_agrees_with_the_baseline_and_f64() {
        let r: Vec<f32> = (0..1003)
            .map(|i| ((i * 37) % 401) as f32 * 0.11 - 30.0)
            .collect();
        let m = 2.5f32;
        let mut base = vec![0f32; r.len()];
        exp_sub_at(SimdLevel::Base, &mut base, &r, m);
        for (b, v) in base.iter().zip(&r) {
            let want = ((*v - m) as f64).exp();
            assert!(
                ((*b as f64 - want) / want).abs() < 3e-7,
                "{v}: {b} vs {want}"
            );
        }
        for level in [SimdLevel::Avx2, SimdLevel::Avx512] {
            let mut o = vec![0f32; r.len()];
            exp_sub_at(level, &mut o, &r, m);
            assert_eq!(o, base, "{level:?}");
        }
        assert!(simd_level() <= detected());
    }
}
