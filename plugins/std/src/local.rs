//! `local`: the single-rank comm schedule — tokens never leave this process.
//!
//! dispatch: a stable counting sort of the T·k (token, slot) pairs by expert id:
//!   x_sorted[r] = x[t] for the pair i = t·k + slot placed at row r; offsets [E+1];
//!   saved[0] = perm [T·k] i32, perm[r] = i.
//! combine:            out[t] = Σ_slot weights[t,slot] · y[row(t,slot)].
//! combine_backward:   dy[row(t,slot)] = weights[t,slot] · dout[t];
//!                     d_weights[t,slot] = ⟨dout[t], y[row(t,slot)]⟩.
//! dispatch_backward:  dx[t] = Σ_slot dx_sorted[row(t,slot)].
//!
//! CUDA (kernels/local.cu; bf16 rows, f32 gates): `local_rank` (one block per expert) ranks the
//! pairs routed to each expert in (token, slot) order and counts them; the counts come to the
//! host for the offsets; `local_gather` places the rows. saved[0] = rows [T·k] i32 on the
//! device, rows[t·k + slot] = row(t,slot), which `local_combine`, `local_combine_bwd` and
//! `local_dispatch_bwd` gather through (deterministic: no atomics).

use crate::{act, check_ids, expect, grid, ints, BLOCK};
use pith_plugin_api::{
    parse_config, register, CommSchedule, DType, Device, Dispatched, Host, ModelDims, Result, Tensor,
};
use serde::Deserialize;

/// No settings (an empty table is fine).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {}

struct Local;

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

/// The map dispatch saved: on the CPU perm [T·k] (sorted row → t·k + slot), on CUDA rows [T·k]
/// (t·k + slot → sorted row), on the device.
fn saved(d: &Dispatched, dev: Device) -> Result<Tensor> {
    let p = d.saved.first().ok_or("local: the Dispatched has no permutation; was it made by `local`?")?;
    expect(p, DType::I32, dev, &[0], "local: permutation")?;
    Ok(*p)
}

fn dispatch_cpu(h: Host, x: Tensor, ids: Tensor, e: usize) -> Result<Dispatched> {
    let (t, hd) = (x.dim(0), x.dim(1));
    let (id, k) = (ids.i32s(), ids.dim(1));
    check_ids(id, k, e, WHO)?;
    let offsets = h.alloc(&[e + 1], DType::I32)?;
    // SAFETY (here and below): offsets, perm and xs are this call's own allocations.
    let off = unsafe { offsets.i32s_mut() };
    id.iter().for_each(|&i| off[i as usize + 1] += 1);
    (0..e).for_each(|j| off[j + 1] += off[j]);
    let (perm, xs) = (h.alloc(&[t * k], DType::I32)?, h.alloc_f32(&[t * k, hd])?);
    let (p, xsv, xv) = unsafe { (perm.i32s_mut(), xs.f32s_mut(), x.f32s()) };
    let mut next: Vec<usize> = off[..e].iter().map(|&o| o as usize).collect();
    for (i, &ex) in id.iter().enumerate() {
        let r = next[ex as usize];
        next[ex as usize] += 1;
        p[r] = i as i32;
        xsv[r * hd..(r + 1) * hd].copy_from_slice(&xv[(i / k) * hd..(i / k + 1) * hd]);
    }
    Ok(Dispatched { x: xs, offsets, saved: vec![perm].into() })
}

fn dispatch_cuda(h: Host, x: Tensor, ids: Tensor, e: usize) -> Result<Dispatched> {
    let (hd, k, n) = (x.dim(1), ids.dim(1), ids.numel());
    let (rank, rows, counts) = (h.alloc(&[n], DType::I32)?, h.alloc(&[n], DType::I32)?, h.alloc(&[e], DType::I32)?);
    let [n32, k32, e32, h32] = ints([n, k, e, hd]);
    h.launch(SRC, "local_rank", grid(e, 1), [1024, 1, 1], 0, &[ids.arg(), rank.arg(), counts.arg(), n32, e32])?;
    let (counts_host, offsets) = (h.alloc_host(&[e], DType::I32)?, h.alloc_host(&[e + 1], DType::I32)?);
    h.copy(counts, counts_host)?;
    // SAFETY: offsets is this call's own allocation, and no host call touches it while `off` lives.
    let off = unsafe { offsets.i32s_mut() };
    for (j, &c) in counts_host.i32s().iter().enumerate() {
        off[j + 1] = off[j] + c;
    }
    if off[e] as usize != n {
        let bad = n - off[e] as usize;
        return Err(format!("{WHO}: {bad} of the {n} ids are not experts of the model; ids must be in 0..{e}"));
    }
    let offsets_dev = h.alloc(&[e + 1], DType::I32)?;
    h.copy(offsets, offsets_dev)?;
    let xs = h.alloc_uninit(&[n, hd], DType::BF16)?;
    let args = [x.arg(), ids.arg(), rank.arg(), offsets_dev.arg(), rows.arg(), xs.arg(), n32, k32, h32];
    h.launch(SRC, "local_gather", grid(n, 8), BLOCK, 0, &args)?;
    Ok(Dispatched { x: xs, offsets, saved: vec![rows].into() })
}

impl CommSchedule for Local {
    fn dispatch(&self, h: Host, x: Tensor, ids: Tensor, experts: u32) -> Result<Dispatched> {
        let dev = h.device();
        expect(&x, act(dev), dev, &[0, 0], "local: x")?;
        expect(&ids, DType::I32, dev, &[x.dim(0), 0], "local: ids")?;
        match dev {
            Device::Cpu => dispatch_cpu(h, x, ids, experts as usize),
            Device::Cuda => dispatch_cuda(h, x, ids, experts as usize),
        }
    }

    fn combine(&self, h: Host, y: Tensor, weights: Tensor, d: &Dispatched) -> Result<Tensor> {
        let dev = h.device();
        let map = saved(d, dev)?;
        expect(&y, act(dev), dev, &[map.numel(), 0], "local: y")?;
        expect(&weights, DType::F32, dev, &[0, 0], "local: weights")?;
        let (t, k, hd) = (weights.dim(0), weights.dim(1), y.dim(1));
        if t * k != map.numel() {
            return Err(format!("local: weights are [{t}, {k}] but dispatch made {} rows", map.numel()));
        }
        let out = h.alloc(&[t, hd], act(dev))?;
        match dev {
            Device::Cpu => {
                // SAFETY: out is this call's own allocation.
                let o = unsafe { out.f32s_mut() };
                let (yv, w, p) = (y.f32s(), weights.f32s(), map.i32s());
                for (r, &i) in p.iter().enumerate() {
                    let tok = i as usize / k;
                    for (o, &v) in o[tok * hd..(tok + 1) * hd].iter_mut().zip(&yv[r * hd..(r + 1) * hd]) {
                        *o += w[i as usize] * v;
                    }
                }
            }
            Device::Cuda => {
                let [t32, k32, h32] = ints([t, k, hd]);
                let args = [y.arg(), weights.arg(), map.arg(), out.arg(), t32, k32, h32];
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
        weights: Tensor,
        d: &Dispatched,
        dy: Tensor,
        d_weights: Tensor,
    ) -> Result<()> {
        let dev = h.device();
        let map = saved(d, dev)?;
        let n = map.numel();
        expect(&y, act(dev), dev, &[n, 0], "local: y")?;
        expect(&weights, DType::F32, dev, &[0, 0], "local: weights")?;
        let (k, hd) = (weights.dim(1), y.dim(1));
        if weights.dim(0) * k != n {
            return Err(format!("local: weights are [{}, {k}] but dispatch made {n} rows", weights.dim(0)));
        }
        expect(&dout, act(dev), dev, &[weights.dim(0), hd], "local: dout")?;
        expect(&dy, act(dev), dev, &y.dims(), "local: dy")?;
        expect(&d_weights, DType::F32, dev, &weights.dims(), "local: d_weights")?;
        match dev {
            Device::Cpu => {
                let (p, dov, yv, w) = (map.i32s(), dout.f32s(), y.f32s(), weights.f32s());
                // SAFETY: dy and d_weights are the outputs; the host passes them apart from the inputs.
                let (dyv, dw) = unsafe { (dy.f32s_mut(), d_weights.f32s_mut()) };
                for (r, &i) in p.iter().enumerate() {
                    let (i, tok) = (i as usize, i as usize / k);
                    let (go, yr) = (&dov[tok * hd..(tok + 1) * hd], &yv[r * hd..(r + 1) * hd]);
                    dw[i] = go.iter().zip(yr).map(|(a, b)| a * b).sum();
                    dyv[r * hd..(r + 1) * hd].iter_mut().zip(go).for_each(|(d, &g)| *d = w[i] * g);
                }
            }
            Device::Cuda => {
                let [n32, k32, h32] = ints([n, k, hd]);
                let args = [dout.arg(), y.arg(), weights.arg(), map.arg(), dy.arg(), d_weights.arg(), n32, k32, h32];
                h.launch(SRC, "local_combine_bwd", grid(n, 8), BLOCK, 0, &args)?;
            }
        }
        Ok(())
    }

    fn dispatch_backward(&self, h: Host, dx_sorted: Tensor, d: &Dispatched, dx: Tensor) -> Result<()> {
        let dev = h.device();
        let map = saved(d, dev)?;
        let n = map.numel();
        expect(&dx_sorted, act(dev), dev, &[n, 0], "local: dx_sorted")?;
        expect(&dx, act(dev), dev, &[0, dx_sorted.dim(1)], "local: dx")?;
        let (t, hd) = (dx.dim(0), dx.dim(1));
        let k = n.checked_div(t).unwrap_or(1);
        if t * k != n {
            return Err(format!("local: dx has {t} tokens but dispatch made {n} rows"));
        }
        match dev {
            Device::Cpu => {
                // SAFETY: dx is the output; the host passes it apart from the inputs.
                let (p, dxv, ds) = (map.i32s(), unsafe { dx.f32s_mut() }, dx_sorted.f32s());
                dxv.iter_mut().for_each(|v| *v = 0.0);
                for (r, &i) in p.iter().enumerate() {
                    let tok = i as usize / k;
                    dxv[tok * hd..(tok + 1) * hd].iter_mut().zip(&ds[r * hd..(r + 1) * hd]).for_each(|(d, &g)| *d += g);
                }
            }
            Device::Cuda => {
                let [t32, k32, h32] = ints([t, k, hd]);
                let args = [dx_sorted.arg(), map.arg(), dx.arg(), t32, k32, h32];
                h.launch(SRC, "local_dispatch_bwd", grid(t, 1), [128, 1, 1], 0, &args)?;
            }
        }
        Ok(())
    }
}
