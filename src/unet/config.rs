//! `UNetConfig`: the subset of diffusers' `UNet2DConditionModel` config that Stable Diffusion
//! 1.x/2.x UNets use, deserialisable from a diffusers `unet/config.json`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A value given either once for all blocks or once per block (diffusers accepts both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `n` blocks.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => bail!(
                "config field `{field}` has {} entries, expected one per block ({n})",
                v.len()
            ),
        }
    }
}

fn d_sample_size() -> usize {
    64
}
fn d_channels() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_one() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d_heads() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_cross() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_groups() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_padding() -> usize {
    1
}
fn d_f1() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_attention_type() -> String {
    "default".into()
}
fn d_kernel() -> usize {
    3
}
fn d_only_cross() -> PerBlock<bool> {
    PerBlock::One(false)
}

/// Configuration of a Stable Diffusion UNet, field names as in diffusers' `config.json`.
/// `Default` is diffusers' default (which is SD 1.x's layout with `cross_attention_dim` 1280).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Latent size the model was trained on (informational). SD 1.5: 64.
    #[serde(default = "d_sample_size")]
    pub sample_size: usize,
    #[serde(default = "d_channels")]
    pub in_channels: usize,
    #[serde(default = "d_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "d_only_cross")]
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_padding")]
    pub downsample_padding: usize,
    #[serde(default = "d_f1")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "d_one")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// SD 1.x quirk: diffusers reads this as the NUMBER OF HEADS when `num_attention_heads`
    /// is null (the head dimension is then `channels / heads`).
    #[serde(default = "d_heads")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Computes attention scores in f32 (our softmax always accumulates in f32).
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// Only `"default"` (GLIGEN's gated attention is not implemented).
    #[serde(default = "d_attention_type")]
    pub attention_type: String,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: usize,
}

impl UNetConfig {
    /// Stable Diffusion 1.5 (`stable-diffusion-v1-5/stable-diffusion-v1-5`, `unet/config.json`).
    pub fn sd_v1_5() -> Self {
        Self {
            sample_size: 64,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "DownBlock2D".into(),
            ],
            mid_block_type: d_mid(),
            up_block_types: vec![
                "UpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
            ],
            only_cross_attention: d_only_cross(),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(768),
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            class_embed_type: None,
            num_class_embeds: None,
            addition_embed_type: None,
            encoder_hid_dim: None,
            time_cond_proj_dim: None,
            timestep_post_act: None,
            time_embedding_dim: None,
            dual_cross_attention: false,
            attention_type: d_attention_type(),
            time_embedding_act_fn: None,
            encoder_hid_dim_type: None,
            reverse_transformer_layers_per_block: None,
            mid_block_only_cross_attention: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
        }
    }

    /// A miniature SD-architecture UNet for CPU experiments and tests: three levels
    /// (32, 64, 64 channels), two with cross-attention, one ResNet per level, 4 heads,
    /// 64-dim text conditioning, linear projections. About 1.5 M parameters.
    pub fn tiny() -> Self {
        Self {
            sample_size: 16,
            down_block_types: vec![
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "DownBlock2D".into(),
            ],
            up_block_types: vec![
                "UpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
            ],
            block_out_channels: vec![32, 64, 64],
            layers_per_block: PerBlock::One(1),
            norm_num_groups: 8,
            cross_attention_dim: PerBlock::One(64),
            attention_head_dim: PerBlock::One(4),
            use_linear_projection: true,
            ..Self::sd_v1_5()
        }
    }

    /// Reads a diffusers `config.json`, rejecting features this UNet does not implement.
    /// The UNet structure of a model name ([`crate::io::ModelName`]): `sd15` (built in),
    /// `tiny` (the shipped model's config, else [`UNetConfig::tiny`]), a diffusers folder (its
    /// `unet/config.json` or `config.json`) or a `config.json` file. No weights are read.
    pub fn for_model(model: &str) -> Result<Self> {
        use crate::io::ModelName;
        match ModelName::parse(model)? {
            ModelName::Sd15 => Ok(Self::sd_v1_5()),
            ModelName::Tiny => {
                let f = crate::io::tiny_model_dir().join("unet/config.json");
                if f.is_file() {
                    Self::from_file(&f)
                } else {
                    Ok(Self::tiny())
                }
            }
            ModelName::Local(p) if p.is_file() => Self::from_file(&p),
            ModelName::Local(dir) => Self::from_file(&super::unet_dir(&dir)?.join("config.json")),
            ModelName::Hub(repo) => bail!(
                "`{repo}`: reading a UNet structure needs `sd15`, `tiny`, a local diffusers folder or a config.json (Hub repos are not looked up here)"
            ),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read UNet config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid diffusers UNet config", path.display()))?;
        cfg.validate()
            .with_context(|| format!("unsupported UNet config {}", path.display()))?;
        Ok(cfg)
    }

    /// Checks the config describes a UNet this crate implements.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("`block_out_channels` is empty");
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "`down_block_types` ({}) and `up_block_types` ({}) must have one entry per `block_out_channels` ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                bail!("`down_block_types`: unsupported block `{t}` (supported: CrossAttnDownBlock2D, DownBlock2D)");
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                bail!("`up_block_types`: unsupported block `{t}` (supported: CrossAttnUpBlock2D, UpBlock2D)");
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => bail!(
                "`mid_block_type`: unsupported {other:?} (supported: UNetMidBlock2DCrossAttn)"
            ),
        }
        for c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                bail!(
                    "`block_out_channels` entry {c} is not divisible by `norm_num_groups` {}",
                    self.norm_num_groups
                );
            }
        }
        if self
            .only_cross_attention
            .expand(n, "only_cross_attention")?
            .iter()
            .any(|&b| b)
        {
            bail!("`only_cross_attention` = true is not supported");
        }
        let unsupported: [(&str, bool); 15] = [
            (
                "act_fn (only \"silu\"/\"swish\")",
                self.act_fn != "silu" && self.act_fn != "swish",
            ),
            (
                "resnet_time_scale_shift (only \"default\")",
                self.resnet_time_scale_shift != "default",
            ),
            (
                "time_embedding_type (only \"positional\")",
                self.time_embedding_type != "positional",
            ),
            (
                "class_embed_type / num_class_embeds",
                self.class_embed_type.is_some() || self.num_class_embeds.is_some(),
            ),
            ("addition_embed_type", self.addition_embed_type.is_some()),
            (
                "encoder_hid_dim / encoder_hid_dim_type",
                self.encoder_hid_dim.is_some() || self.encoder_hid_dim_type.is_some(),
            ),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            (
                "time_embedding_act_fn",
                self.time_embedding_act_fn.is_some(),
            ),
            ("dual_cross_attention", self.dual_cross_attention),
            (
                "attention_type (only \"default\")",
                self.attention_type != "default",
            ),
            (
                "reverse_transformer_layers_per_block",
                self.reverse_transformer_layers_per_block
                    .as_ref()
                    .is_some_and(|v| !v.is_null()),
            ),
            (
                "mid_block_only_cross_attention",
                self.mid_block_only_cross_attention == Some(true),
            ),
            (
                "conv_in_kernel / conv_out_kernel (only odd sizes)",
                self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2),
            ),
            (
                "transformer_layers_per_block (at least 1)",
                self.transformer_layers()?.contains(&0),
            ),
        ];
        for (field, bad) in unsupported {
            if bad {
                bail!("config field {field} is set to a value this UNet does not implement");
            }
        }
        let heads = self.heads()?;
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                bail!("block {i}: {c} channels cannot be split into {h} attention heads");
            }
        }
        self.layers()?;
        self.cross_dims()?;
        self.transformer_layers()?;
        Ok(())
    }

    /// Attention heads per down block (SD 1.x quirk handled: `attention_head_dim` is the head
    /// count when `num_attention_heads` is absent, exactly as diffusers reads it).
    pub fn heads(&self) -> Result<Vec<usize>> {
        let n = self.block_out_channels.len();
        match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads"),
            None => self.attention_head_dim.expand(n, "attention_head_dim"),
        }
    }
    pub fn layers(&self) -> Result<Vec<usize>> {
        self.layers_per_block
            .expand(self.block_out_channels.len(), "layers_per_block")
    }
    pub fn cross_dims(&self) -> Result<Vec<usize>> {
        self.cross_attention_dim
            .expand(self.block_out_channels.len(), "cross_attention_dim")
    }
    pub fn transformer_layers(&self) -> Result<Vec<usize>> {
        self.transformer_layers_per_block.expand(
            self.block_out_channels.len(),
            "transformer_layers_per_block",
        )
    }
    /// Width of the time embedding (4x the first block's channels unless set).
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }
    /// Total down-sampling factor between the input latent and the deepest block.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}
