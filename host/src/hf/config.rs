//! config.json ↔ Pith config: reading a Hugging Face config.json into [`HfModel`] (refusing, by
//! field, what Pith can't represent) and the Pith config it becomes; and the config.json (and
//! generation_config.json) an export writes for a Pith config.

use super::export::{ExportDtype, ExportOptions, Target};
use super::family::{names, Family, FAMILIES};
use crate::config::{mem_available, refuse_over, Config, MemEstimate, Mla, QkNorm, Yarn};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};

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
    /// `shared_expert_intermediate_size` (Qwen2-MoE's gated shared expert) or DeepSeek's
    /// `n_shared_experts`·`moe_intermediate_size` (no gate); 0: none.
    pub shared_ffn: usize,
    /// DeepSeek-V2's multi-head latent attention (`kv_lora_rank`, `q_lora_rank`, …).
    pub mla: Option<Mla>,
    /// DeepSeek's `first_k_dense_replace` dense layers first, of FFN `intermediate_size`.
    pub dense: Option<(usize, usize)>,
    /// RoPE on pairs (2i, 2i+1): DeepSeek's layout.
    pub rope_interleaved: bool,
    /// DeepSeek's group-limited routing (`n_group`, `topk_group`): V3's sigmoid-bias router, or
    /// V2's `group_limited_greedy` as the group-topk router.
    pub groups: Option<(usize, usize)>,
    /// `rope_scaling`/`rope_parameters` of type yarn.
    pub yarn: Option<Yarn>,
    /// A factor on the attention scores' 1/sqrt(head_dim) (DeepSeek with YaRN; else 1).
    pub attn_scale: f64,
    pub top_k: usize,
    /// `norm_topk_prob` (always true for Mixtral): the router's `normalize`.
    pub normalize: bool,
    /// DeepSeek's `routed_scaling_factor`: the router's `scale` (1 elsewhere).
    pub scale: f64,
    pub rope_theta: f64,
    pub norm_eps: f64,
    pub init_std: f64,
    /// `tie_word_embeddings`: lm_head is read from the embedding.
    pub tied: bool,
    /// GPT-OSS's `sliding_window` and the layers that have it (`layer_types`; empty: none).
    pub window: (usize, Vec<usize>),
    /// GPT-OSS's experts: (`swiglu_alpha`, `swiglu_limit`).
    pub swiglu: Option<(f64, f64)>,
    /// DeepSeek-V3's multi-token-prediction layers (`num_nextn_predict_layers`/`num_mtp_layers`),
    /// stored after the decoder's as `model.layers.{layers}…`: skipped on import (transformers
    /// trains without them too).
    pub mtp: usize,
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
    let kv_default = match f {
        Family::Qwen3Moe => 4,
        Family::Qwen2Moe => 16,
        _ => heads,
    };
    let kv_heads = size("num_key_value_heads", Some(kv_default))?;
    let (deepseek, v3) = (f.deepseek(), f == Family::DeepseekV3);
    // DeepSeek's `head_dim` is the rotated part; Pith's is the whole q·k head.
    let mla = match deepseek {
        true => Some(Mla {
            kv_rank: size("kv_lora_rank", None)?,
            q_rank: int("q_lora_rank")?.unwrap_or(0),
            rope_dim: size("qk_rope_head_dim", None)?,
            v_dim: size("v_head_dim", None)?,
        }),
        false => None,
    };
    let head_dim = match (mla, int("head_dim")?) {
        (Some(a), _) => a.rope_dim + int("qk_nope_head_dim")?.ok_or("`qk_nope_head_dim` is missing")?,
        (None, Some(d)) => d,
        (None, None) if hidden.is_multiple_of(heads) => hidden / heads,
        (None, None) => {
            return Err(format!("`hidden_size` {hidden} is not a multiple of `num_attention_heads` {heads}"))
        }
    };
    let experts_key = match f {
        Family::Mixtral => "num_local_experts",
        _ if deepseek && get("n_routed_experts").is_some() => "n_routed_experts",
        _ if get("num_experts").is_none() && get("num_local_experts").is_some() => "num_local_experts",
        _ => "num_experts",
    };
    let ffn_key = if f.moe_ffn_key() { "moe_intermediate_size" } else { "intermediate_size" };
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
    let gpt_oss = f == Family::GptOss;
    for k in ["attention_bias", "mlp_bias"].into_iter().filter(|k| !gpt_oss || *k == "mlp_bias") {
        if flag(k) {
            refuse(k, &Value::Bool(true), "Pith's projections have no bias");
        }
    }
    if let Some(v) = get("attention_bias").filter(|v| gpt_oss && v.as_bool() != Some(true)) {
        refuse("attention_bias", v, "GPT-OSS's q, k, v and o projections have biases");
    }
    let rope = get("rope_parameters").or_else(|| get("rope_scaling"));
    let rope_key = if get("rope_parameters").is_some() { "rope_parameters" } else { "rope_scaling" };
    let rope_type = rope.and_then(|r| r.get("rope_type").or_else(|| r.get("type"))).and_then(Value::as_str);
    if rope_type.is_some_and(|t| t != "default" && t != "yarn") {
        refuse(rope_key, rope.unwrap(), "plain or YaRN RoPE only");
    }
    let yarn = match (rope_type, rope) {
        (Some("yarn"), Some(r)) => Some(yarn_of(r, rope_key, get("original_max_position_embeddings"), max_positions)?),
        _ => None,
    };
    // DeepSeek's attention scales its scores by YaRN's m(factor, mscale_all_dim)² too.
    let attn_scale = match yarn.filter(|y| deepseek && y.mscale_all_dim != 0.0) {
        Some(y) => Yarn::m(y.factor as f64, y.mscale_all_dim as f64).powi(2),
        None => 1.0,
    };
    let rope_theta = match rope.and_then(|r| r.get("rope_theta")).filter(|v| !v.is_null()) {
        Some(v) => v.as_f64().ok_or_else(|| format!("`{rope_key}.rope_theta` = {v} is not a number"))?,
        None => num("rope_theta", if f == Family::Mixtral { 1e6 } else { 1e4 })?,
    };
    let partial = rope.and_then(|r| r.get("partial_rotary_factor")).or_else(|| get("partial_rotary_factor"));
    if let Some(v) = partial.filter(|v| v.as_f64() != Some(1.0) && !v.is_null()) {
        refuse("partial_rotary_factor", v, "RoPE rotates whole heads");
    }
    if f.moe_ffn_key() && flag("use_sliding_window") {
        refuse("use_sliding_window", &Value::Bool(true), "attention is full causal");
    }
    if let (Family::Mixtral, Some(w)) = (f, get("sliding_window")) {
        if w.as_u64().is_none_or(|w| (w as usize) < seq_len) {
            refuse("sliding_window", w, &format!("attention is full causal over the {seq_len}-token sequence"));
        }
    }
    // GPT-OSS: sliding-window layers (transformers' default: the even ones).
    let layers = size("num_hidden_layers", None)?;
    let types: Vec<String> = match get("layer_types").and_then(Value::as_array) {
        Some(t) => t.iter().map(|v| v.as_str().unwrap_or("").to_string()).collect(),
        None if gpt_oss => (0..layers).map(|l| ["sliding_attention", "full_attention"][l % 2].to_string()).collect(),
        None => vec![],
    };
    let allowed: &[&str] = if gpt_oss { &["full_attention", "sliding_attention"] } else { &["full_attention"] };
    if let Some(t) = types.iter().find(|t| !allowed.contains(&t.as_str())) {
        refuse("layer_types", &json!(t), "every layer is full-attention MoE (GPT-OSS: or sliding-window)");
    }
    let windowed: Vec<usize> = (0..types.len()).filter(|&l| types[l] == "sliding_attention").collect();
    let window = match windowed.is_empty() {
        true => (0, vec![]),
        false => (size("sliding_window", None)?, windowed),
    };
    if let Some(v) = get("decoder_sparse_step").filter(|v| v.as_u64() != Some(1)) {
        refuse("decoder_sparse_step", v, "every layer is MoE");
    }
    if let Some(v) = get("mlp_only_layers").filter(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
        refuse("mlp_only_layers", v, "every layer is MoE");
    }
    let shared_key = "shared_expert_intermediate_size";
    let shared_ffn = match f {
        Family::Qwen2Moe => size(shared_key, None)?,
        _ if deepseek => int("n_shared_experts")?.unwrap_or(0) * expert_ffn,
        _ => 0,
    };
    if deepseek {
        if kv_heads != heads {
            refuse("num_key_value_heads", &json!(kv_heads), "MLA has one key-value head per query head");
        }
        if let Some(v) = get("moe_layer_freq").filter(|v| v.as_u64() != Some(1)) {
            refuse("moe_layer_freq", v, "every layer is MoE");
        }
        // V2: topk-softmax over all experts (greedy) or group-topk (group_limited_greedy); V3:
        // sigmoid-bias (noaux_tc, group-limited).
        let (methods, scoring) = if v3 { (&["noaux_tc"][..], "sigmoid") } else { (GREEDY, "softmax") };
        if let Some(v) = get("topk_method").filter(|v| !methods.iter().any(|m| v.as_str() == Some(m))) {
            refuse("topk_method", v, &format!("{} routes by {}", f.architecture(), methods.join(" or ")));
        }
        if let Some(v) = get("scoring_func").filter(|v| v.as_str() != Some(scoring)) {
            refuse("scoring_func", v, &format!("{} scores by {scoring}", f.architecture()));
        }
    }
    let limited = get("topk_method").and_then(Value::as_str) == Some(GREEDY[1]);
    let groups = match v3 || (deepseek && limited) {
        true => Some((int("n_group")?.unwrap_or(1).max(1), int("topk_group")?.unwrap_or(1).max(1))),
        false => None,
    };
    // DeepSeek lays RoPE pairs out interleaved (V3: unless `rope_interleave` is false).
    let rope_interleaved = deepseek && get("rope_interleave").is_none_or(|v| v.as_bool() != Some(false));
    let dense = match int("first_k_dense_replace")?.filter(|&k| deepseek && k > 0) {
        Some(k) => Some((k, size("intermediate_size", None)?)),
        None => None,
    };
    let has_shared = f == Family::Qwen2Moe || deepseek;
    for k in [shared_key, "n_shared_experts", "num_shared_experts"].into_iter().filter(|_| !has_shared) {
        if let Some(v) = get(k).filter(|v| v.as_u64() != Some(0)) {
            refuse(k, v, &format!("{} has no shared expert", f.architecture()));
        }
    }
    if let Some(v) = get("clip_qkv") {
        refuse("clip_qkv", v, "q, k, v are not clipped");
    }
    if matches!(f, Family::Olmoe | Family::Qwen2Moe) && head_dim * heads != hidden {
        let why = format!("{}'s head_dim is hidden_size / num_attention_heads", f.architecture());
        refuse("head_dim", &json!(head_dim), &why);
    }
    let mxfp4 = |v: &Value| gpt_oss && v.get("quant_method").and_then(Value::as_str) == Some("mxfp4");
    if let Some(v) = get("quantization_config").filter(|v| !mxfp4(v)) {
        refuse("quantization_config", v, "weights must be plain F32, BF16 or F16 (GPT-OSS: or MXFP4 experts)");
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
        layers,
        heads,
        kv_heads,
        head_dim,
        experts,
        expert_ffn,
        shared_ffn,
        mla,
        dense,
        rope_interleaved,
        groups,
        yarn,
        attn_scale,
        top_k,
        // DeepSeek-V2's router never renormalises, whatever `norm_topk_prob` says.
        normalize: f == Family::Mixtral || gpt_oss || (flag("norm_topk_prob") && f != Family::DeepseekV2),
        scale: if deepseek { num("routed_scaling_factor", 1.0)? } else { 1.0 },
        rope_theta,
        norm_eps: num("rms_norm_eps", if f.moe_ffn_key() { 1e-6 } else { 1e-5 })?,
        init_std: num("initializer_range", 0.02)?,
        tied: flag("tie_word_embeddings"),
        window,
        mtp: match v3 {
            true => int("num_nextn_predict_layers")?.or(int("num_mtp_layers")?).unwrap_or(0),
            false => 0,
        },
        swiglu: match gpt_oss {
            true => Some((num("swiglu_alpha", 1.702)?, num("swiglu_limit", 7.0)?)),
            false => None,
        },
        aux_coef: num("router_aux_loss_coef", 0.0)?,
        max_positions,
        seq_len,
    })
}

/// DeepSeek-V2's `topk_method`s: over all experts, or within the best groups.
const GREEDY: &[&str] = &["greedy", "group_limited_greedy"];

/// `[model.yarn]` from a rope_scaling/rope_parameters object of type yarn (transformers' rules:
/// no `factor` means max_position_embeddings / original; the original context is the object's
/// `original_max_position_embeddings`, else the config's, else max_position_embeddings).
fn yarn_of(r: &Value, key: &str, top_original: Option<&Value>, max_positions: usize) -> Result<Yarn, String> {
    let float = |k: &str| -> Result<Option<f32>, String> {
        match r.get(k).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| format!("`{key}.{k}` = {v} is not a number")),
        }
    };
    let original = r.get("original_max_position_embeddings").or(top_original).filter(|v| !v.is_null());
    let original_seq_len = match original {
        None => max_positions,
        Some(v) => {
            v.as_u64().ok_or_else(|| format!("`{key}.original_max_position_embeddings` = {v} is not an integer"))?
                as usize
        }
    };
    let factor = float("factor")?.unwrap_or(max_positions as f32 / original_seq_len as f32);
    // Python's `x or default`: 0 and null both take the default.
    let or = |x: Option<f32>, d: f32| x.filter(|&x| x != 0.0).unwrap_or(d);
    Ok(Yarn {
        factor,
        original_seq_len,
        beta_fast: or(float("beta_fast")?, 32.0),
        beta_slow: or(float("beta_slow")?, 1.0),
        mscale: float("mscale")?.unwrap_or(0.0),
        mscale_all_dim: float("mscale_all_dim")?.unwrap_or(0.0),
        attention_factor: float("attention_factor")?,
        truncate: r.get("truncate").and_then(Value::as_bool).unwrap_or(true),
    })
}

/// A TOML string literal.
fn quote(s: &str) -> String {
    toml::Value::String(s.into()).to_string()
}

impl HfModel {
    /// The Pith config of this model: its [model], the std topk-softmax router and swiglu
    /// experts (with Qwen2-MoE's q/k/v biases and gated `shared-swiglu`), a switch-aux loss with
    /// `router_aux_loss_coef`, adamw, and [train] defaults that write to `run`.
    pub fn config(&self, src: &Path, run: &Path) -> Result<Config, String> {
        let qk = match self.family.qk_norm() {
            QkNorm::Head => "head",
            QkNorm::Full => "full",
            QkNorm::None => "none",
        };
        let qwen2 = self.family == Family::Qwen2Moe;
        let shared = match (self.shared_ffn, qwen2) {
            (0, _) => String::new(),
            (f, gate) => format!("\n[shared]\nplugin = \"shared-swiglu\"\nffn = {f}\ngate = {gate}\n"),
        };
        let windows = match &self.window {
            (0, _) => String::new(),
            (w, ls) => format!("sliding_window = {w}\nwindow_layers = {ls:?}\n"),
        };
        let bias = match (qwen2, self.mla) {
            _ if self.swiglu.is_some() => format!("qkv_bias = true\no_bias = true\nattn_sinks = true\n{windows}"),
            (true, _) => "qkv_bias = true\n".to_string(),
            (false, Some(a)) => format!(
                "rope_interleaved = {}\n\n[model.mla]\nkv_rank = {}\nq_rank = {}\nrope_dim = {}\nv_dim = {}\n",
                self.rope_interleaved, a.kv_rank, a.q_rank, a.rope_dim, a.v_dim
            ),
            (false, None) => String::new(),
        };
        // DeepSeek-V3's bias stays as imported (bias_update 0, as transformers trains it); DeepSeek
        // moved it by 1e-3 a step in pre-training.
        let router = match (self.groups, self.scale) {
            (Some((g, kg)), c) if self.family == Family::DeepseekV2 => format!(
                "plugin = \"group-topk\"\ntop_k = {}\nnormalize = false\nrouted_scaling_factor = {c:?}\nn_group = {g}\n\
                 topk_group = {kg}\nscore = \"softmax\"\ngroup_score = \"max\"\n",
                self.top_k
            ),
            (Some((g, kg)), c) => format!(
                "plugin = \"sigmoid-bias\"\ntop_k = {}\nnormalize = {}\nrouted_scaling_factor = {c:?}\nn_group = {g}\n\
                 topk_group = {kg}\nbias_update = 0.0\n",
                self.top_k, self.normalize
            ),
            (None, 1.0) if self.swiglu.is_some() => {
                format!("plugin = \"topk-softmax\"\ntop_k = {}\nnormalize = true\nbias = true\n", self.top_k)
            }
            (None, 1.0) => {
                format!("plugin = \"topk-softmax\"\ntop_k = {}\nnormalize = {}\n", self.top_k, self.normalize)
            }
            (None, c) => format!(
                "plugin = \"topk-softmax\"\ntop_k = {}\nnormalize = {}\nscale = {c:?}\n",
                self.top_k, self.normalize
            ),
        };
        let attn_scale = match self.attn_scale {
            1.0 => String::new(),
            a => format!("attn_scale = {a:?}\n"),
        };
        let yarn = match self.yarn {
            None => String::new(),
            Some(y) => {
                let mut t = format!(
                    "\n[model.yarn]\nfactor = {:?}\noriginal_seq_len = {}\nbeta_fast = {:?}\nbeta_slow = {:?}\nmscale = {:?}\n\
                     mscale_all_dim = {:?}\ntruncate = {}\n",
                    y.factor, y.original_seq_len, y.beta_fast, y.beta_slow, y.mscale, y.mscale_all_dim, y.truncate
                );
                if let Some(f) = y.attention_factor {
                    t += &format!("attention_factor = {f:?}\n");
                }
                t
            }
        };
        let (dense_layers, dense) = match self.dense {
            Some((k, f)) => {
                (format!("dense_layers = {k}\n"), format!("\n[dense]\nplugin = \"shared-swiglu\"\nffn = {f}\n"))
            }
            None => (String::new(), String::new()),
        };
        let experts = match self.swiglu {
            Some((alpha, limit)) => {
                format!(
                    "plugin = \"clamped-swiglu\"\nalpha = {alpha:?}\nlimit = {limit:?}\nup_shift = 1.0\nbias = true\n"
                )
            }
            None => "plugin = \"swiglu\"\n".into(),
        };
        let aux = match self.aux_coef > 0.0 {
            true => format!("\n[[balance_loss]]\nplugin = \"switch-aux\"\ncoef = {:?}\n", self.aux_coef),
            false => String::new(),
        };
        let text = format!(
            "# `pith import hf {src}` ({arch})\n\n[model]\nvocab = {}\nhidden = {}\nlayers = {}\nheads = {}\n\
             kv_heads = {}\nhead_dim = {}\nseq_len = {}\nrope_theta = {:?}\nexperts = {}\nexpert_ffn = {}\n\
             norm_eps = {:?}\ninit_std = {:?}\nqk_norm = \"{qk}\"\n{dense_layers}{attn_scale}{bias}{yarn}\n[train]\nsteps = 100\nmicro_batch = 4\n\
             lr = 1e-4\nwarmup = 10\nout = {}\n\n[router]\n{router}\n\
             [experts]\n{experts}{shared}{dense}{aux}\n[optimizer]\nplugin = \"adamw\"\n",
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
            src = src.display(),
            arch = self.family.architecture(),
        );
        // A value Pith refuses is named by the config.json field it came from.
        Config::parse(&format!("<import of {}>", src.display()), &text, &[]).map_err(|e| {
            let what = e.split_once(": ").map_or(e.as_str(), |p| p.1);
            let key = what.split(" = ").next().unwrap_or("");
            match self.field(key) {
                Some(f) => format!("{}: `{f}` gives {what}", src.join("config.json").display()),
                None => e,
            }
        })
    }

    /// The config.json field a Pith `model.*` key comes from.
    pub fn field(&self, key: &str) -> Option<&'static str> {
        let (mixtral, qwen) = (self.family == Family::Mixtral, self.family.moe_ffn_key());
        let deepseek = self.family.deepseek();
        Some(match key {
            "model.experts" if deepseek => "n_routed_experts",
            "model.head_dim" if deepseek => "qk_nope_head_dim",
            "model.mla.kv_rank" => "kv_lora_rank",
            "model.dense_layers" => "first_k_dense_replace",
            "router.scale" => "routed_scaling_factor",
            "model.mla.q_rank" => "q_lora_rank",
            "model.mla.rope_dim" => "qk_rope_head_dim",
            "model.mla.v_dim" => "v_head_dim",
            "model.vocab" => "vocab_size",
            "model.hidden" => "hidden_size",
            "model.layers" => "num_hidden_layers",
            "model.heads" => "num_attention_heads",
            "model.kv_heads" => "num_key_value_heads",
            "model.head_dim" => "head_dim",
            "model.experts" if mixtral || self.family == Family::GptOss => "num_local_experts",
            "model.sliding_window" => "sliding_window",
            "model.experts" => "num_experts",
            "model.expert_ffn" if qwen => "moe_intermediate_size",
            "model.expert_ffn" => "intermediate_size",
            "model.seq_len" => "max_position_embeddings",
            "model.rope_theta" => "rope_theta",
            "model.norm_eps" => "rms_norm_eps",
            "model.init_std" => "initializer_range",
            _ => return None,
        })
    }

    /// Refuse, before anything is allocated, a model of `cfg` (this model's Pith config) whose
    /// parameters at `per_param` bytes each and RoPE table do not fit the host memory (see
    /// [`refuse_over`]), naming the config.json field in `dir`, or `seq_len_flag` when the
    /// sequence length came from the command line.
    pub(super) fn check_memory(
        &self,
        dir: &Path,
        cfg: &Config,
        (per_param, doing): (u128, &str),
        seq_len_flag: Option<&str>,
    ) -> Result<(), String> {
        let file = dir.join("config.json").display().to_string();
        let name = |k: &str| match (k, seq_len_flag, self.field(k)) {
            ("model.seq_len", Some(flag), _) => ("command line".to_string(), flag.to_string()),
            (_, _, Some(f)) => (file.clone(), format!("`{f}`")),
            _ => (file.clone(), k.to_string()),
        };
        let available = mem_available().unwrap_or(u64::MAX as u128);
        refuse_over(cfg, |c| MemEstimate::of(c, per_param, false), available, doing, name)
    }
}

/// A float from an f32 config value, as written (1e-6, not 9.99999997e-7).
fn num(x: f32) -> Value {
    json!(x.to_string().parse::<f64>().unwrap())
}

/// The config.json of `cfg` as `family` (`shared_ffn`: its shared expert's FFN size, 0: none).
#[allow(clippy::too_many_arguments)]
pub(super) fn hf_config(cfg: &Config, t: &Target, opts: &ExportOptions, tok: &Option<(PathBuf, Option<u64>)>) -> Value {
    let (m, family, top_k, normalize, shared_ffn) = (&cfg.model, t.family, t.top_k, t.normalize, t.shared_ffn);
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
        "rope_parameters": rope_parameters(m),
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
        Family::Qwen2Moe => json!({
            "head_dim": m.head_dim, "intermediate_size": shared_ffn, "moe_intermediate_size": m.expert_ffn,
            "shared_expert_intermediate_size": shared_ffn, "num_experts": m.experts, "norm_topk_prob": normalize,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": false, "sliding_window": null,
            "max_window_layers": m.layers, "qkv_bias": true,
        }),
        Family::GptOss => {
            let e = &cfg.experts;
            let float =
                |k: &str, d: f64| e.get(k).and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64))).unwrap_or(d);
            let types: Vec<&str> =
                (0..m.layers).map(|l| if m.window(l) > 0 { "sliding_attention" } else { "full_attention" }).collect();
            json!({
                "head_dim": m.head_dim, "intermediate_size": m.expert_ffn, "num_local_experts": m.experts,
                "attention_bias": true, "layer_types": types,
                "sliding_window": if m.sliding_window > 0 { json!(m.sliding_window) } else { Value::Null },
                "swiglu_alpha": float("alpha", 1.702), "swiglu_limit": float("limit", 7.0),
            })
        }
        Family::DeepseekV2 | Family::DeepseekV3 => {
            let a = m.mla.expect("DeepSeek is exported from an MLA model");
            let mut d = json!({
                "intermediate_size": if m.dense_layers > 0 { cfg.dense_ffn() } else { m.expert_ffn },
                "moe_intermediate_size": m.expert_ffn, "n_routed_experts": m.experts,
                "n_shared_experts": shared_ffn / m.expert_ffn, "kv_lora_rank": a.kv_rank,
                "q_lora_rank": if a.q_rank == 0 { Value::Null } else { json!(a.q_rank) },
                "qk_rope_head_dim": a.rope_dim, "qk_nope_head_dim": m.head_dim - a.rope_dim, "v_head_dim": a.v_dim,
                "head_dim": a.rope_dim, "first_k_dense_replace": m.dense_layers, "routed_scaling_factor": t.scale,
                "topk_method": "greedy", "n_group": null, "topk_group": null, "norm_topk_prob": false,
                "attention_bias": false, "mlp_bias": false,
            });
            let groups = match (family, t.groups) {
                (Family::DeepseekV3, Some((g, kg))) => json!({"topk_method": "noaux_tc", "scoring_func": "sigmoid",
                    "n_group": g, "topk_group": kg, "norm_topk_prob": normalize, "rope_interleave": m.rope_interleaved,
                    "num_mtp_layers": 0}),
                (_, Some((g, kg))) => json!({"topk_method": GREEDY[1], "n_group": g, "topk_group": kg}),
                (_, None) => json!({}),
            };
            d.as_object_mut().unwrap().extend(groups.as_object().unwrap().clone());
            d
        }
    };
    c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    c
}

/// config.json's `rope_parameters`: plain, or yarn with `[model.yarn]`'s values.
fn rope_parameters(m: &crate::config::ModelConfig) -> Value {
    let Some(y) = m.yarn else {
        return json!({"rope_type": "default", "rope_theta": num(m.rope_theta)});
    };
    let nonzero = |x: f32| if x == 0.0 { Value::Null } else { json!(num(x)) };
    let mut r = json!({
        "rope_type": "yarn", "rope_theta": num(m.rope_theta), "factor": num(y.factor),
        "original_max_position_embeddings": y.original_seq_len, "beta_fast": num(y.beta_fast),
        "beta_slow": num(y.beta_slow), "mscale": nonzero(y.mscale), "mscale_all_dim": nonzero(y.mscale_all_dim),
        "truncate": y.truncate,
    });
    if let Some(f) = y.attention_factor {
        r["attention_factor"] = json!(num(f));
    }
    r
}

pub(super) fn generation_config(c: &Value) -> Value {
    json!({"bos_token_id": c["bos_token_id"], "eos_token_id": c["eos_token_id"], "pad_token_id": c["pad_token_id"]})
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
        let mut c = base("Qwen2MoeForCausalLM");
        c["norm_topk_prob"] = json!(false);
        let e = parse_config(&c, None).unwrap_err();
        assert!(e.contains("`shared_expert_intermediate_size` is missing"), "{e}");
        c["shared_expert_intermediate_size"] = json!(12);
        let q2 = parse_config(&c, None).unwrap();
        assert_eq!((q2.family, q2.normalize, q2.shared_ffn, q2.expert_ffn), (Family::Qwen2Moe, false, 12, 8));
        let cfg = q2.config(Path::new("src"), Path::new("runs/q2")).unwrap();
        assert!(cfg.model.qkv_bias && cfg.model.qk_norm == QkNorm::None);
        let shared = cfg.shared.unwrap();
        assert_eq!(
            (shared["plugin"].as_str(), shared["ffn"].as_integer(), shared["gate"].as_bool()),
            (Some("shared-swiglu"), Some(12), Some(true))
        );
    }

    /// GPT-OSS: transformers' default layer_types (even layers windowed), MXFP4 allowed, its
    /// attention, router and experts in the Pith config; other quantizations refused.
    #[test]
    fn gpt_oss_maps_its_attention_router_and_experts() {
        let mut c = base("GptOssForCausalLM");
        c.as_object_mut().unwrap().remove("num_experts");
        c["num_hidden_layers"] = json!(3);
        c["sliding_window"] = json!(8);
        c["swiglu_limit"] = json!(5.5);
        c["quantization_config"] = json!({"quant_method": "mxfp4"});
        let g = parse_config(&c, None).unwrap();
        assert_eq!(
            (g.family, g.window.clone(), g.swiglu, g.normalize),
            (Family::GptOss, (8, vec![0, 2]), Some((1.702, 5.5)), true)
        );
        let cfg = g.config(Path::new("src"), Path::new("runs/g")).unwrap();
        let m = &cfg.model;
        assert!(m.qkv_bias && m.o_bias && m.attn_sinks && (m.window(0), m.window(1), m.window(2)) == (8, 0, 8));
        assert_eq!(cfg.experts["plugin"].as_str(), Some("clamped-swiglu"));
        assert_eq!((cfg.router["bias"].as_bool(), cfg.router["normalize"].as_bool()), (Some(true), Some(true)));
        c["quantization_config"] = json!({"quant_method": "fp8"});
        c["attention_bias"] = json!(false);
        let e = parse_config(&c, None).unwrap_err();
        assert!(e.contains("`quantization_config`") && e.contains("`attention_bias` = false"), "{e}");
    }

    /// The released DeepSeek-V2-Lite config.json (deepseek-ai/DeepSeek-V2-Lite, as published)
    /// becomes a Pith config: MLA with q_proj, one dense layer of 10944, 64 experts top-6 beside
    /// two shared ones, YaRN ×40 with the scores scaled by m(40, 0.707)²; 15.7B parameters.
    #[test]
    fn deepseek_v2_lite_imports() {
        let c = json!({
            "architectures": ["DeepseekV2ForCausalLM"], "aux_loss_alpha": 0.001, "bos_token_id": 100000,
            "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
            "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
            "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
            "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
            "norm_topk_prob": false, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
            "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": null, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                             "original_max_position_embeddings": 4096, "type": "yarn"},
            "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": true,
            "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
            "use_cache": true, "v_head_dim": 128, "vocab_size": 102400
        });
        let m = parse_config(&c, Some(4096)).unwrap();
        assert_eq!(
            (m.family, m.dense, m.shared_ffn, m.top_k, m.normalize),
            (Family::DeepseekV2, Some((1, 10944)), 2816, 6, false)
        );
        let y = m.yarn.unwrap();
        assert_eq!((y.factor, y.original_seq_len, y.mscale, y.mscale_all_dim), (40.0, 4096, 0.707, 0.707));
        assert!((m.attn_scale - (1.0 + 0.0707 * 40f64.ln()).powi(2)).abs() < 1e-6, "{}", m.attn_scale);
        let cfg = m.config(Path::new("V2-Lite"), Path::new("runs/lite")).unwrap();
        let mla = cfg.model.mla.unwrap();
        assert_eq!((cfg.model.head_dim, mla.kv_rank, mla.q_rank, mla.rope_dim, mla.v_dim), (192, 512, 0, 64, 128));
        let n = crate::model::Model::counts(&cfg.model, 6, (cfg.shared_ffn(), cfg.dense_ffn()));
        let all = n.total + cfg.model.vocab * cfg.model.hidden; // + the embedding lookup
        assert!((15.6e9..15.8e9).contains(&(all as f64)), "{all} parameters (15.7B published)");
    }

    /// DeepSeek-V2's group_limited_greedy routing imports as the group-topk router (softmax
    /// scores, groups by their best expert, no renormalisation).
    #[test]
    fn deepseek_v2_group_limited_routing_is_group_topk() {
        let mut c = base("DeepseekV2ForCausalLM");
        let v2 = json!({"n_routed_experts": 8, "kv_lora_rank": 4, "qk_rope_head_dim": 2, "qk_nope_head_dim": 2,
                        "v_head_dim": 2, "num_key_value_heads": 4, "topk_method": "group_limited_greedy",
                        "n_group": 4, "topk_group": 2, "routed_scaling_factor": 16.0});
        c.as_object_mut().unwrap().extend(v2.as_object().unwrap().clone());
        let m = parse_config(&c, None).unwrap();
        assert_eq!((m.groups, m.normalize, m.scale), (Some((4, 2)), false, 16.0));
        let cfg = m.config(Path::new("v2"), Path::new("runs/v2")).unwrap();
        let r = &cfg.router;
        assert_eq!(r.get("plugin").and_then(|v| v.as_str()), Some("group-topk"));
        let keys = ["n_group", "topk_group", "routed_scaling_factor", "score", "group_score", "normalize"];
        let got: Vec<String> = keys.iter().map(|k| r[*k].to_string()).collect();
        assert_eq!(got, ["4", "2", "16.0", "\"softmax\"", "\"max\"", "false"]);
        c["topk_method"] = json!("noaux_tc");
        assert!(parse_config(&c, None).unwrap_err().contains("`topk_method` = \"noaux_tc\""));
    }

    #[test]
    fn unrepresentable_fields_are_named() {
        let cases: [(&str, &str, Value, &str); 10] = [
            ("Qwen3MoeForCausalLM", "use_sliding_window", json!(true), "`use_sliding_window` = true"),
            ("Qwen3MoeForCausalLM", "attention_bias", json!(true), "`attention_bias` = true"),
            ("Qwen3MoeForCausalLM", "rope_scaling", json!({"rope_type": "longrope", "factor": 4.0}), "`rope_scaling`"),
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
        // YaRN without a factor: max_position_embeddings / the original (transformers' rule).
        let mut c = base("Qwen3MoeForCausalLM");
        c["rope_scaling"] = json!({"rope_type": "yarn", "original_max_position_embeddings": 8});
        let y = parse_config(&c, None).unwrap().yarn.unwrap();
        assert_eq!(
            (y.factor, y.original_seq_len, y.mscale),
            (c["max_position_embeddings"].as_f64().unwrap() as f32 / 8.0, 8, 0.0)
        );
    }
}
