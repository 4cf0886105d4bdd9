//! AdamW with inspectable state (for checkpoints), PyTorch's update rule: decoupled weight decay
//! `p -= lr·wd·p`, then `p -= lr · m̂ / (sqrt(v̂) + eps)` with bias-corrected moments.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

#[derive(Debug, Clone)]
pub struct AdamW {
    pub vars: Vec<(String, Var)>,
    /// Parameter group of each var (0 = UNet, 1 = text encoder): which learning rate it gets.
    pub groups: Vec<usize>,
    /// First and second moments, one pair per var.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Updates done so far.
    pub t: usize,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(
        vars: Vec<(String, Var)>,
        betas: (f64, f64),
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        if vars.is_empty() {
            bail!("nothing to train: no trainable tensors (inject LoRA first)");
        }
        let m = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            groups: vec![0; vars.len()],
            vars,
            m,
            v,
            t: 0,
            betas,
            eps,
            weight_decay,
        })
    }

    /// One update with `grads[i]` for `vars[i]` at learning rate `lr` (every group).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let n = self.groups.iter().max().map_or(1, |g| g + 1);
        self.step_groups(grads, &vec![lr; n])
    }

    /// One update, var `i` at rate `lrs[groups[i]]`.
    pub fn step_groups(&mut self, grads: &[Tensor], lrs: &[f64]) -> Result<()> {
        if let Some(g) = self.groups.iter().find(|g| **g >= lrs.len()) {
            bail!(
                "no learning rate for parameter group {g} ({} given)",
                lrs.len()
            );
        }
        if grads.len() != self.vars.len() {
            bail!(
                "{} gradients for {} parameters",
                grads.len(),
                self.vars.len()
            );
        }
        self.t += 1;
        let (b1, b2) = self.betas;
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, g) in grads.iter().enumerate() {
            let lr = lrs[self.groups[i]];
            let p = &self.vars[i].1;
            // detached: gradients of a graph with trainable inputs are themselves tracked, and
            // moments built from them would keep every step's graph (all activations) alive
            let g = &g.detach();
            let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let decayed = (p.as_tensor().detach() * (1.0 - lr * self.weight_decay))?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            p.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}
