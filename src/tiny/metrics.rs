//! Automatic checks of generated scenes.
//!
//! **Colour match**: the background colour is the median of the border pixels; foreground
//! pixels differ from it by more than 60 (sum of absolute channel differences) and are
//! saturated (HSV saturation > 0.4: not background, shadow or outline); the mean
//! foreground colour's hue picks the nearest named colour of [`super::scenes::COLOURS`]. No
//! decision (None) when fewer than 1% of the pixels are foreground.
//!
//! **Style score** (0 = photographic, ~1 = anime look), the mean of two parts:
//! - *outline*: the fraction of dark pixels (luminance < 0.2), divided by 0.1 and capped at 1
//!   (the anime look's thick dark outlines cover ~10% of a picture; the base look has none);
//! - *flatness*: the share of the picture covered by its 4 most common colours, quantised to 16
//!   levels per channel (a cel-shaded picture has ~4 colours: background, fill, shadow,
//!   outline; shading, light gradients and texture spread a photo over many).

use image::RgbImage;

use super::scenes::COLOURS;

fn hue(c: [f32; 3]) -> f32 {
    let (r, g, b) = (c[0], c[1], c[2]);
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    if d <= 1e-6 {
        return 0.0;
    }
    let h = if max == r {
        ((g - b) / d).rem_euclid(6.0)
    } else if max == g {
        (b - r) / d + 2.0
    } else {
        (r - g) / d + 4.0
    };
    h * 60.0
}

/// Index into [`COLOURS`] of the image's foreground colour.
pub fn dominant_colour(img: &RgbImage) -> Option<usize> {
    let (w, h) = img.dimensions();
    let mut border: Vec<[u8; 3]> = Vec::new();
    for x in 0..w {
        border.push(img.get_pixel(x, 0).0);
        border.push(img.get_pixel(x, h - 1).0);
    }
    for y in 0..h {
        border.push(img.get_pixel(0, y).0);
        border.push(img.get_pixel(w - 1, y).0);
    }
    let med = |k: usize| {
        let mut v: Vec<u8> = border.iter().map(|p| p[k]).collect();
        v.sort();
        v[v.len() / 2] as i32
    };
    let bg = [med(0), med(1), med(2)];
    let mut sum = [0f64; 3];
    let mut n = 0usize;
    for p in img.pixels() {
        let d: i32 = (0..3).map(|k| (p.0[k] as i32 - bg[k]).abs()).sum();
        let (mx, mn) = (
            *p.0.iter().max().unwrap_or(&0) as f32,
            *p.0.iter().min().unwrap_or(&0) as f32,
        );
        let saturation = if mx > 0.0 { (mx - mn) / mx } else { 0.0 };
        if d > 60 && saturation > 0.4 {
            for (acc, v) in sum.iter_mut().zip(p.0) {
                *acc += v as f64;
            }
            n += 1;
        }
    }
    if n < (w * h / 100) as usize {
        return None;
    }
    let mean = sum.map(|s| (s / n as f64) as f32);
    let h0 = hue(mean);
    COLOURS
        .iter()
        .enumerate()
        .map(|(i, (_, c))| {
            let d = (hue(c.map(|v| v as f32)) - h0).abs();
            (i, d.min(360.0 - d))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

/// The two parts of the style score and their mean.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StyleScore {
    pub outline: f64,
    pub flatness: f64,
    pub score: f64,
}

pub fn style_score(img: &RgbImage) -> StyleScore {
    let (w, h) = img.dimensions();
    let n = (w * h) as f64;
    let dark = img
        .pixels()
        .filter(|p| {
            let [r, g, b] = p.0.map(|v| v as f64 / 255.0);
            0.2126 * r + 0.7152 * g + 0.0722 * b < 0.2
        })
        .count() as f64;
    // palette: share of the 4 most common colours, quantised to 16 levels per channel
    let mut bins = std::collections::HashMap::new();
    for p in img.pixels() {
        *bins.entry(p.0.map(|v| v / 16)).or_insert(0usize) += 1;
    }
    let mut counts: Vec<usize> = bins.into_values().collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let top4: usize = counts.iter().take(4).sum();
    let outline = (dark / n / 0.1).min(1.0);
    let flatness = top4 as f64 / n;
    StyleScore {
        outline,
        flatness,
        score: 0.5 * (outline + flatness),
    }
}

/// Mean style score of several images.
pub fn mean_style_score(imgs: &[RgbImage]) -> StyleScore {
    mean_of(&imgs.iter().map(style_score).collect::<Vec<_>>())
}

/// Mean of per-image style scores.
pub fn mean_of(s: &[StyleScore]) -> StyleScore {
    let m = |f: fn(&StyleScore) -> f64| s.iter().map(f).sum::<f64>() / s.len().max(1) as f64;
    StyleScore {
        outline: m(|s| s.outline),
        flatness: m(|s| s.flatness),
        score: m(|s| s.score),
    }
}
