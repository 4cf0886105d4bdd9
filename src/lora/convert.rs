//! Converting a read LoRA file between the kohya layout (A1111, ComfyUI, kohya, LyCORIS) and
//! the PEFT/diffusers layout, tensor by tensor (no model weights needed, only the module
//! names the file was matched to).
//!
//! - to **kohya**: every kind, under diffusers module names with underscores
//!   (`lora_unet_down_blocks_0_...`, `lora_te_text_model_encoder_...`), LyCORIS part names,
//!   `.alpha` scalars; CompVis-named files come out diffusers-named.
//! - to **PEFT**: LoRA and LoCon (linear, 1x1 and k x k convolutions) with `lora_A`/`lora_B`,
//!   DoRA with the magnitude on the output axis (`lora_magnitude_vector`, `use_dora`), alphas
//!   in `lora_adapter_metadata` (`lora_alpha` + `alpha_pattern`, `r` + `rank_pattern`, per
//!   component). PEFT has no LoHa/LoKr/full/Tucker LoRA in diffusers' loader, nor input-axis
//!   DoRA: those files are refused with the reason.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::apply::{LoraPlan, ModuleIndex};
use super::file::{LoraEntry, LoraFile};
use super::io::LoraFormat;
use super::keys::Component;
use super::patch::PatchWeights;
use crate::io::write_safetensors_atomic;

/// Writes `file` (matched by `plan`, which must cover every entry) in `to` layout and `dtype`.
/// Returns the number of adapters written.
pub fn convert_file(
    file: &LoraFile,
    plan: &LoraPlan,
    models: &[&ModuleIndex],
    to: LoraFormat,
    dtype: DType,
    out: impl AsRef<Path>,
) -> Result<usize> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        bail!("LoRA files can be saved as f32, f16 or bf16, not {dtype:?}");
    }
    let show = file.path.display();
    if let Some((c, (n, _))) = plan.not_loaded.iter().next() {
        bail!("{show}: {n} adapters for the {c}, which the written file could not hold");
    }
    if !plan.left_out.is_empty() {
        bail!("{show}: a partial plan cannot be converted (it would drop tensors)");
    }
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut peft_meta: BTreeMap<Component, Vec<(String, usize, f64, bool)>> = BTreeMap::new();
    let put = |tensors: &mut BTreeMap<String, Tensor>, k: String, t: &Tensor| -> Result<()> {
        tensors.insert(k, t.to_device(&Device::Cpu)?.to_dtype(dtype)?);
        Ok(())
    };
    let mut n = 0;
    for (c, list) in &plan.targets {
        for (i, module) in list {
            let e = &file.entries[*i];
            n += 1;
            let layer = models
                .iter()
                .find(|x| x.component == *c)
                .and_then(|x| x.layer(module))
                .with_context(|| format!("{show}: no layer `{module}` to convert for"))?;
            match to {
                LoraFormat::Kohya => {
                    let stem = match c {
                        Component::Unet => format!("lora_unet_{}", module.replace('.', "_")),
                        Component::TextEncoder => {
                            let m = module.strip_prefix("text_model.").unwrap_or(module);
                            format!("lora_te_text_model_{}", m.replace('.', "_"))
                        }
                        Component::TextEncoder2 => {
                            bail!("{show}: SDXL's second text encoder cannot be converted here")
                        }
                    };
                    for (part, t) in kohya_parts(e, &layer.shape)? {
                        put(&mut tensors, format!("{stem}.{part}"), &t)?;
                    }
                    if let Some(a) = e.alpha {
                        // f32 whatever --save-dtype: bf16 would turn 0.3 into 0.30078
                        tensors.insert(
                            format!("{stem}.alpha"),
                            Tensor::new(a as f32, &Device::Cpu)?,
                        );
                    }
                }
                LoraFormat::Peft => {
                    // transformers' CLIPTextModel names start with `text_model.`
                    let (prefix, m) = match c {
                        Component::Unet => ("unet", module.clone()),
                        _ if module.starts_with("text_model.") => ("text_encoder", module.clone()),
                        _ => ("text_encoder", format!("text_model.{module}")),
                    };
                    let (down, up) = peft_parts(e, &layer.shape).map_err(|why| {
                        anyhow::anyhow!(
                            "{show}: `{}` cannot be written for PEFT/diffusers: {why}; convert to kohya instead (A1111, ComfyUI and LyCORIS read every kind)",
                            e.keys[0]
                        )
                    })?;
                    put(&mut tensors, format!("{prefix}.{m}.lora_A.weight"), &down)?;
                    put(&mut tensors, format!("{prefix}.{m}.lora_B.weight"), &up)?;
                    if let Some(d) = &e.dora_scale {
                        let out = up.dim(0)?;
                        // PEFT keeps [out] for linear layers, [1, out, 1, 1] for convolutions
                        let mag = if layer.shape.len() == 4 {
                            d.reshape((1, out, 1, 1))?
                        } else {
                            d.reshape(out)?
                        };
                        put(
                            &mut tensors,
                            format!("{prefix}.{m}.lora_magnitude_vector"),
                            &mag,
                        )?;
                    }
                    let rank = down.dim(0)?;
                    let alpha = e.effective_alpha().unwrap_or(rank as f64);
                    // metadata names without `text_model.`: suffix patterns that match
                    // transformers' CLIPTextModel with and without that level (recent
                    // versions flatten it, and diffusers then strips it from the keys)
                    let meta_name = m.strip_prefix("text_model.").unwrap_or(&m).to_string();
                    peft_meta.entry(*c).or_default().push((
                        meta_name,
                        rank,
                        alpha,
                        e.dora_scale.is_some(),
                    ));
                }
                LoraFormat::DiffusersOld => {
                    bail!(
                        "writing the old diffusers LoRA layout is not supported; use peft or kohya"
                    )
                }
            }
        }
    }
    if n == 0 {
        bail!("{show}: nothing to convert");
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    match to {
        LoraFormat::Peft => {
            meta.insert("lora_adapter_metadata".into(), peft_metadata(&peft_meta)?);
        }
        _ => {
            for (k, v) in &file.metadata {
                if k.starts_with("ss_") || k.starts_with("modelspec.") {
                    meta.insert(k.clone(), v.clone());
                }
            }
        }
    }
    write_safetensors_atomic(&tensors, Some(meta), out.as_ref())?;
    Ok(n)
}

/// The LyCORIS part names and tensors of an entry for a layer of shape `layer`.
fn kohya_parts(e: &LoraEntry, layer: &[usize]) -> Result<Vec<(&'static str, Tensor)>> {
    let mut v: Vec<(&'static str, Tensor)> = e
        .weights
        .named_parts()
        .into_iter()
        .map(|(n, t)| (n, t.clone()))
        .collect();
    if let Some(d) = &e.dora_scale {
        // kohya/LyCORIS keep the magnitude with the weight's rank: [out, 1, ..] or [1, in, ..];
        // PEFT's 1-D magnitude is the output axis
        let d = if d.rank() == 1 {
            let mut shape = vec![d.elem_count()];
            shape.extend(std::iter::repeat_n(1, layer.len().saturating_sub(1)));
            d.reshape(shape)?
        } else {
            d.clone()
        };
        v.push(("dora_scale", d));
    }
    Ok(v)
}

/// `(lora_A, lora_B)` of an entry PEFT can hold, shaped for the layer (`[r, in]`/`[out, r]`
/// for linear layers, `[r, in, k, k]`/`[out, r, 1, 1]` for convolutions), or why not.
fn peft_parts(e: &LoraEntry, layer: &[usize]) -> std::result::Result<(Tensor, Tensor), String> {
    let PatchWeights::Lora { down, up, mid } = &e.weights else {
        return Err(format!("PEFT/diffusers have no {} adapters", e.kind()));
    };
    if mid.is_some() {
        return Err("PEFT has no Tucker (`lora_mid`) LoRA".into());
    }
    if let Some(d) = &e.dora_scale {
        let out = up.dims()[0];
        if !(d.elem_count() == out && (d.rank() == 1 || d.dims().first() == Some(&out))) {
            return Err(format!(
                "its DoRA magnitude {:?} is on the input axis; PEFT's is per output row",
                d.dims()
            ));
        }
    }
    let r = down.dims()[0];
    let out = up.dims()[0];
    let (a_shape, b_shape): (Vec<usize>, Vec<usize>) = match layer {
        [_, i] => (vec![r, *i], vec![out, r]),
        [_, i, rest @ ..] => {
            let mut a = vec![r, *i];
            a.extend(rest);
            (a, vec![out, r, 1, 1])
        }
        other => return Err(format!("a layer of shape {other:?}")),
    };
    let a = down.reshape(a_shape).map_err(|e| e.to_string())?;
    let b = up.reshape(b_shape).map_err(|e| e.to_string())?;
    Ok((a, b))
}

/// diffusers' `lora_adapter_metadata` for (module, rank, alpha, dora) per component: the most
/// common rank and its alpha as `r`/`lora_alpha`, the rest as patterns.
fn peft_metadata(per: &BTreeMap<Component, Vec<(String, usize, f64, bool)>>) -> Result<String> {
    let mut m = serde_json::Map::new();
    for (c, list) in per {
        let prefix = match c {
            Component::Unet => "unet",
            _ => "text_encoder",
        };
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for (_, r, _, _) in list {
            *counts.entry(*r).or_default() += 1;
        }
        let r = counts
            .iter()
            .max_by_key(|(_, n)| **n)
            .map_or(0, |(r, _)| *r);
        let alpha = list
            .iter()
            .find(|(_, rk, _, _)| *rk == r)
            .map_or(r as f64, |(_, _, a, _)| *a);
        let (mut rank_pattern, mut alpha_pattern) =
            (serde_json::Map::new(), serde_json::Map::new());
        for (name, rk, a, _) in list {
            if *rk != r {
                rank_pattern.insert(name.clone(), (*rk).into());
            }
            if *a != alpha {
                alpha_pattern.insert(name.clone(), (*a).into());
            }
        }
        let dora = list.iter().any(|x| x.3);
        if dora && !list.iter().all(|x| x.3) {
            bail!("PEFT cannot mix DoRA and plain LoRA layers in one {c} adapter");
        }
        let mut targets: Vec<&String> = list.iter().map(|x| &x.0).collect();
        targets.sort();
        for (k, v) in [
            ("r", serde_json::json!(r)),
            ("lora_alpha", serde_json::json!(alpha)),
            ("rank_pattern", rank_pattern.into()),
            ("alpha_pattern", alpha_pattern.into()),
            ("target_modules", serde_json::json!(targets)),
            ("use_dora", dora.into()),
            ("use_rslora", false.into()),
            ("lora_dropout", serde_json::json!(0.0)),
            ("bias", "none".into()),
            ("init_lora_weights", true.into()),
            ("peft_type", "LORA".into()),
        ] {
            m.insert(format!("{prefix}.{k}"), v);
        }
    }
    Ok(serde_json::to_string_pretty(&serde_json::Value::Object(m))?)
}
