//! Everything a notebook or script needs: `use sd_lora::prelude::*;`.

pub use crate::data::{image_to_tensor, tensor_to_image, CaptionSource, DataConfig, ImageFolder};
pub use crate::device::{peak_rss_mib, reset_peak_rss};
pub use crate::lora::io::{save_adapters, save_lora, save_lora_as};
pub use crate::lora::{
    group_digits, AdapterKind, Component, LoraApplied, LoraConfig, LoraFile, LoraFormat, LoraInit,
    LoraLinear, LoraLoad, LoraModel, LoraSummary, TEXT_INJECTABLE,
};
pub use crate::pipeline::{GenerateConfig, Images, LoadOptions, StableDiffusion};
pub use crate::plot::{
    bar_chart, image_grid, labelled_grid, loss_curve, loss_curves, run_comparison, spectra_chart,
    strength_strip, Figure, LoraAnatomy, LossRun, Png, RunStats, Svg,
};
pub use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
pub use crate::text::{ClipTextModel, ClipTokenizer};
pub use crate::tiny::eval::{colour_match, demo_prompts, sample_prompts};
pub use crate::tiny::metrics::{dominant_colour, mean_style_score, style_score, StyleScore};
pub use crate::tiny::scenes::{scenes, write_dataset, Look, Scene};
pub use crate::tiny::tiny_model_dir;
pub use crate::train::{
    AdamW, Checkpoints, ClassImages, Denoising, LatentCache, LrSchedule, Objective,
    PriorPreservation, Progress, ProgressMode, StepHook, StepRecord, TrainConfig, Trainer,
};
pub use crate::unet::{UNet2DConditionModel, UNetConfig};
pub use crate::vae::AutoencoderKL;
pub use crate::weights::{randn_seeded, save_weights, WeightSource};
pub use anyhow::{Context, Result};
pub use candle_core::{DType, Device, Tensor, Var, D};
pub use candle_nn::VarMap;
pub use image::RgbImage;
