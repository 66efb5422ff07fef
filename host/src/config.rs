//! The run's configuration: one TOML file, `--set a.b=c` overrides, every error one line with
//! file:line. Host sections (`[model]`, `[train]`, `[data]`) are typed here; component
//! sections (`[router]`, `[experts]`, `[[balance_loss]]`, `[optimizer]`, `[comm]`) name a
//! plugin and carry that plugin's own keys, which the plugin parses.

use crate::params::Shard;
use pith_plugin_api::{toml_error, Kind, ModelDims};
use serde::{Deserialize, Serialize};
use std::path::Path;
use toml_edit::{DocumentMut, Item, Table, TableLike, Value};

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
    /// Moved to a plugin: `[shared] plugin = "shared-swiglu", ffn = N`. Only 0 (old configs and
    /// checkpoints) is accepted; it is not written back.
    #[serde(default, skip_serializing)]
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
    /// q, k and v projections add a trained bias (Qwen2-MoE); o_proj never has one.
    #[serde(default)]
    pub qkv_bias: bool,
    /// Multi-head latent attention (DeepSeek-V2/V3) in place of the q/k/v projections: `[model.mla]`.
    /// `head_dim` is then the q·k head size (its last `rope_dim` dims rotated) and kv_heads = heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mla: Option<Mla>,
    /// RoPE rotates dims (2i, 2i+1) together (DeepSeek's layout) instead of (i, i + D/2).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rope_interleaved: bool,
    /// The first `dense_layers` layers run the `[dense]` component (a dense FFN on every token)
    /// in place of the MoE block: DeepSeek's `first_k_dense_replace`. At least one layer stays MoE.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dense_layers: usize,
    /// YaRN RoPE (`rope_type = "yarn"`): `[model.yarn]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yarn: Option<Yarn>,
    /// A factor on the attention scores' 1/sqrt(head_dim) (1; DeepSeek with YaRN scales them by
    /// mscale(factor, mscale_all_dim)²).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub attn_scale: f32,
    /// o_proj adds a trained bias (GPT-OSS).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub o_bias: bool,
    /// A learned logit per query head joins every row's softmax, taking a share of the mass
    /// without a value (GPT-OSS's attention sinks): `layers.{l}.attn.sinks` [heads].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attn_sinks: bool,
    /// Sliding-window attention: in `window_layers`, a query sees its `sliding_window` most recent
    /// keys, itself included (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sliding_window: usize,
    /// The layers with the window (GPT-OSS: the even ones); absent: every layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_layers: Option<Vec<usize>>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn one() -> f32 {
    1.0
}

fn is_one(x: &f32) -> bool {
    *x == 1.0
}

/// YaRN's RoPE (Peng et al. 2023, arXiv:2309.00071) as transformers computes it: each frequency
/// θ_i = rope_theta^(−2i/D) blends θ_i/`factor` (interpolation) into θ_i (extrapolation) by a ramp
/// over the dims whose wavelengths fall between `beta_fast` and `beta_slow` rotations in
/// `original_seq_len` positions, and cos and sin are multiplied by the attention factor.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Yarn {
    /// The context extension (factor).
    pub factor: f32,
    /// The pretraining context (original_max_position_embeddings).
    pub original_seq_len: usize,
    #[serde(default = "d_beta_fast")]
    pub beta_fast: f32,
    #[serde(default = "one")]
    pub beta_slow: f32,
    /// mscale and mscale_all_dim (0: not given): the attention factor is
    /// m(factor, mscale) / m(factor, mscale_all_dim) with both, else m(factor, 1), where
    /// m(s, k) = 1 + 0.1·k·ln s (1 for s ≤ 1) — unless `attention_factor` gives it.
    #[serde(default)]
    pub mscale: f32,
    #[serde(default)]
    pub mscale_all_dim: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f32>,
    /// Round the ramp's ends to whole dims (transformers' default).
    #[serde(default = "d_true")]
    pub truncate: bool,
}

fn d_beta_fast() -> f32 {
    32.0
}

fn d_true() -> bool {
    true
}

impl Yarn {
    /// YaRN's m(s, k) = 1 + 0.1·k·ln s, 1 for s ≤ 1.
    pub fn m(s: f64, k: f64) -> f64 {
        if s <= 1.0 {
            1.0
        } else {
            0.1 * k * s.ln() + 1.0
        }
    }

    /// The factor on cos and sin.
    pub fn attention_factor(&self) -> f64 {
        let (s, a, b) = (self.factor as f64, self.mscale as f64, self.mscale_all_dim as f64);
        match self.attention_factor {
            Some(f) => f as f64,
            None if a != 0.0 && b != 0.0 => Yarn::m(s, a) / Yarn::m(s, b),
            None => Yarn::m(s, 1.0),
        }
    }

    /// The inverse frequencies of a RoPE of `dim` dims and base `theta`.
    pub fn inv_freq(&self, dim: usize, theta: f64) -> Vec<f64> {
        let (d, factor) = (dim as f64, self.factor as f64);
        let at = |rotations: f64| {
            d * (self.original_seq_len as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (at(self.beta_fast as f64), at(self.beta_slow as f64));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
        if low == high {
            high += 0.001;
        }
        (0..dim / 2)
            .map(|i| {
                let extrapolation = theta.powf(-2.0 * i as f64 / d);
                let keep = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                extrapolation / factor * (1.0 - keep) + extrapolation * keep
            })
            .collect()
    }
}

/// Multi-head latent attention's sizes (DeepSeek-V2's names in brackets). Per layer, from the
/// normed hidden state a: q = q_proj a (or q_b_proj q_a_norm q_a_proj a with `q_rank`);
/// [c, k_rope] = kv_a_proj a; [k_nope, v] per head = kv_b_proj kv_a_norm c; a head's key is
/// [k_nope, rope(k_rope)] with k_rope shared by every head.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Mla {
    /// The compressed key-value size (kv_lora_rank).
    pub kv_rank: usize,
    /// The compressed query size (q_lora_rank); 0: q_proj from the hidden state (V2-Lite).
    #[serde(default)]
    pub q_rank: usize,
    /// The dims of a q·k head that RoPE rotates, its last ones (qk_rope_head_dim).
    pub rope_dim: usize,
    /// A value head's size (v_head_dim).
    pub v_dim: usize,
}

impl ModelConfig {
    /// The attention scores' scale: `attn_scale`/sqrt(head_dim) (head_dim: the q·k head).
    pub fn softmax_scale(&self) -> f32 {
        self.attn_scale / (self.head_dim as f32).sqrt()
    }

    /// Σ over layers of the keys a query sees, doubled (the attention FLOPs' length term):
    /// seq_len per full causal layer (2·(S+1)/2, rounded to S), 2·mean(min(i+1, w)) per layer with
    /// a window w < S.
    pub fn attention_span(&self) -> f64 {
        let s = self.seq_len as f64;
        (0..self.layers)
            .map(|l| match self.window(l) as f64 {
                w if w == 0.0 || w >= s => s,
                w => (w * (w + 1.0) + 2.0 * (s - w) * w) / s,
            })
            .sum()
    }

    /// Layer `l`'s sliding window (0: it attends to every earlier key).
    pub fn window(&self, l: usize) -> usize {
        match &self.window_layers {
            Some(ls) if !ls.contains(&l) => 0,
            _ => self.sliding_window,
        }
    }

    /// (dims RoPE rotates per head, a value head's size): (head_dim, head_dim) outside MLA.
    pub fn rope_v_dims(&self) -> (usize, usize) {
        self.mla.map_or((self.head_dim, self.head_dim), |a| (a.rope_dim, a.v_dim))
    }

    /// A layer's attention matmul parameters: q, k, v and o projections, or MLA's (u128: sizes
    /// up to u32::MAX do not overflow it).
    pub fn attention_params(&self) -> u128 {
        let u = |x: usize| x as u128;
        let (h, heads, d, vd) = (u(self.hidden), u(self.heads), u(self.head_dim), u(self.rope_v_dims().1));
        let (qd, kd) = (heads * d, u(self.kv_heads) * d);
        match self.mla.map(|a| (u(a.kv_rank), u(a.q_rank), u(a.rope_dim))) {
            None => 2 * h * qd + 2 * h * kd,
            Some((r, qr, dr)) => {
                let q = if qr == 0 { h * qd } else { qr * (h + qd) };
                let kv = (r + dr) * h + r * heads * (d.saturating_sub(dr) + vd);
                q + kv + heads * vd * h
            }
        }
    }
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
    /// Plugin metrics to show on the console line too (e.g. ["dropped_frac"]); all of them are
    /// in metrics.jsonl.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub show_metrics: Vec<String>,
    /// Also write TensorBoard event files into `<out>/tensorboard/` (docs/metrics.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tensorboard: bool,
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

/// How the ranks of a multi-process job split the work (docs/distributed.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    /// Data-parallel ranks; 0: the world size / ep.
    #[serde(default)]
    pub dp: usize,
    /// Expert-parallel ranks per group (1: every rank holds every expert).
    #[serde(default = "d_one")]
    pub ep: usize,
    /// Each trained tensor's f32 master and optimizer state on one rank of the ranks that sum
    /// its gradient (ZeRO by whole tensor); the others keep the working copy.
    #[serde(default)]
    pub shard_optimizer: bool,
}

impl ParallelConfig {
    fn is_default(&self) -> bool {
        self.dp == 0 && self.ep <= 1 && !self.shard_optimizer
    }
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
    #[serde(default, skip_serializing_if = "ParallelConfig::is_default")]
    pub parallel: ParallelConfig,
    pub router: ComponentTable,
    pub experts: ComponentTable,
    #[serde(default)]
    pub balance_loss: Vec<ComponentTable>,
    pub optimizer: ComponentTable,
    #[serde(default = "d_comm")]
    pub comm: ComponentTable,
    /// An always-on expert beside the routed ones (`Kind::Shared`), when the table is there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<ComponentTable>,
    /// The FFN of the first `model.dense_layers` layers (`Kind::Shared`: the same plugins as
    /// `[shared]`, on every token), required with them and refused without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense: Option<ComponentTable>,
    /// Where this config came from (file name or `<built-in quickstart>`) and its text after
    /// overrides; used to point errors at file:line.
    #[serde(skip)]
    pub source: Source,
}

/// Where a config came from, to point errors at the line a user wrote (see [`Config::at`]).
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// The file name, or `<built-in quickstart>`.
    pub file: String,
    /// The text after the `--set` overrides: what was parsed.
    pub text: String,
    /// Each `--set`, with the key it set.
    pub overrides: Vec<Override>,
    /// Lines of `text` (1-based) that an override added to a table of the file (a new key);
    /// every other line is a line of the file, or after its end (a table an override created).
    pub added: Vec<usize>,
    /// How many lines the file has.
    pub lines: usize,
}

/// One `--set table.key=value` (`table.N.key`: the N-th `[[table]]`).
#[derive(Debug, Clone, Default)]
pub struct Override {
    /// As given, e.g. `train.lr=-1`.
    pub arg: String,
    /// The table path (`train`, `balance_loss`, `router.sub`), the index among `[[table]]`s
    /// (0 for a plain table) and the key.
    pub table: String,
    pub n: usize,
    pub key: String,
    /// The line of `text` holding the key.
    pub line: Option<usize>,
}

impl Source {
    /// Line `l` of `text` as the file numbers it; None for a line an override added.
    fn file_line(&self, l: usize) -> Option<usize> {
        let before = self.added.iter().filter(|&&a| a < l).count();
        (!self.added.contains(&l) && l - before <= self.lines).then_some(l - before)
    }

    /// Where line `l` of `text` came from: `file:line`, with ` (--set ...)` when an override
    /// wrote it; just the file (and the override) for a line the file does not have.
    pub fn place(&self, l: usize) -> String {
        let mut s = self.file.clone();
        if let Some(fl) = self.file_line(l) {
            s += &format!(":{fl}");
        }
        if let Some(o) = self.overrides.iter().rev().find(|o| o.line == Some(l)) {
            s += &format!(" (--set {})", o.arg);
        }
        s
    }
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
        let source = apply_overrides(file, text, overrides)?;
        let mut cfg: Config = toml::from_str(&source.text).map_err(|e| match toml_error(&source.text, &e) {
            (Some(line), msg) => format!("{}: {}", source.place(line), qualify(&source.text, line, msg)),
            (None, msg) => format!("{file}: {msg}"),
        })?;
        cfg.source = source;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every host key's range, in one table; the first failure names file:line, the key, its
    /// value and what would be valid. Model sizes are integers from 1 (vocab and seq_len from 2,
    /// head_dim even, heads a multiple of kv_heads) to u32::MAX (plugins get them as 32-bit
    /// `ModelDims`); rope_theta, norm_eps, init_std and lr are finite and > 0; min_lr_ratio is in
    /// [0, 1], decay_frac in (0, 1]; clip is finite and ≥ 0 (0 = off); steps, eval_batches and
    /// log_every are ≥ 1; names (out, init_from, data.source, data.val) are not empty. `warmup`
    /// may exceed `steps` (the run is then all warm-up: a short test run of a long config);
    /// seed, eval_every and checkpoint_every (0 = at the end) and threads (0 = all cores; train
    /// caps it at the cores) take any value. Sizes that fit no machine: [`check_memory`].
    fn validate(&self) -> Result<(), String> {
        let (m, t, d) = (&self.model, &self.train, &self.data);
        const MAX: usize = u32::MAX as usize;
        let size = |v: usize, min: usize| (min..=MAX).contains(&v);
        let sizes = |min: usize| format!("an integer in {min}..={MAX}");
        let (s1, s2) = (sizes(1), sizes(2));
        let (n, f, q) = (|x: usize| x.to_string(), |x: f32| x.to_string(), |s: &str| format!("{s:?}"));
        let opt = |s: &Option<String>| s.as_deref().map_or("none".into(), q);
        let (pos, named) = (|x: f32| x.is_finite() && x > 0.0, |s: &str| !s.trim().is_empty());
        let (kv, mult) = (format!("in 1..=heads ({})", m.heads), format!("a multiple of kv_heads ({})", m.kv_heads));
        let (even, frac) = (m.head_dim.is_multiple_of(2), t.decay_frac > 0.0 && t.decay_frac <= 1.0);
        let device = ["cpu", "cuda"].contains(&t.device.as_str());
        let schedule = ["cosine", "wsd", "constant"].contains(&t.schedule.as_str());
        let paths = (t.init_from.as_deref().is_none_or(named), d.val.as_deref().is_none_or(named));
        let checks: [(&str, &str, String, bool, &str); 29] = [
            ("model", "vocab", n(m.vocab), size(m.vocab, 2), &s2),
            ("model", "hidden", n(m.hidden), size(m.hidden, 1), &s1),
            ("model", "layers", n(m.layers), size(m.layers, 1), &s1),
            ("model", "heads", n(m.heads), size(m.heads, 1), &s1),
            ("model", "kv_heads", n(m.kv_heads), (1..=m.heads).contains(&m.kv_heads), &kv),
            ("model", "heads", n(m.heads), m.heads.is_multiple_of(m.kv_heads), &mult),
            ("model", "head_dim", n(m.head_dim), size(m.head_dim, 2) && even, "even, >= 2 (RoPE rotates pairs)"),
            ("model", "seq_len", n(m.seq_len), size(m.seq_len, 2), &s2),
            ("model", "rope_theta", f(m.rope_theta), pos(m.rope_theta), "finite and > 0, e.g. 10000"),
            ("model", "experts", n(m.experts), size(m.experts, 1), &s1),
            ("model", "expert_ffn", n(m.expert_ffn), size(m.expert_ffn, 1), &s1),
            (
                "model",
                "shared_expert_ffn",
                n(m.shared_expert_ffn),
                m.shared_expert_ffn == 0,
                "0: a shared expert is a plugin now, [shared] plugin = \"shared-swiglu\", ffn = N",
            ),
            ("model", "norm_eps", f(m.norm_eps), pos(m.norm_eps), "finite and > 0, e.g. 1e-6"),
            ("model", "init_std", f(m.init_std), pos(m.init_std), "finite and > 0, e.g. 0.02"),
            ("train", "device", q(&t.device), device, "one of \"cpu\", \"cuda\""),
            ("train", "steps", t.steps.to_string(), t.steps >= 1, "at least 1"),
            ("train", "micro_batch", n(t.micro_batch), size(t.micro_batch, 1), &s1),
            ("train", "grad_accum", n(t.grad_accum), size(t.grad_accum, 1), &s1),
            (
                "train",
                "lr",
                f(t.lr),
                t.lr.is_finite() && t.lr >= 0.0,
                "finite and >= 0 (0 freezes the weights), e.g. 3e-4",
            ),
            ("train", "min_lr_ratio", f(t.min_lr_ratio), (0.0..=1.0).contains(&t.min_lr_ratio), "in [0, 1]"),
            ("train", "schedule", q(&t.schedule), schedule, "one of \"cosine\", \"wsd\", \"constant\""),
            ("train", "decay_frac", f(t.decay_frac), frac, "in (0, 1] (the fraction of the steps wsd decays over)"),
            ("train", "clip", f(t.clip), t.clip.is_finite() && t.clip >= 0.0, "finite and >= 0 (0 = no clipping)"),
            ("train", "eval_batches", n(t.eval_batches), t.eval_batches >= 1, "at least 1 (batches per eval)"),
            ("train", "log_every", t.log_every.to_string(), t.log_every >= 1, "at least 1 (a line every N steps)"),
            ("train", "out", q(&t.out), named(&t.out), "a run directory, e.g. \"runs/my-run\""),
            ("train", "init_from", opt(&t.init_from), paths.0, "a path (or no init_from)"),
            ("data", "source", q(&d.source), named(&d.source), "\"synthetic\" or shards (a file, directory, glob)"),
            ("data", "val", opt(&d.val), paths.1, "held-out shards (or no val: the default)"),
        ];
        for (table, key, value, ok, valid) in checks {
            if !ok {
                return Err(format!("{}: {table}.{key} = {value}: must be {valid}", self.at(table, 0, key)));
            }
        }
        if let Some(a) = m.mla {
            self.validate_mla(a)?;
        }
        if !(m.attn_scale.is_finite() && m.attn_scale > 0.0) {
            let at = self.at("model", 0, "attn_scale");
            return Err(format!(
                "{at}: model.attn_scale = {}: must be finite and > 0 (1: 1/sqrt(head_dim))",
                m.attn_scale
            ));
        }
        if let Some(y) = m.yarn {
            self.validate_yarn(y)?;
        }
        if let Some(&l) = m.window_layers.iter().flatten().find(|&&l| l >= m.layers) {
            let at = self.at("model", 0, "window_layers");
            return Err(format!("{at}: model.window_layers names layer {l}: must be layers of 0..{}", m.layers));
        }
        if m.window_layers.is_some() && m.sliding_window == 0 {
            let at = self.at("model", 0, "window_layers");
            return Err(format!(
                "{at}: model.window_layers is set but model.sliding_window = 0: set the window's size (in keys)"
            ));
        }
        self.validate_dense()
    }

    /// `[model.yarn]`: factor ≥ 1, beta_fast > beta_slow > 0, original_seq_len ≥ 1, finite.
    fn validate_yarn(&self, y: Yarn) -> Result<(), String> {
        let fin = |x: f32| x.is_finite();
        let checks: [(&str, String, bool, &str); 5] = [
            ("factor", y.factor.to_string(), fin(y.factor) && y.factor >= 1.0, "finite and >= 1"),
            ("original_seq_len", y.original_seq_len.to_string(), y.original_seq_len >= 1, "an integer >= 1"),
            ("beta_slow", y.beta_slow.to_string(), fin(y.beta_slow) && y.beta_slow > 0.0, "finite and > 0"),
            (
                "beta_fast",
                y.beta_fast.to_string(),
                fin(y.beta_fast) && y.beta_fast > y.beta_slow,
                "finite and > beta_slow",
            ),
            (
                "attention_factor",
                format!("{:?}", y.attention_factor),
                fin(y.mscale) && fin(y.mscale_all_dim) && y.attention_factor.is_none_or(|f| fin(f) && f > 0.0),
                "finite and > 0, with finite mscale and mscale_all_dim",
            ),
        ];
        for (key, value, ok, valid) in checks {
            if !ok {
                return Err(format!("{}: model.yarn.{key} = {value}: must be {valid}", self.at("model.yarn", 0, key)));
            }
        }
        Ok(())
    }

    /// `model.dense_layers` below `layers`, with a `[dense]` table exactly when it is above 0.
    fn validate_dense(&self) -> Result<(), String> {
        let m = &self.model;
        if m.dense_layers >= m.layers {
            let at = self.at("model", 0, "dense_layers");
            let (n, l) = (m.dense_layers, m.layers);
            return Err(format!(
                "{at}: model.dense_layers = {n}: must be below model.layers ({l}): one MoE layer at least"
            ));
        }
        match (m.dense_layers, &self.dense) {
            (0, Some(_)) => Err(format!(
                "{}: a [dense] table but model.dense_layers = 0: set dense_layers (the first N layers dense) or remove [dense]",
                self.at("dense", 0, "plugin")
            )),
            (n, None) if n > 0 => Err(format!(
                "{}: model.dense_layers = {n} needs a [dense] table, e.g. [dense] plugin = \"shared-swiglu\", ffn = 1024",
                self.at("model", 0, "dense_layers")
            )),
            _ => Ok(()),
        }
    }

    /// `[model.mla]`: sizes from 1 (rope_dim even, at most head_dim; q_rank 0 = none), one kv
    /// head per q head, and no qk-norm or q/k/v biases (MLA has neither).
    fn validate_mla(&self, a: Mla) -> Result<(), String> {
        let m = &self.model;
        let rope = a.rope_dim.is_multiple_of(2) && (2..=m.head_dim).contains(&a.rope_dim);
        let (mla, none) = ("model.mla", "\"none\" with [model.mla]".to_string());
        let checks: [(&str, &str, String, bool, String); 6] = [
            (mla, "kv_rank", a.kv_rank.to_string(), a.kv_rank >= 1, "an integer >= 1".into()),
            (mla, "v_dim", a.v_dim.to_string(), a.v_dim >= 1, "an integer >= 1".into()),
            (mla, "rope_dim", a.rope_dim.to_string(), rope, format!("even, in 2..=head_dim ({})", m.head_dim)),
            (
                "model",
                "kv_heads",
                m.kv_heads.to_string(),
                m.kv_heads == m.heads,
                format!("heads ({}) with [model.mla]", m.heads),
            ),
            ("model", "qk_norm", format!("{:?}", m.qk_norm).to_lowercase(), m.qk_norm == QkNorm::None, none),
            ("model", "qkv_bias", m.qkv_bias.to_string(), !m.qkv_bias, "false with [model.mla]".into()),
        ];
        for (table, key, value, ok, valid) in checks {
            if !ok {
                return Err(format!("{}: {table}.{key} = {value}: must be {valid}", self.at(table, 0, key)));
            }
        }
        Ok(())
    }

    /// `file:line` of `key` in the `n`-th `[table]` (or `[[table]]`) as the user wrote it, or of
    /// the table header when the key is not written there; with ` (--set table.key=value)` when
    /// an override set it, and no line when the file does not have it (see [`Source`]).
    pub fn at(&self, table: &str, n: usize, key: &str) -> String {
        let (line, header) = locate(&self.source.text, table, n, key);
        line.or(header).map_or_else(|| self.source.file.clone(), |l| self.source.place(l))
    }

    /// For a host key `table.key` (e.g. `model.seq_len`): where it is ([`Config::at`]) and its
    /// name, as [`refuse_over`] takes them.
    pub fn key_at(&self, key: &str) -> (String, String) {
        let (table, k) = key.split_once('.').unwrap_or(("", key));
        (self.at(table, 0, k), key.to_string())
    }

    /// The component tables in a fixed order: (kind, TOML section, index within it, table).
    /// The section is the kind's name except `[dense]`, a `Kind::Shared` component.
    pub fn components(&self) -> Vec<(Kind, &'static str, usize, &ComponentTable)> {
        let one = |k: Kind, t| (k, k.as_str(), 0, t);
        let mut v = vec![one(Kind::Router, &self.router), one(Kind::Experts, &self.experts)];
        v.extend(self.balance_loss.iter().enumerate().map(|(i, t)| (Kind::BalanceLoss, "balance_loss", i, t)));
        v.push(one(Kind::Optimizer, &self.optimizer));
        v.push(one(Kind::CommSchedule, &self.comm));
        v.extend(self.shared.iter().map(|t| one(Kind::Shared, t)));
        v.extend(self.dense.iter().map(|t| (Kind::Shared, "dense", 0, t)));
        v
    }

    /// The shared expert's hidden size: its table's `ffn`, else `model.expert_ffn`; 0 without one.
    pub fn shared_ffn(&self) -> usize {
        self.ffn_of(&self.shared)
    }

    /// The dense layers' FFN size: `[dense]`'s `ffn`, else `model.expert_ffn`; 0 without one.
    pub fn dense_ffn(&self) -> usize {
        self.ffn_of(&self.dense)
    }

    fn ffn_of(&self, table: &Option<ComponentTable>) -> usize {
        let ffn = |t: &ComponentTable| t.get("ffn").and_then(|v| v.as_integer()).map(|f| f.max(0) as usize);
        table.as_ref().map_or(0, |t| ffn(t).unwrap_or(self.model.expert_ffn))
    }

    /// Sizes for layer `layer` on an expert-parallel rank holding slice `ep` of the experts.
    pub fn dims(&self, layer: usize, ep: Shard) -> ModelDims {
        let m = &self.model;
        let local = m.experts / ep.parts;
        let all = ModelDims::new(m.hidden, m.experts, m.expert_ffn, layer, m.layers);
        ModelDims { first_expert: (ep.part * local) as u32, local_experts: local as u32, ..all }
    }

    /// The resolved config as TOML (defaults filled in, overrides applied).
    /// The config as TOML, floats as written: the host keeps f32s, which printed through f64
    /// would read `0.003000000026077032`; such a value is printed by its shortest f32 decimal.
    pub fn to_toml(&self) -> String {
        let text = toml::to_string(self).expect("config serialises");
        let short = |line: &str| -> Option<String> {
            let (key, value) = line.split_once(" = ")?;
            let v: f64 = value.parse().ok().filter(|_| value.contains(['.', 'e']))?;
            let f = v as f32;
            if f as f64 != v || !f.is_finite() {
                return None;
            }
            let s = f.to_string();
            Some(format!("{key} = {s}{}", if s.contains(['.', 'e']) { "" } else { ".0" }))
        };
        text.lines().map(|l| short(l).unwrap_or_else(|| l.to_string()) + "\n").collect()
    }
}

/// (line of `key` in the `n`-th `[table]`/`[[table]]` of `text`, line of that table's header),
/// 1-based.
fn locate(text: &str, table: &str, n: usize, key: &str) -> (Option<usize>, Option<usize>) {
    let headers = [format!("[{table}]"), format!("[[{table}]]")];
    let (mut seen, mut in_table, mut header) = (0, false, None);
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            in_table = false;
            if headers.iter().any(|h| l.starts_with(h.as_str())) {
                if seen == n {
                    in_table = true;
                    header = Some(i + 1);
                }
                seen += 1;
            }
            continue;
        }
        if in_table && l.split_once('=').is_some_and(|(k, _)| k.trim().trim_matches('"') == key) {
            return (Some(i + 1), header);
        }
    }
    (None, header)
}

/// A TOML error about line `line` of `text`: `` `key`: `` becomes `table.key:`, and a float
/// given for an integer key says how to write it.
fn qualify(text: &str, line: usize, msg: String) -> String {
    let table = text.lines().take(line).filter_map(|l| l.trim().strip_prefix('[')).last();
    let table = table.map(|h| h.trim_start_matches('[').split(']').next().unwrap_or("").trim());
    let mut msg = match (table, msg.strip_prefix('`').and_then(|m| m.split_once("`: "))) {
        (Some(t), Some((k, rest))) => format!("{t}.{k}: {rest}"),
        _ => msg,
    };
    let float = msg.split("floating point `").nth(1).and_then(|r| r.split('`').next()?.parse::<f64>().ok());
    if let Some(x) = float.filter(|_| msg.contains("expected u") || msg.contains("expected i")) {
        msg += &match x.fract() == 0.0 && (0.0..1e19).contains(&x) {
            true => format!("; write it as an integer: {}", x as u64),
            false => "; write an integer".into(),
        };
    }
    msg
}

/// The top-level tables of a config; `--set` creates a missing one (but no `[[balance_loss]]`).
const TABLES: [&str; 11] =
    ["model", "train", "data", "parallel", "router", "experts", "shared", "dense", "balance_loss", "optimizer", "comm"];
/// The tables that name a plugin.
const COMPONENTS: [&str; 7] = ["router", "experts", "shared", "dense", "balance_loss", "optimizer", "comm"];

/// Apply `table.key=value` overrides (`table.N.key`: the N-th `[[table]]`) to the TOML text. Only
/// the lines of overridden keys change (keeping their comments); a new key takes a new line,
/// recorded in [`Source::added`] so that every other line keeps its file line number in errors.
fn apply_overrides(file: &str, text: &str, overrides: &[String]) -> Result<Source, String> {
    let mut src = Source { file: file.into(), text: text.into(), lines: text.lines().count(), ..Default::default() };
    if overrides.is_empty() {
        return Ok(src);
    }
    let mut doc: DocumentMut =
        text.parse().map_err(|e: toml_edit::TomlError| format!("{file}: {}", e.to_string().replace('\n', " ")))?;
    let mut added = Vec::new();
    for o in overrides {
        let bad = |why: String| format!("--set {o}: {why}");
        let usage = "expected table.key=value (table.N.key for the N-th [[table]]), e.g. --set train.steps=10";
        let (path, value) = o.split_once('=').ok_or_else(|| bad(usage.into()))?;
        let path: Vec<&str> = path.trim().split('.').map(str::trim).collect();
        if path.len() < 2 || path.iter().any(|k| k.is_empty()) {
            return Err(bad(usage.into()));
        }
        if !TABLES.contains(&path[0]) {
            return Err(bad(format!("there is no table `{}`; valid: {}", path[0], TABLES.join(", "))));
        }
        let mut value: Value = value.trim().parse().unwrap_or_else(|_| Value::from(value.trim()));
        let (key, parents) = path.split_last().unwrap();
        let (mut table, mut n, mut new_line) = (Vec::new(), 0, true);
        let mut t: &mut dyn TableLike = doc.as_table_mut();
        let mut i = 0;
        while i < parents.len() {
            let k = parents[i];
            table.push(k);
            let name = table.join(".");
            if !t.contains_key(k) {
                if i > 0 || k == "balance_loss" {
                    return Err(bad(format!("there is no table `{name}` in {file}")));
                }
                t.insert(k, Item::Table(Table::new()));
                new_line = false; // a new table goes after the file's last line
            }
            t = match t.get_mut(k).unwrap() {
                Item::ArrayOfTables(a) => {
                    let len = a.len();
                    let idx = parents.get(i + 1).and_then(|s| s.parse::<usize>().ok()).ok_or_else(|| {
                        bad(format!("`{name}` is a list of {len} [[{name}]] tables; give an index, e.g. --set {name}.0.{key}=..."))
                    })?;
                    let some = format!(
                        "{file} has {len} [[{name}]] table{} (indices 0..={})",
                        ["s", ""][(len == 1) as usize],
                        len - 1
                    );
                    (n, i) = (idx, i + 1);
                    a.get_mut(idx).ok_or_else(|| bad(format!("index {idx} is out of range: {some}")))?
                }
                Item::Value(v @ Value::InlineTable(_)) => {
                    new_line = false; // a key of an inline table stays on its line
                    v.as_inline_table_mut().unwrap()
                }
                item => item.as_table_like_mut().ok_or_else(|| bad(format!("`{name}` is a value, not a table")))?,
            };
            i += 1;
        }
        // Choosing another plugin starts its table afresh: the old plugin's keys mean nothing to
        // it (`--set router.plugin=top-any --set router.max_k=3`: the plugin first).
        let switching =
            *key == "plugin" && COMPONENTS.contains(&table[0]) && t.get(key).and_then(|i| i.as_str()) != value.as_str();
        if switching {
            let others: Vec<String> = t.iter().map(|(k, _)| k.to_string()).filter(|k| k != "plugin").collect();
            others.iter().for_each(|k| drop(t.remove(k)));
        }
        match t.get_mut(key) {
            Some(Item::Value(old)) => {
                *value.decor_mut() = old.decor().clone();
                *old = value;
            }
            Some(_) => return Err(bad(format!("`{}.{key}` is a table; set one of its keys", table.join(".")))),
            None => {
                t.insert(key, toml_edit::value(value));
                added.push((src.overrides.len(), new_line));
            }
        }
        src.overrides.push(Override { arg: o.clone(), table: table.join("."), n, key: key.to_string(), line: None });
    }
    src.text = doc.to_string();
    for o in &mut src.overrides {
        o.line = locate(&src.text, &o.table, o.n, &o.key).0;
    }
    src.added = added.iter().filter(|a| a.1).filter_map(|a| src.overrides[a.0].line).collect();
    src.added.sort_unstable();
    src.added.dedup();
    if src.text.lines().count() < src.lines + src.added.len() {
        // A multi-line value became one line: line numbers past it are no longer the file's.
        (src.added, src.lines) = (Vec::new(), usize::MAX);
    }
    Ok(src)
}

/// Bytes a run needs, term by term: an estimate made from the config alone, before anything is
/// allocated (u128 and saturating: no size overflows). See [`MemEstimate::of`].
#[derive(Debug, Clone, PartialEq)]
pub struct MemEstimate {
    /// Parameters, counting the std pack's SwiGLU experts and softmax router.
    pub params: u128,
    pub terms: Vec<MemTerm>,
}

/// One term of a [`MemEstimate`].
#[derive(Debug, Clone, PartialEq)]
pub struct MemTerm {
    /// E.g. `attention scores`.
    pub name: &'static str,
    /// How it is counted, e.g. `2 heads at once×2×seq_len²×4 B`.
    pub formula: String,
    /// The size keys (`table.key`) it grows with; an error names the one of largest value.
    pub keys: &'static [&'static str],
    pub bytes: u128,
}

impl MemTerm {
    fn new(name: &'static str, formula: String, keys: &'static [&'static str], bytes: u128) -> MemTerm {
        MemTerm { name, formula, keys, bytes }
    }
}

// The size keys a memory estimate names.
const VOCAB: &str = "model.vocab";
const HIDDEN: &str = "model.hidden";
const LAYERS: &str = "model.layers";
const HEADS: &str = "model.heads";
const HEAD_DIM: &str = "model.head_dim";
const SEQ: &str = "model.seq_len";
const EXPERTS: &str = "model.experts";
const FFN: &str = "model.expert_ffn";
const BATCH: &str = "train.micro_batch";

/// The size `key` (one of the constants above) of `c`.
fn size_mut<'a>(c: &'a mut Config, key: &str) -> Option<&'a mut usize> {
    let (m, t) = (&mut c.model, &mut c.train);
    Some(match key {
        VOCAB => &mut m.vocab,
        HIDDEN => &mut m.hidden,
        LAYERS => &mut m.layers,
        HEADS => &mut m.heads,
        HEAD_DIM => &mut m.head_dim,
        SEQ => &mut m.seq_len,
        EXPERTS => &mut m.experts,
        FFN => &mut m.expert_ffn,
        BATCH => &mut t.micro_batch,
        _ => return None,
    })
}

fn prod(xs: &[u128]) -> u128 {
    xs.iter().fold(1, |a, &x| a.saturating_mul(x))
}

fn sum(xs: &[u128]) -> u128 {
    xs.iter().fold(0, |a, &x| a.saturating_add(x))
}

impl MemEstimate {
    /// [`MemEstimate::of`] for one rank of a training job: with `parallel.ep` > 1 a rank holds
    /// (and initialises) 1/ep of the experts.
    pub fn per_rank(cfg: &Config, per_param: u128, step: bool) -> MemEstimate {
        let mut est = MemEstimate::of(cfg, per_param, step);
        let ep = cfg.parallel.ep.max(1) as u128;
        for t in est.terms.iter_mut().filter(|t| ep > 1 && t.name == "experts") {
            t.bytes /= ep;
            t.formula = format!("{} / parallel.ep", t.formula);
        }
        est
    }

    /// The memory of `cfg`: its parameters at `per_param` bytes each (16: f32 weights, grads and
    /// two optimizer states, as AdamW; 18 on CUDA with the bf16 weight copy; 8 for inference:
    /// weights and the grads the init allocates) and the RoPE table; with `step`, also the
    /// largest buffers of one CPU training micro-batch (model.rs, layers.rs): the activations
    /// kept for backward (top_k: `router.top_k`, else 2) and one layer's backward scratch, the
    /// logits and their gradient, and the attention probabilities and their gradient
    /// (seq_len² floats each) of the heads computed at once (one per worker thread).
    pub fn of(cfg: &Config, per_param: u128, step: bool) -> MemEstimate {
        let (m, t, u) = (&cfg.model, &cfg.train, |x: usize| x as u128);
        let (v, h, l, d, s) = (u(m.vocab), u(m.hidden), u(m.layers), u(m.head_dim), u(m.seq_len));
        let (hq, hkv, e, f, fs) = (u(m.heads), u(m.kv_heads), u(m.experts), u(m.expert_ffn), u(cfg.shared_ffn()));
        let k = cfg.router.get("top_k").and_then(|k| k.as_integer()).map_or(2, |k| k.max(1) as u128).min(e);
        let (qd, kd, b) = (hq * d, hkv * d, u(t.micro_batch));
        let attention = sum(&[m.attention_params(), 2 * h, qd + kd]);
        let (moe, dense, fd) = (u(m.layers - m.dense_layers.min(m.layers)), u(m.dense_layers), u(cfg.dense_ffn()));
        let params: [(&'static str, &str, u128, &'static [&'static str]); 4] = [
            ("embedding and lm_head", "2×vocab×hidden", prod(&[2, v, h]), &[VOCAB, HIDDEN]),
            (
                "attention",
                "layers×(hidden×(2×heads+2×kv_heads)×head_dim, or MLA's)",
                prod(&[l, attention]),
                &[LAYERS, HIDDEN, HEADS],
            ),
            (
                "experts",
                "MoE layers×experts×3×hidden×expert_ffn",
                prod(&[moe, e, 3, h, f]),
                &[LAYERS, EXPERTS, HIDDEN, FFN],
            ),
            (
                "router, shared expert, dense FFN",
                "MoE layers×hidden×(experts+3×shared_ffn) + dense layers×3×hidden×dense ffn",
                sum(&[prod(&[moe, h, e + 3 * fs]), prod(&[dense, 3, h, fd])]),
                &[LAYERS, HIDDEN],
            ),
        ];
        let count = sum(&params.map(|p| p.2));
        let mut terms: Vec<MemTerm> = params
            .into_iter()
            .map(|(name, what, n, keys)| {
                MemTerm::new(name, format!("{what} parameters×{per_param} B"), keys, prod(&[n, per_param]))
            })
            .collect();
        terms.push(MemTerm::new("RoPE table", "seq_len×head_dim×4 B".into(), &[SEQ, HEAD_DIM], prod(&[s, d, 4])));
        if step {
            let n = b * s;
            // Per token and layer: x, both norms' outputs, h (4h); q, k before and after qk-norm,
            // v and the attention output (3qd+3kd); router logits and gates; dispatched rows and
            // expert outputs (2kh); SwiGLU's gate, up and activation (3kF, 3Fs). One layer's
            // backward holds about as much again beyond the k rows.
            let kept = sum(&[4 * h, 3 * (qd + kd), hq, e + 2 * k, prod(&[2, k, h]), prod(&[3, k, f]), 3 * fs]);
            let scratch = sum(&[6 * h, 2 * (qd + kd), e, prod(&[2, k, h])]);
            let acts = prod(&[n, sum(&[prod(&[l, kept]), scratch]), 4]);
            let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
            let threads = u(if t.threads == 0 || t.threads > cores { cores } else { t.threads });
            let heads = (b * hq).min(threads).max(2 * (b * hkv).min(threads));
            let acts_what = format!("micro_batch×seq_len×(layers×{kept}+{scratch}) floats×4 B");
            let scores_what = format!("{heads} seq_len×seq_len matrices×4 B ({threads} threads)");
            terms.extend([
                MemTerm::new("activations", acts_what, &[BATCH, SEQ, LAYERS, HIDDEN], acts),
                MemTerm::new(
                    "logits",
                    "2×micro_batch×seq_len×vocab×4 B".into(),
                    &[BATCH, SEQ, VOCAB],
                    prod(&[2, n, v, 4]),
                ),
                MemTerm::new("attention scores", scores_what, &[SEQ, BATCH], prod(&[heads, s, s, 4])),
            ]);
        }
        MemEstimate { params: count, terms }
    }

    pub fn total(&self) -> u128 {
        sum(&self.terms.iter().map(|t| t.bytes).collect::<Vec<_>>())
    }

    /// `~12.3 GB = embedding and lm_head 1.2 GB + ...`, every term.
    pub fn summary(&self) -> String {
        let terms: Vec<String> = self.terms.iter().map(|t| format!("{} {}", t.name, human(t.bytes))).collect();
        format!("~{} = {}", human(self.total()), terms.join(" + "))
    }
}

/// Bytes for people, decimal: `512 B`, `40.0 GB`.
pub fn human(bytes: u128) -> String {
    let units = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let (mut x, mut i) = (bytes as f64, 0);
    while x >= 1000.0 && i + 1 < units.len() {
        (x, i) = (x / 1000.0, i + 1);
    }
    match i {
        0 => format!("{bytes} B"),
        _ if x >= 1000.0 => format!("{:.1e} B", bytes as f64),
        _ => format!("{x:.1} {}", units[i]),
    }
}

/// Bytes this process may still allocate: /proc/meminfo's MemAvailable, lowered to a cgroup v2
/// limit (a container's memory.max less its usage other than reclaimable cache) when there is
/// one; None when unreadable.
pub fn mem_available() -> Option<u128> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let field = |text: &str, name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse::<u128>().ok())
    };
    let avail = field(&read("/proc/meminfo")?, "MemAvailable:")? * 1024;
    let cgroup = |f: &str| read(&format!("/sys/fs/cgroup/{f}")).and_then(|s| s.trim().parse::<u128>().ok());
    let limit = match (cgroup("memory.max"), cgroup("memory.current")) {
        (Some(max), Some(used)) => {
            let cache = read("/sys/fs/cgroup/memory.stat").and_then(|s| field(&s, "inactive_file ")).unwrap_or(0);
            max.saturating_sub(used.saturating_sub(cache))
        }
        _ => u128::MAX,
    };
    Some(avail.min(limit))
}

/// Refuse `cfg` when `estimate(cfg)` is over `available` bytes, in one line: where the largest
/// key of the largest term is and its name (`name` gives both for a `table.key`, e.g.
/// [`Config::key_at`]), its value, what `doing` needs and what is available, that term, and the
/// largest value of the key that fits (re-estimated; for the keys a size can be lowered by).
pub fn refuse_over(
    cfg: &Config,
    estimate: impl Fn(&Config) -> MemEstimate,
    available: u128,
    doing: &str,
    name: impl Fn(&str) -> (String, String),
) -> Result<(), String> {
    let est = estimate(cfg);
    if est.total() <= available {
        return Ok(());
    }
    let big = est.terms.iter().max_by_key(|t| t.bytes).expect("estimates have terms");
    let mut c = cfg.clone();
    let mut value = |k: &str| size_mut(&mut c, k).map_or(0, |v| *v as u128);
    let (key, value) = big.keys.iter().rev().map(|&k| (k, value(k))).max_by_key(|k| k.1).expect("terms have keys");
    let (at, shown) = name(key);
    // The largest value that fits, for a key that can be lowered alone (not heads, head_dim).
    let fits = |v: u128| {
        let mut c = cfg.clone();
        let set = size_mut(&mut c, key).zip(usize::try_from(v).ok()).map(|(k, v)| *k = v);
        set.is_some() && estimate(&c).total() <= available
    };
    let min = if [VOCAB, SEQ].contains(&key) { 2 } else { 1 };
    let hint = match ![HEADS, HEAD_DIM].contains(&key) && min < value && fits(min) {
        true => {
            let (mut lo, mut hi) = (min, value); // fits(lo), not fits(hi)
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                *(if fits(mid) { &mut lo } else { &mut hi }) = mid;
            }
            format!("; {shown} <= {lo} fits")
        }
        false => String::new(),
    };
    let (total, big_bytes, avail) = (human(est.total()), human(big.bytes), human(available));
    Err(format!(
        "{at}: {shown} = {value}: {doing} needs ~{total}, {avail} available (mostly {}: {} = {big_bytes}){hint}",
        big.name, big.formula
    ))
}

/// Refuse, before anything is allocated, a config whose host memory cannot fit (see
/// [`MemEstimate::of`] and [`refuse_over`]): for `train.device = "cpu"` a whole training step,
/// for "cuda" the parameters the host initialises before they go to the GPU. E.g. `run.toml:9:
/// model.seq_len = 100000: a CPU training step needs ~80.3 GB, 20.1 GB available (mostly
/// attention scores: ...); model.seq_len <= 49000 fits`. Without /proc/meminfo, only what no
/// 64-bit machine can address is refused.
pub fn check_memory(cfg: &Config) -> Result<(), String> {
    let cpu = cfg.train.device == "cpu";
    let doing = if cpu { "a CPU training step" } else { "initialising the parameters on the host" };
    let available = mem_available().unwrap_or(u64::MAX as u128);
    refuse_over(cfg, |c| MemEstimate::per_rank(c, 16, cpu), available, doing, |k| cfg.key_at(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sets: &[&str]) -> Result<Config, String> {
        Config::parse("q.toml", QUICKSTART, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// The 1-based line of the `nth` line of the quickstart that starts with `prefix`.
    fn line(prefix: &str, nth: usize) -> usize {
        QUICKSTART.lines().enumerate().filter(|l| l.1.starts_with(prefix)).nth(nth).unwrap().0 + 1
    }

    #[test]
    fn shipped_configs_load() {
        parse(&[]).unwrap();
        Config::parse("bench-1b.toml", include_str!("../../configs/bench-1b.toml"), &[]).unwrap();
    }

    /// A rank of an expert-parallel job holds 1/ep of the experts: bench-node (~10B, ep = 8)
    /// needs ~160 GB on the host as one rank and a fraction of it per rank.
    #[test]
    fn the_host_memory_check_counts_one_ranks_experts() {
        let node = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            let cfg = Config::parse("bench-node.toml", include_str!("../../configs/bench-node.toml"), &sets).unwrap();
            let est = MemEstimate::per_rank(&cfg, 16, false);
            (est.terms.iter().find(|t| t.name == "experts").unwrap().bytes, est.total())
        };
        let ((e8, all8), (e1, all1)) = (node(&[]), node(&["parallel.ep=1"]));
        assert_eq!(e8 * 8, e1, "experts per rank at ep = 8");
        assert!(all1 > 150_000_000_000 && all8 < 30_000_000_000, "{all1} B as one rank, {all8} B per rank at ep = 8");
    }

    #[test]
    fn every_bad_host_value_is_one_line_naming_the_key_and_what_is_valid() {
        let cases = [
            ("train.lr=-1", "train.lr = -1: must be finite and >= 0"),
            ("train.lr=nan", "train.lr = NaN: must be finite"),
            ("train.lr=inf", "train.lr = inf: must be finite"),
            ("train.min_lr_ratio=1.5", "train.min_lr_ratio = 1.5: must be in [0, 1]"),
            ("train.min_lr_ratio=-inf", "train.min_lr_ratio = -inf"),
            ("model.init_std=0", "model.init_std = 0: must be finite and > 0"),
            ("model.rope_theta=inf", "model.rope_theta = inf: must be finite and > 0"),
            ("model.norm_eps=-1e-6", "model.norm_eps = -0.000001: must be"),
            ("train.clip=nan", "train.clip = NaN: must be finite and >= 0"),
            ("train.clip=-1", "train.clip = -1"),
            ("train.decay_frac=0", "train.decay_frac = 0: must be in (0, 1]"),
            ("train.steps=0", "train.steps = 0: must be at least 1"),
            ("train.eval_batches=0", "train.eval_batches = 0: must be at least 1"),
            ("train.log_every=0", "train.log_every = 0"),
            ("train.micro_batch=0", "train.micro_batch = 0: must be an integer in 1..="),
            ("train.grad_accum=0", "train.grad_accum = 0"),
            ("train.schedule=\"linear\"", "train.schedule = \"linear\": must be one of \"cosine\""),
            ("train.device=\"gpu\"", "train.device = \"gpu\": must be one of \"cpu\", \"cuda\""),
            ("train.out=\"\"", "train.out = \"\": must be a run directory"),
            ("train.init_from=\" \"", "train.init_from = \" \""),
            ("data.source=\"\"", "data.source = \"\""),
            ("model.layers=0", "model.layers = 0: must be an integer in 1..=4294967295"),
            ("model.vocab=1", "model.vocab = 1: must be an integer in 2..="),
            ("model.hidden=0", "model.hidden = 0"),
            ("model.hidden=4294967296", "model.hidden = 4294967296: must be an integer in 1..=4294967295"),
            ("model.heads=0", "model.heads = 0"),
            ("model.kv_heads=8", "model.kv_heads = 8: must be in 1..=heads (4)"),
            ("model.kv_heads=0", "model.kv_heads = 0"),
            ("model.heads=5", "model.heads = 5: must be a multiple of kv_heads (2)"),
            ("model.head_dim=33", "model.head_dim = 33: must be even"),
            ("model.seq_len=1", "model.seq_len = 1: must be an integer in 2..="),
            ("model.experts=0", "model.experts = 0"),
            ("model.expert_ffn=0", "model.expert_ffn = 0"),
        ];
        for (set, want) in cases {
            let e = parse(&[set]).unwrap_err();
            assert!(e.contains(want) && e.contains(&format!("(--set {set}): ")), "{set}: {e}");
            assert!(e.starts_with("q.toml") && !e.contains('\n'), "{e}");
        }
        // Valid edges: warmup past steps, no clipping, decay to 0, decay over the whole run.
        let ok =
            ["train.warmup=1000", "train.clip=0", "train.min_lr_ratio=0", "train.decay_frac=1", "model.kv_heads=4"];
        ok.iter().for_each(|s| drop(parse(&[s]).unwrap()));
        // A value written in the file is pointed at by its line.
        let text = QUICKSTART.replace("lr = 3e-3", "lr = -3e-3");
        let e = Config::parse("q.toml", &text, &[]).unwrap_err();
        assert_eq!(
            e,
            format!(
                "q.toml:{}: train.lr = -0.003: must be finite and >= 0 (0 freezes the weights), e.g. 3e-4",
                line("lr =", 0)
            )
        );
    }

    #[test]
    fn type_errors_name_the_table_and_key() {
        let e = parse(&["model.seq_len=1e9"]).unwrap_err();
        let want = format!(
            "q.toml:{} (--set model.seq_len=1e9): model.seq_len: invalid type: floating point",
            line("seq_len", 0)
        );
        assert!(e.starts_with(&want) && e.ends_with("; write it as an integer: 1000000000"), "{e}");
    }

    #[test]
    fn setting_another_plugin_starts_its_table_afresh() {
        // The quickstart's [router] has top_k = 2; another router must not inherit it.
        let c = parse(&["router.plugin=\"my-router\"", "router.max_k=3"]).unwrap();
        assert_eq!(c.router.get("plugin").and_then(|v| v.as_str()), Some("my-router"));
        assert_eq!(c.router.len(), 2, "{:?}", c.router);
        // The same plugin again keeps its keys; so do other tables.
        let c = parse(&["router.plugin=\"topk-softmax\"", "balance_loss.1.plugin=\"z-loss\""]).unwrap();
        assert_eq!(c.router.get("top_k").and_then(|v| v.as_integer()), Some(2));
        assert!(c.balance_loss[1].get("coef").is_some());
        let c = parse(&["balance_loss.0.plugin=\"other\""]).unwrap();
        assert_eq!(c.balance_loss[0].len(), 1);
        assert_eq!(c.experts.get("plugin").and_then(|v| v.as_str()), Some("swiglu"));
    }

    #[test]
    fn set_reaches_the_tables_of_an_array_and_points_at_their_lines() {
        let c = parse(&["balance_loss.1.coef=0.5", "balance_loss.0.plugin=\"switch-aux\""]).unwrap();
        assert_eq!(c.balance_loss[1]["coef"].as_float(), Some(0.5));
        assert_eq!(c.balance_loss[0]["plugin"].as_str(), Some("switch-aux"));
        let at = format!("q.toml:{} (--set balance_loss.1.coef=0.5)", line("coef", 1));
        assert_eq!(c.at("balance_loss", 1, "coef"), at);
        assert_eq!(c.at("balance_loss", 0, "coef"), format!("q.toml:{}", line("coef", 0)));
        let e = parse(&["balance_loss.2.coef=1"]).unwrap_err();
        let want = "--set balance_loss.2.coef=1: index 2 is out of range: q.toml has 2 [[balance_loss]] tables (indices 0..=1)";
        assert_eq!(e, want);
        let e = parse(&["balance_loss.coef=1"]).unwrap_err();
        assert!(e.contains("`balance_loss` is a list of 2 [[balance_loss]] tables; give an index"), "{e}");
    }

    #[test]
    fn set_of_a_new_key_keeps_every_line_of_the_file() {
        let base = parse(&[]).unwrap();
        let c =
            parse(&["train.min_lr_ratio=0.5", "router.normalize=false", "data.val=\"v\"", "train.lr=0.01"]).unwrap();
        assert_eq!(c.source.added.len(), 3);
        for (t, n, k) in
            [("router", 0, "top_k"), ("experts", 0, "plugin"), ("balance_loss", 1, "coef"), ("comm", 0, "plugin")]
        {
            assert_eq!(c.at(t, n, k), base.at(t, n, k));
        }
        assert_eq!(c.at("train", 0, "min_lr_ratio"), "q.toml (--set train.min_lr_ratio=0.5)");
        assert_eq!(c.at("train", 0, "lr"), format!("q.toml:{} (--set train.lr=0.01)", line("lr =", 0)));
        // A table the file lacks is created after its end.
        let bench = include_str!("../../configs/bench-1b.toml");
        let c = Config::parse("b.toml", bench, &["data.source=\"shards/\"".into()]).unwrap();
        assert_eq!(
            (c.data.source.as_str(), c.at("data", 0, "source")),
            ("shards/", "b.toml (--set data.source=\"shards/\")".into())
        );
        assert_eq!(
            c.at("router", 0, "top_k"),
            format!("b.toml:{}", bench.lines().position(|l| l.starts_with("top_k")).unwrap() + 1)
        );
    }

    /// `model.dense_layers` needs `[dense]`, `[dense]` needs dense layers, one layer stays MoE.
    #[test]
    fn dense_layers_need_their_table_and_leave_a_moe_layer() {
        let dense = ["dense.plugin=\"shared-swiglu\"", "dense.ffn=24"];
        let e = parse(&["model.dense_layers=1"]).unwrap_err();
        assert!(e.contains("(--set model.dense_layers=1): model.dense_layers = 1 needs a [dense] table"), "{e}");
        let e = parse(&dense).unwrap_err();
        assert!(
            e.contains("(--set dense.plugin=\"shared-swiglu\"): a [dense] table but model.dense_layers = 0"),
            "{e}"
        );
        let layers = parse(&[]).unwrap().model.layers;
        let all = format!("model.dense_layers={layers}");
        let e = parse(&[&all, dense[0], dense[1]]).unwrap_err();
        assert!(e.contains(&format!("must be below model.layers ({layers}): one MoE layer at least")), "{e}");
        let c = parse(&["model.dense_layers=1", dense[0], dense[1]]).unwrap();
        assert_eq!((c.model.dense_layers, c.dense_ffn(), c.shared_ffn()), (1, 24, 0));
    }

    /// `[model.yarn]` values out of range name the key; `model.attn_scale` must be positive.
    #[test]
    fn yarn_and_attn_scale_are_checked() {
        let yarn = "\n[model.yarn]\nfactor = 4.0\noriginal_seq_len = 16\n";
        let with = |extra: &str| {
            Config::parse(
                "q.toml",
                &QUICKSTART.replace("expert_ffn = 128\n", &format!("expert_ffn = 128\n{extra}")),
                &[],
            )
        };
        let c = with(yarn).unwrap();
        assert_eq!(
            c.model.yarn.map(|y| (y.factor, y.beta_fast, y.beta_slow, y.truncate)),
            Some((4.0, 32.0, 1.0, true))
        );
        for (bad, want) in [
            ("factor = 0.5", "model.yarn.factor = 0.5: must be finite and >= 1"),
            ("beta_fast = 0.5", "model.yarn.beta_fast = 0.5: must be finite and > beta_slow"),
            ("original_seq_len = 0", "model.yarn.original_seq_len = 0: must be an integer >= 1"),
        ] {
            let key = bad.split(" = ").next().unwrap();
            let text: String = yarn.lines().filter(|l| !l.starts_with(key)).map(|l| format!("{l}\n")).collect();
            let e = with(&format!("{text}{bad}\n")).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
        let e = parse(&["model.attn_scale=0"]).unwrap_err();
        assert!(e.contains("model.attn_scale = 0: must be finite and > 0"), "{e}");
    }

    #[test]
    fn set_of_what_does_not_exist_says_what_does() {
        let e = parse(&["train.stepz=5"]).unwrap_err();
        assert!(
            e.starts_with("q.toml (--set train.stepz=5): unknown field `stepz`, expected one of `device`, `steps`"),
            "{e}"
        );
        let e = parse(&["trian.steps=5"]).unwrap_err();
        assert_eq!(e, "--set trian.steps=5: there is no table `trian`; valid: model, train, data, parallel, router, experts, shared, dense, balance_loss, optimizer, comm");
        for bad in ["steps=5", "train.=5", "train.steps"] {
            assert!(parse(&[bad]).unwrap_err().contains("expected table.key=value"), "{bad}");
        }
        assert!(parse(&["model.hidden.x=1"]).unwrap_err().contains("`model.hidden` is a value, not a table"));
        assert!(parse(&["router.sub.x=1"]).unwrap_err().contains("there is no table `router.sub` in q.toml"));
    }

    #[test]
    fn memory_estimate_names_the_key_that_does_not_fit_and_what_would() {
        let est = |c: &Config| MemEstimate::of(c, 16, true);
        let refuse = |c: &Config, avail: u128| refuse_over(c, est, avail, "a CPU training step", |k| c.key_at(k));
        let c = parse(&["train.threads=2"]).unwrap();
        let total = est(&c).total();
        assert!((10_000_000..1_000_000_000).contains(&total), "quickstart: {}", est(&c).summary());
        refuse(&c, 1 << 30).unwrap();
        let c = parse(&["train.threads=2", "model.seq_len=100000"]).unwrap();
        let e = refuse(&c, 20_000_000_000).unwrap_err();
        let at = format!("q.toml:{} (--set model.seq_len=100000)", line("seq_len", 0));
        let want = format!("{at}: model.seq_len = 100000: a CPU training step needs ~");
        assert!(e.starts_with(&want) && e.contains(", 20.0 GB available (mostly attention scores: 4 seq_len×"), "{e}");
        let fits: usize = e.rsplit("model.seq_len <= ").next().unwrap().strip_suffix(" fits").unwrap().parse().unwrap();
        let with = |s| est(&Config { model: ModelConfig { seq_len: s, ..c.model.clone() }, ..c.clone() }).total();
        assert!(with(fits) <= 20_000_000_000 && with(fits + 1) > 20_000_000_000, "{e}");
        let c = parse(&["model.hidden=1000000000"]).unwrap();
        let e = refuse(&c, 20_000_000_000).unwrap_err();
        assert!(
            e.contains("model.hidden = 1000000000: a CPU training step needs ~") && e.contains("model.hidden <= "),
            "{e}"
        );
        // Every size at its largest: no overflow, a refusal naming one of them.
        let max = [
            "model.vocab=4294967295",
            "model.hidden=4294967295",
            "model.layers=4294967295",
            "model.heads=4294967295",
            "model.kv_heads=1",
            "model.head_dim=4294967294",
            "model.seq_len=4294967295",
            "model.experts=4294967295",
            "model.expert_ffn=4294967295",
            "train.micro_batch=4294967295",
        ];
        let c = parse(&max).unwrap();
        assert!(refuse(&c, u64::MAX as u128).unwrap_err().contains(" = 4294967295: a CPU training step needs ~"));
        assert_eq!(
            (human(999), human(40_049_000_000), human(u128::MAX)),
            ("999 B".into(), "40.0 GB".into(), "3.4e38 B".into())
        );
    }
}
