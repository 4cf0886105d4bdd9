//! Text side of Stable Diffusion: the CLIP tokenizer and text encoder.

pub mod clip;
pub mod ldm_names;
pub mod tokenizer;

pub use clip::{ClipTextConfig, ClipTextModel};
pub use tokenizer::{default_clip_bpe, write_clip_vocab, ClipTokenizer};
