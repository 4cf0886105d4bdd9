//! `sd-lora estimate-memory`: the predicted peak memory of `sd-lora train` with the same flags
//! ([`crate::train::memory`]), broken down; with `--vram` whether it fits, the largest batch
//! that does, and the flags that would make it fit.

use anyhow::{bail, Result};
use std::path::Path;

use super::args::{count, Resolution};
use super::train::Network;
use crate::lora::LoraConfig;
use crate::train::memory::{MemoryEstimate, MemoryQuery};
use crate::vae::VaeConfig;

/// `--device` of the estimate (nothing is opened).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The process's peak resident memory on the CPU.
    Cpu,
    /// Peak GPU memory (CUDA context included).
    Cuda,
}

/// `--dtype` of the frozen weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EstimateDType {
    F32,
    F16,
    Bf16,
}

/// `sd-lora estimate-memory`.
#[derive(Debug, Clone, clap::Args)]
pub struct EstimateArgs {
    /// `sd15`, `tiny`, a diffusers folder (pipeline root: UNet, text encoder and VAE are
    /// counted; a folder with only `unet/config.json`: the UNet alone, as `bench train`) or a
    /// UNet `config.json`, or a single-file checkpoint.
    #[arg(long, default_value = "sd15")]
    pub model: String,
    /// Training resolution in pixels: `512` or `WIDTHxHEIGHT`.
    #[arg(long, default_value = "512")]
    pub resolution: Resolution,
    /// Images per micro-batch.
    #[arg(long, default_value_t = 1, value_parser = count)]
    pub batch_size: usize,
    /// Precision of the frozen weights and activations [default: f32 on the CPU, bf16 on CUDA].
    #[arg(long, value_enum)]
    pub dtype: Option<EstimateDType>,
    /// Where training runs.
    #[arg(long, value_enum, default_value_t = Target::Cpu)]
    pub device: Target,
    /// LoRA rank.
    #[arg(long, default_value_t = LoraConfig::default().rank, value_parser = count)]
    pub rank: usize,
    /// Comma-separated module targets (as `train --targets`).
    #[arg(long, default_value = "to_q,to_k,to_v")]
    pub targets: String,
    /// The adapter kind (as `train --network`).
    #[arg(long, value_enum, default_value_t = Network::Lora)]
    pub network: Network,
    /// LoCon conv rank [default: --rank].
    #[arg(long, value_parser = count)]
    pub conv_rank: Option<usize>,
    /// Also train the text encoder's LoRA.
    #[arg(long)]
    pub train_text_encoder: bool,
    /// Gradient checkpointing.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Memory available, e.g. `8GiB`, `12GB`, `16000MiB`: says whether the run fits, the
    /// largest batch that does, and which flags would make it fit.
    #[arg(long, value_parser = parse_size)]
    pub vram: Option<f64>,
    /// Print one JSON line (`peak_mib`, `parts`, and with --vram `fits`, `max_batch`,
    /// `suggestions`).
    #[arg(long)]
    pub json: bool,
}

/// `8GiB`, `8G`, `8GB` (GiB), `8000MiB`, `8000MB`, `8000M` (MiB) -> MiB.
pub fn parse_size(s: &str) -> Result<f64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a size like 8GiB or 12000MiB"))?;
    let mib = match unit.trim() {
        "g" | "gb" | "gib" => v * 1024.0,
        "m" | "mb" | "mib" => v,
        "" => return Err(format!("`{s}`: give a unit (GiB or MiB)")),
        u => return Err(format!("`{s}`: unknown unit `{u}` (GiB or MiB)")),
    };
    if !(mib.is_finite() && mib > 0.0) {
        return Err(format!("`{s}`: must be positive"));
    }
    Ok(mib)
}

impl EstimateArgs {
    /// The query these flags describe (`batch` and the switches as given).
    pub fn query(&self) -> Result<MemoryQuery> {
        let (unet, text) = crate::pipeline::single_file::structure_configs(&self.model, None)?;
        let tiny = crate::io::tiny_model_dir();
        let dir = if self.model == "tiny" {
            tiny.as_path()
        } else {
            Path::new(&self.model)
        };
        // what `sd-lora train` keeps resident besides the UNet
        let vae = if dir.join("vae/config.json").is_file() {
            Some(VaeConfig::from_file(&dir.join("vae/config.json"))?)
        } else if self.model == "tiny" {
            Some(VaeConfig::tiny())
        } else if self.model == "sd15" || crate::pipeline::single_file::is_single_file(&self.model)
        {
            Some(VaeConfig::sd_v1_5())
        } else {
            None
        };
        let gpu = self.device == Target::Cuda;
        let dtype_bytes = match (self.dtype, gpu) {
            (Some(EstimateDType::F32), _) | (None, false) => 4,
            _ => 2,
        };
        let f = vae.as_ref().map_or(8, |v| v.downsample_factor());
        let (w, h) = (self.resolution.width, self.resolution.height);
        if w % f != 0 || h % f != 0 {
            bail!("--resolution {w}x{h} is not a multiple of the VAE factor {f}");
        }
        // a folder with a UNet only: the text encoder and VAE are not resident (bench train)
        let text = vae.is_some().then_some(&text);
        if self.train_text_encoder && text.is_none() {
            bail!("--train-text-encoder: {} has no text encoder", self.model);
        }
        MemoryQuery::new(
            unet,
            text,
            vae.as_ref(),
            self.lora()?,
            self.train_text_encoder,
            (h / f, w / f),
            self.batch_size,
            dtype_bytes,
            self.gradient_checkpointing,
            gpu,
        )
    }

    fn lora(&self) -> Result<LoraConfig> {
        let mut lora = LoraConfig::new(self.rank, LoraConfig::default_alpha(self.rank))
            .with_targets(&LoraConfig::parse_targets(&self.targets))
            .with_dora(self.network == Network::Dora);
        if self.network == Network::Locon {
            lora = lora.with_conv(self.conv_rank.unwrap_or(self.rank), None);
        } else if self.conv_rank.is_some() {
            bail!("--conv-rank needs --network locon");
        }
        Ok(lora)
    }
}

/// The report: text, or one JSON line.
pub fn estimate_memory(a: &EstimateArgs) -> Result<String> {
    let q = a.query()?;
    let e = q.estimate()?;
    let fit = a.vram.map(|v| fit(&q, v)).transpose()?;
    if a.json {
        let mut v = serde_json::json!({
            "peak_mib": e.peak_mib,
            "parts": e.parts.iter().map(|p| (p.name.clone(), serde_json::json!(p.mib)))
                .collect::<serde_json::Map<_, _>>(),
            "trainable_params": e.trainable_params,
        });
        if let (Some(f), Some(o)) = (&fit, v.as_object_mut()) {
            o.insert("vram_mib".into(), serde_json::json!(f.vram));
            o.insert("fits".into(), serde_json::json!(f.fits));
            o.insert("max_batch".into(), serde_json::json!(f.max_batch));
            o.insert("suggestions".into(), serde_json::json!(f.suggestions));
        }
        return Ok(v.to_string());
    }
    let mut out = report(a, &q, &e);
    if let Some(f) = fit {
        out += &format!(
            "\n{} in {:.0} MiB: {}",
            if f.fits { "fits" } else { "does not fit" },
            f.vram,
            match f.max_batch {
                0 => "not even batch 1".to_string(),
                n => format!("largest batch {n}"),
            }
        );
        for s in &f.suggestions {
            out += &format!("\n  {s}");
        }
    }
    Ok(out)
}

/// The estimate line `sd-lora train` prints before training.
pub fn train_estimate(
    opts: &super::train::TrainOptions,
    sd: &crate::pipeline::StableDiffusion,
) -> Result<String> {
    let f = sd.vae_scale_factor();
    let (w, h) = (opts.data_config.width, opts.data_config.height);
    // prior preservation runs the class images in the same batch
    let batch = opts.train.batch_size * if opts.prior.is_some() { 2 } else { 1 };
    let q = MemoryQuery::new(
        sd.unet.config.clone(),
        Some(&sd.text_encoder.config),
        Some(&sd.vae.config),
        opts.lora.clone(),
        opts.train.train_text_encoder,
        (h / f, w / f),
        batch,
        sd.dtype.size_in_bytes(),
        opts.train.gradient_checkpointing,
        !sd.device.is_cpu(),
    )?;
    let e = q.estimate()?;
    let parts: Vec<String> = e
        .parts
        .iter()
        .filter(|p| p.mib >= 0.5)
        .map(|p| format!("{} {:.0}", p.name, p.mib))
        .collect();
    Ok(format!(
        "memory estimate: peak {:.0} MiB {} (MiB: {}; sd-lora estimate-memory explains)",
        e.peak_mib,
        if q.gpu { "GPU memory" } else { "RSS" },
        parts.join(", ")
    ))
}

/// The text table of an estimate.
pub fn report(a: &EstimateArgs, q: &MemoryQuery, e: &MemoryEstimate) -> String {
    let mut out = format!(
        "{} at {}x{} px, batch {}, {} bytes/value, {}{}: predicted peak {:.0} MiB ({})",
        a.model,
        a.resolution.width,
        a.resolution.height,
        q.batch,
        q.dtype_bytes,
        if q.gradient_checkpointing {
            "gradient checkpointing"
        } else {
            "no checkpointing"
        },
        if q.text_encoder.is_some() {
            ", text encoder trained"
        } else {
            ""
        },
        e.peak_mib,
        if q.gpu { "GPU memory" } else { "CPU RSS" }
    );
    for p in &e.parts {
        out += &format!("\n  {:>9.0} MiB  {}", p.mib, p.name);
    }
    out
}

/// Whether `q` fits in `vram` MiB, the largest batch that does, and what would make it fit.
struct Fit {
    vram: f64,
    fits: bool,
    max_batch: usize,
    suggestions: Vec<String>,
}

fn max_batch(q: &MemoryQuery, vram: f64) -> Result<usize> {
    let mut best = 0;
    for b in 1..=64 {
        let e = MemoryQuery {
            batch: b,
            ..q.clone()
        }
        .estimate()?;
        if e.peak_mib > vram {
            break;
        }
        best = b;
    }
    Ok(best)
}

fn fit(q: &MemoryQuery, vram: f64) -> Result<Fit> {
    let peak = q.estimate()?.peak_mib;
    let mut suggestions = Vec::new();
    let mut options: Vec<(&str, MemoryQuery)> = Vec::new();
    if !q.gradient_checkpointing {
        options.push((
            "--gradient-checkpointing",
            MemoryQuery {
                gradient_checkpointing: true,
                ..q.clone()
            },
        ));
    }
    if q.dtype_bytes == 4 {
        let half = if q.gpu {
            "--dtype bf16 (f16 on GPUs without bf16)"
        } else {
            "--dtype f16"
        };
        options.push((
            half,
            MemoryQuery {
                dtype_bytes: 2,
                ..q.clone()
            },
        ));
        if !q.gradient_checkpointing {
            options.push((
                "--gradient-checkpointing and half precision",
                MemoryQuery {
                    dtype_bytes: 2,
                    gradient_checkpointing: true,
                    ..q.clone()
                },
            ));
        }
    }
    for (flags, o) in options {
        let p = o.estimate()?.peak_mib;
        let mb = max_batch(&o, vram)?;
        if mb >= q.batch || p <= vram {
            suggestions.push(format!(
                "{flags}: {p:.0} MiB at batch {}, largest batch {mb}",
                q.batch
            ));
        }
    }
    Ok(Fit {
        vram,
        fits: peak <= vram,
        max_batch: max_batch(q, vram)?,
        suggestions,
    })
}
