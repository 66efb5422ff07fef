//! `pith plugins check`: how a component proves itself, on the CPU backend, with random inputs
//! (never zeros).
//!
//! - Gradients (Router, Experts, CommSchedule, BalanceLoss): L = Σ r·outputs for a fixed random
//!   r; central differences (±EPS, the loss summed in f64) on up to COORDS random coordinates of
//!   every input and parameter. Analytic a and numeric n agree when
//!   (|a−n| − noise) / max(|a|+|n|, FLOOR·scale) < TOL, where scale = the largest |a| or |n| of
//!   that tensor (so a tensor whose grads are all small, from a 0.001 loss coefficient, is still
//!   checked relative to itself) and noise = the f32 round-off of the outputs that moved, divided
//!   by the step (it matters for a loss: one f32 scalar whose grads are tiny next to its value).
//!   A router coordinate whose ±EPS changes the top-k ids is skipped (and counted); tokens with
//!   nearly tied k-th/(k+1)-th logits are redrawn first, so skips are rare.
//! - The backward contract: backward runs again with every grad buffer pre-filled with noise of
//!   the grads' own size; parameter grads and d_logits must ACCUMULATE onto it, input grads must
//!   OVERWRITE it (to within CONTRACT of the grads' size).
//! - Determinism: forward+backward runs give bitwise-identical outputs and grads.
//! - Optimizers: 200 steps at lr 1e-2 on ½Σ(w−target)² cut it by >90%, bitwise reproducibly;
//!   a zero-grad step leaves a decay=false param untouched and never grows a decay=true one.
//!
//! Parameters are drawn at unit gain — N(0, 1/fan), fan = the larger of the last two dims (Zeros
//! and Ones inits get ±0.1 noise) — not at the training init, so activations and grads are O(1)
//! and the finite differences are well conditioned in f32.

use crate::cpu::{view, view_i32, view_mut, CpuOps};
use crate::params::Params;
use crate::rng::Rng;
use abi_stable::std_types::{RResult, RSlice, RString};
use pith_plugin_api::abi::{BalanceLossBox, CommScheduleBox, Component, ExpertsBox, OptimizerBox, RouterBox};
use pith_plugin_api::{DType, Init, ModelDims, ParamSpec, RouterOut, Slot, Tensor, EMPTY};

/// Finite-difference step: 1e-2 where the component is smooth (truncation error ~eps² ≈ 1e-4
/// relative, and 10× less f32 round-off than 1e-3), 1e-3 for routers, whose top-k choice a
/// larger step would flip.
const EPS: f32 = 1e-2;
const EPS_ROUTER: f32 = 1e-3;
/// Largest accepted relative error between analytic and numeric gradients.
const TOL: f64 = 2e-2;
/// Coordinates with grads below FLOOR·(the tensor's largest) are compared on that absolute scale.
const FLOOR: f64 = 0.1;
/// Coordinates checked per tensor.
const COORDS: usize = 20;
/// Minimum gap between a token's k-th and (k+1)-th router logits.
pub(crate) const GAP: f32 = 0.05;
/// Backward-contract tolerance, relative to the largest grad of the tensor.
const CONTRACT: f64 = 1e-4;

type R<T> = Result<T, String>;
type Fwd<'a> = Box<dyn Fn() -> R<(Vec<f32>, Vec<i32>)> + 'a>;
type Bwd<'a> = Box<dyn Fn(&[f32], &[Vec<f32>]) -> R<(Vec<f32>, Vec<Vec<f32>>)> + 'a>;

/// How backward must treat a grad buffer.
#[derive(Clone, Copy, PartialEq)]
enum Grad {
    Write,
    Accumulate,
    /// Accumulated, but not a derivative (straight-through): checked for the contract,
    /// finiteness and determinism, not by finite differences.
    Surrogate,
}

/// A differentiable component, reduced to what the generic checks need.
struct Case<'a> {
    /// What to differentiate with respect to (inputs, then parameters), and how its grad is given.
    wrt: Vec<(String, Tensor, Grad)>,
    /// Forward: every continuous output, flattened, and the discrete choices (router ids).
    fwd: Fwd<'a>,
    /// Forward, then backward with output grad r, each `wrt` grad buffer starting from the
    /// given values: the outputs and the final grad buffers.
    bwd: Bwd<'a>,
}

/// Check component `c` for a model of size `dims` on `tokens` tokens (routers, comm schedules,
/// losses; 0: 8, or 16 for losses); `label` (e.g. "router topk-softmax") prefixes every line.
/// Returns the PASS lines (what was exercised among them), or the first failure.
pub fn check_component(c: &Component, label: &str, dims: ModelDims, seed: u64, tokens: usize) -> R<Vec<String>> {
    let cpu = CpuOps::default();
    let ctx =
        pith_plugin_api::Context { step: 1, micro_batches: 1, batch: 1, training: true, seed, ..Default::default() };
    let mut rng = Rng::new(seed);
    let t = |default: usize| if tokens == 0 { default } else { tokens };
    cpu.calls().set(pith_plugin_api::Context { seq: t(8) as u32, ..ctx }, seed);
    let lines = match c {
        Component::Router(r) => check_router(&cpu, r, dims, t(8), &mut rng),
        Component::Experts(e) => check_experts(&cpu, e, dims.local_experts as usize, dims, &mut rng),
        Component::Shared(e) => check_experts(&cpu, e, 1, dims, &mut rng),
        Component::BalanceLoss(l) => {
            cpu.calls().set(pith_plugin_api::Context { seq: t(16) as u32, ..ctx }, seed);
            check_loss(&cpu, l, dims, t(16), &mut rng)
        }
        Component::CommSchedule(s) => check_comm(&cpu, s, dims, t(8), &mut rng),
        Component::Optimizer(o) => check_optimizer(&cpu, o, &mut rng),
    };
    cpu.reset();
    let lines = lines.map_err(|e| format!("FAIL {label}: {e}"))?;
    Ok(lines.iter().map(|l| format!("PASS {label}: {l}")).collect())
}

pub(crate) fn ok<T>(r: RResult<T, RString>) -> R<T> {
    r.into_result().map_err(|e| e.to_string())
}

pub(crate) fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * std).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

pub(crate) fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

pub(crate) fn sl(t: &[Tensor]) -> RSlice<'_, Tensor> {
    RSlice::from_slice(t)
}

/// The component's parameters, drawn at unit gain (see the module doc).
pub(crate) fn make_params(specs: Vec<ParamSpec>, rng: &mut Rng) -> Params {
    let mut ps = Params::default();
    ps.add("check", specs, rng.next_u64());
    for p in &mut ps.list {
        let fan = p.spec.shape.iter().rev().take(2).max().map_or(1, |&d| d.max(1)) as f32;
        for w in &mut p.w {
            *w = match p.spec.init {
                Init::Normal(_) => rng.normal() / fan.sqrt(),
                Init::Zeros | Init::Ones | Init::Constant(_) => *w + 0.1 * rng.normal(),
            };
        }
    }
    ps
}

/// Set the tensors `g` to `init` (a backward's starting grads).
fn load(g: &[Tensor], init: &[Vec<f32>]) {
    // SAFETY: each grad is its own host buffer, and no slice of it is alive here.
    g.iter().zip(init).for_each(|(t, v)| unsafe { t.f32s_mut() }.copy_from_slice(v));
}

/// Named trained params for `Case::wrt` (their grads accumulate), and the lines saying which
/// were left out: buffers and accumulators have no gradient. A surrogate gradient
/// (straight-through) is not a derivative, so it is checked for all but finite differences.
type Wrt = Vec<(String, Tensor, Grad)>;

fn param_wrt(ps: &Params, w: &[Tensor], g: &[Tensor]) -> (Wrt, Vec<Tensor>, Vec<String>) {
    let (mut wrt, mut grads, mut lines) = (Vec::new(), Vec::new(), Vec::new());
    for ((p, &t), &gt) in ps.list.iter().zip(w).zip(g) {
        let name = &p.spec.name;
        if !p.trained() {
            lines.push(format!("{name}: a {:?}, no gradient", p.spec.role));
        } else {
            let how = if p.spec.surrogate { Grad::Surrogate } else { Grad::Accumulate };
            wrt.push((format!("param {name}"), t, how));
            grads.push(gt);
        }
    }
    (wrt, grads, lines)
}

/// Determinism, the backward contract, then the finite-difference check of every `wrt` tensor.
fn run_case(case: Case, rng: &mut Rng, eps: f32) -> R<Vec<String>> {
    let (out0, ids0) = (case.fwd)()?;
    if let Some(i) = out0.iter().position(|v| !v.is_finite()) {
        return Err(format!("forward output {i} is {}", out0[i]));
    }
    let r = randn(rng, out0.len(), 1.0);
    let zeros: Vec<Vec<f32>> = case.wrt.iter().map(|w| vec![0.0; w.1.numel()]).collect();
    let (o1, g1) = (case.bwd)(&r, &zeros)?;
    // Noise the size of each tensor's grads, so a lost accumulate or write can't hide.
    let noise: Vec<_> = g1.iter().map(|g| randn(rng, g.len(), max_abs(g).max(1e-30))).collect();
    let ((o2, g2), (o3, g3)) = ((case.bwd)(&r, &noise)?, (case.bwd)(&r, &noise)?);
    if [&o1, &o2, &o3].iter().any(|o| bits(o) != bits(&out0)) {
        return Err("determinism: forward runs on the same inputs gave different outputs".into());
    }
    for (i, (name, _, how)) in case.wrt.iter().enumerate() {
        let (a, clean, z) = (&g2[i], &g1[i], &noise[i]);
        if bits(a) != bits(&g3[i]) {
            return Err(format!("determinism: two backward runs gave different grads for {name}"));
        }
        if let Some(j) = clean.iter().position(|v| !v.is_finite()) {
            return Err(format!("grad of {name}[{j}] is {}", clean[j]));
        }
        let base = |j: usize| if *how == Grad::Write { 0.0 } else { z[j] };
        let tol = CONTRACT * max_abs(z) as f64;
        if let Some(j) = (0..a.len()).find(|&j| ((a[j] - base(j)) as f64 - clean[j] as f64).abs() > tol) {
            let rule = match how {
                Grad::Write => "OVERWRITE its buffer (it added to or kept what was there)",
                _ => "ADD to its buffer (it overwrote or ignored what was there)",
            };
            let (a, z, c) = (a[j], z[j], clean[j]);
            return Err(format!("backward contract: grad of {name} must {rule}; [{j}] is {a} from {z}, {c} from 0"));
        }
    }
    let names = |g| case.wrt.iter().filter(|w| w.2 == g).map(|w| &w.0).collect::<Vec<_>>();
    let (n, wr) = (o1.len(), names(Grad::Write));
    let ac = [names(Grad::Accumulate), names(Grad::Surrogate)].concat();
    let mut lines = vec![
        format!("determinism: {n} outputs and all grads bitwise identical over repeated runs"),
        format!("backward contract: overwrites {wr:?}, adds to {ac:?}"),
    ];
    let outputs = || -> R<Option<Vec<f32>>> {
        let (o, ids) = (case.fwd)()?;
        Ok((ids == ids0).then_some(o))
    };
    for ((name, t, how), ana) in case.wrt.iter().zip(&g1) {
        lines.push(if *how == Grad::Surrogate {
            let nonzero = ana.iter().filter(|&&v| v != 0.0).count();
            format!(
                "{name}: surrogate gradient, finite, nonzero on {nonzero} of {} (not a derivative: no finite \
                 differences)",
                ana.len()
            )
        } else {
            grad_check(name, *t, ana, &r, rng, eps, &outputs)?
        });
    }
    Ok(lines)
}

/// Central differences of `loss` on up to COORDS coordinates of `t`, against `ana`.
fn grad_check(
    name: &str,
    t: Tensor,
    ana: &[f32],
    r: &[f32],
    rng: &mut Rng,
    eps: f32,
    outputs: &dyn Fn() -> R<Option<Vec<f32>>>,
) -> R<String> {
    let (n, na) = (t.numel(), ana.len());
    if na != n {
        return Err(format!("grad of {name} has {na} elements, expected {n}"));
    }
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..n.min(COORDS) {
        idx.swap(i, i + rng.below(n - i));
    }
    idx.truncate(COORDS);
    let (mut pairs, mut skipped) = (Vec::new(), 0);
    for &i in &idx {
        // SAFETY: a single store each, with no slice of `t` alive.
        let set = |v: f32| unsafe { t.f32s_mut()[i] = v };
        let x0 = t.f32s()[i];
        let (xp, xm) = (x0 + eps, x0 - eps);
        set(xp);
        let op = outputs();
        set(xm);
        let om = outputs();
        set(x0);
        let (Some(op), Some(om)) = (op?, om?) else {
            skipped += 1;
            continue;
        };
        // L(+) − L(−) = Σ r·(o+ − o−) over the outputs that moved (all of them when none did);
        // each f32 output carries up to half an ulp (≤ |o|·ε/2) of round-off, which bounds the
        // numeric grad's noise.
        let moved = op.iter().zip(&om).any(|(p, m)| p != m);
        let (mut dl, mut noise) = (0.0f64, 0.0f64);
        for ((&p, &m), &w) in op.iter().zip(&om).zip(r) {
            if p != m || !moved {
                dl += w as f64 * (p as f64 - m as f64);
                noise += (w * (p.abs() + m.abs()) * f32::EPSILON / 2.0).abs() as f64;
            }
        }
        let h = xp as f64 - xm as f64;
        pairs.push((i, ana[i] as f64, dl / h, noise / h));
    }
    if pairs.len() * 2 < idx.len() {
        let m = idx.len();
        return Err(format!("{name}: {skipped} of {m} coordinates changed the top-k ids under ±{eps}"));
    }
    let scale = pairs.iter().fold(max_abs(ana) as f64, |m, p| m.max(p.2.abs()));
    let (mut worst, mut raw, mut at) = (0.0, 0.0f64, pairs[0]);
    for &(i, a, n, noise) in &pairs {
        let den = (a.abs() + n.abs()).max(FLOOR * scale).max(1e-30);
        let err = ((a - n).abs() - noise).max(0.0) / den;
        raw = raw.max((a - n).abs() / den);
        if err > worst || err.is_nan() {
            (worst, at) = (err, (i, a, n, noise));
        }
    }
    if worst >= TOL || worst.is_nan() {
        let (i, a, n, noise) = at;
        let why = format!("relative error {worst:.2e} > {TOL:.0e}");
        return Err(format!(
            "grad of {name}[{i}]: analytic {a:.6e} vs numeric {n:.6e} (±{noise:.1e} round-off), {why}"
        ));
    }
    let m = pairs.len();
    let skip = match skipped {
        0 => String::new(),
        s => format!(", {s} skipped (a routing or drop decision changed)"),
    };
    let beyond = format!("{worst:.1e} beyond f32 round-off");
    Ok(format!("grad {name}: {m} coords, max rel err {raw:.1e} ({beyond}) < {TOL:.0e}{skip}"))
}

fn check_router(cpu: &CpuOps, r: &RouterBox, dims: ModelDims, t: usize, rng: &mut Rng) -> R<Vec<String>> {
    let (h, e) = (dims.hidden as usize, dims.experts as usize);
    let mut ps = make_params(r.params().into_vec(), rng);
    let (w, g) = (ps.weights(0..ps.list.len()), ps.grads(0..ps.list.len()));
    let mut xv = randn(rng, t * h, 1.0);
    let x = view_mut(&mut xv, &[t, h]);
    let fwd = || -> R<RouterOut> {
        let o = ok(r.forward(cpu.ops(), sl(&w), x))?;
        let k = o.ids.dim(-1);
        let dims = [o.logits.dims(), o.probs.dims(), o.ids.dims(), o.weights.dims()];
        if dims != [vec![t, e], vec![t, e], vec![t, k], vec![t, k]] || o.ids.dtype != DType::I32 {
            return Err(format!(
                "forward: logits, probs, ids, weights are {dims:?}; expected [[{t}, {e}], [{t}, {e}], [{t}, k], [{t}, k]], ids i32"
            ));
        }
        crate::decoder::check_ids(o.ids.i32s(), e, "forward")?;
        Ok(o)
    };
    // Redraw tokens whose k-th and (k+1)-th logits nearly tie, so ±EPS rarely flips the top-k set.
    for _ in 0..100 {
        let o = fwd()?;
        let (k, mut tied) = (o.ids.dim(1), false);
        for tok in (0..t).filter(|_| k < e) {
            let mut row = o.logits.f32s()[tok * e..(tok + 1) * e].to_vec();
            row.sort_by(|a, b| b.total_cmp(a));
            if row[k - 1] - row[k] < GAP {
                tied = true;
                // SAFETY: x is the check's own input buffer; `o` holds no slice of it.
                let xs = unsafe { x.f32s_mut() };
                xs[tok * h..(tok + 1) * h].fill_with(|| rng.normal());
            }
        }
        cpu.reset();
        if !tied {
            break;
        }
    }
    let flat = |o: &RouterOut| [o.logits.f32s(), o.probs.f32s(), o.weights.f32s()].concat();
    let mut wrt = vec![("input x".to_string(), x, Grad::Write)];
    let (pw, g, mut lines) = param_wrt(&ps, &w, &g);
    wrt.extend(pw);
    let (g, gall) = (g, ps.grads(0..ps.list.len()));
    let case = Case {
        wrt,
        fwd: Box::new(|| {
            let o = fwd()?;
            let res = (flat(&o), o.ids.i32s().to_vec());
            cpu.reset();
            Ok(res)
        }),
        bwd: Box::new(|rv: &[f32], init: &[Vec<f32>]| {
            let o = fwd()?;
            let k = o.ids.dim(1);
            let (dl, dp, dw) = (&rv[..t * e], &rv[t * e..2 * t * e], &rv[2 * t * e..]);
            let mut dx = init[0].clone();
            load(&g, &init[1..]);
            let (dw, dp, dl, dxt) =
                (view(dw, &[t, k]), view(dp, &[t, e]), view(dl, &[t, e]), view_mut(&mut dx, &[t, h]));
            ok(r.backward(cpu.ops(), sl(&w), sl(&gall), x, &o, dw, dp, dl, dxt))?;
            let mut grads = vec![dx];
            grads.extend(g.iter().map(|t| t.f32s().to_vec()));
            let res = (flat(&o), grads);
            cpu.reset();
            Ok(res)
        }),
    };
    // What the check exercised: slots used per token and experts chosen.
    let o = fwd()?;
    let (k, ids) = (o.ids.dim(1), o.ids.i32s().to_vec());
    cpu.reset();
    let used: Vec<usize> = ids.chunks(k).map(|r| r.iter().filter(|&&i| i != EMPTY).count()).collect();
    let hit = (0..e as i32).filter(|x| ids.contains(x)).count();
    let (lo, hi) = (used.iter().min().unwrap_or(&0), used.iter().max().unwrap_or(&0));
    lines.push(format!("routes {t} tokens: {lo}..={hi} of {k} slots used per token, {hit} of {e} experts chosen"));
    lines.extend(run_case(case, rng, EPS_ROUTER)?);
    Ok(lines)
}

/// Experts over `e` groups (1 for a shared expert, which sees every token as one group).
fn check_experts(cpu: &CpuOps, ex: &ExpertsBox, e: usize, dims: ModelDims, rng: &mut Rng) -> R<Vec<String>> {
    let h = dims.hidden as usize;
    let n = 3 * e + 2;
    // Random group sizes, one group empty (when there are two or more).
    let mut off = vec![0i32; e + 1];
    (0..n).for_each(|_| off[rng.below(e) + 1] += 1);
    if e > 1 {
        let z = rng.below(e) + 1;
        off[z % e + 1] += std::mem::take(&mut off[z]);
    }
    (0..e).for_each(|i| off[i + 1] += off[i]);
    let offsets = view_i32(&off, &[e + 1]);
    let mut ps = make_params(ex.params().into_vec(), rng);
    let (w, g) = (ps.weights(0..ps.list.len()), ps.grads(0..ps.list.len()));
    let mut xv = randn(rng, n * h, 1.0);
    let x = view_mut(&mut xv, &[n, h]);
    let fwd = || -> R<pith_plugin_api::ExpertsOut> {
        let out = ok(ex.forward(cpu.ops(), sl(&w), x, offsets))?;
        match out.y.dims() == [n, h] {
            true => Ok(out),
            false => Err(format!("forward: y is {:?}, expected [{n}, {h}]", out.y.dims())),
        }
    };
    let mut wrt = vec![("input x".to_string(), x, Grad::Write)];
    let (pw, g, skipped) = param_wrt(&ps, &w, &g);
    wrt.extend(pw);
    let gall = ps.grads(0..ps.list.len());
    let case = Case {
        wrt,
        fwd: Box::new(|| {
            let y = fwd()?.y.f32s().to_vec();
            cpu.reset();
            Ok((y, vec![]))
        }),
        bwd: Box::new(|rv: &[f32], init: &[Vec<f32>]| {
            let out = fwd()?;
            let mut dx = init[0].clone();
            load(&g, &init[1..]);
            let (dy, dxt) = (view(rv, &[n, h]), view_mut(&mut dx, &[n, h]));
            ok(ex.backward(cpu.ops(), sl(&w), sl(&gall), x, offsets, &out, dy, dxt))?;
            let mut grads = vec![dx];
            grads.extend(g.iter().map(|t| t.f32s().to_vec()));
            let res = (out.y.f32s().to_vec(), grads);
            cpu.reset();
            Ok(res)
        }),
    };
    let mut lines = run_case(case, rng, EPS)?;
    let sizes: Vec<i32> = off.windows(2).map(|p| p[1] - p[0]).collect();
    let rows: Vec<u64> = sizes.iter().map(|&s| s as u64).collect();
    let flops = ex.flops(RSlice::from_slice(&rows));
    if !flops.is_finite() || flops < 0.0 {
        return Err(format!("flops({rows:?}) = {flops}: must be finite and >= 0"));
    }
    lines.insert(0, format!("{n} rows in groups {sizes:?}; forward {flops:.0} FLOPs by its own count"));
    lines.extend(skipped);
    Ok(lines)
}

/// `k` distinct random experts for each of `t` tokens.
pub(crate) fn random_ids(rng: &mut Rng, t: usize, k: usize, e: usize) -> Vec<i32> {
    let mut ids = Vec::with_capacity(t * k);
    for _ in 0..t {
        let mut all: Vec<i32> = (0..e as i32).collect();
        for j in 0..k {
            all.swap(j, j + rng.below(e - j));
        }
        ids.extend_from_slice(&all[..k]);
    }
    ids
}

/// A route for `t` tokens as a router would give it: `logits`, their softmax, `ids` and `weights`.
pub(crate) fn route_of(
    logits: &mut [f32],
    probs: &mut Vec<f32>,
    ids: &[i32],
    weights: &mut [f32],
    e: usize,
) -> RouterOut {
    let (t, k) = (logits.len() / e, ids.len() / (logits.len() / e));
    let softmax = |row: &[f32]| {
        let m = row.iter().fold(f32::MIN, |a, &b| a.max(b));
        let z: f32 = row.iter().map(|&v| (v - m).exp()).sum();
        row.iter().map(|&v| (v - m).exp() / z).collect::<Vec<f32>>()
    };
    *probs = logits.chunks(e).flat_map(softmax).collect();
    RouterOut {
        logits: view_mut(logits, &[t, e]),
        probs: view_mut(probs, &[t, e]),
        ids: view_i32(ids, &[t, k]),
        weights: view_mut(weights, &[t, k]),
        saved: Default::default(),
    }
}

fn check_comm(cpu: &CpuOps, s: &CommScheduleBox, dims: ModelDims, t: usize, rng: &mut Rng) -> R<Vec<String>> {
    let (h, e) = (dims.hidden as usize, dims.experts as usize);
    let k = e.min(2);
    // One empty slot (as a router using fewer than k experts leaves): it must cost and move nothing.
    let mut idv = random_ids(rng, t, k, e);
    idv[rng.below(t * k)] = EMPTY;
    let mut xv = randn(rng, t * h, 1.0);
    let mut wv: Vec<f32> = idv.iter().map(|&i| if i == EMPTY { 0.0 } else { 0.1 + rng.uniform() }).collect();
    let (mut lv, mut pv) = (randn(rng, t * e, 1.0), Vec::new());
    let route = route_of(&mut lv, &mut pv, &idv, &mut wv, e);
    let (x, wt) = (view_mut(&mut xv, &[t, h]), route.weights);
    // Stand-in experts: y = gain_e · x_sorted, a different gain per expert, so routing a row to
    // the wrong expert changes the result.
    let gain = |ex: usize| 1.0 + 0.5 * ex as f32;
    let scale_rows = |src: &[f32], off: &[i32]| -> Vec<f32> {
        let mut y = src.to_vec();
        for ex in 0..e {
            let rows = off[ex] as usize * h..off[ex + 1] as usize * h;
            y[rows].iter_mut().for_each(|v| *v *= gain(ex));
        }
        y
    };
    let dispatch = || -> R<(pith_plugin_api::Dispatched, Vec<f32>)> {
        let d = ok(s.dispatch(cpu.ops(), x, &route, e as u32))?;
        let (off, n) = (d.offsets.i32s(), d.x.dim(0));
        let fits = off.len() == e + 1 && off[0] == 0 && off[e] as usize == n && d.x.dim(1) == h;
        if !fits || off.windows(2).any(|p| p[0] > p[1]) {
            let x = d.x.dims();
            return Err(format!("dispatch: offsets {off:?} do not split x {x:?} into {e} groups"));
        }
        if n >= t * k {
            return Err(format!(
                "dispatch: {n} rows for {} slots of which one is empty: empty slots must not move",
                t * k
            ));
        }
        let y = scale_rows(d.x.f32s(), off);
        Ok((d, y))
    };
    let noise_seed = rng.next_u64();
    let case = Case {
        wrt: vec![("input x".into(), x, Grad::Write), ("input weights".into(), wt, Grad::Write)],
        fwd: Box::new(|| {
            let (d, y) = dispatch()?;
            let yt = view(&y, &[y.len() / h, h]);
            let out = ok(s.combine(cpu.ops(), yt, &route, &d))?.f32s().to_vec();
            // The discrete decisions: the groups and which token each dispatched row came from
            // (x's rows are distinct), so a finite difference that flips a drop is not compared.
            let mut kept = d.offsets.i32s().to_vec();
            let from = |r: &[f32]| x.f32s().chunks(h).position(|xr| bits(xr) == bits(r)).map_or(-1, |i| i as i32);
            kept.extend(d.x.f32s().chunks(h).map(from));
            cpu.reset();
            Ok((out, kept))
        }),
        bwd: Box::new(|rv: &[f32], init: &[Vec<f32>]| {
            let (d, y) = dispatch()?;
            let n = y.len() / h;
            let yt = view(&y, &[n, h]);
            let out = ok(s.combine(cpu.ops(), yt, &route, &d))?.f32s().to_vec();
            // dy is written by combine_backward: start it from noise too.
            let mut dy = randn(&mut Rng::new(noise_seed), n * h, 1.0);
            let (mut dx, mut dw) = (init[0].clone(), init[1].clone());
            let (dyt, dwt) = (view_mut(&mut dy, &[n, h]), view_mut(&mut dw, &[t, k]));
            ok(s.combine_backward(cpu.ops(), view(rv, &[t, h]), yt, &route, &d, dyt, dwt))?;
            let dxs = scale_rows(&dy, d.offsets.i32s());
            ok(s.dispatch_backward(cpu.ops(), view(&dxs, &[n, h]), &d, view_mut(&mut dx, &[t, h])))?;
            cpu.reset();
            Ok((out, vec![dx, dw]))
        }),
    };
    let (d, _) = dispatch()?;
    let sizes: Vec<i32> = d.offsets.i32s().windows(2).map(|w| w[1] - w[0]).collect();
    let (kept, slots) = (d.x.dim(0), t * k - 1);
    cpu.reset();
    let mut lines = vec![format!(
        "dispatch: rows per expert {sizes:?}; {kept} of {slots} non-empty slots kept ({} dropped), 1 empty slot skipped",
        slots - kept
    )];
    lines.extend(run_case(case, rng, EPS)?);
    Ok(lines)
}

/// A balance loss's forward accumulated onto `start`.
fn loss_value(cpu: &CpuOps, l: &BalanceLossBox, p: &[Tensor], route: &RouterOut, start: f32) -> R<f32> {
    let mut v = [start];
    ok(l.forward(cpu.ops(), sl(p), route, view_mut(&mut v, &[1])))?;
    Ok(v[0])
}

fn check_loss(cpu: &CpuOps, l: &BalanceLossBox, dims: ModelDims, t: usize, rng: &mut Rng) -> R<Vec<String>> {
    let e = dims.experts as usize;
    let k = e.min(2);
    let mut lv = randn(rng, t * e, 2.0);
    // The ids a top-k router would pick for these logits (held fixed, like the counts they give),
    // and one empty slot, which the loss must skip.
    let mut idv = Vec::with_capacity(t * k);
    for row in lv.chunks(e) {
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        idv.extend(order[..k].iter().map(|&i| i as i32));
    }
    idv[rng.below(t * k)] = EMPTY;
    let (mut pv, mut wv) = (Vec::new(), vec![0.5f32; t * k]);
    let route = route_of(&mut lv, &mut pv, &idv, &mut wv, e);
    let ps = make_params(l.params().into_vec(), rng);
    let p = ps.weights(0..ps.list.len());
    let (v, on_one) = (loss_value(cpu, l, &p, &route, 0.0)?, loss_value(cpu, l, &p, &route, 1.0)?);
    cpu.reset();
    if (on_one - 1.0 - v).abs() > 1e-5 * (1.0 + v.abs()) {
        return Err(format!("forward must ACCUMULATE into `loss`: onto 0 it gave {v}, onto 1 it gave {on_one}"));
    }
    // Logits and probs are independent inputs here: a loss's gradient reaches each separately.
    let case = Case {
        wrt: vec![
            ("input logits".into(), route.logits, Grad::Accumulate),
            ("input probs".into(), route.probs, Grad::Accumulate),
        ],
        fwd: Box::new(|| {
            let v = loss_value(cpu, l, &p, &route, 0.0)?;
            cpu.reset();
            Ok((vec![v], vec![]))
        }),
        bwd: Box::new(|rv: &[f32], init: &[Vec<f32>]| {
            let v = loss_value(cpu, l, &p, &route, 0.0)?;
            let (mut dl, mut dp) = (init[0].clone(), init[1].clone());
            let (dlt, dpt) = (view_mut(&mut dl, &[t, e]), view_mut(&mut dp, &[t, e]));
            ok(l.backward(cpu.ops(), sl(&p), &route, rv[0], dpt, dlt))?;
            cpu.reset();
            Ok((vec![v], vec![dl, dp]))
        }),
    };
    run_case(case, rng, EPS)
}

fn check_optimizer(cpu: &CpuOps, o: &OptimizerBox, rng: &mut Rng) -> R<Vec<String>> {
    let n = 64;
    let (w0, target) = (randn(rng, n, 0.5), randn(rng, n, 0.5));
    let quad = |w: &[f32]| -> Vec<f32> { w.iter().zip(&target).map(|(a, b)| a - b).collect() };
    let f = |w: &[f32]| quad(w).iter().map(|&d| 0.5 * d as f64 * d as f64).sum::<f64>();
    // `steps` steps from `w` with grads from `grad`; returns the final weights.
    let run_scaled = |spec: &ParamSpec, mut w: Vec<f32>, steps: u64, grad: &dyn Fn(&[f32]) -> Vec<f32>, scale: f32| {
        let name = spec.name.as_str();
        let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
        let mut state: Vec<Vec<f32>> = o.state(name.into(), spec).iter().map(|_| vec![0.0; n]).collect();
        let st: Vec<Tensor> = state.iter_mut().map(|s| view_mut(s, &shape)).collect();
        for step in 1..=steps {
            let mut g = grad(&w);
            let (wt, gt) = (view_mut(&mut w, &shape), view_mut(&mut g, &shape));
            let slot = Slot {
                name: name.into(),
                spec: spec.clone(),
                w: wt,
                g: gt,
                state: st.clone().into(),
                w_lowp: view(&[], &[0]),
            };
            let done = ok(o.step(cpu.ops(), RSlice::from_slice(&[slot]), 1e-2, step, scale))?;
            if done.zeroed_grads && g.iter().any(|&v| v != 0.0) {
                return Err("step says it zeroed the gradients, but they are not zero".into());
            }
            cpu.reset();
        }
        Ok::<_, String>(w)
    };
    let run = |spec: &ParamSpec, w: Vec<f32>, steps: u64, grad: &dyn Fn(&[f32]) -> Vec<f32>| {
        run_scaled(spec, w, steps, grad, 1.0)
    };
    let zero = |_: &[f32]| vec![0.0f32; n];
    let plain = ParamSpec::new("w", &[n], Init::Normal(0.02), false);
    let a = run(&plain, w0.clone(), 200, &quad)?;
    let b = run(&plain, w0.clone(), 200, &quad)?;
    let (f0, f1) = (f(&w0), f(&a));
    if f1 >= 0.1 * f0 || f1.is_nan() {
        return Err(format!(
            "200 steps at lr 1e-2 on ½Σ(w−target)² took f from {f0:.4} to {f1:.4}; expected a >90% cut"
        ));
    }
    if bits(&a) != bits(&b) {
        return Err("determinism: two runs of 200 steps gave different weights".into());
    }
    let mut lines = vec![
        format!("quadratic: f {f0:.4} -> {f1:.2e} in 200 steps at lr 1e-2"),
        "determinism: two 200-step runs bitwise identical".into(),
    ];
    // grad_scale (the clip factor) multiplies the gradient: scale 0.25 on g == scale 1 on g/4.
    let quarter = |w: &[f32]| quad(w).iter().map(|g| g * 0.25).collect::<Vec<f32>>();
    let (s, q) = (run_scaled(&plain, w0.clone(), 5, &quad, 0.25)?, run(&plain, w0.clone(), 5, &quarter)?);
    let diff = s.iter().zip(&q).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    if diff > 1e-5 * (1.0 + max_abs(&q)) {
        return Err(format!(
            "grad_scale 0.25 and gradients ÷4 differ by {diff:.2e} after 5 steps: grad_scale must scale the gradient"
        ));
    }
    lines.push("grad_scale: scaling by 0.25 equals gradients ÷ 4".into());
    if bits(&run(&plain, w0.clone(), 1, &zero)?) != bits(&w0) {
        return Err("a zero-grad step changed a decay = false param (decay must skip it)".into());
    }
    lines.push("decay = false: a zero-grad step leaves the param unchanged".into());
    let decayed = ParamSpec::new("w", &[n], Init::Normal(0.02), true);
    let norm = |w: &[f32]| w.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    let (n0, n1) = (norm(&w0), norm(&run(&decayed, w0.clone(), 1, &zero)?));
    if n1 > n0 {
        return Err(format!("a zero-grad step grew a decay = true param's norm from {n0:.6} to {n1:.6}"));
    }
    lines.push(match n1 < n0 {
        true => format!("decay = true: a zero-grad step shrinks the norm {n0:.6} -> {n1:.6}"),
        false => "decay = true: a zero-grad step leaves it unchanged (no weight decay set)".into(),
    });
    // A weight matrix by its full name (optimizers with parameter groups treat these apart from
    // 1-D tensors, e.g. Muon): the same quadratic must fall, deterministically.
    let matrix = ParamSpec::new("layers.0.attn.q_proj.weight", &[8, n / 8], Init::Normal(0.02), false);
    let (m1, m2) = (run(&matrix, w0.clone(), 200, &quad)?, run(&matrix, w0.clone(), 200, &quad)?);
    let fm = f(&m1);
    if fm >= 0.5 * f0 || fm.is_nan() || bits(&m1) != bits(&m2) {
        return Err(format!(
            "a [8, {}] matrix `layers.0.attn.q_proj.weight`: 200 steps took f from {f0:.4} to {fm:.4} (expected at least halved, deterministically)",
            n / 8
        ));
    }
    lines.push(format!("matrix `layers.0.attn.q_proj.weight` [8, {}]: f {f0:.4} -> {fm:.2e}, deterministic", n / 8));
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi_stable::std_types::RVec;
    use pith_plugin_api::{Host, Router};
    use std::sync::atomic::{AtomicU32, Ordering};

    const DIMS: ModelDims = ModelDims::new(16, 4, 12, 0, 1);
    const E: usize = DIMS.experts as usize;

    #[test]
    fn every_std_component_passes() {
        let m = pith_std::pith_root_module();
        let infos = (m.components())();
        let label = |i: &pith_plugin_api::ComponentInfo| format!("{} {}", i.kind.as_str(), i.name);
        let mut names: Vec<String> = infos.iter().map(label).collect();
        names.sort();
        let want = ["balance_loss switch-aux", "balance_loss z-loss", "comm alltoall", "comm local"];
        let want =
            [&want[..], &["experts swiglu", "optimizer adamw", "router topk-softmax", "shared shared-swiglu"]].concat();
        assert_eq!(names, want);
        for info in infos.iter() {
            let c = ok((m.create())(info.kind, info.name.as_rstr(), "".into(), DIMS.for_kind(info.kind))).unwrap();
            for seed in [1, 2] {
                let lines = check_component(&c, &label(info), DIMS, seed, 0).unwrap_or_else(|e| panic!("{e}"));
                lines.iter().for_each(|l| println!("{l}"));
            }
        }
    }

    /// A linear router (every token to expert 0, with weight = its logit) with an optional bug;
    /// bug 3: forward drifts from call to call.
    struct Linear {
        bug: u8,
        calls: AtomicU32,
    }

    impl Router for Linear {
        fn params(&self) -> Vec<ParamSpec> {
            vec![ParamSpec::new("weight", &[E, DIMS.hidden as usize], Init::Normal(0.02), true)]
        }
        fn forward(&self, h: Host, p: &[Tensor], x: Tensor) -> Result<RouterOut, String> {
            let (t, e) = (x.dim(0), E);
            let (logits, weights) = (h.alloc_f32(&[t, e])?, h.alloc_f32(&[t, 1])?);
            let (ids, probs) = (h.alloc(&[t, 1], DType::I32)?, h.alloc_f32(&[t, e])?);
            h.gemm(x, p[0], logits, false, true, 1.0, 0.0)?;
            // SAFETY: logits, probs and weights are this call's own allocations.
            let (l, w, pr) = unsafe { (logits.f32s_mut(), weights.f32s_mut(), probs.f32s_mut()) };
            if self.bug == 3 {
                l[0] += 1e-3 * self.calls.fetch_add(1, Ordering::Relaxed) as f32;
            }
            (0..t).for_each(|i| w[i] = l[i * e]);
            pr.copy_from_slice(l); // "probs" = logits: the identity
            Ok(RouterOut { logits, probs, ids, weights, saved: RVec::new() })
        }
        fn backward(
            &self,
            h: Host,
            p: &[Tensor],
            g: &[Tensor],
            x: Tensor,
            _: &RouterOut,
            dw: Tensor,
            dp: Tensor,
            dl: Tensor,
            dx: Tensor,
        ) -> Result<(), String> {
            let (t, e) = (x.dim(0), E);
            let d = h.alloc_f32(&[t, e])?;
            let dv = unsafe { d.f32s_mut() }; // SAFETY: this call's own allocation
            dv.iter_mut().zip(dl.f32s().iter().zip(dp.f32s())).for_each(|(d, (l, p))| *d = l + p);
            (0..t).for_each(|i| dv[i * e] += dw.f32s()[i]);
            // bug 1: dx is half what it should be; 2: the weight grad overwrites instead of adding;
            // 4: dx adds instead of overwriting.
            let beta_g = if self.bug == 2 { 0.0 } else { 1.0 };
            h.gemm(d, x, g[0], true, false, 1.0, beta_g)?;
            let (alpha, beta) = [(1.0, 0.0), (0.5, 0.0), (1.0, 0.0), (1.0, 0.0), (1.0, 1.0)][self.bug as usize];
            h.gemm(d, p[0], dx, false, false, alpha, beta)
        }
    }

    #[test]
    fn a_wrong_router_fails() {
        let check = |bug| {
            let c = pith_plugin_api::wrap::Router(Linear { bug, calls: AtomicU32::new(0) });
            check_component(&c, "router linear", DIMS, 7, 0)
        };
        let good = check(0).unwrap();
        assert!(good.iter().all(|l| l.starts_with("PASS")), "{good:?}");
        let bugs = [
            (1, "grad of input x["),
            (2, "grad of param weight must ADD"),
            (3, "determinism"),
            (4, "grad of input x must OVERWRITE"),
        ];
        for (bug, what) in bugs {
            let e = check(bug).expect_err("a broken router must fail the check");
            println!("bug {bug}: {e}");
            assert!(e.starts_with("FAIL router linear: ") && e.contains(what), "bug {bug}: {e}");
        }
    }

    fn create(kind: &str, name: &str, cfg: &str) -> Result<Component, String> {
        let m = pith_std::pith_root_module();
        let kind = pith_plugin_api::Kind::parse(kind).unwrap();
        ok((m.create())(kind, name.into(), cfg.into(), DIMS))
    }

    #[test]
    fn std_configs_are_validated() {
        let err = |k, n, c| create(k, n, c).err().unwrap_or_default();
        let e = err("router", "topk-softmax", "top_k = 9");
        assert!(e.contains("`top_k` = 9") && e.contains("1..=4"), "{e}");
        assert!(err("router", "topk-softmax", "topk = 2").contains("topk"));
        assert!(err("optimizer", "adamw", "beta2 = 1.0").contains("`beta2`"));
        assert!(err("balance_loss", "z-loss", "coef = -1.0").contains("`coef`"));
        assert!(err("experts", "swiglu", "ffn = 0").contains("`ffn`"));
        assert!(err("experts", "swiglu", "fnn = 3").contains("fnn"));
        assert!(create("router", "topk-softmax", "top_k = 4\nnormalize = false").is_ok());
    }

    /// Values the gradient check can't see: what forward computes.
    #[test]
    fn std_forward_semantics() {
        let cpu = CpuOps::default();
        cpu.calls().set(pith_plugin_api::Context { training: true, ..Default::default() }, 1);
        let (t, h) = (4, DIMS.hidden as usize);
        let x: Vec<f32> = (0..t * h).map(|i| (i as f32 * 0.37).sin()).collect();
        // Zero router weights: uniform probs, so ties pick the lowest ids, gates renormalised.
        let Component::Router(r) = create("router", "topk-softmax", "").unwrap() else { panic!() };
        let w = vec![0.0f32; E * h];
        let o = ok(r.forward(cpu.ops(), sl(&[view(&w, &[E, h])]), view(&x, &[t, h]))).unwrap();
        assert_eq!(o.ids.i32s(), [0, 1, 0, 1, 0, 1, 0, 1]);
        assert!(o.weights.f32s().iter().all(|&v| v == 0.5));
        assert!((cpu.take_metrics()["router_entropy"] - (E as f64).ln()).abs() < 1e-6);
        // Uniform logits and balanced ids: switch-aux = coef, z-loss = coef·ln(E)².
        let (mut logits, mut probs, mut gates) = (vec![0.0f32; 4 * E], Vec::new(), vec![0.5f32; 8]);
        let ids = [0, 1, 2, 3, 1, 0, 3, 2];
        let route = route_of(&mut logits, &mut probs, &ids, &mut gates, E);
        let Component::BalanceLoss(sa) = create("balance_loss", "switch-aux", "").unwrap() else { panic!() };
        assert!((loss_value(&cpu, &sa, &[], &route, 0.0).unwrap() - 0.01).abs() < 1e-7);
        let Component::BalanceLoss(z) = create("balance_loss", "z-loss", "").unwrap() else { panic!() };
        let want = 0.001 * (E as f32).ln().powi(2);
        assert!((loss_value(&cpu, &z, &[], &route, 0.0).unwrap() - want).abs() < 1e-7);
        // local: a stable sort by expert, empty slots skipped, a clear error for an id out of range.
        let Component::CommSchedule(c) = create("comm", "local", "").unwrap() else { panic!() };
        let xt = view(&x, &[4, h]);
        let d = ok(c.dispatch(cpu.ops(), xt, &route, E as u32)).unwrap();
        assert_eq!((d.offsets.i32s(), d.saved[0].i32s()), (&[0, 2, 4, 6, 8][..], &[0, 2, 4, 6, 3, 1, 7, 5][..]));
        let some_empty = [0, EMPTY, 2, 3, EMPTY, 0, 3, 2];
        let mut g2 = vec![0.5f32; 8];
        let r2 = route_of(&mut logits, &mut probs, &some_empty, &mut g2, E);
        let d = ok(c.dispatch(cpu.ops(), xt, &r2, E as u32)).unwrap();
        assert_eq!((d.x.dim(0), d.offsets.i32s()), (6, &[0, 2, 2, 4, 6][..]));
        let bad = [0, 1, 2, 7, 1, 0, 3, 2];
        let r3 = route_of(&mut logits, &mut probs, &bad, &mut g2, E);
        let e = ok(c.dispatch(cpu.ops(), xt, &r3, E as u32)).err().unwrap();
        assert!(e.contains("7") && e.contains("0..4"), "{e}");
        // adamw, step 1: m̂ = g, v̂ = g², so w ← w·(1 − lr·wd) − lr·g/(|g| + eps).
        let Component::Optimizer(a) = create("optimizer", "adamw", "").unwrap() else { panic!() };
        let spec = ParamSpec::new("w", &[2], Init::Zeros, true);
        let (mut w, mut g, mut m, mut v) = (vec![1.0f32, -2.0], vec![0.5f32, -3.0], vec![0.0; 2], vec![0.0; 2]);
        let state = vec![view_mut(&mut m, &[2]), view_mut(&mut v, &[2])].into();
        let (w_lowp, name) = (view(&[], &[0]), "w".into());
        let slot = Slot { name, spec, w: view_mut(&mut w, &[2]), g: view_mut(&mut g, &[2]), state, w_lowp };
        ok(a.step(cpu.ops(), RSlice::from_slice(&[slot]), 0.1, 1, 1.0)).unwrap();
        assert!((w[0] - (1.0 * 0.99 - 0.1)).abs() < 1e-6 && (w[1] - (-2.0 * 0.99 + 0.1)).abs() < 1e-6, "{w:?}");
    }
}
