//! The decoder's layout — which parameter is which, in the Qwen3-MoE / Mixtral / OLMoE shape —
//! with its MoE components, and its CPU backend: decoder.rs's forward and backward in f32 over
//! the host's layers (layers.rs), the reference the CUDA backend (gpu/model.rs) is tested
//! against. Host weights use the PyTorch `Linear` layout [out, in].

use crate::config::{Mla, ModelConfig, QkNorm};
use crate::cpu::{view, view_mut, Calls, CpuOps};
use crate::decoder::{self, Attn, Backend, Qkv};
use crate::layers::{self as ly, AttnDims, Rope};
use crate::params::{Params, Shard};
use abi_stable::std_types::{RResult, RString};
use pith_plugin_api::abi::{BalanceLossBox, CommScheduleBox, ExpertsBox, OpsRef, RouterBox};
use pith_plugin_api::{DType, Device, Init, ParamSpec, Tensor};
use std::cell::RefCell;
use std::ops::Range;

/// The components of one MoE layer, each with its plugin name.
pub struct MoeComponents {
    pub router: (String, RouterBox),
    pub experts: (String, ExpertsBox),
    /// An always-on expert on every token (`[shared]`), if the config has one.
    pub shared: Option<(String, ExpertsBox)>,
    pub losses: Vec<(String, BalanceLossBox)>,
    pub comm: (String, CommScheduleBox),
}

/// The components of one layer's FFN block: the MoE block's, or in the first
/// `model.dense_layers` the `[dense]` component (an FFN on every token).
pub enum FfnComponents {
    Moe(MoeComponents),
    Dense((String, ExpertsBox)),
}

/// What one micro-batch's forward + backward reports.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOut {
    /// Mean cross-entropy (without the balance losses).
    pub loss: f32,
    /// Each balance-loss plugin's value (coefficient included), summed over layers.
    pub aux: Vec<(String, f32)>,
    /// Per layer, the rows each expert computed (routed and kept: no empty or dropped slots).
    pub expert_counts: Vec<Vec<u32>>,
    /// Per layer, every token's expert ids [N,k] and gate weights [N,k] (row-major).
    pub routing: Vec<(Vec<i32>, Vec<f32>)>,
}

/// Matmul parameter counts and training FLOPs per token (see [`Model::counts`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Counts {
    pub total: usize,
    pub active: usize,
    pub embedding: usize,
    pub flops_per_token: f64,
}

// A layer's host parameters, as offsets from `Layer::host` (declaration order: then q_norm and
// k_norm, or the q/k/v biases, or MLA's norms and q_a_proj, when the model has them; then
// moe_norm). Under MLA, Q is q_proj or q_b_proj and kv_a_proj, kv_b_proj take K's and V's places.
pub(crate) const ATTN_NORM: usize = 0;
pub(crate) const Q: usize = 1;
pub(crate) const K: usize = 2;
pub(crate) const V: usize = 3;
pub(crate) const O: usize = 4;
pub(crate) const KV_A: usize = K;
pub(crate) const KV_B: usize = V;

/// A layer's MLA parameters beyond the five above: kv_a_norm's index, and q_a_proj's (q_a_norm
/// is the next) with `q_rank`.
#[derive(Clone, Copy)]
pub(crate) struct MlaLayer {
    pub(crate) mla: Mla,
    pub(crate) kv_norm: usize,
    pub(crate) q_a: Option<usize>,
}

pub(crate) struct Layer {
    pub(crate) host: usize,
    /// q_norm's index (k_norm's is the next), when `model.qk_norm` is not `none`.
    pub(crate) qk_norm: Option<usize>,
    /// q_proj's bias index (k's and v's are the next two), with `model.qkv_bias`.
    pub(crate) bias: Option<usize>,
    /// o_proj's bias (`model.o_bias`) and the attention sinks [heads] (`model.attn_sinks`).
    pub(crate) o_bias: Option<usize>,
    pub(crate) sinks: Option<usize>,
    pub(crate) mla: Option<MlaLayer>,
    /// The norm before the FFN block (MoE or dense).
    pub(crate) moe_norm: usize,
    pub(crate) ffn: Ffn,
}

/// A layer's FFN block with its parameters.
pub(crate) enum Ffn {
    Moe(Box<MoeLayer>),
    Dense(DenseLayer),
}

/// An MoE block: each component's parameters (their own `params()`) and the components.
pub(crate) struct MoeLayer {
    pub(crate) shared: Range<usize>,
    pub(crate) router: Range<usize>,
    pub(crate) experts: Range<usize>,
    /// Each balance loss's own buffers and accumulators.
    pub(crate) losses: Vec<Range<usize>>,
    pub(crate) c: MoeComponents,
}

/// A dense layer's FFN: the `[dense]` component and its parameters.
pub(crate) struct DenseLayer {
    pub(crate) params: Range<usize>,
    pub(crate) c: (String, ExpertsBox),
}

/// The decoder's layout (which parameter is which) and its MoE components; the CPU pass is
/// below, the CUDA pass in gpu/model.rs.
pub struct Model {
    pub(crate) cfg: ModelConfig,
    pub(crate) rope: Rope,
    pub(crate) embed: usize,
    pub(crate) layers: Vec<Layer>,
    pub(crate) final_norm: usize,
    pub(crate) lm_head: usize,
    /// This rank's slice of every layer's experts.
    pub(crate) ep: Shard,
}

/// A component's result, its error prefixed with who made it.
pub(crate) fn named<T>(r: RResult<T, RString>, who: &str) -> Result<T, String> {
    r.into_result().map_err(|e| format!("{who}: {e}"))
}

impl Model {
    /// Declares every parameter in `params`: `embed.weight`; per layer l
    /// `layers.{l}.attn_norm.weight`, `layers.{l}.attn.{q,k,v,o}_proj.weight`,
    /// `layers.{l}.attn.{q,k}_norm.weight` (of head_dim for `qk_norm = "head"`, of heads·head_dim
    /// and kv_heads·head_dim for `"full"`, absent for `"none"`), `layers.{l}.attn.{q,k,v}_proj.bias`
    /// (with `qkv_bias`; zeros, no weight decay), `layers.{l}.attn.o_proj.bias` [hidden] (with
    /// `o_bias`), `layers.{l}.attn.sinks` [heads] (with `attn_sinks`; both zeros, no weight
    /// decay), `layers.{l}.moe_norm.weight`,
    /// `layers.{l}.moe.router.*`, `layers.{l}.moe.experts.*` and `layers.{l}.moe.balance_loss.{i}.*`
    /// (the components' own `params()`: parameters, buffers and accumulators),
    /// `layers.{l}.moe.shared.*` (the `[shared]` component's, when there is one) — or, for a
    /// dense layer, `layers.{l}.dense.*` (the `[dense]` component's) in place of `moe.*`; then
    /// `final_norm.weight`, `lm_head.weight`. Matrices are Normal(init_std), norm weights Ones
    /// without weight decay. `ffns` has one entry per layer. On an expert-parallel rank (`ep`
    /// of more than one part) the experts' tensors are its slice of each: stacked by expert,
    /// dimension 0 its local experts.
    pub fn new(
        cfg: &ModelConfig,
        params: &mut Params,
        seed: u64,
        ffns: Vec<FfnComponents>,
        ep: Shard,
    ) -> Result<Model, String> {
        let c = cfg;
        if ffns.len() != c.layers {
            let got = ffns.len();
            let want = c.layers;
            return Err(format!("model: {want} layers but {got} sets of FFN components"));
        }
        if c.kv_heads == 0 || !c.heads.is_multiple_of(c.kv_heads) || !c.head_dim.is_multiple_of(2) {
            return Err("model: heads must be a multiple of kv_heads, head_dim even".into());
        }
        let (h, qd, kd) = (c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let std = Init::Normal(c.init_std);
        let mat = |name: &str, shape: &[usize]| ParamSpec::new(name, shape, std, true);
        let norm = |name: &str, n: usize| ParamSpec::new(name, &[n], Init::Ones, false);
        params.defer = true;
        let mut add =
            |prefix: &str, specs: Vec<ParamSpec>, shard: Option<Shard>| params.add_sharded(prefix, specs, seed, shard);
        let embed = add("embed", vec![mat("weight", &[c.vocab, h])], None).start;
        let mut layers = Vec::new();
        let qk = match c.qk_norm {
            QkNorm::Head => Some((c.head_dim, c.head_dim)),
            QkNorm::Full => Some((qd, kd)),
            QkNorm::None => None,
        };
        for (l, ffn) in ffns.into_iter().enumerate() {
            let mut host = match c.mla {
                None => vec![
                    norm("attn_norm.weight", h),
                    mat("attn.q_proj.weight", &[qd, h]),
                    mat("attn.k_proj.weight", &[kd, h]),
                    mat("attn.v_proj.weight", &[kd, h]),
                    mat("attn.o_proj.weight", &[h, qd]),
                ],
                Some(a) => {
                    let (r, dn) = (a.kv_rank, c.head_dim - a.rope_dim);
                    let mut v = vec![
                        norm("attn_norm.weight", h),
                        match a.q_rank {
                            0 => mat("attn.q_proj.weight", &[qd, h]),
                            qr => mat("attn.q_b_proj.weight", &[qd, qr]),
                        },
                        mat("attn.kv_a_proj.weight", &[r + a.rope_dim, h]),
                        mat("attn.kv_b_proj.weight", &[c.heads * (dn + a.v_dim), r]),
                        mat("attn.o_proj.weight", &[h, c.heads * a.v_dim]),
                        norm("attn.kv_a_norm.weight", r),
                    ];
                    if a.q_rank > 0 {
                        v.extend([mat("attn.q_a_proj.weight", &[a.q_rank, h]), norm("attn.q_a_norm.weight", a.q_rank)]);
                    }
                    v
                }
            };
            // Optional tensors after the fixed ones: each at its offset in `host`.
            let mut extra = |on: bool, specs: Vec<ParamSpec>| {
                let at = host.len();
                on.then(|| host.extend(specs)).map(|_| at)
            };
            let zeros = |name: &str, n: usize| ParamSpec::new(name, &[n], Init::Zeros, false);
            let qk_norm = extra(
                qk.is_some() && c.mla.is_none(),
                qk.map_or(vec![], |(qn, kn)| vec![norm("attn.q_norm.weight", qn), norm("attn.k_norm.weight", kn)]),
            );
            let qkv = [zeros("attn.q_proj.bias", qd), zeros("attn.k_proj.bias", kd), zeros("attn.v_proj.bias", kd)];
            let bias = extra(c.qkv_bias, qkv.into());
            let o_bias = extra(c.o_bias, vec![zeros("attn.o_proj.bias", h)]);
            let sinks = extra(c.attn_sinks, vec![zeros("attn.sinks", c.heads)]);
            host.push(norm("moe_norm.weight", h));
            let host = add(&format!("layers.{l}"), host, None);
            let moe_norm = host.end - 1;
            let [qk_norm, bias, o_bias, sinks] = [qk_norm, bias, o_bias, sinks].map(|i| i.map(|i| host.start + i));
            let q_a = |a: Mla| (a.q_rank > 0).then_some(host.start + O + 2);
            let mla = c.mla.map(|a| MlaLayer { mla: a, kv_norm: host.start + O + 1, q_a: q_a(a) });
            let host = host.start;
            let moe = match ffn {
                FfnComponents::Moe(moe) => moe,
                FfnComponents::Dense(c) => {
                    let params = add(&format!("layers.{l}.dense"), c.1.params().into(), None);
                    let ffn = Ffn::Dense(DenseLayer { params, c });
                    layers.push(Layer { host, qk_norm, bias, o_bias, sinks, mla, moe_norm, ffn });
                    continue;
                }
            };
            let router = add(&format!("layers.{l}.moe.router"), moe.router.1.params().into(), None);
            let specs: Vec<ParamSpec> = moe.experts.1.params().into();
            let shard = (ep.parts > 1).then_some(ep);
            if let Some(s) =
                specs.iter().find(|s| shard.is_some() && s.shape.first() != Some(&((c.experts / ep.parts) as u64)))
            {
                return Err(format!(
                    "experts `{}`: `{}` has shape {:?}, but with parallel.ep = {} every experts tensor must be stacked by expert (dimension 0: this rank's {} experts)",
                    moe.experts.0, s.name, s.shape, ep.parts, c.experts / ep.parts
                ));
            }
            let experts = add(&format!("layers.{l}.moe.experts"), specs, shard);
            let losses = (moe.losses.iter().enumerate())
                .map(|(i, (_, b))| add(&format!("layers.{l}.moe.balance_loss.{i}"), b.params().into(), None))
                .collect();
            let specs = moe.shared.as_ref().map_or(Vec::new(), |s| s.1.params().into_vec());
            let shared = add(&format!("layers.{l}.moe.shared"), specs, None);
            let ffn = Ffn::Moe(Box::new(MoeLayer { shared, router, experts, losses, c: moe }));
            layers.push(Layer { host, qk_norm, bias, o_bias, sinks, mla, moe_norm, ffn });
        }
        let final_norm = add("final_norm", vec![norm("weight", h)], None).start;
        let lm_head = add("lm_head", vec![mat("weight", &[c.vocab, h])], None).start;
        params.materialize();
        let rope = Rope::of(c);
        Ok(Model { cfg: cfg.clone(), rope, embed, layers, final_norm, lm_head, ep })
    }

    /// Every parameter of layer `l` (attention, norms, router, experts, shared expert, balance
    /// losses' buffers), as indices of the parameter list.
    pub(crate) fn layer_params(&self, l: usize) -> Vec<usize> {
        let lay = &self.layers[l];
        let mut ids: Vec<usize> = (lay.host..=lay.host + O).chain([lay.moe_norm]).collect();
        ids.extend(lay.qk_norm.map(|q| [q, q + 1]).into_iter().flatten());
        ids.extend(lay.bias.map(|b| [b, b + 1, b + 2]).into_iter().flatten());
        ids.extend(lay.mla.map(|m| m.kv_norm));
        ids.extend(lay.mla.and_then(|m| m.q_a).map(|q| [q, q + 1]).into_iter().flatten());
        match &lay.ffn {
            Ffn::Moe(m) => {
                ids.extend(m.shared.clone().chain(m.router.clone()).chain(m.experts.clone()));
                ids.extend(m.losses.iter().flat_map(|r| r.clone()));
            }
            Ffn::Dense(d) => ids.extend(d.params.clone()),
        }
        ids
    }

    /// Balance losses per MoE layer (every MoE layer has the same).
    pub(crate) fn losses_per_layer(&self) -> usize {
        let moe = self.layers.iter().find_map(|l| match &l.ffn {
            Ffn::Moe(m) => Some(m.c.losses.len()),
            Ffn::Dense(_) => None,
        });
        moe.unwrap_or(0)
    }

    /// Matmul parameters (embedding lookup and norms excluded; experts, the shared expert
    /// (`shared_ffn`, every MoE layer) and the dense layers' FFN (`dense_ffn`) counted as SwiGLU,
    /// 3·hidden·ffn each): total, and active per token with `top_k` experts. Training FLOPs per
    /// token = 6·active + 3·layers·heads·(head_dim + value head)·seq_len (causal attention: q·kᵀ
    /// and p·v are 2·2·T·Hq·D forward per token without the mask, half with it, ×3 with
    /// backward), the formula of ../shared/bench; a sliding-window layer counts its window in
    /// place of seq_len ([`ModelConfig::attention_span`]).
    pub fn counts(cfg: &ModelConfig, top_k: usize, (shared_ffn, dense_ffn): (usize, usize)) -> Counts {
        let (c, h, vd) = (cfg, cfg.hidden, cfg.rope_v_dims().1);
        let attention = c.attention_params() as usize;
        let (moe, dense) = (c.layers - c.dense_layers, c.dense_layers);
        let (expert, embedding) = (3 * h * c.expert_ffn, c.vocab * h);
        let always = moe * (h * c.experts + 3 * h * shared_ffn) + dense * 3 * h * dense_ffn;
        let total = c.layers * attention + always + moe * c.experts * expert + embedding;
        let active = c.layers * attention + always + moe * top_k * expert + embedding;
        // q·kᵀ over head_dim and p·v over the value head: 3·(d + dv) per head, layer, position.
        let attn = 3.0 * (c.heads * (c.head_dim + vd)) as f64 * c.attention_span();
        Counts { total, active, embedding, flops_per_token: 6.0 * active as f64 + attn }
    }

    /// Forward + backward on one micro-batch of `batch` sequences of seq_len tokens (row-major
    /// [batch, seq_len]). Accumulates grad_scale·∂(loss)/∂w into the params' grads, where the
    /// loss is the mean cross-entropy plus every balance loss. Frees plugin allocations
    /// (`ops.reset()`) before it returns.
    pub fn forward_backward(
        &self,
        ops: &CpuOps,
        params: &mut Params,
        tokens: &[u32],
        targets: &[u32],
        batch: usize,
        grad_scale: f32,
    ) -> Result<StepOut, String> {
        self.check_tokens(tokens, targets, batch)?;
        // Take the grads out, so the weights can be read while the grads are written.
        let g = params.list.iter_mut().map(|p| std::mem::take(&mut p.g)).collect();
        let pass = CpuPass { m: self, ops, p: params, g: RefCell::new(g), batch };
        let out = decoder::forward_backward(&pass, tokens, targets, grad_scale, true);
        let g = pass.g.into_inner();
        params.list.iter_mut().zip(g).for_each(|(p, g)| p.g = g);
        ops.reset();
        out
    }

    /// Forward only: the mean cross-entropy (for eval). Frees plugin allocations before it returns.
    pub fn loss(
        &self,
        ops: &CpuOps,
        params: &Params,
        tokens: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<f32, String> {
        self.check_tokens(tokens, targets, batch)?;
        let loss = decoder::loss(&CpuPass::new(self, ops, params, batch), tokens, targets);
        ops.reset();
        loss
    }

    /// Forward only: the logits [batch·seq_len, vocab] of `tokens` (row-major [batch, seq_len]).
    /// Frees plugin allocations before it returns.
    pub fn logits(&self, ops: &CpuOps, params: &Params, tokens: &[u32], batch: usize) -> Result<Vec<f32>, String> {
        self.check_tokens(tokens, tokens, batch)?;
        let logits = decoder::logits(&CpuPass::new(self, ops, params, batch), tokens);
        ops.reset();
        logits
    }

    pub(crate) fn check_tokens(&self, tokens: &[u32], targets: &[u32], batch: usize) -> Result<(), String> {
        let (n, v) = (batch * self.cfg.seq_len, self.cfg.vocab);
        if tokens.len() != n || targets.len() != n {
            let got = (tokens.len(), targets.len());
            return Err(format!("expected {n} tokens and targets (batch·seq_len), got {got:?}"));
        }
        for (what, ids) in [("token", tokens), ("target", targets)] {
            if let Some(i) = ids.iter().position(|&t| t as usize >= v) {
                let id = ids[i];
                let msg = format!("{what} id {id} at position {i} is out of range for vocab {v}");
                return Err(msg);
            }
        }
        Ok(())
    }
}

/// One micro-batch's pass on the CPU: decoder.rs's [`Backend`] in f32 over the host's layers
/// (layers.rs). The gradients are taken out of `Params` for the pass, so weights can be read
/// while gradients are written.
struct CpuPass<'a> {
    m: &'a Model,
    ops: &'a CpuOps,
    p: &'a Params,
    g: RefCell<Vec<Vec<f32>>>,
    batch: usize,
}

impl<'a> CpuPass<'a> {
    /// A forward-only pass (no gradients).
    fn new(m: &'a Model, ops: &'a CpuOps, p: &'a Params, batch: usize) -> CpuPass<'a> {
        CpuPass { m, ops, p, g: RefCell::default(), batch }
    }
    fn w(&self, i: usize) -> &'a [f32] {
        &self.p.list[i].w
    }
    /// (n, k, m) of x [n,k] · wᵀ for the matrix parameter `i` (w [m,k]).
    fn nkm(&self, i: usize, x: &[f32]) -> (usize, usize, usize) {
        let s = &self.p.list[i].spec.shape;
        (x.len() / s[1] as usize, s[1] as usize, s[0] as usize)
    }
}

fn add(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
}

impl Backend for CpuPass<'_> {
    type T = Vec<f32>;
    type Ids = [u32];
    const DEVICE: Device = Device::Cpu;
    const ACT: DType = DType::F32;
    fn model(&self) -> &Model {
        self.m
    }
    fn batch(&self) -> usize {
        self.batch
    }
    fn ops(&self) -> OpsRef<'_> {
        self.ops.ops()
    }
    fn calls(&self) -> &Calls {
        self.ops.calls()
    }
    fn view(&self, t: &Vec<f32>, dims: &[usize]) -> Tensor {
        view(t, dims)
    }
    fn empty(&self, dims: &[usize], dtype: DType) -> Result<Vec<f32>, String> {
        self.zeros(dims, dtype)
    }
    fn zeros(&self, dims: &[usize], dtype: DType) -> Result<Vec<f32>, String> {
        debug_assert_eq!(dtype, DType::F32, "the CPU pass is f32");
        Ok(vec![0.0; dims.iter().product()])
    }
    fn weights(&self, r: Range<usize>) -> Vec<Tensor> {
        self.p.weights(r)
    }
    fn grads(&self, r: Range<usize>) -> Result<Vec<Tensor>, String> {
        let shape = |i: usize| match self.p.list[i].trained() {
            true => self.p.weights(i..i + 1)[0].dims(),
            false => vec![0],
        };
        let mut g = self.g.borrow_mut();
        Ok(r.map(|i| view_mut(&mut g[i], &shape(i))).collect())
    }
    fn host_i32(&self, t: &Tensor) -> Result<Vec<i32>, String> {
        Ok(t.i32s().to_vec())
    }
    fn host_f32(&self, t: &Tensor) -> Result<Vec<f32>, String> {
        Ok(t.f32s().to_vec())
    }
    fn finite(&self, t: &Vec<f32>, who: &str) -> Result<(), String> {
        decoder::finite(t, who)
    }
    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, String> {
        let mut x = vec![0.0; ids.len() * self.m.cfg.hidden];
        ly::embedding_fwd(self.w(self.m.embed), ids, self.m.cfg.hidden, &mut x);
        Ok(x)
    }
    fn embed_bwd(&self, ids: &[u32], dx: &Vec<f32>) -> Result<(), String> {
        ly::embedding_bwd(&mut self.g.borrow_mut()[self.m.embed], ids, dx, self.m.cfg.hidden);
        Ok(())
    }
    fn norm(&self, i: usize, x: &Vec<f32>) -> Result<(Vec<f32>, Vec<f32>), String> {
        let (mut y, mut rstd) = (vec![0.0; x.len()], vec![0.0; x.len() / self.w(i).len()]);
        ly::rmsnorm_fwd(x, self.w(i), self.m.cfg.norm_eps, &mut y, &mut rstd);
        Ok((y, rstd))
    }
    fn norm_bwd(
        &self,
        i: usize,
        x: &Vec<f32>,
        rstd: &Vec<f32>,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
    ) -> Result<(), String> {
        let mut d = vec![0.0; x.len()];
        ly::rmsnorm_bwd(x, self.w(i), rstd, dy, &mut d, &mut self.g.borrow_mut()[i]);
        add(dx, &d);
        Ok(())
    }
    fn linear(&self, i: usize, x: &Vec<f32>) -> Result<Vec<f32>, String> {
        let (n, k, m) = self.nkm(i, x);
        let mut y = vec![0.0; n * m];
        ly::linear_fwd(x, self.w(i), n, k, m, &mut y);
        Ok(y)
    }
    fn linear_bwd(&self, i: usize, x: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>, acc: bool) -> Result<(), String> {
        ly::linear_bwd(x, self.w(i), dy, self.nkm(i, x), dx, acc, &mut self.g.borrow_mut()[i]);
        Ok(())
    }
    fn bias(&self, i: usize, y: &mut Vec<f32>) -> Result<(), String> {
        ly::bias_fwd(y, self.w(i));
        Ok(())
    }
    fn bias_bwd(&self, i: usize, dy: &Vec<f32>) -> Result<(), String> {
        ly::bias_bwd(dy, &mut self.g.borrow_mut()[i]);
        Ok(())
    }
    fn rope(&self, x: &mut Vec<f32>, heads: usize, inverse: bool) -> Result<(), String> {
        let (t, rows) = (self.m.cfg.seq_len, self.batch * self.m.cfg.seq_len);
        let width = x.len() / (rows * heads);
        match inverse {
            false => self.m.rope.forward(x, t, heads, width),
            true => self.m.rope.backward(x, t, heads, width),
        }
        Ok(())
    }
    fn cols(&self, x: &Vec<f32>, width: usize, r: Range<usize>, sum: usize) -> Result<Vec<f32>, String> {
        let mut out = vec![0.0; x.len() / width / sum * r.len()];
        for (o, rows) in out.chunks_mut(r.len().max(1)).zip(x.chunks(width * sum)) {
            rows.chunks(width).for_each(|row| add(o, &row[r.clone()]));
        }
        Ok(out)
    }
    fn set_cols(
        &self,
        dst: &mut Vec<f32>,
        width: usize,
        at: usize,
        src: &Vec<f32>,
        repeat: usize,
    ) -> Result<(), String> {
        let w = src.len() * repeat * width / dst.len();
        for (rows, s) in dst.chunks_mut(width * repeat).zip(src.chunks(w.max(1))) {
            rows.chunks_mut(width).for_each(|row| row[at..at + w].copy_from_slice(s));
        }
        Ok(())
    }
    fn attention(&self, l: usize, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>) -> Result<(Vec<f32>, Vec<f32>), String> {
        let sinks = self.m.layers[l].sinks.map_or(&[][..], |i| self.w(i));
        Ok(ly::attention_fwd(q, k, v, sinks, AttnDims::of(&self.m.cfg, self.batch, l)))
    }
    fn attention_bwd(&self, l: usize, s: &Attn<'_, Vec<f32>>, dout: &Vec<f32>) -> Result<Qkv<Vec<f32>>, String> {
        let si = self.m.layers[l].sinks;
        let sinks = si.map_or(&[][..], |i| self.w(i));
        let a = AttnDims::of(&self.m.cfg, self.batch, l);
        let (dq, dk, dv, ds) = ly::attention_bwd((s.q, s.k, s.v, sinks), s.out, s.lse, dout, a);
        if let Some(i) = si {
            add(&mut self.g.borrow_mut()[i], &ds);
        }
        Ok((dq, dk, dv))
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Vec<f32>, String> {
        Ok(a.f32s().iter().zip(b.f32s()).map(|(a, b)| a + b).collect())
    }
    fn add_into(&self, acc: &mut Vec<f32>, x: &Tensor) -> Result<(), String> {
        add(acc, x.f32s());
        Ok(())
    }
    fn to_act(&self, x: &Vec<f32>, _: &[usize]) -> Result<Vec<f32>, String> {
        Ok(x.clone())
    }
    fn cross_entropy(&self, logits: &mut Vec<f32>, targets: &[u32], scale: Option<f32>) -> Result<Vec<f32>, String> {
        let v = self.m.cfg.vocab;
        let Some(scale) = scale else { return Ok(vec![ly::cross_entropy(logits, targets, v, 1.0, None)]) };
        let mut d = vec![0.0; logits.len()];
        let loss = ly::cross_entropy(logits, targets, v, scale, Some(&mut d));
        *logits = d;
        Ok(vec![loss])
    }
    fn mean(&self, losses: &Vec<f32>) -> Result<f32, String> {
        Ok(losses.iter().sum::<f32>() / losses.len() as f32)
    }
    fn mark(&self) -> usize {
        0
    }
    fn release_to(&self, _: usize) {}
    fn written(&self, _: &[usize]) -> Result<(), String> {
        Ok(())
    }
    fn finish(&self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use pith_plugin_api::{abi::Component, Kind, ModelDims};

    /// vocab 11, hidden 8, 2 layers, 2 heads, 1 kv head, head_dim 4, seq 5, 4 experts of ffn 6.
    fn cfg() -> ModelConfig {
        let text = "vocab = 11\nhidden = 8\nlayers = 2\nheads = 2\nkv_heads = 1\nhead_dim = 4\n\
                    seq_len = 5\nexperts = 4\nexpert_ffn = 6";
        toml::from_str(text).unwrap()
    }

    /// A model with the std pack's topk-softmax (top-2), swiglu, switch-aux and z-loss (both
    /// with `coef`) and local in every layer, and a shared-swiglu of FFN `shared` (0: none).
    fn model(c: &ModelConfig, seed: u64, coef: f32, shared: usize) -> (Model, Params) {
        model_with(c, seed, coef, "top_k = 2", shared, Shard::WHOLE)
    }

    /// An expert-parallel rank's experts are its slice of the whole model's (the same initial
    /// values), marked as a shard; everything else is the whole model's.
    #[test]
    fn an_expert_parallel_rank_holds_its_slice_of_the_experts() {
        let c = cfg();
        let (m, whole) = model(&c, 5, 0.01, 0);
        let half = Shard { part: 1, parts: 2 };
        let (ms, part) = model_with(&c, 5, 0.01, "top_k = 2", 0, half);
        // Experts built for every expert do not fit a rank holding half of them.
        let all = std_components(&c, 0.01, "top_k = 2", 0, Shard::WHOLE);
        let e = Model::new(&c, &mut Params::default(), 5, all, half).err().unwrap();
        assert!(
            e.contains("experts `swiglu`")
                && e.contains("stacked by expert")
                && e.contains(&format!("this rank's {} experts", c.experts / 2)),
            "{e}"
        );
        assert_eq!(ms.ep, Shard { part: 1, parts: 2 });
        for (w, p) in whole.list.iter().zip(&part.list) {
            let i = whole.list.iter().position(|x| x.name == w.name).unwrap();
            let experts = m.layers.iter().any(|l| matches!(&l.ffn, Ffn::Moe(m) if m.experts.contains(&i)));
            if experts {
                assert_eq!(p.full_shape(), w.shape(), "{}", w.name);
                assert_eq!(p.shard, Some(Shard { part: 1, parts: 2 }));
                assert_eq!(p.w, w.w[w.w.len() / 2..], "{}: the second half", w.name);
                assert_eq!(p.group(), pith_plugin_api::Group::DataParallel);
            } else {
                assert_eq!((p.shard, &p.w, p.group()), (None, &w.w, pith_plugin_api::Group::World), "{}", w.name);
            }
        }
    }

    /// [`model`] with the router's TOML keys `router`.
    /// The gradient sum of a data-parallel step (gpu/model.rs) covers every parameter exactly
    /// once: each layer's own, then embed, final_norm and lm_head.
    #[test]
    fn layer_params_partition_the_parameters() {
        let gqa = |qk_norm, qkv_bias| ModelConfig { qk_norm, qkv_bias, ..cfg() };
        for c in [
            gqa(QkNorm::Head, false),
            gqa(QkNorm::None, true),
            mla(0),
            mla(3),
            ModelConfig { dense_layers: 1, ..cfg() },
        ] {
            let (m, params) = model(&c, 1, 0.01, 16);
            let qk_norm = (c.qk_norm, c.mla);
            let mut ids: Vec<usize> = (0..m.layers.len()).flat_map(|l| m.layer_params(l)).collect();
            ids.extend([m.embed, m.final_norm, m.lm_head]);
            ids.sort();
            assert_eq!(ids, (0..params.list.len()).collect::<Vec<_>>(), "{qk_norm:?}");
        }
    }

    fn model_with(c: &ModelConfig, seed: u64, coef: f32, router: &str, shared: usize, ep: Shard) -> (Model, Params) {
        let mut params = Params::default();
        let model = Model::new(c, &mut params, seed, std_components(c, coef, router, shared, ep), ep);
        (model.unwrap(), params)
    }

    /// Every layer's std components, built for expert-parallel slice `ep`; the first
    /// `dense_layers` a shared-swiglu of FFN 7.
    fn std_components(c: &ModelConfig, coef: f32, router: &str, shared: usize, ep: Shard) -> Vec<FfnComponents> {
        let m = pith_std::pith_root_module();
        let make = |kind, name: &str, toml: &str, l: usize| {
            let (local, all) = (c.experts / ep.parts, ModelDims::new(c.hidden, c.experts, c.expert_ffn, l, c.layers));
            let dims = ModelDims { first_expert: (ep.part * local) as u32, local_experts: local as u32, ..all };
            let dims = dims.for_kind(kind);
            (m.create())(kind, name.into(), toml.into(), dims).unwrap()
        };
        let layer = |l| {
            if l < c.dense_layers {
                let Component::Shared(s) = make(Kind::Shared, "shared-swiglu", "ffn = 7", l) else { unreachable!() };
                return FfnComponents::Dense(("shared-swiglu".into(), s));
            }
            let coef = format!("coef = {coef}");
            let loss = |name: &str| match make(Kind::BalanceLoss, name, &coef, l) {
                Component::BalanceLoss(b) => (name.to_string(), b),
                _ => unreachable!(),
            };
            let r = make(Kind::Router, "topk-softmax", router, l);
            let e = make(Kind::Experts, "swiglu", "", l);
            let cm = make(Kind::CommSchedule, "local", "", l);
            let (Component::Router(r), Component::Experts(e), Component::CommSchedule(cm)) = (r, e, cm) else {
                unreachable!()
            };
            let (router, experts, comm) = (("topk-softmax".into(), r), ("swiglu".into(), e), ("local".into(), cm));
            let losses = vec![loss("switch-aux"), loss("z-loss")];
            let shared =
                (shared > 0).then(|| match make(Kind::Shared, "shared-swiglu", &format!("ffn = {shared}"), l) {
                    Component::Shared(s) => ("shared-swiglu".to_string(), s),
                    _ => unreachable!(),
                });
            FfnComponents::Moe(MoeComponents { router, experts, shared, losses, comm })
        };
        (0..c.layers).map(layer).collect()
    }

    /// `batch` sequences of random (tokens, targets).
    fn data(c: &ModelConfig, batch: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
        let mut r = Rng::new(seed);
        let mut ids = || (0..batch * c.seq_len).map(|_| r.below(c.vocab) as u32).collect();
        (ids(), ids())
    }

    /// Whole-model gradient check at a tiny size, with a shared expert, switch-aux and z-loss
    /// (coef 0.1), every parameter re-drawn at O(1) scale (matrices N(0, 0.5²), norm weights
    /// 1 + N(0, 0.2²)) so every path carries a real gradient. For each parameter tensor, its
    /// largest-|grad| coordinate and one random coordinate: central differences (eps 1e-3; at
    /// 1e-2 the O(1) q/k biases' curvature alone gives 1–4% errors, at 3e-3 MLA's kv_a_proj 1%;
    /// f32 noise is ~5e-5 at 1e-3) of the total loss (CE + balance losses, f32 forward summed
    /// in f64) must match backward within 1e-3 + 1e-2·|grad|. A coordinate whose
    /// perturbation changes any token's chosen experts (a top-k flip: the loss jumps) is skipped;
    /// at most 6 may be. Run for each family's attention and router: per-head
    /// qk-norm (Qwen3-MoE), full-projection qk-norm with un-renormalised gates (OLMoE), no
    /// qk-norm (Mixtral: 4 fewer tensors), q/k/v biases without qk-norm (Qwen2-MoE), and MLA
    /// with q_proj (DeepSeek-V2-Lite) and with the compressed q (V2, V3), also after a dense layer,
    /// and GPT-OSS's attention (biases on q/k/v/o, sinks, a sliding window on one layer).
    #[test]
    fn whole_model_gradient_matches_finite_differences() {
        let gqa = |qk_norm, qkv_bias| ModelConfig { qk_norm, qkv_bias, ..cfg() };
        gradient_check(gqa(QkNorm::Head, false), "top_k = 2", 33);
        gradient_check(gqa(QkNorm::Full, false), "top_k = 2\nnormalize = false", 33);
        gradient_check(gqa(QkNorm::None, false), "top_k = 2", 29);
        gradient_check(gqa(QkNorm::None, true), "top_k = 2\nnormalize = false", 35);
        gradient_check(mla(0), "top_k = 2\nnormalize = false", 31);
        gradient_check(mla(3), "top_k = 2", 35);
        // DeepSeek's first layer dense: attention, norms and a dense FFN (3 tensors) in layer 0.
        gradient_check(ModelConfig { dense_layers: 1, ..cfg() }, "top_k = 2", 29);
        // GPT-OSS's attention: q/k/v/o biases, sinks, a window of 3 keys in layer 0 only.
        let gpt_oss = ModelConfig {
            o_bias: true,
            attn_sinks: true,
            sliding_window: 3,
            window_layers: Some(vec![0]),
            ..gqa(QkNorm::None, true)
        };
        gradient_check(gpt_oss, "top_k = 2", 39);
    }

    /// [`cfg`] with MLA: 2 heads of q·k size 6 (4 rotated), values of 3, kv_rank 5, q_rank `q_rank`
    /// (with it, interleaved RoPE pairs as DeepSeek lays them out).
    fn mla(q_rank: usize) -> ModelConfig {
        let mla = Some(crate::config::Mla { kv_rank: 5, q_rank, rope_dim: 4, v_dim: 3 });
        ModelConfig { qk_norm: QkNorm::None, kv_heads: 2, head_dim: 6, mla, rope_interleaved: q_rank > 0, ..cfg() }
    }

    fn gradient_check(c: ModelConfig, router: &str, tensors: usize) {
        let (qk_norm, qkv_bias) = (c.qk_norm, c.qkv_bias);
        let ((model, mut params), ops) = (model_with(&c, 3, 0.1, router, 5, Shard::WHOLE), CpuOps::default());
        assert_eq!(params.list.len(), tensors);
        if qk_norm == QkNorm::Full {
            let q = params.list.iter().find(|p| p.name == "layers.0.attn.q_norm.weight").unwrap();
            assert_eq!(q.w.len(), c.heads * c.head_dim);
        }
        let mut rng = Rng::new(5);
        for p in &mut params.list {
            let (base, std) = if p.name.ends_with("norm.weight") { (1.0, 0.2) } else { (0.0, 0.5) };
            p.w.iter_mut().for_each(|w| *w = base + std * rng.normal());
        }
        let (x, y) = data(&c, 2, 6);
        let run = |params: &mut Params, scale| {
            let o = model.forward_backward(&ops, params, &x, &y, 2, scale).unwrap();
            let total = o.loss as f64 + o.aux.iter().map(|a| a.1 as f64).sum::<f64>();
            (total, o)
        };
        let (_, out) = run(&mut params, 1.0);
        assert!(out.aux.iter().all(|a| a.1 > 1e-3), "balance losses take part: {:?}", out.aux);
        // Every token's chosen experts: a perturbation that changes any of them is a top-k flip.
        let ids = |o: &StepOut| o.routing.iter().map(|r| r.0.clone()).collect::<Vec<_>>();
        let grads: Vec<Vec<f32>> = params.list.iter().map(|p| p.g.clone()).collect();
        let (eps, mut checked, mut skipped) = (1e-3f32, 0, Vec::new());
        for (i, g) in grads.iter().enumerate() {
            let big = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()));
            for j in [big.unwrap(), rng.below(g.len())] {
                let mut at = |delta: f32| {
                    let w0 = params.list[i].w[j];
                    params.list[i].w[j] = w0 + delta;
                    let (total, o) = run(&mut params, 0.0);
                    params.list[i].w[j] = w0;
                    (total, ids(&o))
                };
                let ((up, cu), (down, cd), name) = (at(eps), at(-eps), &params.list[i].name);
                if cu != ids(&out) || cd != ids(&out) {
                    skipped.push(name.clone());
                    continue;
                }
                let (fd, an) = ((up - down) / (2.0 * eps as f64), g[j] as f64);
                let msg = format!("{qk_norm:?} {:?} {name}[{j}]: finite difference {fd} vs backward {an}", c.mla);
                assert!((fd - an).abs() <= 1e-3 + 1e-2 * an.abs(), "{msg}");
                checked += 1;
            }
        }
        let msg = format!("{qk_norm:?} bias {qkv_bias} {:?}: checked {checked}, skipped {skipped:?}", c.mla);
        assert!(skipped.len() <= 6 && checked >= 2 * tensors - 6, "{msg}");
    }

    /// Default init: the first loss is ln(vocab) ± 0.05; eval's loss is the same number.
    #[test]
    fn initial_loss_is_ln_vocab_and_eval_agrees() {
        let c = ModelConfig { vocab: 64, hidden: 32, seq_len: 16, ..cfg() };
        let ((model, mut params), ops) = (model(&c, 1, 0.01, 0), CpuOps::default());
        let (x, y) = data(&c, 3, 2);
        let out = model.forward_backward(&ops, &mut params, &x, &y, 3, 1.0).unwrap();
        assert!((out.loss - 64f32.ln()).abs() < 0.05, "initial loss {} vs ln 64", out.loss);
        assert_eq!(model.loss(&ops, &params, &x, &y, 3).unwrap(), out.loss);
        let routed: Vec<u32> = out.expert_counts.iter().map(|c| c.iter().sum()).collect();
        assert_eq!(routed, [96, 96]); // 3·16 tokens × top-2, per layer
        let names: Vec<&str> = out.aux.iter().map(|a| a.0.as_str()).collect();
        assert_eq!(names, ["switch-aux", "z-loss"]);
        let n = Model::counts(&c, 2, (0, 0));
        let (dense, expert, head) = (2 * 32 * 8 + 2 * 32 * 4 + 32 * 4, 3 * 32 * 6, 64 * 32);
        assert_eq!(n.total, 2 * (dense + 4 * expert) + head);
        assert_eq!(n.active, 2 * (dense + 2 * expert) + head);
    }

    /// Runs from zeroed grads give bitwise-identical grads, loss, aux and counts, on 1 or 3
    /// threads (40 sequences: the row reductions span several chunks).
    #[test]
    fn forward_backward_is_deterministic() {
        let c = cfg();
        let ((model, mut params), ops) = (model(&c, 4, 0.01, 5), CpuOps::default());
        let (x, y) = data(&c, 40, 6);
        let mut run = |threads: usize| {
            params.zero_grads();
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let out = pool.install(|| model.forward_backward(&ops, &mut params, &x, &y, 40, 0.5));
            let g = params.list.iter().flat_map(|p| p.g.iter().map(|g| g.to_bits()));
            (out.unwrap(), g.collect::<Vec<u32>>())
        };
        let (a, b, c) = (run(3), run(3), run(1));
        assert!(a.1.iter().any(|&g| g != 0));
        assert_eq!(a, b);
        assert_eq!(a, c);
    }

    #[test]
    fn bad_tokens_and_non_finite_values_are_named() {
        let c = cfg();
        let ((model, mut params), ops) = (model(&c, 4, 0.01, 0), CpuOps::default());
        let (mut x, y) = data(&c, 1, 6);
        x[3] = 11;
        let e = model.forward_backward(&ops, &mut params, &x, &y, 1, 1.0).unwrap_err();
        assert_eq!(e, "token id 11 at position 3 is out of range for vocab 11");
        x[3] = 0;
        let name = "layers.1.moe.experts.w_down";
        let p = params.list.iter_mut().find(|p| p.name == name).unwrap();
        p.w.iter_mut().for_each(|w| *w = f32::NAN);
        let e = model.forward_backward(&ops, &mut params, &x, &y, 1, 1.0).unwrap_err();
        let want = "non-finite values first appeared in the output of layer 1 experts `swiglu`";
        assert_eq!(e, want);
        assert!(params.list.iter().all(|p| p.g.len() == p.w.len()), "grads put back");
    }
}
