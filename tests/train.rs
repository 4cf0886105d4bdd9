//! Data loading, LR schedules and the LoRA trainer on the tiny diffusers fixture.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::tiny_pipeline;
use rand::SeedableRng;
use sd_lora::data::{CaptionSource, DataConfig, ImageFolder};
use sd_lora::lora::{LoraConfig, LoraModel};
use sd_lora::pipeline::StableDiffusion;
use sd_lora::train::{LatentCache, LrSchedule, TrainConfig, Trainer};
use std::path::Path;

fn write_images(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..4u8 {
        let img = image::RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb([
                (x as u8).wrapping_mul(6).wrapping_add(i * 60),
                (y as u8) * 8,
                200 - i * 40,
            ])
        });
        img.save(dir.join(format!("img{i}.png"))).unwrap();
    }
}

#[test]
fn lr_schedules_and_step_counts() {
    let c = TrainConfig::default();
    assert_eq!(
        c.steps_per_epoch(57),
        4,
        "57 images, batch 4, accum 4: 15 micro-batches, 4 steps"
    );
    assert_eq!(c.total_steps(57), 80);
    assert!((c.lr_at(0, 0, 80) - 1e-4).abs() < 1e-12);
    assert!(
        (c.lr_at(50, 10, 80) - (1e-4 + 1e-6) / 2.0).abs() < 1e-12,
        "half way through the epochs"
    );
    let cos = TrainConfig {
        schedule: LrSchedule::Cosine { floor: 0.0 },
        warmup_steps: 10,
        max_steps: Some(110),
        ..c.clone()
    };
    assert!(
        (cos.lr_at(0, 0, 110) - 1e-5).abs() < 1e-12,
        "linear warm-up"
    );
    assert!((cos.lr_at(60, 0, 110) - 5e-5).abs() < 1e-12);
    assert!(cos.lr_at(109, 0, 110) < 1e-7);
    let constant = TrainConfig {
        schedule: LrSchedule::Constant,
        ..c
    };
    assert_eq!(constant.lr_at(33, 3, 80), 1e-4);
}

#[test]
fn image_folders_load_convert_and_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_images(d);
    image::GrayImage::from_pixel(16, 16, image::Luma([90]))
        .save(d.join("gray.png"))
        .unwrap();
    image::RgbaImage::from_pixel(32, 32, image::Rgba([1, 2, 3, 4]))
        .save(d.join("rgba.png"))
        .unwrap();
    image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_pixel(
        32,
        32,
        image::Rgb([65535, 0, 1000]),
    )
    .save(d.join("deep.png"))
    .unwrap();
    image::RgbImage::from_pixel(32, 32, image::Rgb([10, 20, 30]))
        .save(d.join("photo.jpg"))
        .unwrap();
    std::fs::write(d.join("img0.txt"), "a red thing\n").unwrap();
    let cfg = DataConfig {
        width: 32,
        height: 24,
        captions: CaptionSource::Sidecar {
            fallback: "fallback".into(),
        },
        ..Default::default()
    };
    let data = ImageFolder::load(d, &cfg).unwrap();
    assert_eq!(data.len(), 8);
    assert!(data.examples.iter().all(|e| e.pixels.dims() == [3, 24, 32]));
    let cap: Vec<&str> = data.examples.iter().map(|e| e.caption.as_str()).collect();
    assert!(cap.contains(&"a red thing") && cap.contains(&"fallback"));
    assert_eq!(
        data.warnings.len(),
        1,
        "the 16x16 image is upscaled: {:?}",
        data.warnings
    );
    let px: Vec<f32> = data
        .examples
        .iter()
        .find(|e| e.path.ends_with("deep.png"))
        .unwrap()
        .pixels
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!((px[0] - 1.0).abs() < 1e-6, "16-bit white maps to +1");

    // a corrupt file fails naming it, or is skipped with a warning
    std::fs::write(d.join("broken.png"), b"not an image").unwrap();
    let err = ImageFolder::load(d, &cfg).unwrap_err().to_string();
    assert!(err.contains("broken.png"), "{err}");
    let data = ImageFolder::load(
        d,
        &DataConfig {
            skip_bad_images: true,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_eq!(data.len(), 8);
    assert!(data.warnings.iter().any(|w| w.contains("broken.png")));
    std::fs::remove_file(d.join("broken.png")).unwrap();
    // non-UTF-8 caption
    std::fs::write(d.join("img1.txt"), [0xff, 0xfe, 0x41]).unwrap();
    let err = ImageFolder::load(d, &cfg).unwrap_err().to_string();
    assert!(err.contains("img1.txt") && err.contains("UTF-8"), "{err}");
    // empty and missing folders
    let empty = tempfile::tempdir().unwrap();
    assert!(ImageFolder::load(empty.path(), &cfg)
        .unwrap_err()
        .to_string()
        .contains("no images"));
    assert!(ImageFolder::load("/no/such/folder", &cfg)
        .unwrap_err()
        .to_string()
        .contains("/no/such/folder"));
}

fn setup() -> (tempfile::TempDir, StableDiffusion, LatentCache) {
    let dir = tiny_pipeline();
    let mut sd =
        StableDiffusion::from_folder(dir.path(), Some("fp16"), DType::F32, &Device::Cpu).unwrap();
    sd.unet
        .inject_lora(
            &LoraConfig::new(4, 4.0).with_targets(&["to_q", "to_k", "to_v", "to_out.0"]),
            &VarMap::new(),
        )
        .unwrap();
    let imgs = dir.path().join("images");
    write_images(&imgs);
    let data = ImageFolder::load(
        &imgs,
        &DataConfig {
            width: 32,
            height: 32,
            captions: CaptionSource::Fixed("a red circle".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let cache = LatentCache::build(&sd, &data, true).unwrap();
    assert_eq!(
        (
            cache.latents.len(),
            cache.flipped.len(),
            cache.embeddings.len()
        ),
        (4, 4, 4)
    );
    (dir, sd, cache)
}

fn eval_loss(t: &Trainer, sd: &StableDiffusion, cache: &LatentCache) -> f64 {
    let mut total = 0.0;
    for seed in 0..8 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + seed);
        total += t
            .loss(sd, cache, &[0, 1, 2, 3], &mut rng)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
    }
    total / 8.0
}

fn lora_values(sd: &StableDiffusion) -> Vec<Vec<f32>> {
    sd.unet
        .lora_vars()
        .unwrap()
        .iter()
        .map(|(_, v)| v.flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn training_lowers_the_loss_leaves_base_weights_and_is_deterministic() {
    let (_dir, sd, cache) = setup();
    let base: Vec<Tensor> = sd
        .unet
        .linears()
        .unwrap()
        .iter()
        .map(|l| l.weight().clone())
        .collect();
    let base_values: Vec<Vec<f32>> = base
        .iter()
        .map(|w| w.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let cfg = TrainConfig {
        lr: 3e-3,
        batch_size: 2,
        grad_accum: 2,
        max_steps: Some(40),
        schedule: LrSchedule::Constant,
        ..Default::default()
    };
    let mut t = Trainer::new(&sd, cfg.clone()).unwrap();
    let before = eval_loss(&t, &sd, &cache);
    let mut seen = 0;
    t.train(&sd, &cache, &mut |r| {
        seen += 1;
        assert!(r.loss.is_finite() && r.lr == 3e-3 && r.step == seen);
    })
    .unwrap();
    assert_eq!(
        (t.step, t.history.len(), t.epoch),
        (40, 40, 40),
        "4 images / batch 2 / accum 2 = 1 step per epoch"
    );
    let after = eval_loss(&t, &sd, &cache);
    println!("eval loss {before:.4} -> {after:.4}");
    assert!(
        after < 0.9 * before,
        "loss should fall: {before} -> {after}"
    );
    for (l, v) in sd.unet.linears().unwrap().iter().zip(&base_values) {
        assert_eq!(
            &l.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            v,
            "{} changed",
            l.name()
        );
    }
    let trained = lora_values(&sd);

    // the same seed gives bit-identical adapters
    let (_dir2, sd2, cache2) = setup();
    let mut t2 = Trainer::new(&sd2, cfg).unwrap();
    t2.train(&sd2, &cache2, &mut |_| {}).unwrap();
    assert_eq!(lora_values(&sd2), trained);
    assert_eq!(
        t2.history.iter().map(|r| r.loss).collect::<Vec<_>>(),
        t.history.iter().map(|r| r.loss).collect::<Vec<_>>()
    );
}

#[test]
fn a_diverging_run_stops_with_the_step_named() {
    let (_dir, sd, cache) = setup();
    let cfg = TrainConfig {
        lr: 1e30,
        max_grad_norm: None,
        batch_size: 4,
        grad_accum: 1,
        max_steps: Some(5),
        ..Default::default()
    };
    let mut t = Trainer::new(&sd, cfg).unwrap();
    let err = t.train(&sd, &cache, &mut |_| {}).unwrap_err().to_string();
    assert!(
        err.contains("at step") && err.contains("lower learning rate"),
        "{err}"
    );
    assert!(Trainer::new(
        &sd,
        TrainConfig {
            lr: -1.0,
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn resume_from_a_checkpoint_is_bit_identical() {
    use sd_lora::train::checkpoint;
    let ckpt = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        lr: 1e-3,
        batch_size: 2,
        grad_accum: 1,
        max_steps: Some(12),
        ..Default::default()
    };
    // uninterrupted, checkpointing every 5 steps (step 5 is mid-epoch: 2 steps per epoch)
    let (_d1, sd, cache) = setup();
    let mut t = Trainer::new(&sd, cfg.clone()).unwrap();
    t.checkpoints = Some((ckpt.path().to_path_buf(), 5));
    t.train(&sd, &cache, &mut |_| {}).unwrap();
    let want = lora_values(&sd);
    for s in [5, 10, 12] {
        assert!(
            ckpt.path().join(checkpoint::file_name(s)).is_file(),
            "checkpoint {s}"
        );
    }
    // an interrupted write leaves only a dot-temp file, which resume ignores
    std::fs::write(
        ckpt.path().join(".checkpoint-000099.safetensors.tmp-1"),
        b"partial",
    )
    .unwrap();
    assert_eq!(
        checkpoint::latest(ckpt.path()).unwrap().unwrap(),
        ckpt.path().join(checkpoint::file_name(12))
    );

    // a fresh process resumes from step 5 and ends where the uninterrupted run ended
    let (_d2, sd2, cache2) = setup();
    let mut t2 = Trainer::new(
        &sd2,
        TrainConfig {
            max_steps: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    t2.load_checkpoint(&ckpt.path().join(checkpoint::file_name(5)))
        .unwrap();
    assert_eq!((t2.step, t2.config.max_steps), (5, Some(12)));
    t2.train(&sd2, &cache2, &mut |_| {}).unwrap();
    let losses = |t: &Trainer| {
        t.history
            .iter()
            .map(|r| (r.step, r.epoch, r.loss, r.lr))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&t2), losses(&t));
    assert!(lora_values(&sd2) == want, "resumed adapter differs");

    // damaged checkpoints are refused by name
    let bad = ckpt.path().join("bad.safetensors");
    let full = std::fs::read(ckpt.path().join(checkpoint::file_name(5))).unwrap();
    std::fs::write(&bad, &full[..full.len() / 2]).unwrap();
    let err = t2.load_checkpoint(&bad).unwrap_err().to_string();
    assert!(err.contains("bad.safetensors"), "{err}");
}

#[test]
fn cli_train_writes_files_and_resumes() {
    let dir = tiny_pipeline();
    let imgs = dir.path().join("images");
    write_images(&imgs);
    let run = tempfile::tempdir().unwrap();
    let out = run.path().join("run");
    let base = |steps: &str| {
        vec![
            "train".to_string(),
            "--model".into(),
            dir.path().to_str().unwrap().into(),
            "--variant".into(),
            "fp16".into(),
            "--data".into(),
            imgs.to_str().unwrap().into(),
            "--out".into(),
            out.to_str().unwrap().into(),
            "--resolution".into(),
            "32".into(),
            "--rank".into(),
            "4".into(),
            "--batch-size".into(),
            "2".into(),
            "--grad-accum".into(),
            "1".into(),
            "--lr".into(),
            "1e-3".into(),
            "--max-steps".into(),
            steps.into(),
            "--save-every".into(),
            "3".into(),
            "--caption".into(),
            "a red circle".into(),
        ]
    };
    let run_cli = |args: Vec<String>| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sd-lora"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = run_cli(base("6"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "lora.safetensors",
        "lora_peft.safetensors",
        "metrics.csv",
        "checkpoints/checkpoint-000003.safetensors",
        "checkpoints/checkpoint-000006.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.csv"))
            .unwrap()
            .lines()
            .count(),
        7
    );
    // the kohya file carries the training settings and loads back into the model
    let bytes = std::fs::read(out.join("lora.safetensors")).unwrap();
    let (_, h) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = h.metadata().clone().unwrap();
    assert_eq!(
        (
            meta["ss_network_dim"].as_str(),
            meta["ss_network_alpha"].as_str(),
            meta["ss_max_train_steps"].as_str()
        ),
        ("4", "8", "6")
    );
    let mut sd =
        StableDiffusion::from_folder(dir.path(), Some("fp16"), DType::F32, &Device::Cpu).unwrap();
    let lf = sd_lora::lora::LoraFile::read(
        out.join("lora.safetensors"),
        &sd.unet.linear_names().unwrap(),
    )
    .unwrap();
    let s = sd.unet.apply_lora_file(&lf, &VarMap::new()).unwrap();
    assert_eq!(
        s.lora_layers, 24,
        "q,k,v of attn1 and attn2 in the fixture's 4 transformers"
    );
    // --resume extends the run from the last checkpoint
    let mut args = base("8");
    args.push("--resume".into());
    let o = run_cli(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("resumed from"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.csv"))
            .unwrap()
            .lines()
            .count(),
        9
    );
    assert!(out
        .join("checkpoints/checkpoint-000008.safetensors")
        .is_file());
    // bad input
    let mut args = base("2");
    args[6] = "/no/such/images".into();
    let o = run_cli(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("/no/such/images") && !err.contains("panicked"),
        "{err}"
    );
}
