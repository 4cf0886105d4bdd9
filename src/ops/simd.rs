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

/// Defines `$at(level, args..)`, the body compiled three times (AVX-512, AVX2 + FMA, baseline
/// x86-64) and run at `level` lowered to what the CPU has, and `$name(args..)` at
/// [`simd_level`]. The body calls `#[inline(always)]` loops, so each copy is vectorised for its
/// instruction set.
macro_rules! dispatched {
    ($(#[$doc:meta])* $name:ident, $at:ident, ($($arg:ident: $ty:ty),*) => $body:expr) => {
        $(#[$doc])*
        #[cfg_attr(not(test), allow(dead_code))]
        pub(crate) fn $at(level: SimdLevel, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            fn avx512($($arg: $ty),*) {
                $body
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) {
                $body
            }
            match level.min(detected()) {
                // SAFETY: the CPU has these features (checked by `detected`).
                #[cfg(target_arch = "x86_64")]
                SimdLevel::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                SimdLevel::Avx2 => unsafe { avx2($($arg),*) },
                _ => $body,
            }
        }

        $(#[$doc])*
        #[inline]
        pub(crate) fn $name($($arg: $ty),*) {
            $at(simd_level(), $($arg),*)
        }
    };
}

#[inline(always)]
fn exp_sub_body(o: &mut [f32], r: &[f32], m: f32) {
    for (o, v) in o.iter_mut().zip(r) {
        *o = fast_exp(*v - m);
    }
}

dispatched!(
    /// `o[i] = exp(r[i] - m)`.
    exp_sub, exp_sub_at, (o: &mut [f32], r: &[f32], m: f32) => exp_sub_body(o, r, m)
);
dispatched!(
    /// One GEGLU row, `o = a · GELU(gate)`.
    geglu_fwd, geglu_fwd_at, (o: &mut [f32], a: &[f32], gate: &[f32])
        => super::geglu::fwd_row(o, a, gate)
);
dispatched!(
    /// One GEGLU backward row.
    geglu_bwd, geglu_bwd_at,
    (da: &mut [f32], dg: &mut [f32], a: &[f32], gate: &[f32], go: &[f32])
        => super::geglu::bwd_row(da, dg, a, gate, go)
);
dispatched!(
    /// `o = x · σ(x)`.
    silu_fwd, silu_fwd_at, (o: &mut [f32], x: &[f32]) => super::silu::fwd_row(o, x)
);
dispatched!(
    /// SiLU's backward.
    silu_bwd, silu_bwd_at, (dx: &mut [f32], x: &[f32], g: &[f32])
        => super::silu::bwd_row(dx, x, g)
);

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
