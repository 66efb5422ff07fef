//! `{{name}}`: a router plugin for Pith (scaffolded by `pith plugins new --kind router`).
//!
//! Math: logits = x·Wᵀ, p = softmax(logits); each token goes to the `top_k` experts of largest p
//! with gate weight p_e (not renormalised). With `jitter` > 0, training picks the experts by
//! p + jitter·N(0,1) instead (the gates stay p), drawn from `kit::Rng` so runs are reproducible.
//! Backward: dp = d_probs + scatter(d_weights); dlogits = d_logits + p ⊙ (dp − ⟨p, dp⟩);
//! dW += dlogitsᵀ·x; dx = dlogits·W.
//! CPU only: a CUDA path launches kernels (see plugins/std/src/router.rs and `pith_plugin_api::kit`).
//! `cargo test` runs its test; `pith plugins check {{name}}` checks it; select it with
//! `[router] plugin = "{{name}}"`.

use pith_plugin_api::kit::{self, Rng};
use pith_plugin_api::{
    parse_config, register, DType, Host, Init, ModelDims, ParamSpec, Result, Router, RouterOut, Tensor,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("{{name}}");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    jitter: f32,
    #[serde(default = "default_top_k")]
    top_k: usize,
}

fn default_top_k() -> usize {
    2
}

struct MyRouter {
    hidden: usize,
    experts: usize,
    top_k: usize,
    jitter: f32,
}

fn create(config: &str, dims: ModelDims) -> Result<MyRouter> {
    let c: Config = parse_config(config)?;
    let experts = dims.experts as usize;
    if c.top_k == 0 || c.top_k > experts {
        return Err(format!("`top_k` = {} but the model has {experts} experts; use 1..={experts}", c.top_k));
    }
    if !(c.jitter >= 0.0 && c.jitter.is_finite()) {
        return Err(format!("`jitter` = {} must be a finite number >= 0", c.jitter));
    }
    Ok(MyRouter { hidden: dims.hidden as usize, experts, top_k: c.top_k, jitter: c.jitter })
}

register!(
    Router,
    "{{name}}",
    "top-k of a softmax over experts (scaffolded; edit me)",
    "[router]\nplugin = \"{{name}}\"\ntop_k = 2\njitter = 0.0",
    create
);

impl Router for MyRouter {
    /// Every setting with its default filled in (`pith config` shows them).
    fn settings(&self) -> String {
        pith_plugin_api::settings!(top_k = self.top_k, jitter = self.jitter)
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::new("weight", &[self.experts, self.hidden], Init::Normal(0.02), true)]
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor) -> Result<RouterOut> {
        kit::require_cpu(&h, "{{name}}")?;
        let (t, e, k) = (x.dim(0), self.experts, self.top_k);
        let logits = h.alloc_f32(&[t, e])?;
        h.gemm(x, p[0], logits, false, true, 1.0, 0.0)?;
        let (probs, ids, weights) = (h.alloc_f32(&[t, e])?, h.alloc(&[t, k], DType::I32)?, h.alloc_f32(&[t, k])?);
        // Writes go through f32s_mut / i32s_mut, which are unsafe: no other slice of that tensor
        // may be alive meanwhile. probs, ids and weights are this call's own fresh allocations.
        let (pr, id, w) = unsafe { (probs.f32s_mut(), ids.i32s_mut(), weights.f32s_mut()) };
        let ctx = h.context();
        let jitter = if ctx.training { self.jitter } else { 0.0 };
        let mut rng = Rng::from_context(ctx, 0);
        for (r, (row, p)) in logits.f32s().chunks(e).zip(pr.chunks_mut(e)).enumerate() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            p.iter_mut().zip(row).for_each(|(p, l)| *p = (l - max).exp());
            let sum: f32 = p.iter().sum();
            p.iter_mut().for_each(|p| *p /= sum);
            let score: Vec<f32> = p.iter().map(|&p| if jitter > 0.0 { p + jitter * rng.normal() } else { p }).collect();
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
            for (s, &j) in order[..k].iter().enumerate() {
                id[r * k + s] = j as i32;
                w[r * k + s] = p[j];
            }
        }
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
        let (t, e, k) = (x.dim(0), self.experts, self.top_k);
        let dl = h.alloc_f32(&[t, e])?;
        let (pr, id, dw) = (out.probs.f32s(), out.ids.i32s(), d_weights.f32s());
        let d = unsafe { dl.f32s_mut() }; // this call's own allocation
        for r in 0..t {
            let mut dp = d_probs.f32s()[r * e..(r + 1) * e].to_vec();
            for s in 0..k {
                dp[id[r * k + s] as usize] += dw[r * k + s];
            }
            let dot: f32 = (0..e).map(|j| pr[r * e + j] * dp[j]).sum();
            for j in 0..e {
                d[r * e + j] = d_logits.f32s()[r * e + j] + pr[r * e + j] * (dp[j] - dot);
            }
        }
        h.gemm(dl, x, g[0], true, false, 1.0, 1.0)?;
        h.gemm(dl, p[0], dx, false, false, 1.0, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pith_plugin_api::kit::{test_dims, TestHost};

    fn values(n: usize, f: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * f).sin()).collect()
    }

    fn dot(t: Tensor, c: &[f32]) -> f64 {
        t.f32s().iter().zip(c).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    /// Forward picks the top k of a softmax; backward's dx and dW match finite differences of
    /// loss = ⟨cw, weights⟩ + ⟨cp, probs⟩ + ⟨cl, logits⟩ (the last two as balance losses add).
    #[test]
    fn forward_picks_the_top_k_and_backward_matches_finite_differences() {
        let router = create("top_k = 2", test_dims(4, 3, 8)).unwrap();
        let (t, hd, e, k) = (5, 4, 3, 2);
        let th = TestHost::new(t);
        let h = th.host();
        let (x, w) = (values(t * hd, 0.7), values(e * hd, 1.3));
        let (cw, cp, cl) = (values(t * k, 2.1), values(t * e, 0.4), values(t * e, 0.9));
        let run = |x: &[f32], w: &[f32]| router.forward(h, &[th.tensor_f32(w, &[e, hd])], th.tensor_f32(x, &[t, hd]));
        let loss = |x: &[f32], w: &[f32]| {
            let out = run(x, w).unwrap();
            dot(out.weights, &cw) + dot(out.probs, &cp) + dot(out.logits, &cl)
        };

        let out = run(&x, &w).unwrap();
        assert_eq!((out.ids.dims(), out.weights.dims(), out.probs.dims()), (vec![t, k], vec![t, k], vec![t, e]));
        for r in 0..t {
            let (p, ids) = (&out.probs.f32s()[r * e..(r + 1) * e], &out.ids.i32s()[r * k..(r + 1) * k]);
            assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            let chosen: Vec<f32> = ids.iter().map(|&i| p[i as usize]).collect();
            assert_eq!(chosen, &out.weights.f32s()[r * k..(r + 1) * k]);
            assert!(
                chosen[0] >= chosen[1] && p.iter().filter(|&&v| v > chosen[1]).count() < k,
                "row {r}: {p:?} {ids:?}"
            );
        }

        let (wt, xt) = (th.tensor_f32(&w, &[e, hd]), th.tensor_f32(&x, &[t, hd]));
        let (g, dx) = (th.zeros(&[e, hd], DType::F32), th.zeros(&[t, hd], DType::F32));
        let (dw, dp, dl) = (th.tensor_f32(&cw, &[t, k]), th.tensor_f32(&cp, &[t, e]), th.tensor_f32(&cl, &[t, e]));
        router.backward(h, &[wt], &[g], xt, &out, dw, dp, dl, dx).unwrap();
        let eps = 1e-3;
        for (what, grad, base) in [("dx", dx, &x), ("dW", g, &w)] {
            for i in 0..base.len() {
                let (mut plus, mut minus) = (base.clone(), base.clone());
                plus[i] += eps;
                minus[i] -= eps;
                let fd =
                    if what == "dx" { loss(&plus, &w) - loss(&minus, &w) } else { loss(&x, &plus) - loss(&x, &minus) };
                let (fd, an) = (fd / (2.0 * eps as f64), grad.f32s()[i] as f64);
                assert!(
                    (fd - an).abs() < 2e-3 * (1.0 + an.abs()),
                    "{what}[{i}]: finite difference {fd}, backward {an}"
                );
            }
        }
    }
}
