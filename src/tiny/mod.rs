//! The embedded default: a miniature Stable Diffusion (same architecture and code path, small
//! config) pre-trained by us on synthetic scenes, shipped in `assets/tiny-sd/`, and the data
//! and checks around it.

pub mod demo;
pub mod metrics;
pub mod pretrain;
pub mod scenes;

/// The shipped tiny model's folder (a diffusers pipeline layout): `$SD_LORA_TINY_MODEL` when
/// set, else `assets/tiny-sd` of the source tree this was built from, else `assets/tiny-sd`
/// under the current folder (a binary copied to another machine, run in a checkout).
pub fn tiny_model_dir() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("SD_LORA_TINY_MODEL") {
        return p.into();
    }
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-sd");
    if built.is_dir() {
        return built;
    }
    std::path::PathBuf::from("assets/tiny-sd")
}
