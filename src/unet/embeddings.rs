//! Sinusoidal timestep features (`Timesteps`) and their MLP (`TimestepEmbedding`), as in
//! diffusers' `embeddings.py`.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use crate::lora::LoraLinear;
use crate::ops;
use crate::weights::WeightSource;

/// Sinusoidal features of one timestep per sample: `t [B] -> [B, dim]`, computed in f32.
/// `exponent_i = -ln(10000) * i / (dim/2 - shift)`; features `[sin, cos]`, or `[cos, sin]`
/// when `flip_sin_to_cos` (SD).
pub fn timestep_features(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
) -> Result<Tensor> {
    if t.rank() != 1 {
        bail!(
            "timesteps must be a 1-D tensor [batch], got shape {:?}",
            t.dims()
        );
    }
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - shift)).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let mut emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb = emb.pad_with_zeros(1, 0, 1)?;
    }
    Ok(emb)
}

/// `linear_1 -> SiLU -> linear_2`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    pub linear_1: LoraLinear,
    pub linear_2: LoraLinear,
}

impl TimestepEmbedding {
    pub fn load(ws: &WeightSource, in_dim: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: LoraLinear::load(&ws.pp("linear_1"), in_dim, dim, true, false)?,
            linear_2: LoraLinear::load(&ws.pp("linear_2"), dim, dim, true, false)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = ops::silu(&self.linear_1.forward(x)?)?;
        self.linear_2.forward(&h)
    }
}
