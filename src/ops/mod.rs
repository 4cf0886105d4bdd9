//! Differentiable fused ops with hand-written backward passes.
//!
//! candle's `softmax_last_dim` and fused `layer_norm` record no backward op, so a loss computed
//! through them silently yields no gradient. The ops here are custom ops whose CPU forward and
//! backward are single fused passes over rows; on other devices they fall back to compositions of
//! candle primitives, which candle differentiates itself. Half-precision inputs are computed in
//! f32, f64 in f64.

mod attention;
pub mod checkpoint;
mod col2im;
mod cpu;
mod flash;
mod frozen;
mod geglu;
mod group_norm;
mod norm;
mod rows;
mod silu;
mod simd;
mod softmax;
mod stored;

pub use attention::{
    attention, attention_chunk_bytes, attention_chunk_rows, set_attention_chunk_bytes,
    ATTENTION_CHUNK_BYTES, ATTENTION_CHUNK_BYTES_CPU,
};
pub use checkpoint::{backward_with_checkpoints, checkpoint};
pub use col2im::{conv2d_im2col, conv2d_input_grad};
pub use flash::{flash_attention, fused_attention, set_fused_attention};
pub use frozen::{frozen_conv2d, frozen_linear};
pub use geglu::geglu;
pub use group_norm::group_norm;
pub use norm::{layer_norm, layer_norm_composed};
pub use rows::{exp_sub_rows, logsumexp_rows, mul_sub_rows};
pub use silu::silu;
pub use simd::{simd_level, SimdLevel};
pub use softmax::softmax_last_dim;
