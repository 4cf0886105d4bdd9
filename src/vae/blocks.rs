//! The VAE's encoder and decoder (diffusers' `vae.py`): down/up blocks of resnets without time
//! conditioning, and a mid block with one single-head spatial self-attention.

use anyhow::Result;
use candle_core::Tensor;

use super::config::VaeConfig;
use crate::lora::LoraLinear;
use crate::nn::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::nn::{Conv2d, GroupNorm};
use crate::ops;
use crate::weights::WeightSource;

const EPS: f64 = 1e-6;

/// Spatial self-attention with a group norm and a residual (diffusers' `Attention` as built for
/// the VAE's mid block; old checkpoints name the projections `query/key/value/proj_attn`).
#[derive(Debug, Clone)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
}

impl VaeAttention {
    fn load(ws: &WeightSource, ch: usize, groups: usize) -> Result<Self> {
        let legacy = !ws.contains("to_q.weight") && ws.contains("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        let lin = |n: &str| LoraLinear::load(&ws.pp(n), ch, ch, true, false);
        Ok(Self {
            group_norm: GroupNorm::load(&ws.pp("group_norm"), groups, ch, EPS)?,
            to_q: lin(name("to_q", "query"))?,
            to_k: lin(name("to_k", "key"))?,
            to_v: lin(name("to_v", "value"))?,
            to_out: lin(name("to_out.0", "proj_attn"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let q = (self.to_q.forward(&t)? * (c as f64).powf(-0.5))?;
        let k = self.to_k.forward(&t)?;
        let v = self.to_v.forward(&t)?;
        let attn = if q.device().is_cpu() && ops::fused_attention() {
            ops::flash_attention(&q, &k, &v, false)?
        } else {
            ops::softmax_last_dim(&q.matmul(&k.t()?)?)?.matmul(&v)?
        };
        let o = self.to_out.forward(&attn)?;
        Ok((o.transpose(1, 2)?.reshape((b, c, h, w))? + x)?)
    }
}

/// `resnets.0 -> attentions.0 -> resnets.1` without time embedding.
#[derive(Debug, Clone)]
pub struct VaeMidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<VaeAttention>,
}

impl VaeMidBlock {
    fn load(ws: &WeightSource, ch: usize, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let r = |i: usize| {
            ResnetBlock2D::load(&ws.pp(format!("resnets.{i}")), ch, ch, None, g, EPS, 1.0)
        };
        Ok(Self {
            resnets: vec![r(0)?, r(1)?],
            attention: if cfg.mid_block_add_attention {
                Some(VaeAttention::load(&ws.pp("attentions.0"), ch, g)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

#[derive(Debug, Clone)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

/// Image `[B, 3, H, W]` in [-1, 1] -> `2 x latent_channels` moments at `H/f x W/f`.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<EncoderBlock>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn load(ws: &WeightSource, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut down_blocks = Vec::new();
        for (i, &out) in ch.iter().enumerate() {
            let b = ws.pp(format!("down_blocks.{i}"));
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block {
                let cin = if j == 0 { ch[i.saturating_sub(1)] } else { out };
                resnets.push(ResnetBlock2D::load(
                    &b.pp(format!("resnets.{j}")),
                    cin,
                    out,
                    None,
                    g,
                    EPS,
                    1.0,
                )?);
            }
            let downsampler = if i + 1 < ch.len() {
                Some(Downsample2D::load(&b.pp("downsamplers.0"), out, 0)?)
            } else {
                None
            };
            down_blocks.push(EncoderBlock {
                resnets,
                downsampler,
            });
        }
        let last = ch[ch.len() - 1];
        Ok(Self {
            conv_in: Conv2d::load(&ws.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMidBlock::load(&ws.pp("mid_block"), last, cfg)?,
            conv_norm_out: GroupNorm::load(&ws.pp("conv_norm_out"), g, last, EPS)?,
            conv_out: Conv2d::load(&ws.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            for r in &b.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = &b.downsampler {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid_block.forward(&h)?;
        self.conv_out
            .forward(&ops::silu(&self.conv_norm_out.forward(&h)?)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

/// Latents `[B, latent_channels, h, w]` -> image `[B, 3, h·f, w·f]` (about [-1, 1]).
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<DecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn load(ws: &WeightSource, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let n = ch.len();
        let mut up_blocks = Vec::new();
        let mut out = ch[n - 1];
        for i in 0..n {
            let prev = out;
            out = ch[n - 1 - i];
            let b = ws.pp(format!("up_blocks.{i}"));
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block + 1 {
                let cin = if j == 0 { prev } else { out };
                resnets.push(ResnetBlock2D::load(
                    &b.pp(format!("resnets.{j}")),
                    cin,
                    out,
                    None,
                    g,
                    EPS,
                    1.0,
                )?);
            }
            let upsampler = if i + 1 < n {
                Some(Upsample2D::load(&b.pp("upsamplers.0"), out)?)
            } else {
                None
            };
            up_blocks.push(DecoderBlock { resnets, upsampler });
        }
        Ok(Self {
            conv_in: Conv2d::load(&ws.pp("conv_in"), cfg.latent_channels, ch[n - 1], 3, 1, 1)?,
            mid_block: VaeMidBlock::load(&ws.pp("mid_block"), ch[n - 1], cfg)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&ws.pp("conv_norm_out"), g, ch[0], EPS)?,
            conv_out: Conv2d::load(&ws.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for b in &self.up_blocks {
            for r in &b.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = &b.upsampler {
                h = u.forward(&h, None)?;
            }
        }
        self.conv_out
            .forward(&ops::silu(&self.conv_norm_out.forward(&h)?)?)
    }
}
