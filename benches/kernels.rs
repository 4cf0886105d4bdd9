//! The kernel-level figures behind BENCHMARKS.md's issue-9 round 3: fused GEGLU and SiLU
//! against candle's compositions, the swapped product of frozen linears, and single GEMMs
//! (compare with `benches/peer/gemm_torch.py`). CPU f32, candle's default threads, best of 3.
//!
//!     cargo bench --bench kernels [-- geglu|silu|swap|gemm]

use anyhow::Result;
use candle_core::{Device, Tensor, Var, D};
use sd_lora::ops;
use std::time::Instant;

/// Best of 3 averages over `reps` calls, in ms (after 2 warm-up calls).
fn best_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    f()?;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e3 / reps as f64);
    }
    Ok(best)
}

/// Forward and backward ms of `sum(f(x) · r)`.
fn fwd_bwd(x: &Tensor, r: &Tensor, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<(f64, f64)> {
    let v = Var::from_tensor(x)?;
    let fwd = best_ms(10, || f(v.as_tensor()).map(|_| ()))?;
    let y = f(v.as_tensor())?;
    let loss = (&y * r)?.sum_all()?;
    let bwd = best_ms(10, || loss.backward().map(|_| ()).map_err(Into::into))?;
    Ok((fwd, bwd))
}

fn geglu_composed(h: &Tensor) -> Result<Tensor> {
    let c = h.dim(D::Minus1)? / 2;
    Ok((h.narrow(D::Minus1, 0, c)? * h.narrow(D::Minus1, c, c)?.gelu_erf()?)?)
}

fn geglu(dev: &Device) -> Result<()> {
    println!("GEGLU [1, N, 2C] -> [1, N, C], forward / backward of sum(geglu(h) · r) ms");
    for (n, c) in [(1024, 2560), (256, 5120), (4096, 256)] {
        let h = Tensor::randn(0f32, 1.0, (1, n, 2 * c), dev)?;
        let r = Tensor::randn(0f32, 1.0, (1, n, c), dev)?;
        let (cf, cb) = fwd_bwd(&h, &r, &geglu_composed)?;
        let (ff, fb) = fwd_bwd(&h, &r, &|h| Ok(ops::geglu(h)?))?;
        println!("  N {n:5} C {c:5}: candle {cf:7.2} / {cb:7.2}   fused {ff:6.2} / {fb:6.2}");
    }
    Ok(())
}

fn silu(dev: &Device) -> Result<()> {
    println!("SiLU [1, C, H, W], forward / backward of sum(silu(x) · r) ms");
    for (c, hw) in [(320, 32), (640, 16), (32, 64)] {
        let x = Tensor::randn(0f32, 1.0, (1, c, hw, hw), dev)?;
        let r = Tensor::randn(0f32, 1.0, (1, c, hw, hw), dev)?;
        let (cf, cb) = fwd_bwd(&x, &r, &|x| Ok(x.silu()?))?;
        let (ff, fb) = fwd_bwd(&x, &r, &|x| Ok(ops::silu(x)?))?;
        println!("  {c:4} x {hw}x{hw}: candle {cf:6.2} / {cb:6.2}   fused {ff:6.2} / {fb:6.2}");
    }
    Ok(())
}

/// `x [M, K] @ w [N, K]^T` plain, swapped, and as `frozen_linear` picks; 6 weight copies
/// rotate so they come from memory as in a model.
fn swap(dev: &Device) -> Result<()> {
    println!("frozen linear x [M, K] @ w [N, K]^T ms: plain, swapped (w @ x^T)^T, frozen_linear");
    let cases = [
        (8, 1280, 1280),
        (8, 5120, 1280),
        (32, 1280, 10240),
        (64, 1280, 1280),
        (64, 320, 2560),
        (77, 768, 768),
        (77, 768, 3072),
        (128, 640, 640),
        (128, 640, 5120),
        (512, 320, 320),
        (1024, 320, 16),
    ];
    for (m, k, n) in cases {
        let ws = (0..6)
            .map(|_| Tensor::randn(0f32, 1.0, (n, k), dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let x = Tensor::randn(0f32, 1.0, (m, k), dev)?;
        let mut i = 0;
        let mut next = || {
            i += 1;
            ws[i % ws.len()].clone()
        };
        let plain = best_ms(6, || Ok(x.matmul(&next().t()?).map(|_| ())?))?;
        let swapped = best_ms(6, || {
            Ok(next().matmul(&x.t()?)?.t()?.contiguous().map(|_| ())?)
        })?;
        let rule = best_ms(6, || Ok(ops::frozen_linear(&x, &next(), None).map(|_| ())?))?;
        println!(
            "  M {m:5} K {k:5} N {n:5}: {plain:6.3} {swapped:6.3} ({:.2}) {rule:6.3}",
            swapped / plain
        );
    }
    Ok(())
}

/// Single products at SD 1.5 shapes, GFLOP/s: `linear` = `x [M, K] @ w [N, K]^T` through
/// `frozen_linear`, `conv` = `w [Cout, K] @ cols [K, HW]` (the im2col GEMM).
fn gemm(dev: &Device) -> Result<()> {
    println!("GEMM GFLOP/s (6 rotating operand copies)");
    let cases = [
        ("linear", 1024, 320, 320),
        ("linear", 1024, 320, 2560),
        ("linear", 256, 640, 640),
        ("linear", 64, 1280, 1280),
        ("linear", 16, 1280, 1280),
        ("conv", 320, 2880, 1024),
        ("conv", 640, 5760, 256),
        ("conv", 1280, 11520, 64),
        ("conv", 1280, 11520, 16),
    ];
    for (what, m, k, n) in cases {
        let lhs = (0..6)
            .map(|_| Tensor::randn(0f32, 1.0, (m, k), dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let rhs_shape = if what == "linear" { (n, k) } else { (k, n) };
        let rhs = (0..6)
            .map(|_| Tensor::randn(0f32, 1.0, rhs_shape, dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut i = 0;
        let ms = best_ms(6, || {
            i += 1;
            let (a, b) = (&lhs[i % 6], &rhs[i % 6]);
            if what == "linear" {
                ops::frozen_linear(a, b, None)?;
            } else {
                a.matmul(b)?;
            }
            Ok(())
        })?;
        let gflops = 2.0 * (m * k * n) as f64 / ms / 1e6;
        println!("  {what:6} {m:5} x {k:5} x {n:5}: {ms:7.3} ms {gflops:5.0} GFLOP/s");
    }
    Ok(())
}

/// One printed section of the bench.
type Section = fn(&Device) -> Result<()>;

fn main() -> Result<()> {
    sd_lora::device::tune_cpu_allocator();
    sd_lora::device::tune_cpu_threads();
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let dev = Device::Cpu;
    let all: [(&str, Section); 4] = [
        ("geglu", geglu),
        ("silu", silu),
        ("swap", swap),
        ("gemm", gemm),
    ];
    for (name, run) in all {
        if filter.is_empty() || filter.iter().any(|f| f == name) {
            run(&dev)?;
        }
    }
    Ok(())
}
