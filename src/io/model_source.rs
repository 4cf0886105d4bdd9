//! Where a model comes from: the one place that turns a model name (`tiny`, `sd15`, a local
//! diffusers folder, a Hugging Face repo id) into something to read. Hub repos are resolved
//! through `hf-hub` (its standard cache; only the files needed are fetched, and a populated
//! cache works offline).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The default model: SD 1.5 (the old `runwayml/stable-diffusion-v1-5` id is gone).
pub const DEFAULT_MODEL: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";

/// A model as users name it, in every command and in [`resolve_model`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelName {
    /// `tiny`: the embedded tiny Stable Diffusion ([`tiny_model_dir`]).
    Tiny,
    /// `sd15` (also `sd-1.5`, `sd_v1_5`): Stable Diffusion 1.5, the Hub repo [`DEFAULT_MODEL`];
    /// commands that only need the UNet's structure use its built-in config.
    Sd15,
    /// A path that exists: a diffusers folder (pipeline root or a component folder), or a
    /// `config.json` file where only a structure is needed.
    Local(PathBuf),
    /// `owner/name` on the Hugging Face Hub.
    Hub(String),
}

impl ModelName {
    /// Reads a model name; the aliases `tiny` and `sd15` win over a folder of that name.
    pub fn parse(source: &str) -> Result<Self> {
        match source {
            "tiny" => return Ok(Self::Tiny),
            "sd15" | "sd-1.5" | "sd_v1_5" => return Ok(Self::Sd15),
            _ => {}
        }
        let p = Path::new(source);
        if p.exists() {
            return Ok(Self::Local(p.to_path_buf()));
        }
        let parts: Vec<&str> = source.split('/').collect();
        if parts.len() != 2
            || parts.iter().any(|s| s.is_empty())
            || source.contains(char::is_whitespace)
        {
            bail!(
                "model `{source}` is not `tiny`, `sd15`, an existing folder or a Hugging Face repo id (owner/name)"
            );
        }
        Ok(Self::Hub(source.to_string()))
    }
}

/// The files a pipeline needs, relative to its root (`{v}` is `.fp16` etc. or empty).
fn needed_files(variant: Option<&str>) -> Vec<String> {
    let v = variant.map(|v| format!(".{v}")).unwrap_or_default();
    vec![
        "model_index.json".into(),
        "scheduler/scheduler_config.json".into(),
        "text_encoder/config.json".into(),
        format!("text_encoder/model{v}.safetensors"),
        "tokenizer/vocab.json".into(),
        "tokenizer/merges.txt".into(),
        "tokenizer/tokenizer_config.json".into(),
        "tokenizer/special_tokens_map.json".into(),
        "unet/config.json".into(),
        format!("unet/diffusion_pytorch_model{v}.safetensors"),
        "vae/config.json".into(),
        format!("vae/diffusion_pytorch_model{v}.safetensors"),
    ]
}

/// Optional tokenizer files: a missing one is not an error.
fn optional(file: &str) -> bool {
    file.ends_with("special_tokens_map.json")
        || file.ends_with("tokenizer_config.json")
        || file == "model_index.json"
}

/// Resolves `source` ([`ModelName`]) to a local pipeline folder. A path that exists is used as
/// it is; `sd15` and anything shaped `owner/name` are looked up in the Hub cache (`cache_dir`, else `HF_HOME`/default) and
/// downloaded when missing, unless `HF_HUB_OFFLINE=1`.
pub fn resolve_model(
    source: &str,
    variant: Option<&str>,
    cache_dir: Option<&Path>,
) -> Result<PathBuf> {
    let name = ModelName::parse(source)?;
    let source = match &name {
        ModelName::Tiny => {
            let dir = tiny_model_dir();
            if !dir.join("model_index.json").is_file() {
                bail!(
                    "the embedded tiny model is missing from {} (make it with `sd-lora pretrain-tiny`)",
                    dir.display()
                );
            }
            return Ok(dir);
        }
        ModelName::Local(p) if !p.is_dir() => bail!(
            "model source {} is a file; expected a diffusers pipeline folder",
            p.display()
        ),
        ModelName::Local(p) => return Ok(p.clone()),
        ModelName::Sd15 => DEFAULT_MODEL,
        ModelName::Hub(repo) => repo.as_str(),
    };
    let cache = match cache_dir {
        Some(d) => hf_hub::Cache::new(d.to_path_buf()),
        None => hf_hub::Cache::from_env(),
    };
    let repo = cache.model(source.to_string());
    let offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let mut api = None;
    let mut root: Option<PathBuf> = None;
    for file in needed_files(variant) {
        let path = match repo.get(&file) {
            Some(p) => p,
            None if offline => {
                if optional(&file) {
                    continue;
                }
                bail!(
                    "`{file}` of {source} is not in the Hugging Face cache {} and HF_HUB_OFFLINE is set",
                    cache.path().display()
                );
            }
            None => {
                if api.is_none() {
                    let b = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
                        .with_progress(true);
                    api = Some(
                        b.build()
                            .context("cannot set up the Hugging Face Hub client")?,
                    );
                }
                let a = api.as_ref().expect("just built");
                match a.model(source.to_string()).get(&file) {
                    Ok(p) => p,
                    Err(_) if optional(&file) => continue,
                    Err(e) => {
                        bail!("cannot fetch `{file}` of {source} from the Hugging Face Hub: {e}")
                    }
                }
            }
        };
        if root.is_none() {
            // the snapshot folder: strip the file's relative path
            let depth = file.split('/').count();
            let mut r = path.clone();
            for _ in 0..depth {
                r = r.parent().map(Path::to_path_buf).unwrap_or_default();
            }
            root = Some(r);
        }
    }
    root.with_context(|| format!("no files of {source} found"))
}

/// The shipped tiny model's folder (a diffusers pipeline layout): `$SD_LORA_TINY_MODEL` when
/// set, else `assets/tiny-sd` of the source tree this was built from, else `assets/tiny-sd`
/// under the current folder (a binary copied to another machine, run in a checkout).
pub fn tiny_model_dir() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("SD_LORA_TINY_MODEL") {
        return p.into();
    }
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-sd");
    if built.is_dir() {
        return built;
    }
    std::path::PathBuf::from("assets/tiny-sd")
}
