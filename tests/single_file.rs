//! Single-file checkpoints (A1111/LDM layout) against diffusers' `from_single_file` on the
//! fixtures of tests/golden/make_golden_single_file.py (SD 1.x in f16 with EMA and buffers,
//! SD 2.x-style in bf16 with an OpenCLIP text tower); config inference on SD 1.5 / 2.1 key
//! sets built from their configs; bad files refused by name.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{golden, load, pipeline_config, psnr, rel_err, tiny_pipeline};
use sd_lora::pipeline::checkpoint_file::{detect_family, CheckpointHeader, Family, TensorInfo};
use sd_lora::pipeline::single_file::{
    infer_clip_config, infer_unet_config, infer_vae_config, SingleFileOptions,
};
use sd_lora::prelude::*;
use sd_lora::text::ldm_names::{clip_ldm_key, ClipLayout};
use sd_lora::text::ClipTextConfig;
use sd_lora::unet::ldm_names::ldm_keys;
use sd_lora::vae::{ldm_names::vae_ldm_key, VaeConfig};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

fn sd1_file() -> PathBuf {
    golden("single_file/sd1.safetensors")
}

/// The SD 2.x config folder with the tokenizer's vocabulary written into it.
fn sd2_config() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = golden("single_file/sd2_config");
    for sub in ["unet", "vae", "text_encoder", "scheduler", "tokenizer"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.path().join(sub).join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(
        src.join("model_index.json"),
        dir.path().join("model_index.json"),
    )
    .unwrap();
    sd_lora::text::write_clip_vocab(&common::clip_bpe(), &dir.path().join("tokenizer")).unwrap();
    dir
}

fn open(file: &Path, opts: &SingleFileOptions) -> StableDiffusion {
    let (sd, report) =
        StableDiffusion::from_single_file(file, opts, DType::F32, &Device::Cpu).unwrap();
    println!("{report}");
    assert_eq!(report.unused_count, 0, "{report}");
    sd
}

/// The UNet's output on the reference file's inputs.
fn unet_out(unet: &UNet2DConditionModel, r: &HashMap<String, Tensor>) -> Tensor {
    unet.forward(
        &r["unet.sample"],
        &r["unet.timestep"],
        &r["unet.encoder_hidden_states"],
    )
    .unwrap()
}

/// Image PSNR, UNet and text-encoder relative errors against a reference file.
fn compare(sd: &StableDiffusion, r: &HashMap<String, Tensor>, unet_key: &str) -> (f64, f32, f32) {
    let lat = load("tiny_pipeline/reference.safetensors");
    let img = sd.generate(&pipeline_config(&lat["pipe.latents"])).unwrap();
    let y = unet_out(&sd.unet, r);
    let h = sd
        .text_encoder
        .forward(&r["text.ids"])
        .unwrap()
        .last_hidden_state;
    (
        psnr(&img.pixels, &r["image"]),
        rel_err(&y, &r[unet_key]),
        rel_err(&h, &r["text.hidden"]),
    )
}

#[test]
fn sd1_single_file_matches_diffusers_from_single_file() {
    let cfg = tiny_pipeline();
    let r = load("single_file/sd1_reference.safetensors");
    let opts = SingleFileOptions {
        config: Some(cfg.path().to_path_buf()),
        ..Default::default()
    };
    let (sd, report) =
        StableDiffusion::from_single_file(&sd1_file(), &opts, DType::F32, &Device::Cpu).unwrap();
    println!("{report}");
    assert_eq!(report.family, Family::Sd1);
    assert_eq!(report.dtype, "F16");
    // EMA copy, schedule buffers, decay, num_updates, position_ids: set aside, counted
    assert_eq!(report.unused_count, 0, "{report}");
    assert!(report.ignored > 100, "{report}");
    let (p, eu, et) = compare(&sd, &r, "unet.out");
    println!("SD 1.x single file: image {p:.1} dB, UNet {eu:.2e}, text encoder {et:.2e}");
    assert!(p >= 40.0 && eu <= 1e-4 && et <= 1e-4);
    // --use-ema reads the EMA copy (other weights: another output)
    let ema = open(
        &sd1_file(),
        &SingleFileOptions {
            use_ema: true,
            ..opts.clone()
        },
    );
    let y = unet_out(&ema.unet, &r);
    let e = rel_err(&y, &r["unet.out_ema"]);
    assert!(e <= 1e-4, "EMA UNet {e}");
    assert!(rel_err(&y, &r["unet.out"]) > 1e-2);
}

#[test]
fn sd2_single_file_with_open_clip_matches_diffusers() {
    let cfg = sd2_config();
    let r = load("single_file/sd2_reference.safetensors");
    let sd = open(
        &golden("single_file/sd2.safetensors"),
        &SingleFileOptions {
            config: Some(cfg.path().to_path_buf()),
            ..Default::default()
        },
    );
    assert_eq!(sd.scheduler_config.prediction_type, "v_prediction");
    // "!" pads, as SD 2.x's tokenizer does
    let ids = sd.tokenizer.encode("a cat").unwrap();
    assert_eq!(ids.last(), Some(&0));
    let (p, eu, et) = compare(&sd, &r, "unet.out");
    println!("SD 2.x single file (bf16, OpenCLIP): image {p:.1} dB, UNet {eu:.2e}, text {et:.2e}");
    assert!(p >= 40.0 && eu <= 1e-4 && et <= 1e-4);
}

/// An in-memory header with the keys and shapes a real SD checkpoint of these configs has.
fn header_of(
    unet: &UNetConfig,
    vae: &VaeConfig,
    text: &ClipTextConfig,
    layout: ClipLayout,
) -> CheckpointHeader {
    let mut tensors = BTreeMap::new();
    let mut put = |k: String, shape: Vec<usize>| {
        tensors.insert(
            k,
            TensorInfo {
                dtype: "F16".into(),
                shape,
            },
        );
    };
    let ws = WeightSource::meta(DType::F32);
    let model = UNet2DConditionModel::new(unet, &ws).unwrap();
    let recs = ws.records();
    let keys: Vec<String> = recs.iter().map(|r| r.path.clone()).collect();
    let shapes: HashMap<String, Vec<usize>> = recs
        .iter()
        .map(|r| (r.path.clone(), r.shape.dims().to_vec()))
        .collect();
    for (ours, ldm) in ldm_keys(&model, &keys).unwrap() {
        let mut s = shapes[&ours].clone();
        // LDM stores SD 1.x's proj_in/proj_out as 1x1 convolutions
        if !unet.use_linear_projection && (ldm.contains("proj_in.w") || ldm.contains("proj_out.w"))
        {
            s.extend([1, 1]);
        }
        put(format!("model.diffusion_model.{ldm}"), s);
    }
    let ws = WeightSource::meta(DType::F32);
    AutoencoderKL::new(vae, &ws).unwrap();
    for r in ws.records() {
        let l = vae_ldm_key(&r.path, vae.block_out_channels.len()).unwrap();
        put(format!("first_stage_model.{l}"), r.shape.dims().to_vec());
    }
    let ws = WeightSource::meta(DType::F32);
    let mut text = text.clone();
    if layout == ClipLayout::OpenClip {
        text.num_hidden_layers += 1; // OpenCLIP's last layer, which SD 2.x does not use
    }
    ClipTextModel::new(&text, &ws).unwrap();
    for r in ws.records() {
        let m = clip_ldm_key(&r.path, layout, text.hidden_size).unwrap();
        let mut s = r.shape.dims().to_vec();
        if m.rows.is_some() {
            s[0] *= 3;
        }
        put(m.key, s);
    }
    CheckpointHeader {
        path: "memory.safetensors".into(),
        tensors,
        metadata: BTreeMap::new(),
    }
}

#[test]
fn configs_are_inferred_from_sd15_and_sd21_key_sets() {
    let sd15 = header_of(
        &UNetConfig::sd_v1_5(),
        &VaeConfig::sd_v1_5(),
        &ClipTextConfig::sd_v1_5(),
        ClipLayout::Transformers,
    );
    assert_eq!(detect_family(&sd15).unwrap(), Family::Sd1);
    assert_eq!(
        infer_unet_config(&sd15, Family::Sd1).unwrap(),
        UNetConfig::sd_v1_5()
    );
    assert_eq!(
        infer_vae_config(&sd15, "first_stage_model.").unwrap(),
        VaeConfig::sd_v1_5()
    );
    assert_eq!(
        infer_clip_config(&sd15, Family::Sd1).unwrap(),
        ClipTextConfig::sd_v1_5()
    );

    let sd21 = UNetConfig::from_file(Path::new("tests/data/sd21_unet_config.json")).unwrap();
    let text21 = ClipTextConfig {
        hidden_size: 1024,
        intermediate_size: 4096,
        num_hidden_layers: 23,
        num_attention_heads: 16,
        hidden_act: "gelu".into(),
        ..ClipTextConfig::sd_v1_5()
    };
    let h = header_of(&sd21, &VaeConfig::sd_v1_5(), &text21, ClipLayout::OpenClip);
    assert_eq!(detect_family(&h).unwrap(), Family::Sd2);
    let got = infer_unet_config(&h, Family::Sd2).unwrap();
    assert_eq!(got.block_out_channels, sd21.block_out_channels);
    assert_eq!(got.cross_attention_dim, sd21.cross_attention_dim);
    assert!(got.use_linear_projection);
    assert_eq!(got.heads().unwrap(), sd21.heads().unwrap(), "64-dim heads");
    assert_eq!(got.down_block_types, sd21.down_block_types);
    assert_eq!(got.up_block_types, sd21.up_block_types);
    assert_eq!(infer_clip_config(&h, Family::Sd2).unwrap(), text21);
    // the tiny fixtures are not standard SD widths: inference refuses instead of guessing
    let err = sd_lora::pipeline::single_file::SingleFilePlan::new(&sd1_file(), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("give --config") && err.contains("norm groups"),
        "{err}"
    );
}

fn write(dir: &Path, name: &str, tensors: &[(&str, &[usize])]) -> PathBuf {
    let t: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, s)| {
            (
                k.to_string(),
                Tensor::zeros(*s, DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let p = dir.join(name);
    candle_core::safetensors::save(&t, &p).unwrap();
    p
}

fn load_err(path: &Path) -> String {
    StableDiffusion::from_single_file(path, &Default::default(), DType::F32, &Device::Cpu)
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default()
}

#[test]
fn bad_single_files_are_refused_saying_what_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    // truncated: the first tensor past the end is named
    let bytes = std::fs::read(sd1_file()).unwrap();
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&cut);
    assert!(e.contains("truncated") && e.contains("tensor `"), "{e}");
    // pickles are never opened
    let ckpt = tmp.path().join("model.ckpt");
    std::fs::write(&ckpt, b"\x80\x02}q\x00.").unwrap();
    assert!(load_err(&ckpt).contains("never unpickles"));
    let unet = (
        "model.diffusion_model.input_blocks.0.0.weight",
        &[4usize, 4, 3, 3][..],
    );
    for (name, keys, needle) in [
        (
            "sdxl",
            vec![
                unet,
                ("conditioner.embedders.1.model.ln_final.weight", &[4][..]),
            ],
            "SDXL",
        ),
        (
            "lora",
            vec![(
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                &[4, 4][..],
            )],
            "a LoRA file",
        ),
        (
            "vae",
            vec![("encoder.down.0.block.0.conv1.weight", &[4, 4, 3, 3][..])],
            "--vae",
        ),
        (
            "sd3",
            vec![("model.diffusion_model.joint_blocks.0.x", &[4][..])],
            "Stable Diffusion 3",
        ),
        (
            "flux",
            vec![("double_blocks.0.img_attn.qkv.weight", &[4][..])],
            "Flux",
        ),
        ("bare", vec![unet], "text encoder is missing"),
    ] {
        let p = write(tmp.path(), &format!("{name}.safetensors"), &keys);
        let e = load_err(&p);
        assert!(e.contains(needle), "{name}: {e}");
    }
    // no EMA to use
    let cfg = sd2_config();
    let e = StableDiffusion::from_single_file(
        &golden("single_file/sd2.safetensors"),
        &SingleFileOptions {
            config: Some(cfg.path().to_path_buf()),
            use_ema: true,
            ..Default::default()
        },
        DType::F32,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("no EMA weights"), "{e}");
}

#[test]
fn a_vae_swap_reads_ldm_and_diffusers_vae_files() {
    let cfg = tiny_pipeline();
    let base = SingleFileOptions {
        config: Some(cfg.path().to_path_buf()),
        ..Default::default()
    };
    let sd = open(&sd1_file(), &base);
    let z = Tensor::randn(0f32, 1.0, (1, 4, 4, 4), &Device::Cpu).unwrap();
    let want = sd.vae.decode(&z).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // the file's own VAE, stored alone: LDM keys without the prefix, and diffusers keys
    let all = candle_core::safetensors::load(sd1_file(), &Device::Cpu).unwrap();
    let ldm: HashMap<String, Tensor> = all
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("first_stage_model.")?.to_string(), v.clone())))
        .collect();
    let ldm_path = tmp.path().join("vae_ldm.safetensors");
    candle_core::safetensors::save(&ldm, &ldm_path).unwrap();
    let diffusers_vae = cfg.path().join("vae");
    for vae in [ldm_path, diffusers_vae] {
        let sd = open(
            &sd1_file(),
            &SingleFileOptions {
                vae: Some(vae.clone()),
                ..base.clone()
            },
        );
        let e = rel_err(&sd.vae.decode(&z).unwrap(), &want);
        assert!(e < 1e-3, "{}: {e}", vae.display());
    }
}

fn sha256_hex(p: &Path) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(std::fs::read(p).unwrap());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn convert_model_writes_the_folder_diffusers_accepted() {
    // check_converted_model.py: diffusers' from_pretrained on these bytes gave the same tensors
    // and image as its from_single_file; the manifest holds their SHA-256
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden("single_file/converted_manifest.json")).unwrap(),
    )
    .unwrap();
    let cfg1 = tiny_pipeline();
    let cfg2 = sd2_config();
    let tmp = tempfile::tempdir().unwrap();
    for (name, cfg) in [("sd1", cfg1.path()), ("sd2", cfg2.path())] {
        let out = tmp.path().join(name);
        let opts = SingleFileOptions {
            config: Some(cfg.to_path_buf()),
            ..Default::default()
        };
        let file = golden(&format!("single_file/{name}.safetensors"));
        let msg =
            sd_lora::pipeline::convert_model::convert_to_diffusers(&file, &opts, &out).unwrap();
        println!("{msg}");
        let want = manifest[name].as_object().unwrap();
        assert!(want.len() >= 8);
        for (rel, hash) in want {
            assert_eq!(
                &sha256_hex(&out.join(rel)),
                hash.as_str().unwrap(),
                "{name}: {rel} is not what diffusers accepted"
            );
        }
        // and we read it back as a folder: the same image as from the file
        let sd = StableDiffusion::from_folder(&out, None, DType::F32, &Device::Cpu).unwrap();
        let r = load(&format!("single_file/{name}_reference.safetensors"));
        let (p, eu, _) = compare(&sd, &r, "unet.out");
        assert!(p >= 40.0 && eu <= 1e-4, "{name}: {p} dB, {eu}");
        // an existing folder is never overwritten
        let err = sd_lora::pipeline::convert_model::convert_to_diffusers(&file, &opts, &out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not empty"), "{err}");
    }
    // a failed conversion leaves nothing behind
    let bytes = std::fs::read(sd1_file()).unwrap();
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let before = std::fs::read_dir(tmp.path()).unwrap().count();
    let out = tmp.path().join("never");
    assert!(sd_lora::pipeline::convert_model::convert_to_diffusers(
        &cut,
        &SingleFileOptions {
            config: Some(cfg1.path().to_path_buf()),
            ..Default::default()
        },
        &out
    )
    .is_err());
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), before);
}

#[test]
fn commands_take_single_files() {
    let bin = env!("CARGO_BIN_EXE_sd-lora");
    let cfg = tiny_pipeline();
    let r = load("single_file/sd1_reference.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in.safetensors");
    let t: HashMap<String, Tensor> = [
        ("sample", r["unet.sample"].clone()),
        ("timestep", r["unet.timestep"].clone()),
        (
            "encoder_hidden_states",
            r["unet.encoder_hidden_states"].clone(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    candle_core::safetensors::save(&t, &inputs).unwrap();
    let out = tmp.path().join("out.safetensors");
    let file = sd1_file();
    let o = std::process::Command::new(bin)
        .args(["unet-forward", "--model"])
        .arg(&file)
        .arg("--config")
        .arg(cfg.path())
        .args(["--use-ema", "--inputs"])
        .arg(&inputs)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let y = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert!(rel_err(&y["sample"], &r["unet.out_ema"]) <= 1e-4);
    // generate prints what the file held; flags that would do nothing are refused
    let o = std::process::Command::new(bin)
        .args(["generate", "--model"])
        .arg(&file)
        .arg("--config")
        .arg(cfg.path())
        .args([
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "32",
            "--out",
        ])
        .arg(tmp.path().join("img.png"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("SD 1.x single file"),
        "{err}"
    );
    // inspect-model reads the structure from --config (the file's tiny widths are not SD's)
    let inspect = |model: &Path, config: Option<&Path>| {
        let mut c = std::process::Command::new(bin);
        c.args(["inspect-model", "--json", "--model"]).arg(model);
        if let Some(cfg) = config {
            c.arg("--config").arg(cfg);
        }
        c.output().unwrap()
    };
    let o = inspect(&file, Some(cfg.path()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let from_file: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = inspect(cfg.path(), None);
    let from_folder: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(from_file, from_folder);
    assert!(from_file["trainable_params"].as_u64().unwrap() > 0);
    let o = inspect(&file, None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--config"), "{err}");
    let o = inspect(cfg.path(), Some(cfg.path()));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("is not one"),
        "--config beside a folder is refused: {err}"
    );
    let sd2 = sd2_config();
    let o = inspect(&file, Some(sd2.path()));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("the configs do not describe this file"),
        "an SD 2.x config does not describe the SD 1.x file: {err}"
    );
    let o = std::process::Command::new(bin)
        .args(["unet-forward", "--model", "tiny", "--vae", "x", "--inputs"])
        .arg(&inputs)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--vae has no effect"),
        "{err}"
    );
}
