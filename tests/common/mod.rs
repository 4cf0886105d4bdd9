//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn golden(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/data")
        .join(path)
}

pub fn load(path: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden(path), &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {path}: {e}"))
}

/// max|a - b|.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap())
}

/// max|t|.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max|a - b| / max|b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let diff = max_abs_diff(a, b);
    let scale = max_abs(b);
    diff / scale.max(1e-12)
}

/// OpenAI's CLIP BPE list, fetched by scripts/fetch-clip-bpe.sh (part of scripts/test.sh).
pub fn clip_bpe() -> PathBuf {
    let p = sd_lora::text::default_clip_bpe();
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-clip-bpe.sh",
        p.display()
    );
    p
}

/// A copy of the tiny diffusers pipeline fixture with a `tokenizer/` built from the real BPE.
pub fn tiny_pipeline() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&golden("tiny_pipeline"), dir.path());
    sd_lora::text::write_clip_vocab(&clip_bpe(), &dir.path().join("tokenizer")).unwrap();
    dir
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Four small RGB images (40x30) with distinct colours in `dir`.
pub fn write_images(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..4u8 {
        let img = image::RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb([
                (x as u8).wrapping_mul(6).wrapping_add(i * 60),
                (y as u8) * 8,
                200 - i * 40,
            ])
        });
        img.save(dir.join(format!("img{i}.png"))).unwrap();
    }
}

/// [`write_images`] into `<dir>/images`, loaded at 32x32 with the caption "a red circle".
pub fn tiny_dataset(dir: &std::path::Path) -> sd_lora::data::ImageFolder {
    let imgs = dir.join("images");
    write_images(&imgs);
    sd_lora::data::ImageFolder::load(
        &imgs,
        &sd_lora::data::DataConfig {
            width: 32,
            height: 32,
            captions: sd_lora::data::CaptionSource::Fixed("a red circle".into()),
            ..Default::default()
        },
    )
    .unwrap()
}

/// PSNR of images in [0, 1], dB.
pub fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    10.0 * (1.0 / mse.max(1e-20)).log10()
}

/// The tiny pipeline fixture's generation settings (make_golden_pipeline.py): the fifth
/// prompt, a negative prompt, DDIM 6 steps, guidance 5, 32 px, two images from `latents`.
pub fn pipeline_config(latents: &Tensor) -> sd_lora::pipeline::GenerateConfig {
    sd_lora::pipeline::GenerateConfig {
        prompt: "a red circle on a blue background".into(),
        negative_prompt: "blurry, low quality".into(),
        steps: 6,
        guidance: 5.0,
        scheduler: sd_lora::scheduler::SchedulerKind::Ddim,
        width: 32,
        height: 32,
        num_images: 2,
        latents: Some(latents.clone()),
        ..Default::default()
    }
}
