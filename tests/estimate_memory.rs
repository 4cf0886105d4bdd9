//! `sd-lora estimate-memory` against what `sd-lora bench train` measures (peak RSS of the
//! process, tiny UNet, with and without gradient checkpointing, batch 1 and 4), `--vram`
//! answers, and bad sizes.

use std::path::Path;
use std::process::Command;

fn sd_lora(args: &[&str]) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_sd-lora"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A folder holding only the shipped tiny model's `unet/config.json` (what `bench train`
/// builds with random weights).
fn unet_only(dir: &Path) -> String {
    let unet = dir.join("unet");
    std::fs::create_dir_all(&unet).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-sd/unet/config.json");
    std::fs::copy(src, unet.join("config.json")).unwrap();
    dir.to_str().unwrap().to_string()
}

#[test]
fn the_estimate_is_within_15_percent_of_the_measured_peak_rss() {
    let tmp = tempfile::tempdir().unwrap();
    let model = unet_only(tmp.path());
    let mut worst: f64 = 0.0;
    for (latent, batch, gc) in [(32, 1, false), (32, 1, true), (16, 4, true), (16, 4, false)] {
        let (l, b) = (latent.to_string(), batch.to_string());
        let mut bench = vec![
            "bench", "train", "--model", &model, "--latent", &l, "--batch", &b, "--steps", "2",
            "--json",
        ];
        let px = (latent * 8).to_string();
        let mut est = vec![
            "estimate-memory",
            "--model",
            &model,
            "--resolution",
            &px,
            "--batch-size",
            &b,
            "--json",
        ];
        if gc {
            bench.push("--gradient-checkpointing");
            est.push("--gradient-checkpointing");
        }
        let measured = sd_lora(&bench)["peak_rss_mib"].as_f64().unwrap();
        let e = sd_lora(&est);
        let predicted = e["peak_mib"].as_f64().unwrap();
        let err = (predicted - measured) / measured;
        eprintln!(
            "latent {latent} batch {batch} checkpointing {gc}: predicted {predicted:.1} MiB, measured {measured:.1} MiB ({:+.1}%)",
            100.0 * err
        );
        assert!(
            err.abs() <= 0.15,
            "latent {latent} batch {batch} gc {gc}: predicted {predicted:.1} vs measured {measured:.1} MiB"
        );
        worst = worst.max(err.abs());
        let parts = e["parts"].as_object().unwrap();
        let sum: f64 = parts
            .iter()
            .filter(|(k, _)| !k.contains("caching"))
            .map(|(_, v)| v.as_f64().unwrap())
            .sum();
        assert!(
            (sum - predicted).abs() < 1e-6 * predicted,
            "parts add up: {e}"
        );
    }
    eprintln!("worst {:.1}%", 100.0 * worst);
}

#[test]
fn vram_says_what_fits_and_what_would_make_it_fit() {
    let e = sd_lora(&[
        "estimate-memory",
        "--model",
        "sd15",
        "--device",
        "cuda",
        "--batch-size",
        "4",
        "--vram",
        "8GiB",
        "--json",
    ]);
    assert_eq!(e["vram_mib"], 8192.0);
    assert_eq!(e["fits"], false, "{e}");
    let max = e["max_batch"].as_u64().unwrap();
    assert!((1..4).contains(&max), "{e}");
    let s = e["suggestions"].to_string();
    assert!(s.contains("--gradient-checkpointing"), "{e}");
    // checkpointing and half precision shrink the estimate; a larger batch grows it
    let peak = |extra: &[&str]| {
        let mut a = vec!["estimate-memory", "--model", "sd15", "--json"];
        a.extend_from_slice(extra);
        sd_lora(&a)["peak_mib"].as_f64().unwrap()
    };
    let base = peak(&["--resolution", "256"]);
    assert!(peak(&["--resolution", "256", "--gradient-checkpointing"]) < base);
    assert!(peak(&["--resolution", "256", "--dtype", "f16"]) < base);
    assert!(peak(&["--resolution", "256", "--batch-size", "2"]) > base);
    assert!(peak(&["--resolution", "256", "--train-text-encoder"]) > base);
    // bad sizes name the problem
    for (bad, needle) in [
        ("8", "give a unit"),
        ("8TB", "unknown unit"),
        ("lots", "8GiB"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_sd-lora"))
            .args(["estimate-memory", "--vram", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{bad}: {err}");
    }
}
