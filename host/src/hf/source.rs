//! A model source — an HF folder or a Pith checkpoint — as weights: `train.init_from`
//! ([`init_weights`]), `pith eval-logits` ([`eval_logits`]) and `pith generate` ([`generate`]).

use super::config::read_config;
use super::import::load_weights;
use super::tokenizer::find_tokenizer;
use super::{build, read_run_config};
use crate::checkpoint;
use crate::config::{mem_available, refuse_over, Config, MemEstimate};
use crate::cpu::CpuOps;
use crate::model::Model;
use crate::params::Params;
use crate::registry::Registry;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Copy the weights of a Pith checkpoint directory into `params` (names and shapes must match;
/// accumulators are not checkpointed; an expert-parallel rank's parameters take their slices).
fn copy_checkpoint_weights(dir: &Path, params: &mut Params) -> Result<(), String> {
    let weights = checkpoint::Saved::open(dir, "model")?;
    for p in params.list.iter_mut().filter(|p| p.spec.role != pith_plugin_api::Role::Accumulator) {
        let w = weights.values_for(&p.name, p)?;
        p.w.copy_from_slice(&w);
    }
    Ok(())
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

/// A model to evaluate at sequence length `t`: an HF folder or a Pith checkpoint (step or run
/// directory) with its weights, and the tokenizer.json that goes with it (None: bytes).
fn load_model(src: &Path, t: usize, reg: &Registry) -> Result<(Config, Model, Params, Option<PathBuf>), String> {
    let hf = src.join("config.json").is_file().then(|| read_config(src, Some(t))).transpose()?;
    let (cfg, dir) = match &hf {
        Some(h) => (h.config(src, Path::new("runs/eval-logits"))?, src.to_path_buf()),
        None => {
            let dir = checkpoint::resolve(src)?;
            (read_run_config(&dir.join("config.toml"), &[format!("model.seq_len={t}")])?, dir)
        }
    };
    // The weights and the grads their init allocates; one sequence's activations are small.
    let doing = (8, "evaluating the model");
    match &hf {
        Some(h) => h.check_memory(src, &cfg, doing, Some("--tokens"))?,
        None => {
            let available = mem_available().unwrap_or(u64::MAX as u128);
            refuse_over(&cfg, |c| MemEstimate::of(c, 8, false), available, doing.1, |k| cfg.key_at(k))?
        }
    }
    let (model, mut params, _) = build(&cfg, reg)?;
    let tokenizer = match &hf {
        Some(h) => {
            load_weights(src, h, &mut params)?;
            Some(src.join("tokenizer.json")).filter(|p| p.is_file())
        }
        None => {
            copy_checkpoint_weights(&dir, &mut params)?;
            find_tokenizer(&cfg, None)?.map(|t| t.0)
        }
    };
    Ok((cfg, model, params, tokenizer))
}

/// `pith eval-logits MODEL --tokens ...`: the logits of `tokens` (one sequence) and the mean
/// next-token cross-entropy over them (as transformers' `labels=input_ids` loss), for an HF
/// folder or a Pith checkpoint: `{"tokens": [...], "loss": x, "logits": [[...], ...]}`.
pub fn eval_logits(src: &Path, tokens: &[u32], reg: &Registry) -> Result<Value, String> {
    let t = tokens.len();
    if t < 2 {
        return Err(format!("--tokens: give at least 2 token ids, got {t}"));
    }
    let (cfg, model, params, _) = load_model(src, t, reg)?;
    let logits = model.logits(&CpuOps::default(), &params, tokens, 1)?;
    let v = cfg.model.vocab;
    let loss = crate::layers::cross_entropy(&logits[..(t - 1) * v], &tokens[1..], v, 1.0, None);
    let rows: Vec<&[f32]> = logits.chunks(v).collect();
    Ok(json!({ "tokens": tokens, "loss": loss, "logits": rows }))
}

/// How `pith generate` samples.
pub struct Sampling {
    pub max_tokens: usize,
    /// 0: greedy (argmax); else softmax(logits / temperature) over the `top_k` largest (0: all).
    pub temperature: f32,
    pub top_k: usize,
    pub seed: u64,
    /// `cpu` or `cuda`.
    pub device: String,
}

/// `pith generate MODEL --prompt TEXT`: the prompt's tokens and `max_tokens` more, on the CPU or
/// CUDA, with the model's tokenizer (bytes when it has none): (text of the new tokens, every
/// token). Each token recomputes the whole sequence (no KV cache): for looking at a model, not
/// serving.
pub fn generate(src: &Path, prompt: &str, s: &Sampling, reg: &Registry) -> Result<(String, Vec<u32>), String> {
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return Err(format!("--temperature {}: a number >= 0 (0: greedy)", s.temperature));
    }
    if s.device != "cpu" && s.device != "cuda" {
        return Err(format!("--device `{}`: cpu or cuda", s.device));
    }
    // The tokenizer first (it fixes the prompt's length), from a model built at length 2.
    let (_, _, _, tok_path) = load_model(src, 2, reg)?;
    let tok = tok_path
        .as_deref()
        .map(tokenizers::Tokenizer::from_file)
        .transpose()
        .map_err(|e| format!("{}: {e}", tok_path.unwrap().display()))?;
    let mut ids: Vec<u32> = match &tok {
        Some(t) => t.encode(prompt, false).map_err(|e| format!("--prompt: {e}"))?.get_ids().to_vec(),
        None => prompt.bytes().map(u32::from).collect(),
    };
    if ids.is_empty() {
        return Err("--prompt: give some text (it encodes to no tokens)".into());
    }
    // One model at the final length; the tail is padding, which causal attention never reads.
    let (n, len) = (ids.len(), ids.len() + s.max_tokens);
    let (cfg, model, params, _) = load_model(src, len, reg)?;
    let v = cfg.model.vocab;
    // The logits of row `cur - 1` of a padded sequence.
    let mut row_of: Box<RowOf<'_>> = match s.device.as_str() {
        "cuda" => {
            use crate::gpu::{model::GpuParams, model::GpuPass, model::RopeTables, ops::GpuOps, Gpu};
            let gpu = std::sync::Arc::new(Gpu::open(0)?);
            let p = GpuParams::upload(&gpu, &params, &crate::parallel::Parallel::single())?;
            let (rope, ops) = (RopeTables::new(&gpu, &model)?, GpuOps::new(gpu.clone()));
            Box::new(move |seq, cur| {
                let tokens = gpu.upload(seq, &[seq.len()], pith_plugin_api::DType::I32)?;
                let pass = GpuPass { m: &model, gpu: &gpu, ops: &ops, p: &p, rope: &rope, batch: 1, reduce: None };
                pass.logits_row(&tokens, cur - 1)
            })
        }
        _ => {
            let ops = CpuOps::default();
            Box::new(move |seq, cur| Ok(model.logits(&ops, &params, seq, 1)?[(cur - 1) * v..cur * v].to_vec()))
        }
    };
    let mut rng = crate::rng::Rng::new(s.seed);
    for _ in 0..s.max_tokens {
        let cur = ids.len();
        let mut seq = ids.clone();
        seq.resize(len, 0);
        let row = row_of(&seq, cur)?;
        ids.push(pick(&row, s, &mut rng) as u32);
    }
    let new = &ids[n..];
    let text = match &tok {
        Some(t) => t.decode(new, false).map_err(|e| format!("decoding: {e}"))?,
        None => String::from_utf8_lossy(&new.iter().map(|&i| i as u8).collect::<Vec<_>>()).into_owned(),
    };
    Ok((text, ids))
}

/// The logits of row `cur - 1` of sequence `seq`: `row_of(seq, cur)`.
type RowOf<'a> = dyn FnMut(&[u32], usize) -> Result<Vec<f32>, String> + 'a;

/// The next token from one row of logits.
fn pick(row: &[f32], s: &Sampling, rng: &mut crate::rng::Rng) -> usize {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    if s.temperature == 0.0 {
        return order[0];
    }
    let k = if s.top_k == 0 { row.len() } else { s.top_k.min(row.len()) };
    let top = &order[..k];
    let w: Vec<f64> = top.iter().map(|&i| (((row[i] - row[top[0]]) / s.temperature) as f64).exp()).collect();
    let mut u = rng.uniform() as f64 * w.iter().sum::<f64>();
    for (&i, &wi) in top.iter().zip(&w) {
        if u < wi {
            return i;
        }
        u -= wi;
    }
    top[k - 1]
}
