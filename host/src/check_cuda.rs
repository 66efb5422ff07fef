//! `pith plugins check NAME --device cuda`: does a component's CUDA path agree with its CPU path
//! (the reference, itself checked by [`crate::check`])?
//!
//! Inputs are drawn on the host with fixed seeds (never zeros) and rounded to bf16, so both
//! backends see identical values; parameters are drawn at unit gain (check.rs's `make_params`).
//! The CPU runs on f32 host tensors (`CpuOps`), CUDA on device tensors with the dtypes of the
//! contract in docs/plugins.md (`GpuOps`: bf16 activations and parameter copies, f32 logits,
//! gates, gradients and optimizer state, i32 ids, host i32 offsets). Sizes: [`DIMS`], T = 64
//! tokens, top-k 2 (the router's own k for routers).
//!
//! - Router: forward x → ids, logits, weights (ids first); backward with random d_weights and
//!   d_logits → dx, param grads. Tokens whose top-(k+1) logits have a gap < check.rs's GAP are
//!   redrawn first, so near ties cannot order the experts differently on the two backends.
//! - Experts: 128 rows in uneven groups (one empty) → y; backward with random dy → dx, grads.
//! - Comm schedule: dispatch (offsets, sorted rows), combine, combine_backward (dy, d_weights),
//!   dispatch_backward (dx).
//! - Balance loss: the value; backward into d_logits pre-filled with random values the size of
//!   the grads: what it ADDS must match the CPU's grad.
//! - Optimizer: 3 steps (lr 1e-2, decay on) from identical random w and state (state ≥ 0, as a
//!   second moment must be), random grads: the update w − w₀ and every state tensor after each.
//!
//! Every output and gradient is compared by its relative L2 error ‖cuda − cpu‖ / ‖cpu‖:
//! [`TOL_BF16`] for what goes through bf16 GEMMs or bf16 activations, [`TOL_F32`] for f32 math
//! on identical inputs (router logits — f32 accumulation of the same bf16 products — gates,
//! balance-loss values and logit grads, combine's d_weights, the optimizer), and exact equality
//! for router ids, dispatch offsets and the dispatched rows (a bf16 copy). Input grads the
//! component must OVERWRITE start from noise on CUDA, so an accumulate there cannot hide.

use crate::check::{make_params, max_abs, ok, randn, random_ids, sl, GAP};
use crate::cpu::{view, view_i32, view_mut, CpuOps};
use crate::gpu::{ops::GpuOps, DTensor, Gpu};
use crate::params::Params;
use crate::rng::Rng;
use half::bf16;
use pith_plugin_api::abi::{BalanceLossBox, CommScheduleBox, Component, ExpertsBox, OptimizerBox, RouterBox};
use pith_plugin_api::{DType, Device, Init, ModelDims, ParamSpec, Tensor};
use std::sync::Arc;

/// The model the CUDA check builds components for.
pub const DIMS: ModelDims = ModelDims { hidden: 64, experts: 8, expert_ffn: 32, layer: 0, layers: 1 };
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
    let res = match c {
        Component::Router(r) => check_router(&mut cx, r, dims),
        Component::Experts(e) => check_experts(&mut cx, e, dims),
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
    /// The component's parameters at unit gain, rounded to bf16, with their bf16 device copies
    /// and zeroed f32 device grads.
    fn params(&mut self, specs: Vec<ParamSpec>) -> R<(Params, Vec<DTensor>, Vec<DTensor>)> {
        let mut ps = make_params(specs, &mut self.rng);
        let (mut w, mut g) = (vec![], vec![]);
        for p in &mut ps.list {
            p.w.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
            let shape: Vec<usize> = p.spec.shape.iter().map(|&d| d as usize).collect();
            w.push(self.up(&p.w, &shape, DType::BF16)?);
            g.push(self.dev.gpu.zeros(&shape, DType::F32)?);
        }
        Ok((ps, w, g))
    }
    /// Compare every parameter grad (the CPU's in `ps`).
    fn grads(&mut self, ps: &Params, gd: &[DTensor]) -> R<()> {
        for (p, g) in ps.list.iter().zip(gd) {
            let cuda = self.down(g)?;
            self.close(&format!("backward grad {}", p.spec.name), &cuda, &p.g, TOL_BF16)?;
        }
        Ok(())
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
    let (mut ps, wd, gd) = cx.params(r.params().into_vec())?;
    let (w, g) = (ps.weights(0..ps.list.len()), ps.grads(0..ps.list.len()));
    let mut x = cx.rand_bf16(T * h, 1.0);
    let mut redrawn = 0;
    let o = loop {
        let o = ok(r.forward(cx.cpu.ops(), sl(&w), view(&x, &[T, h])))?;
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
    let od = ok(r.forward(cx.dev.ops(), sl(&tv(&wd)), xd.t))?;
    cx.same("forward ids", &cx.down_i32(&od.ids)?, o.ids.i32s())?;
    cx.close("forward logits", &cx.down(&od.logits)?, o.logits.f32s(), TOL_F32)?;
    cx.close("forward weights", &cx.down(&od.weights)?, o.weights.f32s(), TOL_F32)?;
    let k = o.ids.dim(-1);
    let (dwt, dlg) = (randn(&mut cx.rng, T * k, 1.0), randn(&mut cx.rng, T * e, 1.0));
    let mut dx = vec![0.0; T * h];
    let (dw_t, dl_t, dx_t) = (view(&dwt, &[T, k]), view(&dlg, &[T, e]), view_mut(&mut dx, &[T, h]));
    ok(r.backward(cx.cpu.ops(), sl(&w), sl(&g), view(&x, &[T, h]), &o, dw_t, dl_t, dx_t))?;
    let (dwd, dld, dxd) =
        (cx.up(&dwt, &[T, k], DType::F32)?, cx.up(&dlg, &[T, e], DType::F32)?, cx.noise(&[T, h], DType::BF16)?);
    ok(r.backward(cx.dev.ops(), sl(&tv(&wd)), sl(&tv(&gd)), xd.t, &od, dwd.t, dld.t, dxd.t))?;
    cx.close("backward dx", &cx.down(&dxd)?, &dx, TOL_BF16)?;
    cx.grads(&ps, &gd)
}

fn check_experts(cx: &mut Cx, ex: &ExpertsBox, dims: ModelDims) -> R<()> {
    let (e, h, n) = (dims.experts as usize, dims.hidden as usize, T * K);
    // Random group sizes, one group emptied into the next (as check.rs does).
    let mut off = vec![0i32; e + 1];
    (0..n).for_each(|_| off[cx.rng.below(e) + 1] += 1);
    let z = cx.rng.below(e) + 1;
    off[z % e + 1] += std::mem::take(&mut off[z]);
    (0..e).for_each(|i| off[i + 1] += off[i]);
    let offsets = view_i32(&off, &[e + 1]);
    let sizes: Vec<i32> = off.windows(2).map(|p| p[1] - p[0]).collect();
    cx.lines.push(format!("{n} rows in groups {sizes:?}"));
    let (mut ps, wd, gd) = cx.params(ex.params().into_vec())?;
    let (w, g) = (ps.weights(0..ps.list.len()), ps.grads(0..ps.list.len()));
    let (x, dy, mut dx) = (cx.rand_bf16(n * h, 1.0), cx.rand_bf16(n * h, 1.0), vec![0.0; n * h]);
    let (xt, dyt) = (view(&x, &[n, h]), view(&dy, &[n, h]));
    let o = ok(ex.forward(cx.cpu.ops(), sl(&w), xt, offsets))?;
    ok(ex.backward(cx.cpu.ops(), sl(&w), sl(&g), xt, offsets, &o, dyt, view_mut(&mut dx, &[n, h])))?;
    let (xd, dyd, dxd) =
        (cx.up(&x, &[n, h], DType::BF16)?, cx.up(&dy, &[n, h], DType::BF16)?, cx.noise(&[n, h], DType::BF16)?);
    let od = ok(ex.forward(cx.dev.ops(), sl(&tv(&wd)), xd.t, offsets))?;
    ok(ex.backward(cx.dev.ops(), sl(&tv(&wd)), sl(&tv(&gd)), xd.t, offsets, &od, dyd.t, dxd.t))?;
    cx.close("forward y", &cx.down(&od.y)?, o.y.f32s(), TOL_BF16)?;
    cx.close("backward dx", &cx.down(&dxd)?, &dx, TOL_BF16)?;
    cx.grads(&ps, &gd)
}

fn check_comm(cx: &mut Cx, s: &CommScheduleBox, dims: ModelDims) -> R<()> {
    let (h, e) = (dims.hidden as usize, dims.experts as usize);
    let ids = random_ids(&mut cx.rng, T, K, e);
    let x = cx.rand_bf16(T * h, 1.0);
    let wts: Vec<f32> = (0..T * K).map(|_| 0.1 + cx.rng.uniform()).collect();
    let d = ok(s.dispatch(cx.cpu.ops(), view(&x, &[T, h]), view_i32(&ids, &[T, K]), e as u32))?;
    let (xd, idd, wtd) = (
        cx.up(&x, &[T, h], DType::BF16)?,
        cx.dev.gpu.upload(&ids, &[T, K], DType::I32)?,
        cx.up(&wts, &[T, K], DType::F32)?,
    );
    let dd = ok(s.dispatch(cx.dev.ops(), xd.t, idd.t, e as u32))?;
    if dd.offsets.device != Device::Cpu {
        return Err("dispatch: Dispatched::offsets must be a host tensor on CUDA too".into());
    }
    cx.same("dispatch offsets", &cx.down_i32(&dd.offsets)?, d.offsets.i32s())?;
    cx.close("dispatch x_sorted", &cx.down(&dd.x)?, d.x.f32s(), 0.0)?;
    let n = d.x.dim(0);
    let (y, dout, dxs) = (cx.rand_bf16(n * h, 1.0), cx.rand_bf16(T * h, 1.0), cx.rand_bf16(n * h, 1.0));
    let (yt, wt) = (view(&y, &[n, h]), view(&wts, &[T, K]));
    let out = ok(s.combine(cx.cpu.ops(), yt, wt, &d))?;
    let (mut dy, mut dw, mut dx) = (vec![0.0; n * h], vec![0.0; T * K], vec![0.0; T * h]);
    let (dyt, dwt) = (view_mut(&mut dy, &[n, h]), view_mut(&mut dw, &[T, K]));
    ok(s.combine_backward(cx.cpu.ops(), view(&dout, &[T, h]), yt, wt, &d, dyt, dwt))?;
    ok(s.dispatch_backward(cx.cpu.ops(), view(&dxs, &[n, h]), &d, view_mut(&mut dx, &[T, h])))?;
    let (yd, doutd, dxsd) =
        (cx.up(&y, &[n, h], DType::BF16)?, cx.up(&dout, &[T, h], DType::BF16)?, cx.up(&dxs, &[n, h], DType::BF16)?);
    let (dyd, dwd, dxd) =
        (cx.noise(&[n, h], DType::BF16)?, cx.noise(&[T, K], DType::F32)?, cx.noise(&[T, h], DType::BF16)?);
    let outd = ok(s.combine(cx.dev.ops(), yd.t, wtd.t, &dd))?;
    ok(s.combine_backward(cx.dev.ops(), doutd.t, yd.t, wtd.t, &dd, dyd.t, dwd.t))?;
    ok(s.dispatch_backward(cx.dev.ops(), dxsd.t, &dd, dxd.t))?;
    cx.close("combine out", &cx.down(&outd)?, out.f32s(), TOL_BF16)?;
    cx.close("combine_backward dy", &cx.down(&dyd)?, &dy, TOL_BF16)?;
    cx.close("combine_backward d_weights", &cx.down(&dwd)?, &dw, TOL_F32)?;
    cx.close("dispatch_backward dx", &cx.down(&dxd)?, &dx, TOL_BF16)
}

fn check_loss(cx: &mut Cx, l: &BalanceLossBox, dims: ModelDims) -> R<()> {
    let e = dims.experts as usize;
    let (logits, ids) = (cx.rand_bf16(T * e, 2.0), random_ids(&mut cx.rng, T, K, e));
    let (lt, it) = (view(&logits, &[T, e]), view_i32(&ids, &[T, K]));
    let (ld, idd) = (cx.up(&logits, &[T, e], DType::F32)?, cx.dev.gpu.upload(&ids, &[T, K], DType::I32)?);
    let (v, vd) = (ok(l.forward(cx.cpu.ops(), lt, it))?, ok(l.forward(cx.dev.ops(), ld.t, idd.t))?);
    cx.close("forward loss", &[vd], &[v], TOL_F32)?;
    let scale = 0.5 + cx.rng.uniform();
    let mut grad = vec![0.0; T * e];
    ok(l.backward(cx.cpu.ops(), lt, it, scale, view_mut(&mut grad, &[T, e])))?;
    // Start from noise the size of the grads: what backward adds must be the CPU's grad.
    let start = randn(&mut cx.rng, T * e, max_abs(&grad).max(1e-30));
    let dld = cx.up(&start, &[T, e], DType::F32)?;
    ok(l.backward(cx.dev.ops(), ld.t, idd.t, scale, dld.t))?;
    let added: Vec<f32> = cx.down(&dld)?.iter().zip(&start).map(|(a, b)| a - b).collect();
    cx.close("backward d_logits (added onto random values)", &added, &grad, TOL_F32)
}

fn check_optimizer(cx: &mut Cx, o: &OptimizerBox) -> R<()> {
    let n = 1000; // not a multiple of a block, so kernels' tails run
    let spec = ParamSpec::new("w", &[n], Init::Normal(0.02), true);
    let names = o.state(&spec).into_vec();
    let w0 = randn(&mut cx.rng, n, 1.0);
    let mut state: Vec<Vec<f32>> =
        names.iter().map(|_| randn(&mut cx.rng, n, 1.0).iter().map(|v| v.abs()).collect()).collect();
    let (mut w, wd) = (w0.clone(), cx.up(&w0, &[n], DType::F32)?);
    let sd: Vec<DTensor> = state.iter().map(|s| cx.up(s, &[n], DType::F32)).collect::<R<_>>()?;
    let st: Vec<Tensor> = state.iter_mut().map(|s| view_mut(s, &[n])).collect();
    for step in 1..=3 {
        let mut g = randn(&mut cx.rng, n, 1.0);
        let gd = cx.up(&g, &[n], DType::F32)?;
        ok(o.step(cx.cpu.ops(), &spec, view_mut(&mut w, &[n]), view_mut(&mut g, &[n]), sl(&st), 1e-2, step))?;
        ok(o.step(cx.dev.ops(), &spec, wd.t, gd.t, sl(&tv(&sd)), 1e-2, step))?;
        let delta = |w: &[f32]| -> Vec<f32> { w.iter().zip(&w0).map(|(a, b)| a - b).collect() };
        cx.close(&format!("step {step}: w - w0"), &delta(&cx.down(&wd)?), &delta(&w), TOL_F32)?;
        for ((name, s), t) in names.iter().zip(&sd).zip(&st) {
            cx.close(&format!("step {step}: state {name}"), &cx.down(s)?, t.f32s(), TOL_F32)?;
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
            let label = format!("{} {}", info.kind.as_str(), info.name);
            let c = ok((m.create())(info.kind, info.name.as_rstr(), "".into(), DIMS)).unwrap();
            for seed in [1, 2] {
                let lines = check_component(&c, &label, &gpu, DIMS, seed).unwrap_or_else(|e| panic!("{e}"));
                lines.iter().for_each(|l| println!("{l}"));
            }
        }
    }

    /// loss = 1e-3·Σ logits², the same host code on both devices, except for bug 1 (the CUDA
    /// value is 1% off) or bug 2 (CUDA's backward overwrites d_logits instead of adding to it).
    struct Square(u8);

    impl BalanceLoss for Square {
        fn forward(&self, h: Host, logits: Tensor, _: Tensor) -> Result<f32, String> {
            let v = 1e-3 * h.read_f32(logits)?.iter().map(|x| x * x).sum::<f32>();
            Ok(if h.device() == Device::Cuda && self.0 == 1 { v * 1.01 } else { v })
        }
        fn backward(&self, h: Host, logits: Tensor, _: Tensor, scale: f32, d: Tensor) -> Result<(), String> {
            let (x, mut g) = (h.read_f32(logits)?, h.read_f32(d)?);
            let keep = if h.device() == Device::Cuda && self.0 == 2 { 0.0 } else { 1.0 };
            g.iter_mut().zip(&x).for_each(|(g, x)| *g = keep * *g + scale * 2e-3 * x);
            h.copy(Tensor::new(g.as_ptr() as u64, DType::F32, Device::Cpu, &d.dims()), d)
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn a_wrong_cuda_path_fails() {
        let gpu = gpu();
        let check = |bug| check_component(&pith_plugin_api::wrap::BalanceLoss(Square(bug)), "sq", &gpu, DIMS, 1);
        check(0).unwrap();
        for (bug, what) in [(1, "forward loss: relative L2 error"), (2, "backward d_logits")] {
            let e = check(bug).expect_err("a CUDA path that differs must fail");
            println!("bug {bug}: {e}");
            assert!(e.starts_with("FAIL sq on cuda: ") && e.contains(what), "bug {bug}: {e}");
        }
    }
}
