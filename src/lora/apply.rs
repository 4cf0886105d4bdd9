//! Matching a [`LoraFile`] against models and accounting for every tensor: each entry is
//! applied to a module, or is for a component the caller did not load (counted), or is
//! refused with its name (unknown keys, modules the model lacks) unless a partial load was
//! asked for, which then warns with the same names.

use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

use super::file::{list_names, LoraEntry, LoraFile};
use super::keys::Component;

/// How to load a LoRA file.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraLoad {
    /// Adapter name (several files stack under different names). Default `default`.
    pub adapter: String,
    /// Strength (1 = as trained). Default 1.
    pub strength: f64,
    /// Load what matches and warn about the rest instead of refusing the file. Default false.
    pub allow_partial: bool,
}

impl Default for LoraLoad {
    fn default() -> Self {
        Self {
            adapter: super::DEFAULT_ADAPTER.to_string(),
            strength: 1.0,
            allow_partial: false,
        }
    }
}

impl LoraLoad {
    pub fn named(adapter: &str) -> Self {
        Self {
            adapter: adapter.to_string(),
            ..Self::default()
        }
    }
    pub fn with_strength(mut self, s: f64) -> Self {
        self.strength = s;
        self
    }
    pub fn partial(mut self, allow: bool) -> Self {
        self.allow_partial = allow;
        self
    }
}

/// The names under which a model's modules may appear in files: the diffusers path, its
/// aliases (CompVis names, `text_model.` with or without), each also with `_` for `.`.
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    pub component: Component,
    map: HashMap<String, String>,
    convs: HashSet<String>,
}

impl ModuleIndex {
    /// `modules` are the model's patchable module paths, each with whether it is a
    /// convolution; `aliases` are (alias, module) pairs.
    pub fn new(
        component: Component,
        modules: &[(String, bool)],
        aliases: &[(String, String)],
    ) -> Self {
        let convs = modules
            .iter()
            .filter(|(_, c)| *c)
            .map(|(m, _)| m.clone())
            .collect();
        let mut map = HashMap::new();
        let mut add = |name: &str, module: &str| {
            map.entry(name.to_string())
                .or_insert_with(|| module.to_string());
            map.entry(name.replace('.', "_"))
                .or_insert_with(|| module.to_string());
        };
        for (m, _) in modules {
            add(m, m);
        }
        for (a, m) in aliases {
            add(a, m);
        }
        Self {
            component,
            map,
            convs,
        }
    }

    /// Is module path `module` a convolution (k x k or 1x1)?
    pub fn is_conv(&self, module: &str) -> bool {
        self.convs.contains(module)
    }

    /// The module an entry's name resolves to.
    pub fn resolve(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(|s| s.as_str())
    }
}

/// Which entries of a file go to which module of one component.
#[derive(Debug, Clone, Default)]
pub struct LoraPlan {
    /// (entry index in `file.entries`, module path) per loaded component.
    pub targets: BTreeMap<Component, Vec<(usize, String)>>,
    /// Entries for components that were not loaded: (component, entries, tensors).
    pub not_loaded: BTreeMap<Component, (usize, usize)>,
    /// Keys left out of a partial load (unknown keys and entries matching no module).
    pub left_out: Vec<String>,
}

/// Matches `file` against `models`; refuses unknown keys and unmatched entries unless
/// `allow_partial` (then they are in [`LoraPlan::left_out`]).
pub fn plan(file: &LoraFile, models: &[&ModuleIndex], allow_partial: bool) -> Result<LoraPlan> {
    let (mut out, unmatched) = match_entries(file, models)?;
    let mut problems = Vec::new();
    if !file.unknown.is_empty() {
        problems.push(format!(
            "{} tensor(s) of no known LoRA layout: {}",
            file.unknown.len(),
            list_names(&file.unknown, 5)
        ));
    }
    if !unmatched.is_empty() {
        problems.push(format!(
            "{} adapter(s) for modules this model does not have (a LoRA for another architecture?): {}",
            unmatched.len(),
            list_names(&unmatched, 5)
        ));
    }
    if !problems.is_empty() {
        if !allow_partial {
            bail!(
                "{}: {}. Nothing was loaded; to load the rest anyway, pass --allow-partial-lora (API: LoraLoad::partial(true))",
                file.path.display(),
                problems.join("; ")
            );
        }
        eprintln!(
            "warning: {}: partial load, left out {}",
            file.path.display(),
            problems.join("; ")
        );
        out.left_out = file.unknown.clone();
        out.left_out.extend(unmatched);
    }
    Ok(out)
}

/// Matches entries to modules without judging: the plan and the first key of each entry
/// that matches no module of its (loaded) component.
pub fn match_entries(file: &LoraFile, models: &[&ModuleIndex]) -> Result<(LoraPlan, Vec<String>)> {
    let mut out = LoraPlan::default();
    let mut unmatched: Vec<String> = Vec::new();
    for (i, e) in file.entries.iter().enumerate() {
        match models.iter().find(|m| m.component == e.component) {
            None => {
                let n = out.not_loaded.entry(e.component).or_default();
                n.0 += 1;
                n.1 += e.keys.len();
            }
            Some(m) => match m.resolve(&e.module) {
                Some(module) => out
                    .targets
                    .entry(e.component)
                    .or_default()
                    .push((i, module.to_string())),
                None => unmatched.push(describe(e)),
            },
        }
    }
    // two entries on one module (e.g. the same layer under two name layouts) would add twice
    for list in out.targets.values() {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, m) in list {
            if let Some(j) = seen.insert(m.as_str(), *i) {
                bail!(
                    "{}: `{}` and `{}` both adapt module `{m}`",
                    file.path.display(),
                    file.entries[j].keys[0],
                    file.entries[*i].keys[0]
                );
            }
        }
    }
    Ok((out, unmatched))
}

fn describe(e: &LoraEntry) -> String {
    e.keys.first().cloned().unwrap_or_else(|| e.module.clone())
}

/// `12 text encoder, 3 second text encoder (SDXL) adapters`: the file's entries per component.
pub fn describe_counts(file: &LoraFile) -> String {
    let mut n: BTreeMap<Component, usize> = BTreeMap::new();
    for e in &file.entries {
        *n.entry(e.component).or_default() += 1;
    }
    let parts: Vec<String> = n.iter().map(|(c, k)| format!("{k} {c}")).collect();
    format!("{} adapters", parts.join(", "))
}

/// What loading a file did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoraApplied {
    pub adapter: String,
    /// Applied layers per (component, kind, convolution?, DoRA?).
    pub applied: BTreeMap<String, usize>,
    /// Entries and tensors for components not loaded here.
    pub not_loaded: Vec<(String, usize, usize)>,
    /// Keys left out of a partial load.
    pub left_out: Vec<String>,
}

impl LoraApplied {
    pub(crate) fn new(
        file: &LoraFile,
        plan: &LoraPlan,
        adapter: &str,
        models: &[&ModuleIndex],
    ) -> Self {
        let mut applied = BTreeMap::new();
        for (c, list) in &plan.targets {
            let index = models.iter().find(|m| m.component == *c);
            for (i, module) in list {
                let e = &file.entries[*i];
                let conv = index.map_or(e.is_spatial(), |m| m.is_conv(module));
                *applied.entry(layer_kind(*c, e, conv)).or_default() += 1;
            }
        }
        Self {
            adapter: adapter.to_string(),
            applied,
            not_loaded: plan
                .not_loaded
                .iter()
                .map(|(c, (n, k))| (c.to_string(), *n, *k))
                .collect(),
            left_out: plan.left_out.clone(),
        }
    }

    /// Layers applied in all.
    pub fn layers(&self) -> usize {
        self.applied.values().sum()
    }
}

/// `UNet conv LoHa`, `text encoder linear LoRA+DoRA`, ...
pub fn layer_kind(c: Component, e: &LoraEntry, conv: bool) -> String {
    format!(
        "{c} {} {}{}",
        if conv { "conv" } else { "linear" },
        e.kind(),
        if e.dora_scale.is_some() { "+DoRA" } else { "" }
    )
}

impl std::fmt::Display for LoraApplied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .applied
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        write!(
            f,
            "LoRA `{}`: {} layers ({})",
            self.adapter,
            self.layers(),
            parts.join(", ")
        )?;
        for (c, n, k) in &self.not_loaded {
            write!(
                f,
                "; {n} {c} adapters ({k} tensors) not used: that component is not loaded"
            )?;
        }
        if !self.left_out.is_empty() {
            write!(f, "; left out: {}", list_names(&self.left_out, 5))?;
        }
        Ok(())
    }
}

/// A set of names (membership helper).
pub(crate) fn set_of(v: &[String]) -> HashSet<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

/// One row of [`kind_table`]: a kind of layer in a file.
#[derive(Debug, Clone, Default)]
pub struct KindRow {
    pub layers: usize,
    /// Distinct ranks, sorted (empty for kinds without rank).
    pub ranks: Vec<usize>,
    /// Distinct alphas as printed (`-` for kinds without alpha).
    pub alphas: Vec<String>,
    /// `(rank, alpha)` -> the modules with it, when the row has several.
    pub groups: BTreeMap<(Option<usize>, String), Vec<String>>,
}

/// The file's entries per (component, kind, conv, DoRA) for `inspect-lora` and `convert`.
/// Convolutions are told by the matched module in `models`, else by the tensors' shapes.
pub fn kind_table(file: &LoraFile, models: &[&ModuleIndex]) -> BTreeMap<String, KindRow> {
    let mut t: BTreeMap<String, KindRow> = BTreeMap::new();
    for e in &file.entries {
        let index = models.iter().find(|m| m.component == e.component);
        let module = index.and_then(|m| m.resolve(&e.module));
        let conv = match (index, module) {
            (Some(i), Some(m)) => i.is_conv(m),
            _ => e.is_spatial(),
        };
        let row = t.entry(layer_kind(e.component, e, conv)).or_default();
        row.layers += 1;
        let r = e.weights.rank();
        if let Some(r) = r {
            if !row.ranks.contains(&r) {
                row.ranks.push(r);
            }
        }
        let a = e
            .effective_alpha()
            .map_or("-".to_string(), |a| format!("{a}"));
        if !row.alphas.contains(&a) {
            row.alphas.push(a.clone());
        }
        row.groups
            .entry((r, a))
            .or_default()
            .push(module.unwrap_or(&e.module).to_string());
    }
    for row in t.values_mut() {
        row.ranks.sort();
        if row.groups.len() < 2 {
            row.groups.clear();
        }
    }
    t
}

/// Module path -> (weight shape, bias length) of every patchable layer of `m`.
pub type LayerShapes = HashMap<String, (Vec<usize>, Option<usize>)>;

/// The shapes of `m`'s patchable layers (for checks without touching weights).
pub fn layer_shapes<M: super::LoraModel>(m: &M) -> Result<LayerShapes> {
    let mut out = HashMap::new();
    m.visit_patchables(&mut |p| {
        out.insert(p.name().to_string(), (p.weight_shape(), p.bias_len()));
        Ok(())
    })?;
    Ok(out)
}

/// `key: error` for each planned adapter whose tensors do not fit its layer.
pub fn shape_mismatches(
    file: &LoraFile,
    plan: &LoraPlan,
    shapes: &[(Component, &LayerShapes)],
) -> Vec<String> {
    let mut out = Vec::new();
    for (c, list) in &plan.targets {
        let Some((_, s)) = shapes.iter().find(|(x, _)| x == c) else {
            continue;
        };
        for (i, module) in list {
            let e = &file.entries[*i];
            if let Some((shape, bias)) = s.get(module) {
                let p = super::WeightPatch::new(
                    "check",
                    e.weights.clone(),
                    e.alpha,
                    e.dora_scale.clone(),
                );
                if let Err(err) = p.check(shape, *bias) {
                    out.push(format!("`{}`: {err:#}", e.keys[0]));
                }
            }
        }
    }
    out
}
