//! The tokenizer files an export ships: the tokenizer.json given or named by the run's data
//! meta.json, with its tokenizer_config.json and special_tokens_map.json.

use crate::config::Config;
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};

/// The tokenizer.json to ship and the separator (eos) id: `explicit`, or the one the run's data
/// meta.json names (none for the synthetic corpus or the byte tokenizer).
pub(super) fn find_tokenizer(cfg: &Config, explicit: Option<&Path>) -> Result<Option<(PathBuf, Option<u64>)>, String> {
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
pub(super) fn copy_tokenizer(tok: &Path, out: &Path, seq_len: usize) -> Result<(), String> {
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
