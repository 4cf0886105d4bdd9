//! Aspect-ratio buckets end to end: images resized and cropped to kohya's bucket, batches that
//! never mix buckets, every example once per epoch, and the bucketed epoch order rebuilt
//! exactly on resume.

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use rand_chacha::ChaCha12Rng;
use sd_lora::data::buckets::BucketConfig;
use sd_lora::prelude::*;
use std::cell::RefCell;
use std::path::Path;

/// Images of several shapes: portrait, landscape, square, and a tiny one.
fn write_mixed(dir: &Path) -> Vec<(String, (u32, u32))> {
    std::fs::create_dir_all(dir).unwrap();
    let sizes = [
        ("a_portrait", (40, 70)),
        ("b_landscape", (90, 45)),
        ("c_square", (50, 50)),
        ("d_portrait", (60, 100)),
        ("e_landscape", (128, 60)),
        ("f_square", (64, 64)),
    ];
    for (i, (name, (w, h))) in sizes.iter().enumerate() {
        let img = image::RgbImage::from_fn(*w, *h, |x, y| {
            image::Rgb([(x * 3 + i as u32 * 40) as u8, (y * 2) as u8, 90])
        });
        img.save(dir.join(format!("{name}.png"))).unwrap();
    }
    sizes.iter().map(|(n, s)| (n.to_string(), *s)).collect()
}

fn small_buckets() -> BucketConfig {
    BucketConfig {
        resolution: (64, 64),
        min_reso: 32,
        max_reso: 128,
        steps: 32,
        no_upscale: false,
    }
}

#[test]
fn images_are_cropped_to_their_bucket() {
    let tmp = tempfile::tempdir().unwrap();
    let sizes = write_mixed(tmp.path());
    let cfg = DataConfig {
        width: 64,
        height: 64,
        buckets: Some(small_buckets()),
        ..Default::default()
    };
    let data = ImageFolder::load(tmp.path(), &cfg).unwrap();
    let bc = small_buckets();
    let list = bc.buckets();
    assert_eq!(
        list,
        vec![(32, 96), (32, 128), (64, 64), (96, 32), (128, 32)]
    );
    for (e, (_, (w, h))) in data.examples.iter().zip(&sizes) {
        let want = bc.select((*w as usize, *h as usize), &list);
        let d = e.pixels.dims();
        assert_eq!((d[2], d[1]), want.bucket, "{}", e.path.display());
        assert_eq!(e.original_size, (*w as usize, *h as usize));
        assert_eq!(e.crop_top_left, want.centre_crop());
    }
    let hist = data.bucket_histogram();
    assert!(hist.len() >= 3, "{hist:?}");
    assert_eq!(hist.values().sum::<usize>(), sizes.len());
    // an image smaller than the step with no upscaling: refused by name, or skipped and counted
    image::RgbImage::new(20, 20)
        .save(tmp.path().join("z_tiny.png"))
        .unwrap();
    let no_up = DataConfig {
        buckets: Some(BucketConfig {
            no_upscale: true,
            ..small_buckets()
        }),
        ..cfg.clone()
    };
    let err = ImageFolder::load(tmp.path(), &no_up)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("z_tiny.png") && err.contains("bucket step"),
        "{err}"
    );
    let skipped = ImageFolder::load(
        tmp.path(),
        &DataConfig {
            skip_bad_images: true,
            ..no_up
        },
    )
    .unwrap();
    assert_eq!(skipped.len(), sizes.len());
    assert!(skipped
        .warnings
        .iter()
        .any(|w| w.contains("skipped 1 image")));
}

/// Records the batches it is asked for; the loss is a quadratic in one variable.
struct Recorder {
    buckets: Vec<usize>,
    w: Var,
    seen: RefCell<Vec<Vec<usize>>>,
}

impl Objective for Recorder {
    fn len(&self) -> usize {
        self.buckets.len()
    }
    fn loss(&self, batch: &[usize], _: &mut ChaCha12Rng) -> Result<Tensor> {
        self.seen.borrow_mut().push(batch.to_vec());
        Ok((self.w.as_tensor() * batch.len() as f64)?
            .sqr()?
            .sum_all()?)
    }
    fn buckets(&self) -> Option<Vec<usize>> {
        Some(self.buckets.clone())
    }
}

fn recorder() -> Recorder {
    Recorder {
        buckets: vec![0, 1, 0, 2, 1, 0, 2, 2, 1, 0],
        w: Var::new(&[1.0f32], &Device::Cpu).unwrap(),
        seen: RefCell::new(Vec::new()),
    }
}

fn config() -> TrainConfig {
    TrainConfig {
        batch_size: 2,
        grad_accum: 1,
        epochs: 3,
        lr: 1e-2,
        schedule: LrSchedule::Constant,
        ..Default::default()
    }
}

#[test]
fn batches_never_mix_buckets_and_cover_every_example_per_epoch() {
    let obj = recorder();
    let mut t = Trainer::for_vars(config(), vec![("w".into(), obj.w.clone())]).unwrap();
    // 4, 3 and 3 examples: 2 + 2 + 2 batches of at most 2 per epoch
    assert_eq!(t.steps_per_epoch(&obj), 6);
    t.run(&obj, &mut []).unwrap();
    assert_eq!(t.step, 18);
    let seen = obj.seen.borrow();
    for b in seen.iter() {
        assert!(
            b.iter().all(|i| obj.buckets[*i] == obj.buckets[b[0]]),
            "mixed batch {b:?}"
        );
    }
    for epoch in seen.chunks(6) {
        let mut all: Vec<usize> = epoch.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }
    assert_ne!(seen[0..6], seen[6..12], "each epoch reshuffles");
}

#[test]
fn bucketed_order_is_rebuilt_on_resume() {
    let straight = recorder();
    let mut t = Trainer::for_vars(config(), vec![("w".into(), straight.w.clone())]).unwrap();
    t.run(&straight, &mut []).unwrap();

    let split = recorder();
    let mut a = Trainer::for_vars(
        TrainConfig {
            max_steps: Some(8),
            ..config()
        },
        vec![("w".into(), split.w.clone())],
    )
    .unwrap();
    a.run(&split, &mut []).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck.safetensors");
    a.save_checkpoint(&ck).unwrap();
    let resumed = recorder();
    let mut b = Trainer::for_vars(config(), vec![("w".into(), resumed.w.clone())]).unwrap();
    b.load_checkpoint(&ck).unwrap();
    b.config.max_steps = None;
    b.run(&resumed, &mut []).unwrap();
    let mut both = split.seen.borrow().clone();
    both.extend(resumed.seen.borrow().iter().cloned());
    assert_eq!(*straight.seen.borrow(), both);
    let w = |v: &Var| v.as_tensor().to_vec1::<f32>().unwrap();
    assert_eq!(w(&straight.w), w(&resumed.w));
}
