//! The embedded default: a miniature Stable Diffusion (same architecture and code path, small
//! config) pre-trained by us on synthetic scenes, shipped in `assets/tiny-sd/`, and the data
//! and checks around it. `sd-lora pretrain-tiny` ([`crate::commands::pretrain`]) makes it;
//! `sd-lora demo` ([`crate::commands::demo`]) runs the tutorial on it.

pub mod eval;
pub mod metrics;
pub mod model;
pub mod scenes;

pub use crate::io::tiny_model_dir;
