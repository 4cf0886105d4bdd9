//! The whole pipeline against diffusers' StableDiffusionPipeline on the tiny fixture (real CLIP
//! BPE tokenizer, DDIM 6 steps, guidance 5, negative prompt, fixed latents): PSNR >= 40 dB,
//! without and with a LoRA (strength 1 and 0.5).

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::{load, pipeline_config, psnr, tiny_pipeline};
use sd_lora::lora::{LoraFile, LoraModel};
use sd_lora::pipeline::{GenerateConfig, StableDiffusion};
use sd_lora::scheduler::SchedulerKind;

#[test]
fn images_match_diffusers_without_and_with_lora() {
    let dir = tiny_pipeline();
    let mut sd =
        StableDiffusion::from_folder(dir.path(), Some("fp16"), DType::F32, &Device::Cpu).unwrap();
    let r = load("tiny_pipeline/reference.safetensors");
    let cfg = pipeline_config(&r["pipe.latents"]);
    let base = sd.generate(&cfg).unwrap();
    assert_eq!(base.images.len(), 2);
    assert_eq!(base.images[0].dimensions(), (32, 32));
    let p = psnr(&base.pixels, &r["pipe.image"]);
    println!("PSNR base {p:.1} dB");
    assert!(p >= 40.0, "base PSNR {p}");

    let lf = LoraFile::open(dir.path().join("lora.safetensors")).unwrap();
    sd.unet.apply_lora_file(&lf, &VarMap::new()).unwrap();
    let all = sd.generate_at_strengths(&cfg, &[1.0, 0.5, 0.0]).unwrap();
    let (p1, p05, p0) = (
        psnr(&all[0].pixels, &r["pipe.image_lora"]),
        psnr(&all[1].pixels, &r["pipe.image_lora_half"]),
        psnr(&all[2].pixels, &r["pipe.image"]),
    );
    println!("PSNR LoRA 1.0: {p1:.1} dB, 0.5: {p05:.1} dB, strength 0 vs base: {p0:.1} dB");
    assert!(p1 >= 40.0 && p05 >= 40.0 && p0 >= 40.0, "{p1} {p05} {p0}");
    assert!(
        psnr(&all[0].pixels, &r["pipe.image"]) < 30.0,
        "the LoRA visibly changes the image"
    );
    // merged gives the same images
    sd.unet.merge_lora().unwrap();
    let merged = sd.generate(&cfg).unwrap();
    assert!(psnr(&merged.pixels, &r["pipe.image_lora"]) >= 40.0);
    sd.unet.unmerge_lora().unwrap();
    // two stacked adapters at 0.5 each add up to the file at 1.0
    sd.unet.set_lora_scale(0.5).unwrap();
    sd.unet
        .apply_lora_file_as(&lf, "second", &VarMap::new())
        .unwrap();
    sd.unet.set_adapter_scale("second", 0.5).unwrap();
    assert_eq!(sd.unet.adapter_names().unwrap(), vec!["default", "second"]);
    let stacked = sd.generate(&cfg).unwrap();
    let p = psnr(&stacked.pixels, &r["pipe.image_lora"]);
    assert!(p >= 40.0, "stacked PSNR {p}");
    assert!(sd
        .unet
        .set_adapter_scale("third", 1.0)
        .unwrap_err()
        .to_string()
        .contains("third"));
}

#[test]
fn seeded_generation_is_reproducible_and_saves_pngs() {
    let dir = tiny_pipeline();
    let sd =
        StableDiffusion::from_folder(dir.path(), Some("fp16"), DType::F32, &Device::Cpu).unwrap();
    for kind in [
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::EulerAncestral,
    ] {
        let cfg = GenerateConfig {
            prompt: "a cat".into(),
            steps: 4,
            scheduler: kind,
            width: 16,
            height: 24,
            seed: 7,
            ..Default::default()
        };
        let a = sd.generate(&cfg).unwrap();
        let b = sd.generate(&cfg).unwrap();
        assert_eq!(
            a.images[0].as_raw(),
            b.images[0].as_raw(),
            "{kind:?} is deterministic for a seed"
        );
        assert_eq!(a.images[0].dimensions(), (16, 24));
        let c = sd
            .generate(&GenerateConfig {
                seed: 8,
                ..cfg.clone()
            })
            .unwrap();
        assert_ne!(
            a.images[0].as_raw(),
            c.images[0].as_raw(),
            "{kind:?}: another seed, another image"
        );
    }
    let out = tempfile::tempdir().unwrap();
    let imgs = sd
        .generate(&GenerateConfig {
            num_images: 2,
            steps: 2,
            width: 16,
            height: 16,
            ..Default::default()
        })
        .unwrap();
    let paths = imgs.save(out.path().join("img.png")).unwrap();
    assert_eq!(
        paths,
        vec![out.path().join("img-0.png"), out.path().join("img-1.png")]
    );
    let back = image::open(&paths[1]).unwrap().to_rgb8();
    assert_eq!(back.as_raw(), imgs.images[1].as_raw());
}

#[test]
fn bad_generation_settings_are_rejected() {
    let dir = tiny_pipeline();
    let sd =
        StableDiffusion::from_folder(dir.path(), Some("fp16"), DType::F32, &Device::Cpu).unwrap();
    let e = sd
        .generate(&GenerateConfig {
            width: 33,
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiples of 2"), "{e}");
    let bad = Tensor::zeros((1, 4, 5, 5), DType::F32, &Device::Cpu).unwrap();
    let e = sd
        .generate(&GenerateConfig {
            width: 16,
            height: 16,
            latents: Some(bad),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("[1, 4, 8, 8]"), "{e}");
    let e = StableDiffusion::from_folder(
        &common::golden("tiny_pipeline"),
        Some("fp16"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("vocab.json"),
        "the fixture has no tokenizer files: {e}"
    );
}

fn png_psnr(path: &std::path::Path, reference: &Tensor, index: usize) -> f64 {
    let img = image::open(path).unwrap().to_rgb8();
    let v: Vec<f32> = img.as_raw().iter().map(|&b| b as f32 / 255.0).collect();
    let t = Tensor::from_vec(v, (32, 32, 3), &Device::Cpu).unwrap();
    psnr(&t, &reference.get(index).unwrap())
}

#[test]
fn cli_generate_reproduces_diffusers_from_latents() {
    let dir = tiny_pipeline();
    let out = tempfile::tempdir().unwrap();
    let r = load("tiny_pipeline/reference.safetensors");
    let lat = out.path().join("latents.safetensors");
    candle_core::safetensors::save(
        &[("latents".to_string(), r["pipe.latents"].clone())]
            .into_iter()
            .collect(),
        &lat,
    )
    .unwrap();
    let lora = dir.path().join("lora.safetensors");
    let l = lora.to_str().unwrap();
    for (extra, key) in [
        (vec![], "pipe.image"),
        (
            vec!["--lora", l, "--lora-scale", "0.5"],
            "pipe.image_lora_half",
        ),
        (
            vec![
                "--lora",
                l,
                "--lora",
                l,
                "--lora-scale",
                "0.25",
                "--lora-scale",
                "0.25",
            ],
            "pipe.image_lora_half",
        ),
        (vec!["--lora", l, "--merge"], "pipe.image_lora"),
    ] {
        let png = out.path().join("img.png");
        let mut args = vec![
            "generate",
            "--model",
            dir.path().to_str().unwrap(),
            "--variant",
            "fp16",
            "--prompt",
            "a red circle on a blue background",
            "--negative-prompt",
            "blurry, low quality",
            "--steps",
            "6",
            "--guidance",
            "5",
            "--scheduler",
            "ddim",
            "--width",
            "32",
            "--height",
            "32",
            "--latents",
            lat.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sd-lora"))
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for i in 0..2 {
            let p = png_psnr(&out.path().join(format!("img-{i}.png")), &r[key], i);
            assert!(p >= 40.0, "{key} image {i}: PSNR {p}");
        }
    }
    // bad input: clear errors, non-zero exit, nothing written
    let bad_out = out.path().join("bad.png");
    for (args, needle) in [
        (vec!["--scheduler", "heun"], "heun"),
        (vec!["--width", "33"], "multiples of 2"),
        (
            vec!["--latents", "/no/latents.safetensors"],
            "/no/latents.safetensors",
        ),
        (
            vec!["--lora", "/no/lora.safetensors"],
            "/no/lora.safetensors",
        ),
        (vec!["--variant", "bf16"], "model.bf16.safetensors"),
    ] {
        let mut a = vec![
            "generate",
            "--model",
            dir.path().to_str().unwrap(),
            "--prompt",
            "x",
            "--steps",
            "2",
            "--height",
            "16",
            "--out",
            bad_out.to_str().unwrap(),
        ];
        if !args.contains(&"--width") {
            a.extend(["--width", "16"]);
        }
        if !args.contains(&"--variant") {
            a.extend(["--variant", "fp16"]);
        }
        a.extend(args);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sd-lora"))
            .args(&a)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle) && !err.contains("panicked"),
            "{needle}: {err}"
        );
    }
    assert!(!bad_out.exists());
    // a strength comparison grid: rows = strengths, columns = images
    let grid = out.path().join("grid.png");
    let args = [
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--variant",
        "fp16",
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--width",
        "16",
        "--height",
        "16",
        "--num-images",
        "2",
        "--lora",
        l,
        "--strengths",
        "0,0.5,1",
        "--out",
        grid.to_str().unwrap(),
    ];
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sd-lora"))
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // 16 px images scaled x8 to 128 px cells, with a title, column and row labels
    let g = image::open(&grid).unwrap().to_rgb8();
    assert!(
        g.width() > 2 * 134 && g.height() > 3 * 134,
        "{:?}",
        g.dimensions()
    );
    let label_ink = (0..g.height())
        .flat_map(|y| (0..30).map(move |x| (x, y)))
        .filter(|&(x, y)| g.get_pixel(x, y).0 != [255, 255, 255])
        .count();
    assert!(label_ink > 50, "row labels missing");
}

#[test]
fn half_precision_keeps_weights_in_f16() {
    let dir = tiny_pipeline();
    let sd =
        StableDiffusion::from_folder(dir.path(), Some("fp16"), DType::F16, &Device::Cpu).unwrap();
    assert_eq!((sd.unet.dtype(), sd.vae.dtype()), (DType::F16, DType::F16));
    assert!(sd
        .unet
        .linears()
        .unwrap()
        .iter()
        .all(|l| l.weight().dtype() == DType::F16));
    let r = load("tiny_pipeline/reference.safetensors");
    let imgs = sd.generate(&pipeline_config(&r["pipe.latents"])).unwrap();
    let p = psnr(&imgs.pixels, &r["pipe.image"]);
    println!("f16 pipeline vs diffusers f32: PSNR {p:.1} dB");
    assert!(p >= 30.0, "f16 PSNR {p}");
}
