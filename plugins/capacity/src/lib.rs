//! `capacity`: the single-rank comm schedule with token dropping by a capacity factor (GShard,
//! Lepikhin et al. 2020; Switch Transformer, Fedus et al. 2021; Megatron-Core's
//! `moe_expert_capacity_factor` with `moe_token_drop_policy = "probs"`).
//!
//! Capacity per expert: C = ⌈capacity_factor · N_slots / E⌉ (computed in f64, at most N_slots),
//! N_slots = the non-EMPTY (token, slot) pairs of this micro-batch, E = the model's experts.
//!
//! dispatch: each expert keeps its C pairs with the largest gates (`route.weights`, ordered by
//!   `f32::total_cmp`; ties go to the earlier pair i = t·k + slot) and drops the rest before any
//!   expert runs. The kept pairs are then placed exactly as `local` places its pairs: a stable
//!   counting sort by expert, so an expert's rows keep (token, slot) order; offsets [E+1] count
//!   the kept rows only;
//!   saved[0] = rows [T,k] i32 on the run's device: the sorted row of each pair, −1 if EMPTY or
//!   dropped. Metric `dropped_frac` = dropped / N_slots, weighted by N_slots (none when N_slots = 0).
//! combine:            out[t] = Σ_{kept slot} weights[t,slot] · y[rows[t,slot]].
//! combine_backward:   dy[rows[t,slot]] = weights[t,slot] · dout[t];
//!                     d_weights[t,slot] = ⟨dout[t], y[rows[t,slot]]⟩ (0 for EMPTY and dropped).
//! dispatch_backward:  dx[t] = Σ_{kept slot} dx_sorted[rows[t,slot]] (0 for a token with none).
//! Sums over a token's slots run in slot order on both devices. These three are `local`'s code:
//! when no expert has more than C pairs, every output equals `local`'s bit for bit.
//!
//! CUDA (kernels/capacity.cu; bf16 rows, f32 gates): `capacity_rank` (`local_rank`) ranks each
//! expert's pairs in (token, slot) order and counts them; the counts come to the host for N_slots,
//! C and the offsets (kept rows per expert = min(count, C)). Only when some expert is over
//! capacity, `capacity_list` lists each expert's pairs and `capacity_select` (one block per
//! expert) ranks every pair by gate against the others of its expert (a pair is kept when fewer
//! than C rank ahead of it) and numbers the kept ones in (token, slot) order; otherwise the rank
//! is used as is, which is `local`'s dispatch. `capacity_gather`, `capacity_combine`,
//! `capacity_combine_bwd` and `capacity_dispatch_bwd` are `local.cu`'s (deterministic: no atomics).

use pith_plugin_api::{
    kernel_source, parse_config, register, Arg, CommSchedule, DType, Device, Dispatched, Group, Host, ModelDims,
    Result, RouterOut, Tensor, EMPTY,
};
use serde::Deserialize;

// The library's root module. Not in this crate's own unit-test binary: that links the built-in
// pack (pith-std, to compare against `local`), whose root module has the same exported symbol.
#[cfg(not(test))]
pith_plugin_api::export_plugin!("capacity");

const WHO: &str = "capacity";

/// The capacity factor when the table leaves it out (GShard's and Switch's common training value).
const DEFAULT_FACTOR: f64 = 1.25;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// C = ⌈capacity_factor · N_slots / E⌉ assignments per expert; finite, > 0.
    capacity_factor: Option<f64>,
}

/// The schedule of one MoE layer.
struct Capacity {
    factor: f64,
}

fn create(config: &str, _dims: ModelDims) -> Result<Capacity> {
    let c: Config = parse_config(config)?;
    let factor = c.capacity_factor.unwrap_or(DEFAULT_FACTOR);
    if !(factor.is_finite() && factor > 0.0) {
        return Err(format!(
            "`capacity_factor` = {factor} but it must be a finite number > 0 (1.0: each expert takes its even share \
             of the assignments; default {DEFAULT_FACTOR}; a large value such as 1e6 drops nothing)"
        ));
    }
    Ok(Capacity { factor })
}

register!(
    CommSchedule,
    "capacity",
    "single rank with token dropping: each expert keeps its ceil(capacity_factor*N/E) highest-gate assignments",
    "[comm]\nplugin = \"capacity\"\ncapacity_factor = 1.25",
    create
);

fn src() -> &'static str {
    kernel_source!(include_str!("../kernels/capacity.cu"))
}

/// Threads per block of the warp-per-row and thread-per-item launches (8 warps; the warp-per-row
/// kernels rely on it).
const BLOCK: [u32; 3] = [256, 1, 1];

/// Grid for a grid-stride loop over `n` items, `per_block` of them per block (at least 1 block,
/// so an empty input is a valid launch; at most 65535).
fn grid(n: usize, per_block: usize) -> [u32; 3] {
    [n.div_ceil(per_block).clamp(1, 65535) as u32, 1, 1]
}

use pith_plugin_api::kit::ints;

/// The dtype of activations on `device`: f32 on the CPU, bf16 on CUDA.
fn act(device: Device) -> DType {
    match device {
        Device::Cpu => DType::F32,
        Device::Cuda => DType::BF16,
    }
}

use pith_plugin_api::kit::expect;

/// Check that every id is an expert of the model or EMPTY: `ids` [T,k] in 0..experts or -1.
fn check_ids(ids: &[i32], k: usize, experts: usize) -> Result<()> {
    match ids.iter().position(|&i| i != EMPTY && (i < 0 || i as usize >= experts)) {
        None => Ok(()),
        Some(p) => Err(format!(
            "{WHO}: ids[{}, {}] = {} but the model has {experts} experts; ids must be in 0..{experts} or EMPTY (-1)",
            p / k,
            p % k,
            ids[p]
        )),
    }
}

impl Capacity {
    /// C = ⌈capacity_factor · slots / experts⌉ (in f64), at most `slots`.
    fn capacity(&self, slots: usize, experts: usize) -> usize {
        let c = (self.factor * slots as f64 / experts.max(1) as f64).ceil();
        match c < slots as f64 {
            true => c as usize,
            false => slots,
        }
    }
}

/// Which pairs are kept: each expert's `cap` pairs with the largest gates (f32 total order, ties
/// to the earlier pair); EMPTY pairs never are.
fn select(id: &[i32], w: &[f32], e: usize, cap: usize) -> Vec<bool> {
    let mut per: Vec<Vec<usize>> = vec![Vec::new(); e];
    id.iter().enumerate().filter(|(_, &i)| i != EMPTY).for_each(|(p, &i)| per[i as usize].push(p));
    let mut keep = vec![false; id.len()];
    for mut pairs in per {
        if pairs.len() > cap {
            pairs.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
            pairs.truncate(cap);
        }
        pairs.into_iter().for_each(|p| keep[p] = true);
    }
    keep
}

/// `dropped_frac` of this call: dropped / N_slots, weighted by N_slots (nothing when no slot is used).
fn report(h: &Host, slots: usize, kept: usize) {
    if slots > 0 {
        h.metric_weighted("dropped_frac", (slots - kept) as f64 / slots as f64, slots as f64);
    }
}

/// The map dispatch saved: rows [T,k] (pair → sorted row, −1 for EMPTY or dropped) on the run's device.
fn rows_of(d: &Dispatched, dev: Device) -> Result<Tensor> {
    let p = d.saved.first().ok_or("capacity: the Dispatched has no row map; was it made by `capacity`?")?;
    expect(p, DType::I32, dev, &[0, 0], "capacity: row map")?;
    Ok(*p)
}

/// Check ids [T,k] and weights [T,k] against the row map.
fn check_route(route: &RouterOut, rows: &Tensor, dev: Device) -> Result<()> {
    expect(&route.ids, DType::I32, dev, &rows.dims(), "capacity: ids (as dispatched)")?;
    expect(&route.weights, DType::F32, dev, &rows.dims(), "capacity: weights")
}

impl Capacity {
    fn dispatch_cpu(&self, h: Host, x: Tensor, route: &RouterOut, e: usize) -> Result<Dispatched> {
        let (t, hd, k) = (x.dim(0), x.dim(1), route.ids.dim(1));
        let (id, w) = (route.ids.i32s(), route.weights.f32s());
        check_ids(id, k, e)?;
        let slots = id.iter().filter(|&&i| i != EMPTY).count();
        let keep = select(id, w, e, self.capacity(slots, e));
        // From here on `local`'s counting sort, over the kept pairs only.
        let offsets = h.alloc_host(&[e + 1], DType::I32)?;
        // SAFETY (here and below): offsets, rows and xs are this call's own allocations.
        let off = unsafe { offsets.i32s_mut() };
        id.iter().zip(&keep).filter(|(_, &kept)| kept).for_each(|(&i, _)| off[i as usize + 1] += 1);
        (0..e).for_each(|j| off[j + 1] += off[j]);
        report(&h, slots, off[e] as usize);
        let (rows, xs) = (h.alloc_uninit(&[t, k], DType::I32)?, h.alloc_uninit(&[off[e] as usize, hd], DType::F32)?);
        let (rv, xsv, xv) = unsafe { (rows.i32s_mut(), xs.f32s_mut(), x.f32s()) };
        let mut next = off[..e].to_vec();
        for (i, (&ex, r)) in id.iter().zip(rv.iter_mut()).enumerate() {
            *r = EMPTY;
            if keep[i] {
                (*r, next[ex as usize]) = (next[ex as usize], next[ex as usize] + 1);
                let at = *r as usize * hd;
                xsv[at..at + hd].copy_from_slice(&xv[(i / k) * hd..(i / k + 1) * hd]);
            }
        }
        Ok(Dispatched { x: xs, offsets, saved: vec![rows].into() })
    }

    fn dispatch_cuda(&self, h: Host, x: Tensor, route: &RouterOut, e: usize) -> Result<Dispatched> {
        let (ids, w) = (route.ids, route.weights);
        let (t, hd, k, n) = (x.dim(0), x.dim(1), ids.dim(1), ids.numel());
        let (rank, counts) = (h.alloc_uninit(&[n], DType::I32)?, h.alloc_uninit(&[e + 1], DType::I32)?);
        let [n32, k32, e32, h32] = ints([n, k, e, hd]);
        let args = [ids.arg(), rank.arg(), counts.arg(), n32, e32];
        h.launch(src(), "capacity_rank", grid(e + 1, 1), [1024, 1, 1], 0, &args)?;
        let counts_host = h.alloc_host(&[e + 1], DType::I32)?;
        h.copy(counts, counts_host)?;
        let c = counts_host.i32s();
        if c[e] > 0 {
            return Err(format!(
                "{WHO}: {} of the {n} ids are not experts of the model; ids must be in 0..{e} or EMPTY (-1)",
                c[e]
            ));
        }
        let slots = c[..e].iter().sum::<i32>() as usize;
        let cap = self.capacity(slots, e);
        let offsets = h.alloc_host(&[e + 1], DType::I32)?;
        // SAFETY: offsets is this call's own allocation, and no host call touches it while `off` lives.
        let off = unsafe { offsets.i32s_mut() };
        (0..e).for_each(|j| off[j + 1] = off[j] + c[j].min(cap as i32));
        let kept = off[e] as usize;
        report(&h, slots, kept);
        let offsets_dev = h.alloc_uninit(&[e + 1], DType::I32)?;
        h.copy(offsets, offsets_dev)?;
        let krank = match c[..e].iter().any(|&ce| ce as usize > cap) {
            false => rank, // nothing drops: every pair keeps its rank, as in `local`
            true => {
                // Every pair's offsets, for the lists of each expert's pairs.
                let all_host = h.alloc_host(&[e + 1], DType::I32)?;
                // SAFETY: all_host is this call's own allocation, and no host call touches it while `a` lives.
                let a = unsafe { all_host.i32s_mut() };
                (0..e).for_each(|j| a[j + 1] = a[j] + c[j]);
                let all = h.alloc_uninit(&[e + 1], DType::I32)?;
                h.copy(all_host, all)?;
                let (list, krank) = (h.alloc_uninit(&[slots], DType::I32)?, h.alloc_uninit(&[n], DType::I32)?);
                let args = [ids.arg(), rank.arg(), all.arg(), list.arg(), n32];
                h.launch(src(), "capacity_list", grid(n, BLOCK[0] as usize), BLOCK, 0, &args)?;
                let args = [list.arg(), all.arg(), w.arg(), krank.arg(), e32, Arg::I32(cap as i32)];
                h.launch(src(), "capacity_select", grid(e, 1), [1024, 1, 1], 0, &args)?;
                krank
            }
        };
        let (rows, xs) = (h.alloc_uninit(&[t, k], DType::I32)?, h.alloc_uninit(&[kept, hd], DType::BF16)?);
        let args = [x.arg(), ids.arg(), krank.arg(), offsets_dev.arg(), rows.arg(), xs.arg(), n32, k32, h32];
        h.launch(src(), "capacity_gather", grid(n, 8), BLOCK, 0, &args)?;
        Ok(Dispatched { x: xs, offsets, saved: vec![rows].into() })
    }
}

impl CommSchedule for Capacity {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(capacity_factor = self.factor)
    }

    fn dispatch(&self, h: Host, x: Tensor, route: &RouterOut, experts: u32) -> Result<Dispatched> {
        let dev = h.device();
        if h.size(Group::ExpertParallel) > 1 {
            return Err(format!(
                "{WHO}: runs on one rank, but the expert-parallel group has {} ranks",
                h.size(Group::ExpertParallel)
            ));
        }
        expect(&x, act(dev), dev, &[0, 0], "capacity: x")?;
        expect(&route.ids, DType::I32, dev, &[x.dim(0), 0], "capacity: ids")?;
        expect(&route.weights, DType::F32, dev, &route.ids.dims(), "capacity: weights")?;
        match dev {
            Device::Cpu => self.dispatch_cpu(h, x, route, experts as usize),
            Device::Cuda => self.dispatch_cuda(h, x, route, experts as usize),
        }
    }

    fn combine(&self, h: Host, y: Tensor, route: &RouterOut, d: &Dispatched) -> Result<Tensor> {
        let dev = h.device();
        let rows = rows_of(d, dev)?;
        check_route(route, &rows, dev)?;
        expect(&y, act(dev), dev, &[d.x.dim(0), 0], "capacity: y")?;
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
                h.launch(src(), "capacity_combine", grid(t, 1), [128, 1, 1], 0, &args)?;
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
        expect(&y, act(dev), dev, &[n, 0], "capacity: y")?;
        let hd = y.dim(1);
        expect(&dout, act(dev), dev, &[t, hd], "capacity: dout")?;
        expect(&dy, act(dev), dev, &y.dims(), "capacity: dy")?;
        expect(&d_weights, DType::F32, dev, &[t, k], "capacity: d_weights")?;
        match dev {
            Device::Cpu => {
                let (rv, dov, yv, w) = (rows.i32s(), dout.f32s(), y.f32s(), route.weights.f32s());
                // SAFETY: dy and d_weights are the outputs; the host passes them apart from the inputs.
                let (dyv, dwv) = unsafe { (dy.f32s_mut(), d_weights.f32s_mut()) };
                for (i, (&r, dw)) in rv.iter().zip(dwv.iter_mut()).enumerate() {
                    *dw = 0.0; // EMPTY and dropped slots: no row, no gate gradient
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
                h.launch(src(), "capacity_combine_bwd", grid(t * k, 8), BLOCK, 0, &args)?;
            }
        }
        Ok(())
    }

    fn dispatch_backward(&self, h: Host, dx_sorted: Tensor, d: &Dispatched, dx: Tensor) -> Result<()> {
        let dev = h.device();
        let rows = rows_of(d, dev)?;
        let (t, k) = (rows.dim(0), rows.dim(1));
        expect(&dx_sorted, act(dev), dev, &[d.x.dim(0), 0], "capacity: dx_sorted")?;
        let hd = dx_sorted.dim(1);
        expect(&dx, act(dev), dev, &[t, hd], "capacity: dx")?;
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
                h.launch(src(), "capacity_dispatch_bwd", grid(t, 1), [128, 1, 1], 0, &args)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
