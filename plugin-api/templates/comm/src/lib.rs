//! `{{name}}`: a communication-schedule plugin for Pith (scaffolded by `pith plugins new --kind comm`).
//!
//! Single rank: dispatch sorts the T·k (token, slot) pairs by expert (stable), copying rows;
//! combine sums the expert outputs back per token, weighted by the gates.
//! out[t] = Σ_s w[t,s]·y[row(t,s)];  dy[row(t,s)] = w[t,s]·dout[t];  dw[t,s] = ⟨dout[t], y[row(t,s)]⟩;
//! dx[t] = Σ_s dx_sorted[row(t,s)].
//! Check it with `pith plugins check {{name}}`; select it with `[comm] plugin = "{{name}}"`.

use pith_plugin_api::{parse_config, register, CommSchedule, DType, Dispatched, Host, ModelDims, Result, Tensor};
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

register!(CommSchedule, "{{name}}", "single-rank sort by expert (scaffolded; edit me)", "[comm]\nplugin = \"{{name}}\"", create);

impl CommSchedule for MyComm {
    fn dispatch(&self, h: Host, x: Tensor, ids: Tensor, experts: u32) -> Result<Dispatched> {
        let (t, hd, k, e) = (x.dim(0), x.dim(1), ids.dim(1), experts as usize);
        let id = ids.i32s();
        if let Some(bad) = id.iter().find(|&&i| i < 0 || i as usize >= e) {
            return Err(format!("expert id {bad} is outside 0..{e}"));
        }
        let offsets = h.alloc(&[e + 1], DType::I32)?;
        // Writes go through f32s_mut / i32s_mut, which are unsafe: no other slice of that tensor
        // may be alive meanwhile. Here (and below) each is this call's own fresh allocation.
        let off = unsafe { offsets.i32s_mut() };
        for &i in id.iter() {
            off[i as usize + 1] += 1;
        }
        for j in 0..e {
            off[j + 1] += off[j];
        }
        // row_of[t·k + s]: the sorted row that (token t, slot s) went to.
        let row_of = h.alloc(&[t * k], DType::I32)?;
        let rows = unsafe { row_of.i32s_mut() };
        let mut next: Vec<i32> = off[..e].to_vec();
        for (pair, &i) in id.iter().enumerate() {
            rows[pair] = next[i as usize];
            next[i as usize] += 1;
        }
        let xs = h.alloc_f32(&[t * k, hd])?;
        let xsv = unsafe { xs.f32s_mut() };
        for (pair, &r) in rows.iter().enumerate() {
            let src = &x.f32s()[pair / k * hd..(pair / k + 1) * hd];
            xsv[r as usize * hd..(r as usize + 1) * hd].copy_from_slice(src);
        }
        Ok(Dispatched { x: xs, offsets, saved: vec![row_of].into() })
    }

    fn combine(&self, h: Host, y: Tensor, weights: Tensor, d: &Dispatched) -> Result<Tensor> {
        let (hd, k) = (y.dim(1), weights.dim(1));
        let t = weights.dim(0);
        let out = h.alloc_f32(&[t, hd])?;
        let (o, ys, w) = (unsafe { out.f32s_mut() }, y.f32s(), weights.f32s());
        for (pair, &r) in d.saved[0].i32s().iter().enumerate() {
            let row = &ys[r as usize * hd..(r as usize + 1) * hd];
            for (o, v) in o[pair / k * hd..(pair / k + 1) * hd].iter_mut().zip(row) {
                *o += w[pair] * v;
            }
        }
        Ok(out)
    }

    fn combine_backward(&self, _h: Host, dout: Tensor, y: Tensor, weights: Tensor, d: &Dispatched, dy: Tensor, d_weights: Tensor) -> Result<()> {
        let (hd, k) = (y.dim(1), weights.dim(1));
        let (go, ys, w) = (dout.f32s(), y.f32s(), weights.f32s());
        // The host passes the outputs dy and d_weights apart from the inputs.
        let (gy, gw) = unsafe { (dy.f32s_mut(), d_weights.f32s_mut()) };
        for (pair, &r) in d.saved[0].i32s().iter().enumerate() {
            let (r, t) = (r as usize, pair / k);
            let g = &go[t * hd..(t + 1) * hd];
            gw[pair] = g.iter().zip(&ys[r * hd..(r + 1) * hd]).map(|(a, b)| a * b).sum();
            for (d, g) in gy[r * hd..(r + 1) * hd].iter_mut().zip(g) {
                *d = w[pair] * g;
            }
        }
        Ok(())
    }

    fn dispatch_backward(&self, _h: Host, dx_sorted: Tensor, d: &Dispatched, dx: Tensor) -> Result<()> {
        let hd = dx.dim(1);
        let k = d.saved[0].numel() / dx.dim(0).max(1);
        let (gs, gx) = (dx_sorted.f32s(), unsafe { dx.f32s_mut() });
        gx.iter_mut().for_each(|v| *v = 0.0);
        for (pair, &r) in d.saved[0].i32s().iter().enumerate() {
            let r = r as usize;
            for (d, g) in gx[pair / k * hd..(pair / k + 1) * hd].iter_mut().zip(&gs[r * hd..(r + 1) * hd]) {
                *d += g;
            }
        }
        Ok(())
    }
}
