//! LoRA: configuration, the adapted linear layer, injection by module name, counting, and
//! runtime control (strength, on/off, merge).

pub mod apply;
pub mod config;
pub mod convert;
pub mod file;
pub mod io;
pub mod keys;
pub mod linear;
pub mod patch;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Var};
use candle_nn::VarMap;
use serde::Serialize;

pub use apply::{LoraApplied, LoraLoad, LoraPlan, ModuleIndex};
pub use config::{
    is_locon_target, target_matches, LoraConfig, LoraInit, INJECTABLE, TEXT_INJECTABLE,
};
pub use file::{LoraEntry, LoraFile};
pub use io::LoraFormat;
pub use keys::Component;
pub use linear::{LoraAdapter, LoraLinear, DEFAULT_ADAPTER};
pub use patch::{AdapterKind, PatchWeights, Patchable, WeightPatch};

/// A model whose linear layers can carry LoRA adapters. Implemented by the UNet and the CLIP
/// text encoder; the provided methods do the injection (the tutorial's
/// `inject_lora_into_unet`), counting and control.
#[doc(alias = "inject_lora_into_unet")]
pub trait LoraModel: Clone {
    /// Reads every LoRA-capable linear layer, in the order of [`LoraModel::for_each_linear`].
    fn visit_linears(&self, f: &mut dyn FnMut(&LoraLinear) -> Result<()>) -> Result<()>;
    /// Visits every LoRA-capable linear layer in a fixed order, mutably.
    fn for_each_linear(&mut self, f: &mut dyn FnMut(&mut LoraLinear) -> Result<()>) -> Result<()>;
    /// Number of frozen (base) parameters.
    fn base_param_count(&self) -> usize;
    fn device(&self) -> &Device;
    /// Which part of a pipeline this model is (selects a LoRA file's tensors).
    fn lora_component(&self) -> Component;

    /// Other names files use for this model's modules: (alias, module path) pairs. Default
    /// none.
    fn module_aliases(&self) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }

    /// Reads every layer a loaded file can patch. Default: the linear layers.
    fn visit_patchables(&self, f: &mut dyn FnMut(&dyn Patchable) -> Result<()>) -> Result<()> {
        self.visit_linears(&mut |l| f(l))
    }

    /// Visits every layer a loaded file can patch, mutably. Default: the linear layers.
    fn for_each_patchable(
        &mut self,
        f: &mut dyn FnMut(&mut dyn Patchable) -> Result<()>,
    ) -> Result<()> {
        self.for_each_linear(&mut |l| f(l))
    }

    /// The names a file may use for this model's modules.
    fn module_index(&self) -> Result<ModuleIndex> {
        let mut layers = Vec::new();
        self.visit_patchables(&mut |p| {
            layers.push(apply::LayerInfo {
                module: p.name().to_string(),
                shape: p.weight_shape(),
                bias: p.bias_len(),
                conv: p.is_conv(),
            });
            Ok(())
        })?;
        Ok(ModuleIndex::new(
            self.lora_component(),
            layers,
            &self.module_aliases()?,
        ))
    }

    /// Snapshot of the linear layers (cheap: tensors are shared, not copied).
    fn linears(&self) -> Result<Vec<LoraLinear>> {
        let mut out = Vec::new();
        self.visit_linears(&mut |l| {
            out.push(l.clone());
            Ok(())
        })?;
        Ok(out)
    }

    /// Module paths of all LoRA-capable linear layers.
    fn linear_names(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        self.visit_linears(&mut |l| {
            out.push(l.name().to_string());
            Ok(())
        })?;
        Ok(out)
    }

    /// Adds a fresh adapter to every layer matching `cfg.targets` and registers its `A`/`B`
    /// in `varmap` as `<module>.lora_A.weight` / `<module>.lora_B.weight` (the tutorial's
    /// `inject_lora_into_unet`).
    #[doc(alias = "inject_lora_into_unet")]
    fn inject_lora(&mut self, cfg: &LoraConfig, varmap: &VarMap) -> Result<LoraSummary> {
        cfg.validate()?;
        let names = self.linear_names()?;
        for t in &cfg.targets {
            if !names.iter().any(|n| target_matches(t, n)) {
                bail!(
                    "LoRA target `{t}` matches no module of this model (try one of {})",
                    INJECTABLE.join(", ")
                );
            }
        }
        let device = self.device().clone();
        let mut index = 0u64;
        let mut new_vars: Vec<(String, Var)> = Vec::new();
        let mut staged = self.clone();
        staged.for_each_linear(&mut |l| {
            if !cfg.matches(l.name()) {
                return Ok(());
            }
            if l.adapter_named(DEFAULT_ADAPTER).is_some() {
                bail!(
                    "{} already has a LoRA adapter (remove it before injecting again)",
                    l.name()
                );
            }
            index += 1;
            let seed = cfg.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let name = l.name().to_string();
            l.init_adapter(cfg.rank, cfg.alpha, cfg.init, seed, &device)?;
            if cfg.dora {
                l.set_magnitude(DEFAULT_ADAPTER, None)?;
            }
            let ad = l
                .adapter_named(DEFAULT_ADAPTER)
                .context("adapter just added")?;
            new_vars.extend(adapter_vars(&name, ad));
            Ok(())
        })?;
        if let (Some(rank), Some(alpha)) = (cfg.conv_rank, cfg.conv_alpha_or_default()) {
            let mut convs = 0;
            staged.for_each_patchable(&mut |p| {
                let shape = p.weight_shape();
                if shape.len() != 4 || !is_locon_target(p.name()) {
                    return Ok(());
                }
                if p.lora_adapters().iter().any(|a| a.name == DEFAULT_ADAPTER) {
                    bail!("{} already has a LoRA adapter", p.name());
                }
                index += 1;
                let seed = cfg.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let ad = LoraAdapter::new_conv(
                    DEFAULT_ADAPTER,
                    &shape,
                    rank,
                    alpha,
                    cfg.init,
                    seed,
                    &device,
                )?;
                new_vars.extend(adapter_vars(p.name(), &ad));
                p.push_lora_adapter(ad)?;
                convs += 1;
                Ok(())
            })?;
            if convs == 0 {
                bail!("LoCon: this model has no resnet or sampler convolutions to adapt");
            }
        }
        register(varmap, new_vars)?;
        *self = staged;
        self.lora_summary()
    }

    /// Attaches the adapters of a LoRA file (any supported layout and kind) as the `default`
    /// adapter. Refuses, naming the tensors, a file with unknown keys or adapters for modules
    /// this model lacks; parts for other components (the text encoder's, for the UNet) are
    /// left to their model. The model is unchanged on error.
    fn apply_lora_file(&mut self, file: &LoraFile, varmap: &VarMap) -> Result<LoraSummary> {
        self.apply_lora_file_as(file, DEFAULT_ADAPTER, varmap)
    }

    /// As [`LoraModel::apply_lora_file`] under adapter name `adapter`, so that several files
    /// stack (their updates add up; each has its own strength, see
    /// [`LoraModel::set_adapter_scale`]).
    fn apply_lora_file_as(
        &mut self,
        file: &LoraFile,
        adapter: &str,
        varmap: &VarMap,
    ) -> Result<LoraSummary> {
        self.load_lora_file(file, &LoraLoad::named(adapter), varmap)?;
        self.lora_summary()
    }

    /// Loads a file's part for this model with `opts` (adapter name, strength, partial loads)
    /// and reports what was applied and what was not.
    fn load_lora_file(
        &mut self,
        file: &LoraFile,
        opts: &LoraLoad,
        varmap: &VarMap,
    ) -> Result<LoraApplied> {
        let index = self.module_index()?;
        let plan = apply::plan(file, &[&index], opts.allow_partial)?;
        let targets = plan
            .targets
            .get(&self.lora_component())
            .cloned()
            .unwrap_or_default();
        if targets.is_empty() {
            bail!(
                "{}: no adapters for the {} (the file has {})",
                file.path.display(),
                self.lora_component(),
                apply::describe_counts(file)
            );
        }
        self.apply_planned(file, &targets, opts, varmap)?;
        Ok(LoraApplied::new(file, &plan, &opts.adapter, &[&index]))
    }

    /// Applies planned entries (`(entry index, module path)`, from [`apply::plan`]): plain
    /// LoRA on linear layers as trainable `A`/`B` adapters, everything else as weight
    /// patches. All or nothing.
    fn apply_planned(
        &mut self,
        file: &LoraFile,
        targets: &[(usize, String)],
        opts: &LoraLoad,
        varmap: &VarMap,
    ) -> Result<()> {
        if !opts.strength.is_finite() {
            bail!("LoRA strength must be finite, got {}", opts.strength);
        }
        let linears = self.linear_names()?;
        let linears = apply::set_of(&linears);
        let mut by_module: std::collections::HashMap<&str, &LoraEntry> = Default::default();
        for (i, m) in targets {
            by_module.insert(m.as_str(), &file.entries[*i]);
        }
        let adapter = opts.adapter.as_str();
        let show = file.path.display();
        let mut staged = self.clone();
        let mut new_vars = Vec::new();
        staged.for_each_linear(&mut |l| {
            let Some(e) = by_module.get(l.name()) else {
                return Ok(());
            };
            // one adapter name per layer, whether trainable or a patch
            if l.adapter_named(adapter).is_some()
                || l.patches().list().iter().any(|x| x.adapter == adapter)
            {
                bail!("{}: already has an adapter named `{adapter}`", l.name());
            }
            if !e.is_plain_lora() {
                return Ok(());
            }
            let PatchWeights::Lora { down, up, .. } = &e.weights else {
                return Ok(());
            };
            let alpha = e.effective_alpha().unwrap_or(1.0);
            let name = l.name().to_string();
            let err = |err: anyhow::Error| anyhow::anyhow!("{show}: `{}`: {err}", e.keys[0]);
            l.add_adapter(adapter, down.clone(), up.clone(), alpha)
                .map_err(err)?;
            if let Some(m) = &e.dora_scale {
                l.set_magnitude(adapter, Some(m.clone())).map_err(err)?;
            }
            let ad = l.adapter_named(adapter).context("adapter just added")?;
            new_vars.extend(adapter_vars(&name, ad));
            for ad in l.adapters_mut().iter_mut().filter(|a| a.name == adapter) {
                ad.scale = opts.strength;
            }
            Ok(())
        })?;
        staged.for_each_patchable(&mut |p| {
            let Some(e) = by_module.get(p.name()) else {
                return Ok(());
            };
            if e.is_plain_lora() && linears.contains(p.name()) {
                return Ok(());
            }
            if p.patches().list().iter().any(|x| x.adapter == adapter) {
                bail!(
                    "{}: already patched by an adapter named `{adapter}`",
                    p.name()
                );
            }
            let mut patch =
                WeightPatch::new(adapter, e.weights.clone(), e.alpha, e.dora_scale.clone());
            patch.scale = opts.strength;
            p.add_patch(patch)
                .map_err(|err| anyhow::anyhow!("{show}: `{}`: {err:#}", e.keys[0]))
        })?;
        register(varmap, new_vars)?;
        *self = staged;
        Ok(())
    }

    /// Counts of adapted layers and parameters.
    fn lora_summary(&self) -> Result<LoraSummary> {
        let mut layers = Vec::new();
        self.visit_patchables(&mut |l| {
            let shape = l.weight_shape();
            for ad in l.lora_adapters() {
                layers.push(LoraLayerInfo {
                    name: l.name().to_string(),
                    adapter: ad.name.clone(),
                    in_dim: shape[1..].iter().product(),
                    out_dim: shape[0],
                    conv: ad.is_conv(),
                    rank: ad.rank(),
                    alpha: ad.alpha,
                    params: ad.num_params(),
                });
            }
            Ok(())
        })?;
        let trainable: usize = layers.iter().map(|l| l.params).sum();
        let (mut patched_layers, mut patch_params) = (0, 0);
        self.visit_patchables(&mut |p| {
            if !p.patches().is_empty() {
                patched_layers += 1;
                patch_params += p
                    .patches()
                    .list()
                    .iter()
                    .map(|x| x.weights.num_params())
                    .sum::<usize>();
            }
            Ok(())
        })?;
        Ok(LoraSummary {
            lora_layers: layers.len(),
            trainable_params: trainable,
            total_params: self.base_param_count() + trainable,
            layers,
            patched_layers,
            patch_params,
        })
    }

    /// The LoRA tensors, `(<module>.lora_A.weight | lora_B.weight, var)` for the `default`
    /// adapter, `<module>.lora_A.<adapter>.weight` for others (PEFT's naming).
    #[doc(alias = "freeze_non_lora_params")]
    fn lora_vars(&self) -> Result<Vec<(String, Var)>> {
        let mut out = Vec::new();
        self.visit_patchables(&mut |l| {
            for ad in l.lora_adapters() {
                out.extend(adapter_vars(l.name(), ad));
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Each layer's main trainable adapter (`default`, else its first) as files store it
    /// (see [`io::save_adapters`]).
    fn adapted_layers(&self) -> Result<Vec<io::AdaptedLayer>> {
        let c = self.lora_component();
        let mut out = Vec::new();
        self.visit_patchables(&mut |p| {
            let ads = p.lora_adapters();
            let Some(ad) = ads
                .iter()
                .find(|a| a.name == DEFAULT_ADAPTER)
                .or(ads.first())
            else {
                return Ok(());
            };
            let shape = p.weight_shape();
            out.push(io::AdaptedLayer {
                component: c,
                module: io::file_module(c, p.name()),
                adapter: ad.clone(),
                conv1x1: p.is_conv() && shape.len() == 2,
                out_dim: shape[0],
            });
            Ok(())
        })?;
        Ok(out)
    }

    /// Names of the adapters present (trainable ones and weight patches), in first-seen
    /// order.
    fn adapter_names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = Vec::new();
        self.visit_patchables(&mut |l| {
            for ad in l.lora_adapters() {
                if !names.contains(&ad.name) {
                    names.push(ad.name.clone());
                }
            }
            Ok(())
        })?;
        self.visit_patchables(&mut |p| {
            for x in p.patches().list() {
                if !names.contains(&x.adapter) {
                    names.push(x.adapter.clone());
                }
            }
            Ok(())
        })?;
        Ok(names)
    }

    /// Fails, before anything changes, when a layer is merged (`what` says what was asked).
    fn ensure_unmerged(&self, what: &str) -> Result<()> {
        self.visit_linears(&mut |l| {
            if l.is_merged() {
                bail!("{}: unmerge before {what}", l.name());
            }
            Ok(())
        })
    }

    /// Runtime strength of adapter `name` only.
    fn set_adapter_scale(&mut self, name: &str, scale: f64) -> Result<()> {
        if !scale.is_finite() {
            bail!("LoRA scale must be finite, got {scale}");
        }
        let names = self.adapter_names()?;
        if !names.iter().any(|n| n == name) {
            bail!(
                "no LoRA adapter named `{name}` (have: {})",
                names.join(", ")
            );
        }
        self.ensure_unmerged("changing the LoRA scale")?;
        self.for_each_patchable(&mut |l| {
            for ad in l.lora_adapters_mut().iter_mut().filter(|a| a.name == name) {
                ad.scale = scale;
            }
            Ok(())
        })?;
        self.for_each_patchable(&mut |p| {
            p.update_patches(&mut |x| {
                if x.adapter == name {
                    x.scale = scale;
                }
            })
        })
    }

    /// Runtime strength of every adapter (0 = base model, 1 = as trained).
    fn set_lora_scale(&mut self, scale: f64) -> Result<()> {
        if !scale.is_finite() {
            bail!("LoRA scale must be finite, got {scale}");
        }
        self.ensure_unmerged("changing the LoRA scale")?;
        self.for_each_patchable(&mut |l| {
            for ad in l.lora_adapters_mut() {
                ad.scale = scale;
            }
            Ok(())
        })?;
        self.for_each_patchable(&mut |p| p.update_patches(&mut |x| x.scale = scale))
    }

    /// Switches every adapter on or off without touching its weights.
    fn set_lora_enabled(&mut self, enabled: bool) -> Result<()> {
        self.ensure_unmerged("enabling or disabling LoRA")?;
        self.for_each_patchable(&mut |l| {
            for ad in l.lora_adapters_mut() {
                ad.enabled = enabled;
            }
            Ok(())
        })?;
        self.for_each_patchable(&mut |p| p.update_patches(&mut |x| x.enabled = enabled))
    }

    /// Folds every adapter into its base weight (inference speed-up; undo with `unmerge_lora`).
    fn merge_lora(&mut self) -> Result<()> {
        self.for_each_linear(&mut |l| l.merge())
    }

    /// Restores the exact base weights saved by `merge_lora`.
    fn unmerge_lora(&mut self) -> Result<()> {
        self.for_each_linear(&mut |l| l.unmerge())
    }

    /// Removes every adapter and weight patch (the model is the base model again).
    fn remove_lora(&mut self) -> Result<()> {
        self.for_each_patchable(&mut |p| {
            p.clear_lora_adapters()?;
            p.clear_patches();
            Ok(())
        })
    }
}

/// The trainable tensors of one adapter under PEFT's names: `lora_A`, `lora_B` and, for DoRA,
/// `lora_magnitude_vector`.
fn adapter_vars(module: &str, ad: &LoraAdapter) -> Vec<(String, Var)> {
    let mut v = vec![
        (var_name(module, &ad.name, "A"), ad.a.clone()),
        (var_name(module, &ad.name, "B"), ad.b.clone()),
    ];
    if let Some(m) = &ad.magnitude {
        let n = if ad.name == DEFAULT_ADAPTER {
            format!("{module}.lora_magnitude_vector")
        } else {
            format!("{module}.lora_magnitude_vector.{}", ad.name)
        };
        v.push((n, m.clone()));
    }
    v
}

/// `<module>.lora_A.weight` for the default adapter, `<module>.lora_A.<adapter>.weight` else.
fn var_name(module: &str, adapter: &str, ab: &str) -> String {
    if adapter == DEFAULT_ADAPTER {
        format!("{module}.lora_{ab}.weight")
    } else {
        format!("{module}.lora_{ab}.{adapter}.weight")
    }
}

fn register(varmap: &VarMap, vars: Vec<(String, Var)>) -> Result<()> {
    let data = varmap.data();
    let mut map = data
        .lock()
        .map_err(|_| anyhow::anyhow!("the VarMap's lock is poisoned (a panic while training?)"))?;
    for (name, v) in vars {
        map.insert(name, v);
    }
    Ok(())
}

/// One adapted layer.
#[derive(Debug, Clone, Serialize)]
pub struct LoraLayerInfo {
    pub name: String,
    /// Adapter name (`default` unless loaded under another name).
    pub adapter: String,
    /// Inputs per output (`in`, or `in·k·k` for a convolution).
    pub in_dim: usize,
    pub out_dim: usize,
    /// A convolution's (LoCon) adapter.
    pub conv: bool,
    pub rank: usize,
    pub alpha: f64,
    pub params: usize,
}

/// What an injection produced: the tutorial's "96 LoRA layers, 2,390,016 trainable,
/// 861,910,980 total, 0.28%".
#[derive(Debug, Clone, Serialize)]
pub struct LoraSummary {
    pub lora_layers: usize,
    pub trainable_params: usize,
    /// Base parameters plus LoRA parameters (as PEFT counts them).
    pub total_params: usize,
    pub layers: Vec<LoraLayerInfo>,
    /// Layers whose weight a loaded file patches (LoCon convolutions, LoHa, LoKr, DoRA, full;
    /// not trainable, not in `layers`).
    pub patched_layers: usize,
    /// Values stored by those patches.
    pub patch_params: usize,
}

impl LoraSummary {
    /// Trainable / total.
    pub fn trainable_ratio(&self) -> f64 {
        if self.total_params == 0 {
            0.0
        } else {
            self.trainable_params as f64 / self.total_params as f64
        }
    }

    /// One JSON object: `lora_layers`, `trainable_params`, `total_params`, `trainable_ratio`,
    /// `layers`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["trainable_ratio"] = serde_json::json!(self.trainable_ratio());
        v
    }

    /// Shows the summary as a small HTML table in an evcxr notebook cell.
    pub fn evcxr_display(&self) {
        println!(
            "EVCXR_BEGIN_CONTENT text/html\n<table><tr><td>LoRA layers</td><td>{}</td></tr><tr><td>trainable params</td><td>{}</td></tr><tr><td>total params</td><td>{}</td></tr><tr><td>trainable ratio</td><td>{:.2}%</td></tr></table>\nEVCXR_END_CONTENT",
            self.lora_layers,
            group_digits(self.trainable_params),
            group_digits(self.total_params),
            100.0 * self.trainable_ratio()
        );
    }
}

impl std::fmt::Display for LoraSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "LoRA layers:      {}", self.lora_layers)?;
        writeln!(
            f,
            "trainable params: {}",
            group_digits(self.trainable_params)
        )?;
        writeln!(f, "total params:     {}", group_digits(self.total_params))?;
        write!(
            f,
            "trainable ratio:  {:.2}%",
            100.0 * self.trainable_ratio()
        )?;
        if self.patched_layers > 0 {
            write!(
                f,
                "\npatched layers:   {} ({} values, frozen)",
                self.patched_layers,
                group_digits(self.patch_params)
            )?;
        }
        Ok(())
    }
}

/// `2390016` -> `2,390,016`.
pub fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
