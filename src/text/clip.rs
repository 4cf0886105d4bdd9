//! The CLIP text encoder (transformers' `CLIPTextModel`: names and tensor paths as its
//! checkpoints), trainable, with every projection a [`LoraLinear`].

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use serde::Deserialize;
use std::path::Path;

use crate::lora::{Component, LoraLinear, LoraModel};
use crate::nn::LayerNorm;
use crate::ops;
use crate::weights::{component_dir, open_weights, Init, ParamRecord, WeightSource};

fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_eos() -> u32 {
    2
}

/// `text_encoder/config.json` (a `CLIPTextConfig`, or a `CLIPConfig` with `text_config`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// `quick_gelu` (SD 1.x) or `gelu` (SD 2.x).
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// 2 is transformers' legacy value (SD 1.5): the pooled token is then the arg-max id.
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
}

impl ClipTextConfig {
    /// SD 1.5's text encoder (`openai/clip-vit-large-patch14`'s text tower).
    pub fn sd_v1_5() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        }
    }

    /// A miniature CLIP text encoder (64 wide, 2 layers, 4 heads) over the full CLIP vocabulary;
    /// its width matches `UNetConfig::tiny()`'s cross-attention.
    pub fn tiny() -> Self {
        Self {
            hidden_size: 64,
            intermediate_size: 256,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            ..Self::sd_v1_5()
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read text encoder config {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let v = v.get("text_config").cloned().unwrap_or(v);
        let cfg: Self = serde_json::from_value(v)
            .with_context(|| format!("{} is not a CLIP text config", path.display()))?;
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            bail!(
                "{}: hidden_size {} is not divisible by num_attention_heads {}",
                path.display(),
                cfg.hidden_size,
                cfg.num_attention_heads
            );
        }
        if !matches!(cfg.hidden_act.as_str(), "quick_gelu" | "gelu") {
            bail!(
                "{}: hidden_act `{}` is not supported (quick_gelu, gelu)",
                path.display(),
                cfg.hidden_act
            );
        }
        Ok(cfg)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    out_proj: LoraLinear,
    layer_norm2: LayerNorm,
    fc1: LoraLinear,
    fc2: LoraLinear,
}

impl EncoderLayer {
    /// Pre-norm causal self-attention and MLP, each with its residual; `mask` `[T, T]` is 0 or
    /// -inf, `gelu` picks exact GELU (else quick GELU).
    fn forward(&self, x: &Tensor, mask: &Tensor, heads: usize, gelu: bool) -> Result<Tensor> {
        let (b, t, hidden) = x.dims3()?;
        let d = hidden / heads;
        let r = x.clone();
        let h = self.layer_norm1.forward(x)?;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, heads, d))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * heads, t, d))?)
        };
        let q = split((self.q_proj.forward(&h)? * (d as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(&h)?)?;
        let v = split(self.v_proj.forward(&h)?)?;
        // `mask` is CLIP's causal mask: the fused kernel applies it itself
        let attn = if q.device().is_cpu() && ops::fused_attention() {
            ops::flash_attention(&q, &k, &v, true)?
        } else {
            let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
            ops::softmax_last_dim(&scores)?.matmul(&v)?
        };
        let attn = attn
            .reshape((b, heads, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, heads * d))?;
        let x = (self.out_proj.forward(&attn)? + r)?;
        let r = x.clone();
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = if gelu {
            h.gelu_erf()?
        } else {
            (&h * ops_sigmoid(&(&h * 1.702)?)?)?
        };
        Ok((self.fc2.forward(&h)? + r)?)
    }
}

/// CLIP's transformer text encoder: token + position embeddings, causal self-attention layers,
/// final layer norm.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    params: Vec<ParamRecord>,
    device: Device,
    /// Recompute every encoder layer during backward (see
    /// [`crate::unet::UNet2DConditionModel::gradient_checkpointing`]). Default false.
    pub gradient_checkpointing: bool,
}

/// Output of the text encoder.
#[derive(Debug, Clone)]
pub struct TextEncoderOutput {
    /// `[B, T, hidden]` after the final layer norm (what SD conditions on).
    pub last_hidden_state: Tensor,
    /// `[B, hidden]`: the state at each sequence's end-of-text token.
    pub pooler_output: Tensor,
}

impl ClipTextModel {
    pub fn new(config: &ClipTextConfig, ws: &WeightSource) -> Result<Self> {
        let h = config.hidden_size;
        // transformers 4 writes `text_model.`-prefixed keys (SD checkpoints), version 5 does not
        let tm = if ws.contains("text_model.final_layer_norm.weight")
            || !ws.contains("final_layer_norm.weight")
        {
            ws.pp("text_model")
        } else {
            ws.clone()
        };
        let emb = tm.pp("embeddings");
        let token_embedding =
            emb.pp("token_embedding")
                .get((config.vocab_size, h), "weight", Init::FanIn(1))?;
        let position_embedding = emb.pp("position_embedding").get(
            (config.max_position_embeddings, h),
            "weight",
            Init::FanIn(1),
        )?;
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let l = tm.pp(format!("encoder.layers.{i}"));
            let a = l.pp("self_attn");
            let lin =
                |ws: &WeightSource, i: usize, o: usize| LoraLinear::load(ws, i, o, true, false);
            layers.push(EncoderLayer {
                layer_norm1: LayerNorm::load(&l.pp("layer_norm1"), h, config.layer_norm_eps)?,
                q_proj: lin(&a.pp("q_proj"), h, h)?,
                k_proj: lin(&a.pp("k_proj"), h, h)?,
                v_proj: lin(&a.pp("v_proj"), h, h)?,
                out_proj: lin(&a.pp("out_proj"), h, h)?,
                layer_norm2: LayerNorm::load(&l.pp("layer_norm2"), h, config.layer_norm_eps)?,
                fc1: lin(&l.pp("mlp.fc1"), h, config.intermediate_size)?,
                fc2: lin(&l.pp("mlp.fc2"), config.intermediate_size, h)?,
            });
        }
        let final_layer_norm =
            LayerNorm::load(&tm.pp("final_layer_norm"), h, config.layer_norm_eps)?;
        Ok(Self {
            config: config.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            params: ws.records(),
            device: ws.device().clone(),
            gradient_checkpointing: false,
        })
    }

    /// Loads `config.json` and `model[.variant].safetensors` from a diffusers `text_encoder/`
    /// folder (or a pipeline root containing one).
    pub fn load(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let dir = component_dir(dir.as_ref(), "text_encoder");
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let ws = open_weights(&dir, "model", variant, dtype, device)?;
        Self::new(&config, &ws)
            .with_context(|| format!("loading the text encoder from {}", dir.display()))
    }

    /// `input_ids [B, T]` (T <= max_position_embeddings) -> hidden states and pooled output.
    pub fn forward(&self, input_ids: &Tensor) -> Result<TextEncoderOutput> {
        self.forward_with(input_ids, self.gradient_checkpointing)
    }

    /// [`Self::forward`], gradient-checkpointed when `checkpointing`.
    pub fn forward_with(
        &self,
        input_ids: &Tensor,
        checkpointing: bool,
    ) -> Result<TextEncoderOutput> {
        let (b, t) = input_ids
            .dims2()
            .context("input_ids must be [batch, tokens]")?;
        if t > self.config.max_position_embeddings {
            bail!(
                "{t} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            );
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let tok = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, ()))?;
        let mut x = tok.broadcast_add(&self.position_embedding.narrow(0, 0, t)?.unsqueeze(0)?)?;
        let heads = self.config.num_attention_heads;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &self.device)?.to_dtype(x.dtype())?;
        let gelu = self.config.hidden_act == "gelu";
        for l in &self.layers {
            x = if checkpointing {
                let l = l.clone();
                ops::checkpoint(
                    &x,
                    &mask,
                    "a CLIP encoder layer",
                    std::sync::Arc::new(move |x, m| l.forward(x, m, heads, gelu)),
                )?
            } else {
                l.forward(&x, &mask, heads, gelu)?
            };
        }
        let last = self.final_layer_norm.forward(&x)?;
        let ids_v: Vec<Vec<u32>> = ids.to_vec2()?;
        let mut pooled = Vec::with_capacity(b);
        for (i, row) in ids_v.iter().enumerate() {
            let pos = if self.config.eos_token_id == 2 {
                // legacy configs: the highest id (the end-of-text token), first occurrence
                let max = row.iter().copied().max().unwrap_or(0);
                row.iter().position(|&v| v == max).unwrap_or(0)
            } else {
                row.iter()
                    .position(|&v| v == self.config.eos_token_id)
                    .unwrap_or(0)
            };
            pooled.push(last.i((i, pos))?);
        }
        Ok(TextEncoderOutput {
            pooler_output: Tensor::stack(&pooled, 0)?,
            last_hidden_state: last,
        })
    }
}

/// `1 / (1 + e^-x)` from differentiable primitives.
fn ops_sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

impl LoraModel for ClipTextModel {
    fn visit_linears(&self, f: &mut dyn FnMut(&LoraLinear) -> Result<()>) -> Result<()> {
        for l in &self.layers {
            for p in [&l.q_proj, &l.k_proj, &l.v_proj, &l.out_proj, &l.fc1, &l.fc2] {
                f(p)?;
            }
        }
        Ok(())
    }

    fn for_each_linear(&mut self, f: &mut dyn FnMut(&mut LoraLinear) -> Result<()>) -> Result<()> {
        for l in &mut self.layers {
            for p in [
                &mut l.q_proj,
                &mut l.k_proj,
                &mut l.v_proj,
                &mut l.out_proj,
                &mut l.fc1,
                &mut l.fc2,
            ] {
                f(p)?;
            }
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
        Component::TextEncoder
    }
    /// Files name the layers with `text_model.` (kohya's `lora_te_text_model_encoder_...`,
    /// whatever the checkpoint's layout) or without: both resolve.
    fn module_aliases(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .linear_names()?
            .into_iter()
            .map(|n| match n.strip_prefix("text_model.") {
                Some(short) => (short.to_string(), n),
                None => (format!("text_model.{n}"), n),
            })
            .collect())
    }
}
