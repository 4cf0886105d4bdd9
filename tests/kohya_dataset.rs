//! kohya's dataset conventions: `<repeats>_<name>` folders, `.caption` sidecars with the
//! folder's name as the fallback caption, repeats per epoch, the `ss_*` dataset metadata.

mod common;

use sd_lora::prelude::*;
use std::path::Path;

fn png(path: &Path, w: u32, h: u32, shade: u8) {
    image::RgbImage::from_fn(w, h, |x, _| image::Rgb([shade, (x * 4) as u8, 60]))
        .save(path)
        .unwrap();
}

/// root/10_mychar/{a.png + a.caption, b.png}, root/2_style/c.png + c.caption, plus a folder and
/// an image kohya ignores.
pub fn kohya_folder(root: &Path) {
    let a = root.join("10_mychar");
    let b = root.join("2_style");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    std::fs::create_dir_all(root.join("notes")).unwrap();
    png(&a.join("a.png"), 40, 40, 200);
    std::fs::write(a.join("a.caption"), "mychar, 1girl, Red hair\n").unwrap();
    png(&a.join("b.png"), 40, 40, 120);
    png(&b.join("c.png"), 40, 40, 30);
    std::fs::write(b.join("c.caption"), "watercolor, 1girl").unwrap();
    png(&root.join("loose.png"), 40, 40, 10);
}

fn config() -> DataConfig {
    DataConfig {
        width: 32,
        height: 32,
        captions: CaptionSource::Sidecar {
            fallback: String::new(),
        },
        caption_extension: ".caption".into(),
        ..Default::default()
    }
}

#[test]
fn repeats_folders_captions_and_metadata_follow_kohya() {
    let tmp = tempfile::tempdir().unwrap();
    kohya_folder(tmp.path());
    let data = ImageFolder::load(tmp.path(), &config()).unwrap();
    let got: Vec<(String, usize, String)> = data
        .examples
        .iter()
        .map(|e| (e.caption.clone(), e.repeats, e.dataset_dir.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("mychar, 1girl, Red hair".into(), 10, "10_mychar".into()),
            ("mychar".into(), 10, "10_mychar".into()),
            ("watercolor, 1girl".into(), 2, "2_style".into()),
        ]
    );
    assert_eq!(data.items(), 22);
    assert!(
        data.warnings.iter().any(|w| w.contains("notes")),
        "{:?}",
        data.warnings
    );
    assert!(data.warnings.iter().any(|w| w.contains("ignored 1 image")));
    assert_eq!(data.dataset_dirs()["10_mychar"], (10, 2));
    let tags = data.tag_frequency();
    assert_eq!(tags["10_mychar"]["mychar"], 2);
    assert_eq!(tags["10_mychar"][" red hair"], 1);
    assert_eq!(tags["2_style"][" 1girl"], 1);
    // a folder with a malformed number is named
    std::fs::create_dir_all(tmp.path().join("3x_bad")).unwrap();
    let err = ImageFolder::load(tmp.path(), &config())
        .unwrap_err()
        .to_string();
    assert!(err.contains("3x_bad"), "{err}");
}

#[test]
fn repeats_multiply_the_items_of_an_epoch() {
    let dir = common::tiny_pipeline();
    let sd =
        StableDiffusion::from_folder(dir.path(), Some("fp16"), DType::F32, &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    kohya_folder(tmp.path());
    let data = ImageFolder::load(tmp.path(), &config()).unwrap();
    let cache = LatentCache::build(&sd, &data, false).unwrap();
    assert_eq!((cache.latents.len(), cache.len()), (3, 22));
    assert_eq!(cache.items.iter().filter(|i| **i == 2).count(), 2);
    let mut sd = sd;
    sd.unet
        .inject_lora(&LoraConfig::new(2, 2.0), &VarMap::new())
        .unwrap();
    let cfg = TrainConfig {
        batch_size: 4,
        grad_accum: 1,
        epochs: 1,
        shuffle_caption: true,
        keep_tokens: 1,
        caption_tag_dropout: 0.3,
        ..Default::default()
    };
    let mut t = Trainer::new(&sd, cfg).unwrap();
    let mut n = 0;
    t.train(&sd, &cache, &mut |r| {
        n += 1;
        assert!(r.loss.is_finite());
    })
    .unwrap();
    assert_eq!(n, 6, "22 items in batches of 4");
}
