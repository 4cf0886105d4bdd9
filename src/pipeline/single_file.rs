//! Single-file checkpoints (A1111/CompVis LDM layout: `model.diffusion_model.*`,
//! `first_stage_model.*`, `cond_stage_model.*`), as anime and style bases are shared: the
//! architecture inferred from tensor shapes for SD 1.x and 2.x (or given with a diffusers
//! `config` folder), every tensor read through its LDM name, EMA and non-model keys set aside
//! and counted, a VAE swap. No network: the tokenizer and scheduler are built in.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::checkpoint_file::{detect_family, CheckpointHeader, Family};
pub use super::infer_config::{infer_clip_config, infer_unet_config, infer_vae_config};
use super::StableDiffusion;
use crate::scheduler::SchedulerConfig;
use crate::text::ldm_names::{clip_ldm_key, ClipLayout};
use crate::text::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use crate::unet::{ldm_names::ldm_keys, UNet2DConditionModel, UNetConfig};
use crate::vae::{ldm_names::vae_ldm_key, AutoencoderKL, VaeConfig};
use crate::weights::{Remap, WeightSource};

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";

/// How to read a single file. `Default`: infer everything, no EMA, the file's own VAE.
#[derive(Debug, Clone, Default)]
pub struct SingleFileOptions {
    /// A diffusers folder whose configs, tokenizer and scheduler are used instead of the
    /// inferred ones (weights still come from the file).
    pub config: Option<PathBuf>,
    /// Another VAE: a diffusers folder, or a `.safetensors` file (LDM keys with or without
    /// `first_stage_model.`, or diffusers keys).
    pub vae: Option<PathBuf>,
    /// `epsilon` or `v_prediction` (cannot be read from weights). Default: the config's, else
    /// epsilon for SD 1.x and v_prediction for SD 2.x.
    pub prediction_type: Option<String>,
    /// Read the UNet from the file's `model_ema.*` copy.
    pub use_ema: bool,
}

impl SingleFileOptions {
    /// These options with `config` resolved to a local folder (a Hub id is looked up in the
    /// cache at `cache_dir`, or the default one).
    pub fn resolved(&self, cache_dir: Option<&Path>) -> Result<Self> {
        let config = match &self.config {
            Some(c) => Some(crate::io::resolve_model(
                &c.to_string_lossy(),
                None,
                cache_dir,
            )?),
            None => None,
        };
        Ok(Self {
            config,
            ..self.clone()
        })
    }
}

/// What was read from the file and what was set aside.
#[derive(Debug, Clone)]
pub struct SingleFileReport {
    pub path: PathBuf,
    pub family: Family,
    /// The configs came from a `config` folder (else inferred from shapes).
    pub config_given: bool,
    pub dtype: String,
    pub tensors_used: usize,
    /// Set aside by design: `model_ema.*` (unless used), LDM schedule buffers, `position_ids`.
    pub ignored: usize,
    /// Other tensors nothing read (named, first ten).
    pub unused: Vec<String>,
    pub unused_count: usize,
    pub prediction_type: String,
}

impl std::fmt::Display for SingleFileReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} single file ({}), configs {}, {} tensors used, {} set aside (EMA, schedule buffers, position_ids), prediction {}",
            self.path.display(),
            self.family,
            self.dtype,
            if self.config_given { "given" } else { "inferred from shapes" },
            self.tensors_used,
            self.ignored,
            self.prediction_type
        )?;
        if self.unused_count > 0 {
            write!(
                f,
                "\nwarning: {} tensors of the file are not used: {}{}",
                self.unused_count,
                self.unused.join(", "),
                if self.unused_count > self.unused.len() {
                    ", ..."
                } else {
                    ""
                }
            )?;
        }
        Ok(())
    }
}

/// Our keys and shapes of a model built by `build` from a shape-only source (no weights).
pub(crate) fn records_of(
    build: impl FnOnce(&WeightSource) -> Result<()>,
) -> Result<Vec<(String, Vec<usize>)>> {
    let ws = WeightSource::meta(DType::F32);
    build(&ws)?;
    Ok(ws
        .records()
        .into_iter()
        .map(|r| (r.path, r.shape.dims().to_vec()))
        .collect())
}

/// Refuses a prediction type the schedulers do not know.
pub fn check_prediction_type(p: &str) -> Result<()> {
    if !matches!(p, "epsilon" | "v_prediction") {
        bail!("prediction type `{p}`: expected epsilon or v_prediction");
    }
    Ok(())
}

/// `model.diffusion_model.a.b` -> `model_ema.diffusion_modelab` (LDM's EMA naming).
fn ema_key(key: &str) -> String {
    let rest = key.strip_prefix("model.").unwrap_or(key);
    format!("model_ema.{}", rest.replace('.', ""))
}

/// The remap for a VAE stored under `prefix` in LDM layout.
fn vae_remap(cfg: &VaeConfig, prefix: &str) -> Result<HashMap<String, Remap>> {
    let n = cfg.block_out_channels.len();
    records_of(|ws| AutoencoderKL::new(cfg, ws).map(|_| ()))?
        .into_iter()
        .map(|(k, _)| {
            let l =
                vae_ldm_key(&k, n).with_context(|| format!("VAE tensor `{k}` has no LDM name"))?;
            Ok((k, Remap::key(format!("{prefix}{l}"))))
        })
        .collect()
}

/// Loads a VAE given as a diffusers folder (its own config) or a `.safetensors` file of any
/// layout (read with `cfg`, the pipeline's VAE architecture; a file that does not fit it is
/// refused naming the tensor).
pub fn load_vae(
    path: &Path,
    cfg: &VaeConfig,
    dtype: DType,
    device: &Device,
) -> Result<AutoencoderKL> {
    let what = || format!("loading the VAE from {}", path.display());
    if path.is_dir() {
        // a folder holding only the fp16 variant is read as such
        let dir = crate::weights::component_dir(path, "vae");
        let only_fp16 = !dir.join("diffusion_pytorch_model.safetensors").is_file()
            && dir
                .join("diffusion_pytorch_model.fp16.safetensors")
                .is_file();
        let vae = AutoencoderKL::load(path, only_fp16.then_some("fp16"), dtype, device)?;
        if vae.config.latent_channels != cfg.latent_channels {
            bail!(
                "{}: a VAE with {} latent channels for a UNet that takes {}",
                path.display(),
                vae.config.latent_channels,
                cfg.latent_channels
            );
        }
        return Ok(vae);
    }
    // a file: the pipeline's VAE architecture, read in whichever layout the file uses
    let h = CheckpointHeader::read(path)?;
    let ws = if h.has("encoder.down_blocks.0.resnets.0.conv1.weight") {
        WeightSource::from_safetensors(&[path.to_path_buf()], dtype, device)?
    } else {
        let prefix = if h.any_prefix(VAE) { VAE } else { "" };
        WeightSource::from_safetensors_remapped(path, vae_remap(cfg, prefix)?, dtype, device)?
    };
    AutoencoderKL::new(cfg, &ws).with_context(what)
}

/// Whether `dir` holds a tokenizer vocabulary.
pub fn has_vocab(dir: &Path) -> bool {
    dir.join("tokenizer.json").is_file()
        || (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file())
}

/// The tokenizer of `dir`; a folder with only `tokenizer_config.json` (configs shipped without
/// the vocabulary) gets the built-in CLIP vocabulary with that config's pad token.
pub fn load_tokenizer(dir: &Path) -> Result<ClipTokenizer> {
    if has_vocab(dir) {
        return ClipTokenizer::from_dir(dir);
    }
    let tok = ClipTokenizer::from_dir(&crate::io::tiny_model_dir().join("tokenizer"))?;
    let cfg = dir.join("tokenizer_config.json");
    if !cfg.is_file() {
        return Ok(tok);
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg)?)
        .with_context(|| format!("{} is not valid JSON", cfg.display()))?;
    match v["pad_token"]
        .as_str()
        .or(v["pad_token"]["content"].as_str())
    {
        Some(p) => tok.with_pad_token(p),
        None => Ok(tok),
    }
}

/// Everything needed to read one file: configs and, per component, our key -> its key.
pub struct SingleFilePlan {
    pub header: CheckpointHeader,
    pub family: Family,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text: ClipTextConfig,
    pub scheduler: SchedulerConfig,
    pub tokenizer_dir: PathBuf,
    pub unet_map: HashMap<String, Remap>,
    pub vae_map: HashMap<String, Remap>,
    pub text_map: HashMap<String, Remap>,
}

impl SingleFilePlan {
    /// Reads the header, detects the family, infers (or reads) the configs and pairs every
    /// tensor of ours with the file's; nothing is loaded yet.
    pub fn new(path: &Path, opts: &SingleFileOptions) -> Result<Self> {
        let header = CheckpointHeader::read(path)?;
        let family = detect_family(&header)?;
        let (unet, vae, text, mut scheduler, tokenizer_dir) = match &opts.config {
            Some(dir) => (
                UNetConfig::from_file(&dir.join("unet/config.json"))?,
                VaeConfig::from_file(&dir.join("vae/config.json"))?,
                ClipTextConfig::from_file(&dir.join("text_encoder/config.json"))?,
                SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?,
                dir.join("tokenizer"),
            ),
            None => (
                infer_unet_config(&header, family)?,
                infer_vae_config(&header, VAE)?,
                infer_clip_config(&header, family)?,
                SchedulerConfig::sd_v1_5(),
                crate::io::tiny_model_dir().join("tokenizer"),
            ),
        };
        match (&opts.prediction_type, &opts.config, family) {
            (Some(p), _, _) => scheduler.prediction_type = p.clone(),
            (None, None, Family::Sd2) => scheduler.prediction_type = "v_prediction".into(),
            _ => {}
        }
        check_prediction_type(&scheduler.prediction_type)?;
        // one shape-only UNet gives both our keys and the block layout LDM names follow
        let ws = WeightSource::meta(DType::F32);
        let meta_unet = UNet2DConditionModel::new(&unet, &ws)?;
        let unet_keys: Vec<String> = ws.records().into_iter().map(|r| r.path).collect();
        let mut unet_map = HashMap::new();
        for (ours, ldm) in ldm_keys(&meta_unet, &unet_keys)? {
            let key = format!("{UNET}{ldm}");
            let key = if opts.use_ema { ema_key(&key) } else { key };
            unet_map.insert(ours, Remap::key(key));
        }
        if opts.use_ema && !header.any_prefix("model_ema.diffusion_model") {
            bail!(
                "{}: --use-ema, but the file has no EMA weights (`model_ema.*`)",
                path.display()
            );
        }
        let layout = match family {
            Family::Sd1 => ClipLayout::Transformers,
            Family::Sd2 => ClipLayout::OpenClip,
        };
        let text_map = records_of(|ws| ClipTextModel::new(&text, ws).map(|_| ()))?
            .into_iter()
            .map(|(k, _)| {
                let mut r = clip_ldm_key(&k, layout, text.hidden_size).with_context(|| {
                    format!("text encoder tensor `{k}` has no single-file name")
                })?;
                let short = r.key.replace("transformer.text_model.", "transformer.");
                if !header.has(&r.key) && header.has(&short) {
                    r.key = short;
                }
                Ok((k, r))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            vae_map: vae_remap(&vae, VAE)?,
            header,
            family,
            unet,
            vae,
            text,
            scheduler,
            tokenizer_dir,
            unet_map,
            text_map,
        })
    }

    /// Checks, from the header alone, that every UNet and text-encoder tensor the configs
    /// describe is in the file with as many elements; fails naming the first few that are not
    /// (configs given with `--config` that do not fit the file).
    pub fn check_structure(&self) -> Result<()> {
        let ours = records_of(|ws| UNet2DConditionModel::new(&self.unet, ws).map(|_| ()))?
            .into_iter()
            .chain(records_of(|ws| {
                ClipTextModel::new(&self.text, ws).map(|_| ())
            })?);
        let (mut missing, mut wrong) = (Vec::new(), Vec::new());
        for (k, shape) in ours {
            let Some(r) = self.unet_map.get(&k).or_else(|| self.text_map.get(&k)) else {
                continue;
            };
            match self.header.shape(&r.key) {
                None => missing.push(r.key.clone()),
                Some(f) => {
                    let rows = r.rows.map_or(f.first().copied().unwrap_or(1), |(_, n)| n);
                    let theirs = rows * f.iter().skip(1).product::<usize>();
                    if theirs != shape.iter().product::<usize>() {
                        wrong.push(format!("{} {f:?} (the configs need {shape:?})", r.key));
                    }
                }
            }
        }
        if missing.is_empty() && wrong.is_empty() {
            return Ok(());
        }
        let few = |v: &[String], what: &str| {
            (!v.is_empty()).then(|| {
                let list: Vec<String> = v.iter().take(3).cloned().collect();
                format!(
                    "{} tensors {what} ({}{})",
                    v.len(),
                    list.join(", "),
                    if v.len() > 3 { ", ..." } else { "" }
                )
            })
        };
        let parts: Vec<String> = [few(&missing, "missing"), few(&wrong, "of another size")]
            .into_iter()
            .flatten()
            .collect();
        bail!(
            "{}: the configs do not describe this file: {}",
            self.header.path.display(),
            parts.join("; ")
        )
    }

    /// Which of the file's tensors nothing reads, minus those set aside by design.
    fn report(&self, opts: &SingleFileOptions) -> SingleFileReport {
        let mut used: std::collections::HashSet<&str> = std::collections::HashSet::new();
        for m in [&self.unet_map, &self.text_map] {
            used.extend(m.values().map(|r| r.key.as_str()));
        }
        if opts.vae.is_none() {
            used.extend(self.vae_map.values().map(|r| r.key.as_str()));
        }
        let by_design = |k: &str| {
            k.starts_with("model_ema.")
                || k.ends_with("position_ids")
                || !k.contains('.')
                || (opts.vae.is_some() && k.starts_with(VAE))
                || (opts.use_ema && k.starts_with(UNET))
                // SD 2.x reads OpenCLIP's penultimate layer; the last one and the projection stay
                || (self.family == Family::Sd2
                    && (k.contains(&format!("resblocks.{}.", self.text.num_hidden_layers))
                        || k.ends_with("text_projection")
                        || k.ends_with("logit_scale")))
        };
        let mut unused = Vec::new();
        let mut ignored = 0;
        for k in self.header.tensors.keys() {
            if used.contains(k.as_str()) {
                continue;
            }
            if by_design(k) {
                ignored += 1;
            } else {
                unused.push(k.clone());
            }
        }
        SingleFileReport {
            path: self.header.path.clone(),
            family: self.family,
            config_given: opts.config.is_some(),
            dtype: self.header.main_dtype(),
            tensors_used: used.len(),
            ignored,
            unused_count: unused.len(),
            unused: unused.into_iter().take(10).collect(),
            prediction_type: self.scheduler.prediction_type.clone(),
        }
    }
}

impl StableDiffusion {
    /// Loads a whole pipeline from a single-file checkpoint (see [`SingleFileOptions`]) and
    /// reports what was read and what was set aside.
    pub fn from_single_file(
        path: &Path,
        opts: &SingleFileOptions,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, SingleFileReport)> {
        if device.is_cpu() {
            crate::device::tune_cpu_allocator();
            crate::device::tune_cpu_threads();
        }
        let mut plan = SingleFilePlan::new(path, opts)?;
        let report = plan.report(opts);
        let ws = |m: &mut HashMap<String, Remap>| {
            WeightSource::from_safetensors_remapped(path, std::mem::take(m), dtype, device)
        };
        let ctx = |what: &str| format!("loading the {what} from {}", path.display());
        let unet = UNet2DConditionModel::new(&plan.unet, &ws(&mut plan.unet_map)?)
            .with_context(|| ctx("UNet"))?;
        let text_encoder = ClipTextModel::new(&plan.text, &ws(&mut plan.text_map)?)
            .with_context(|| ctx("text encoder"))?;
        let vae = match &opts.vae {
            Some(v) => load_vae(v, &plan.vae, dtype, device)?,
            None => AutoencoderKL::new(&plan.vae, &ws(&mut plan.vae_map)?)
                .with_context(|| ctx("VAE"))?,
        };
        let mut tokenizer = load_tokenizer(&plan.tokenizer_dir)?;
        if plan.family == Family::Sd2 && opts.config.is_none() {
            // SD 2.x's tokenizer pads with "!" (id 0), not the end-of-text token
            tokenizer = tokenizer.with_pad_token("!")?;
        }
        Ok((
            Self {
                tokenizer,
                text_encoder,
                vae,
                unet,
                scheduler_config: plan.scheduler.clone(),
                root: opts
                    .config
                    .clone()
                    .unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")).to_path_buf()),
                device: device.clone(),
                dtype,
            },
            report,
        ))
    }
}

/// Whether `model` names a single-file checkpoint: an existing file other than a `config.json`
/// (a pickle is then refused by [`CheckpointHeader::read`] with its reason).
pub fn is_single_file(model: &str) -> bool {
    let p = Path::new(model);
    p.is_file() && p.extension().is_none_or(|e| e != "json")
}

/// The UNet and text-encoder configs of `model`: a single file's from `config` (a diffusers
/// folder or cached repo id) or inferred from its shapes, checked against the file's tensors;
/// else [`UNetConfig::for_model`] and the text encoder of a pipeline folder (tiny's for `tiny`,
/// SD 1.5's otherwise). Structure only: no weights are read.
pub fn structure_configs(
    model: &str,
    config: Option<&Path>,
) -> Result<(UNetConfig, ClipTextConfig)> {
    if is_single_file(model) {
        let opts = SingleFileOptions {
            config: config.map(Path::to_path_buf),
            ..Default::default()
        }
        .resolved(None)?;
        let plan = SingleFilePlan::new(Path::new(model), &opts)?;
        plan.check_structure()?;
        return Ok((plan.unet, plan.text));
    }
    if let Some(c) = config {
        anyhow::bail!(
            "--config {} gives the configs of a single-file checkpoint, but {model} is not one (a folder has its own configs)",
            c.display()
        );
    }
    let te_config = Path::new(model).join("text_encoder").join("config.json");
    let text = if te_config.is_file() {
        ClipTextConfig::from_file(&te_config)?
    } else if model == "tiny" {
        ClipTextConfig::tiny()
    } else {
        ClipTextConfig::sd_v1_5()
    };
    Ok((UNetConfig::for_model(model)?, text))
}

/// The UNet of a single file alone (see [`StableDiffusion::from_single_file`]).
pub fn load_unet(
    path: &Path,
    opts: &SingleFileOptions,
    dtype: DType,
    device: &Device,
) -> Result<UNet2DConditionModel> {
    let mut plan = SingleFilePlan::new(path, opts)?;
    let map = std::mem::take(&mut plan.unet_map);
    let ws = WeightSource::from_safetensors_remapped(path, map, dtype, device)?;
    UNet2DConditionModel::new(&plan.unet, &ws)
        .with_context(|| format!("loading the UNet from {}", path.display()))
}
