//! `sigmoid-bias`: DeepSeek-V3's router with auxiliary-loss-free load balancing (DeepSeek-V3
//! technical report §2.1.2; Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
//! Mixture-of-Experts"). README.md has the equations and every config key.
//!
//! Forward, for x [T,H], W [E,H] (trained), b [E] (a buffer: checkpointed, never trained):
//!   logits = x·Wᵀ;  s = σ(logits) [T,E];  S_t = the top_k ids of s_t + b (ties: lower id first),
//!   with `n_group` > 1 among the experts of the `topk_group` groups (of E/n_group consecutive
//!   ids) whose two largest s + b sum highest (DeepSeek-V3's node-limited routing);
//!   weights_tj = c · s_tj / Σ_{i∈S_t} s_ti when `normalize`, else c · s_tj  (j ∈ S_t, c =
//!   `routed_scaling_factor`): the bias picks the experts, the gates ignore it;
//!   probs_t = s_t / Σ_e s_te (the normalised affinities of DeepSeek-V3's sequence-wise balance
//!   loss; what `switch-aux` and friends see). Every slot is filled (no EMPTY ids).
//!   In training (`h.context().training`) the accumulator `load` [E] += the assignment counts;
//!   eval passes add nothing.
//! end_step, once per optimizer step (`load` summed over the step's micro-batches, and by the host
//! over the data-parallel ranks): b_e += `bias_update` · sign(mean(load) − load_e); reports the
//! metric `bias_absmax` = max_e |b_e| (per layer; the metrics line averages the layers).
//! Backward, per token with Q = Σ_e s_e, P = Σ_{i∈S} s_i, gates w, and d_weights dw, d_probs dp,
//! d_logits dl from the comm schedule and the balance losses:
//!   ds = (dp − ⟨dp, probs⟩) / Q  +  on j ∈ S: (c·dw_j − Σ_{i∈S} dw_i·w_i) / P  (normalize)
//!                                             or c·dw_j                       (otherwise);
//!   dlogits = dl + ds ⊙ s(1 − s);  dW += dlogitsᵀ·x;  dx = dlogits·W;  nothing for b (its effect
//!   on the selection is piecewise constant). s is recomputed from the logits, not saved.
//!
//! CUDA (kernels/sigmoid_bias.cu; x and W bf16, logits, probs, gates, b, load and all grads f32):
//! the GEMMs go through the host; `sigmoid_bias_fwd` (a warp per token) does σ, the selection and
//! the gates and counts assignments with integer atomics into a scratch [E] i32, which
//! `sigmoid_bias_load_add` adds to `load` (exact in any order: deterministic); `sigmoid_bias_bwd`
//! writes dlogits as bf16 for the two GEMMs; `sigmoid_bias_end_step` (one block) updates b and
//! computes |b|'s max. Supports E ≤ 1024, top_k ≤ 32 and n_group ≤ 32 there.

use pith_plugin_api::{
    kernel_source, kit, parse_config, register, Arg, DType, Device, Host, Init, ModelDims, ParamSpec, Result, Router,
    RouterOut, Tensor,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("sigmoid-bias");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_top_k")]
    top_k: usize,
    #[serde(default = "default_bias_update")]
    bias_update: f32,
    #[serde(default = "default_scaling")]
    routed_scaling_factor: f32,
    #[serde(default = "default_normalize")]
    normalize: bool,
    #[serde(default = "one")]
    n_group: usize,
    #[serde(default = "one")]
    topk_group: usize,
}
fn one() -> usize {
    1
}
fn default_top_k() -> usize {
    2
}
fn default_bias_update() -> f32 {
    1e-3
}
fn default_scaling() -> f32 {
    1.0
}
fn default_normalize() -> bool {
    true
}

struct SigmoidBias {
    hidden: usize,
    experts: usize,
    top_k: usize,
    /// `bias_update`: the step of the bias per optimizer step (0: the bias never moves).
    rate: f32,
    /// `routed_scaling_factor`.
    scale: f32,
    normalize: bool,
    /// Groups of consecutive experts, and how many a token keeps (1, 1: no group limit).
    n_group: usize,
    topk_group: usize,
}

fn create(config: &str, dims: ModelDims) -> Result<SigmoidBias> {
    let c: Config = parse_config(config)?;
    let experts = dims.experts as usize;
    if c.top_k == 0 || c.top_k > experts {
        return Err(format!(
            "`top_k` = {} but the model has {experts} experts; top_k must be in 1..={experts}",
            c.top_k
        ));
    }
    if !(c.bias_update.is_finite() && c.bias_update >= 0.0) {
        return Err(format!(
            "`bias_update` = {} but it must be a finite number >= 0 (DeepSeek-V3: 1e-3; 0 keeps the bias fixed)",
            c.bias_update
        ));
    }
    if !(c.routed_scaling_factor.is_finite() && c.routed_scaling_factor > 0.0) {
        return Err(format!(
            "`routed_scaling_factor` = {} but it must be a finite number > 0 (1.0 leaves the gates as they are)",
            c.routed_scaling_factor
        ));
    }
    let (g, kg) = (c.n_group, c.topk_group);
    if g == 0 || !experts.is_multiple_of(g) || (g > 1 && experts / g < 2) {
        return Err(format!(
            "`n_group` = {g} but it must divide model.experts ({experts}) into groups of 2 or more (1: no groups)"
        ));
    }
    if kg == 0 || kg > g || kg * (experts / g) < c.top_k {
        return Err(format!(
            "`topk_group` = {kg} but it must be in 1..=n_group ({g}) and keep at least top_k ({}) experts",
            c.top_k
        ));
    }
    Ok(SigmoidBias {
        hidden: dims.hidden as usize,
        experts,
        top_k: c.top_k,
        rate: c.bias_update,
        scale: c.routed_scaling_factor,
        normalize: c.normalize,
        n_group: g,
        topk_group: kg,
    })
}

register!(
    Router,
    "sigmoid-bias",
    "DeepSeek-V3 sigmoid router, top-k of sigmoid + a per-expert bias moved by load (aux-loss-free balancing)",
    "[router]\nplugin = \"sigmoid-bias\"\ntop_k = 2\nbias_update = 1e-3\nrouted_scaling_factor = 1.0\nnormalize = true\nn_group = 1\ntopk_group = 1",
    create
);

const WHO: &str = "sigmoid-bias";
/// Threads per block of every launch (8 warps: the row kernels take a warp per token row).
const BLOCK: [u32; 3] = [256, 1, 1];
/// Indices of the declared tensors in `p`.
const WEIGHT: usize = 0;
const BIAS: usize = 1;
const LOAD: usize = 2;

fn src() -> &'static str {
    kernel_source!(include_str!("../kernels/sigmoid_bias.cu"))
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

/// sign(v), 0 at 0 (`f64::signum(0.0)` is 1).
fn sign(v: f64) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

use pith_plugin_api::kit::ints;

/// [`kit::expect`], the message led by this component's name.
fn expect(t: &Tensor, dtype: DType, device: Device, want: &[usize], what: &str) -> Result<()> {
    pith_plugin_api::kit::expect(t, dtype, device, want, &format!("{WHO}: {what}"))
}

impl SigmoidBias {
    /// What the CUDA kernels support: a warp per token, 32 experts and 1 slot per lane.
    fn cuda_limits(&self) -> Result<()> {
        if self.n_group > 32 {
            return Err(format!("{WHO}: on CUDA `n_group` <= 32; got {}", self.n_group));
        }
        if self.experts > 1024 || self.top_k > 32 {
            return Err(format!(
                "{WHO}: on CUDA the router supports model.experts <= 1024 and `top_k` <= 32; got {} and {}",
                self.experts, self.top_k
            ));
        }
        Ok(())
    }

    /// Check the declared tensors as the host passes them on `dev`: W (the activations' dtype),
    /// then the f32 bias and load.
    fn check_params(&self, p: &[Tensor], dev: Device) -> Result<()> {
        if p.len() != 3 {
            return Err(format!("{WHO}: expected 3 tensors (weight, bias, load), got {}", p.len()));
        }
        let act = match dev {
            Device::Cpu => DType::F32,
            Device::Cuda => DType::BF16,
        };
        expect(&p[WEIGHT], act, dev, &[self.experts, self.hidden], "weight")?;
        expect(&p[BIAS], DType::F32, dev, &[self.experts], "bias")?;
        expect(&p[LOAD], DType::F32, dev, &[self.experts], "load")
    }

    /// σ, selection by s + b, gates, probs and (when `load` is given) the counts, on the CPU.
    fn route_cpu(&self, t: usize, logits: Tensor, bias: Tensor, out: [Tensor; 3], load: Option<Tensor>) {
        let (e, k, c) = (self.experts, self.top_k, self.scale);
        let [probs, ids, weights] = out;
        let (l, b) = (logits.f32s(), bias.f32s());
        // SAFETY: probs, ids and weights are the caller's fresh allocations and load the
        // component's accumulator: distinct buffers, apart from logits and bias, viewed nowhere else.
        let (pr, id, w) = unsafe { (probs.f32s_mut(), ids.i32s_mut(), weights.f32s_mut()) };
        let mut load = load.as_ref().map(|t| unsafe { t.f32s_mut() });
        let mut order: Vec<usize> = (0..e).collect();
        let mut score = vec![0.0f32; e];
        for r in 0..t {
            let pt = &mut pr[r * e..(r + 1) * e];
            pt.iter_mut().zip(&l[r * e..(r + 1) * e]).for_each(|(s, &v)| *s = sigmoid(v));
            let q: f32 = pt.iter().sum();
            // Rank by s + b; NaN below everything, ties (−0 = +0 included) to the lower id.
            score.iter_mut().zip(pt.iter().zip(b)).for_each(|(v, (&s, &b))| {
                let x = s + b;
                *v = if x.is_nan() { f32::NEG_INFINITY } else { x };
            });
            self.keep_groups(&mut score);
            order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
            order.sort_by(|&a, &z| score[z].partial_cmp(&score[a]).unwrap().then(a.cmp(&z)));
            let sel: f32 = order[..k].iter().map(|&j| pt[j]).sum();
            let denom = if self.normalize { nonzero(sel) } else { 1.0 };
            for (slot, &j) in order[..k].iter().enumerate() {
                id[r * k + slot] = j as i32;
                w[r * k + slot] = pt[j] / denom * c;
                if let Some(load) = load.as_deref_mut() {
                    load[j] += 1.0;
                }
            }
            let q = nonzero(q);
            pt.iter_mut().for_each(|p| *p /= q);
        }
    }

    /// With groups: −∞ for the experts outside the `topk_group` groups whose two best scores sum
    /// highest (ties: the lower group), so the selection only sees the kept groups' experts.
    fn keep_groups(&self, score: &mut [f32]) {
        if self.n_group == 1 {
            return;
        }
        let m = self.experts / self.n_group;
        let top2 = |g: &[f32]| {
            let (a, b) =
                g.iter().fold(
                    (f32::NEG_INFINITY, f32::NEG_INFINITY),
                    |(a, b), &x| {
                        if x > a {
                            (x, a)
                        } else {
                            (a, b.max(x))
                        }
                    },
                );
            a + b
        };
        let gs: Vec<f32> = score.chunks(m).map(top2).collect();
        let mut groups: Vec<usize> = (0..self.n_group).collect();
        groups.sort_by(|&a, &z| gs[z].partial_cmp(&gs[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&z)));
        for &g in &groups[self.topk_group..] {
            score[g * m..(g + 1) * m].fill(f32::NEG_INFINITY);
        }
    }

    /// The same on the device (kernels/sigmoid_bias.cu).
    fn route_cuda(
        &self,
        h: Host,
        t: usize,
        logits: Tensor,
        bias: Tensor,
        out: [Tensor; 3],
        load: Option<Tensor>,
    ) -> Result<()> {
        let e = self.experts;
        let [probs, ids, weights] = out;
        let counts = match load {
            Some(_) => Some(h.alloc(&[e], DType::I32)?), // zeroed
            None => None,
        };
        let ptrs = [logits.arg(), bias.arg(), probs.arg(), ids.arg(), weights.arg()];
        let count_arg = counts.map_or(Arg::Ptr(0), |c| c.arg());
        let sizes = ints([t, e, self.top_k, self.normalize as usize]);
        let groups = ints([self.n_group, self.topk_group]);
        let args = [&ptrs[..], &[count_arg], &sizes, &[Arg::F32(self.scale)], &groups].concat();
        // A warp per row, 8 rows a block.
        h.launch(src(), "sigmoid_bias_fwd", kit::grid(t, 8), BLOCK, 0, &args)?;
        if let (Some(counts), Some(load)) = (counts, load) {
            let args = [counts.arg(), load.arg(), Arg::I32(e as i32)];
            h.launch(src(), "sigmoid_bias_load_add", kit::grid(e, 256), BLOCK, 0, &args)?;
        }
        Ok(())
    }

    /// dlogits [T,E] f32 on the CPU (see the module doc).
    #[allow(clippy::too_many_arguments)]
    fn dlogits_cpu(&self, t: usize, out: &RouterOut, dw: Tensor, dp: Tensor, dl: Tensor, d: &mut [f32]) {
        let (e, k, c) = (self.experts, self.top_k, self.scale);
        let (lg, pr, id, w) = (out.logits.f32s(), out.probs.f32s(), out.ids.i32s(), out.weights.f32s());
        let (dw, dp, dl) = (dw.f32s(), dp.f32s(), dl.f32s());
        let mut ds = vec![0.0f32; e];
        let mut s = vec![0.0f32; e];
        for r in 0..t {
            let row = r * e..(r + 1) * e;
            s.iter_mut().zip(&lg[row.clone()]).for_each(|(s, &l)| *s = sigmoid(l));
            let (pt, dpt) = (&pr[row.clone()], &dp[row.clone()]);
            // Through probs = s / Q.
            let q = nonzero(s.iter().sum());
            let pd: f32 = dpt.iter().zip(pt).map(|(a, b)| a * b).sum();
            ds.iter_mut().zip(dpt).for_each(|(d, &g)| *d = (g - pd) / q);
            // Through the gates, on the chosen (non-EMPTY) slots.
            let sel: Vec<usize> = (r * k..(r + 1) * k).filter(|&i| id[i] >= 0).collect();
            if self.normalize {
                let p = nonzero(sel.iter().map(|&i| s[id[i] as usize]).sum());
                let dot: f32 = sel.iter().map(|&i| dw[i] * w[i]).sum();
                sel.iter().for_each(|&i| ds[id[i] as usize] += (c * dw[i] - dot) / p);
            } else {
                sel.iter().for_each(|&i| ds[id[i] as usize] += c * dw[i]);
            }
            for (j, o) in d[row.clone()].iter_mut().enumerate() {
                *o = dl[r * e + j] + ds[j] * s[j] * (1.0 - s[j]);
            }
        }
    }
}

impl Router for SigmoidBias {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(
            top_k = self.top_k,
            bias_update = self.rate,
            routed_scaling_factor = self.scale,
            normalize = self.normalize,
            n_group = self.n_group,
            topk_group = self.topk_group
        )
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::new("weight", &[self.experts, self.hidden], Init::Normal(0.02), true),
            ParamSpec::buffer("bias", &[self.experts], Init::Zeros),
            ParamSpec::accumulator("load", &[self.experts]),
        ]
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor) -> Result<RouterOut> {
        let dev = h.device();
        self.check_params(p, dev)?;
        expect(&x, p[WEIGHT].dtype, dev, &[0, self.hidden], "x")?;
        if dev == Device::Cuda {
            self.cuda_limits()?;
        }
        let (t, e, k) = (x.dim(0), self.experts, self.top_k);
        let logits = h.alloc_f32(&[t, e])?;
        h.gemm(x, p[WEIGHT], logits, false, true, 1.0, 0.0)?;
        let probs = h.alloc_uninit(&[t, e], DType::F32)?;
        let ids = h.alloc_uninit(&[t, k], DType::I32)?;
        let weights = h.alloc_uninit(&[t, k], DType::F32)?;
        // Eval runs after the step's accumulators were zeroed: counting there would leak into
        // the next step's bias update.
        let load = h.context().training.then_some(p[LOAD]);
        let out = [probs, ids, weights];
        match dev {
            Device::Cpu => self.route_cpu(t, logits, p[BIAS], out, load),
            Device::Cuda => self.route_cuda(h, t, logits, p[BIAS], out, load)?,
        }
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
        self.check_params(p, dev)?;
        let (t, e, k) = (x.dim(0), self.experts, self.top_k);
        if g.len() != 3 {
            return Err(format!("{WHO}: expected 3 gradients (weight, and none for bias and load), got {}", g.len()));
        }
        expect(&g[WEIGHT], DType::F32, dev, &[e, self.hidden], "weight grad")?;
        expect(&d_weights, DType::F32, dev, &[t, k], "d_weights")?;
        expect(&out.ids, DType::I32, dev, &[t, k], "ids")?;
        for (d, what) in
            [(&out.logits, "logits"), (&out.probs, "probs"), (&d_probs, "d_probs"), (&d_logits, "d_logits")]
        {
            expect(d, DType::F32, dev, &[t, e], what)?;
        }
        let dl = match dev {
            Device::Cpu => {
                let dl = h.alloc_uninit(&[t, e], DType::F32)?;
                // SAFETY: dl is this call's own allocation, written in full here.
                self.dlogits_cpu(t, out, d_weights, d_probs, d_logits, unsafe { dl.f32s_mut() });
                dl
            }
            Device::Cuda => {
                self.cuda_limits()?;
                let dl = h.alloc_uninit(&[t, e], DType::BF16)?;
                let ptrs =
                    [out.logits, out.probs, out.ids, out.weights, d_weights, d_probs, d_logits, dl].map(|t| t.arg());
                let sizes = ints([t, e, k, self.normalize as usize]);
                let args = [&ptrs[..], &sizes, &[Arg::F32(self.scale)]].concat();
                h.launch(src(), "sigmoid_bias_bwd", kit::grid(t, 8), BLOCK, 0, &args)?;
                dl
            }
        };
        h.gemm(dl, x, g[WEIGHT], true, false, 1.0, 1.0)?;
        h.gemm(dl, p[WEIGHT], dx, false, false, 1.0, 0.0)
    }

    fn end_step(&self, h: Host, p: &[Tensor]) -> Result<()> {
        let dev = h.device();
        self.check_params(p, dev)?;
        match dev {
            Device::Cpu => {
                // SAFETY: bias and load are distinct host buffers; nothing else views them now.
                let (bias, load) = unsafe { (p[BIAS].f32s_mut(), p[LOAD].f32s()) };
                if self.rate != 0.0 {
                    // Counts are integers: the f64 sum (and so the mean) is exact.
                    let mean = load.iter().map(|&l| l as f64).sum::<f64>() / self.experts as f64;
                    bias.iter_mut().zip(load).for_each(|(b, &l)| *b += self.rate * sign(mean - l as f64));
                }
                h.metric("bias_absmax", bias.iter().fold(0.0f32, |m, b| m.max(b.abs())) as f64);
            }
            Device::Cuda => {
                let out = h.alloc_f32(&[1])?;
                let args =
                    [p[BIAS].arg(), p[LOAD].arg(), out.arg(), Arg::I32(self.experts as i32), Arg::F32(self.rate)];
                h.launch(src(), "sigmoid_bias_end_step", [1, 1, 1], BLOCK, 0, &args)?;
                h.metric_sum("bias_absmax", out, 1.0);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
