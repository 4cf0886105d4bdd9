//! Synthetic captioned scenes for the embedded tiny model: a shape (circle, square, triangle,
//! diamond) in a colour (red, green, blue, yellow, purple, orange), small or large, on a
//! background (cream, sky, sand, mint, grey), rendered at 64 x 64 in two looks from the same
//! scene description:
//! - **base** ("photographic"): a lit background gradient with soft value-noise texture, a
//!   shaded shape (highlight towards the upper left), soft anti-aliased edges, a blurred drop
//!   shadow;
//! - **anime**: flat fills from a small palette, one hard cel-shadow tone, a thick dark outline.
//!
//! Everything is a pure function of the seed.

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Image side in pixels.
pub const SIZE: u32 = 64;

pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "diamond"];

/// Shape colours (names used in captions and by the colour check).
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [215, 45, 40]),
    ("green", [50, 170, 60]),
    ("blue", [45, 95, 215]),
    ("yellow", [240, 205, 40]),
    ("purple", [150, 75, 195]),
    ("orange", [240, 130, 30]),
];

pub const BACKGROUNDS: [(&str, [u8; 3]); 5] = [
    ("cream", [238, 228, 205]),
    ("sky", [170, 205, 235]),
    ("sand", [215, 195, 150]),
    ("mint", [190, 225, 200]),
    ("grey", [190, 190, 190]),
];

/// The two renderings of a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Look {
    /// Soft, photographic shading (what the tiny model was pre-trained on).
    #[value(alias = "photo")]
    Base,
    /// Flat cel shading with dark outlines (the demo's target style).
    Anime,
}

impl std::str::FromStr for Look {
    type Err = anyhow::Error;
    /// `base` (or `photo`) and `anime`.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        <Self as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| anyhow::anyhow!("unknown style `{s}` (base or anime)"))
    }
}

/// What a picture shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scene {
    pub shape: usize,
    pub colour: usize,
    pub background: usize,
    pub large: bool,
    /// Centre in pixels.
    pub cx: f32,
    pub cy: f32,
    /// Circumradius in pixels.
    pub radius: f32,
    /// Seeds the texture noise.
    pub texture: u64,
}

impl Scene {
    pub fn random<R: Rng>(rng: &mut R) -> Self {
        let large = rng.random_bool(0.5);
        let radius = if large {
            rng.random_range(17.0..21.0)
        } else {
            rng.random_range(10.0..13.0)
        };
        let m = radius + 4.0;
        Self {
            shape: rng.random_range(0..SHAPES.len()),
            colour: rng.random_range(0..COLOURS.len()),
            background: rng.random_range(0..BACKGROUNDS.len()),
            large,
            cx: rng.random_range(m..SIZE as f32 - m),
            cy: rng.random_range(m..SIZE as f32 - m),
            radius,
            texture: rng.random(),
        }
    }

    /// E.g. "a large red circle on a sky background".
    pub fn caption(&self) -> String {
        format!(
            "a {} {} {} on a {} background",
            if self.large { "large" } else { "small" },
            COLOURS[self.colour].0,
            SHAPES[self.shape],
            BACKGROUNDS[self.background].0
        )
    }

    /// Signed distance (pixels, < 0 inside) from `(x, y)` to the shape's outline (exact for
    /// circles, a close bound for the polygons).
    pub fn distance(&self, x: f32, y: f32) -> f32 {
        let (dx, dy, r) = (x - self.cx, y - self.cy, self.radius);
        match SHAPES[self.shape] {
            "circle" => (dx * dx + dy * dy).sqrt() - r * 0.9,
            "square" => dx.abs().max(dy.abs()) - r * 0.75,
            "triangle" => {
                let dy = dy - r * 0.15;
                (dy - r * 0.5)
                    .max(-0.866 * dx - 0.5 * dy - r * 0.5)
                    .max(0.866 * dx - 0.5 * dy - r * 0.5)
            }
            _ => (dx.abs() + dy.abs()) * std::f32::consts::FRAC_1_SQRT_2 - r * 0.72,
        }
    }

    pub fn render(&self, look: Look) -> RgbImage {
        match look {
            Look::Base => self.render_base(),
            Look::Anime => self.render_anime(),
        }
    }

    fn render_base(&self) -> RgbImage {
        let bg = BACKGROUNDS[self.background].1.map(|c| c as f32);
        let fg = COLOURS[self.colour].1.map(|c| c as f32);
        let noise = ValueNoise::new(self.texture);
        RgbImage::from_fn(SIZE, SIZE, |x, y| {
            let (xf, yf) = (x as f32 + 0.5, y as f32 + 0.5);
            // background: lit from the top, soft texture
            let light = 1.12 - 0.3 * yf / SIZE as f32;
            let tex =
                1.0 + 0.09 * noise.at(xf / 9.0, yf / 9.0) + 0.03 * noise.at(xf / 2.5, yf / 2.5);
            // blurred drop shadow, offset down-right
            let sd = self.distance(xf - 3.0, yf - 4.0);
            let shadow = 1.0 - 0.3 * smoothstep(4.0, -3.0, sd);
            let mut c = bg.map(|b| b * light * tex * shadow);
            // shaded shape: highlight towards the upper left
            let d = self.distance(xf, yf);
            let inside = smoothstep(1.2, -1.2, d);
            if inside > 0.0 {
                let (hx, hy) = (self.cx - 0.4 * self.radius, self.cy - 0.45 * self.radius);
                let t =
                    (((xf - hx).powi(2) + (yf - hy).powi(2)).sqrt() / (1.8 * self.radius)).min(1.0);
                let shade = 1.25 - 0.55 * t;
                let grain = 1.0 + 0.03 * noise.at(xf / 3.0 + 50.0, yf / 3.0);
                for (ci, f) in c.iter_mut().zip(fg) {
                    let s = (f * shade * grain + 35.0 * (1.0 - t).powi(4)).min(255.0);
                    *ci = *ci * (1.0 - inside) + s * inside;
                }
            }
            Rgb(c.map(|v| v.clamp(0.0, 255.0).round() as u8))
        })
    }

    fn render_anime(&self) -> RgbImage {
        let bg = BACKGROUNDS[self.background].1;
        let fg = COLOURS[self.colour].1;
        // small palette: saturated fill, one darker cel tone, near-black outline
        let boost =
            |c: [u8; 3]| c.map(|v| ((v as f32 - 128.0) * 1.2 + 128.0).clamp(0.0, 255.0) as u8);
        let fill = boost(fg);
        let cel = fill.map(|v| (v as f32 * 0.7) as u8);
        let outline = [28u8, 22, 38];
        let flat_bg = bg.map(|v| ((v as f32 * 1.04).min(255.0)) as u8);
        RgbImage::from_fn(SIZE, SIZE, |x, y| {
            let (xf, yf) = (x as f32 + 0.5, y as f32 + 0.5);
            let d = self.distance(xf, yf);
            if d.abs() <= 1.6 {
                Rgb(outline)
            } else if d < 0.0 {
                // hard cel shadow on the lower right
                let side = (xf - self.cx) * 0.6 + (yf - self.cy) * 0.8;
                Rgb(if side > self.radius * 0.35 { cel } else { fill })
            } else {
                Rgb(flat_bg)
            }
        })
    }
}

fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// Smooth value noise in [-1, 1] on an integer lattice (bilinear, smoothstep-eased).
struct ValueNoise {
    table: Vec<f32>,
}

impl ValueNoise {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Self {
            table: (0..32 * 32).map(|_| rng.random_range(-1.0..1.0)).collect(),
        }
    }
    fn at(&self, x: f32, y: f32) -> f32 {
        let (x0, y0) = (x.floor(), y.floor());
        let (fx, fy) = (x - x0, y - y0);
        let g = |i: f32, j: f32| {
            self.table[((i as i64).rem_euclid(32) * 32 + (j as i64).rem_euclid(32)) as usize]
        };
        let (sx, sy) = (fx * fx * (3.0 - 2.0 * fx), fy * fy * (3.0 - 2.0 * fy));
        let a = g(x0, y0) * (1.0 - sx) + g(x0 + 1.0, y0) * sx;
        let b = g(x0, y0 + 1.0) * (1.0 - sx) + g(x0 + 1.0, y0 + 1.0) * sx;
        a * (1.0 - sy) + b * sy
    }
}

/// `count` scenes from `seed` (the same seed gives the same scenes in both looks).
pub fn scenes(count: usize, seed: u64) -> Vec<Scene> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count).map(|_| Scene::random(&mut rng)).collect()
}

/// Writes `count` scenes as `NNNN.png` + `NNNN.txt` (caption) into `out`. Returns the paths
/// of the images.
pub fn write_dataset(
    out: &std::path::Path,
    look: Look,
    count: usize,
    seed: u64,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use anyhow::Context;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut paths = Vec::new();
    for (i, s) in scenes(count, seed).iter().enumerate() {
        let p = out.join(format!("{i:04}.png"));
        s.render(look)
            .save(&p)
            .with_context(|| format!("cannot write {}", p.display()))?;
        let t = p.with_extension("txt");
        std::fs::write(&t, s.caption()).with_context(|| format!("cannot write {}", t.display()))?;
        paths.push(p);
    }
    Ok(paths)
}
