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
//!
//! Where things live:
//!
//! - `family.rs`: [`Family`], the three architectures and their naming conventions.
//! - `config.rs`: config.json ↔ Pith config ([`read_config`], [`HfModel`], refused fields; the
//!   config.json an export writes).
//! - `names.rs`: tensor names and shapes ([`pith_params`], Pith ↔ HF name translation).
//! - `convert.rs`: element conversion (F32/BF16/F16) and the expert transposes.
//! - `import.rs`: reading safetensors (shards + index) into a model ([`load_weights`], [`import`]).
//! - `export.rs`: writing sharded safetensors + index and config.json ([`export`]).
//! - `tokenizer.rs`: which tokenizer files an export ships.
//! - `source.rs`: an HF folder or Pith checkpoint as weights ([`init_weights`], [`eval_logits`]).
//! - here: what import and export share (building the model, mapping files, atomic output).

mod config;
mod convert;
mod export;
mod family;
mod import;
mod names;
mod source;
mod tokenizer;

pub use config::{read_config, HfModel};
pub use export::{export, export_family, parse_size, ExportDtype, ExportOptions, Exported};
pub use family::Family;
pub use import::{import, load_weights, Imported};
pub use names::pith_params;
pub use source::{eval_logits, generate, init_weights, Sampling};

use crate::config::Config;
use crate::model::Model;
use crate::params::{Param, Params, Shard};
use crate::registry::Registry;
use pith_plugin_api::abi::OptimizerBox;
use safetensors::SafeTensors;
use std::fs;
use std::path::Path;

/// The shape of a parameter, as safetensors gives shapes.
fn shape(p: &Param) -> Vec<usize> {
    p.spec.shape.iter().map(|&d| d as usize).collect()
}

/// The config of a Pith checkpoint (its `config.toml`), with `overrides` applied.
fn read_run_config(file: &Path, overrides: &[String]) -> Result<Config, String> {
    let text = fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    Config::parse(&file.display().to_string(), &text, overrides)
}

/// Memory-map a file to read it.
fn mmap(path: &Path) -> Result<memmap2::Mmap, String> {
    let file = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: the file is only read, and not expected to change while Pith reads it.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("{}: cannot map: {e}", path.display()))
}

/// The safetensors in `bytes` (mapped from `path`, which errors name).
fn parse_st<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, String> {
    SafeTensors::deserialize(bytes).map_err(|e| format!("{}: not a readable safetensors file: {e:?}", path.display()))
}

/// The model of `cfg` with its components, weights still at their random init, without grads.
fn build(cfg: &Config, reg: &Registry) -> Result<(Model, Params, (String, OptimizerBox)), String> {
    // DeepSeek's routers and GPT-OSS's experts are plugin crates of this workspace, loaded from beside `pith`.
    let crates = ["group-topk", "sigmoid-bias", "clamped-swiglu"];
    let hint = |e: String| match crates.into_iter().find(|p| e.contains(&format!("`{p}`"))) {
        Some(p) => format!("{e} (the `{p}` plugin: `cargo build --release -p {p}` puts it beside pith)"),
        None => e,
    };
    let (moe, opt) = crate::train::components(cfg, reg, Shard::WHOLE).map_err(hint)?;
    let mut params = Params::default();
    let model = Model::new(&cfg.model, &mut params, cfg.train.seed, moe, Shard::WHOLE)?;
    params.list.iter_mut().for_each(|p| p.g = Vec::new());
    Ok((model, params, opt))
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
