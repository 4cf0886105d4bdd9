//! What prior preservation buys, measured on the embedded tiny model: DreamBooth on 8
//! anime-look red circles ("a red sks circle"), once without and once with class images of
//! "a red circle" from the base model, then the style score (0 = photographic, 1 = anime) of
//! samples for the instance prompt (the subject should be learnt), the class prompt, and the
//! demo's other scene prompts (both should keep the base look: language drift is the class word
//! or everything else taking on the subject's look).
//!
//!     cargo run --release --example dreambooth_drift [-- OUT_DIR [STEPS]]
//!
//! Default OUT_DIR: runs/dreambooth-drift, STEPS 150. Prints a table (see BENCHMARKS.md).

use anyhow::Result;
use sd_lora::prelude::*;
use sd_lora::tiny::eval::sample_seeded;
use std::path::Path;

const INSTANCE: &str = "a red sks circle";
const CLASS: &str = "a red circle";

fn load() -> Result<StableDiffusion> {
    StableDiffusion::from_folder(&tiny_model_dir(), None, DType::F32, &Device::Cpu)
}

/// Mean style score of `n` seeded samples of each prompt.
fn style(sd: &StableDiffusion, prompts: &[String], n: u64) -> Result<f64> {
    let jobs: Vec<(String, u64)> = prompts
        .iter()
        .flat_map(|p| (0..n).map(move |s| (p.clone(), 1000 + s)))
        .collect();
    Ok(mean_style_score(&sample_seeded(sd, &jobs, 20)?).score)
}

fn train(
    out: &Path,
    data: &ImageFolder,
    class: Option<&ImageFolder>,
    steps: usize,
) -> Result<StableDiffusion> {
    let mut sd = load()?;
    sd.unet.inject_lora(
        &LoraConfig::new(16, 32.0)
            .with_targets(&["to_q", "to_k", "to_v"])
            .with_seed(1),
        &VarMap::new(),
    )?;
    let cache = LatentCache::build(&sd, data, true)?;
    let cfg = TrainConfig {
        lr: 1e-3,
        batch_size: 4,
        grad_accum: 1,
        max_steps: Some(steps),
        schedule: LrSchedule::Constant,
        seed: 1,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&sd, cfg.clone())?;
    let mut progress = Progress::new("", ProgressMode::Lines { every: 50 }, |s: &str| {
        eprintln!("{s}")
    });
    let instance = Denoising::new(&sd, &cache, &cfg)?;
    match class {
        Some(c) => {
            let class_cache = LatentCache::build(&sd, c, true)?;
            let objective = PriorPreservation {
                instance,
                class: &class_cache,
                prior_loss_weight: 1.0,
            };
            trainer.run(&objective, &mut [&mut progress])?;
        }
        None => trainer.run(&instance, &mut [&mut progress])?,
    }
    let name = if class.is_some() {
        "loss-prior.svg"
    } else {
        "loss-plain.svg"
    };
    sd_lora::plot::loss_curve(&trainer.history)?.save(out.join(name))?;
    Ok(sd)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let out = std::path::PathBuf::from(args.next().unwrap_or("runs/dreambooth-drift".into()));
    let steps: usize = args.next().map_or(Ok(150), |s| s.parse())?;
    std::fs::create_dir_all(&out)?;
    // the subject: anime-look red circles
    let inst_dir = out.join("instance");
    std::fs::create_dir_all(&inst_dir)?;
    let picked: Vec<Scene> = scenes(2000, 7)
        .into_iter()
        .filter(|s| s.shape == 0 && s.colour == 0)
        .take(8)
        .collect();
    for (i, s) in picked.iter().enumerate() {
        s.render(Look::Anime)
            .save(inst_dir.join(format!("{i}.png")))?;
    }
    let px = sd_lora::tiny::scenes::SIZE as usize;
    let cfg = |caption: &str| DataConfig {
        width: px,
        height: px,
        captions: CaptionSource::Fixed(caption.into()),
        ..Default::default()
    };
    let data = ImageFolder::load(&inst_dir, &cfg(INSTANCE))?;
    // class images from the base model
    let base = load()?;
    let class = ClassImages {
        dir: out.join("class"),
        prompt: CLASS.into(),
        num_images: 32,
        generation: GenerateConfig {
            steps: 20,
            width: px,
            height: px,
            seed: 1,
            ..Default::default()
        },
    };
    class.ensure(&base, ProgressMode::Lines { every: 1 }, &mut |s| {
        eprintln!("{s}")
    })?;
    let class_data = ImageFolder::load(&class.dir, &cfg(CLASS))?;

    let others: Vec<String> = demo_prompts(8);
    let prompts = [vec![INSTANCE.to_string()], vec![CLASS.to_string()], others];
    let mut rows = Vec::new();
    let score = |sd: &StableDiffusion| -> Result<Vec<f64>> {
        prompts
            .iter()
            .map(|p| style(sd, p, if p.len() == 1 { 16 } else { 2 }))
            .collect()
    };
    rows.push(("base model".to_string(), score(&base)?, 0.0));
    for (name, c) in [
        ("DreamBooth", None),
        ("DreamBooth + prior preservation", Some(&class_data)),
    ] {
        let t = std::time::Instant::now();
        let sd = train(&out, &data, c, steps)?;
        let secs = t.elapsed().as_secs_f64();
        rows.push((name.to_string(), score(&sd)?, secs));
    }
    println!(
        "style score (0 photographic .. 1 anime), {steps} steps, batch 4, rank 16, lr 1e-3; 16 samples per prompt (2 per other prompt)"
    );
    println!("| run | \"{INSTANCE}\" | \"{CLASS}\" | 8 other scene prompts | training s |");
    println!("|---|---|---|---|---|");
    for (name, s, secs) in rows {
        println!(
            "| {name} | {:.3} | {:.3} | {:.3} | {secs:.0} |",
            s[0], s[1], s[2]
        );
    }
    Ok(())
}
