//! Training checkpoints: LoRA tensors, AdamW moments, RNG state, position in the epoch, step,
//! config and loss history in one safetensors file, written atomically (temp file, fsync,
//! rename), so a killed run never leaves a half-written checkpoint and a resumed run continues
//! bit-identically on the CPU.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::{StepRecord, TrainConfig, Trainer};
use crate::io::write_safetensors_atomic;

/// `checkpoint-000042.safetensors`: zero-padded so names sort by step.
pub fn file_name(step: usize) -> String {
    format!("checkpoint-{step:06}.safetensors")
}

/// The complete checkpoints in `dir` by step, oldest first (temporary files of interrupted
/// writes are ignored).
fn all_checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let step = name
            .strip_prefix("checkpoint-")
            .and_then(|r| r.strip_suffix(".safetensors"))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(s) = step {
            found.push((s, p));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint in `dir` (temporary files of interrupted writes are ignored).
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(all_checkpoints(dir)?.pop().map(|(_, p)| p))
}

/// Deletes all but the newest `keep` checkpoints in `dir`.
pub fn remove_all_but_newest(dir: &Path, keep: usize) -> Result<()> {
    let all = all_checkpoints(dir)?;
    for (_, p) in &all[..all.len().saturating_sub(keep)] {
        std::fs::remove_file(p)
            .with_context(|| format!("cannot remove old checkpoint {}", p.display()))?;
    }
    Ok(())
}

/// Deletes temporary files that killed atomic writes left in `dir` (`.<name>.safetensors.tmp-*`).
/// Call it only when no other process is writing to `dir`.
pub fn remove_stale_temp_files(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') && name.contains(".safetensors.tmp-") {
            std::fs::remove_file(&p)
                .with_context(|| format!("cannot remove stale temporary file {}", p.display()))?;
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("bad hex string");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("bad hex string"))
        .collect()
}

impl Trainer {
    /// Writes the full training state to `path` atomically.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        for (i, (name, var)) in self.optimizer.vars.iter().enumerate() {
            tensors.insert(
                format!("lora.{name}"),
                var.as_tensor().to_device(&Device::Cpu)?,
            );
            tensors.insert(
                format!("adam_m.{name}"),
                self.optimizer.m[i].to_device(&Device::Cpu)?,
            );
            tensors.insert(
                format!("adam_v.{name}"),
                self.optimizer.v[i].to_device(&Device::Cpu)?,
            );
        }
        let history: Vec<[f64; 6]> = self
            .history
            .iter()
            .map(|r| {
                [
                    r.step as f64,
                    r.epoch as f64,
                    r.loss,
                    r.lr,
                    r.grad_norm,
                    r.seconds,
                ]
            })
            .collect();
        let state = serde_json::json!({
            "step": self.step,
            "epoch": self.epoch,
            "adam_t": self.optimizer.t,
            "group_pos": self.group_pos,
            "epoch_order": self.epoch_order,
            "rng_seed": hex(&self.rng.get_seed()),
            "rng_stream": self.rng.get_stream(),
            "rng_word_pos": self.rng.get_word_pos().to_string(),
            "config": self.config,
            "history": history,
            "scaler": self.scaler,
        });
        let mut meta = HashMap::new();
        meta.insert("sd_lora_train_state".to_string(), state.to_string());
        write_safetensors_atomic(&tensors, Some(meta), path)
    }

    /// Restores a checkpoint into this trainer (built for the same model and LoRA layout) and
    /// its LoRA tensors. The config stored in the checkpoint replaces `self.config`.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a valid checkpoint (safetensors): {e}",
                path.display()
            )
        })?;
        let raw = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("sd_lora_train_state"))
            .with_context(|| format!("{} is not an sd-lora training checkpoint", path.display()))?;
        let st: serde_json::Value = serde_json::from_str(raw)
            .with_context(|| format!("{}: corrupt training state", path.display()))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        let get = |k: &str| -> Result<candle_core::Tensor> {
            tensors.get(k).cloned().with_context(|| {
                format!(
                    "{}: tensor `{k}` is missing (a checkpoint of another LoRA layout?)",
                    path.display()
                )
            })
        };
        for (i, (name, var)) in self.optimizer.vars.iter().enumerate() {
            let dev = var.device().clone();
            let t = get(&format!("lora.{name}"))?;
            if t.dims() != var.dims() {
                bail!(
                    "{}: `lora.{name}` has shape {:?}, the model has {:?}",
                    path.display(),
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_device(&dev)?)?;
            self.optimizer.m[i] = get(&format!("adam_m.{name}"))?.to_device(&dev)?;
            self.optimizer.v[i] = get(&format!("adam_v.{name}"))?.to_device(&dev)?;
        }
        let num = |k: &str| -> Result<u64> {
            st.get(k)
                .and_then(|v| v.as_u64())
                .with_context(|| format!("{}: field `{k}` missing", path.display()))
        };
        self.step = num("step")? as usize;
        self.epoch = num("epoch")? as usize;
        self.optimizer.t = num("adam_t")? as usize;
        self.group_pos = num("group_pos")? as usize;
        self.epoch_order = serde_json::from_value(st["epoch_order"].clone())?;
        self.config = serde_json::from_value::<TrainConfig>(st["config"].clone())?;
        let seed: [u8; 32] = unhex(st["rng_seed"].as_str().unwrap_or(""))?
            .try_into()
            .map_err(|_| anyhow::anyhow!("{}: bad RNG seed", path.display()))?;
        let mut rng = ChaCha12Rng::from_seed(seed);
        rng.set_stream(num("rng_stream")?);
        let pos: u128 = st["rng_word_pos"]
            .as_str()
            .unwrap_or("")
            .parse()
            .with_context(|| format!("{}: bad RNG position", path.display()))?;
        rng.set_word_pos(pos);
        self.rng = rng;
        if let Some(s) = st.get("scaler").filter(|s| !s.is_null()) {
            self.scaler = Some(
                serde_json::from_value(s.clone())
                    .with_context(|| format!("{}: corrupt loss-scaler state", path.display()))?,
            );
        }
        let h: Vec<[f64; 6]> = serde_json::from_value(st["history"].clone())?;
        self.history = h
            .into_iter()
            .map(|r| StepRecord {
                step: r[0] as usize,
                epoch: r[1] as usize,
                loss: r[2],
                lr: r[3],
                grad_norm: r[4],
                seconds: r[5],
            })
            .collect();
        Ok(())
    }
}
