//! Implementations behind the `sd-lora` subcommands, kept in the library so they are tested.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use std::collections::BTreeMap;
use std::path::Path;

use crate::lora::io::write_safetensors_atomic;
use crate::lora::{LoraConfig, LoraFile, LoraModel, LoraSummary};
use crate::unet::{unet_dir, UNet2DConditionModel, UNetConfig};

/// `sd15`, `tiny`, a diffusers folder (its `unet/config.json` or `config.json`), or a
/// `config.json` file.
pub fn unet_config(model: &str) -> Result<UNetConfig> {
    match model {
        "sd15" | "sd-1.5" | "sd_v1_5" => Ok(UNetConfig::sd_v1_5()),
        // the shipped model's config when present (it is `UNetConfig::tiny()`)
        "tiny" => {
            let f = crate::tiny::tiny_model_dir().join("unet/config.json");
            if f.is_file() {
                UNetConfig::from_file(&f)
            } else {
                Ok(UNetConfig::tiny())
            }
        }
        path if Path::new(path).is_file() => UNetConfig::from_file(Path::new(path)),
        dir => UNetConfig::from_file(&unet_dir(Path::new(dir))?.join("config.json")),
    }
}

/// Builds the UNet structure without weights, injects LoRA and returns the summary.
pub fn inspect_model(model: &str, rank: usize, alpha: f64, targets: &str) -> Result<LoraSummary> {
    let cfg = unet_config(model)?;
    let mut unet = UNet2DConditionModel::meta(&cfg)?;
    let lcfg = LoraConfig::new(rank, alpha).with_targets(&LoraConfig::parse_targets(targets));
    unet.inject_lora(&lcfg, &VarMap::new())
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "fp32" => Ok(DType::F32),
        "f16" | "fp16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => bail!("unknown dtype `{other}` (f32, f16 or bf16)"),
    }
}

/// Reads `sample`, `timestep`, `encoder_hidden_states` from `inputs`, runs the UNet (with an
/// optional LoRA at `lora_scale`) and writes `sample` to `out`. Returns a one-line report.
pub fn unet_forward(
    model: &Path,
    inputs: &Path,
    out: &Path,
    lora: Option<&Path>,
    lora_scale: f64,
    variant: Option<&str>,
    dtype: DType,
) -> Result<String> {
    let device = Device::Cpu;
    if dtype == DType::BF16 && device.is_cpu() {
        bail!("bf16 compute is not available on the CPU (candle has no bf16 matmul there): use f32 or f16");
    }
    let tensors = candle_core::safetensors::load(inputs, &device)
        .with_context(|| format!("cannot read inputs {}", inputs.display()))?;
    let get = |name: &str| -> Result<Tensor> {
        tensors.get(name).cloned().with_context(|| {
            let mut have: Vec<_> = tensors.keys().cloned().collect();
            have.sort();
            format!(
                "inputs {} have no tensor `{name}` (found: {})",
                inputs.display(),
                have.join(", ")
            )
        })
    };
    let (sample, t, ehs) = (
        get("sample")?,
        get("timestep")?,
        get("encoder_hidden_states")?,
    );
    let mut unet = UNet2DConditionModel::load(model, variant, dtype, &device)?;
    let mut note = String::new();
    if let Some(path) = lora {
        let file = LoraFile::read(path, &unet.linear_names()?)?;
        let s = unet.apply_lora_file(&file, &VarMap::new())?;
        unet.set_lora_scale(lora_scale)?;
        note = format!(
            ", LoRA {:?} {} layers, {} params, scale {lora_scale}{}",
            file.format,
            s.lora_layers,
            s.trainable_params,
            if file.skipped.is_empty() {
                String::new()
            } else {
                format!(" ({} text-encoder tensors ignored)", file.skipped.len())
            }
        );
    }
    let y = unet
        .forward(&sample, &t, &ehs)
        .with_context(|| format!("running the UNet on {}", inputs.display()))?
        .to_dtype(DType::F32)?;
    let mut map = BTreeMap::new();
    map.insert("sample".to_string(), y.clone());
    write_safetensors_atomic(&map, None, out)?;
    Ok(format!("wrote {} {:?}{note}", out.display(), y.dims()))
}

/// Everything `sd-lora generate` needs.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub model: String,
    pub variant: Option<String>,
    pub dtype: DType,
    /// Where to run (see [`crate::device::parse_device`]).
    pub device: Device,
    /// LoRA files, stacked; `lora_scales[i]` is the strength of `loras[i]` (default 1.0).
    pub loras: Vec<std::path::PathBuf>,
    pub lora_scales: Vec<f64>,
    pub merge: bool,
    /// Render the same seeds at each LoRA strength into one grid (needs `loras`).
    pub strengths: Vec<f64>,
    pub latents: Option<std::path::PathBuf>,
    pub out: std::path::PathBuf,
    pub config: crate::pipeline::GenerateConfig,
}

/// Loads the pipeline (and LoRA), generates, writes PNGs; returns the paths written.
pub fn generate(opts: GenerateOptions) -> Result<Vec<std::path::PathBuf>> {
    use crate::pipeline::{LoadOptions, StableDiffusion};
    let device = opts.device.clone();
    if opts.dtype == DType::BF16 && device.is_cpu() {
        bail!("bf16 compute is not available on the CPU (candle has no bf16 matmul there): use f32 or f16");
    }
    if opts.lora_scales.len() > opts.loras.len() {
        bail!(
            "{} --lora-scale values for {} --lora files",
            opts.lora_scales.len(),
            opts.loras.len()
        );
    }
    if let Some(s) = opts.lora_scales.iter().find(|s| !s.is_finite()) {
        bail!("--lora-scale must be a finite number, got {s}");
    }
    let mut cfg = opts.config.clone();
    if let Some(p) = &opts.latents {
        let t = candle_core::safetensors::load(p, &device)
            .with_context(|| format!("cannot read latents {}", p.display()))?;
        let l = t
            .get("latents")
            .with_context(|| format!("{} has no tensor `latents`", p.display()))?
            .to_dtype(DType::F32)?;
        cfg.num_images = l
            .dim(0)
            .with_context(|| format!("`latents` in {} must be [N, C, h, w]", p.display()))?;
        cfg.latents = Some(l);
    }
    let mut sd = StableDiffusion::load_with(&LoadOptions {
        source: opts.model.clone(),
        variant: opts.variant.clone(),
        dtype: opts.dtype,
        device: device.clone(),
        cache_dir: None,
    })?;
    let names = sd.unet.linear_names()?;
    for (i, path) in opts.loras.iter().enumerate() {
        let file = LoraFile::read(path, &names)?;
        let adapter = if i == 0 {
            crate::lora::DEFAULT_ADAPTER.to_string()
        } else {
            format!("lora{i}")
        };
        sd.unet
            .apply_lora_file_as(&file, &adapter, &VarMap::new())?;
        sd.unet
            .set_adapter_scale(&adapter, opts.lora_scales.get(i).copied().unwrap_or(1.0))?;
    }
    if !opts.strengths.is_empty() {
        if opts.loras.is_empty() {
            bail!("--strengths compares LoRA strengths: give at least one --lora");
        }
        if opts.merge {
            bail!(
                "--strengths and --merge exclude each other (merged weights have a fixed strength)"
            );
        }
        let rows = sd.generate_at_strengths(&cfg, &opts.strengths)?;
        let images: Vec<Vec<image::RgbImage>> = rows.into_iter().map(|r| r.images).collect();
        let row_labels: Vec<String> = opts
            .strengths
            .iter()
            .map(|s| format!("strength {s}"))
            .collect();
        let col_labels: Vec<String> = (0..cfg.num_images)
            .map(|i| format!("image {i} (seed {})", cfg.seed))
            .collect();
        let title = format!("{:?}", cfg.prompt);
        crate::plot::labelled_grid(&images, &row_labels, &col_labels, Some(&title))?
            .save(&opts.out)?;
        eprintln!(
            "grid rows = LoRA strengths {:?}, columns = images",
            opts.strengths
        );
        return Ok(vec![opts.out.clone()]);
    }
    if opts.merge && !opts.loras.is_empty() {
        sd.unet.merge_lora()?;
    }
    let started = std::time::Instant::now();
    let images = sd.generate_with_progress(&cfg, &mut |i, n| {
        eprint!(
            "\rdenoising {i}/{n} ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        if i == n {
            eprintln!();
        }
    })?;
    images.save(&opts.out)
}

/// Everything `sd-lora train` needs.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub model: String,
    pub variant: Option<String>,
    /// Where to train, and the dtype of the frozen weights (LoRA and optimizer state are f32).
    pub device: Device,
    pub dtype: DType,
    pub data: std::path::PathBuf,
    pub out: std::path::PathBuf,
    pub lora: LoraConfig,
    pub data_config: crate::data::DataConfig,
    pub train: crate::train::TrainConfig,
    /// Checkpoint every N optimizer steps (and always at the end).
    pub save_every: Option<usize>,
    pub resume: bool,
    /// Sample images during training (None = off).
    pub samples: Option<SampleOptions>,
    /// Precision of the LoRA files (F32, F16 or BF16).
    pub save_dtype: DType,
    /// Keep latents and text embeddings in `RUN_DIR/cache/` for the next run.
    pub disk_cache: bool,
}

/// Samples during training: every `every` optimizer steps and at the end, one image per prompt
/// (seed = its index, so the same prompt always starts from the same noise), DDIM, guidance
/// 7.5, at the training resolution, to `RUN_DIR/samples/step-NNNNNN-<prompt index>.png`.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub every: usize,
    pub prompts: Vec<String>,
    /// Denoising steps per sample. CLI default 20.
    pub steps: usize,
}

/// `512` or `640x480` → (width, height).
pub fn parse_resolution(s: &str) -> Result<(usize, usize)> {
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0 && n.is_multiple_of(8))
            .with_context(|| {
                format!("--resolution `{s}`: expected a multiple of 8 such as 512 or 640x480")
            })
    };
    match s.split_once(['x', 'X']) {
        Some((w, h)) => Ok((parse(w)?, parse(h)?)),
        None => parse(s).map(|n| (n, n)),
    }
}

/// Trains a LoRA and writes `RUN_DIR/lora.safetensors` (kohya), `lora_peft.safetensors`,
/// `checkpoints/` and `metrics.csv`. Returns a one-line summary.
pub fn train(opts: TrainOptions) -> Result<String> {
    use crate::data::ImageFolder;
    use crate::lora::io::save_lora_as;
    use crate::lora::LoraFormat;
    use crate::pipeline::{LoadOptions, StableDiffusion};
    use crate::train::{checkpoint, LatentCache, Trainer};
    use std::io::Write;

    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create run folder {}", opts.out.display()))?;
    let data = ImageFolder::load(&opts.data, &opts.data_config)?;
    for w in &data.warnings {
        eprintln!("warning: {w}");
    }
    if data.len() < opts.train.batch_size {
        eprintln!(
            "warning: {} images for a batch size of {}: every batch is the whole (smaller) set",
            data.len(),
            opts.train.batch_size
        );
    }
    let mut sd = StableDiffusion::load_with(&LoadOptions {
        source: opts.model.clone(),
        variant: opts.variant.clone(),
        dtype: opts.dtype,
        device: opts.device.clone(),
        cache_dir: None,
    })?;
    let summary = sd.unet.inject_lora(&opts.lora, &VarMap::new())?;
    eprintln!("{summary}");
    let cache_file = opts.out.join(format!(
        "cache/latents-{}x{}.safetensors",
        opts.data_config.width, opts.data_config.height
    ));
    let (cache, stats) = LatentCache::build_cached(
        &sd,
        &data,
        opts.data_config.flip,
        opts.disk_cache.then_some(cache_file.as_path()),
    )?;
    for w in &stats.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "latent cache: {} images encoded, {} from {}, {} captions encoded",
        stats.images_encoded,
        stats.images_reused,
        if opts.disk_cache {
            cache_file.display().to_string()
        } else {
            "disk (off)".into()
        },
        stats.texts_encoded
    );
    let mut trainer = Trainer::new(&sd, opts.train.clone())?;
    let ckpt_dir = opts.out.join("checkpoints");
    if opts.resume {
        for d in [&opts.out, &ckpt_dir, &opts.out.join("cache")] {
            checkpoint::remove_stale_temp_files(d)?;
        }
        match checkpoint::latest(&ckpt_dir)? {
            Some(p) => {
                trainer.load_checkpoint(&p)?;
                // the command line may extend the run
                trainer.config.max_steps = opts.train.max_steps.or(trainer.config.max_steps);
                trainer.config.epochs = opts.train.epochs;
                eprintln!("resumed from {} (step {})", p.display(), trainer.step);
            }
            None => eprintln!("no checkpoint in {}: starting fresh", ckpt_dir.display()),
        }
    }
    let total = trainer.config.total_steps(data.len());
    trainer.checkpoints = Some((ckpt_dir, opts.save_every.unwrap_or(total.max(1))));
    // metrics.csv: rewritten from the history (a resumed run keeps its earlier steps)
    let metrics_path = opts.out.join("metrics.csv");
    let mut metrics = std::fs::File::create(&metrics_path)
        .with_context(|| format!("cannot write {}", metrics_path.display()))?;
    writeln!(metrics, "step,epoch,loss,lr,grad_norm,seconds")?;
    for r in &trainer.history {
        writeln!(
            metrics,
            "{},{},{},{},{},{}",
            r.step, r.epoch, r.loss, r.lr, r.grad_norm, r.seconds
        )?;
    }
    let sample = |step: usize| -> Result<()> {
        let Some(s) = &opts.samples else {
            return Ok(());
        };
        for (i, prompt) in s.prompts.iter().enumerate() {
            let images = sd.generate(&crate::pipeline::GenerateConfig {
                prompt: prompt.clone(),
                steps: s.steps,
                seed: i as u64,
                width: opts.data_config.width,
                height: opts.data_config.height,
                ..Default::default()
            })?;
            images.save(
                opts.out
                    .join("samples")
                    .join(format!("step-{step:06}-{i}.png")),
            )?;
        }
        Ok(())
    };
    if let Some(s) = &opts.samples {
        if s.prompts.is_empty() || s.every == 0 {
            bail!("--sample-every needs N >= 1 and at least one --sample-prompt");
        }
        if trainer.step == 0 {
            sample(0).context("writing the step-0 samples")?;
        }
    }
    let sample_every = opts.samples.as_ref().map_or(0, |s| s.every);
    let started = std::time::Instant::now();
    let first = trainer.step;
    let mut io_err: Option<std::io::Error> = None;
    trainer.train(&sd, &cache, &mut |r| {
        if let Err(e) = writeln!(
            metrics,
            "{},{},{},{},{},{}",
            r.step, r.epoch, r.loss, r.lr, r.grad_norm, r.seconds
        )
        .and_then(|_| metrics.flush())
        {
            io_err.get_or_insert(e);
        }
        let done = r.step - first;
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let eta = (total - r.step) as f64 / rate.max(1e-9);
        eprint!(
            "\rstep {}/{total} epoch {} loss {:.4} lr {:.2e} {:.2} it/s ETA {:.0} s   ",
            r.step, r.epoch, r.loss, r.lr, rate, eta
        );
        if sample_every > 0 && (r.step.is_multiple_of(sample_every) || r.step == total) {
            if let Err(e) = sample(r.step) {
                eprintln!("\nwarning: samples at step {} failed: {e:#}", r.step);
            }
        }
    })?;
    eprintln!();
    if let Some(e) = io_err {
        return Err(anyhow::anyhow!(e).context(format!("writing {}", metrics_path.display())));
    }
    if !trainer.history.is_empty() {
        let fig = crate::plot::loss_curve(&trainer.history)?;
        fig.save(opts.out.join("loss.svg"))?;
        fig.save(opts.out.join("loss.png"))?;
    }
    let anatomy = crate::plot::LoraAnatomy::of(&sd.unet)?;
    anatomy.heatmap()?.save(opts.out.join("anatomy.svg"))?;
    anatomy
        .spectrum(&format!("rank {}", opts.lora.rank))?
        .save(opts.out.join("spectrum.svg"))?;
    let layers = sd.unet.linears()?;
    let mut meta = std::collections::HashMap::new();
    let c = &trainer.config;
    for (k, v) in [
        ("ss_learning_rate", c.lr.to_string()),
        ("ss_unet_lr", c.lr.to_string()),
        ("ss_num_epochs", c.epochs.to_string()),
        ("ss_max_train_steps", total.to_string()),
        ("ss_train_batch_size", c.batch_size.to_string()),
        ("ss_gradient_accumulation_steps", c.grad_accum.to_string()),
        ("ss_lr_scheduler", format!("{:?}", c.schedule)),
        ("ss_lr_warmup_steps", c.warmup_steps.to_string()),
        ("ss_seed", c.seed.to_string()),
        ("ss_num_train_images", data.len().to_string()),
        (
            "ss_resolution",
            format!("({}, {})", opts.data_config.width, opts.data_config.height),
        ),
        (
            "ss_min_snr_gamma",
            c.min_snr_gamma.map_or("None".into(), |g| g.to_string()),
        ),
        ("ss_noise_offset", c.noise_offset.to_string()),
        ("ss_caption_dropout_rate", c.caption_dropout.to_string()),
        ("ss_training_comment", "trained with sd-lora".into()),
    ] {
        meta.insert(k.to_string(), v);
    }
    meta.insert(
        "ss_save_precision".into(),
        format!("{:?}", opts.save_dtype).to_lowercase(),
    );
    save_lora_as(
        &layers,
        LoraFormat::Kohya,
        opts.save_dtype,
        opts.out.join("lora.safetensors"),
        &meta,
    )?;
    save_lora_as(
        &layers,
        LoraFormat::Peft,
        opts.save_dtype,
        opts.out.join("lora_peft.safetensors"),
        &Default::default(),
    )?;
    let last = trainer.history.last().map_or(f64::NAN, |r| r.loss);
    Ok(format!(
        "trained {} steps on {} images; last loss {last:.4}; wrote {}/lora.safetensors and lora_peft.safetensors",
        trainer.step,
        data.len(),
        opts.out.display()
    ))
}

/// Reads a run folder's `metrics.csv` (as `train` writes it) back into step records.
pub fn read_metrics(run: &Path) -> Result<Vec<crate::train::StepRecord>> {
    let path = if run.is_dir() {
        run.join("metrics.csv")
    } else {
        run.to_path_buf()
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    if header.trim() != "step,epoch,loss,lr,grad_norm,seconds" {
        bail!(
            "{}: expected the header `step,epoch,loss,lr,grad_norm,seconds`, got `{header}`",
            path.display()
        );
    }
    let mut out = Vec::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let bad = || format!("{} line {}: `{line}`", path.display(), i + 2);
        if f.len() != 6 {
            bail!("{}: expected 6 fields", bad());
        }
        let num = |k: usize| f[k].trim().parse::<f64>().with_context(bad);
        out.push(crate::train::StepRecord {
            step: f[0].trim().parse().with_context(bad)?,
            epoch: f[1].trim().parse().with_context(bad)?,
            loss: num(2)?,
            lr: num(3)?,
            grad_norm: num(4)?,
            seconds: num(5)?,
        });
    }
    if out.is_empty() {
        bail!("{} has no training steps", path.display());
    }
    Ok(out)
}

/// `sd-lora plot`: the loss curve of one run (with LR and epochs) or several runs overlaid
/// (labelled by folder name), to `.svg` or `.png`.
pub fn plot_runs(runs: &[std::path::PathBuf], out: &Path) -> Result<String> {
    let fig = match runs {
        [] => bail!("give at least one run folder (or metrics.csv)"),
        [one] => crate::plot::loss_curve(&read_metrics(one)?)?,
        many => {
            let runs = many
                .iter()
                .map(|r| {
                    let label = r
                        .file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_else(|| r.display().to_string());
                    Ok(crate::plot::LossRun::new(label, &read_metrics(r)?))
                })
                .collect::<Result<Vec<_>>>()?;
            crate::plot::loss_curves(&runs)?
        }
    };
    fig.save(out)?;
    Ok(format!("wrote {}", out.display()))
}

/// A UNet with the structure of `model` and no weights, for resolving LoRA module names.
fn meta_unet(model: &str) -> Result<UNet2DConditionModel> {
    UNet2DConditionModel::meta(&unet_config(model)?)
}

/// `sd-lora inspect-lora`: format, layers, ranks, alphas, targets, parameters and metadata.
pub fn inspect_lora(path: &Path, model: &str) -> Result<String> {
    let unet = meta_unet(model)?;
    let file = LoraFile::read(path, &unet.linear_names()?)?;
    let mut ranks: Vec<usize> = file.modules.iter().map(|m| m.a.dims()[0]).collect();
    ranks.sort();
    ranks.dedup();
    let mut alphas: Vec<String> = file
        .modules
        .iter()
        .map(|m| format!("{}", m.alpha))
        .collect();
    alphas.sort();
    alphas.dedup();
    let mut kinds: Vec<&str> = file
        .modules
        .iter()
        .filter_map(|m| {
            crate::lora::INJECTABLE
                .iter()
                .find(|k| crate::lora::target_matches(k, &m.module))
                .copied()
        })
        .collect();
    kinds.sort();
    kinds.dedup();
    let params: usize = file
        .modules
        .iter()
        .map(|m| m.a.elem_count() + m.b.elem_count())
        .sum();
    let bytes = std::fs::read(path)?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut meta: Vec<(String, String)> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    meta.sort();
    let mut out = format!(
        "file:        {}\nformat:      {:?}\nlayers:      {}\nrank:        {}\nalpha:       {}\ntargets:     {}\nparameters:  {}\n",
        path.display(),
        file.format,
        file.modules.len(),
        ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
        alphas.join(", "),
        kinds.join(", "),
        crate::lora::group_digits(params)
    );
    if !file.skipped.is_empty() {
        out.push_str(&format!(
            "text encoder tensors (not applied): {}\n",
            file.skipped.len()
        ));
    }
    for (k, v) in meta {
        let v = if v.len() > 200 {
            format!("{}...", &v[..200])
        } else {
            v
        };
        out.push_str(&format!("meta {k}: {v}\n"));
    }
    Ok(out)
}

/// `sd-lora convert`: any readable LoRA file to kohya or PEFT/diffusers format.
pub fn convert_lora(
    input: &Path,
    to: crate::lora::LoraFormat,
    dtype: DType,
    out: &Path,
    model: &str,
) -> Result<String> {
    let mut unet = meta_unet(model)?;
    let file = LoraFile::read(input, &unet.linear_names()?)?;
    let s = unet.apply_lora_file(&file, &VarMap::new())?;
    crate::lora::io::save_lora_as(&unet.linears()?, to, dtype, out, &Default::default())?;
    Ok(format!(
        "wrote {} ({to:?}, {dtype:?}, {} layers, {} parameters)",
        out.display(),
        s.lora_layers,
        s.trainable_params
    ))
}
