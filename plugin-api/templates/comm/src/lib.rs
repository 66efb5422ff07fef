//! `{{name}}`: a communication-schedule plugin for Pith (scaffolded by `pith plugins new --kind comm`).
//!
//! One rank: dispatch sorts the kept (token, slot) pairs by expert (stably; empty slots stay
//! behind), copying rows; combine sums the expert outputs back per token, weighted by the gates.
//! out[t] = Σ_s w[t,s]·y[row(t,s)];  dy[row(t,s)] = w[t,s]·dout[t];  dw[t,s] = ⟨dout[t], y[row(t,s)]⟩
//! (0 for an empty slot);  dx[t] = Σ_s dx_sorted[row(t,s)].
//! CPU only, one rank: across ranks a schedule moves rows with `h.all_to_all` (see plugins/std).
//! `cargo test` runs its test; `pith plugins check {{name}}` checks it; select it with
//! `[comm] plugin = "{{name}}"`.

use pith_plugin_api::{
    kit, parse_config, register, CommSchedule, DType, Dispatched, Group, Host, ModelDims, Result, RouterOut, Tensor,
    EMPTY,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("{{name}}");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {}

struct MyComm;

fn create(config: &str, _dims: ModelDims) -> Result<MyComm> {
    let _: Config = parse_config(config)?;
    Ok(MyComm)
}

register!(
    CommSchedule,
    "{{name}}",
    "single-rank sort by expert (scaffolded; edit me)",
    "[comm]\nplugin = \"{{name}}\"",
    create
);

/// The (token, slot) pairs with the sorted row each went to (`d.saved[0]`, [T·k], EMPTY for empty slots).
fn pairs(d: &Dispatched) -> impl Iterator<Item = (usize, usize)> + '_ {
    d.saved[0].i32s().iter().enumerate().filter(|(_, &r)| r != EMPTY).map(|(pair, &r)| (pair, r as usize))
}

impl CommSchedule for MyComm {
    fn dispatch(&self, h: Host, x: Tensor, route: &RouterOut, experts: u32) -> Result<Dispatched> {
        kit::require_cpu(&h, "{{name}}")?;
        if h.size(Group::ExpertParallel) != 1 {
            return Err("`{{name}}` runs on one rank; use a comm schedule for expert parallelism".into());
        }
        let (hd, e, id) = (x.dim(1), experts as usize, route.ids.i32s());
        if let Some(bad) = id.iter().find(|&&i| i != EMPTY && !(0..e as i32).contains(&i)) {
            return Err(format!("expert id {bad} is outside 0..{e}"));
        }
        // offsets [E+1] (a host tensor on every device): where each expert's rows start.
        let offsets = h.alloc_host(&[e + 1], DType::I32)?;
        // Writes go through f32s_mut / i32s_mut, which are unsafe: no other slice of that tensor
        // may be alive meanwhile. Here (and below) each is this call's own fresh allocation.
        let off = unsafe { offsets.i32s_mut() };
        for &i in id.iter().filter(|&&i| i != EMPTY) {
            off[i as usize + 1] += 1;
        }
        for j in 0..e {
            off[j + 1] += off[j];
        }
        // row_of[t·k + s]: the sorted row that (token t, slot s) went to, or EMPTY.
        let row_of = h.alloc(&[id.len()], DType::I32)?;
        let rows = unsafe { row_of.i32s_mut() };
        let mut next: Vec<i32> = off[..e].to_vec();
        for (r, &i) in rows.iter_mut().zip(id) {
            *r = if i == EMPTY { EMPTY } else { next[i as usize] };
            if i != EMPTY {
                next[i as usize] += 1;
            }
        }
        let k = route.ids.dim(1);
        let d =
            Dispatched { x: h.alloc_uninit(&[off[e] as usize, hd], DType::F32)?, offsets, saved: vec![row_of].into() };
        let xs = unsafe { d.x.f32s_mut() };
        for (pair, r) in pairs(&d) {
            xs[r * hd..(r + 1) * hd].copy_from_slice(&x.f32s()[pair / k * hd..(pair / k + 1) * hd]);
        }
        Ok(d)
    }

    fn combine(&self, h: Host, y: Tensor, route: &RouterOut, d: &Dispatched) -> Result<Tensor> {
        let (hd, k, t) = (y.dim(1), route.ids.dim(1), route.ids.dim(0));
        let out = h.alloc_f32(&[t, hd])?;
        let (o, ys, w) = (unsafe { out.f32s_mut() }, y.f32s(), route.weights.f32s());
        for (pair, r) in pairs(d) {
            for (o, v) in o[pair / k * hd..(pair / k + 1) * hd].iter_mut().zip(&ys[r * hd..(r + 1) * hd]) {
                *o += w[pair] * v;
            }
        }
        Ok(out)
    }

    fn combine_backward(
        &self,
        _h: Host,
        dout: Tensor,
        y: Tensor,
        route: &RouterOut,
        d: &Dispatched,
        dy: Tensor,
        d_weights: Tensor,
    ) -> Result<()> {
        let (hd, k) = (y.dim(1), route.ids.dim(1));
        let (go, ys, w) = (dout.f32s(), y.f32s(), route.weights.f32s());
        // The host passes the outputs dy and d_weights apart from the inputs.
        let (gy, gw) = unsafe { (dy.f32s_mut(), d_weights.f32s_mut()) };
        gw.iter_mut().for_each(|v| *v = 0.0); // empty slots
        for (pair, r) in pairs(d) {
            let g = &go[pair / k * hd..(pair / k + 1) * hd];
            gw[pair] = g.iter().zip(&ys[r * hd..(r + 1) * hd]).map(|(a, b)| a * b).sum();
            gy[r * hd..(r + 1) * hd].iter_mut().zip(g).for_each(|(d, g)| *d = w[pair] * g);
        }
        Ok(())
    }

    fn dispatch_backward(&self, _h: Host, dx_sorted: Tensor, d: &Dispatched, dx: Tensor) -> Result<()> {
        let hd = dx.dim(1);
        let k = d.saved[0].numel() / dx.dim(0).max(1);
        let (gs, gx) = (dx_sorted.f32s(), unsafe { dx.f32s_mut() });
        gx.iter_mut().for_each(|v| *v = 0.0);
        for (pair, r) in pairs(d) {
            gx[pair / k * hd..(pair / k + 1) * hd].iter_mut().zip(&gs[r * hd..(r + 1) * hd]).for_each(|(d, g)| *d += g);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pith_plugin_api::kit::{test_dims, TestHost};

    /// Three tokens, three experts, ids [[2, 0], [0, EMPTY], [1, 2]], with identity experts
    /// (y = dispatched x): out[t] = (Σ_s w[t,s])·x[t], and backward in closed form.
    #[test]
    fn round_trip_skips_empty_slots_and_backward_is_exact() {
        let (t, hd, k) = (3, 2, 2);
        let th = TestHost::new(t);
        let h = th.host();
        let comm = create("", test_dims(2, 3, 4)).unwrap();
        let x = th.tensor_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[t, hd]);
        let (ids, weights) = (
            th.tensor_i32(&[2, 0, 0, EMPTY, 1, 2], &[t, k]),
            th.tensor_f32(&[0.5, 0.25, 1.0, 0.0, 0.25, 0.75], &[t, k]),
        );
        let route = RouterOut { logits: x, probs: x, ids, weights, saved: Vec::new().into() };
        let d = comm.dispatch(h, x, &route, 3).unwrap();
        assert_eq!(d.offsets.i32s(), [0, 2, 3, 5]);
        // Rows by expert: 0 ← tokens 0 and 1, 1 ← token 2, 2 ← tokens 0 and 2.
        assert_eq!(d.x.f32s(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 5.0, 6.0]);
        let out = comm.combine(h, d.x, &route, &d).unwrap();
        let gate_sums = [0.75, 1.0, 1.0];
        let want: Vec<f32> = x.f32s().iter().enumerate().map(|(i, v)| gate_sums[i / hd] * v).collect();
        assert_eq!(out.f32s(), want);

        let dout = th.tensor_f32(&[1.0, -1.0, 0.5, 2.0, -3.0, 1.0], &[t, hd]);
        let (dy, d_weights) =
            (h.alloc_uninit(&[5, hd], DType::F32).unwrap(), h.alloc_uninit(&[t, k], DType::F32).unwrap());
        comm.combine_backward(h, dout, d.x, &route, &d, dy, d_weights).unwrap();
        let dot: Vec<f32> =
            (0..t).map(|i| (0..hd).map(|j| dout.f32s()[i * hd + j] * x.f32s()[i * hd + j]).sum()).collect();
        assert_eq!(d_weights.f32s(), [dot[0], dot[0], dot[1], 0.0, dot[2], dot[2]]);
        let dx = h.alloc_uninit(&[t, hd], DType::F32).unwrap();
        comm.dispatch_backward(h, dy, &d, dx).unwrap();
        let want: Vec<f32> = dout.f32s().iter().enumerate().map(|(i, v)| gate_sums[i / hd] * v).collect();
        assert_eq!(dx.f32s(), want);
    }
}
