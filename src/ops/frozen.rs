//! Linear maps and convolutions with FROZEN weights whose backward computes only the input
//! gradient.
//!
//! candle's `Matmul`/`Conv2D` backward always computes the gradient of both operands, also of a
//! weight nobody trains, and computes a convolution's input gradient with `conv_transpose2d`,
//! which on the CPU is a direct loop far slower than the im2col `conv2d`. In LoRA training every
//! base weight is frozen, so these ops record a custom backward that computes only `dL/dx`, the
//! convolution one as a GEMM plus col2im (see [`conv2d_input_grad`]).
//!
//! The plain candle op is used when no gradient is needed (input not tracked), when the weight
//! itself is trainable (full fine-tuning), and on non-CPU devices.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Device, Layout, Shape, Storage, Tensor};

use super::col2im::{conv2d_im2col, conv2d_input_grad, conv2d_weight_grad};
use super::cpu::CResult;

/// Copies a contiguous CPU storage region into a tensor (a memcpy; the compute dominates).
fn cpu_tensor(s: &CpuStorage, l: &Layout) -> CResult<Tensor> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op: "frozen" })?;
    let dev = Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev),
        CpuStorage::F64(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev),
        CpuStorage::F16(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev),
        _ => candle_core::bail!("frozen op: unsupported dtype"),
    }
}

/// The storage of a CPU tensor (copied out of the tensor).
fn into_storage(t: &Tensor) -> CResult<(CpuStorage, Shape)> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*st else {
        candle_core::bail!("frozen op: expected a CPU tensor")
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op: "frozen" })?;
    let out = match cs {
        CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[a..b].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
        _ => candle_core::bail!("frozen op: unsupported dtype"),
    };
    Ok((out, l.shape().clone()))
}

struct FrozenLinear {
    w: Tensor,
    b: Option<Tensor>,
}

fn add_bias(y: Tensor, b: Option<&Tensor>, channel_dim: usize) -> CResult<Tensor> {
    match b {
        None => Ok(y),
        Some(b) => {
            let mut shape = vec![1usize; y.rank()];
            shape[channel_dim] = b.elem_count();
            y.broadcast_add(&b.reshape(shape)?)
        }
    }
}

/// Whether [`matmul_wt`] multiplies the other way round for `x [m, k]` and `w [n, k]`: for a
/// weight at least 128 outputs wide, with at most 32 rows, or at most 128 rows when the layer
/// does not widen (`n <= k`). Measured on the 2-core AVX-512 machine (BENCHMARKS.md): swapped /
/// plain time 0.39-0.77 at 8-32 rows for SD 1.5 widths, 0.37-0.92 at 64-128 rows when `n <= k`,
/// but 0.96-1.54 at 64-128 rows for the widening feed-forward projections, 1.7-3.1 from 512
/// rows up, and 1.9-3.1 for rank-16 LoRA factors (a 16-wide weight has nothing to repack).
fn swap_pays(m: usize, k: usize, n: usize) -> bool {
    n >= 128 && (m <= 32 || (m <= 128 && n <= k))
}

/// `x [M, K] @ w^T` for `w [N, K]`. On the CPU with few rows (time embeddings, CLIP's 77 tokens,
/// the 8x8-and-smaller levels of SD 1.5, most layers at generation's small latents; see
/// [`swap_pays`]) as `(w @ x^T)^T`: the `gemm` crate repacks a row-major right-hand `w^T` on
/// every call, a full copy of the weight for a product that reads it once, while in the swapped
/// product `w` is the column-major left operand it uses in place and only the small `x` is
/// packed. Same values up to the order of summation.
pub(crate) fn matmul_wt(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    let swap = x.device().is_cpu()
        && x.rank() == 2
        && w.rank() == 2
        && swap_pays(x.dim(0)?, x.dim(1)?, w.dim(0)?);
    if swap {
        w.matmul(&x.t()?)?.t()?.contiguous()
    } else {
        x.matmul(&w.t()?)
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "sd-lora-frozen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        into_storage(&add_bias(
            matmul_wt(&cpu_tensor(s, l)?, &self.w)?,
            self.b.as_ref(),
            1,
        )?)
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(g.matmul(&self.w)?))
    }
}

/// `x [M, K] @ w^T + b` for `w [N, K]`, `b [N]`; the backward skips `dL/dw` and `dL/db` when
/// they are frozen.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> CResult<Tensor> {
    let b_tracked = b.is_some_and(|b| b.track_op());
    if !x.track_op() || w.track_op() || b_tracked || !x.device().is_cpu() {
        return add_bias(matmul_wt(x, w)?, b, 1);
    }
    x.contiguous()?.apply_op1(FrozenLinear {
        w: w.clone(),
        b: b.cloned(),
    })
}

struct FrozenConv {
    w: Tensor,
    b: Option<Tensor>,
    padding: usize,
    stride: usize,
}

impl CustomOp1 for FrozenConv {
    fn name(&self) -> &'static str {
        "sd-lora-frozen-conv2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let y = conv2d_im2col(&cpu_tensor(s, l)?, &self.w, self.padding, self.stride)?;
        into_storage(&add_bias(y, self.b.as_ref(), 1)?)
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        let (_, _, ih, iw) = x.dims4()?;
        Ok(Some(conv2d_input_grad(
            g,
            &self.w,
            ih,
            iw,
            self.padding,
            self.stride,
        )?))
    }
}

/// A convolution whose weight is trained (full fine-tuning): both gradients as GEMMs
/// (col2im for the input, im2col for the weight) instead of candle's direct loops.
struct TrainableConv {
    padding: usize,
    stride: usize,
}

impl CustomOp2 for TrainableConv {
    fn name(&self) -> &'static str {
        "sd-lora-trainable-conv2d"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let y = conv2d_im2col(
            &cpu_tensor(s1, l1)?,
            &cpu_tensor(s2, l2)?,
            self.padding,
            self.stride,
        )?;
        into_storage(&y)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, ih, iw) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let g = g.contiguous()?;
        let dx = if x.track_op() {
            Some(conv2d_input_grad(&g, w, ih, iw, self.padding, self.stride)?)
        } else {
            None
        };
        let dw = conv2d_weight_grad(&g, x, kh, kw, self.padding, self.stride)?;
        Ok((dx, Some(dw)))
    }
}

/// `conv2d(x, w) + b`. A frozen weight's backward computes only `dL/dx` (GEMM + col2im); a
/// trainable one's computes both gradients as GEMMs; no gradients at all: candle's conv2d.
pub fn frozen_conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> CResult<Tensor> {
    let b_tracked = b.is_some_and(|b| b.track_op());
    if !x.device().is_cpu() {
        return add_bias(x.conv2d(w, padding, stride, 1, 1)?, b, 1);
    }
    if !x.track_op() && !w.track_op() && !b_tracked {
        return add_bias(conv2d_im2col(x, w, padding, stride)?, b, 1);
    }
    if w.track_op() || b_tracked {
        let y = x
            .contiguous()?
            .apply_op2(&w.contiguous()?, TrainableConv { padding, stride })?;
        return add_bias(y, b, 1);
    }
    x.contiguous()?.apply_op1(FrozenConv {
        w: w.clone(),
        b: b.cloned(),
        padding,
        stride,
    })
}

#[cfg(test)]
mod tests {
    use super::super::cpu::test_util::max_abs_diff;
    use super::*;

    /// Both sides of the swap rule give `x @ w^T` (f64: to rounding; the swapped product only
    /// changes the order of summation), for a widening, a narrowing and a LoRA-narrow layer.
    #[test]
    fn matmul_wt_matches_the_plain_product_on_both_sides_of_the_rule() {
        let dev = Device::Cpu;
        for (n, k) in [(160, 144), (144, 160), (16, 144)] {
            let w = Tensor::randn(0f64, 1.0, (n, k), &dev).unwrap();
            for m in [1, 3, 32, 33, 128, 129, 200] {
                let x = Tensor::randn(0f64, 1.0, (m, k), &dev).unwrap();
                let got = matmul_wt(&x, &w).unwrap();
                assert_eq!(got.dims(), &[m, n]);
                assert!(got.is_contiguous());
                let want = x.matmul(&w.t().unwrap()).unwrap();
                let diff = max_abs_diff(&got, &want);
                assert!(diff < 1e-12, "m = {m}, n = {n}, k = {k}: {diff}");
            }
        }
        assert!(swap_pays(32, 144, 160) && !swap_pays(33, 144, 160));
        assert!(swap_pays(128, 160, 144) && !swap_pays(129, 160, 144));
        assert!(!swap_pays(1, 144, 16));
    }
}
