//! Linear maps and convolutions with FROZEN weights whose backward computes only the input
//! gradient.
//!
//! candle's `Matmul`/`Conv2D` backward always computes the gradient of both operands, also of a
//! weight nobody trains, and computes a convolution's input gradient with `conv_transpose2d`,
//! which on the CPU is a direct loop far slower than the im2col `conv2d`. In LoRA training every
//! base weight is frozen, so these ops record a custom backward that computes only `dL/dx`, the
//! convolution one as an ordinary `conv2d` with the flipped, transposed kernel over the
//! (zero-dilated for stride > 1) output gradient.
//!
//! The plain candle op is used when no gradient is needed (input not tracked), when the weight
//! itself is trainable (full fine-tuning), and on non-CPU devices.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Storage, Tensor};

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

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "sd-lora-frozen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        into_storage(&add_bias(
            cpu_tensor(s, l)?.matmul(&self.w.t()?)?,
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
        return add_bias(x.matmul(&w.t()?)?, b, 1);
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
        let y = cpu_tensor(s, l)?.conv2d(&self.w, self.padding, self.stride, 1, 1)?;
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

/// Reverses dimension `dim`.
fn flip(t: &Tensor, dim: usize) -> CResult<Tensor> {
    let n = t.dim(dim)?;
    let idx = Tensor::from_vec((0..n as u32).rev().collect::<Vec<_>>(), n, t.device())?;
    t.index_select(&idx, dim)
}

/// Inserts `s - 1` zeros between neighbouring elements along dims 2 and 3.
fn dilate(g: &Tensor, s: usize) -> CResult<Tensor> {
    if s == 1 {
        return Ok(g.clone());
    }
    let (b, c, h, w) = g.dims4()?;
    let g = g.reshape((b, c, h, 1, w, 1))?;
    let g = Tensor::cat(
        &[
            &g,
            &Tensor::zeros((b, c, h, s - 1, w, 1), g.dtype(), g.device())?,
        ],
        3,
    )?;
    let g = Tensor::cat(
        &[
            &g,
            &Tensor::zeros((b, c, h, s, w, s - 1), g.dtype(), g.device())?,
        ],
        5,
    )?;
    g.reshape((b, c, h * s, w * s))?
        .narrow(2, 0, (h - 1) * s + 1)?
        .narrow(3, 0, (w - 1) * s + 1)
}

/// `dL/dx` of `y = conv2d(x, w, padding, stride)` as a plain convolution of the output gradient.
pub fn conv2d_input_grad(
    g: &Tensor,
    w: &Tensor,
    ih: usize,
    iw: usize,
    padding: usize,
    stride: usize,
) -> CResult<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    if padding + 1 > kh.min(kw) {
        // negative implicit padding; never the case for SD's convolutions
        let (_, _, oh, _) = g.dims4()?;
        let out_padding = ih + 2 * padding - kh - (oh - 1) * stride;
        return g.conv_transpose2d(w, padding, out_padding, stride, 1);
    }
    let wt = flip(&flip(w, 2)?, 3)?.transpose(0, 1)?.contiguous()?;
    let gd = dilate(g, stride)?;
    let (ph, pw) = (kh - 1 - padding, kw - 1 - padding);
    let extra_h = (ih + 2 * padding - kh) % stride;
    let extra_w = (iw + 2 * padding - kw) % stride;
    if extra_h == 0 && extra_w == 0 && ph == pw {
        return gd.conv2d(&wt, ph, 1, 1, 1);
    }
    let gp = gd
        .pad_with_zeros(2, ph, ph + extra_h)?
        .pad_with_zeros(3, pw, pw + extra_w)?;
    gp.conv2d(&wt, 0, 1, 1, 1)
}

/// `conv2d(x, w) + b`; the backward skips `dL/dw` and `dL/db` when they are frozen.
pub fn frozen_conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> CResult<Tensor> {
    let b_tracked = b.is_some_and(|b| b.track_op());
    if !x.track_op() || w.track_op() || b_tracked || !x.device().is_cpu() {
        return add_bias(x.conv2d(w, padding, stride, 1, 1)?, b, 1);
    }
    x.contiguous()?.apply_op1(FrozenConv {
        w: w.clone(),
        b: b.cloned(),
        padding,
        stride,
    })
}
