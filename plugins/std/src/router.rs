//! `topk-softmax`: each token goes to the `top_k` experts with the largest softmax probability.
//!
//! Forward, for x [T,H] and W [E,H] (and, with `bias`, b [E]: GPT-OSS's router):
//!   logits = x·Wᵀ (+ b) [T,E];  p = softmax(logits);  S_t = the top_k ids by p (ties: lower id first);
//!   weights_tj = c·p_tj / Σ_{i∈S_t} p_ti when `normalize`, else c·p_tj   (j ∈ S_t), c = `scale`
//!   (1; DeepSeek's routed_scaling_factor).
//! Returns probs = p (what balance losses use); every slot is filled (no EMPTY ids).
//! Backward, per token with s = Σ_{i∈S} p_i, gates w_j and d_probs from the balance losses:
//!   dp = d_probs + (c·dw_j − Σ_{i∈S} dw_i·w_i) / s on j ∈ S when `normalize` (else + c·dw_j on S);
//!   dlogits = d_logits + p ⊙ (dp − ⟨dp, p⟩);   dW += dlogitsᵀ·x;   dx = dlogits·W;
//!   db += Σ_t dlogits_t.
//! With normalize, the gates are the softmax of the chosen logits: GPT-OSS's top-k then softmax.
//! Slots with id EMPTY (none from this forward) are skipped. Reports the mean entropy of p as the
//! metric `router_entropy` (weighted by tokens).
//!
//! CUDA (kernels/router.cu; x and W bf16, logits, p, gates and their grads f32): the GEMMs go
//! through the host; `topk_softmax_fwd` does softmax, entropy and top-k with one warp per token,
//! `router_sum` sums the entropies, `topk_softmax_bwd` writes dlogits as bf16 for the two GEMMs;
//! `router_bias_add` (bf16 bias) and `router_bias_grad` (column sums in a fixed order) serve the bias.
//! Supports E ≤ 1024 and top_k ≤ 32 there.

use crate::{act, expect, grid, ints, softmax, BLOCK};
use pith_plugin_api::{
    parse_config, register, Arg, DType, Device, Host, Init, ModelDims, ParamSpec, Result, Router, RouterOut, Tensor,
};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_top_k")]
    top_k: usize,
    #[serde(default = "default_normalize")]
    normalize: bool,
    #[serde(default = "default_scale")]
    scale: f32,
    #[serde(default)]
    bias: bool,
}
fn default_scale() -> f32 {
    1.0
}
fn default_top_k() -> usize {
    2
}
fn default_normalize() -> bool {
    true
}

struct TopKSoftmax {
    hidden: usize,
    experts: usize,
    top_k: usize,
    normalize: bool,
    scale: f32,
    bias: bool,
}

fn create(config: &str, dims: ModelDims) -> Result<TopKSoftmax> {
    let c: Config = parse_config(config)?;
    let experts = dims.experts as usize;
    if c.top_k == 0 || c.top_k > experts {
        return Err(format!(
            "`top_k` = {} but the model has {experts} experts; top_k must be in 1..={experts}",
            c.top_k
        ));
    }
    if !(c.scale.is_finite() && c.scale > 0.0) {
        return Err(format!("`scale` = {}: must be finite and > 0 (1: the gates as they are)", c.scale));
    }
    let (hidden, top_k, normalize, scale, bias) = (dims.hidden as usize, c.top_k, c.normalize, c.scale, c.bias);
    Ok(TopKSoftmax { hidden, experts, top_k, normalize, scale, bias })
}

register!(
    Router,
    "topk-softmax",
    "top-k experts of a softmax over router logits, gates optionally renormalised and scaled",
    "[router]\nplugin = \"topk-softmax\"\ntop_k = 2\nnormalize = true\nscale = 1.0\nbias = false",
    create
);

const WHO: &str = "topk-softmax";
const SRC: &str = kernel_source!("router.cu");

impl TopKSoftmax {
    /// What the CUDA kernels support: a warp per token, 32 probabilities and 1 slot per lane.
    fn cuda_limits(&self) -> Result<()> {
        if self.experts > 1024 || self.top_k > 32 {
            return Err(format!(
                "{WHO}: on CUDA the router supports model.experts <= 1024 and `top_k` <= 32; got {} and {}",
                self.experts, self.top_k
            ));
        }
        Ok(())
    }

    /// The trailing (T, E, k, normalize, scale) arguments of both router kernels.
    fn sizes(&self, t: usize) -> Vec<Arg> {
        let mut a = ints([t, self.experts, self.top_k, self.normalize as usize]).to_vec();
        a.push(Arg::F32(self.scale));
        a
    }

    /// Softmax, entropy and top-k of every row on the CPU; returns the summed entropy.
    fn topk_cpu(&self, t: usize, logits: Tensor, probs: Tensor, ids: Tensor, weights: Tensor) -> f64 {
        let (e, k) = (self.experts, self.top_k);
        // SAFETY: probs, ids and weights are the caller's fresh allocations, apart from logits.
        let (l, pr, id, w) = unsafe { (logits.f32s(), probs.f32s_mut(), ids.i32s_mut(), weights.f32s_mut()) };
        let mut entropy = 0.0f64;
        for r in 0..t {
            let pt = &mut pr[r * e..(r + 1) * e];
            softmax(&l[r * e..(r + 1) * e], pt);
            entropy -= pt.iter().filter(|&&v| v > 0.0).map(|&v| v as f64 * (v as f64).ln()).sum::<f64>();
            // A stable sort by descending p keeps the lower id first among ties.
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| pt[b].total_cmp(&pt[a]));
            let s: f32 = if self.normalize { order[..k].iter().map(|&j| pt[j]).sum() } else { 1.0 };
            for (slot, &j) in order[..k].iter().enumerate() {
                id[r * k + slot] = j as i32;
                w[r * k + slot] = self.scale * pt[j] / s;
            }
        }
        entropy
    }

    /// The same on the device (kernels/router.cu); the entropy sum stays there.
    fn topk_cuda(&self, h: Host, t: usize, logits: Tensor, probs: Tensor, ids: Tensor, weights: Tensor) -> Result<()> {
        let ent = h.alloc_f32(&[t])?;
        let ptrs = [logits.arg(), probs.arg(), ids.arg(), weights.arg(), ent.arg()];
        h.launch(SRC, "topk_softmax_fwd", grid(t, 8), BLOCK, 0, &[&ptrs[..], &self.sizes(t)].concat())?;
        let total = h.alloc_f32(&[1])?;
        h.launch(SRC, "router_sum", [1, 1, 1], BLOCK, 0, &[ent.arg(), total.arg(), Arg::I32(t as i32)])?;
        h.metric_sum("router_entropy", total, t as f64);
        Ok(())
    }
}

impl Router for TopKSoftmax {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(top_k = self.top_k, normalize = self.normalize, scale = self.scale, bias = self.bias)
    }

    fn params(&self) -> Vec<ParamSpec> {
        let mut p = vec![ParamSpec::new("weight", &[self.experts, self.hidden], Init::Normal(0.02), true)];
        if self.bias {
            p.push(ParamSpec::new("bias", &[self.experts], Init::Zeros, false));
        }
        p
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor) -> Result<RouterOut> {
        let dev = h.device();
        expect(&x, act(dev), dev, &[0, self.hidden], "topk-softmax: x")?;
        let (wt, b) = match p {
            [wt] if !self.bias => (wt, None),
            [wt, b] if self.bias => (wt, Some(*b)),
            _ => return Err(format!("{WHO}: expected {} parameters, got {}", 1 + self.bias as usize, p.len())),
        };
        if dev == Device::Cuda {
            self.cuda_limits()?;
        }
        let (t, e, k) = (x.dim(0), self.experts, self.top_k);
        let logits = h.alloc_f32(&[t, e])?;
        h.gemm(x, *wt, logits, false, true, 1.0, 0.0)?;
        if let Some(b) = b {
            expect(&b, act(dev), dev, &[e], "topk-softmax: bias")?;
            match dev {
                Device::Cpu => {
                    // SAFETY: logits is this call's own allocation.
                    let l = unsafe { logits.f32s_mut() };
                    l.chunks_mut(e).for_each(|row| row.iter_mut().zip(b.f32s()).for_each(|(l, b)| *l += b));
                }
                Device::Cuda => {
                    let args = [logits.arg(), b.arg(), Arg::I64((t * e) as i64), Arg::I32(e as i32)];
                    h.launch(SRC, "router_bias_add", grid(t * e, 256), BLOCK, 0, &args)?;
                }
            }
        }
        let probs = h.alloc_uninit(&[t, e], DType::F32)?;
        let ids = h.alloc_uninit(&[t, k], DType::I32)?;
        let weights = h.alloc_uninit(&[t, k], DType::F32)?;
        match dev {
            Device::Cpu => {
                let entropy = self.topk_cpu(t, logits, probs, ids, weights);
                h.metric_weighted("router_entropy", entropy / t.max(1) as f64, t as f64);
            }
            Device::Cuda => self.topk_cuda(h, t, logits, probs, ids, weights)?,
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
        let (wt, gw, gb) = match (p, g) {
            ([wt], [gw]) if !self.bias => (wt, gw, None),
            ([wt, _], [gw, gb]) if self.bias => (wt, gw, Some(*gb)),
            _ => return Err(format!("{WHO}: expected {} parameters and grads", 1 + self.bias as usize)),
        };
        let (t, e, k) = (x.dim(0), self.experts, self.top_k);
        expect(&d_weights, DType::F32, dev, &[t, k], "topk-softmax: d_weights")?;
        for (d, what) in [(&out.probs, "probs"), (&d_probs, "d_probs"), (&d_logits, "d_logits")] {
            expect(d, DType::F32, dev, &[t, e], &format!("topk-softmax: {what}"))?;
        }
        let dl = match dev {
            Device::Cpu => {
                let dl = h.alloc_f32(&[t, e])?;
                let (pr, id, w, dw) = (out.probs.f32s(), out.ids.i32s(), out.weights.f32s(), d_weights.f32s());
                // SAFETY: dl is this call's own allocation.
                let d = unsafe { dl.f32s_mut() };
                d.copy_from_slice(d_logits.f32s());
                let mut dp = vec![0.0f32; e];
                for r in 0..t {
                    let (pt, row) = (&pr[r * e..(r + 1) * e], r * e..(r + 1) * e);
                    let sel: Vec<usize> = (r * k..(r + 1) * k).filter(|&i| id[i] >= 0).collect();
                    dp.copy_from_slice(&d_probs.f32s()[row.clone()]);
                    let s: f32 = if self.normalize { sel.iter().map(|&i| pt[id[i] as usize]).sum() } else { 1.0 };
                    let dot: f32 = if self.normalize { sel.iter().map(|&i| dw[i] * w[i]).sum() } else { 0.0 };
                    sel.iter().for_each(|&i| dp[id[i] as usize] += (self.scale * dw[i] - dot) / s);
                    let dot: f32 = pt.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    d[row].iter_mut().zip(pt.iter().zip(&dp)).for_each(|(d, (&p, &g))| *d += p * (g - dot));
                }
                dl
            }
            Device::Cuda => {
                self.cuda_limits()?;
                let dl = h.alloc_uninit(&[t, e], DType::BF16)?;
                let ptrs = [out.probs, out.ids, out.weights, d_weights, d_probs, d_logits, dl].map(|t| t.arg());
                h.launch(SRC, "topk_softmax_bwd", grid(t, 8), BLOCK, 0, &[&ptrs[..], &self.sizes(t)].concat())?;
                dl
            }
        };
        if let Some(gb) = gb {
            match dev {
                Device::Cpu => {
                    // SAFETY: the bias's gradient is this component's own, viewed nowhere else now.
                    let g = unsafe { gb.f32s_mut() };
                    dl.f32s().chunks(e).for_each(|row| g.iter_mut().zip(row).for_each(|(g, d)| *g += d));
                }
                Device::Cuda => {
                    let args = [dl.arg(), gb.arg(), Arg::I32(t as i32), Arg::I32(e as i32)];
                    h.launch(SRC, "router_bias_grad", [e as u32, 1, 1], BLOCK, 0, &args)?;
                }
            }
        }
        h.gemm(dl, x, *gw, true, false, 1.0, 1.0)?;
        h.gemm(dl, *wt, dx, false, false, 1.0, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, dims, dot, randn};
    use pith_plugin_api::kit::TestHost;

    /// L = ⟨a, weights⟩ + ⟨b, probs⟩ + ⟨c, logits⟩: backward gets (a, b, c) as (d_weights, d_probs,
    /// d_logits) and must give dL/dx and dL/dW.
    #[test]
    fn backward_chains_gates_probs_and_logits() {
        let (t, hd, e, k) = (5, 6, 7, 3);
        for (normalize, scale) in [(true, 1.0), (false, 1.0), (true, 2.5), (false, 16.0)] {
            let r =
                create(&format!("top_k = {k}\nnormalize = {normalize}\nscale = {scale:?}"), dims(e as u32)).unwrap();
            let data = TestHost::new(t);
            let (x, w) =
                (data.tensor_f32(&randn(t * hd, 1, 1.0), &[t, hd]), data.tensor_f32(&randn(e * hd, 2, 0.5), &[e, hd]));
            let (a, b, c) = (randn(t * k, 3, 1.0), randn(t * e, 4, 1.0), randn(t * e, 5, 1.0));
            let loss = || {
                let th = TestHost::new(t);
                let o = r.forward(th.host(), &[w], x).unwrap();
                dot(&a, o.weights.f32s()) + dot(&b, o.probs.f32s()) + dot(&c, o.logits.f32s())
            };
            let th = TestHost::new(t);
            let o = r.forward(th.host(), &[w], x).unwrap();
            let sums: Vec<f32> = o.probs.f32s().chunks(e).map(|p| p.iter().sum()).collect();
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "probs are a softmax: {sums:?}");
            let (gw, dx) = (th.zeros(&[e, hd], DType::F32), th.zeros(&[t, hd], DType::F32));
            let [da, db, dc] = [(&a, k), (&b, e), (&c, e)].map(|(v, n)| th.tensor_f32(v, &[t, n]));
            r.backward(th.host(), &[w], &[gw], x, &o, da, db, dc, dx).unwrap();
            check_grad(&format!("dx (normalize {normalize})"), x, dx.f32s(), loss);
            check_grad(&format!("dW (normalize {normalize})"), w, gw.f32s(), loss);
        }
    }
}
