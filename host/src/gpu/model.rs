//! The CUDA side of the model: its tensors on the device (`GpuParams`: f32 masters, bf16 working
//! copies, f32 gradients, optimizer state) and `GpuPass`, decoder.rs's [`Backend`] on CUDA —
//! bf16 activations, the residual stream and its gradient in f32 as under PyTorch autocast,
//! cuBLAS for the projections and the kernels of gpu/kernels.rs and kernels/attention.cu.

use super::nccl::Nccl;
use super::ops::GpuOps;
use super::{DTensor, Gpu};
use crate::cpu::Calls;
use crate::decoder::{self, Attn, Backend, Qkv};
use crate::layers::AttnDims;
use crate::model::{Model, StepOut};
use crate::parallel::Parallel;
use crate::params::Params;
use cudarc::driver::CudaStream;
use pith_plugin_api::abi::OpsRef;
use pith_plugin_api::{DType, Device, Tensor};
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

/// One declared tensor on the device. `Role::Param`: fp32 master `w`, bf16 working copy `w16`,
/// fp32 gradient ([`GpuParam::grad`]), optimizer state. `Role::Buffer` / `Role::Accumulator`:
/// `w` only, fp32, passed to components in place of the working copy; `w16` and the gradient
/// are zero-numel, no state.
pub struct GpuParam {
    pub role: pith_plugin_api::Role,
    pub w: DTensor,
    pub w16: DTensor,
    /// The gradient exists from the backward's first write in a step until it has been used:
    /// after the optimizer step, or (ZeRO-2) on a rank that does not step the tensor, once its
    /// sum onto the owner is queued. So no gradient takes memory during the forward.
    g: Mutex<Option<DTensor>>,
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
    /// Another rank steps it (`shard_optimizer`): no f32 master here.
    fn stepped_elsewhere(&self) -> bool {
        self.is_param() && self.w.numel() == 0
    }
    /// The gradient, allocated (zeroed) by the first call of a step.
    pub fn grad(&self, gpu: &Gpu) -> Result<Tensor, String> {
        let mut g = self.g.lock().unwrap_or_else(PoisonError::into_inner);
        if g.is_none() {
            let dims = if self.is_param() { self.w16.dims() } else { vec![0] };
            *g = Some(gpu.zeros(&dims, DType::F32)?);
        }
        Ok(g.as_ref().unwrap().t)
    }
    /// The gradient if the step has one.
    fn grad_if_any(&self) -> Option<Tensor> {
        self.g.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|g| g.t)
    }
    /// Give the gradient back to the pool; with `side`, the stream a sum of it is queued on.
    fn release_grad(&self, side: Option<&Arc<CudaStream>>) {
        if let Some(g) = self.g.lock().unwrap_or_else(PoisonError::into_inner).take() {
            side.inspect(|s| g.used_on(s));
        }
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
            let g = Mutex::new(None);
            if role != pith_plugin_api::Role::Param {
                let w16 = gpu.tensor(&[0], DType::BF16)?;
                list.push(GpuParam { role, w, w16, g, state: Vec::new(), group, root });
                continue;
            }
            let w16 = gpu.tensor(&shape, DType::BF16)?;
            gpu.cast(&w, &w16)?;
            let w = if p.steps_on(par.rank) { w } else { gpu.tensor(&[0], DType::F32)? };
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
    /// After the optimizer step: every gradient back to the pool (the next backward starts
    /// from zero).
    pub fn release_grads(&self) {
        self.list.iter().for_each(|p| p.release_grad(None));
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
            if let Some(g) = p.grad_if_any() {
                gpu.sum_squares(&g, &out, i)?;
            }
        }
        gpu.to_f32(&out)
    }
    pub fn scale_grads(&self, gpu: &Gpu, s: f32) -> Result<(), String> {
        self.params().filter_map(GpuParam::grad_if_any).try_for_each(|g| gpu.scale(&g, s))
    }
    /// The optimizer's slots: every `Role::Param` rank `rank` steps (`params` is the host list
    /// this was uploaded from: names and specs), with its f32 master and grad, state and bf16
    /// working copy.
    pub fn slots(&self, gpu: &Gpu, params: &Params, rank: u32) -> Result<Vec<pith_plugin_api::Slot>, String> {
        let both = self.list.iter().zip(&params.list).filter(|(d, p)| d.is_param() && p.steps_on(rank));
        both.map(|(d, p)| {
            Ok(pith_plugin_api::Slot {
                name: p.name.as_str().into(),
                spec: p.spec.clone(),
                w: d.w.t,
                g: d.grad(gpu)?,
                state: d.state.iter().map(|s| s.t).collect(),
                w_lowp: d.w16.t,
            })
        })
        .collect()
    }
    /// What components get for the tensors in `r`: bf16 copies of parameters, f32 buffers and
    /// accumulators.
    pub fn weights(&self, r: std::ops::Range<usize>) -> Vec<Tensor> {
        self.list[r].iter().map(GpuParam::working).collect()
    }
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

/// One micro-batch's pass on the GPU: decoder.rs's [`Backend`] with bf16 activations, the f32
/// residual stream, and the model's kernels (gpu/kernels.rs, kernels/attention.cu).
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
    /// Forward + backward of one micro-batch (tokens, targets i32 [T] on the device); accumulates
    /// grad_scale·∂loss/∂w into the gradients. With `routing`, StepOut carries every layer's ids
    /// and gates (a device-to-host copy per layer; only for routing traces). Plugin allocations
    /// are freed when it returns, on error paths too.
    pub fn forward_backward(&self, tokens: &Tensor, targets: &Tensor, scale: f32, routing: bool) -> R<StepOut> {
        let _reset = self.ops.reset_on_drop();
        decoder::forward_backward(self, tokens, targets, scale, routing)
    }

    /// Forward only: the mean cross-entropy.
    pub fn loss(&self, tokens: &Tensor, targets: &Tensor) -> R<f32> {
        let _reset = self.ops.reset_on_drop();
        decoder::loss(self, tokens, targets)
    }

    /// Forward only: row `row` of the logits (on the host, f32).
    pub fn logits_row(&self, tokens: &Tensor, row: usize) -> R<Vec<f32>> {
        let _reset = self.ops.reset_on_drop();
        let logits = decoder::logits(self, tokens)?;
        self.gpu.to_f32(&logits.rows(row, 1))
    }

    fn t(&self) -> usize {
        self.batch * self.m.cfg.seq_len
    }
    /// A tensor of T·n elements seen as [T, n].
    fn rows(&self, x: &Tensor) -> Tensor {
        Tensor::new(x.addr, x.dtype, x.device, &[self.t(), x.numel() / self.t()])
    }
}

type R<T> = Result<T, String>;

impl Backend for GpuPass<'_> {
    type T = DTensor;
    type Ids = Tensor;
    const DEVICE: Device = Device::Cuda;
    const ACT: DType = DType::BF16;
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
    fn view(&self, t: &DTensor, dims: &[usize]) -> Tensor {
        Tensor::new(t.addr, t.dtype, t.device, dims)
    }
    fn empty(&self, dims: &[usize], dtype: DType) -> R<DTensor> {
        self.gpu.tensor(dims, dtype)
    }
    fn zeros(&self, dims: &[usize], dtype: DType) -> R<DTensor> {
        self.gpu.zeros(dims, dtype)
    }
    fn weights(&self, r: Range<usize>) -> Vec<Tensor> {
        self.p.weights(r)
    }
    fn grads(&self, r: Range<usize>) -> R<Vec<Tensor>> {
        self.p.list[r].iter().map(|p| p.grad(self.gpu)).collect()
    }
    fn host_i32(&self, t: &Tensor) -> R<Vec<i32>> {
        let mut v = vec![0i32; t.numel()];
        self.gpu.download(t, &mut v)?;
        Ok(v)
    }
    fn host_f32(&self, t: &Tensor) -> R<Vec<f32>> {
        self.gpu.to_f32(t)
    }
    fn finite(&self, _: &DTensor, _: &str) -> R<()> {
        Ok(())
    }
    fn embed(&self, tokens: &Tensor) -> R<DTensor> {
        let x = self.gpu.tensor(&[self.t(), self.m.cfg.hidden], DType::F32)?;
        self.gpu.embed_fwd(tokens, &self.p.list[self.m.embed].w, &x)?;
        Ok(x)
    }
    fn embed_bwd(&self, tokens: &Tensor, dx: &DTensor) -> R<()> {
        self.gpu.embed_bwd(tokens, dx, &self.p.list[self.m.embed].grad(self.gpu)?)
    }
    fn norm(&self, i: usize, x: &DTensor) -> R<(DTensor, DTensor)> {
        let w = &self.p.list[i].w16;
        let y = self.gpu.tensor(&x.dims(), DType::BF16)?;
        let rstd = self.gpu.tensor(&[x.numel() / w.numel()], DType::F32)?;
        self.gpu.rmsnorm_fwd(x, w, &y, &rstd, self.m.cfg.norm_eps)?;
        Ok((y, rstd))
    }
    fn norm_bwd(&self, i: usize, x: &DTensor, rstd: &DTensor, dy: &DTensor, dx: &mut DTensor) -> R<()> {
        let p = &self.p.list[i];
        self.gpu.rmsnorm_bwd(x, &p.w16, rstd, dy, dx, &p.grad(self.gpu)?)
    }
    fn linear(&self, i: usize, x: &DTensor) -> R<DTensor> {
        let w = &self.p.list[i].w16;
        let y = self.gpu.tensor(&[self.t(), w.dim(0)], DType::BF16)?;
        self.gpu.gemm(&self.rows(x), w, &y, false, true, 1.0, 0.0)?;
        Ok(y)
    }
    fn linear_bwd(&self, i: usize, x: &DTensor, dy: &DTensor, dx: &mut DTensor, acc: bool) -> R<()> {
        let (p, x, dy, dx) = (&self.p.list[i], self.rows(x), self.rows(dy), self.rows(dx));
        self.gpu.gemm(&dy, &p.w16, &dx, false, false, 1.0, if acc { 1.0 } else { 0.0 })?;
        self.gpu.gemm(&dy, &x, &p.grad(self.gpu)?, true, false, 1.0, 1.0)
    }
    fn bias(&self, i: usize, y: &mut DTensor) -> R<()> {
        self.gpu.bias_add(y, &self.p.list[i].w16)
    }
    fn bias_bwd(&self, i: usize, dy: &DTensor) -> R<()> {
        self.gpu.bias_grad(dy, &self.p.list[i].grad(self.gpu)?)
    }
    fn rope(&self, x: &mut DTensor, heads: usize, inverse: bool) -> R<()> {
        let (c, r) = (&self.m.cfg, self.rope);
        let view = Tensor::new(x.addr, x.dtype, x.device, &[self.t(), heads, x.numel() / (self.t() * heads)]);
        self.gpu.rope(&view, &r.cos, &r.sin, c.seq_len, heads, c.rope_interleaved, inverse)
    }
    fn cols(&self, x: &DTensor, width: usize, r: std::ops::Range<usize>, sum: usize) -> R<DTensor> {
        let out = self.gpu.tensor(&[x.numel() / width / sum, r.len()], DType::BF16)?;
        self.gpu.cols(x, width, r, sum, &out)?;
        Ok(out)
    }
    fn set_cols(&self, dst: &mut DTensor, width: usize, at: usize, src: &DTensor, repeat: usize) -> R<()> {
        self.gpu.set_cols(dst, width, at, src, repeat)
    }
    /// Causal GQA flash attention (gpu/attention.rs): (out [T, heads·dv] bf16, lse [B,heads,S]).
    fn attention(&self, l: usize, q: &DTensor, k: &DTensor, v: &DTensor) -> R<(DTensor, DTensor)> {
        let sinks = self.m.layers[l].sinks.map(|i| &self.p.list[i].w16.t);
        self.gpu.attention(q, k, v, sinks, AttnDims::of(&self.m.cfg, self.batch, l))
    }
    fn attention_bwd(&self, l: usize, sv: &Attn<'_, DTensor>, dout: &DTensor) -> R<Qkv<DTensor>> {
        let sinks = match self.m.layers[l].sinks {
            Some(i) => Some((self.p.list[i].w16.t, self.p.list[i].grad(self.gpu)?)),
            None => None,
        };
        let a = AttnDims::of(&self.m.cfg, self.batch, l);
        self.gpu.attention_bwd((sv.q, sv.k, sv.v), sinks.as_ref().map(|(w, g)| (w, g)), sv.out, sv.lse, dout, a)
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> R<DTensor> {
        let out = self.gpu.tensor(&a.dims(), DType::F32)?;
        self.gpu.sum_into(&out, a, b)?;
        Ok(out)
    }
    fn add_into(&self, acc: &mut DTensor, x: &Tensor) -> R<()> {
        self.gpu.add_into(acc, x)
    }
    fn to_act(&self, x: &DTensor, dims: &[usize]) -> R<DTensor> {
        let y = self.gpu.tensor(dims, DType::BF16)?;
        self.gpu.cast(x, &y)?;
        Ok(y)
    }
    fn cross_entropy(&self, logits: &mut DTensor, targets: &Tensor, scale: Option<f32>) -> R<DTensor> {
        let losses = self.gpu.tensor(&[self.t()], DType::F32)?;
        let scale = scale.map(|s| s / self.t() as f32);
        self.gpu.cross_entropy(logits, targets, &losses, scale)?;
        Ok(losses)
    }
    fn mean(&self, v: &DTensor) -> R<f32> {
        let sum = self.gpu.zeros(&[1], DType::F32)?;
        self.gpu.sum(v, &sum)?;
        Ok(self.gpu.to_f32(&sum)?[0] / v.numel() as f32)
    }
    fn mark(&self) -> usize {
        self.ops.mark()
    }
    fn release_to(&self, mark: usize) {
        self.ops.release_to(mark)
    }
    fn written(&self, ids: &[usize]) -> R<()> {
        let Some(n) = self.reduce else { return Ok(()) };
        let params: Vec<&GpuParam> = ids.iter().map(|&i| &self.p.list[i]).filter(|p| p.is_param()).collect();
        let grads = params.iter().map(|p| Ok((p.grad(self.gpu)?, p.group, p.root))).collect::<R<Vec<_>>>()?;
        n.reduce_when_written(self.gpu, &grads)?;
        // ZeRO-2: a gradient summed onto another rank is not needed here any more; its memory
        // is reused once the side stream has sent it.
        params.iter().filter(|p| p.stepped_elsewhere()).for_each(|p| p.release_grad(Some(n.side())));
        Ok(())
    }
    fn finish(&self) -> R<()> {
        self.reduce.map_or(Ok(()), |n| n.reduced(self.gpu))
    }
}

/// Launch shapes of kernels/attention.cu (the table at the top of that file).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::MoeComponents;
    use pith_plugin_api::abi::Component;
    use pith_plugin_api::{wrap, Host, Kind, ModelDims, ParamSpec, Router, RouterOut};
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
        let model =
            Model::new(&c, &mut params, 1, vec![crate::model::FfnComponents::Moe(moe)], crate::params::Shard::WHOLE)
                .unwrap();
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
