//! Checkpoints: `<run>/checkpoints/step_NNNNNNNN/` holding `model.safetensors` (weights),
//! `optimizer.safetensors` (state tensors named `<param>.<state>`), `trainer.json` (step, data
//! position, plugin-api version), `config.toml` (the resolved config) and `checksums.json` (the
//! length and CRC-32 of each of those files, verified whenever one is read back). A checkpoint
//! is written into a `.tmp` directory and renamed, so a crash never leaves half of one; a stale
//! `.tmp` (or the `.old` of an interrupted replacement) is tidied by [`recover`].

use crate::config::Config;
use crate::params::Params;
use pith_plugin_api::Role;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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

/// (name, data, shape) of one tensor to write.
type Named<'a> = (String, &'a [f32], Vec<usize>);

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
    let views: Vec<(String, TensorView)> = tensors
        .into_iter()
        .map(|(n, d, s)| Ok((n, TensorView::new(Dtype::F32, s, bytes_of(d)).map_err(|e| e.to_string())?)))
        .collect::<Result<_, String>>()?;
    safetensors::serialize_to_file(views, &None, path).map_err(|e| match e {
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

/// Write the checkpoint for `state.step`. An existing checkpoint of the same step is replaced
/// only after the new one is complete on disk; a failed write (disk full) leaves no `.tmp`.
pub fn save(run: &Path, cfg: &Config, params: &Params, state: &TrainerState) -> Result<PathBuf, String> {
    let dir = step_dir(run, state.step);
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    write_all(&tmp, cfg, params, state).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&tmp);
    })?;
    if dir.exists() {
        let old = dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(&dir, &old).map_err(io(&dir))?;
        std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    }
    Ok(dir)
}

/// The files of one checkpoint into `tmp`, checksums last.
fn write_all(tmp: &Path, cfg: &Config, params: &Params, state: &TrainerState) -> Result<(), String> {
    std::fs::create_dir_all(tmp).map_err(io(tmp))?;
    let shape = |p: &crate::params::Param| p.spec.shape.iter().map(|&d| d as usize).collect::<Vec<_>>();
    // Parameters and buffers; accumulators live for one step and are not saved.
    let saved = params.list.iter().filter(|p| p.spec.role != Role::Accumulator);
    write_tensors(&tmp.join("model.safetensors"), saved.map(|p| (p.name.clone(), &p.w[..], shape(p))).collect())?;
    let states = params
        .list
        .iter()
        .flat_map(|p| p.state.iter().map(move |(s, v)| (format!("{}.{s}", p.name), &v[..], shape(p))))
        .collect();
    write_tensors(&tmp.join("optimizer.safetensors"), states)?;
    let json = serde_json::to_string_pretty(state).unwrap();
    std::fs::write(tmp.join("trainer.json"), json).map_err(io(tmp))?;
    std::fs::write(tmp.join("config.toml"), cfg.to_toml()).map_err(io(tmp))?;
    let mut sums = Checksums::new();
    for name in ["model.safetensors", "optimizer.safetensors", "trainer.json", "config.toml"] {
        let path = tmp.join(name);
        sums.insert(name.to_string(), checksum(&path).map_err(io(&path))?);
    }
    std::fs::write(tmp.join(CHECKSUMS), serde_json::to_string_pretty(&sums).unwrap()).map_err(io(tmp))
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

/// Load a checkpoint into `params` (weights and optimizer state) after checking it was made
/// with the same model and components. Returns the trainer state.
pub fn load(path: &Path, cfg: &Config, params: &mut Params) -> Result<TrainerState, String> {
    let dir = resolve(path)?;
    let text = read_text(&dir.join("config.toml"))?;
    let saved = Config::parse(&dir.join("config.toml").display().to_string(), &text, &[])?;
    let diffs = incompatibilities(&saved, cfg);
    if !diffs.is_empty() {
        return Err(format!("{}: made with a different config: {}", dir.display(), diffs.join("; ")));
    }
    let state = self::state(&dir)?;
    let weights = read_tensors(&dir.join("model.safetensors"))?;
    let opt = read_tensors(&dir.join("optimizer.safetensors"))?;
    // Whole tensors; an expert-parallel rank takes its slice of the experts'.
    for p in params.list.iter_mut().filter(|p| p.spec.role != Role::Accumulator) {
        let shape = p.full_shape();
        let (s, w) =
            weights.get(&p.name).ok_or_else(|| format!("{}: tensor `{}` is missing", dir.display(), p.name))?;
        if *s != shape {
            return Err(format!("{}: tensor `{}` has shape {s:?}, the model needs {shape:?}", dir.display(), p.name));
        }
        let w = p.slice_of(w).to_vec();
        p.w.copy_from_slice(&w);
        for i in 0..p.state.len() {
            let key = format!("{}.{}", p.name, p.state[i].0);
            let (s, sv) =
                opt.get(&key).ok_or_else(|| format!("{}: optimizer state `{key}` is missing", dir.display()))?;
            if *s != shape {
                return Err(format!("{}: optimizer state `{key}` has shape {s:?}, expected {shape:?}", dir.display()));
            }
            let sv = p.slice_of(sv).to_vec();
            p.state[i].1.copy_from_slice(&sv);
        }
    }
    Ok(state)
}
