//! The decoder of model.rs on CUDA: the same layout, components and order of operations, with
//! bf16 activations, fp32 master weights (bf16 working copies for the GEMMs) and fp32 gradients.
//! The residual stream and its gradient stay fp32, as under PyTorch autocast.
//!
//! Per layer (T tokens): x f32 → a = attn_norm(x) bf16 → q,k,v = a·Wᵀ → qk-norm → RoPE →
//! flash attention → o_proj → h = x + o (f32) → m = moe_norm(h) bf16 → router, balance losses,
//! dispatch, experts, combine (plugins, through GpuOps) → x' = h + combine.
//! With a `[shared]` component its output on m is added to x' as on the CPU.

use super::nccl::Nccl;
use super::ops::GpuOps;
use super::{src, DTensor, Gpu};
use crate::config::QkNorm;
use crate::model::{named, Model, StepOut, ATTN_NORM, K, O, Q, V};
use crate::parallel::Parallel;
use crate::params::Params;
use abi_stable::std_types::RSlice;
use pith_plugin_api::{Arg, DType, Device, Dispatched, ExpertsOut, RouterOut, Tensor};

/// One declared tensor on the device. `Role::Param`: fp32 master `w`, bf16 working copy `w16`,
/// fp32 gradient `g`, optimizer state. `Role::Buffer` / `Role::Accumulator`: `w` only, fp32,
/// passed to components in place of the working copy; `w16` and `g` are zero-numel, no state.
pub struct GpuParam {
    pub role: pith_plugin_api::Role,
    pub w: DTensor,
    pub w16: DTensor,
    pub g: DTensor,
    pub state: Vec<DTensor>,
    /// The ranks its gradient is summed over (`Param::group`).
    pub group: pith_plugin_api::Group,
    /// `shard_optimizer`: its owner's index in `group`. The gradient is summed onto the owner,
    /// which alone keeps the f32 master (`w` is empty elsewhere) and sends the bf16 copy back.
    pub root: Option<usize>,
}

impl GpuParam {
    pub fn is_param(&self) -> bool {
        self.role == pith_plugin_api::Role::Param
    }
    /// What components get for this tensor: the bf16 copy of a parameter, a buffer's f32 self.
    pub fn working(&self) -> Tensor {
        if self.is_param() {
            self.w16.t
        } else {
            self.w.t
        }
    }
}

/// Every parameter, buffer and accumulator of `Params`, in the same order.
pub struct GpuParams {
    pub list: Vec<GpuParam>,
}

impl GpuParams {
    /// Copy weights, buffers, accumulators and optimizer state from the host (after init or a
    /// checkpoint load). A tensor another rank steps (`Param::owner`) keeps no f32 master here.
    pub fn upload(gpu: &Gpu, params: &Params, par: &Parallel) -> Result<GpuParams, String> {
        let mut list = Vec::new();
        for p in &params.list {
            let shape: Vec<usize> = p.spec.shape.iter().map(|&d| d as usize).collect();
            let (role, group) = (p.spec.role, p.group());
            let root = p.owner.map(|o| par.members(group).iter().position(|&r| r == o).unwrap_or(0));
            let w = gpu.upload(&p.w, &shape, DType::F32)?;
            if role != pith_plugin_api::Role::Param {
                let (w16, g) = (gpu.tensor(&[0], DType::BF16)?, gpu.tensor(&[0], DType::F32)?);
                list.push(GpuParam { role, w, w16, g, state: Vec::new(), group, root });
                continue;
            }
            let w16 = gpu.tensor(&shape, DType::BF16)?;
            gpu.cast(&w, &w16)?;
            let w = if p.steps_on(par.rank) { w } else { gpu.tensor(&[0], DType::F32)? };
            let g = gpu.zeros(&shape, DType::F32)?;
            let state = p.state.iter().map(|(_, s)| gpu.upload(s, &shape, DType::F32)).collect::<Result<_, _>>()?;
            list.push(GpuParam { role, w, w16, g, state, group, root });
        }
        if params.list.iter().any(|p| !p.steps_on(par.rank)) {
            gpu.pool.release_cached()?; // the masters other ranks keep: give their memory back
        }
        Ok(GpuParams { list })
    }
    /// Copy weights, buffers, accumulators and optimizer state back to the host (for
    /// checkpoints and export).
    /// Tensors another rank steps are left as they are (`from_owners` brings them).
    pub fn download(&self, gpu: &Gpu, params: &mut Params) -> Result<(), String> {
        for (d, p) in self.list.iter().zip(&mut params.list).filter(|(d, p)| d.w.numel() == p.spec.numel()) {
            p.w.resize(d.w.numel(), 0.0);
            gpu.download(&d.w, &mut p.w)?;
            for (s, (_, hs)) in d.state.iter().zip(&mut p.state) {
                hs.resize(s.numel(), 0.0);
                gpu.download(s, hs)?;
            }
        }
        Ok(())
    }
    fn params(&self) -> impl Iterator<Item = &GpuParam> {
        self.list.iter().filter(|p| p.is_param())
    }
    /// The bf16 copies follow the fp32 masters (after an optimizer step that did not write them).
    pub fn refresh_bf16(&self, gpu: &Gpu) -> Result<(), String> {
        self.params().filter(|p| p.w.numel() > 0).try_for_each(|p| gpu.cast(&p.w, &p.w16))
    }
    pub fn zero_grads(&self, gpu: &Gpu) -> Result<(), String> {
        self.params().try_for_each(|p| gpu.zero(&p.g))
    }
    /// Zero every `Role::Accumulator` (before each optimizer step's first micro-batch).
    pub fn zero_accumulators(&self, gpu: &Gpu) -> Result<(), String> {
        let mut acc = self.list.iter().filter(|p| p.role == pith_plugin_api::Role::Accumulator);
        acc.try_for_each(|p| gpu.zero(&p.w))
    }
    /// Each gradient's squared L2 norm, indexed like `list` (0 for buffers and accumulators; one
    /// read back for all of them).
    pub fn grad_sumsq(&self, gpu: &Gpu) -> Result<Vec<f32>, String> {
        let out = gpu.zeros(&[self.list.len()], DType::F32)?;
        for (i, p) in self.list.iter().enumerate().filter(|(_, p)| p.is_param()) {
            gpu.sum_squares(&p.g, &out, i)?;
        }
        gpu.to_f32(&out)
    }
    pub fn scale_grads(&self, gpu: &Gpu, s: f32) -> Result<(), String> {
        self.params().try_for_each(|p| gpu.scale(&p.g, s))
    }
    /// The optimizer's slots: every `Role::Param` rank `rank` steps (`params` is the host list
    /// this was uploaded from: names and specs), with its f32 master and grad, state and bf16
    /// working copy.
    pub fn slots(&self, params: &Params, rank: u32) -> Vec<pith_plugin_api::Slot> {
        let both = self.list.iter().zip(&params.list).filter(|(d, p)| d.is_param() && p.steps_on(rank));
        both.map(|(d, p)| pith_plugin_api::Slot {
            name: p.name.as_str().into(),
            spec: p.spec.clone(),
            w: d.w.t,
            g: d.g.t,
            state: d.state.iter().map(|s| s.t).collect(),
            w_lowp: d.w16.t,
        })
        .collect()
    }
    /// What components get for the tensors in `r`: bf16 copies of parameters, f32 buffers and
    /// accumulators.
    pub fn weights(&self, r: std::ops::Range<usize>) -> Vec<Tensor> {
        self.list[r].iter().map(GpuParam::working).collect()
    }
    /// The same as [`GpuParams::weights`] (the name GpuPass uses).
    fn w16(&self, r: std::ops::Range<usize>) -> Vec<Tensor> {
        self.weights(r)
    }
    /// Gradients of the tensors in `r` (zero-numel for buffers and accumulators).
    fn grads(&self, r: std::ops::Range<usize>) -> Vec<Tensor> {
        self.list[r].iter().map(|p| p.g.t).collect()
    }
}

/// A plugin's output must be a device tensor of `dtype` and shape `dims` (0: any size).
fn check(t: &Tensor, dtype: DType, dims: &[usize], device: Device, who: &str) -> Result<(), String> {
    let d = t.dims();
    let fits = d.len() == dims.len() && d.iter().zip(dims).all(|(a, b)| *b == 0 || a == b);
    if !fits || t.dtype != dtype || t.device != device {
        let got = format!("{:?} {d:?} on {:?}", t.dtype, t.device);
        return Err(format!("{who}: returned {got}, expected {dtype:?} {dims:?} (0: any) on {device:?}"));
    }
    Ok(())
}

/// What one layer's forward keeps for backward.
struct Saved {
    x: DTensor,
    rstd1: DTensor,
    a: DTensor,
    q_pre: Option<(DTensor, DTensor)>,
    k_pre: Option<(DTensor, DTensor)>,
    q: DTensor,
    k: DTensor,
    v: DTensor,
    att: DTensor,
    lse: DTensor,
    h: DTensor,
    rstd2: DTensor,
    m: DTensor,
    r: RouterOut,
    d: Dispatched,
    e: ExpertsOut,
    /// The shared expert's output and its one group's offsets [0, T] (on the host).
    shared: Option<(ExpertsOut, [i32; 2])>,
    counts: Vec<u32>,
    /// The plugins' device allocations before this layer's (see `GpuOps::release_to`).
    mark: usize,
}

/// RoPE's cos/sin tables on the device.
pub struct RopeTables {
    cos: DTensor,
    sin: DTensor,
}

impl RopeTables {
    pub fn new(gpu: &Gpu, model: &Model) -> Result<RopeTables, String> {
        let (s, half) = (model.cfg.seq_len, model.rope.half);
        let cos = gpu.upload(&model.rope.cos, &[s, half], DType::F32)?;
        let sin = gpu.upload(&model.rope.sin, &[s, half], DType::F32)?;
        Ok(RopeTables { cos, sin })
    }
}

/// One micro-batch's pass over the model on the GPU.
pub struct GpuPass<'a> {
    pub m: &'a Model,
    pub gpu: &'a Gpu,
    pub ops: &'a GpuOps,
    pub p: &'a GpuParams,
    pub rope: &'a RopeTables,
    pub batch: usize,
    /// In the step's last micro-batch of a data-parallel run: sum each layer's gradients over
    /// the ranks as soon as its backward has written them, overlapped with the layers below.
    pub reduce: Option<&'a Nccl>,
}

impl GpuPass<'_> {
    fn t(&self) -> usize {
        self.batch * self.m.cfg.seq_len
    }
    fn tensor(&self, shape: &[usize], dtype: DType) -> Result<DTensor, String> {
        self.gpu.tensor(shape, dtype)
    }
    /// y = x · W[i]ᵀ (bf16, W [out, in]); x is any view of [T, in].
    fn linear(&self, i: usize, x: &Tensor) -> Result<DTensor, String> {
        let w = &self.p.list[i].w16;
        let y = self.tensor(&[self.t(), w.dim(0)], DType::BF16)?;
        self.gpu.gemm(&self.rows(x), w, &y, false, true, 1.0, 0.0)?;
        Ok(y)
    }
    /// dx (+)= dy · W[i] (dx f32 or bf16); g[i] += dyᵀ · x.
    fn linear_bwd(&self, i: usize, x: &Tensor, dy: &Tensor, dx: &Tensor, acc: bool) -> Result<(), String> {
        let (p, x, dy, dx) = (&self.p.list[i], self.rows(x), self.rows(dy), self.rows(dx));
        self.gpu.gemm(&dy, &p.w16, &dx, false, false, 1.0, if acc { 1.0 } else { 0.0 })?;
        self.gpu.gemm(&dy, &x, &p.g, true, false, 1.0, 1.0)
    }
    /// A tensor of T·n elements seen as [T, n].
    fn rows(&self, x: &Tensor) -> Tensor {
        Tensor::new(x.addr, x.dtype, x.device, &[self.t(), x.numel() / self.t()])
    }
    /// RMSNorm with weight `i` over rows of its size: (y bf16, rstd).
    fn norm(&self, i: usize, x: &Tensor) -> Result<(DTensor, DTensor), String> {
        let w = &self.p.list[i].w16;
        let y = self.tensor(&x.dims(), DType::BF16)?;
        let rstd = self.tensor(&[x.numel() / w.numel()], DType::F32)?;
        self.gpu.rmsnorm_fwd(x, w, &y, &rstd, self.m.cfg.norm_eps)?;
        Ok((y, rstd))
    }
    fn norm_bwd(&self, i: usize, x: &Tensor, rstd: &Tensor, dy: &Tensor, dx: &Tensor) -> Result<(), String> {
        let p = &self.p.list[i];
        self.gpu.rmsnorm_bwd(x, &p.w16, rstd, dy, dx, &p.g)
    }

    /// Forward + backward of one micro-batch (tokens, targets i32 [T] on the device); accumulates
    /// grad_scale·∂loss/∂w into the gradients. With `routing`, StepOut carries every layer's ids
    /// and gates (a device-to-host copy per layer; only for routing traces).
    pub fn forward_backward(
        &self,
        tokens: &Tensor,
        targets: &Tensor,
        grad_scale: f32,
        routing: bool,
    ) -> Result<StepOut, String> {
        let _reset = self.ops.reset_on_drop();
        let (layers, x, aux_sums) = self.forward(tokens)?;
        let (xn, rstd) = self.norm(self.m.final_norm, &x)?;
        let logits = self.linear(self.m.lm_head, &xn)?;
        let t = self.t();
        let losses = self.tensor(&[t], DType::F32)?;
        self.gpu.cross_entropy(&logits, targets, &losses, Some(grad_scale / t as f32))?;
        // Backward: logits now hold the gradient.
        let dxn = self.tensor(&[t, self.m.cfg.hidden], DType::F32)?;
        self.linear_bwd(self.m.lm_head, &xn, &logits, &dxn, false)?;
        drop(logits);
        let dx = self.gpu.zeros(&[t, self.m.cfg.hidden], DType::F32)?;
        self.norm_bwd(self.m.final_norm, &x, &rstd, &dxn, &dx)?;
        self.written(&[self.m.lm_head, self.m.final_norm])?;
        drop((x, xn, dxn));
        let (mut counts, mut routes) = (Vec::new(), Vec::new());
        for (l, s) in layers.into_iter().enumerate().rev() {
            if routing {
                let mut ids = vec![0i32; s.r.ids.numel()];
                self.gpu.download(&s.r.ids, &mut ids)?;
                routes.push((ids, self.gpu.to_f32(&s.r.weights)?));
            }
            self.layer_backward(l, &s, &dx, grad_scale)?;
            self.written(&self.m.layer_params(l))?;
            self.ops.release_to(s.mark);
            counts.push(s.counts);
        }
        let embed = &self.p.list[self.m.embed].g;
        self.gpu.embed_bwd(tokens, &dx, embed)?;
        self.written(&[self.m.embed])?;
        if let Some(n) = self.reduce {
            n.reduced(self.gpu)?;
        }
        counts.reverse();
        routes.reverse();
        let loss = self.mean(&losses)?;
        // The balance losses' values, read once per micro-batch (summed over layers; tables with
        // the same plugin name add up, as on the CPU).
        let mut aux: Vec<(String, f32)> = Vec::new();
        let names = self.m.layers.first().map(|l| &l.moe.losses[..]).unwrap_or_default();
        for ((name, _), v) in names.iter().zip(self.gpu.to_f32(&aux_sums)?) {
            if !v.is_finite() {
                return Err(format!("balance_loss `{name}`: non-finite value {v}"));
            }
            match aux.iter_mut().find(|a| a.0 == *name) {
                Some(a) => a.1 += v,
                None => aux.push((name.clone(), v)),
            }
        }
        Ok(StepOut { loss, aux, expert_counts: counts, routing: routes })
    }

    /// The gradients of parameters `ids` are final for this step: with `reduce`, start their sum
    /// over the ranks.
    fn written(&self, ids: &[usize]) -> Result<(), String> {
        let Some(n) = self.reduce else { return Ok(()) };
        let params = ids.iter().map(|&i| &self.p.list[i]).filter(|p| p.is_param());
        n.reduce_when_written(self.gpu, &params.map(|p| (p.g.t, p.group, p.root)).collect::<Vec<_>>())
    }

    /// Forward only: the mean cross-entropy.
    pub fn loss(&self, tokens: &Tensor, targets: &Tensor) -> Result<f32, String> {
        let _reset = self.ops.reset_on_drop();
        let (layers, x, _) = self.forward(tokens)?;
        drop(layers);
        let (xn, _) = self.norm(self.m.final_norm, &x)?;
        let logits = self.linear(self.m.lm_head, &xn)?;
        let losses = self.tensor(&[self.t()], DType::F32)?;
        self.gpu.cross_entropy(&logits, targets, &losses, None)?;
        self.mean(&losses)
    }

    fn mean(&self, v: &Tensor) -> Result<f32, String> {
        let sum = self.gpu.zeros(&[1], DType::F32)?;
        self.gpu.sum(v, &sum)?;
        Ok(self.gpu.to_f32(&sum)?[0] / v.numel() as f32)
    }

    /// Every layer's forward: what each keeps for backward, the output, and each balance-loss
    /// table's value summed over layers ([losses] f32, still on the device).
    fn forward(&self, tokens: &Tensor) -> Result<(Vec<Saved>, DTensor, DTensor), String> {
        let mut x = self.tensor(&[self.t(), self.m.cfg.hidden], DType::F32)?;
        self.gpu.embed_fwd(tokens, &self.p.list[self.m.embed].w, &x)?;
        let losses = self.m.layers.first().map_or(0, |l| l.moe.losses.len());
        let aux = self.gpu.zeros(&[losses], DType::F32)?;
        let mut layers = Vec::new();
        for l in 0..self.m.layers.len() {
            let (saved, out) = self.layer_forward(l, x, &aux)?;
            layers.push(saved);
            x = out;
        }
        Ok((layers, x, aux))
    }

    fn layer_forward(&self, l: usize, x: DTensor, aux: &Tensor) -> Result<(Saved, DTensor), String> {
        let (c, lay, o) = (&self.m.cfg, &self.m.layers[l], || self.ops.ops());
        let (n, hd, ne, hi) = (self.t(), c.hidden, c.experts, lay.host);
        let at = |what: &str| format!("layer {l} {what}");
        // Attention.
        let (a, rstd1) = self.norm(hi + ATTN_NORM, &x)?;
        let (mut q, mut k, v) = (self.linear(hi + Q, &a)?, self.linear(hi + K, &a)?, self.linear(hi + V, &a)?);
        let (mut q_pre, mut k_pre) = (None, None);
        if let Some(i) = lay.qk_norm {
            let (qn, qr) = self.norm(i, &self.qk_rows(&q, c.heads))?;
            let (kn, kr) = self.norm(i + 1, &self.qk_rows(&k, c.kv_heads))?;
            q_pre = Some((std::mem::replace(&mut q, qn), qr));
            k_pre = Some((std::mem::replace(&mut k, kn), kr));
        }
        self.rope(&q, c.heads, false)?;
        self.rope(&k, c.kv_heads, false)?;
        let (att, lse) = self.attention_fwd(&q, &k, &v)?;
        let o_out = self.linear(hi + O, &att)?;
        let h = self.tensor(&[n, hd], DType::F32)?;
        self.gpu.sum_into(&h, &x, &o_out)?;
        drop(o_out);
        // MoE: router → balance losses → dispatch → experts → combine.
        let (m, rstd2) = self.norm(lay.moe_norm, &h)?;
        let mark = self.ops.mark();
        let moe = &lay.moe;
        let (router, experts, comm) = (&moe.router.1, &moe.experts.1, &moe.comm.1);
        self.ops.calls().set_layer(l);
        let (rw, ew) = (self.p.w16(lay.router.clone()), self.p.w16(lay.experts.clone()));
        let who = at(&format!("router `{}`", moe.router.0));
        let r = named(router.forward(o(), RSlice::from_slice(&rw), m.t), &who)?;
        check(&r.logits, DType::F32, &[n, ne], Device::Cuda, &who)?;
        check(&r.probs, DType::F32, &[n, ne], Device::Cuda, &who)?;
        check(&r.ids, DType::I32, &[n, 0], Device::Cuda, &who)?;
        check(&r.weights, DType::F32, &[n, r.ids.dim(1)], Device::Cuda, &who)?;
        for (i, ((name, loss), lp)) in moe.losses.iter().zip(&lay.losses).enumerate() {
            let who = at(&format!("balance_loss `{name}`"));
            named(loss.forward(o(), RSlice::from_slice(&self.p.w16(lp.clone())), &r, aux.rows(i, 1)), &who)?;
        }
        let who = at(&format!("comm `{}` dispatch", moe.comm.0));
        let d = named(comm.dispatch(o(), m.t, &r, ne as u32), &who)?;
        check(&d.x, DType::BF16, &[0, hd], Device::Cuda, &who)?;
        check(&d.offsets, DType::I32, &[ne / self.m.ep.parts + 1], Device::Cpu, &who)?;
        let offs = d.offsets.i32s();
        let counts: Vec<u32> = offs.windows(2).map(|w| (w[1] - w[0]) as u32).collect();
        let who = at(&format!("experts `{}`", moe.experts.0));
        let e = named(experts.forward(o(), RSlice::from_slice(&ew), d.x, d.offsets), &who)?;
        check(&e.y, DType::BF16, &d.x.dims(), Device::Cuda, &who)?;
        let who = at(&format!("comm `{}` combine", moe.comm.0));
        let y = named(comm.combine(o(), e.y, &r, &d), &who)?;
        check(&y, DType::BF16, &[n, hd], Device::Cuda, &who)?;
        let out = self.tensor(&[n, hd], DType::F32)?;
        self.gpu.sum_into(&out, &h, &y)?;
        let mut shared = None;
        if let Some((name, sh)) = &moe.shared {
            let who = at(&format!("shared `{name}`"));
            let off = [0, n as i32];
            let sw = self.p.w16(lay.shared.clone());
            let offv = crate::cpu::view_i32(&off, &[2]);
            let so = named(sh.forward(o(), RSlice::from_slice(&sw), m.t, offv), &who)?;
            check(&so.y, DType::BF16, &[n, hd], Device::Cuda, &who)?;
            self.gpu.add_into(&out, &so.y)?;
            shared = Some((so, off));
        }
        let saved = Saved { x, rstd1, a, q_pre, k_pre, q, k, v, att, lse, h, rstd2, m, r, d, e, shared, counts, mark };
        Ok((saved, out))
    }

    /// RoPE in place on q or k (any view of [T, heads·D]).
    fn rope(&self, x: &Tensor, heads: usize, inverse: bool) -> Result<(), String> {
        let (c, r) = (&self.m.cfg, self.rope);
        let view = Tensor::new(x.addr, x.dtype, x.device, &[self.t(), heads, c.head_dim]);
        self.gpu.rope(&view, &r.cos, &r.sin, c.seq_len, heads, inverse)
    }

    /// q or k [T, heads·D] seen as rows of the qk-norm weight's size (per head or whole).
    fn qk_rows(&self, t: &Tensor, heads: usize) -> Tensor {
        let d = match self.m.cfg.qk_norm {
            QkNorm::Head => self.m.cfg.head_dim,
            _ => heads * self.m.cfg.head_dim,
        };
        Tensor::new(t.addr, t.dtype, t.device, &[t.numel() / d, d])
    }

    /// Backward of layer `l`: `dy` holds ∂/∂(its output) and becomes ∂/∂(its input).
    fn layer_backward(&self, l: usize, s: &Saved, dy: &DTensor, scale: f32) -> Result<(), String> {
        let (c, lay, o) = (&self.m.cfg, &self.m.layers[l], || self.ops.ops());
        let (n, hd, ne, hi) = (self.t(), c.hidden, c.experts, lay.host);
        let at = |what: &str| format!("layer {l} {what}");
        let (moe, r, d, e) = (&lay.moe, &s.r, &s.d, &s.e);
        let (router, experts, comm) = (&moe.router.1, &moe.experts.1, &moe.comm.1);
        // MoE block; ∂/∂m sums the dispatch and router paths.
        let dy16 = self.tensor(&[n, hd], DType::BF16)?;
        self.gpu.cast(dy, &dy16)?;
        let (rows, k) = (d.x.dim(0), r.ids.dim(1));
        // Outputs the components WRITE in full need no zeroing; d_logits accumulates.
        let (dys, dw) = (self.tensor(&[rows, hd], DType::BF16)?, self.tensor(&[n, k], DType::F32)?);
        self.ops.calls().set_layer(l);
        let res = comm.combine_backward(o(), dy16.t, e.y, r, d, dys.t, dw.t);
        named(res, &at(&format!("comm `{}` combine", moe.comm.0)))?;
        let dxs = self.tensor(&[rows, hd], DType::BF16)?;
        let (ew, eg) = (self.p.w16(lay.experts.clone()), self.p.grads(lay.experts.clone()));
        let (ew, eg) = (RSlice::from_slice(&ew), RSlice::from_slice(&eg));
        let res = experts.backward(o(), ew, eg, d.x, d.offsets, e, dys.t, dxs.t);
        named(res, &at(&format!("experts `{}`", moe.experts.0)))?;
        drop(dys);
        let dxd = self.tensor(&[n, hd], DType::BF16)?;
        let res = comm.dispatch_backward(o(), dxs.t, d, dxd.t);
        named(res, &at(&format!("comm `{}` dispatch", moe.comm.0)))?;
        drop(dxs);
        let (dprob, dlog) = (self.gpu.zeros(&[n, ne], DType::F32)?, self.gpu.zeros(&[n, ne], DType::F32)?);
        for ((name, loss), lp) in moe.losses.iter().zip(&lay.losses) {
            let res = loss.backward(o(), RSlice::from_slice(&self.p.w16(lp.clone())), r, scale, dprob.t, dlog.t);
            named(res, &at(&format!("balance_loss `{name}`")))?;
        }
        let dxr = self.tensor(&[n, hd], DType::BF16)?;
        let (rw, rg) = (self.p.w16(lay.router.clone()), self.p.grads(lay.router.clone()));
        let (rw, rg) = (RSlice::from_slice(&rw), RSlice::from_slice(&rg));
        let res = router.backward(o(), rw, rg, s.m.t, r, dw.t, dprob.t, dlog.t, dxr.t);
        named(res, &at(&format!("router `{}`", moe.router.0)))?;
        let dm = self.tensor(&[n, hd], DType::F32)?;
        self.gpu.sum_into(&dm, &dxd, &dxr)?;
        if let (Some((name, sh)), Some((so, off))) = (&moe.shared, &s.shared) {
            let dxs = self.tensor(&[n, hd], DType::BF16)?;
            let (sw, sg) = (self.p.w16(lay.shared.clone()), self.p.grads(lay.shared.clone()));
            let (sw, sg, offv) = (RSlice::from_slice(&sw), RSlice::from_slice(&sg), crate::cpu::view_i32(off, &[2]));
            let res = sh.backward(o(), sw, sg, s.m.t, offv, so, dy16.t, dxs.t);
            named(res, &at(&format!("shared `{name}`")))?;
            self.gpu.add_into(&dm, &dxs)?;
        }
        drop((dxd, dxr, dlog, dw));
        self.norm_bwd(lay.moe_norm, &s.h, &s.rstd2, &dm, dy)?;
        drop(dm);
        // Attention block (dy is now ∂/∂h).
        self.gpu.cast(dy, &dy16)?;
        let datt = self.tensor(&s.att.dims(), DType::BF16)?;
        self.linear_bwd(hi + O, &s.att, &dy16, &datt, false)?;
        drop(dy16);
        let (dq, dk, dv) = self.attention_bwd(s, &datt)?;
        drop(datt);
        self.rope(&dq, c.heads, true)?;
        self.rope(&dk, c.kv_heads, true)?;
        let (dq, dk) = match (lay.qk_norm, &s.q_pre, &s.k_pre) {
            (Some(i), Some((qp, qr)), Some((kp, kr))) => {
                let (dqp, dkp) = (self.tensor(&qp.dims(), DType::BF16)?, self.tensor(&kp.dims(), DType::BF16)?);
                let (qh, kh) = (c.heads, c.kv_heads);
                self.norm_bwd(i, &self.qk_rows(qp, qh), qr, &self.qk_rows(&dq, qh), &self.qk_rows(&dqp, qh))?;
                self.norm_bwd(i + 1, &self.qk_rows(kp, kh), kr, &self.qk_rows(&dk, kh), &self.qk_rows(&dkp, kh))?;
                (dqp, dkp)
            }
            _ => (dq, dk),
        };
        let da = self.tensor(&[n, hd], DType::F32)?;
        self.linear_bwd(hi + Q, &s.a, &dq, &da, false)?;
        self.linear_bwd(hi + K, &s.a, &dk, &da, true)?;
        self.linear_bwd(hi + V, &s.a, &dv, &da, true)?;
        self.norm_bwd(hi + ATTN_NORM, &s.x, &s.rstd1, &da, dy)
    }

    /// Causal GQA flash attention (kernels/attention.cu): (out [T, heads·D] bf16, lse [B,heads,S]).
    fn attention_fwd(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(DTensor, DTensor), String> {
        let c = &self.m.cfg;
        let (b, s, hq, hkv, d) = (self.batch, c.seq_len, c.heads, c.kv_heads, c.head_dim);
        let name = match d {
            32 => "flash_attn_fwd_d32",
            64 => "flash_attn_fwd_d64",
            128 => "flash_attn_fwd_d128",
            _ => return Err(format!("model.head_dim = {d}: the CUDA attention supports 32, 64 and 128")),
        };
        let out = self.tensor(&q.dims(), DType::BF16)?;
        let lse = self.tensor(&[b, hq, s], DType::F32)?;
        let sizes = [Arg::I32(b as i32), Arg::I32(s as i32), Arg::I32(hq as i32), Arg::I32(hkv as i32)];
        let mut args = vec![q.arg(), k.arg(), v.arg(), out.arg(), lse.arg()];
        args.extend(sizes);
        args.push(Arg::F32(1.0 / (d as f32).sqrt()));
        self.gpu.launch(src::ATTENTION, name, attn_dims::fwd(b, s, hq, hkv, d), &args)?;
        Ok((out, lse))
    }

    /// Backward of [`Self::attention_fwd`]: (dq, dk, dv) bf16.
    fn attention_bwd(&self, sv: &Saved, dout: &Tensor) -> Result<(DTensor, DTensor, DTensor), String> {
        let c = &self.m.cfg;
        let (b, s, hq, hkv, d) = (self.batch, c.seq_len, c.heads, c.kv_heads, c.head_dim);
        let g = self.gpu;
        let delta = self.tensor(&[b, hq, s], DType::F32)?;
        let prep = [sv.att.arg(), dout.arg(), delta.arg(), Arg::I32(b as i32), Arg::I32(s as i32)];
        let prep = [&prep[..], &[Arg::I32(hq as i32), Arg::I32(d as i32)]].concat();
        g.launch(src::ATTENTION, "flash_attn_bwd_prep", attn_dims::prep(b, s, hq, d), &prep)?;
        let dq_acc = g.zeros(&sv.q.dims(), DType::F32)?;
        let (dk, dv) = (self.tensor(&sv.k.dims(), DType::BF16)?, self.tensor(&sv.v.dims(), DType::BF16)?);
        let name = format!("flash_attn_bwd_d{d}");
        let mut args = vec![sv.q.arg(), sv.k.arg(), sv.v.arg(), dout.arg(), sv.lse.arg(), delta.arg()];
        args.extend([dq_acc.arg(), dk.arg(), dv.arg()]);
        args.extend([Arg::I32(b as i32), Arg::I32(s as i32), Arg::I32(hq as i32), Arg::I32(hkv as i32)]);
        args.push(Arg::F32(1.0 / (d as f32).sqrt()));
        g.launch(src::ATTENTION, &name, attn_dims::bwd(b, s, hq, hkv, d), &args)?;
        let dq = self.tensor(&sv.q.dims(), DType::BF16)?;
        let n = dq.numel();
        g.launch(
            src::ATTENTION,
            "flash_attn_dq_cast",
            attn_dims::cast(n),
            &[dq_acc.arg(), dq.arg(), Arg::I64(n as i64)],
        )?;
        Ok((dq, dk, dv))
    }
}

/// Launch shapes of kernels/attention.cu (the table at the top of that file).
mod attn_dims {
    type Dims = ([u32; 3], [u32; 3], u32);
    pub fn fwd(b: usize, s: usize, hq: usize, _hkv: usize, d: usize) -> Dims {
        let (rows, threads) = if d == 128 { (64, 128) } else { (128, 256) };
        ([hq as u32, b as u32, s.div_ceil(rows) as u32], [threads, 1, 1], 0)
    }
    pub fn prep(b: usize, s: usize, hq: usize, _d: usize) -> Dims {
        ([(b * s * hq).div_ceil(8) as u32, 1, 1], [256, 1, 1], 0)
    }
    pub fn bwd(b: usize, s: usize, _hq: usize, hkv: usize, _d: usize) -> Dims {
        ([hkv as u32, b as u32, s.div_ceil(64) as u32], [128, 1, 1], 0)
    }
    pub fn cast(n: usize) -> Dims {
        ([n.div_ceil(256).min(65_535) as u32, 1, 1], [256, 1, 1], 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::MoeComponents;
    use pith_plugin_api::abi::Component;
    use pith_plugin_api::{wrap, Host, Kind, ModelDims, ParamSpec, Router};
    use std::sync::Arc;

    /// A router that allocates, then fails.
    struct Failing;
    impl Router for Failing {
        fn params(&self) -> Vec<ParamSpec> {
            vec![]
        }
        fn forward(&self, h: Host, _: &[Tensor], x: Tensor) -> Result<RouterOut, String> {
            h.alloc(&[x.dim(0), 4], DType::F32)?;
            Err("no route".into())
        }
        #[allow(clippy::too_many_arguments)]
        fn backward(
            &self,
            _: Host,
            _: &[Tensor],
            _: &[Tensor],
            _: Tensor,
            _: &RouterOut,
            _: Tensor,
            _: Tensor,
            _: Tensor,
            _: Tensor,
        ) -> Result<(), String> {
            unreachable!()
        }
    }

    /// A pass that fails in a plugin frees what plugins allocated before the failure.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn a_failing_plugin_leaves_no_allocations() {
        let gpu = Arc::new(crate::gpu::tests::gpu());
        let text = "vocab = 64\nhidden = 64\nlayers = 1\nheads = 2\nkv_heads = 1\nhead_dim = 32\nseq_len = 16\n\
                    experts = 4\nexpert_ffn = 32";
        let c: ModelConfig = toml::from_str(text).unwrap();
        let (m, dims) = (pith_std::pith_root_module(), ModelDims::new(64, 4, 32, 0, 1));
        let make = |kind, name: &str| (m.create())(kind, name.into(), "".into(), dims).into_result().unwrap();
        let (Component::Router(r), Component::Experts(e), Component::CommSchedule(cm)) =
            (wrap::Router(Failing), make(Kind::Experts, "swiglu"), make(Kind::CommSchedule, "local"))
        else {
            unreachable!()
        };
        let moe = MoeComponents {
            router: ("failing".into(), r),
            experts: ("swiglu".into(), e),
            shared: None,
            losses: vec![],
            comm: ("local".into(), cm),
        };
        let mut params = Params::default();
        let model = Model::new(&c, &mut params, 1, vec![moe], crate::params::Shard::WHOLE).unwrap();
        let (p, rope, ops) = (
            GpuParams::upload(&gpu, &params, &Parallel::single()).unwrap(),
            RopeTables::new(&gpu, &model).unwrap(),
            GpuOps::new(gpu.clone()),
        );
        let pass = GpuPass { m: &model, gpu: &gpu, ops: &ops, p: &p, rope: &rope, batch: 2, reduce: None };
        let tokens = gpu.upload(&[1i32; 32], &[32], DType::I32).unwrap();
        let e = pass.forward_backward(&tokens, &tokens, 1.0, false).unwrap_err();
        assert!(e.contains("router `failing`: no route"), "{e}");
        assert_eq!(ops.mark(), 0, "forward_backward: the router's allocation must be freed");
        let e = pass.loss(&tokens, &tokens).unwrap_err();
        assert!(e.contains("router `failing`: no route"), "{e}");
        assert_eq!(ops.mark(), 0, "loss: the router's allocation must be freed");
    }
}
