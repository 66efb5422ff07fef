//! `adafactor`: Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with
//! Sublinear Memory Cost") without momentum, relative step or parameter scaling: the step uses
//! the host's learning rate.
//!
//! Per trained parameter, with g = grad_scale · gradient (the host's global-norm clip), step t
//! (from 1), β̂2 = 1 − t^c (c = `beta2_decay`, so β̂2 = 0 at t = 1) and ε1 = 1e-30:
//! - a parameter of rank ≥ 2, shape [.., a, b], is L = numel/(a·b) matrices G [a,b] (one per
//!   expert for [E,a,b]); each keeps row and column averages of G², not a full v:
//!   R_i ← β̂2·R_i + (1−β̂2)·mean_j(G²_ij + ε1) (R [L,a]: the first L·a elements of `exp_avg_sq_row`),
//!   C_j ← β̂2·C_j + (1−β̂2)·mean_i(G²_ij + ε1) (C [L,b]: the first L·b elements of `exp_avg_sq_col`),
//!   V̂_ij = R_i·C_j / mean_i(R_i);
//! - a 1-D parameter keeps v (`exp_avg_sq`): v ← β̂2·v + (1−β̂2)·(g² + ε1), V̂ = v.
//!
//! U = g / sqrt(V̂); Û = U / max(1, RMS(U)/d) with d = `clip_threshold` and the RMS over the
//! whole parameter tensor; w ← w − lr·(Û + wd·w), wd = `weight_decay` on decay = true params.
//! Reports `update_rms` = RMS(Û) per parameter tensor (≤ d; the step's metric is the mean over
//! tensors). The host gives every state tensor the parameter's shape (plugin-api 0.3), so the
//! factored statistics use its first elements and leave the rest zero. V̂ is formed in f64 (R_i·C_j
//! of zero-gradient rows, ~ε1², would underflow f32). The host writes the bf16 copies and zeroes
//! the gradients. CPU only.

use pith_plugin_api::{
    kit, parse_config, register, Host, ModelDims, Optimizer, ParamSpec, Result, Role, Slot, StepDone,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("adafactor");

/// ε1 of the paper: keeps V̂ > 0 where the gradient is zero.
const EPS1: f32 = 1e-30;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_beta2_decay")]
    beta2_decay: f32,
    #[serde(default = "default_clip_threshold")]
    clip_threshold: f32,
    #[serde(default)]
    weight_decay: f32,
}
fn default_beta2_decay() -> f32 {
    -0.8
}
fn default_clip_threshold() -> f32 {
    1.0
}

struct Adafactor {
    beta2_decay: f32,
    clip_threshold: f32,
    weight_decay: f32,
}

fn create(config: &str, _dims: ModelDims) -> Result<Adafactor> {
    let c: Config = parse_config(config)?;
    if !(-1.0..0.0).contains(&c.beta2_decay) {
        return Err(format!("`beta2_decay` = {} must be in [-1, 0) (the paper: -0.8)", c.beta2_decay));
    }
    if !(c.clip_threshold.is_finite() && c.clip_threshold > 0.0) {
        return Err(format!("`clip_threshold` = {} must be a finite number > 0 (the paper: 1.0)", c.clip_threshold));
    }
    if !(c.weight_decay.is_finite() && c.weight_decay >= 0.0) {
        return Err(format!("`weight_decay` = {} must be a finite number >= 0", c.weight_decay));
    }
    Ok(Adafactor { beta2_decay: c.beta2_decay, clip_threshold: c.clip_threshold, weight_decay: c.weight_decay })
}

register!(
    Optimizer,
    "adafactor",
    "Adafactor: factored second moments (row and column averages) for matrices, update clipping (Shazeer & Stern 2018)",
    "[optimizer]\nplugin = \"adafactor\"\nbeta2_decay = -0.8\nclip_threshold = 1.0\nweight_decay = 0.0",
    create
);

/// (L, a, b) of a parameter of rank ≥ 2; None for a vector.
fn factored(shape: &[u64]) -> Option<(usize, usize, usize)> {
    match shape {
        [.., a, b] => {
            let (a, b) = (*a as usize, *b as usize);
            let n = shape.iter().product::<u64>() as usize;
            Some((n / (a * b).max(1), a, b))
        }
        _ => None,
    }
}

impl Optimizer for Adafactor {
    fn state(&self, _name: &str, param: &ParamSpec) -> Vec<String> {
        match factored(&param.shape) {
            Some(_) => vec!["exp_avg_sq_row".into(), "exp_avg_sq_col".into()],
            None => vec!["exp_avg_sq".into()],
        }
    }

    fn step(&self, h: Host, slots: &[Slot], lr: f32, step: u64, grad_scale: f32) -> Result<StepDone> {
        kit::require_cpu(&h, "adafactor")?;
        let beta = 1.0 - (step.max(1) as f32).powf(self.beta2_decay);
        for s in slots.iter().filter(|s| s.spec.role == Role::Param) {
            let n = s.w.numel();
            if s.g.numel() != n || s.state.iter().any(|t| t.numel() != n) {
                return Err(format!("adafactor: {}: weight, grad and state differ in size", s.name));
            }
            let g: Vec<f32> = s.g.f32s().iter().map(|&v| grad_scale * v).collect();
            // U = g / sqrt(V̂), before clipping.
            let mut u = vec![0.0f32; n];
            match (factored(&s.spec.shape), &s.state[..]) {
                (Some((l, a, b)), [row, col]) => {
                    // SAFETY: row and col are distinct state buffers; nothing else views them.
                    let (rv, cv) = unsafe { (row.f32s_mut(), col.f32s_mut()) };
                    for m in 0..l {
                        let gm = &g[m * a * b..(m + 1) * a * b];
                        let (r, c) = (&mut rv[m * a..(m + 1) * a], &mut cv[m * b..(m + 1) * b]);
                        for (i, ri) in r.iter_mut().enumerate() {
                            let mean = gm[i * b..(i + 1) * b].iter().map(|&x| x * x + EPS1).sum::<f32>() / b as f32;
                            *ri = beta * *ri + (1.0 - beta) * mean;
                        }
                        for (j, cj) in c.iter_mut().enumerate() {
                            let mean = (0..a).map(|i| gm[i * b + j] * gm[i * b + j] + EPS1).sum::<f32>() / a as f32;
                            *cj = beta * *cj + (1.0 - beta) * mean;
                        }
                        let r_mean = r.iter().map(|&x| x as f64).sum::<f64>() / a as f64;
                        for i in 0..a {
                            for j in 0..b {
                                let v = r[i] as f64 * c[j] as f64 / r_mean;
                                u[m * a * b + i * b + j] = (gm[i * b + j] as f64 / v.sqrt()) as f32;
                            }
                        }
                    }
                }
                (None, [v]) => {
                    // SAFETY: v is this parameter's own state buffer.
                    let vv = unsafe { v.f32s_mut() };
                    for ((ui, vi), &gi) in u.iter_mut().zip(vv).zip(&g) {
                        *vi = beta * *vi + (1.0 - beta) * (gi * gi + EPS1);
                        *ui = gi / vi.sqrt();
                    }
                }
                _ => return Err(format!("adafactor: {}: unexpected {} state tensors", s.name, s.state.len())),
            }
            let rms = (u.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / n.max(1) as f64).sqrt();
            let scale = 1.0 / (rms / self.clip_threshold as f64).max(1.0);
            let wd = if s.spec.decay { self.weight_decay } else { 0.0 };
            // SAFETY: w is this parameter's own buffer, apart from g and the state.
            let wv = unsafe { s.w.f32s_mut() };
            for (w, &ui) in wv.iter_mut().zip(&u) {
                *w -= lr * (ui * scale as f32 + wd * *w);
            }
            h.metric("update_rms", rms * scale);
        }
        Ok(StepDone::default())
    }
}
