//! Convolution gradients as GEMMs, the way PyTorch computes them on the CPU:
//! - input: `cols = Wᵀ · g` (`[Cin·kh·kw, B·OH·OW]`), then col2im adds every column entry back
//!   to the input pixel it was read from (no kernel flip or weight copy);
//! - weight (full fine-tuning): im2col of the input, then `dW = g · colsᵀ`.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{run_kernel, CResult, Elem, Kernel};

#[derive(Clone, Copy)]
struct Geometry {
    b: usize,
    cin: usize,
    kh: usize,
    kw: usize,
    ih: usize,
    iw: usize,
    oh: usize,
    ow: usize,
    padding: usize,
    stride: usize,
    /// The band of output rows im2col builds columns for: `oy0 .. oy0 + rows` (all by default).
    oy0: usize,
    rows: usize,
}

impl Geometry {
    /// Input `[b, cin, ih, iw]`, kernel `[kh, kw]`, output `[oh, ow]`.
    fn new(x: [usize; 4], k: [usize; 2], o: [usize; 2], padding: usize, stride: usize) -> Self {
        let [b, cin, ih, iw] = x;
        Self {
            b,
            cin,
            kh: k[0],
            kw: k[1],
            ih,
            iw,
            oh: o[0],
            ow: o[1],
            padding,
            stride,
            oy0: 0,
            rows: o[0],
        }
    }
}

struct Col2Im(Geometry);

/// `cols` is `[cin, kh, kw, b, oh, ow]`; the result `[b, cin, ih, iw]`.
fn col2im<T: Elem>(cols: &[T], g: Geometry) -> Vec<T> {
    let zero = <T::C as num_traits::Zero>::zero();
    let plane = g.ih * g.iw;
    let mut acc = vec![zero; g.b * g.cin * plane];
    // one task per input channel: each writes its own planes only
    let per_c: Vec<Vec<T::C>> = (0..g.cin)
        .into_par_iter()
        .map(|c| {
            let mut out = vec![zero; g.b * plane];
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let row = ((c * g.kh + i) * g.kw + j) * g.b * g.oh * g.ow;
                    for bi in 0..g.b {
                        let src = &cols[row + bi * g.oh * g.ow..row + (bi + 1) * g.oh * g.ow];
                        let dst = &mut out[bi * plane..(bi + 1) * plane];
                        for oy in 0..g.oh {
                            let y = (oy * g.stride + i) as isize - g.padding as isize;
                            if y < 0 || y >= g.ih as isize {
                                continue;
                            }
                            let drow = &mut dst[y as usize * g.iw..(y as usize + 1) * g.iw];
                            let srow = &src[oy * g.ow..(oy + 1) * g.ow];
                            for (ox, v) in srow.iter().enumerate() {
                                let x = (ox * g.stride + j) as isize - g.padding as isize;
                                if x >= 0 && x < g.iw as isize {
                                    drow[x as usize] = drow[x as usize] + v.to_c();
                                }
                            }
                        }
                    }
                }
            }
            out
        })
        .collect();
    for (c, planes) in per_c.into_iter().enumerate() {
        for bi in 0..g.b {
            let d = (bi * g.cin + c) * plane;
            acc[d..d + plane].copy_from_slice(&planes[bi * plane..(bi + 1) * plane]);
        }
    }
    acc.into_iter().map(T::from_c).collect()
}

struct Im2Col(Geometry);

/// `x` is `[b, cin, ih, iw]`; the result `[cin, kh, kw, b, oh, ow]` (zeros where the window
/// reads padding).
fn im2col<T: Elem>(x: &[T], g: Geometry) -> Vec<T> {
    let zero = T::from_c(<T::C as num_traits::Zero>::zero());
    let per_c = g.kh * g.kw * g.b * g.rows * g.ow;
    let mut out = vec![zero; g.cin * per_c];
    out.par_chunks_mut(per_c).enumerate().for_each(|(c, dst)| {
        for i in 0..g.kh {
            for j in 0..g.kw {
                for bi in 0..g.b {
                    let src =
                        &x[(bi * g.cin + c) * g.ih * g.iw..(bi * g.cin + c + 1) * g.ih * g.iw];
                    let base = ((i * g.kw + j) * g.b + bi) * g.rows * g.ow;
                    for r in 0..g.rows {
                        let oy = g.oy0 + r;
                        let y = (oy * g.stride + i) as isize - g.padding as isize;
                        if y < 0 || y >= g.ih as isize {
                            continue;
                        }
                        let srow = &src[y as usize * g.iw..(y as usize + 1) * g.iw];
                        let drow = &mut dst[base + r * g.ow..base + (r + 1) * g.ow];
                        for (ox, d) in drow.iter_mut().enumerate() {
                            let x = (ox * g.stride + j) as isize - g.padding as isize;
                            if x >= 0 && x < g.iw as isize {
                                *d = srow[x as usize];
                            }
                        }
                    }
                }
            }
        }
    });
    out
}

impl Kernel for Im2Col {
    fn run<T: Elem>(&self, x: &[&[T]]) -> Vec<T> {
        im2col(x[0], self.0)
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "sd-lora-im2col"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let g = self.0;
        let out = run_kernel(self, "im2col", &[(s, l)])?;
        Ok((out, Shape::from((g.cin * g.kh * g.kw, g.b * g.rows * g.ow))))
    }
}

/// `g = dL/dy` as `[cout, b·oh·ow]`.
fn grad_matrix(g: &Tensor) -> CResult<Tensor> {
    let (b, cout, oh, ow) = g.dims4()?;
    if b == 1 {
        g.reshape((cout, oh * ow))
    } else {
        g.transpose(0, 1)?
            .contiguous()?
            .reshape((cout, b * oh * ow))
    }
}

/// `dL/dw` of `y = conv2d(x, w, padding, stride)` for a kernel `[cout, cin, kh, kw]`, given
/// `g = dL/dy` (CPU).
pub fn conv2d_weight_grad(
    g: &Tensor,
    x: &Tensor,
    kh: usize,
    kw: usize,
    padding: usize,
    stride: usize,
) -> CResult<Tensor> {
    let (b, cout, oh, ow) = g.dims4()?;
    let (_, cin, ih, iw) = x.dims4()?;
    let geo = Geometry::new([b, cin, ih, iw], [kh, kw], [oh, ow], padding, stride);
    let cols = x.contiguous()?.apply_op1_no_bwd(&Im2Col(geo))?;
    grad_matrix(g)?
        .matmul(&cols.t()?)?
        .reshape((cout, cin, kh, kw))
}

/// `conv2d(x, w, padding, stride)` (no groups or dilation) as im2col + one GEMM, the layout
/// PyTorch's CPU convolution uses; candle's CPU `conv2d` copies tiles through closures and was
/// the largest single cost of a training step.
pub fn conv2d_im2col(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> CResult<Tensor> {
    let (b, cin, ih, iw) = x.dims4()?;
    let (cout, wc, kh, kw) = w.dims4()?;
    if wc != cin || ih + 2 * padding < kh || iw + 2 * padding < kw || stride == 0 {
        // let candle report the shape error
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let oh = (ih + 2 * padding - kh) / stride + 1;
    let ow = (iw + 2 * padding - kw) / stride + 1;
    let w2 = w.reshape((cout, cin * kh * kw))?;
    let y = if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        // a 1x1 convolution is a matmul over channels
        if b == 1 {
            w2.matmul(&x.reshape((cin, ih * iw))?)?
        } else {
            w2.broadcast_matmul(&x.reshape((b, cin, ih * iw))?)?
                .transpose(0, 1)?
        }
    } else {
        let geo = Geometry::new([b, cin, ih, iw], [kh, kw], [oh, ow], padding, stride);
        let x = x.contiguous()?;
        // columns of at most IM2COL_BYTES at a time: bands of output rows, one GEMM each (a
        // 3x3 convolution of 128 channels at 512 x 512 would otherwise build 1.2 GB of columns)
        let row_bytes = cin * kh * kw * b * ow * x.dtype().size_in_bytes();
        let band = (IM2COL_BYTES / row_bytes.max(1)).clamp(1, oh);
        if band >= oh {
            w2.matmul(&x.apply_op1_no_bwd(&Im2Col(geo))?)?
        } else {
            let mut parts = Vec::with_capacity(oh.div_ceil(band));
            let mut oy0 = 0;
            while oy0 < oh {
                let rows = band.min(oh - oy0);
                let cols = x.apply_op1_no_bwd(&Im2Col(Geometry { oy0, rows, ..geo }))?;
                parts.push(w2.matmul(&cols)?.reshape((cout, b, rows, ow))?);
                oy0 += rows;
            }
            return Tensor::cat(&parts, 2)?.transpose(0, 1)?.contiguous();
        }
    };
    y.reshape((cout, b, oh, ow))?.transpose(0, 1)?.contiguous()
}

/// The most bytes of im2col columns [`conv2d_im2col`] builds at once (64 MiB).
const IM2COL_BYTES: usize = 64 << 20;

impl Kernel for Col2Im {
    fn run<T: Elem>(&self, x: &[&[T]]) -> Vec<T> {
        col2im(x[0], self.0)
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "sd-lora-col2im"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let g = self.0;
        let out = run_kernel(self, "col2im", &[(s, l)])?;
        Ok((out, Shape::from((g.b, g.cin, g.ih, g.iw))))
    }
}

/// `dL/dx` of `y = conv2d(x, w, padding, stride)` for an input of size `ih x iw`, given
/// `g = dL/dy` (CPU).
pub fn conv2d_input_grad(
    g: &Tensor,
    w: &Tensor,
    ih: usize,
    iw: usize,
    padding: usize,
    stride: usize,
) -> CResult<Tensor> {
    let (b, cout, oh, ow) = g.dims4()?;
    let (_, cin, kh, kw) = w.dims4()?;
    let w2 = w.reshape((cout, cin * kh * kw))?;
    let g2 = grad_matrix(g)?;
    let cols = w2.t()?.matmul(&g2)?;
    let geo = Geometry::new([b, cin, ih, iw], [kh, kw], [oh, ow], padding, stride);
    cols.contiguous()?.apply_op1_no_bwd(&Col2Im(geo))
}
