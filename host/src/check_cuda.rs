//! `pith plugins check NAME --device cuda`: does a component's CUDA path agree with its CPU path
//! (the reference, itself checked by [`crate::check`])?
//!
//! Inputs are drawn on the host with fixed seeds (never zeros) and rounded to bf16, so both
//! backends see identical values; parameters are drawn at unit gain (check.rs's `make_params`).
//! The CPU runs on f32 host tensors (`CpuOps`), CUDA on device tensors with the dtypes of the
//! contract in docs/plugins.md (`GpuOps`: bf16 activations and parameter copies, f32 buffers,
//! accumulators, logits, probs, gates, gradients and optimizer state, i32 ids, host i32 offsets).
//! Sizes: [`DIMS`], T = 64 tokens (2 sequences of 32 in the [`Context`], training), top-k 2 (the
//! router's own k for routers). Routes given to comm schedules and balance losses hold empty
//! slots ([`EMPTY`], gate 0): one token with none, every 4th token with one fewer.
//!
//! - Router: forward x → ids, logits, probs, weights (ids first); backward twice, once from random
//!   d_weights and d_logits, once from random d_probs alone → dx, param grads each. Tokens whose
//!   top-(k+1) logits have a gap < check.rs's GAP are redrawn first, so near ties cannot order the
//!   experts differently on the two backends.
//! - Experts: 128 rows in uneven groups (one empty) → y; backward with random dy → dx, grads; the
//!   FLOPs of those groups must be finite and positive. Shared experts: one group of the T rows.
//! - Comm schedule: dispatch (offsets, sorted rows), combine, combine_backward (dy, d_weights),
//!   dispatch_backward (dx).
//! - Balance loss: the value; backward into d_probs and d_logits pre-filled with random values the
//!   size of the grads: what it ADDS to each must match the CPU's grads.
//! - Buffers and accumulators (`Role::Buffer` / `Role::Accumulator`: f32 on both, accumulators
//!   zeroed first, as the host does before a step) are compared after the backward and again
//!   after `end_step` (routers, experts, balance losses).
//! - Optimizer: 3 steps (lr 1e-2, grad_scale 1, 0.5, 0.8) over three parameters (decay on and
//!   off, 1-D and 2-D, sizes not a multiple of a block) from identical random w and state (state
//!   ≥ 0, as a second moment must be), random grads: the update w − w₀ and every state tensor
//!   after each; where the CUDA step says it wrote the bf16 working copies they must be bf16(w),
//!   where it says it zeroed the grads they must be 0.
//!
//! Every output and gradient is compared by its relative L2 error ‖cuda − cpu‖ / ‖cpu‖:
//! [`TOL_BF16`] for what goes through bf16 GEMMs or bf16 activations (and buffers, which may be
//! fed by them), [`TOL_F32`] for f32 math on identical inputs (router logits — f32 accumulation
//! of the same bf16 products — probs, gates, balance-loss values and grads, combine's d_weights,
//! the optimizer), and exact equality for router ids, dispatch offsets and the dispatched rows (a
//! bf16 copy). Input grads the component must OVERWRITE start from noise on CUDA, so an
//! accumulate there cannot hide.

use crate::check::{make_params, max_abs, ok, randn, random_ids, sl, GAP};
use crate::cpu::{view, view_i32, view_mut, CpuOps};
use crate::gpu::{ops::GpuOps, DTensor, Gpu};
use crate::params::Params;
use crate::rng::Rng;
use abi_stable::std_types::{RSlice, RStr, RVec};
use half::bf16;
use pith_plugin_api::abi::{BalanceLossBox, CommScheduleBox, Component, ExpertsBox, OptimizerBox, RouterBox};
use pith_plugin_api::{Context, DType, Device, Init, ModelDims, ParamSpec, Role, RouterOut, Slot, Tensor, EMPTY};
use std::sync::Arc;

/// The model the CUDA check builds components for.
pub const DIMS: ModelDims =
    ModelDims { hidden: 64, experts: 8, expert_ffn: 32, layer: 0, layers: 1, first_expert: 0, local_experts: 8 };
/// Tokens, and experts per token for experts, comm schedules and balance losses.
const T: usize = 64;
const K: usize = 2;
/// Largest relative L2 error through bf16 GEMMs/activations (a bf16 rounding is ≤ 2⁻⁹ ≈ 2e-3).
pub const TOL_BF16: f64 = 2e-2;
/// Largest relative L2 error of f32 math on identical inputs (only the summation order differs).
pub const TOL_F32: f64 = 1e-4;

type R<T> = Result<T, String>;

/// Check that component `c`'s CUDA path matches its CPU path on `gpu`, for a model of `dims`
/// (see the module doc); `label` prefixes every line. Returns the PASS lines, or the first failure.
pub fn check_component(c: &Component, label: &str, gpu: &Arc<Gpu>, dims: ModelDims, seed: u64) -> R<Vec<String>> {
    let mut cx = Cx { cpu: CpuOps::default(), dev: GpuOps::new(gpu.clone()), rng: Rng::new(seed), lines: vec![] };
    let seq = (T / 2) as u32;
    let ctx =
        Context { step: 1, micro_batch: 0, micro_batches: 1, batch: 2, seq, layer: dims.layer, training: true, seed };
    cx.cpu.calls().set(ctx, seed);
    cx.dev.calls().set(ctx, seed);
    let res = match c {
        Component::Router(r) => check_router(&mut cx, r, dims),
        Component::Experts(e) => check_experts(&mut cx, e, dims, false),
        Component::Shared(e) => check_experts(&mut cx, e, dims, true),
        Component::CommSchedule(s) => check_comm(&mut cx, s, dims),
        Component::BalanceLoss(l) => check_loss(&mut cx, l, dims),
        Component::Optimizer(o) => check_optimizer(&mut cx, o),
    };
    cx.cpu.reset();
    cx.dev.reset();
    res.map_err(|e| format!("FAIL {label} on cuda: {e}"))?;
    Ok(cx.lines.iter().map(|l| format!("PASS {label} on cuda: {l}")).collect())
}

/// Both backends, the random stream and the PASS lines so far.
struct Cx {
    cpu: CpuOps,
    dev: GpuOps,
    rng: Rng,
    lines: Vec<String>,
}

/// The views of device tensors.
fn tv(ts: &[DTensor]) -> Vec<Tensor> {
    ts.iter().map(|t| t.t).collect()
}

fn shape_of(spec: &ParamSpec) -> Vec<usize> {
    spec.shape.iter().map(|&d| d as usize).collect()
}

/// A component's declared tensors on both backends. CPU views point into `ps` (`g` zero-numel
/// for buffers and accumulators); on CUDA `w` holds a parameter's bf16 copy or a buffer's f32
/// self, `g` the f32 grads (zero-numel for buffers), as the host passes them.
struct Decl {
    ps: Params,
    w: Vec<Tensor>,
    g: Vec<Tensor>,
    wd: Vec<DTensor>,
    gd: Vec<DTensor>,
    /// The buffers' and accumulators' starting values (index into `ps.list`, values).
    start: Vec<(usize, Vec<f32>)>,
}

impl Decl {
    /// Put the buffers and accumulators back to their starting values on the CPU.
    fn restore_cpu(&mut self) {
        for (i, v) in &self.start {
            self.ps.list[*i].w.copy_from_slice(v);
        }
    }
    /// Zero every parameter grad on both backends.
    fn zero_grads(&mut self, gpu: &Gpu) -> R<()> {
        self.ps.list.iter_mut().for_each(|p| p.g.iter_mut().for_each(|g| *g = 0.0));
        self.gd.iter().try_for_each(|g| gpu.zero(g))
    }
}

impl Cx {
    /// `n` values of N(0, std²), rounded to bf16.
    fn rand_bf16(&mut self, n: usize, std: f32) -> Vec<f32> {
        randn(&mut self.rng, n, std).into_iter().map(|v| bf16::from_f32(v).to_f32()).collect()
    }
    /// A device copy of `v` as `dtype` (bf16 or f32).
    fn up(&self, v: &[f32], shape: &[usize], dtype: DType) -> R<DTensor> {
        match dtype {
            DType::BF16 => self.dev.gpu.upload(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(), shape, dtype),
            _ => self.dev.gpu.upload(v, shape, dtype),
        }
    }
    /// A device tensor of noise, for outputs that must be overwritten.
    fn noise(&mut self, shape: &[usize], dtype: DType) -> R<DTensor> {
        let v = self.rand_bf16(shape.iter().product(), 1.0);
        self.up(&v, shape, dtype)
    }
    /// The values of an f32 or bf16 tensor (device or host) as f32.
    fn down(&self, t: &Tensor) -> R<Vec<f32>> {
        match t.device {
            Device::Cuda => self.dev.gpu.to_f32(t),
            Device::Cpu => Ok(t.f32s().to_vec()),
        }
    }
    fn down_i32(&self, t: &Tensor) -> R<Vec<i32>> {
        let mut v = vec![0i32; t.numel()];
        match (t.dtype, t.device) {
            (DType::I32, Device::Cuda) => self.dev.gpu.download(t, &mut v)?,
            (DType::I32, Device::Cpu) => v.copy_from_slice(t.i32s()),
            (d, _) => return Err(format!("expected i32 ids or offsets, got {d:?} {:?}", t.dims())),
        }
        Ok(v)
    }
    /// Compare by relative L2 error within `tol` (0: bitwise equal values).
    fn close(&mut self, what: &str, cuda: &[f32], cpu: &[f32], tol: f64) -> R<()> {
        if cuda.len() != cpu.len() {
            return Err(format!("{what}: {} elements on cuda, {} on the cpu", cuda.len(), cpu.len()));
        }
        let sq = |v: f32| (v as f64) * (v as f64);
        let diff: f64 = cuda.iter().zip(cpu).map(|(&a, &b)| sq(a - b)).sum();
        let norm: f64 = cpu.iter().map(|&b| sq(b)).sum();
        let err = if diff == 0.0 { 0.0 } else { (diff / norm).sqrt() };
        if err > tol || err.is_nan() {
            let d = |i: usize| (cuda[i] - cpu[i]).abs();
            let i = (0..cpu.len()).fold(0, |m, i| if d(i) > d(m) || d(i).is_nan() { i } else { m });
            return Err(format!(
                "{what}: relative L2 error {err:.2e} > {tol:.0e}; worst [{i}]: cuda {} vs cpu {}",
                cuda[i], cpu[i]
            ));
        }
        let n = cpu.len();
        self.lines.push(match tol == 0.0 {
            true => format!("{what}: {n} values identical"),
            false => format!("{what}: {n} values, relative L2 error {err:.1e} <= {tol:.0e}"),
        });
        Ok(())
    }
    /// Compare integers exactly.
    fn same(&mut self, what: &str, cuda: &[i32], cpu: &[i32]) -> R<()> {
        if let Some(i) = (0..cuda.len().max(cpu.len())).find(|&i| cuda.get(i) != cpu.get(i)) {
            let (a, b) = (cuda.get(i), cpu.get(i));
            return Err(format!("{what}: [{i}] is {a:?} on cuda, {b:?} on the cpu (cuda {cuda:?}, cpu {cpu:?})"));
        }
        self.lines.push(format!("{what}: {} values identical", cpu.len()));
        Ok(())
    }
    /// The component's declared tensors at unit gain (parameters rounded to bf16, accumulators
    /// zeroed) on both backends, with zeroed grads.
    fn params(&mut self, specs: Vec<ParamSpec>) -> R<Decl> {
        let mut ps = make_params(specs, &mut self.rng);
        let (mut wd, mut gd, mut start) = (vec![], vec![], vec![]);
        for (i, p) in ps.list.iter_mut().enumerate() {
            let shape = shape_of(&p.spec);
            if p.spec.role == Role::Param {
                p.w.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
                p.g = vec![0.0; p.w.len()];
                wd.push(self.up(&p.w, &shape, DType::BF16)?);
                gd.push(self.dev.gpu.zeros(&shape, DType::F32)?);
                continue;
            }
            if p.spec.role == Role::Accumulator {
                p.w.iter_mut().for_each(|v| *v = 0.0);
            }
            wd.push(self.up(&p.w, &shape, DType::F32)?);
            gd.push(self.dev.gpu.tensor(&[0], DType::F32)?);
            start.push((i, p.w.clone()));
        }
        let (mut w, mut g) = (vec![], vec![]);
        for p in &mut ps.list {
            let shape = shape_of(&p.spec);
            let param = p.spec.role == Role::Param;
            w.push(if param { view(&p.w, &shape) } else { view_mut(&mut p.w, &shape) });
            g.push(if param { view_mut(&mut p.g, &shape) } else { Tensor::new(0, DType::F32, Device::Cpu, &[0]) });
        }
        Ok(Decl { ps, w, g, wd, gd, start })
    }
    /// Compare every parameter grad (the CPU's in `d.ps`); `pass` names the backward.
    fn grads(&mut self, d: &Decl, pass: &str) -> R<()> {
        for (p, g) in d.ps.list.iter().zip(&d.gd).filter(|(p, _)| p.spec.role == Role::Param) {
            let cuda = self.down(g)?;
            self.close(&format!("{pass} grad {}", p.spec.name), &cuda, &p.g, TOL_BF16)?;
        }
        Ok(())
    }
    /// Compare every buffer and accumulator (the CPU's in `d.ps`) after `when`.
    fn buffers(&mut self, d: &Decl, when: &str) -> R<()> {
        for (p, w) in d.ps.list.iter().zip(&d.wd).filter(|(p, _)| p.spec.role != Role::Param) {
            let role = if p.spec.role == Role::Buffer { "buffer" } else { "accumulator" };
            let cuda = self.down(w)?;
            self.close(&format!("{when}: {role} {}", p.spec.name), &cuda, &p.w, TOL_BF16)?;
        }
        Ok(())
    }
    /// A route for comm schedules and balance losses, on both backends: logits (std 2), their
    /// softmax as probs, `k` random distinct ids with empty slots (token 5 none, every 4th token
    /// its last), and the gates given by `gate` (0 for empty slots).
    fn route(&mut self, e: usize, gate: impl Fn(&mut Rng, f32) -> f32) -> R<(Route, RouterOut)> {
        let logits = self.rand_bf16(T * e, 2.0);
        let mut probs = logits.clone();
        for row in probs.chunks_mut(e) {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            row.iter_mut().for_each(|v| *v = (*v - m).exp());
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= s);
        }
        let mut ids = random_ids(&mut self.rng, T, K, e);
        for t in 0..T {
            let empty = match t {
                5 => 0,
                _ if t % 4 == 3 => K - 1,
                _ => K,
            };
            ids[t * K + empty..(t + 1) * K].iter_mut().for_each(|i| *i = EMPTY);
        }
        let weights: Vec<f32> = (0..T * K)
            .map(|j| match ids[j] {
                EMPTY => 0.0,
                id => gate(&mut self.rng, probs[j / K * e + id as usize]),
            })
            .collect();
        let dev = vec![
            self.up(&logits, &[T, e], DType::F32)?,
            self.up(&probs, &[T, e], DType::F32)?,
            self.dev.gpu.upload(&ids, &[T, K], DType::I32)?,
            self.up(&weights, &[T, K], DType::F32)?,
        ];
        let out = RouterOut { logits: dev[0].t, probs: dev[1].t, ids: dev[2].t, weights: dev[3].t, saved: RVec::new() };
        Ok((Route { logits, probs, ids, weights, _dev: dev }, out))
    }
}

/// A route's host values (the CPU's views point into them) and the device copies behind the
/// CUDA `RouterOut`.
struct Route {
    logits: Vec<f32>,
    probs: Vec<f32>,
    ids: Vec<i32>,
    weights: Vec<f32>,
    _dev: Vec<DTensor>,
}

impl Route {
    fn cpu(&self, e: usize) -> RouterOut {
        RouterOut {
            logits: view(&self.logits, &[T, e]),
            probs: view(&self.probs, &[T, e]),
            ids: view_i32(&self.ids, &[T, K]),
            weights: view(&self.weights, &[T, K]),
            saved: RVec::new(),
        }
    }
}
/// Whether a token's logits nearly tie among its top k+1 (which could order the ids differently).
fn near_tie(row: &[f32], k: usize) -> bool {
    let mut r = row.to_vec();
    r.sort_by(|a, b| b.total_cmp(a));
    (0..k.min(r.len() - 1)).any(|j| r[j] - r[j + 1] < GAP)
}

fn check_router(cx: &mut Cx, r: &RouterBox, dims: ModelDims) -> R<()> {
    let (h, e) = (dims.hidden as usize, dims.experts as usize);
    let mut d = cx.params(r.params().into_vec())?;
    let mut x = cx.rand_bf16(T * h, 1.0);
    let mut redrawn = 0;
    let o = loop {
        d.restore_cpu(); // only the last forward may count in the accumulators
        let o = ok(r.forward(cx.cpu.ops(), sl(&d.w), view(&x, &[T, h])))?;
        let (k, logits) = (o.ids.dim(-1), o.logits.f32s());
        let tied: Vec<usize> = (0..T).filter(|&t| near_tie(&logits[t * e..(t + 1) * e], k)).collect();
        if tied.is_empty() {
            break o;
        }
        if redrawn > 100 * T {
            return Err(format!("tokens still nearly tied after redrawing {redrawn}"));
        }
        redrawn += tied.len();
        for t in tied {
            let row = cx.rand_bf16(h, 1.0);
            x[t * h..(t + 1) * h].copy_from_slice(&row);
        }
        cx.cpu.reset();
    };
    cx.lines.push(format!("{T} tokens ({redrawn} redrawn for a top-k logit gap >= {GAP})"));
    let xd = cx.up(&x, &[T, h], DType::BF16)?;
    let od = ok(r.forward(cx.dev.ops(), sl(&tv(&d.wd)), xd.t))?;
    cx.same("forward ids", &cx.down_i32(&od.ids)?, o.ids.i32s())?;
    cx.close("forward logits", &cx.down(&od.logits)?, o.logits.f32s(), TOL_F32)?;
    cx.close("forward probs", &cx.down(&od.probs)?, o.probs.f32s(), TOL_F32)?;
    cx.close("forward weights", &cx.down(&od.weights)?, o.weights.f32s(), TOL_F32)?;
    let k = o.ids.dim(-1);
    // Two backwards: the gates' and logits' gradients, then the probs' alone (what balance
    // losses send), each from zeroed parameter grads.
    for (pass, from_probs) in [("backward", false), ("backward (d_probs)", true)] {
        let rand = |cx: &mut Cx, n: usize, on: bool| if on { randn(&mut cx.rng, n, 1.0) } else { vec![0.0; n] };
        let (dwt, dpr, dlg) = (rand(cx, T * k, !from_probs), rand(cx, T * e, from_probs), rand(cx, T * e, !from_probs));
        d.zero_grads(&cx.dev.gpu)?;
        let mut dx = vec![0.0; T * h];
        let (mut dpc, mut dlc) = (dpr.clone(), dlg.clone());
        let (dw_t, dp_t, dl_t) = (view(&dwt, &[T, k]), view_mut(&mut dpc, &[T, e]), view_mut(&mut dlc, &[T, e]));
        let xt = view(&x, &[T, h]);
        ok(r.backward(cx.cpu.ops(), sl(&d.w), sl(&d.g), xt, &o, dw_t, dp_t, dl_t, view_mut(&mut dx, &[T, h])))?;
        let (dwd, dpd, dld) =
            (cx.up(&dwt, &[T, k], DType::F32)?, cx.up(&dpr, &[T, e], DType::F32)?, cx.up(&dlg, &[T, e], DType::F32)?);
        let dxd = cx.noise(&[T, h], DType::BF16)?;
        let (wd, gd) = (tv(&d.wd), tv(&d.gd));
        ok(r.backward(cx.dev.ops(), sl(&wd), sl(&gd), xd.t, &od, dwd.t, dpd.t, dld.t, dxd.t))?;
        cx.close(&format!("{pass} dx"), &cx.down(&dxd)?, &dx, TOL_BF16)?;
        cx.grads(&d, pass)?;
    }
    cx.buffers(&d, "forward + backward")?;
    ok(r.end_step(cx.cpu.ops(), sl(&d.w)))?;
    ok(r.end_step(cx.dev.ops(), sl(&tv(&d.wd))))?;
    cx.buffers(&d, "end_step")
}

fn check_experts(cx: &mut Cx, ex: &ExpertsBox, dims: ModelDims, shared: bool) -> R<()> {
    let h = dims.hidden as usize;
    let (e, n) = if shared { (1, T) } else { (dims.local_experts as usize, T * K) };
    // Random group sizes, one group emptied into the next (as check.rs does).
    let mut off = vec![0i32; e + 1];
    if shared {
        off[1] = n as i32;
    } else {
        (0..n).for_each(|_| off[cx.rng.below(e) + 1] += 1);
        let z = cx.rng.below(e) + 1;
        off[z % e + 1] += std::mem::take(&mut off[z]);
        (0..e).for_each(|i| off[i + 1] += off[i]);
    }
    let offsets = view_i32(&off, &[e + 1]);
    let sizes: Vec<u64> = off.windows(2).map(|p| (p[1] - p[0]) as u64).collect();
    let flops = ex.flops(RSlice::from_slice(&sizes));
    if !(flops.is_finite() && flops > 0.0) {
        return Err(format!("flops({sizes:?}) is {flops}: expected a finite, positive count"));
    }
    cx.lines.push(format!("{n} rows in groups {sizes:?}, {flops:.3e} forward FLOPs"));
    let d = cx.params(ex.params().into_vec())?;
    let (x, dy, mut dx) = (cx.rand_bf16(n * h, 1.0), cx.rand_bf16(n * h, 1.0), vec![0.0; n * h]);
    let (xt, dyt) = (view(&x, &[n, h]), view(&dy, &[n, h]));
    let o = ok(ex.forward(cx.cpu.ops(), sl(&d.w), xt, offsets))?;
    ok(ex.backward(cx.cpu.ops(), sl(&d.w), sl(&d.g), xt, offsets, &o, dyt, view_mut(&mut dx, &[n, h])))?;
    let (xd, dyd, dxd) =
        (cx.up(&x, &[n, h], DType::BF16)?, cx.up(&dy, &[n, h], DType::BF16)?, cx.noise(&[n, h], DType::BF16)?);
    let (wd, gd) = (tv(&d.wd), tv(&d.gd));
    let od = ok(ex.forward(cx.dev.ops(), sl(&wd), xd.t, offsets))?;
    ok(ex.backward(cx.dev.ops(), sl(&wd), sl(&gd), xd.t, offsets, &od, dyd.t, dxd.t))?;
    cx.close("forward y", &cx.down(&od.y)?, o.y.f32s(), TOL_BF16)?;
    cx.close("backward dx", &cx.down(&dxd)?, &dx, TOL_BF16)?;
    cx.grads(&d, "backward")?;
    cx.buffers(&d, "forward + backward")?;
    ok(ex.end_step(cx.cpu.ops(), sl(&d.w)))?;
    ok(ex.end_step(cx.dev.ops(), sl(&wd)))?;
    cx.buffers(&d, "end_step")
}

fn check_comm(cx: &mut Cx, s: &CommScheduleBox, dims: ModelDims) -> R<()> {
    let (h, e) = (dims.hidden as usize, dims.experts as usize);
    let (route, rd) = cx.route(e, |rng, _| 0.1 + rng.uniform())?;
    let rc = route.cpu(e);
    let x = cx.rand_bf16(T * h, 1.0);
    let d = ok(s.dispatch(cx.cpu.ops(), view(&x, &[T, h]), &rc, e as u32))?;
    let xd = cx.up(&x, &[T, h], DType::BF16)?;
    let dd = ok(s.dispatch(cx.dev.ops(), xd.t, &rd, e as u32))?;
    if dd.offsets.device != Device::Cpu {
        return Err("dispatch: Dispatched::offsets must be a host tensor on CUDA too".into());
    }
    cx.same("dispatch offsets", &cx.down_i32(&dd.offsets)?, d.offsets.i32s())?;
    cx.close("dispatch x_sorted", &cx.down(&dd.x)?, d.x.f32s(), 0.0)?;
    let n = d.x.dim(0);
    let (y, dout, dxs) = (cx.rand_bf16(n * h, 1.0), cx.rand_bf16(T * h, 1.0), cx.rand_bf16(n * h, 1.0));
    let yt = view(&y, &[n, h]);
    let out = ok(s.combine(cx.cpu.ops(), yt, &rc, &d))?;
    let (mut dy, mut dw, mut dx) = (vec![0.0; n * h], vec![0.0; T * K], vec![0.0; T * h]);
    let (dyt, dwt) = (view_mut(&mut dy, &[n, h]), view_mut(&mut dw, &[T, K]));
    ok(s.combine_backward(cx.cpu.ops(), view(&dout, &[T, h]), yt, &rc, &d, dyt, dwt))?;
    ok(s.dispatch_backward(cx.cpu.ops(), view(&dxs, &[n, h]), &d, view_mut(&mut dx, &[T, h])))?;
    let (yd, doutd, dxsd) =
        (cx.up(&y, &[n, h], DType::BF16)?, cx.up(&dout, &[T, h], DType::BF16)?, cx.up(&dxs, &[n, h], DType::BF16)?);
    let (dyd, dwd, dxd) =
        (cx.noise(&[n, h], DType::BF16)?, cx.noise(&[T, K], DType::F32)?, cx.noise(&[T, h], DType::BF16)?);
    let outd = ok(s.combine(cx.dev.ops(), yd.t, &rd, &dd))?;
    ok(s.combine_backward(cx.dev.ops(), doutd.t, yd.t, &rd, &dd, dyd.t, dwd.t))?;
    ok(s.dispatch_backward(cx.dev.ops(), dxsd.t, &dd, dxd.t))?;
    cx.close("combine out", &cx.down(&outd)?, out.f32s(), TOL_BF16)?;
    cx.close("combine_backward dy", &cx.down(&dyd)?, &dy, TOL_BF16)?;
    cx.close("combine_backward d_weights", &cx.down(&dwd)?, &dw, TOL_F32)?;
    cx.close("dispatch_backward dx", &cx.down(&dxd)?, &dx, TOL_BF16)
}

fn check_loss(cx: &mut Cx, l: &BalanceLossBox, dims: ModelDims) -> R<()> {
    let e = dims.experts as usize;
    let d = cx.params(l.params().into_vec())?;
    let (route, rd) = cx.route(e, |_, p| p)?;
    let rc = route.cpu(e);
    let wd = tv(&d.wd);
    let added = |got: Vec<f32>, start: &[f32]| -> Vec<f32> { got.iter().zip(start).map(|(a, b)| a - b).collect() };
    let mut v = [0.0f32];
    ok(l.forward(cx.cpu.ops(), sl(&d.w), &rc, view_mut(&mut v, &[1])))?;
    let start = randn(&mut cx.rng, 1, v[0].abs().max(1e-30));
    let vd = cx.up(&start, &[1], DType::F32)?;
    ok(l.forward(cx.dev.ops(), sl(&wd), &rd, vd.t))?;
    cx.close("forward loss (added onto a random value)", &added(cx.down(&vd)?, &start), &v, TOL_F32)?;
    let scale = 0.5 + cx.rng.uniform();
    let (mut dp, mut dl) = (vec![0.0; T * e], vec![0.0; T * e]);
    ok(l.backward(cx.cpu.ops(), sl(&d.w), &rc, scale, view_mut(&mut dp, &[T, e]), view_mut(&mut dl, &[T, e])))?;
    // Start from noise the size of the grads: what backward adds must be the CPU's grad.
    let (sp, sg) =
        (randn(&mut cx.rng, T * e, max_abs(&dp).max(1e-30)), randn(&mut cx.rng, T * e, max_abs(&dl).max(1e-30)));
    let (dpd, dld) = (cx.up(&sp, &[T, e], DType::F32)?, cx.up(&sg, &[T, e], DType::F32)?);
    ok(l.backward(cx.dev.ops(), sl(&wd), &rd, scale, dpd.t, dld.t))?;
    let (ap, al) = (added(cx.down(&dpd)?, &sp), added(cx.down(&dld)?, &sg));
    cx.close("backward d_probs (added onto random values)", &ap, &dp, TOL_F32)?;
    cx.close("backward d_logits (added onto random values)", &al, &dl, TOL_F32)?;
    cx.buffers(&d, "forward + backward")?;
    ok(l.end_step(cx.cpu.ops(), sl(&d.w)))?;
    ok(l.end_step(cx.dev.ops(), sl(&wd)))?;
    cx.buffers(&d, "end_step")
}

/// One optimizer slot on both backends (CPU values, CUDA tensors).
struct OptSlot {
    name: String,
    spec: ParamSpec,
    states: Vec<String>,
    w0: Vec<f32>,
    w: Vec<f32>,
    s: Vec<Vec<f32>>,
    wd: DTensor,
    sd: Vec<DTensor>,
    lowp: DTensor,
}

fn check_optimizer(cx: &mut Cx, o: &OptimizerBox) -> R<()> {
    // Sizes not a multiple of a block, so kernels' tails run.
    let specs = [
        ("layers.0.moe.experts.w_up", ParamSpec::new("w_up", &[8, 125], Init::Normal(0.02), true)),
        ("layers.0.attn_norm.weight", ParamSpec::new("weight", &[37], Init::Ones, false)),
        ("layers.0.moe.router.weight", ParamSpec::new("weight", &[24, 40], Init::Normal(0.02), true)),
    ];
    let mut slots = vec![];
    for (name, spec) in specs {
        let (shape, n) = (shape_of(&spec), spec.numel());
        let states: Vec<String> = o.state(RStr::from_str(name), &spec).into_iter().map(|s| s.to_string()).collect();
        let w0 = randn(&mut cx.rng, n, 1.0);
        let s: Vec<Vec<f32>> =
            states.iter().map(|_| randn(&mut cx.rng, n, 1.0).iter().map(|v| v.abs()).collect()).collect();
        let (wd, lowp) = (cx.up(&w0, &shape, DType::F32)?, cx.up(&w0, &shape, DType::BF16)?);
        let sd = s.iter().map(|v| cx.up(v, &shape, DType::F32)).collect::<R<_>>()?;
        slots.push(OptSlot { name: name.into(), spec, states, w: w0.clone(), w0, s, wd, sd, lowp });
    }
    for (step, grad_scale) in [(1, 1.0), (2, 0.5), (3, 0.8)] {
        let mut g: Vec<Vec<f32>> = slots.iter().map(|p| randn(&mut cx.rng, p.w.len(), 1.0)).collect();
        let gd: Vec<DTensor> =
            slots.iter().zip(&g).map(|(p, g)| cx.up(g, &shape_of(&p.spec), DType::F32)).collect::<R<_>>()?;
        let cpu: Vec<Slot> = slots
            .iter_mut()
            .zip(&mut g)
            .map(|(p, g)| {
                let shape = shape_of(&p.spec);
                Slot {
                    name: p.name.as_str().into(),
                    spec: p.spec.clone(),
                    w: view_mut(&mut p.w, &shape),
                    g: view_mut(g, &shape),
                    state: p.s.iter_mut().map(|s| view_mut(s, &shape)).collect(),
                    w_lowp: Tensor::new(0, DType::BF16, Device::Cpu, &[0]),
                }
            })
            .collect();
        let dev: Vec<Slot> = slots
            .iter()
            .zip(&gd)
            .map(|(p, g)| Slot {
                name: p.name.as_str().into(),
                spec: p.spec.clone(),
                w: p.wd.t,
                g: g.t,
                state: p.sd.iter().map(|s| s.t).collect(),
                w_lowp: p.lowp.t,
            })
            .collect();
        let done_cpu = ok(o.step(cx.cpu.ops(), RSlice::from_slice(&cpu), 1e-2, step, grad_scale))?;
        let done = ok(o.step(cx.dev.ops(), RSlice::from_slice(&dev), 1e-2, step, grad_scale))?;
        drop(cpu);
        for (i, p) in slots.iter().enumerate() {
            let at = format!("step {step} (grad_scale {grad_scale}) {}", p.name);
            let delta = |w: &[f32]| -> Vec<f32> { w.iter().zip(&p.w0).map(|(a, b)| a - b).collect() };
            let wc = cx.down(&p.wd)?;
            cx.close(&format!("{at}: w - w0"), &delta(&wc), &delta(&p.w), TOL_F32)?;
            for ((name, s), t) in p.states.iter().zip(&p.sd).zip(&p.s) {
                cx.close(&format!("{at}: state {name}"), &cx.down(s)?, t, TOL_F32)?;
            }
            if done.wrote_lowp {
                let want: Vec<f32> = wc.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
                cx.close(&format!("{at}: w_lowp = bf16(w)"), &cx.down(&p.lowp)?, &want, 0.0)?;
            }
            if done.zeroed_grads && cx.down(&gd[i])?.iter().any(|&v| v != 0.0) {
                return Err(format!("{at}: the step says it zeroed the grads, but g is not 0"));
            }
            if done_cpu.zeroed_grads && g[i].iter().any(|&v| v != 0.0) {
                return Err(format!("{at}: the CPU step says it zeroed the grads, but g is not 0"));
            }
        }
        cx.cpu.reset();
        cx.dev.reset();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pith_plugin_api::{BalanceLoss, Host};

    /// GPU 0; these tests fail without one (they are ignored unless run with `--ignored`).
    fn gpu() -> Arc<Gpu> {
        Arc::new(crate::gpu::tests::gpu())
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn every_std_component_matches_on_cuda() {
        let gpu = gpu();
        let m = pith_std::pith_root_module();
        for info in (m.components())().iter() {
            // The gated shared expert too (Qwen2-MoE), and scaled gates (DeepSeek-V2).
            let configs: &[&str] = match info.name.as_str() {
                "shared-swiglu" => &["", "gate = true"],
                "topk-softmax" => &["", "scale = 2.5\nnormalize = false", "scale = 16.0", "bias = true\ntop_k = 3"],
                _ => &[""],
            };
            for &config in configs {
                let label = format!("{} {} {config}", info.kind.as_str(), info.name);
                let dims = DIMS.for_kind(info.kind);
                let c = ok((m.create())(info.kind, info.name.as_rstr(), config.into(), dims)).unwrap();
                for seed in [1, 2] {
                    let lines = check_component(&c, &label, &gpu, DIMS, seed).unwrap_or_else(|e| panic!("{e}"));
                    lines.iter().for_each(|l| println!("{l}"));
                }
            }
        }
    }

    /// loss = 1e-3·(Σ logits² + Σ probs²), the same host code on both devices, except for bug 1
    /// (the CUDA value is 1% off), bug 2 (CUDA's backward overwrites d_logits instead of adding
    /// to it) or bug 3 (CUDA's backward leaves d_probs out).
    struct Square(u8);

    /// loss[0] += v, on either device.
    fn add_to(h: &Host, loss: Tensor, v: f32) -> Result<(), String> {
        let sum = [h.read_f32(loss)?[0] + v];
        h.copy(Tensor::new(sum.as_ptr() as u64, DType::F32, Device::Cpu, &[1]), loss)
    }

    impl BalanceLoss for Square {
        fn forward(&self, h: Host, _: &[Tensor], r: &RouterOut, loss: Tensor) -> Result<(), String> {
            let sq = |t| h.read_f32(t).map(|v| v.iter().map(|x| x * x).sum::<f32>());
            let v = 1e-3 * (sq(r.logits)? + sq(r.probs)?);
            add_to(&h, loss, if h.device() == Device::Cuda && self.0 == 1 { v * 1.01 } else { v })
        }
        fn backward(
            &self,
            h: Host,
            _: &[Tensor],
            r: &RouterOut,
            scale: f32,
            dp: Tensor,
            dl: Tensor,
        ) -> Result<(), String> {
            let cuda = h.device() == Device::Cuda;
            for (x, d, keep, add) in [
                (r.logits, dl, if cuda && self.0 == 2 { 0.0 } else { 1.0 }, 1.0),
                (r.probs, dp, 1.0, if cuda && self.0 == 3 { 0.0 } else { 1.0 }),
            ] {
                let (x, mut g) = (h.read_f32(x)?, h.read_f32(d)?);
                g.iter_mut().zip(&x).for_each(|(g, x)| *g = keep * *g + add * scale * 2e-3 * x);
                h.copy(Tensor::new(g.as_ptr() as u64, DType::F32, Device::Cpu, &d.dims()), d)?;
            }
            Ok(())
        }
    }

    /// A balance loss with an accumulator (Σ probs per expert, added in forward) and a buffer
    /// (+= 0.01 · the accumulator in end_step); bug 1: CUDA's end_step leaves the buffer alone.
    struct Load(u8);

    impl BalanceLoss for Load {
        fn params(&self) -> Vec<ParamSpec> {
            let e = DIMS.experts as usize;
            vec![ParamSpec::buffer("bias", &[e], Init::Zeros), ParamSpec::accumulator("load", &[e])]
        }
        fn forward(&self, h: Host, p: &[Tensor], r: &RouterOut, _: Tensor) -> Result<(), String> {
            let (probs, mut load) = (h.read_f32(r.probs)?, h.read_f32(p[1])?);
            let e = load.len();
            probs.chunks(e).for_each(|row| load.iter_mut().zip(row).for_each(|(l, p)| *l += p));
            h.copy(Tensor::new(load.as_ptr() as u64, DType::F32, Device::Cpu, &[e]), p[1])
        }
        fn backward(&self, _: Host, _: &[Tensor], _: &RouterOut, _: f32, _: Tensor, _: Tensor) -> Result<(), String> {
            Ok(())
        }
        fn end_step(&self, h: Host, p: &[Tensor]) -> Result<(), String> {
            if h.device() == Device::Cuda && self.0 == 1 {
                return Ok(());
            }
            let (mut b, l) = (h.read_f32(p[0])?, h.read_f32(p[1])?);
            b.iter_mut().zip(&l).for_each(|(b, l)| *b += 0.01 * l);
            h.copy(Tensor::new(b.as_ptr() as u64, DType::F32, Device::Cpu, &[b.len()]), p[0])
        }
    }

    /// Buffers and accumulators reach CUDA components as f32 and are compared after the pass
    /// and after end_step.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn buffers_and_accumulators_are_compared() {
        let gpu = gpu();
        let check = |bug| check_component(&pith_plugin_api::wrap::BalanceLoss(Load(bug)), "load", &gpu, DIMS, 1);
        let lines = check(0).unwrap();
        lines.iter().for_each(|l| println!("{l}"));
        for want in ["forward + backward: accumulator load", "end_step: buffer bias"] {
            assert!(lines.iter().any(|l| l.contains(want)), "{want}: {lines:?}");
        }
        let e = check(1).expect_err("a CUDA end_step that differs must fail");
        assert!(e.contains("end_step: buffer bias: relative L2 error"), "{e}");
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn a_wrong_cuda_path_fails() {
        let gpu = gpu();
        let check = |bug| check_component(&pith_plugin_api::wrap::BalanceLoss(Square(bug)), "sq", &gpu, DIMS, 1);
        check(0).unwrap();
        let bugs = [
            (1, "forward loss (added onto a random value): relative L2 error"),
            (2, "backward d_logits"),
            (3, "backward d_probs"),
        ];
        for (bug, what) in bugs {
            let e = check(bug).expect_err("a CUDA path that differs must fail");
            println!("bug {bug}: {e}");
            assert!(e.starts_with("FAIL sq on cuda: ") && e.contains(what), "bug {bug}: {e}");
        }
    }
}
