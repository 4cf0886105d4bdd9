//! LoRA files from the wild (issue 18), fixtures from tests/golden/make_golden_lycoris.py:
//! every LyCORIS kind written by `lycoris-lora` and applied by its forward, diffusers'
//! `save_lora_weights` with alpha != rank, and a text-encoder + UNet kohya file applied by
//! diffusers to the whole pipeline. UNet outputs within 1e-4 relative, images >= 40 dB PSNR.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::{golden, load, pipeline_config, psnr, rel_err, tiny_pipeline};
use sd_lora::lora::{LoraFile, LoraFormat, LoraLoad, LoraModel};
use sd_lora::pipeline::StableDiffusion;
use sd_lora::unet::UNet2DConditionModel;
use std::collections::HashMap;

const TOL: f32 = 1e-4;

const KINDS: &[&str] = &[
    "locon",
    "locon_tucker",
    "loha",
    "loha_tucker",
    "lokr",
    "lokr_full",
    "lokr_tucker",
    "dora_out",
    "dora_in",
    "full",
    "locon_f16",
    "loha_bf16",
];

fn unet() -> UNet2DConditionModel {
    UNet2DConditionModel::load(golden("unet_a"), None, DType::F32, &Device::Cpu).unwrap()
}

fn run(u: &UNet2DConditionModel) -> Tensor {
    let t = load("unet_a/inputs_square_b2.safetensors");
    u.forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"])
        .unwrap()
}

fn reference(name: &str) -> Tensor {
    load(&format!("lycoris/{name}_out.safetensors"))["sample"].clone()
}

#[test]
fn every_lycoris_kind_matches_lycoris() {
    let base = run(&unet());
    for name in KINDS {
        let mut u = unet();
        let file = LoraFile::open(golden(&format!("lycoris/{name}.safetensors"))).unwrap();
        assert!(file.unknown.is_empty(), "{name}: {:?}", file.unknown);
        let applied = u
            .load_lora_file(&file, &LoraLoad::default(), &VarMap::new())
            .unwrap();
        assert_eq!(
            applied.layers(),
            file.entries.len(),
            "{name}: every entry applied"
        );
        let y = run(&u);
        let want = reference(name);
        let e = rel_err(&y, &want);
        let effect = rel_err(&base, &want);
        println!(
            "{name}: {applied}\n  rel err {e:.2e} (the adapter moves the output by {effect:.2e})"
        );
        assert!(e <= TOL, "{name}: rel err {e}");
        assert!(effect > 1e-2, "{name}: the fixture must change the output");

        // strength 0 is the base model, exactly; back at 1 it is the reference again
        u.set_lora_scale(0.0).unwrap();
        assert_eq!(rel_err(&run(&u), &base), 0.0, "{name}: strength 0");
        u.set_lora_scale(1.0).unwrap();
        assert!(rel_err(&run(&u), &want) <= TOL, "{name}: strength 1 again");
        // merge (the plain LoRA layers) and unmerge keep the result; removal restores the base
        u.merge_lora().unwrap();
        assert!(rel_err(&run(&u), &want) <= TOL, "{name}: merged");
        u.unmerge_lora().unwrap();
        u.remove_lora().unwrap();
        assert_eq!(rel_err(&run(&u), &base), 0.0, "{name}: removed");
    }
}

#[test]
fn diffusers_alpha_metadata_is_honoured_for_new_and_old_keys() {
    let want = reference("diffusers_alpha8");
    // PEFT's own key form, `lora_A.default.weight`, with the same metadata
    let tmp = tempfile::tempdir().unwrap();
    let (t, meta) = tensors_of("diffusers_alpha8");
    let renamed: HashMap<String, Tensor> = t
        .into_iter()
        .map(|(k, v)| (k.replace(".weight", ".default.weight"), v))
        .collect();
    let p = tmp.path().join("peft_default.safetensors");
    safetensors::serialize_to_file(
        renamed.iter().map(|(k, v)| (k.clone(), SafeView(v))),
        Some(meta),
        &p,
    )
    .unwrap();
    let mut u = unet();
    u.apply_lora_file(&LoraFile::open(&p).unwrap(), &VarMap::new())
        .unwrap();
    assert!(
        rel_err(&run(&u), &want) <= TOL,
        "lora_A.default.weight keys"
    );
    for f in ["diffusers_alpha8", "diffusers_alpha8_old_keys"] {
        let mut u = unet();
        let file = LoraFile::open(golden(&format!("lycoris/{f}.safetensors"))).unwrap();
        u.apply_lora_file(&file, &VarMap::new()).unwrap();
        assert!(file.entries.iter().all(|e| e.alpha == Some(8.0)), "{f}");
        let e = rel_err(&run(&u), &want);
        println!("{f}: rel err {e:.2e}");
        assert!(e <= TOL, "{f}: rel err {e}");
    }
}

#[test]
fn peft_dora_magnitude_vectors_match_diffusers() {
    let mut u = unet();
    let file = LoraFile::open(golden("lycoris/peft_dora.safetensors")).unwrap();
    let applied = u
        .load_lora_file(&file, &LoraLoad::default(), &VarMap::new())
        .unwrap();
    assert!(applied.to_string().contains("+DoRA"), "{applied}");
    let e = rel_err(&run(&u), &reference("peft_dora"));
    println!("PEFT DoRA: {applied}: rel err {e:.2e}");
    assert!(e <= TOL, "rel err {e}");
}

#[test]
fn patches_stack_with_their_own_strengths() {
    // full differences are additive: the file twice at 0.5 each is the file at 1
    let path = golden("lycoris/full.safetensors");
    let file = LoraFile::open(&path).unwrap();
    let mut u = unet();
    for name in ["a", "b"] {
        u.load_lora_file(
            &file,
            &LoraLoad::named(name).with_strength(0.5),
            &VarMap::new(),
        )
        .unwrap();
    }
    assert_eq!(u.adapter_names().unwrap(), vec!["a", "b"]);
    let e = rel_err(&run(&u), &reference("full"));
    assert!(e <= TOL, "stacked halves: {e}");
    // one of them off: half the way
    u.set_adapter_scale("b", 0.0).unwrap();
    let half = run(&u);
    assert!(rel_err(&half, &reference("full")) > 1e-2);
    let err = u
        .load_lora_file(&file, &LoraLoad::named("a"), &VarMap::new())
        .unwrap_err();
    assert!(format!("{err:#}").contains("`a`"), "{err:#}");
}

/// Converts `file` for the UNet of unet_a into `to` layout.
fn convert(
    file: &LoraFile,
    to: LoraFormat,
    dir: &std::path::Path,
) -> anyhow::Result<std::path::PathBuf> {
    let u = unet();
    let index = u.module_index()?;
    let plan = sd_lora::lora::apply::plan(file, &[&index], false)?;
    let out = dir.join(format!("converted_{to:?}.safetensors"));
    sd_lora::lora::convert::convert_file(file, &plan, &[&index], to, DType::F32, &out)?;
    Ok(out)
}

#[test]
fn conversions_keep_the_result_or_say_why_not() {
    let tmp = tempfile::tempdir().unwrap();
    // to kohya: every kind round-trips
    for name in KINDS.iter().chain(&["peft_dora", "diffusers_alpha8"]) {
        let file = LoraFile::open(golden(&format!("lycoris/{name}.safetensors"))).unwrap();
        let k = convert(&file, LoraFormat::Kohya, tmp.path()).unwrap();
        let mut u = unet();
        u.apply_lora_file(&LoraFile::open(&k).unwrap(), &VarMap::new())
            .unwrap();
        let e = rel_err(&run(&u), &reference(name));
        assert!(e <= TOL, "{name} -> kohya: {e}");
    }
    // to PEFT: LoRA, LoCon, output-axis DoRA
    for name in [
        "locon",
        "dora_out",
        "peft_dora",
        "diffusers_alpha8",
        "locon_f16",
    ] {
        let file = LoraFile::open(golden(&format!("lycoris/{name}.safetensors"))).unwrap();
        let p = convert(&file, LoraFormat::Peft, tmp.path()).unwrap();
        let back = LoraFile::open(&p).unwrap();
        assert_eq!(back.format, LoraFormat::Peft);
        let mut u = unet();
        u.apply_lora_file(&back, &VarMap::new()).unwrap();
        let e = rel_err(&run(&u), &reference(name));
        assert!(e <= TOL, "{name} -> peft: {e}");
    }
    // what PEFT cannot hold is refused with the reason
    for (name, why) in [
        ("loha", "no LoHa"),
        ("lokr", "no LoKr"),
        ("full", "no full"),
        ("locon_tucker", "Tucker"),
        ("dora_in", "input axis"),
    ] {
        let file = LoraFile::open(golden(&format!("lycoris/{name}.safetensors"))).unwrap();
        let err = format!(
            "{:#}",
            convert(&file, LoraFormat::Peft, tmp.path()).unwrap_err()
        );
        assert!(err.contains(why) && err.contains("kohya"), "{name}: {err}");
    }
}

/// A tensor as a safetensors view (to write files with metadata in tests).
struct SafeView<'a>(&'a Tensor);

impl safetensors::View for SafeView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.0.dims()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let v = self.0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.0.elem_count() * 4
    }
}

fn tensors_of(name: &str) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let path = golden(&format!("lycoris/{name}.safetensors"));
    let f = LoraFile::open(&path).unwrap();
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    (t, f.metadata)
}

fn write(dir: &std::path::Path, name: &str, t: &HashMap<String, Tensor>) -> std::path::PathBuf {
    let p = dir.join(name);
    candle_core::safetensors::save(t, &p).unwrap();
    p
}

#[test]
fn unknown_unmatched_malformed_or_misfitting_keys_are_refused_by_name_unless_partial() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = tensors_of("locon");
    let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let variant = |name: &str, add: &[(&str, Tensor)], remove: &[&str]| {
        let mut t = base.clone();
        for k in remove {
            t.remove(*k);
        }
        for (k, v) in add {
            t.insert(k.to_string(), v.clone());
        }
        write(tmp.path(), name, &t)
    };
    let unmatched_key = "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight";
    let cases = [
        // (file, the key the messages must name, whether the rest is the whole reference)
        (
            variant(
                "unknown.safetensors",
                &[("lora_unet_conv_in.mystery_weight", z(&[2, 2]))],
                &[],
            ),
            "lora_unet_conv_in.mystery_weight",
            true,
        ),
        (
            variant(
                "unmatched.safetensors",
                &[
                    (unmatched_key, z(&[2, 2])),
                    (
                        "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight",
                        z(&[2, 2]),
                    ),
                ],
                &[],
            ),
            unmatched_key,
            true,
        ),
        (
            variant(
                "malformed.safetensors",
                &[("lora_unet_conv_norm_out.lora_down.weight", z(&[2, 16]))],
                &[],
            ),
            "lora_unet_conv_norm_out.lora_down.weight",
            true,
        ),
        (
            variant(
                "misfit.safetensors",
                &[("lora_unet_conv_in.lora_up.weight", z(&[8, 3, 1, 1]))],
                &["lora_unet_conv_in.lora_up.weight"],
            ),
            "lora_unet_conv_in.lora_down.weight",
            false,
        ),
    ];
    for (path, key, whole) in &cases {
        let file = LoraFile::open(path).unwrap();
        let mut u = unet();
        let err = u
            .load_lora_file(&file, &LoraLoad::default(), &VarMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(key) && err.contains("--allow-partial-lora"),
            "{err}"
        );
        let s = u.lora_summary().unwrap();
        assert_eq!((s.patched_layers, s.lora_layers), (0, 0), "nothing loaded");
        let applied = u
            .load_lora_file(&file, &LoraLoad::default().partial(true), &VarMap::new())
            .unwrap();
        assert_eq!(applied.left_out.len(), 1, "{:?}", applied.left_out);
        assert!(applied.left_out[0].contains(key), "{:?}", applied.left_out);
        let e = rel_err(&run(&u), &reference("locon"));
        assert_eq!(e <= TOL, *whole, "{key}: rel err {e}");
    }
}

#[test]
fn compvis_and_diffusion_model_names_resolve() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, _) = tensors_of("locon");
    let u = unet();
    let aliases: HashMap<String, String> = u
        .module_aliases()
        .unwrap()
        .into_iter()
        .map(|(ldm, d)| (d.replace('.', "_"), ldm))
        .collect();
    let (mut underscored, mut dotted) = (HashMap::new(), HashMap::new());
    for (k, v) in &t {
        let (stem, part) = k.split_once('.').unwrap();
        let module = stem.strip_prefix("lora_unet_").unwrap();
        let ldm = &aliases[module];
        underscored.insert(
            format!("lora_unet_{}.{part}", ldm.replace('.', "_")),
            v.clone(),
        );
        dotted.insert(format!("diffusion_model.{ldm}.{part}"), v.clone());
    }
    assert!(underscored
        .keys()
        .any(|k| k.contains("input_blocks_1_1_proj_in")));
    for (name, t) in [("a1111", underscored), ("comfy", dotted)] {
        let p = write(tmp.path(), &format!("{name}.safetensors"), &t);
        let mut u = unet();
        u.apply_lora_file(&LoraFile::open(&p).unwrap(), &VarMap::new())
            .unwrap();
        let e = rel_err(&run(&u), &reference("locon"));
        assert!(e <= TOL, "{name}: {e}");
    }
}

#[test]
fn text_encoder_and_unet_parts_match_diffusers_pipeline() {
    let dir = tiny_pipeline();
    let mut sd =
        StableDiffusion::from_folder(dir.path(), Some("fp16"), DType::F32, &Device::Cpu).unwrap();
    let r = load("tiny_pipeline/reference.safetensors");
    let cfg = pipeline_config(&r["pipe.latents"]);
    let path = golden("lycoris/te_unet_kohya.safetensors");
    // the UNet alone reports the text-encoder part and applies the rest
    let mut unet_only = sd.unet.clone();
    let applied = unet_only
        .load_lora_file(
            &LoraFile::open(&path).unwrap(),
            &LoraLoad::default(),
            &VarMap::new(),
        )
        .unwrap();
    assert_eq!(applied.not_loaded.len(), 1, "{applied}");
    assert!(applied.to_string().contains("text encoder"), "{applied}");

    // a file with only a text-encoder part applies nothing to a UNet: refused, not ignored
    let tmp = tempfile::tempdir().unwrap();
    let te_only: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.starts_with("lora_te_"))
        .collect();
    let te_path = write(tmp.path(), "te_only.safetensors", &te_only);
    let err = unet_only
        .load_lora_file(
            &LoraFile::open(&te_path).unwrap(),
            &LoraLoad::named("x"),
            &VarMap::new(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no adapters for the UNet") && err.contains("12 text encoder"),
        "{err}"
    );

    let applied = sd.load_lora(&path, &LoraLoad::default()).unwrap();
    println!("{applied}");
    assert!(applied.not_loaded.is_empty() && applied.left_out.is_empty());
    assert!(applied
        .applied
        .keys()
        .any(|k| k.starts_with("text encoder")));
    let want = &load("lycoris/te_unet_kohya_image.safetensors")["image"];
    let img = sd.generate(&cfg).unwrap();
    let p = psnr(&img.pixels, want);
    let without_te = {
        sd.text_encoder.set_lora_scale(0.0).unwrap();
        let i = sd.generate(&cfg).unwrap();
        sd.text_encoder.set_lora_scale(1.0).unwrap();
        psnr(&i.pixels, want)
    };
    println!("PSNR with TE+UNet parts {p:.1} dB; UNet part only {without_te:.1} dB");
    assert!(p >= 40.0, "PSNR {p}");
    assert!(
        without_te < 35.0,
        "the text-encoder part matters: {without_te}"
    );
}
