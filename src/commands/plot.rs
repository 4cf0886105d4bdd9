//! `sd-lora plot`: loss curves from run folders (`metrics.csv`).

use anyhow::{bail, Result};
use std::path::PathBuf;

use crate::plot::{loss_curve, loss_curves, LossRun};
use crate::train::read_metrics;

/// `sd-lora plot`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlotArgs {
    /// Run folders (or their metrics.csv): one draws loss with LR and epochs, several are
    /// overlaid, labelled by folder name.
    pub runs: Vec<PathBuf>,
    /// Output file, .svg or .png.
    #[arg(long)]
    pub out: PathBuf,
}

/// Draws and writes the figure; returns a one-line report.
pub fn plot_runs(a: &PlotArgs) -> Result<String> {
    let fig = match a.runs.as_slice() {
        [] => bail!("give at least one run folder (or metrics.csv)"),
        [one] => loss_curve(&read_metrics(one)?)?,
        many => {
            let runs = many
                .iter()
                .map(|r| {
                    let label = r
                        .file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_else(|| r.display().to_string());
                    Ok(LossRun::new(label, &read_metrics(r)?))
                })
                .collect::<Result<Vec<_>>>()?;
            loss_curves(&runs)?
        }
    };
    fig.save(&a.out)?;
    Ok(format!("wrote {}", a.out.display()))
}
