//! Fused attention for the CPU, FlashAttention-2 style: `softmax(q kᵀ [+ causal mask]) v` tile
//! by tile, never holding a score matrix larger than one `64 x 128` tile per thread.
//!
//! Forward, per (batch·head, tile of 64 query rows), over tiles of 128 keys: `S = Q Kᵀ` (a
//! GEMM), the running row maximum `m` and sum `l` updated with `P = exp(S - m)` (the output
//! accumulator rescaled by `exp(m_old - m)`), `O += P V` (a GEMM); at the end `O / l` and the
//! row log-sum-exp `m + ln l`, which is all the backward keeps besides `q`, `k`, `v` and `O`.
//! Backward, per batch·head, over key tiles and within each over query tiles: `P` recomputed
//! from the log-sum-exp, `dV += Pᵀ dO`, `dP = dO Vᵀ`, `dS = P (dP - D)` with `D = rowsum(dO O)`,
//! `dQ += dS K`, `dK += dSᵀ Q` (five GEMMs on tiles). Threads take batch·heads (and query tiles
//! in the forward). f32 and f64 compute in their own type; f16/bf16 inputs are computed in
//! f32. `q` comes scaled (as [`super::attention`]'s).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use super::cpu::Elem;
use super::stored::Stored;

static FUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether the UNet's, CLIP's and the VAE's attention use [`flash_attention`] on the CPU
/// (default true). Off: the reference paths (whole score matrices, or chunks with candle
/// tensor ops), which other devices always use.
pub fn fused_attention() -> bool {
    FUSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sets [`fused_attention`] for the whole process.
pub fn set_fused_attention(on: bool) {
    FUSED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Query rows per tile.
const BR: usize = 64;
/// Keys per tile.
const BC: usize = 128;

/// `softmax(q kᵀ) v` for `q [BH, N, d]` (already scaled), `k [BH, M, d]`, `v [BH, M, dv]` on
/// the CPU; `causal` masks key `j > i` (CLIP). Differentiable in `q`, `k` and `v`.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
) -> candle_core::Result<Tensor> {
    let (bh, n, d) = q.dims3()?;
    let (bk, m, dk) = k.dims3()?;
    let (bv, mv, _) = v.dims3()?;
    if bk != bh || bv != bh || dk != d || mv != m || (causal && m != n) {
        candle_core::bail!(
            "flash attention: shapes q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if !q.device().is_cpu() {
        candle_core::bail!("flash attention runs on the CPU");
    }
    let dtype = q.dtype();
    let compute = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let prep = |t: &Tensor| t.detach().to_dtype(compute)?.contiguous();
    let (qc, kc, vc) = (prep(q)?, prep(k)?, prep(v)?);
    let (out, lse) = match compute {
        DType::F64 => forward::<f64>(&qc, &kc, &vc, causal)?,
        _ => forward::<f32>(&qc, &kc, &vc, causal)?,
    };
    let out_t = out.to_dtype(dtype)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out_t);
    }
    q.apply_op3(
        k,
        v,
        FlashOp {
            out: Stored::new(out_t, "sd-lora-flash-attention"),
            lse,
            causal,
        },
    )
}

/// A contiguous CPU tensor's data, borrowed from its storage (`s, l` from
/// `storage_and_layout`, held by the caller).
fn data<'a, T: Elem>(s: &'a Storage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let Storage::Cpu(c) = s else {
        candle_core::bail!("flash attention: not a CPU tensor");
    };
    let all =
        T::slice(c).ok_or_else(|| candle_core::Error::Msg("flash attention: dtype".into()))?;
    let start = l.start_offset();
    Ok(&all[start..start + l.shape().elem_count()])
}

/// `dst (rows x cols, row stride dst_rs) [+]= lhs · rhs`, each given by (pointer, row stride,
/// column stride).
#[allow(clippy::too_many_arguments)]
#[inline]
fn mm<T: 'static + Float>(
    rows: usize,
    cols: usize,
    inner: usize,
    dst: &mut [T],
    dst_rs: usize,
    acc: bool,
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
) {
    if rows == 0 || cols == 0 {
        return;
    }
    debug_assert!(dst.len() >= (rows - 1) * dst_rs + cols);
    // SAFETY: every index the product touches lies inside the slices (checked by the callers'
    // tile bounds; debug-asserted above for the destination).
    unsafe {
        gemm::gemm(
            rows,
            cols,
            inner,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The masked score of query row `i`, key `j`.
#[inline]
fn masked<T: Float>(s: T, i: usize, j: usize, causal: bool) -> T {
    if causal && j > i {
        T::neg_infinity()
    } else {
        s
    }
}

fn forward<T>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
) -> candle_core::Result<(Tensor, Tensor)>
where
    T: Elem<C = T> + Float + candle_core::WithDType + std::ops::MulAssign,
{
    let (bh, n, d) = q.dims3()?;
    let (_, m, dv) = v.dims3()?;
    let (qs, ks, vs) = (
        q.storage_and_layout(),
        k.storage_and_layout(),
        v.storage_and_layout(),
    );
    let (qd, kd, vd) = (
        data::<T>(&qs.0, qs.1)?,
        data::<T>(&ks.0, ks.1)?,
        data::<T>(&vs.0, vs.1)?,
    );
    let mut out = vec![T::zero(); bh * n * dv];
    let mut lse = vec![T::zero(); bh * n];
    out.par_chunks_mut(n * dv)
        .zip(lse.par_chunks_mut(n))
        .enumerate()
        .for_each(|(b, (out_b, lse_b))| {
            let (qb, kb, vb) = (
                &qd[b * n * d..(b + 1) * n * d],
                &kd[b * m * d..(b + 1) * m * d],
                &vd[b * m * dv..(b + 1) * m * dv],
            );
            out_b
                .par_chunks_mut(BR * dv)
                .zip(lse_b.par_chunks_mut(BR))
                .enumerate()
                .for_each(|(t, (acc, lse_t))| {
                    let r0 = t * BR;
                    let nr = lse_t.len();
                    let mut s = vec![T::zero(); nr * BC];
                    let mut raw = [T::zero(); BC];
                    let mut mrow = vec![T::neg_infinity(); nr];
                    let mut lrow = vec![T::zero(); nr];
                    acc.fill(T::zero());
                    let last = if causal { (r0 + nr).min(m) } else { m };
                    let mut c0 = 0;
                    while c0 < last {
                        let nc = BC.min(last - c0);
                        mm(
                            nr,
                            nc,
                            d,
                            &mut s,
                            nc,
                            false,
                            (&qb[r0 * d..], d, 1),
                            (&kb[c0 * d..], 1, d),
                        );
                        for i in 0..nr {
                            let row = &mut s[i * nc..(i + 1) * nc];
                            if causal {
                                for (j, x) in row.iter_mut().enumerate() {
                                    *x = masked(*x, r0 + i, c0 + j, causal);
                                }
                            }
                            let mx = row.iter().fold(mrow[i], |a, &x| Float::max(a, x));
                            let keep = if mrow[i] == T::neg_infinity() {
                                T::zero()
                            } else {
                                T::exp_c(mrow[i] - mx)
                            };
                            raw[..nc].copy_from_slice(row);
                            T::exp_sub_c(row, &raw[..nc], mx);
                            lrow[i] = lrow[i] * keep + row.iter().fold(T::zero(), |a, &x| a + x);
                            for o in &mut acc[i * dv..(i + 1) * dv] {
                                *o *= keep;
                            }
                            mrow[i] = mx;
                        }
                        mm(
                            nr,
                            dv,
                            nc,
                            acc,
                            dv,
                            true,
                            (&s, nc, 1),
                            (&vb[c0 * dv..], dv, 1),
                        );
                        c0 += nc;
                    }
                    for i in 0..nr {
                        let inv = T::one() / lrow[i];
                        for o in &mut acc[i * dv..(i + 1) * dv] {
                            *o *= inv;
                        }
                        lse_t[i] = mrow[i] + lrow[i].ln();
                    }
                });
        });
    let dev = q.device();
    Ok((
        Tensor::from_vec(out, (bh, n, dv), dev)?,
        Tensor::from_vec(lse, (bh, n), dev)?,
    ))
}

/// Gradients of `q`, `k`, `v` given the output `o`, its row log-sum-exp and `g = dL/do`.
fn backward<T>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    causal: bool,
) -> candle_core::Result<(Tensor, Tensor, Tensor)>
where
    T: Elem<C = T> + Float + candle_core::WithDType + std::ops::MulAssign,
{
    let (bh, n, d) = q.dims3()?;
    let (_, m, dv) = v.dims3()?;
    let (qs, ks, vs) = (
        q.storage_and_layout(),
        k.storage_and_layout(),
        v.storage_and_layout(),
    );
    let (os, ls, gs) = (
        o.storage_and_layout(),
        lse.storage_and_layout(),
        g.storage_and_layout(),
    );
    let (qd, kd, vd) = (
        data::<T>(&qs.0, qs.1)?,
        data::<T>(&ks.0, ks.1)?,
        data::<T>(&vs.0, vs.1)?,
    );
    let (od, ld, gd) = (
        data::<T>(&os.0, os.1)?,
        data::<T>(&ls.0, ls.1)?,
        data::<T>(&gs.0, gs.1)?,
    );
    let mut dq = vec![T::zero(); bh * n * d];
    let mut dk = vec![T::zero(); bh * m * d];
    let mut dvv = vec![T::zero(); bh * m * dv];
    dq.par_chunks_mut(n * d)
        .zip(dk.par_chunks_mut(m * d))
        .zip(dvv.par_chunks_mut(m * dv))
        .enumerate()
        .for_each(|(b, ((dq_b, dk_b), dv_b))| {
            let qb = &qd[b * n * d..(b + 1) * n * d];
            let kb = &kd[b * m * d..(b + 1) * m * d];
            let vb = &vd[b * m * dv..(b + 1) * m * dv];
            let gb = &gd[b * n * dv..(b + 1) * n * dv];
            let ob = &od[b * n * dv..(b + 1) * n * dv];
            let lb = &ld[b * n..(b + 1) * n];
            // D_i = sum_j dO_ij O_ij
            let drow: Vec<T> = (0..n)
                .map(|i| (0..dv).fold(T::zero(), |a, c| a + gb[i * dv + c] * ob[i * dv + c]))
                .collect();
            let mut p = vec![T::zero(); BR * BC];
            let mut dp = vec![T::zero(); BR * BC];
            let mut raw = [T::zero(); BC];
            let mut c0 = 0;
            while c0 < m {
                let nc = BC.min(m - c0);
                let mut r0 = if causal { c0 - c0 % BR } else { 0 };
                while r0 < n {
                    let nr = BR.min(n - r0);
                    mm(
                        nr,
                        nc,
                        d,
                        &mut p,
                        nc,
                        false,
                        (&qb[r0 * d..], d, 1),
                        (&kb[c0 * d..], 1, d),
                    );
                    for i in 0..nr {
                        let row = &mut p[i * nc..(i + 1) * nc];
                        if causal {
                            for (j, x) in row.iter_mut().enumerate() {
                                *x = masked(*x, r0 + i, c0 + j, causal);
                            }
                        }
                        raw[..nc].copy_from_slice(row);
                        T::exp_sub_c(row, &raw[..nc], lb[r0 + i]);
                    }
                    // dV += Pᵀ dO
                    mm(
                        nc,
                        dv,
                        nr,
                        &mut dv_b[c0 * dv..],
                        dv,
                        true,
                        (&p, 1, nc),
                        (&gb[r0 * dv..], dv, 1),
                    );
                    // dP = dO Vᵀ, then dS = P (dP - D)
                    mm(
                        nr,
                        nc,
                        dv,
                        &mut dp,
                        nc,
                        false,
                        (&gb[r0 * dv..], dv, 1),
                        (&vb[c0 * dv..], 1, dv),
                    );
                    for i in 0..nr {
                        let di = drow[r0 + i];
                        for j in 0..nc {
                            let x = i * nc + j;
                            dp[x] = p[x] * (dp[x] - di);
                        }
                    }
                    // dQ += dS K, dK += dSᵀ Q
                    mm(
                        nr,
                        d,
                        nc,
                        &mut dq_b[r0 * d..],
                        d,
                        true,
                        (&dp, nc, 1),
                        (&kb[c0 * d..], d, 1),
                    );
                    mm(
                        nc,
                        d,
                        nr,
                        &mut dk_b[c0 * d..],
                        d,
                        true,
                        (&dp, 1, nc),
                        (&qb[r0 * d..], d, 1),
                    );
                    r0 += nr;
                }
                c0 += nc;
            }
        });
    let dev = q.device();
    Ok((
        Tensor::from_vec(dq, (bh, n, d), dev)?,
        Tensor::from_vec(dk, (bh, m, d), dev)?,
        Tensor::from_vec(dvv, (bh, m, dv), dev)?,
    ))
}

/// The graph node: the forward hands back the output computed by [`forward`], the backward
/// runs [`backward`].
struct FlashOp {
    /// The output until the node takes it (the backward reads the node's own copy).
    out: Stored,
    lse: Tensor,
    causal: bool,
}

impl CustomOp3 for FlashOp {
    fn name(&self) -> &'static str {
        "sd-lora-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = self.lse.dtype();
        let prep = |t: &Tensor| t.detach().to_dtype(c)?.contiguous();
        let (qc, kc, vc, gc, oc) = (prep(q)?, prep(k)?, prep(v)?, prep(grad)?, prep(res)?);
        let (dq, dk, dv) = match c {
            DType::F64 => backward::<f64>(&qc, &kc, &vc, &oc, &self.lse, &gc, self.causal)?,
            _ => backward::<f32>(&qc, &kc, &vc, &oc, &self.lse, &gc, self.causal)?,
        };
        Ok((
            Some(dq.to_dtype(q.dtype())?),
            Some(dk.to_dtype(k.dtype())?),
            Some(dv.to_dtype(v.dtype())?),
        ))
    }
}
