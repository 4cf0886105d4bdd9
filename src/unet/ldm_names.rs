//! The original CompVis/LDM module names of the UNet (`input_blocks.1.1.proj_in`,
//! `middle_block.0.in_layers.2`, `output_blocks.2.1.conv`, `out.2`), which A1111-era LoRA files
//! and ComfyUI-saved files (`diffusion_model.`) use: the mapping diffusers' conversion script
//! and ComfyUI's `unet_to_diffusers` define, derived here from the model's own block layout.

use super::UNet2DConditionModel;

/// Resnet internals: diffusers name -> LDM name.
const RESNET: &[(&str, &str)] = &[
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
];

/// (diffusers prefix, LDM prefix, is a resnet) for every block of `unet`.
fn block_prefixes(unet: &UNet2DConditionModel) -> Vec<(String, String, bool)> {
    let mut out = vec![
        ("conv_in".to_string(), "input_blocks.0.0".to_string(), false),
        (
            "time_embedding.linear_1".into(),
            "time_embed.0".into(),
            false,
        ),
        (
            "time_embedding.linear_2".into(),
            "time_embed.2".into(),
            false,
        ),
        ("conv_norm_out".into(), "out.0".into(), false),
        ("conv_out".into(), "out.2".into(), false),
    ];
    let mut idx = 1;
    for (i, b) in unet.down_blocks.iter().enumerate() {
        for j in 0..b.resnets.len() {
            out.push((
                format!("down_blocks.{i}.resnets.{j}"),
                format!("input_blocks.{idx}.0"),
                true,
            ));
            if j < b.attentions.len() {
                out.push((
                    format!("down_blocks.{i}.attentions.{j}"),
                    format!("input_blocks.{idx}.1"),
                    false,
                ));
            }
            idx += 1;
        }
        if b.downsampler.is_some() {
            out.push((
                format!("down_blocks.{i}.downsamplers.0.conv"),
                format!("input_blocks.{idx}.0.op"),
                false,
            ));
            idx += 1;
        }
    }
    let mid = &unet.mid_block;
    for j in 0..mid.resnets.len() {
        out.push((
            format!("mid_block.resnets.{j}"),
            format!("middle_block.{}", 2 * j),
            true,
        ));
    }
    for j in 0..mid.attentions.len() {
        out.push((
            format!("mid_block.attentions.{j}"),
            format!("middle_block.{}", 2 * j + 1),
            false,
        ));
    }
    let mut idx = 0;
    for (i, b) in unet.up_blocks.iter().enumerate() {
        for j in 0..b.resnets.len() {
            out.push((
                format!("up_blocks.{i}.resnets.{j}"),
                format!("output_blocks.{idx}.0"),
                true,
            ));
            if j < b.attentions.len() {
                out.push((
                    format!("up_blocks.{i}.attentions.{j}"),
                    format!("output_blocks.{idx}.1"),
                    false,
                ));
            }
            idx += 1;
        }
        if b.upsampler.is_some() {
            let pos = if b.attentions.is_empty() { 1 } else { 2 };
            out.push((
                format!("up_blocks.{i}.upsamplers.0.conv"),
                format!("output_blocks.{}.{pos}.conv", idx - 1),
                false,
            ));
        }
    }
    out
}

/// The LDM name of diffusers module path `name`, when it has one.
fn to_ldm(name: &str, prefixes: &[(String, String, bool)]) -> Option<String> {
    for (d, l, resnet) in prefixes {
        if name == d {
            return Some(l.clone());
        }
        let Some(rest) = name
            .strip_prefix(d.as_str())
            .and_then(|r| r.strip_prefix('.'))
        else {
            continue;
        };
        if *resnet {
            let (head, tail) = rest.split_once('.').unwrap_or((rest, ""));
            let mapped = RESNET.iter().find(|(k, _)| *k == head).map(|(_, v)| *v)?;
            return Some(if tail.is_empty() {
                format!("{l}.{mapped}")
            } else {
                format!("{l}.{mapped}.{tail}")
            });
        }
        return Some(format!("{l}.{rest}"));
    }
    None
}

/// (LDM name, diffusers name) for each of `modules`.
pub fn ldm_aliases(unet: &UNet2DConditionModel, modules: &[String]) -> Vec<(String, String)> {
    let prefixes = block_prefixes(unet);
    modules
        .iter()
        .filter_map(|m| to_ldm(m, &prefixes).map(|l| (l, m.clone())))
        .collect()
}

/// The LDM name (without `model.diffusion_model.`) of each of our checkpoint keys (`.weight`
/// and `.bias` included), as diffusers' `convert_ldm_unet_checkpoint` pairs them; fails naming
/// a key without one.
pub fn ldm_keys(
    unet: &UNet2DConditionModel,
    keys: &[String],
) -> anyhow::Result<Vec<(String, String)>> {
    let prefixes = block_prefixes(unet);
    keys.iter()
        .map(|k| {
            to_ldm(k, &prefixes)
                .map(|l| (k.clone(), l))
                .ok_or_else(|| anyhow::anyhow!("UNet tensor `{k}` has no LDM name"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unet::UNetConfig;

    #[test]
    fn sd15_names_match_the_conversion_table() {
        let unet = UNet2DConditionModel::meta(&UNetConfig::sd_v1_5()).unwrap();
        let p = block_prefixes(&unet);
        let t = |d: &str| to_ldm(d, &p).unwrap();
        assert_eq!(t("conv_in"), "input_blocks.0.0");
        assert_eq!(
            t("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"),
            "input_blocks.2.1.transformer_blocks.0.attn1.to_q"
        );
        assert_eq!(
            t("down_blocks.1.resnets.0.conv_shortcut"),
            "input_blocks.4.0.skip_connection"
        );
        assert_eq!(
            t("down_blocks.2.downsamplers.0.conv"),
            "input_blocks.9.0.op"
        );
        assert_eq!(
            t("down_blocks.3.resnets.1.conv2"),
            "input_blocks.11.0.out_layers.3"
        );
        assert_eq!(
            t("mid_block.attentions.0.proj_in"),
            "middle_block.1.proj_in"
        );
        assert_eq!(
            t("mid_block.resnets.1.time_emb_proj"),
            "middle_block.2.emb_layers.1"
        );
        assert_eq!(t("up_blocks.0.upsamplers.0.conv"), "output_blocks.2.1.conv");
        assert_eq!(t("up_blocks.1.upsamplers.0.conv"), "output_blocks.5.2.conv");
        assert_eq!(
            t("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"),
            "output_blocks.11.1.transformer_blocks.0.ff.net.2"
        );
        assert_eq!(
            t("up_blocks.2.resnets.2.conv1"),
            "output_blocks.8.0.in_layers.2"
        );
        assert_eq!(t("time_embedding.linear_2"), "time_embed.2");
        assert_eq!(t("conv_out"), "out.2");
    }
}
