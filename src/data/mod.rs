//! Image-folder datasets: png / jpg / jpeg / webp files (optionally in sub-folders), captions
//! (none, one fixed text, or kohya-style `<image>.txt` sidecars with a fallback), resized and
//! cropped to the training resolution or to their aspect-ratio bucket ([`buckets`]),
//! optionally flipped, as tensors in [-1, 1].

pub mod buckets;
pub mod kohya;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use std::path::{Path, PathBuf};

/// Where captions come from.
#[derive(Debug, Clone, PartialEq)]
pub enum CaptionSource {
    /// The empty prompt for every image (the tutorial).
    Empty,
    /// One text for every image (e.g. a trigger word).
    Fixed(String),
    /// `<image stem>.txt` beside each image; images without one get `fallback`.
    Sidecar { fallback: String },
}

impl CaptionSource {
    /// `empty`, `sidecar` (fallback: empty), `sidecar:<fallback text>`, or any other text =
    /// that fixed caption.
    pub fn parse(s: &str) -> Self {
        match s {
            "empty" | "" => Self::Empty,
            "sidecar" => Self::Sidecar {
                fallback: String::new(),
            },
            other => match other.strip_prefix("sidecar:") {
                Some(fallback) => Self::Sidecar {
                    fallback: fallback.to_string(),
                },
                None => Self::Fixed(other.to_string()),
            },
        }
    }
}

/// How a dataset is read. `Default`: 512 px square, centre crop, flips on, empty captions.
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// Output width and height in pixels (multiples of 8 for SD). Default 512 x 512.
    pub width: usize,
    pub height: usize,
    /// Horizontal flip with p = 0.5 at training time. Default true.
    pub flip: bool,
    pub captions: CaptionSource,
    /// Look into sub-folders. Default false.
    pub recursive: bool,
    /// Skip unreadable files with a warning instead of failing. Default false.
    pub skip_bad_images: bool,
    /// Aspect-ratio buckets (kohya's `--enable_bucket`): each image goes to the bucket of its
    /// aspect ratio (area <= width x height; the config's `resolution` is replaced by these),
    /// resized to cover it and centre-cropped by less than one step. Default None (every image
    /// centre-cropped to width x height).
    pub buckets: Option<buckets::BucketConfig>,
    /// Extension of caption sidecars (kohya's `--caption_extension`). Default `.txt`.
    pub caption_extension: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            width: 512,
            height: 512,
            flip: true,
            captions: CaptionSource::Empty,
            recursive: false,
            skip_bad_images: false,
            buckets: None,
            caption_extension: ".txt".into(),
        }
    }
}

/// One training example: the image at the training resolution and its caption.
#[derive(Debug, Clone)]
pub struct Example {
    pub path: PathBuf,
    /// `[3, H, W]` in [-1, 1], f32, unflipped.
    pub pixels: Tensor,
    pub caption: String,
    /// The file's size (width, height) before resizing (SDXL's `original_size`).
    pub original_size: (usize, usize),
    /// (left, top) of the crop in the resized image (SDXL's `crop_coords_top_left`).
    pub crop_top_left: (usize, usize),
    /// Times per epoch (kohya's `<repeats>_<name>` folders). 1 elsewhere.
    pub repeats: usize,
    /// The dataset folder's name (kohya's `10_mychar`, else the image folder's).
    pub dataset_dir: String,
}

/// A loaded image folder (the tutorial's `DanbooruDataset`, for any folder of images).
#[doc(alias = "DanbooruDataset")]
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub examples: Vec<Example>,
    /// Warnings (skipped files, upscaled images), for the caller to show.
    pub warnings: Vec<String>,
}

const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|x| x.to_str())
        .is_some_and(|x| EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
}

/// The images (png, jpg, jpeg, webp) directly in `dir`, sorted by path.
pub fn image_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    list_images(dir, false, &mut out)?;
    out.sort();
    Ok(out)
}

fn list_images(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read image folder {}", dir.display()))?;
    for e in entries {
        let p = e
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if p.is_dir() {
            if recursive {
                list_images(&p, recursive, out)?;
            }
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Resizes so the image covers `w x h` (keeping aspect), then crops to exactly `w x h`:
/// centred, or at `offset` in [0, 1]^2 of the slack for random crops.
pub fn resize_and_crop(
    img: &image::RgbImage,
    w: u32,
    h: u32,
    offset: (f64, f64),
) -> image::RgbImage {
    let (iw, ih) = img.dimensions();
    let scale = (w as f64 / iw as f64).max(h as f64 / ih as f64);
    let (rw, rh) = (
        ((iw as f64 * scale).round() as u32).max(w),
        ((ih as f64 * scale).round() as u32).max(h),
    );
    let resized = if (rw, rh) == (iw, ih) {
        img.clone()
    } else {
        image::imageops::resize(img, rw, rh, FilterType::Lanczos3)
    };
    let x = ((rw - w) as f64 * offset.0).round() as u32;
    let y = ((rh - h) as f64 * offset.1).round() as u32;
    image::imageops::crop_imm(&resized, x, y, w, h).to_image()
}

/// `[3, H, W]` in [-1, 1].
pub fn image_to_tensor(img: &image::RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let v: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&b| b as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(v, (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .contiguous()?)
}

/// The inverse of [`image_to_tensor`]: `[3, H, W]` in [-1, 1] (values outside are clipped) to
/// an 8-bit image.
pub fn tensor_to_image(t: &Tensor) -> Result<image::RgbImage> {
    let (c, h, w) = t
        .dims3()
        .with_context(|| format!("an image tensor is [3, H, W], got {:?}", t.dims()))?;
    if c != 3 {
        bail!("an image tensor has 3 channels, got {c}");
    }
    let v: Vec<u8> = ((t.to_dtype(candle_core::DType::F32)?.clamp(-1.0, 1.0)? + 1.0)? * 127.5)?
        .round()?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|x| x as u8)
        .collect();
    image::RgbImage::from_raw(w as u32, h as u32, v).context("image buffer size")
}

/// The caption of `path`, and whether a sidecar was expected but missing.
fn read_caption(path: &Path, source: &CaptionSource, ext: &str) -> Result<(String, bool)> {
    Ok(match source {
        CaptionSource::Empty => (String::new(), false),
        CaptionSource::Fixed(t) => (t.clone(), false),
        CaptionSource::Sidecar { fallback } => {
            let txt = path.with_extension(ext.trim_start_matches('.'));
            if txt.is_file() {
                let bytes = std::fs::read(&txt)
                    .with_context(|| format!("cannot read caption {}", txt.display()))?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| anyhow::anyhow!("caption {} is not UTF-8 text", txt.display()))?;
                (text.trim().to_string(), false)
            } else {
                (fallback.clone(), true)
            }
        }
    })
}

impl ImageFolder {
    /// Reads every image of `dir` (sorted by path), converted to RGB and centre-cropped at the
    /// configured size. Flips are applied per step by the trainer.
    pub fn load(dir: impl AsRef<Path>, cfg: &DataConfig) -> Result<Self> {
        Self::load_first(dir, cfg, None)
    }

    /// [`Self::load`] reading only the first `max` images (in path order) when given, e.g.
    /// DreamBooth's `num_class_images` of a larger class folder.
    pub fn load_first(dir: impl AsRef<Path>, cfg: &DataConfig, max: Option<usize>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            bail!("image folder {} does not exist", dir.display());
        }
        if cfg.width == 0 || cfg.height == 0 {
            bail!(
                "training resolution must be positive, got {}x{}",
                cfg.width,
                cfg.height
            );
        }
        // (image, repeats, dataset folder name, caption of images without one)
        let mut paths: Vec<(PathBuf, usize, String, Option<String>)> = Vec::new();
        let mut layout_warnings = Vec::new();
        match kohya::repeats_layout(dir)? {
            Some((folders, ignored)) => {
                for f in folders {
                    let mut imgs = Vec::new();
                    list_images(&f.path, cfg.recursive, &mut imgs)?;
                    imgs.sort();
                    if imgs.is_empty() {
                        layout_warnings.push(format!("{} has no images", f.path.display()));
                    }
                    paths.extend(
                        imgs.into_iter().map(|p| {
                            (p, f.repeats, f.dir_name.clone(), Some(f.class_text.clone()))
                        }),
                    );
                }
                if !ignored.is_empty() {
                    layout_warnings.push(format!(
                        "ignored {} folder(s) not named <repeats>_<name>: {}",
                        ignored.len(),
                        ignored.join(", ")
                    ));
                }
                let mut loose = 0;
                for e in std::fs::read_dir(dir)
                    .with_context(|| format!("cannot list {}", dir.display()))?
                {
                    let p = e
                        .with_context(|| format!("cannot list {}", dir.display()))?
                        .path();
                    loose += (p.is_file() && is_image(&p)) as usize;
                }
                if loose > 0 {
                    layout_warnings.push(format!(
                        "ignored {loose} image(s) directly in {} (kohya's layout reads <repeats>_<name> folders only)",
                        dir.display()
                    ));
                }
            }
            None => {
                let mut imgs = Vec::new();
                list_images(dir, cfg.recursive, &mut imgs)?;
                imgs.sort();
                let name = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                paths.extend(imgs.into_iter().map(|p| (p, 1, name.clone(), None)));
            }
        }
        if let Some(n) = max {
            paths.truncate(n);
        }
        if paths.is_empty() {
            bail!(
                "no images ({}) in {}{}",
                EXTENSIONS.join(", "),
                dir.display(),
                if cfg.recursive {
                    ""
                } else {
                    " (sub-folders are skipped unless recursive)"
                }
            );
        }
        let bucketing = match &cfg.buckets {
            Some(b) => {
                let bc = buckets::BucketConfig {
                    resolution: (cfg.width, cfg.height),
                    ..*b
                };
                bc.validate()?;
                let list = bc.buckets();
                if !bc.no_upscale && list.is_empty() {
                    bail!(
                        "no bucket fits {}x{} between {} and {} px (lower --min-bucket-reso)",
                        cfg.width,
                        cfg.height,
                        bc.min_reso,
                        bc.max_reso
                    );
                }
                Some((bc, list))
            }
            None => None,
        };
        let mut too_small: Vec<String> = Vec::new();
        let mut examples = Vec::new();
        let mut warnings = layout_warnings;
        let mut skipped = 0;
        let mut no_sidecar: Vec<PathBuf> = Vec::new();
        // caption files a fixed caption (an instance prompt) leaves unread
        let mut unused_sidecars: Vec<PathBuf> = Vec::new();
        for (p, repeats, dataset_dir, class_text) in paths {
            let img = match image::open(&p) {
                Ok(i) => i,
                Err(e) if cfg.skip_bad_images => {
                    warnings.push(format!("skipped {}: {e}", p.display()));
                    skipped += 1;
                    continue;
                }
                Err(e) => bail!(
                    "cannot read image {}: {e} (--skip-bad-images / DataConfig::skip_bad_images skips such files)",
                    p.display()
                ),
            };
            // grayscale, RGBA, 16-bit and CMYK-decoded JPEGs all end up as 8-bit RGB
            let rgb = img.to_rgb8();
            let (iw, ih) = rgb.dimensions();
            if bucketing.is_none() && ((iw as usize) < cfg.width || (ih as usize) < cfg.height) {
                warnings.push(format!(
                    "{} is {iw}x{ih}, upscaled to cover {}x{}",
                    p.display(),
                    cfg.width,
                    cfg.height
                ));
            }
            let (cropped, crop) = match &bucketing {
                Some((bc, list)) => {
                    let ch = bc.select((iw as usize, ih as usize), list);
                    if ch.bucket.0 == 0 || ch.bucket.1 == 0 {
                        if cfg.skip_bad_images {
                            too_small.push(p.display().to_string());
                            continue;
                        }
                        bail!(
                            "{} is {iw}x{ih}: smaller than the bucket step {} (--skip-bad-images skips such images)",
                            p.display(),
                            bc.steps
                        );
                    }
                    let (rw, rh) = (ch.resized.0 as u32, ch.resized.1 as u32);
                    let resized = if (rw, rh) == (iw, ih) {
                        rgb.clone()
                    } else {
                        image::imageops::resize(&rgb, rw, rh, FilterType::Lanczos3)
                    };
                    let (x, y) = ch.centre_crop();
                    let (bw, bh) = (ch.bucket.0 as u32, ch.bucket.1 as u32);
                    let img = image::imageops::crop_imm(&resized, x as u32, y as u32, bw, bh);
                    (img.to_image(), (x, y))
                }
                None => {
                    let (w, h) = (cfg.width as u32, cfg.height as u32);
                    let scale = (w as f64 / iw as f64).max(h as f64 / ih as f64);
                    let rw = ((iw as f64 * scale).round() as u32).max(w);
                    let rh = ((ih as f64 * scale).round() as u32).max(h);
                    let crop = (
                        ((rw - w) as f64 * 0.5).round() as usize,
                        ((rh - h) as f64 * 0.5).round() as usize,
                    );
                    (resize_and_crop(&rgb, w, h, (0.5, 0.5)), crop)
                }
            };
            // kohya's folders caption with their name text where nothing else is given
            let source = match (&cfg.captions, &class_text) {
                (CaptionSource::Empty, Some(t)) => CaptionSource::Fixed(t.clone()),
                (CaptionSource::Sidecar { fallback }, Some(t)) if fallback.is_empty() => {
                    CaptionSource::Sidecar {
                        fallback: t.clone(),
                    }
                }
                (c, _) => c.clone(),
            };
            let (caption, missing) = read_caption(&p, &source, &cfg.caption_extension)?;
            let sidecar = p.with_extension(cfg.caption_extension.trim_start_matches('.'));
            if missing && class_text.is_none() {
                no_sidecar.push(sidecar);
            } else if matches!(cfg.captions, CaptionSource::Fixed(_)) && sidecar.is_file() {
                unused_sidecars.push(sidecar);
            }
            examples.push(Example {
                caption,
                pixels: image_to_tensor(&cropped, &Device::Cpu)?,
                path: p,
                original_size: (iw as usize, ih as usize),
                crop_top_left: crop,
                repeats,
                dataset_dir,
            });
        }
        if skipped > 0 {
            warnings.push(format!("skipped {skipped} unreadable file(s)"));
        }
        if let Some(first) = too_small.first() {
            warnings.push(format!(
                "skipped {} image(s) smaller than the bucket step (first: {first})",
                too_small.len()
            ));
        }
        if let (Some(first), CaptionSource::Sidecar { fallback }) =
            (no_sidecar.first(), &cfg.captions)
        {
            warnings.push(format!(
                "{} of {} images have no caption sidecar (first: {}); they use the fallback caption {fallback:?}",
                no_sidecar.len(),
                examples.len(),
                first.display()
            ));
        }
        if let (Some(first), CaptionSource::Fixed(text)) = (unused_sidecars.first(), &cfg.captions)
        {
            warnings.push(format!(
                "{} caption file(s) are not used (first: {}): every image is captioned {text:?}",
                unused_sidecars.len(),
                first.display()
            ));
        }
        if examples.is_empty() {
            bail!(
                "every image in {} was unreadable ({skipped} skipped)",
                dir.display()
            );
        }
        Ok(Self {
            root: dir.to_path_buf(),
            examples,
            warnings,
        })
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Training items per epoch: every image times its folder's repeats.
    pub fn items(&self) -> usize {
        self.examples.iter().map(|e| e.repeats).sum()
    }

    /// kohya's `ss_dataset_dirs`: per dataset folder, its repeats and image count.
    pub fn dataset_dirs(&self) -> std::collections::BTreeMap<String, (usize, usize)> {
        let mut d = std::collections::BTreeMap::new();
        for e in &self.examples {
            d.entry(e.dataset_dir.clone()).or_insert((e.repeats, 0)).1 += 1;
        }
        d
    }

    /// kohya's `ss_tag_frequency`: per dataset folder, the tags of its captions and counts.
    pub fn tag_frequency(
        &self,
    ) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, usize>> {
        let mut out = std::collections::BTreeMap::new();
        for (dir, _) in self.dataset_dirs() {
            let caps = self
                .examples
                .iter()
                .filter(|e| e.dataset_dir == dir)
                .map(|e| e.caption.as_str());
            out.insert(dir.clone(), kohya::tag_frequency(caps));
        }
        out
    }

    /// Images per (width, height) after resizing and cropping: the bucket histogram.
    pub fn bucket_histogram(&self) -> std::collections::BTreeMap<(usize, usize), usize> {
        let mut h = std::collections::BTreeMap::new();
        for e in &self.examples {
            let d = e.pixels.dims();
            *h.entry((d[2], d[1])).or_insert(0) += 1;
        }
        h
    }
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
}
