//! The README's pictures, from real (small) training runs: the tiny test pipeline
//! (tests/golden/data/tiny_pipeline, random weights) fine-tuned with LoRA ranks 4, 8 and 16 on
//! 8 synthetic images, then every renderer of `sd_lora::plot`.
//!
//!     scripts/fetch-clip-bpe.sh && cargo run --release --example readme_figures [-- OUT_DIR]
//!
//! Default OUT_DIR: docs/img.

use anyhow::Result;
use sd_lora::device::peak_rss_mib;
use sd_lora::plot::*;
use sd_lora::prelude::*;

fn main() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("docs/img"));
    std::fs::create_dir_all(&out)?;
    // the fixture pipeline with a tokenizer built from the CLIP BPE list
    let tmp = std::env::temp_dir().join(format!("sd-lora-figures-{}", std::process::id()));
    copy_dir(&root.join("tests/golden/data/tiny_pipeline"), &tmp)?;
    sd_lora::text::write_clip_vocab(&sd_lora::text::default_clip_bpe(), &tmp.join("tokenizer"))?;
    let imgs = tmp.join("images");
    std::fs::create_dir_all(&imgs)?;
    for i in 0..8u32 {
        image::RgbImage::from_fn(32, 32, |x, y| {
            let d = ((x as i32 - 16).pow(2) + (y as i32 - 16).pow(2)) as u32;
            if d < 40 + 20 * (i % 3) {
                image::Rgb([220, (30 * i) as u8, 40])
            } else {
                image::Rgb([20, 40 + (x * 4) as u8, 90 + (y * 3) as u8])
            }
        })
        .save(imgs.join(format!("{i}.png")))?;
    }
    let data = ImageFolder::load(
        &imgs,
        &DataConfig {
            width: 32,
            height: 32,
            captions: CaptionSource::Fixed("a red circle".into()),
            ..Default::default()
        },
    )?;
    let mut runs = Vec::new();
    let mut stats = Vec::new();
    let mut anatomies = Vec::new();
    let mut last: Option<StableDiffusion> = None;
    for rank in [4usize, 8, 16] {
        let mut sd = StableDiffusion::from_folder(&tmp, Some("fp16"), DType::F32, &Device::Cpu)?;
        let s = sd.unet.inject_lora(
            &LoraConfig::new(rank, 2.0 * rank as f64)
                .with_targets(&["to_q", "to_k", "to_v", "to_out.0"]),
            &VarMap::new(),
        )?;
        let cache = LatentCache::build(&sd, &data, true)?;
        let mut t = Trainer::new(
            &sd,
            TrainConfig {
                lr: 2e-3,
                epochs: 30,
                batch_size: 2,
                grad_accum: 2,
                ..Default::default()
            },
        )?;
        t.train(&sd, &cache, &mut |_| {})?;
        let secs = t.history.iter().map(|r| r.seconds).sum::<f64>() / t.history.len() as f64;
        println!(
            "rank {rank}: {} steps, last loss {:.4}",
            t.step,
            t.history.last().map_or(0.0, |r| r.loss)
        );
        runs.push(LossRun::new(format!("rank {rank}"), &t.history));
        stats.push(RunStats {
            label: format!("rank {rank}"),
            trainable_params: s.trainable_params,
            seconds_per_step: secs,
            peak_mib: peak_rss_mib(),
        });
        let a = LoraAnatomy::of(&sd.unet)?;
        if rank == 16 {
            loss_curve(&t.history)?.save(out.join("loss.png"))?;
            a.heatmap()?.save(out.join("anatomy.png"))?;
        }
        anatomies.push((format!("rank {rank}"), a));
        last = Some(sd);
    }
    loss_curves(&runs)?.save(out.join("runs.png"))?;
    run_comparison(&stats)?.save(out.join("comparison.png"))?;
    spectra_chart(&anatomies)?.save(out.join("spectra.png"))?;
    let mut sd = last.expect("three runs");
    let cfg = GenerateConfig {
        prompt: "a red circle".into(),
        steps: 10,
        width: 32,
        height: 32,
        num_images: 3,
        ..Default::default()
    };
    let strengths = [0.0, 0.5, 1.0];
    let rows: Vec<Vec<image::RgbImage>> = sd
        .generate_at_strengths(&cfg, &strengths)?
        .into_iter()
        .map(|i| i.images)
        .collect();
    labelled_grid(
        &rows,
        &strengths
            .iter()
            .map(|s| format!("strength {s}"))
            .collect::<Vec<_>>(),
        &(0..3).map(|i| format!("image {i}")).collect::<Vec<_>>(),
        Some("\"a red circle\" (tiny test pipeline, random base weights)"),
    )?
    .save(out.join("grid.png"))?;
    std::fs::remove_dir_all(&tmp)?;
    println!("wrote {}", out.display());
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}
