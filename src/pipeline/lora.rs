//! LoRA files on the whole pipeline: the UNet part and the text-encoder part of one file,
//! matched together so that every tensor is accounted for once.

use anyhow::Result;
use candle_core::DType;
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

use super::StableDiffusion;
use crate::lora::io::save_adapters;
use crate::lora::{apply, LoraApplied, LoraFile, LoraFormat, LoraLoad, LoraModel};

impl StableDiffusion {
    /// Reads a LoRA file and applies it to the UNet and the text encoder (see
    /// [`StableDiffusion::load_lora_file`]).
    pub fn load_lora(&mut self, path: impl AsRef<Path>, opts: &LoraLoad) -> Result<LoraApplied> {
        let file = LoraFile::open(path)?;
        self.load_lora_file(&file, opts)
    }

    /// Applies a file's UNet and text-encoder parts (any supported layout and kind) under
    /// `opts.adapter` at `opts.strength`. Unknown keys and modules neither model has are
    /// refused by name unless `opts.allow_partial`; SDXL's second text encoder is counted
    /// as not loaded. Both models are unchanged on error.
    pub fn load_lora_file(&mut self, file: &LoraFile, opts: &LoraLoad) -> Result<LoraApplied> {
        let (ui, ti) = (self.unet.module_index()?, self.text_encoder.module_index()?);
        let plan = apply::plan(file, &[&ui, &ti], opts.allow_partial)?;
        if plan.targets.values().all(|t| t.is_empty()) {
            anyhow::bail!(
                "{}: no adapters for this pipeline's UNet or text encoder (the file has {})",
                file.path.display(),
                apply::describe_counts(file)
            );
        }
        let (mut unet, mut te) = (self.unet.clone(), self.text_encoder.clone());
        let none = Vec::new();
        let varmap = VarMap::new();
        unet.apply_planned(
            file,
            plan.targets.get(&ui.component).unwrap_or(&none),
            opts,
            &varmap,
        )?;
        te.apply_planned(
            file,
            plan.targets.get(&ti.component).unwrap_or(&none),
            opts,
            &varmap,
        )?;
        self.unet = unet;
        self.text_encoder = te;
        Ok(LoraApplied::new(file, &plan, &opts.adapter, &[&ui, &ti]))
    }

    /// Strength of every LoRA adapter in the UNet and the text encoder.
    pub fn set_lora_scale(&mut self, scale: f64) -> Result<()> {
        self.unet.ensure_unmerged("changing the LoRA scale")?;
        self.text_encoder
            .ensure_unmerged("changing the LoRA scale")?;
        self.unet.set_lora_scale(scale)?;
        self.text_encoder.set_lora_scale(scale)
    }

    /// Strength of adapter `name` (in whichever of the UNet and text encoder has it).
    pub fn set_adapter_scale(&mut self, name: &str, scale: f64) -> Result<()> {
        let (u, t) = (
            self.unet.adapter_names()?.iter().any(|n| n == name),
            self.text_encoder.adapter_names()?.iter().any(|n| n == name),
        );
        if !u && !t {
            // the UNet's error lists the adapters there are
            return self.unet.set_adapter_scale(name, scale);
        }
        self.unet.ensure_unmerged("changing the LoRA scale")?;
        self.text_encoder
            .ensure_unmerged("changing the LoRA scale")?;
        if u {
            self.unet.set_adapter_scale(name, scale)?;
        }
        if t {
            self.text_encoder.set_adapter_scale(name, scale)?;
        }
        Ok(())
    }

    /// Saves the trainable adapters of the UNet and the text encoder (those it has: LoRA,
    /// DoRA, LoCon conv adapters) as one file in `format` and `dtype`, with `extra` metadata
    /// (see [`save_adapters`]). Weight patches of loaded LoHa/LoKr/... files are not trainable
    /// adapters and are not written.
    pub fn save_lora(
        &self,
        path: impl AsRef<Path>,
        format: LoraFormat,
        dtype: DType,
        extra: &HashMap<String, String>,
    ) -> Result<()> {
        let mut layers = self.unet.adapted_layers()?;
        layers.extend(self.text_encoder.adapted_layers()?);
        save_adapters(&layers, format, dtype, path, extra)
    }

    /// Removes every LoRA adapter and patch from the UNet and the text encoder.
    pub fn remove_lora(&mut self) -> Result<()> {
        self.unet.remove_lora()?;
        self.text_encoder.remove_lora()
    }
}
