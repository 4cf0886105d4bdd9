//! kohya sd-scripts' dataset conventions: `<repeats>_<name>` folders (each image trained
//! `repeats` times per epoch, the folder's name text as the caption of images without one),
//! caption processing at every step (`--shuffle_caption` with `--keep_tokens`,
//! `--caption_tag_dropout_rate`), and the `ss_tag_frequency` / `ss_dataset_dirs` metadata.

use anyhow::{bail, Context, Result};
use rand::Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One `<repeats>_<name>` folder.
#[derive(Debug, Clone, PartialEq)]
pub struct RepeatsFolder {
    pub path: PathBuf,
    /// The folder's own name, e.g. `10_mychar`.
    pub dir_name: String,
    pub repeats: usize,
    /// The text after the number (`mychar`): the caption of images without a caption file.
    pub class_text: String,
}

/// Reads `<repeats>_<name>` from a folder name: `Ok(None)` when the name does not start with
/// a digit (kohya ignores such folders), an error naming the folder when it starts with one but
/// is not a valid `<repeats>_<name>` (e.g. `10x_cat`, `0_cat`).
pub fn parse_repeats(dir: &Path) -> Result<Option<RepeatsFolder>> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    if !name.starts_with(|c: char| c.is_ascii_digit()) {
        return Ok(None);
    }
    let Some((n, text)) = name.split_once('_') else {
        bail!(
            "{}: a dataset folder must be named <repeats>_<name> (e.g. 10_mychar)",
            dir.display()
        );
    };
    let repeats: usize = n.parse().map_err(|_| {
        anyhow::anyhow!(
            "{}: `{n}` is not a number of repeats (<repeats>_<name>, e.g. 10_mychar)",
            dir.display()
        )
    })?;
    if repeats == 0 {
        bail!("{}: 0 repeats would never train its images", dir.display());
    }
    Ok(Some(RepeatsFolder {
        path: dir.to_path_buf(),
        dir_name: name.clone(),
        repeats,
        class_text: text.trim().to_string(),
    }))
}

/// The `<repeats>_<name>` sub-folders of `root`, sorted, and the names of ignored ones; `None`
/// when `root` has no such sub-folder (a plain image folder).
pub type RepeatsLayout = Option<(Vec<RepeatsFolder>, Vec<String>)>;

/// Detects kohya's layout in `root`.
pub fn repeats_layout(root: &Path) -> Result<RepeatsLayout> {
    let mut dirs = Vec::new();
    for e in std::fs::read_dir(root).with_context(|| format!("cannot list {}", root.display()))? {
        let p = e
            .with_context(|| format!("cannot list {}", root.display()))?
            .path();
        if p.is_dir() {
            dirs.push(p);
        }
    }
    dirs.sort();
    let mut found = Vec::new();
    let mut ignored = Vec::new();
    for d in dirs {
        match parse_repeats(&d)? {
            Some(f) => found.push(f),
            None => ignored.push(d.display().to_string()),
        }
    }
    Ok((!found.is_empty()).then_some((found, ignored)))
}

/// kohya's per-step caption processing: split on commas, keep the first `keep_tokens` tags in
/// place (only when there are more), shuffle the rest when `shuffle`, drop each of them with
/// probability `tag_dropout`, join with ", ". Draws from `rng` only for what is enabled.
pub fn process_caption<R: Rng>(
    caption: &str,
    shuffle: bool,
    keep_tokens: usize,
    tag_dropout: f64,
    rng: &mut R,
) -> String {
    if !shuffle && tag_dropout <= 0.0 {
        return caption.to_string();
    }
    let tokens: Vec<String> = caption
        .trim()
        .split(',')
        .map(|t| t.trim().to_string())
        .collect();
    let (keep, mut rest) = if keep_tokens == 0 {
        (Vec::new(), tokens)
    } else if tokens.len() > keep_tokens {
        (
            tokens[..keep_tokens].to_vec(),
            tokens[keep_tokens..].to_vec(),
        )
    } else {
        return tokens.join(", ");
    };
    if shuffle {
        for i in (1..rest.len()).rev() {
            rest.swap(i, rng.random_range(0..=i));
        }
    }
    if tag_dropout > 0.0 {
        rest.retain(|_| rng.random::<f64>() >= tag_dropout);
    }
    let mut out = keep;
    out.extend(rest);
    out.join(", ")
}

/// kohya's `ss_tag_frequency` for one folder: lower-cased comma-separated tags of `captions`
/// (as loaded, before per-step processing) with their counts.
pub fn tag_frequency<'a>(captions: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut f = BTreeMap::new();
    for c in captions {
        for tag in c.split(',') {
            if !tag.trim().is_empty() {
                *f.entry(tag.to_lowercase()).or_insert(0) += 1;
            }
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn repeats_folder_names() {
        let p = |s: &str| parse_repeats(Path::new(s));
        let f = p("/d/10_my char").unwrap().unwrap();
        assert_eq!((f.repeats, f.class_text.as_str()), (10, "my char"));
        assert!(p("/d/images").unwrap().is_none());
        for bad in ["/d/10x_cat", "/d/0_cat", "/d/5cat"] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn captions_keep_shuffle_and_drop_like_kohya() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let c = "mychar, 1girl, red hair, smile, outdoors";
        assert_eq!(process_caption(c, false, 2, 0.0, &mut rng), c);
        for _ in 0..20 {
            let s = process_caption(c, true, 2, 0.0, &mut rng);
            assert!(s.starts_with("mychar, 1girl, "), "{s}");
            let mut a: Vec<&str> = s.split(", ").collect();
            let mut b: Vec<&str> = c.split(", ").collect();
            a.sort();
            b.sort();
            assert_eq!(a, b);
            let d = process_caption(c, false, 2, 0.5, &mut rng);
            assert!(d.starts_with("mychar, 1girl"), "{d}");
            assert!(d.split(", ").count() <= 5);
        }
        let all_dropped = process_caption(c, false, 1, 0.999_999, &mut rng);
        assert_eq!(all_dropped, "mychar");
        // no more tags than kept: unchanged
        assert_eq!(process_caption("a, b", true, 2, 0.9, &mut rng), "a, b");
        // kohya lower-cases tags but keeps their spaces
        let f = tag_frequency(["A, b", "a,c"].into_iter());
        assert_eq!(f.get("a"), Some(&2));
        assert_eq!(f.get(" b"), Some(&1));
        assert_eq!(f.len(), 3, "{f:?}");
    }
}
