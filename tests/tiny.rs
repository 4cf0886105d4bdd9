//! The synthetic scenes and the automatic checks of issue 6.

use sd_lora::tiny::metrics::{dominant_colour, mean_style_score};
use sd_lora::tiny::scenes::{scenes, Look, SIZE};

#[test]
fn scenes_are_deterministic_and_the_checks_read_them() {
    let s = scenes(60, 7);
    assert_eq!(s, scenes(60, 7));
    assert_ne!(s, scenes(60, 8));
    let base: Vec<_> = s.iter().map(|x| x.render(Look::Base)).collect();
    let anime: Vec<_> = s.iter().map(|x| x.render(Look::Anime)).collect();
    assert!(base.iter().all(|i| i.dimensions() == (SIZE, SIZE)));
    // the colour check names every rendered colour in both looks
    for (sc, (b, a)) in s.iter().zip(base.iter().zip(&anime)) {
        assert_eq!(
            dominant_colour(b),
            Some(sc.colour),
            "base: {}",
            sc.caption()
        );
        assert_eq!(
            dominant_colour(a),
            Some(sc.colour),
            "anime: {}",
            sc.caption()
        );
    }
    let (sb, sa) = (mean_style_score(&base), mean_style_score(&anime));
    println!("style base {sb:?}\nstyle anime {sa:?}");
    assert!(sb.score < 0.25 && sa.score > 0.75, "{sb:?} {sa:?}");
    if let Ok(dir) = std::env::var("SD_LORA_PLOT_PREVIEW") {
        let png = sd_lora::plot::labelled_grid(
            &[base[..6].to_vec(), anime[..6].to_vec()],
            &["base".into(), "anime".into()],
            &s[..6].iter().map(|x| x.caption()).collect::<Vec<_>>(),
            None,
        )
        .unwrap();
        png.save(std::path::Path::new(&dir).join("scenes.png"))
            .unwrap();
    }
}

mod common;

use sd_lora::commands::pretrain::{pretrain_tiny, PretrainConfig};

fn small(
    out: &std::path::Path,
    work: &std::path::Path,
    (vae_decoder_steps, unet_steps): (usize, usize),
) -> PretrainConfig {
    PretrainConfig {
        out: out.to_path_buf(),
        work: work.to_path_buf(),
        scenes: 16,
        vae_steps: 4,
        vae_decoder_steps,
        vae_batch: 2,
        unet_steps,
        unet_batch: 2,
        save_every: 2,
        quality_prompts: 2,
        quality_steps: 2,
        ..Default::default()
    }
}

/// The pre-training job end to end at toy size: it writes a diffusers folder our loader (and
/// `tiny`-style configs) accept; a run interrupted after 2 decoder and 2 UNet steps and
/// continued gives the same weights as one run straight through; the decoder phase changes the
/// decoder only (the encoder, and so the UNet's latent space, stays as phase 1 left it).
#[test]
fn pretrain_tiny_writes_a_loadable_model_and_resumes_exactly() {
    let bpe = common::clip_bpe();
    let t = tempfile::tempdir().unwrap();
    let (a_out, a_work) = (t.path().join("a"), t.path().join("a-work"));
    pretrain_tiny(&small(&a_out, &a_work, (4, 4)), &bpe, &mut |_| {}).unwrap();
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
        "quality.json",
    ] {
        assert!(a_out.join(f).is_file(), "{f} missing");
    }
    let sd = sd_lora::pipeline::StableDiffusion::from_folder(
        &a_out,
        None,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(sd.unet.config, sd_lora::unet::UNetConfig::tiny());
    assert!(sd.vae.config.scaling_factor > 0.0 && sd.vae.config.scaling_factor.is_finite());
    // interrupted after 2 decoder and 2 UNet steps, then continued
    let (b_out, b_work) = (t.path().join("b"), t.path().join("b-work"));
    pretrain_tiny(&small(&b_out, &b_work, (2, 2)), &bpe, &mut |_| {}).unwrap();
    let mut log = Vec::new();
    pretrain_tiny(&small(&b_out, &b_work, (4, 4)), &bpe, &mut |m| {
        log.push(m.to_string())
    })
    .unwrap();
    for resumed in ["VAE decoder: resumed at step 2", "UNet: resumed at step 2"] {
        assert!(
            log.iter().any(|m| m.contains(resumed)),
            "{resumed}: {log:?}"
        );
    }
    for f in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        assert_eq!(
            std::fs::read(a_out.join(f)).unwrap(),
            std::fs::read(b_out.join(f)).unwrap(),
            "{f} differs after resuming"
        );
    }
    // without the decoder phase: the same encoder, a different decoder
    let (c_out, c_work) = (t.path().join("c"), t.path().join("c-work"));
    pretrain_tiny(&small(&c_out, &c_work, (0, 1)), &bpe, &mut |_| {}).unwrap();
    let vae = |dir: &std::path::Path| {
        candle_core::safetensors::load(
            dir.join("vae/diffusion_pytorch_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (with, without) = (vae(&a_out), vae(&c_out));
    let mut changed = 0;
    for (k, w) in &with {
        let same = common::max_abs_diff(w, &without[k]) == 0.0;
        if k.starts_with("decoder.") || k.starts_with("post_quant_conv.") {
            changed += usize::from(!same);
        } else {
            assert!(same, "{k} changed in the decoder phase");
        }
    }
    assert!(
        changed > 10,
        "the decoder phase changed only {changed} tensors"
    );
}

/// The shipped model: `tiny` resolves to it, and a shortened demo moves the samples' style
/// towards the anime look.
#[test]
fn shortened_demo_on_the_shipped_model_shifts_the_style() {
    let dir = sd_lora::pipeline::resolve_model("tiny", None, None).unwrap();
    assert_eq!(dir, sd_lora::tiny::tiny_model_dir());
    let out = tempfile::tempdir().unwrap();
    let cfg = sd_lora::commands::demo::DemoConfig {
        out: out.path().to_path_buf(),
        epochs: 10,
        prompts: sd_lora::tiny::eval::demo_prompts(4),
        score_prompts: 8,
        sample_steps: 12,
        ..Default::default()
    };
    let s = sd_lora::commands::demo::run_demo(&cfg, &mut |_| {}).unwrap();
    println!("{}", serde_json::to_string_pretty(&s).unwrap());
    for f in [
        "before_after.png",
        "loss.svg",
        "loss.png",
        "lora.safetensors",
        "lora_peft.safetensors",
        "summary.json",
    ] {
        assert!(out.path().join(f).is_file(), "{f} missing");
    }
    assert_eq!(s.steps, 10 * 15);
    assert_eq!(s.score_prompts, 8);
    assert!(
        s.style_shift_stderr > 0.0 && s.style_shift_stderr < 0.5,
        "{s:?}"
    );
    assert_eq!(s.trainable_params, 70_656);
    assert!(s.loss_last_mean < s.loss_first_mean, "{s:?}");
    // the VAE round trip of the anime images lies between the base look and the originals
    assert!(
        s.style_score_base < s.style_score_vae_round_trip
            && s.style_score_vae_round_trip < s.style_score_target,
        "{s:?}"
    );
    assert!(
        s.style_shift >= MIN_SHORT_DEMO_SHIFT,
        "style moved only {:.2}",
        s.style_shift
    );
}

/// Too few scored prompts is refused before anything is loaded or written.
#[test]
fn demo_refuses_fewer_than_two_scored_prompts() {
    let out = tempfile::tempdir().unwrap();
    let cfg = sd_lora::commands::demo::DemoConfig {
        out: out.path().join("demo"),
        score_prompts: 1,
        ..Default::default()
    };
    let e = sd_lora::commands::demo::run_demo(&cfg, &mut |_| {}).unwrap_err();
    assert!(format!("{e:#}").contains("score_prompts"), "{e:#}");
    assert!(!out.path().join("demo").exists());
}

/// A bad learning rate or zero epochs is refused before anything is sampled or written.
#[test]
fn demo_refuses_bad_training_settings_up_front() {
    let out = tempfile::tempdir().unwrap();
    for (cfg, field) in [
        (
            sd_lora::commands::demo::DemoConfig {
                lr: -1.0,
                ..Default::default()
            },
            "lr",
        ),
        (
            sd_lora::commands::demo::DemoConfig {
                lr: f64::NAN,
                ..Default::default()
            },
            "lr",
        ),
        (
            sd_lora::commands::demo::DemoConfig {
                epochs: 0,
                ..Default::default()
            },
            "epochs",
        ),
    ] {
        let cfg = sd_lora::commands::demo::DemoConfig {
            out: out.path().join("demo"),
            ..cfg
        };
        let e = sd_lora::commands::demo::run_demo(&cfg, &mut |_| {}).unwrap_err();
        assert!(format!("{e:#}").contains(field), "{e:#}");
        assert!(!out.path().join("demo").exists());
    }
}

/// Measured with the shipped model (600 VAE + 1,500 decoder-only + 3,000 UNet steps):
/// shortened demo (10 epochs, 8 scored prompts, 12 sampling steps) 0.38; the full demo (25
/// epochs, 32 scored prompts) 0.61-0.64 over three seeds (issue 6 asks 0.6). About half the
/// shortened run's shift: a LoRA that does not move the style fails.
const MIN_SHORT_DEMO_SHIFT: f64 = 0.19;

/// Issue 6's base-quality bar: prompts of held-out scenes get their named colour in at least
/// 70% of samples (60 prompts, seed = index, 20 DDIM steps, guidance 7.5), and the figure in the
/// shipped `quality.json` is what the shipped weights give.
#[test]
fn shipped_model_draws_the_named_colour() {
    let dir = sd_lora::tiny::tiny_model_dir();
    let q: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("quality.json")).unwrap()).unwrap();
    let sd = sd_lora::pipeline::StableDiffusion::from_folder(
        &dir,
        None,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let acc = sd_lora::tiny::eval::colour_accuracy(&sd, 60, 123, 20).unwrap();
    println!("colour match {acc:.3}, quality.json {}", q["colour_match"]);
    assert!(acc >= 0.7, "colour match {acc}");
    assert!((acc - q["colour_match"].as_f64().unwrap()).abs() <= 0.05);
}
