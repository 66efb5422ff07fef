//! The run directory a training run writes (`train.out`): `metrics.jsonl`, `config.toml`,
//! `checkpoints/`. A run holds its directory for as long as it lives: an advisory lock on
//! `<out>/.lock` that the OS releases when the process ends, so two runs never mix and a crashed
//! run never leaves the directory stuck. Opening it refuses, before anything is written, every
//! way a run could overwrite or mix with another's files (docs/reliability.md).

use crate::checkpoint;
use std::fs::{File, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct RunDir {
    pub path: PathBuf,
    _lock: File,
}

/// What a directory holds that only Pith writes: a directory with none of these and other files
/// in it (the current directory, say) is not a run and is never written into.
const MARKERS: [&str; 3] = [".lock", "checkpoints", "metrics.jsonl"];

impl RunDir {
    /// Take `out` (`at`: file:line of `train.out`) for a fresh run, or for one resumed from the
    /// checkpoint `resume` (a step directory or a run directory).
    pub fn open(out: &Path, at: &str, resume: Option<&Path>) -> Result<RunDir, String> {
        let shown = out.display();
        if out.as_os_str().is_empty() {
            return Err(format!("{at}: train.out is empty; name a run directory, e.g. train.out = \"runs/my-run\""));
        }
        if out.exists() && !out.is_dir() {
            return Err(format!("{at}: train.out = {shown} is a file, not a directory"));
        }
        if let Ok(entries) = std::fs::read_dir(out) {
            let names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
            if !names.is_empty() && !names.iter().any(|n| MARKERS.contains(&n.as_str())) {
                return Err(format!(
                    "{at}: train.out = {shown} holds other files ({}) and is not a Pith run directory; \
                     choose a new or empty directory",
                    names.join(", ")
                ));
            }
        }
        std::fs::create_dir_all(out).map_err(|e| format!("{at}: train.out = {shown}: {e}"))?;
        let lock_path = out.join(".lock");
        let lock = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let pid = std::fs::read_to_string(&lock_path).unwrap_or_default();
                return Err(format!(
                    "{shown}: another pith run (pid {}) is writing to this directory; wait for it to end \
                     or choose another --set train.out=...",
                    pid.trim()
                ));
            }
            Err(TryLockError::Error(e)) => return Err(format!("{}: cannot lock: {e}", lock_path.display())),
        }
        lock.set_len(0).and_then(|_| write!(&lock, "{}", std::process::id())).map_err(|e| format!("{shown}: {e}"))?;
        for line in checkpoint::recover(out)? {
            tracing::warn!("{line}");
        }
        let held = checkpoint::steps(out);
        let steps = |v: &[u64]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ");
        match resume {
            None if !held.is_empty() => {
                return Err(format!(
                "{shown}: this run directory already holds checkpoints (steps {}); continue it with --resume {shown} \
                     or choose another --set train.out=...",
                steps(&held)
            ))
            }
            None => {}
            Some(r) => {
                let from = checkpoint::resolve(r)?;
                let step = checkpoint::state(&from)?.step;
                let same_run = same_dir(from.parent().and_then(Path::parent), out);
                if !same_run && !held.is_empty() {
                    return Err(format!(
                        "{shown}: holds the checkpoints of another run (steps {}); resuming {} into it would \
                         overwrite them; choose a new --set train.out=...",
                        steps(&held),
                        from.display()
                    ));
                }
                let later: Vec<u64> = held.iter().copied().filter(|&s| s > step).collect();
                if !later.is_empty() {
                    return Err(format!(
                        "{shown}: resuming from step {step} would overwrite this run's later checkpoints (steps {}); \
                         continue from the newest with --resume {shown}, or branch into a new directory with \
                         --set train.out=...",
                        steps(&later)
                    ));
                }
            }
        }
        Ok(RunDir { path: out.to_path_buf(), _lock: lock })
    }

    /// Keep the rows of `metrics.jsonl` up to `step` (those after it belong to steps that a
    /// crash lost and the run is about to redo); a fresh run (`step` 0) starts an empty file.
    pub fn trim_metrics(&self, step: u64) -> Result<(), String> {
        let path = self.path.join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
        let keep: Vec<&str> = text
            .lines()
            .filter(|l| {
                let row: Option<serde_json::Value> = serde_json::from_str(l).ok();
                row.and_then(|r| r["step"].as_u64()).is_some_and(|s| s <= step)
            })
            .collect();
        let dropped = text.lines().count() - keep.len();
        if dropped == 0 {
            return Ok(());
        }
        let tmp = path.with_extension("jsonl.tmp");
        let body: String = keep.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        tracing::info!(
            "{}: dropped {dropped} rows after step {step} (from an earlier, interrupted run)",
            path.display()
        );
        Ok(())
    }
}

fn same_dir(a: Option<&Path>, b: &Path) -> bool {
    match (a.and_then(|a| a.canonicalize().ok()), b.canonicalize().ok()) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}
