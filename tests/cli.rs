//! The command line: summaries and clear errors (file and tensor named, non-zero exit, no
//! panic) on bad input.

mod common;

use common::golden;
use std::path::Path;
use std::process::{Command, Output};

fn sd_lora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-lora"))
        .args(args)
        .output()
        .unwrap()
}

fn fails_with(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(
        !err.contains("panicked"),
        "panicked instead of an error: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "error should mention `{n}`: {err}");
    }
}

#[test]
fn inspect_model_json_reports_the_tutorial_numbers() {
    let o = sd_lora(&[
        "inspect-model",
        "--model",
        "sd15",
        "--rank",
        "16",
        "--alpha",
        "32",
        "--json",
    ]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["lora_layers"], 96);
    assert_eq!(v["trainable_params"], 2_390_016);
    assert_eq!(v["total_params"], 861_910_980);
    assert!((v["trainable_ratio"].as_f64().unwrap() - 0.002773).abs() < 1e-6);
    let o = sd_lora(&[
        "inspect-model",
        "--model",
        "tests/data/sd15_unet_config.json",
        "--rank",
        "8",
        "--targets",
        "to_q,to_k,to_v,to_out.0",
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("128") && text.contains("1,594,368"), "{text}");
    // a diffusers folder works too (config only, no weights read)
    let o = sd_lora(&[
        "inspect-model",
        "--model",
        golden("unet_a").to_str().unwrap(),
        "--json",
        "--targets",
        "all",
    ]);
    assert!(o.status.success());
}

#[test]
fn bad_inputs_give_clear_errors() {
    fails_with(
        &sd_lora(&["inspect-model", "--targets", "to_q,to_z"]),
        &["to_z"],
    );
    fails_with(
        &sd_lora(&["inspect-model", "--model", "/no/such/model"]),
        &["/no/such/model"],
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let out_s = out.to_str().unwrap();
    let model = golden("unet_a");
    let model_s = model.to_str().unwrap();
    let inputs = golden("unet_a/inputs_square_b2.safetensors");
    let inputs_s = inputs.to_str().unwrap();
    fails_with(
        &sd_lora(&[
            "unet-forward",
            "--model",
            "/no/such/dir",
            "--inputs",
            inputs_s,
            "--out",
            out_s,
        ]),
        &["/no/such/dir"],
    );
    fails_with(
        &sd_lora(&[
            "unet-forward",
            "--model",
            model_s,
            "--inputs",
            "/no/inputs.safetensors",
            "--out",
            out_s,
        ]),
        &["/no/inputs.safetensors"],
    );
    // inputs without `timestep`
    let t = candle_core::safetensors::load(&inputs, &candle_core::Device::Cpu).unwrap();
    let mut partial = t.clone();
    partial.remove("timestep");
    let p = dir.path().join("partial.safetensors");
    candle_core::safetensors::save(&partial, &p).unwrap();
    fails_with(
        &sd_lora(&[
            "unet-forward",
            "--model",
            model_s,
            "--inputs",
            p.to_str().unwrap(),
            "--out",
            out_s,
        ]),
        &["timestep", "partial.safetensors"],
    );
    // a sample with the wrong channel count
    let mut bad = t.clone();
    bad.insert(
        "sample".into(),
        bad["sample"].narrow(1, 0, 3).unwrap().contiguous().unwrap(),
    );
    let p = dir.path().join("bad.safetensors");
    candle_core::safetensors::save(&bad, &p).unwrap();
    fails_with(
        &sd_lora(&[
            "unet-forward",
            "--model",
            model_s,
            "--inputs",
            p.to_str().unwrap(),
            "--out",
            out_s,
        ]),
        &["3 channels"],
    );
    // a LoRA for another architecture
    let other = golden("unet_b/lora_kohya.safetensors");
    fails_with(
        &sd_lora(&[
            "unet-forward",
            "--model",
            model_s,
            "--inputs",
            inputs_s,
            "--out",
            out_s,
            "--lora",
            other.to_str().unwrap(),
        ]),
        &["lora_kohya.safetensors", "lora_unet_"],
    );
    // weights that do not fit the config: unet_a's config with unet_b's weights
    let mixed = dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(golden("unet_a/unet/config.json"), mixed.join("config.json")).unwrap();
    std::fs::copy(
        golden("unet_b/diffusion_pytorch_model.fp16.safetensors"),
        mixed.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    fails_with(
        &sd_lora(&[
            "unet-forward",
            "--model",
            mixed.to_str().unwrap(),
            "--inputs",
            inputs_s,
            "--out",
            out_s,
        ]),
        &[
            "diffusion_pytorch_model.safetensors",
            "attn2.to_k.weight",
            "expected [16, 24]",
        ],
    );
    // a corrupt config
    std::fs::write(mixed.join("config.json"), "{ not json").unwrap();
    fails_with(
        &sd_lora(&[
            "unet-forward",
            "--model",
            mixed.to_str().unwrap(),
            "--inputs",
            inputs_s,
            "--out",
            out_s,
        ]),
        &["config.json"],
    );
    // a non-LoRA file given as LoRA
    fails_with(
        &sd_lora(&[
            "unet-forward",
            "--model",
            model_s,
            "--inputs",
            inputs_s,
            "--out",
            out_s,
            "--lora",
            inputs_s,
        ]),
        &["no LoRA tensors", "inputs_square_b2.safetensors"],
    );
    fails_with(
        &sd_lora(&[
            "unet-forward",
            "--model",
            model_s,
            "--inputs",
            inputs_s,
            "--out",
            out_s,
            "--dtype",
            "bf16",
        ]),
        &["bf16"],
    );
    assert!(
        !Path::new(&out).exists(),
        "no output written by failed runs"
    );
}

#[test]
fn convert_and_inspect_lora_files() {
    use candle_core::{DType, Device};
    use sd_lora::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let model = golden("unet_a");
    let m = model.to_str().unwrap();
    let kohya = golden("unet_a/lora_kohya.safetensors");
    let o = sd_lora(&["inspect-lora", kohya.to_str().unwrap(), "--model", m]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && text.contains("Kohya")
            && text.contains("UNet conv LoRA: 14 layers, rank 4, alpha 6")
            && text.contains("UNet linear LoRA: 70 layers, rank 2/4")
            && text.contains("84 of 84 adapters"),
        "{text}"
    );
    // a LyCORIS file: kinds per component and layer type, matched against the model
    let loha = golden("lycoris/loha_tucker.safetensors");
    let o = sd_lora(&["inspect-lora", loha.to_str().unwrap(), "--model", m]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && text.contains("UNet conv LoHa: 49 layers, rank 2/3")
            && text.contains("UNet linear LoHa: 83 layers, rank 3")
            && text.contains("132 of 132 adapters"),
        "{text}"
    );
    // against another structure (same module names, other sizes): the misfits are named
    let o = sd_lora(&["inspect-lora", loha.to_str().unwrap(), "--model", "tiny"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("SHAPE MISMATCH"),
        "{text}"
    );
    // convert cannot express LoHa: refused, nothing written
    let o = sd_lora(&[
        "convert",
        loha.to_str().unwrap(),
        "--to",
        "peft",
        "--out",
        dir.path().join("loha_peft.safetensors").to_str().unwrap(),
        "--model",
        m,
    ]);
    fails_with(&o, &["no LoHa", "convert to kohya"]);
    assert!(!dir.path().join("loha_peft.safetensors").exists());
    // unet-forward refuses a file with an unknown key, and loads it with --allow-partial-lora
    let mut t = candle_core::safetensors::load(&kohya, &Device::Cpu).unwrap();
    t.insert(
        "lora_unet_something_new.weird".into(),
        candle_core::Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    let odd = dir.path().join("odd.safetensors");
    candle_core::safetensors::save(&t, &odd).unwrap();
    let inputs = golden("unet_a/inputs_square_b2.safetensors");
    let fwd = |extra: &[&str]| {
        let out = dir.path().join("fwd.safetensors");
        let mut args = vec![
            "unet-forward",
            "--model",
            m,
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--lora",
            odd.to_str().unwrap(),
        ];
        args.extend(extra);
        sd_lora(&args)
    };
    fails_with(
        &fwd(&[]),
        &["lora_unet_something_new.weird", "--allow-partial-lora"],
    );
    let o = fwd(&["--allow-partial-lora"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success()
            && err.contains("warning")
            && err.contains("lora_unet_something_new.weird"),
        "{err}"
    );
    // kohya -> peft -> kohya, each loads to diffusers' LoRA output
    let peft = dir.path().join("p.safetensors");
    let back = dir.path().join("k.safetensors");
    for (input, to, out) in [(&kohya, "peft", &peft), (&peft, "kohya", &back)] {
        let o = sd_lora(&[
            "convert",
            input.to_str().unwrap(),
            "--to",
            to,
            "--out",
            out.to_str().unwrap(),
            "--model",
            m,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let t =
        candle_core::safetensors::load(golden("unet_a/inputs_square_b2.safetensors"), &Device::Cpu)
            .unwrap();
    let want =
        candle_core::safetensors::load(golden("unet_a/lora_square_b2.safetensors"), &Device::Cpu)
            .unwrap()["sample"]
            .clone();
    for f in [&peft, &back] {
        let mut u = UNet2DConditionModel::load(&model, None, DType::F32, &Device::Cpu).unwrap();
        let lf = LoraFile::open(f).unwrap();
        u.apply_lora_file(&lf, &VarMap::new()).unwrap();
        let y = u
            .forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"])
            .unwrap();
        let e = common::rel_err(&y, &want);
        assert!(e < 1e-4, "{}: {e}", f.display());
    }
    fails_with(
        &sd_lora(&[
            "convert",
            kohya.to_str().unwrap(),
            "--to",
            "lycoris",
            "--out",
            "x",
            "--model",
            m,
        ]),
        &["lycoris"],
    );
}

#[test]
fn bench_refuses_a_zero_attention_chunk() {
    let o = sd_lora(&[
        "bench",
        "train",
        "--model",
        "tiny",
        "--steps",
        "1",
        "--attention-chunk-mib",
        "0",
    ]);
    fails_with(&o, &["--attention-chunk-mib", "at least 1"]);
}
