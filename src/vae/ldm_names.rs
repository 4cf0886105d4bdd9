//! The original CompVis/LDM names of the VAE's tensors (`first_stage_model.encoder.down.0.block.1
//! .nin_shortcut`, `decoder.up.3.upsample.conv`, `encoder.mid.attn_1.q`), as single-file
//! checkpoints and standalone VAE files store them: the pairing of diffusers'
//! `convert_ldm_vae_checkpoint`.

/// Resnet/attention internals that are renamed: diffusers -> LDM.
const INNER: &[(&str, &str)] = &[
    ("conv_shortcut", "nin_shortcut"),
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
];

/// The LDM key (without `first_stage_model.`) of our VAE key `key`, for a VAE with `levels`
/// blocks per side; `None` for a key that has none.
pub fn vae_ldm_key(key: &str, levels: usize) -> Option<String> {
    let (side, rest) = key.split_once('.')?;
    if !matches!(side, "encoder" | "decoder") {
        // quant_conv, post_quant_conv
        return Some(key.to_string());
    }
    let inner = |s: &str| -> String {
        for (d, l) in INNER {
            if let Some(tail) = s.strip_prefix(d) {
                if tail.starts_with('.') {
                    return format!("{l}{tail}");
                }
            }
        }
        s.to_string()
    };
    let mapped = if let Some(r) = rest.strip_prefix("mid_block.resnets.") {
        let (j, tail) = r.split_once('.')?;
        let j: usize = j.parse().ok()?;
        format!("mid.block_{}.{tail}", j + 1)
    } else if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
        format!("mid.attn_1.{}", inner(r))
    } else if let Some(r) = rest
        .strip_prefix("down_blocks.")
        .or_else(|| rest.strip_prefix("up_blocks."))
    {
        let (i, tail) = r.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let (name, level) = if side == "encoder" {
            ("down", i)
        } else {
            ("up", levels.checked_sub(1 + i)?)
        };
        if let Some(t) = tail.strip_prefix("resnets.") {
            let (j, t) = t.split_once('.')?;
            format!("{name}.{level}.block.{j}.{}", inner(t))
        } else if let Some(t) = tail.strip_prefix("downsamplers.0.") {
            format!("{name}.{level}.downsample.{t}")
        } else if let Some(t) = tail.strip_prefix("upsamplers.0.") {
            format!("{name}.{level}.upsample.{t}")
        } else {
            return None;
        }
    } else if let Some(t) = rest.strip_prefix("conv_norm_out.") {
        format!("norm_out.{t}")
    } else {
        // conv_in, conv_out
        rest.to_string()
    };
    Some(format!("{side}.{mapped}"))
}

#[cfg(test)]
mod tests {
    use super::vae_ldm_key;

    #[test]
    fn names_follow_the_conversion_table() {
        let t = |k: &str| vae_ldm_key(k, 4).unwrap();
        assert_eq!(
            t("encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
            "encoder.down.1.block.0.nin_shortcut.weight"
        );
        assert_eq!(
            t("encoder.down_blocks.0.downsamplers.0.conv.bias"),
            "encoder.down.0.downsample.conv.bias"
        );
        assert_eq!(
            t("decoder.up_blocks.0.upsamplers.0.conv.weight"),
            "decoder.up.3.upsample.conv.weight"
        );
        assert_eq!(
            t("decoder.up_blocks.3.resnets.2.norm1.weight"),
            "decoder.up.0.block.2.norm1.weight"
        );
        assert_eq!(
            t("encoder.mid_block.attentions.0.to_out.0.weight"),
            "encoder.mid.attn_1.proj_out.weight"
        );
        assert_eq!(
            t("decoder.mid_block.attentions.0.group_norm.bias"),
            "decoder.mid.attn_1.norm.bias"
        );
        assert_eq!(
            t("decoder.mid_block.resnets.1.conv2.weight"),
            "decoder.mid.block_2.conv2.weight"
        );
        assert_eq!(t("encoder.conv_norm_out.weight"), "encoder.norm_out.weight");
        assert_eq!(t("post_quant_conv.weight"), "post_quant_conv.weight");
    }
}
