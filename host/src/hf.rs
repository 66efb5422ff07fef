//! Hugging Face interop for the Qwen3-MoE, Mixtral and OLMoE families (docs/interop.md):
//!
//! - `pith import hf DIR --out RUN`: config.json → a Pith config (refusing, by field, what Pith
//!   can't represent), safetensors (one file, or shards named by model.safetensors.index.json;
//!   F32, BF16 or F16; experts per expert or fused) → a Pith run directory holding a step-0
//!   checkpoint that `--resume` and `train.init_from` read.
//! - `pith export hf CHECKPOINT OUT`: config.json, safetensors (per-expert layout, sharded with
//!   an index past `max_shard_bytes`) and the run's tokenizer files.
//! - `train.init_from` ([`init_weights`]) and `pith eval-logits` ([`eval_logits`]).
//!
//! Streaming: safetensors are memory-mapped one file at a time and each tensor is converted
//! straight into (import) or out of (export) its place, so beyond the model itself at most one
//! shard and one tensor are held. Output goes to a temp directory renamed at the end: a failure
//! leaves nothing behind. Every error is one line naming the file and, where there is one, the
//! tensor or config field.
//!
//! Layouts: HF matrices are [out, in] like Pith's host matrices; the std pack's router `weight`
//! is [E, H] like HF's gate; swiglu's `w_gate`, `w_up` [E, H, F] and `w_down` [E, F, H] hold
//! each expert's HF `gate_proj`/`up_proj` [F, H] and `down_proj` [H, F] TRANSPOSED. Fused
//! (transformers 5) experts are `experts.gate_up_proj` [E, 2F, H] (gate rows first) and
//! `experts.down_proj` [E, H, F].

use crate::checkpoint::{self, TrainerState};
use crate::config::{Config, ModelConfig, QkNorm};
use crate::cpu::CpuOps;
use crate::model::Model;
use crate::params::Params;
use crate::registry::Registry;
use pith_plugin_api::abi::OptimizerBox;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A model family Pith imports and exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Qwen3Moe,
    Mixtral,
    Olmoe,
}

const FAMILIES: [Family; 3] = [Family::Qwen3Moe, Family::Mixtral, Family::Olmoe];

impl Family {
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
            Family::Olmoe => "OlmoeForCausalLM",
        }
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen3Moe => "qwen3_moe",
            Family::Mixtral => "mixtral",
            Family::Olmoe => "olmoe",
        }
    }
    fn qk_norm(self) -> QkNorm {
        match self {
            Family::Qwen3Moe => QkNorm::Head,
            Family::Mixtral => QkNorm::None,
            Family::Olmoe => QkNorm::Full,
        }
    }
    /// The prefix of the MoE block's tensors in a layer.
    fn moe(self) -> &'static str {
        match self {
            Family::Mixtral => "block_sparse_moe",
            _ => "mlp",
        }
    }
    /// HF names of an expert's (gate, up, down) matrices.
    fn expert_names(self) -> [&'static str; 3] {
        match self {
            Family::Mixtral => ["w1", "w3", "w2"],
            _ => ["gate_proj", "up_proj", "down_proj"],
        }
    }
    /// The family a Pith model exports as: chosen by `model.qk_norm`.
    fn of(m: &ModelConfig, normalize: bool) -> Result<Family, String> {
        match (m.qk_norm, normalize) {
            (QkNorm::None, false) => Err("model.qk_norm = \"none\" is Mixtral, whose router always renormalises the \
                                          top-k weights, but router.normalize = false"
                .into()),
            (q, _) => Ok(FAMILIES.into_iter().find(|f| f.qk_norm() == q).unwrap()),
        }
    }
}

fn names() -> String {
    FAMILIES.map(|f| f.architecture()).join(", ")
}

/// A Hugging Face config.json as Pith reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct HfModel {
    pub family: Family,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub expert_ffn: usize,
    pub top_k: usize,
    /// `norm_topk_prob` (always true for Mixtral): the router's `normalize`.
    pub normalize: bool,
    pub rope_theta: f64,
    pub norm_eps: f64,
    pub init_std: f64,
    /// `tie_word_embeddings`: lm_head is read from the embedding.
    pub tied: bool,
    pub aux_coef: f64,
    pub max_positions: usize,
    /// Pith's training sequence length (and RoPE table size).
    pub seq_len: usize,
}

/// Read `DIR/config.json`. `seq_len`: Pith's sequence length (default: max_position_embeddings,
/// at most 2048).
pub fn read_config(dir: &Path, seq_len: Option<usize>) -> Result<HfModel, String> {
    let path = dir.join("config.json");
    let at = |e: String| format!("{}: {e}", path.display());
    let text = fs::read_to_string(&path).map_err(|e| at(e.to_string()))?;
    let c: Value = serde_json::from_str(&text).map_err(|e| at(e.to_string()))?;
    parse_config(&c, seq_len).map_err(at)
}

fn parse_config(c: &Value, seq_len: Option<usize>) -> Result<HfModel, String> {
    let get = |k: &str| c.get(k).filter(|v| !v.is_null());
    let arch = get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str);
    let mt = get("model_type").and_then(Value::as_str);
    let family = match (arch, mt) {
        (Some(a), _) => FAMILIES.into_iter().find(|f| f.architecture() == a),
        (None, Some(t)) => FAMILIES.into_iter().find(|f| f.model_type() == t),
        (None, None) => None,
    };
    let family = family.ok_or_else(|| {
        let what = arch.or(mt).unwrap_or("(none given)");
        format!("unknown architecture `{what}`; Pith imports {}", names())
    })?;
    let f = family;
    let int = |k: &str| -> Result<Option<usize>, String> {
        match get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| format!("`{k}` = {v} is not an integer")),
        }
    };
    let size = |k: &str, default: Option<usize>| -> Result<usize, String> {
        match int(k)?.or(default) {
            Some(n) if n > 0 => Ok(n),
            Some(_) => Err(format!("`{k}` must be at least 1")),
            None => Err(format!("`{k}` is missing")),
        }
    };
    let num = |k: &str, default: f64| -> Result<f64, String> {
        get(k).map_or(Ok(default), |v| v.as_f64().ok_or_else(|| format!("`{k}` = {v} is not a number")))
    };
    let flag = |k: &str| get(k).is_some_and(|v| v.as_bool() == Some(true));
    let (hidden, heads) = (size("hidden_size", None)?, size("num_attention_heads", None)?);
    let kv_heads = size("num_key_value_heads", Some(if f == Family::Qwen3Moe { 4 } else { heads }))?;
    let head_dim = match int("head_dim")? {
        Some(d) => d,
        None if hidden.is_multiple_of(heads) => hidden / heads,
        None => return Err(format!("`hidden_size` {hidden} is not a multiple of `num_attention_heads` {heads}")),
    };
    let experts_key = match f {
        Family::Mixtral => "num_local_experts",
        _ if get("num_experts").is_none() && get("num_local_experts").is_some() => "num_local_experts",
        _ => "num_experts",
    };
    let ffn_key = if f == Family::Qwen3Moe { "moe_intermediate_size" } else { "intermediate_size" };
    let (experts, expert_ffn) = (size(experts_key, None)?, size(ffn_key, None)?);
    let top_k = size("num_experts_per_tok", None)?;
    let max_positions = size("max_position_embeddings", Some(4096))?;
    let seq_len = seq_len.unwrap_or(max_positions.min(2048));

    // What Pith can't represent, each with the field that says so.
    let mut no: Vec<String> = Vec::new();
    let mut refuse = |k: &str, v: &Value, why: &str| no.push(format!("`{k}` = {v} ({why})"));
    if let Some(v) = get("hidden_act").filter(|v| v.as_str() != Some("silu")) {
        refuse("hidden_act", v, "experts are SwiGLU with silu");
    }
    for k in ["attention_bias", "mlp_bias"] {
        if flag(k) {
            refuse(k, &Value::Bool(true), "Pith's projections have no bias");
        }
    }
    let rope = get("rope_parameters").or_else(|| get("rope_scaling"));
    let rope_key = if get("rope_parameters").is_some() { "rope_parameters" } else { "rope_scaling" };
    let rope_type = rope.and_then(|r| r.get("rope_type").or_else(|| r.get("type"))).and_then(Value::as_str);
    if rope_type.is_some_and(|t| t != "default") {
        refuse(rope_key, rope.unwrap(), "only plain RoPE");
    }
    let rope_theta = match rope.and_then(|r| r.get("rope_theta")).filter(|v| !v.is_null()) {
        Some(v) => v.as_f64().ok_or_else(|| format!("`{rope_key}.rope_theta` = {v} is not a number"))?,
        None => num("rope_theta", if f == Family::Mixtral { 1e6 } else { 1e4 })?,
    };
    let partial = rope.and_then(|r| r.get("partial_rotary_factor")).or_else(|| get("partial_rotary_factor"));
    if let Some(v) = partial.filter(|v| v.as_f64() != Some(1.0) && !v.is_null()) {
        refuse("partial_rotary_factor", v, "RoPE rotates whole heads");
    }
    if f == Family::Qwen3Moe && flag("use_sliding_window") {
        refuse("use_sliding_window", &Value::Bool(true), "attention is full causal");
    }
    if let (Family::Mixtral, Some(w)) = (f, get("sliding_window")) {
        if w.as_u64().is_none_or(|w| (w as usize) < seq_len) {
            refuse("sliding_window", w, &format!("attention is full causal over the {seq_len}-token sequence"));
        }
    }
    if let Some(t) = get("layer_types").and_then(Value::as_array) {
        if let Some(v) = t.iter().find(|v| v.as_str() != Some("full_attention")) {
            refuse("layer_types", v, "every layer is full-attention MoE");
        }
    }
    if let Some(v) = get("decoder_sparse_step").filter(|v| v.as_u64() != Some(1)) {
        refuse("decoder_sparse_step", v, "every layer is MoE");
    }
    if let Some(v) = get("mlp_only_layers").filter(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
        refuse("mlp_only_layers", v, "every layer is MoE");
    }
    for k in ["shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"] {
        if let Some(v) = get(k).filter(|v| v.as_u64() != Some(0)) {
            refuse(k, v, "Pith's shared expert is ungated; import has none");
        }
    }
    if let Some(v) = get("clip_qkv") {
        refuse("clip_qkv", v, "q, k, v are not clipped");
    }
    if f == Family::Olmoe && head_dim * heads != hidden {
        refuse("head_dim", &json!(head_dim), "OLMoE's head_dim is hidden_size / num_attention_heads");
    }
    if let Some(v) = get("quantization_config") {
        refuse("quantization_config", v, "weights must be plain F32, BF16 or F16");
    }
    if !no.is_empty() {
        return Err(format!("Pith can't represent {}", no.join("; ")));
    }
    if !heads.is_multiple_of(kv_heads) || !head_dim.is_multiple_of(2) {
        return Err(format!(
            "`num_attention_heads` {heads} must be a multiple of `num_key_value_heads` {kv_heads} and head_dim {head_dim} even"
        ));
    }
    if top_k > experts {
        return Err(format!("`num_experts_per_tok` {top_k} is more than `{experts_key}` {experts}"));
    }
    Ok(HfModel {
        family,
        vocab: size("vocab_size", None)?,
        hidden,
        layers: size("num_hidden_layers", None)?,
        heads,
        kv_heads,
        head_dim,
        experts,
        expert_ffn,
        top_k,
        normalize: f == Family::Mixtral || flag("norm_topk_prob"),
        rope_theta,
        norm_eps: num("rms_norm_eps", if f == Family::Qwen3Moe { 1e-6 } else { 1e-5 })?,
        init_std: num("initializer_range", 0.02)?,
        tied: flag("tie_word_embeddings"),
        aux_coef: num("router_aux_loss_coef", 0.0)?,
        max_positions,
        seq_len,
    })
}

/// A TOML string literal.
fn quote(s: &str) -> String {
    toml::Value::String(s.into()).to_string()
}

impl HfModel {
    /// The Pith config of this model: its [model], the std topk-softmax router and swiglu
    /// experts, a switch-aux loss with `router_aux_loss_coef`, adamw, and [train] defaults that
    /// write to `run`.
    pub fn config(&self, src: &Path, run: &Path) -> Result<Config, String> {
        let qk = match self.family.qk_norm() {
            QkNorm::Head => "head",
            QkNorm::Full => "full",
            QkNorm::None => "none",
        };
        let aux = match self.aux_coef > 0.0 {
            true => format!("\n[[balance_loss]]\nplugin = \"switch-aux\"\ncoef = {:?}\n", self.aux_coef),
            false => String::new(),
        };
        let text = format!(
            "# `pith import hf {src}` ({arch})\n\n[model]\nvocab = {}\nhidden = {}\nlayers = {}\nheads = {}\n\
             kv_heads = {}\nhead_dim = {}\nseq_len = {}\nrope_theta = {:?}\nexperts = {}\nexpert_ffn = {}\n\
             norm_eps = {:?}\ninit_std = {:?}\nqk_norm = \"{qk}\"\n\n[train]\nsteps = 100\nmicro_batch = 4\n\
             lr = 1e-4\nwarmup = 10\nout = {}\n\n[router]\nplugin = \"topk-softmax\"\ntop_k = {}\nnormalize = {}\n\n\
             [experts]\nplugin = \"swiglu\"\n{aux}\n[optimizer]\nplugin = \"adamw\"\n",
            self.vocab,
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.seq_len,
            self.rope_theta,
            self.experts,
            self.expert_ffn,
            self.norm_eps,
            self.init_std,
            quote(&run.display().to_string()),
            self.top_k,
            self.normalize,
            src = src.display(),
            arch = self.family.architecture(),
        );
        Config::parse(&format!("<import of {}>", src.display()), &text, &[])
    }
}

/// Name and shape of every parameter of a Pith model with the std topk-softmax router and
/// swiglu experts and no shared expert, in `Model::new`'s order.
pub fn pith_params(m: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, qd, kd, e, f) = (m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim, m.experts, m.expert_ffn);
    let mut v = vec![("embed.weight".to_string(), vec![m.vocab, h])];
    for l in 0..m.layers {
        let mut add = |name: &str, shape: Vec<usize>| v.push((format!("layers.{l}.{name}"), shape));
        add("attn_norm.weight", vec![h]);
        add("attn.q_proj.weight", vec![qd, h]);
        add("attn.k_proj.weight", vec![kd, h]);
        add("attn.v_proj.weight", vec![kd, h]);
        add("attn.o_proj.weight", vec![h, qd]);
        let qk = match m.qk_norm {
            QkNorm::Head => Some((m.head_dim, m.head_dim)),
            QkNorm::Full => Some((qd, kd)),
            QkNorm::None => None,
        };
        if let Some((qn, kn)) = qk {
            add("attn.q_norm.weight", vec![qn]);
            add("attn.k_norm.weight", vec![kn]);
        }
        add("moe_norm.weight", vec![h]);
        add("moe.router.weight", vec![e, h]);
        add("moe.experts.w_gate", vec![e, h, f]);
        add("moe.experts.w_up", vec![e, h, f]);
        add("moe.experts.w_down", vec![e, f, h]);
    }
    v.push(("final_norm.weight".into(), vec![h]));
    v.push(("lm_head.weight".into(), vec![m.vocab, h]));
    v
}

/// Is this Pith parameter an expert stack ([E, in, out], one HF tensor per expert)?
fn is_experts(pith: &str) -> bool {
    pith.contains(".moe.experts.w_")
}

/// The HF name of a Pith parameter (of expert `e` for an expert stack).
fn hf_name(f: Family, pith: &str, e: usize) -> String {
    match pith {
        "embed.weight" => return "model.embed_tokens.weight".into(),
        "final_norm.weight" => return "model.norm.weight".into(),
        "lm_head.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let (l, rest) = pith.strip_prefix("layers.").and_then(|r| r.split_once('.')).expect("a layer parameter");
    let [gate, up, down] = f.expert_names();
    let rest = match rest {
        "attn_norm.weight" => "input_layernorm.weight".into(),
        "moe_norm.weight" => "post_attention_layernorm.weight".into(),
        "moe.router.weight" => format!("{}.gate.weight", f.moe()),
        "moe.experts.w_gate" => format!("{}.experts.{e}.{gate}.weight", f.moe()),
        "moe.experts.w_up" => format!("{}.experts.{e}.{up}.weight", f.moe()),
        "moe.experts.w_down" => format!("{}.experts.{e}.{down}.weight", f.moe()),
        r => format!("self_attn.{}", r.strip_prefix("attn.").expect("an attention parameter")),
    };
    format!("model.layers.{l}.{rest}")
}

/// Where an HF tensor goes in a Pith model.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    /// The whole parameter, same layout.
    Whole,
    /// Expert e's [out, in] matrix, transposed into slot e of an expert stack.
    Expert(usize),
    /// A fused [E, 2F, H] gate_up_proj: gate rows into `w_gate`, up rows into `w_up`.
    GateUp,
    /// A fused [E, H, F] down_proj into `w_down`.
    Down,
    /// Not a weight (a saved RoPE table).
    Skip,
}

/// The Pith parameter an HF tensor name belongs to (any family's naming), or None.
fn translate(name: &str) -> Option<(String, Slot)> {
    if name.ends_with("rotary_emb.inv_freq") {
        return Some((String::new(), Slot::Skip));
    }
    match name {
        "model.embed_tokens.weight" => return Some(("embed.weight".into(), Slot::Whole)),
        "model.norm.weight" => return Some(("final_norm.weight".into(), Slot::Whole)),
        "lm_head.weight" => return Some(("lm_head.weight".into(), Slot::Whole)),
        _ => {}
    }
    let (l, rest) = name.strip_prefix("model.layers.")?.split_once('.')?;
    let l: usize = l.parse().ok()?;
    let at = |s: &str, slot| Some((format!("layers.{l}.{s}"), slot));
    match rest {
        "input_layernorm.weight" => return at("attn_norm.weight", Slot::Whole),
        "post_attention_layernorm.weight" => return at("moe_norm.weight", Slot::Whole),
        _ => {}
    }
    if let Some(a) = rest.strip_prefix("self_attn.") {
        let known = ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"];
        let w = a.strip_suffix(".weight").filter(|w| known.contains(w))?;
        return at(&format!("attn.{w}.weight"), Slot::Whole);
    }
    let moe = rest.strip_prefix("mlp.").or_else(|| rest.strip_prefix("block_sparse_moe."))?;
    match moe {
        "gate.weight" => return at("moe.router.weight", Slot::Whole),
        "experts.gate_up_proj" => return at("moe.experts.w_gate", Slot::GateUp),
        "experts.down_proj" => return at("moe.experts.w_down", Slot::Down),
        _ => {}
    }
    let (e, w) = moe.strip_prefix("experts.")?.split_once('.')?;
    let which = match w {
        "gate_proj.weight" | "w1.weight" => "w_gate",
        "up_proj.weight" | "w3.weight" => "w_up",
        "down_proj.weight" | "w2.weight" => "w_down",
        _ => return None,
    };
    at(&format!("moe.experts.{which}"), Slot::Expert(e.parse().ok()?))
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let (exp, man) = (((h >> 10) & 0x1f) as u32, (h & 0x3ff) as u32);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            let v = m as f32 * (-24f32).exp2();
            return if sign != 0 { -v } else { v };
        }
        (31, 0) => sign | 0x7f80_0000,
        (31, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// f32 → bf16, rounding to nearest even.
fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return 0x7fc0;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Reads one element from the start of a byte slice.
type Read = fn(&[u8]) -> f32;

/// Element size and reader for a dtype Pith imports.
fn reader(d: Dtype) -> Option<(usize, Read)> {
    match d {
        Dtype::F32 => Some((4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        Dtype::BF16 => Some((2, |b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))),
        Dtype::F16 => Some((2, |b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))),
        _ => None,
    }
}

fn mmap(path: &Path) -> Result<memmap2::Mmap, String> {
    let file = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: the file is only read, and not expected to change while Pith reads it.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("{}: cannot map: {e}", path.display()))
}

fn parse_st<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, String> {
    SafeTensors::deserialize(bytes).map_err(|e| format!("{}: not a readable safetensors file: {e:?}", path.display()))
}

/// The safetensors files of an HF folder, each with the tensors its index says it holds
/// (None: a single model.safetensors), and the file to name when a tensor is missing.
type Shards = (Vec<(PathBuf, Option<Vec<String>>)>, PathBuf);

fn shards(dir: &Path) -> Result<Shards, String> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let at = |e: String| format!("{}: {e}", index.display());
        let v: Value = serde_json::from_str(&fs::read_to_string(&index).map_err(|e| at(e.to_string()))?)
            .map_err(|e| at(e.to_string()))?;
        let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| at("no `weight_map`".into()))?;
        let mut files: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (t, f) in map {
            let f = f.as_str().ok_or_else(|| at(format!("`weight_map` entry `{t}` is not a file name")))?;
            files.entry(f).or_default().push(t.clone());
        }
        let mut out = Vec::new();
        for (f, tensors) in files {
            let path = dir.join(f);
            if !path.is_file() {
                return Err(format!("{}: shard `{f}` (holding `{}`) is missing", index.display(), tensors[0]));
            }
            out.push((path, Some(tensors)));
        }
        return Ok((out, index));
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok((vec![(single.clone(), None)], single));
    }
    Err(format!(
        "{}: no model.safetensors or model.safetensors.index.json (Pith reads safetensors only)",
        dir.display()
    ))
}

/// Fill `params` (a Pith model built from `hf`'s config) from the safetensors of `dir`, one
/// memory-mapped file at a time, each tensor converted in place.
pub fn load_weights(dir: &Path, hf: &HfModel, params: &mut Params) -> Result<(), String> {
    let index: HashMap<String, usize> = params.list.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
    let pieces = |i: usize| if is_experts(&params.list[i].name) { hf.experts } else { 1 };
    let mut filled: Vec<Vec<bool>> = (0..params.list.len()).map(|i| vec![false; pieces(i)]).collect();
    let (files, named) = shards(dir)?;
    for (path, listed) in &files {
        let map = mmap(path)?;
        let st = parse_st(path, &map)?;
        if let Some(t) = listed.iter().flatten().find(|t| st.tensor(t).is_err()) {
            let index = named.display();
            return Err(format!("{}: tensor `{t}` (listed in {index}) is not in this file", path.display()));
        }
        for (name, t) in st.tensors() {
            let at = |e: String| format!("{}: tensor `{name}` {e}", path.display());
            let nowhere =
                || at(format!("has no place in a Pith model of this config.json ({})", hf.family.architecture()));
            let (pith, slot) = translate(&name).ok_or_else(nowhere)?;
            if slot == Slot::Skip {
                continue;
            }
            let &i = index.get(&pith).ok_or_else(nowhere)?;
            let (size, read) =
                reader(t.dtype()).ok_or_else(|| at(format!("is {:?}; Pith reads F32, BF16 and F16", t.dtype())))?;
            let ps: Vec<usize> = params.list[i].spec.shape.iter().map(|&d| d as usize).collect();
            let want = match slot {
                Slot::Whole | Slot::Skip => ps.clone(),
                Slot::Expert(_) => vec![ps[2], ps[1]],
                Slot::GateUp => vec![ps[0], 2 * ps[2], ps[1]],
                Slot::Down => vec![ps[0], ps[2], ps[1]],
            };
            if t.shape() != want {
                return Err(at(format!("has shape {:?}, the model needs {want:?}", t.shape())));
            }
            let mut targets = vec![i];
            if slot == Slot::GateUp {
                targets.push(index[&pith.replace("w_gate", "w_up")]);
            }
            let marks: Vec<usize> = match slot {
                Slot::Expert(e) if e < hf.experts => vec![e],
                Slot::Expert(_) => return Err(nowhere()),
                Slot::GateUp | Slot::Down => (0..hf.experts).collect(),
                _ => vec![0],
            };
            for &j in &targets {
                if marks.iter().any(|&e| std::mem::replace(&mut filled[j][e], true)) {
                    return Err(at(format!("sets `{}` a second time", params.list[j].name)));
                }
            }
            let data = t.data();
            let x = |k: usize| read(&data[k * size..]);
            let w = &mut params.list[i].w;
            match slot {
                Slot::Whole => w.iter_mut().enumerate().for_each(|(k, w)| *w = x(k)),
                Slot::Expert(e) => transpose_into(&mut w[e * ps[1] * ps[2]..][..ps[1] * ps[2]], (ps[2], ps[1]), 0, x),
                Slot::Down => {
                    for e in 0..ps[0] {
                        let n = ps[1] * ps[2];
                        transpose_into(&mut w[e * n..][..n], (ps[2], ps[1]), e * n, x);
                    }
                }
                Slot::GateUp => {
                    let mut up = std::mem::take(&mut params.list[targets[1]].w);
                    let (f, h) = (ps[2], ps[1]);
                    let w = &mut params.list[i].w;
                    for e in 0..ps[0] {
                        let (g, u) = (&mut w[e * h * f..][..h * f], &mut up[e * h * f..][..h * f]);
                        transpose_into(g, (f, h), e * 2 * f * h, x);
                        transpose_into(u, (f, h), (e * 2 + 1) * f * h, x);
                    }
                    params.list[targets[1]].w = up;
                }
                Slot::Skip => {}
            }
        }
    }
    if hf.tied && !filled[index["lm_head.weight"]][0] {
        let embed = params.list[index["embed.weight"]].w.clone();
        params.list[index["lm_head.weight"]].w.copy_from_slice(&embed);
        filled[index["lm_head.weight"]][0] = true;
    }
    for (i, f) in filled.iter().enumerate() {
        if let Some(e) = f.iter().position(|f| !f) {
            let name = hf_name(hf.family, &params.list[i].name, e);
            return Err(format!("{}: tensor `{name}` is missing", named.display()));
        }
    }
    Ok(())
}

/// dst [C, R] = srcᵀ for src [R, C] (row-major) read through `x` from element `off` on.
fn transpose_into(dst: &mut [f32], (r, c): (usize, usize), off: usize, x: impl Fn(usize) -> f32) {
    for i in 0..r {
        for j in 0..c {
            dst[j * r + i] = x(off + i * c + j);
        }
    }
}

/// The model of `cfg` with its components, weights still at their random init, without grads.
fn build(cfg: &Config, reg: &Registry) -> Result<(Model, Params, (String, OptimizerBox)), String> {
    let (moe, opt) = crate::train::components(cfg, reg)?;
    let mut params = Params::default();
    let model = Model::new(&cfg.model, &mut params, cfg.train.seed, moe)?;
    params.list.iter_mut().for_each(|p| p.g = Vec::new());
    Ok((model, params, opt))
}

/// Copy the weights of a Pith checkpoint directory into `params` (names and shapes must match).
fn copy_checkpoint_weights(dir: &Path, params: &mut Params) -> Result<(), String> {
    let file = dir.join("model.safetensors");
    let weights = checkpoint::read_tensors(&file)?;
    for p in &mut params.list {
        let shape: Vec<usize> = p.spec.shape.iter().map(|&d| d as usize).collect();
        let (s, w) =
            weights.get(&p.name).ok_or_else(|| format!("{}: tensor `{}` is missing", file.display(), p.name))?;
        if *s != shape {
            return Err(format!("{}: tensor `{}` has shape {s:?}, the model needs {shape:?}", file.display(), p.name));
        }
        p.w.copy_from_slice(w);
    }
    Ok(())
}

/// Refuse a non-empty `out`; run `f` on a fresh temp sibling and rename it to `out`, or remove it.
fn atomically(out: &Path, f: impl FnOnce(&Path) -> Result<(), String>) -> Result<(), String> {
    if out.exists() && fs::read_dir(out).map_or(true, |mut d| d.next().is_some()) {
        return Err(format!("{}: exists and is not empty; not writing there", out.display()));
    }
    let name = out.file_name().ok_or_else(|| format!("{}: not a directory name", out.display()))?;
    let tmp = out.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let done =
        fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display())).and_then(|_| f(&tmp)).and_then(|_| {
            if out.exists() {
                fs::remove_dir(out).map_err(|e| format!("{}: cannot replace: {e}", out.display()))?;
            }
            fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))
        });
    if done.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    done
}

/// What [`import`] made.
#[derive(Debug, Clone)]
pub struct Imported {
    pub family: Family,
    pub params: usize,
    pub checkpoint: PathBuf,
}

/// `pith import hf SRC --out OUT`: a run directory OUT with `config.toml` (the derived Pith
/// config, `train.out` = OUT) and the step-0 checkpoint `checkpoints/step_00000000` (zero
/// optimizer state), so `pith train OUT/config.toml --resume OUT` and `init_from = "OUT"` work.
pub fn import(src: &Path, out: &Path, seq_len: Option<usize>, reg: &Registry) -> Result<Imported, String> {
    let hf = read_config(src, seq_len)?;
    let cfg = hf.config(src, out)?;
    let (_model, mut params, (_, opt)) = build(&cfg, reg)?;
    load_weights(src, &hf, &mut params)?;
    for p in &mut params.list {
        p.state = opt.state(&p.spec).iter().map(|n| (n.to_string(), vec![0.0; p.w.len()])).collect();
    }
    let state = TrainerState { step: 0, data_position: 0, plugin_api: pith_plugin_api::VERSION.into() };
    atomically(out, |tmp| {
        checkpoint::save(tmp, &cfg, &params, &state)?;
        fs::write(tmp.join("config.toml"), cfg.to_toml()).map_err(|e| format!("{}: {e}", tmp.display()))
    })?;
    let checkpoint = checkpoint::step_dir(out, 0);
    Ok(Imported { family: hf.family, params: params.count(), checkpoint })
}

/// The differences between the model an HF folder holds and the one `cfg` builds, as
/// `model.key: config.json has A, config has B` (seq_len and init_std may differ).
fn differences(hf: &Config, cfg: &Config) -> Vec<String> {
    let (a, b) = (toml::Value::try_from(&hf.model).unwrap(), toml::Value::try_from(&cfg.model).unwrap());
    let mut diffs = Vec::new();
    for (k, v) in a.as_table().unwrap() {
        if !["seq_len", "init_std"].contains(&k.as_str()) && b.get(k) != Some(v) {
            let got = b.get(k).map_or("nothing".into(), |v| v.to_string());
            diffs.push(format!("model.{k}: config.json has {v}, config has {got}"));
        }
    }
    for (table, key) in [("router", "plugin"), ("router", "top_k"), ("router", "normalize"), ("experts", "plugin")] {
        let get = |c: &Config| {
            let t = if table == "router" { &c.router } else { &c.experts };
            let default = match key {
                "top_k" => Some(toml::Value::Integer(2)),
                "normalize" => Some(toml::Value::Boolean(true)),
                _ => None,
            };
            t.get(key).cloned().or(default)
        };
        let (x, y) = (get(hf), get(cfg));
        if x != y {
            let show = |v: Option<toml::Value>| v.map_or("nothing".into(), |v| v.to_string());
            diffs.push(format!("{table}.{key}: config.json has {}, config has {}", show(x), show(y)));
        }
    }
    diffs
}

/// `train.init_from`: set `params` (the model `cfg` builds) from an HF folder (its config.json
/// must describe the same model) or from a Pith checkpoint's weights (a step or run directory).
pub fn init_weights(src: &Path, cfg: &Config, params: &mut Params) -> Result<(), String> {
    if src.join("config.json").is_file() {
        let hf = read_config(src, Some(cfg.model.seq_len))?;
        let diffs = differences(&hf.config(src, Path::new(&cfg.train.out))?, cfg);
        if !diffs.is_empty() {
            return Err(format!("{}: a different model: {}", src.join("config.json").display(), diffs.join("; ")));
        }
        return load_weights(src, &hf, params);
    }
    copy_checkpoint_weights(&checkpoint::resolve(src)?, params)
}

/// `pith eval-logits MODEL --tokens ...`: the logits of `tokens` (one sequence) and the mean
/// next-token cross-entropy over them (as transformers' `labels=input_ids` loss), for an HF
/// folder or a Pith checkpoint: `{"tokens": [...], "loss": x, "logits": [[...], ...]}`.
pub fn eval_logits(src: &Path, tokens: &[u32], reg: &Registry) -> Result<Value, String> {
    let t = tokens.len();
    if t < 2 {
        return Err(format!("--tokens: give at least 2 token ids, got {t}"));
    }
    let hf = src.join("config.json").is_file().then(|| read_config(src, Some(t))).transpose()?;
    let (cfg, dir) = match &hf {
        Some(h) => (h.config(src, Path::new("runs/eval-logits"))?, src.to_path_buf()),
        None => {
            let dir = checkpoint::resolve(src)?;
            let file = dir.join("config.toml");
            let text = fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            (Config::parse(&file.display().to_string(), &text, &[format!("model.seq_len={t}")])?, dir)
        }
    };
    let (model, mut params, _) = build(&cfg, reg)?;
    match &hf {
        Some(h) => load_weights(src, h, &mut params)?,
        None => copy_checkpoint_weights(&dir, &mut params)?,
    }
    let logits = model.logits(&CpuOps::default(), &params, tokens, 1)?;
    let v = cfg.model.vocab;
    let loss = crate::layers::cross_entropy(&logits[..(t - 1) * v], &tokens[1..], v, 1.0, None);
    let rows: Vec<&[f32]> = logits.chunks(v).collect();
    Ok(json!({ "tokens": tokens, "loss": loss, "logits": rows }))
}

/// Safetensors dtype names of what [`export`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    Bf16,
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub dtype: ExportDtype,
    /// A new shard starts before a tensor that would take the current one past this size.
    pub max_shard_bytes: u64,
    /// A tokenizer.json to ship instead of the one the run's data meta.json names.
    pub tokenizer: Option<PathBuf>,
    /// `max_position_embeddings` (default: model.seq_len).
    pub max_positions: Option<usize>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions { dtype: ExportDtype::F32, max_shard_bytes: 5_000_000_000, tokenizer: None, max_positions: None }
    }
}

/// "5GB", "200KB", "1.5MB", "1000": bytes (decimal units, like transformers' max_shard_size).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = [("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1.0)]
        .iter()
        .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n.trim().to_string(), *m)))
        .unwrap_or((t.clone(), 1.0));
    match num.parse::<f64>() {
        Ok(n) if n * mult >= 1.0 => Ok((n * mult) as u64),
        _ => Err(format!("--max-shard-size `{s}`: expected a size like 5GB, 200MB, 64KB or a byte count")),
    }
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub family: Family,
    pub files: Vec<String>,
    pub bytes: u64,
    pub tokenizer: Option<PathBuf>,
}

/// One tensor of the export: HF name and shape, the Pith tensor and expert it comes from.
struct Planned {
    name: String,
    shape: Vec<usize>,
    pith: String,
    expert: Option<usize>,
}

/// `pith export hf CHECKPOINT OUT`: config.json, safetensors (per-expert layout; one
/// model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json past
/// `max_shard_bytes`) and the tokenizer files, written to a temp directory renamed to `out`.
pub fn export(src: &Path, out: &Path, opts: &ExportOptions) -> Result<Exported, String> {
    let dir = checkpoint::resolve(src)?;
    let file = dir.join("config.toml");
    let text = fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let cfg = Config::parse(&file.display().to_string(), &text, &[])?;
    let at = |k: &str| format!("{}: {k}", file.display());
    let plugin = |t: &toml::Table| t.get("plugin").and_then(|v| v.as_str()).unwrap_or("").to_string();
    let (router, experts) = (plugin(&cfg.router), plugin(&cfg.experts));
    if router != "topk-softmax" || experts != "swiglu" {
        return Err(format!(
            "{}: router `{router}` and experts `{experts}`: Hugging Face export covers the std `topk-softmax` router \
             and `swiglu` experts only",
            file.display()
        ));
    }
    let m = &cfg.model;
    if m.shared_expert_ffn > 0 {
        return Err(format!(
            "{} = {}: the exported families have no ungated shared expert",
            at("model.shared_expert_ffn"),
            m.shared_expert_ffn
        ));
    }
    let top_k = cfg.router.get("top_k").and_then(|v| v.as_integer()).unwrap_or(2) as usize;
    let normalize = cfg.router.get("normalize").and_then(|v| v.as_bool()).unwrap_or(true);
    let family = Family::of(m, normalize).map_err(|e| format!("{}: {e}", file.display()))?;
    if family == Family::Olmoe && m.heads * m.head_dim != m.hidden {
        return Err(format!("{}: OLMoE needs heads·head_dim = hidden", at("model.head_dim")));
    }
    let tokenizer = find_tokenizer(&cfg, opts.tokenizer.as_deref())?;

    // Check the checkpoint against the model its config describes.
    let weights = dir.join("model.safetensors");
    let map = mmap(&weights)?;
    let st = parse_st(&weights, &map)?;
    let mut plan = Vec::new();
    for (name, shape) in pith_params(m) {
        let t = st.tensor(&name).map_err(|_| format!("{}: tensor `{name}` is missing", weights.display()))?;
        if t.dtype() != Dtype::F32 || t.shape() != shape {
            let got = format!("{:?} {:?}", t.dtype(), t.shape());
            return Err(format!("{}: tensor `{name}` is {got}, the model needs F32 {shape:?}", weights.display()));
        }
        match is_experts(&name) {
            true => plan.extend((0..m.experts).map(|e| Planned {
                name: hf_name(family, &name, e),
                shape: vec![shape[2], shape[1]],
                pith: name.clone(),
                expert: Some(e),
            })),
            false => plan.push(Planned { name: hf_name(family, &name, 0), shape, pith: name, expert: None }),
        }
    }
    let esize = if opts.dtype == ExportDtype::F32 { 4 } else { 2 };
    let bytes = |p: &Planned| p.shape.iter().product::<usize>() as u64 * esize;
    let mut groups: Vec<Vec<&Planned>> = vec![vec![]];
    let mut size = 0;
    for p in &plan {
        if size > 0 && size + bytes(p) > opts.max_shard_bytes {
            groups.push(vec![]);
            size = 0;
        }
        size += bytes(p);
        groups.last_mut().unwrap().push(p);
    }
    let n = groups.len();
    let names: Vec<String> = match n {
        1 => vec!["model.safetensors".into()],
        _ => (1..=n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect(),
    };
    let total: u64 = plan.iter().map(bytes).sum();
    let config = hf_config(&cfg, family, top_k, normalize, opts, &tokenizer);
    atomically(out, |tmp| {
        for (group, name) in groups.iter().zip(&names) {
            write_shard(&tmp.join(name), group, &st, opts.dtype)?;
        }
        let json_file = |name: &str, v: &Value| {
            let path = tmp.join(name);
            fs::write(&path, serde_json::to_string_pretty(v).unwrap() + "\n")
                .map_err(|e| format!("{}: {e}", path.display()))
        };
        if n > 1 {
            let mut map = serde_json::Map::new();
            for (group, name) in groups.iter().zip(&names) {
                for p in group {
                    map.insert(p.name.clone(), json!(name));
                }
            }
            json_file("model.safetensors.index.json", &json!({"metadata": {"total_size": total}, "weight_map": map}))?;
        }
        json_file("config.json", &config)?;
        json_file("generation_config.json", &generation_config(&config))?;
        if let Some((tok, _)) = &tokenizer {
            copy_tokenizer(tok, tmp, m.seq_len)?;
        }
        Ok(())
    })?;
    Ok(Exported { family, files: names, bytes: total, tokenizer: tokenizer.map(|t| t.0) })
}

/// Write one safetensors file, streaming: the header, then each tensor converted from the
/// memory-mapped Pith checkpoint (expert slots transposed back to [out, in]).
fn write_shard(path: &Path, tensors: &[&Planned], pith: &SafeTensors, dtype: ExportDtype) -> Result<(), String> {
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    let (dname, esize) = match dtype {
        ExportDtype::F32 => ("F32", 4),
        ExportDtype::Bf16 => ("BF16", 2),
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0;
    for t in tensors {
        let end = offset + t.shape.iter().product::<usize>() * esize;
        header.insert(t.name.clone(), json!({"dtype": dname, "shape": t.shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let mut text = serde_json::to_string(&header).unwrap();
    text.extend(std::iter::repeat_n(' ', (8 - text.len() % 8) % 8));
    let mut w = std::io::BufWriter::new(fs::File::create(path).map_err(io)?);
    w.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(text.as_bytes()).map_err(io)?;
    for t in tensors {
        let data = pith.tensor(&t.pith).expect("checked").data();
        let x = |k: usize| f32::from_le_bytes([data[4 * k], data[4 * k + 1], data[4 * k + 2], data[4 * k + 3]]);
        let vals: Vec<f32> = match t.expert {
            None => (0..t.shape.iter().product()).map(x).collect(),
            Some(e) => {
                let (r, c) = (t.shape[0], t.shape[1]);
                let mut v = vec![0.0; r * c];
                transpose_into(&mut v, (c, r), e * r * c, x);
                v
            }
        };
        let bytes: Vec<u8> = match dtype {
            ExportDtype::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ExportDtype::Bf16 => vals.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect(),
        };
        w.write_all(&bytes).map_err(io)?;
    }
    w.flush().map_err(io)
}

/// A float from an f32 config value, as written (1e-6, not 9.99999997e-7).
fn num(x: f32) -> Value {
    json!(x.to_string().parse::<f64>().unwrap())
}

fn hf_config(
    cfg: &Config,
    family: Family,
    top_k: usize,
    normalize: bool,
    opts: &ExportOptions,
    tok: &Option<(PathBuf, Option<u64>)>,
) -> Value {
    let m = &cfg.model;
    let aux = cfg.balance_loss.iter().find(|t| t.get("plugin").and_then(|v| v.as_str()) == Some("switch-aux"));
    let aux = aux.and_then(|t| t.get("coef")).and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64)));
    let eos = tok.as_ref().and_then(|t| t.1);
    let mut c = json!({
        "architectures": [family.architecture()],
        "model_type": family.model_type(),
        "vocab_size": m.vocab,
        "hidden_size": m.hidden,
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "num_key_value_heads": m.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": opts.max_positions.unwrap_or(m.seq_len),
        "initializer_range": num(m.init_std),
        "rms_norm_eps": num(m.norm_eps),
        "rope_theta": num(m.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": num(m.rope_theta)},
        "tie_word_embeddings": false,
        "attention_dropout": 0.0,
        "num_experts_per_tok": top_k,
        "output_router_logits": false,
        "router_aux_loss_coef": aux.unwrap_or(0.0),
        "use_cache": true,
        "torch_dtype": if opts.dtype == ExportDtype::F32 { "float32" } else { "bfloat16" },
        "bos_token_id": null,
        "eos_token_id": eos,
        "pad_token_id": null,
    });
    let extra = match family {
        Family::Qwen3Moe => json!({
            "head_dim": m.head_dim, "intermediate_size": m.expert_ffn, "moe_intermediate_size": m.expert_ffn,
            "num_experts": m.experts, "norm_topk_prob": normalize, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "use_sliding_window": false, "sliding_window": null,
            "max_window_layers": m.layers, "attention_bias": false,
        }),
        Family::Mixtral => json!({
            "head_dim": m.head_dim, "intermediate_size": m.expert_ffn, "num_local_experts": m.experts,
            "sliding_window": null, "router_jitter_noise": 0.0,
        }),
        Family::Olmoe => json!({
            "intermediate_size": m.expert_ffn, "num_experts": m.experts, "norm_topk_prob": normalize,
            "attention_bias": false, "clip_qkv": null,
        }),
    };
    c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    c
}

fn generation_config(c: &Value) -> Value {
    json!({"bos_token_id": c["bos_token_id"], "eos_token_id": c["eos_token_id"], "pad_token_id": c["pad_token_id"]})
}

/// The tokenizer.json to ship and the separator (eos) id: `explicit`, or the one the run's data
/// meta.json names (none for the synthetic corpus or the byte tokenizer).
fn find_tokenizer(cfg: &Config, explicit: Option<&Path>) -> Result<Option<(PathBuf, Option<u64>)>, String> {
    if let Some(p) = explicit {
        return match p.is_file() {
            true => Ok(Some((p.to_path_buf(), None))),
            false => Err(format!("--tokenizer {}: no such file", p.display())),
        };
    }
    let source = &cfg.data.source;
    if source == "synthetic" {
        return Ok(None);
    }
    let s = Path::new(source);
    let dir = match s.is_dir() {
        true => s.to_path_buf(),
        false => {
            let parent = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
            match source.find(['*', '?', '[']) {
                Some(i) => parent(Path::new(&source[..i]).join("x").as_path()),
                None => parent(s),
            }
        }
    };
    let meta = dir.join("meta.json");
    let Ok(text) = fs::read_to_string(&meta) else {
        tracing::warn!("{}: not found; exporting without tokenizer files (--tokenizer adds one)", meta.display());
        return Ok(None);
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", meta.display()))?;
    let tok = v.get("tokenizer").and_then(Value::as_str).unwrap_or("bytes");
    if tok == "bytes" {
        return Ok(None);
    }
    let sep = v.get("separator").and_then(Value::as_u64);
    let found = [PathBuf::from(tok), dir.join(tok)].into_iter().find(|p| p.is_file());
    let missing = || format!("{}: names tokenizer `{tok}`, which is not there; pass --tokenizer PATH", meta.display());
    Ok(Some((found.ok_or_else(missing)?, sep)))
}

/// tokenizer.json, and tokenizer_config.json / special_tokens_map.json when they sit beside
/// it (otherwise a minimal tokenizer_config.json for PreTrainedTokenizerFast).
fn copy_tokenizer(tok: &Path, out: &Path, seq_len: usize) -> Result<(), String> {
    let copy = |from: &Path, name: &str| {
        fs::copy(from, out.join(name)).map(|_| ()).map_err(|e| format!("{}: {e}", from.display()))
    };
    copy(tok, "tokenizer.json")?;
    let beside = |name: &str| tok.parent().map(|d| d.join(name)).filter(|p| p.is_file());
    if let Some(p) = beside("special_tokens_map.json") {
        copy(&p, "special_tokens_map.json")?;
    }
    match beside("tokenizer_config.json") {
        Some(p) => copy(&p, "tokenizer_config.json"),
        None => {
            let c = json!({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len});
            let path = out.join("tokenizer_config.json");
            fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).map_err(|e| format!("{}: {e}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(arch: &str) -> Value {
        json!({
            "architectures": [arch], "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4, "num_experts": 4,
            "num_local_experts": 4, "moe_intermediate_size": 8, "intermediate_size": 8,
            "num_experts_per_tok": 2, "max_position_embeddings": 32, "norm_topk_prob": true,
        })
    }

    #[test]
    fn half_floats_convert_exactly() {
        let cases = [(0x3c00, 1.0), (0xc000, -2.0), (0x0001, 2f32.powi(-24)), (0x7bff, 65504.0), (0x0000, 0.0)];
        for (h, f) in cases {
            assert_eq!(f16_to_f32(h), f, "{h:#06x}");
        }
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        for x in [1.0f32, -3.5, 1e-3, 12345.678, 0.0] {
            let b = f32_to_bf16(x);
            let back = f32::from_bits((b as u32) << 16);
            assert!((back - x).abs() <= x.abs() / 128.0, "{x} -> {back}");
        }
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80, "ties go to even");
    }

    #[test]
    fn configs_map_to_the_right_model() {
        let q = parse_config(&base("Qwen3MoeForCausalLM"), None).unwrap();
        assert_eq!(
            (q.family, q.normalize, q.rope_theta, q.norm_eps, q.seq_len),
            (Family::Qwen3Moe, true, 1e4, 1e-6, 32)
        );
        let mut c = base("MixtralForCausalLM");
        c["norm_topk_prob"] = json!(false);
        let x = parse_config(&c, Some(16)).unwrap();
        assert_eq!((x.family, x.normalize, x.rope_theta, x.seq_len), (Family::Mixtral, true, 1e6, 16));
        let mut c = base("OlmoeForCausalLM");
        c.as_object_mut().unwrap().remove("head_dim");
        c["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 5e5});
        let o = parse_config(&c, None).unwrap();
        assert_eq!((o.family, o.head_dim, o.rope_theta, o.expert_ffn), (Family::Olmoe, 4, 5e5, 8));
    }

    #[test]
    fn unrepresentable_fields_are_named() {
        let cases: [(&str, &str, Value, &str); 10] = [
            ("Qwen3MoeForCausalLM", "use_sliding_window", json!(true), "`use_sliding_window` = true"),
            ("Qwen3MoeForCausalLM", "attention_bias", json!(true), "`attention_bias` = true"),
            ("Qwen3MoeForCausalLM", "rope_scaling", json!({"rope_type": "yarn", "factor": 4.0}), "`rope_scaling`"),
            ("Qwen3MoeForCausalLM", "decoder_sparse_step", json!(2), "`decoder_sparse_step` = 2"),
            ("Qwen3MoeForCausalLM", "mlp_only_layers", json!([1]), "`mlp_only_layers` = [1]"),
            ("Qwen3MoeForCausalLM", "shared_expert_intermediate_size", json!(8), "`shared_expert_intermediate_size`"),
            ("MixtralForCausalLM", "sliding_window", json!(16), "`sliding_window` = 16"),
            ("OlmoeForCausalLM", "clip_qkv", json!(8.0), "`clip_qkv` = 8.0"),
            ("OlmoeForCausalLM", "head_dim", json!(8), "`head_dim` = 8"),
            ("MixtralForCausalLM", "hidden_act", json!("gelu"), "`hidden_act` = \"gelu\""),
        ];
        for (arch, key, value, want) in cases {
            let mut c = base(arch);
            c[key] = value;
            let e = parse_config(&c, None).unwrap_err();
            assert!(e.starts_with("Pith can't represent") && e.contains(want), "{key}: {e}");
        }
        let e = parse_config(&base("LlamaForCausalLM"), None).unwrap_err();
        assert!(e.starts_with("unknown architecture `LlamaForCausalLM`"), "{e}");
        // A window at least as long as the sequence changes nothing.
        let mut c = base("MixtralForCausalLM");
        c["sliding_window"] = json!(4096);
        assert!(parse_config(&c, None).is_ok());
    }

    #[test]
    fn names_translate_both_ways() {
        let m: ModelConfig = toml::from_str(
            "vocab = 8\nhidden = 4\nlayers = 2\nheads = 2\nkv_heads = 1\nhead_dim = 2\nseq_len = 4\nexperts = 3\n\
             expert_ffn = 5",
        )
        .unwrap();
        for f in FAMILIES {
            let m = ModelConfig { qk_norm: f.qk_norm(), ..m.clone() };
            for (name, _) in pith_params(&m) {
                let e = if is_experts(&name) { 2 } else { 0 };
                let want = if is_experts(&name) { Slot::Expert(2) } else { Slot::Whole };
                assert_eq!(translate(&hf_name(f, &name, e)), Some((name.clone(), want)), "{f:?} {name}");
            }
        }
        let fused = translate("model.layers.1.mlp.experts.gate_up_proj");
        assert_eq!(fused, Some(("layers.1.moe.experts.w_gate".into(), Slot::GateUp)));
        assert_eq!(translate("model.layers.0.self_attn.rotary_emb.inv_freq").map(|t| t.1), Some(Slot::Skip));
        assert_eq!(translate("model.layers.0.mlp.shared_expert.up_proj.weight"), None);
    }

    /// `pith_params` lists exactly what `Model::new` declares with the std router and experts.
    #[test]
    fn pith_params_match_the_model() {
        let text = "[model]\nvocab = 8\nhidden = 4\nlayers = 2\nheads = 2\nkv_heads = 1\nhead_dim = 2\nseq_len = 4\n\
                    experts = 3\nexpert_ffn = 5\n[train]\nsteps = 1\nmicro_batch = 1\nlr = 0.1\n\
                    [router]\nplugin = \"topk-softmax\"\n[experts]\nplugin = \"swiglu\"\n[optimizer]\nplugin = \"adamw\"\n";
        let reg = Registry::load(&[]).unwrap();
        for qk in ["head", "full", "none"] {
            let cfg = Config::parse("t", text, &[format!("model.qk_norm=\"{qk}\"")]).unwrap();
            let (_, params, _) = build(&cfg, &reg).unwrap();
            let got: Vec<(String, Vec<usize>)> = params
                .list
                .iter()
                .map(|p| (p.name.clone(), p.spec.shape.iter().map(|&d| d as usize).collect()))
                .collect();
            assert_eq!(got, pith_params(&cfg.model), "qk_norm = {qk}");
        }
    }

    #[test]
    fn shard_sizes_parse() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("200kb"), Ok(200_000));
        assert_eq!(parse_size("1.5MB"), Ok(1_500_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
    }
}
