//! New-Feature checks: a plugin crate in `plugins/<name>/`, built standalone against the copy's
//! `plugin-api/`, must pass `pith plugins check`, refuse bad configs naming the key, train the
//! quickstart with finite, falling loss, and satisfy the task's rules (metric bounds, a relation
//! between metrics, optimizer state names and the layout of factored state in the checkpoint,
//! `pith plan` counts). The host must be unchanged (the fingerprint `prepare` recorded).

use super::safetensors::{st_read, st_shapes, StTensor};
use super::{
    cargo, copy_dir, int_at, lookup, metrics, newest_checkpoint, pith_bin, plan_row, push_sets, read_toml, run_pith,
    scratch, tail, walk, Env, Outcome,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

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
    /// Optimizer: the state tensors per parameter in the checkpoint (of every parameter, or with
    /// `state_names_1d`, of those with two or more dimensions).
    #[serde(default)]
    pub state_names: Option<Vec<String>>,
    /// Optimizer: the state tensors of 1-D parameters, where they differ from `state_names`.
    #[serde(default)]
    pub state_names_1d: Option<Vec<String>>,
    /// Optimizer: factored second moments (Adafactor). The host shapes every state tensor like its
    /// parameter, so for a parameter [.., a, b] (L = numel/(a·b) matrices) state `row` must hold
    /// its L·a statistics in its first elements and `col` its L·b, the rest zero.
    #[serde(default)]
    pub factored: Option<Factored>,
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
pub struct Factored {
    pub row: String,
    pub col: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct PlanGroup {
    pub group: String,
    pub factor: usize,
}

pub fn check(p: &PluginCheck, dir: &Path, env: &Env, o: &mut Outcome) -> Result<(), String> {
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
    let cfg_path = work.join("run.toml");
    let cfg = quickstart_with(p, dir)?;
    std::fs::write(&cfg_path, toml::to_string(&cfg).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let train = |out: &Path, steps: u64, sets: &[String]| -> Result<Vec<serde_json::Value>, String> {
        let mut a = vec!["train".to_string(), cfg_path.to_string_lossy().into_owned()];
        let base = [
            format!("train.steps={steps}"),
            format!("train.out=\"{}\"", out.display()),
            "train.eval_every=0".into(),
            "train.checkpoint_every=0".into(),
        ];
        push_sets(&mut a, base.iter().chain(&p.set).chain(&env.extra_set).chain(sets));
        let (code, text) = run_pith(&pith, dir, &with_dir(a))?;
        if code != 0 {
            return Err(format!("training with `{}` failed: {}", p.name, tail(&text, 5).join(" | ")));
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
    if p.state_names.is_some() || p.factored.is_some() {
        let states = optimizer_states(&main_out);
        if let Some(names) = &p.state_names {
            let one_d = p.state_names_1d.as_ref().map(|n| format!(" (1-D parameters: {n:?})")).unwrap_or_default();
            let got = states
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|s| state_names_match(s, names, p.state_names_1d.as_deref()));
            let why = got.err().map(|e| format!(": {e}")).unwrap_or_default();
            o.rule(why.is_empty(), format!("checkpoint state per parameter is {names:?}{one_d}{why}"));
        }
        if let Some(f) = &p.factored {
            let got = states.as_ref().map_err(Clone::clone).and_then(|s| factored_layout(s, f));
            let seen = match &got {
                Ok(n) => format!("{n} parameters"),
                Err(e) => e.clone(),
            };
            o.rule(
                got.is_ok(),
                format!(
                    "factored state: every [.., a, b] parameter keeps L·a statistics in `{}` and L·b in `{}`, the \
                     rest zero ({seen})",
                    f.row, f.col
                ),
            );
        }
    }
    if let Some(g) = &p.plan_group {
        let mut a = vec!["plan".to_string(), cfg_path.to_string_lossy().into_owned()];
        push_sets(&mut a, p.set.iter().chain(&env.extra_set));
        let (code, text) = run_pith(&pith, dir, &with_dir(a))?;
        let got = plan_row(&text, &g.group).and_then(|w| w[1].parse::<usize>().ok());
        let model = read_toml(&main_out.join("config.toml"))?;
        let dim = |k: &str| int_at(&model, &format!("model.{k}")) as usize;
        let want = g.factor * dim("layers") * dim("experts") * dim("hidden") * dim("expert_ffn");
        o.rule(code == 0 && got == Some(want), format!("`pith plan`: {} has {want} parameters (got {got:?})", g.group));
    }
    for (i, v) in p.variants.iter().enumerate() {
        let lines = train(&work.join(format!("variant{i}")), v.steps, &v.set)?;
        bound_rule(o, &v.bound, &lines, &format!("with {}", v.set.join(" ")));
    }
    Ok(())
}

/// The copy's quickstart config with the plugin selected in its table (a balance loss replaces
/// the `replace` entry, else is appended).
fn quickstart_with(p: &PluginCheck, dir: &Path) -> Result<toml::Table, String> {
    let mut cfg = read_toml(&dir.join("configs/quickstart.toml"))?;
    let mut table = p.config.clone();
    table.insert("plugin".into(), p.name.clone().into());
    if p.table == "balance_loss" {
        let arr = cfg.entry("balance_loss").or_insert_with(|| toml::Value::Array(vec![]));
        let arr = arr.as_array_mut().ok_or("balance_loss is not an array")?;
        let at = arr.iter().position(|v| v.get("plugin").and_then(|p| p.as_str()) == p.replace.as_deref());
        match at {
            Some(i) if p.replace.is_some() => arr[i] = table.into(),
            _ => arr.push(table.into()),
        }
    } else {
        cfg.insert(p.table.clone(), table.into());
    }
    Ok(cfg)
}

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
        return Err(format!("plugins/{name} does not build:\n{}", tail(&err, 15).join("\n")));
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

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Every line reports metric `b.name` within [min, max].
fn bound_rule(o: &mut Outcome, b: &Bound, lines: &[serde_json::Value], ctx: &str) {
    let vals: Vec<Option<f64>> = lines.iter().map(|l| l[b.name.as_str()].as_f64()).collect();
    let (lo, hi) = (b.min.unwrap_or(f64::NEG_INFINITY), b.max.unwrap_or(f64::INFINITY));
    let ok = !vals.is_empty() && vals.iter().all(|v| v.is_some_and(|v| v >= lo && v <= hi));
    let (mn, mx) = vals.iter().flatten().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let seen =
        if vals.iter().all(|v| v.is_some()) { format!("{mn:.4}..{mx:.4}") } else { "missing on some steps".into() };
    o.rule(ok, format!("{ctx}: metric `{}` reported every step within [{lo}, {hi}] (seen {seen})", b.name));
}

/// A parameter of the run's newest checkpoint: its shape and its optimizer state tensors by name.
struct ParamState {
    shape: Vec<usize>,
    states: BTreeMap<String, StTensor>,
}

/// Every tensor of the newest checkpoint's `model.safetensors` with the states
/// (`<param>.<state>` in `optimizer.safetensors`) that belong to it.
fn optimizer_states(run: &Path) -> Result<BTreeMap<String, ParamState>, String> {
    let ck = newest_checkpoint(run)?;
    let mut out: BTreeMap<String, ParamState> = st_shapes(&ck.join("model.safetensors"))?
        .into_iter()
        .map(|(n, shape)| (n, ParamState { shape, states: BTreeMap::new() }))
        .collect();
    for (s, t) in st_read(&ck.join("optimizer.safetensors"))? {
        let owner = out
            .keys()
            .filter(|p| s.len() > p.len() + 1 && s.starts_with(p.as_str()) && s.as_bytes()[p.len()] == b'.')
            .max_by_key(|p| p.len())
            .cloned();
        let Some(p) = owner else { return Err(format!("state `{s}` belongs to no parameter")) };
        let name = s[p.len() + 1..].to_string();
        out.get_mut(&p).expect("a key of out").states.insert(name, t);
    }
    if out.is_empty() {
        return Err("the checkpoint has no parameters".into());
    }
    Ok(out)
}

/// Every parameter has exactly the expected states: `names`, or `one_d` for a 1-D parameter.
fn state_names_match(
    st: &BTreeMap<String, ParamState>,
    names: &[String],
    one_d: Option<&[String]>,
) -> Result<(), String> {
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    for (p, s) in st {
        let want = match one_d {
            Some(n) if s.shape.len() <= 1 => sorted(n),
            _ => sorted(names),
        };
        let got: Vec<String> = s.states.keys().cloned().collect();
        if got != want {
            return Err(format!("`{p}` {:?} has {got:?}", s.shape));
        }
    }
    Ok(())
}

/// For each parameter of shape [.., a, b]: the first L·a elements of state `row` and the first L·b
/// of `col` are finite and ≥ 0 (some > 0), everything past them zero. The number of such parameters.
fn factored_layout(st: &BTreeMap<String, ParamState>, f: &Factored) -> Result<usize, String> {
    let mut n = 0;
    for (p, s) in st {
        let [.., a, b] = s.shape[..] else { continue };
        let l = s.shape.iter().product::<usize>() / (a * b).max(1);
        for (name, used) in [(&f.row, l * a), (&f.col, l * b)] {
            let t = s.states.get(name).ok_or(format!("`{p}` has no state `{name}`"))?;
            let v = if t.dtype == "F32" { t.f32s() } else { Vec::new() };
            if v.len() < used {
                return Err(format!("`{p}.{name}` is {} {:?}", t.dtype, t.shape));
            }
            if let Some(i) = v[..used].iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
                return Err(format!("`{p}.{name}`[{i}] = {} (a mean of squares)", v[i]));
            }
            if v[..used].iter().all(|&x| x == 0.0) {
                return Err(format!("`{p}.{name}`: its {used} statistics are all zero"));
            }
            if let Some(i) = v[used..].iter().position(|&x| x != 0.0) {
                let (at, x) = (used + i, v[used + i]);
                return Err(format!(
                    "`{p}.{name}`[{at}] = {x}: past the {used} statistics of a {:?} parameter (a full-size v?)",
                    s.shape
                ));
            }
        }
        n += 1;
    }
    if n == 0 {
        return Err("no parameter has two or more dimensions".into());
    }
    Ok(n)
}
