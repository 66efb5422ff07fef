//! `group-topk`: group-limited routing of DeepSeek-V2 (arXiv:2405.04434, "Device-Limited
//! Routing") and DeepSeek-V3 (arXiv:2412.19437, "Node-Limited Routing", as its reference
//! code does it): the E experts form `n_group` equal groups (think devices or nodes), each token
//! first keeps its `topk_group` best groups and then picks its `top_k` experts among those, so its
//! experts span at most `topk_group` groups. README.md has the equations and every config key.
//!
//! Forward, for x [T,H] and W [E,H] (`weight`), m = E / `n_group` experts a group (group g holds
//! experts g·m .. (g+1)·m), c = `routed_scaling_factor`:
//!   logits l = x·Wᵀ [T,E];  scores s = softmax(l) (`score = "softmax"`) or σ(l) (`"sigmoid"`);
//!   probs (what balance losses see) p = s for softmax, p = s / Σ_e s_e for sigmoid;
//!   group score γ_g = max_{e∈g} s_e (`group_score = "max"`, V2) or the sum of the group's two
//!   largest s (`"top2"`, V3);  G_t = the `topk_group` groups of largest γ (ties: the lower group);
//!   S_t = the `top_k` experts of largest s in the groups of G_t (ties: the lower id);
//!   gates w_j = c · s_j / Σ_{i∈S_t} s_i with `normalize` (default), else c · s_j  (j ∈ S_t).
//! Experts are ranked by their logit, which orders them exactly as their score (softmax and σ are
//! monotone) without the score's rounding deciding a near tie (the same for "max" groups). Every
//! slot is filled (no EMPTY ids).
//! Backward (exact: the selection is piecewise constant), per token with d_weights dw, d_probs dp
//! and d_logits dl from the comm schedule and the balance losses:
//!   ds = dp (softmax) or (dp − ⟨dp, p⟩) / Σ s (sigmoid),
//!        plus on j ∈ S: (c·dw_j − Σ_{i∈S} dw_i·w_i) / Σ_{i∈S} s_i (normalize) or c·dw_j;
//!   dl' = dl + s ⊙ (ds − ⟨ds, s⟩) (softmax) or dl + ds ⊙ s(1 − s) (sigmoid);
//!   dW += dl'ᵀ·x;  dx = dl'·W.
//! Metric: `router_entropy`, the mean entropy of p (weighted by tokens).
//!
//! CUDA (kernels/group_topk.cu; x and W bf16, logits, scores, probs, gates and grads f32): the GEMMs
//! go through the host; `group_topk_fwd` (a warp per token) does the scores, probs, entropy, group
//! scores, group and expert selection and gates, `group_topk_sum` sums the entropies in a fixed
//! order, `group_topk_bwd` writes dl' as bf16 for the two GEMMs. Supports E ≤ 1024, `n_group` ≤ 32
//! and `top_k` ≤ 32 there.

use pith_plugin_api::{
    kernel_source, kit, parse_config, register, Arg, DType, Device, Host, Init, ModelDims, ParamSpec, Result, Router,
    RouterOut, Tensor,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("group-topk");

const WHO: &str = "group-topk";
/// Threads per block of every launch: 8 warps, one token row each in the row kernels.
const BLOCK: [u32; 3] = [256, 1, 1];
/// What the CUDA kernels support: a warp per row, 32 experts, one group and one slot per lane.
const CUDA_MAX_EXPERTS: usize = 1024;
const CUDA_MAX_GROUPS: usize = 32;
const CUDA_MAX_K: usize = 32;

/// The score of an expert (and the router's probability function).
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Score {
    /// s = softmax(l) over the E experts (DeepSeek-V2).
    Softmax,
    /// s = σ(l) per expert (DeepSeek-V3).
    Sigmoid,
}

/// The score of a group of experts.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
enum GroupScore {
    /// Its best expert's score (DeepSeek-V2).
    #[serde(rename = "max")]
    Max,
    /// The sum of its two best experts' scores (DeepSeek-V3).
    #[serde(rename = "top2")]
    Top2,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_n_group")]
    n_group: usize,
    #[serde(default = "default_topk_group")]
    topk_group: usize,
    #[serde(default = "default_top_k")]
    top_k: usize,
    #[serde(default = "default_score")]
    score: Score,
    #[serde(default = "default_group_score")]
    group_score: GroupScore,
    #[serde(default = "yes")]
    normalize: bool,
    #[serde(default = "one")]
    routed_scaling_factor: f32,
}
fn default_n_group() -> usize {
    4
}
fn default_topk_group() -> usize {
    2
}
fn default_top_k() -> usize {
    2
}
fn default_score() -> Score {
    Score::Softmax
}
fn default_group_score() -> GroupScore {
    GroupScore::Max
}
fn yes() -> bool {
    true
}
fn one() -> f32 {
    1.0
}

struct GroupTopK {
    hidden: usize,
    experts: usize,
    n_group: usize,
    topk_group: usize,
    top_k: usize,
    score: Score,
    group_score: GroupScore,
    normalize: bool,
    /// `routed_scaling_factor`.
    scale: f32,
}

fn create(config: &str, dims: ModelDims) -> Result<GroupTopK> {
    let c: Config = parse_config(config)?;
    let e = dims.experts as usize;
    if c.n_group == 0 || !e.is_multiple_of(c.n_group) {
        let divisors: Vec<String> = (1..=e).filter(|&g| e.is_multiple_of(g)).map(|g| g.to_string()).collect();
        return Err(format!(
            "`n_group` = {} must divide the model's {e} experts into equal groups: one of {}",
            c.n_group,
            divisors.join(", ")
        ));
    }
    let m = e / c.n_group;
    if c.topk_group == 0 || c.topk_group > c.n_group {
        return Err(format!("`topk_group` = {} must be in 1..={} (`n_group`)", c.topk_group, c.n_group));
    }
    let room = c.topk_group * m;
    if c.top_k == 0 || c.top_k > room {
        return Err(format!(
            "`top_k` = {} must be in 1..={room}: `topk_group` = {} groups of {m} experts ({e} experts / `n_group` = {})",
            c.top_k, c.topk_group, c.n_group
        ));
    }
    if c.group_score == GroupScore::Top2 && m < 2 {
        return Err(format!(
            "`group_score` = \"top2\" needs at least 2 experts a group, but `n_group` = {} leaves {m} of the {e}",
            c.n_group
        ));
    }
    if !(c.routed_scaling_factor.is_finite() && c.routed_scaling_factor > 0.0) {
        return Err(format!(
            "`routed_scaling_factor` = {} must be a finite number > 0 (1.0 leaves the gates as they are)",
            c.routed_scaling_factor
        ));
    }
    Ok(GroupTopK {
        hidden: dims.hidden as usize,
        experts: e,
        n_group: c.n_group,
        topk_group: c.topk_group,
        top_k: c.top_k,
        score: c.score,
        group_score: c.group_score,
        normalize: c.normalize,
        scale: c.routed_scaling_factor,
    })
}

register!(
    Router,
    "group-topk",
    "DeepSeek-V2/V3 group-limited routing: top-k experts within each token's topk_group best expert groups",
    "[router]\nplugin = \"group-topk\"\nn_group = 4\ntopk_group = 2\ntop_k = 2\nscore = \"softmax\"\n\
     group_score = \"max\"\nnormalize = true\nrouted_scaling_factor = 1.0",
    create
);

fn cuda_source() -> &'static str {
    kernel_source!(include_str!("../kernels/group_topk.cu"))
}

fn sigmoid(l: f32) -> f32 {
    1.0 / (1.0 + (-l).exp())
}

/// A divisor that is never 0: `v` when positive, else 1 (every summand is then 0 as well).
fn nonzero(v: f32) -> f32 {
    if v > 0.0 {
        v
    } else {
        1.0
    }
}

/// A ranking key: NaN below everything (−∞).
fn key(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

/// Sort `order` by descending `v[i]` (NaN last); ties, −0 = +0 included, keep the lower index
/// first (a stable sort of ascending indices).
fn rank(order: &mut [usize], v: &[f32]) {
    order.sort_by(|&a, &b| key(v[b]).partial_cmp(&key(v[a])).unwrap_or(std::cmp::Ordering::Equal));
}

use pith_plugin_api::kit::ints;

/// [`kit::expect`], the message led by this component's name.
fn expect(t: &Tensor, dtype: DType, device: Device, want: &[usize], what: &str) -> Result<()> {
    pith_plugin_api::kit::expect(t, dtype, device, want, &format!("{WHO}: {what}"))
}

/// The launch arguments of each kernel, in parameter order (a unit test holds them to the
/// kernels' signatures in kernels/group_topk.cu).
mod args {
    use super::*;

    /// `t`: logits, scores, probs, ids, weights, ent.
    pub fn fwd(r: &GroupTopK, t: [Tensor; 6], rows: usize) -> Vec<Arg> {
        let flags = [r.score == Score::Sigmoid, r.group_score == GroupScore::Top2, r.normalize].map(usize::from);
        let sizes = ints([rows, r.experts, r.n_group, r.topk_group, r.top_k, flags[0], flags[1], flags[2]]);
        [&t.map(|t| t.arg())[..], &sizes, &[Arg::F32(r.scale)]].concat()
    }
    pub fn sum(x: Tensor, out: Tensor, n: usize) -> Vec<Arg> {
        vec![x.arg(), out.arg(), Arg::I32(n as i32)]
    }
    /// `t`: scores, probs, ids, weights, d_weights, d_probs, d_logits, dl.
    pub fn bwd(r: &GroupTopK, t: [Tensor; 8], rows: usize) -> Vec<Arg> {
        let sizes = ints([rows, r.experts, r.top_k, (r.score == Score::Sigmoid) as usize, r.normalize as usize]);
        [&t.map(|t| t.arg())[..], &sizes, &[Arg::F32(r.scale)]].concat()
    }
}

impl GroupTopK {
    fn cuda_limits(&self) -> Result<()> {
        if self.experts > CUDA_MAX_EXPERTS || self.n_group > CUDA_MAX_GROUPS || self.top_k > CUDA_MAX_K {
            return Err(format!(
                "{WHO}: on CUDA the router supports model.experts <= {CUDA_MAX_EXPERTS}, `n_group` <= \
                 {CUDA_MAX_GROUPS} and `top_k` <= {CUDA_MAX_K}; got {}, {} and {}",
                self.experts, self.n_group, self.top_k
            ));
        }
        Ok(())
    }

    /// Scores, probs, group and expert selection and gates of every row on the CPU; returns the
    /// summed entropy of the probs.
    fn route_cpu(&self, t: usize, logits: Tensor, [scores, probs, ids, weights]: [Tensor; 4]) -> f64 {
        let (e, k, c) = (self.experts, self.top_k, self.scale);
        let (ng, m) = (self.n_group, self.experts / self.n_group);
        let l = logits.f32s();
        // SAFETY: scores, probs, ids and weights are the caller's fresh allocations, apart from logits.
        let (sc, pr, id, w) = unsafe { (scores.f32s_mut(), probs.f32s_mut(), ids.i32s_mut(), weights.f32s_mut()) };
        let mut entropy = 0.0f64;
        let (mut gs, mut groups, mut cand, mut top) = (vec![0.0f32; ng], vec![0; ng], vec![], vec![0.0f32; m]);
        for r in 0..t {
            let row = r * e..(r + 1) * e;
            let (lt, st, pt) = (&l[row.clone()], &mut sc[row.clone()], &mut pr[row.clone()]);
            match self.score {
                Score::Softmax => {
                    let max = lt.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    st.iter_mut().zip(lt).for_each(|(s, &v)| *s = (v - max).exp());
                    let sum: f32 = st.iter().sum();
                    st.iter_mut().for_each(|s| *s /= sum);
                    pt.copy_from_slice(st);
                }
                Score::Sigmoid => {
                    st.iter_mut().zip(lt).for_each(|(s, &v)| *s = sigmoid(v));
                    let q = nonzero(st.iter().sum());
                    pt.iter_mut().zip(st.iter()).for_each(|(p, &s)| *p = s / q);
                }
            }
            entropy -= pt.iter().filter(|&&v| v > 0.0).map(|&v| v as f64 * (v as f64).ln()).sum::<f64>();
            // Group scores: the best logit (orders as the best score), or the two best scores' sum.
            for (g, v) in gs.iter_mut().enumerate() {
                let members = g * m..(g + 1) * m;
                *v = match self.group_score {
                    GroupScore::Max => lt[members].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(key(b))),
                    GroupScore::Top2 => {
                        top.iter_mut().zip(&st[members]).for_each(|(a, &b)| *a = key(b));
                        top.sort_by(|a, b| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal));
                        top[0] + top[1]
                    }
                };
            }
            groups.iter_mut().enumerate().for_each(|(i, g)| *g = i);
            rank(&mut groups, &gs);
            // The experts of the kept groups, in ascending id, ranked by logit.
            let mut kept = groups[..self.topk_group].to_vec();
            kept.sort_unstable();
            cand.clear();
            cand.extend(kept.iter().flat_map(|&g| g * m..(g + 1) * m));
            rank(&mut cand, lt);
            let sel: f32 = cand[..k].iter().map(|&j| st[j]).sum();
            let denom = if self.normalize { nonzero(sel) } else { 1.0 };
            for (slot, &j) in cand[..k].iter().enumerate() {
                id[r * k + slot] = j as i32;
                w[r * k + slot] = st[j] / denom * c;
            }
        }
        entropy
    }

    /// The same on the device (kernels/group_topk.cu); the entropy sum stays there.
    fn route_cuda(&self, h: Host, t: usize, logits: Tensor, [scores, probs, ids, weights]: [Tensor; 4]) -> Result<()> {
        let src = cuda_source();
        let ent = h.alloc_uninit(&[t], DType::F32)?;
        let a = args::fwd(self, [logits, scores, probs, ids, weights, ent], t);
        h.launch(src, "group_topk_fwd", kit::grid(t, 8), BLOCK, 0, &a)?;
        let total = h.alloc_f32(&[1])?;
        h.launch(src, "group_topk_sum", [1, 1, 1], BLOCK, 0, &args::sum(ent, total, t))?;
        h.metric_sum("router_entropy", total, t as f64);
        Ok(())
    }

    /// dl' [T,E] (f32) on the CPU: see the module doc.
    fn dlogits_cpu(&self, out: &RouterOut, scores: Tensor, [dw, dp, dl]: [Tensor; 3], d: &mut [f32]) {
        let (t, e, k, c) = (out.ids.dim(0), self.experts, self.top_k, self.scale);
        let (sc, pr, id, w) = (scores.f32s(), out.probs.f32s(), out.ids.i32s(), out.weights.f32s());
        let (dw, dp, dl) = (dw.f32s(), dp.f32s(), dl.f32s());
        let mut ds = vec![0.0f32; e];
        for r in 0..t {
            let row = r * e..(r + 1) * e;
            let (st, pt, dpt) = (&sc[row.clone()], &pr[row.clone()], &dp[row.clone()]);
            // Through the probs.
            match self.score {
                Score::Softmax => ds.copy_from_slice(dpt),
                Score::Sigmoid => {
                    let q = nonzero(st.iter().sum());
                    let pd: f32 = dpt.iter().zip(pt).map(|(a, b)| a * b).sum();
                    ds.iter_mut().zip(dpt).for_each(|(d, &g)| *d = (g - pd) / q);
                }
            }
            // Through the gates, on the chosen (non-EMPTY) slots.
            let sel: Vec<usize> = (r * k..(r + 1) * k).filter(|&i| id[i] >= 0).collect();
            if self.normalize {
                let p = nonzero(sel.iter().map(|&i| st[id[i] as usize]).sum());
                let dot: f32 = sel.iter().map(|&i| dw[i] * w[i]).sum();
                sel.iter().for_each(|&i| ds[id[i] as usize] += (c * dw[i] - dot) / p);
            } else {
                sel.iter().for_each(|&i| ds[id[i] as usize] += c * dw[i]);
            }
            // Through the scores to the logits.
            let (dlt, out) = (&dl[row.clone()], &mut d[row]);
            match self.score {
                Score::Softmax => {
                    let sd: f32 = st.iter().zip(&ds).map(|(a, b)| a * b).sum();
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = dlt[j] + st[j] * (ds[j] - sd);
                    }
                }
                Score::Sigmoid => {
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = dlt[j] + ds[j] * st[j] * (1.0 - st[j]);
                    }
                }
            }
        }
    }
}

impl Router for GroupTopK {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(
            n_group = self.n_group,
            topk_group = self.topk_group,
            top_k = self.top_k,
            score = format!("{:?}", self.score).to_lowercase(),
            group_score = format!("{:?}", self.group_score).to_lowercase(),
            normalize = self.normalize,
            routed_scaling_factor = self.scale
        )
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::new("weight", &[self.experts, self.hidden], Init::Normal(0.02), true)]
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor) -> Result<RouterOut> {
        let dev = h.device();
        let [wt] = p else {
            return Err(format!("{WHO}: expected 1 parameter (weight), got {}", p.len()));
        };
        let act = kit::act_dtype(&h);
        expect(&x, act, dev, &[0, self.hidden], "x")?;
        expect(wt, act, dev, &[self.experts, self.hidden], "weight")?;
        if dev == Device::Cuda {
            self.cuda_limits()?;
        }
        let (t, e, k) = (x.dim(0), self.experts, self.top_k);
        let logits = h.alloc_f32(&[t, e])?;
        h.gemm(x, *wt, logits, false, true, 1.0, 0.0)?;
        let scores = h.alloc_uninit(&[t, e], DType::F32)?;
        let probs = h.alloc_uninit(&[t, e], DType::F32)?;
        let ids = h.alloc_uninit(&[t, k], DType::I32)?;
        let weights = h.alloc_uninit(&[t, k], DType::F32)?;
        let outs = [scores, probs, ids, weights];
        match dev {
            Device::Cpu => {
                let entropy = self.route_cpu(t, logits, outs);
                if t > 0 {
                    h.metric_weighted("router_entropy", entropy / t as f64, t as f64);
                }
            }
            Device::Cuda => self.route_cuda(h, t, logits, outs)?,
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
        let ([wt], [gw]) = (p, g) else {
            return Err(format!("{WHO}: expected 1 parameter and 1 grad, got {} and {}", p.len(), g.len()));
        };
        let (t, e, k) = (x.dim(0), self.experts, self.top_k);
        expect(gw, DType::F32, dev, &[e, self.hidden], "weight grad")?;
        expect(&out.ids, DType::I32, dev, &[t, k], "ids")?;
        expect(&out.weights, DType::F32, dev, &[t, k], "weights")?;
        expect(&d_weights, DType::F32, dev, &[t, k], "d_weights")?;
        let Some(&scores) = out.saved.first() else {
            return Err(format!("{WHO}: backward needs the scores its forward saved"));
        };
        for (d, what) in [(&scores, "scores"), (&out.probs, "probs"), (&d_probs, "d_probs"), (&d_logits, "d_logits")] {
            expect(d, DType::F32, dev, &[t, e], what)?;
        }
        let dl = match dev {
            Device::Cpu => {
                let dl = h.alloc_uninit(&[t, e], DType::F32)?;
                // SAFETY: dl is this call's own allocation, written in full here.
                self.dlogits_cpu(out, scores, [d_weights, d_probs, d_logits], unsafe { dl.f32s_mut() });
                dl
            }
            Device::Cuda => {
                self.cuda_limits()?;
                let dl = h.alloc_uninit(&[t, e], DType::BF16)?;
                let ts = [scores, out.probs, out.ids, out.weights, d_weights, d_probs, d_logits, dl];
                h.launch(cuda_source(), "group_topk_bwd", kit::grid(t, 8), BLOCK, 0, &args::bwd(self, ts, t))?;
                dl
            }
        };
        h.gemm(dl, x, *gw, true, false, 1.0, 1.0)?;
        h.gemm(dl, *wt, dx, false, false, 1.0, 0.0)
    }
}

#[cfg(test)]
mod tests;
