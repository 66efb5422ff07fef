//! GPU checks: whether this machine has a CUDA GPU ([`probe`], asked of pith itself, so the answer
//! is the one training would get), and the kernel-profile check ([`profile`]): ANSWER.md's three
//! heaviest ops against `pith bench --profile` run here, with order swaps and boundary ties within
//! a tolerance allowed, because two profiles of the same step never agree to the microsecond.

use super::operate::numbers;
use super::{answer, pith_bin, push_sets, run_pith, tail, Env, Outcome};
use std::path::Path;

/// What pith says when there is no GPU to open (host/src/gpu/mod.rs, `Gpu::open`).
const NO_GPU: [&str; 2] = ["no NVIDIA driver", "no usable GPU"];

/// Prefix of every failure that means "this machine has no GPU", so callers can tell it apart.
pub const NEEDS_GPU: &str = "needs a CUDA GPU";

/// `Err("needs a CUDA GPU: ...")` when `out` (pith's output) is pith refusing for want of a GPU.
fn no_gpu(out: &str) -> Result<(), String> {
    match out.lines().find(|l| NO_GPU.iter().any(|m| l.contains(m))) {
        Some(l) => Err(format!("{NEEDS_GPU}; pith says: {}", l.trim())),
        None => Ok(()),
    }
}

/// Is there a GPU pith can open? Asks `pith plugins check adamw --device cuda` (CPU checks, then
/// GPU 0); only pith's no-GPU refusal counts as "no": any other outcome means a GPU is there.
pub fn probe(pith: &Path, dir: &Path) -> Result<(), String> {
    let args: Vec<String> =
        ["plugins", "check", "adamw", "--kind", "optimizer", "--device", "cuda"].map(String::from).into();
    let (_, out) = run_pith(pith, dir, &args)?;
    no_gpu(&out)
}

/// One op of a profile: name and GPU ms in the profiled step.
pub type Op = (String, f64);

/// `pith bench CONFIG --set ... --warmup 3 --steps 2 --profile` → the ops heaviest first.
fn bench_profile(pith: &Path, dir: &Path, config: &str, set: &[String]) -> Result<Vec<Op>, String> {
    let mut args = vec!["bench".to_string(), config.to_string()];
    push_sets(&mut args, set);
    args.extend(["--warmup", "3", "--steps", "2", "--profile"].map(String::from));
    let (code, out) = run_pith(pith, dir, &args)?;
    if code != 0 {
        no_gpu(&out)?;
        return Err(format!("`pith {}` failed: {}", args.join(" "), tail(&out, 3).join(" | ")));
    }
    let json = out.lines().rev().find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok());
    let prof = json.as_ref().and_then(|v| v["profile_ms"].as_object());
    let Some(prof) = prof else {
        return Err(format!("`pith {}` printed no JSON line with `profile_ms`", args.join(" ")));
    };
    let mut ops: Vec<Op> = prof.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect();
    ops.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(ops)
}

/// The `name: P%` lines of an answer, in order: (name, percent). A list marker (`-`, `*`, `1.`,
/// `1)`) and markdown emphasis or backticks around the name are ignored.
pub fn reported(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(':')?;
            let value = value.trim().strip_suffix('%')?;
            let p = *numbers(value).first()?;
            let mut name = name.trim();
            for marker in ["- ", "* ", "+ "] {
                name = name.strip_prefix(marker).unwrap_or(name);
            }
            let digits = name.chars().take_while(|c| c.is_ascii_digit()).count();
            if digits > 0 && name[digits..].starts_with(['.', ')']) {
                name = &name[digits + 1..];
            }
            let name = name.trim().trim_matches(['`', '*', '_', '"']).trim();
            (!name.is_empty()).then(|| (name.to_string(), p))
        })
        .collect()
}

/// Does `answer` (from [`reported`]) name the `top` heaviest ops of `ops` (heaviest first)?
/// - exactly `top` distinct names, each an op of the profile;
/// - each within `within` (relative) of the `top`-th heaviest op's time or above it, so an op that
///   ties the boundary may stand in for the one it ties;
/// - heaviest first, a swap allowed between ops within `within` of each other;
/// - each percent within `pct_tol` points + `within` × the measured share of the step's kernel time.
///
/// `Ok(the rules met)` or `Err(the rules broken)`.
pub fn judge(
    ops: &[Op],
    answer: &[(String, f64)],
    top: usize,
    within: f64,
    pct_tol: f64,
) -> Result<Vec<String>, Vec<String>> {
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    let total: f64 = ops.iter().map(|o| o.1).sum();
    let boundary = ops.get(top.saturating_sub(1)).map_or(0.0, |o| o.1);
    let names: Vec<String> = answer.iter().map(|a| a.0.to_lowercase()).collect();
    let distinct = names.iter().enumerate().all(|(i, n)| !names[..i].contains(n));
    let count = format!("ANSWER.md has {top} distinct `name: P%` lines (got {})", answer.len());
    if answer.len() != top || !distinct {
        return Err(vec![count]);
    }
    ok.push(count);
    let mut prev: Option<(&str, f64)> = None;
    for (name, pct) in answer {
        let Some((op, ms)) = ops.iter().find(|o| o.0.eq_ignore_ascii_case(name)).map(|o| (o.0.as_str(), o.1)) else {
            let known: Vec<&str> = ops.iter().take(8).map(|o| o.0.as_str()).collect();
            bad.push(format!("`{name}` is not an op of the profile (heaviest: {})", known.join(", ")));
            continue;
        };
        let heavy = format!(
            "`{op}` ({ms:.3} ms) is among the {top} heaviest (number {top}: {boundary:.3} ms; {:.0}% tolerance)",
            within * 100.0
        );
        if ms >= boundary * (1.0 - within) {
            ok.push(heavy)
        } else {
            bad.push(heavy)
        }
        if let Some((p, pms)) = prev {
            let order = format!(
                "listed heaviest first: `{p}` ({pms:.3} ms), then `{op}` ({ms:.3} ms); swaps within {:.0}% allowed",
                within * 100.0
            );
            if ms <= pms * (1.0 + within) {
                ok.push(order)
            } else {
                bad.push(order)
            }
        }
        prev = Some((op, ms));
        let share = 100.0 * ms / total.max(1e-12);
        let pct_ok = (pct - share).abs() <= pct_tol + within * share;
        let pct_rule = format!("`{op}`: {pct}% reported, {share:.1}% of the step's kernel time measured");
        if pct_ok {
            ok.push(pct_rule)
        } else {
            bad.push(pct_rule)
        }
    }
    if bad.is_empty() {
        Ok(ok)
    } else {
        Err(bad)
    }
}

/// ANSWER.md names the `top` heaviest ops (kernels and GEMMs) of one step of `config` on the GPU
/// with their share of the step's kernel time, judged ([`judge`]) against `pith bench --profile`
/// run here; profiles are noisy, so up to `runs` profiles are taken and one agreeing is enough.
#[allow(clippy::too_many_arguments)]
pub fn profile(
    config: &str,
    set: &[String],
    top: usize,
    within: f64,
    pct_tol: f64,
    runs: usize,
    dir: &Path,
    env: &Env,
    o: &mut Outcome,
) -> Result<(), String> {
    let ans = reported(&answer(dir)?);
    let pith = pith_bin(dir, env)?;
    let mut broken = Vec::new();
    for i in 1..=runs.max(1) {
        let ops = bench_profile(&pith, dir, config, set)?;
        let total: f64 = ops.iter().map(|o| o.1).sum();
        let heaviest: Vec<String> =
            ops.iter().take(top + 2).map(|(n, ms)| format!("{n} {ms:.3} ms ({:.1}%)", 100.0 * ms / total)).collect();
        o.notes.push(format!("profile {i}: {} ops, {total:.2} ms; heaviest: {}", ops.len(), heaviest.join(", ")));
        match judge(&ops, &ans, top, within, pct_tol) {
            Ok(rules) => {
                rules.into_iter().for_each(|r| o.rule(true, r));
                return Ok(());
            }
            Err(b) => broken = b,
        }
    }
    broken.into_iter().for_each(|r| o.rule(false, r));
    Ok(())
}
