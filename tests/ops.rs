//! The fused differentiable ops: forward against candle's composed reference, backward
//! against central finite differences (f64).

use candle_core::{DType, Device, Tensor, Var, D};
use sd_lora::ops;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // deterministic pseudo-random values without depending on candle's RNG
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Checks d(sum(f(x) * w))/dx from backward() against central differences.
fn check_grad(f: &dyn Fn(&Tensor) -> Tensor, x0: &Tensor, tol: f64) {
    let w = randn(f(x0).dims(), 99);
    let x = Var::from_tensor(x0).unwrap();
    let loss = (f(x.as_tensor()) * &w).unwrap().sum_all().unwrap();
    let g = loss
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .expect("no gradient")
        .clone();
    assert!(max_abs(&g) > 0.0, "gradient is zero");
    let flat: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
    let gflat: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-6;
    for i in (0..flat.len()).step_by(7) {
        let eval = |d: f64| {
            let mut v = flat.clone();
            v[i] += d;
            let xt = Tensor::from_vec(v, x0.dims(), &Device::Cpu).unwrap();
            (f(&xt) * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
        assert!(
            (fd - gflat[i]).abs() <= tol * (1.0 + fd.abs()),
            "element {i}: fd {fd} vs backward {}",
            gflat[i]
        );
    }
}

#[test]
fn softmax_forward_matches_reference_in_every_dtype() {
    let x = (randn(&[3, 5, 17], 1) * 3.0).unwrap();
    let reference = candle_nn::ops::softmax(&x, D::Minus1).unwrap();
    for dt in [DType::F64, DType::F32, DType::F16, DType::BF16] {
        let y = ops::softmax_last_dim(&x.to_dtype(dt).unwrap())
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let err = max_abs(&(y - &reference).unwrap());
        let tol = if dt == DType::BF16 {
            1e-2
        } else if dt == DType::F16 {
            1e-3
        } else {
            1e-6
        };
        assert!(err < tol, "{dt:?}: {err}");
    }
    // non-contiguous input
    let xt = x.transpose(1, 2).unwrap();
    let y = ops::softmax_last_dim(&xt).unwrap();
    let r = candle_nn::ops::softmax(&xt.contiguous().unwrap(), D::Minus1).unwrap();
    assert!(max_abs(&(y - r).unwrap()) < 1e-12);
}

#[test]
fn softmax_backward_matches_finite_differences() {
    check_grad(
        &|x| ops::softmax_last_dim(x).unwrap(),
        &randn(&[2, 3, 11], 2),
        1e-6,
    );
}

#[test]
fn layer_norm_forward_matches_reference() {
    let x = (randn(&[4, 6, 24], 3) + 0.7).unwrap();
    let w = randn(&[24], 4);
    let b = randn(&[24], 5);
    let y = ops::layer_norm(&x, &w, &b, 1e-5).unwrap();
    let r = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).unwrap();
    assert!(max_abs(&(y - r).unwrap()) < 1e-10);
}

#[test]
fn layer_norm_backward_matches_finite_differences() {
    let w = randn(&[13], 6);
    let b = randn(&[13], 7);
    check_grad(
        &|x| ops::layer_norm(x, &w, &b, 1e-5).unwrap(),
        &randn(&[3, 4, 13], 8),
        1e-5,
    );
}

#[test]
fn layer_norm_weight_and_bias_gradients_when_trainable() {
    let x = randn(&[5, 9], 9);
    let w = Var::from_tensor(&randn(&[9], 10)).unwrap();
    let b = Var::from_tensor(&randn(&[9], 11)).unwrap();
    let g = randn(&[5, 9], 12);
    let fused = (ops::layer_norm(&x, w.as_tensor(), b.as_tensor(), 1e-5).unwrap() * &g)
        .unwrap()
        .sum_all()
        .unwrap();
    let composed = (ops::layer_norm_composed(&x, Some(w.as_tensor()), Some(b.as_tensor()), 1e-5)
        .unwrap()
        * &g)
        .unwrap()
        .sum_all()
        .unwrap();
    let (gf, gc) = (fused.backward().unwrap(), composed.backward().unwrap());
    for v in [&w, &b] {
        let d =
            max_abs(&(gf.get(v.as_tensor()).unwrap() - gc.get(v.as_tensor()).unwrap()).unwrap());
        assert!(d < 1e-5, "param grad differs by {d}");
    }
}

#[test]
fn group_norm_forward_and_backward() {
    let x = randn(&[2, 8, 3, 5], 13);
    let w = randn(&[8], 14);
    let b = randn(&[8], 15);
    let y = ops::group_norm(&x, 4, &w, &b, 1e-6).unwrap();
    // reference: candle_nn's GroupNorm (composed primitives)
    let gn = candle_nn::GroupNorm::new(w.clone(), b.clone(), 8, 4, 1e-6).unwrap();
    let r = candle_core::Module::forward(&gn, &x).unwrap();
    assert!(max_abs(&(y - r).unwrap()) < 1e-5);
    check_grad(&|x| ops::group_norm(x, 4, &w, &b, 1e-6).unwrap(), &x, 1e-5);
    assert!(
        ops::group_norm(&x, 3, &w, &b, 1e-6).is_err(),
        "8 channels into 3 groups must fail"
    );
}

/// Gradient w.r.t. x of sum(f(x) * w) through candle's own ops vs through the frozen op.
fn input_grads(
    plain: &dyn Fn(&Tensor) -> Tensor,
    frozen: &dyn Fn(&Tensor) -> Tensor,
    x0: &Tensor,
) -> (Tensor, Tensor, f64) {
    let x = Var::from_tensor(x0).unwrap();
    let y1 = plain(x.as_tensor());
    let y2 = frozen(x.as_tensor());
    let fwd = max_abs(&(&y1 - &y2).unwrap());
    let w = randn(y1.dims(), 5);
    let g1 = (y1 * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap()
        .clone();
    let g2 = (y2 * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap()
        .clone();
    (g1, g2, fwd)
}

#[test]
fn frozen_conv_input_gradient_matches_candle() {
    // (cin, cout, k, padding, stride, h, w): SD's 3x3 same, 1x1 shortcut, stride-2 down, odd sizes
    for &(ci, co, k, p, s, h, w) in &[
        (3, 5, 3, 1, 1, 6, 7),
        (4, 2, 1, 0, 1, 5, 5),
        (3, 4, 3, 1, 2, 8, 8),
        (3, 4, 3, 1, 2, 7, 9),
        (2, 3, 3, 0, 2, 7, 7),
        (2, 2, 3, 0, 1, 5, 6),
    ] {
        let x0 = randn(&[2, ci, h, w], 21);
        let kern = randn(&[co, ci, k, k], 22);
        let (g1, g2, fwd) = input_grads(
            &|x| x.conv2d(&kern, p, s, 1, 1).unwrap(),
            &|x| ops::frozen_conv2d(x, &kern, None, p, s).unwrap(),
            &x0,
        );
        assert!(fwd < 1e-10, "forward differs");
        let e = max_abs(&(&g1 - &g2).unwrap()) / max_abs(&g1);
        assert!(
            e < 1e-10,
            "conv k{k} p{p} s{s} {h}x{w}: input grad rel err {e}"
        );
    }
    // different leftover rows and columns under stride 2 (candle's own backward gets this
    // shape wrong: it derives the output padding from the height only)
    let kern = randn(&[3, 2, 3, 3], 23);
    let bias = randn(&[3], 25);
    check_grad(
        &|x| ops::frozen_conv2d(x, &kern, Some(&bias), 0, 2).unwrap(),
        &randn(&[1, 2, 7, 6], 24),
        1e-6,
    );
}

#[test]
fn frozen_linear_matches_candle_and_keeps_weight_grads_when_trainable() {
    let x0 = randn(&[7, 5], 31);
    let w = randn(&[3, 5], 32);
    let b = randn(&[3], 33);
    let (g1, g2, fwd) = input_grads(
        &|x| {
            x.matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
        },
        &|x| ops::frozen_linear(x, &w, Some(&b)).unwrap(),
        &x0,
    );
    assert!(fwd < 1e-12 && max_abs(&(g1 - g2).unwrap()) < 1e-12);
    // a trainable weight still gets its gradient (full fine-tuning)
    let wv = Var::from_tensor(&w).unwrap();
    let x = Var::from_tensor(&x0).unwrap();
    let g = ops::frozen_linear(x.as_tensor(), wv.as_tensor(), None)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(wv.as_tensor()).is_some() && g.get(x.as_tensor()).is_some());
}

#[test]
fn group_norm_trainable_affine_gets_gradients() {
    let x = Var::from_tensor(&randn(&[2, 6, 4, 3], 41)).unwrap();
    let w = Var::from_tensor(&randn(&[6], 42)).unwrap();
    let b = Var::from_tensor(&randn(&[6], 43)).unwrap();
    let frozen = ops::group_norm(
        x.as_tensor(),
        3,
        &w.as_tensor().detach(),
        &b.as_tensor().detach(),
        1e-5,
    )
    .unwrap();
    let trained = ops::group_norm(x.as_tensor(), 3, w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
    assert!(
        max_abs(&(&frozen - &trained).unwrap()) < 1e-10,
        "both paths compute the same"
    );
    let gw = randn(frozen.dims(), 44);
    let g1 = (frozen * &gw)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g2 = (trained * &gw)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let d = max_abs(&(g1.get(x.as_tensor()).unwrap() - g2.get(x.as_tensor()).unwrap()).unwrap());
    assert!(d < 1e-10, "input gradients agree ({d})");
    assert!(g2.get(w.as_tensor()).is_some() && g2.get(b.as_tensor()).is_some());
}

#[test]
fn softmax_f32_is_accurate_over_the_whole_range() {
    // scores from -100 to +100: exercises the fast exp's range reduction and clamping
    let v: Vec<f32> = (0..2001).map(|i| (i as f32 - 1000.0) * 0.1).collect();
    let x = Tensor::from_vec(v, (1, 2001), &Device::Cpu).unwrap();
    let y = ops::softmax_last_dim(&x)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let r = candle_nn::ops::softmax(&x.to_dtype(DType::F64).unwrap(), D::Minus1).unwrap();
    let (y, r): (Vec<f64>, Vec<f64>) = (
        y.flatten_all().unwrap().to_vec1().unwrap(),
        r.flatten_all().unwrap().to_vec1().unwrap(),
    );
    let rel = y
        .iter()
        .zip(&r)
        .filter(|(_, r)| **r > 1e-30)
        .map(|(y, r)| ((y - r) / r).abs())
        .fold(0.0, f64::max);
    // f32 rounding of (x - max) alone costs |x - max|·2^-24 ≈ 1e-5 relative at the small end
    assert!(rel < 2e-5, "relative error {rel}");
}

/// softmax(q kᵀ) v with the whole score matrix (candle's differentiable composition).
fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let s = q.matmul(&k.t().unwrap()).unwrap();
    candle_nn::ops::softmax(&s, D::Minus1)
        .unwrap()
        .matmul(v)
        .unwrap()
}

#[test]
fn chunked_attention_matches_the_full_matrix_forward_and_backward() {
    // q [BH=3, N=10, d=4], k [3, M=7, 4], v [3, 7, dv=5]; chunks of 3 rows leave a partial one
    let (q0, k0, v0) = (
        randn(&[3, 10, 4], 1),
        randn(&[3, 7, 4], 2),
        randn(&[3, 7, 5], 3),
    );
    let w = randn(&[3, 10, 5], 4);
    for chunk in [1, 3, 10, 64] {
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-12 } else { 2e-5 };
            let vars: Vec<Var> = [&q0, &k0, &v0]
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
                .collect();
            let (q, k, v) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            let ours = ops::attention(q, k, v, chunk).unwrap();
            let want = attention_reference(q, k, v);
            assert!(
                max_abs(&(&ours - &want).unwrap()) < tol,
                "forward, chunk {chunk}"
            );
            let w = w.to_dtype(dtype).unwrap();
            let g1 = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&want * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in ["q", "k", "v"].iter().zip(&vars) {
                let a = g1
                    .get(var.as_tensor())
                    .expect("gradient from the chunked op");
                let b = g2.get(var.as_tensor()).unwrap();
                assert!(max_abs(a) > 1e-3, "{name}: zero gradient");
                let err = max_abs(&(a - b).unwrap()) / max_abs(b);
                assert!(
                    err < tol,
                    "d{name}, chunk {chunk}, {dtype:?}: relative error {err}"
                );
            }
            // without tracked inputs the op records nothing
            let plain = ops::attention(&q.detach(), &k.detach(), &v.detach(), chunk).unwrap();
            assert!(!plain.track_op());
        }
    }
    // the f64 backward also against finite differences (through q)
    check_grad(&|q| ops::attention(q, &k0, &v0, 3).unwrap(), &q0, 1e-6);
    assert!(ops::attention(&q0, &k0, &randn(&[3, 6, 5], 5), 3).is_err());
}

#[test]
fn unet_attention_switches_to_chunks_above_the_budget_with_the_same_result() {
    use sd_lora::prelude::*;
    let cfg = UNetConfig::tiny();
    let mut unet = UNet2DConditionModel::random(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    unet.inject_lora(&LoraConfig::new(4, 4.0), &VarMap::new())
        .unwrap();
    // random B so that the LoRA path matters
    for (_, var) in unet.lora_vars().unwrap() {
        var.set(&(randn(var.dims(), 11).to_dtype(DType::F32).unwrap() * 0.1).unwrap())
            .unwrap();
    }
    let x = randn(&[2, cfg.in_channels, 16, 16], 5)
        .to_dtype(DType::F32)
        .unwrap();
    let ctx = randn(&[2, 77, cfg.cross_dims().unwrap()[0]], 6)
        .to_dtype(DType::F32)
        .unwrap();
    let t = Tensor::new(&[10u32, 500], &Device::Cpu).unwrap();
    let run = |budget: usize| {
        ops::set_attention_chunk_bytes(budget);
        let out = unet.forward(&x, &t, &ctx).unwrap();
        let grads = out.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        let g: Vec<Tensor> = unet
            .lora_vars()
            .unwrap()
            .iter()
            .map(|(n, v)| {
                grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no grad {n}"))
                    .clone()
            })
            .collect();
        (out, g)
    };
    let (out_full, g_full) = run(usize::MAX); // every score matrix whole
    let (out_chunked, g_chunked) = run(4096); // every attention layer in chunks of a few rows
    ops::set_attention_chunk_bytes(0);
    let rel = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap()) / max_abs(b);
    assert!(rel(&out_chunked, &out_full) < 1e-5);
    for (a, b) in g_chunked.iter().zip(&g_full) {
        assert!(max_abs(a) > 0.0);
        assert!(rel(a, b) < 1e-4, "gradient differs by {}", rel(a, b));
    }
}

/// The chunked attention's row kernels against the candle compositions they replace: f64 to
/// 1e-12, f32 (fast exp) to 1e-6 relative, including rows with large values (scores of 60)
/// and a row statistic that is not the row's own (exp of negative and positive shifts).
#[test]
fn attention_row_kernels_match_candle_compositions() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
        let s = (randn(&[3, 5, 37], 21) * 15.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let rel = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-30);
        // log-sum-exp
        let max = s.max_keepdim(D::Minus1).unwrap();
        let lse_ref = (max.clone()
            + s.broadcast_sub(&max)
                .unwrap()
                .exp()
                .unwrap()
                .sum_keepdim(D::Minus1)
                .unwrap()
                .log()
                .unwrap())
        .unwrap();
        let lse = ops::logsumexp_rows(&s).unwrap();
        assert_eq!(lse.dims(), &[3, 5, 1]);
        assert!(
            rel(&lse, &lse_ref) < tol,
            "{dtype:?} lse {}",
            rel(&lse, &lse_ref)
        );
        // exp(s - l) with probabilities (l = lse: rows sum to 1) and with a shifted statistic
        for l in [lse.clone(), (&lse - 3.0).unwrap()] {
            let e_ref = s.broadcast_sub(&l).unwrap().exp().unwrap();
            let e = ops::exp_sub_rows(&s, &l).unwrap();
            assert!(
                rel(&e, &e_ref) < tol,
                "{dtype:?} exp-sub {}",
                rel(&e, &e_ref)
            );
        }
        let p = ops::exp_sub_rows(&s, &lse).unwrap();
        let sums = p.sum_keepdim(D::Minus1).unwrap();
        assert!(max_abs(&(sums - 1.0).unwrap()) < 10.0 * tol);
        // p * (dp - d)
        let dp = randn(&[3, 5, 37], 22).to_dtype(dtype).unwrap();
        let d = randn(&[3, 5, 1], 23).to_dtype(dtype).unwrap();
        let m_ref = (&p * dp.broadcast_sub(&d).unwrap()).unwrap();
        let m = ops::mul_sub_rows(&p, &dp, &d).unwrap();
        assert!(
            rel(&m, &m_ref) < tol,
            "{dtype:?} mul-sub {}",
            rel(&m, &m_ref)
        );
        // mismatched row statistics are refused, not broadcast silently
        let bad = randn(&[3, 4, 1], 24).to_dtype(dtype).unwrap();
        assert!(ops::exp_sub_rows(&s, &bad).is_err());
        assert!(ops::mul_sub_rows(&p, &dp, &bad).is_err());
    }
}

/// Large convolutions build their im2col columns in bands of output rows (at most 64 MiB at a
/// time); the result equals candle's convolution, batched and strided too.
#[test]
fn banded_im2col_convolution_matches_candle() {
    use sd_lora::weights::randn_seeded;
    let dev = candle_core::Device::Cpu;
    // (input [b, cin, h, w], cout, padding, stride): 5 bands; 2 bands with a stride and a batch
    for (x, cout, pad, stride) in [
        ([1usize, 128, 256, 256], 16usize, 1usize, 1usize),
        ([2, 96, 300, 200], 8, 1, 2),
    ] {
        let xs = randn_seeded(1, &x, 1.0, &dev).unwrap();
        let w = randn_seeded(2, &[cout, x[1], 3, 3], 0.05, &dev).unwrap();
        let ours = sd_lora::ops::conv2d_im2col(&xs, &w, pad, stride).unwrap();
        let theirs = xs.conv2d(&w, pad, stride, 1, 1).unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        let diff = (&ours - &theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let max = theirs
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-5 * max, "{x:?}: {diff} of {max}");
    }
}
