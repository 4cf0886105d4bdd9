//! `Transformer2DModel`: group norm, `proj_in`, transformer blocks over the `H·W` tokens,
//! `proj_out`, residual (diffusers' `transformer_2d.py`).

use anyhow::Result;
use candle_core::Tensor;

use super::attention::BasicTransformerBlock;
use crate::lora::LoraLinear;
use crate::nn::GroupNorm;
use crate::weights::WeightSource;

/// `proj_in`/`proj_out` are 1x1 convolutions in SD 1.x (`use_linear_projection = false`) and
/// linear layers in SD 2.x. A 1x1 convolution is a linear map over channels applied at every
/// pixel, so both are a [`LoraLinear`] applied to the `[B, H·W, C]` token view; only the stored
/// weight shape differs.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: LoraLinear,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: LoraLinear,
}

/// The shape of one [`Transformer2DModel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transformer2DConfig {
    pub channels: usize,
    pub heads: usize,
    /// Transformer blocks in it.
    pub layers: usize,
    /// Width of the text states cross-attention reads.
    pub context_dim: usize,
    /// Group-norm groups.
    pub groups: usize,
    /// `proj_in`/`proj_out` as linears (SD 2.x) instead of 1x1 convolutions (SD 1.x).
    pub linear_projection: bool,
}

impl Transformer2DModel {
    pub fn load(ws: &WeightSource, cfg: &Transformer2DConfig) -> Result<Self> {
        let Transformer2DConfig {
            channels,
            heads,
            layers,
            context_dim,
            groups,
            linear_projection,
        } = *cfg;
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        let conv = !linear_projection;
        let blocks = (0..layers)
            .map(|i| {
                BasicTransformerBlock::load(
                    &ws.pp(format!("transformer_blocks.{i}")),
                    inner,
                    heads,
                    head_dim,
                    context_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(&ws.pp("norm"), groups, channels, 1e-6)?,
            proj_in: LoraLinear::load(&ws.pp("proj_in"), channels, inner, true, conv)?,
            transformer_blocks: blocks,
            proj_out: LoraLinear::load(&ws.pp("proj_out"), inner, channels, true, conv)?,
        })
    }

    /// `x [B, C, H, W]`, `context [B, T, Cc]` -> `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self.norm.forward(x)?;
        let t = t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?;
        let mut t = self.proj_in.forward(&t)?;
        for block in &self.transformer_blocks {
            t = block.forward(&t, context)?;
        }
        let t = self.proj_out.forward(&t)?;
        let t = t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?;
        Ok((t + x)?)
    }

    /// Reads every LoRA-capable linear, in the order of [`Self::for_each_linear`].
    pub fn visit_linears(&self, f: &mut dyn FnMut(&LoraLinear) -> Result<()>) -> Result<()> {
        f(&self.proj_in)?;
        for b in &self.transformer_blocks {
            b.visit_linears(f)?;
        }
        f(&self.proj_out)
    }

    pub fn for_each_linear(
        &mut self,
        f: &mut dyn FnMut(&mut LoraLinear) -> Result<()>,
    ) -> Result<()> {
        f(&mut self.proj_in)?;
        for b in &mut self.transformer_blocks {
            b.for_each_linear(f)?;
        }
        f(&mut self.proj_out)
    }
}
