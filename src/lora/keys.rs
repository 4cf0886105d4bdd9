//! The names of LoRA file tensors: which component a key is for, which module (as the file
//! spells it) and which part of which adapter kind. Every layout in circulation:
//! - kohya / LyCORIS / A1111 / ComfyUI: `lora_unet_<module with _>.<part>`, text encoder
//!   `lora_te_` / `lora_te1_` (`lora_te2_` is SDXL's second text encoder);
//! - diffusers / PEFT: `unet.<module>.lora_A.weight` (also `.lora_A.default.weight`, without
//!   `unet.`, under `base_model.model.`), `text_encoder.<module>...`;
//! - diffusers' older `<module>.lora.down.weight`, `.lora_linear_layer.down.weight` and the
//!   attention-processor form `...attn1.processor.to_q_lora.down.weight`;
//! - CompVis/A1111 module names (`input_blocks.1.1...`, `middle_block`, `output_blocks`), with
//!   the `diffusion_model.` prefix of ComfyUI-saved files.

/// The model component a tensor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder (`lora_te2_`, `text_encoder_2.`): never loaded here.
    TextEncoder2,
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Component::Unet => "UNet",
            Component::TextEncoder => "text encoder",
            Component::TextEncoder2 => "second text encoder (SDXL)",
        })
    }
}

/// Which tensor of an adapter a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Down,
    Up,
    Mid,
    Alpha,
    /// kohya/LyCORIS `dora_scale`.
    DoraScale,
    /// PEFT `lora_magnitude_vector`.
    Magnitude,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    LokrT2,
    Diff,
    DiffB,
    /// LyCORIS' `scalar` (already folded into `lora_up` by its writer; its loader resets it).
    Scalar,
}

/// Suffixes and the part they name. Longest match wins.
const PARTS: &[(&str, Part)] = &[
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".lora_mid.weight", Part::Mid),
    (".lora_A.default.weight", Part::Down),
    (".lora_B.default.weight", Part::Up),
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".lora_magnitude_vector.default.weight", Part::Magnitude),
    (".lora_magnitude_vector.default", Part::Magnitude),
    (".lora_magnitude_vector.weight", Part::Magnitude),
    (".lora_magnitude_vector", Part::Magnitude),
    (".lora_linear_layer.down.weight", Part::Down),
    (".lora_linear_layer.up.weight", Part::Up),
    (".lora.down.weight", Part::Down),
    (".lora.up.weight", Part::Up),
    ("_lora.down.weight", Part::Down),
    ("_lora.up.weight", Part::Up),
    (".alpha", Part::Alpha),
    (".dora_scale", Part::DoraScale),
    (".hada_w1_a", Part::HadaW1A),
    (".hada_w1_b", Part::HadaW1B),
    (".hada_w2_a", Part::HadaW2A),
    (".hada_w2_b", Part::HadaW2B),
    (".hada_t1", Part::HadaT1),
    (".hada_t2", Part::HadaT2),
    (".lokr_w1", Part::LokrW1),
    (".lokr_w1_a", Part::LokrW1A),
    (".lokr_w1_b", Part::LokrW1B),
    (".lokr_w2", Part::LokrW2),
    (".lokr_w2_a", Part::LokrW2A),
    (".lokr_w2_b", Part::LokrW2B),
    (".lokr_t2", Part::LokrT2),
    (".diff", Part::Diff),
    (".diff_b", Part::DiffB),
    (".scalar", Part::Scalar),
];

/// A key split into its component, module (as the file spells it) and part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    pub component: Component,
    /// The module with the component prefix removed: `down_blocks_0_attentions_0_proj_in`
    /// (underscore layouts) or `down_blocks.0.attentions.0.proj_in`.
    pub module: String,
    pub part: Part,
}

const PREFIXES: &[(&str, Component)] = &[
    ("lora_unet_", Component::Unet),
    ("lora_te1_", Component::TextEncoder),
    ("lora_te2_", Component::TextEncoder2),
    ("lora_te_", Component::TextEncoder),
    ("model.diffusion_model.", Component::Unet),
    ("diffusion_model.", Component::Unet),
    ("unet.", Component::Unet),
    ("text_encoder_2.", Component::TextEncoder2),
    ("text_encoder.", Component::TextEncoder),
    // ComfyUI's names for the SD 1.x CLIP-L and SDXL's CLIP-G
    ("text_encoders.clip_l.transformer.", Component::TextEncoder),
    ("text_encoders.clip_g.transformer.", Component::TextEncoder2),
];

/// Splits `key`; `None` when no known part suffix ends it.
pub fn parse_key(key: &str) -> Option<ParsedKey> {
    let (stem, part) = PARTS
        .iter()
        .filter_map(|(sfx, p)| key.strip_suffix(sfx).map(|s| (s, *p)))
        .min_by_key(|(s, _)| s.len())?;
    let stem = stem.strip_prefix("base_model.model.").unwrap_or(stem);
    let (component, module) = PREFIXES
        .iter()
        .find_map(|(p, c)| stem.strip_prefix(p).map(|m| (*c, m)))
        .unwrap_or(if stem.starts_with("text_model.") {
            // a PEFT file saved from a CLIP text model
            (Component::TextEncoder, stem)
        } else {
            (Component::Unet, stem)
        });
    if module.is_empty() {
        return None;
    }
    Some(ParsedKey {
        component,
        module: old_processor_name(module),
        part,
    })
}

/// The attention-processor form `X.attn1.processor.to_q` (from `to_q_lora.down.weight`) ->
/// `X.attn1.to_q`; `to_out` -> `to_out.0`.
fn old_processor_name(m: &str) -> String {
    match m.rsplit_once(".processor.") {
        Some((parent, proj)) => {
            let proj = if proj == "to_out" { "to_out.0" } else { proj };
            format!("{parent}.{proj}")
        }
        None => m.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(k: &str) -> (Component, String, Part) {
        let x = parse_key(k).unwrap();
        (x.component, x.module, x.part)
    }

    #[test]
    fn every_layout_splits() {
        use Component::*;
        assert_eq!(
            p("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"),
            (
                Unet,
                "down_blocks_0_attentions_0_proj_in".into(),
                Part::Down
            )
        );
        assert_eq!(
            p("lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a"),
            (
                TextEncoder,
                "text_model_encoder_layers_0_mlp_fc1".into(),
                Part::HadaW1A
            )
        );
        assert_eq!(
            p("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"),
            (
                TextEncoder2,
                "text_model_encoder_layers_0_mlp_fc1".into(),
                Part::Alpha
            )
        );
        assert_eq!(
            p("unet.mid_block.attentions.0.proj_in.lora_A.default.weight"),
            (Unet, "mid_block.attentions.0.proj_in".into(), Part::Down)
        );
        assert_eq!(
            p("base_model.model.conv_in.lora_B.weight"),
            (Unet, "conv_in".into(), Part::Up)
        );
        assert_eq!(
            p("diffusion_model.input_blocks.1.1.proj_in.lora_up.weight"),
            (Unet, "input_blocks.1.1.proj_in".into(), Part::Up)
        );
        assert_eq!(
            p("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight"),
            (Unet, "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0".into(), Part::Up)
        );
        assert_eq!(
            p("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight"),
            (TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj".into(), Part::Down)
        );
        assert_eq!(
            p("lora_unet_conv_in.diff_b"),
            (Unet, "conv_in".into(), Part::DiffB)
        );
        assert_eq!(
            p("lora_unet_conv_in.lokr_w2_b"),
            (Unet, "conv_in".into(), Part::LokrW2B)
        );
        assert_eq!(
            p("unet.conv_in.lora_magnitude_vector"),
            (Unet, "conv_in".into(), Part::Magnitude)
        );
        assert_eq!(
            p("base_model.model.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"),
            (
                TextEncoder,
                "text_model.encoder.layers.0.mlp.fc1".into(),
                Part::Down
            )
        );
        assert_eq!(
            p("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.lora_up.weight"),
            (TextEncoder, "text_model.encoder.layers.0.mlp.fc1".into(), Part::Up)
        );
        assert_eq!(parse_key("lora_unet_conv_in.weird_thing"), None);
        assert_eq!(parse_key(".alpha"), None);
    }
}
