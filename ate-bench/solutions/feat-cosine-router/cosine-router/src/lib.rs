//! `cosine-router`: the X-MoE router (Chi et al. 2022, "On the Representation Collapse of Sparse
//! Mixture of Experts", arXiv:2204.09179): routing scores are cosine similarities in a low
//! dimension, divided by a learned temperature.
//!
//! Parameters: `proj` W_p [d,H] (d = `dim`), `expert_emb` E [E,d], `log_temp` θ [1] with
//! τ = exp(θ) (so τ > 0 whatever θ becomes), initialised to θ = ln(`temperature`).
//! Forward, for x [T,H]: z = x·W_pᵀ [T,d];  ẑ_t = z_t / |z_t|,  ê_e = E_e / |E_e| with
//!   |v| = sqrt(Σ v² + 1e-12);  logits_te = ⟨ẑ_t, ê_e⟩ / τ;  p = softmax(logits) (the probs);
//!   S_t = top_k ids by p (ties to the lower id);  weights_tj = p_tj / Σ_{i∈S_t} p_ti.
//!   Reports `router_tau` = τ and `cos_max` = mean over tokens of max_e ⟨ẑ_t, ê_e⟩ (in [-1, 1]).
//! Backward (exact): dp = d_probs + (dw_j − Σ_{i∈S} dw_i·w_i) / Σ_{i∈S} p_i on j ∈ S;
//!   dlogits = d_logits + p ⊙ (dp − ⟨dp, p⟩);  dθ += −Σ dlogits ⊙ logits;  dcos = dlogits / τ;
//!   dẑ = dcos·ê, dê = dcosᵀ·ẑ;  dz = (dẑ − ẑ⟨ẑ, dẑ⟩) / |z| (likewise dE from dê);
//!   dW_p += dzᵀ·x;  dx = dz·W_p.  CPU only.

use pith_plugin_api::{
    kit, parse_config, register, DType, Host, Init, ModelDims, ParamSpec, Result, Router, RouterOut, Tensor,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("cosine-router");

/// Inside the square root of every L2 norm, so a zero vector normalises to zero, not NaN.
const NORM_EPS: f32 = 1e-12;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_top_k")]
    top_k: usize,
    #[serde(default = "default_dim")]
    dim: usize,
    #[serde(default = "default_temperature")]
    temperature: f32,
}
fn default_top_k() -> usize {
    2
}
fn default_dim() -> usize {
    8
}
fn default_temperature() -> f32 {
    0.07
}

struct CosineRouter {
    hidden: usize,
    experts: usize,
    top_k: usize,
    dim: usize,
    temperature: f32,
}

fn create(config: &str, dims: ModelDims) -> Result<CosineRouter> {
    let c: Config = parse_config(config)?;
    let experts = dims.experts as usize;
    if c.top_k == 0 || c.top_k > experts {
        return Err(format!("`top_k` = {} but the model has {experts} experts; use 1..={experts}", c.top_k));
    }
    if c.dim == 0 {
        return Err("`dim` = 0: the routing dimension must be >= 1 (X-MoE: 8 or 16)".into());
    }
    if !(c.temperature.is_finite() && c.temperature > 0.0) {
        return Err(format!("`temperature` = {} must be a finite number > 0 (typical: 0.07)", c.temperature));
    }
    let (hidden, top_k, dim, temperature) = (dims.hidden as usize, c.top_k, c.dim, c.temperature);
    Ok(CosineRouter { hidden, experts, top_k, dim, temperature })
}

register!(
    Router,
    "cosine-router",
    "X-MoE: cosine similarity of a low-dimensional projection and expert embeddings over a learned temperature, top-k",
    "[router]\nplugin = \"cosine-router\"\ntop_k = 2\ndim = 8\ntemperature = 0.07",
    create
);

/// Normalise each row of `v` [rows, d] to unit L2 norm: (the unit rows, the norms).
fn unit_rows(v: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let norms: Vec<f32> = v.chunks(d).map(|r| (r.iter().map(|x| x * x).sum::<f32>() + NORM_EPS).sqrt()).collect();
    let unit = v.chunks(d).zip(&norms).flat_map(|(r, &n)| r.iter().map(move |x| x / n)).collect();
    (unit, norms)
}

/// The gradient through `unit_rows`: du [rows, d] → dv = (du − û⟨û, du⟩) / |v| per row.
fn unit_rows_backward(unit: &[f32], norms: &[f32], du: &[f32], d: usize) -> Vec<f32> {
    let mut dv = vec![0.0f32; du.len()];
    for (r, &n) in norms.iter().enumerate() {
        let (u, g) = (&unit[r * d..(r + 1) * d], &du[r * d..(r + 1) * d]);
        let dot: f32 = u.iter().zip(g).map(|(a, b)| a * b).sum();
        for j in 0..d {
            dv[r * d + j] = (g[j] - u[j] * dot) / n;
        }
    }
    dv
}

/// The normalised projection and expert embeddings of one forward, and the temperature.
struct Projected {
    /// ẑ [T,d] and |z| [T].
    zu: Vec<f32>,
    zn: Vec<f32>,
    /// ê [E,d] and |E| [E].
    eu: Vec<f32>,
    en: Vec<f32>,
    tau: f32,
}

impl CosineRouter {
    fn project(&self, h: &Host, p: &[Tensor], x: Tensor) -> Result<Projected> {
        let (t, d) = (x.dim(0), self.dim);
        let z = h.alloc_f32(&[t, d])?;
        h.gemm(x, p[0], z, false, true, 1.0, 0.0)?;
        let (zu, zn) = unit_rows(z.f32s(), d);
        let (eu, en) = unit_rows(p[1].f32s(), d);
        Ok(Projected { zu, zn, eu, en, tau: p[2].f32s()[0].exp() })
    }
}

impl Router for CosineRouter {
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::new("proj", &[self.dim, self.hidden], Init::Normal(0.02), true),
            ParamSpec::new(
                "expert_emb",
                &[self.experts, self.dim],
                Init::Normal(1.0 / (self.dim as f32).sqrt()),
                false,
            ),
            ParamSpec::new("log_temp", &[1], Init::Constant(self.temperature.ln()), false),
        ]
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor) -> Result<RouterOut> {
        kit::require_cpu(&h, "cosine-router")?;
        if p.len() != 3 || x.dims().len() != 2 || x.dim(1) != self.hidden {
            return Err(format!("cosine-router: expected 3 parameters and x [T,{}]", self.hidden));
        }
        let (t, e, k, d) = (x.dim(0), self.experts, self.top_k, self.dim);
        let Projected { zu, eu, tau, .. } = self.project(&h, p, x)?;
        let (logits, probs) = (h.alloc_f32(&[t, e])?, h.alloc_f32(&[t, e])?);
        let (ids, weights) = (h.alloc(&[t, k], DType::I32)?, h.alloc_f32(&[t, k])?);
        // SAFETY: the four outputs are this call's own allocations.
        let (l, pr, id, w) = unsafe { (logits.f32s_mut(), probs.f32s_mut(), ids.i32s_mut(), weights.f32s_mut()) };
        let mut cos_max = 0.0f64;
        for r in 0..t {
            let zr = &zu[r * d..(r + 1) * d];
            let mut best = f32::NEG_INFINITY;
            for j in 0..e {
                let c: f32 = zr.iter().zip(&eu[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum();
                best = best.max(c);
                l[r * e + j] = c / tau;
            }
            cos_max += best as f64;
            let row = &l[r * e..(r + 1) * e];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
            for j in 0..e {
                pr[r * e + j] = (row[j] - max).exp() / sum;
            }
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| pr[r * e + b].total_cmp(&pr[r * e + a]).then(a.cmp(&b)));
            let s: f32 = order[..k].iter().map(|&j| pr[r * e + j]).sum();
            for (i, &j) in order[..k].iter().enumerate() {
                (id[r * k + i], w[r * k + i]) = (j as i32, pr[r * e + j] / s);
            }
        }
        h.metric("router_tau", tau as f64);
        h.metric("cos_max", cos_max / t.max(1) as f64);
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
        kit::require_cpu(&h, "cosine-router")?;
        let (t, e, k, d) = (x.dim(0), self.experts, self.top_k, self.dim);
        if p.len() != 3 || g.len() != 3 || d_weights.numel() != t * k || d_probs.numel() != t * e {
            return Err("cosine-router: expected 3 parameters, 3 grads, d_weights [T,k] and d_probs [T,E]".into());
        }
        let Projected { zu, zn, eu, en, tau } = self.project(&h, p, x)?;
        let (lg, pr, id, w) = (out.logits.f32s(), out.probs.f32s(), out.ids.i32s(), out.weights.f32s());
        let (dw, dpr, extra) = (d_weights.f32s(), d_probs.f32s(), d_logits.f32s());
        // dcos [T,E] = dlogits / τ, and dθ = −Σ dlogits ⊙ logits.
        let (mut dcos, mut dtheta) = (vec![0.0f32; t * e], 0.0f64);
        let mut dp = vec![0.0f32; e];
        for r in 0..t {
            dp.copy_from_slice(&dpr[r * e..(r + 1) * e]);
            let slots = r * k..(r + 1) * k;
            let s: f32 = slots.clone().map(|i| pr[r * e + id[i] as usize]).sum();
            let dot_w: f32 = slots.clone().map(|i| dw[i] * w[i]).sum();
            for i in slots {
                dp[id[i] as usize] += (dw[i] - dot_w) / s;
            }
            let dot: f32 = (0..e).map(|j| pr[r * e + j] * dp[j]).sum();
            for j in 0..e {
                let dl = pr[r * e + j] * (dp[j] - dot) + extra[r * e + j];
                dtheta -= dl as f64 * lg[r * e + j] as f64;
                dcos[r * e + j] = dl / tau;
            }
        }
        // dẑ = dcos·ê [T,d];  dê = dcosᵀ·ẑ [E,d].
        let (mut dzu, mut deu) = (vec![0.0f32; t * d], vec![0.0f32; e * d]);
        for r in 0..t {
            for j in 0..e {
                let c = dcos[r * e + j];
                for q in 0..d {
                    dzu[r * d + q] += c * eu[j * d + q];
                    deu[j * d + q] += c * zu[r * d + q];
                }
            }
        }
        let dz = unit_rows_backward(&zu, &zn, &dzu, d);
        let de = unit_rows_backward(&eu, &en, &deu, d);
        // SAFETY: g[1] and g[2] are the grads of expert_emb and log_temp, distinct host buffers.
        let (ge, gt) = unsafe { (g[1].f32s_mut(), g[2].f32s_mut()) };
        ge.iter_mut().zip(&de).for_each(|(a, b)| *a += b);
        gt[0] += dtheta as f32;
        let dzt = h.alloc_f32(&[t, d])?;
        // SAFETY: dzt is this call's own allocation.
        unsafe { dzt.f32s_mut() }.copy_from_slice(&dz);
        h.gemm(dzt, x, g[0], true, false, 1.0, 1.0)?;
        h.gemm(dzt, p[0], dx, false, false, 1.0, 0.0)
    }
}
