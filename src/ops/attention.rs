//! Memory-efficient scaled dot-product attention with a hand-written backward.
//!
//! `softmax(q kᵀ) v` computed in chunks of queries: the forward keeps only the output and the
//! per-row log-sum-exp `L`; the backward recomputes each chunk's probabilities as
//! `P = exp(q kᵀ - L)` (FlashAttention's recurrence, at chunk granularity, written with candle
//! tensor ops so it runs on every device). The `[B·heads, N, M]` score matrix therefore never
//! exists as a whole: neither in the forward nor in what the autograd graph keeps. At SD 1.5's
//! 512 px (4096 latent tokens, 8 heads) that matrix is 512 MiB per image in f32 per attention
//! layer, and a naive training step keeps two of them per layer for the backward.
//!
//! Scores and softmax statistics are computed in f32 (f64 for f64 inputs); the matmuls run in
//! the input dtype (bf16/f16 on GPUs).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::stored::Stored;

/// Default of [`attention_chunk_bytes`] on GPUs: 256 MiB (fewer, larger kernels).
pub const ATTENTION_CHUNK_BYTES: usize = 256 << 20;
/// Default of [`attention_chunk_bytes`] on the CPU: 4 MiB. Chunks of this size ran as fast as
/// whole score matrices on the 2-core machine (the tiny training step: 0.91-1.10 s vs
/// 1.03-1.09 s) with a third of the peak memory (283 vs 1,030 MiB); BENCHMARKS.md, issue 9.
pub const ATTENTION_CHUNK_BYTES_CPU: usize = 4 << 20;

/// 0 = the per-device default.
static CHUNK_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The most bytes of f32 attention scores the UNet materialises at once on `device`: attention
/// layers whose whole `[B·heads, N, M]` score matrix fits use the plain path, larger ones the
/// chunked [`attention`] with chunks of at most this size. Default
/// [`ATTENTION_CHUNK_BYTES_CPU`] on the CPU, [`ATTENTION_CHUNK_BYTES`] elsewhere, unless
/// [`set_attention_chunk_bytes`] chose a size.
pub fn attention_chunk_bytes(device: &candle_core::Device) -> usize {
    match CHUNK_BYTES.load(Ordering::Relaxed) {
        0 if device.is_cpu() => ATTENTION_CHUNK_BYTES_CPU,
        0 => ATTENTION_CHUNK_BYTES,
        b => b,
    }
}

/// Sets [`attention_chunk_bytes`] for every device in the whole process; 0 restores the
/// per-device defaults.
pub fn set_attention_chunk_bytes(bytes: usize) {
    CHUNK_BYTES.store(bytes, Ordering::Relaxed);
}

/// Query rows per chunk so that a `[bh, rows, m]` f32 block stays within `budget` bytes.
pub fn attention_chunk_rows(bh: usize, m: usize, budget: usize) -> usize {
    (budget / (bh * m * 4).max(1)).max(1)
}

/// `softmax(q kᵀ) v` for `q [BH, N, d]` (already scaled), `k [BH, M, d]`, `v [BH, M, dv]`,
/// in chunks of `chunk` query rows. Differentiable in `q`, `k` and `v`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, chunk: usize) -> candle_core::Result<Tensor> {
    let (bh, n, d) = q.dims3()?;
    let (bk, m, dk) = k.dims3()?;
    let (bv, mv, _) = v.dims3()?;
    if bk != bh || bv != bh || dk != d || mv != m {
        candle_core::bail!(
            "attention: shapes q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let chunk = chunk.clamp(1, n.max(1));
    let (out, lse) = forward(&q.detach(), &k.detach(), &v.detach(), chunk)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    q.apply_op3(
        k,
        v,
        AttentionOp {
            out: Stored::new(out, "sd-lora-chunked-attention"),
            lse,
            chunk,
        },
    )
}

/// The dtype of scores and softmax statistics: f64 for f64 inputs, else f32.
fn stat_dtype(t: &Tensor) -> DType {
    if t.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Output `[BH, N, dv]` and row log-sum-exp `[BH, N, 1]` (f32, or f64), chunk by chunk.
fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    chunk: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let n = q.dim(1)?;
    let f = stat_dtype(q);
    let kt = k.t()?;
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let s = q.narrow(1, start, len)?.matmul(&kt)?.to_dtype(f)?;
        let lse = super::logsumexp_rows(&s)?;
        let p = super::exp_sub_rows(&s, &lse)?.to_dtype(v.dtype())?;
        outs.push(p.matmul(v)?);
        lses.push(lse);
        start += len;
    }
    Ok((Tensor::cat(&outs, 1)?, Tensor::cat(&lses, 1)?))
}

/// The graph node: its forward hands back the output computed by [`forward`]; its backward
/// recomputes the probabilities chunk by chunk.
struct AttentionOp {
    /// The output until the node takes it (the backward reads the node's copy, `res`).
    out: Stored,
    lse: Tensor,
    chunk: usize,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "sd-lora-chunked-attention"
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, grad) = (q.detach(), k.detach(), v.detach(), grad.detach());
        let n = q.dim(1)?;
        let f = stat_dtype(&q);
        let kt = k.t()?;
        let vt = v.t()?;
        // D_i = sum_j dO_ij O_ij = sum_j P_ij dP_ij
        let rows = (grad.to_dtype(f)? * res.to_dtype(f)?)?.sum_keepdim(D::Minus1)?;
        let mut dq = Vec::new();
        let mut dk = Tensor::zeros(k.dims(), f, k.device())?;
        let mut dv = Tensor::zeros(v.dims(), f, v.device())?;
        let mut start = 0;
        while start < n {
            let len = self.chunk.min(n - start);
            let qc = q.narrow(1, start, len)?;
            let go = grad.narrow(1, start, len)?;
            let s = qc.matmul(&kt)?.to_dtype(f)?;
            let p = super::exp_sub_rows(&s, &self.lse.narrow(1, start, len)?)?;
            let pl = p.to_dtype(v.dtype())?;
            dv = (dv + pl.t()?.matmul(&go)?.to_dtype(f)?)?;
            let dp = go.matmul(&vt)?.to_dtype(f)?;
            let ds =
                super::mul_sub_rows(&p, &dp, &rows.narrow(1, start, len)?)?.to_dtype(q.dtype())?;
            dq.push(ds.matmul(&k)?);
            dk = (dk + ds.t()?.matmul(&qc)?.to_dtype(f)?)?;
            start += len;
        }
        Ok((
            Some(Tensor::cat(&dq, 1)?),
            Some(dk.to_dtype(k.dtype())?),
            Some(dv.to_dtype(v.dtype())?),
        ))
    }
}
