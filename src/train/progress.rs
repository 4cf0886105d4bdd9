//! The one progress reporter of every training run (`sd-lora train`, `demo`, `pretrain-tiny`):
//! on a terminal a bar redrawn in place with it/s, ETA, loss and LR; elsewhere (a log file, CI,
//! a notebook) plain lines every few steps with the mean loss since the last line.

use anyhow::Result;
use std::io::IsTerminal;
use std::time::Instant;

use super::hooks::StepHook;
use super::{StepRecord, Trainer};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// One line redrawn in place (`\r`), finished with a newline.
    Bar,
    /// A line every `every` steps and at the last one (`every` 0 = about 20 lines per run).
    Lines { every: usize },
}

impl ProgressMode {
    /// [`ProgressMode::Bar`] when stderr is a terminal, else lines.
    pub fn for_stderr() -> Self {
        if std::io::stderr().is_terminal() {
            Self::Bar
        } else {
            Self::Lines { every: 0 }
        }
    }
}

/// Prints what a [`Progress`] (or any log callback) emits to stderr: text starting with `\r`, or
/// a lone `\n`, as it is; anything else as a line.
pub fn to_stderr(text: &str) {
    if text.starts_with('\r') || text == "\n" {
        eprint!("{text}");
    } else {
        eprintln!("{text}");
    }
}

/// A [`StepHook`] that reports progress through `out` (see [`to_stderr`] for the protocol).
pub struct Progress<'a> {
    label: String,
    mode: ProgressMode,
    out: Box<dyn FnMut(&str) + 'a>,
    started: Instant,
    first: Option<usize>,
    window: Vec<f64>,
}

impl<'a> Progress<'a> {
    /// `label` prefixes every line (e.g. `"UNet "`).
    pub fn new(label: &str, mode: ProgressMode, out: impl FnMut(&str) + 'a) -> Self {
        Self {
            label: label.to_string(),
            mode,
            out: Box::new(out),
            started: Instant::now(),
            first: None,
            window: Vec::new(),
        }
    }

    /// To stderr, as a bar on a terminal and as lines elsewhere.
    pub fn stderr(label: &str) -> Self {
        Self::new(label, ProgressMode::for_stderr(), to_stderr)
    }
}

impl StepHook for Progress<'_> {
    fn after_step(&mut self, _: &Trainer, r: &StepRecord, total: usize) -> Result<()> {
        let first = *self.first.get_or_insert(r.step.saturating_sub(1));
        let rate = (r.step - first) as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let eta = total.saturating_sub(r.step) as f64 / rate.max(1e-9);
        self.window.push(r.loss);
        let text = match self.mode {
            ProgressMode::Bar => {
                let width = 30;
                let done = (width * r.step / total.max(1)).min(width);
                format!(
                    "\r{}[{}{}] step {}/{total} epoch {} loss {:.4} lr {:.2e} {:.2} it/s ETA {:.0} s   ",
                    self.label,
                    "#".repeat(done),
                    ".".repeat(width - done),
                    r.step,
                    r.epoch + 1,
                    r.loss,
                    r.lr,
                    rate,
                    eta
                )
            }
            ProgressMode::Lines { every } => {
                let every = if every == 0 {
                    total.div_ceil(20).max(1)
                } else {
                    every
                };
                if !(r.step.is_multiple_of(every) || r.step == total) {
                    return Ok(());
                }
                let mean = self.window.iter().sum::<f64>() / self.window.len() as f64;
                format!(
                    "{}step {}/{total} epoch {} loss {mean:.4} lr {:.2e} {:.2} it/s ETA {:.0} s",
                    self.label,
                    r.step,
                    r.epoch + 1,
                    r.lr,
                    rate,
                    eta
                )
            }
        };
        self.window.clear();
        (self.out)(&text);
        Ok(())
    }

    fn after_training(&mut self, _: &Trainer) -> Result<()> {
        if self.mode == ProgressMode::Bar && self.first.is_some() {
            (self.out)("\n");
        }
        Ok(())
    }
}
