//! Pictures that show inline in Jupyter (evcxr) and save to files: loss curves, run
//! comparisons, labelled image grids and LoRA anatomy, drawn with plotters.
//!
//! Every renderer returns a small owned value: a [`Figure`] (vector chart: `.svg()`, `.png()`,
//! `.save("x.svg" | "x.png")`, shown inline as SVG) or a [`Png`] (raster: image grids).
//! [`Svg`] and [`Png`] have an inherent `evcxr_display` (evcxr's protocol: `EVCXR_BEGIN_CONTENT
//! <mime>` ... `EVCXR_END_CONTENT`); no trait carries that name, which would break evcxr cells
//! that end in a plain integer. Text uses Noto Sans embedded in the binary (Apache-2.0, crate
//! `ttf-noto-sans`) through plotters' `ab_glyph` path, so no system font is needed.

pub mod anatomy;
pub mod bars;
pub mod grid;
pub mod images;
pub mod loss;

use anyhow::{bail, Context, Result};
use base64::Engine;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

pub use anatomy::{spectra_chart, LayerAnatomy, LoraAnatomy};
pub use bars::{bar_chart, run_comparison, RunStats};
pub use grid::{image_grid, labelled_grid, strength_strip};
pub use loss::{ema, loss_curve, loss_curves, LossRun, EMA_WEIGHT};

/// The font family every renderer uses (registered on first use).
pub const FONT: &str = "sans-serif";

/// Registers the embedded font for plotters (once per process).
pub(crate) fn register_fonts() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = DONE.get_or_init(|| {
        [FONT, "serif", "monospace"].iter().all(|family| {
            [FontStyle::Normal, FontStyle::Bold].iter().all(|style| {
                plotters::style::register_font(family, *style, ttf_noto_sans::REGULAR).is_ok()
            })
        })
    });
    if !ok {
        bail!("the embedded Noto Sans font could not be registered with plotters");
    }
    Ok(())
}

/// An SVG document.
#[derive(Debug, Clone, PartialEq)]
pub struct Svg(pub String);

impl Svg {
    /// What evcxr prints to show this inline (`image/svg+xml`).
    pub fn display_string(&self) -> String {
        format!(
            "EVCXR_BEGIN_CONTENT image/svg+xml\n{}\nEVCXR_END_CONTENT\n",
            self.0.trim_end()
        )
    }
    /// Shows the picture inline in an evcxr notebook cell.
    pub fn evcxr_display(&self) {
        print!("{}", self.display_string());
    }
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        write_file(path.as_ref(), self.0.as_bytes())
    }
}

/// A PNG image (encoded bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct Png {
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

impl Png {
    /// Encodes an RGB image.
    pub fn from_image(img: &image::RgbImage) -> Result<Self> {
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .context("encoding PNG")?;
        Ok(Self {
            bytes,
            width: img.width(),
            height: img.height(),
        })
    }
    /// Decodes the pixels again.
    pub fn to_image(&self) -> Result<image::RgbImage> {
        Ok(
            image::load_from_memory_with_format(&self.bytes, image::ImageFormat::Png)
                .context("decoding PNG")?
                .to_rgb8(),
        )
    }
    /// What evcxr prints to show this inline (`image/png`, base64).
    pub fn display_string(&self) -> String {
        format!(
            "EVCXR_BEGIN_CONTENT image/png\n{}\nEVCXR_END_CONTENT\n",
            base64::engine::general_purpose::STANDARD.encode(&self.bytes)
        )
    }
    /// Shows the picture inline in an evcxr notebook cell.
    pub fn evcxr_display(&self) {
        print!("{}", self.display_string());
    }
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        write_file(path.as_ref(), &self.bytes)
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// What a [`Figure`] draws (owned data, so a figure can live across notebook cells).
#[derive(Debug, Clone)]
pub(crate) enum Plot {
    Loss(loss::LossPlot),
    Bars(bars::BarsPlot),
    Heatmap(anatomy::HeatmapPlot),
    Spectra(anatomy::SpectraPlot),
}

/// A vector chart: shown inline as SVG; `.png()` rasterises it; `.save()` picks the format
/// from the file extension (`.svg` or `.png`).
#[derive(Debug, Clone)]
pub struct Figure {
    pub(crate) plot: Plot,
    pub width: u32,
    pub height: u32,
}

pub(crate) type PlotResult = Result<()>;

pub(crate) fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing failed: {e:?}")
}

impl Figure {
    pub(crate) fn new(plot: Plot, width: u32, height: u32) -> Self {
        Self {
            plot,
            width,
            height,
        }
    }

    /// Another size in pixels (default depends on the chart).
    pub fn with_size(mut self, width: u32, height: u32) -> Self {
        self.width = width.max(64);
        self.height = height.max(64);
        self
    }

    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> PlotResult
    where
        DB::ErrorType: 'static,
    {
        register_fonts()?;
        root.fill(&WHITE).map_err(err)?;
        match &self.plot {
            Plot::Loss(p) => p.draw(&root)?,
            Plot::Bars(p) => p.draw(&root)?,
            Plot::Heatmap(p) => p.draw(&root)?,
            Plot::Spectra(p) => p.draw(&root)?,
        }
        root.present().map_err(err)
    }

    pub fn svg(&self) -> Result<Svg> {
        let mut s = String::new();
        self.draw(SVGBackend::with_string(&mut s, (self.width, self.height)).into_drawing_area())?;
        Ok(Svg(s))
    }

    pub fn png(&self) -> Result<Png> {
        let mut buf = vec![255u8; (self.width * self.height * 3) as usize];
        self.draw(
            BitMapBackend::with_buffer(&mut buf, (self.width, self.height)).into_drawing_area(),
        )?;
        let img = image::RgbImage::from_raw(self.width, self.height, buf)
            .context("bitmap buffer has the wrong size")?;
        Png::from_image(&img)
    }

    /// Writes `path` as SVG or PNG, by its extension.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
        {
            Some(e) if e == "svg" => self.svg()?.save(path),
            Some(e) if e == "png" => self.png()?.save(path),
            _ => bail!(
                "{}: give the figure a .svg or .png file name",
                path.display()
            ),
        }
    }

    /// Shows the chart inline (SVG) in an evcxr notebook cell.
    pub fn evcxr_display(&self) {
        match self.svg() {
            Ok(s) => s.evcxr_display(),
            Err(e) => eprintln!("cannot draw the figure: {e:#}"),
        }
    }
}

/// A distinct colour per series (colour-blind-friendly Okabe-Ito order, then plotters' palette).
pub fn series_colour(i: usize) -> RGBColor {
    const OKABE_ITO: [(u8, u8, u8); 7] = [
        (0, 114, 178),
        (213, 94, 0),
        (0, 158, 115),
        (204, 121, 167),
        (230, 159, 0),
        (86, 180, 233),
        (0, 0, 0),
    ];
    match OKABE_ITO.get(i) {
        Some(&(r, g, b)) => RGBColor(r, g, b),
        None => {
            let c = Palette99::pick(i).to_rgba();
            RGBColor(c.0, c.1, c.2)
        }
    }
}

/// The legend box every line chart uses (upper right, translucent white).
pub(crate) fn legend<'a, DB, CT>(
    chart: &mut plotters::chart::ChartContext<'a, DB, CT>,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: plotters::coord::CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)
}

/// Axis range with 5% head-room, never empty.
pub(crate) fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        (lo, hi)
    } else {
        (0.0, 1.0)
    };
    let span = (hi - lo).abs().max(1e-12 * hi.abs().max(1.0)).max(1e-12);
    (lo - 0.05 * span)..(hi + 0.05 * span)
}
