//! Operate checks: the agent ran pith; these read what it left (metrics, configs, checkpoints,
//! traces, exports), re-run pith where the answer must be recomputed, and compare with the numbers
//! ANSWER.md reports.

use super::safetensors::st_read;
use super::{
    answer, int_at, lookup, metrics, newest_checkpoint, pith_bin, plan_row, push_sets, read_toml, run_pith, scratch,
    Env, Outcome,
};
use std::path::Path;

/// `<run>/metrics.jsonl` has `step` with a finite loss, and ANSWER.md reports it.
pub fn metrics_step(run: &str, step: u64, dir: &Path, o: &mut Outcome) -> Result<(), String> {
    let lines = metrics(&dir.join(run))?;
    let line = lines.iter().find(|l| l["step"].as_u64() == Some(step));
    let loss = line.and_then(|l| l["loss"].as_f64()).ok_or(format!("{run}/metrics.jsonl has no step {step}"))?;
    o.rule(loss.is_finite(), format!("loss at step {step} is finite ({loss})"));
    let ans = answer(dir)?;
    o.rule(reports(&ans, loss, 5e-4), format!("ANSWER.md reports the step-{step} loss {loss:.4}"));
    Ok(())
}

/// `<full>` logged steps 1..=steps with a checkpoint at `resume_at`; `<resumed>` logged only the
/// steps after it, with identical losses.
pub fn resume(
    full: &str,
    resumed: &str,
    steps: u64,
    resume_at: u64,
    dir: &Path,
    o: &mut Outcome,
) -> Result<(), String> {
    let (a, b) = (metrics(&dir.join(full))?, metrics(&dir.join(resumed))?);
    let steps_of = |v: &[serde_json::Value]| v.iter().filter_map(|l| l["step"].as_u64()).collect::<Vec<_>>();
    o.rule(steps_of(&a) == (1..=steps).collect::<Vec<_>>(), format!("{full} logged steps 1..={steps} once each"));
    let ckpt = dir.join(full).join(format!("checkpoints/step_{resume_at:08}"));
    o.rule(ckpt.join("model.safetensors").is_file(), format!("{full} has a checkpoint at step {resume_at}"));
    o.rule(
        steps_of(&b) == (resume_at + 1..=steps).collect::<Vec<_>>(),
        format!("{resumed} logged exactly steps {}..={steps} (a resumed run, not a fresh one)", resume_at + 1),
    );
    let loss = |v: &[serde_json::Value], s: u64| {
        v.iter().find(|l| l["step"].as_u64() == Some(s)).map(|l| l["loss"].to_string())
    };
    let same = (resume_at + 1..=steps).all(|s| loss(&a, s).is_some() && loss(&a, s) == loss(&b, s));
    o.rule(same, format!("losses of steps {}..={steps} are identical in both runs", resume_at + 1));
    let ans = answer(dir)?.to_lowercase();
    o.rule(ans.contains("identical"), "ANSWER.md says whether the losses are identical".into());
    Ok(())
}

/// `<run>/config.toml` has `key = value` and ≥ `min_steps` steps, the run finished, and ANSWER.md
/// reports the last line's `metric`.
pub fn config_change(
    run: &str,
    key: &str,
    value: &toml::Value,
    min_steps: u64,
    metric: &str,
    dir: &Path,
    o: &mut Outcome,
) -> Result<(), String> {
    let cfg = read_toml(&dir.join(run).join("config.toml"))?;
    let got = lookup(&cfg, key);
    o.rule(got == Some(value), format!("{run}/config.toml has {key} = {value} (got {got:?})"));
    let steps = int_at(&cfg, "train.steps") as u64;
    o.rule(steps >= min_steps, format!("{run} trained ≥ {min_steps} steps (train.steps = {steps})"));
    let lines = metrics(&dir.join(run))?;
    let last = lines.last().ok_or(format!("{run}/metrics.jsonl is empty"))?;
    o.rule(last["step"].as_u64() == Some(steps), format!("{run} finished (last step {})", last["step"]));
    let v = last[metric].as_f64().ok_or(format!("the last line has no `{metric}`"))?;
    o.rule(reports(&answer(dir)?, v, 1e-3), format!("ANSWER.md reports the final {metric} {v:.4}"));
    Ok(())
}

/// ANSWER.md's `total:` and `active:` equal the `all` row of `pith plan CONFIG --set ...`, run here.
pub fn plan(config: &str, set: &[String], dir: &Path, env: &Env, o: &mut Outcome) -> Result<(), String> {
    let pith = pith_bin(dir, env)?;
    let mut args = vec!["plan".to_string(), config.to_string()];
    push_sets(&mut args, set);
    let (code, out) = run_pith(&pith, dir, &args)?;
    if code != 0 {
        return Err(format!("`pith {}` failed: {out}", args.join(" ")));
    }
    let all = plan_row(&out, "all").ok_or("`pith plan` printed no `all` row")?;
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

/// `<trace>` is a well-formed routing trace of `tokens` tokens, its tokens and layer-`layer` expert
/// ids equal those of a re-run made here, and ANSWER.md names that layer's most-loaded expert.
pub fn routing_trace(
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
    let (layers, experts) = (int_at(&cfg, "model.layers") as usize, int_at(&cfg, "model.experts") as usize);
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
    push_sets(&mut args, &sets);
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

/// `<export>` is the Hugging Face export of `<run>`'s newest checkpoint (step `steps`): config.json
/// and weights, accepted by `pith import hf`, with `eval-logits` of the export and of the re-import
/// equal to the checkpoint's to `tol`; ANSWER.md reports that loss. With `device`, the run's
/// resolved config (`<run>/config.toml`, written by pith) has `train.device` = it.
#[allow(clippy::too_many_arguments)]
pub fn export_hf(
    run: &str,
    export: &str,
    steps: u64,
    tokens: &[u32],
    tol: f64,
    device: Option<&str>,
    dir: &Path,
    env: &Env,
    o: &mut Outcome,
) -> Result<(), String> {
    if let Some(want) = device {
        let cfg = read_toml(&dir.join(run).join("config.toml"))?;
        let got = lookup(&cfg, "train.device").and_then(|v| v.as_str()).unwrap_or("cpu").to_string();
        o.rule(got == want, format!("{run} trained with train.device = \"{want}\" (its config.toml: \"{got}\")"));
    }
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

// ---------- numbers in ANSWER.md ----------

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

/// Does `text` write a number within `tol` of `v`?
fn reports(text: &str, v: f64, tol: f64) -> bool {
    numbers(text).iter().any(|x| (x - v).abs() <= tol)
}

/// The first run of digits in `line`, `,` and `_` separators removed.
fn first_int(line: &str) -> Option<u64> {
    let cleaned: String = line.chars().filter(|c| *c != ',' && *c != '_').collect();
    cleaned.split(|c: char| !c.is_ascii_digit()).find(|w| !w.is_empty()).and_then(|w| w.parse().ok())
}

/// The first integer after `label` on the first line of `text` that contains it (case-insensitive).
pub fn labelled_int(text: &str, label: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let low = l.to_lowercase();
        low.find(&label.to_lowercase()).and_then(|i| first_int(&low[i + label.len()..]))
    })
}
