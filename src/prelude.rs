//! Everything a notebook or script needs: `use sd_lora::prelude::*;`.

pub use crate::data::{CaptionSource, DataConfig, ImageFolder};
pub use crate::lora::io::{save_lora, save_lora_as};
pub use crate::lora::{
    group_digits, LoraConfig, LoraFile, LoraFormat, LoraInit, LoraLinear, LoraModel, LoraSummary,
};
pub use crate::pipeline::{image_grid, GenerateConfig, Images, LoadOptions, StableDiffusion};
pub use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
pub use crate::text::{ClipTextModel, ClipTokenizer};
pub use crate::train::{LatentCache, LrSchedule, StepRecord, TrainConfig, Trainer};
pub use crate::unet::{UNet2DConditionModel, UNetConfig};
pub use crate::vae::AutoencoderKL;
pub use crate::weights::{save_weights, WeightSource};
pub use anyhow::Result;
pub use candle_core::{DType, Device, Tensor, Var, D};
pub use candle_nn::VarMap;
