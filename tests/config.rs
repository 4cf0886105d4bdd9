//! UNet config parsing: presets, diffusers config.json files, and clear rejections.

use sd_lora::unet::{PerBlock, UNetConfig};
use std::path::Path;

fn with(field: &str, value: serde_json::Value) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("tests/data/sd15_unet_config.json").unwrap())
            .unwrap();
    v[field] = value;
    let p = dir.path().join("config.json");
    std::fs::write(&p, v.to_string()).unwrap();
    match UNetConfig::from_file(&p) {
        Ok(_) => String::new(),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn diffusers_configs_parse() {
    let sd15 = UNetConfig::from_file(Path::new("tests/data/sd15_unet_config.json")).unwrap();
    assert_eq!(sd15, UNetConfig::sd_v1_5());
    assert_eq!(
        sd15.heads().unwrap(),
        vec![8; 4],
        "SD 1.x: attention_head_dim is the head count"
    );
    // a config written by diffusers 0.42 carries every field
    let a = UNetConfig::from_file(Path::new("tests/golden/data/unet_a/unet/config.json")).unwrap();
    assert_eq!(a.block_out_channels, vec![16, 32, 32]);
    let b = UNetConfig::from_file(Path::new("tests/golden/data/unet_b/config.json")).unwrap();
    assert_eq!(b.layers().unwrap(), vec![1, 2]);
    assert_eq!(b.transformer_layers().unwrap(), vec![2, 1]);
    assert_eq!(b.heads().unwrap(), vec![4, 2]);
    UNetConfig::tiny().validate().unwrap();
    assert_eq!(
        with("act_fn", "swish".into()),
        "",
        "swish is diffusers' alias of silu"
    );
}

#[test]
fn unsupported_or_inconsistent_configs_are_rejected_by_name() {
    for (field, value, needle) in [
        (
            "attention_type",
            serde_json::json!("gated"),
            "attention_type",
        ),
        (
            "class_embed_type",
            serde_json::json!("timestep"),
            "class_embed_type",
        ),
        (
            "time_embedding_act_fn",
            serde_json::json!("silu"),
            "time_embedding_act_fn",
        ),
        (
            "resnet_time_scale_shift",
            serde_json::json!("scale_shift"),
            "resnet_time_scale_shift",
        ),
        (
            "down_block_types",
            serde_json::json!(["CrossAttnDownBlock2D", "DownBlock2D"]),
            "down_block_types",
        ),
        (
            "up_block_types",
            serde_json::json!([
                "UpBlock2D",
                "AttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D"
            ]),
            "AttnUpBlock2D",
        ),
        (
            "attention_head_dim",
            serde_json::json!([8, 8]),
            "attention_head_dim",
        ),
        (
            "attention_head_dim",
            serde_json::json!(7),
            "attention heads",
        ),
        ("norm_num_groups", serde_json::json!(48), "norm_num_groups"),
        (
            "block_out_channels",
            serde_json::json!("wide"),
            "config.json",
        ),
    ] {
        let err = with(field, value);
        assert!(
            err.contains(needle) && err.contains("config.json"),
            "{field}: {err}"
        );
    }
    let err = UNetConfig::from_file(Path::new("/no/such/config.json")).unwrap_err();
    assert!(format!("{err:#}").contains("/no/such/config.json"));
    assert!(PerBlock::Each(vec![1, 2])
        .expand(3, "layers_per_block")
        .is_err());
}
