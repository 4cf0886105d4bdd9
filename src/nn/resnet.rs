//! `ResnetBlock2D`, `Downsample2D` and `Upsample2D` (diffusers' `resnet.py`,
//! `downsampling.py`, `upsampling.py`).

use anyhow::Result;
use candle_core::Tensor;

use super::{upsample_nearest, Conv2d, GroupNorm};
use crate::lora::LoraLinear;
use crate::ops;
use crate::weights::WeightSource;

/// `norm1 -> SiLU -> conv1 (+ time_emb_proj(SiLU(temb))) -> norm2 -> SiLU -> conv2`, plus the
/// (1x1-projected when channels change) input, divided by `output_scale_factor`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    /// Absent in the VAE's blocks (no time conditioning).
    pub time_emb_proj: Option<LoraLinear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn load(
        ws: &WeightSource,
        cin: usize,
        cout: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(&ws.pp("norm1"), groups, cin, eps)?,
            conv1: Conv2d::load(&ws.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: match temb {
                Some(t) => Some(LoraLinear::load(
                    &ws.pp("time_emb_proj"),
                    t,
                    cout,
                    true,
                    false,
                )?),
                None => None,
            },
            norm2: GroupNorm::load(&ws.pp("norm2"), groups, cout, eps)?,
            conv2: Conv2d::load(&ws.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::load(&ws.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            output_scale_factor,
        })
    }

    /// `x [B, Cin, H, W]`, `temb [B, T]` (the time embedding before its SiLU; `None` for the
    /// VAE).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&ops::silu(&self.norm1.forward(x)?)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(p), Some(temb)) => {
                let t = p.forward(&ops::silu(temb)?)?;
                h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?
            }
            (None, None) => h,
            _ => {
                anyhow::bail!("resnet block: time embedding given without projection or vice versa")
            }
        };
        let h = self.conv2.forward(&ops::silu(&self.norm2.forward(&h)?)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale_factor != 1.0 {
            Ok((out / self.output_scale_factor)?)
        } else {
            Ok(out)
        }
    }
}

/// Stride-2 3x3 convolution (`downsamplers.0.conv`); with `padding = 0` diffusers pads the
/// right and bottom by one first.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    pub conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn load(ws: &WeightSource, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&ws.pp("conv"), channels, channels, 3, 2, padding)?,
            pad_right_bottom: padding == 0,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest 2x up-sampling (or to the skip connection's size) then a 3x3 convolution
/// (`upsamplers.0.conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn load(ws: &WeightSource, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&ws.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&upsample_nearest(x, th, tw)?)
    }
}
