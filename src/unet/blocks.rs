//! Down, mid and up blocks (diffusers' `unet_2d_blocks.py`): `CrossAttnDownBlock2D` and
//! `DownBlock2D` share [`DownBlock`], `CrossAttnUpBlock2D` and `UpBlock2D` share [`UpBlock`]
//! (the plain variants simply have no attentions).

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::transformer_2d::{Transformer2DConfig, Transformer2DModel};
use crate::lora::LoraLinear;
use crate::nn::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::weights::WeightSource;

/// Shared hyper-parameters of the blocks at one level.
#[derive(Debug, Clone, Copy)]
pub struct BlockSpec {
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    pub heads: usize,
    pub transformer_layers: usize,
    pub context_dim: usize,
    pub linear_projection: bool,
}

fn load_attn(ws: &WeightSource, i: usize, ch: usize, s: &BlockSpec) -> Result<Transformer2DModel> {
    let cfg = Transformer2DConfig {
        channels: ch,
        heads: s.heads,
        layers: s.transformer_layers,
        context_dim: s.context_dim,
        groups: s.groups,
        linear_projection: s.linear_projection,
    };
    Transformer2DModel::load(&ws.pp(format!("attentions.{i}")), &cfg)
}

#[derive(Debug, Clone)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// Empty for `DownBlock2D`.
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Downsample2D>,
}

/// The shape of one [`DownBlock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownBlockShape {
    pub cin: usize,
    pub cout: usize,
    /// Resnets (and attentions, with `cross_attn`).
    pub layers: usize,
    pub cross_attn: bool,
    /// The downsampler's padding; None for the last level.
    pub downsample: Option<usize>,
}

impl DownBlock {
    pub fn load(ws: &WeightSource, shape: &DownBlockShape, s: &BlockSpec) -> Result<Self> {
        let DownBlockShape {
            cin,
            cout,
            layers,
            cross_attn,
            downsample,
        } = *shape;
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let c = if i == 0 { cin } else { cout };
            resnets.push(ResnetBlock2D::load(
                &ws.pp(format!("resnets.{i}")),
                c,
                cout,
                Some(s.temb),
                s.groups,
                s.eps,
                1.0,
            )?);
            if cross_attn {
                attentions.push(load_attn(ws, i, cout, s)?);
            }
        }
        let downsampler = match downsample {
            Some(padding) => Some(Downsample2D::load(&ws.pp("downsamplers.0"), cout, padding)?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the block output and the states it hands to the up path (one per resnet, plus
    /// the down-sampled output).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        ckpt: bool,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut states = Vec::new();
        for (i, r) in self.resnets.iter().enumerate() {
            h = resnet(r, &h, temb, ckpt)?;
            if let Some(a) = self.attentions.get(i) {
                h = attention(a, &h, ctx, ckpt)?;
            }
            states.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h)?;
            states.push(h.clone());
        }
        Ok((h, states))
    }
}

/// `resnets.0 -> attentions.0 -> resnets.1` (`UNetMidBlock2DCrossAttn`).
#[derive(Debug, Clone)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn load(ws: &WeightSource, ch: usize, scale: f64, s: &BlockSpec) -> Result<Self> {
        let r = |i: usize| {
            ResnetBlock2D::load(
                &ws.pp(format!("resnets.{i}")),
                ch,
                ch,
                Some(s.temb),
                s.groups,
                s.eps,
                scale,
            )
        };
        Ok(Self {
            resnets: vec![r(0)?, r(1)?],
            attentions: vec![load_attn(ws, 0, ch, s)?],
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &Tensor, ckpt: bool) -> Result<Tensor> {
        let h = resnet(&self.resnets[0], x, temb, ckpt)?;
        let h = attention(&self.attentions[0], &h, ctx, ckpt)?;
        resnet(&self.resnets[1], &h, temb, ckpt)
    }
}

#[derive(Debug, Clone)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// Empty for `UpBlock2D`.
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Upsample2D>,
}

/// The shape of one [`UpBlock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpBlockShape {
    /// Channels of the deepest skip connection this block consumes (diffusers' `in_channels`).
    pub skip_in: usize,
    /// Channels coming from the block below.
    pub prev: usize,
    pub cout: usize,
    pub layers: usize,
    pub cross_attn: bool,
    pub upsample: bool,
}

impl UpBlock {
    pub fn load(ws: &WeightSource, shape: &UpBlockShape, s: &BlockSpec) -> Result<Self> {
        let UpBlockShape {
            skip_in,
            prev,
            cout,
            layers,
            cross_attn,
            upsample,
        } = *shape;
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 { skip_in } else { cout };
            let rin = if i == 0 { prev } else { cout };
            resnets.push(ResnetBlock2D::load(
                &ws.pp(format!("resnets.{i}")),
                rin + skip,
                cout,
                Some(s.temb),
                s.groups,
                s.eps,
                1.0,
            )?);
            if cross_attn {
                attentions.push(load_attn(ws, i, cout, s)?);
            }
        }
        let upsampler = if upsample {
            Some(Upsample2D::load(&ws.pp("upsamplers.0"), cout)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Consumes one skip state per resnet from the end of `skips`; `size` is the spatial size
    /// to up-sample to (the next skip's), when the latent is not a multiple of the down factor.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        ctx: &Tensor,
        size: Option<(usize, usize)>,
        ckpt: bool,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let Some(skip) = skips.pop() else {
                bail!("UNet internal error: ran out of skip connections")
            };
            h = resnet(r, &Tensor::cat(&[&h, &skip], 1)?, temb, ckpt)?;
            if let Some(a) = self.attentions.get(i) {
                h = attention(a, &h, ctx, ckpt)?;
            }
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h, size)?;
        }
        Ok(h)
    }
}

/// `r(h, temb)`; with `ckpt`, gradient-checkpointed (recomputed during backward).
fn resnet(r: &ResnetBlock2D, h: &Tensor, temb: &Tensor, ckpt: bool) -> Result<Tensor> {
    if !ckpt {
        return r.forward(h, Some(temb));
    }
    let r = r.clone();
    Ok(crate::ops::checkpoint(
        h,
        temb,
        "a UNet resnet",
        std::sync::Arc::new(move |h, t| r.forward(h, Some(t))),
    )?)
}

/// `a(h, ctx)`; with `ckpt`, gradient-checkpointed.
fn attention(a: &Transformer2DModel, h: &Tensor, ctx: &Tensor, ckpt: bool) -> Result<Tensor> {
    if !ckpt {
        return a.forward(h, ctx);
    }
    let a = a.clone();
    Ok(crate::ops::checkpoint(
        h,
        ctx,
        "a UNet transformer block",
        std::sync::Arc::new(move |h, c| a.forward(h, c)),
    )?)
}

/// Reads every LoRA-capable linear of a set of resnets and attentions (order of [`visit`]).
pub(crate) fn visit_ref(
    resnets: &[ResnetBlock2D],
    attentions: &[Transformer2DModel],
    f: &mut dyn FnMut(&LoraLinear) -> Result<()>,
) -> Result<()> {
    for p in resnets.iter().filter_map(|r| r.time_emb_proj.as_ref()) {
        f(p)?;
    }
    for a in attentions {
        a.visit_linears(f)?;
    }
    Ok(())
}

/// Visits every LoRA-capable linear of a set of resnets and attentions.
pub(crate) fn visit(
    resnets: &mut [ResnetBlock2D],
    attentions: &mut [Transformer2DModel],
    f: &mut dyn FnMut(&mut LoraLinear) -> Result<()>,
) -> Result<()> {
    for r in resnets {
        if let Some(p) = &mut r.time_emb_proj {
            f(p)?;
        }
    }
    for a in attentions {
        a.for_each_linear(f)?;
    }
    Ok(())
}
