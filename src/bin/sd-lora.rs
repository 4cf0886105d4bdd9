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
    /// Trains a LoRA on an image folder.
    Train(TrainArgs),
    /// Describes a LoRA file: format, layers, rank, alpha, targets, parameters, metadata.
    InspectLora {
        file: PathBuf,
        /// UNet structure used to resolve kohya names: sd15, tiny, a folder or config.json.
        #[arg(long, default_value = "sd15")]
        model: String,
    },
    /// Converts a LoRA file between formats (kohya <-> peft/diffusers).
    Convert {
        input: PathBuf,
        /// kohya or peft.
        #[arg(long)]
        to: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "sd15")]
        model: String,
        /// f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        save_dtype: String,
    },
    /// Writes synthetic captioned 64x64 scenes (PNG + .txt sidecar) in the base or anime look.
    MakeData {
        /// base (photographic) or anime.
        #[arg(long)]
        style: String,
        #[arg(long, default_value_t = 60)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Pre-trains the embedded tiny Stable Diffusion (VAE, then UNet), resumable; writes a
    /// diffusers folder.
    PretrainTiny {
        #[arg(long, default_value = "assets/tiny-sd")]
        out: PathBuf,
        /// Checkpoints (continue by running the same command again).
        #[arg(long, default_value = ".pretrain")]
        work: PathBuf,
        #[arg(long)]
        vae_steps: Option<usize>,
        /// Decoder-only VAE fine-tune steps (phase 1b, default 1500; 0 skips it).
        #[arg(long)]
        vae_decoder_steps: Option<usize>,
        #[arg(long)]
        unet_steps: Option<usize>,
        #[arg(long)]
        scenes: Option<usize>,
    },
    /// The tutorial's whole flow on the embedded tiny model (CPU, a few minutes): base samples,
    /// LoRA fine-tune on anime-look scenes, loss curve, before/after grid, summary.json.
    Demo {
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// Fewer epochs for a quick look (default 25).
        #[arg(long)]
        epochs: Option<usize>,
        /// Denoising steps per sample (default 20).
        #[arg(long)]
        sample_steps: Option<usize>,
        /// Prompts for the before/after grid (default: 8 held-out scene captions).
        #[arg(long)]
        prompt: Vec<String>,
        /// Held-out scene captions sampled before and after for the style score and colour check
        /// (default 32, at least 2).
        #[arg(long)]
        score_prompts: Option<usize>,
        /// LoRA learning rate (default 1e-3).
        #[arg(long)]
        lr: Option<f64>,
        /// Seed of the data set, LoRA init and training noise (default 202509).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Draws loss curves from run folders (metrics.csv): one run with LR and epochs, or several
    /// overlaid.
    Plot {
        runs: Vec<PathBuf>,
        /// .svg or .png
        #[arg(long)]
        out: PathBuf,
    },
    /// Times a LoRA training step (`train`) or a 20-step generation (`generate`).
    Bench {
        /// train or generate.
        what: String,
        /// tiny, sd15, a UNet config.json or a diffusers folder (random weights unless a full
        /// pipeline folder for `generate`).
        #[arg(long, default_value = "tiny")]
        model: String,
        /// Latent side; pixels = latent x the VAE factor.
        #[arg(long, default_value_t = 32)]
        latent: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Timed steps after one warm-up.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Print one JSON line.
        #[arg(long)]
        json: bool,
        /// cpu, cuda, cuda:N or auto (a GPU when there is one).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Compute dtype of the frozen weights: f32, f16, bf16 or auto (f32 on the CPU, bf16 on
        /// GPUs). LoRA weights, optimizer state and the loss stay f32.
        #[arg(long, default_value = "auto")]
        dtype: String,
        /// Attention score bytes materialised at once, MiB (default 4 on the CPU, 256 on GPUs;
        /// larger layers run in query chunks). A huge value keeps every score matrix whole.
        #[arg(long)]
        attention_chunk_mib: Option<usize>,
    },
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
    /// f32, f16, bf16 (GPU only) or auto (f32 on the CPU, bf16 on GPUs).
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// cpu, cuda, cuda:N or auto (the GPU when this build has CUDA and there is one).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Output PNG; several images become <stem>-0.png, <stem>-1.png, ...
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// A diffusers folder or a Hugging Face repo id.
    #[arg(long, default_value = sd_lora::pipeline::DEFAULT_MODEL)]
    model: String,
    /// cpu, cuda, cuda:N or auto (the GPU when this build has CUDA and there is one).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Dtype of the frozen weights and activations: f32, f16, bf16 or auto (f32 on the CPU,
    /// bf16 on GPUs). LoRA weights, optimizer state and the loss are f32 always.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Image folder (png, jpg, jpeg, webp).
    #[arg(long)]
    data: PathBuf,
    /// Run folder: lora.safetensors (kohya), lora_peft.safetensors, checkpoints/, metrics.csv.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Default 2 x rank.
    #[arg(long)]
    alpha: Option<f64>,
    #[arg(long, default_value = "to_q,to_k,to_v")]
    targets: String,
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Train this many optimizer steps instead of --epochs.
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 4)]
    grad_accum: usize,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 1e-2)]
    weight_decay: f64,
    /// cosine-epoch (the tutorial's), cosine or constant.
    #[arg(long, default_value = "cosine-epoch")]
    lr_scheduler: String,
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// Training resolution in pixels: `512` (square) or `WIDTHxHEIGHT` (multiples of 8).
    #[arg(long, default_value = "512")]
    resolution: String,
    /// Also read images in sub-folders.
    #[arg(long)]
    recursive: bool,
    /// empty, sidecar (<image>.txt), or a fixed caption text.
    #[arg(long, default_value = "empty")]
    caption: String,
    #[arg(long, default_value_t = 202509)]
    seed: u64,
    /// Checkpoint every N optimizer steps (and at the end).
    #[arg(long)]
    save_every: Option<usize>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    no_flip: bool,
    #[arg(long)]
    skip_bad_images: bool,
    #[arg(long)]
    min_snr_gamma: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    noise_offset: f64,
    /// Train this fraction of examples on the empty caption (teaches the unconditional
    /// prediction that guidance uses; 0.1 is common for training from scratch).
    #[arg(long, default_value_t = 0.0)]
    caption_dropout: f64,
    #[arg(long)]
    variant: Option<String>,
    /// Write sample images to RUN_DIR/samples every N optimizer steps (and at the end).
    #[arg(long)]
    sample_every: Option<usize>,
    /// Prompt for the samples; repeat for several (each gets its own fixed seed).
    #[arg(long)]
    sample_prompt: Vec<String>,
    #[arg(long, default_value_t = 20)]
    sample_steps: usize,
    /// Precision of the saved LoRA files: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    save_dtype: String,
    /// Do not keep the VAE latents / text embeddings in RUN_DIR/cache.
    #[arg(long)]
    no_disk_cache: bool,
}

fn main() {
    sd_lora::device::tune_cpu_allocator();
    sd_lora::device::tune_cpu_threads();
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
            let device = sd_lora::device::parse_device(&a.device)?;
            let opts = cli::GenerateOptions {
                model: a.model,
                variant: a.variant,
                dtype: sd_lora::device::parse_dtype_for(&a.dtype, &device)?,
                device,
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
        Cmd::Train(a) => {
            use sd_lora::train::{LrSchedule, TrainConfig};
            let schedule = match a.lr_scheduler.as_str() {
                "cosine-epoch" => LrSchedule::CosineEpoch { eta_min: 1e-6 },
                "cosine" => LrSchedule::Cosine { floor: 0.0 },
                "constant" => LrSchedule::Constant,
                other => bail!("unknown --lr-scheduler `{other}` (cosine-epoch, cosine, constant)"),
            };
            let (width, height) = cli::parse_resolution(&a.resolution)?;
            let device = sd_lora::device::parse_device(&a.device)?;
            let opts = cli::TrainOptions {
                model: a.model,
                variant: a.variant,
                dtype: sd_lora::device::parse_dtype_for(&a.dtype, &device)?,
                device,
                data: a.data,
                out: a.out,
                lora: sd_lora::lora::LoraConfig::new(
                    a.rank,
                    a.alpha.unwrap_or(2.0 * a.rank as f64),
                )
                .with_targets(&sd_lora::lora::LoraConfig::parse_targets(&a.targets))
                .with_seed(a.seed),
                data_config: sd_lora::data::DataConfig {
                    width,
                    height,
                    flip: !a.no_flip,
                    captions: sd_lora::data::CaptionSource::parse(&a.caption),
                    recursive: a.recursive,
                    skip_bad_images: a.skip_bad_images,
                },
                train: TrainConfig {
                    lr: a.lr,
                    weight_decay: a.weight_decay,
                    epochs: a.epochs,
                    max_steps: a.max_steps,
                    batch_size: a.batch_size,
                    grad_accum: a.grad_accum,
                    schedule,
                    warmup_steps: a.warmup_steps,
                    min_snr_gamma: a.min_snr_gamma,
                    noise_offset: a.noise_offset,
                    caption_dropout: a.caption_dropout,
                    seed: a.seed,
                    ..Default::default()
                },
                save_every: a.save_every,
                resume: a.resume,
                samples: match a.sample_every {
                    Some(every) => Some(cli::SampleOptions {
                        every,
                        prompts: a.sample_prompt,
                        steps: a.sample_steps,
                    }),
                    None => None,
                },
                save_dtype: cli::parse_dtype(&a.save_dtype).context("--save-dtype")?,
                disk_cache: !a.no_disk_cache,
            };
            println!("{}", cli::train(opts)?);
        }
        Cmd::Bench {
            what,
            model,
            latent,
            batch,
            steps,
            json,
            device,
            dtype,
            attention_chunk_mib,
        } => {
            if let Some(mib) = attention_chunk_mib {
                if mib == 0 {
                    bail!("--attention-chunk-mib must be at least 1 (MiB)");
                }
                sd_lora::ops::set_attention_chunk_bytes(mib.saturating_mul(1 << 20));
            }
            let device = sd_lora::device::parse_device(&device)?;
            let dtype = sd_lora::device::parse_dtype_for(&dtype, &device)?;
            let cfg = sd_lora::bench::BenchConfig {
                model,
                latent,
                batch,
                steps,
                warmup: 1,
                device,
                dtype,
            };
            let report = match what.as_str() {
                "train" => sd_lora::bench::bench_train(&cfg)?,
                "generate" => sd_lora::bench::bench_generate(&cfg)?,
                other => bail!("unknown benchmark `{other}` (train or generate)"),
            };
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{report}");
            }
        }
        Cmd::MakeData {
            style,
            count,
            seed,
            out,
        } => {
            let paths = sd_lora::tiny::scenes::write_dataset(&out, style.parse()?, count, seed)?;
            println!(
                "wrote {} images with captions to {}",
                paths.len(),
                out.display()
            );
        }
        Cmd::PretrainTiny {
            out,
            work,
            vae_steps,
            vae_decoder_steps,
            unet_steps,
            scenes,
        } => {
            let d = sd_lora::tiny::pretrain::PretrainConfig::default();
            let cfg = sd_lora::tiny::pretrain::PretrainConfig {
                out,
                work,
                vae_steps: vae_steps.unwrap_or(d.vae_steps),
                vae_decoder_steps: vae_decoder_steps.unwrap_or(d.vae_decoder_steps),
                unet_steps: unet_steps.unwrap_or(d.unet_steps),
                scenes: scenes.unwrap_or(d.scenes),
                ..d
            };
            let bpe = sd_lora::text::default_clip_bpe();
            let dir =
                sd_lora::tiny::pretrain::pretrain_tiny(&cfg, &bpe, &mut |m| eprintln!("{m}"))?;
            println!("wrote {}", dir.display());
        }
        Cmd::Demo {
            out,
            epochs,
            sample_steps,
            prompt,
            score_prompts,
            lr,
            seed,
        } => {
            let d = sd_lora::tiny::demo::DemoConfig::default();
            let cfg = sd_lora::tiny::demo::DemoConfig {
                out,
                epochs: epochs.unwrap_or(d.epochs),
                score_prompts: score_prompts.unwrap_or(d.score_prompts),
                lr: lr.unwrap_or(d.lr),
                seed: seed.unwrap_or(d.seed),
                sample_steps: sample_steps.unwrap_or(d.sample_steps),
                prompts: if prompt.is_empty() {
                    d.prompts.clone()
                } else {
                    prompt
                },
                ..d
            };
            let s = sd_lora::tiny::demo::run_demo(&cfg, &mut |m| {
                if m.starts_with('\r') || m == "\n" {
                    eprint!("{m}");
                } else {
                    eprintln!("{m}");
                }
            })?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            println!(
                "wrote {}: before_after.png, loss.svg, loss.png, lora.safetensors, lora_peft.safetensors, summary.json",
                cfg.out.display()
            );
        }
        Cmd::Plot { runs, out } => println!("{}", cli::plot_runs(&runs, &out)?),
        Cmd::InspectLora { file, model } => print!("{}", cli::inspect_lora(&file, &model)?),
        Cmd::Convert {
            input,
            to,
            out,
            model,
            save_dtype,
        } => {
            let dtype = cli::parse_dtype(&save_dtype).context("--save-dtype")?;
            println!(
                "{}",
                cli::convert_lora(&input, to.parse()?, dtype, &out, &model)?
            )
        }
    }
    Ok(())
}
