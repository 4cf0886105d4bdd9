//! Data loading, LR schedules and the LoRA trainer on the tiny diffusers fixture.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::{tiny_pipeline, write_images};
use rand::SeedableRng;
use sd_lora::data::{CaptionSource, DataConfig, ImageFolder};
use sd_lora::lora::{LoraConfig, LoraModel};
use sd_lora::pipeline::StableDiffusion;
use sd_lora::train::{LatentCache, LrSchedule, TrainConfig, Trainer};

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
        2,
        "the 16x16 image is upscaled; 7 sidecars are missing: {:?}",
        data.warnings
    );
    assert!(data.warnings[0].contains("gray.png is 16x16, upscaled"));
    assert!(data.warnings[1].contains("7 of 8 images have no caption sidecar"));
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
    let data = common::tiny_dataset(dir.path());
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
    let mut every5 = sd_lora::train::Checkpoints::new(ckpt.path(), 5);
    t.train_with(&sd, &cache, &mut [&mut every5]).unwrap();
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
fn the_disk_cache_is_reused_keyed_by_content_and_rebuilt_when_corrupt() {
    let (dir, sd, mem) = setup();
    let imgs = dir.path().join("images");
    let cfg = DataConfig {
        width: 32,
        height: 32,
        captions: CaptionSource::Fixed("a red circle".into()),
        ..Default::default()
    };
    let data = ImageFolder::load(&imgs, &cfg).unwrap();
    let file = dir.path().join("cache/latents.safetensors");
    let (a, s1) = LatentCache::build_cached(&sd, &data, true, Some(&file)).unwrap();
    assert_eq!(
        (s1.images_encoded, s1.images_reused, s1.texts_encoded),
        (4, 0, 2),
        "the caption and the empty caption"
    );
    let (b, s2) = LatentCache::build_cached(&sd, &data, true, Some(&file)).unwrap();
    assert_eq!(
        (s2.images_encoded, s2.images_reused, s2.texts_encoded),
        (0, 4, 0)
    );
    // from disk = freshly encoded = the in-memory build
    for (x, y) in [(&a, &b), (&a, &mem)] {
        for i in 0..4 {
            assert_eq!(common::max_abs_diff(&x.latents[i].0, &y.latents[i].0), 0.0);
            assert_eq!(common::max_abs_diff(&x.flipped[i].1, &y.flipped[i].1), 0.0);
            assert_eq!(
                common::max_abs_diff(&x.embeddings[i], &y.embeddings[i]),
                0.0
            );
        }
    }
    // a changed image, another caption or another resolution misses the cache
    image::RgbImage::from_pixel(40, 30, image::Rgb([1, 2, 3]))
        .save(imgs.join("img0.png"))
        .unwrap();
    let data = ImageFolder::load(&imgs, &cfg).unwrap();
    let (_, s3) = LatentCache::build_cached(&sd, &data, true, Some(&file)).unwrap();
    assert_eq!((s3.images_encoded, s3.images_reused), (1, 3));
    let data = ImageFolder::load(
        &imgs,
        &DataConfig {
            width: 24,
            captions: CaptionSource::Fixed("a blue square".into()),
            ..cfg.clone()
        },
    )
    .unwrap();
    let (_, s4) = LatentCache::build_cached(&sd, &data, false, Some(&file)).unwrap();
    assert_eq!(
        (s4.images_encoded, s4.images_reused, s4.texts_encoded),
        (4, 0, 1)
    );
    // corrupt file: a warning and a rebuild
    std::fs::write(&file, b"not safetensors").unwrap();
    let (_, s5) = LatentCache::build_cached(&sd, &data, false, Some(&file)).unwrap();
    assert_eq!(s5.images_encoded, 4);
    assert!(
        s5.warnings[0].contains("unreadable") && s5.warnings[0].contains("latents.safetensors"),
        "{:?}",
        s5.warnings
    );
}

#[test]
fn caption_dropout_trains_on_the_empty_caption() {
    let (_dir, sd, cache) = setup();
    let empty = sd.encode_prompts(&[""]).unwrap().squeeze(0).unwrap();
    assert_eq!(common::max_abs_diff(&cache.empty, &empty), 0.0);
    assert!(common::max_abs_diff(&cache.embeddings[0], &empty) > 1e-3);
    // the same data with every caption replaced by the empty one
    let blank = LatentCache {
        embeddings: vec![cache.empty.clone(); cache.len()],
        ..cache.clone()
    };
    let loss = |p: f64, c: &LatentCache| {
        let t = Trainer::new(
            &sd,
            TrainConfig {
                caption_dropout: p,
                ..Default::default()
            },
        )
        .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        t.loss(&sd, c, &[0, 1, 2, 3], &mut rng)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // dropout (almost) always: the captions no longer matter
    assert_eq!(loss(0.999_999, &cache), loss(0.999_999, &blank));
    // without dropout they do
    assert_ne!(loss(0.0, &cache), loss(0.0, &blank));
}

/// The engine on a toy objective (fit w to 12 targets, MSE): the loss falls, every hook sees
/// every step and the end, progress prints lines (every N and the last) or a bar, and
/// `Checkpoints::keep_last` prunes old files while a resumed run matches an uninterrupted one.
#[test]
fn the_engine_runs_any_objective_with_hooks() {
    use rand_chacha::ChaCha12Rng;
    use sd_lora::train::{checkpoint, Checkpoints, Objective, Progress, ProgressMode};
    use sd_lora::train::{StepHook, StepRecord};

    struct Fit {
        w: candle_core::Var,
        targets: Tensor,
    }
    impl Objective for Fit {
        fn len(&self) -> usize {
            12
        }
        fn loss(&self, batch: &[usize], _: &mut ChaCha12Rng) -> anyhow::Result<Tensor> {
            let idx = Tensor::new(
                batch.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                &Device::Cpu,
            )?;
            let t = self.targets.index_select(&idx, 0)?;
            Ok(t.broadcast_sub(self.w.as_tensor())?.sqr()?.mean_all()?)
        }
    }
    struct Count(usize, usize);
    impl StepHook for Count {
        fn after_step(&mut self, _: &Trainer, _: &StepRecord, _: usize) -> anyhow::Result<()> {
            self.0 += 1;
            Ok(())
        }
        fn after_training(&mut self, _: &Trainer) -> anyhow::Result<()> {
            self.1 += 1;
            Ok(())
        }
    }
    let cfg = TrainConfig {
        lr: 0.3,
        batch_size: 3,
        grad_accum: 2,
        epochs: 5,
        schedule: LrSchedule::Constant,
        weight_decay: 0.0,
        ..Default::default()
    };
    let fit = || Fit {
        w: candle_core::Var::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        targets: Tensor::arange(0f32, 48.0, &Device::Cpu)
            .unwrap()
            .reshape((12, 4))
            .unwrap()
            .affine(0.1, 0.0)
            .unwrap(),
    };
    let dir = tempfile::tempdir().unwrap();
    let a = fit();
    let mut t = Trainer::for_vars(cfg.clone(), vec![("w".into(), a.w.clone())]).unwrap();
    let (mut count, mut lines) = (Count(0, 0), Vec::new());
    let mut ckpt = Checkpoints::new(dir.path().join("a"), 3);
    ckpt.keep_last = Some(2);
    {
        let mut progress = Progress::new("toy ", ProgressMode::Lines { every: 4 }, |s: &str| {
            lines.push(s.to_string())
        });
        t.run(&a, &mut [&mut count, &mut progress, &mut ckpt])
            .unwrap();
    }
    // 12 examples, batch 3, 2 micro-batches per step: 2 steps per epoch, 10 in all
    assert_eq!((t.step, count.0, count.1), (10, 10, 1));
    let h = &t.history;
    assert!(
        h[9].loss < 0.5 * h[0].loss,
        "{:?}",
        h.iter().map(|r| r.loss).collect::<Vec<_>>()
    );
    assert_eq!(lines.len(), 3, "steps 4, 8 and 10: {lines:?}");
    assert!(
        lines[2].starts_with("toy step 10/10") && lines[2].contains("it/s"),
        "{lines:?}"
    );
    let kept = std::fs::read_dir(dir.path().join("a")).unwrap().count();
    assert_eq!(kept, 2, "keep_last 2");
    assert!(dir
        .path()
        .join("a")
        .join(checkpoint::file_name(10))
        .is_file());
    assert!(dir
        .path()
        .join("a")
        .join(checkpoint::file_name(9))
        .is_file());
    // a bar on a terminal: redrawn with \r, finished with a newline
    let mut bar = Vec::new();
    {
        let b = fit();
        let mut t = Trainer::for_vars(cfg.clone(), vec![("w".into(), b.w.clone())]).unwrap();
        let mut p = Progress::new("", ProgressMode::Bar, |s: &str| bar.push(s.to_string()));
        t.run(&b, &mut [&mut p]).unwrap();
    }
    assert_eq!(bar.len(), 11);
    assert!(bar[0].starts_with("\r[###") && bar[10] == "\n", "{bar:?}");
    // stopped after 5 steps (mid-epoch 2), resumed to 10: the same weights
    let c = fit();
    let mut t1 = Trainer::for_vars(
        TrainConfig {
            max_steps: Some(5),
            ..cfg.clone()
        },
        vec![("w".into(), c.w.clone())],
    )
    .unwrap();
    t1.run(&c, &mut [&mut Checkpoints::new(dir.path().join("c"), 0)])
        .unwrap();
    let d = fit();
    let mut t2 = Trainer::for_vars(cfg.clone(), vec![("w".into(), d.w.clone())]).unwrap();
    t2.load_checkpoint(&checkpoint::latest(&dir.path().join("c")).unwrap().unwrap())
        .unwrap();
    t2.config.max_steps = None;
    t2.run(&d, &mut []).unwrap();
    assert_eq!(t2.step, 10);
    assert_eq!(
        d.w.as_tensor().to_vec1::<f32>().unwrap(),
        a.w.as_tensor().to_vec1::<f32>().unwrap(),
        "resumed run differs"
    );
}
