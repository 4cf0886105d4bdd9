//! Seconds per image: text-to-image with classifier-free guidance (7.5), DDIM, 20 steps, one
//! image, random (seeded) weights, CPU f32.
//!
//!     scripts/fetch-clip-bpe.sh && cargo bench --bench generate [-- tiny|sd15]
//!
//! Peer: benches/peer/generate_diffusers.py (same configs and sizes).

use anyhow::Result;
use candle_core::Device;
use sd_lora::pipeline::{GenerateConfig, StableDiffusion};
use sd_lora::text::{write_clip_vocab, ClipTextConfig};
use sd_lora::unet::UNetConfig;
use sd_lora::vae::VaeConfig;
use std::time::Instant;

fn main() -> Result<()> {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let home = std::env::var("HOME").unwrap_or_default();
    let bpe =
        std::path::PathBuf::from(home).join(".cache/sd-lora/clip-bpe/bpe_simple_vocab_16e6.txt.gz");
    let tok = tempfile::tempdir()?;
    write_clip_vocab(&bpe, tok.path())?;
    let cases = [
        (
            "tiny 64px",
            UNetConfig::tiny(),
            VaeConfig::tiny(),
            ClipTextConfig::tiny(),
            64usize,
            3usize,
        ),
        (
            "sd15 256px",
            UNetConfig::sd_v1_5(),
            VaeConfig::sd_v1_5(),
            ClipTextConfig::sd_v1_5(),
            256,
            1,
        ),
    ];
    println!("threads: {}", candle_core::utils::get_num_threads());
    println!("| case | s/image (min-max) |");
    println!("|---|---|");
    for (name, u, v, t, px, runs) in cases {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let sd = StableDiffusion::random(&u, &v, &t, tok.path(), 0, &Device::Cpu)?;
        let cfg = GenerateConfig {
            prompt: "a photo of a cat".into(),
            steps: 20,
            width: px,
            height: px,
            ..Default::default()
        };
        let _ = sd.generate(&GenerateConfig {
            steps: 1,
            ..cfg.clone()
        })?; // warm-up
        let mut times = Vec::new();
        for _ in 0..runs {
            let s = Instant::now();
            let _ = sd.generate(&cfg)?;
            times.push(s.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "| {name} | {:.2} ({:.2}-{:.2}) |",
            times[times.len() / 2],
            times[0],
            times[times.len() - 1]
        );
    }
    Ok(())
}
