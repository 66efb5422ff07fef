//! The CPU backend's ops table: what plugins call for memory, GEMMs and metrics on the CPU.
//! f32 only; GEMMs through `matrixmultiply` (multithreaded), which takes strides, so a
//! transpose is just a stride swap.

use crate::gpu::ops::Metrics;
use crate::parallel::Parallel;
use abi_stable::std_types::{RResult, RSlice, RStr, RString};
use pith_plugin_api::abi::{Ops, OpsRef};
use pith_plugin_api::{Arg, Context, DType, Device, Group, LaunchDims, ReduceOp, Tensor};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Host-owned memory for plugin allocations (freed by [`CpuOps::reset`] after each micro-batch),
/// the metrics plugins reported during the step, and where the current call sits.
#[derive(Default)]
pub struct CpuOps {
    arena: Mutex<Vec<Vec<u32>>>,
    metrics: Metrics,
    context: Calls,
    /// The job's ranks, when there are several (collectives go over the process group).
    parallel: Option<Arc<Parallel>>,
}

/// The [`Context`] components see: the trainer sets the step's part, the model each layer's.
#[derive(Default)]
pub struct Calls(Mutex<(Context, u64)>);

impl Calls {
    /// Set by the trainer before a micro-batch (or eval: `training` false); `run_seed` is
    /// `train.seed`. The layout is `batch` sequences of `seq` tokens.
    pub fn set(&self, c: Context, run_seed: u64) {
        *self.0.lock().unwrap() = (c, run_seed);
    }
    /// Set by the model before layer `layer`'s MoE block: its seed mixes (run seed, step,
    /// micro-batch, layer), so a resumed run draws the same random numbers.
    pub fn set_layer(&self, layer: usize) {
        let mut g = self.0.lock().unwrap();
        let (c, run) = &mut *g;
        c.layer = layer as u32;
        // splitmix64 over each part in turn: no two (run, step, micro-batch, layer) collide by shifting.
        let mix = |z: u64, v: u64| {
            let mut z = (z ^ v).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        c.seed = [c.step, c.micro_batch as u64, layer as u64].into_iter().fold(mix(0, *run), mix);
    }
    pub fn get(&self) -> Context {
        self.0.lock().unwrap().0
    }
}

/// One rank's collectives (CPU runs and single-GPU runs): every group has one member.
pub fn one_rank_collective(src: &Tensor, dst: &Tensor, what: &str) -> Result<bool, String> {
    if src.numel() != dst.numel() || src.dtype != dst.dtype {
        return Err(format!("{what} on one rank: src {:?} and dst {:?} must match", src.dims(), dst.dims()));
    }
    Ok(src.addr != dst.addr)
}

/// A CPU tensor view of a host slice that components only read (the slice must outlive
/// every use of the view).
pub fn view(data: &[f32], shape: &[usize]) -> Tensor {
    assert_eq!(data.len(), shape.iter().product::<usize>(), "view shape {shape:?}");
    Tensor::new(data.as_ptr() as u64, DType::F32, Device::Cpu, shape)
}

/// A CPU tensor view that components may write (outputs, gradients, optimizer state).
pub fn view_mut(data: &mut [f32], shape: &[usize]) -> Tensor {
    assert_eq!(data.len(), shape.iter().product::<usize>(), "view shape {shape:?}");
    Tensor::new(data.as_mut_ptr() as u64, DType::F32, Device::Cpu, shape)
}

/// A CPU i32 tensor view of a host slice.
pub fn view_i32(data: &[i32], shape: &[usize]) -> Tensor {
    assert_eq!(data.len(), shape.iter().product::<usize>(), "view shape {shape:?}");
    Tensor::new(data.as_ptr() as u64, DType::I32, Device::Cpu, shape)
}

/// C = alpha · op(A) · op(B) + beta · C on row-major slices; op(A) is m×k, op(B) is k×n.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    beta: f32,
    c: &mut [f32],
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "sgemm sizes");
    if m == 0 || n == 0 {
        return;
    }
    let (rsa, csa) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

fn check(t: &Tensor, rank: usize, what: &str) -> Result<(), String> {
    if t.device != Device::Cpu || t.dtype != DType::F32 || t.rank as usize != rank {
        return Err(format!(
            "{what}: expected a {rank}-D f32 CPU tensor, got {:?} {:?} {:?}",
            t.dims(),
            t.dtype,
            t.device
        ));
    }
    Ok(())
}

/// Fail unless output `out` shares no memory with `ins`, so that a mutable slice of it aliases
/// nothing the same call reads (the contract of `Tensor::f32s_mut`).
fn apart(out: &Tensor, ins: &[&Tensor], what: &str) -> Result<(), String> {
    let span = |t: &Tensor| (t.addr, t.addr + (t.numel() * t.dtype.size()) as u64);
    let (a, b) = span(out);
    match ins.iter().find(|t| t.numel() > 0 && a < span(t).1 && span(t).0 < b) {
        Some(t) => Err(format!("{what}: the output {:?} overlaps the input {:?}", out.dims(), t.dims())),
        None => Ok(()),
    }
}

fn offsets_of(t: &Tensor, groups: usize, rows: usize) -> Result<Vec<usize>, String> {
    let o = t.i32s();
    if o.len() != groups + 1 || o[0] != 0 || o[groups] as usize != rows || o.windows(2).any(|w| w[0] > w[1]) {
        return Err(format!("grouped gemm: offsets must be {} non-decreasing values from 0 to {rows}", groups + 1));
    }
    Ok(o.iter().map(|&v| v as usize).collect())
}

impl CpuOps {
    pub fn ops(&self) -> OpsRef<'_> {
        pith_plugin_api::abi::ops_ref(self)
    }
    /// Free every allocation plugins made (call after the micro-batch's backward).
    pub fn reset(&self) {
        self.arena.lock().unwrap().clear();
    }
    /// Take the metrics reported since the last call (weighted means per name).
    pub fn take_metrics(&self) -> BTreeMap<String, f64> {
        self.metrics.take()
    }
    /// Where the next calls sit (see [`Calls`]).
    pub fn calls(&self) -> &Calls {
        &self.context
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_impl(
        &self,
        a: Tensor,
        b: Tensor,
        c: Tensor,
        ta: bool,
        tb: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<(), String> {
        check(&a, 2, "gemm a")?;
        check(&b, 2, "gemm b")?;
        check(&c, 2, "gemm c")?;
        let (m, k) = if ta { (a.dim(1), a.dim(0)) } else { (a.dim(0), a.dim(1)) };
        let (k2, n) = if tb { (b.dim(1), b.dim(0)) } else { (b.dim(0), b.dim(1)) };
        if k != k2 || c.dim(0) != m || c.dim(1) != n {
            return Err(format!("gemm: shapes {:?} x {:?} -> {:?} do not match", a.dims(), b.dims(), c.dims()));
        }
        apart(&c, &[&a, &b], "gemm")?;
        // SAFETY: c overlaps neither input, and nothing else views it during this call.
        sgemm(m, k, n, alpha, a.f32s(), ta, b.f32s(), tb, beta, unsafe { c.f32s_mut() });
        Ok(())
    }

    fn grouped_impl(
        &self,
        x: Tensor,
        w: Tensor,
        y: Tensor,
        offsets: Tensor,
        trans_w: bool,
        acc: bool,
    ) -> Result<(), String> {
        check(&x, 2, "grouped gemm x")?;
        check(&w, 3, "grouped gemm w")?;
        check(&y, 2, "grouped gemm y")?;
        let (g, kk, nn) = if trans_w { (w.dim(0), w.dim(2), w.dim(1)) } else { (w.dim(0), w.dim(1), w.dim(2)) };
        if x.dim(1) != kk || y.dim(1) != nn || x.dim(0) != y.dim(0) {
            return Err(format!("grouped gemm: shapes {:?} x {:?} -> {:?} do not match", x.dims(), w.dims(), y.dims()));
        }
        let off = offsets_of(&offsets, g, x.dim(0))?;
        apart(&y, &[&x, &w, &offsets], "grouped gemm")?;
        // SAFETY: y overlaps no input, and nothing else views it during this call.
        let (xs, ws, ys) = (x.f32s(), w.f32s(), unsafe { y.f32s_mut() });
        for e in 0..g {
            let (r0, r1) = (off[e], off[e + 1]);
            sgemm(
                r1 - r0,
                kk,
                nn,
                1.0,
                &xs[r0 * kk..r1 * kk],
                false,
                &ws[e * kk * nn..(e + 1) * kk * nn],
                trans_w,
                if acc { 1.0 } else { 0.0 },
                &mut ys[r0 * nn..r1 * nn],
            );
        }
        Ok(())
    }

    fn wgrad_impl(&self, x: Tensor, dy: Tensor, dw: Tensor, offsets: Tensor) -> Result<(), String> {
        check(&x, 2, "grouped wgrad x")?;
        check(&dy, 2, "grouped wgrad dy")?;
        check(&dw, 3, "grouped wgrad dw")?;
        let (g, kk, nn) = (dw.dim(0), dw.dim(1), dw.dim(2));
        if x.dim(1) != kk || dy.dim(1) != nn || x.dim(0) != dy.dim(0) {
            return Err(format!(
                "grouped wgrad: shapes {:?}, {:?} -> {:?} do not match",
                x.dims(),
                dy.dims(),
                dw.dims()
            ));
        }
        let off = offsets_of(&offsets, g, x.dim(0))?;
        apart(&dw, &[&x, &dy, &offsets], "grouped wgrad")?;
        // SAFETY: dw overlaps no input, and nothing else views it during this call.
        let (xs, dys, dws) = (x.f32s(), dy.f32s(), unsafe { dw.f32s_mut() });
        for e in 0..g {
            let (r0, r1) = (off[e], off[e + 1]);
            sgemm(
                kk,
                r1 - r0,
                nn,
                1.0,
                &xs[r0 * kk..r1 * kk],
                true,
                &dys[r0 * nn..r1 * nn],
                false,
                1.0,
                &mut dws[e * kk * nn..(e + 1) * kk * nn],
            );
        }
        Ok(())
    }
}

const NO_KERNELS: &str = "the CPU backend runs no CUDA kernels: a component runs its own CPU code on Device::Cpu";

impl Ops for CpuOps {
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn alloc(&self, shape: RSlice<'_, u64>, dtype: DType, _device: Device, _zeroed: bool) -> RResult<Tensor, RString> {
        if dtype.size() != 4 || shape.len() > 4 {
            return RResult::RErr(format!("cpu alloc: {dtype:?} with {} dims is not supported", shape.len()).into());
        }
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let buf = vec![0u32; dims.iter().product::<usize>().max(1)];
        let t = Tensor::new(buf.as_ptr() as u64, dtype, Device::Cpu, &dims);
        self.arena.lock().unwrap().push(buf);
        RResult::ROk(t)
    }
    fn gemm(&self, a: Tensor, b: Tensor, c: Tensor, ta: bool, tb: bool, alpha: f32, beta: f32) -> RResult<(), RString> {
        self.gemm_impl(a, b, c, ta, tb, alpha, beta).map_err(RString::from).into()
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
        self.grouped_impl(x, w, y, offsets, trans_w, acc).map_err(RString::from).into()
    }
    fn grouped_gemm_wgrad(&self, x: Tensor, dy: Tensor, dw: Tensor, offsets: Tensor) -> RResult<(), RString> {
        self.wgrad_impl(x, dy, dw, offsets).map_err(RString::from).into()
    }
    fn copy(&self, src: Tensor, dst: Tensor) -> RResult<(), RString> {
        if src.device != Device::Cpu || dst.device != Device::Cpu {
            return RResult::RErr("cpu copy: both tensors must be on the CPU".into());
        }
        if src.dtype != dst.dtype || src.numel() != dst.numel() {
            let (a, b) = ((src.dtype, src.dims()), (dst.dtype, dst.dims()));
            return RResult::RErr(format!("copy: {a:?} into {b:?}: dtype and size must match").into());
        }
        let n = src.numel() * src.dtype.size();
        unsafe { std::ptr::copy(src.addr as *const u8, dst.addr as *mut u8, n) };
        RResult::ROk(())
    }
    fn compile(&self, _source: RStr<'_>) -> RResult<(), RString> {
        RResult::RErr(NO_KERNELS.into())
    }
    fn launch(&self, _s: RStr<'_>, _n: RStr<'_>, _d: LaunchDims, _a: RSlice<'_, Arg>) -> RResult<(), RString> {
        RResult::RErr(NO_KERNELS.into())
    }
    fn metric(&self, name: RStr<'_>, value: f64, weight: f64) {
        if self.context.get().training {
            self.metrics.add(name.as_str(), value, weight);
        }
    }
    fn context(&self) -> Context {
        self.context.get()
    }
    fn metric_sum(&self, name: RStr<'_>, sum: Tensor, count: f64) {
        if count > 0.0 && sum.device == Device::Cpu && sum.dtype == DType::F32 && sum.numel() > 0 {
            self.metric(name, sum.f32s()[0] as f64 / count, count)
        }
    }
    fn gemm_batched(
        &self,
        a: Tensor,
        b: Tensor,
        c: Tensor,
        ta: bool,
        tb: bool,
        alpha: f32,
        beta: f32,
    ) -> RResult<(), RString> {
        let batched = || -> Result<(), String> {
            let (ad, bd, cd) = (a.dims(), b.dims(), c.dims());
            if ad.len() != 3 || bd.len() != 3 || cd.len() != 3 || ad[0] != bd[0] || ad[0] != cd[0] {
                return Err(format!("gemm_batched: a {ad:?}, b {bd:?}, c {cd:?} must be 3-D with one batch size"));
            }
            let at = |t: &Tensor, g: usize| {
                let (r, c) = (t.dim(1), t.dim(2));
                Tensor::new(t.addr + (g * r * c * 4) as u64, t.dtype, t.device, &[r, c])
            };
            (0..ad[0]).try_for_each(|g| self.gemm_impl(at(&a, g), at(&b, g), at(&c, g), ta, tb, alpha, beta))
        };
        batched().map_err(RString::from).into()
    }
    fn rank(&self, group: Group) -> u32 {
        self.parallel.as_ref().map_or(0, |p| p.rank_in(group).0 as u32)
    }
    fn size(&self, group: Group) -> u32 {
        self.parallel.as_ref().map_or(1, |p| p.rank_in(group).1 as u32)
    }
    fn all_reduce(&self, t: Tensor, op: ReduceOp, group: Group) -> RResult<(), RString> {
        let Some(p) = self.parallel.as_ref().filter(|_| self.size(group) > 1) else { return RResult::ROk(()) };
        let r = match (t.dtype, op) {
            // SAFETY: `t` is the collective's in-place buffer; nothing else views it during the call.
            (DType::F32, ReduceOp::Sum) => p.sum_f32(group, unsafe { t.f32s_mut() }),
            (DType::F32, ReduceOp::Max) => p.max_f32(group, unsafe { t.f32s_mut() }),
            (DType::F32, ReduceOp::Min) => p.min_f32(group, unsafe { t.f32s_mut() }),
            (DType::I32, ReduceOp::Sum) => p.sum_i32(group, unsafe { t.i32s_mut() }),
            (d, o) => Err(format!("all_reduce: {o:?} of {d:?} on the CPU; f32 (sum, max, min) or i32 (sum)")),
        };
        r.map_err(RString::from).into()
    }
    fn all_gather(&self, src: Tensor, dst: Tensor, group: Group) -> RResult<(), RString> {
        match self.parallel.as_ref().filter(|_| self.size(group) > 1) {
            // SAFETY: dst is the output, apart from src.
            Some(p) => f32_pair(&src, &dst, "all_gather")
                .and_then(|_| p.all_gather_f32(group, src.f32s(), unsafe { dst.f32s_mut() }))
                .map_err(RString::from)
                .into(),
            None => self.collective_copy(src, dst, "all_gather"),
        }
    }
    fn reduce_scatter(&self, src: Tensor, dst: Tensor, group: Group) -> RResult<(), RString> {
        match self.parallel.as_ref().filter(|_| self.size(group) > 1) {
            // SAFETY: dst is the output, apart from src.
            Some(p) => f32_pair(&src, &dst, "reduce_scatter")
                .and_then(|_| p.reduce_scatter_f32(group, src.f32s(), unsafe { dst.f32s_mut() }))
                .map_err(RString::from)
                .into(),
            None => self.collective_copy(src, dst, "reduce_scatter"),
        }
    }
    fn all_to_all(
        &self,
        src: Tensor,
        send: RSlice<'_, u64>,
        dst: Tensor,
        recv: RSlice<'_, u64>,
        g: Group,
    ) -> RResult<(), RString> {
        if let Some(p) = self.parallel.as_ref().filter(|_| self.size(g) > 1) {
            let row = |t: &Tensor| if t.rank == 0 || t.dim(0) == 0 { 0 } else { t.numel() / t.dim(0) };
            let width = row(&src).max(row(&dst));
            let elems = |c: &[u64]| c.iter().map(|&r| r as usize * width).collect::<Vec<_>>();
            let (s, r) = (elems(send.as_slice()), elems(recv.as_slice()));
            // SAFETY: dst is the output, apart from src.
            let res = f32_pair(&src, &dst, "all_to_all")
                .and_then(|_| p.all_to_all_f32(g, src.f32s(), &s, unsafe { dst.f32s_mut() }, &r));
            return res.map_err(RString::from).into();
        }
        if send.as_slice() != [src.dim(0) as u64] || recv.as_slice() != [dst.dim(0) as u64] {
            let e = format!(
                "all_to_all on one rank: send {send:?} must be [{}], recv {recv:?} [{}]",
                src.dim(0),
                dst.dim(0)
            );
            return RResult::RErr(e.into());
        }
        self.collective_copy(src, dst, "all_to_all")
    }
}

/// Collectives across processes on the CPU move f32 host tensors.
fn f32_pair(src: &Tensor, dst: &Tensor, what: &str) -> Result<(), String> {
    let ok = |t: &Tensor| t.dtype == DType::F32 && t.device == Device::Cpu;
    if ok(src) && ok(dst) {
        return Ok(());
    }
    Err(format!("{what}: f32 host tensors on the CPU, got {:?} and {:?}", src.dtype, dst.dtype))
}

impl CpuOps {
    /// The ops of one rank of a multi-process job.
    pub fn with_parallel(parallel: Arc<Parallel>) -> CpuOps {
        CpuOps { parallel: (parallel.size > 1).then_some(parallel), ..CpuOps::default() }
    }
    fn collective_copy(&self, src: Tensor, dst: Tensor, what: &str) -> RResult<(), RString> {
        match one_rank_collective(&src, &dst, what) {
            Ok(true) => self.copy(src, dst),
            Ok(false) => RResult::ROk(()),
            Err(e) => RResult::RErr(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f32], ta: bool, b: &[f32], tb: bool) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    c[i * n + j] += av * bv;
                }
            }
        }
        c
    }

    #[test]
    fn sgemm_matches_naive_for_all_transposes() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.71).cos()).collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut c = vec![1.0; m * n];
            sgemm(m, k, n, 2.0, &a, ta, &b, tb, 0.5, &mut c);
            let r = naive(m, k, n, &a, ta, &b, tb);
            for (x, y) in c.iter().zip(&r) {
                assert!((x - (2.0 * y + 0.5)).abs() < 1e-5, "{ta} {tb}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn grouped_gemm_matches_per_group_gemm_and_rejects_bad_offsets() {
        let ops = CpuOps::default();
        let (g, kk, nn, rows) = (3, 4, 2, 6);
        let x: Vec<f32> = (0..rows * kk).map(|i| (i as f32 * 0.3).sin()).collect();
        let w: Vec<f32> = (0..g * kk * nn).map(|i| (i as f32 * 0.9).cos()).collect();
        let off = [0, 2, 2, 6];
        let mut y = vec![0.0; rows * nn];
        let (tx, tw, ty, to) =
            (view(&x, &[rows, kk]), view(&w, &[g, kk, nn]), view_mut(&mut y, &[rows, nn]), view_i32(&off, &[g + 1]));
        ops.grouped_gemm(tx, tw, ty, to, false, false).unwrap();
        for e in 0..g {
            let r = naive(
                off[e + 1] as usize - off[e] as usize,
                kk,
                nn,
                &x[off[e] as usize * kk..off[e + 1] as usize * kk],
                false,
                &w[e * kk * nn..(e + 1) * kk * nn],
                false,
            );
            assert_eq!(r.len(), (off[e + 1] - off[e]) as usize * nn);
            for (i, v) in r.iter().enumerate() {
                assert!((y[off[e] as usize * nn + i] - v).abs() < 1e-5);
            }
        }
        y.iter_mut().for_each(|v| *v = 0.0);
        let bad = [0, 3, 2, 6];
        assert!(ops.grouped_gemm(tx, tw, ty, view_i32(&bad, &[4]), false, false).is_err());
    }

    #[test]
    fn gemm_refuses_an_output_that_overlaps_an_input() {
        let ops = CpuOps::default();
        let (mut a, mut c) = (vec![1.0f32; 4], vec![0.0f32; 4]);
        let (ta, tc) = (view_mut(&mut a, &[2, 2]), view_mut(&mut c, &[2, 2]));
        let e = ops.gemm(ta, ta, ta, false, false, 1.0, 0.0).into_result().unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        let w = view(&a[..], &[1, 2, 2]);
        let e = ops.grouped_gemm(ta, w, ta, view_i32(&[0, 2], &[2]), false, false).into_result().unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        ops.gemm(ta, ta, tc, false, false, 1.0, 0.0).unwrap();
        assert_eq!(c, [2.0; 4]);
    }
}
