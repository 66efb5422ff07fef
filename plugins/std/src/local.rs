//! `local`: the single-rank comm schedule — tokens never leave this process.
//!
//! dispatch: a stable counting sort of the T·k (token, slot) pairs by expert id:
//!   x_sorted[r] = x[t] for the pair i = t·k + slot placed at row r; offsets [E+1];
//!   saved[0] = perm [T·k] i32, perm[r] = i.
//! combine:            out[t] = Σ_slot weights[t,slot] · y[row(t,slot)].
//! combine_backward:   dy[row(t,slot)] = weights[t,slot] · dout[t];
//!                     d_weights[t,slot] = ⟨dout[t], y[row(t,slot)]⟩.
//! dispatch_backward:  dx[t] = Σ_slot dx_sorted[row(t,slot)].

use crate::{check_ids, expect, need_cpu};
use pith_plugin_api::{parse_config, register, CommSchedule, DType, Dispatched, Host, ModelDims, Result, Tensor};
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

/// The permutation dispatch saved (sorted row → t·k + slot).
fn perm(d: &Dispatched) -> Result<&[i32]> {
    let p = d.saved.first().ok_or("local: the Dispatched has no permutation; was it made by `local`?")?;
    expect(p, DType::I32, &[0], "local: permutation")?;
    Ok(p.i32s())
}

impl CommSchedule for Local {
    fn dispatch(&self, h: Host, x: Tensor, ids: Tensor, experts: u32) -> Result<Dispatched> {
        need_cpu(&h, WHO)?;
        expect(&x, DType::F32, &[0, 0], "local: x")?;
        let (t, hd, e) = (x.dim(0), x.dim(1), experts as usize);
        expect(&ids, DType::I32, &[t, 0], "local: ids")?;
        let (id, k) = (ids.i32s(), ids.dim(1));
        check_ids(id, k, e, WHO)?;
        let offsets = h.alloc(&[e + 1], DType::I32)?;
        let off = offsets.i32s();
        id.iter().for_each(|&i| off[i as usize + 1] += 1);
        (0..e).for_each(|j| off[j + 1] += off[j]);
        let (perm, xs) = (h.alloc(&[t * k], DType::I32)?, h.alloc_f32(&[t * k, hd])?);
        let (p, xsv, xv) = (perm.i32s(), xs.f32s(), x.f32s());
        let mut next: Vec<usize> = off[..e].iter().map(|&o| o as usize).collect();
        for (i, &ex) in id.iter().enumerate() {
            let r = next[ex as usize];
            next[ex as usize] += 1;
            p[r] = i as i32;
            xsv[r * hd..(r + 1) * hd].copy_from_slice(&xv[(i / k) * hd..(i / k + 1) * hd]);
        }
        Ok(Dispatched { x: xs, offsets, saved: vec![perm].into() })
    }

    fn combine(&self, h: Host, y: Tensor, weights: Tensor, d: &Dispatched) -> Result<Tensor> {
        need_cpu(&h, WHO)?;
        let p = perm(d)?;
        expect(&y, DType::F32, &[p.len(), 0], "local: y")?;
        expect(&weights, DType::F32, &[0, 0], "local: weights")?;
        let (t, k, hd) = (weights.dim(0), weights.dim(1), y.dim(1));
        if t * k != p.len() {
            return Err(format!("local: weights are [{t}, {k}] but dispatch made {} rows", p.len()));
        }
        let out = h.alloc_f32(&[t, hd])?;
        let (o, yv, w) = (out.f32s(), y.f32s(), weights.f32s());
        for (r, &i) in p.iter().enumerate() {
            let tok = i as usize / k;
            for (o, &v) in o[tok * hd..(tok + 1) * hd].iter_mut().zip(&yv[r * hd..(r + 1) * hd]) {
                *o += w[i as usize] * v;
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
        need_cpu(&h, WHO)?;
        let p = perm(d)?;
        let (k, hd) = (weights.dim(1), y.dim(1));
        expect(&dout, DType::F32, &[weights.dim(0), hd], "local: dout")?;
        expect(&dy, DType::F32, &y.dims(), "local: dy")?;
        expect(&d_weights, DType::F32, &weights.dims(), "local: d_weights")?;
        let (dov, yv, w, dyv, dw) = (dout.f32s(), y.f32s(), weights.f32s(), dy.f32s(), d_weights.f32s());
        for (r, &i) in p.iter().enumerate() {
            let (i, tok) = (i as usize, i as usize / k);
            let (go, yr) = (&dov[tok * hd..(tok + 1) * hd], &yv[r * hd..(r + 1) * hd]);
            dw[i] = go.iter().zip(yr).map(|(a, b)| a * b).sum();
            dyv[r * hd..(r + 1) * hd].iter_mut().zip(go).for_each(|(d, &g)| *d = w[i] * g);
        }
        Ok(())
    }

    fn dispatch_backward(&self, h: Host, dx_sorted: Tensor, d: &Dispatched, dx: Tensor) -> Result<()> {
        need_cpu(&h, WHO)?;
        let p = perm(d)?;
        expect(&dx_sorted, DType::F32, &[p.len(), 0], "local: dx_sorted")?;
        expect(&dx, DType::F32, &[0, dx_sorted.dim(1)], "local: dx")?;
        let (t, hd) = (dx.dim(0), dx.dim(1));
        let k = p.len().checked_div(t).unwrap_or(1);
        if t * k != p.len() {
            return Err(format!("local: dx has {t} tokens but dispatch made {} rows", p.len()));
        }
        let (dxv, ds) = (dx.f32s(), dx_sorted.f32s());
        dxv.iter_mut().for_each(|v| *v = 0.0);
        for (r, &i) in p.iter().enumerate() {
            let tok = i as usize / k;
            dxv[tok * hd..(tok + 1) * hd].iter_mut().zip(&ds[r * hd..(r + 1) * hd]).for_each(|(d, &g)| *d += g);
        }
        Ok(())
    }
}
