//! What `sd-lora train` writes at the end of a run: loss curve, LoRA anatomy, both LoRA files
//! with kohya's `ss_*` metadata (bucket histogram included).

use anyhow::Result;

use super::train::TrainOptions;
use crate::data::ImageFolder;
use crate::lora::io::KohyaTrainingMetadata;
use crate::lora::{LoraFormat, LoraModel};
use crate::pipeline::GenerateConfig;
use crate::pipeline::StableDiffusion;
use crate::train::{StepHook, StepRecord, Trainer};

/// Python's spelling of a bool, as kohya writes its metadata.
fn py_bool(b: bool) -> String {
    if b { "True" } else { "False" }.to_string()
}

/// With buckets: a histogram line for the log, and kohya's `ss_*` bucket metadata.
pub(crate) fn bucket_info(
    opts: &TrainOptions,
    data: &ImageFolder,
) -> Option<(String, Vec<(String, String)>)> {
    let b = opts.data_config.buckets.as_ref()?;
    let hist = data.bucket_histogram();
    let line = hist
        .iter()
        .map(|((w, h), n)| format!("{w}x{h}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let err: f64 = data
        .examples
        .iter()
        .map(|e| {
            let d = e.pixels.dims();
            let (ow, oh) = e.original_size;
            (d[2] as f64 / d[1] as f64 - ow as f64 / oh as f64).abs()
        })
        .sum::<f64>()
        / data.len().max(1) as f64;
    let mut buckets = serde_json::Map::new();
    for (i, ((w, h), n)) in hist.iter().enumerate() {
        buckets.insert(
            i.to_string(),
            serde_json::json!({"resolution": [w, h], "count": n}),
        );
    }
    let info = serde_json::json!({"buckets": buckets, "mean_img_ar_error": err});
    Some((
        format!(
            "buckets ({} images; mean aspect-ratio error {err:.4}): {line}",
            data.len()
        ),
        vec![
            ("ss_min_bucket_reso".into(), b.min_reso.to_string()),
            ("ss_max_bucket_reso".into(), b.max_reso.to_string()),
            ("ss_bucket_reso_steps".into(), b.steps.to_string()),
            ("ss_bucket_no_upscale".into(), py_bool(b.no_upscale)),
            ("ss_bucket_info".into(), info.to_string()),
        ],
    ))
}

/// kohya's dataset entries: `ss_dataset_dirs`, `ss_tag_frequency`, caption processing.
fn dataset_metadata(trainer: &Trainer, data: &ImageFolder) -> Result<Vec<(String, String)>> {
    let dirs: serde_json::Map<String, serde_json::Value> = data
        .dataset_dirs()
        .into_iter()
        .map(|(d, (repeats, n))| (d, serde_json::json!({"n_repeats": repeats, "img_count": n})))
        .collect();
    let c = &trainer.config;
    Ok(vec![
        (
            "ss_dataset_dirs".into(),
            serde_json::Value::Object(dirs).to_string(),
        ),
        (
            "ss_tag_frequency".into(),
            serde_json::to_string(&data.tag_frequency())?,
        ),
        ("ss_shuffle_caption".into(), py_bool(c.shuffle_caption)),
        ("ss_keep_tokens".into(), c.keep_tokens.to_string()),
        (
            "ss_caption_tag_dropout_rate".into(),
            c.caption_tag_dropout.to_string(),
        ),
    ])
}

/// The data a run trained on: its images and, with prior preservation, the class images.
pub(crate) struct RunData<'a> {
    pub data: &'a ImageFolder,
    pub class: Option<&'a ImageFolder>,
}

/// Loss curve, LoRA anatomy and both LoRA files (kohya with `ss_*` metadata, PEFT).
pub(crate) fn write_outputs(
    opts: &TrainOptions,
    sd: &StableDiffusion,
    trainer: &Trainer,
    run: &RunData,
    total: usize,
) -> Result<()> {
    let data = run.data;
    let out = &opts.out;
    if !trainer.history.is_empty() {
        let fig = crate::plot::loss_curve(&trainer.history)?;
        fig.save(out.join("loss.svg"))?;
        fig.save(out.join("loss.png"))?;
    }
    let convs = sd
        .unet
        .adapted_layers()?
        .iter()
        .filter(|l| l.adapter.is_conv())
        .count();
    if convs > 0 {
        eprintln!("note: anatomy.svg and spectrum.svg show the linear adapters; the {convs} conv adapters are not drawn");
    }
    let anatomy = crate::plot::LoraAnatomy::of(&sd.unet)?;
    anatomy.heatmap()?.save(out.join("anatomy.svg"))?;
    anatomy
        .spectrum(&format!("rank {}", opts.lora.rank))?
        .save(out.join("spectrum.svg"))?;
    let c = &trainer.config;
    let meta = KohyaTrainingMetadata {
        learning_rate: c.lr,
        text_encoder_lr: c
            .train_text_encoder
            .then(|| c.text_encoder_lr.unwrap_or(c.lr)),
        num_epochs: c.epochs,
        max_train_steps: total,
        train_batch_size: c.batch_size,
        gradient_accumulation_steps: c.grad_accum,
        lr_scheduler: format!("{:?}", c.schedule),
        lr_warmup_steps: c.warmup_steps,
        seed: c.seed,
        num_train_images: data.items(),
        resolution: (opts.data_config.width, opts.data_config.height),
        min_snr_gamma: c.min_snr_gamma,
        noise_offset: c.noise_offset,
        caption_dropout_rate: c.caption_dropout,
        save_precision: opts.save_dtype,
    };
    let kohya = out.join("lora.safetensors");
    let mut meta = meta.to_metadata();
    meta.insert(
        "ss_enable_bucket".into(),
        py_bool(opts.data_config.buckets.is_some()),
    );
    meta.extend(bucket_info(opts, data).into_iter().flat_map(|b| b.1));
    meta.extend(dataset_metadata(trainer, data)?);
    meta.extend(super::train_dreambooth::metadata(opts, run.class));
    meta.insert(
        "ss_gradient_checkpointing".into(),
        py_bool(c.gradient_checkpointing),
    );
    let precision = match (opts.dtype, trainer.scaler.is_some()) {
        (candle_core::DType::F16, _) | (_, true) => "fp16",
        (candle_core::DType::BF16, _) => "bf16",
        _ => "no",
    };
    meta.insert("ss_mixed_precision".into(), precision.into());
    sd.save_lora(kohya, LoraFormat::Kohya, opts.save_dtype, &meta)?;
    let peft = out.join("lora_peft.safetensors");
    sd.save_lora(peft, LoraFormat::Peft, opts.save_dtype, &Default::default())
}

/// The sampling hook: every `every` steps and at the last one (a failure is a warning).
pub(crate) struct Samples<'a> {
    pub opts: &'a TrainOptions,
    pub sd: &'a StableDiffusion,
}

impl Samples<'_> {
    pub fn write(&self, step: usize) -> Result<()> {
        let Some(s) = &self.opts.samples else {
            return Ok(());
        };
        for (i, prompt) in s.prompts.iter().enumerate() {
            let images = self.sd.generate(&GenerateConfig {
                prompt: prompt.clone(),
                steps: s.steps,
                seed: i as u64,
                width: self.opts.data_config.width,
                height: self.opts.data_config.height,
                ..Default::default()
            })?;
            let name = format!("step-{step:06}-{i}.png");
            images.save(self.opts.out.join("samples").join(name))?;
        }
        Ok(())
    }
}

impl StepHook for Samples<'_> {
    fn after_step(&mut self, _: &Trainer, r: &StepRecord, total: usize) -> Result<()> {
        let every = self.opts.samples.as_ref().map_or(0, |s| s.every);
        if every > 0 && (r.step.is_multiple_of(every) || r.step == total) {
            if let Err(e) = self.write(r.step) {
                eprintln!("\nwarning: samples at step {} failed: {e:#}", r.step);
            }
        }
        Ok(())
    }
}
