//! The host's ops table on CUDA: what a plugin's `Host` calls reach when the run is on the GPU.
//! Plugin allocations (device and host) live until [`GpuOps::reset`] at the end of the
//! micro-batch, like the CPU backend's arena. Collectives are those of one process (rank 0 of
//! 1 in every group): the identity, with the checks a real group would make.

use super::nccl::Nccl;
use super::{DTensor, Gpu};
use crate::cpu::Calls;
use crate::parallel::Parallel;
use abi_stable::std_types::{RResult, RSlice, RStr, RString};
use pith_plugin_api::abi::{Ops, OpsRef};
use pith_plugin_api::{Arg, Context, DType, Device, Group, LaunchDims, ReduceOp, Tensor};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The context outside a training step (and before the host sets one).
pub(crate) const DEFAULT_CONTEXT: Context =
    Context { step: 0, micro_batch: 0, micro_batches: 1, batch: 1, seq: 1, layer: 0, training: false, seed: 0 };

/// Plugins' metrics of one step: Σ value·weight and Σ weight per name. Shared by both backends'
/// ops tables (cpu.rs too), which call [`Metrics::add`] only while `Context::training` is set.
#[derive(Default)]
pub(crate) struct Metrics(Mutex<BTreeMap<String, (f64, f64)>>);

impl Metrics {
    /// Count `v` with weight `w`; a weight that is not > 0 (0, negative, NaN) counts nothing.
    pub(crate) fn add(&self, name: &str, v: f64, w: f64) {
        if w > 0.0 {
            let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let e = m.entry(name.to_string()).or_insert((0.0, 0.0));
            (e.0, e.1) = (e.0 + v * w, e.1 + w);
        }
    }
    /// The weighted mean of each name since the last call, and clear.
    pub(crate) fn take(&self) -> BTreeMap<String, f64> {
        let m = std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        m.into_iter().map(|(k, (s, w))| (k, s / w)).collect()
    }
}

pub struct GpuOps {
    pub gpu: Arc<Gpu>,
    /// The job's ranks and the world's communicator, when there are several.
    parallel: Option<(Arc<Parallel>, Arc<Nccl>)>,
    device: Mutex<Vec<DTensor>>,
    host: Mutex<Vec<Vec<u32>>>,
    metrics: Metrics,
    pending: Mutex<Pending>,
    calls: Calls,
}

/// Metrics still on the device (`metric_sum`): each value is copied into a slot of `slots` on the
/// stream, and all are read back in one copy when the step's metrics are taken.
#[derive(Default)]
struct Pending {
    slots: Option<DTensor>,
    names: Vec<(String, f64)>,
}

/// How many device metrics a step holds before they are read back early.
const PENDING_SLOTS: usize = 4096;

/// See [`GpuOps::reset_on_drop`].
pub struct ResetOnDrop<'a>(&'a GpuOps);

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.reset();
    }
}

fn res<T>(r: Result<T, String>) -> RResult<T, RString> {
    r.map_err(RString::from).into()
}

/// The group offsets of a grouped GEMM: a host i32 tensor [G+1], non-decreasing, ending at `rows`.
fn offsets_of(t: &Tensor, rows: usize) -> Result<Vec<usize>, String> {
    if t.device != Device::Cpu || t.dtype != DType::I32 || t.rank != 1 {
        return Err(format!(
            "offsets must be a host (CPU) i32 [G+1] tensor, got {:?} {:?} on {:?}",
            t.dtype,
            t.dims(),
            t.device
        ));
    }
    let o = t.i32s();
    if o.first() != Some(&0) || o.windows(2).any(|w| w[1] < w[0]) || *o.last().unwrap() as usize != rows {
        return Err(format!("offsets must rise from 0 to the {rows} rows, got {:?}…", &o[..o.len().min(8)]));
    }
    Ok(o.iter().map(|&v| v as usize).collect())
}

fn on_gpu(ts: &[&Tensor], what: &str) -> Result<(), String> {
    match ts.iter().find(|t| t.device != Device::Cuda) {
        Some(t) => Err(format!("{what}: expected device tensors, got one on {:?} {:?}", t.device, t.dims())),
        None => Ok(()),
    }
}

impl GpuOps {
    pub fn new(gpu: Arc<Gpu>) -> GpuOps {
        let ops = GpuOps {
            gpu,
            parallel: None,
            device: Mutex::default(),
            host: Mutex::default(),
            metrics: Metrics::default(),
            pending: Mutex::default(),
            calls: Calls::default(),
        };
        ops.set_context(DEFAULT_CONTEXT);
        ops
    }
    /// The ops of one rank of a multi-GPU job (collectives over NCCL).
    pub fn with_parallel(gpu: Arc<Gpu>, parallel: Arc<Parallel>, nccl: Arc<Nccl>) -> GpuOps {
        GpuOps { parallel: Some((parallel, nccl)), ..GpuOps::new(gpu) }
    }
    /// NCCL for a collective over `g`, and `g`'s size: None when `g` is one rank (the identity).
    fn nccl_for(&self, g: Group) -> Option<(&Nccl, usize)> {
        match &self.parallel {
            Some((_, n)) if n.size_of(g) > 1 => Some((n, n.size_of(g))),
            _ => None,
        }
    }
    /// What [`Ops::context`] answers from now on, exactly `c` (until `calls().set_layer`, which
    /// derives the layer's seed from `c.seed` as the run seed).
    pub fn set_context(&self, c: Context) {
        self.calls.set(c, c.seed);
    }
    /// Where the next calls sit, as on the CPU ([`Calls`]).
    pub fn calls(&self) -> &Calls {
        &self.calls
    }
    pub fn ops(&self) -> OpsRef<'_> {
        pith_plugin_api::abi::ops_ref(self)
    }
    /// Free every allocation plugins made (after the micro-batch's backward).
    pub fn reset(&self) {
        self.device.lock().unwrap_or_else(PoisonError::into_inner).clear();
        self.host.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
    /// A guard that calls [`GpuOps::reset`] when dropped: a pass holds one, so plugin
    /// allocations are freed on its error paths (and panics) too.
    pub fn reset_on_drop(&self) -> ResetOnDrop<'_> {
        ResetOnDrop(self)
    }
    /// How many device allocations plugins hold now; see [`GpuOps::release_to`].
    pub fn mark(&self) -> usize {
        self.device.lock().unwrap().len()
    }
    /// Free the device allocations plugins made since `mark` (a layer's forward state once its
    /// backward is done, with the backward's temporaries).
    pub fn release_to(&self, mark: usize) {
        self.device.lock().unwrap().truncate(mark);
    }
    /// Take the metrics reported (in training) since the last call: each name's weighted mean.
    pub fn take_metrics(&self) -> BTreeMap<String, f64> {
        if let Err(e) = self.read_pending() {
            tracing::warn!("device metrics lost: {e}");
        }
        self.metrics.take()
    }
    /// Read the device metrics back into `metrics` (one copy; waits for the device).
    fn read_pending(&self) -> Result<(), String> {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let (Some(slots), n) = (&p.slots, p.names.len()) else { return Ok(()) };
        let values = self.gpu.to_f32(&slots.rows(0, n))?;
        for ((name, count), v) in std::mem::take(&mut p.names).into_iter().zip(values) {
            self.metrics.add(&name, v as f64 / count, count);
        }
        Ok(())
    }
    fn metric_sum_impl(&self, name: &str, sum: &Tensor, count: f64) -> Result<(), String> {
        if !self.context().training || count.is_nan() || count <= 0.0 {
            return Ok(());
        }
        if sum.device != Device::Cuda || sum.dtype != DType::F32 || sum.numel() == 0 {
            return Err(format!("a device f32 tensor, got {:?} {:?} on {:?}", sum.dtype, sum.dims(), sum.device));
        }
        if self.pending.lock().unwrap().names.len() == PENDING_SLOTS {
            self.read_pending()?;
        }
        let mut p = self.pending.lock().unwrap();
        if p.slots.is_none() {
            p.slots = Some(self.gpu.tensor(&[PENDING_SLOTS], DType::F32)?);
        }
        let slot = p.slots.as_ref().unwrap().rows(p.names.len(), 1);
        self.gpu.copy_d2d(&sum.rows(0, 1), &slot)?;
        p.names.push((name.to_string(), count));
        Ok(())
    }
    fn alloc_impl(&self, shape: &[usize], dtype: DType, device: Device, zeroed: bool) -> Result<Tensor, String> {
        if shape.len() > 4 {
            return Err(format!("alloc: {} dims; tensors have at most 4", shape.len()));
        }
        if device == Device::Cpu {
            let n = (shape.iter().product::<usize>() * dtype.size()).div_ceil(4);
            let buf = vec![0u32; n.max(1)];
            let t = Tensor::new(buf.as_ptr() as u64, dtype, Device::Cpu, shape);
            self.host.lock().unwrap().push(buf);
            return Ok(t);
        }
        let t = if zeroed { self.gpu.zeros(shape, dtype)? } else { self.gpu.tensor(shape, dtype)? };
        let view = t.t;
        self.device.lock().unwrap().push(t);
        Ok(view)
    }
    fn copy_impl(&self, src: Tensor, dst: Tensor) -> Result<(), String> {
        if src.dtype != dst.dtype || src.numel() != dst.numel() {
            let (a, b) = ((src.dtype, src.dims()), (dst.dtype, dst.dims()));
            return Err(format!("copy: {a:?} into {b:?}: dtype and size must match"));
        }
        let bytes = src.numel() * src.dtype.size();
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the views are valid for `bytes` during the call; `src` is only read.
        let (from, to) = (src.addr as *const u8, dst.addr as *mut u8);
        match (src.device, dst.device) {
            (Device::Cuda, Device::Cuda) => self.gpu.copy_d2d(&src, &dst),
            (Device::Cuda, Device::Cpu) => {
                self.gpu.download(&src, unsafe { std::slice::from_raw_parts_mut(to, bytes) })
            }
            (Device::Cpu, Device::Cuda) => {
                self.gpu.copy_to_device(unsafe { std::slice::from_raw_parts(from, bytes) }, dst.addr)
            }
            (Device::Cpu, Device::Cpu) => {
                unsafe { std::ptr::copy(from, to, bytes) };
                Ok(())
            }
        }
    }
    /// dst = src for a collective of one rank: both on this device, same dtype and size.
    fn identity(&self, what: &str, src: &Tensor, dst: &Tensor) -> Result<(), String> {
        on_gpu(&[src, dst], what)?;
        if src.dtype != dst.dtype || src.numel() != dst.numel() {
            let (a, b) = ((src.dtype, src.dims()), (dst.dtype, dst.dims()));
            return Err(format!("{what}: src {a:?} into dst {b:?}: with one rank dst is src (same dtype and size)"));
        }
        if src.numel() == 0 || src.addr == dst.addr {
            return Ok(());
        }
        self.gpu.copy_d2d(src, dst)
    }
    fn all_to_all_impl(&self, src: &Tensor, send: &[u64], dst: &Tensor, recv: &[u64]) -> Result<(), String> {
        if send.len() != 1 || recv.len() != 1 {
            let (s, r) = (send.len(), recv.len());
            return Err(format!("all_to_all: {s} send and {r} recv counts for a group of 1 rank; expected one each"));
        }
        let rows = |t: &Tensor| (t.rank > 0).then(|| t.dim(0) as u64);
        if send[0] != recv[0] || rows(src) != Some(send[0]) || rows(dst) != Some(recv[0]) {
            let (a, b) = (src.dims(), dst.dims());
            return Err(format!(
                "all_to_all: send {send:?}, recv {recv:?}, src {a:?}, dst {b:?}: with one rank every row stays, so \
                 send = recv = the rows of src and of dst"
            ));
        }
        self.identity("all_to_all", src, dst)
    }
}

/// dst must hold `mul_dst/mul_src` times src's elements, same dtype, both on the device.
fn sized(src: &Tensor, dst: &Tensor, mul_dst: usize, mul_src: usize, what: &str) -> Result<(), String> {
    on_gpu(&[src, dst], what)?;
    if src.dtype != dst.dtype || src.numel() * mul_dst != dst.numel() * mul_src {
        let (a, b) = ((src.dtype, src.dims()), (dst.dtype, dst.dims()));
        return Err(format!("{what}: src {a:?} and dst {b:?}: same dtype, dst {mul_dst}/{mul_src} of src's size"));
    }
    Ok(())
}

impl Ops for GpuOps {
    fn device(&self) -> Device {
        Device::Cuda
    }
    fn alloc(&self, shape: RSlice<'_, u64>, dtype: DType, device: Device, zeroed: bool) -> RResult<Tensor, RString> {
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        res(self.alloc_impl(&dims, dtype, device, zeroed))
    }
    fn gemm(&self, a: Tensor, b: Tensor, c: Tensor, ta: bool, tb: bool, alpha: f32, beta: f32) -> RResult<(), RString> {
        res(on_gpu(&[&a, &b, &c], "gemm").and_then(|_| self.gpu.gemm(&a, &b, &c, ta, tb, alpha, beta)))
    }
    fn grouped_gemm(
        &self,
        x: Tensor,
        w: Tensor,
        y: Tensor,
        offsets: Tensor,
        trans_w: bool,
        acc: bool,
    ) -> RResult<(), RString> {
        res(on_gpu(&[&x, &w, &y], "grouped_gemm")
            .and_then(|_| offsets_of(&offsets, x.dim(0)))
            .and_then(|o| self.gpu.grouped_gemm(&x, &w, &y, &o, trans_w, acc)))
    }
    fn grouped_gemm_wgrad(&self, x: Tensor, dy: Tensor, dw: Tensor, offsets: Tensor) -> RResult<(), RString> {
        res(on_gpu(&[&x, &dy, &dw], "grouped_gemm_wgrad")
            .and_then(|_| offsets_of(&offsets, x.dim(0)))
            .and_then(|o| self.gpu.grouped_wgrad(&x, &dy, &dw, &o)))
    }
    fn copy(&self, src: Tensor, dst: Tensor) -> RResult<(), RString> {
        res(self.copy_impl(src, dst))
    }
    fn compile(&self, source: RStr<'_>) -> RResult<(), RString> {
        res(self.gpu.module(source.as_str()).map(|_| ()))
    }
    fn launch(&self, source: RStr<'_>, name: RStr<'_>, d: LaunchDims, args: RSlice<'_, Arg>) -> RResult<(), RString> {
        res(self.gpu.launch(source.as_str(), name.as_str(), (d.grid, d.block, d.shared_mem), &args))
    }
    fn metric(&self, name: RStr<'_>, value: f64, weight: f64) {
        if self.context().training {
            self.metrics.add(name.as_str(), value, weight);
        }
    }
    fn context(&self) -> Context {
        self.calls.get()
    }
    fn metric_sum(&self, name: RStr<'_>, sum: Tensor, count: f64) {
        if let Err(e) = self.metric_sum_impl(name.as_str(), &sum, count) {
            tracing::warn!("metric `{name}` not recorded: {e}");
        }
    }
    fn gemm_batched(&self, a: Tensor, b: Tensor, c: Tensor, ta: bool, tb: bool, alpha: f32, beta: f32) -> Res<()> {
        res(on_gpu(&[&a, &b, &c], "gemm_batched").and_then(|_| self.gpu.gemm_batched(&a, &b, &c, ta, tb, alpha, beta)))
    }
    fn rank(&self, g: Group) -> u32 {
        self.parallel.as_ref().map_or(0, |p| p.0.rank_in(g).0 as u32)
    }
    fn size(&self, g: Group) -> u32 {
        self.parallel.as_ref().map_or(1, |p| p.0.rank_in(g).1 as u32)
    }
    fn all_reduce(&self, t: Tensor, op: ReduceOp, g: Group) -> Res<()> {
        res(on_gpu(&[&t], "all_reduce").and_then(|_| match self.nccl_for(g) {
            Some((n, _)) => n.all_reduce(&self.gpu, &t, op, g),
            None => Ok(()),
        }))
    }
    fn all_gather(&self, src: Tensor, dst: Tensor, g: Group) -> Res<()> {
        res(match self.nccl_for(g) {
            Some((n, size)) => {
                sized(&src, &dst, size, 1, "all_gather").and_then(|_| n.all_gather(&self.gpu, &src, &dst, g))
            }
            None => self.identity("all_gather", &src, &dst),
        })
    }
    fn reduce_scatter(&self, src: Tensor, dst: Tensor, g: Group) -> Res<()> {
        res(match self.nccl_for(g) {
            Some((n, size)) => {
                sized(&src, &dst, 1, size, "reduce_scatter").and_then(|_| n.reduce_scatter(&self.gpu, &src, &dst, g))
            }
            None => self.identity("reduce_scatter", &src, &dst),
        })
    }
    fn all_to_all(&self, src: Tensor, send: RSlice<'_, u64>, dst: Tensor, recv: RSlice<'_, u64>, g: Group) -> Res<()> {
        res(match self.nccl_for(g) {
            Some((n, size)) => {
                let row = |t: &Tensor| if t.rank == 0 || t.dim(0) == 0 { 0 } else { t.numel() / t.dim(0) };
                let w = row(&src).max(row(&dst));
                let (s, r): (Vec<usize>, Vec<usize>) =
                    (send.iter().map(|&c| c as usize * w).collect(), recv.iter().map(|&c| c as usize * w).collect());
                if s.len() != size
                    || r.len() != size
                    || s.iter().sum::<usize>() != src.numel()
                    || r.iter().sum::<usize>() != dst.numel()
                {
                    Err(format!(
                        "all_to_all: send {send:?} and recv {recv:?} rows over {} ranks must add up to src {:?} and dst {:?}",
                        size,
                        src.dims(),
                        dst.dims()
                    ))
                } else {
                    on_gpu(&[&src, &dst], "all_to_all").and_then(|_| n.all_to_all(&self.gpu, (&src, &s), (&dst, &r), g))
                }
            }
            None => self.all_to_all_impl(&src, &send, &dst, &recv),
        })
    }
}

type Res<T> = RResult<T, RString>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_weighted_means_and_taken_once() {
        let m = Metrics::default();
        m.add("load", 1.0, 1.0);
        m.add("load", 4.0, 3.0);
        m.add("drop", 0.5, 2.0);
        m.add("none", 7.0, 0.0);
        m.add("load", 9.0, -1.0);
        let got = m.take();
        assert_eq!(got.into_iter().collect::<Vec<_>>(), [("drop".into(), 0.5), ("load".to_string(), 13.0 / 4.0)]);
        assert!(m.take().is_empty(), "take clears");
    }

    /// Context, metrics only in training, and the one-rank collectives with their errors.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn one_rank_collectives_context_and_metrics() {
        let ops = GpuOps::new(Arc::new(crate::gpu::tests::gpu()));
        let h = pith_plugin_api::Host::new(&ops);
        assert_eq!(h.context(), DEFAULT_CONTEXT);
        h.metric_weighted("eval", 1.0, 1.0);
        let train =
            Context { step: 3, micro_batch: 1, micro_batches: 2, batch: 4, seq: 8, layer: 2, training: true, seed: 9 };
        ops.set_context(train);
        assert_eq!(h.context(), train);
        h.metric_weighted("x", 2.0, 1.0);
        h.metric_weighted("x", 5.0, 2.0);
        // Device metrics: sums over counts, read back when taken, mixed with host ones by name.
        let sums = ops.gpu.upload(&[6f32, 3.0], &[2], DType::F32).unwrap();
        h.metric_sum("x", sums.rows(0, 1), 3.0);
        h.metric_sum("y", sums.rows(1, 1), 2.0);
        h.metric_sum("y", sums.rows(1, 1), 0.0);
        ops.gpu.zero(&sums).unwrap(); // recorded values were copied when recorded
        let want = [("x".to_string(), (2.0 + 10.0 + 6.0) / 6.0), ("y".to_string(), 1.5)];
        assert_eq!(ops.take_metrics().into_iter().collect::<Vec<_>>(), want);
        assert!(ops.take_metrics().is_empty());
        for g in [Group::World, Group::DataParallel, Group::ExpertParallel] {
            assert_eq!((h.rank(g), h.size(g)), (0, 1));
        }
        let src = ops.gpu.upload(&[1f32, 2., 3., 4., 5., 6.], &[3, 2], DType::F32).unwrap();
        let dst = ops.gpu.zeros(&[3, 2], DType::F32).unwrap();
        h.all_reduce(src.t, ReduceOp::Sum, Group::DataParallel).unwrap();
        assert_eq!(ops.gpu.to_f32(&src).unwrap(), [1., 2., 3., 4., 5., 6.]);
        let host = Tensor::new(8, DType::F32, Device::Cpu, &[1]);
        assert!(h.all_reduce(host, ReduceOp::Max, Group::World).unwrap_err().contains("expected device tensors"));
        type Coll<'a> = &'a dyn Fn(Tensor, Tensor) -> Result<(), String>;
        let (gather, scatter) =
            (|s, d| h.all_gather(s, d, Group::World), |s, d| h.reduce_scatter(s, d, Group::DataParallel));
        for f in [&gather as Coll, &scatter] {
            ops.gpu.zero(&dst).unwrap();
            f(src.t, dst.t).unwrap();
            assert_eq!(ops.gpu.to_f32(&dst).unwrap(), [1., 2., 3., 4., 5., 6.]);
        }
        let short = ops.gpu.zeros(&[2, 2], DType::F32).unwrap();
        assert!(h.all_gather(src.t, short.t, Group::World).unwrap_err().contains("same dtype and size"));
        ops.gpu.zero(&dst).unwrap();
        h.all_to_all(src.t, &[3], dst.t, &[3], Group::ExpertParallel).unwrap();
        assert_eq!(ops.gpu.to_f32(&dst).unwrap(), [1., 2., 3., 4., 5., 6.]);
        for (send, recv) in [(&[3u64][..], &[2u64][..]), (&[2], &[2]), (&[3, 0], &[3, 0])] {
            let e = h.all_to_all(src.t, send, dst.t, recv, Group::ExpertParallel).unwrap_err();
            assert!(e.starts_with("all_to_all: "), "{e}");
        }
    }
}
