//! `sd-lora make-data`: synthetic captioned scenes (PNG + `.txt` sidecar) in the base or anime
//! look, the data of the tiny model and of the demo.

use anyhow::Result;
use std::path::PathBuf;

use super::args::count;
use crate::tiny::scenes::{write_dataset, Look};

/// `sd-lora make-data`.
#[derive(Debug, Clone, clap::Args)]
pub struct MakeDataArgs {
    /// The look of the images.
    #[arg(long, value_enum)]
    pub style: Look,
    /// Number of images.
    #[arg(long, default_value_t = 60, value_parser = count)]
    pub count: usize,
    /// Seed of the scenes (shapes, colours, positions).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes the images and captions; returns a one-line report.
pub fn make_data(a: &MakeDataArgs) -> Result<String> {
    let paths = write_dataset(&a.out, a.style, a.count, a.seed)?;
    Ok(format!(
        "wrote {} images with captions to {}",
        paths.len(),
        a.out.display()
    ))
}
