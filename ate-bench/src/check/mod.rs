//! The checks: each reads a working copy (and runs `pith` in it where it must) and says PASS or
//! FAIL with reasons. Nothing here knows a line number: citations are verified against the code
//! of the working copy, by regex and by function span.
//!
//! What lives where:
//! - `mod.rs` (this file): the `[check]` table of `meta.toml` ([`Check`]), how checks run ([`Env`]),
//!   their result ([`Outcome`]), the dispatch ([`run`]), and helpers every kind shares: reading
//!   ANSWER.md, a run's metrics and config, running `pith`, scratch directories, copying trees.
//! - `qa.rs`: Q&A checks: `path:line` citations in ANSWER.md verified by pattern and function span.
//! - `operate.rs`: operate checks: metrics at a step, resume, a config change, `pith plan`, a routing
//!   trace, a Hugging Face export (optionally of a run trained on the GPU); and the parsing of
//!   numbers out of ANSWER.md.
//! - `gpu.rs`: whether a CUDA GPU is here (every `needs_gpu` task asks first and FAILS with
//!   "needs a CUDA GPU" without one), and the kernel-profile check (`pith bench --profile`).
//! - `feature.rs`: New-Feature checks: build a plugin crate standalone, `pith plugins check`, a
//!   quickstart run with it, and the task's rules on its metrics, checkpoint state and plan.
//! - `safetensors.rs`: a minimal safetensors reader (routing traces, checkpoints).
//! - `reference.rs`: reference solutions, fresh working copies and `selftest`.

pub mod feature;
pub mod gpu;
pub mod operate;
pub mod qa;
pub mod reference;
pub mod safetensors;

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Deserialize, Debug)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Check {
    /// Q&A: ANSWER.md cites `path:line` for each requirement.
    Cite {
        cite: Vec<qa::Cite>,
        #[serde(default)]
        must_mention: Vec<String>,
    },
    /// `<run>/metrics.jsonl` has `step` with a finite loss, and ANSWER.md reports it.
    MetricsStep { run: String, step: u64 },
    /// `<full>` trained `steps` steps with a checkpoint at `resume_at`; `<resumed>` continued from it.
    Resume { full: String, resumed: String, steps: u64, resume_at: u64 },
    /// `<run>/config.toml` has `key = value` and ≥ `min_steps` steps; ANSWER.md reports the last `metric`.
    ConfigChange { run: String, key: String, value: toml::Value, min_steps: u64, metric: String },
    /// ANSWER.md's `total:` and `active:` equal the `all` row of `pith plan CONFIG --set ...`.
    Plan { config: String, set: Vec<String> },
    /// `<trace>` is pith's routing trace (`--trace-routing`) of the first `tokens` tokens of `config`
    /// (identical to a re-run made here); ANSWER.md's `expert:` is the expert of layer `layer` that
    /// received the most of those tokens and `count:` how many.
    RoutingTrace { trace: String, config: String, tokens: usize, layer: usize },
    /// `<run>`'s newest checkpoint is step `steps` and `<export>` is its Hugging Face export:
    /// config.json + weights; `pith import hf` accepts it; `pith eval-logits` of the export, of the
    /// re-import and of the checkpoint agree on `tokens` to `tol`; ANSWER.md reports that loss.
    /// With `device`, `<run>/config.toml` (the resolved config pith wrote) trained on it.
    ExportHf {
        run: String,
        export: String,
        steps: u64,
        tokens: Vec<u32>,
        tol: f64,
        #[serde(default)]
        device: Option<String>,
    },
    /// ANSWER.md's `name: P%` lines are the `top` ops with the most GPU time in one step of
    /// `pith bench CONFIG --set ... --profile`, run here (up to `runs` times: one agreeing profile
    /// is enough), heaviest first; swaps between ops within `within` (relative) of each other are
    /// allowed, and each percent must be within `pct_tol` points + `within` × the measured share.
    Profile {
        config: String,
        #[serde(default)]
        set: Vec<String>,
        top: usize,
        within: f64,
        pct_tol: f64,
        runs: usize,
    },
    /// A plugin in `plugins/<name>/`, with the rules of the task.
    Plugin(Box<feature::PluginCheck>),
    /// Cannot run here: needs a GPU or a host feature that does not exist yet.
    Unavailable { missing: String },
}

/// How checks run: which pith, where plugins build, and (for the harness's own tests) overrides
/// that make training runs small.
#[derive(Clone, Default)]
pub struct Env {
    pub pith: Option<PathBuf>,
    pub target_dir: Option<PathBuf>,
    pub extra_set: Vec<String>,
    pub steps: Option<u64>,
}

impl Env {
    /// From PITH_BIN, ATE_TARGET_DIR, ATE_CHECK_SET (space-separated `key=value`), ATE_CHECK_STEPS.
    pub fn from_env() -> Env {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Env {
            pith: var("PITH_BIN").map(PathBuf::from),
            target_dir: var("ATE_TARGET_DIR").map(PathBuf::from),
            extra_set: var("ATE_CHECK_SET")
                .map(|s| s.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            steps: var("ATE_CHECK_STEPS").and_then(|s| s.parse().ok()),
        }
    }
}

#[derive(Default)]
pub struct Outcome {
    pub notes: Vec<String>,
    pub fails: Vec<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.fails.is_empty()
    }
    fn rule(&mut self, ok: bool, what: String) {
        if ok {
            self.notes.push(format!("ok: {what}"));
        } else {
            self.fails.push(what);
        }
    }
}

pub fn run(task: &crate::Task, dir: &Path) -> Outcome {
    run_with(task, dir, &Env::from_env())
}

pub fn run_with(task: &crate::Task, dir: &Path, env: &Env) -> Outcome {
    let mut o = Outcome::default();
    if task.meta.needs_gpu {
        // Without a GPU the task cannot have been done here, nor re-measured: say so, not more.
        if let Err(e) = pith_bin(dir, env).and_then(|p| gpu::probe(&p, dir)) {
            o.fails.push(e);
            return o;
        }
        o.notes.push(
            "ok: a CUDA GPU is here (`pith plugins check adamw --device cuda` did not refuse for want of one)".into(),
        );
    }
    if let Err(e) = check(&task.meta.check, dir, env, &mut o) {
        o.fails.push(e);
    }
    o
}

fn check(c: &Check, dir: &Path, env: &Env, o: &mut Outcome) -> Result<(), String> {
    match c {
        Check::Cite { cite, must_mention } => qa::check(cite, must_mention, dir, o),
        Check::MetricsStep { run, step } => operate::metrics_step(run, *step, dir, o),
        Check::Resume { full, resumed, steps, resume_at } => operate::resume(full, resumed, *steps, *resume_at, dir, o),
        Check::ConfigChange { run, key, value, min_steps, metric } => {
            operate::config_change(run, key, value, *min_steps, metric, dir, o)
        }
        Check::Plan { config, set } => operate::plan(config, set, dir, env, o),
        Check::RoutingTrace { trace, config, tokens, layer } => {
            operate::routing_trace(trace, config, *tokens, *layer, dir, env, o)
        }
        Check::ExportHf { run, export, steps, tokens, tol, device } => {
            operate::export_hf(run, export, *steps, tokens, *tol, device.as_deref(), dir, env, o)
        }
        Check::Profile { config, set, top, within, pct_tol, runs } => {
            gpu::profile(config, set, *top, *within, *pct_tol, *runs, dir, env, o)
        }
        Check::Plugin(p) => feature::check(p, dir, env, o),
        Check::Unavailable { missing } => Err(format!("not runnable here: {missing}")),
    }
}

// ---------- reading the working copy and its runs ----------

fn answer(dir: &Path) -> Result<String, String> {
    std::fs::read_to_string(dir.join("ANSWER.md")).map_err(|_| "no ANSWER.md in the working copy".to_string())
}

/// Every line of `<run>/metrics.jsonl`.
fn metrics(run: &Path) -> Result<Vec<serde_json::Value>, String> {
    let p = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: {e}", p.display())))
        .collect()
}

/// `<run>/checkpoints/step_NNNNNNNN` with the highest step.
fn newest_checkpoint(run: &Path) -> Result<PathBuf, String> {
    let d = run.join("checkpoints");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
        .map_err(|e| format!("{}: {e}", d.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step_") && !n.to_string_lossy().contains('.'))
        })
        .collect();
    v.sort();
    v.pop().ok_or(format!("no checkpoint under {}", d.display()))
}

fn read_toml(p: &Path) -> Result<toml::Table, String> {
    let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
}

/// The value at dotted `key` (`model.layers`) of a TOML table.
fn lookup<'a>(t: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let (first, rest) = key.split_once('.').unwrap_or((key, ""));
    let v = t.get(first)?;
    if rest.is_empty() {
        return Some(v);
    }
    lookup(v.as_table()?, rest)
}

/// The integer at dotted `key`, 0 if there is none.
fn int_at(t: &toml::Table, key: &str) -> i64 {
    lookup(t, key).and_then(|v| v.as_integer()).unwrap_or(0)
}

/// Every file under `p`, recursively, skipping `target/` and `.git/`.
fn walk(p: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(p) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() && name != "target" && name != ".git" {
            walk(&p, out);
        } else if p.is_file() {
            out.push(p);
        }
    }
}

// ---------- running pith ----------

/// The pith binary: PITH_BIN, else `<dir>/target/release/pith`, built if missing.
pub fn pith_bin(dir: &Path, env: &Env) -> Result<PathBuf, String> {
    if let Some(p) = &env.pith {
        return Ok(p.clone());
    }
    let p = dir.join("target/release/pith");
    if !p.is_file() {
        let st = Command::new(cargo())
            .args(["build", "--release", "--quiet", "-p", "pith", "--manifest-path"])
            .arg(dir.join("Cargo.toml"))
            .status()
            .map_err(|e| format!("cargo: {e}"))?;
        if !st.success() {
            return Err(format!("cargo build --release -p pith failed in {}", dir.display()));
        }
    }
    Ok(p)
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Run pith in `dir` (plugin search path cleared); returns (exit code, stdout + stderr).
fn run_pith(pith: &Path, dir: &Path, args: &[String]) -> Result<(i32, String), String> {
    let o = Command::new(pith)
        .args(args)
        .current_dir(dir)
        .env("PITH_PLUGIN_PATH", "")
        .output()
        .map_err(|e| format!("{}: {e}", pith.display()))?;
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    Ok((o.status.code().unwrap_or(-1), text))
}

/// Append `--set S` to `args` for each override.
fn push_sets<'a>(args: &mut Vec<String>, sets: impl IntoIterator<Item = &'a String>) {
    for s in sets {
        args.extend(["--set".into(), s.clone()]);
    }
}

/// The row of `pith plan` output whose first word is `group`: [group, total, active].
fn plan_row<'a>(out: &'a str, group: &str) -> Option<Vec<&'a str>> {
    out.lines().map(|l| l.split_whitespace().collect::<Vec<_>>()).find(|w| w.len() == 3 && w[0] == group)
}

/// The last `n` lines of `text`, in order.
fn tail(text: &str, n: usize) -> Vec<&str> {
    let mut v: Vec<&str> = text.lines().rev().take(n).collect();
    v.reverse();
    v
}

// ---------- scratch space ----------

/// A fresh, empty directory under the system temp dir.
fn scratch(tag: &str) -> Result<PathBuf, String> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let d = std::env::temp_dir().join(format!("ate-bench-{}-{tag}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    Ok(d)
}

/// Copy the tree `src` to `dst`, skipping entries named in `skip` at any depth.
fn copy_dir(src: &Path, dst: &Path, skip: &[&str]) -> Result<(), String> {
    std::fs::create_dir_all(dst).map_err(|e| format!("{}: {e}", dst.display()))?;
    for e in std::fs::read_dir(src).map_err(|e| format!("{}: {e}", src.display()))?.flatten() {
        let name = e.file_name();
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        let (s, d) = (e.path(), dst.join(&name));
        if s.is_dir() {
            copy_dir(&s, &d, skip)?;
        } else {
            std::fs::copy(&s, &d).map_err(|e| format!("{}: {e}", s.display()))?;
        }
    }
    Ok(())
}
