//! The input gradient of a convolution as GEMM + col2im, the way PyTorch computes transposed
//! convolutions: `cols = Wᵀ · g` (`[Cin·kh·kw, B·OH·OW]`), then every column entry is added back
//! to the input pixel it was read from. No kernel flip or copy of the weight is needed.

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
    let g2 = if b == 1 {
        g.reshape((cout, oh * ow))?
    } else {
        g.transpose(0, 1)?
            .contiguous()?
            .reshape((cout, b * oh * ow))?
    };
    let cols = w2.t()?.matmul(&g2)?;
    let geo = Geometry {
        b,
        cin,
        kh,
        kw,
        ih,
        iw,
        oh,
        ow,
        padding,
        stride,
    };
    cols.contiguous()?.apply_op1_no_bwd(&Col2Im(geo))
}
