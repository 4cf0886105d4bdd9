//! `metrics.csv` of a run folder: one line per optimizer step
//! (`step,epoch,loss,lr,grad_norm,seconds`), written by the [`MetricsCsv`] hook and read back
//! by [`read_metrics`] (for `sd-lora plot`).

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::hooks::StepHook;
use super::{StepRecord, Trainer};

const HEADER: &str = "step,epoch,loss,lr,grad_norm,seconds";

fn line(r: &StepRecord) -> String {
    format!(
        "{},{},{},{},{},{}",
        r.step, r.epoch, r.loss, r.lr, r.grad_norm, r.seconds
    )
}

/// Appends every step to a CSV file, flushed per line, so that a killed run keeps its metrics.
pub struct MetricsCsv {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsCsv {
    /// (Re)writes `path` with the header and `history` (a resumed run keeps its earlier steps).
    pub fn create(path: impl Into<PathBuf>, history: &[StepRecord]) -> Result<Self> {
        let path = path.into();
        let mut file = std::fs::File::create(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut text = format!("{HEADER}\n");
        for r in history {
            text += &line(r);
            text.push('\n');
        }
        file.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { path, file })
    }
}

impl StepHook for MetricsCsv {
    fn after_step(&mut self, _: &Trainer, rec: &StepRecord, _: usize) -> Result<()> {
        writeln!(self.file, "{}", line(rec))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Reads a run folder's `metrics.csv` (or the file itself) back into step records.
pub fn read_metrics(run: &Path) -> Result<Vec<StepRecord>> {
    let path = if run.is_dir() {
        run.join("metrics.csv")
    } else {
        run.to_path_buf()
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    if header.trim() != HEADER {
        bail!(
            "{}: expected the header `{HEADER}`, got `{header}`",
            path.display()
        );
    }
    let mut out = Vec::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let bad = || format!("{} line {}: `{line}`", path.display(), i + 2);
        if f.len() != 6 {
            bail!("{}: expected 6 fields", bad());
        }
        let num = |k: usize| f[k].trim().parse::<f64>().with_context(bad);
        out.push(StepRecord {
            step: f[0].trim().parse().with_context(bad)?,
            epoch: f[1].trim().parse().with_context(bad)?,
            loss: num(2)?,
            lr: num(3)?,
            grad_norm: num(4)?,
            seconds: num(5)?,
        });
    }
    if out.is_empty() {
        bail!("{} has no training steps", path.display());
    }
    Ok(out)
}
