//! How generated images show themselves: inline in a notebook, or as one PNG row.

use anyhow::Result;

use super::{labelled_grid, Png};
use crate::pipeline::Images;

impl Images {
    /// The images side by side in one row (small images scaled up, see
    /// [`super::labelled_grid`]).
    pub fn to_png(&self) -> Result<Png> {
        labelled_grid(std::slice::from_ref(&self.images), &[], &[], None)
    }

    /// Inline display in evcxr notebooks (a PNG row of the images).
    pub fn evcxr_display(&self) {
        match self.to_png() {
            Ok(p) => p.evcxr_display(),
            Err(e) => println!("{e:#}"),
        }
    }
}
