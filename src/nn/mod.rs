//! Layers shared by the UNet, the VAE and the CLIP text encoder (diffusers keeps the same ones
//! in `models/resnet.py` and `models/normalization.py`): frozen convolution, group and layer
//! norm, nearest upsampling, and the resnet blocks with their down/upsamplers.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

pub mod resnet;

use crate::lora::patch::{PatchSet, Patchable, WeightPatch};
use crate::lora::LoraAdapter;
use crate::ops;
use crate::weights::{Init, WeightSource};

/// A 2-D convolution with square kernel, "same"-style padding and a bias. Loaded LoRA files
/// (LoCon, LoHa, LoKr, DoRA, full) can patch its weight; trainable LoCon adapters
/// (`A [r, in, k, k]` with this layer's stride and padding, then `B [out, r, 1, 1]`, kohya's
/// `conv_dim` layout) add `scale·(alpha/r)·B(A(x))` to its output.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// Module path (the checkpoint key without `.weight`).
    pub name: String,
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: usize,
    pub padding: usize,
    patches: PatchSet,
    adapters: Vec<LoraAdapter>,
}

impl Conv2d {
    pub fn load(
        ws: &WeightSource,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let fan_in = cin * k * k;
        Ok(Self {
            name: ws.prefix().to_string(),
            weight: ws.get((cout, cin, k, k), "weight", Init::FanIn(fan_in))?,
            bias: ws.get(cout, "bias", Init::FanIn(fan_in))?,
            stride,
            padding,
            patches: PatchSet::default(),
            adapters: Vec::new(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = match self.patches.effective() {
            Some((w, Some(b))) => (w, b),
            Some((w, None)) => (w, &self.bias),
            None => (&self.weight, &self.bias),
        };
        let mut y = ops::frozen_conv2d(x, w, Some(b), self.padding, self.stride)?;
        for ad in self.adapters.iter().filter(|a| a.enabled && a.scale != 0.0) {
            let xf = x.to_dtype(DType::F32)?;
            // the factor goes on the rank-r intermediate (r channels instead of out)
            let down = ops::frozen_conv2d(&xf, ad.a.as_tensor(), None, self.padding, self.stride)?;
            let h = ops::frozen_conv2d(&(down * ad.factor())?, ad.b.as_tensor(), None, 0, 1)?;
            let dt = y.dtype();
            y = (y + h.to_dtype(dt)?)?;
        }
        Ok(y)
    }
}

impl Patchable for Conv2d {
    fn name(&self) -> &str {
        &self.name
    }
    fn weight_shape(&self) -> Vec<usize> {
        self.weight.dims().to_vec()
    }
    fn bias_len(&self) -> Option<usize> {
        Some(self.bias.elem_count())
    }
    fn patches(&self) -> &PatchSet {
        &self.patches
    }
    fn add_patch(&mut self, p: WeightPatch) -> Result<()> {
        p.check(self.weight.dims(), self.bias_len())
            .with_context(|| self.name.clone())?;
        self.patches.push(p, &self.weight, Some(&self.bias))
    }
    fn update_patches(&mut self, f: &mut dyn FnMut(&mut WeightPatch)) -> Result<()> {
        self.patches.update(&self.weight, Some(&self.bias), f)
    }
    fn clear_patches(&mut self) {
        self.patches.clear();
    }
    fn is_conv(&self) -> bool {
        true
    }
    fn lora_adapters(&self) -> &[LoraAdapter] {
        &self.adapters
    }
    fn lora_adapters_mut(&mut self) -> &mut [LoraAdapter] {
        &mut self.adapters
    }
    fn push_lora_adapter(&mut self, ad: LoraAdapter) -> Result<()> {
        if self.adapters.iter().any(|a| a.name == ad.name) {
            bail!(
                "{} already has a LoRA adapter named `{}`",
                self.name,
                ad.name
            );
        }
        let (w, r) = (self.weight.dims(), ad.rank());
        let want_a = [r, w[1], w[2], w[3]];
        if ad.a.dims() != want_a || ad.b.dims() != [w[0], r, 1, 1] {
            bail!(
                "{}: conv adapter A {:?} / B {:?} does not fit the weight {w:?} (expected A {want_a:?}, B [{}, {r}, 1, 1])",
                self.name,
                ad.a.dims(),
                ad.b.dims(),
                w[0]
            );
        }
        if ad.magnitude.is_some() {
            bail!(
                "{}: DoRA adapters on convolutions are not supported",
                self.name
            );
        }
        self.adapters.push(ad);
        Ok(())
    }
    fn clear_lora_adapters(&mut self) -> Result<()> {
        self.adapters.clear();
        Ok(())
    }
}

/// Group normalisation with per-channel affine (`torch.nn.GroupNorm`).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(ws: &WeightSource, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: ws.get(channels, "weight", Init::Ones)?,
            bias: ws.get(channels, "bias", Init::Zeros)?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::group_norm(
            x,
            self.groups,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// Layer normalisation over the last dimension (`torch.nn.LayerNorm`), differentiable.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(ws: &WeightSource, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: ws.get(dim, "weight", Init::Ones)?,
            bias: ws.get(dim, "bias", Init::Zeros)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::layer_norm(x, &self.weight, &self.bias, self.eps)?)
    }
}

/// Nearest-neighbour up-sampling to `(h, w)`, PyTorch's `interpolate(mode="nearest")`
/// (source index `floor(dst * in / out)`). Integer factors use candle's kernel; other sizes
/// (latents not divisible by the UNet's down-sampling factor) use index selection, which
/// keeps a backward pass.
pub fn upsample_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    if h.is_multiple_of(ih) && w.is_multiple_of(iw) && h / ih == w / iw {
        return Ok(x.upsample_nearest2d(h, w)?);
    }
    let idx = |inp: usize, out: usize| -> Result<Tensor> {
        let v: Vec<u32> = (0..out)
            .map(|i| (((i as f64) * inp as f64 / out as f64).floor() as usize).min(inp - 1) as u32)
            .collect();
        Ok(Tensor::from_vec(v, out, x.device())?)
    };
    let y = x.index_select(&idx(ih, h)?, 2)?;
    Ok(y.index_select(&idx(iw, w)?, 3)?)
}
