//! LoRA hyper-parameters: rank, alpha, which modules to adapt and how to initialise.

use serde::{Deserialize, Serialize};

/// How the down-projection `A` is initialised (`B` always starts at zero, so a freshly
/// injected model computes exactly what the base model computes).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum LoraInit {
    /// `A ~ N(0, std^2)`; the tutorial uses `std = 0.01`.
    Normal { std: f64 },
    /// `A ~ U(-1/sqrt(in), 1/sqrt(in))`: PyTorch's kaiming-uniform with `a = sqrt(5)`, the
    /// default of PEFT and kohya sd-scripts.
    KaimingUniform,
}

impl Default for LoraInit {
    fn default() -> Self {
        LoraInit::Normal { std: 0.01 }
    }
}

/// Module names LoRA can be injected into (suffixes of diffusers module paths).
pub const INJECTABLE: &[&str] = &[
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
];

/// Module names LoRA can be injected into in the CLIP text encoder: its attention projections
/// and MLP (kohya's and PEFT's text-encoder targets).
pub const TEXT_INJECTABLE: &[&str] = &["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];

/// LoRA configuration (the tutorial's `LoRALayer` arguments). `Default` is the tutorial's: rank 16, alpha 32, `to_q,to_k,to_v` of
/// every self- (`attn1`) and cross-attention (`attn2`), `A ~ N(0, 0.01^2)`, `B = 0`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Inner dimension `r` of `B (d x r)` and `A (r x k)`. Default 16.
    pub rank: usize,
    /// The update is scaled by `alpha / rank`. Default 32 (scale 2).
    pub alpha: f64,
    /// Module-name targets, matched like PEFT's `target_modules`: a module is adapted when its
    /// path equals a target or ends with `.` + target. `to_q` hits both attentions,
    /// `attn1.to_q` only self-attention. Default `["to_q", "to_k", "to_v"]`.
    pub targets: Vec<String>,
    /// Initialisation of `A`. Default `Normal { std: 0.01 }` (the tutorial).
    pub init: LoraInit,
    /// Seed of the initialisation. Default 202509 (the tutorial's seed).
    pub seed: u64,
    /// DoRA: each adapted layer also learns a magnitude per output row (see
    /// [`crate::lora::LoraAdapter::magnitude`]). Default false (plain LoRA).
    #[serde(default)]
    pub dora: bool,
    /// LoCon: also adapt the UNet's convolutions inside resnets and down/upsamplers
    /// (`conv1`, `conv2`, `conv_shortcut`, `downsamplers.0.conv`, `upsamplers.0.conv`; not
    /// `conv_in`/`conv_out`) with this rank (kohya's `conv_dim`). Default None (linear layers
    /// only).
    #[serde(default)]
    pub conv_rank: Option<usize>,
    /// Alpha of the conv adapters (kohya's `conv_alpha`). Default None = 2 x `conv_rank`
    /// (our alpha default; kohya's is 1).
    #[serde(default)]
    pub conv_alpha: Option<f64>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: Self::default_alpha(16),
            targets: vec!["to_q".into(), "to_k".into(), "to_v".into()],
            init: LoraInit::default(),
            seed: 202509,
            dora: false,
            conv_rank: None,
            conv_alpha: None,
        }
    }
}

impl LoraConfig {
    /// The tutorial's configuration (same as `Default`).
    pub fn tutorial() -> Self {
        Self::default()
    }

    /// The alpha used when none is given: 2 x rank (the tutorial's choice, scale 2).
    pub fn default_alpha(rank: usize) -> f64 {
        2.0 * rank as f64
    }

    /// `rank` with alpha = [`LoraConfig::default_alpha`], default targets and init.
    pub fn with_rank(rank: usize) -> Self {
        Self::new(rank, Self::default_alpha(rank))
    }

    /// `rank` and `alpha` with the default targets and init.
    pub fn new(rank: usize, alpha: f64) -> Self {
        Self {
            rank,
            alpha,
            ..Self::default()
        }
    }

    /// Replaces the targets (see [`LoraConfig::targets`]).
    pub fn with_targets<S: AsRef<str>>(mut self, targets: &[S]) -> Self {
        self.targets = targets.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    pub fn with_init(mut self, init: LoraInit) -> Self {
        self.init = init;
        self
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// DoRA instead of plain LoRA (see [`LoraConfig::dora`]).
    pub fn with_dora(mut self, dora: bool) -> Self {
        self.dora = dora;
        self
    }

    /// LoCon: conv adapters of rank `rank` and alpha `alpha` (None = 2 x rank) next to the
    /// linear ones (see [`LoraConfig::conv_rank`]).
    pub fn with_conv(mut self, rank: usize, alpha: Option<f64>) -> Self {
        self.conv_rank = Some(rank);
        self.conv_alpha = alpha;
        self
    }

    /// The conv adapters' alpha (see [`LoraConfig::conv_alpha`]).
    pub fn conv_alpha_or_default(&self) -> Option<f64> {
        self.conv_rank
            .map(|r| self.conv_alpha.unwrap_or(Self::default_alpha(r)))
    }

    /// Parses a comma-separated target list such as `to_q,to_k,to_v,to_out.0`. Shorthands:
    /// `attn` = q,k,v,out.0; `ff` = both feed-forward linears; `all` = every injectable module.
    pub fn parse_targets(s: &str) -> Vec<String> {
        let mut out = Vec::new();
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match t {
                "attn" => out.extend(["to_q", "to_k", "to_v", "to_out.0"].map(String::from)),
                "ff" => out.extend(["ff.net.0.proj", "ff.net.2"].map(String::from)),
                "all" => out.extend(INJECTABLE.iter().map(|s| s.to_string())),
                other => out.push(other.to_string()),
            }
        }
        out.dedup();
        out
    }

    /// The text encoder's configuration for a run with this UNet configuration (kohya's: same
    /// rank, alpha, init and DoRA; targets `targets` (e.g. [`TEXT_INJECTABLE`]), no conv
    /// adapters, its own seed).
    pub fn for_text_encoder<S: AsRef<str>>(&self, targets: &[S]) -> Self {
        Self {
            targets: targets.iter().map(|s| s.as_ref().to_string()).collect(),
            conv_rank: None,
            conv_alpha: None,
            seed: self.seed ^ 0x7465_7874, // "text"
            ..self.clone()
        }
    }

    /// `alpha / rank`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Checks rank, alpha and that every target names an injectable module kind.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.rank == 0 {
            anyhow::bail!("LoRA rank must be at least 1");
        }
        if !self.alpha.is_finite() {
            anyhow::bail!("LoRA alpha must be finite, got {}", self.alpha);
        }
        if self.conv_rank == Some(0) {
            anyhow::bail!("LoCon conv rank must be at least 1");
        }
        if let Some(a) = self.conv_alpha {
            if !a.is_finite() {
                anyhow::bail!("LoCon conv alpha must be finite, got {a}");
            }
        }
        if self.dora && self.conv_rank.is_some() {
            anyhow::bail!(
                "DoRA on convolutions is not supported: train DoRA on the linear layers, or LoCon (conv adapters) without DoRA"
            );
        }
        if self.targets.is_empty() {
            anyhow::bail!(
                "LoRA targets are empty: name at least one of {}",
                INJECTABLE.join(", ")
            );
        }
        for t in &self.targets {
            if !INJECTABLE
                .iter()
                .chain(TEXT_INJECTABLE)
                .any(|k| t == k || t.ends_with(&format!(".{k}")))
            {
                anyhow::bail!(
                    "unknown LoRA target `{t}`: targets must end in one of {} (UNet) or {} (text encoder)",
                    INJECTABLE.join(", "),
                    TEXT_INJECTABLE.join(", ")
                );
            }
        }
        Ok(())
    }

    /// Does module path `name` match one of the targets?
    pub fn matches(&self, name: &str) -> bool {
        self.targets.iter().any(|t| target_matches(t, name))
    }
}

/// Is module `name` a LoCon target: a convolution inside a resnet or a down/upsampler (kohya's
/// `ResnetBlock2D`, `Downsample2D`, `Upsample2D`)?
pub fn is_locon_target(name: &str) -> bool {
    [".resnets.", ".downsamplers.", ".upsamplers."]
        .iter()
        .any(|p| name.contains(p))
}

/// PEFT-style suffix match: `name == target` or `name` ends with `.target`.
pub fn target_matches(target: &str, name: &str) -> bool {
    name == target
        || (name.len() > target.len()
            && name.ends_with(target)
            && name.as_bytes()[name.len() - target.len() - 1] == b'.')
}
