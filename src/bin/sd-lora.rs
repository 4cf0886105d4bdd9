//! The `sd-lora` command line: a thin client of the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

use sd_lora::cli;

#[derive(Parser)]
#[command(
    name = "sd-lora",
    version,
    about = "LoRA fine-tuning of Stable Diffusion in Rust"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Injects LoRA into a UNet (built from its config only, no weights) and prints the summary.
    InspectModel {
        /// `sd15`, `tiny`, or a diffusers folder (pipeline root or its unet/).
        #[arg(long, default_value = "sd15")]
        model: String,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Defaults to 2 x rank (the tutorial's choice).
        #[arg(long)]
        alpha: Option<f64>,
        /// Comma-separated module targets (`to_q,to_k,to_v`; shorthands attn, ff, all).
        #[arg(long, default_value = "to_q,to_k,to_v")]
        targets: String,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Also list every adapted layer.
        #[arg(long)]
        layers: bool,
    },
    /// Runs a diffusers-layout UNet on tensors from a safetensors file.
    UnetForward {
        /// Pipeline root (with unet/) or the unet folder itself.
        #[arg(long)]
        model: PathBuf,
        /// safetensors with `sample` [B,4,H,W], `timestep` [B] and `encoder_hidden_states` [B,T,C].
        #[arg(long)]
        inputs: PathBuf,
        /// Output safetensors; gets tensor `sample`.
        #[arg(long)]
        out: PathBuf,
        /// A LoRA file (PEFT/diffusers, kohya, or old diffusers format).
        #[arg(long)]
        lora: Option<PathBuf>,
        #[arg(long, default_value_t = 1.0)]
        lora_scale: f64,
        /// Weights variant, e.g. `fp16` for diffusion_pytorch_model.fp16.safetensors.
        #[arg(long)]
        variant: Option<String>,
        /// Compute dtype: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Generates images with a Stable Diffusion pipeline (optionally with a LoRA).
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A diffusers folder or a Hugging Face repo id.
    #[arg(long, default_value = sd_lora::pipeline::DEFAULT_MODEL)]
    model: String,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// ddim, ddpm or euler-a.
    #[arg(long, default_value = "ddim")]
    scheduler: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// A LoRA file (PEFT/diffusers, kohya or old diffusers format); repeat to stack several.
    #[arg(long)]
    lora: Vec<PathBuf>,
    /// Strength of each --lora in order (0 = off; missing ones are 1.0).
    #[arg(long)]
    lora_scale: Vec<f64>,
    /// Comma-separated strengths (e.g. 0,0.5,1): renders the same seeds at each strength of the
    /// LoRA(s) and writes one grid to --out (a row per strength, a column per image).
    #[arg(long, value_delimiter = ',')]
    strengths: Vec<f64>,
    /// Fold the LoRA(s) into the weights (faster sampling).
    #[arg(long)]
    merge: bool,
    /// safetensors with tensor `latents` [N, 4, H/f, W/f] used instead of seeded noise.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Weights variant, e.g. fp16.
    #[arg(long)]
    variant: Option<String>,
    /// f32 or f16 (bf16 needs a GPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Output PNG; several images become <stem>-0.png, <stem>-1.png, ...
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::InspectModel {
            model,
            rank,
            alpha,
            targets,
            json,
            layers,
        } => {
            let summary =
                cli::inspect_model(&model, rank, alpha.unwrap_or(2.0 * rank as f64), &targets)?;
            if json {
                let mut v = summary.to_json();
                if !layers {
                    if let Some(o) = v.as_object_mut() {
                        o.remove("layers");
                    }
                }
                println!("{v}");
            } else {
                println!("{summary}");
                if layers {
                    for l in &summary.layers {
                        println!(
                            "  {} [{} -> {}] rank {} alpha {}",
                            l.name, l.in_dim, l.out_dim, l.rank, l.alpha
                        );
                    }
                }
            }
        }
        Cmd::UnetForward {
            model,
            inputs,
            out,
            lora,
            lora_scale,
            variant,
            dtype,
        } => {
            let dtype = cli::parse_dtype(&dtype)?;
            if !lora_scale.is_finite() {
                bail!("--lora-scale must be a finite number");
            }
            let report = cli::unet_forward(
                &model,
                &inputs,
                &out,
                lora.as_deref(),
                lora_scale,
                variant.as_deref(),
                dtype,
            )
            .with_context(|| format!("unet-forward on {}", model.display()))?;
            eprintln!("{report}");
        }
        Cmd::Generate(a) => {
            let opts = cli::GenerateOptions {
                model: a.model,
                variant: a.variant,
                dtype: cli::parse_dtype(&a.dtype)?,
                loras: a.lora,
                lora_scales: a.lora_scale,
                merge: a.merge,
                strengths: a.strengths,
                latents: a.latents,
                out: a.out,
                config: sd_lora::pipeline::GenerateConfig {
                    prompt: a.prompt,
                    negative_prompt: a.negative_prompt,
                    steps: a.steps,
                    guidance: a.guidance,
                    scheduler: a.scheduler.parse()?,
                    seed: a.seed,
                    width: a.width,
                    height: a.height,
                    num_images: a.num_images,
                    latents: None,
                },
            };
            for p in cli::generate(opts)? {
                println!("{}", p.display());
            }
        }
    }
    Ok(())
}
