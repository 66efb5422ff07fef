//! The decoder's forward and backward, written once over a [`Backend`]: the CPU (f32, the
//! reference; model.rs) and CUDA (bf16 activations, f32 residual stream; gpu/model.rs) implement
//! its ops. Forward keeps what backward needs; backward is the exact reverse, llm.c style (no
//! autograd tape). Per layer:
//!
//!   a = attn_norm(x);  q = rope(q_norm(q_proj a));  k = rope(k_norm(k_proj a));  v = v_proj a
//!   (`model.qk_norm`: per head (Qwen3-MoE), over the whole projection (OLMoE) or none (Mixtral);
//!   `model.qkv_bias`: q_proj, k_proj, v_proj add a bias (Qwen2-MoE))
//!   or, with `[model.mla]` (DeepSeek-V2/V3's multi-head latent attention):
//!   q = rope(q_proj a) (or q_b_proj q_a_norm q_a_proj a);  [c, kr] = kv_a_proj a;
//!   [k_nope, v] = kv_b_proj kv_a_norm c (per head);  k = [k_nope, rope(kr)] (kr on every head)
//!   h = x + o_proj(causal_gqa_attention(q, k, v))  (`model.o_bias`: o_proj adds a bias;
//!   `model.sliding_window`: a query sees its window of recent keys in `window_layers`;
//!   `model.attn_sinks`: a learned logit per head joins each softmax — GPT-OSS)
//!   m = moe_norm(h);   route = (logits, probs, ids, weights) = router(m)
//!   out = h + combine(experts(dispatch(m, route)), route) [+ shared(m): the `[shared]` plugin]
//!   or, in the first `model.dense_layers` (DeepSeek's first_k_dense_replace):
//!   out = h + dense(m)  (the `[dense]` plugin, an FFN on every token)
//!
//! RoPE is plain or YaRN (`[model.yarn]`: the tables differ), and the scores' scale is
//! `model.attn_scale`/sqrt(head_dim).
//!
//! then final_norm, an untied lm_head and cross-entropy; the loss adds every balance loss.
//! Components get [`Tensor`] views of the backend's activations (`Backend::ACT`: f32 on the CPU,
//! bf16 on CUDA), and every output they return is checked (dtype, device, shape; values finite
//! on the CPU) before it is used, so an error names the layer and the plugin.

use crate::cpu::{view_i32, Calls};
use crate::model::{named, Ffn, Model, MoeLayer, StepOut, ATTN_NORM, K, KV_A, KV_B, O, Q, V};
use abi_stable::std_types::RSlice;
use pith_plugin_api::abi::{ExpertsBox, OpsRef};
use pith_plugin_api::{DType, Device, Dispatched, ExpertsOut, RouterOut, Tensor, EMPTY};
use std::ops::Range;

/// The ops a device gives the decoder. `T` is an activation the pass owns (freed when dropped);
/// a parameter is named by its index in the parameter list. Backward ops WRITE input grads
/// (except where they say they accumulate) and ACCUMULATE parameter grads.
pub(crate) trait Backend {
    type T;
    /// Token ids as the device holds them.
    type Ids: ?Sized;
    /// Where activations live, and the dtype components get them in.
    const DEVICE: Device;
    const ACT: DType;
    fn model(&self) -> &Model;
    /// Sequences in this micro-batch.
    fn batch(&self) -> usize;
    /// The plugins' ops table and where their calls sit (layer, step).
    fn ops(&self) -> OpsRef<'_>;
    fn calls(&self) -> &Calls;

    /// A view of `t` with shape `dims` for a component (writable: components write outputs).
    fn view(&self, t: &Self::T, dims: &[usize]) -> Tensor;
    /// A tensor whose contents are undefined (the op or component writes all of it).
    fn empty(&self, dims: &[usize], dtype: DType) -> Result<Self::T, String>;
    fn zeros(&self, dims: &[usize], dtype: DType) -> Result<Self::T, String>;
    /// What components get for parameters `r` (working copies; buffers as they are), and their
    /// gradients (zero-numel for buffers and accumulators; on CUDA allocated by the first call
    /// of a step).
    fn weights(&self, r: Range<usize>) -> Vec<Tensor>;
    fn grads(&self, r: Range<usize>) -> Result<Vec<Tensor>, String>;
    /// Host copies of a component's tensor (router ids and gates, for traces; loss values).
    fn host_i32(&self, t: &Tensor) -> Result<Vec<i32>, String>;
    fn host_f32(&self, t: &Tensor) -> Result<Vec<f32>, String>;
    /// Names `who` when `t` holds a non-finite value (the CPU checks every activation; CUDA
    /// checks the loss and the gradient norm only, which would otherwise cost a sync per op).
    fn finite(&self, t: &Self::T, who: &str) -> Result<(), String>;

    /// Rows of the embedding (f32 [T, hidden]); its backward accumulates into the table's grad.
    fn embed(&self, ids: &Self::Ids) -> Result<Self::T, String>;
    fn embed_bwd(&self, ids: &Self::Ids, dx: &Self::T) -> Result<(), String>;
    /// RMSNorm with weight `w` over rows of its size: (y in ACT, rstd f32).
    fn norm(&self, w: usize, x: &Self::T) -> Result<(Self::T, Self::T), String>;
    /// dx += ∂ when dx is f32; dx = ∂ when it is ACT and ACT is not f32.
    fn norm_bwd(&self, w: usize, x: &Self::T, rstd: &Self::T, dy: &Self::T, dx: &mut Self::T) -> Result<(), String>;
    /// y [T, out] = x · W[w]ᵀ in ACT (W [out, in]; x any tensor of T·in elements).
    fn linear(&self, w: usize, x: &Self::T) -> Result<Self::T, String>;
    /// dx (+= when `acc`) = dy · W[w]; the grad of W += dyᵀ · x.
    fn linear_bwd(&self, w: usize, x: &Self::T, dy: &Self::T, dx: &mut Self::T, acc: bool) -> Result<(), String>;
    /// y [T, n] += bias `w` [n] on every row; its backward accumulates dy's column sums.
    fn bias(&self, w: usize, y: &mut Self::T) -> Result<(), String>;
    fn bias_bwd(&self, w: usize, dy: &Self::T) -> Result<(), String>;
    /// RoPE in place on q or k [T, heads·W]: the last `rope_dim` (all of head_dim but under MLA)
    /// of each head of width W; `inverse` for backward.
    fn rope(&self, x: &mut Self::T, heads: usize, inverse: bool) -> Result<(), String>;
    /// Columns `r` of `x` (ACT) as rows of `width`, each output row the sum of `sum` consecutive
    /// rows' (1: a plain copy): [rows/sum, r.len()].
    fn cols(&self, x: &Self::T, width: usize, r: Range<usize>, sum: usize) -> Result<Self::T, String>;
    /// Writes `src` (ACT, rows of w) into columns at..at+w of `dst` (rows of `width`), each src
    /// row into `repeat` consecutive dst rows.
    fn set_cols(&self, dst: &mut Self::T, width: usize, at: usize, src: &Self::T, repeat: usize) -> Result<(), String>;
    /// Layer `l`'s causal GQA attention (its sliding window and sinks: `model.sliding_window`,
    /// `model.attn_sinks`): (out [T, heads·head_dim] in ACT, log-sum-exp f32), and its backward
    /// (dq, dk, dv; the sinks' gradient accumulates).
    fn attention(&self, l: usize, q: &Self::T, k: &Self::T, v: &Self::T) -> Result<(Self::T, Self::T), String>;
    fn attention_bwd(&self, l: usize, s: &Attn<'_, Self::T>, dout: &Self::T) -> Result<Qkv<Self::T>, String>;
    /// f32 a + b (each f32 or ACT).
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Self::T, String>;
    /// acc (f32) += x (f32 or ACT).
    fn add_into(&self, acc: &mut Self::T, x: &Tensor) -> Result<(), String>;
    /// A copy of f32 `x` in ACT.
    fn to_act(&self, x: &Self::T, dims: &[usize]) -> Result<Self::T, String>;
    /// Per-token cross-entropy of `logits` [T, vocab] (a tensor whose mean is the loss); with
    /// `grad_scale`, logits become grad_scale·∂(mean loss)/∂logits.
    fn cross_entropy(
        &self,
        logits: &mut Self::T,
        targets: &Self::Ids,
        grad_scale: Option<f32>,
    ) -> Result<Self::T, String>;
    fn mean(&self, losses: &Self::T) -> Result<f32, String>;

    /// How many device allocations plugins hold, and freeing those made since `mark`.
    fn mark(&self) -> usize;
    fn release_to(&self, mark: usize);
    /// The gradients of parameters `ids` are final for this micro-batch (a data-parallel GPU pass
    /// starts their sum over the ranks), and the end of the pass (wait for those sums).
    fn written(&self, ids: &[usize]) -> Result<(), String>;
    fn finish(&self) -> Result<(), String>;
}

/// (dq, dk, dv).
pub(crate) type Qkv<T> = (T, T, T);

/// What attention's backward reads from its forward.
pub(crate) struct Attn<'a, T> {
    pub q: &'a T,
    pub k: &'a T,
    pub v: &'a T,
    pub out: &'a T,
    pub lse: &'a T,
}

/// What the q/k/v projections' backward needs beyond a = attn_norm(x).
enum Proj<T> {
    /// q and k before qk-norm, each with its rstd (with `model.qk_norm`).
    Gqa { q_pre: Option<(T, T)>, k_pre: Option<(T, T)> },
    /// MLA: (q_a_proj a, its rstd, q_a_norm of it) with `q_rank`; c, its rstd and kv_a_norm c.
    Mla { qa: Option<(T, T, T)>, c: T, rstd_c: T, cn: T },
}

/// q, k, v as the attention reads them, and what their backward needs.
type Projected<T> = (T, T, T, Proj<T>);

/// What one layer's forward keeps for backward (names as in the module doc; q, k, v as the
/// attention read them). The plugin tensors r, d, e live until the layer's backward ends
/// (`Backend::release_to(mark)`).
struct Saved<T> {
    x: T,
    rstd1: T,
    a: T,
    proj: Proj<T>,
    q: T,
    k: T,
    v: T,
    att: T,
    lse: T,
    h: T,
    rstd2: T,
    m: T,
    ffn: FfnSaved,
    mark: usize,
}

/// An always-on component's output (shared expert, dense FFN) and its one group's offsets [0, T].
type AlwaysOn = (ExpertsOut, [i32; 2]);

/// What the FFN block keeps: the MoE block's routing, dispatch and outputs, or a dense FFN's.
enum FfnSaved {
    Moe(Box<MoeSaved>),
    Dense(AlwaysOn),
}

struct MoeSaved {
    r: RouterOut,
    d: Dispatched,
    e: ExpertsOut,
    shared: Option<AlwaysOn>,
    counts: Vec<u32>,
}

/// Check a component's output: dtype, device, shape (0 in `dims` = any size), and on the CPU
/// finite values.
pub(crate) fn check(t: &Tensor, dtype: DType, dims: &[usize], device: Device, who: &str) -> Result<(), String> {
    let d = t.dims();
    let fits = d.len() == dims.len() && d.iter().zip(dims).all(|(a, b)| *b == 0 || a == b);
    if !fits || t.dtype != dtype || t.device != device {
        let got = format!("{:?} {d:?} on {:?}", t.dtype, t.device);
        return Err(format!("{who}: returned {got}, expected {dtype:?} {dims:?} (0: any) on {device:?}"));
    }
    match (device, dtype) {
        (Device::Cpu, DType::F32) => finite(t.f32s(), who),
        _ => Ok(()),
    }
}

pub(crate) fn finite(v: &[f32], who: &str) -> Result<(), String> {
    match v.iter().all(|x| x.is_finite()) {
        true => Ok(()),
        false => Err(format!("non-finite values first appeared in the output of {who}")),
    }
}

/// Every id of a host copy of a router's ids is an expert below `ne` or [`EMPTY`].
pub(crate) fn check_ids(ids: &[i32], ne: usize, who: &str) -> Result<(), String> {
    match ids.iter().find(|&&id| id != EMPTY && !(0..ne as i32).contains(&id)) {
        Some(id) => Err(format!("{who}: chose expert {id} of {ne} (valid: 0..{ne}, or {EMPTY} for an empty slot)")),
        None => Ok(()),
    }
}

fn rs(v: &[Tensor]) -> RSlice<'_, Tensor> {
    RSlice::from_slice(v)
}

/// Forward + backward of one micro-batch: accumulates grad_scale·∂(loss)/∂w into the
/// gradients, where the loss is the mean cross-entropy plus every balance loss. With `routing`,
/// StepOut carries every layer's ids and gates.
pub(crate) fn forward_backward<B: Backend>(
    b: &B,
    tokens: &B::Ids,
    targets: &B::Ids,
    grad_scale: f32,
    routing: bool,
) -> Result<StepOut, String> {
    let m = b.model();
    let (layers, x, aux) = forward(b, tokens)?;
    let (xn, rstd) = b.norm(m.final_norm, &x)?;
    b.finite(&xn, "final_norm")?;
    let mut logits = b.linear(m.lm_head, &xn)?;
    b.finite(&logits, "lm_head")?;
    let losses = b.cross_entropy(&mut logits, targets, Some(grad_scale))?;
    // Backward: logits now hold their gradient.
    let t = b.batch() * m.cfg.seq_len;
    let mut dxn = b.empty(&[t, m.cfg.hidden], DType::F32)?;
    b.linear_bwd(m.lm_head, &xn, &logits, &mut dxn, false)?;
    drop(logits);
    let mut dx = b.zeros(&[t, m.cfg.hidden], DType::F32)?;
    b.norm_bwd(m.final_norm, &x, &rstd, &dxn, &mut dx)?;
    b.written(&[m.lm_head, m.final_norm])?;
    drop((x, xn, dxn));
    let (mut counts, mut routes) = (Vec::new(), Vec::new());
    for (l, s) in layers.into_iter().enumerate().rev() {
        if let (true, FfnSaved::Moe(ms)) = (routing, &s.ffn) {
            routes.push((b.host_i32(&ms.r.ids)?, b.host_f32(&ms.r.weights)?));
        } else if routing {
            routes.push((Vec::new(), Vec::new()));
        }
        layer_backward(b, l, &s, &mut dx, grad_scale)?;
        b.written(&m.layer_params(l))?;
        b.release_to(s.mark);
        counts.push(match s.ffn {
            FfnSaved::Moe(ms) => ms.counts,
            FfnSaved::Dense(_) => Vec::new(),
        });
    }
    b.embed_bwd(tokens, &dx)?;
    b.written(&[m.embed])?;
    b.finish()?;
    counts.reverse();
    routes.reverse();
    let loss = b.mean(&losses)?;
    let aux = balance_losses(b, &aux)?;
    Ok(StepOut { loss, aux, expert_counts: counts, routing: routes })
}

/// Forward only: the logits [T, vocab] in ACT.
pub(crate) fn logits<B: Backend>(b: &B, tokens: &B::Ids) -> Result<B::T, String> {
    let m = b.model();
    let (layers, x, _) = forward(b, tokens)?;
    drop(layers);
    let (xn, _) = b.norm(m.final_norm, &x)?;
    b.finite(&xn, "final_norm")?;
    let logits = b.linear(m.lm_head, &xn)?;
    b.finite(&logits, "lm_head")?;
    Ok(logits)
}

/// Forward only: the mean cross-entropy.
pub(crate) fn loss<B: Backend>(b: &B, tokens: &B::Ids, targets: &B::Ids) -> Result<f32, String> {
    let mut logits = logits(b, tokens)?;
    let losses = b.cross_entropy(&mut logits, targets, None)?;
    b.mean(&losses)
}

/// Each balance-loss plugin's value summed over layers (one read of every layer's values;
/// tables with the same plugin name add up), naming the first layer whose value is not finite.
fn balance_losses<B: Backend>(b: &B, aux: &B::T) -> Result<Vec<(String, f32)>, String> {
    let m = b.model();
    let per_layer = m.losses_per_layer();
    let values = b.host_f32(&b.view(aux, &[m.layers.len() * per_layer]))?;
    let mut sums: Vec<(String, f32)> = Vec::new();
    for (l, (lay, vs)) in m.layers.iter().zip(values.chunks(per_layer.max(1))).enumerate() {
        let Ffn::Moe(moe) = &lay.ffn else { continue };
        for ((name, _), &v) in moe.c.losses.iter().zip(vs) {
            finite(&[v], &format!("layer {l} balance_loss `{name}`"))?;
            match sums.iter_mut().find(|a| a.0 == *name) {
                Some(a) => a.1 += v,
                None => sums.push((name.clone(), v)),
            }
        }
    }
    Ok(sums)
}

/// Every layer's forward: what each keeps, the last residual stream, and the balance losses'
/// values [layers, losses per layer] (f32, on the device).
type Forward<T> = (Vec<Saved<T>>, T, T);

fn forward<B: Backend>(b: &B, tokens: &B::Ids) -> Result<Forward<B::T>, String> {
    let m = b.model();
    let mut x = b.embed(tokens)?;
    b.finite(&x, "the embedding")?;
    let per_layer = m.losses_per_layer();
    let aux = b.zeros(&[m.layers.len() * per_layer], DType::F32)?;
    let mut layers = Vec::new();
    for l in 0..m.layers.len() {
        let (saved, out) = layer_forward(b, l, x, &b.view(&aux, &[m.layers.len() * per_layer]))?;
        layers.push(saved);
        x = out;
    }
    Ok((layers, x, aux))
}

/// Layer `l` on the residual stream x: (what backward needs, the layer's output). The balance
/// losses add their values to `aux`'s row for this layer.
fn layer_forward<B: Backend>(b: &B, l: usize, x: B::T, aux: &Tensor) -> Result<(Saved<B::T>, B::T), String> {
    let m = b.model();
    let (c, lay) = (&m.cfg, &m.layers[l]);
    let (n, hd, hi) = (b.batch() * c.seq_len, c.hidden, lay.host);
    let at = |what: &str| format!("layer {l} {what}");
    // Attention.
    let (a, rstd1) = b.norm(hi + ATTN_NORM, &x)?;
    b.finite(&a, &at("attn_norm"))?;
    let (q, k, v, proj) = match lay.mla {
        Some(ml) => mla_project(b, l, ml, &a)?,
        None => project(b, l, &a)?,
    };
    b.finite(&q, &at("q projection"))?;
    b.finite(&k, &at("k projection"))?;
    b.finite(&v, &at("v projection"))?;
    let (att, lse) = b.attention(l, &q, &k, &v)?;
    b.finite(&att, &at("attention"))?;
    let mut o_out = b.linear(hi + O, &att)?;
    if let Some(i) = lay.o_bias {
        b.bias(i, &mut o_out)?;
    }
    b.finite(&o_out, &at("o_proj"))?;
    let h = b.add(&b.view(&x, &[n, hd]), &b.view(&o_out, &[n, hd]))?;
    drop(o_out);
    // The FFN block: the MoE block, or in the first `model.dense_layers` the dense FFN.
    let (mn, rstd2) = b.norm(lay.moe_norm, &h)?;
    b.finite(&mn, &at("moe_norm"))?;
    let mark = b.mark();
    b.calls().set_layer(l);
    let (ffn, out) = match &lay.ffn {
        Ffn::Moe(moe) => moe_forward(b, l, moe, &h, &mn, aux)?,
        Ffn::Dense(dense) => {
            let so = always_on(b, &at(&format!("dense `{}`", dense.c.0)), &dense.c.1, dense.params.clone(), &mn)?;
            let out = b.add(&b.view(&h, &[n, hd]), &so.0.y)?;
            (FfnSaved::Dense(so), out)
        }
    };
    let m = mn;
    let saved = Saved { x, rstd1, a, proj, q, k, v, att, lse, h, rstd2, m, ffn, mark };
    Ok((saved, out))
}

/// The MoE block of layer `l` on m = moe_norm(h): router → balance losses (adding their
/// values to `aux`'s row for this layer) → dispatch → experts → combine, + the shared expert;
/// what backward needs, and the layer's output h + all that.
fn moe_forward<B: Backend>(
    b: &B,
    l: usize,
    moe: &MoeLayer,
    h: &B::T,
    mn: &B::T,
    aux: &Tensor,
) -> Result<(FfnSaved, B::T), String> {
    let (m, o, c) = (b.model(), || b.ops(), &moe.c);
    let (n, hd, ne) = (b.batch() * m.cfg.seq_len, m.cfg.hidden, m.cfg.experts);
    let (act, dev) = (B::ACT, B::DEVICE);
    let at = |what: &str| format!("layer {l} {what}");
    let (router, experts, comm) = (&c.router.1, &c.experts.1, &c.comm.1);
    let mv = b.view(mn, &[n, hd]);
    let (rw, ew) = (b.weights(moe.router.clone()), b.weights(moe.experts.clone()));
    let who = at(&format!("router `{}`", c.router.0));
    let r = named(router.forward(o(), rs(&rw), mv), &who)?;
    check(&r.logits, DType::F32, &[n, ne], dev, &who)?;
    check(&r.probs, DType::F32, &[n, ne], dev, &who)?;
    check(&r.ids, DType::I32, &[n, 0], dev, &who)?;
    check(&r.weights, DType::F32, &[n, r.ids.dim(1)], dev, &who)?;
    if dev == Device::Cpu {
        check_ids(r.ids.i32s(), ne, &who)?;
    }
    for (i, ((name, loss), lp)) in c.losses.iter().zip(&moe.losses).enumerate() {
        let who = at(&format!("balance_loss `{name}`"));
        let row = aux.rows(l * c.losses.len() + i, 1);
        named(loss.forward(o(), rs(&b.weights(lp.clone())), &r, row), &who)?;
    }
    let who = at(&format!("comm `{}` dispatch", c.comm.0));
    let d = named(comm.dispatch(o(), mv, &r, ne as u32), &who)?;
    check(&d.x, act, &[0, hd], dev, &who)?;
    check(&d.offsets, DType::I32, &[ne / m.ep.parts + 1], Device::Cpu, &who)?;
    let counts = d.offsets.i32s().windows(2).map(|w| (w[1] - w[0]) as u32).collect();
    let who = at(&format!("experts `{}`", c.experts.0));
    let e = named(experts.forward(o(), rs(&ew), d.x, d.offsets), &who)?;
    check(&e.y, act, &d.x.dims(), dev, &who)?;
    let who = at(&format!("comm `{}` combine", c.comm.0));
    let y = named(comm.combine(o(), e.y, &r, &d), &who)?;
    check(&y, act, &[n, hd], dev, &who)?;
    let mut out = b.add(&b.view(h, &[n, hd]), &y)?;
    let mut shared = None;
    if let Some((name, sh)) = &c.shared {
        let so = always_on(b, &at(&format!("shared `{name}`")), sh, moe.shared.clone(), mn)?;
        b.add_into(&mut out, &so.0.y)?;
        shared = Some(so);
    }
    Ok((FfnSaved::Moe(Box::new(MoeSaved { r, d, e, shared, counts })), out))
}

/// An always-on experts component (shared expert, dense FFN) with parameters `params` on every
/// row of m: its output, checked, and the one group's offsets [0, T].
fn always_on<B: Backend>(
    b: &B,
    who: &str,
    c: &ExpertsBox,
    params: Range<usize>,
    mn: &B::T,
) -> Result<AlwaysOn, String> {
    let (n, hd) = (b.batch() * b.model().cfg.seq_len, b.model().cfg.hidden);
    let off = [0, n as i32];
    let w = b.weights(params);
    let so = named(c.forward(b.ops(), rs(&w), b.view(mn, &[n, hd]), view_i32(&off, &[2])), who)?;
    check(&so.y, B::ACT, &[n, hd], B::DEVICE, who)?;
    Ok((so, off))
}

/// q, k, v from a = attn_norm(x): linear projections, biases, qk-norm, RoPE.
fn project<B: Backend>(b: &B, l: usize, a: &B::T) -> Result<Projected<B::T>, String> {
    let (c, lay) = (&b.model().cfg, &b.model().layers[l]);
    let hi = lay.host;
    let (mut q, mut k, mut v) = (b.linear(hi + Q, a)?, b.linear(hi + K, a)?, b.linear(hi + V, a)?);
    if let Some(i) = lay.bias {
        b.bias(i, &mut q)?;
        b.bias(i + 1, &mut k)?;
        b.bias(i + 2, &mut v)?;
    }
    let (mut q_pre, mut k_pre) = (None, None);
    if let Some(i) = lay.qk_norm {
        let ((qn, qr), (kn, kr)) = (b.norm(i, &q)?, b.norm(i + 1, &k)?);
        q_pre = Some((std::mem::replace(&mut q, qn), qr));
        k_pre = Some((std::mem::replace(&mut k, kn), kr));
    }
    b.rope(&mut q, c.heads, false)?;
    b.rope(&mut k, c.kv_heads, false)?;
    Ok((q, k, v, Proj::Gqa { q_pre, k_pre }))
}

/// MLA's q, k, v from a (module doc); `ml` is the layer's [`MlaLayer`](crate::model::MlaLayer).
fn mla_project<B: Backend>(b: &B, l: usize, ml: crate::model::MlaLayer, a: &B::T) -> Result<Projected<B::T>, String> {
    let (c, hi) = (&b.model().cfg, b.model().layers[l].host);
    let (n, heads, dq) = (b.batch() * c.seq_len, c.heads, c.head_dim);
    let (r, dr, dv) = (ml.mla.kv_rank, ml.mla.rope_dim, ml.mla.v_dim);
    let dn = dq - dr;
    let (mut q, qa) = match ml.q_a {
        None => (b.linear(hi + Q, a)?, None),
        Some(i) => {
            let qa = b.linear(i, a)?;
            let (qn, rstd) = b.norm(i + 1, &qa)?;
            (b.linear(hi + Q, &qn)?, Some((qa, rstd, qn)))
        }
    };
    b.rope(&mut q, heads, false)?;
    let kva = b.linear(hi + KV_A, a)?;
    let (cc, mut kr) = (b.cols(&kva, r + dr, 0..r, 1)?, b.cols(&kva, r + dr, r..r + dr, 1)?);
    drop(kva);
    b.rope(&mut kr, 1, false)?;
    let (cn, rstd_c) = b.norm(ml.kv_norm, &cc)?;
    let kv = b.linear(hi + KV_B, &cn)?;
    let mut k = b.empty(&[n, heads * dq], B::ACT)?;
    b.set_cols(&mut k, dq, 0, &b.cols(&kv, dn + dv, 0..dn, 1)?, 1)?;
    b.set_cols(&mut k, dq, dn, &kr, heads)?;
    let v = b.cols(&kv, dn + dv, dn..dn + dv, 1)?;
    Ok((q, k, v, Proj::Mla { qa, c: cc, rstd_c, cn }))
}

/// Backward of layer `l`: `dy` holds ∂/∂(its output) and becomes ∂/∂(its input).
fn layer_backward<B: Backend>(b: &B, l: usize, s: &Saved<B::T>, dy: &mut B::T, scale: f32) -> Result<(), String> {
    let (m, at) = (b.model(), |what: &str| format!("layer {l} {what}"));
    let (c, lay) = (&m.cfg, &m.layers[l]);
    let (n, hd, hi) = (b.batch() * c.seq_len, c.hidden, lay.host);
    let act = B::ACT;
    // The FFN block (dy: ∂/∂out, the same as ∂/∂(its output)).
    let dya = b.to_act(dy, &[n, hd])?;
    b.calls().set_layer(l);
    let dm = match (&lay.ffn, &s.ffn) {
        (Ffn::Moe(moe), FfnSaved::Moe(ms)) => {
            let mut dm = moe_backward(b, l, moe, (&ms.r, &ms.d, &ms.e), &s.m, &dya, scale)?;
            if let (Some((name, sh)), Some(so)) = (&moe.c.shared, &ms.shared) {
                let dxsh = always_on_bwd(b, &at(&format!("shared `{name}`")), sh, moe.shared.clone(), &s.m, so, &dya)?;
                b.add_into(&mut dm, &b.view(&dxsh, &[n, hd]))?;
            }
            dm
        }
        (Ffn::Dense(dense), FfnSaved::Dense(so)) => {
            let who = at(&format!("dense `{}`", dense.c.0));
            let dx = always_on_bwd(b, &who, &dense.c.1, dense.params.clone(), &s.m, so, &dya)?;
            // ∂/∂m in f32, as the MoE block's sum is (norm_bwd takes it beside the f32 h).
            let mut dm = b.zeros(&[n, hd], DType::F32)?;
            b.add_into(&mut dm, &b.view(&dx, &[n, hd]))?;
            dm
        }
        _ => unreachable!("a layer's forward and backward take the same FFN block"),
    };
    drop(dya);
    b.norm_bwd(lay.moe_norm, &s.h, &s.rstd2, &dm, dy)?;
    drop(dm);
    // Attention block (dy is now ∂/∂h).
    let dya = b.to_act(dy, &[n, hd])?;
    let mut datt = b.empty(&[n, c.heads * c.rope_v_dims().1], act)?;
    b.linear_bwd(hi + O, &s.att, &dya, &mut datt, false)?;
    if let Some(i) = lay.o_bias {
        b.bias_bwd(i, &dya)?;
    }
    drop(dya);
    let (dq, dk, dv) = b.attention_bwd(l, &Attn { q: &s.q, k: &s.k, v: &s.v, out: &s.att, lse: &s.lse }, &datt)?;
    drop(datt);
    let mut da = b.empty(&[n, hd], DType::F32)?;
    match (&s.proj, lay.mla) {
        (Proj::Gqa { q_pre, k_pre }, _) => project_bwd(b, l, &s.a, (q_pre, k_pre), (dq, dk, dv), &mut da)?,
        (Proj::Mla { qa, c: cc, rstd_c, cn }, Some(ml)) => {
            mla_project_bwd(b, l, ml, &s.a, (qa, cc, rstd_c, cn), (dq, dk, dv), &mut da)?
        }
        (Proj::Mla { .. }, None) => unreachable!("an MLA forward on a layer without MLA"),
    }
    b.norm_bwd(hi + ATTN_NORM, &s.x, &s.rstd1, &da, dy)
}

/// Backward of [`moe_forward`] without the shared expert: ∂/∂m (ACT) from dya = ∂/∂out, summing
/// the dispatch and router paths. Outputs components WRITE in full need no zeroing; d_probs and
/// d_logits accumulate.
fn moe_backward<B: Backend>(
    b: &B,
    l: usize,
    moe: &MoeLayer,
    (r, d, e): (&RouterOut, &Dispatched, &ExpertsOut),
    mn: &B::T,
    dya: &B::T,
    scale: f32,
) -> Result<B::T, String> {
    let (m, o, c) = (b.model(), || b.ops(), &moe.c);
    let (n, hd, ne, act) = (b.batch() * m.cfg.seq_len, m.cfg.hidden, m.cfg.experts, B::ACT);
    let at = |what: &str| format!("layer {l} {what}");
    let (router, experts, comm) = (&c.router.1, &c.experts.1, &c.comm.1);
    let (rows, k) = (d.x.dim(0), r.ids.dim(1));
    let (dys, dw) = (b.empty(&[rows, hd], act)?, b.empty(&[n, k], DType::F32)?);
    let (dyv, dysv, dwv) = (b.view(dya, &[n, hd]), b.view(&dys, &[rows, hd]), b.view(&dw, &[n, k]));
    let res = comm.combine_backward(o(), dyv, e.y, r, d, dysv, dwv);
    named(res, &at(&format!("comm `{}` combine", c.comm.0)))?;
    let dxs = b.empty(&[rows, hd], act)?;
    let (ew, eg) = (b.weights(moe.experts.clone()), b.grads(moe.experts.clone())?);
    let res = experts.backward(o(), rs(&ew), rs(&eg), d.x, d.offsets, e, dysv, b.view(&dxs, &[rows, hd]));
    named(res, &at(&format!("experts `{}`", c.experts.0)))?;
    drop(dys);
    let dxd = b.empty(&[n, hd], act)?;
    let res = comm.dispatch_backward(o(), b.view(&dxs, &[rows, hd]), d, b.view(&dxd, &[n, hd]));
    named(res, &at(&format!("comm `{}` dispatch", c.comm.0)))?;
    drop(dxs);
    let (dprob, dlog) = (b.zeros(&[n, ne], DType::F32)?, b.zeros(&[n, ne], DType::F32)?);
    let (dpv, dlv) = (b.view(&dprob, &[n, ne]), b.view(&dlog, &[n, ne]));
    for ((name, loss), lp) in c.losses.iter().zip(&moe.losses) {
        let res = loss.backward(o(), rs(&b.weights(lp.clone())), r, scale, dpv, dlv);
        named(res, &at(&format!("balance_loss `{name}`")))?;
    }
    let dxr = b.empty(&[n, hd], act)?;
    let (rw, rg, mv) = (b.weights(moe.router.clone()), b.grads(moe.router.clone())?, b.view(mn, &[n, hd]));
    let res = router.backward(o(), rs(&rw), rs(&rg), mv, r, dwv, dpv, dlv, b.view(&dxr, &[n, hd]));
    named(res, &at(&format!("router `{}`", c.router.0)))?;
    b.add(&b.view(&dxd, &[n, hd]), &b.view(&dxr, &[n, hd]))
}

/// Backward of [`always_on`]: ∂/∂m (ACT) from dya = ∂/∂(its output).
fn always_on_bwd<B: Backend>(
    b: &B,
    who: &str,
    c: &ExpertsBox,
    params: Range<usize>,
    mn: &B::T,
    (so, off): &AlwaysOn,
    dya: &B::T,
) -> Result<B::T, String> {
    let (n, hd) = (b.batch() * b.model().cfg.seq_len, b.model().cfg.hidden);
    let dx = b.empty(&[n, hd], B::ACT)?;
    let (w, g, mv, dyv) = (b.weights(params.clone()), b.grads(params)?, b.view(mn, &[n, hd]), b.view(dya, &[n, hd]));
    let res = c.backward(b.ops(), rs(&w), rs(&g), mv, view_i32(off, &[2]), so, dyv, b.view(&dx, &[n, hd]));
    named(res, who)?;
    Ok(dx)
}

/// What q and k were before qk-norm, each with its rstd.
type PreNorm<'a, T> = (&'a Option<(T, T)>, &'a Option<(T, T)>);

/// Backward of [`project`]: da = ∂/∂a from (dq, dk, dv) at the attention's inputs.
fn project_bwd<B: Backend>(
    b: &B,
    l: usize,
    a: &B::T,
    (q_pre, k_pre): PreNorm<'_, B::T>,
    (mut dq, mut dk, dv): Qkv<B::T>,
    da: &mut B::T,
) -> Result<(), String> {
    let (c, lay) = (&b.model().cfg, &b.model().layers[l]);
    let (n, hi, act) = (b.batch() * c.seq_len, lay.host, B::ACT);
    let (qd, kd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
    b.rope(&mut dq, c.heads, true)?;
    b.rope(&mut dk, c.kv_heads, true)?;
    let (dq, dk) = match (lay.qk_norm, q_pre, k_pre) {
        (Some(i), Some((qp, qr)), Some((kp, kr))) => {
            let (mut dqp, mut dkp) = (b.zeros(&[n, qd], act)?, b.zeros(&[n, kd], act)?);
            b.norm_bwd(i, qp, qr, &dq, &mut dqp)?;
            b.norm_bwd(i + 1, kp, kr, &dk, &mut dkp)?;
            (dqp, dkp)
        }
        _ => (dq, dk),
    };
    if let Some(i) = lay.bias {
        b.bias_bwd(i, &dq)?;
        b.bias_bwd(i + 1, &dk)?;
        b.bias_bwd(i + 2, &dv)?;
    }
    b.linear_bwd(hi + Q, a, &dq, da, false)?;
    b.linear_bwd(hi + K, a, &dk, da, true)?;
    b.linear_bwd(hi + V, a, &dv, da, true)
}

/// What [`mla_project`] keeps: (q_a_proj a, its rstd, its norm) with q_rank; c, rstd, kv_a_norm c.
type MlaSaved<'a, T> = (&'a Option<(T, T, T)>, &'a T, &'a T, &'a T);

/// Backward of [`mla_project`]: da = ∂/∂a from (dq, dk, dv) at the attention's inputs; kr's
/// gradient sums over the heads that share it.
fn mla_project_bwd<B: Backend>(
    b: &B,
    l: usize,
    ml: crate::model::MlaLayer,
    a: &B::T,
    (qa, cc, rstd_c, cn): MlaSaved<'_, B::T>,
    (mut dq, dk, dv): Qkv<B::T>,
    da: &mut B::T,
) -> Result<(), String> {
    let (c, hi, act) = (&b.model().cfg, b.model().layers[l].host, B::ACT);
    let (n, heads, dqk) = (b.batch() * c.seq_len, c.heads, c.head_dim);
    let (r, dr, dvh) = (ml.mla.kv_rank, ml.mla.rope_dim, ml.mla.v_dim);
    let dn = dqk - dr;
    let mut dkr = b.cols(&dk, dqk, dn..dqk, heads)?;
    b.rope(&mut dkr, 1, true)?;
    let mut dkv = b.empty(&[n, heads * (dn + dvh)], act)?;
    b.set_cols(&mut dkv, dn + dvh, 0, &b.cols(&dk, dqk, 0..dn, 1)?, 1)?;
    b.set_cols(&mut dkv, dn + dvh, dn, &dv, 1)?;
    drop((dk, dv));
    let mut dcn = b.empty(&[n, r], act)?;
    b.linear_bwd(hi + KV_B, cn, &dkv, &mut dcn, false)?;
    drop(dkv);
    let mut dc = b.zeros(&[n, r], act)?;
    b.norm_bwd(ml.kv_norm, cc, rstd_c, &dcn, &mut dc)?;
    let mut dkva = b.empty(&[n, r + dr], act)?;
    b.set_cols(&mut dkva, r + dr, 0, &dc, 1)?;
    b.set_cols(&mut dkva, r + dr, r, &dkr, 1)?;
    b.linear_bwd(hi + KV_A, a, &dkva, da, false)?;
    b.rope(&mut dq, heads, true)?;
    match (ml.q_a, qa) {
        (Some(i), Some((qa, rstd, qn))) => {
            let mut dqn = b.empty(&[n, ml.mla.q_rank], act)?;
            b.linear_bwd(hi + Q, qn, &dq, &mut dqn, false)?;
            let mut dqa = b.zeros(&[n, ml.mla.q_rank], act)?;
            b.norm_bwd(i + 1, qa, rstd, &dqn, &mut dqa)?;
            b.linear_bwd(i, a, &dqa, da, true)
        }
        _ => b.linear_bwd(hi + Q, a, &dq, da, true),
    }
}
