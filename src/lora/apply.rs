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

/// One patchable layer of a model: its module path, weight shape (`[out, in]` or
/// `[out, in, k, k]`), bias length and whether it is a convolution.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerInfo {
    pub module: String,
    pub shape: Vec<usize>,
    pub bias: Option<usize>,
    pub conv: bool,
}

/// The names under which a model's modules may appear in files: the diffusers path, its
/// aliases (CompVis names, `text_model.` with or without), each also with `_` for `.`; and
/// each module's shape, to check adapters before anything is applied.
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    pub component: Component,
    map: HashMap<String, String>,
    /// Names that two different modules share (refused rather than guessed).
    ambiguous: HashMap<String, (String, String)>,
    layers: HashMap<String, LayerInfo>,
}

impl ModuleIndex {
    /// `layers` are the model's patchable layers; `aliases` are (alias, module) pairs.
    pub fn new(component: Component, layers: Vec<LayerInfo>, aliases: &[(String, String)]) -> Self {
        let mut map: HashMap<String, String> = HashMap::new();
        let mut ambiguous = HashMap::new();
        let mut add = |name: String, module: &str| match map.get(&name) {
            Some(m) if m != module => {
                ambiguous.insert(name, (m.clone(), module.to_string()));
            }
            Some(_) => {}
            None => {
                map.insert(name, module.to_string());
            }
        };
        for l in &layers {
            add(l.module.clone(), &l.module);
            add(l.module.replace('.', "_"), &l.module);
        }
        for (a, m) in aliases {
            add(a.clone(), m);
            add(a.replace('.', "_"), m);
        }
        Self {
            component,
            map,
            ambiguous,
            layers: layers.into_iter().map(|l| (l.module.clone(), l)).collect(),
        }
    }

    /// Is module path `module` a convolution (k x k or 1x1)?
    pub fn is_conv(&self, module: &str) -> bool {
        self.layers.get(module).is_some_and(|l| l.conv)
    }

    /// The layer behind module path `module`.
    pub fn layer(&self, module: &str) -> Option<&LayerInfo> {
        self.layers.get(module)
    }

    /// The module an entry's name resolves to; an error names both modules when two share it.
    pub fn resolve(&self, name: &str) -> Result<Option<&str>> {
        if let Some((a, b)) = self.ambiguous.get(name) {
            bail!(
                "`{name}` names both `{a}` and `{b}` of the {}",
                self.component
            );
        }
        Ok(self.map.get(name).map(|s| s.as_str()))
    }
}

/// Which entries of a file go to which module of one component.
#[derive(Debug, Clone, Default)]
pub struct LoraPlan {
    /// (entry index in `file.entries`, module path) per loaded component.
    pub targets: BTreeMap<Component, Vec<(usize, String)>>,
    /// Entries for components that were not loaded: (component, entries, tensors).
    pub not_loaded: BTreeMap<Component, (usize, usize)>,
    /// Keys left out of a partial load (unknown or malformed keys, entries matching no module
    /// or not fitting it).
    pub left_out: Vec<String>,
}

/// How a file matches models, before any judgement (see [`match_entries`]).
#[derive(Debug, Clone, Default)]
pub struct Matching {
    /// The entries that match a module and fit it.
    pub plan: LoraPlan,
    /// First keys of entries that match no module.
    pub unmatched: Vec<String>,
    /// `key: why` for entries that match a module but do not fit it.
    pub misfits: Vec<String>,
}

/// Matches `file` against `models`; refuses unknown or malformed keys and entries that match
/// no module or do not fit it, unless `allow_partial` (then they are in
/// [`LoraPlan::left_out`] and a warning names them).
pub fn plan(file: &LoraFile, models: &[&ModuleIndex], allow_partial: bool) -> Result<LoraPlan> {
    let Matching {
        mut plan,
        unmatched,
        misfits,
    } = match_entries(file, models)?;
    let mut problems = Vec::new();
    let mut left_out = Vec::new();
    let mut report = |what: &str, names: &[String]| {
        if !names.is_empty() {
            problems.push(format!("{} {what}: {}", names.len(), list_names(names, 5)));
            left_out.extend(names.iter().cloned());
        }
    };
    report("tensor(s) of no known LoRA layout", &file.unknown);
    report("malformed adapter(s)", &file.invalid);
    report(
        "adapter(s) for modules this model does not have (a LoRA for another architecture?)",
        &unmatched,
    );
    report("adapter(s) that do not fit their layer", &misfits);
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
        plan.left_out = left_out;
    }
    Ok(plan)
}

/// Matches entries to modules and checks that each fits its layer, without judging.
pub fn match_entries(file: &LoraFile, models: &[&ModuleIndex]) -> Result<Matching> {
    let mut out = Matching::default();
    for (i, e) in file.entries.iter().enumerate() {
        let Some(m) = models.iter().find(|m| m.component == e.component) else {
            let n = out.plan.not_loaded.entry(e.component).or_default();
            n.0 += 1;
            n.1 += e.keys.len();
            continue;
        };
        let module = match m.resolve(&e.module) {
            Ok(Some(module)) => module,
            Ok(None) => {
                out.unmatched.push(describe(e));
                continue;
            }
            Err(why) => {
                out.unmatched.push(format!("{} ({why})", describe(e)));
                continue;
            }
        };
        if let Some(l) = m.layer(module) {
            let p =
                super::WeightPatch::new("check", e.weights.clone(), e.alpha, e.dora_scale.clone());
            if let Err(why) = p.check(&l.shape, l.bias) {
                out.misfits
                    .push(format!("{}: {module}: {why:#}", describe(e)));
                continue;
            }
        }
        out.plan
            .targets
            .entry(e.component)
            .or_default()
            .push((i, module.to_string()));
    }
    // two entries on one module (e.g. the same layer under two name layouts) would add twice
    for list in out.plan.targets.values() {
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
    Ok(out)
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
        let module = index.and_then(|m| m.resolve(&e.module).ok().flatten());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(m: &str) -> LayerInfo {
        LayerInfo {
            module: m.into(),
            shape: vec![4, 4],
            bias: None,
            conv: false,
        }
    }

    #[test]
    fn names_two_modules_share_are_refused_not_guessed() {
        // `a_b.c` and `a.b_c` are both `a_b_c` with underscores
        let idx = ModuleIndex::new(Component::Unet, vec![layer("a_b.c"), layer("a.b_c")], &[]);
        assert_eq!(idx.resolve("a_b.c").unwrap(), Some("a_b.c"));
        let err = idx.resolve("a_b_c").unwrap_err().to_string();
        assert!(err.contains("a_b.c") && err.contains("a.b_c"), "{err}");
        assert_eq!(idx.resolve("nothing").unwrap(), None);
    }
}
