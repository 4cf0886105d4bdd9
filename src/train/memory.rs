//! Predicted peak memory of a LoRA training step, from configs alone (no weights, no run):
//! what `sd-lora estimate-memory` prints and `sd-lora train` shows at start.
//!
//! The model follows our implementation: candle's autograd keeps every op's inputs alive until
//! backward, so the activations kept are the outputs of every op downstream of the first
//! trainable layer, counted per block from the code (a resnet keeps 2 x Cin + 6 x Cout values
//! per pixel, a transformer block 36 x C plus its attention scores or, when chunked, only the
//! log-sum-exp; LoRA adds 2 x out per adapted layer). With gradient checkpointing a block keeps
//! only its output, and the backward recomputes the largest block. The backward's transient
//! workspace (gradients in flight, the GEMM's im2col/col2im columns) and the process baseline
//! come from measurements with a counting allocator (`examples/memory_probe.rs`, BENCHMARKS.md).

use anyhow::{bail, Result};
use candle_nn::VarMap;
use serde::Serialize;

use crate::lora::{LoraConfig, LoraModel, TEXT_INJECTABLE};
use crate::text::{ClipTextConfig, ClipTextModel};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::weights::WeightSource;

/// What to estimate.
#[derive(Debug, Clone)]
pub struct MemoryQuery {
    pub unet: UNetConfig,
    /// Parameters of the other components resident during training (text encoder, VAE); 0
    /// when only the UNet is loaded (the training benchmark).
    pub other_params: usize,
    /// Text-encoder LoRA parameters and activations when it trains: (params, hidden, layers).
    pub text_encoder: Option<(usize, usize, usize)>,
    /// Latent height and width, and images per micro-batch.
    pub latent: (usize, usize),
    pub batch: usize,
    /// Bytes per value of the frozen weights and activations (4 f32, 2 f16/bf16).
    pub dtype_bytes: usize,
    /// The UNet's adapters under the LoRA config ([`MemoryQuery::new`] counts them once).
    pub adapters: UNetAdapters,
    pub gradient_checkpointing: bool,
    /// Attention score bytes materialised at once (see [`crate::ops::attention_chunk_bytes`]).
    pub attention_budget: usize,
    /// VAE-encoding peak of the latent cache (pixels, VAE level-0 channels), when it runs.
    pub vae_cache: Option<(usize, usize, usize)>,
    /// GPU (CUDA context and kernels' workspaces) rather than the CPU process.
    pub gpu: bool,
}

/// The UNet's LoRA layout: adapted module names and parameter counts.
#[derive(Debug, Clone)]
pub struct UNetAdapters {
    pub names: Vec<String>,
    pub frozen_params: usize,
    pub trainable_params: usize,
}

/// One part of the estimate, MiB.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    pub name: String,
    pub mib: f64,
}

/// The predicted peak and its parts (MiB).
#[derive(Debug, Clone, Serialize)]
pub struct MemoryEstimate {
    pub peak_mib: f64,
    pub parts: Vec<Part>,
    pub trainable_params: usize,
}

const MIB: f64 = 1048576.0;

/// Per-block kept values (elements) and the largest block (for the recomputation).
struct Walk {
    kept: f64,
    /// Values kept with checkpointing (block outputs, concatenations, samplers).
    kept_gc: f64,
    /// The largest single block's kept values (recomputed during a checkpointed backward).
    largest_block: f64,
    /// The largest im2col/col2im column buffer of a convolution, values.
    largest_cols: f64,
    /// The largest single activation, values.
    largest_act: f64,
    /// A trainable layer came before: blocks from here on are in the autograd graph.
    tracking: bool,
    /// The largest convolution weight, values (GEMM packing buffers scale with it).
    largest_conv: f64,
    /// The largest self-attention score block in f32 bytes (whole, or one chunk).
    largest_scores: f64,
}

fn params_of(build: impl FnOnce(&WeightSource) -> Result<()>) -> Result<usize> {
    Ok(crate::pipeline::single_file::records_of(build)?
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum())
}

impl MemoryQuery {
    /// A query for training `unet` with `lora` (and the text encoder with it when
    /// `train_text_encoder`), the text encoder and VAE resident when given, `latent` (h, w),
    /// the chunk budget of the device.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        unet: UNetConfig,
        text: Option<&ClipTextConfig>,
        vae: Option<&VaeConfig>,
        lora: LoraConfig,
        train_text_encoder: bool,
        latent: (usize, usize),
        batch: usize,
        dtype_bytes: usize,
        gradient_checkpointing: bool,
        gpu: bool,
    ) -> Result<Self> {
        let te_params = match text {
            Some(t) => params_of(|ws| ClipTextModel::new(t, ws).map(|_| ()))?,
            None => 0,
        };
        let vae_params = match vae {
            Some(v) => params_of(|ws| AutoencoderKL::new(v, ws).map(|_| ()))?,
            None => 0,
        };
        let text_encoder = match (train_text_encoder, text) {
            (false, _) => None,
            (true, None) => bail!("training the text encoder, but the model has none"),
            (true, Some(t)) => {
                let mut te = ClipTextModel::new(t, &WeightSource::meta(candle_core::DType::F32))?;
                let s = te.inject_lora(&lora.for_text_encoder(TEXT_INJECTABLE), &VarMap::new())?;
                Some((s.trainable_params, t.hidden_size, t.num_hidden_layers))
            }
        };
        // the UNet's structure only (no weights), to count adapters
        let mut meta = UNet2DConditionModel::meta(&unet)?;
        let summary = meta.inject_lora(&lora, &VarMap::new())?;
        let adapters = UNetAdapters {
            names: summary.layers.iter().map(|l| l.name.clone()).collect(),
            frozen_params: summary.total_params - summary.trainable_params,
            trainable_params: summary.trainable_params,
        };
        let f = vae.map_or(8, |v| v.downsample_factor());
        Ok(Self {
            unet,
            other_params: te_params + vae_params,
            text_encoder,
            latent,
            batch,
            dtype_bytes,
            adapters,
            gradient_checkpointing,
            attention_budget: if gpu {
                crate::ops::ATTENTION_CHUNK_BYTES
            } else {
                crate::ops::ATTENTION_CHUNK_BYTES_CPU
            },
            vae_cache: vae.map(|v| (latent.0 * f, latent.1 * f, v.block_out_channels[0])),
            gpu,
        })
    }

    /// The estimate (arithmetic only).
    pub fn estimate(&self) -> Result<MemoryEstimate> {
        let s = self.dtype_bytes as f64;
        let w = self.walk(&self.adapters.names)?;
        let unet_params = self.adapters.frozen_params;
        let te = self.text_encoder.unwrap_or((0, 0, 0));
        let trainable = self.adapters.trainable_params + te.0;
        let weights = (unet_params + self.other_params) as f64 * s;
        // LoRA tensors, their gradients and AdamW's two moments, all f32
        let state = trainable as f64 * 16.0;
        let b = self.batch as f64;
        let kept = if self.gradient_checkpointing {
            w.kept_gc
        } else {
            w.kept
        } * s;
        // measured (memory_probe, SD 1.5 and tiny): the GEMM's packing buffers stay allocated
        // at ~0.17 x the largest convolution weight plus 3 MiB, and the backward's transient
        // never falls below ~0.4 x that weight
        let gemm = 3.0 * MIB + 0.17 * w.largest_conv * s;
        // the backward's workspace: gradients in flight with a convolution's columns, or the
        // attention backward's ~4 score-sized blocks (scores, probabilities and their
        // gradients) of one chunk; with checkpointing on top of the largest block recomputed
        let workspace = ((3.0 * w.largest_act + w.largest_cols) * s)
            .max(0.4 * w.largest_conv * s)
            .max(4.0 * w.largest_scores);
        let recompute = if self.gradient_checkpointing {
            w.largest_block * s
        } else {
            0.0
        };
        let transient = workspace + recompute + gemm;
        // the text encoder's activations when it trains: ~20 values per token and width per layer
        let te_acts = if te.0 > 0 {
            // per layer ~20 values per token and channel (norms, q/k/v and their head copies,
            // 77 x 77 scores per head, the 4x MLP); checkpointed: each layer's output, and one
            // layer recomputed
            let per_layer = 20.0 * 77.0 * te.1 as f64 * b * s;
            if self.gradient_checkpointing {
                per_layer + te.2 as f64 * 77.0 * te.1 as f64 * b * s
            } else {
                per_layer * te.2 as f64
            }
        } else {
            0.0
        };
        // the binary, its libraries and the allocator's slack (~3% of what training allocates)
        let baseline = if self.gpu {
            450.0 * MIB
        } else {
            12.0 * MIB + 0.03 * (kept + transient + te_acts)
        };
        let caching = match self.vae_cache {
            // one image through the VAE encoder (no graph): ~5.5 activations of the first
            // level's c0 channels at full resolution, beside the 3x3 convolutions' im2col
            // columns (9 x c0 values per pixel, built in bands of at most 64 MiB). Measured for
            // SD 1.5's VAE: 221, 770 and 1,730 MiB at 256, 512 and 768 px.
            Some((h, wd, c0)) => {
                let level0 = (c0 * h * wd) as f64 * s;
                5.5 * level0 + (9.0 * level0).min(64.0 * MIB)
            }
            None => 0.0,
        };
        let training = kept + transient + te_acts;
        let peak = weights + state + baseline + training.max(caching);
        let parts = vec![
            Part::new("frozen weights", weights),
            Part::new("LoRA + gradients + AdamW state", state),
            Part::new("activations kept for backward", kept + te_acts),
            Part::new(
                "backward workspace (gradients in flight, GEMM columns)",
                transient,
            ),
            Part::new("latent caching (VAE encoder, before training)", caching),
            Part::new(
                if self.gpu {
                    "CUDA context"
                } else {
                    "process baseline"
                },
                baseline,
            ),
        ];
        Ok(MemoryEstimate {
            peak_mib: peak / MIB,
            parts,
            trainable_params: trainable,
        })
    }

    fn walk(&self, adapted: &[String]) -> Result<Walk> {
        let cfg = &self.unet;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let layers = cfg.layers_per_block.expand(n, "layers_per_block")?;
        let heads = cfg.heads()?;
        let depth = cfg.transformer_layers()?;
        let b = self.batch as f64;
        let budget = self.attention_budget as f64;
        // the fused CPU kernel holds one 64 x 128 tile per thread, never a score matrix
        let fused = !self.gpu && crate::ops::fused_attention();
        let (mut h, mut wd) = self.latent;
        let mut hw = Vec::new();
        for _ in 0..n {
            hw.push((h * wd) as f64);
            h = h.div_ceil(2);
            wd = wd.div_ceil(2);
        }
        let has = |prefix: &str| adapted.iter().any(|a| a.starts_with(prefix));
        let lora_in = |prefix: &str, kind: &str| {
            adapted
                .iter()
                .filter(|a| a.starts_with(prefix) && a.contains(kind))
                .count() as f64
        };
        let mut walk = Walk {
            kept: 0.0,
            kept_gc: 0.0,
            largest_block: 0.0,
            largest_cols: 0.0,
            largest_act: 0.0,
            tracking: false,
            largest_conv: 0.0,
            largest_scores: 0.0,
        };
        // a resnet: kept values per pixel 2 Cin + 6 Cout (+ Cout shortcut), LoCon 2 Cout each
        let resnet = |walk: &mut Walk, name: &str, cin: f64, cout: f64, px: f64| {
            walk.tracking |= has(name);
            let shortcut = if cin != cout { cout } else { 0.0 };
            let convs = lora_in(name, "conv");
            let v = b * px * (2.0 * cin + 6.0 * cout + shortcut + 2.0 * cout * convs);
            if walk.tracking {
                walk.kept += v;
            }
            walk.kept_gc += b * px * cout;
            walk.largest_block = walk.largest_block.max(v);
            walk.largest_cols = walk.largest_cols.max(9.0 * cin * b * px);
            walk.largest_act = walk.largest_act.max(b * px * cin.max(cout));
            walk.largest_conv = walk.largest_conv.max(9.0 * cin * cout);
        };
        let attn_blocks = |walk: &mut Walk, name: &str, c: f64, px: f64, heads: f64, d: usize| {
            walk.tracking |= has(name);
            let t = 77.0;
            // attention scores: the fused CPU kernel and the chunked path keep the row
            // log-sum-exp only; the plain path (small layers elsewhere) scores + probabilities
            let scores = |m: f64| {
                if !fused && b * heads * px * m * 4.0 <= budget {
                    2.0 * b * heads * px * m
                } else {
                    b * heads * px
                }
            };
            let linears = lora_in(name, "attn1.to_") + lora_in(name, "attn2.to_q");
            let other = lora_in(name, "ff.") + lora_in(name, "proj_");
            let per_block = b * px * c * 36.0
                + scores(px)
                + scores(t)
                + 4.0 * b * t * c
                + 2.0 * b * px * c * (linears + other) / d as f64;
            let v = b * px * c * 5.0 + per_block * d as f64;
            if !fused {
                walk.largest_scores = walk
                    .largest_scores
                    .max((b * heads * px * px * 4.0).min(budget));
            }
            if walk.tracking {
                walk.kept += v;
            }
            walk.kept_gc += b * px * c;
            walk.largest_block = walk.largest_block.max(v);
            walk.largest_act = walk.largest_act.max(b * px * c * 8.0);
        };
        // down path
        let mut skips = vec![ch[0] as f64 * hw[0]];
        for i in 0..n {
            let cross = cfg.down_block_types[i].contains("CrossAttn");
            let mut cin = if i == 0 { ch[0] } else { ch[i - 1] } as f64;
            let c = ch[i] as f64;
            for j in 0..layers[i] {
                let p = format!("down_blocks.{i}.resnets.{j}.");
                resnet(&mut walk, &p, cin, c, hw[i]);
                cin = c;
                if cross {
                    let p = format!("down_blocks.{i}.attentions.{j}.");
                    attn_blocks(&mut walk, &p, c, hw[i], heads[i] as f64, depth[i]);
                }
                skips.push(c * hw[i]);
            }
            if i + 1 < n {
                let v = b * c * hw[i + 1];
                if walk.tracking {
                    walk.kept += v;
                }
                walk.kept_gc += v;
                walk.largest_cols = walk.largest_cols.max(9.0 * c * b * hw[i + 1]);
                skips.push(c * hw[i + 1]);
            }
        }
        // mid
        let c = ch[n - 1] as f64;
        resnet(&mut walk, "mid_block.resnets.0.", c, c, hw[n - 1]);
        attn_blocks(
            &mut walk,
            "mid_block.attentions.0.",
            c,
            hw[n - 1],
            heads[n - 1] as f64,
            depth[n - 1],
        );
        resnet(&mut walk, "mid_block.resnets.1.", c, c, hw[n - 1]);
        // up path (levels in reverse), each resnet on [h, skip] concatenated
        let mut prev = c;
        for (u, i) in (0..n).rev().enumerate() {
            let cross = cfg.up_block_types[u].contains("CrossAttn");
            let c = ch[i] as f64;
            for j in 0..=layers[i] {
                let skip = skips.pop().unwrap_or(0.0) / hw[i];
                let cin = prev + skip;
                let cat = b * cin * hw[i];
                if walk.tracking {
                    walk.kept += cat;
                }
                walk.kept_gc += cat;
                let p = format!("up_blocks.{u}.resnets.{j}.");
                resnet(&mut walk, &p, cin, c, hw[i]);
                prev = c;
                if cross {
                    let p = format!("up_blocks.{u}.attentions.{j}.");
                    attn_blocks(&mut walk, &p, c, hw[i], heads[i] as f64, depth[i]);
                }
            }
            if i > 0 {
                // nearest upsampling, then a 3x3 convolution, at the next level's size
                let v = 2.0 * b * c * hw[i - 1];
                walk.kept += v;
                walk.kept_gc += v;
                walk.largest_cols = walk.largest_cols.max(9.0 * c * b * hw[i - 1]);
            }
        }
        // norm, SiLU, conv_out, the loss
        let tail = b * hw[0] * (2.0 * ch[0] as f64 + 4.0 * 4.0);
        walk.kept += tail;
        walk.kept_gc += tail;
        Ok(walk)
    }
}

impl Part {
    fn new(name: &str, bytes: f64) -> Self {
        Self {
            name: name.into(),
            mib: bytes / MIB,
        }
    }
}
