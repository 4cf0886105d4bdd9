//! `Attention`, the GEGLU `FeedForward` and `BasicTransformerBlock` (diffusers'
//! `attention_processor.py` and `attention.py`), with every projection a [`LoraLinear`].

use anyhow::Result;
use candle_core::Tensor;

use crate::lora::LoraLinear;
use crate::nn::LayerNorm;
use crate::ops;
use crate::weights::WeightSource;

/// Multi-head scaled dot-product attention with `to_q`, `to_k`, `to_v` (no bias) and
/// `to_out.0` (with bias). Self-attention when no context is given.
#[derive(Debug, Clone)]
pub struct Attention {
    pub to_q: LoraLinear,
    pub to_k: LoraLinear,
    pub to_v: LoraLinear,
    pub to_out: LoraLinear,
    pub heads: usize,
}

impl Attention {
    /// `query_dim` features in, `heads x head_dim` inner width, keys/values from
    /// `context_dim` features (`query_dim` for self-attention).
    pub fn load(
        ws: &WeightSource,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: LoraLinear::load(&ws.pp("to_q"), query_dim, inner, false, false)?,
            to_k: LoraLinear::load(&ws.pp("to_k"), context_dim, inner, false, false)?,
            to_v: LoraLinear::load(&ws.pp("to_v"), context_dim, inner, false, false)?,
            to_out: LoraLinear::load(&ws.pp("to_out.0"), inner, query_dim, true, false)?,
            heads,
        })
    }

    /// `x [B, N, C]`, `context [B, T, Cc]` or `None` -> `[B, N, C]`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        let (b, n, inner) = q.dims3()?;
        let h = self.heads;
        let d = inner / h;
        let split = |t: &Tensor| -> Result<Tensor> {
            let l = t.dim(1)?;
            Ok(t.reshape((b, l, h, d))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * h, l, d))?)
        };
        let q = (split(&q)? * (d as f64).powf(-0.5))?;
        let (k, v) = (split(&k)?, split(&v)?);
        let m = k.dim(1)?;
        // the whole score matrix when it is small; in query chunks with recomputation in the
        // backward when it is large (SD 1.5 at 512 px: 4096 x 4096 per head)
        let budget = ops::attention_chunk_bytes(q.device());
        let out = if q.device().is_cpu() && ops::fused_attention() {
            ops::flash_attention(&q, &k, &v, false)?
        } else if b * h * n * m * 4 <= budget {
            ops::softmax_last_dim(&q.matmul(&k.t()?)?)?.matmul(&v)?
        } else {
            let rows = ops::attention_chunk_rows(b * h, m, budget);
            ops::attention(&q, &k, &v, rows)?
        };
        let out = out
            .reshape((b, h, n, d))?
            .transpose(1, 2)?
            .reshape((b, n, inner))?;
        self.to_out.forward(&out)
    }

    /// The four projections, for LoRA traversal.
    pub fn linears(&self) -> [&LoraLinear; 4] {
        [&self.to_q, &self.to_k, &self.to_v, &self.to_out]
    }

    /// The four projections, for LoRA traversal.
    pub fn linears_mut(&mut self) -> [&mut LoraLinear; 4] {
        [
            &mut self.to_q,
            &mut self.to_k,
            &mut self.to_v,
            &mut self.to_out,
        ]
    }
}

/// GEGLU feed-forward: `ff.net.0.proj` to `2 x 4·dim`, `h · GELU(gate)`, `ff.net.2` back to
/// `dim`. GELU is the exact (erf) form, like PyTorch's default.
#[derive(Debug, Clone)]
pub struct FeedForward {
    pub proj_in: LoraLinear,
    pub proj_out: LoraLinear,
}

impl FeedForward {
    pub fn load(ws: &WeightSource, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: LoraLinear::load(&ws.pp("net.0.proj"), dim, inner * 2, true, false)?,
            proj_out: LoraLinear::load(&ws.pp("net.2"), inner, dim, true, false)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj_out
            .forward(&ops::geglu(&self.proj_in.forward(x)?)?)
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed with LayerNorm and
/// added to the residual stream.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn load(
        ws: &WeightSource,
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::load(&ws.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&ws.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: LayerNorm::load(&ws.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&ws.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: LayerNorm::load(&ws.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&ws.pp("ff"), dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        Ok((self.ff.forward(&self.norm3.forward(&x)?)? + &x)?)
    }

    /// Reads every LoRA-capable linear, in the order of [`Self::for_each_linear`].
    pub fn visit_linears(&self, f: &mut dyn FnMut(&LoraLinear) -> Result<()>) -> Result<()> {
        for l in self.attn1.linears().into_iter().chain(self.attn2.linears()) {
            f(l)?;
        }
        f(&self.ff.proj_in)?;
        f(&self.ff.proj_out)
    }

    pub fn for_each_linear(
        &mut self,
        f: &mut dyn FnMut(&mut LoraLinear) -> Result<()>,
    ) -> Result<()> {
        for l in self
            .attn1
            .linears_mut()
            .into_iter()
            .chain(self.attn2.linears_mut())
        {
            f(l)?;
        }
        f(&mut self.ff.proj_in)?;
        f(&mut self.ff.proj_out)
    }
}
