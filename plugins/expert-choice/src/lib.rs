//! `expert-choice`: Expert-Choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert
//! Choice Routing", arXiv:2202.09368). Instead of each token picking its top-k experts, each expert
//! picks its top-`capacity` tokens, so every expert gets exactly `capacity` tokens (perfect load
//! balance by construction) and a token gets anywhere from 0 to E experts. README.md has the
//! paper, the equations and every config key.
//!
//! Forward, for the T tokens of one call x [T,H] and W [E,H] (`weight`):
//!   logits l = x·Wᵀ [T,E];  S = softmax over experts of each row (probs: what balance losses see);
//!   capacity c = min(T, ⌈capacity_factor · T · k_avg / E⌉);
//!   chosen[t,e] ⇔ t is among the c tokens of largest S[·,e] (ties: the lower token index first);
//!   k = max(1, the most experts any token got in this call);
//!   ids [T,k]: each token's chosen experts by descending S (ties: the lower id), then EMPTY (-1);
//!   weights [T,k]: S[t,e] on a chosen slot (not renormalised, as in the paper), 0 on EMPTY.
//! Backward (exact: the selection is piecewise constant in x and W), per token t:
//!   ds_t = d_probs_t + d_weights on the chosen experts;
//!   dl_t = d_logits_t + S_t ⊙ (ds_t − ⟨ds_t, S_t⟩)   (the softmax Jacobian);
//!   dW += dlᵀ·x;  dx = dl·W.
//! Metrics (training only, weighted by T): `experts_per_token` (mean chosen experts per token,
//! c·E/T) and `unrouted_frac` (the share of tokens no expert took).
//!
//! The selection looks at every token of the call at once: a token's experts depend on the other
//! tokens of the micro-batch, later ones included (not causal), and k varies from call to call.
//!
//! Scores are ordered by an integer key, the same on both devices: a score s > 0 has the key
//! bits(s) + 1 (the f32 bits of non-negative floats are monotone), s ≤ 0 has 1, NaN 0 (lowest).
//!
//! CUDA (kernels/expert_choice.cu; x and W bf16, logits, probs, gates and their gradients f32):
//! GEMMs through the host; `ec_softmax` (a warp per row: probs and the keys, transposed to
//! [E,T]), `ec_select` (a block per expert: a 4-pass radix select of the c-th largest key, then a
//! block-ordered scan giving the ties to the lower token indices), `ec_stats` (one block: the chosen
//! count, the unrouted tokens and the most experts of any token), one read back of that most (the
//! outputs' shape depends on it), `ec_gather` (a warp per row: the chosen experts by descending
//! score) and `ec_bwd` (a warp per row: dl as bf16 for the two GEMMs). Supports E ≤ 1024 there.

use pith_plugin_api::{
    kernel_source, parse_config, register, Arg, DType, Device, Host, Init, ModelDims, ParamSpec, Result, Router,
    RouterOut, Tensor, EMPTY,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("expert-choice");

const WHO: &str = "expert-choice";
/// Threads per block of every launch: 8 warps, one token row each in the row kernels.
const BLOCK: [u32; 3] = [256, 1, 1];
/// What the CUDA kernels support (a warp per row: 32 experts a lane, one bit each).
const CUDA_MAX_EXPERTS: usize = 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Scales every expert's capacity (1.0: the experts take T·k_avg token slots in all).
    #[serde(default = "one")]
    capacity_factor: f64,
    /// The average experts per token the capacity is sized for.
    #[serde(default = "two")]
    k_avg: usize,
}

fn one() -> f64 {
    1.0
}

fn two() -> usize {
    2
}

struct ExpertChoice {
    hidden: usize,
    experts: usize,
    capacity_factor: f64,
    k_avg: usize,
}

fn create(config: &str, dims: ModelDims) -> Result<ExpertChoice> {
    let c: Config = parse_config(config)?;
    let experts = dims.experts as usize;
    if !(c.capacity_factor.is_finite() && c.capacity_factor > 0.0) {
        return Err(format!(
            "`capacity_factor` = {} must be a finite number > 0 (1.0: the experts take T·k_avg tokens in all)",
            c.capacity_factor
        ));
    }
    if c.k_avg == 0 || c.k_avg > experts {
        return Err(format!(
            "`k_avg` = {} but the model has {experts} experts; k_avg must be in 1..={experts}",
            c.k_avg
        ));
    }
    Ok(ExpertChoice { hidden: dims.hidden as usize, experts, capacity_factor: c.capacity_factor, k_avg: c.k_avg })
}

register!(
    Router,
    "expert-choice",
    "Expert-Choice routing (Zhou et al. 2022): each expert takes its top-capacity tokens by softmax score, 0..E experts per token",
    "[router]\nplugin = \"expert-choice\"\ncapacity_factor = 1.0\nk_avg = 2",
    create
);

const SRC: &str = include_str!("../kernels/expert_choice.cu");

fn cuda_source() -> &'static str {
    kernel_source!(SRC)
}

/// The order of scores, as an integer (see the module doc): larger score, larger key; NaN lowest.
fn key(s: f32) -> u32 {
    match s {
        s if s.is_nan() => 0,
        s if s > 0.0 => s.to_bits() + 1,
        _ => 1,
    }
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
/// kernels' signatures in kernels/expert_choice.cu).
mod args {
    use super::*;

    pub fn softmax(logits: Tensor, probs: Tensor, keys: Tensor, t: usize, e: usize) -> Vec<Arg> {
        [&[logits, probs, keys].map(|t| t.arg())[..], &ints([t, e])].concat()
    }
    pub fn select(keys: Tensor, chosen: Tensor, t: usize, e: usize, cap: usize) -> Vec<Arg> {
        [&[keys, chosen].map(|t| t.arg())[..], &ints([t, e, cap])].concat()
    }
    pub fn stats(chosen: Tensor, stats: Tensor, t: usize, e: usize) -> Vec<Arg> {
        [&[chosen, stats].map(|t| t.arg())[..], &ints([t, e])].concat()
    }
    pub fn gather(probs: Tensor, chosen: Tensor, ids: Tensor, w: Tensor, n: [usize; 3]) -> Vec<Arg> {
        [&[probs, chosen, ids, w].map(|t| t.arg())[..], &ints(n)].concat()
    }
    /// `t`: probs, ids, d_weights, d_probs, d_logits, dl.
    pub fn bwd(t: [Tensor; 6], n: [usize; 3]) -> Vec<Arg> {
        [&t.map(|t| t.arg())[..], &ints(n)].concat()
    }
}

impl ExpertChoice {
    /// Tokens each expert takes from a call of `t` tokens: ⌈capacity_factor · t · k_avg / E⌉, at
    /// most t (computed in f64).
    fn capacity(&self, t: usize) -> usize {
        let c = (self.capacity_factor * t as f64 * self.k_avg as f64 / self.experts as f64).ceil();
        (c as usize).min(t)
    }

    fn cuda_limits(&self) -> Result<()> {
        if self.experts > CUDA_MAX_EXPERTS {
            return Err(format!(
                "{WHO}: on CUDA the router supports model.experts <= {CUDA_MAX_EXPERTS}; got {}",
                self.experts
            ));
        }
        Ok(())
    }

    /// Probs (the row softmax of the logits) and each token's chosen experts, by descending score
    /// (ties: the lower id), on the CPU.
    fn select_cpu(&self, t: usize, logits: Tensor, probs: Tensor) -> Vec<Vec<usize>> {
        let e = self.experts;
        let l = logits.f32s();
        // SAFETY: probs is the caller's fresh allocation; logits is another tensor.
        let p = unsafe { probs.f32s_mut() };
        for (lt, pt) in l.chunks(e).zip(p.chunks_mut(e)) {
            let max = lt.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for (p, &v) in pt.iter_mut().zip(lt) {
                *p = (v - max).exp();
                sum += *p;
            }
            pt.iter_mut().for_each(|p| *p /= sum);
        }
        // Each expert's column: the `cap` tokens of largest key, ties to the lower token index.
        let cap = self.capacity(t);
        let mut mine: Vec<Vec<usize>> = vec![Vec::new(); t];
        let mut col: Vec<(u32, usize)> = Vec::with_capacity(t);
        for j in 0..e {
            col.clear();
            col.extend((0..t).map(|r| (key(p[r * e + j]), r)));
            let order = |a: &(u32, usize), b: &(u32, usize)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
            if cap > 0 && cap < t {
                col.select_nth_unstable_by(cap - 1, order);
            }
            col[..cap].iter().for_each(|&(_, r)| mine[r].push(j)); // j ascending in every list
        }
        for (r, list) in mine.iter_mut().enumerate() {
            list.sort_by(|&a, &b| key(p[r * e + b]).cmp(&key(p[r * e + a])).then(a.cmp(&b)));
        }
        mine
    }

    /// The same on the device (kernels/expert_choice.cu): returns ids and weights. The metrics,
    /// when `count`, stay on the device.
    fn route_cuda(&self, h: Host, t: usize, logits: Tensor, probs: Tensor, count: bool) -> Result<(Tensor, Tensor)> {
        let (src, e) = (cuda_source(), self.experts);
        if t == 0 {
            return Ok((h.alloc(&[0, 1], DType::I32)?, h.alloc_f32(&[0, 1])?));
        }
        let keys = h.alloc_uninit(&[e, t], DType::I32)?;
        h.launch(src, "ec_softmax", rows_grid(t), BLOCK, 0, &args::softmax(logits, probs, keys, t, e))?;
        let chosen = h.alloc_uninit(&[t, e], DType::I32)?;
        let grid = [e.clamp(1, 65535) as u32, 1, 1];
        h.launch(src, "ec_select", grid, BLOCK, 0, &args::select(keys, chosen, t, e, self.capacity(t)))?;
        let stats = h.alloc_uninit(&[3], DType::F32)?;
        h.launch(src, "ec_stats", [1, 1, 1], BLOCK, 0, &args::stats(chosen, stats, t, e))?;
        // The outputs' shape [T, k] depends on the most experts any token got: one float comes back
        // to the host here (a wait for the device, once per call).
        let k = (h.read_f32(stats.rows(2, 1))?[0] as usize).max(1);
        let ids = h.alloc_uninit(&[t, k], DType::I32)?;
        let weights = h.alloc_uninit(&[t, k], DType::F32)?;
        h.launch(src, "ec_gather", rows_grid(t), BLOCK, 0, &args::gather(probs, chosen, ids, weights, [t, e, k]))?;
        if count {
            h.metric_sum("experts_per_token", stats.rows(0, 1), t as f64);
            h.metric_sum("unrouted_frac", stats.rows(1, 1), t as f64);
        }
        Ok((ids, weights))
    }

    /// dl [T,E] (f32) on the CPU: see the module doc.
    fn backward_cpu(
        &self,
        h: Host,
        out: &RouterOut,
        d_weights: Tensor,
        d_probs: Tensor,
        d_logits: Tensor,
    ) -> Result<Tensor> {
        let (t, e, k) = (out.probs.dim(0), self.experts, out.ids.dim(1));
        let dl = h.alloc_uninit(&[t, e], DType::F32)?;
        let (p, id, dw, dp, dlin) =
            (out.probs.f32s(), out.ids.i32s(), d_weights.f32s(), d_probs.f32s(), d_logits.f32s());
        // SAFETY: dl is this call's own allocation.
        let d = unsafe { dl.f32s_mut() };
        let mut ds = vec![0.0f32; e];
        for r in 0..t {
            let row = r * e..(r + 1) * e;
            ds.copy_from_slice(&dp[row.clone()]);
            for i in r * k..(r + 1) * k {
                if id[i] != EMPTY {
                    ds[id[i] as usize] += dw[i];
                }
            }
            let pt = &p[row.clone()];
            let dot: f32 = pt.iter().zip(&ds).map(|(p, d)| p * d).sum();
            for (j, d) in d[row.clone()].iter_mut().enumerate() {
                *d = dlin[r * e + j] + pt[j] * (ds[j] - dot);
            }
        }
        Ok(dl)
    }

    /// The same on the device: dl as bf16 for the GEMMs.
    fn backward_cuda(
        &self,
        h: Host,
        out: &RouterOut,
        d_weights: Tensor,
        d_probs: Tensor,
        d_logits: Tensor,
    ) -> Result<Tensor> {
        self.cuda_limits()?;
        let (t, e, k) = (out.probs.dim(0), self.experts, out.ids.dim(1));
        let dl = h.alloc_uninit(&[t, e], DType::BF16)?;
        if t > 0 {
            let ts = [out.probs, out.ids, d_weights, d_probs, d_logits, dl];
            h.launch(cuda_source(), "ec_bwd", rows_grid(t), BLOCK, 0, &args::bwd(ts, [t, e, k]))?;
        }
        Ok(dl)
    }
}

impl Router for ExpertChoice {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(capacity_factor = self.capacity_factor, k_avg = self.k_avg)
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::new("weight", &[self.experts, self.hidden], Init::Normal(0.02), true)]
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor) -> Result<RouterOut> {
        let dev = h.device();
        let act = pith_plugin_api::kit::act_dtype(&h);
        let [wt] = p else {
            return Err(format!("{WHO}: expected 1 parameter (weight), got {}", p.len()));
        };
        expect(&x, act, dev, &[0, self.hidden], "x")?;
        expect(wt, act, dev, &[self.experts, self.hidden], "weight")?;
        if dev == Device::Cuda {
            self.cuda_limits()?;
        }
        let (t, e) = (x.dim(0), self.experts);
        let logits = h.alloc_f32(&[t, e])?;
        h.gemm(x, *wt, logits, false, true, 1.0, 0.0)?;
        let probs = h.alloc_uninit(&[t, e], DType::F32)?;
        let count = h.context().training && t > 0; // metrics are not recorded in eval
        let (ids, weights) = match dev {
            Device::Cpu => {
                let mine = self.select_cpu(t, logits, probs);
                let k = mine.iter().map(Vec::len).max().unwrap_or(0).max(1);
                let (ids, weights) = (h.alloc_uninit(&[t, k], DType::I32)?, h.alloc_uninit(&[t, k], DType::F32)?);
                // SAFETY: ids and weights are fresh allocations; probs is only read.
                let (id, w, pr) = unsafe { (ids.i32s_mut(), weights.f32s_mut(), probs.f32s()) };
                for (r, list) in mine.iter().enumerate() {
                    for slot in 0..k {
                        (id[r * k + slot], w[r * k + slot]) = match list.get(slot) {
                            Some(&j) => (j as i32, pr[r * e + j]),
                            None => (EMPTY, 0.0),
                        };
                    }
                }
                if count {
                    let used: usize = mine.iter().map(Vec::len).sum();
                    let unrouted = mine.iter().filter(|l| l.is_empty()).count();
                    h.metric_weighted("experts_per_token", used as f64 / t as f64, t as f64);
                    h.metric_weighted("unrouted_frac", unrouted as f64 / t as f64, t as f64);
                }
                (ids, weights)
            }
            Device::Cuda => self.route_cuda(h, t, logits, probs, count)?,
        };
        Ok(RouterOut { logits, probs, ids, weights, saved: Default::default() })
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
        let (t, e, k) = (x.dim(0), self.experts, out.ids.dim(1));
        expect(&out.ids, DType::I32, dev, &[t, k], "ids")?;
        expect(&d_weights, DType::F32, dev, &[t, k], "d_weights")?;
        expect(gw, DType::F32, dev, &[e, self.hidden], "weight grad")?;
        for (d, what) in [(&out.probs, "probs"), (&d_probs, "d_probs"), (&d_logits, "d_logits")] {
            expect(d, DType::F32, dev, &[t, e], what)?;
        }
        let dl = match dev {
            Device::Cpu => self.backward_cpu(h, out, d_weights, d_probs, d_logits)?,
            Device::Cuda => self.backward_cuda(h, out, d_weights, d_probs, d_logits)?,
        };
        h.gemm(dl, x, *gw, true, false, 1.0, 1.0)?;
        h.gemm(dl, *wt, dx, false, false, 1.0, 0.0)
    }
}

#[cfg(test)]
mod tests;
