//! Import: the safetensors of an HF folder (one file, or shards named by
//! model.safetensors.index.json), memory-mapped one file at a time, each tensor converted
//! straight into its place in a Pith model; and `pith import hf`, which writes the result as a
//! run directory with a step-0 checkpoint.

use super::config::{read_config, HfModel};
use super::convert::{reader, transpose_into};
use super::family::Family;
use super::names::{hf_name, stack, translate, Slot};
use super::{atomically, build, mmap, parse_st, shape};
use crate::checkpoint::{self, TrainerState};
use crate::params::Params;
use crate::registry::Registry;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

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
    let pieces = |i: usize| stack(&params.list[i].name, hf.experts).unwrap_or(1);
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
            let ps = shape(&params.list[i]);
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
                Slot::Expert(e) if e < filled[i].len() => vec![e],
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
    // Accumulators (a step's counts) are no weights: nothing in an HF folder fills them.
    let weight = |i: &usize| params.list[*i].spec.role != pith_plugin_api::Role::Accumulator;
    for (i, f) in filled.iter().enumerate().filter(|(i, _)| weight(i)) {
        if let Some(e) = f.iter().position(|f| !f) {
            let name = hf_name(hf.family, &params.list[i].name, e);
            return Err(format!("{}: tensor `{name}` is missing", named.display()));
        }
    }
    Ok(())
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
    // The weights, their (freed) grads and two optimizer states; the checkpoint reads back its files.
    hf.check_memory(src, &cfg, (16, "importing the model"), seq_len.map(|_| "--seq-len"))?;
    let (_model, mut params, (_, opt)) = build(&cfg, reg)?;
    load_weights(src, &hf, &mut params)?;
    for p in &mut params.list {
        p.state =
            opt.state(p.name.as_str().into(), &p.spec).iter().map(|n| (n.to_string(), vec![0.0; p.w.len()])).collect();
    }
    let state = TrainerState { step: 0, data_position: 0, plugin_api: pith_plugin_api::VERSION.into() };
    atomically(out, |tmp| {
        checkpoint::save(tmp, &cfg, &params, &state)?;
        fs::write(tmp.join("config.toml"), cfg.to_toml()).map_err(|e| format!("{}: {e}", tmp.display()))
    })?;
    let checkpoint = checkpoint::step_dir(out, 0);
    Ok(Imported { family: hf.family, params: params.count(), checkpoint })
}
