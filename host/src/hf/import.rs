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
use crate::params::{Param, Params};
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
/// memory-mapped file at a time, each tensor converted in place. An expert-parallel rank's
/// parameters (`Param::shard`) take only their experts; the others are skipped.
pub fn load_weights(dir: &Path, hf: &HfModel, params: &mut Params) -> Result<(), String> {
    let index: HashMap<String, usize> = params.list.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
    let pieces = |i: usize| stack(hf.family, &params.list[i].name, hf.experts).unwrap_or(1);
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
            // GPT-OSS's released experts: MXFP4 `X_blocks` with `X_scales`, dequantized as X.
            if name.ends_with("_scales") && st.tensor(&name.replace("_scales", "_blocks")).is_ok() {
                continue;
            }
            if let Some(base) = name.strip_suffix("_blocks") {
                let scales = st.tensor(&format!("{base}_scales")).map_err(|_| {
                    at(format!(
                        "(MXFP4) has no `{base}_scales` beside it in this file; Pith reads the pair from one file"
                    ))
                })?;
                let (shape, vals) = dequantize_mxfp4(&t, &scales).map_err(at)?;
                place(params, &mut filled, (&index, hf), base, &shape, &|k| vals[k]).map_err(at)?;
                continue;
            }
            let (size, read) =
                reader(t.dtype()).ok_or_else(|| at(format!("is {:?}; Pith reads F32, BF16 and F16", t.dtype())))?;
            let data = t.data();
            place(params, &mut filled, (&index, hf), &name, t.shape(), &|k| read(&data[k * size..])).map_err(at)?;
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
        let mine = if f.len() > 1 { local_experts(&params.list[i]) } else { 0..1 };
        if let Some(e) = mine.into_iter().find(|&e| !f[e]) {
            let name = hf_name(hf.family, &params.list[i].name, e);
            return Err(format!("{}: tensor `{name}` is missing", named.display()));
        }
    }
    Ok(())
}

/// Put HF tensor `name` of `hf_shape` (elements read through `x`) into its place in `params`,
/// marking what it filled; an error says why it has no place (the caller names the file).
fn place(
    params: &mut Params,
    filled: &mut [Vec<bool>],
    (index, hf): (&HashMap<String, usize>, &HfModel),
    name: &str,
    hf_shape: &[usize],
    x: &dyn Fn(usize) -> f32,
) -> Result<(), String> {
    let nowhere = || format!("has no place in a Pith model of this config.json ({})", hf.family.architecture());
    let layer = name.strip_prefix("model.layers.").and_then(|r| r.split('.').next()?.parse::<usize>().ok());
    if layer.is_some_and(|l| (hf.layers..hf.layers + hf.mtp).contains(&l)) {
        return Ok(()); // a multi-token-prediction layer (HfModel::mtp)
    }
    let (pith, slot) = translate(hf.family, name).ok_or_else(nowhere)?;
    if slot == Slot::Skip {
        return Ok(());
    }
    let &i = index.get(&pith).ok_or_else(nowhere)?;
    // `ps` is this rank's slice (experts `mine` of the whole `full`); HF holds every expert.
    let (ps, full, mine) = (shape(&params.list[i]), params.list[i].full_shape(), local_experts(&params.list[i]));
    let want = match slot {
        Slot::Whole | Slot::Skip => full.clone(),
        Slot::Expert(_) => vec![ps[2], ps[1]],
        Slot::GateUp => vec![full[0], 2 * ps[2], ps[1]],
        Slot::Down => vec![full[0], ps[2], ps[1]],
        Slot::GateUpCols => [&full[..ps.len() - 1], &[2 * ps[ps.len() - 1]]].concat(),
    };
    // Where this rank's slice starts in a whole (unsplit) HF tensor.
    let off = mine.start * ps.iter().skip(1).product::<usize>();
    if hf_shape != want {
        return Err(format!("has shape {hf_shape:?}, the model needs {want:?}"));
    }
    let mut targets = vec![i];
    if matches!(slot, Slot::GateUp | Slot::GateUpCols) {
        targets.push(index[&pith.replace("_gate", "_up")]);
    }
    let marks: Vec<usize> = match slot {
        Slot::Expert(e) if !mine.contains(&e) && e < filled[i].len() => return Ok(()), // another rank's
        Slot::Expert(e) if e < filled[i].len() => vec![e],
        Slot::Expert(_) => return Err(nowhere()),
        Slot::GateUp | Slot::Down => mine.clone().collect(),
        _ => vec![0],
    };
    for &j in &targets {
        if marks.iter().any(|&e| std::mem::replace(&mut filled[j][e], true)) {
            return Err(format!("sets `{}` a second time", params.list[j].name));
        }
    }
    let w = &mut params.list[i].w;
    match slot {
        Slot::Whole => w.iter_mut().enumerate().for_each(|(k, w)| *w = x(off + k)),
        Slot::Expert(e) => {
            let at = (e - mine.start) * ps[1] * ps[2];
            transpose_into(&mut w[at..][..ps[1] * ps[2]], (ps[2], ps[1]), 0, x)
        }
        Slot::Down => {
            let n = ps[1] * ps[2];
            for (l, e) in mine.enumerate() {
                transpose_into(&mut w[l * n..][..n], (ps[2], ps[1]), e * n, x);
            }
        }
        Slot::GateUp => {
            let mut up = std::mem::take(&mut params.list[targets[1]].w);
            let (f, h) = (ps[2], ps[1]);
            let w = &mut params.list[i].w;
            for (l, e) in mine.enumerate() {
                let (g, u) = (&mut w[l * h * f..][..h * f], &mut up[l * h * f..][..h * f]);
                transpose_into(g, (f, h), e * 2 * f * h, x);
                transpose_into(u, (f, h), (e * 2 + 1) * f * h, x);
            }
            params.list[targets[1]].w = up;
        }
        Slot::GateUpCols => {
            w.iter_mut().enumerate().for_each(|(k, w)| *w = x(2 * (off + k)));
            let up = &mut params.list[targets[1]].w;
            up.iter_mut().enumerate().for_each(|(k, w)| *w = x(2 * (off + k) + 1));
        }
        Slot::Skip => {}
    }
    Ok(())
}

/// The experts a parameter stacked by expert holds here (all of them without a shard).
fn local_experts(p: &Param) -> std::ops::Range<usize> {
    let n = p.shape().first().copied().unwrap_or(1);
    let first = p.shard.map_or(0, |s| s.part * n);
    first..first + n
}

/// FP4 (e2m1) codes → values.
const FP4: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// An MXFP4 expert tensor (OCP microscaling, as GPT-OSS ships its experts): `blocks` U8
/// [E, R, G, 16] (two FP4 codes a byte, the low nibble first), `scales` U8 [E, R, G] (a power
/// of two, biased by 127, per block of 32) hold W [E, R, 32·G]; the result is Wᵀ per expert,
/// [E, 32·G, R], the layout of the tensor the pair replaces (transformers' dequantization).
fn dequantize_mxfp4(
    blocks: &safetensors::tensor::TensorView,
    scales: &safetensors::tensor::TensorView,
) -> Result<(Vec<usize>, Vec<f32>), String> {
    let (bs, ss) = (blocks.shape(), scales.shape());
    let u8s = blocks.dtype() == safetensors::Dtype::U8 && scales.dtype() == safetensors::Dtype::U8;
    if !u8s || bs.len() != 4 || bs[3] != 16 || ss != &bs[..3] {
        return Err(format!(
            "(MXFP4) is {:?} {bs:?} with scales {:?} {ss:?}: expected U8 blocks [E, R, G, 16] and U8 scales [E, R, G]",
            blocks.dtype(),
            scales.dtype()
        ));
    }
    let (e, r, g) = (bs[0], bs[1], bs[2]);
    let c = 32 * g;
    let (b, s) = (blocks.data(), scales.data());
    let mut out = vec![0.0f32; e * c * r];
    for (ex, row, grp) in (0..e).flat_map(|ex| (0..r).flat_map(move |row| (0..g).map(move |grp| (ex, row, grp)))) {
        let at = (ex * r + row) * g + grp;
        let scale = (s[at] as f32 - 127.0).exp2();
        for (j, &byte) in b[at * 16..][..16].iter().enumerate() {
            for (half, code) in [(0, byte & 0xf), (1, byte >> 4)] {
                let col = grp * 32 + 2 * j + half;
                out[(ex * c + col) * r + row] = FP4[code as usize] * scale;
            }
        }
    }
    Ok((vec![e, c, r], out))
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
        checkpoint::save(tmp, &cfg, &params, &state, &crate::parallel::Parallel::single())?;
        fs::write(tmp.join("config.toml"), cfg.to_toml()).map_err(|e| format!("{}: {e}", tmp.display()))
    })?;
    let checkpoint = checkpoint::step_dir(out, 0);
    Ok(Imported { family: hf.family, params: params.count(), checkpoint })
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::{tensor::TensorView, Dtype};

    /// One expert, two rows of one block of 32: row 0 at scale 2⁰, row 1 at 2¹; byte j of each
    /// row holds codes (2j mod 16) low and (2j + 1 mod 16) high. Spot values by hand, and the
    /// result laid out [E, 32, R].
    #[test]
    fn mxfp4_dequantizes_as_transformers_does() {
        let row: Vec<u8> = (0..16u8).map(|j| ((2 * j) % 16) | (((2 * j + 1) % 16) << 4)).collect();
        let blocks = [row.clone(), row].concat();
        let scales = [127u8, 128];
        let b = TensorView::new(Dtype::U8, vec![1, 2, 1, 16], &blocks).unwrap();
        let s = TensorView::new(Dtype::U8, vec![1, 2, 1], &scales).unwrap();
        let (shape, w) = dequantize_mxfp4(&b, &s).unwrap();
        assert_eq!(shape, [1, 32, 2]);
        let at = |c: usize, r: usize| w[c * 2 + r];
        // column c has code c mod 16: 0 → 0, 3 → 1.5, 7 → 6, 9 → −0.5, 15 → −6; row 1 doubles.
        assert_eq!([at(0, 0), at(3, 0), at(7, 0), at(9, 0), at(15, 0)], [0.0, 1.5, 6.0, -0.5, -6.0]);
        assert_eq!([at(3, 1), at(19, 1), at(31, 1)], [3.0, 3.0, -12.0]);
        let bad = TensorView::new(Dtype::U8, vec![1, 2, 16], &blocks).unwrap();
        assert!(dequantize_mxfp4(&bad, &s).unwrap_err().contains("expected U8 blocks [E, R, G, 16]"));
    }
}
