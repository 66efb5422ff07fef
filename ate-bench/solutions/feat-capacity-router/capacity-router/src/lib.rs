//! `capacity-router`: top-k softmax routing with a per-expert capacity (GShard / Switch
//! Transformer "capacity factor"). An assignment over capacity is dropped: its slot becomes
//! `EMPTY` (gate 0), so the comm schedule never dispatches it, no expert computes it, it
//! contributes nothing and gets no gradient.
//!
//! Forward, for x [T,H], W [E,H]: logits = x·Wᵀ, p = softmax(logits) (returned as probs, what
//!   the balance losses use), S_t = top_k ids by p.
//!   C = ceil(capacity_factor · T · top_k / E). Assignments are granted slot-major (every token's
//!   first choice, in token order, then every second choice, ...) while the expert has room:
//!   granted: id = j, w_tj = p_tj; else id = EMPTY, w = 0. Reports `dropped_frac` = dropped / (T·top_k).
//! Backward: dp = d_probs + d_weights on the granted (non-EMPTY) slots;
//!   dlogits = d_logits + p ⊙ (dp − ⟨dp, p⟩);  dW += dlogitsᵀ·x;  dx = dlogits·W.  CPU only.

use pith_plugin_api::{
    kit, parse_config, register, DType, Host, Init, ModelDims, ParamSpec, Result, Router, RouterOut, Tensor, EMPTY,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("capacity-router");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_top_k")]
    top_k: usize,
    #[serde(default = "default_capacity_factor")]
    capacity_factor: f32,
}
fn default_top_k() -> usize {
    2
}
fn default_capacity_factor() -> f32 {
    1.25
}

struct CapacityRouter {
    hidden: usize,
    experts: usize,
    top_k: usize,
    capacity_factor: f32,
}

fn create(config: &str, dims: ModelDims) -> Result<CapacityRouter> {
    let c: Config = parse_config(config)?;
    let experts = dims.experts as usize;
    if c.top_k == 0 || c.top_k > experts {
        return Err(format!("`top_k` = {} but the model has {experts} experts; use 1..={experts}", c.top_k));
    }
    if !(c.capacity_factor.is_finite() && c.capacity_factor > 0.0) {
        return Err(format!(
            "`capacity_factor` = {} must be a finite number > 0 (typical: 1.0-2.0)",
            c.capacity_factor
        ));
    }
    Ok(CapacityRouter { hidden: dims.hidden as usize, experts, top_k: c.top_k, capacity_factor: c.capacity_factor })
}

register!(
    Router,
    "capacity-router",
    "top-k softmax with a per-expert capacity; over-capacity assignments are dropped (EMPTY slots)",
    "[router]\nplugin = \"capacity-router\"\ntop_k = 2\ncapacity_factor = 1.25",
    create
);

impl Router for CapacityRouter {
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::new("weight", &[self.experts, self.hidden], Init::Normal(0.02), true)]
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor) -> Result<RouterOut> {
        kit::require_cpu(&h, "capacity-router")?;
        if p.len() != 1 || x.dims().len() != 2 || x.dim(1) != self.hidden {
            return Err(format!("capacity-router: expected 1 parameter and x [T,{}]", self.hidden));
        }
        let (t, e, k) = (x.dim(0), self.experts, self.top_k);
        let logits = h.alloc_f32(&[t, e])?;
        h.gemm(x, p[0], logits, false, true, 1.0, 0.0)?;
        let (probs, ids, weights) = (h.alloc_f32(&[t, e])?, h.alloc(&[t, k], DType::I32)?, h.alloc_f32(&[t, k])?);
        // SAFETY: probs, ids and weights are this call's own allocations, apart from logits.
        let (l, pr, id, w) = unsafe { (logits.f32s(), probs.f32s_mut(), ids.i32s_mut(), weights.f32s_mut()) };
        let mut choice = vec![0usize; t * k];
        for r in 0..t {
            let row = &l[r * e..(r + 1) * e];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
            for j in 0..e {
                pr[r * e + j] = (row[j] - max).exp() / sum;
            }
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| pr[r * e + b].total_cmp(&pr[r * e + a]).then(a.cmp(&b)));
            choice[r * k..(r + 1) * k].copy_from_slice(&order[..k]);
        }
        let capacity = (self.capacity_factor as f64 * (t * k) as f64 / e as f64).ceil() as usize;
        let (mut load, mut dropped) = (vec![0usize; e], 0usize);
        for s in 0..k {
            for r in 0..t {
                let (i, j) = (r * k + s, choice[r * k + s]);
                if load[j] < capacity {
                    load[j] += 1;
                    (id[i], w[i]) = (j as i32, pr[r * e + j]);
                } else {
                    (id[i], w[i]) = (EMPTY, 0.0);
                    dropped += 1;
                }
            }
        }
        h.metric("dropped_frac", dropped as f64 / (t * k).max(1) as f64);
        Ok(RouterOut { logits, probs, ids, weights, saved: Vec::new().into() })
    }

    fn backward(
        &self,
        h: Host,
        p: &[Tensor],
        g: &[Tensor],
        x: Tensor,
        out: &RouterOut,
        d_weights: Tensor,
        d_probs: Tensor,
        d_logits: Tensor,
        dx: Tensor,
    ) -> Result<()> {
        kit::require_cpu(&h, "capacity-router")?;
        let (t, e, k) = (x.dim(0), self.experts, self.top_k);
        if p.len() != 1 || g.len() != 1 || d_weights.numel() != t * k || d_probs.numel() != t * e {
            return Err("capacity-router: expected 1 parameter, 1 grad, d_weights [T,k] and d_probs [T,E]".into());
        }
        let dl = h.alloc_f32(&[t, e])?;
        let (pr, id, dw, dpr, extra) =
            (out.probs.f32s(), out.ids.i32s(), d_weights.f32s(), d_probs.f32s(), d_logits.f32s());
        // SAFETY: dl is this call's own allocation.
        let d = unsafe { dl.f32s_mut() };
        let mut dp = vec![0.0f32; e];
        for r in 0..t {
            dp.copy_from_slice(&dpr[r * e..(r + 1) * e]);
            for i in (r * k..(r + 1) * k).filter(|&i| id[i] != EMPTY) {
                dp[id[i] as usize] += dw[i];
            }
            let dot: f32 = (0..e).map(|j| pr[r * e + j] * dp[j]).sum();
            for j in 0..e {
                d[r * e + j] = pr[r * e + j] * (dp[j] - dot) + extra[r * e + j];
            }
        }
        h.gemm(dl, x, g[0], true, false, 1.0, 1.0)?;
        h.gemm(dl, p[0], dx, false, false, 1.0, 0.0)
    }
}
