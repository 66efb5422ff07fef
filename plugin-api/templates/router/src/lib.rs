//! `{{name}}`: a router plugin for Pith (scaffolded by `pith plugins new --kind router`).
//!
//! Math: logits = x·Wᵀ, p = softmax(logits), each token goes to its `top_k` most likely
//! experts with gate weight p_e (not renormalised).
//! Backward: dp = scatter(d_weights); dlogits = p ⊙ (dp − Σ p·dp) + d_logits;
//! dW += dlogitsᵀ·x; dx = dlogits·W.
//! Check it with `pith plugins check {{name}}`; select it with `[router] plugin = "{{name}}"`.

use pith_plugin_api::{
    parse_config, register, DType, Host, Init, ModelDims, ParamSpec, Result, Router, RouterOut, Tensor,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("{{name}}");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
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
}

fn create(config: &str, dims: ModelDims) -> Result<MyRouter> {
    let c: Config = parse_config(config)?;
    let experts = dims.experts as usize;
    if c.top_k == 0 || c.top_k > experts {
        return Err(format!("`top_k` = {} but the model has {experts} experts; use 1..={experts}", c.top_k));
    }
    Ok(MyRouter { hidden: dims.hidden as usize, experts, top_k: c.top_k })
}

register!(
    Router,
    "{{name}}",
    "top-k of a softmax over experts (scaffolded; edit me)",
    "[router]\nplugin = \"{{name}}\"\ntop_k = 2",
    create
);

impl Router for MyRouter {
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::new("weight", &[self.experts, self.hidden], Init::Normal(0.02), true)]
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor) -> Result<RouterOut> {
        let (t, e, k) = (x.dim(0), self.experts, self.top_k);
        let logits = h.alloc_f32(&[t, e])?;
        h.gemm(x, p[0], logits, false, true, 1.0, 0.0)?;
        let probs = h.alloc_f32(&[t, e])?;
        let ids = h.alloc(&[t, k], DType::I32)?;
        let weights = h.alloc_f32(&[t, k])?;
        // Writes go through f32s_mut / i32s_mut, which are unsafe: no other slice of that tensor
        // may be alive meanwhile. probs, ids and weights are this call's own fresh allocations.
        let (l, pr, id, w) = unsafe { (logits.f32s(), probs.f32s_mut(), ids.i32s_mut(), weights.f32s_mut()) };
        for r in 0..t {
            let row = &l[r * e..(r + 1) * e];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
            for j in 0..e {
                pr[r * e + j] = (row[j] - max).exp() / sum;
            }
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| pr[r * e + b].total_cmp(&pr[r * e + a]).then(a.cmp(&b)));
            for s in 0..k {
                id[r * k + s] = order[s] as i32;
                w[r * k + s] = pr[r * e + order[s]];
            }
        }
        Ok(RouterOut { logits, ids, weights, saved: vec![probs].into() })
    }

    fn backward(
        &self,
        h: Host,
        p: &[Tensor],
        g: &[Tensor],
        x: Tensor,
        out: &RouterOut,
        d_weights: Tensor,
        d_logits: Tensor,
        dx: Tensor,
    ) -> Result<()> {
        let (t, e, k) = (x.dim(0), self.experts, self.top_k);
        let dl = h.alloc_f32(&[t, e])?;
        let (pr, id, dw, extra) = (out.saved[0].f32s(), out.ids.i32s(), d_weights.f32s(), d_logits.f32s());
        let d = unsafe { dl.f32s_mut() }; // this call's own allocation
        for r in 0..t {
            let mut dp = vec![0.0f32; e];
            for s in 0..k {
                dp[id[r * k + s] as usize] += dw[r * k + s];
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
