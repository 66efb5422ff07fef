//! `local`: the single-rank comm schedule — tokens never leave this process.
//!
//! dispatch: a stable counting sort of the T·k (token, slot) pairs by expert id, EMPTY slots
//! left out (N = the non-empty pairs): x_sorted[rows[t,slot]] = x[t]; offsets [E+1];
//!   saved[0] = rows [T,k] i32 on the run's device: the sorted row of each pair, −1 if EMPTY.
//! combine:            out[t] = Σ_{non-empty slot} weights[t,slot] · y[rows[t,slot]].
//! combine_backward:   dy[rows[t,slot]] = weights[t,slot] · dout[t];
//!                     d_weights[t,slot] = ⟨dout[t], y[rows[t,slot]]⟩ (0 for EMPTY).
//! dispatch_backward:  dx[t] = Σ_{non-empty slot} dx_sorted[rows[t,slot]].
//! Sums over a token's slots run in slot order on both devices.
//!
//! CUDA (kernels/local.cu; bf16 rows, f32 gates): `local_rank` (one block per expert, and one
//! for ids that are neither experts nor EMPTY) ranks the pairs routed to each expert in
//! (token, slot) order and counts them; the counts come to the host for the offsets;
//! `local_gather` places the rows and writes `rows`, which `local_combine`, `local_combine_bwd`
//! and `local_dispatch_bwd` gather through (deterministic: no atomics).

use crate::{act, check_ids, expect, grid, ints, BLOCK};
use pith_plugin_api::{
    parse_config, register, CommSchedule, DType, Device, Dispatched, Group, Host, ModelDims, Result, RouterOut, Tensor,
    EMPTY,
};
use serde::Deserialize;

/// No settings (an empty table is fine).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {}

pub(crate) struct Local;

fn create(config: &str, _dims: ModelDims) -> Result<Local> {
    let _: Config = parse_config(config)?;
    Ok(Local)
}

register!(
    CommSchedule,
    "local",
    "single rank: counting-sort tokens by expert, weighted sum back",
    "[comm]\nplugin = \"local\"",
    create
);

const WHO: &str = "local";

const SRC: &str = kernel_source!("local.cu");

/// The map dispatch saved: rows [T,k] (pair → sorted row, −1 for EMPTY) on the run's device.
fn rows_of(d: &Dispatched, dev: Device) -> Result<Tensor> {
    let p = d.saved.first().ok_or("local: the Dispatched has no row map; was it made by `local`?")?;
    expect(p, DType::I32, dev, &[0, 0], "local: row map")?;
    Ok(*p)
}

/// Check ids [T,k] and weights [T,k] against the row map.
fn check_route(route: &RouterOut, rows: &Tensor, dev: Device) -> Result<()> {
    expect(&route.ids, DType::I32, dev, &rows.dims(), "local: ids (as dispatched)")?;
    expect(&route.weights, DType::F32, dev, &rows.dims(), "local: weights")
}

pub(crate) fn dispatch_cpu(h: Host, x: Tensor, ids: Tensor, e: usize) -> Result<Dispatched> {
    let (t, hd, k) = (x.dim(0), x.dim(1), ids.dim(1));
    let id = ids.i32s();
    check_ids(id, k, e, WHO)?;
    let offsets = h.alloc_host(&[e + 1], DType::I32)?;
    // SAFETY (here and below): offsets, rows and xs are this call's own allocations.
    let off = unsafe { offsets.i32s_mut() };
    id.iter().filter(|&&i| i != EMPTY).for_each(|&i| off[i as usize + 1] += 1);
    (0..e).for_each(|j| off[j + 1] += off[j]);
    let (rows, xs) = (h.alloc_uninit(&[t, k], DType::I32)?, h.alloc_uninit(&[off[e] as usize, hd], DType::F32)?);
    let (rv, xsv, xv) = unsafe { (rows.i32s_mut(), xs.f32s_mut(), x.f32s()) };
    let mut next = off[..e].to_vec();
    for (i, (&ex, r)) in id.iter().zip(rv.iter_mut()).enumerate() {
        *r = EMPTY;
        if ex != EMPTY {
            (*r, next[ex as usize]) = (next[ex as usize], next[ex as usize] + 1);
            let at = *r as usize * hd;
            xsv[at..at + hd].copy_from_slice(&xv[(i / k) * hd..(i / k + 1) * hd]);
        }
    }
    Ok(Dispatched { x: xs, offsets, saved: vec![rows].into() })
}

pub(crate) fn dispatch_cuda(h: Host, x: Tensor, ids: Tensor, e: usize) -> Result<Dispatched> {
    let (t, hd, k, n) = (x.dim(0), x.dim(1), ids.dim(1), ids.numel());
    let (rank, counts) = (h.alloc_uninit(&[n], DType::I32)?, h.alloc_uninit(&[e + 1], DType::I32)?);
    let [n32, k32, e32, h32] = ints([n, k, e, hd]);
    h.launch(SRC, "local_rank", grid(e + 1, 1), [1024, 1, 1], 0, &[ids.arg(), rank.arg(), counts.arg(), n32, e32])?;
    let (counts_host, offsets) = (h.alloc_host(&[e + 1], DType::I32)?, h.alloc_host(&[e + 1], DType::I32)?);
    h.copy(counts, counts_host)?;
    let c = counts_host.i32s();
    if c[e] > 0 {
        return Err(format!(
            "{WHO}: {} of the {n} ids are not experts of the model; ids must be in 0..{e} or EMPTY (-1)",
            c[e]
        ));
    }
    // SAFETY: offsets is this call's own allocation, and no host call touches it while `off` lives.
    let off = unsafe { offsets.i32s_mut() };
    (0..e).for_each(|j| off[j + 1] = off[j] + c[j]);
    let kept = off[e] as usize;
    let offsets_dev = h.alloc_uninit(&[e + 1], DType::I32)?;
    h.copy(offsets, offsets_dev)?;
    let (rows, xs) = (h.alloc_uninit(&[t, k], DType::I32)?, h.alloc_uninit(&[kept, hd], DType::BF16)?);
    let args = [x.arg(), ids.arg(), rank.arg(), offsets_dev.arg(), rows.arg(), xs.arg(), n32, k32, h32];
    h.launch(SRC, "local_gather", grid(n, 8), BLOCK, 0, &args)?;
    Ok(Dispatched { x: xs, offsets, saved: vec![rows].into() })
}

impl CommSchedule for Local {
    fn dispatch(&self, h: Host, x: Tensor, route: &RouterOut, experts: u32) -> Result<Dispatched> {
        let dev = h.device();
        if h.size(Group::ExpertParallel) > 1 {
            return Err(format!(
                "{WHO}: runs on one rank, but the expert-parallel group has {} ranks (parallel.ep); use [comm] plugin = \"alltoall\"",
                h.size(Group::ExpertParallel)
            ));
        }
        expect(&x, act(dev), dev, &[0, 0], "local: x")?;
        expect(&route.ids, DType::I32, dev, &[x.dim(0), 0], "local: ids")?;
        match dev {
            Device::Cpu => dispatch_cpu(h, x, route.ids, experts as usize),
            Device::Cuda => dispatch_cuda(h, x, route.ids, experts as usize),
        }
    }

    fn combine(&self, h: Host, y: Tensor, route: &RouterOut, d: &Dispatched) -> Result<Tensor> {
        let dev = h.device();
        let rows = rows_of(d, dev)?;
        check_route(route, &rows, dev)?;
        expect(&y, act(dev), dev, &[d.x.dim(0), 0], "local: y")?;
        let (t, k, hd) = (rows.dim(0), rows.dim(1), y.dim(1));
        let out = h.alloc_uninit(&[t, hd], act(dev))?;
        match dev {
            Device::Cpu => {
                // SAFETY: out is this call's own allocation.
                let o = unsafe { out.f32s_mut() };
                let (yv, w, rv) = (y.f32s(), route.weights.f32s(), rows.i32s());
                for (tok, o) in o.chunks_mut(hd.max(1)).enumerate() {
                    o.iter_mut().for_each(|v| *v = 0.0);
                    for i in (tok * k..(tok + 1) * k).filter(|&i| rv[i] >= 0) {
                        let r = rv[i] as usize;
                        o.iter_mut().zip(&yv[r * hd..(r + 1) * hd]).for_each(|(o, &v)| *o += w[i] * v);
                    }
                }
            }
            Device::Cuda => {
                let [t32, k32, h32] = ints([t, k, hd]);
                let args = [y.arg(), route.weights.arg(), rows.arg(), out.arg(), t32, k32, h32];
                h.launch(SRC, "local_combine", grid(t, 1), [128, 1, 1], 0, &args)?;
            }
        }
        Ok(out)
    }

    fn combine_backward(
        &self,
        h: Host,
        dout: Tensor,
        y: Tensor,
        route: &RouterOut,
        d: &Dispatched,
        dy: Tensor,
        d_weights: Tensor,
    ) -> Result<()> {
        let dev = h.device();
        let rows = rows_of(d, dev)?;
        check_route(route, &rows, dev)?;
        let (t, k, n) = (rows.dim(0), rows.dim(1), d.x.dim(0));
        expect(&y, act(dev), dev, &[n, 0], "local: y")?;
        let hd = y.dim(1);
        expect(&dout, act(dev), dev, &[t, hd], "local: dout")?;
        expect(&dy, act(dev), dev, &y.dims(), "local: dy")?;
        expect(&d_weights, DType::F32, dev, &[t, k], "local: d_weights")?;
        match dev {
            Device::Cpu => {
                let (rv, dov, yv, w) = (rows.i32s(), dout.f32s(), y.f32s(), route.weights.f32s());
                // SAFETY: dy and d_weights are the outputs; the host passes them apart from the inputs.
                let (dyv, dwv) = unsafe { (dy.f32s_mut(), d_weights.f32s_mut()) };
                for (i, (&r, dw)) in rv.iter().zip(dwv.iter_mut()).enumerate() {
                    *dw = 0.0;
                    if r >= 0 {
                        let (go, r) = (&dov[(i / k) * hd..(i / k + 1) * hd], r as usize * hd..(r as usize + 1) * hd);
                        *dw = go.iter().zip(&yv[r.clone()]).map(|(a, b)| a * b).sum();
                        dyv[r].iter_mut().zip(go).for_each(|(d, &g)| *d = w[i] * g);
                    }
                }
            }
            Device::Cuda => {
                let [n32, k32, h32] = ints([t * k, k, hd]);
                let args =
                    [dout.arg(), y.arg(), route.weights.arg(), rows.arg(), dy.arg(), d_weights.arg(), n32, k32, h32];
                h.launch(SRC, "local_combine_bwd", grid(t * k, 8), BLOCK, 0, &args)?;
            }
        }
        Ok(())
    }

    fn dispatch_backward(&self, h: Host, dx_sorted: Tensor, d: &Dispatched, dx: Tensor) -> Result<()> {
        let dev = h.device();
        let rows = rows_of(d, dev)?;
        let (t, k) = (rows.dim(0), rows.dim(1));
        expect(&dx_sorted, act(dev), dev, &[d.x.dim(0), 0], "local: dx_sorted")?;
        let hd = dx_sorted.dim(1);
        expect(&dx, act(dev), dev, &[t, hd], "local: dx")?;
        match dev {
            Device::Cpu => {
                // SAFETY: dx is the output; the host passes it apart from the inputs.
                let (rv, dxv, ds) = (rows.i32s(), unsafe { dx.f32s_mut() }, dx_sorted.f32s());
                for (tok, o) in dxv.chunks_mut(hd.max(1)).enumerate() {
                    o.iter_mut().for_each(|v| *v = 0.0);
                    for &r in rv[tok * k..(tok + 1) * k].iter().filter(|&&r| r >= 0) {
                        let r = r as usize;
                        o.iter_mut().zip(&ds[r * hd..(r + 1) * hd]).for_each(|(d, &g)| *d += g);
                    }
                }
            }
            Device::Cuda => {
                let [t32, k32, h32] = ints([t, k, hd]);
                let args = [dx_sorted.arg(), rows.arg(), dx.arg(), t32, k32, h32];
                h.launch(SRC, "local_dispatch_bwd", grid(t, 1), [128, 1, 1], 0, &args)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{dims, randn};
    use pith_plugin_api::kit::TestHost;

    /// Dispatch leaves EMPTY slots out; combine and both backwards use only the kept pairs.
    #[test]
    fn empty_slots_never_move() {
        let (t, k, hd, e) = (4, 2, 3, 3);
        let c = create("", dims(e as u32)).unwrap();
        let th = TestHost::new(t);
        let ids = [2, 0, EMPTY, 1, 0, EMPTY, EMPTY, EMPTY];
        let wv = [0.5, 0.25, 0.0, 1.5, 2.0, 0.0, 0.0, 0.0];
        let xv = randn(t * hd, 1, 1.0);
        let route = RouterOut {
            logits: th.zeros(&[t, e], DType::F32),
            probs: th.zeros(&[t, e], DType::F32),
            ids: th.tensor_i32(&ids, &[t, k]),
            weights: th.tensor_f32(&wv, &[t, k]),
            saved: Default::default(),
        };
        let d = c.dispatch(th.host(), th.tensor_f32(&xv, &[t, hd]), &route, e as u32).unwrap();
        assert_eq!(d.offsets.i32s(), [0, 2, 3, 4]);
        assert_eq!(d.saved[0].i32s(), [3, 0, EMPTY, 2, 1, EMPTY, EMPTY, EMPTY]);
        let row = |v: &[f32], r: usize| v[r * hd..(r + 1) * hd].to_vec();
        for (i, &r) in d.saved[0].i32s().iter().enumerate().filter(|(_, &r)| r >= 0) {
            assert_eq!(row(d.x.f32s(), r as usize), row(&xv, i / k), "pair {i}");
        }
        // Stand-in expert outputs, and each token's expected sum over its kept slots.
        let yv = randn(4 * hd, 2, 1.0);
        let y = th.tensor_f32(&yv, &[4, hd]);
        let out = c.combine(th.host(), y, &route, &d).unwrap();
        let want = |tok: usize, w: &dyn Fn(usize) -> f32, v: &[f32]| -> Vec<f32> {
            let rows = &d.saved[0].i32s()[tok * k..(tok + 1) * k];
            (0..hd)
                .map(|j| (0..k).filter(|&s| rows[s] >= 0).map(|s| w(tok * k + s) * v[rows[s] as usize * hd + j]).sum())
                .collect()
        };
        for tok in 0..t {
            assert_eq!(row(out.f32s(), tok), want(tok, &|i| wv[i], &yv), "combine token {tok}");
        }
        let dout = randn(t * hd, 3, 1.0);
        let (dy, dw) = (th.zeros(&[4, hd], DType::F32), th.tensor_f32(&[9.0; 8], &[t, k]));
        c.combine_backward(th.host(), th.tensor_f32(&dout, &[t, hd]), y, &route, &d, dy, dw).unwrap();
        for (i, &r) in d.saved[0].i32s().iter().enumerate() {
            let want =
                if r < 0 { 0.0 } else { row(&dout, i / k).iter().zip(row(&yv, r as usize)).map(|(a, b)| a * b).sum() };
            assert_eq!(dw.f32s()[i], want, "d_weights[{i}]");
            if r >= 0 {
                assert_eq!(row(dy.f32s(), r as usize), row(&dout, i / k).iter().map(|g| wv[i] * g).collect::<Vec<_>>());
            }
        }
        let dx = th.tensor_f32(&[7.0; 12], &[t, hd]);
        c.dispatch_backward(th.host(), y, &d, dx).unwrap();
        for tok in 0..t {
            assert_eq!(row(dx.f32s(), tok), want(tok, &|_| 1.0, &yv), "dispatch_backward token {tok}");
        }
    }
}
