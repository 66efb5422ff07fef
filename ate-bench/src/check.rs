//! The checks: each reads a working copy (and runs `pith` in it where it must) and says PASS or
//! FAIL with reasons. Nothing here knows a line number: citations are verified against the code
//! of the working copy, by regex and by function span.

use crate::re::Re;
use crate::{bench_dir, repo_dir, Task};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Deserialize, Debug)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Check {
    /// Q&A: ANSWER.md cites `path:line` for each requirement.
    Cite {
        cite: Vec<Cite>,
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
    ExportHf { run: String, export: String, steps: u64, tokens: Vec<u32>, tol: f64 },
    /// A plugin in `plugins/<name>/`, with the rules of the task.
    Plugin(Box<PluginCheck>),
    /// Cannot run here: needs a GPU or a host feature that does not exist yet.
    Unavailable { missing: String },
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Cite {
    pub what: String,
    /// A repo-relative path, or a prefix of one (`host/src/data` matches `host/src/data/mod.rs`).
    pub file: String,
    /// The cited line, or one within ±window of it, matches this (regex subset, see re.rs).
    #[serde(default)]
    pub pattern: Option<String>,
    /// The cited line lies inside `fn <function>`'s body.
    #[serde(default)]
    pub function: Option<String>,
    #[serde(default = "default_window")]
    pub window: usize,
}
fn default_window() -> usize {
    3
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct PluginCheck {
    /// The component name, also its crate directory `plugins/<name>`.
    pub name: String,
    /// router | experts | balance_loss | optimizer
    pub table: String,
    /// balance_loss only: the quickstart entry the plugin replaces (else it is appended).
    #[serde(default)]
    pub replace: Option<String>,
    /// The component table for the training run (without `plugin`).
    #[serde(default)]
    pub config: toml::Table,
    /// Extra `--set` overrides for every training run (e.g. a learning rate that suits the plugin).
    #[serde(default)]
    pub set: Vec<String>,
    /// Config keys the plugin's source must accept.
    #[serde(default)]
    pub required_keys: Vec<String>,
    /// `pith plugins check NAME --config C` must exit non-zero and name the key, for each C.
    #[serde(default)]
    pub bad_configs: Vec<String>,
    /// Metrics every step line of the main run must report, within bounds.
    #[serde(default)]
    pub metrics: Vec<Bound>,
    /// Extra short runs with `--set` overrides and bounds on a metric.
    #[serde(default)]
    pub variants: Vec<Variant>,
    /// lhs = factor · (layers if times_layers) · rhs on every line, to rel_tol.
    #[serde(default)]
    pub relation: Option<Relation>,
    /// Optimizer: the state tensors per parameter in the checkpoint.
    #[serde(default)]
    pub state_names: Option<Vec<String>>,
    /// `pith plan`: total of `group` = factor · layers · experts · hidden · expert_ffn.
    #[serde(default)]
    pub plan_group: Option<PlanGroup>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Bound {
    pub name: String,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub set: Vec<String>,
    #[serde(default = "default_variant_steps")]
    pub steps: u64,
    pub bound: Bound,
}
fn default_variant_steps() -> u64 {
    8
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Relation {
    pub lhs: String,
    pub rhs: String,
    pub factor: f64,
    #[serde(default)]
    pub times_layers: bool,
    pub rel_tol: f64,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct PlanGroup {
    pub group: String,
    pub factor: usize,
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

pub fn run(task: &Task, dir: &Path) -> Outcome {
    run_with(task, dir, &Env::from_env())
}

pub fn run_with(task: &Task, dir: &Path, env: &Env) -> Outcome {
    let mut o = Outcome::default();
    if let Err(e) = check(&task.meta.check, dir, env, &mut o) {
        o.fails.push(e);
    }
    o
}

fn check(c: &Check, dir: &Path, env: &Env, o: &mut Outcome) -> Result<(), String> {
    match c {
        Check::Cite { cite, must_mention } => check_cite(cite, must_mention, dir, o),
        Check::MetricsStep { run, step } => {
            let lines = metrics(&dir.join(run))?;
            let line = lines.iter().find(|l| l["step"].as_u64() == Some(*step));
            let loss =
                line.and_then(|l| l["loss"].as_f64()).ok_or(format!("{run}/metrics.jsonl has no step {step}"))?;
            o.rule(loss.is_finite(), format!("loss at step {step} is finite ({loss})"));
            let ans = answer(dir)?;
            o.rule(reports(&ans, loss, 5e-4), format!("ANSWER.md reports the step-{step} loss {loss:.4}"));
            Ok(())
        }
        Check::Resume { full, resumed, steps, resume_at } => {
            let (a, b) = (metrics(&dir.join(full))?, metrics(&dir.join(resumed))?);
            let steps_of = |v: &[serde_json::Value]| v.iter().filter_map(|l| l["step"].as_u64()).collect::<Vec<_>>();
            o.rule(
                steps_of(&a) == (1..=*steps).collect::<Vec<_>>(),
                format!("{full} logged steps 1..={steps} once each"),
            );
            let ckpt = dir.join(full).join(format!("checkpoints/step_{resume_at:08}"));
            o.rule(ckpt.join("model.safetensors").is_file(), format!("{full} has a checkpoint at step {resume_at}"));
            o.rule(
                steps_of(&b) == (resume_at + 1..=*steps).collect::<Vec<_>>(),
                format!("{resumed} logged exactly steps {}..={steps} (a resumed run, not a fresh one)", resume_at + 1),
            );
            let loss = |v: &[serde_json::Value], s: u64| {
                v.iter().find(|l| l["step"].as_u64() == Some(s)).map(|l| l["loss"].to_string())
            };
            let same = (resume_at + 1..=*steps).all(|s| loss(&a, s).is_some() && loss(&a, s) == loss(&b, s));
            o.rule(same, format!("losses of steps {}..={steps} are identical in both runs", resume_at + 1));
            let ans = answer(dir)?.to_lowercase();
            o.rule(ans.contains("identical"), "ANSWER.md says whether the losses are identical".into());
            Ok(())
        }
        Check::ConfigChange { run, key, value, min_steps, metric } => {
            let cfg = read_toml(&dir.join(run).join("config.toml"))?;
            let got = lookup(&cfg, key);
            o.rule(got == Some(value), format!("{run}/config.toml has {key} = {value} (got {got:?})"));
            let steps = lookup(&cfg, "train.steps").and_then(|v| v.as_integer()).unwrap_or(0) as u64;
            o.rule(steps >= *min_steps, format!("{run} trained ≥ {min_steps} steps (train.steps = {steps})"));
            let lines = metrics(&dir.join(run))?;
            let last = lines.last().ok_or(format!("{run}/metrics.jsonl is empty"))?;
            o.rule(last["step"].as_u64() == Some(steps), format!("{run} finished (last step {})", last["step"]));
            let v = last[metric.as_str()].as_f64().ok_or(format!("the last line has no `{metric}`"))?;
            o.rule(reports(&answer(dir)?, v, 1e-3), format!("ANSWER.md reports the final {metric} {v:.4}"));
            Ok(())
        }
        Check::Plan { config, set } => {
            let pith = pith_bin(dir, env)?;
            let mut args = vec!["plan".to_string(), config.clone()];
            set.iter().for_each(|s| args.extend(["--set".into(), s.clone()]));
            let (code, out) = run_pith(&pith, dir, &args)?;
            if code != 0 {
                return Err(format!("`pith {}` failed: {out}", args.join(" ")));
            }
            let all = out
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|w| w.len() == 3 && w[0] == "all")
                .ok_or("`pith plan` printed no `all` row")?;
            let ans = answer(dir)?;
            for (label, want) in [("total", all[1]), ("active", all[2])] {
                let got = ans.lines().find(|l| l.to_lowercase().contains(label)).and_then(first_int);
                o.rule(
                    got.map(|g| g.to_string()) == Some(want.to_string()),
                    format!("ANSWER.md `{label}:` is {want} (got {got:?})"),
                );
            }
            Ok(())
        }
        Check::RoutingTrace { trace, config, tokens, layer } => {
            check_routing_trace(trace, config, *tokens, *layer, dir, env, o)
        }
        Check::ExportHf { run, export, steps, tokens, tol } => {
            check_export_hf(run, export, *steps, tokens, *tol, dir, env, o)
        }
        Check::Plugin(p) => check_plugin(p, dir, env, o),
        Check::Unavailable { missing } => Err(format!("not runnable here: {missing}")),
    }
}

// ---------- Q&A ----------

/// `path:line` citations in an answer (backticks, `./` and `#L` forms allowed).
pub fn citations(text: &str) -> Vec<(String, usize)> {
    let cs: Vec<char> = text.chars().collect();
    let pathy = |c: char| c.is_ascii_alphanumeric() || "_./-".contains(c);
    let mut out = Vec::new();
    for i in 0..cs.len() {
        let sep = cs[i] == ':' || (cs[i] == '#' && cs.get(i + 1) == Some(&'L'));
        if !sep {
            continue;
        }
        let ds = i + if cs[i] == '#' { 2 } else { 1 };
        let digits: String = cs[ds.min(cs.len())..].iter().take_while(|c| c.is_ascii_digit()).collect();
        let mut s = i;
        while s > 0 && pathy(cs[s - 1]) {
            s -= 1;
        }
        let path: String = cs[s..i].iter().collect();
        let path = path.trim_start_matches("./").to_string();
        if let (Ok(line), true) = (digits.parse::<usize>(), path.contains('.') && path.contains('/')) {
            out.push((path, line));
        }
    }
    out
}

/// The 1-based line range of `fn name`'s body in `lines`, if there is one.
pub fn fn_span(lines: &[&str], name: &str) -> Option<(usize, usize)> {
    let open = [format!("fn {name}("), format!("fn {name}<")];
    let start = lines.iter().position(|l| open.iter().any(|o| l.contains(o.as_str())))?;
    let mut depth = 0i64;
    let mut seen = false;
    for (i, l) in lines.iter().enumerate().skip(start) {
        let code = l.split("//").next().unwrap_or("");
        let mut in_str = false;
        let mut prev = ' ';
        for c in code.chars() {
            match c {
                '"' if prev != '\\' && prev != '\'' => in_str = !in_str,
                '{' if !in_str && prev != '\'' => {
                    depth += 1;
                    seen = true;
                }
                '}' if !in_str && prev != '\'' => depth -= 1,
                _ => {}
            }
            prev = c;
        }
        if seen && depth <= 0 {
            return Some((start + 1, i + 1));
        }
    }
    None
}

/// Does the cited `line` of `text` satisfy `c`? Err says why not.
fn cite_ok(c: &Cite, text: &str, line: usize) -> Result<(), String> {
    let lines: Vec<&str> = text.lines().collect();
    if line == 0 || line > lines.len() {
        return Err(format!("line {line} is past the end ({} lines)", lines.len()));
    }
    if let Some(f) = &c.function {
        let (a, b) = fn_span(&lines, f).ok_or(format!("no `fn {f}` in the file"))?;
        if line < a || line > b {
            return Err(format!("line {line} is outside fn {f} (lines {a}-{b})"));
        }
    }
    if let Some(p) = &c.pattern {
        let re = Re::new(p)?;
        let (lo, hi) = (line.saturating_sub(c.window).max(1), (line + c.window).min(lines.len()));
        if !(lo..=hi).any(|i| re.is_match(lines[i - 1])) {
            return Err(format!("no line within ±{} of {line} matches `{p}`", c.window));
        }
    }
    Ok(())
}

fn file_matches(c: &Cite, path: &str) -> bool {
    path == c.file
        || (path.starts_with(&c.file) && (c.file.ends_with('/') || path[c.file.len()..].starts_with(['/', '.'])))
}

fn check_cite(cites: &[Cite], must: &[String], dir: &Path, o: &mut Outcome) -> Result<(), String> {
    let ans = answer(dir)?;
    let cs = citations(&ans);
    let limit = 2 * cites.len() + 1;
    if cs.is_empty() {
        return Err("ANSWER.md cites no `path:line`".into());
    }
    o.rule(cs.len() <= limit, format!("at most {limit} citations (found {})", cs.len()));
    for c in cites {
        let mut why = Vec::new();
        let mut hit = None;
        for (path, line) in cs.iter().filter(|(p, _)| file_matches(c, p)) {
            match std::fs::read_to_string(dir.join(path)) {
                Err(e) => why.push(format!("{path}: {e}")),
                Ok(text) => match cite_ok(c, &text, *line) {
                    Ok(()) => hit = Some(format!("{path}:{line}")),
                    Err(e) => why.push(format!("{path}:{line}: {e}")),
                },
            }
            if hit.is_some() {
                break;
            }
        }
        let detail = match (&hit, why.is_empty()) {
            (Some(h), _) => format!(" ({h})"),
            (None, true) => format!(" (no citation in {})", c.file),
            (None, false) => format!(" ({})", why.join("; ")),
        };
        o.rule(hit.is_some(), format!("cites {}{detail}", c.what));
    }
    let low = ans.to_lowercase();
    for m in must {
        o.rule(low.contains(&m.to_lowercase()), format!("ANSWER.md mentions `{m}`"));
    }
    Ok(())
}

/// Where requirement `c` is satisfied in `dir` (the first match in file order): for reference answers.
pub fn locate(c: &Cite, dir: &Path) -> Option<String> {
    let mut files = Vec::new();
    walk(&dir.join(Path::new(&c.file).parent().unwrap_or(Path::new(""))), &mut files);
    files.sort();
    for f in files {
        let rel = f.strip_prefix(dir).ok()?.to_string_lossy().into_owned();
        if !file_matches(c, &rel) {
            continue;
        }
        let text = std::fs::read_to_string(&f).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        // Prefer the exact pattern line (not merely one within the window).
        let exact = |i: usize| c.pattern.as_ref().is_none_or(|p| Re::new(p).is_ok_and(|r| r.is_match(lines[i - 1])));
        if let Some(i) = (1..=lines.len()).find(|&i| exact(i) && cite_ok(c, &text, i).is_ok()) {
            return Some(format!("{rel}:{i}"));
        }
    }
    None
}

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

// ---------- helpers ----------

fn answer(dir: &Path) -> Result<String, String> {
    std::fs::read_to_string(dir.join("ANSWER.md")).map_err(|_| "no ANSWER.md in the working copy".to_string())
}

fn metrics(run: &Path) -> Result<Vec<serde_json::Value>, String> {
    let p = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: {e}", p.display())))
        .collect()
}

fn read_toml(p: &Path) -> Result<toml::Table, String> {
    let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
}

fn lookup<'a>(t: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let (first, rest) = key.split_once('.').unwrap_or((key, ""));
    let v = t.get(first)?;
    if rest.is_empty() {
        return Some(v);
    }
    lookup(v.as_table()?, rest)
}

/// Every number written in `text` (`1,234` and `1_234` are one number; `1, 2` are two).
pub fn numbers(text: &str) -> Vec<f64> {
    let cs: Vec<char> = text.chars().collect();
    let digit = |i: usize| cs.get(i).is_some_and(|c| c.is_ascii_digit());
    let thousands = |i: usize| i > 0 && digit(i - 1) && (1..=3).all(|d| digit(i + d)) && !digit(i + 4);
    let joined: String = cs.iter().enumerate().filter(|&(i, c)| !(*c == ',' && thousands(i))).map(|(_, c)| c).collect();
    joined
        .split(|c: char| !(c.is_ascii_digit() || ".eE+-_".contains(c)))
        .filter_map(|w| w.trim_matches(['.', '-', '+', 'e', 'E']).replace('_', "").parse::<f64>().ok())
        .collect()
}

fn reports(text: &str, v: f64, tol: f64) -> bool {
    numbers(text).iter().any(|x| (x - v).abs() <= tol)
}

fn first_int(line: &str) -> Option<u64> {
    let cleaned: String = line.chars().filter(|c| *c != ',' && *c != '_').collect();
    cleaned.split(|c: char| !c.is_ascii_digit()).find(|w| !w.is_empty()).and_then(|w| w.parse().ok())
}

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

fn scratch(tag: &str) -> Result<PathBuf, String> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let d = std::env::temp_dir().join(format!("ate-bench-{}-{tag}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    Ok(d)
}

pub fn copy_dir(src: &Path, dst: &Path, skip: &[&str]) -> Result<(), String> {
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

// ---------- Operate: routing trace, HF export ----------

/// A safetensors tensor: dtype, shape, raw little-endian bytes.
pub struct StTensor {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl StTensor {
    pub fn i32s(&self) -> Vec<i32> {
        self.data.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
    pub fn f32s(&self) -> Vec<f32> {
        self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
}

/// Every tensor of a safetensors file (8-byte little-endian header length, JSON header, data).
pub fn st_read(p: &Path) -> Result<std::collections::BTreeMap<String, StTensor>, String> {
    let err = |e: &str| format!("{}: {e}", p.display());
    let b = std::fs::read(p).map_err(|e| err(&e.to_string()))?;
    let n = u64::from_le_bytes(b.get(..8).ok_or_else(|| err("not a safetensors file"))?.try_into().unwrap()) as usize;
    let h: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(b.get(8..8usize.saturating_add(n)).ok_or_else(|| err("header runs past the end"))?)
            .map_err(|e| err(&e.to_string()))?;
    let body = &b[8 + n..];
    let mut out = std::collections::BTreeMap::new();
    for (name, v) in h.iter().filter(|(k, _)| *k != "__metadata__") {
        let offs: Vec<usize> =
            v["data_offsets"].as_array().into_iter().flatten().filter_map(|x| x.as_u64()).map(|x| x as usize).collect();
        let shape =
            v["shape"].as_array().into_iter().flatten().filter_map(|x| x.as_u64()).map(|x| x as usize).collect();
        let data = match offs[..] {
            [a, z] if a <= z => body.get(a..z).ok_or_else(|| err(&format!("`{name}` runs past the end")))?.to_vec(),
            _ => return Err(err(&format!("`{name}` has bad data_offsets"))),
        };
        out.insert(name.clone(), StTensor { dtype: v["dtype"].as_str().unwrap_or("").to_string(), shape, data });
    }
    Ok(out)
}

/// The first integer after `label` on the first line of `text` that contains it (case-insensitive).
pub fn labelled_int(text: &str, label: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let low = l.to_lowercase();
        low.find(&label.to_lowercase()).and_then(|i| first_int(&low[i + label.len()..]))
    })
}

fn check_routing_trace(
    trace: &str,
    config: &str,
    tokens: usize,
    layer: usize,
    dir: &Path,
    env: &Env,
    o: &mut Outcome,
) -> Result<(), String> {
    let got = st_read(&dir.join(trace)).map_err(|e| format!("no routing trace: {e}"))?;
    let cfg = read_toml(&dir.join(config))?;
    let dim = |k: &str| lookup(&cfg, k).and_then(|v| v.as_integer()).unwrap_or(0) as usize;
    let (layers, experts) = (dim("model.layers"), dim("model.experts"));
    let tok = got.get("tokens");
    o.rule(
        tok.is_some_and(|t| t.dtype == "I32" && t.shape == [tokens]),
        format!("{trace} has `tokens` I32 [{tokens}] (got {:?})", tok.map(|t| (&t.dtype, &t.shape))),
    );
    for l in 0..layers {
        let (ids, w) = (got.get(&format!("layers.{l}.expert_ids")), got.get(&format!("layers.{l}.gate_weights")));
        let ok = match (ids, w) {
            (Some(ids), Some(w)) => {
                ids.dtype == "I32"
                    && w.dtype == "F32"
                    && ids.shape.len() == 2
                    && ids.shape[0] == tokens
                    && ids.shape == w.shape
                    && ids.i32s().iter().all(|&e| e >= 0 && (e as usize) < experts)
                    && w.f32s().iter().all(|g| g.is_finite() && (0.0..=1.0).contains(g))
            }
            _ => false,
        };
        o.rule(ok, format!("layer {l}: expert_ids I32 [{tokens}, k] in 0..{experts}, gate_weights F32 in [0, 1]"));
    }
    // The same command, re-run here: the routing of the first tokens is deterministic (seed, data).
    let pith = pith_bin(dir, env)?;
    let work = scratch("trace")?;
    let reference = work.join("ref.safetensors");
    let mut args = vec!["train".to_string(), config.to_string()];
    let sets = [
        "train.steps=1".to_string(),
        "train.eval_every=0".into(),
        format!("train.out=\"{}\"", work.join("run").display()),
    ];
    sets.iter().for_each(|s| args.extend(["--set".into(), s.clone()]));
    args.extend([
        "--trace-routing".into(),
        reference.to_string_lossy().into_owned(),
        "--trace-tokens".into(),
        tokens.to_string(),
    ]);
    let (code, out) = run_pith(&pith, dir, &args)?;
    if code != 0 {
        return Err(format!("re-running `pith {}` failed: {out}", args.join(" ")));
    }
    let want = st_read(&reference)?;
    let ids_name = format!("layers.{layer}.expert_ids");
    let same = |n: &str| got.get(n).map(|t| &t.data) == want.get(n).map(|t| &t.data);
    o.rule(
        same("tokens") && same(&ids_name),
        format!("{trace}'s tokens and layer-{layer} expert ids equal those of a re-run of the quickstart"),
    );
    let ids = want.get(&ids_name).ok_or(format!("the re-run's trace has no `{ids_name}`"))?;
    let mut count = vec![0u64; experts.max(1)];
    for e in ids.i32s() {
        if let Some(c) = count.get_mut(e.max(0) as usize) {
            *c += 1;
        }
    }
    let max = *count.iter().max().unwrap_or(&0);
    let best: Vec<u64> = (0..count.len() as u64).filter(|&e| count[e as usize] == max).collect();
    let ans = answer(dir)?;
    let (e, c) = (labelled_int(&ans, "expert:"), labelled_int(&ans, "count:"));
    o.rule(
        e.is_some_and(|e| best.contains(&e)),
        format!("ANSWER.md `expert:` is layer {layer}'s most-loaded expert {best:?} (got {e:?})"),
    );
    o.rule(c == Some(max), format!("ANSWER.md `count:` is {max} tokens (got {c:?})"));
    Ok(())
}

/// `pith eval-logits MODEL --tokens ...` → (loss, flattened logits).
fn eval_logits(pith: &Path, dir: &Path, model: &Path, tokens: &[u32]) -> Result<(f64, Vec<f64>), String> {
    let list: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let args = vec!["eval-logits".to_string(), model.to_string_lossy().into_owned(), "--tokens".into(), list.join(",")];
    let (code, out) = run_pith(pith, dir, &args)?;
    let json = out.lines().find(|l| l.trim_start().starts_with('{')).unwrap_or("");
    let v: serde_json::Value = match (code, serde_json::from_str(json)) {
        (0, Ok(v)) => v,
        _ => return Err(format!("`pith {}` failed: {}", args.join(" "), out.trim())),
    };
    fn flat(v: &serde_json::Value, out: &mut Vec<f64>) {
        match v {
            serde_json::Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
            x => out.extend(x.as_f64()),
        }
    }
    let mut logits = Vec::new();
    flat(&v["logits"], &mut logits);
    let loss = v["loss"].as_f64().ok_or(format!("`pith {}` printed no loss", args.join(" ")))?;
    Ok((loss, logits))
}

#[allow(clippy::too_many_arguments)]
fn check_export_hf(
    run: &str,
    export: &str,
    steps: u64,
    tokens: &[u32],
    tol: f64,
    dir: &Path,
    env: &Env,
    o: &mut Outcome,
) -> Result<(), String> {
    let ckpt = newest_checkpoint(&dir.join(run))?;
    let want = format!("step_{steps:08}");
    o.rule(ckpt.ends_with(&want), format!("{run}'s newest checkpoint is {want} ({})", ckpt.display()));
    let ex = dir.join(export);
    let cfg: Option<serde_json::Value> =
        std::fs::read_to_string(ex.join("config.json")).ok().and_then(|s| serde_json::from_str(&s).ok());
    let arch = cfg.as_ref().and_then(|c| c["architectures"][0].as_str().map(String::from));
    o.rule(arch.is_some(), format!("{export}/config.json names an architecture ({arch:?})"));
    let index = ex.join("model.safetensors.index.json");
    let weights = if index.is_file() {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index).unwrap_or_default()).unwrap_or_default();
        let shards: Vec<&str> =
            v["weight_map"].as_object().into_iter().flatten().filter_map(|(_, f)| f.as_str()).collect();
        !shards.is_empty() && shards.iter().all(|f| ex.join(f).is_file())
    } else {
        ex.join("model.safetensors").is_file()
    };
    o.rule(weights, format!("{export} holds model.safetensors (or an index and every shard it names)"));
    let pith = pith_bin(dir, env)?;
    let imp = scratch("import")?.join("run");
    let args = vec![
        "import".into(),
        "hf".into(),
        ex.to_string_lossy().into_owned(),
        "--out".into(),
        imp.to_string_lossy().into_owned(),
    ];
    let (code, out) = run_pith(&pith, dir, &args)?;
    o.rule(code == 0, format!("`pith import hf {export}` succeeds ({})", out.lines().next().unwrap_or("").trim()));
    let (loss, logits) = eval_logits(&pith, dir, &ckpt, tokens)?;
    let mut others = vec![(export.to_string(), ex.clone())];
    if code == 0 {
        others.push(("its re-import".into(), imp));
    }
    for (name, path) in others {
        let (l, g) = eval_logits(&pith, dir, &path, tokens)?;
        let d = logits.iter().zip(&g).map(|(a, b)| (a - b).abs()).fold(0.0f64, f64::max);
        o.rule(
            g.len() == logits.len() && !g.is_empty() && d <= tol && (l - loss).abs() <= tol,
            format!(
                "eval-logits of {name} matches the checkpoint (max |Δlogit| {d:.2e}, |Δloss| {:.2e}, tol {tol})",
                (l - loss).abs()
            ),
        );
    }
    o.rule(reports(&answer(dir)?, loss, 1e-4), format!("ANSWER.md reports the eval-logits loss {loss:.5}"));
    Ok(())
}

// ---------- New Feature ----------

/// Build `<dir>/plugins/<name>` as a standalone cdylib (its plugin-api path pointed at
/// `<dir>/plugin-api`, workspace inheritance resolved); returns a directory holding only its .so.
fn build_plugin(dir: &Path, name: &str, env: &Env) -> Result<PathBuf, String> {
    let src = dir.join("plugins").join(name);
    if !src.join("Cargo.toml").is_file() {
        return Err(format!("no plugin crate at plugins/{name}/ (Cargo.toml)"));
    }
    let work = scratch(&format!("build-{name}"))?;
    let krate = work.join(name);
    copy_dir(&src, &krate, &["target"])?;
    let mut m = read_toml(&krate.join("Cargo.toml"))?;
    let root = read_toml(&dir.join("Cargo.toml")).unwrap_or_default();
    let ws_deps = lookup(&root, "workspace.dependencies").and_then(|v| v.as_table()).cloned().unwrap_or_default();
    let api = std::fs::canonicalize(dir.join("plugin-api")).map_err(|e| format!("plugin-api: {e}"))?;
    let pkg = m.get_mut("package").and_then(|v| v.as_table_mut()).ok_or("Cargo.toml has no [package]")?;
    let crate_name = pkg.get("name").and_then(|v| v.as_str()).ok_or("Cargo.toml has no package.name")?.to_string();
    for (k, v) in pkg.iter_mut() {
        if v.as_table().is_some_and(|t| t.contains_key("workspace")) {
            *v = match k.as_str() {
                "edition" => "2021".into(),
                _ => "0.1.0".into(),
            };
        }
    }
    pkg.remove("license");
    if let Some(deps) = m.get_mut("dependencies").and_then(|v| v.as_table_mut()) {
        for (k, v) in deps.iter_mut() {
            if k == "pith-plugin-api" {
                let mut t = toml::Table::new();
                t.insert("path".into(), api.to_string_lossy().into_owned().into());
                *v = t.into();
            } else if v.as_table().is_some_and(|t| t.contains_key("workspace")) {
                let mut w = ws_deps.get(k).cloned().ok_or(format!("dependency `{k}` not in the workspace"))?;
                if let (Some(wt), Some(t)) = (w.as_table_mut(), v.as_table()) {
                    for (fk, fv) in t.iter().filter(|(fk, _)| fk.as_str() != "workspace") {
                        wt.insert(fk.clone(), fv.clone());
                    }
                }
                *v = w;
            }
        }
    }
    let lib_name = lookup(&m, "lib.name").and_then(|v| v.as_str()).map(String::from);
    let lib = m.entry("lib").or_insert_with(|| toml::Table::new().into());
    if let Some(t) = lib.as_table_mut() {
        t.insert("crate-type".into(), toml::Value::Array(vec!["cdylib".into(), "rlib".into()]));
    }
    m.insert("workspace".into(), toml::Table::new().into());
    let text = toml::to_string(&m).map_err(|e| e.to_string())?;
    std::fs::write(krate.join("Cargo.toml"), text).map_err(|e| e.to_string())?;
    if dir.join("Cargo.lock").is_file() {
        let _ = std::fs::copy(dir.join("Cargo.lock"), krate.join("Cargo.lock"));
    }
    let target = env.target_dir.clone().unwrap_or_else(|| dir.join("target/ate-bench-plugins"));
    let out = Command::new(cargo())
        .args(["build", "--quiet", "--manifest-path"])
        .arg(krate.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .map_err(|e| format!("cargo: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(format!("plugins/{name} does not build:\n{}", tail.join("\n")));
    }
    let file = format!("lib{}.so", lib_name.unwrap_or_else(|| crate_name.replace('-', "_")));
    let plugdir = work.join("plugin-dir");
    std::fs::create_dir_all(&plugdir).map_err(|e| e.to_string())?;
    std::fs::copy(target.join("debug").join(&file), plugdir.join(&file)).map_err(|e| format!("{file}: {e}"))?;
    Ok(plugdir)
}

/// A pith whose own directory holds no plugins (so a stale .so next to it can't interfere).
fn isolated_pith(pith: &Path) -> Result<PathBuf, String> {
    let d = scratch("bin")?.join("pith");
    if std::fs::hard_link(pith, &d).is_err() {
        std::fs::copy(pith, &d).map_err(|e| format!("{}: {e}", pith.display()))?;
    }
    Ok(d)
}

fn check_plugin(p: &PluginCheck, dir: &Path, env: &Env, o: &mut Outcome) -> Result<(), String> {
    let src_dir = dir.join("plugins").join(&p.name);
    if !src_dir.is_dir() {
        return Err(format!("no plugin crate at plugins/{}/", p.name));
    }
    // Rule 0: the host is untouched.
    match std::fs::read_to_string(dir.join(".ate-bench.json")).ok().and_then(|s| {
        serde_json::from_str::<serde_json::Value>(&s).ok().and_then(|v| v["frozen"].as_str().map(String::from))
    }) {
        Some(f) => o.rule(f == crate::fingerprint(dir), "host/, plugin-api/ and plugins/std/ are unchanged".into()),
        None => o.notes.push("no .ate-bench.json stamp: the no-host-change rule was not checked".into()),
    }
    let mut files = Vec::new();
    walk(&src_dir.join("src"), &mut files);
    let source: String = files.iter().filter_map(|f| std::fs::read_to_string(f).ok()).collect();
    for k in &p.required_keys {
        o.rule(source.contains(k.as_str()), format!("the source accepts config key `{k}`"));
    }
    let plugdir = build_plugin(dir, &p.name, env)?;
    let pith = isolated_pith(&pith_bin(dir, env)?)?;
    let pd = plugdir.to_string_lossy().into_owned();
    let with_dir = |mut a: Vec<String>| {
        a.extend(["--plugin-dir".into(), pd.clone()]);
        a
    };
    let (code, out) = run_pith(&pith, dir, &with_dir(vec!["plugins".into(), "check".into(), p.name.clone()]))?;
    let last = out.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").to_string();
    o.rule(code == 0 && out.contains("PASS"), format!("`pith plugins check {}` passes ({last})", p.name));
    for bad in &p.bad_configs {
        let key = bad.split('=').next().unwrap_or("").trim().to_string();
        let args = vec!["plugins".into(), "check".into(), p.name.clone(), "--config".into(), bad.clone()];
        let (code, out) = run_pith(&pith, dir, &with_dir(args))?;
        let named = out.contains(&format!("`{key}`"));
        o.rule(code != 0 && named, format!("`--config '{bad}'` is refused with an error naming `{key}` (exit {code})"));
    }
    // The main run: quickstart with the plugin selected.
    let work = scratch(&format!("run-{}", p.name))?;
    let mut cfg = read_toml(&dir.join("configs/quickstart.toml"))?;
    let mut table = p.config.clone();
    table.insert("plugin".into(), p.name.clone().into());
    if p.table == "balance_loss" {
        let arr = cfg.entry("balance_loss").or_insert_with(|| toml::Value::Array(vec![]));
        let arr = arr.as_array_mut().ok_or("balance_loss is not an array")?;
        let at = arr.iter().position(|v| lookup_plugin(v) == p.replace.as_deref());
        match at {
            Some(i) if p.replace.is_some() => arr[i] = table.into(),
            _ => arr.push(table.into()),
        }
    } else {
        cfg.insert(p.table.clone(), table.into());
    }
    let cfg_path = work.join("run.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let train = |out: &Path, steps: u64, sets: &[String]| -> Result<Vec<serde_json::Value>, String> {
        let mut a = vec!["train".to_string(), cfg_path.to_string_lossy().into_owned()];
        let base = [
            format!("train.steps={steps}"),
            format!("train.out=\"{}\"", out.display()),
            "train.eval_every=0".into(),
            "train.checkpoint_every=0".into(),
        ];
        for s in base.iter().chain(&p.set).chain(&env.extra_set).chain(sets) {
            a.extend(["--set".into(), s.clone()]);
        }
        let (code, text) = run_pith(&pith, dir, &with_dir(a))?;
        if code != 0 {
            let tail: Vec<&str> = text.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
            return Err(format!("training with `{}` failed: {}", p.name, tail.join(" | ")));
        }
        metrics(out)
    };
    let steps = env.steps.unwrap_or(64);
    let main_out = work.join("main");
    let lines = train(&main_out, steps, &[])?;
    let losses: Vec<f64> = lines.iter().filter_map(|l| l["loss"].as_f64()).collect();
    let n = losses.len().clamp(1, 5);
    let (first, last) = (mean(&losses[..n.min(losses.len())]), mean(&losses[losses.len().saturating_sub(n)..]));
    o.rule(
        losses.len() as u64 == steps && losses.iter().all(|l| l.is_finite()),
        format!("{steps}-step run: every loss finite"),
    );
    o.rule(first - last > 0.05, format!("{steps}-step run: loss falls (first-5 mean {first:.4} -> last-5 {last:.4})"));
    for b in &p.metrics {
        bound_rule(o, b, &lines, "main run");
    }
    if let Some(r) = &p.relation {
        let layers = lookup(&read_toml(&main_out.join("config.toml"))?, "model.layers").and_then(|v| v.as_integer());
        let f = r.factor * if r.times_layers { layers.unwrap_or(1) as f64 } else { 1.0 };
        let ok = !lines.is_empty()
            && lines.iter().all(|l| match (l[r.lhs.as_str()].as_f64(), l[r.rhs.as_str()].as_f64()) {
                (Some(a), Some(b)) => (a - f * b).abs() <= r.rel_tol * a.abs().max(1e-6),
                _ => false,
            });
        o.rule(ok, format!("every step: {} = {f} × {} (rel tol {})", r.lhs, r.rhs, r.rel_tol));
    }
    if let Some(names) = &p.state_names {
        o.rule(
            optimizer_states(&main_out).as_ref() == Ok(names),
            format!("checkpoint state per parameter is {names:?}"),
        );
    }
    if let Some(g) = &p.plan_group {
        let mut a = vec!["plan".to_string(), cfg_path.to_string_lossy().into_owned()];
        p.set.iter().chain(&env.extra_set).for_each(|s| a.extend(["--set".into(), s.clone()]));
        let (code, text) = run_pith(&pith, dir, &with_dir(a))?;
        let got = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| w.len() == 3 && w[0] == g.group)
            .and_then(|w| w[1].parse::<usize>().ok());
        let model = read_toml(&main_out.join("config.toml"))?;
        let dim = |k: &str| lookup(&model, &format!("model.{k}")).and_then(|v| v.as_integer()).unwrap_or(0) as usize;
        let want = g.factor * dim("layers") * dim("experts") * dim("hidden") * dim("expert_ffn");
        o.rule(code == 0 && got == Some(want), format!("`pith plan`: {} has {want} parameters (got {got:?})", g.group));
    }
    for (i, v) in p.variants.iter().enumerate() {
        let lines = train(&work.join(format!("variant{i}")), v.steps, &v.set)?;
        bound_rule(o, &v.bound, &lines, &format!("with {}", v.set.join(" ")));
    }
    Ok(())
}

fn lookup_plugin(v: &toml::Value) -> Option<&str> {
    v.get("plugin").and_then(|p| p.as_str())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn bound_rule(o: &mut Outcome, b: &Bound, lines: &[serde_json::Value], ctx: &str) {
    let vals: Vec<Option<f64>> = lines.iter().map(|l| l[b.name.as_str()].as_f64()).collect();
    let (lo, hi) = (b.min.unwrap_or(f64::NEG_INFINITY), b.max.unwrap_or(f64::INFINITY));
    let ok = !vals.is_empty() && vals.iter().all(|v| v.is_some_and(|v| v >= lo && v <= hi));
    let (mn, mx) = vals.iter().flatten().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let seen =
        if vals.iter().all(|v| v.is_some()) { format!("{mn:.4}..{mx:.4}") } else { "missing on some steps".into() };
    o.rule(ok, format!("{ctx}: metric `{}` reported every step within [{lo}, {hi}] (seen {seen})", b.name));
}

/// The state names per parameter in the run's newest checkpoint (each must appear for every parameter).
fn optimizer_states(run: &Path) -> Result<Vec<String>, String> {
    let ck = crate::check::newest_checkpoint(run)?;
    let (params, states) = (st_names(&ck.join("model.safetensors"))?, st_names(&ck.join("optimizer.safetensors"))?);
    let mut names: Vec<String> = Vec::new();
    for s in &states {
        let p = params.iter().find(|p| s.starts_with(&format!("{p}.")) && !params.contains(s));
        let Some(p) = p else { return Err(format!("state `{s}` belongs to no parameter")) };
        let n = s[p.len() + 1..].to_string();
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names.sort();
    if states.len() != params.len() * names.len() {
        return Err(format!("{} states for {} parameters and names {names:?}", states.len(), params.len()));
    }
    Ok(names)
}

pub fn newest_checkpoint(run: &Path) -> Result<PathBuf, String> {
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

/// Tensor names in a safetensors file (its JSON header).
fn st_names(p: &Path) -> Result<Vec<String>, String> {
    let b = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let n = u64::from_le_bytes(b.get(..8).ok_or("short file")?.try_into().unwrap()) as usize;
    let h: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(b.get(8..8 + n).ok_or("short header")?).map_err(|e| e.to_string())?;
    Ok(h.keys().filter(|k| *k != "__metadata__").cloned().collect())
}

// ---------- reference solutions and the self-test ----------

/// Apply task's reference solution to the working copy `dir`.
pub fn solve(task: &Task, dir: &Path) -> Result<(), String> {
    solve_with(task, dir, &Env::from_env())
}

pub fn solve_with(task: &Task, dir: &Path, env: &Env) -> Result<(), String> {
    let sol = bench_dir().join("solutions").join(&task.id);
    match &task.meta.check {
        Check::Cite { cite, .. } => {
            let tpl = std::fs::read_to_string(sol.join("answer.md")).map_err(|e| format!("{}: {e}", sol.display()))?;
            let mut text = tpl.clone();
            for (i, c) in cite.iter().enumerate() {
                let at =
                    locate(c, dir).ok_or(format!("requirement {i} ({}) is satisfied nowhere in {}", c.what, c.file))?;
                text = text.replace(&format!("{{{{cite {i}}}}}"), &at);
            }
            std::fs::write(dir.join("ANSWER.md"), text).map_err(|e| e.to_string())
        }
        Check::Plugin(p) => copy_dir(&sol.join(&p.name), &dir.join("plugins").join(&p.name), &["target"]),
        Check::Unavailable { missing } => Err(format!("no reference solution: {missing}")),
        _ => {
            let pith = pith_bin(dir, env)?;
            let o = Command::new("sh")
                .arg(sol.join("solve.sh"))
                .current_dir(dir)
                .env("PITH", &pith)
                .env("PITH_PLUGIN_PATH", "")
                .output()
                .map_err(|e| format!("sh: {e}"))?;
            if !o.status.success() {
                return Err(format!("solve.sh failed: {}", String::from_utf8_lossy(&o.stderr)));
            }
            Ok(())
        }
    }
}

/// A fresh working copy of this repo's current tree (not a commit: what the checks must agree with now).
pub fn working_copy(tag: &str) -> Result<PathBuf, String> {
    let d = scratch(tag)?.join("repo");
    copy_dir(&repo_dir(), &d, &["target", ".git", "runs", "ate-bench", "ANSWER.md"])?;
    crate::write_stamp(&d, tag, "working-tree")?;
    Ok(d)
}

/// Every CPU task: FAIL on an unmodified copy, PASS with its reference solution.
pub fn selftest() -> Result<bool, String> {
    let mut env = Env::from_env();
    if env.pith.is_none() {
        env.pith = Some(pith_bin(&repo_dir(), &env)?);
    }
    if env.target_dir.is_none() {
        env.target_dir = Some(repo_dir().join("target/plugin-tests"));
    }
    let tasks = crate::load_tasks()?;
    let feature_copy = working_copy("selftest-features")?;
    let mut bad = 0;
    for t in tasks.iter().filter(|t| !t.meta.needs_gpu) {
        let dir = if t.meta.category == "feature" { feature_copy.clone() } else { working_copy(&t.id)? };
        let t0 = std::time::Instant::now();
        let before = run_with(t, &dir, &env);
        let solved = solve_with(t, &dir, &env);
        let after = run_with(t, &dir, &env);
        let ok = !before.passed() && solved.is_ok() && after.passed();
        let why = match (&solved, before.passed()) {
            (Err(e), _) => format!("solve: {e}"),
            (_, true) => "PASSES unmodified".into(),
            _ => after.fails.join("; "),
        };
        println!(
            "{} {:<28} {:>5.1}s {}",
            if ok { "ok  " } else { "BAD " },
            t.id,
            t0.elapsed().as_secs_f64(),
            if ok { "" } else { &why }
        );
        bad += !ok as usize;
    }
    println!("{}", if bad == 0 { "selftest PASS".to_string() } else { format!("selftest FAIL ({bad} tasks)") });
    Ok(bad == 0)
}
