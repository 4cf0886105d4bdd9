//! Our trainable `UNet2DConditionModel` (diffusers' names and checkpoint keys), with every
//! linear projection a [`LoraLinear`].

pub mod attention;
pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod ldm_names;
pub mod transformer_2d;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

pub use config::{PerBlock, UNetConfig};

use crate::lora::{Component, LoraLinear, LoraModel, Patchable};
use crate::nn::{resnet as nn_resnet, Conv2d, GroupNorm};
use crate::ops;
use crate::weights::{open_weights, ParamRecord, WeightSource};
use blocks::{BlockSpec, DownBlock, DownBlockShape, MidBlock, UpBlock, UpBlockShape};
use embeddings::{timestep_features, TimestepEmbedding};

/// Stable Diffusion's noise-prediction UNet.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    params: Vec<ParamRecord>,
    dtype: DType,
    device: Device,
    /// Recompute every resnet and transformer block during backward instead of keeping their
    /// activations (diffusers' `enable_gradient_checkpointing`): less memory, one more forward
    /// per step. Gradients are unchanged; backward must run through
    /// [`crate::train::step::grads_of`]. Default false.
    pub gradient_checkpointing: bool,
}

/// Resolves a diffusers UNet folder: `dir/unet/config.json` (pipeline root) or
/// `dir/config.json` (the unet folder itself).
pub fn unet_dir(dir: &Path) -> Result<PathBuf> {
    if dir.join("unet").join("config.json").is_file() {
        Ok(dir.join("unet"))
    } else if dir.join("config.json").is_file() {
        Ok(dir.to_path_buf())
    } else if !dir.exists() {
        bail!("model folder {} does not exist", dir.display())
    } else {
        bail!(
            "{} is not a diffusers model folder: neither unet/config.json nor config.json is there",
            dir.display()
        )
    }
}

impl UNet2DConditionModel {
    /// Builds the UNet for `config` with tensors from `ws` (keys as in diffusers checkpoints).
    pub fn new(config: &UNetConfig, ws: &WeightSource) -> Result<Self> {
        config.validate()?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let (heads, layers, cross, tl) = (
            config.heads()?,
            config.layers()?,
            config.cross_dims()?,
            config.transformer_layers()?,
        );
        let temb = config.time_embed_dim();
        let spec = |i: usize| BlockSpec {
            temb,
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            heads: heads[i],
            transformer_layers: tl[i],
            context_dim: cross[i],
            linear_projection: config.use_linear_projection,
        };
        let (kin, kout) = (config.conv_in_kernel, config.conv_out_kernel);
        let conv_in = Conv2d::load(
            &ws.pp("conv_in"),
            config.in_channels,
            ch[0],
            kin,
            1,
            kin / 2,
        )?;
        let time_embedding = TimestepEmbedding::load(&ws.pp("time_embedding"), ch[0], temb)?;
        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let cross_attn = config.down_block_types[i] == "CrossAttnDownBlock2D";
            let down = (i + 1 < n).then_some(config.downsample_padding);
            let shape = DownBlockShape {
                cin,
                cout: ch[i],
                layers: layers[i],
                cross_attn,
                downsample: down,
            };
            let ws = ws.pp(format!("down_blocks.{i}"));
            down_blocks.push(DownBlock::load(&ws, &shape, &spec(i))?);
        }
        let mid_block = MidBlock::load(
            &ws.pp("mid_block"),
            ch[n - 1],
            config.mid_block_scale_factor,
            &spec(n - 1),
        )?;
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[n - 1];
        for i in 0..n {
            let r = n - 1 - i; // level this up block mirrors
            let prev = out_ch;
            out_ch = ch[r];
            let skip_in = ch[r.saturating_sub(1)];
            let cross_attn = config.up_block_types[i] == "CrossAttnUpBlock2D";
            let shape = UpBlockShape {
                skip_in,
                prev,
                cout: out_ch,
                layers: layers[r] + 1,
                cross_attn,
                upsample: i + 1 < n,
            };
            let ws = ws.pp(format!("up_blocks.{i}"));
            up_blocks.push(UpBlock::load(&ws, &shape, &spec(r))?);
        }
        let conv_norm_out = GroupNorm::load(
            &ws.pp("conv_norm_out"),
            config.norm_num_groups,
            ch[0],
            config.norm_eps,
        )?;
        let conv_out = Conv2d::load(
            &ws.pp("conv_out"),
            ch[0],
            config.out_channels,
            kout,
            1,
            kout / 2,
        )?;
        Ok(Self {
            config: config.clone(),
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            params: ws.records(),
            dtype: ws.dtype(),
            device: ws.device().clone(),
            gradient_checkpointing: false,
        })
    }

    /// Loads `config.json` and `diffusion_pytorch_model[.variant].safetensors` from a diffusers
    /// folder (pipeline root or its `unet/`), converting weights to `dtype`.
    pub fn load(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let dir = unet_dir(dir.as_ref())?;
        let config = UNetConfig::from_file(&dir.join("config.json"))?;
        let ws = open_weights(&dir, "diffusion_pytorch_model", variant, dtype, device)?;
        Self::new(&config, &ws).with_context(|| format!("loading the UNet from {}", dir.display()))
    }

    /// Seeded random weights with PyTorch's default initialisation.
    pub fn random(config: &UNetConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        Self::new(config, &WeightSource::random(seed, dtype, device))
    }

    /// Full-parameter mode: the model built from `ws` with every weight a trainable `Var`,
    /// returned by checkpoint key (for [`crate::train::Trainer::with_vars`]).
    pub fn new_trainable(
        config: &UNetConfig,
        ws: &WeightSource,
    ) -> Result<(Self, Vec<(String, candle_core::Var)>)> {
        let ws = ws.clone().trainable();
        let m = Self::new(config, &ws)?;
        Ok((m, ws.vars()))
    }

    /// Structure only (no weights): for counting parameters of big configs. Never run it.
    pub fn meta(config: &UNetConfig) -> Result<Self> {
        Self::new(config, &WeightSource::meta(DType::F32))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every frozen tensor of the model (checkpoint key and shape), in load order.
    pub fn param_records(&self) -> &[ParamRecord] {
        &self.params
    }

    /// Predicts the noise: `sample [B, C, H, W]`, `timesteps [B]` (any numeric dtype; a
    /// single value is broadcast to the batch), `encoder_hidden_states [B, T, D]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with(
            sample,
            timesteps,
            encoder_hidden_states,
            self.gradient_checkpointing,
        )
    }

    /// [`Self::forward`], gradient-checkpointed when `checkpointing` (whatever
    /// [`Self::gradient_checkpointing`] says).
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        checkpointing: bool,
    ) -> Result<Tensor> {
        let (b, c, h, w) = sample.dims4().with_context(|| {
            format!("UNet sample must be [B, C, H, W], got {:?}", sample.dims())
        })?;
        if c != self.config.in_channels {
            bail!(
                "UNet sample has {c} channels, the model expects {}",
                self.config.in_channels
            );
        }
        let t = match timesteps.dims() {
            [n] if *n == b => timesteps.clone(),
            [] | [1] => timesteps.reshape(1)?.broadcast_as(b)?.contiguous()?,
            d => bail!("timesteps must be [batch = {b}] (or a single value), got shape {d:?}"),
        };
        let (eb, _, ed) = encoder_hidden_states.dims3().with_context(|| {
            format!(
                "encoder_hidden_states must be [B, T, D], got {:?}",
                encoder_hidden_states.dims()
            )
        })?;
        let want = self.config.cross_dims()?[0];
        if eb != b || ed != want {
            bail!(
                "encoder_hidden_states has shape {:?}, expected [{b}, T, {want}]",
                encoder_hidden_states.dims()
            );
        }
        let factor = self.config.downsample_factor();
        let odd_size = h % factor != 0 || w % factor != 0;

        let ctx = encoder_hidden_states.to_dtype(self.dtype)?;
        let x = sample.to_dtype(self.dtype)?;
        let x = if self.config.center_input_sample {
            ((x * 2.0)? - 1.0)?
        } else {
            x
        };
        let tf = timestep_features(
            &t,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?;
        let temb = self.time_embedding.forward(&tf.to_dtype(self.dtype)?)?;

        let ckpt = checkpointing;
        let mut x = self.conv_in.forward(&x)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (h, states) = block.forward(&x, &temb, &ctx, ckpt)?;
            x = h;
            skips.extend(states);
        }
        x = self.mid_block.forward(&x, &temb, &ctx, ckpt)?;
        let n = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let used = block.resnets.len();
            let size = if i + 1 < n && odd_size {
                let s = &skips[skips.len() - used - 1];
                Some((s.dim(2)?, s.dim(3)?))
            } else {
                None
            };
            x = block.forward(&x, &mut skips, &temb, &ctx, size, ckpt)?;
        }
        let x = ops::silu(&self.conv_norm_out.forward(&x)?)?;
        self.conv_out.forward(&x)
    }
}

impl LoraModel for UNet2DConditionModel {
    fn visit_linears(&self, f: &mut dyn FnMut(&LoraLinear) -> Result<()>) -> Result<()> {
        f(&self.time_embedding.linear_1)?;
        f(&self.time_embedding.linear_2)?;
        for b in &self.down_blocks {
            blocks::visit_ref(&b.resnets, &b.attentions, f)?;
        }
        let mid = &self.mid_block;
        blocks::visit_ref(&mid.resnets, &mid.attentions, f)?;
        for b in &self.up_blocks {
            blocks::visit_ref(&b.resnets, &b.attentions, f)?;
        }
        Ok(())
    }

    fn for_each_linear(&mut self, f: &mut dyn FnMut(&mut LoraLinear) -> Result<()>) -> Result<()> {
        f(&mut self.time_embedding.linear_1)?;
        f(&mut self.time_embedding.linear_2)?;
        for b in &mut self.down_blocks {
            blocks::visit(&mut b.resnets, &mut b.attentions, f)?;
        }
        blocks::visit(
            &mut self.mid_block.resnets,
            &mut self.mid_block.attentions,
            f,
        )?;
        for b in &mut self.up_blocks {
            blocks::visit(&mut b.resnets, &mut b.attentions, f)?;
        }
        Ok(())
    }

    fn base_param_count(&self) -> usize {
        self.params.iter().map(|p| p.shape.elem_count()).sum()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn lora_component(&self) -> Component {
        Component::Unet
    }

    /// CompVis/LDM names (`input_blocks.1.1...`), see [`ldm_names`].
    fn module_aliases(&self) -> Result<Vec<(String, String)>> {
        let mut names = Vec::new();
        self.visit_patchables(&mut |p| {
            names.push(p.name().to_string());
            Ok(())
        })?;
        Ok(ldm_names::ldm_aliases(self, &names))
    }

    fn visit_patchables(&self, f: &mut dyn FnMut(&dyn Patchable) -> Result<()>) -> Result<()> {
        self.visit_linears(&mut |l| f(l))?;
        for c in self.convs() {
            f(c)?;
        }
        Ok(())
    }

    fn for_each_patchable(
        &mut self,
        f: &mut dyn FnMut(&mut dyn Patchable) -> Result<()>,
    ) -> Result<()> {
        self.for_each_linear(&mut |l| f(l))?;
        for c in self.convs_mut() {
            f(c)?;
        }
        Ok(())
    }
}

impl UNet2DConditionModel {
    /// Every convolution in module order: `conv_in`, each block's resnets' then its sampler's,
    /// the mid block's, `conv_out` (the order of [`Self::convs_mut`]).
    pub fn convs(&self) -> Vec<&Conv2d> {
        fn resnet_convs<'a>(out: &mut Vec<&'a Conv2d>, rs: &'a [nn_resnet::ResnetBlock2D]) {
            for r in rs {
                out.extend([&r.conv1, &r.conv2]);
                out.extend(r.conv_shortcut.as_ref());
            }
        }
        let mut out = vec![&self.conv_in];
        for b in &self.down_blocks {
            resnet_convs(&mut out, &b.resnets);
            out.extend(b.downsampler.as_ref().map(|d| &d.conv));
        }
        resnet_convs(&mut out, &self.mid_block.resnets);
        for b in &self.up_blocks {
            resnet_convs(&mut out, &b.resnets);
            out.extend(b.upsampler.as_ref().map(|u| &u.conv));
        }
        out.push(&self.conv_out);
        out
    }

    /// [`Self::convs`], mutably.
    pub fn convs_mut(&mut self) -> Vec<&mut Conv2d> {
        fn resnet_convs<'a>(out: &mut Vec<&'a mut Conv2d>, rs: &'a mut [nn_resnet::ResnetBlock2D]) {
            for r in rs {
                out.push(&mut r.conv1);
                out.push(&mut r.conv2);
                out.extend(r.conv_shortcut.as_mut());
            }
        }
        let mut out = vec![&mut self.conv_in];
        for b in &mut self.down_blocks {
            resnet_convs(&mut out, &mut b.resnets);
            out.extend(b.downsampler.as_mut().map(|d| &mut d.conv));
        }
        resnet_convs(&mut out, &mut self.mid_block.resnets);
        for b in &mut self.up_blocks {
            resnet_convs(&mut out, &mut b.resnets);
            out.extend(b.upsampler.as_mut().map(|u| &mut u.conv));
        }
        out.push(&mut self.conv_out);
        out
    }
}
