//! Export: a Pith checkpoint → config.json, safetensors in the per-expert layout (sharded with
//! an index past `max_shard_bytes`), generation_config.json and the tokenizer files, streamed
//! from the memory-mapped checkpoint one tensor at a time.

use super::config::{generation_config, hf_config};
use super::convert::{f32_to_bf16, transpose_into};
use super::family::Family;
use super::names::{hf_name, pith_params, stack};
use super::tokenizer::{copy_tokenizer, find_tokenizer};
use super::{atomically, read_run_config};
use crate::checkpoint::{self, Saved};
use crate::config::Config;
use serde_json::{json, Value};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Safetensors dtype names of what [`export`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    Bf16,
}

/// How [`export`] writes: dtype, shard size, tokenizer and `max_position_embeddings`.
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

/// One tensor of the export: HF name and shape, the Pith tensor and expert it comes from, and
/// the Pith tensor whose values alternate with its by column (GPT-OSS's fused gate_up_proj).
struct Planned {
    name: String,
    shape: Vec<usize>,
    pith: String,
    expert: Option<usize>,
    pair: Option<String>,
}

/// What a Pith config exports as: the family and the router and shared-expert settings its
/// config.json states.
pub(super) struct Target {
    pub family: Family,
    pub top_k: usize,
    pub normalize: bool,
    /// The shared expert's FFN size (Qwen2-MoE, DeepSeek-V2; 0: none).
    pub shared_ffn: usize,
    /// The dense layers' FFN size (DeepSeek-V2's `first_k_dense_replace` layers; 0: none).
    pub dense_ffn: usize,
    /// The router's `scale` (DeepSeek's `routed_scaling_factor`; 1 elsewhere).
    pub scale: f64,
    /// DeepSeek-V3's (`n_group`, `topk_group`) of its sigmoid-bias router.
    pub groups: Option<(usize, usize)>,
}

/// The family `cfg` exports as, or why it has none: only the std `topk-softmax` router (or
/// DeepSeek-V3's `sigmoid-bias`) and `swiglu` experts, the std `shared-swiglu` (Qwen2-MoE's,
/// gated) as a shared expert, and an ungated `shared-swiglu` as DeepSeek's dense layers.
pub(super) fn target(cfg: &Config) -> Result<Target, String> {
    let plugin = |t: &toml::Table| t.get("plugin").and_then(|v| v.as_str()).unwrap_or("").to_string();
    let (router, experts) = (plugin(&cfg.router), plugin(&cfg.experts));
    if experts == "clamped-swiglu" {
        return gpt_oss_target(cfg, &router);
    }
    let (sigmoid, grouped) = (router == "sigmoid-bias", router == "group-topk");
    if !(router == "topk-softmax" || sigmoid || grouped) || experts != "swiglu" {
        return Err(format!(
            "router `{router}` and experts `{experts}`: Hugging Face export covers the std `topk-softmax` router \
             (DeepSeek-V2: `group-topk`, V3: `sigmoid-bias`) and `swiglu` experts only"
        ));
    }
    let shared = match &cfg.shared {
        None => None,
        Some(t) if plugin(t) == "shared-swiglu" => {
            let gate = t.get("gate").and_then(|v| v.as_bool()).unwrap_or(false);
            Some((gate, cfg.shared_ffn()))
        }
        Some(t) => {
            let name = plugin(t);
            return Err(format!("[shared] `{name}`: Hugging Face export covers the std `shared-swiglu` only"));
        }
    };
    let (m, r) = (&cfg.model, &cfg.router);
    let top_k = r.get("top_k").and_then(|v| v.as_integer()).unwrap_or(2) as usize;
    let normalize = r.get("normalize").and_then(|v| v.as_bool()).unwrap_or(true);
    let float = |k: &str| r.get(k).and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64)));
    let int = |k: &str, default: i64| r.get(k).and_then(|v| v.as_integer()).unwrap_or(default) as usize;
    let text = |k: &str, default: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or(default).to_string();
    let scale = float(if sigmoid || grouped { "routed_scaling_factor" } else { "scale" }).unwrap_or(1.0);
    // The plugins' own defaults: sigmoid-bias has no groups, group-topk 4 keeping 2.
    let groups = match (sigmoid, grouped) {
        (true, _) => Some((int("n_group", 1), int("topk_group", 1))),
        (_, true) => Some((int("n_group", 4), int("topk_group", 2))),
        _ => None,
    };
    if (sigmoid || grouped) && m.mla.is_none() {
        return Err(format!("router `{router}`: Hugging Face export has it as DeepSeek's, with [model.mla]"));
    }
    if grouped && (text("score", "softmax") != "softmax" || text("group_score", "max") != "max") {
        return Err("router `group-topk`: DeepSeek-V2's group_limited_greedy scores softmax and groups by their max \
                    (score = \"softmax\", group_score = \"max\")"
            .into());
    }
    let family = Family::of(m, sigmoid, normalize, shared.map(|s| s.0))?;
    if matches!(family, Family::Olmoe | Family::Qwen2Moe) && m.heads * m.head_dim != m.hidden {
        return Err(format!("model.head_dim: {} needs heads·head_dim = hidden", family.architecture()));
    }
    let ffn = shared.map_or(0, |s| s.1);
    if family.deepseek() && (ffn == 0 || !ffn.is_multiple_of(m.expert_ffn)) {
        return Err(format!(
            "[shared] ffn = {ffn}: DeepSeek-V2's shared experts are n_shared_experts × model.expert_ffn ({}) wide",
            m.expert_ffn
        ));
    }
    let dense_ffn = match &cfg.dense {
        None => 0,
        Some(t) if plugin(t) == "shared-swiglu" && t.get("gate").and_then(|v| v.as_bool()) != Some(true) => {
            cfg.dense_ffn()
        }
        Some(t) => {
            let name = plugin(t);
            return Err(format!(
                "[dense] `{name}`: Hugging Face export covers the std `shared-swiglu` without a gate only"
            ));
        }
    };
    if dense_ffn > 0 && !family.deepseek() {
        let arch = family.architecture();
        return Err(format!("model.dense_layers: {arch} has no dense layers (DeepSeek-V2's first_k_dense_replace)"));
    }
    // The attention scale config.json implies: DeepSeek's m(factor, mscale_all_dim)² under YaRN.
    let implied = match m.yarn.filter(|y| family.deepseek() && y.mscale_all_dim != 0.0) {
        Some(y) => crate::config::Yarn::m(y.factor as f64, y.mscale_all_dim as f64).powi(2) as f32,
        None => 1.0,
    };
    if (m.attn_scale - implied).abs() > 1e-6 * implied {
        let arch = family.architecture();
        return Err(format!("model.attn_scale = {}: {arch} with this RoPE implies {implied}", m.attn_scale));
    }
    if scale != 1.0 && !family.deepseek() {
        let arch = family.architecture();
        return Err(format!(
            "router.scale = {scale}: {arch}'s gates are unscaled (DeepSeek-V2 has routed_scaling_factor)"
        ));
    }
    Ok(Target { family, top_k, normalize, shared_ffn: ffn, dense_ffn, scale, groups })
}

/// GPT-OSS: the clamped-swiglu experts with their biases (up_shift 1), the topk-softmax router
/// with a bias and renormalised gates, biases on q/k/v/o, sinks, no qk-norm, MLA, shared expert
/// or dense layers.
fn gpt_oss_target(cfg: &Config, router: &str) -> Result<Target, String> {
    let (m, r, e) = (&cfg.model, &cfg.router, &cfg.experts);
    let get = |t: &toml::Table, k: &str| t.get(k).cloned();
    let on = |t: &toml::Table, k: &str, default: bool| get(t, k).and_then(|v| v.as_bool()).unwrap_or(default);
    let float = |t: &toml::Table, k: &str, d: f64| {
        get(t, k).and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64))).unwrap_or(d)
    };
    let checks = [
        (router == "topk-softmax", "the `topk-softmax` router"),
        (
            on(r, "bias", false) && on(r, "normalize", true) && float(r, "scale", 1.0) == 1.0,
            "router.bias = true, normalize = true, scale = 1",
        ),
        (on(e, "bias", true) && float(e, "up_shift", 1.0) == 1.0, "experts.bias = true and up_shift = 1"),
        (m.qkv_bias && m.o_bias && m.attn_sinks, "model.qkv_bias, o_bias and attn_sinks = true"),
        (m.qk_norm == crate::config::QkNorm::None && m.mla.is_none(), "model.qk_norm = \"none\" and no [model.mla]"),
        (cfg.shared.is_none() && cfg.dense.is_none(), "no [shared] or [dense]"),
    ];
    if let Some((_, want)) = checks.iter().find(|c| !c.0) {
        return Err(format!("experts `clamped-swiglu` exports as GptOssForCausalLM, which needs {want}"));
    }
    let top_k = r.get("top_k").and_then(|v| v.as_integer()).unwrap_or(2) as usize;
    Ok(Target { family: Family::GptOss, top_k, normalize: true, shared_ffn: 0, dense_ffn: 0, scale: 1.0, groups: None })
}

/// The Hugging Face architecture `cfg` exports as (`pith plan`), or why it has none.
pub fn export_family(cfg: &Config) -> Result<String, String> {
    target(cfg).map(|t| t.family.architecture().to_string())
}

/// `pith export hf CHECKPOINT OUT`: config.json, safetensors (per-expert layout; one
/// model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json past
/// `max_shard_bytes`) and the tokenizer files, written to a temp directory renamed to `out`.
pub fn export(src: &Path, out: &Path, opts: &ExportOptions) -> Result<Exported, String> {
    let dir = checkpoint::resolve(src)?;
    let file = dir.join("config.toml");
    let cfg = read_run_config(&file, &[])?;
    let t = target(&cfg).map_err(|e| format!("{}: {e}", file.display()))?;
    let (family, shared_ffn, dense_ffn) = (t.family, t.shared_ffn, t.dense_ffn);
    let m = &cfg.model;
    let tokenizer = find_tokenizer(&cfg, opts.tokenizer.as_deref())?;

    // Check the checkpoint against the model its config describes.
    let st = Saved::open(&dir, "model")?;
    let mut plan = Vec::new();
    for (name, shape) in pith_params(m, family, shared_ffn, dense_ffn) {
        st.check(&name, &shape)?;
        let fused = family == Family::GptOss && name.contains(".moe.experts.");
        match stack(family, &name, m.experts) {
            Some(n) => plan.extend((0..n).map(|e| Planned {
                name: hf_name(family, &name, e),
                shape: vec![shape[2], shape[1]],
                pith: name.clone(),
                expert: Some(e),
                pair: None,
            })),
            // GPT-OSS's gate and up go out together, as the gate's tensor.
            None if fused && name.ends_with("_up") => {}
            None if fused && name.ends_with("_gate") => {
                let shape = [&shape[..shape.len() - 1], &[2 * shape[shape.len() - 1]]].concat();
                let pair = Some(name.replace("_gate", "_up"));
                plan.push(Planned { name: hf_name(family, &name, 0), shape, pith: name, expert: None, pair });
            }
            None => plan.push(Planned { name: hf_name(family, &name, 0), shape, pith: name, expert: None, pair: None }),
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
    let config = hf_config(&cfg, &t, opts, &tokenizer);
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
fn write_shard(path: &Path, tensors: &[&Planned], pith: &Saved, dtype: ExportDtype) -> Result<(), String> {
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
        let vals: Vec<f32> = match (t.expert, &t.pair) {
            (None, Some(pair)) => {
                let (x, y) = (pith.whole(&t.pith)?, pith.whole(pair)?);
                x.iter().zip(&y).flat_map(|(&a, &b)| [a, b]).collect()
            }
            (None, None) => pith.whole(&t.pith)?,
            (Some(e), _) => {
                let (r, c) = (t.shape[0], t.shape[1]);
                let x = pith.rows(&t.pith, e..e + 1)?;
                let mut v = vec![0.0; r * c];
                transpose_into(&mut v, (c, r), 0, |k| x[k]);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_sizes_parse() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("200kb"), Ok(200_000));
        assert_eq!(parse_size("1.5MB"), Ok(1_500_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
    }
}
