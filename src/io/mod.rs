//! General file I/O shared by every layer above: atomic safetensors writes and where models
//! come from (a local diffusers folder, a Hugging Face repo id, the embedded tiny model).
//! Imports nothing from the rest of the crate.

pub mod atomic;
pub mod model_source;

pub use atomic::write_safetensors_atomic;
pub use model_source::{resolve_model, tiny_model_dir, ModelName, DEFAULT_MODEL};
