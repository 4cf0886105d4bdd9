//! Where single-file checkpoints keep the text encoder: SD 1.x stores transformers'
//! `CLIPTextModel` under `cond_stage_model.transformer.` (our keys, prefixed); SD 2.x stores
//! OpenCLIP's text tower under `cond_stage_model.model.` with fused q/k/v (`in_proj_weight`),
//! `resblocks`, `ln_1`/`ln_2`, `c_fc`/`c_proj`, `ln_final`: the pairing of diffusers'
//! `convert_open_clip_checkpoint`.

use crate::weights::Remap;

/// The two layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipLayout {
    /// SD 1.x: `cond_stage_model.transformer.text_model.*`.
    Transformers,
    /// SD 2.x: `cond_stage_model.model.*` (OpenCLIP).
    OpenClip,
}

/// Where the checkpoint keeps our key `key` (with `text_model.`), for hidden size `hidden`.
pub fn clip_ldm_key(key: &str, layout: ClipLayout, hidden: usize) -> Option<Remap> {
    let k = key.strip_prefix("text_model.").unwrap_or(key);
    if layout == ClipLayout::Transformers {
        return Some(Remap::key(format!(
            "cond_stage_model.transformer.text_model.{k}"
        )));
    }
    let p = "cond_stage_model.model";
    let simple = |s: &str| Some(Remap::key(format!("{p}.{s}")));
    match k {
        "embeddings.token_embedding.weight" => return simple("token_embedding.weight"),
        "embeddings.position_embedding.weight" => return simple("positional_embedding"),
        "final_layer_norm.weight" => return simple("ln_final.weight"),
        "final_layer_norm.bias" => return simple("ln_final.bias"),
        _ => {}
    }
    let r = k.strip_prefix("encoder.layers.")?;
    let (i, tail) = r.split_once('.')?;
    let block = format!("{p}.transformer.resblocks.{i}");
    let qkv = |n: usize, kind: &str| {
        Some(Remap {
            key: format!("{block}.attn.in_proj_{kind}"),
            rows: Some((n * hidden, hidden)),
        })
    };
    match tail {
        "self_attn.q_proj.weight" => qkv(0, "weight"),
        "self_attn.k_proj.weight" => qkv(1, "weight"),
        "self_attn.v_proj.weight" => qkv(2, "weight"),
        "self_attn.q_proj.bias" => qkv(0, "bias"),
        "self_attn.k_proj.bias" => qkv(1, "bias"),
        "self_attn.v_proj.bias" => qkv(2, "bias"),
        _ => {
            let (module, param) = tail.rsplit_once('.')?;
            let theirs = match module {
                "self_attn.out_proj" => "attn.out_proj",
                "layer_norm1" => "ln_1",
                "layer_norm2" => "ln_2",
                "mlp.fc1" => "mlp.c_fc",
                "mlp.fc2" => "mlp.c_proj",
                _ => return None,
            };
            Some(Remap::key(format!("{block}.{theirs}.{param}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_clip_names_and_qkv_rows() {
        let t = |k: &str| clip_ldm_key(k, ClipLayout::OpenClip, 1024).unwrap();
        assert_eq!(
            t("text_model.encoder.layers.3.self_attn.v_proj.weight"),
            Remap {
                key: "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight".into(),
                rows: Some((2048, 1024))
            }
        );
        assert_eq!(
            t("text_model.encoder.layers.0.mlp.fc2.bias").key,
            "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.bias"
        );
        assert_eq!(
            t("text_model.embeddings.position_embedding.weight").key,
            "cond_stage_model.model.positional_embedding"
        );
        assert_eq!(
            clip_ldm_key(
                "text_model.final_layer_norm.bias",
                ClipLayout::Transformers,
                768
            )
            .unwrap()
            .key,
            "cond_stage_model.transformer.text_model.final_layer_norm.bias"
        );
    }
}
