//! `alltoall`: the expert-parallel comm schedule. Each rank of the expert-parallel group holds
//! E/ep consecutive experts (`ModelDims::first_expert`, `local_experts`); a token's rows travel
//! to the ranks of its experts and the outputs come back. With one rank it is `local`.
//!
//! dispatch: `local`'s counting sort of the T·k pairs over all E experts (so rank p's rows are
//!   consecutive), an all_to_all of the per-expert counts (each peer gets the counts of its own
//!   experts), one all_to_all of the rows, then a reorder of what arrived (from rank 0, 1, …,
//!   each sorted by expert) so each local expert's rows are consecutive: offsets [E/ep + 1],
//!   rows from lower ranks first.
//! combine: the reverse reorder, the all_to_all back, then `local`'s weighted sum.
//! combine_backward: `local`'s (gate-weighted dout per pair; d_weights from the returned rows),
//!   the all_to_all to the experts' ranks, the reorder.
//! dispatch_backward: the reverse reorder, the all_to_all back, `local`'s sum over a token's slots.
//!
//! Row counts reach the host once per dispatch (the counts exchange), as `local`'s offsets do.
//! saved: [0] rows [T,k] (`local`'s pair → sorted row), [1] to_expert [R] i32 (expert-major row
//! → received row), [2] to_source [R] i32 (its inverse), [3] the expert outputs returned to this
//! rank [N,H] (combine writes them; combine_backward reads them), [4] host i32 [2·ep]: rows sent
//! to and received from each peer. CUDA: kernels/alltoall.cu (a row gather).

use crate::local::{dispatch_cpu, dispatch_cuda, Local};
use crate::{act, expect, grid, ints, BLOCK};
use pith_plugin_api::{
    parse_config, register, CommSchedule, DType, Device, Dispatched, Group, Host, ModelDims, Result, RouterOut, Tensor,
};
use serde::Deserialize;

/// No settings (an empty table is fine).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {}

struct AllToAll {
    experts: usize,
    local: usize,
}

fn create(config: &str, dims: ModelDims) -> Result<AllToAll> {
    let _: Config = parse_config(config)?;
    Ok(AllToAll { experts: dims.experts as usize, local: dims.local_experts as usize })
}

register!(
    CommSchedule,
    "alltoall",
    "expert parallel: rows to the ranks holding their experts and back (NCCL all-to-all)",
    "[comm]\nplugin = \"alltoall\"",
    create
);

const WHO: &str = "alltoall";
const SRC: &str = kernel_source!("alltoall.cu");

/// The schedule's bookkeeping of one dispatch.
struct Plan {
    rows: Tensor,
    to_expert: Tensor,
    to_source: Tensor,
    back: Tensor,
    send: Vec<u64>,
    recv: Vec<u64>,
}

fn plan(d: &Dispatched, dev: Device) -> Result<Plan> {
    let [rows, to_expert, to_source, back, counts] = d.saved.as_slice() else {
        return Err(format!("{WHO}: the Dispatched was not made by `alltoall`"));
    };
    expect(counts, DType::I32, Device::Cpu, &[0], "alltoall: counts")?;
    expect(back, act(dev), dev, &[0, 0], "alltoall: returned rows")?;
    let c = counts.i32s();
    let ep = c.len() / 2;
    let (send, recv) = (c[..ep].iter().map(|&v| v as u64).collect(), c[ep..].iter().map(|&v| v as u64).collect());
    Ok(Plan { rows: *rows, to_expert: *to_expert, to_source: *to_source, back: *back, send, recv })
}

/// `local`'s view of a dispatch: its row map, and `rows` sorted rows.
fn local_view(p: &Plan, d: &Dispatched) -> Dispatched {
    Dispatched { x: p.back, offsets: d.offsets, saved: vec![p.rows].into() }
}

/// out[i] = x[idx[i]] (rows); idx on the run's device.
fn gather(h: &Host, x: Tensor, idx: Tensor, out: Tensor) -> Result<()> {
    let (n, hd) = (out.dim(0), out.dim(1));
    match h.device() {
        Device::Cpu => {
            // SAFETY: out is the caller's output, apart from x.
            let (o, xv) = (unsafe { out.f32s_mut() }, x.f32s());
            for (i, &j) in idx.i32s().iter().enumerate() {
                o[i * hd..(i + 1) * hd].copy_from_slice(&xv[j as usize * hd..(j as usize + 1) * hd]);
            }
            Ok(())
        }
        Device::Cuda => {
            let wide = hd % 8 == 0 && [x.addr, out.addr].iter().all(|a| a % 16 == 0);
            let (name, words) = if wide { ("alltoall_gather16", hd / 8) } else { ("alltoall_gather2", hd) };
            let [n32, w32] = ints([n, words]);
            h.launch(SRC, name, grid(n * words, 256), BLOCK, 0, &[x.arg(), idx.arg(), out.arg(), n32, w32])
        }
    }
}

/// Rows of `src`, `send[p]` to peer p, into a new tensor of `Σ recv` rows.
fn exchange(h: &Host, src: Tensor, send: &[u64], recv: &[u64]) -> Result<Tensor> {
    let out = h.alloc_uninit(&[recv.iter().sum::<u64>() as usize, src.dim(1)], src.dtype)?;
    h.all_to_all(src, send, out, recv, Group::ExpertParallel)?;
    Ok(out)
}

/// An i32 host vector on the run's device.
fn to_device(h: &Host, v: &[i32]) -> Result<Tensor> {
    let host = h.alloc_host(&[v.len()], DType::I32)?;
    // SAFETY: this call's own allocation.
    unsafe { host.i32s_mut() }.copy_from_slice(v);
    if h.device() == Device::Cpu {
        return Ok(host);
    }
    let dev = h.alloc_uninit(&[v.len()], DType::I32)?;
    h.copy(host, dev)?;
    Ok(dev)
}

impl AllToAll {
    /// Each peer's rows for each of this rank's experts: [peer][local expert], from the
    /// per-expert counts of this rank's rows (`offsets` [E+1], host). They travel as f32 (the
    /// CPU collective's type): exact up to 2²⁴ rows per expert and rank.
    fn exchange_counts(&self, h: &Host, offsets: &[i32]) -> Result<Vec<i32>> {
        let counts: Vec<f32> = offsets.windows(2).map(|w| (w[1] - w[0]) as f32).collect();
        let ep = self.experts / self.local;
        let (src, dst) = (h.alloc_host(&[self.experts, 1], DType::F32)?, h.alloc_host(&[self.experts, 1], DType::F32)?);
        // SAFETY: this call's own allocation.
        unsafe { src.f32s_mut() }.copy_from_slice(&counts);
        let per = vec![self.local as u64; ep];
        if h.device() == Device::Cpu {
            h.all_to_all(src, &per, dst, &per, Group::ExpertParallel)?;
        } else {
            let (s, d) =
                (h.alloc_uninit(&[self.experts, 1], DType::F32)?, h.alloc_uninit(&[self.experts, 1], DType::F32)?);
            h.copy(src, s)?;
            h.all_to_all(s, &per, d, &per, Group::ExpertParallel)?;
            h.copy(d, dst)?;
        }
        Ok(dst.f32s().iter().map(|&c| c as i32).collect())
    }
}

impl CommSchedule for AllToAll {
    fn dispatch(&self, h: Host, x: Tensor, route: &RouterOut, experts: u32) -> Result<Dispatched> {
        let (dev, ep) = (h.device(), h.size(Group::ExpertParallel));
        if ep == 1 {
            return Local.dispatch(h, x, route, experts);
        }
        if experts as usize != self.experts || self.local * ep != self.experts {
            return Err(format!(
                "{WHO}: {experts} experts over {ep} ranks, but this rank was built for {} of {} (parallel.ep must divide model.experts)",
                self.local, self.experts
            ));
        }
        expect(&x, act(dev), dev, &[0, 0], "alltoall: x")?;
        expect(&route.ids, DType::I32, dev, &[x.dim(0), 0], "alltoall: ids")?;
        let sorted = match dev {
            Device::Cpu => dispatch_cpu(h, x, route.ids, self.experts)?,
            Device::Cuda => dispatch_cuda(h, x, route.ids, self.experts)?,
        };
        let off = sorted.offsets.i32s();
        let from = self.exchange_counts(&h, off)?; // [source][local expert]
        let (l, hd) = (self.local, x.dim(1));
        let send: Vec<u64> = (0..ep).map(|p| (off[(p + 1) * l] - off[p * l]) as u64).collect();
        let recv: Vec<u64> = from.chunks(l).map(|c| c.iter().sum::<i32>() as u64).collect();
        // Received rows: source-major, expert-major inside; reorder to expert-major, source inside.
        let (mut to_expert, mut offsets) = (Vec::new(), vec![0i32; l + 1]);
        let starts: Vec<i32> = (0..ep).map(|s| recv[..s].iter().sum::<u64>() as i32).collect();
        for j in 0..l {
            for s in 0..ep {
                let at = starts[s] + from[s * l..s * l + j].iter().sum::<i32>();
                to_expert.extend(at..at + from[s * l + j]);
            }
            offsets[j + 1] = to_expert.len() as i32;
        }
        let mut to_source = vec![0i32; to_expert.len()];
        to_expert.iter().enumerate().for_each(|(i, &r)| to_source[r as usize] = i as i32);
        let arrived = exchange(&h, sorted.x, &send, &recv)?;
        let xs = h.alloc_uninit(&[to_expert.len(), hd], act(dev))?;
        let (to_expert_t, to_source_t) = (to_device(&h, &to_expert)?, to_device(&h, &to_source)?);
        gather(&h, arrived, to_expert_t, xs)?;
        let offsets_t = h.alloc_host(&[l + 1], DType::I32)?;
        // SAFETY: this call's own allocation.
        unsafe { offsets_t.i32s_mut() }.copy_from_slice(&offsets);
        let counts = h.alloc_host(&[2 * ep], DType::I32)?;
        let both: Vec<i32> = send.iter().chain(&recv).map(|&c| c as i32).collect();
        // SAFETY: as above.
        unsafe { counts.i32s_mut() }.copy_from_slice(&both);
        let back = h.alloc_uninit(&[sorted.x.dim(0), hd], act(dev))?;
        let saved = vec![sorted.saved[0], to_expert_t, to_source_t, back, counts];
        Ok(Dispatched { x: xs, offsets: offsets_t, saved: saved.into() })
    }

    fn combine(&self, h: Host, y: Tensor, route: &RouterOut, d: &Dispatched) -> Result<Tensor> {
        let dev = h.device();
        if d.saved.len() == 1 {
            return Local.combine(h, y, route, d);
        }
        let p = plan(d, dev)?;
        expect(&y, act(dev), dev, &[d.x.dim(0), p.back.dim(1)], "alltoall: y")?;
        let by_source = h.alloc_uninit(&y.dims(), y.dtype)?;
        gather(&h, y, p.to_source, by_source)?;
        h.all_to_all(by_source, &p.recv, p.back, &p.send, Group::ExpertParallel)?;
        Local.combine(h, p.back, route, &local_view(&p, d))
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
        if d.saved.len() == 1 {
            return Local.combine_backward(h, dout, y, route, d, dy, d_weights);
        }
        let p = plan(d, dev)?;
        expect(&dy, act(dev), dev, &[d.x.dim(0), p.back.dim(1)], "alltoall: dy")?;
        let dy_mine = h.alloc_uninit(&p.back.dims(), p.back.dtype)?;
        Local.combine_backward(h, dout, p.back, route, &local_view(&p, d), dy_mine, d_weights)?;
        let arrived = exchange(&h, dy_mine, &p.send, &p.recv)?;
        gather(&h, arrived, p.to_expert, dy)
    }

    fn dispatch_backward(&self, h: Host, dx_sorted: Tensor, d: &Dispatched, dx: Tensor) -> Result<()> {
        let dev = h.device();
        if d.saved.len() == 1 {
            return Local.dispatch_backward(h, dx_sorted, d, dx);
        }
        let p = plan(d, dev)?;
        expect(&dx_sorted, act(dev), dev, &[d.x.dim(0), p.back.dim(1)], "alltoall: dx_sorted")?;
        let by_source = h.alloc_uninit(&dx_sorted.dims(), dx_sorted.dtype)?;
        gather(&h, dx_sorted, p.to_source, by_source)?;
        let back = exchange(&h, by_source, &p.recv, &p.send)?;
        Local.dispatch_backward(h, back, &local_view(&p, d), dx)
    }
}
