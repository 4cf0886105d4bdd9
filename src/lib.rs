//! # sd-lora
//!
//! LoRA fine-tuning of Stable Diffusion in Rust with candle: a trainable
//! `UNet2DConditionModel` whose tensor paths equal diffusers checkpoint keys, LoRA layers
//! injectable by module name (the tutorial's `LoRALayer` / `inject_lora_into_unet`), and LoRA
//! files in the formats diffusers, PEFT and kohya/A1111/ComfyUI read.
//!
//! Notebooks start with `use sd_lora::prelude::*;`. ARCHITECTURE.md maps the modules; a lower
//! layer never imports a higher one (checked by `tests/layers.rs`).

pub mod commands;
pub mod data;
pub mod device;
pub mod io;
pub mod lora;
pub mod nn;
pub mod ops;
pub mod pipeline;
pub mod plot;
pub mod prelude;
pub mod scheduler;
pub mod text;
pub mod tiny;
pub mod train;
pub mod unet;
pub mod vae;
pub mod weights;
