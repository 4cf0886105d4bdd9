//! The fused CPU attention kernel (`ops::flash_attention`) against the reference path
//! (`softmax(q kᵀ [+ mask]) v` with candle ops and our softmax) over odd sizes: tokens not a
//! multiple of the tiles, one head, 77-token keys, batch x heads > 1, CLIP's causal mask;
//! outputs and q/k/v gradients to 1e-10 in f64 and 2e-5 in f32 (relative to the largest
//! value), and against central differences.

use candle_core::{DType, Device, Tensor, Var};
use sd_lora::ops;
use sd_lora::weights::randn_seeded;

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let m = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    d / m.max(1e-300)
}

fn causal_mask(n: usize, dtype: DType) -> Tensor {
    let v: Vec<f64> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f64::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (n, n), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Output and the gradients of `sum(out * w)` for q, k, v.
fn run(fused: bool, q: &Var, k: &Var, v: &Var, w: &Tensor, causal: bool) -> (Tensor, Vec<Tensor>) {
    let out = if fused {
        ops::flash_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), causal).unwrap()
    } else {
        let mut s = q.as_tensor().matmul(&k.as_tensor().t().unwrap()).unwrap();
        if causal {
            s = s
                .broadcast_add(&causal_mask(q.dim(1).unwrap(), q.dtype()))
                .unwrap();
        }
        ops::softmax_last_dim(&s)
            .unwrap()
            .matmul(v.as_tensor())
            .unwrap()
    };
    let loss = (&out * w).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let grads = [q, k, v]
        .iter()
        .map(|x| g.get(x.as_tensor()).unwrap().clone())
        .collect();
    (out, grads)
}

fn inputs(
    bh: usize,
    n: usize,
    m: usize,
    d: usize,
    dv: usize,
    dtype: DType,
) -> (Var, Var, Var, Tensor) {
    let dev = Device::Cpu;
    let mk = |seed, dims: &[usize], std| {
        Var::from_tensor(
            &randn_seeded(seed, dims, std, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap()
    };
    let q = mk(1, &[bh, n, d], 0.4);
    let k = mk(2, &[bh, m, d], 1.0);
    let v = mk(3, &[bh, m, dv], 1.0);
    let w = randn_seeded(4, &[bh, n, dv], 1.0, &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    (q, k, v, w)
}

#[test]
fn the_fused_kernel_matches_the_reference_path() {
    // (batch x heads, query tokens, key tokens, head dim, value dim, causal)
    let cases = [
        (3, 130, 77, 8, 8, false), // cross-attention: 77 keys, queries past two tiles
        (1, 64, 64, 40, 40, false), // one head, exactly one tile
        (2, 257, 300, 16, 24, false), // odd everything, key tiles of 128 + 44
        (4, 77, 77, 16, 16, true), // CLIP's causal self-attention
        (1, 200, 200, 8, 8, true), // causal across query and key tiles
    ];
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-5)] {
        for &(bh, n, m, d, dv, causal) in &cases {
            let (q, k, v, w) = inputs(bh, n, m, d, dv, dtype);
            let (o0, g0) = run(false, &q, &k, &v, &w, causal);
            let (o1, g1) = run(true, &q, &k, &v, &w, causal);
            let case = format!("{dtype:?} bh {bh} n {n} m {m} d {d} dv {dv} causal {causal}");
            assert_eq!(o1.dtype(), dtype, "{case}");
            assert!(rel(&o0, &o1) <= tol, "{case}: output {:e}", rel(&o0, &o1));
            for (name, a, b) in [
                ("q", &g0[0], &g1[0]),
                ("k", &g0[1], &g1[1]),
                ("v", &g0[2], &g1[2]),
            ] {
                assert!(rel(a, b) <= tol, "{case}: d{name} {:e}", rel(a, b));
            }
        }
    }
}

#[test]
fn half_precision_inputs_compute_in_f32() {
    let (q, k, v, w) = inputs(2, 90, 77, 16, 16, DType::F32);
    let (o32, g32) = run(true, &q, &k, &v, &w, false);
    let half = |x: &Var| Var::from_tensor(&x.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap();
    let (qh, kh, vh) = (half(&q), half(&k), half(&v));
    let (oh, gh) = run(
        true,
        &qh,
        &kh,
        &vh,
        &w.to_dtype(DType::BF16).unwrap(),
        false,
    );
    assert_eq!((oh.dtype(), gh[0].dtype()), (DType::BF16, DType::BF16));
    // bf16 inputs and outputs: within bf16's rounding of the f32 result
    assert!(rel(&o32, &oh) < 2e-2, "{}", rel(&o32, &oh));
    assert!(rel(&g32[2], &gh[2]) < 5e-2, "{}", rel(&g32[2], &gh[2]));
}

#[test]
fn gradients_match_central_differences() {
    for causal in [false, true] {
        let m = if causal { 70 } else { 140 };
        let (q, k, v, w) = inputs(2, 70, m, 8, 8, DType::F64);
        let (_, g) = run(true, &q, &k, &v, &w, causal);
        let loss = |x: [&Tensor; 3]| {
            ops::flash_attention(x[0], x[1], x[2], causal)
                .unwrap()
                .mul(&w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let eps = 1e-6;
        let all = [q.as_tensor(), k.as_tensor(), v.as_tensor()];
        for which in 0..3 {
            let flat: Vec<f64> = all[which].flatten_all().unwrap().to_vec1().unwrap();
            let grad: Vec<f64> = g[which].flatten_all().unwrap().to_vec1().unwrap();
            for idx in [0, 7, flat.len() / 2, flat.len() - 1] {
                let bumped = |delta: f64| {
                    let mut f = flat.clone();
                    f[idx] += delta;
                    Tensor::from_vec(f, all[which].dims(), &Device::Cpu).unwrap()
                };
                let (p, n) = (bumped(eps), bumped(-eps));
                let mut xp = all;
                xp[which] = &p;
                let mut xn = all;
                xn[which] = &n;
                let fd = (loss(xp) - loss(xn)) / (2.0 * eps);
                assert!(
                    (fd - grad[idx]).abs() <= 1e-6 * (1.0 + grad[idx].abs()),
                    "causal {causal} input {which} [{idx}]: analytic {} vs central difference {fd}",
                    grad[idx]
                );
            }
        }
    }
}
