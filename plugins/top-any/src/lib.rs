//! `top-any`: the top-any router of DynMoE (Guo et al. 2024, "Dynamic Mixture of Experts: An
//! Auto-Tuning Approach for Efficient Transformer Models"): each token uses every expert whose score
//! beats that expert's trained threshold, so the number of experts varies per token. README.md has
//! the paper, the equations, every config key and the surrogate gradient.
//!
//! Forward, for x [T,H], W [E,H] (`weight`) and thresholds τ [E] (`threshold`):
//!   logits l = x·Wᵀ [T,E];  s = σ(l);  probs p_t = s_t / Σ_j s_tj  (what balance losses see);
//!   A_t = {e : s_te > σ(τ_e)} = {e : l_te > τ_e}, ordered by descending score (ties: lower id);
//!   A_t empty → {argmax_e s_te} (at least one expert); more than `max_k` → its first `max_k`;
//!   ids [T, max_k]: A_t, then EMPTY (-1) with weight 0 — the comm schedule skips those slots,
//!   so a token with fewer experts costs fewer expert rows;
//!   gates w_tj = s_tj / Σ_{i∈A_t} s_ti with `normalize` (default), else s_tj.
//! Backward (exact for W and x, the selection being piecewise constant), per token:
//!   g_j = (dw_j − Σ_{i∈A} dw_i·w_i) / Σ_{i∈A} s_i with `normalize`, else dw_j   (j ∈ A);
//!   ds = (d_probs − ⟨d_probs, p⟩) / Σ s, plus g on A;   dl = d_logits + ds ⊙ s(1 − s);
//!   dW += dlᵀ·x;  dx = dl·W.
//! Threshold (straight-through, `.surrogate()`): the mask m_te = [s_te > σ(τ_e)] multiplies the
//! scores inside the gates, w = m·s / Σ m·s, so ∂L/∂m_j = s_j·g_j on A; the hard step is read as
//! the identity (∂m/∂(s − σ(τ)) = 1, DynMoE's straight-through estimator), giving
//!   ∂L/∂τ_e ≈ −σ'(τ_e) · Σ_t [e ∈ A_t, passed] s_te·g_te
//! (the fallback expert of a token where none passed, and experts cut by `max_k`, get nothing).
//! Metrics: `experts_per_token` (mean used slots, weighted by tokens) and `fallback_frac` (the share
//! of tokens none of whose experts passed).
//!
//! CUDA (kernels/top_any.cu; x and W bf16, thresholds a bf16 working copy, everything else f32):
//! GEMMs through the host; `top_any_fwd` does scores, probs, the selection and the gates with one
//! warp per token, `top_any_sum` sums the metrics' counts, `top_any_bwd` writes dl (bf16) and the
//! per-slot surrogate terms, `top_any_thr_grad` sums those per expert in a fixed order. Supports
//! E ≤ 1024 and `max_k` ≤ 32 there.

use pith_plugin_api::{
    kernel_source, parse_config, register, Arg, DType, Device, Host, Init, ModelDims, ParamSpec, Result, Router,
    RouterOut, Tensor, EMPTY,
};
use serde::Deserialize;
use std::cmp::Ordering;

pith_plugin_api::export_plugin!("top-any");

/// `max_k` when the config leaves it out (or the model's expert count, if smaller).
const DEFAULT_MAX_K: usize = 4;
const WHO: &str = "top-any";
/// Threads per block of every launch: 8 warps, one token row each in the row kernels.
const BLOCK: [u32; 3] = [256, 1, 1];
/// What the CUDA kernels support (a warp per row: 32 experts and one slot per lane).
const CUDA_MAX_EXPERTS: usize = 1024;
const CUDA_MAX_K: usize = 32;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The most experts one token may use (default 4, or E if smaller).
    max_k: Option<usize>,
    /// Gates are the chosen scores over their sum (true) or the scores themselves (false).
    #[serde(default = "yes")]
    normalize: bool,
    /// Initial value of every threshold τ_e (a logit: 0 → a score threshold of σ(0) = 0.5).
    #[serde(default)]
    threshold_init: f32,
}

fn yes() -> bool {
    true
}

struct TopAny {
    hidden: usize,
    experts: usize,
    max_k: usize,
    normalize: bool,
    threshold_init: f32,
}

fn create(config: &str, dims: ModelDims) -> Result<TopAny> {
    let c: Config = parse_config(config)?;
    let experts = dims.experts as usize;
    let max_k = c.max_k.unwrap_or(DEFAULT_MAX_K.min(experts));
    if max_k == 0 || max_k > experts {
        return Err(format!("`max_k` = {max_k} but the model has {experts} experts; max_k must be in 1..={experts}"));
    }
    if !c.threshold_init.is_finite() {
        return Err(format!(
            "`threshold_init` = {} must be a finite number (a logit: 0 is a score threshold of 0.5)",
            c.threshold_init
        ));
    }
    let (hidden, normalize, threshold_init) = (dims.hidden as usize, c.normalize, c.threshold_init);
    Ok(TopAny { hidden, experts, max_k, normalize, threshold_init })
}

register!(
    Router,
    "top-any",
    "DynMoE top-any: the experts whose sigmoid score beats a trained threshold, 1..=max_k per token",
    "[router]\nplugin = \"top-any\"\nmax_k = 4\nnormalize = true\nthreshold_init = 0.0",
    create
);

const SRC: &str = include_str!("../kernels/top_any.cu");

fn cuda_source() -> &'static str {
    kernel_source!(SRC)
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Grid of a row kernel over `t` rows: 8 rows (warps) per block, grid-stride beyond 65535 blocks.
fn rows_grid(t: usize) -> [u32; 3] {
    [t.div_ceil(8).clamp(1, 65535) as u32, 1, 1]
}

use pith_plugin_api::kit::ints;

/// [`kit::expect`], the message led by this component's name.
fn expect(t: &Tensor, dtype: DType, device: Device, want: &[usize], what: &str) -> Result<()> {
    pith_plugin_api::kit::expect(t, dtype, device, want, &format!("{WHO}: {what}"))
}

/// The launch arguments of each kernel, in parameter order (a unit test holds them to the
/// kernels' signatures in kernels/top_any.cu).
mod args {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    pub fn fwd(
        l: Tensor,
        thr: Tensor,
        s: Tensor,
        p: Tensor,
        ids: Tensor,
        w: Tensor,
        stats: Tensor,
        n: [usize; 4],
    ) -> Vec<Arg> {
        [&[l, thr, s, p, ids, w, stats].map(|t| t.arg())[..], &ints(n)].concat()
    }
    pub fn sum(x: Tensor, out: Tensor, n: usize) -> Vec<Arg> {
        vec![x.arg(), out.arg(), Arg::I32(n as i32)]
    }
    /// `t`: logits, scores, probs, ids, weights, d_weights, d_probs, d_logits, thr, dl, part.
    pub fn bwd(t: [Tensor; 11], n: [usize; 4]) -> Vec<Arg> {
        [&t.map(|t| t.arg())[..], &ints(n)].concat()
    }
    pub fn thr_grad(ids: Tensor, part: Tensor, thr: Tensor, g_thr: Tensor, n: usize, e: usize) -> Vec<Arg> {
        [&[ids, part, thr, g_thr].map(|t| t.arg())[..], &ints([n, e])].concat()
    }
}

impl TopAny {
    fn cuda_limits(&self) -> Result<()> {
        if self.experts > CUDA_MAX_EXPERTS || self.max_k > CUDA_MAX_K {
            return Err(format!(
                "{WHO}: on CUDA the router supports model.experts <= {CUDA_MAX_EXPERTS} and `max_k` <= {CUDA_MAX_K}; \
                 got {} and {}",
                self.experts, self.max_k
            ));
        }
        Ok(())
    }

    /// The trailing (T, E, k, normalize) arguments of the row kernels.
    fn sizes(&self, t: usize) -> [usize; 4] {
        [t, self.experts, self.max_k, self.normalize as usize]
    }

    /// Scores, probs, selection and gates of every row on the CPU; returns (experts used in all,
    /// tokens where none passed).
    #[allow(clippy::too_many_arguments)]
    fn route_cpu(
        &self,
        t: usize,
        logits: Tensor,
        thr: Tensor,
        scores: Tensor,
        probs: Tensor,
        ids: Tensor,
        weights: Tensor,
    ) -> (usize, usize) {
        let (e, k) = (self.experts, self.max_k);
        let (l, tau) = (logits.f32s(), thr.f32s());
        // SAFETY: scores, probs, ids and weights are the caller's fresh allocations, apart from the inputs.
        let (sc, pr, id, w) = unsafe { (scores.f32s_mut(), probs.f32s_mut(), ids.i32s_mut(), weights.f32s_mut()) };
        let (mut used, mut fallback) = (0, 0);
        let mut on: Vec<usize> = Vec::with_capacity(e);
        for r in 0..t {
            let (lt, st, pt) = (&l[r * e..(r + 1) * e], &mut sc[r * e..(r + 1) * e], &mut pr[r * e..(r + 1) * e]);
            st.iter_mut().zip(lt).for_each(|(s, &l)| *s = sigmoid(l));
            let sum: f32 = st.iter().sum();
            pt.iter_mut().zip(st.iter()).for_each(|(p, &s)| *p = if sum > 0.0 { s / sum } else { 1.0 / e as f32 });
            // l > τ is s > σ(τ) (σ is monotone), without σ's rounding; NaN never passes.
            on.clear();
            on.extend((0..e).filter(|&j| lt[j] > tau[j]));
            on.sort_by(|&a, &b| lt[b].partial_cmp(&lt[a]).unwrap_or(Ordering::Equal).then(a.cmp(&b)));
            if on.is_empty() {
                fallback += 1;
                let key = |j: usize| if lt[j].is_nan() { f32::NEG_INFINITY } else { lt[j] };
                on.push((1..e).fold(0, |best, j| if key(j) > key(best) { j } else { best }));
            }
            on.truncate(k);
            used += on.len();
            let sel: f32 = on.iter().map(|&j| st[j]).sum();
            for slot in 0..k {
                (id[r * k + slot], w[r * k + slot]) = match on.get(slot) {
                    None => (EMPTY, 0.0),
                    Some(&j) if !self.normalize => (j as i32, st[j]),
                    Some(&j) if sel > 0.0 => (j as i32, st[j] / sel),
                    Some(&j) => (j as i32, 1.0 / on.len() as f32),
                };
            }
        }
        (used, fallback)
    }

    /// The same on the device (kernels/top_any.cu); the metrics, when `count`, stay there.
    fn route_cuda(
        &self,
        h: Host,
        t: usize,
        [logits, thr, scores, probs, ids, weights]: [Tensor; 6],
        count: bool,
    ) -> Result<()> {
        let src = cuda_source();
        let stats = h.alloc_uninit(&[2, t], DType::F32)?;
        let a = args::fwd(logits, thr, scores, probs, ids, weights, stats, self.sizes(t));
        h.launch(src, "top_any_fwd", rows_grid(t), BLOCK, 0, &a)?;
        if count {
            let sums = h.alloc_f32(&[2])?;
            h.launch(src, "top_any_sum", [2, 1, 1], BLOCK, 0, &args::sum(stats, sums, t))?;
            h.metric_sum("experts_per_token", sums.rows(0, 1), t as f64);
            h.metric_sum("fallback_frac", sums.rows(1, 1), t as f64);
        }
        Ok(())
    }

    /// dl [T,E] (f32) and the threshold's surrogate gradient on the CPU: see the module doc.
    #[allow(clippy::too_many_arguments)]
    fn backward_cpu(
        &self,
        h: Host,
        thr: Tensor,
        g_thr: Tensor,
        out: &RouterOut,
        d_weights: Tensor,
        d_probs: Tensor,
        d_logits: Tensor,
    ) -> Result<Tensor> {
        let (t, e, k) = (out.logits.dim(0), self.experts, self.max_k);
        let dl = h.alloc_uninit(&[t, e], DType::F32)?;
        let (l, sc, pr, id, w) =
            (out.logits.f32s(), out.saved[0].f32s(), out.probs.f32s(), out.ids.i32s(), out.weights.f32s());
        let (dw, dp, dlin, tau) = (d_weights.f32s(), d_probs.f32s(), d_logits.f32s(), thr.f32s());
        // SAFETY: dl is this call's own allocation.
        let d = unsafe { dl.f32s_mut() };
        let (mut ds, mut part) = (vec![0.0f32; e], vec![0.0f32; e]);
        for r in 0..t {
            let row = r * e..(r + 1) * e;
            let (st, pt, dpt) = (&sc[row.clone()], &pr[row.clone()], &dp[row.clone()]);
            let sum: f32 = st.iter().sum();
            let pd: f32 = pt.iter().zip(dpt).map(|(p, d)| p * d).sum();
            ds.iter_mut().zip(dpt).for_each(|(s, &d)| *s = if sum > 0.0 { (d - pd) / sum } else { 0.0 });
            let slots: Vec<usize> = (r * k..(r + 1) * k).filter(|&i| id[i] != EMPTY).collect();
            let sel: f32 = slots.iter().map(|&i| st[id[i] as usize]).sum();
            let dot: f32 = slots.iter().map(|&i| dw[i] * w[i]).sum();
            for &i in &slots {
                let j = id[i] as usize;
                let g = match self.normalize {
                    false => dw[i],
                    true if sel > 0.0 => (dw[i] - dot) / sel,
                    true => 0.0,
                };
                ds[j] += g;
                if l[r * e + j] > tau[j] {
                    part[j] += st[j] * g; // ∂L/∂m: the slot's mask, read straight through
                }
            }
            for (j, d) in d[row.clone()].iter_mut().enumerate() {
                *d = dlin[r * e + j] + ds[j] * st[j] * (1.0 - st[j]);
            }
        }
        // SAFETY: g_thr is the threshold's own gradient buffer; no other slice of it is alive.
        let gt = unsafe { g_thr.f32s_mut() };
        for ((g, &tau), &p) in gt.iter_mut().zip(tau).zip(&part) {
            let st = sigmoid(tau);
            *g -= st * (1.0 - st) * p;
        }
        Ok(dl)
    }

    /// The same on the device: dl as bf16 for the GEMMs.
    #[allow(clippy::too_many_arguments)]
    fn backward_cuda(
        &self,
        h: Host,
        thr: Tensor,
        g_thr: Tensor,
        out: &RouterOut,
        d_weights: Tensor,
        d_probs: Tensor,
        d_logits: Tensor,
    ) -> Result<Tensor> {
        self.cuda_limits()?;
        let (t, e, k) = (out.logits.dim(0), self.experts, self.max_k);
        let src = cuda_source();
        let dl = h.alloc_uninit(&[t, e], DType::BF16)?;
        let part = h.alloc_uninit(&[t, k], DType::F32)?;
        let ts =
            [out.logits, out.saved[0], out.probs, out.ids, out.weights, d_weights, d_probs, d_logits, thr, dl, part];
        h.launch(src, "top_any_bwd", rows_grid(t), BLOCK, 0, &args::bwd(ts, self.sizes(t)))?;
        let grid = [e.clamp(1, 65535) as u32, 1, 1];
        h.launch(src, "top_any_thr_grad", grid, BLOCK, 0, &args::thr_grad(out.ids, part, thr, g_thr, t * k, e))?;
        Ok(dl)
    }
}

impl Router for TopAny {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(max_k = self.max_k, normalize = self.normalize, threshold_init = self.threshold_init)
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::new("weight", &[self.experts, self.hidden], Init::Normal(0.02), true),
            ParamSpec::new("threshold", &[self.experts], Init::Constant(self.threshold_init), false).surrogate(),
        ]
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor) -> Result<RouterOut> {
        let dev = h.device();
        let act = pith_plugin_api::kit::act_dtype(&h);
        let [wt, thr] = p else {
            return Err(format!("{WHO}: expected 2 parameters (weight, threshold), got {}", p.len()));
        };
        expect(&x, act, dev, &[0, self.hidden], "x")?;
        expect(thr, act, dev, &[self.experts], "threshold")?;
        if dev == Device::Cuda {
            self.cuda_limits()?;
        }
        let (t, e, k) = (x.dim(0), self.experts, self.max_k);
        let logits = h.alloc_f32(&[t, e])?;
        h.gemm(x, *wt, logits, false, true, 1.0, 0.0)?;
        let scores = h.alloc_uninit(&[t, e], DType::F32)?;
        let probs = h.alloc_uninit(&[t, e], DType::F32)?;
        let ids = h.alloc_uninit(&[t, k], DType::I32)?;
        let weights = h.alloc_uninit(&[t, k], DType::F32)?;
        let count = h.context().training && t > 0; // metrics are not recorded in eval
        match dev {
            Device::Cpu => {
                let (used, fallback) = self.route_cpu(t, logits, *thr, scores, probs, ids, weights);
                if count {
                    h.metric_weighted("experts_per_token", used as f64 / t as f64, t as f64);
                    h.metric_weighted("fallback_frac", fallback as f64 / t as f64, t as f64);
                }
            }
            Device::Cuda => self.route_cuda(h, t, [logits, *thr, scores, probs, ids, weights], count)?,
        }
        Ok(RouterOut { logits, probs, ids, weights, saved: vec![scores].into() })
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
        let dev = h.device();
        let ([wt, thr], [gw, g_thr]) = (p, g) else {
            return Err(format!("{WHO}: expected 2 parameters and 2 grads, got {} and {}", p.len(), g.len()));
        };
        let (t, e, k) = (x.dim(0), self.experts, self.max_k);
        expect(&out.ids, DType::I32, dev, &[t, k], "ids")?;
        expect(&d_weights, DType::F32, dev, &[t, k], "d_weights")?;
        expect(g_thr, DType::F32, dev, &[e], "threshold grad")?;
        let Some(scores) = out.saved.first() else {
            return Err(format!("{WHO}: backward needs the scores its forward saved"));
        };
        for (d, what) in [(&out.logits, "logits"), (&out.probs, "probs"), (scores, "scores")] {
            expect(d, DType::F32, dev, &[t, e], what)?;
        }
        for (d, what) in [(&d_probs, "d_probs"), (&d_logits, "d_logits")] {
            expect(d, DType::F32, dev, &[t, e], what)?;
        }
        let dl = match dev {
            Device::Cpu => self.backward_cpu(h, *thr, *g_thr, out, d_weights, d_probs, d_logits)?,
            Device::Cuda => self.backward_cuda(h, *thr, *g_thr, out, d_weights, d_probs, d_logits)?,
        };
        h.gemm(dl, x, *gw, true, false, 1.0, 1.0)?;
        h.gemm(dl, *wt, dx, false, false, 1.0, 0.0)
    }
}

#[cfg(test)]
mod tests;
