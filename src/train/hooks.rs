//! What happens around the optimizer steps: hooks the engine calls after every step and once
//! at the end. Checkpointing ([`Checkpoints`]), the metrics CSV
//! ([`super::metrics::MetricsCsv`]), progress ([`super::progress::Progress`]) and sampling
//! during training (a closure in `sd-lora train`) are all hooks; a plain closure over the step
//! record is one too ([`OnStep`]).

use anyhow::Result;
use std::path::PathBuf;

use super::{checkpoint, StepRecord, Trainer};

/// Called by [`Trainer::run`] after each optimizer step (the record is already in
/// `trainer.history`) and once when the run ends. An error stops training; what earlier steps
/// wrote (checkpoints, metrics lines) stays.
pub trait StepHook {
    /// `total` is the number of optimizer steps the run will reach.
    fn after_step(&mut self, trainer: &Trainer, rec: &StepRecord, total: usize) -> Result<()>;
    /// After the last step (also when a resumed run had no step left to do).
    fn after_training(&mut self, _trainer: &Trainer) -> Result<()> {
        Ok(())
    }
}

/// A closure over each step's record as a hook (what [`Trainer::train`] takes).
pub struct OnStep<'a>(pub &'a mut dyn FnMut(&StepRecord));

impl StepHook for OnStep<'_> {
    fn after_step(&mut self, _: &Trainer, rec: &StepRecord, _: usize) -> Result<()> {
        (self.0)(rec);
        Ok(())
    }
}

/// Writes `dir/checkpoint-NNNNNN.safetensors` every `every` optimizer steps and at the end of
/// the run (atomically, see [`Trainer::save_checkpoint`]); `--resume` continues from the newest.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    pub dir: PathBuf,
    /// Steps between checkpoints (0 = only at the end).
    pub every: usize,
    /// Keep only the newest N checkpoint files (None = keep all, the default).
    pub keep_last: Option<usize>,
}

impl Checkpoints {
    pub fn new(dir: impl Into<PathBuf>, every: usize) -> Self {
        Self {
            dir: dir.into(),
            every,
            keep_last: None,
        }
    }

    fn save(&self, trainer: &Trainer) -> Result<()> {
        trainer.save_checkpoint(&self.dir.join(checkpoint::file_name(trainer.step)))?;
        if let Some(keep) = self.keep_last {
            checkpoint::remove_all_but_newest(&self.dir, keep.max(1))?;
        }
        Ok(())
    }
}

impl StepHook for Checkpoints {
    fn after_step(&mut self, trainer: &Trainer, rec: &StepRecord, total: usize) -> Result<()> {
        if self.every > 0 && rec.step.is_multiple_of(self.every) && rec.step < total {
            self.save(trainer)?;
        }
        Ok(())
    }

    fn after_training(&mut self, trainer: &Trainer) -> Result<()> {
        self.save(trainer)
    }
}
