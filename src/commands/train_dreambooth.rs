//! `sd-lora train`'s DreamBooth flags (diffusers' `train_dreambooth_lora.py`): an instance
//! prompt for every training image, and prior preservation with class images the base model
//! generates (see [`crate::train::dreambooth`]).

use anyhow::{ensure, Result};
use std::path::PathBuf;

use super::args::{count, non_negative, positive};
use super::train::TrainOptions;
use crate::data::{CaptionSource, DataConfig, ImageFolder};
use crate::pipeline::{GenerateConfig, StableDiffusion};
use crate::train::{ClassImages, ProgressMode};

/// DreamBooth and prior preservation.
#[derive(Debug, Clone, clap::Args)]
pub struct DreamBoothArgs {
    /// DreamBooth: the caption of every training image, with a rare token naming the subject
    /// (e.g. "a photo of sks dog"). Same as --caption TEXT.
    #[arg(long, conflicts_with = "caption")]
    pub instance_prompt: Option<String>,
    /// Prior preservation: a folder of class images (created when missing; topped up to
    /// --num-class-images with images the base model generates from --class-prompt).
    #[arg(long, requires = "class_prompt")]
    pub class_data: Option<PathBuf>,
    /// The class images' caption and generation prompt (e.g. "a photo of dog").
    #[arg(long, requires = "class_data")]
    pub class_prompt: Option<String>,
    /// Weight of the class images' loss.
    #[arg(long, default_value_t = 1.0, value_parser = non_negative, allow_negative_numbers = true, requires = "class_data")]
    pub prior_loss_weight: f64,
    /// Class images to train with (missing ones are generated first and kept in --class-data).
    #[arg(long, default_value_t = 100, value_parser = count, requires = "class_data")]
    pub num_class_images: usize,
    /// Denoising steps per generated class image.
    #[arg(long, default_value_t = GenerateConfig::default().steps, value_parser = count, requires = "class_data")]
    pub class_steps: usize,
    /// Guidance scale of the class-image generation.
    #[arg(long, default_value_t = GenerateConfig::default().guidance, value_parser = positive, allow_negative_numbers = true, requires = "class_data")]
    pub class_guidance: f64,
}

/// Prior preservation as the library sees it.
#[derive(Debug, Clone)]
pub struct PriorOptions {
    pub class: ClassImages,
    pub prior_loss_weight: f64,
}

impl DreamBoothArgs {
    /// The instance captions, when an instance prompt is given.
    pub fn captions(&self) -> Option<CaptionSource> {
        self.instance_prompt.clone().map(CaptionSource::Fixed)
    }

    /// Prior preservation at the training resolution, seeded from the run's seed.
    pub fn prior(&self, width: usize, height: usize, seed: u64) -> Option<PriorOptions> {
        let dir = self.class_data.clone()?;
        Some(PriorOptions {
            class: ClassImages {
                dir,
                prompt: self.class_prompt.clone().unwrap_or_default(),
                num_images: self.num_class_images,
                generation: GenerateConfig {
                    steps: self.class_steps,
                    guidance: self.class_guidance,
                    width,
                    height,
                    seed,
                    ..Default::default()
                },
            },
            prior_loss_weight: self.prior_loss_weight,
        })
    }
}

/// Fills the class folder with the base model `sd` (before any LoRA is applied) and reads its
/// first `num_images` images, captioned with the class prompt, as the instance data is read.
pub fn class_data(opts: &TrainOptions, sd: &StableDiffusion) -> Result<Option<ImageFolder>> {
    let Some(p) = &opts.prior else {
        return Ok(None);
    };
    let c = &p.class;
    ensure!(
        !c.prompt.trim().is_empty(),
        "--class-data needs a non-empty --class-prompt"
    );
    let report = c.ensure(sd, ProgressMode::for_stderr(), &mut |s| {
        crate::train::progress::to_stderr(s)
    })?;
    let cfg = DataConfig {
        captions: CaptionSource::Fixed(c.prompt.clone()),
        recursive: false,
        ..opts.data_config.clone()
    };
    let data = ImageFolder::load_first(&c.dir, &cfg, Some(c.num_images))?;
    for w in &data.warnings {
        eprintln!("warning: class images: {w}");
    }
    eprintln!(
        "prior preservation: {} class images from {} ({} there before, {} generated), caption {:?}, prior loss weight {}",
        data.len(),
        c.dir.display(),
        report.existing,
        report.generated.len(),
        c.prompt,
        p.prior_loss_weight
    );
    if report.existing > c.num_images {
        eprintln!(
            "note: {} holds {} images; the first {} (in name order) are used",
            c.dir.display(),
            report.existing,
            c.num_images
        );
    }
    Ok(Some(data))
}

/// kohya's regularisation-image metadata (`ss_num_reg_images`, `ss_reg_dataset_dirs`,
/// `ss_prior_loss_weight`).
pub fn metadata(opts: &TrainOptions, class: Option<&ImageFolder>) -> Vec<(String, String)> {
    let weight = opts.prior.as_ref().map_or(1.0, |p| p.prior_loss_weight);
    let mut m = vec![
        (
            "ss_num_reg_images".to_string(),
            class.map_or(0, |c| c.len()).to_string(),
        ),
        ("ss_prior_loss_weight".to_string(), weight.to_string()),
    ];
    if let Some(c) = class {
        let dirs: serde_json::Map<String, serde_json::Value> = c
            .dataset_dirs()
            .into_iter()
            .map(|(d, (r, n))| (d, serde_json::json!({"n_repeats": r, "img_count": n})))
            .collect();
        m.push((
            "ss_reg_dataset_dirs".into(),
            serde_json::Value::Object(dirs).to_string(),
        ));
    }
    m
}
