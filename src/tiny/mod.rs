//! The embedded default: a miniature Stable Diffusion (same architecture and code path, small
//! config) pre-trained by us on synthetic scenes, shipped in `assets/tiny-sd/`, and the data
//! and checks around it.

pub mod demo;
pub mod metrics;
pub mod pretrain;
pub mod scenes;

/// The shipped tiny model's folder (a diffusers pipeline layout).
pub fn tiny_model_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-sd")
}
