//! The run's configuration: one TOML file, `--set a.b=c` overrides, every error one line with
//! file:line. Host sections (`[model]`, `[train]`, `[data]`) are typed here; component
//! sections (`[router]`, `[experts]`, `[[balance_loss]]`, `[optimizer]`, `[comm]`) name a
//! plugin and carry that plugin's own keys, which the plugin parses.

use pith_plugin_api::{Kind, ModelDims};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The built-in default run: `pith train` with no file trains this (configs/quickstart.toml).
pub const QUICKSTART: &str = include_str!("../../configs/quickstart.toml");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Training sequence length; also the size of the RoPE table.
    pub seq_len: usize,
    #[serde(default = "d_rope_theta")]
    pub rope_theta: f32,
    pub experts: usize,
    pub expert_ffn: usize,
    /// Hidden size of an always-on shared expert (SwiGLU); 0 = none.
    #[serde(default)]
    pub shared_expert_ffn: usize,
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f32,
    #[serde(default = "d_init_std")]
    pub init_std: f32,
    /// RMSNorm of q and k before RoPE: `head` (per head, weights [head_dim]: Qwen3-MoE), `full`
    /// (over the whole projection, weights [heads·head_dim] and [kv_heads·head_dim]: OLMoE) or
    /// `none` (Mixtral).
    #[serde(default)]
    pub qk_norm: QkNorm,
}

/// See [`ModelConfig::qk_norm`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QkNorm {
    #[default]
    Head,
    Full,
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "d_device")]
    pub device: String,
    pub steps: u64,
    pub micro_batch: usize,
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    pub lr: f32,
    /// Final LR as a fraction of `lr`.
    #[serde(default = "d_min_lr_ratio")]
    pub min_lr_ratio: f32,
    #[serde(default)]
    pub warmup: u64,
    /// `cosine`, `wsd` (warmup-stable-decay) or `constant`.
    #[serde(default = "d_schedule")]
    pub schedule: String,
    /// For `wsd`: the fraction of steps spent decaying at the end.
    #[serde(default = "d_decay_frac")]
    pub decay_frac: f32,
    /// Global-norm gradient clipping; 0 = off.
    #[serde(default = "d_one_f")]
    pub clip: f32,
    #[serde(default = "d_one_u")]
    pub seed: u64,
    /// Evaluate on held-out tokens every N steps (and at the end); 0 = only at the end.
    #[serde(default)]
    pub eval_every: u64,
    #[serde(default = "d_eval_batches")]
    pub eval_batches: usize,
    /// Write a checkpoint every N steps (and at the end); 0 = only at the end.
    #[serde(default)]
    pub checkpoint_every: u64,
    /// The run directory: metrics.jsonl, checkpoints, the resolved config.
    #[serde(default = "d_out")]
    pub out: String,
    /// Worker threads for the CPU backend; 0 = all cores.
    #[serde(default)]
    pub threads: usize,
    /// Print the console summary line every N steps (the metrics file gets every step).
    #[serde(default = "d_one_u")]
    pub log_every: u64,
    /// Start from these weights instead of a random init: a Hugging Face folder (config.json +
    /// safetensors, see docs/interop.md) or a Pith checkpoint (a step or run directory; weights
    /// only). Ignored with `--resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `synthetic` (built in, no files) or a token-shard file/directory/glob (`pith data prepare`).
    #[serde(default = "d_source")]
    pub source: String,
    /// Held-out shards for eval; for `synthetic`, a disjoint stream is used.
    #[serde(default)]
    pub val: Option<String>,
}

/// A component table: `plugin = "name"` plus the plugin's own keys.
pub type ComponentTable = toml::Table;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub train: TrainConfig,
    #[serde(default = "d_data")]
    pub data: DataConfig,
    pub router: ComponentTable,
    pub experts: ComponentTable,
    #[serde(default)]
    pub balance_loss: Vec<ComponentTable>,
    pub optimizer: ComponentTable,
    #[serde(default = "d_comm")]
    pub comm: ComponentTable,
    /// Where this config came from (file name or `<built-in quickstart>`) and its text after
    /// overrides; used to point errors at file:line.
    #[serde(skip)]
    pub source: Source,
}

#[derive(Debug, Clone, Default)]
pub struct Source {
    pub file: String,
    pub text: String,
}

fn d_rope_theta() -> f32 {
    10000.0
}
fn d_norm_eps() -> f32 {
    1e-6
}
fn d_init_std() -> f32 {
    0.02
}
fn d_device() -> String {
    "cpu".into()
}
fn d_one() -> usize {
    1
}
fn d_one_u() -> u64 {
    1
}
fn d_one_f() -> f32 {
    1.0
}
fn d_min_lr_ratio() -> f32 {
    0.1
}
fn d_schedule() -> String {
    "cosine".into()
}
fn d_decay_frac() -> f32 {
    0.2
}
fn d_eval_batches() -> usize {
    4
}
fn d_out() -> String {
    "runs/default".into()
}
fn d_source() -> String {
    "synthetic".into()
}
fn d_data() -> DataConfig {
    DataConfig { source: d_source(), val: None }
}
fn d_comm() -> ComponentTable {
    let mut t = toml::Table::new();
    t.insert("plugin".into(), "local".into());
    t
}

impl Config {
    /// Load a config file (or the built-in quickstart when `path` is None) and apply
    /// `--set key.path=value` overrides.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Config, String> {
        let (file, text) = match path {
            Some(p) => (
                p.display().to_string(),
                std::fs::read_to_string(p).map_err(|e| format!("{}: cannot read config: {e}", p.display()))?,
            ),
            None => ("<built-in quickstart>".to_string(), QUICKSTART.to_string()),
        };
        Config::parse(&file, &text, overrides)
    }

    pub fn parse(file: &str, text: &str, overrides: &[String]) -> Result<Config, String> {
        let text = apply_overrides(file, text, overrides)?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| match pith_plugin_api::toml_error(&text, &e) {
            (Some(line), msg) => format!("{file}:{line}: {msg}"),
            (None, msg) => format!("{file}: {msg}"),
        })?;
        cfg.source = Source { file: file.to_string(), text };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Errors a serde type can't express, each naming file:line and the key.
    fn validate(&self) -> Result<(), String> {
        let m = &self.model;
        let t = &self.train;
        let checks: [(&str, &str, bool, String); 8] = [
            (
                "model",
                "heads",
                m.heads == 0 || !m.heads.is_multiple_of(m.kv_heads.max(1)),
                format!("heads ({}) must be a positive multiple of kv_heads ({})", m.heads, m.kv_heads),
            ),
            (
                "model",
                "head_dim",
                !m.head_dim.is_multiple_of(2) || m.head_dim == 0,
                format!("head_dim ({}) must be even and positive (RoPE rotates pairs)", m.head_dim),
            ),
            ("model", "experts", m.experts == 0, "experts must be at least 1".into()),
            ("model", "seq_len", m.seq_len < 2, "seq_len must be at least 2".into()),
            ("train", "micro_batch", t.micro_batch == 0, "micro_batch must be at least 1".into()),
            ("train", "grad_accum", t.grad_accum == 0, "grad_accum must be at least 1".into()),
            (
                "train",
                "schedule",
                !["cosine", "wsd", "constant"].contains(&t.schedule.as_str()),
                format!("schedule `{}` is not one of: cosine, wsd, constant", t.schedule),
            ),
            (
                "train",
                "device",
                !["cpu", "cuda"].contains(&t.device.as_str()),
                format!("device `{}` is not one of: cpu, cuda", t.device),
            ),
        ];
        for (table, key, bad, msg) in checks {
            if bad {
                return Err(format!("{}: {table}.{key}: {msg}", self.at(table, 0, key)));
            }
        }
        Ok(())
    }

    /// `file:line` of `key` in the `n`-th `[table]` (or `[[table]]`) of the config text, or of
    /// the table header when the key is not written there.
    pub fn at(&self, table: &str, n: usize, key: &str) -> String {
        let file = &self.source.file;
        let text = &self.source.text;
        let headers = [format!("[{table}]"), format!("[[{table}]]")];
        let mut seen = 0;
        let mut in_table = false;
        let mut header_line = None;
        for (i, line) in text.lines().enumerate() {
            let l = line.trim();
            if l.starts_with('[') {
                in_table = false;
                if headers.iter().any(|h| l.starts_with(h.as_str())) {
                    if seen == n {
                        in_table = true;
                        header_line = Some(i + 1);
                    }
                    seen += 1;
                }
                continue;
            }
            if in_table {
                if let Some((k, _)) = l.split_once('=') {
                    if k.trim().trim_matches('"') == key {
                        return format!("{file}:{}", i + 1);
                    }
                }
            }
        }
        match header_line {
            Some(l) => format!("{file}:{l}"),
            None => file.clone(),
        }
    }

    /// The component tables in a fixed order: (kind, index within kind, table).
    pub fn components(&self) -> Vec<(Kind, usize, &ComponentTable)> {
        let mut v = vec![(Kind::Router, 0, &self.router), (Kind::Experts, 0, &self.experts)];
        v.extend(self.balance_loss.iter().enumerate().map(|(i, t)| (Kind::BalanceLoss, i, t)));
        v.push((Kind::Optimizer, 0, &self.optimizer));
        v.push((Kind::CommSchedule, 0, &self.comm));
        v
    }

    pub fn dims(&self, layer: usize) -> ModelDims {
        let m = &self.model;
        ModelDims {
            hidden: m.hidden as u32,
            experts: m.experts as u32,
            expert_ffn: m.expert_ffn as u32,
            layer: layer as u32,
            layers: m.layers as u32,
        }
    }

    /// The resolved config as TOML (defaults filled in, overrides applied).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises")
    }
}

/// Apply `a.b=c` overrides to the TOML text, keeping every other line where it was so errors
/// still point at the right line of the file.
fn apply_overrides(file: &str, text: &str, overrides: &[String]) -> Result<String, String> {
    if overrides.is_empty() {
        return Ok(text.to_string());
    }
    let mut doc: toml_edit::DocumentMut =
        text.parse().map_err(|e: toml_edit::TomlError| format!("{file}: {}", e.to_string().replace('\n', " ")))?;
    for o in overrides {
        let (path, value) = o
            .split_once('=')
            .ok_or_else(|| format!("--set {o}: expected key.path=value, e.g. --set train.steps=10"))?;
        let value: toml_edit::Value = value.trim().parse().unwrap_or_else(|_| toml_edit::Value::from(value.trim()));
        let keys: Vec<&str> = path.trim().split('.').collect();
        let (last, parents) = keys.split_last().ok_or_else(|| format!("--set {o}: empty key"))?;
        let mut item = doc.as_item_mut();
        for k in parents {
            item = item
                .get_mut(*k)
                .filter(|i| i.is_table_like())
                .ok_or_else(|| format!("--set {o}: there is no table `{k}` in {file}"))?;
        }
        item[*last] = toml_edit::value(value);
    }
    Ok(doc.to_string())
}
