//! Aspect-ratio buckets with kohya sd-scripts' rules (its `BucketManager`, "legacy" selection):
//! the bucket sizes for a resolution, the bucket an image of a given size goes to, the size it
//! is resized to and where it is cropped. Pure arithmetic, no images: the training data
//! pipeline builds on it.

use anyhow::{bail, Result};

/// kohya's bucket settings (`--resolution`, `--min-bucket-reso`, `--max-bucket-reso`,
/// `--bucket-reso-steps`, `--bucket-no-upscale`). Defaults: 512 x 512, 256, 1024, 64, false.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketConfig {
    /// (width, height) whose area bounds every bucket.
    pub resolution: (usize, usize),
    pub min_reso: usize,
    pub max_reso: usize,
    /// Bucket sides are multiples of this (a multiple of 8, the VAE's factor).
    pub steps: usize,
    /// Never enlarge: buckets come from each image's own size (scaled down to the area when
    /// larger) instead of the predefined list.
    pub no_upscale: bool,
}

impl Default for BucketConfig {
    fn default() -> Self {
        Self {
            resolution: (512, 512),
            min_reso: 256,
            max_reso: 1024,
            steps: 64,
            no_upscale: false,
        }
    }
}

/// Where one image goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketChoice {
    /// The bucket (width, height).
    pub bucket: (usize, usize),
    /// The size the image is resized to before cropping to the bucket (>= the bucket).
    pub resized: (usize, usize),
    /// Bucket aspect ratio minus the image's.
    pub ar_error: f64,
}

impl BucketChoice {
    /// (left, top) of the centre crop from `resized` to `bucket` (kohya: half the excess,
    /// rounded down).
    pub fn centre_crop(&self) -> (usize, usize) {
        (
            (self.resized.0 - self.bucket.0) / 2,
            (self.resized.1 - self.bucket.1) / 2,
        )
    }
}

impl BucketConfig {
    /// Refuses settings kohya refuses, naming the field.
    pub fn validate(&self) -> Result<()> {
        let (w, h) = self.resolution;
        if self.steps == 0 || !self.steps.is_multiple_of(8) {
            bail!(
                "bucket steps must be a positive multiple of 8, got {}",
                self.steps
            );
        }
        if w == 0 || h == 0 {
            bail!("bucket resolution must be positive, got {w}x{h}");
        }
        if self.min_reso > self.max_reso {
            bail!(
                "min bucket resolution {} exceeds the max {}",
                self.min_reso,
                self.max_reso
            );
        }
        if !self.min_reso.is_multiple_of(self.steps) || !self.max_reso.is_multiple_of(self.steps) {
            bail!(
                "min/max bucket resolution ({}, {}) must be multiples of the bucket steps {}",
                self.min_reso,
                self.max_reso,
                self.steps
            );
        }
        Ok(())
    }

    fn max_area(&self) -> usize {
        self.resolution.0 * self.resolution.1
    }

    /// The predefined buckets, sorted: the square of the area, then for each width from
    /// `min_reso` to `max_reso` in `steps` the tallest height within the area (capped at
    /// `max_reso`, at least `min_reso`), and its transpose.
    pub fn buckets(&self) -> Vec<(usize, usize)> {
        let (area, d) = (self.max_area(), self.steps);
        let mut set = std::collections::BTreeSet::new();
        let side = ((area as f64).sqrt() as usize / d) * d;
        set.insert((side, side));
        let mut w = self.min_reso;
        while w <= self.max_reso {
            let h = self.max_reso.min((area / w) / d * d);
            if h >= self.min_reso {
                set.insert((w, h));
                set.insert((h, w));
            }
            w += d;
        }
        set.into_iter().collect()
    }

    fn round_to_steps(&self, x: f64) -> usize {
        let x = (x + 0.5) as usize;
        x - x % self.steps
    }

    /// The bucket for an image of `size` (width, height), among `buckets` (from
    /// [`Self::buckets`]; unused with `no_upscale`).
    pub fn select(&self, size: (usize, usize), buckets: &[(usize, usize)]) -> BucketChoice {
        let (iw, ih) = size;
        let ar = iw as f64 / ih as f64;
        let (bucket, resized) = if !self.no_upscale {
            let reso = if buckets.contains(&size) {
                size
            } else {
                // first of the smallest aspect-ratio errors (numpy's argmin)
                let mut best = buckets[0];
                let mut err = f64::INFINITY;
                for &b in buckets {
                    let e = (b.0 as f64 / b.1 as f64 - ar).abs();
                    if e < err {
                        (best, err) = (b, e);
                    }
                }
                best
            };
            let ar_reso = reso.0 as f64 / reso.1 as f64;
            let scale = if ar > ar_reso {
                reso.1 as f64 / ih as f64
            } else {
                reso.0 as f64 / iw as f64
            };
            let resized = (
                (iw as f64 * scale + 0.5) as usize,
                (ih as f64 * scale + 0.5) as usize,
            );
            (reso, resized)
        } else {
            let area = self.max_area() as f64;
            let resized = if iw * ih > self.max_area() {
                let rw = (area * ar).sqrt();
                let rh = area / rw;
                let bw = self.round_to_steps(rw);
                let bh_w = self.round_to_steps(bw as f64 / ar);
                let ar_w = bw as f64 / bh_w as f64;
                let bh = self.round_to_steps(rh);
                let bw_h = self.round_to_steps(bh as f64 * ar);
                let ar_h = bw_h as f64 / bh as f64;
                if (ar_w - ar).abs() < (ar_h - ar).abs() {
                    (bw, (bw as f64 / ar + 0.5) as usize)
                } else {
                    ((bh as f64 * ar + 0.5) as usize, bh)
                }
            } else {
                size
            };
            let bucket = (
                resized.0 - resized.0 % self.steps,
                resized.1 - resized.1 % self.steps,
            );
            (bucket, resized)
        };
        BucketChoice {
            bucket,
            resized,
            ar_error: bucket.0 as f64 / bucket.1 as f64 - ar,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_512_buckets_are_kohyas() {
        // by hand from kohya's make_bucket_resolutions((512, 512), 256, 1024, 64)
        let want = vec![
            (256, 832),
            (256, 896),
            (256, 960),
            (256, 1024),
            (320, 704),
            (320, 768),
            (384, 640),
            (448, 576),
            (512, 512),
            (576, 448),
            (640, 384),
            (704, 320),
            (768, 320),
            (832, 256),
            (896, 256),
            (960, 256),
            (1024, 256),
        ];
        assert_eq!(BucketConfig::default().buckets(), want);
        assert!(want.iter().all(|(w, h)| w * h <= 512 * 512));
    }

    #[test]
    fn images_go_to_kohyas_buckets() {
        let c = BucketConfig::default();
        let b = c.buckets();
        // (image size) -> (bucket, resized), worked out by hand from kohya's select_bucket
        for (size, bucket, resized) in [
            ((600, 900), (384, 640), (427, 640)), // portrait 2:3: width fitted, height cropped
            ((1000, 500), (704, 320), (704, 352)), // landscape 2:1
            ((300, 300), (512, 512), (512, 512)), // square, enlarged
            ((512, 512), (512, 512), (512, 512)), // already a bucket
            ((448, 576), (448, 576), (448, 576)), // already a bucket
            ((2000, 1000), (704, 320), (704, 352)), // same ratio, larger
            ((768, 1024), (448, 576), (448, 597)), // 3:4 photo
            ((1920, 1080), (640, 384), (683, 384)), // 16:9 frame
        ] {
            let ch = c.select(size, &b);
            assert_eq!((ch.bucket, ch.resized), (bucket, resized), "{size:?}");
            assert!(ch.resized.0 >= ch.bucket.0 && ch.resized.1 >= ch.bucket.1);
            assert!(ch.resized.0 - ch.bucket.0 <= c.steps && ch.resized.1 - ch.bucket.1 <= c.steps);
        }
        assert_eq!(c.select((600, 900), &b).centre_crop(), (21, 0));
        assert_eq!(c.select((1000, 500), &b).centre_crop(), (0, 16));
    }

    #[test]
    fn no_upscale_keeps_small_images_and_shrinks_large_ones() {
        let c = BucketConfig {
            no_upscale: true,
            ..Default::default()
        };
        let small = c.select((300, 200), &[]);
        assert_eq!((small.bucket, small.resized), ((256, 192), (300, 200)));
        let large = c.select((2000, 1000), &[]);
        assert_eq!((large.bucket, large.resized), ((640, 320), (640, 320)));
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad = |c: BucketConfig| c.validate().unwrap_err().to_string();
        let d = BucketConfig::default();
        assert!(bad(BucketConfig { steps: 12, ..d }).contains("multiple of 8"));
        assert!(bad(BucketConfig {
            min_reso: 2048,
            ..d
        })
        .contains("exceeds"));
        assert!(bad(BucketConfig { min_reso: 300, ..d }).contains("multiples of the bucket steps"));
        assert!(d.validate().is_ok());
    }
}
