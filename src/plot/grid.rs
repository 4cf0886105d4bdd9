//! Labelled image grids (rows x columns with a label per row and column, an optional title)
//! and the LoRA strength strip. Raster output ([`Png`]); small images are scaled up by an
//! integer factor (nearest neighbour) so cells are at least 128 px and labels stay legible.

use anyhow::{bail, Context, Result};
use image::RgbImage;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{err, register_fonts, Png, FONT};

const PAD: u32 = 6;
const FONT_PX: f64 = 15.0;
const MAX_ROW_LABEL: u32 = 260;

fn text_width(s: &str) -> u32 {
    (FONT, FONT_PX)
        .into_font()
        .box_size(s)
        .map(|(w, _)| w)
        .unwrap_or((s.len() as f64 * FONT_PX * 0.6) as u32)
}

/// `s` cut with "..." to fit `max` pixels.
fn fit(s: &str, max: u32) -> String {
    if text_width(s) <= max {
        return s.to_string();
    }
    let mut chars: Vec<char> = s.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let t: String = chars.iter().collect::<String>() + "...";
        if text_width(&t) <= max {
            return t;
        }
    }
    String::new()
}

/// A grid: `rows[r][c]` is the image at row r, column c (all the same size). Labels may be
/// empty slices (no label band) or one per row / column. The tutorial's `show_samples` and
/// `show_comparison` (before/after rows).
#[doc(alias = "show_samples", alias = "show_comparison")]
pub fn labelled_grid(
    rows: &[Vec<RgbImage>],
    row_labels: &[String],
    col_labels: &[String],
    title: Option<&str>,
) -> Result<Png> {
    register_fonts()?;
    let first = rows
        .first()
        .and_then(|r| r.first())
        .ok_or_else(|| anyhow::anyhow!("no images for the grid"))?;
    let (iw, ih) = first.dimensions();
    let ncols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    if rows.iter().flatten().any(|i| i.dimensions() != (iw, ih)) {
        bail!("grid images must all have the same size ({iw}x{ih})");
    }
    if !row_labels.is_empty() && row_labels.len() != rows.len() {
        bail!("{} row labels for {} rows", row_labels.len(), rows.len());
    }
    if !col_labels.is_empty() && col_labels.len() != ncols {
        bail!("{} column labels for {ncols} columns", col_labels.len());
    }
    let k = 128u32.div_ceil(iw.min(ih).max(1)).max(1);
    let (cw, ch) = (iw * k, ih * k);
    let line = (FONT_PX * 1.5) as u32;
    let left = if row_labels.is_empty() {
        0
    } else {
        row_labels
            .iter()
            .map(|l| text_width(l).min(MAX_ROW_LABEL))
            .max()
            .unwrap_or(0)
            + 2 * PAD
    };
    let top_title = if title.is_some() { line + PAD } else { 0 };
    let top = top_title + if col_labels.is_empty() { 0 } else { line };
    let width = left + PAD + ncols as u32 * (cw + PAD);
    let height = top + PAD + rows.len() as u32 * (ch + PAD);
    let mut canvas = RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let big = image::imageops::resize(img, cw, ch, image::imageops::FilterType::Nearest);
            image::imageops::replace(
                &mut canvas,
                &big,
                (left + PAD + c as u32 * (cw + PAD)) as i64,
                (top + PAD + r as u32 * (ch + PAD)) as i64,
            );
        }
    }
    {
        let mut buf = canvas.as_raw().clone();
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        let style = |h: HPos, v: VPos| {
            (FONT, FONT_PX)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(h, v))
        };
        if let Some(t) = title {
            root.draw(&Text::new(
                fit(t, width - 2 * PAD),
                (width as i32 / 2, PAD as i32),
                style(HPos::Center, VPos::Top),
            ))
            .map_err(err)?;
        }
        for (c, l) in col_labels.iter().enumerate() {
            let x = left + PAD + c as u32 * (cw + PAD) + cw / 2;
            root.draw(&Text::new(
                fit(l, cw),
                (x as i32, (top + PAD / 2) as i32),
                style(HPos::Center, VPos::Bottom),
            ))
            .map_err(err)?;
        }
        for (r, l) in row_labels.iter().enumerate() {
            let y = top + PAD + r as u32 * (ch + PAD) + ch / 2;
            root.draw(&Text::new(
                fit(l, MAX_ROW_LABEL),
                ((left - PAD) as i32, y as i32),
                style(HPos::Right, VPos::Center),
            ))
            .map_err(err)?;
        }
        root.present().map_err(err)?;
        drop(root);
        canvas = RgbImage::from_raw(width, height, buf)
            .ok_or_else(|| anyhow::anyhow!("grid buffer has the wrong size"))?;
    }
    Png::from_image(&canvas)
}

/// The same seed at several LoRA strengths, left to right, labelled "strength s".
pub fn strength_strip(images: &[RgbImage], strengths: &[f64], title: Option<&str>) -> Result<Png> {
    if images.len() != strengths.len() {
        bail!("{} images for {} strengths", images.len(), strengths.len());
    }
    let labels: Vec<String> = strengths.iter().map(|s| format!("strength {s}")).collect();
    labelled_grid(&[images.to_vec()], &[], &labels, title)
}

/// Tiles equally sized images into `rows x cols` with a 4-pixel white gap (row-major).
/// [`labelled_grid`] adds row and column labels.
pub fn image_grid(images: &[&image::RgbImage], cols: usize) -> Result<image::RgbImage> {
    let first = images.first().context("no images for the grid")?;
    let (w, h) = first.dimensions();
    if images.iter().any(|i| i.dimensions() != (w, h)) {
        bail!("grid images must all have the same size");
    }
    let cols = cols.clamp(1, images.len());
    let rows = images.len().div_ceil(cols);
    let gap = 4u32;
    let mut grid = image::RgbImage::from_pixel(
        cols as u32 * (w + gap) - gap,
        rows as u32 * (h + gap) - gap,
        image::Rgb([255, 255, 255]),
    );
    for (i, img) in images.iter().enumerate() {
        let (r, c) = ((i / cols) as u32, (i % cols) as u32);
        image::imageops::replace(
            &mut grid,
            *img,
            (c * (w + gap)) as i64,
            (r * (h + gap)) as i64,
        );
    }
    Ok(grid)
}
