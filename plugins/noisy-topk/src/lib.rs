//! `noisy-topk`: noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks: The
//! Sparsely-Gated Mixture-of-Experts Layer", arXiv:1701.06538, §2.1), with a multiplicative-jitter
//! option in the style of Switch Transformers and Mixtral. README.md has the equations and every
//! config key.
//!
//! Forward, for x [T,H], W [E,H] (`weight`) and, with `noise = "learned"`, W_n [E,H]
//! (`noise_weight`, initialised to 0):
//!   in training (`h.context().training`):
//!     learned:  l = x·Wᵀ + ε ⊙ softplus(x·W_nᵀ),  ε ~ N(0, 1) per (token, expert)   (Shazeer eq. 4)
//!     jitter:   l = x·Wᵀ ⊙ (1 + u),               u ~ U(−`jitter`, `jitter`) per (token, expert)
//!   in eval: l = x·Wᵀ (no noise, whatever `noise` says);
//!   probs p = softmax(l) (the noisy logits in training; what balance losses see);
//!   S_t = the `top_k` largest l_t (ties: the lower id);
//!   gates w_j = p_j / Σ_{i∈S_t} p_i with `normalize` (= Shazeer's softmax over the kept logits),
//!   else p_j  (j ∈ S_t). Every slot is filled (no EMPTY ids).
//! The noise is a function of the call's context, never stored: a key is drawn from
//! `kit::Rng::from_context(h.context(), NOISE_STREAM)` (then mixed with the step, micro-batch and
//! layer), and element (t, e) of the noise is a counter-based hash of (key, global row, e), the
//! same on the CPU and in the CUDA kernels. A resumed run draws the same noise; the backward, which
//! sees its forward's context, REDRAWS it rather than saving it.
//! Backward (exact given the noise, which is a constant of the call; the selection is piecewise
//! constant), per token with d_weights dw, d_probs dp and d_logits dl:
//!   dp' = dp + on j ∈ S: (dw_j − Σ_{i∈S} dw_i·w_i) / Σ_{i∈S} p_i (normalize) or dw_j;
//!   g = dl + p ⊙ (dp' − ⟨dp', p⟩)   (∂L/∂l);
//!   learned: dW += gᵀ·x;  dn = g ⊙ ε ⊙ σ(x·W_nᵀ);  dW_n += dnᵀ·x;  dx = g·W + dn·W_n;
//!   jitter:  dc = g ⊙ (1 + u);  dW += dcᵀ·x;  dx = dc·W.
//! Metric: `router_entropy`, the mean entropy of p (weighted by tokens).
//!
//! CUDA (kernels/noisy_topk.cu; x, W and W_n bf16, logits, probs, gates and grads f32): the GEMMs go
//! through the host; `noisy_topk_noise` adds the noise to the logits in place, `noisy_topk_fwd` (a
//! warp per token) does the softmax, entropy, top-k and gates, `noisy_topk_sum` sums the entropies
//! in a fixed order, `noisy_topk_bwd` writes dc and dn as bf16 for the GEMMs, redrawing the noise.
//! Supports E ≤ 1024 and `top_k` ≤ 32 there.

use pith_plugin_api::kit::Rng;
use pith_plugin_api::{
    kernel_source, kit, parse_config, register, Arg, Context, DType, Device, Group, Host, Init, ModelDims, ParamSpec,
    Result, Router, RouterOut, Tensor,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("noisy-topk");

const WHO: &str = "noisy-topk";
/// Threads per block of every launch: 8 warps, one token row each in the row kernels.
const BLOCK: [u32; 3] = [256, 1, 1];
/// What the CUDA kernels support: a warp per row, 32 experts and one slot per lane.
const CUDA_MAX_EXPERTS: usize = 1024;
const CUDA_MAX_K: usize = 32;
/// The `Rng::from_context` stream of the router noise (any constant: it keeps this use apart from
/// others drawing from the same context).
const NOISE_STREAM: u64 = 0x6e6f_6973_795f_746b; // "noisy_tk"
/// `jitter` when the config leaves it out.
const DEFAULT_JITTER: f32 = 0.01;

/// What noise the logits get in training.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Noise {
    /// Shazeer et al.: ε·softplus(x·W_nᵀ) added, W_n trained.
    Learned,
    /// Multiplicative: the logits times 1 + U(−jitter, jitter).
    Jitter,
}

impl Noise {
    /// The kernels' `mode` argument.
    fn mode(self) -> usize {
        match self {
            Noise::Learned => 1,
            Noise::Jitter => 2,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_top_k")]
    top_k: usize,
    #[serde(default = "yes")]
    normalize: bool,
    #[serde(default = "default_noise")]
    noise: Noise,
    /// Only with `noise = "jitter"` (default 0.01).
    jitter: Option<f32>,
}
fn default_top_k() -> usize {
    2
}
fn yes() -> bool {
    true
}
fn default_noise() -> Noise {
    Noise::Learned
}

struct NoisyTopK {
    hidden: usize,
    experts: usize,
    top_k: usize,
    normalize: bool,
    noise: Noise,
    jitter: f32,
}

fn create(config: &str, dims: ModelDims) -> Result<NoisyTopK> {
    let c: Config = parse_config(config)?;
    let experts = dims.experts as usize;
    if c.top_k == 0 || c.top_k > experts {
        return Err(format!(
            "`top_k` = {} but the model has {experts} experts; top_k must be in 1..={experts}",
            c.top_k
        ));
    }
    if c.noise == Noise::Learned && c.jitter.is_some() {
        return Err("`jitter` applies only with `noise` = \"jitter\" (the learned noise has no such scale)".into());
    }
    let jitter = c.jitter.unwrap_or(DEFAULT_JITTER);
    if !(jitter.is_finite() && (0.0..1.0).contains(&jitter)) {
        return Err(format!(
            "`jitter` = {jitter} must be in [0, 1): the logits are multiplied by 1 + U(-jitter, jitter) \
             (Switch Transformers: 0.01)"
        ));
    }
    let hidden = dims.hidden as usize;
    Ok(NoisyTopK { hidden, experts, top_k: c.top_k, normalize: c.normalize, noise: c.noise, jitter })
}

register!(
    Router,
    "noisy-topk",
    "Shazeer et al. noisy top-k gating: learned Gaussian noise (or multiplicative jitter) on the logits in training",
    "[router]\nplugin = \"noisy-topk\"\ntop_k = 2\nnormalize = true\nnoise = \"learned\"  # or \"jitter\", with jitter = 0.01",
    create
);

fn cuda_source() -> &'static str {
    kernel_source!(include_str!("../kernels/noisy_topk.cu"))
}

/// The noise of one call: a key from the context, and the global index of this rank's first row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Draw {
    key: u64,
    first_row: u64,
}

impl Draw {
    /// The noise of a call at `ctx` on rank `rank` of `t` rows: `Rng::from_context`
    /// gives the key, mixed with the step, micro-batch and layer (the host's seed mixes them
    /// already; this keeps the noise apart per call even under a host whose seed stays put). Rows
    /// are numbered globally (rank r holds rows r·t ..), so the noise of a token does not depend on
    /// how the micro-batch is split over ranks.
    fn new(ctx: Context, rank: usize, t: usize) -> Draw {
        let start = Rng::from_context(ctx, NOISE_STREAM).next_u64();
        let parts = [ctx.step, ctx.micro_batch as u64, ctx.layer as u64];
        let key = parts.iter().fold(start, |k, &v| Rng::new(k ^ v).next_u64());
        Draw { key, first_row: (rank * t) as u64 }
    }

    /// 64 random bits for element i = row·E + e of this call (splitmix64 of key + (i + 1)·φ; the
    /// same in kernels/noisy_topk.cu).
    fn bits(&self, i: u64) -> u64 {
        let mut z = self.key.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The element index of (row, e) of this call.
    fn index(&self, row: usize, e: usize, experts: usize) -> u64 {
        (self.first_row + row as u64) * experts as u64 + e as u64
    }
}

/// A standard normal from 64 bits (Box–Muller on two 24-bit uniforms: u1 in (0, 1], u2 in [0, 1);
/// |ε| ≤ √(2·ln 2²⁴) ≈ 5.8). Every step is exact or a correctly rounded f32 op except ln and cos,
/// which the CUDA kernel computes within an ulp or two of these.
fn normal(b: u64) -> f32 {
    let u1 = 1.0 - (b >> 40) as f32 * (1.0 / 16_777_216.0);
    let u2 = ((b >> 16) & 0xFF_FFFF) as f32 * (1.0 / 16_777_216.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// The jitter factor 1 + u, u uniform in [−j, j) from 64 bits (exact on both devices: the kernel
/// does the same ops).
fn jitter_factor(b: u64, j: f32) -> f32 {
    let u = (b >> 40) as f32 * (1.0 / 16_777_216.0);
    1.0 + j * (2.0 * u - 1.0)
}

fn softplus(n: f32) -> f32 {
    if n > 20.0 {
        n
    } else {
        n.exp().ln_1p()
    }
}

fn sigmoid(n: f32) -> f32 {
    1.0 / (1.0 + (-n).exp())
}

/// A ranking key: NaN below everything (−∞).
fn key(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

use pith_plugin_api::kit::ints;

/// [`kit::expect`], the message led by this component's name.
fn expect(t: &Tensor, dtype: DType, device: Device, want: &[usize], what: &str) -> Result<()> {
    pith_plugin_api::kit::expect(t, dtype, device, want, &format!("{WHO}: {what}"))
}

/// The launch arguments of each kernel, in parameter order (a unit test holds them to the
/// kernels' signatures in kernels/noisy_topk.cu). `n`: a null pointer where a tensor is absent.
mod args {
    use super::*;

    fn ptr(t: Option<Tensor>) -> Arg {
        t.map_or(Arg::Ptr(0), |t| t.arg())
    }
    fn draw(d: Draw) -> [Arg; 2] {
        [Arg::I64(d.key as i64), Arg::I64(d.first_row as i64)]
    }
    /// logits (in place), the noise logits x·W_nᵀ (learned), rows, E, the draw, mode, jitter.
    pub fn noise(r: &NoisyTopK, logits: Tensor, nlog: Option<Tensor>, t: usize, d: Draw) -> Vec<Arg> {
        let head = [logits.arg(), ptr(nlog)];
        [&head[..], &ints([t, r.experts]), &draw(d), &ints([r.noise.mode()]), &[Arg::F32(r.jitter)]].concat()
    }
    /// `ts`: logits, probs, ids, weights, ent.
    pub fn fwd(r: &NoisyTopK, ts: [Tensor; 5], t: usize) -> Vec<Arg> {
        [&ts.map(|t| t.arg())[..], &ints([t, r.experts, r.top_k, r.normalize as usize])].concat()
    }
    pub fn sum(x: Tensor, out: Tensor, n: usize) -> Vec<Arg> {
        vec![x.arg(), out.arg(), Arg::I32(n as i32)]
    }
    /// `ts`: probs, ids, weights, d_weights, d_probs, d_logits, dc; then the noise logits and dn
    /// (learned noise in training; else null); `d`: the draw, `mode` 0 without noise.
    #[allow(clippy::too_many_arguments)]
    pub fn bwd(
        r: &NoisyTopK,
        ts: [Tensor; 7],
        nlog: Option<Tensor>,
        dn: Option<Tensor>,
        t: usize,
        d: Draw,
        mode: usize,
    ) -> Vec<Arg> {
        let sizes = ints([t, r.experts, r.top_k, r.normalize as usize]);
        [&ts.map(|t| t.arg())[..], &[ptr(nlog), ptr(dn)], &sizes, &draw(d), &ints([mode]), &[Arg::F32(r.jitter)]]
            .concat()
    }
}

impl NoisyTopK {
    fn cuda_limits(&self) -> Result<()> {
        if self.experts > CUDA_MAX_EXPERTS || self.top_k > CUDA_MAX_K {
            return Err(format!(
                "{WHO}: on CUDA the router supports model.experts <= {CUDA_MAX_EXPERTS} and `top_k` <= {CUDA_MAX_K}; \
                 got {} and {}",
                self.experts, self.top_k
            ));
        }
        Ok(())
    }

    /// The expected parameters: weight, and noise_weight for learned noise.
    fn n_params(&self) -> usize {
        match self.noise {
            Noise::Learned => 2,
            Noise::Jitter => 1,
        }
    }

    /// The noise of this call, or None in eval (no noise).
    fn draw(&self, h: &Host, t: usize) -> Option<Draw> {
        let ctx = h.context();
        ctx.training.then(|| Draw::new(ctx, h.rank(Group::World), t))
    }

    /// logits (clean x·Wᵀ) += the noise, in place, on the CPU.
    fn add_noise_cpu(&self, t: usize, logits: Tensor, nlog: Option<Tensor>, d: Draw) {
        let e = self.experts;
        // SAFETY: logits is the caller's fresh allocation; nlog is another.
        let l = unsafe { logits.f32s_mut() };
        let n = nlog.as_ref().map(|n| n.f32s());
        for r in 0..t {
            for j in 0..e {
                let b = d.bits(d.index(r, j, e));
                let v = &mut l[r * e + j];
                match n {
                    Some(n) => *v += normal(b) * softplus(n[r * e + j]), // learned
                    None => *v *= jitter_factor(b, self.jitter),
                }
            }
        }
    }

    /// Softmax, entropy, top-k and gates of every row on the CPU; returns the summed entropy.
    fn route_cpu(&self, t: usize, logits: Tensor, [probs, ids, weights]: [Tensor; 3]) -> f64 {
        let (e, k) = (self.experts, self.top_k);
        let l = logits.f32s();
        // SAFETY: probs, ids and weights are the caller's fresh allocations, apart from logits.
        let (pr, id, w) = unsafe { (probs.f32s_mut(), ids.i32s_mut(), weights.f32s_mut()) };
        let mut entropy = 0.0f64;
        let mut order: Vec<usize> = (0..e).collect();
        for r in 0..t {
            let (lt, pt) = (&l[r * e..(r + 1) * e], &mut pr[r * e..(r + 1) * e]);
            let max = lt.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            pt.iter_mut().zip(lt).for_each(|(p, &v)| *p = (v - max).exp());
            let sum: f32 = pt.iter().sum();
            pt.iter_mut().for_each(|p| *p /= sum);
            entropy -= pt.iter().filter(|&&v| v > 0.0).map(|&v| v as f64 * (v as f64).ln()).sum::<f64>();
            // Ranked by logit (as by probability, softmax being monotone, without its rounding);
            // a stable sort of ascending ids keeps the lower id first among ties, −0 = +0 included.
            order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
            order.sort_by(|&a, &b| key(lt[b]).partial_cmp(&key(lt[a])).unwrap_or(std::cmp::Ordering::Equal));
            let sel: f32 = order[..k].iter().map(|&j| pt[j]).sum();
            let denom = if self.normalize && sel > 0.0 { sel } else { 1.0 };
            for (slot, &j) in order[..k].iter().enumerate() {
                id[r * k + slot] = j as i32;
                w[r * k + slot] = pt[j] / denom;
            }
        }
        entropy
    }

    /// The same on the device (kernels/noisy_topk.cu); the entropy sum stays there.
    fn route_cuda(&self, h: Host, t: usize, logits: Tensor, [probs, ids, weights]: [Tensor; 3]) -> Result<()> {
        let src = cuda_source();
        let ent = h.alloc_uninit(&[t], DType::F32)?;
        h.launch(
            src,
            "noisy_topk_fwd",
            kit::grid(t, 8),
            BLOCK,
            0,
            &args::fwd(self, [logits, probs, ids, weights, ent], t),
        )?;
        let total = h.alloc_f32(&[1])?;
        h.launch(src, "noisy_topk_sum", [1, 1, 1], BLOCK, 0, &args::sum(ent, total, t))?;
        h.metric_sum("router_entropy", total, t as f64);
        Ok(())
    }

    /// ∂L/∂(x·Wᵀ) [T,E] and, for learned noise, ∂L/∂(x·W_nᵀ) on the CPU (see the module doc).
    fn backward_cpu(
        &self,
        out: &RouterOut,
        [dw, dp, dl]: [Tensor; 3],
        nlog: Option<Tensor>,
        d: Option<Draw>,
        [dc, dn]: [&mut [f32]; 2],
    ) {
        let (t, e, k) = (out.ids.dim(0), self.experts, self.top_k);
        let (pr, id, w) = (out.probs.f32s(), out.ids.i32s(), out.weights.f32s());
        let (dw, dp, dl) = (dw.f32s(), dp.f32s(), dl.f32s());
        let mut g = vec![0.0f32; e];
        for r in 0..t {
            let row = r * e..(r + 1) * e;
            let pt = &pr[row.clone()];
            g.copy_from_slice(&dp[row.clone()]);
            let sel: Vec<usize> = (r * k..(r + 1) * k).filter(|&i| id[i] >= 0).collect();
            if self.normalize {
                let s: f32 = sel.iter().map(|&i| pt[id[i] as usize]).sum();
                let s = if s > 0.0 { s } else { 1.0 };
                let dot: f32 = sel.iter().map(|&i| dw[i] * w[i]).sum();
                sel.iter().for_each(|&i| g[id[i] as usize] += (dw[i] - dot) / s);
            } else {
                sel.iter().for_each(|&i| g[id[i] as usize] += dw[i]);
            }
            let pd: f32 = pt.iter().zip(&g).map(|(a, b)| a * b).sum();
            for j in 0..e {
                let gl = dl[r * e + j] + pt[j] * (g[j] - pd); // ∂L/∂l
                let b = d.map(|d| d.bits(d.index(r, j, e)));
                dc[r * e + j] = match (self.noise, b) {
                    (Noise::Jitter, Some(b)) => gl * jitter_factor(b, self.jitter),
                    _ => gl,
                };
                if let (Some(n), Some(b)) = (nlog, b) {
                    dn[r * e + j] = gl * normal(b) * sigmoid(n.f32s()[r * e + j]);
                }
            }
        }
    }
}

impl Router for NoisyTopK {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(
            top_k = self.top_k,
            normalize = self.normalize,
            noise = format!("{:?}", self.noise).to_lowercase(),
            jitter = self.jitter
        )
    }

    fn params(&self) -> Vec<ParamSpec> {
        let mut p = vec![ParamSpec::new("weight", &[self.experts, self.hidden], Init::Normal(0.02), true)];
        if self.noise == Noise::Learned {
            // Shazeer et al. initialise both to zeros; W stays N(0, 0.02²) like Pith's other routers.
            p.push(ParamSpec::new("noise_weight", &[self.experts, self.hidden], Init::Zeros, true));
        }
        p
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor) -> Result<RouterOut> {
        let dev = h.device();
        if p.len() != self.n_params() {
            return Err(format!("{WHO}: expected {} parameters, got {}", self.n_params(), p.len()));
        }
        let act = kit::act_dtype(&h);
        expect(&x, act, dev, &[0, self.hidden], "x")?;
        for w in p {
            expect(w, act, dev, &[self.experts, self.hidden], "weight")?;
        }
        if dev == Device::Cuda {
            self.cuda_limits()?;
        }
        let (t, e, k) = (x.dim(0), self.experts, self.top_k);
        let logits = h.alloc_f32(&[t, e])?;
        h.gemm(x, p[0], logits, false, true, 1.0, 0.0)?;
        let draw = self.draw(&h, t);
        // x·W_nᵀ, saved for the backward (σ of it is softplus's derivative).
        let nlog = match (self.noise, draw) {
            (Noise::Learned, Some(_)) => {
                let n = h.alloc_f32(&[t, e])?;
                h.gemm(x, p[1], n, false, true, 1.0, 0.0)?;
                Some(n)
            }
            _ => None,
        };
        let probs = h.alloc_uninit(&[t, e], DType::F32)?;
        let ids = h.alloc_uninit(&[t, k], DType::I32)?;
        let weights = h.alloc_uninit(&[t, k], DType::F32)?;
        match dev {
            Device::Cpu => {
                if let Some(d) = draw {
                    self.add_noise_cpu(t, logits, nlog, d);
                }
                let entropy = self.route_cpu(t, logits, [probs, ids, weights]);
                if t > 0 {
                    h.metric_weighted("router_entropy", entropy / t as f64, t as f64);
                }
            }
            Device::Cuda => {
                if let Some(d) = draw {
                    let a = args::noise(self, logits, nlog, t, d);
                    h.launch(cuda_source(), "noisy_topk_noise", kit::grid(t * e, 256), BLOCK, 0, &a)?;
                }
                self.route_cuda(h, t, logits, [probs, ids, weights])?;
            }
        }
        Ok(RouterOut { logits, probs, ids, weights, saved: nlog.into_iter().collect::<Vec<_>>().into() })
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
        if p.len() != self.n_params() || g.len() != self.n_params() {
            return Err(format!(
                "{WHO}: expected {0} parameters and {0} grads, got {1} and {2}",
                self.n_params(),
                p.len(),
                g.len()
            ));
        }
        let (t, e, k) = (x.dim(0), self.experts, self.top_k);
        for gw in g {
            expect(gw, DType::F32, dev, &[e, self.hidden], "weight grad")?;
        }
        expect(&out.ids, DType::I32, dev, &[t, k], "ids")?;
        expect(&out.weights, DType::F32, dev, &[t, k], "weights")?;
        expect(&d_weights, DType::F32, dev, &[t, k], "d_weights")?;
        for (d, what) in [(&out.probs, "probs"), (&d_probs, "d_probs"), (&d_logits, "d_logits")] {
            expect(d, DType::F32, dev, &[t, e], what)?;
        }
        // The same noise as the forward: the same context, redrawn.
        let draw = self.draw(&h, t);
        let nlog = match (self.noise, draw) {
            (Noise::Learned, Some(_)) => match out.saved.first() {
                Some(n) => {
                    expect(n, DType::F32, dev, &[t, e], "saved noise logits")?;
                    Some(*n)
                }
                None => return Err(format!("{WHO}: backward in training needs the noise logits its forward saved")),
            },
            _ => None,
        };
        let (dc, dn) = match dev {
            Device::Cpu => {
                let dc = h.alloc_uninit(&[t, e], DType::F32)?;
                let dn = nlog.map(|_| h.alloc_uninit(&[t, e], DType::F32)).transpose()?;
                let mut none: [f32; 0] = [];
                // SAFETY: dc and dn are this call's own allocations, written in full here.
                let dn_s = match &dn {
                    Some(dn) => unsafe { dn.f32s_mut() },
                    None => &mut none[..],
                };
                self.backward_cpu(out, [d_weights, d_probs, d_logits], nlog, draw, [unsafe { dc.f32s_mut() }, dn_s]);
                (dc, dn)
            }
            Device::Cuda => {
                self.cuda_limits()?;
                let dc = h.alloc_uninit(&[t, e], DType::BF16)?;
                let dn = nlog.map(|_| h.alloc_uninit(&[t, e], DType::BF16)).transpose()?;
                let ts = [out.probs, out.ids, out.weights, d_weights, d_probs, d_logits, dc];
                let mode = draw.map_or(0, |_| self.noise.mode());
                let d = draw.unwrap_or(Draw { key: 0, first_row: 0 });
                let a = args::bwd(self, ts, nlog, dn, t, d, mode);
                h.launch(cuda_source(), "noisy_topk_bwd", kit::grid(t, 8), BLOCK, 0, &a)?;
                (dc, dn)
            }
        };
        h.gemm(dc, x, g[0], true, false, 1.0, 1.0)?;
        h.gemm(dc, p[0], dx, false, false, 1.0, 0.0)?;
        if let Some(dn) = dn {
            h.gemm(dn, x, g[1], true, false, 1.0, 1.0)?;
            h.gemm(dn, p[1], dx, false, false, 1.0, 1.0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
