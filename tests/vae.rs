//! AutoencoderKL against diffusers (tests/golden/make_golden_pipeline.py): latent mean and
//! log-variance of encoded images, decoded images; non-square sizes, batch 2.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{golden, load, rel_err};
use sd_lora::vae::AutoencoderKL;

#[test]
fn vae_matches_diffusers() {
    let vae = AutoencoderKL::load(
        golden("tiny_pipeline"),
        Some("fp16"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(vae.config.downsample_factor(), 2);
    let r = load("tiny_pipeline/reference.safetensors");
    let d = vae.encode(&r["vae.image"]).unwrap();
    let (e1, e2) = (
        rel_err(&d.mean, &r["vae.mean"]),
        rel_err(&d.logvar, &r["vae.logvar"]),
    );
    let img = vae.decode(&r["vae.latents"]).unwrap();
    let e3 = rel_err(&img, &r["vae.decoded"]);
    println!("VAE rel err: mean {e1:.2e}, logvar {e2:.2e}, decoded {e3:.2e}");
    assert!(e1 < 1e-4 && e2 < 1e-4 && e3 < 1e-4, "{e1} {e2} {e3}");
    // sampling uses the caller's noise; mode is the mean
    let noise = Tensor::ones(d.mean.shape(), DType::F32, &Device::Cpu).unwrap();
    let s = d.sample(&noise).unwrap();
    let expect = (&d.mean + d.logvar.affine(0.5, 0.0).unwrap().exp().unwrap()).unwrap();
    assert!(rel_err(&s, &expect) < 1e-6);
    let z = vae.scale_latents(&d.mode()).unwrap();
    assert!(rel_err(&vae.unscale_latents(&z).unwrap(), &d.mean) < 1e-6);
}

#[test]
fn vae_rejects_bad_input() {
    let vae = AutoencoderKL::load(
        golden("tiny_pipeline"),
        Some("fp16"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let odd = Tensor::zeros((1, 3, 31, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(vae
        .encode(&odd)
        .unwrap_err()
        .to_string()
        .contains("divisible by 2"));
    let z = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(vae
        .decode(&z)
        .unwrap_err()
        .to_string()
        .contains("3 channels"));
    let err =
        AutoencoderKL::load(golden("tiny_pipeline"), None, DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        format!("{err:#}").contains("fp16"),
        "hints at the fp16 variant: {err:#}"
    );
}
