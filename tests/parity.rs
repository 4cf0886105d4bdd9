//! Golden parity with diffusers + PEFT (fixtures from tests/golden/make_golden.py):
//! max|ours - ref| / max|ref| <= 1e-4 in f32 for outputs, 1e-3 for LoRA gradients.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::{golden, load, rel_err};
use sd_lora::prelude::*;

const TOL: f32 = 1e-4;

struct Case {
    model: &'static str,
    variant: Option<&'static str>,
    inputs: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        model: "unet_a",
        variant: None,
        inputs: &["square_b2", "odd_b1"],
    },
    Case {
        model: "unet_b",
        variant: Some("fp16"),
        inputs: &["wide_b2"],
    },
];

fn unet(case: &Case) -> UNet2DConditionModel {
    UNet2DConditionModel::load(golden(case.model), case.variant, DType::F32, &Device::Cpu).unwrap()
}

fn run(unet: &UNet2DConditionModel, case: &Case, input: &str) -> Tensor {
    let t = load(&format!("{}/inputs_{input}.safetensors", case.model));
    unet.forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"])
        .unwrap()
}

fn reference(case: &Case, kind: &str, input: &str) -> Tensor {
    load(&format!("{}/{kind}_{input}.safetensors", case.model))["sample"].clone()
}

#[test]
fn base_unet_matches_diffusers() {
    for case in CASES {
        let u = unet(case);
        for input in case.inputs {
            let e = rel_err(&run(&u, case, input), &reference(case, "base", input));
            println!("{} {input}: base rel err {e:.2e}", case.model);
            assert!(e <= TOL, "{} {input}: rel err {e}", case.model);
        }
    }
}

#[test]
fn lora_files_in_every_format_match_peft() {
    for case in CASES {
        for file in ["lora_peft", "lora_kohya", "lora_old"] {
            let mut u = unet(case);
            let path = golden(&format!("{}/{file}.safetensors", case.model));
            let lf = LoraFile::open(&path).unwrap();
            u.apply_lora_file(&lf, &VarMap::new()).unwrap();
            for input in case.inputs {
                let e = rel_err(&run(&u, case, input), &reference(case, "lora", input));
                println!("{} {file} {input}: rel err {e:.2e}", case.model);
                assert!(e <= TOL, "{} {file} {input}: rel err {e}", case.model);
            }
            u.set_lora_scale(0.5).unwrap();
            let input = case.inputs[0];
            let e = rel_err(&run(&u, case, input), &reference(case, "lora_half", input));
            assert!(e <= TOL, "{} {file} scale 0.5: rel err {e}", case.model);
            // scale 0 and disabling both give the base model back
            u.set_lora_scale(0.0).unwrap();
            assert!(rel_err(&run(&u, case, input), &reference(case, "base", input)) <= TOL);
            u.set_lora_scale(1.0).unwrap();
            u.set_lora_enabled(false).unwrap();
            assert!(rel_err(&run(&u, case, input), &reference(case, "base", input)) <= TOL);
        }
    }
}

#[test]
fn merged_lora_matches_and_unmerge_restores_exactly() {
    let case = &CASES[0];
    let mut u = unet(case);
    let lf = LoraFile::open(golden("unet_a/lora_peft.safetensors")).unwrap();
    u.apply_lora_file(&lf, &VarMap::new()).unwrap();
    let before: Vec<Tensor> = u
        .linears()
        .unwrap()
        .iter()
        .map(|l| l.weight().clone())
        .collect();
    u.merge_lora().unwrap();
    let e = rel_err(
        &run(&u, case, "square_b2"),
        &reference(case, "lora", "square_b2"),
    );
    assert!(e <= TOL, "merged rel err {e}");
    u.unmerge_lora().unwrap();
    for (l, w) in u.linears().unwrap().iter().zip(before) {
        let d = (l.weight() - &w)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{} not restored", l.name());
    }
}

#[test]
fn lora_gradients_match_pytorch() {
    let case = &CASES[0];
    let mut u = unet(case);
    let lf = LoraFile::open(golden("unet_a/lora_peft.safetensors")).unwrap();
    u.apply_lora_file(&lf, &VarMap::new()).unwrap();
    let t = load("unet_a/inputs_square_b2.safetensors");
    let out = u
        .forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"])
        .unwrap();
    let loss = (out - &t["target"])
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let refs = load("unet_a/lora_grads.safetensors");
    let le = rel_err(&loss.reshape(1).unwrap(), &refs["loss"]);
    assert!(le <= TOL, "loss rel err {le}");
    let grads = loss.backward().unwrap();
    let vars = u.lora_vars().unwrap();
    assert_eq!(
        vars.len() + 1,
        refs.len(),
        "every PyTorch LoRA gradient has a counterpart"
    );
    let mut worst = 0f32;
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let r = refs
            .get(&name)
            .unwrap_or_else(|| panic!("{name}: no reference gradient"));
        let e = rel_err(g, r);
        worst = worst.max(e);
        assert!(e <= 1e-3, "{name}: gradient rel err {e}");
    }
    println!("worst LoRA gradient rel err {worst:.2e}");
}

#[test]
fn cli_unet_forward_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    for (lora, scale, kind) in [
        (None, "1", "base"),
        (Some("lora_kohya"), "0.5", "lora_half"),
        (Some("lora_peft"), "1", "lora"),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sd-lora"));
        cmd.args(["unet-forward", "--model"])
            .arg(golden("unet_a"))
            .arg("--inputs")
            .arg(golden("unet_a/inputs_odd_b1.safetensors"))
            .arg("--out")
            .arg(&out)
            .args(["--lora-scale", scale]);
        if let Some(l) = lora {
            cmd.arg("--lora")
                .arg(golden(&format!("unet_a/{l}.safetensors")));
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["sample"].clone();
        let e = rel_err(&got, &reference(&CASES[0], kind, "odd_b1"));
        assert!(e <= TOL, "CLI {kind}: rel err {e}");
    }
}
