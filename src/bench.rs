//! `sd-lora bench`: the time of one LoRA training step (forward, MSE, backward, AdamW) or of one
//! 20-step generation, median / min / max after warm-up, and the process's peak resident memory.
//! Weights are random (seeded) unless a full pipeline folder is given: timings do not depend on
//! values. The peers in `benches/peer/` run the same workloads in diffusers + PEFT.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use std::time::Instant;

use crate::lora::{LoraConfig, LoraModel};
use crate::pipeline::{GenerateConfig, StableDiffusion};
use crate::train::AdamW;
use crate::unet::UNet2DConditionModel;

/// What to measure. CLI defaults: 32x32 latents, batch 1, 5 timed steps after 1 warm-up.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// `tiny` or `sd15` (random weights), a diffusers UNet `config.json` or a folder with
    /// `unet/config.json` (random weights); for `generate`, a full pipeline folder is loaded.
    pub model: String,
    /// Latent side (pixels = latent x VAE factor).
    pub latent: usize,
    pub batch: usize,
    /// Timed repetitions.
    pub steps: usize,
    pub warmup: usize,
    /// Default CPU.
    pub device: Device,
    /// Frozen weights and activations; LoRA, optimizer state and loss stay f32. Default f32.
    pub dtype: DType,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            model: "tiny".into(),
            latent: 32,
            batch: 1,
            steps: 5,
            warmup: 1,
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}

/// One benchmark's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// `train` or `generate`.
    pub kind: String,
    pub model: String,
    pub latent: usize,
    pub batch: usize,
    pub steps: usize,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    /// Peak resident set of the whole process (VmHWM), MiB; null where unavailable.
    pub peak_rss_mib: Option<f64>,
    pub trainable_params: usize,
    pub total_params: usize,
    pub threads: usize,
    /// `cpu` or `cuda:N`, and the compute dtype.
    pub device: String,
    pub dtype: String,
    /// GPU memory in use after the timed steps (see [`crate::device::gpu_memory_used_mib`]).
    pub gpu_mem_mib: Option<f64>,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} latent {}x{} batch {}: median {:.3} s (min {:.3}, max {:.3}) over {} steps; peak RSS {}; {} threads; {} {}{}",
            self.kind,
            self.model,
            self.latent,
            self.latent,
            self.batch,
            self.median_s,
            self.min_s,
            self.max_s,
            self.steps,
            self.peak_rss_mib
                .map_or("n/a".into(), |m| format!("{m:.0} MiB")),
            self.threads,
            self.device,
            self.dtype,
            self.gpu_mem_mib
                .map_or(String::new(), |m| format!(", GPU memory in use {m:.0} MiB"))
        )
    }
}

/// The process's peak resident set size in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resets the peak resident set size (`VmHWM`) to the current one (Linux: writes 5 to
/// `/proc/self/clear_refs`), so that [`peak_rss_mib`] measures the peak of what runs next.
/// First hands freed heap memory back to the system (glibc `malloc_trim`): otherwise memory
/// that an earlier run freed but the allocator kept would count towards the next run's peak.
/// Returns false where the kernel does not allow the reset.
pub fn reset_peak_rss() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim only releases free memory; it takes no pointers.
        unsafe {
            malloc_trim(0);
        }
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn timed(cfg: &BenchConfig, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64, f64)> {
    if cfg.steps == 0 {
        bail!("--steps must be at least 1");
    }
    for _ in 0..cfg.warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(cfg.steps);
    for _ in 0..cfg.steps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok((t[t.len() / 2], t[0], t[t.len() - 1]))
}

/// LoRA rank 16 / alpha 32 on q,k,v (the tutorial's); AdamW lr 1e-4, weight decay 1e-2;
/// 77 text tokens; uniform random timesteps.
pub fn bench_train(cfg: &BenchConfig) -> Result<BenchReport> {
    let (dev, dt) = (&cfg.device, cfg.dtype);
    let ucfg = crate::cli::unet_config(&cfg.model)?;
    let mut unet = UNet2DConditionModel::random(&ucfg, 0, dt, dev)?;
    let summary = unet.inject_lora(&LoraConfig::new(16, 32.0), &VarMap::new())?;
    let mut opt = AdamW::new(unet.lora_vars()?, (0.9, 0.999), 1e-8, 1e-2)?;
    let ctx = ucfg.cross_dims()?[0];
    let (b, l) = (cfg.batch, cfg.latent);
    let x = Tensor::randn(0f32, 1.0, (b, 4, l, l), dev)?.to_dtype(dt)?;
    let e = Tensor::randn(0f32, 1.0, (b, 77, ctx), dev)?.to_dtype(dt)?;
    let noise = Tensor::randn(0f32, 1.0, (b, 4, l, l), dev)?;
    let t = Tensor::rand(0f32, 1000.0, b, dev)?.floor()?;
    let (median_s, min_s, max_s) = timed(cfg, || {
        let pred = unet.forward(&x, &t, &e)?.to_dtype(DType::F32)?;
        let loss = (pred - &noise)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        let g: Vec<Tensor> = opt
            .vars
            .iter()
            .map(|(n, v)| grads.get(v.as_tensor()).cloned().context(n.clone()))
            .collect::<Result<_>>()?;
        opt.step(&g, 1e-4)?;
        crate::device::synchronize(dev)
    })?;
    Ok(BenchReport {
        kind: "train".into(),
        model: cfg.model.clone(),
        latent: l,
        batch: b,
        steps: cfg.steps,
        median_s,
        min_s,
        max_s,
        peak_rss_mib: peak_rss_mib(),
        trainable_params: summary.trainable_params,
        total_params: summary.total_params,
        threads: candle_core::utils::get_num_threads(),
        device: device_name(dev),
        dtype: format!("{dt:?}").to_lowercase(),
        gpu_mem_mib: crate::device::gpu_memory_used_mib(dev),
    })
}

fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

/// Text to image: classifier-free guidance 7.5 (UNet batch 2 per image), DDIM, 20 steps,
/// `batch` images, text encoding and VAE decoding included.
pub fn bench_generate(cfg: &BenchConfig) -> Result<BenchReport> {
    use crate::text::ClipTextConfig;
    use crate::unet::UNetConfig;
    use crate::vae::VaeConfig;
    let dev = &cfg.device;
    let random = |u: UNetConfig, v: VaeConfig, t: ClipTextConfig| -> Result<StableDiffusion> {
        let tok = std::env::temp_dir().join(format!("sd-lora-bench-tok-{}", std::process::id()));
        let bpe = crate::text::default_clip_bpe();
        crate::text::write_clip_vocab(&bpe, &tok).with_context(|| {
            format!(
                "building a CLIP tokenizer from {} (run scripts/fetch-clip-bpe.sh)",
                bpe.display()
            )
        })?;
        let sd = StableDiffusion::random(&u, &v, &t, &tok, 0, dev);
        let _ = std::fs::remove_dir_all(&tok);
        sd
    };
    let sd = match cfg.model.as_str() {
        "tiny" => random(
            UNetConfig::tiny(),
            VaeConfig::tiny(),
            ClipTextConfig::tiny(),
        )?,
        "sd15" | "sd-1.5" | "sd_v1_5" => random(
            UNetConfig::sd_v1_5(),
            VaeConfig::sd_v1_5(),
            ClipTextConfig::sd_v1_5(),
        )?,
        dir => StableDiffusion::from_folder(std::path::Path::new(dir), None, cfg.dtype, dev)?,
    };
    let px = cfg.latent * sd.vae_scale_factor();
    let gen = GenerateConfig {
        prompt: "a photo of a cat".into(),
        steps: 20,
        width: px,
        height: px,
        num_images: cfg.batch,
        ..Default::default()
    };
    let (median_s, min_s, max_s) = timed(cfg, || {
        sd.generate(&gen)?;
        crate::device::synchronize(dev)
    })?;
    let total = sd.unet.lora_summary()?.total_params;
    Ok(BenchReport {
        kind: "generate".into(),
        model: cfg.model.clone(),
        latent: cfg.latent,
        batch: cfg.batch,
        steps: cfg.steps,
        median_s,
        min_s,
        max_s,
        peak_rss_mib: peak_rss_mib(),
        trainable_params: 0,
        total_params: total,
        threads: candle_core::utils::get_num_threads(),
        device: device_name(dev),
        dtype: format!("{:?}", cfg.dtype).to_lowercase(),
        gpu_mem_mib: crate::device::gpu_memory_used_mib(dev),
    })
}
