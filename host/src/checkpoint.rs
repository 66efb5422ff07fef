//! Checkpoints: `<run>/checkpoints/step_NNNNNNNN/` holding the weights and the optimizer state
//! (state tensors named `<param>.<state>`) as f32 safetensors, `trainer.json` (step, data
//! position, plugin-api version), `config.toml` (the resolved config) and `checksums.json` (the
//! length and CRC-32 of each file, verified whenever one is read back).
//!
//! One process writes `model.safetensors` and `optimizer.safetensors`. Several ranks each write
//! what they alone hold, `model-rankRRRRR.safetensors` and `optimizer-rankRRRRR.safetensors`:
//! each tensor once, by its owner (`shard_optimizer`) or by the first rank holding it, so an
//! expert-parallel rank writes its slice of the experts (the file's metadata names the slice,
//! `"part/parts"`) and no rank gathers the model. [`Saved`] reads the slices a rank needs from
//! whichever files hold them, so a checkpoint loads at any layout.
//!
//! A checkpoint is written into a `.tmp` directory and renamed by rank 0 once every rank's files
//! are in it, so a crash never leaves half of one; a stale `.tmp` (or the `.old` of an
//! interrupted replacement) is tidied by [`recover`].

use crate::config::Config;
use crate::parallel::Parallel;
use crate::params::{Param, Params};
use pith_plugin_api::{Group, Role};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::cell::OnceCell;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TrainerState {
    pub step: u64,
    /// Position of the training data stream (see data.rs).
    pub data_position: u64,
    pub plugin_api: String,
}

fn io<E: std::fmt::Display>(p: &Path) -> impl Fn(E) -> String + '_ {
    move |e| format!("{}: {e}", p.display())
}

fn bytes_of(v: &[f32]) -> &[u8] {
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// (name, data, shape, "part/parts" of an expert slice) of one tensor to write.
type Named<'a> = (String, &'a [f32], Vec<usize>, Option<String>);

/// Length and CRC-32 of each file of a checkpoint: `checksums.json`.
type Checksums = BTreeMap<String, (u64, u32)>;

const CHECKSUMS: &str = "checksums.json";

/// Verify `bytes`, read from `path`, against the `checksums.json` beside it (if there is one:
/// checkpoints written before checksums existed have none).
fn verify(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else { return Ok(()) };
    let Ok(text) = std::fs::read_to_string(dir.join(CHECKSUMS)) else { return Ok(()) };
    let sums: Checksums = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", dir.join(CHECKSUMS).display()))?;
    let Some(&(len, crc)) = sums.get(name) else { return Ok(()) };
    let got = (bytes.len() as u64, crc32fast::hash(bytes));
    if got != (len, crc) {
        return Err(format!(
            "{}: corrupted: {} bytes with CRC-32 {:08x}, but it was written as {len} bytes with CRC-32 {crc:08x}; \
             resume from another checkpoint of the run",
            path.display(),
            got.0,
            got.1
        ));
    }
    Ok(())
}

/// Length and CRC-32 of a file, read in pieces (a checkpoint file can be tens of GB).
fn checksum(path: &Path) -> std::io::Result<(u64, u32)> {
    use std::io::Read;
    let (mut file, mut crc, mut len) = (std::fs::File::open(path)?, crc32fast::Hasher::new(), 0u64);
    let mut buf = vec![0u8; 1 << 22];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok((len, crc.finalize())),
            n => {
                crc.update(&buf[..n]);
                len += n as u64;
            }
        }
    }
}

/// Read a file of a checkpoint, verified against its checksum.
fn read_verified(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    verify(path, &bytes)?;
    Ok(bytes)
}

fn read_text(path: &Path) -> Result<String, String> {
    String::from_utf8(read_verified(path)?).map_err(|_| format!("{}: not UTF-8 text", path.display()))
}

fn write_tensors(path: &Path, tensors: Vec<Named>) -> Result<(), String> {
    let slices: HashMap<String, String> = tensors.iter().filter_map(|t| Some((t.0.clone(), t.3.clone()?))).collect();
    let views: Vec<(String, TensorView)> = tensors
        .into_iter()
        .map(|(n, d, s, _)| Ok((n, TensorView::new(Dtype::F32, s, bytes_of(d)).map_err(|e| e.to_string())?)))
        .collect::<Result<_, String>>()?;
    let meta = (!slices.is_empty()).then_some(slices);
    safetensors::serialize_to_file(views, &meta, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(e) => format!("{}: {e}", path.display()),
        e => format!("{}: {e:?}", path.display()),
    })
}

/// Tensors by name: (shape, f32 values).
pub type TensorMap = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Tensors of a safetensors file as f32 vectors with their shapes (verified against the
/// checkpoint's checksums when the file is part of one).
pub fn read_tensors(path: &Path) -> Result<TensorMap, String> {
    let bytes = read_verified(path)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{}: not a readable safetensors file ({e:?})", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, t) in st.tensors() {
        if t.dtype() != Dtype::F32 {
            return Err(format!("{}: tensor `{name}` is {:?}, expected F32", path.display(), t.dtype()));
        }
        let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        out.insert(name, (t.shape().to_vec(), v));
    }
    Ok(out)
}

pub fn step_dir(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(format!("step_{step:08}"))
}

/// The names of rank `rank`'s weight and optimizer-state files in a checkpoint of `size` ranks.
fn tensor_files(rank: u32, size: u32) -> [String; 2] {
    match size {
        1 => ["model.safetensors".into(), "optimizer.safetensors".into()],
        _ => ["model", "optimizer"].map(|f| format!("{f}-rank{rank:05}.safetensors")),
    }
}

/// Whether this rank writes `p`: each tensor (or expert slice) is written once, by its owner
/// (`shard_optimizer`) or by the first rank of the group that holds it. Accumulators live for
/// one step and are not saved.
fn writes(p: &Param, par: &Parallel) -> bool {
    p.spec.role != Role::Accumulator && p.owner.unwrap_or_else(|| par.members(p.group())[0]) == par.rank
}

/// Whether this rank has anything to write (on a GPU it then brings the device's values home).
pub fn writes_any(params: &Params, par: &Parallel) -> bool {
    params.list.iter().any(|p| writes(p, par))
}

/// Write the checkpoint for `state.step`; every rank of `par` calls this. An existing
/// checkpoint of the same step is replaced only after the new one is complete on disk; a failed
/// write (disk full) on any rank leaves no `.tmp` and fails the save on every rank.
pub fn save(
    run: &Path,
    cfg: &Config,
    params: &Params,
    state: &TrainerState,
    par: &Parallel,
) -> Result<PathBuf, String> {
    let dir = step_dir(run, state.step);
    let tmp = dir.with_extension("tmp");
    let made = match par.is_first() {
        true => {
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(io(&tmp))
        }
        false => Ok(()),
    };
    agree(par, &tmp, made)?;
    let sums = agree(par, &tmp, write_part(&tmp, params, par))?;
    let done = match par.is_first() {
        true => finish(&tmp, &dir, cfg, state, par.size, sums).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&tmp);
        }),
        false => Ok(()),
    };
    agree(par, &tmp, done)?;
    Ok(dir)
}

/// `r` on every rank, made one: when any rank failed, that rank returns its error, the others
/// one naming it, and rank 0 removes the `.tmp`.
fn agree<T>(par: &Parallel, tmp: &Path, r: Result<T, String>) -> Result<T, String> {
    let mut failed = [if r.is_err() { par.rank as f32 + 1.0 } else { 0.0 }];
    par.max_f32(Group::World, &mut failed)?;
    if failed[0] > 0.0 && par.is_first() {
        let _ = std::fs::remove_dir_all(tmp);
    }
    match r {
        Ok(_) if failed[0] > 0.0 => {
            Err(format!("{}: rank {} could not write its part of the checkpoint", tmp.display(), failed[0] as u32 - 1))
        }
        r => r,
    }
}

/// This rank's tensor files into `tmp`; their checksums are returned (one rank) or written to
/// `checksums-rankRRRRR.json` for rank 0 to collect (every rank writes one, so rank 0 can tell
/// a rank whose files went elsewhere).
fn write_part(tmp: &Path, params: &Params, par: &Parallel) -> Result<Checksums, String> {
    let mine: Vec<&Param> = params.list.iter().filter(|p| writes(p, par)).collect();
    let mut sums = Checksums::new();
    if !mine.is_empty() || par.size == 1 {
        let slice = |p: &Param| p.shard.filter(|s| s.parts > 1).map(|s| format!("{}/{}", s.part, s.parts));
        let [model, optimizer] = tensor_files(par.rank, par.size);
        write_tensors(
            &tmp.join(&model),
            mine.iter().map(|p| (p.name.clone(), &p.w[..], p.shape(), slice(p))).collect(),
        )?;
        let states = mine
            .iter()
            .flat_map(|p| p.state.iter().map(move |(s, v)| (format!("{}.{s}", p.name), &v[..], p.shape(), slice(p))))
            .collect();
        write_tensors(&tmp.join(&optimizer), states)?;
        for name in [model, optimizer] {
            let path = tmp.join(&name);
            sums.insert(name, checksum(&path).map_err(io(&path))?);
        }
    }
    if par.size > 1 {
        let path = tmp.join(format!("checksums-rank{:05}.json", par.rank));
        std::fs::write(&path, serde_json::to_string(&sums).unwrap()).map_err(io(&path))?;
    }
    Ok(sums)
}

/// Rank 0, once every rank's files are in `tmp`: the other ranks' checksums, `trainer.json`,
/// `config.toml` and `checksums.json` (last), then `tmp` renamed to `dir`.
fn finish(
    tmp: &Path,
    dir: &Path,
    cfg: &Config,
    state: &TrainerState,
    size: u32,
    mut sums: Checksums,
) -> Result<(), String> {
    for rank in 1..size {
        let path = tmp.join(format!("checksums-rank{rank:05}.json"));
        let text = std::fs::read_to_string(&path).map_err(|_| {
            format!(
                "{}: rank {rank}'s files are not there; with ranks on several machines, train.out must be \
                 on a filesystem they all share",
                tmp.display()
            )
        })?;
        sums.extend(serde_json::from_str::<Checksums>(&text).map_err(io(&path))?);
    }
    for rank in 0..size {
        let _ = std::fs::remove_file(tmp.join(format!("checksums-rank{rank:05}.json")));
    }
    let json = serde_json::to_string_pretty(state).unwrap();
    std::fs::write(tmp.join("trainer.json"), json).map_err(io(tmp))?;
    std::fs::write(tmp.join("config.toml"), cfg.to_toml()).map_err(io(tmp))?;
    for name in ["trainer.json", "config.toml"] {
        let path = tmp.join(name);
        sums.insert(name.to_string(), checksum(&path).map_err(io(&path))?);
    }
    std::fs::write(tmp.join(CHECKSUMS), serde_json::to_string_pretty(&sums).unwrap()).map_err(io(tmp))?;
    if dir.exists() {
        let old = dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(io(dir))?;
        std::fs::rename(tmp, dir).map_err(io(dir))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, dir).map_err(io(dir))?;
    }
    Ok(())
}

/// Tidy `run/checkpoints` after a crash: a `.tmp` (a save that never finished) is removed; an
/// `.old` (a replacement interrupted between its two renames) is put back when its checkpoint
/// is missing, and removed otherwise. Returns what was done, one line each.
pub fn recover(run: &Path) -> Result<Vec<String>, String> {
    let ck = run.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&ck) else { return Ok(Vec::new()) };
    let mut done = Vec::new();
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        let whole = p.with_extension("");
        if ext == "old" && !whole.exists() {
            std::fs::rename(&p, &whole).map_err(io(&p))?;
            done.push(format!("restored {} (a replacement was interrupted)", whole.display()));
        } else if ext == "tmp" || ext == "old" {
            std::fs::remove_dir_all(&p).map_err(io(&p))?;
            done.push(format!("removed {} (a save that did not finish)", p.display()));
        }
    }
    Ok(done)
}

/// The steps of the complete checkpoints under a run directory, oldest first.
pub fn steps(run: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(run.join("checkpoints")) else { return Vec::new() };
    let mut steps: Vec<u64> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_none() && p.join("trainer.json").is_file())
        .filter_map(|p| p.file_name()?.to_str()?.strip_prefix("step_")?.parse().ok())
        .collect();
    steps.sort();
    steps
}

/// The trainer state of a checkpoint (a step or run directory).
pub fn state(path: &Path) -> Result<TrainerState, String> {
    let file = resolve(path)?.join("trainer.json");
    serde_json::from_str(&read_text(&file)?).map_err(io(&file))
}

/// The newest complete checkpoint under a run directory (or the path itself if it is one).
pub fn resolve(path: &Path) -> Result<PathBuf, String> {
    if path.join("trainer.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let ck = path.join("checkpoints");
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&ck)
        .map_err(|_| {
            format!(
                "{}: no checkpoint here (expected a step_* directory or a run directory with checkpoints/)",
                path.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_none() && p.join("trainer.json").is_file())
        .collect();
    steps.sort();
    steps.pop().ok_or_else(|| format!("{}: no complete checkpoint in {}", path.display(), ck.display()))
}

/// The differences that make a checkpoint unusable with `cfg` (model shape or components).
fn incompatibilities(saved: &Config, cfg: &Config) -> Vec<String> {
    let a = toml::Value::try_from(saved).unwrap();
    let b = toml::Value::try_from(cfg).unwrap();
    let mut diffs = Vec::new();
    for section in ["model", "router", "experts", "balance_loss", "optimizer", "comm", "shared"] {
        let (x, y) = (a.get(section), b.get(section));
        if x != y {
            let show = |v: Option<&toml::Value>| {
                v.map(|v| v.to_string().replace('\n', " ")).unwrap_or_else(|| "absent".into())
            };
            match (x.and_then(|v| v.as_table()), y.and_then(|v| v.as_table())) {
                (Some(tx), Some(ty)) => {
                    for k in tx.keys().chain(ty.keys().filter(|k| !tx.contains_key(*k))) {
                        if tx.get(k) != ty.get(k) {
                            diffs.push(format!(
                                "{section}.{k}: checkpoint has {}, config has {}",
                                show(tx.get(k)),
                                show(ty.get(k))
                            ));
                        }
                    }
                }
                _ => diffs.push(format!("{section}: checkpoint has {}, config has {}", show(x), show(y))),
            }
        }
    }
    diffs
}

/// Load a checkpoint into `params` (weights and optimizer state; an expert-parallel rank's
/// slices) after checking it was made with the same model and components. Returns the trainer
/// state.
pub fn load(path: &Path, cfg: &Config, params: &mut Params) -> Result<TrainerState, String> {
    let dir = resolve(path)?;
    let text = read_text(&dir.join("config.toml"))?;
    let saved = Config::parse(&dir.join("config.toml").display().to_string(), &text, &[])?;
    let diffs = incompatibilities(&saved, cfg);
    if !diffs.is_empty() {
        return Err(format!("{}: made with a different config: {}", dir.display(), diffs.join("; ")));
    }
    let state = self::state(&dir)?;
    let (weights, opt) = (Saved::open(&dir, "model")?, Saved::open(&dir, "optimizer")?);
    for p in params.list.iter_mut().filter(|p| p.spec.role != Role::Accumulator) {
        let w = weights.values_for(&p.name, p)?;
        p.w.copy_from_slice(&w);
        for i in 0..p.state.len() {
            let v = opt.values_for(&format!("{}.{}", p.name, p.state[i].0), p)?;
            p.state[i].1.copy_from_slice(&v);
        }
    }
    Ok(state)
}

/// One stored piece of a tensor: the whole of it, or slice `part` of `parts` along dimension 0
/// (an expert-parallel rank's experts), at byte `offset` of file `file`.
struct Piece {
    file: usize,
    offset: usize,
    part: usize,
    parts: usize,
}

/// Whether a file's checksum matched, found on first use.
type Verified = OnceCell<Result<(), String>>;

/// The weight (`model`) or optimizer-state (`optimizer`) files of a checkpoint, memory-mapped:
/// each tensor's whole shape and where its pieces are. A file's checksum is verified the first
/// time a value is read from it.
pub struct Saved {
    /// What errors name: the one file, or the `-rank*` pattern.
    label: String,
    files: Vec<(PathBuf, memmap2::Mmap, Verified)>,
    tensors: BTreeMap<String, (Vec<usize>, Vec<Piece>)>,
}

impl Saved {
    pub fn open(dir: &Path, kind: &str) -> Result<Saved, String> {
        let single = format!("{kind}.safetensors");
        let ranked = |n: &str| n.starts_with(&format!("{kind}-rank")) && n.ends_with(".safetensors");
        let entries = std::fs::read_dir(dir).map_err(io(dir))?;
        let mut names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
        names.retain(|n| *n == single || ranked(n));
        names.sort();
        // A file the checksums name but the directory lacks: a rank's part is missing.
        if let Ok(text) = std::fs::read_to_string(dir.join(CHECKSUMS)) {
            let sums: Checksums = serde_json::from_str(&text).map_err(io(&dir.join(CHECKSUMS)))?;
            if let Some(lost) = sums.keys().find(|n| (**n == single || ranked(n)) && !names.contains(n)) {
                return Err(format!(
                    "{}: missing (listed in {CHECKSUMS}): the checkpoint is incomplete",
                    dir.join(lost).display()
                ));
            }
        }
        let label = match names.as_slice() {
            [one] => dir.join(one).display().to_string(),
            [] => return Err(format!("{}: no {single} (nor {kind}-rank*.safetensors)", dir.display())),
            _ => dir.join(format!("{kind}-rank*.safetensors")).display().to_string(),
        };
        let mut saved = Saved { label, files: Vec::new(), tensors: BTreeMap::new() };
        for name in names {
            let path = dir.join(name);
            let file = std::fs::File::open(&path).map_err(io(&path))?;
            // SAFETY: the file is only read, and a checkpoint is not changed once complete.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(&path))?;
            let (n, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| format!("{}: not a readable safetensors file ({e:?})", path.display()))?;
            let slices = meta.metadata().clone().unwrap_or_default();
            for (tensor, info) in meta.tensors() {
                if info.dtype != Dtype::F32 {
                    return Err(format!("{}: tensor `{tensor}` is {:?}, expected F32", path.display(), info.dtype));
                }
                let bad = || {
                    format!("{}: tensor `{tensor}`: slice {:?} is not `part/parts`", path.display(), slices[&tensor])
                };
                let (part, parts) = match slices.get(&tensor).map(|s| s.split_once('/')) {
                    None => (0, 1),
                    Some(Some((a, b))) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
                    Some(None) => return Err(bad()),
                };
                let mut whole = info.shape.clone();
                match whole.first_mut() {
                    Some(d0) if part < parts => *d0 *= parts,
                    _ if parts == 1 => {}
                    _ => return Err(bad()),
                }
                let piece = Piece { file: saved.files.len(), offset: 8 + n + info.data_offsets.0, part, parts };
                let entry = saved.tensors.entry(tensor.clone()).or_insert_with(|| (whole.clone(), Vec::new()));
                if entry.0 != whole {
                    let s = &entry.0;
                    return Err(format!(
                        "{}: tensor `{tensor}` is {whole:?} whole here, {s:?} in another file",
                        path.display()
                    ));
                }
                entry.1.push(piece);
            }
            saved.files.push((path, map, OnceCell::new()));
        }
        Ok(saved)
    }

    /// The names of the tensors stored.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|k| k.as_str())
    }

    /// The whole shape of tensor `name` (None: not in the checkpoint).
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| &t.0[..])
    }

    /// Rows `rows` (along dimension 0; a scalar has one) of tensor `name`, from whichever files
    /// hold them.
    pub fn rows(&self, name: &str, rows: Range<usize>) -> Result<Vec<f32>, String> {
        let (shape, pieces) =
            self.tensors.get(name).ok_or_else(|| format!("{}: tensor `{name}` is missing", self.label))?;
        let total = shape.first().copied().unwrap_or(1);
        let row = shape.iter().product::<usize>() / total.max(1);
        let mut out = vec![0.0; rows.len() * row];
        let mut found = 0;
        for p in pieces {
            let (first, end) = (p.part * total / p.parts, (p.part + 1) * total / p.parts);
            let (lo, hi) = (first.max(rows.start), end.min(rows.end));
            if lo >= hi {
                continue;
            }
            let (path, map, checked) = &self.files[p.file];
            checked.get_or_init(|| verify(path, map)).clone()?;
            let bytes = &map[p.offset + (lo - first) * row * 4..][..(hi - lo) * row * 4];
            let dst = &mut out[(lo - rows.start) * row..][..(hi - lo) * row];
            for (o, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            found += hi - lo;
        }
        if found != rows.len() {
            return Err(format!("{}: tensor `{name}`: rows {rows:?} are not all there once", self.label));
        }
        Ok(out)
    }

    /// Tensor `name` whole.
    pub fn whole(&self, name: &str) -> Result<Vec<f32>, String> {
        self.rows(name, 0..self.shape(name).and_then(|s| s.first().copied()).unwrap_or(1))
    }

    /// Tensor `name` is there, with the whole shape `need`.
    pub fn check(&self, name: &str, need: &[usize]) -> Result<(), String> {
        match self.shape(name) {
            None => Err(format!("{}: tensor `{name}` is missing", self.label)),
            Some(s) if s != need => {
                Err(format!("{}: tensor `{name}` has shape {s:?}, the model needs {need:?}", self.label))
            }
            Some(_) => Ok(()),
        }
    }

    /// Tensor `name` as `p` holds it (whole, or its expert-parallel slice), after checking the
    /// whole shape against the model's.
    pub fn values_for(&self, name: &str, p: &Param) -> Result<Vec<f32>, String> {
        let need = p.full_shape();
        self.check(name, &need)?;
        let (total, (part, parts)) =
            (need.first().copied().unwrap_or(1), p.shard.map_or((0, 1), |s| (s.part, s.parts)));
        self.rows(name, part * total / parts..(part + 1) * total / parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor of 4 experts × 3 stored as two ranks' halves (and a whole one) reads back whole,
    /// by rows across the halves, and fails loudly when a half is gone or corrupted.
    #[test]
    fn slices_in_several_files_read_back_as_one_tensor() {
        let dir = std::env::temp_dir().join(format!("pith-saved-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let whole: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        let bias = [7.0f32, 8.0];
        let half = |part: usize| (String::from("w"), &whole[part * 6..][..6], vec![2, 3], Some(format!("{part}/2")));
        let files = [
            ("model-rank00000.safetensors", vec![half(0), ("b".into(), &bias[..], vec![2], None)]),
            ("model-rank00001.safetensors", vec![half(1)]),
        ];
        let mut sums = Checksums::new();
        for (name, tensors) in files {
            write_tensors(&dir.join(name), tensors).unwrap();
            sums.insert(name.into(), checksum(&dir.join(name)).unwrap());
        }
        std::fs::write(dir.join(CHECKSUMS), serde_json::to_string(&sums).unwrap()).unwrap();

        let saved = Saved::open(&dir, "model").unwrap();
        assert_eq!(saved.shape("w"), Some(&[4, 3][..]));
        assert_eq!(saved.whole("w").unwrap(), whole);
        assert_eq!(saved.rows("w", 1..3).unwrap(), whole[3..9], "rows 1..3 span both files");
        assert_eq!(saved.whole("b").unwrap(), bias);
        let e = saved.whole("x").unwrap_err();
        assert!(e.ends_with("model-rank*.safetensors: tensor `x` is missing"), "{e}");

        // A flipped byte in rank 1's file: reading rank 0's rows still works, rank 1's do not.
        let f1 = dir.join("model-rank00001.safetensors");
        let mut bytes = std::fs::read(&f1).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&f1, bytes).unwrap();
        let saved = Saved::open(&dir, "model").unwrap();
        assert_eq!(saved.rows("w", 0..2).unwrap(), whole[..6]);
        assert!(saved.rows("w", 2..4).unwrap_err().contains("corrupted"));

        // Rank 1's file gone: the checksums still list it, so opening says the checkpoint is incomplete.
        std::fs::remove_file(&f1).unwrap();
        let e = Saved::open(&dir, "model").err().unwrap();
        assert!(e.contains("model-rank00001.safetensors: missing") && e.contains("incomplete"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
