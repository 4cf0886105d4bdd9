//! DreamBooth with prior preservation on the tiny fixture: the loss's class half computed by
//! hand (one-size and mixed-size batches), diffusers' item pairing, and class-image generation
//! that resumes where a killed run stopped.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::tiny_pipeline;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, StandardNormal};
use sd_lora::data::{CaptionSource, DataConfig, ImageFolder};
use sd_lora::lora::{LoraConfig, LoraModel};
use sd_lora::pipeline::{GenerateConfig, StableDiffusion};
use sd_lora::train::{ClassImages, Denoising, LatentCache, Objective, PriorPreservation};
use sd_lora::train::{ProgressMode, TrainConfig};
use std::path::Path;

fn sd(dir: &Path) -> StableDiffusion {
    let mut sd = StableDiffusion::from_folder(dir, Some("fp16"), DType::F32, &Device::Cpu).unwrap();
    sd.unet
        .inject_lora(
            &LoraConfig::new(4, 4.0).with_targets(&["to_q", "to_k", "to_v"]),
            &VarMap::new(),
        )
        .unwrap();
    // non-zero B so the adapters change the prediction
    for (_, v) in sd.unet.lora_vars().unwrap() {
        let r = Tensor::randn(0f32, 0.1, v.dims(), &Device::Cpu).unwrap();
        v.set(&r).unwrap();
    }
    sd
}

/// Three class images in `dir` (colours unlike the instance images'), read at `w x h`.
fn class_folder(dir: &Path, w: usize, h: usize) -> ImageFolder {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..3u8 {
        image::RgbImage::from_fn(36, 36, |x, y| {
            image::Rgb([20 + i * 70, x as u8 * 5, y as u8 * 3])
        })
        .save(dir.join(format!("c{i}.png")))
        .unwrap();
    }
    let cfg = DataConfig {
        width: w,
        height: h,
        captions: CaptionSource::Fixed("a circle".into()),
        ..Default::default()
    };
    ImageFolder::load(dir, &cfg).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f32>().unwrap() as f64
}

fn randn(rng: &mut ChaCha12Rng, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// The loss written out step by step: the examples' latent samples, then per latent size (in
/// order of first appearance) noise, timesteps, DDPM noising `sqrt(a) x0 + sqrt(1 - a) eps`,
/// the UNet, and the squared error to the noise (epsilon prediction); the mean over the first
/// `b` examples plus `w` x the mean over the rest, that mean, and each example's error.
fn by_hand(
    sd: &StableDiffusion,
    examples: &[(&LatentCache, usize)],
    b: usize,
    w: f64,
    seed: u64,
) -> (f64, f64, Vec<f64>) {
    let mut rng = ChaCha12Rng::seed_from_u64(seed);
    let ac = sd_lora::scheduler::Scheduler::new(
        sd_lora::scheduler::SchedulerKind::Ddpm,
        &sd.scheduler_config,
        1,
    )
    .unwrap()
    .alphas_cumprod()
    .to_vec();
    let mut z = Vec::new();
    for &(c, i) in examples {
        let (m, lv) = &c.latents[c.items[i]];
        let eps = randn(&mut rng, m.dims());
        z.push((m + (lv * 0.5).unwrap().exp().unwrap() * eps).unwrap());
    }
    let mut sizes: Vec<Vec<usize>> = Vec::new();
    for zi in &z {
        if !sizes.contains(&zi.dims().to_vec()) {
            sizes.push(zi.dims().to_vec());
        }
    }
    let mut err = vec![0.0; examples.len()];
    for size in sizes {
        let pos: Vec<usize> = (0..z.len()).filter(|&p| z[p].dims() == size).collect();
        let x0: Vec<Tensor> = pos
            .iter()
            .map(|&p| (&z[p] * sd.vae.config.scaling_factor).unwrap())
            .collect();
        let x0 = Tensor::stack(&x0, 0).unwrap();
        let ctx: Vec<Tensor> = pos
            .iter()
            .map(|&p| {
                let (c, i) = examples[p];
                c.embeddings[c.items[i]].clone()
            })
            .collect();
        let ctx = Tensor::stack(&ctx, 0).unwrap();
        let noise = randn(&mut rng, x0.dims());
        let t: Vec<u32> = pos.iter().map(|_| rng.random_range(0..1000u32)).collect();
        let mut noisy = Vec::new();
        for (k, &ti) in t.iter().enumerate() {
            let a = ac[ti as usize];
            let xk = (x0.get(k).unwrap() * a.sqrt()).unwrap();
            let nk = (noise.get(k).unwrap() * (1.0 - a).sqrt()).unwrap();
            noisy.push((xk + nk).unwrap());
        }
        let noisy = Tensor::stack(&noisy, 0).unwrap();
        let tt = Tensor::new(t, &Device::Cpu).unwrap();
        let pred = sd.unet.forward(&noisy, &tt, &ctx).unwrap();
        for (k, &p) in pos.iter().enumerate() {
            let d = (pred.get(k).unwrap() - noise.get(k).unwrap()).unwrap();
            err[p] = scalar(&d.sqr().unwrap().mean_all().unwrap());
        }
    }
    let inst = err[..b].iter().sum::<f64>() / b as f64;
    let prior = err[b..].iter().sum::<f64>() / (err.len() - b) as f64;
    (inst + w * prior, prior, err)
}

#[test]
fn the_prior_loss_is_the_class_halfs_mse_weighted_as_diffusers_does() {
    let dir = tiny_pipeline();
    let sd = sd(dir.path());
    assert_eq!(sd.scheduler_config.prediction_type, "epsilon");
    let data = common::tiny_dataset(dir.path());
    let inst = LatentCache::build(&sd, &data, false).unwrap();
    let cfg = TrainConfig::default();
    for (case, (w, h)) in [("one size", (32, 32)), ("mixed sizes", (48, 32))] {
        let class_data = class_folder(&dir.path().join(format!("class-{w}x{h}")), w, h);
        let class = LatentCache::build(&sd, &class_data, false).unwrap();
        let weight = 0.7;
        let obj = PriorPreservation {
            instance: Denoising::new(&sd, &inst, &cfg).unwrap(),
            class: &class,
            prior_loss_weight: weight,
        };
        // diffusers' dataset: max(n_instance, n_class) items, class i mod n_class
        assert_eq!(obj.len(), 4);
        let batch = [1, 3];
        let ex = obj.examples(&batch);
        let pairs: Vec<usize> = ex.iter().map(|e| e.1).collect();
        assert_eq!(pairs, [1, 3, 1, 0], "{case}");
        assert!(std::ptr::eq(ex[1].0, &inst) && std::ptr::eq(ex[2].0, &class));

        let mut rng = ChaCha12Rng::seed_from_u64(11);
        let (total, instance, prior) = obj.loss_parts(&batch, &mut rng).unwrap();
        let (want, want_prior, _) = by_hand(&sd, &ex, 2, weight, 11);
        let (got, got_prior) = (scalar(&total), scalar(&prior));
        assert!(
            ((got - want) / want).abs() < 1e-5,
            "{case}: loss {got} vs hand-computed {want}"
        );
        assert!(
            ((got_prior - want_prior) / want_prior).abs() < 1e-5,
            "{case}: prior loss {got_prior} vs {want_prior}"
        );
        assert!(
            (got - scalar(&instance) - weight * got_prior).abs() < 1e-6,
            "{case}: total = instance + w x prior"
        );
        // the objective's loss is the total; weight 0 leaves the instance half
        let mut rng = ChaCha12Rng::seed_from_u64(11);
        assert_eq!(scalar(&obj.loss(&batch, &mut rng).unwrap()), got);
        let no_prior = PriorPreservation {
            prior_loss_weight: 0.0,
            ..obj
        };
        let mut rng = ChaCha12Rng::seed_from_u64(11);
        let only = scalar(&no_prior.loss(&batch, &mut rng).unwrap());
        assert!((only - scalar(&instance)).abs() < 1e-7, "{case}");
        // sizes interleaved: one forward per size, errors back in the examples' order
        let mixed = [(&class, 0), (&inst, 1), (&class, 2), (&inst, 0)];
        let mut rng = ChaCha12Rng::seed_from_u64(5);
        let (mse, _) = no_prior.instance.per_sample(&mixed, &mut rng).unwrap();
        let got: Vec<f32> = mse.to_vec1().unwrap();
        let want = by_hand(&sd, &mixed, 2, 1.0, 5).2;
        for (g, w) in got.iter().zip(&want) {
            assert!(
                ((*g as f64 - w) / w).abs() < 1e-5,
                "{case}: {got:?} vs {want:?}"
            );
        }
        // gradients reach every adapter through the class half
        let mut rng = ChaCha12Rng::seed_from_u64(11);
        let loss = no_prior.loss_parts(&batch, &mut rng).unwrap().2;
        let vars = sd.unet.lora_vars().unwrap();
        let g = sd_lora::train::step::grads_of(&loss, &vars).unwrap();
        assert!(g.iter().all(|g| {
            let n = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            n.is_finite() && n > 0.0
        }));
    }
}

fn generation() -> GenerateConfig {
    GenerateConfig {
        steps: 3,
        width: 32,
        height: 32,
        seed: 5,
        ..Default::default()
    }
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn class_image_generation_resumes_where_it_stopped_and_makes_the_same_images() {
    let dir = tiny_pipeline();
    let sd =
        StableDiffusion::from_folder(dir.path(), Some("fp16"), DType::F32, &Device::Cpu).unwrap();
    let work = tempfile::tempdir().unwrap();
    let class = |name: &str, n: usize| ClassImages {
        dir: work.path().join(name),
        prompt: "a blue square".into(),
        num_images: n,
        generation: generation(),
    };
    let mut log = Vec::new();
    let mut out = |s: &str| log.push(s.to_string());
    let lines = ProgressMode::Lines { every: 1 };

    // straight: three images in one go
    let r = class("straight", 3).ensure(&sd, lines, &mut out).unwrap();
    assert_eq!((r.existing, r.generated.len()), (0, 3));
    // interrupted: two images, a killed write's leftover, then the rest
    let r = class("resumed", 2).ensure(&sd, lines, &mut out).unwrap();
    assert_eq!((r.existing, r.generated.len()), (0, 2));
    let partial = work.path().join("resumed/.class-00002.png.tmp");
    std::fs::write(&partial, b"half a png").unwrap();
    let r = class("resumed", 3).ensure(&sd, lines, &mut out).unwrap();
    assert_eq!((r.existing, r.generated.len()), (2, 1));
    assert!(!partial.exists(), "the killed write's leftover is removed");
    let (a, b) = (
        files(&work.path().join("straight")),
        files(&work.path().join("resumed")),
    );
    assert_eq!(
        a.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(),
        ["class-00000.png", "class-00001.png", "class-00002.png"]
    );
    assert!(a == b, "a resumed generation makes the same images");
    assert_ne!(a[0].1, a[1].1, "each image has its own seed");
    // generated images are real images of the asked size
    let img = image::open(work.path().join("straight/class-00001.png")).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    // a full folder generates nothing
    let r = class("straight", 3).ensure(&sd, lines, &mut out).unwrap();
    assert_eq!((r.existing, r.generated.len()), (3, 0));
    // progress: a header and one line per image generated
    let per_image = log.iter().filter(|l| l.contains("written")).count();
    assert_eq!(per_image, 6, "{log:?}");
    assert!(log[0].contains("generating 3 more"), "{log:?}");

    // the user's own class images count; generated ones continue the numbering
    let own = work.path().join("own");
    std::fs::create_dir_all(&own).unwrap();
    image::RgbImage::from_pixel(40, 40, image::Rgb([1, 2, 3]))
        .save(own.join("photo.jpg"))
        .unwrap();
    let r = class("own", 2).ensure(&sd, lines, &mut |_| {}).unwrap();
    assert_eq!(r.generated, [own.join("class-00001.png")]);
    // generated with the same seed as index 1 of the straight run
    assert_eq!(std::fs::read(own.join("class-00001.png")).unwrap(), a[1].1);

    // an empty class prompt is refused
    let mut bad = class("bad", 1);
    bad.prompt = " ".into();
    let err = bad.ensure(&sd, lines, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("class prompt"), "{err}");
}

#[test]
fn an_instance_prompt_names_the_caption_files_it_leaves_unread() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3u8 {
        image::RgbImage::from_pixel(32, 32, image::Rgb([i * 50, 10, 10]))
            .save(dir.path().join(format!("{i}.png")))
            .unwrap();
    }
    std::fs::write(dir.path().join("1.txt"), "a tag, another").unwrap();
    let cfg = DataConfig {
        width: 32,
        height: 32,
        captions: CaptionSource::Fixed("a photo of sks dog".into()),
        ..Default::default()
    };
    let data = ImageFolder::load(dir.path(), &cfg).unwrap();
    assert!(data
        .examples
        .iter()
        .all(|e| e.caption == "a photo of sks dog"));
    let w = data.warnings.join("\n");
    assert!(
        w.contains("1 caption file(s) are not used") && w.contains("1.txt"),
        "{w}"
    );
    // sidecar captions read them, and say nothing of the kind
    let sidecar = DataConfig {
        captions: CaptionSource::Sidecar {
            fallback: String::new(),
        },
        ..cfg
    };
    let data = ImageFolder::load(dir.path(), &sidecar).unwrap();
    assert!(!data.warnings.join("\n").contains("are not used"));
}
