//! One optimizer step of the engine, and the epoch plan it walks: shuffled example order,
//! batches, groups of `grad_accum` micro-batches (a partial group at the end of an epoch still
//! makes a step, averaged over what it has, never carried into the next epoch).

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use rand::Rng;
use std::time::Instant;

use super::{Objective, StepRecord, Trainer};

/// The gradient of `loss` for each of `vars`, in order; fails naming a variable no gradient
/// reached (a layer cut off from the loss, or an op without a backward pass). Gradients that
/// gradient-checkpointed blocks compute during backward are included.
pub fn grads_of(loss: &Tensor, vars: &[(String, Var)]) -> Result<Vec<Tensor>> {
    let wanted: Vec<&Tensor> = vars.iter().map(|(_, v)| v.as_tensor()).collect();
    let (grads, from_blocks) = crate::ops::backward_with_checkpoints(loss, &wanted)?;
    vars.iter()
        .map(|(name, v)| {
            let direct = grads.get(v.as_tensor()).cloned();
            Ok(match (direct, from_blocks.get(&v.id())) {
                (Some(a), Some(b)) => (a + b)?,
                (Some(a), None) => a,
                (None, Some(b)) => b.clone(),
                (None, None) => bail!("no gradient reached {name}"),
            })
        })
        .collect()
}

/// The global L2 norm of `grads`.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    Ok(grads
        .iter()
        .map(|g| g.sqr()?.sum_all()?.to_scalar::<f32>())
        .sum::<candle_core::Result<f32>>()?
        .sqrt() as f64)
}

impl Trainer {
    /// This epoch's groups of micro-batches: the stored order when resuming mid-epoch, else a
    /// fresh shuffle (Fisher-Yates from the trainer's RNG).
    pub(crate) fn epoch_plan(&mut self, n: usize) -> Vec<Vec<Vec<usize>>> {
        let order = match &self.epoch_order {
            Some(o) if o.len() == n => o.clone(),
            _ => {
                let mut order: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    order.swap(i, self.rng.random_range(0..=i));
                }
                self.epoch_order = Some(order.clone());
                self.group_pos = 0;
                order
            }
        };
        let batches: Vec<Vec<usize>> = order
            .chunks(self.config.batch_size)
            .map(|c| c.to_vec())
            .collect();
        batches
            .chunks(self.config.grad_accum)
            .map(|g| g.to_vec())
            .collect()
    }

    /// Bucketed epochs (kohya's): each bucket's examples shuffled and cut into batches, the
    /// batches shuffled, then grouped for accumulation. The order comes from the seed and the
    /// epoch alone, so a resumed run rebuilds it exactly.
    pub(crate) fn bucket_plan(&self, buckets: &[usize]) -> Vec<Vec<Vec<usize>>> {
        use rand::SeedableRng;
        let salt = (self.epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(self.config.seed ^ salt);
        let n_buckets = buckets.iter().max().map_or(0, |m| m + 1);
        let mut batches: Vec<Vec<usize>> = Vec::new();
        for b in 0..n_buckets {
            let mut members: Vec<usize> = (0..buckets.len()).filter(|&i| buckets[i] == b).collect();
            for i in (1..members.len()).rev() {
                members.swap(i, rng.random_range(0..=i));
            }
            batches.extend(members.chunks(self.config.batch_size).map(|c| c.to_vec()));
        }
        for i in (1..batches.len()).rev() {
            batches.swap(i, rng.random_range(0..=i));
        }
        batches
            .chunks(self.config.grad_accum)
            .map(|g| g.to_vec())
            .collect()
    }

    /// Optimizer steps in one epoch of `objective` (bucketed: partial batches per bucket).
    pub fn steps_per_epoch(&self, objective: &dyn Objective) -> usize {
        match objective.buckets() {
            None => self.config.steps_per_epoch(objective.len()),
            Some(b) => {
                let n = b.iter().max().map_or(0, |m| m + 1);
                let batches: usize = (0..n)
                    .map(|k| {
                        b.iter()
                            .filter(|x| **x == k)
                            .count()
                            .div_ceil(self.config.batch_size)
                    })
                    .sum();
                batches.div_ceil(self.config.grad_accum.max(1))
            }
        }
    }

    /// Optimizer steps of the whole run on `objective` (`max_steps`, else epochs).
    pub fn total_steps(&self, objective: &dyn Objective) -> usize {
        self.config
            .max_steps
            .unwrap_or(self.config.epochs * self.steps_per_epoch(objective))
    }

    /// Forward and backward over each micro-batch of `group`, gradients averaged, clipped to
    /// `max_grad_norm`, one AdamW update at the scheduled rate; records and returns the step.
    pub(crate) fn optimizer_step(
        &mut self,
        objective: &dyn Objective,
        group: &[Vec<usize>],
        total: usize,
    ) -> Result<StepRecord> {
        let started = Instant::now();
        let lrs = self.config.group_lrs(self.step, self.epoch, total);
        let lr = lrs[0];
        let mut sum: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0;
        let scale = self.scaler.map_or(1.0, |s| s.scale);
        let mut rng = self.rng.clone();
        for batch in group {
            let loss = objective.loss(batch, &mut rng)?;
            let lv = loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                bail!(
                    "loss became {lv} at step {} (epoch {}): training stopped; try a lower learning rate (now {lr:.2e})",
                    self.step + 1,
                    self.epoch
                );
            }
            loss_sum += lv;
            let scaled = if scale == 1.0 { loss } else { (loss * scale)? };
            let g = grads_of(&scaled, &self.optimizer.vars)?;
            sum = Some(match sum {
                None => g,
                Some(s) => s
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        self.rng = rng;
        let k = group.len() as f64;
        // averaged over the micro-batches, and unscaled
        let mut grads: Vec<Tensor> = sum
            .context("empty step")?
            .iter()
            .map(|g| g / (k * scale))
            .collect::<candle_core::Result<_>>()?;
        let norm = global_norm(&grads)?;
        if let Some(scaler) = &mut self.scaler {
            let overflow = !norm.is_finite();
            scaler.update(overflow);
            if overflow {
                // the scale was too large: this step's update is skipped
                return Ok(self.record(started, lr, loss_sum / k, norm));
            }
        }
        if let Some(max) = self.config.max_grad_norm {
            if norm > max {
                let s = max / (norm + 1e-6);
                grads = grads
                    .iter()
                    .map(|g| g * s)
                    .collect::<candle_core::Result<_>>()?;
            }
        }
        self.optimizer.step_groups(&grads, &lrs)?;
        Ok(self.record(started, lr, loss_sum / k, norm))
    }

    /// Counts the step (applied, or skipped for an overflow) and records it.
    fn record(&mut self, started: Instant, lr: f64, loss: f64, grad_norm: f64) -> StepRecord {
        self.step += 1;
        self.group_pos += 1;
        let rec = StepRecord {
            step: self.step,
            epoch: self.epoch,
            loss,
            lr,
            grad_norm,
            seconds: started.elapsed().as_secs_f64(),
        };
        self.history.push(rec);
        rec
    }
}
