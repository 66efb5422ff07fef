//! The plugin kit: what most components need beside the traits — the activations' dtype, launch
//! grids, reproducible random numbers, the shared CUDA helpers — and [`TestHost`], the host's
//! services on the CPU, so a plugin's own `cargo test` runs its forward, backward and step
//! without Pith.

use crate::abi::{self, Arg, Context, DType, Device, Group, LaunchDims, ModelDims, ReduceOp, Res, RouterOut, Tensor};
use crate::{Host, Result};
use abi_stable::std_types::{RSlice, RStr, RString};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// The dtype of activations (x, y, dx, dy) and of parameters' working copies on `h`'s device:
/// f32 on the CPU, bf16 on CUDA. Router logits, probs and gates, master weights, gradients and
/// optimizer state are f32 on both.
pub fn act_dtype(h: &Host) -> DType {
    match h.device() {
        Device::Cpu => DType::F32,
        Device::Cuda => DType::BF16,
    }
}

/// A one-line error unless `h` is the CPU, for a component `who` without a CUDA path (yet).
pub fn require_cpu(h: &Host, who: &str) -> Result<()> {
    match h.device() {
        Device::Cpu => Ok(()),
        Device::Cuda => Err(format!("`{who}` has a CPU path only; use `train.device = \"cpu\"`")),
    }
}

/// The grid of a 1-D grid-stride launch over `n` items with `block` threads per block: a thread
/// per item, at least one block (an empty input is a valid launch), at most 65535 blocks.
pub fn grid(n: usize, block: u32) -> [u32; 3] {
    [n.div_ceil(block.max(1) as usize).clamp(1, 65535) as u32, 1, 1]
}

/// Device helpers for kernels (`warp_sum`, `warp_max`, `softmax_stats`, `block_sum`, bf16
/// `load8`/`store8`; includes `cuda_bf16.h`), to put in front of a component's CUDA source.
pub const COMMON_CUH: &str = include_str!("../kernels/common.cuh");

/// [`COMMON_CUH`] followed by `src`. [`kernel_source!`](crate::kernel_source) does it once per call site.
pub fn with_common(src: &str) -> String {
    format!("{COMMON_CUH}\n{src}")
}

/// A `&'static str` of [`kit::COMMON_CUH`](crate::kit::COMMON_CUH) followed by `$src`, built on
/// first use: `h.launch(kernel_source!(include_str!("../kernels/mine.cu")), "my_kernel", ..)`.
#[macro_export]
macro_rules! kernel_source {
    ($src:expr) => {{
        static SOURCE: ::std::sync::OnceLock<::std::string::String> = ::std::sync::OnceLock::new();
        SOURCE.get_or_init(|| $crate::kit::with_common($src)).as_str()
    }};
}

/// A small reproducible random generator (xoshiro256**, seeded through splitmix64). Draw from
/// `Rng::from_context(h.context(), stream)`: the same run seed, step, micro-batch and layer give
/// the same numbers, so a resumed run draws what the original drew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng([u64; 4]);

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let z = (*x ^ (*x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut s = seed;
        Rng([(); 4].map(|_| splitmix64(&mut s)))
    }
    /// The generator of one call's context; a different `stream` per use (noise, dropout, ...)
    /// keeps the uses independent.
    pub fn from_context(ctx: Context, stream: u64) -> Rng {
        let mut s = ctx.seed;
        Rng::new(splitmix64(&mut s) ^ stream)
    }
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let unit = |r: &mut Rng| (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let (u1, u2) = (1.0 - unit(self), unit(self));
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// A balance loss's value: its `forward` accumulated into a zeroed [1] scalar, read back (a test
/// or check helper; the host itself reads the scalars once per micro-batch).
pub fn loss_value<L: crate::BalanceLoss + ?Sized>(l: &L, h: Host, p: &[Tensor], route: &RouterOut) -> Result<f32> {
    let loss = h.alloc_f32(&[1])?;
    l.forward(h, p, route, loss)?;
    Ok(h.read_f32(loss)?[0])
}

/// Fail unless `t` is a `dtype` tensor on `device` of shape `want` (a 0 in `want` matches any
/// size): the check a component makes of each tensor it is given, with `what` naming it.
pub fn expect(t: &Tensor, dtype: DType, device: Device, want: &[usize], what: &str) -> Result<()> {
    let dims = t.dims();
    let fits = dims.len() == want.len() && dims.iter().zip(want).all(|(&d, &w)| w == 0 || d == w);
    if !fits || t.dtype != dtype || t.device != device {
        let want: Vec<String> = want.iter().map(|&w| if w == 0 { "_".into() } else { w.to_string() }).collect();
        return Err(format!(
            "{what}: expected a {dtype:?} {device:?} tensor of shape [{}], got {:?} {dims:?} on {:?}",
            want.join(", "),
            t.dtype,
            t.device
        ));
    }
    Ok(())
}

/// Sizes as `I32` kernel arguments.
pub fn ints<const N: usize>(v: [usize; N]) -> [Arg; N] {
    v.map(|v| Arg::I32(v as i32))
}

/// The kinds of a CUDA kernel's parameters from its signature in `src` (`extern "C" __global__
/// void name(...)`): `p` pointer, `i` int, `u` unsigned, `l` long long, `f` float. A unit test
/// compares it with [`arg_kinds`] of the arguments a component launches it with.
pub fn kernel_params(src: &str, name: &str) -> String {
    let head = format!("extern \"C\" __global__ void {name}(");
    let at = src.find(&head).unwrap_or_else(|| panic!("kernel {name} not in the source")) + head.len();
    let params = &src[at..at + src[at..].find(')').unwrap()];
    let kind = |p: &str| match p.trim() {
        p if p.contains('*') => 'p',
        p if p.starts_with("long long") => 'l',
        p if p.starts_with("unsigned") => 'u',
        p if p.starts_with("int") => 'i',
        p if p.starts_with("float") => 'f',
        p => panic!("{name}: parameter `{p}`"),
    };
    params.split(',').map(kind).collect()
}

/// The kinds of launch arguments, as [`kernel_params`] writes them.
pub fn arg_kinds(args: &[Arg]) -> String {
    let kind = |a: &Arg| match a {
        Arg::Ptr(_) => 'p',
        Arg::I32(_) => 'i',
        Arg::U32(_) => 'u',
        Arg::I64(_) => 'l',
        Arg::F32(_) => 'f',
    };
    args.iter().map(kind).collect()
}

/// Model sizes for a unit test: one rank holding all `experts`, layer 0 of 1.
pub fn test_dims(hidden: usize, experts: usize, expert_ffn: usize) -> ModelDims {
    let (hidden, experts, expert_ffn) = (hidden as u32, experts as u32, expert_ffn as u32);
    ModelDims { hidden, experts, expert_ffn, layer: 0, layers: 1, first_expert: 0, local_experts: experts }
}

/// The host's services on the CPU for a plugin's unit tests (one rank, f32 GEMMs, no CUDA):
/// `let th = TestHost::new(tokens); component.forward(th.host(), ..)`. Allocations live until
/// [`TestHost::reset`]; unzeroed ones (`Host::alloc_uninit`) are filled with NaN (−1 as i32), so
/// reading one before writing it shows. GEMMs check shapes and refuse an output that overlaps an
/// input, and metrics are recorded only in training (`Context::training`), as the host does.
pub struct TestHost {
    arena: Mutex<Vec<Box<[u64]>>>,
    context: Mutex<Context>,
    metrics: Mutex<BTreeMap<String, (f64, f64)>>,
}

const NO_CUDA: &str = "CPU test host: no CUDA";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TestHost {
    /// A host for one sequence of `tokens` tokens: step 1, micro-batch 0 of 1, layer 0,
    /// training, seed 1.
    pub fn new(tokens: usize) -> TestHost {
        let context = Context {
            step: 1,
            micro_batch: 0,
            micro_batches: 1,
            batch: 1,
            seq: tokens as u32,
            layer: 0,
            training: true,
            seed: 1,
        };
        TestHost { arena: Mutex::default(), context: Mutex::new(context), metrics: Mutex::default() }
    }
    /// The handle a component's calls take.
    pub fn host(&self) -> Host<'_> {
        Host::new(self)
    }
    /// What `h.context()` returns from now on.
    pub fn set_context(&self, ctx: Context) {
        *lock(&self.context) = ctx;
    }
    /// Free every allocation (the host does it after each micro-batch): every tensor this host
    /// made, `tensor_f32` ones included, is invalid afterwards.
    pub fn reset(&self) {
        lock(&self.arena).clear();
    }
    /// The metrics recorded so far: per name, the mean of the values weighted by their weights.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        lock(&self.metrics).iter().map(|(k, (vw, w))| (k.clone(), vw / w)).collect()
    }
    /// A CPU f32 tensor holding `data` (row-major `shape`), owned by this host.
    pub fn tensor_f32(&self, data: &[f32], shape: &[usize]) -> Tensor {
        let t = self.zeros(shape, DType::F32);
        assert_eq!(data.len(), t.numel(), "tensor_f32: {} values for shape {shape:?}", data.len());
        unsafe { t.f32s_mut() }.copy_from_slice(data); // fresh memory, no other view
        t
    }
    /// A CPU i32 tensor holding `data`, owned by this host.
    pub fn tensor_i32(&self, data: &[i32], shape: &[usize]) -> Tensor {
        let t = self.zeros(shape, DType::I32);
        assert_eq!(data.len(), t.numel(), "tensor_i32: {} values for shape {shape:?}", data.len());
        unsafe { t.i32s_mut() }.copy_from_slice(data); // fresh memory, no other view
        t
    }
    /// A zero-filled CPU tensor (e.g. gradients to accumulate into), owned by this host.
    pub fn zeros(&self, shape: &[usize], dtype: DType) -> Tensor {
        self.alloc_impl(shape, dtype, 0)
    }

    fn alloc_impl(&self, shape: &[usize], dtype: DType, fill: u64) -> Tensor {
        assert!(shape.len() <= 4, "tensors have at most 4 dimensions");
        let bytes = shape.iter().product::<usize>() * dtype.size();
        let buf = vec![fill; bytes.div_ceil(8).max(1)].into_boxed_slice();
        let t = Tensor::new(buf.as_ptr() as u64, dtype, Device::Cpu, shape);
        lock(&self.arena).push(buf);
        t
    }
}

fn f32_cpu(t: &Tensor, rank: usize, what: &str) -> Result<()> {
    if t.device != Device::Cpu || t.dtype != DType::F32 || t.rank as usize != rank {
        let (d, ty, dev) = (t.dims(), t.dtype, t.device);
        return Err(format!("{what}: expected a {rank}-D f32 CPU tensor, got {d:?} {ty:?} {dev:?}"));
    }
    Ok(())
}

/// Fail unless output `out` shares no memory with `ins` (the contract of `Tensor::f32s_mut`).
fn apart(out: &Tensor, ins: &[&Tensor], what: &str) -> Result<()> {
    let span = |t: &Tensor| (t.addr, t.addr + (t.numel() * t.dtype.size()) as u64);
    let (a, b) = span(out);
    match ins.iter().find(|t| t.numel() > 0 && a < span(t).1 && span(t).0 < b) {
        Some(t) => Err(format!("{what}: the output {:?} overlaps the input {:?}", out.dims(), t.dims())),
        None => Ok(()),
    }
}

/// c = alpha · op(a) · op(b) + beta · c on row-major slices, op(a) m×k, op(b) k×n; beta = 0
/// ignores c's contents (NaN included), as BLAS does.
#[allow(clippy::too_many_arguments)]
fn mm(m: usize, k: usize, n: usize, a: &[f32], ta: bool, b: &[f32], tb: bool, alpha: f32, beta: f32, c: &mut [f32]) {
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|p| {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    av as f64 * bv as f64
                })
                .sum();
            let prev = if beta == 0.0 { 0.0 } else { beta * c[i * n + j] };
            c[i * n + j] = alpha * dot as f32 + prev;
        }
    }
}

/// (m, k, n) of op(a) · op(b) → c for the trailing two dimensions.
fn mm_dims(a: &Tensor, b: &Tensor, c: &Tensor, ta: bool, tb: bool, what: &str) -> Result<(usize, usize, usize)> {
    let (m, k) = if ta { (a.dim(-1), a.dim(-2)) } else { (a.dim(-2), a.dim(-1)) };
    let (k2, n) = if tb { (b.dim(-1), b.dim(-2)) } else { (b.dim(-2), b.dim(-1)) };
    if k != k2 || c.dim(-2) != m || c.dim(-1) != n {
        return Err(format!("{what}: shapes {:?} x {:?} -> {:?} do not match", a.dims(), b.dims(), c.dims()));
    }
    Ok((m, k, n))
}

/// Offsets [groups+1] i32 on the CPU, non-decreasing from 0 to `rows`.
fn offsets_of(t: &Tensor, groups: usize, rows: usize, what: &str) -> Result<Vec<usize>> {
    let ok = t.device == Device::Cpu && t.dtype == DType::I32 && t.numel() == groups + 1;
    let o = if ok { t.i32s() } else { &[] };
    if !ok || o[0] != 0 || o[groups] as usize != rows || o.windows(2).any(|w| w[0] > w[1]) {
        return Err(format!("{what}: offsets must be {} non-decreasing i32 on the CPU from 0 to {rows}", groups + 1));
    }
    Ok(o.iter().map(|&v| v as usize).collect())
}

/// dst = src, byte for byte (same dtype and element count, both on the CPU).
fn copy_into(src: Tensor, dst: Tensor, what: &str) -> Result<()> {
    if src.device != Device::Cpu || dst.device != Device::Cpu {
        return Err(format!("{what}: {NO_CUDA} tensors"));
    }
    if src.dtype != dst.dtype || src.numel() != dst.numel() {
        let (a, b) = ((src.dtype, src.dims()), (dst.dtype, dst.dims()));
        return Err(format!("{what}: {a:?} into {b:?}: dtype and size must match"));
    }
    unsafe { std::ptr::copy(src.addr as *const u8, dst.addr as *mut u8, src.numel() * src.dtype.size()) };
    Ok(())
}

fn res<T>(r: Result<T>) -> Res<T> {
    r.map_err(RString::from).into()
}

impl TestHost {
    #[allow(clippy::too_many_arguments)]
    fn gemm_impl(&self, a: Tensor, b: Tensor, c: Tensor, ta: bool, tb: bool, alpha: f32, beta: f32) -> Result<()> {
        for (t, w) in [(&a, "gemm a"), (&b, "gemm b"), (&c, "gemm c")] {
            f32_cpu(t, 2, w)?;
        }
        let (m, k, n) = mm_dims(&a, &b, &c, ta, tb, "gemm")?;
        apart(&c, &[&a, &b], "gemm")?;
        mm(m, k, n, a.f32s(), ta, b.f32s(), tb, alpha, beta, unsafe { c.f32s_mut() });
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn batched_impl(&self, a: Tensor, b: Tensor, c: Tensor, ta: bool, tb: bool, alpha: f32, beta: f32) -> Result<()> {
        for (t, w) in [(&a, "gemm_batched a"), (&b, "gemm_batched b"), (&c, "gemm_batched c")] {
            f32_cpu(t, 3, w)?;
        }
        let (m, k, n) = mm_dims(&a, &b, &c, ta, tb, "gemm_batched")?;
        let g = c.dim(0);
        if a.dim(0) != g || b.dim(0) != g {
            return Err(format!("gemm_batched: batch sizes {:?} x {:?} -> {:?} differ", a.dims(), b.dims(), c.dims()));
        }
        apart(&c, &[&a, &b], "gemm_batched")?;
        let (av, bv, cv) = (a.f32s(), b.f32s(), unsafe { c.f32s_mut() });
        for i in 0..g {
            let (ai, bi) = (&av[i * m * k..(i + 1) * m * k], &bv[i * k * n..(i + 1) * k * n]);
            mm(m, k, n, ai, ta, bi, tb, alpha, beta, &mut cv[i * m * n..(i + 1) * m * n]);
        }
        Ok(())
    }

    fn grouped_impl(&self, x: Tensor, w: Tensor, y: Tensor, offsets: Tensor, tw: bool, acc: bool) -> Result<()> {
        f32_cpu(&x, 2, "grouped_gemm x")?;
        f32_cpu(&w, 3, "grouped_gemm w")?;
        f32_cpu(&y, 2, "grouped_gemm y")?;
        let (g, k, n) = if tw { (w.dim(0), w.dim(2), w.dim(1)) } else { (w.dim(0), w.dim(1), w.dim(2)) };
        if x.dim(1) != k || y.dim(1) != n || x.dim(0) != y.dim(0) {
            return Err(format!("grouped_gemm: shapes {:?} x {:?} -> {:?} do not match", x.dims(), w.dims(), y.dims()));
        }
        let off = offsets_of(&offsets, g, x.dim(0), "grouped_gemm")?;
        apart(&y, &[&x, &w, &offsets], "grouped_gemm")?;
        let (xs, ws, ys) = (x.f32s(), w.f32s(), unsafe { y.f32s_mut() });
        for e in 0..g {
            let (r0, r1) = (off[e], off[e + 1]);
            let (xe, we) = (&xs[r0 * k..r1 * k], &ws[e * k * n..(e + 1) * k * n]);
            mm(r1 - r0, k, n, xe, false, we, tw, 1.0, if acc { 1.0 } else { 0.0 }, &mut ys[r0 * n..r1 * n]);
        }
        Ok(())
    }

    fn wgrad_impl(&self, x: Tensor, dy: Tensor, dw: Tensor, offsets: Tensor) -> Result<()> {
        f32_cpu(&x, 2, "grouped_gemm_wgrad x")?;
        f32_cpu(&dy, 2, "grouped_gemm_wgrad dy")?;
        f32_cpu(&dw, 3, "grouped_gemm_wgrad dw")?;
        let (g, k, n) = (dw.dim(0), dw.dim(1), dw.dim(2));
        if x.dim(1) != k || dy.dim(1) != n || x.dim(0) != dy.dim(0) {
            let (a, b, c) = (x.dims(), dy.dims(), dw.dims());
            return Err(format!("grouped_gemm_wgrad: shapes {a:?}, {b:?} -> {c:?} do not match"));
        }
        let off = offsets_of(&offsets, g, x.dim(0), "grouped_gemm_wgrad")?;
        apart(&dw, &[&x, &dy, &offsets], "grouped_gemm_wgrad")?;
        let (xs, dys, dws) = (x.f32s(), dy.f32s(), unsafe { dw.f32s_mut() });
        for e in 0..g {
            let (r0, r1) = (off[e], off[e + 1]);
            let (xe, de) = (&xs[r0 * k..r1 * k], &dys[r0 * n..r1 * n]);
            mm(k, r1 - r0, n, xe, true, de, false, 1.0, 1.0, &mut dws[e * k * n..(e + 1) * k * n]);
        }
        Ok(())
    }

    /// One rank: `send` and `recv` have one count each, equal, of at most the rows there are.
    fn all_to_all_impl(&self, src: Tensor, send: &[u64], dst: Tensor, recv: &[u64]) -> Result<()> {
        let row = |t: &Tensor| t.dims().iter().skip(1).product::<usize>();
        if send.len() != 1 || recv != send || src.dtype != dst.dtype || row(&src) != row(&dst) {
            return Err(format!(
                "all_to_all: one rank needs one equal send and recv count and rows of one size; got send {send:?}, \
                 recv {recv:?}, {:?} {:?} -> {:?} {:?}",
                src.dtype,
                src.dims(),
                dst.dtype,
                dst.dims()
            ));
        }
        let n = send[0] as usize;
        if n > src.dim(0) || n > dst.dim(0) {
            return Err(format!("all_to_all: {n} rows but src has {} and dst {}", src.dim(0), dst.dim(0)));
        }
        let shape = |t: &Tensor| [n].into_iter().chain(t.dims().into_iter().skip(1)).collect::<Vec<_>>();
        let part = |t: Tensor| Tensor::new(t.addr, t.dtype, t.device, &shape(&t));
        copy_into(part(src), part(dst), "all_to_all")
    }
}

impl abi::Ops for TestHost {
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn alloc(&self, shape: RSlice<'_, u64>, dtype: DType, device: Device, zeroed: bool) -> Res<Tensor> {
        if device != Device::Cpu || shape.len() > 4 {
            return res(Err(format!("alloc: {device:?} tensor of {} dims: {NO_CUDA}, at most 4 dims", shape.len())));
        }
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        res(Ok(self.alloc_impl(&shape, dtype, if zeroed { 0 } else { u64::MAX })))
    }
    fn gemm(&self, a: Tensor, b: Tensor, c: Tensor, ta: bool, tb: bool, alpha: f32, beta: f32) -> Res<()> {
        res(self.gemm_impl(a, b, c, ta, tb, alpha, beta))
    }
    fn grouped_gemm(&self, x: Tensor, w: Tensor, y: Tensor, offsets: Tensor, tw: bool, acc: bool) -> Res<()> {
        res(self.grouped_impl(x, w, y, offsets, tw, acc))
    }
    fn grouped_gemm_wgrad(&self, x: Tensor, dy: Tensor, dw: Tensor, offsets: Tensor) -> Res<()> {
        res(self.wgrad_impl(x, dy, dw, offsets))
    }
    fn copy(&self, src: Tensor, dst: Tensor) -> Res<()> {
        res(copy_into(src, dst, "copy"))
    }
    fn compile(&self, _source: RStr<'_>) -> Res<()> {
        res(Err(NO_CUDA.into()))
    }
    fn launch(&self, _source: RStr<'_>, _name: RStr<'_>, _dims: LaunchDims, _args: RSlice<'_, Arg>) -> Res<()> {
        res(Err(NO_CUDA.into()))
    }
    /// Recorded for [`TestHost::metrics`] unless the context says eval (as the host does).
    fn metric(&self, name: RStr<'_>, value: f64, weight: f64) {
        if lock(&self.context).training {
            let mut m = lock(&self.metrics);
            let e = m.entry(name.to_string()).or_insert((0.0, 0.0));
            *e = (e.0 + value * weight, e.1 + weight);
        }
    }
    fn context(&self) -> Context {
        *lock(&self.context)
    }
    fn metric_sum(&self, name: RStr<'_>, sum: Tensor, count: f64) {
        if count > 0.0 {
            self.metric(name, sum.f32s()[0] as f64 / count, count)
        }
    }
    fn gemm_batched(&self, a: Tensor, b: Tensor, c: Tensor, ta: bool, tb: bool, alpha: f32, beta: f32) -> Res<()> {
        res(self.batched_impl(a, b, c, ta, tb, alpha, beta))
    }
    fn rank(&self, _group: Group) -> u32 {
        0
    }
    fn size(&self, _group: Group) -> u32 {
        1
    }
    fn all_reduce(&self, t: Tensor, _op: ReduceOp, _group: Group) -> Res<()> {
        res(copy_into(t, t, "all_reduce"))
    }
    fn all_gather(&self, src: Tensor, dst: Tensor, _group: Group) -> Res<()> {
        res(copy_into(src, dst, "all_gather"))
    }
    fn reduce_scatter(&self, src: Tensor, dst: Tensor, _group: Group) -> Res<()> {
        res(copy_into(src, dst, "reduce_scatter"))
    }
    fn all_to_all(&self, src: Tensor, send: RSlice<'_, u64>, dst: Tensor, recv: RSlice<'_, u64>, _g: Group) -> Res<()> {
        res(self.all_to_all_impl(src, &send, dst, &recv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, f: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * f).sin()).collect()
    }

    /// op(a)[i][p] · op(b)[p][j] summed over p, straight from the definitions.
    fn reference(m: usize, k: usize, n: usize, a: &[f32], ta: bool, b: &[f32], tb: bool) -> Vec<f32> {
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

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-5, "{what}[{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn gemm_and_gemm_batched_match_a_triple_loop_for_all_transposes() {
        let th = TestHost::new(1);
        let h = th.host();
        let (g, m, k, n) = (2, 3, 4, 5);
        let (a, b, c0) = (values(g * m * k, 0.37), values(g * k * n, 0.71), values(g * m * n, 1.3));
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let sa = if ta { [k, m] } else { [m, k] };
            let sb = if tb { [n, k] } else { [k, n] };
            let c = th.tensor_f32(&c0[..m * n], &[m, n]);
            h.gemm(th.tensor_f32(&a[..m * k], &sa), th.tensor_f32(&b[..k * n], &sb), c, ta, tb, 2.0, 0.5).unwrap();
            let r = reference(m, k, n, &a, ta, &b, tb);
            let want: Vec<f32> = r.iter().zip(&c0).map(|(r, c)| 2.0 * r + 0.5 * c).collect();
            close(c.f32s(), &want, &format!("gemm {ta} {tb}"));

            let (a3, b3) = (th.tensor_f32(&a, &[g, sa[0], sa[1]]), th.tensor_f32(&b, &[g, sb[0], sb[1]]));
            let c3 = th.host().alloc_uninit(&[g, m, n], DType::F32).unwrap(); // NaN: beta = 0 ignores it
            h.gemm_batched(a3, b3, c3, ta, tb, 1.0, 0.0).unwrap();
            for i in 0..g {
                let r = reference(m, k, n, &a[i * m * k..], ta, &b[i * k * n..], tb);
                close(&c3.f32s()[i * m * n..(i + 1) * m * n], &r, &format!("gemm_batched {ta} {tb} [{i}]"));
            }
        }
        let c = th.zeros(&[m, m], DType::F32);
        let e = h.gemm(th.tensor_f32(&a[..m * k], &[m, k]), c, c, false, false, 1.0, 0.0).unwrap_err();
        assert!(e.contains("do not match"), "{e}");
        let sq = th.tensor_f32(&a[..m * m], &[m, m]);
        assert!(h.gemm(sq, sq, sq, false, false, 1.0, 0.0).unwrap_err().contains("overlaps"));
    }

    #[test]
    fn grouped_gemm_and_wgrad_match_a_triple_loop_per_group() {
        let th = TestHost::new(1);
        let h = th.host();
        let (g, k, n, rows, off) = (3, 4, 2, 6, [0usize, 2, 2, 6]);
        let (x, w, dy) = (values(rows * k, 0.3), values(g * k * n, 0.9), values(rows * n, 0.5));
        let offsets = th.tensor_i32(&off.map(|o| o as i32), &[g + 1]);
        let tx = th.tensor_f32(&x, &[rows, k]);
        for trans in [false, true] {
            // w as [G,K,N], or its transpose [G,N,K] with trans_w.
            let mut wt = vec![0.0; g * k * n];
            for (e, p, j) in (0..g).flat_map(|e| (0..k).flat_map(move |p| (0..n).map(move |j| (e, p, j)))) {
                wt[e * k * n + j * k + p] = w[e * k * n + p * n + j];
            }
            let tw = if trans { th.tensor_f32(&wt, &[g, n, k]) } else { th.tensor_f32(&w, &[g, k, n]) };
            let y = th.tensor_f32(&vec![1.0; rows * n], &[rows, n]);
            h.grouped_gemm(tx, tw, y, offsets, trans, true).unwrap();
            for e in 0..g {
                let r = reference(off[e + 1] - off[e], k, n, &x[off[e] * k..], false, &w[e * k * n..], false);
                let want: Vec<f32> = r.iter().map(|v| v + 1.0).collect();
                close(&y.f32s()[off[e] * n..off[e + 1] * n], &want, &format!("grouped_gemm {trans} [{e}]"));
            }
        }
        let dw = th.tensor_f32(&vec![1.0; g * k * n], &[g, k, n]);
        h.grouped_gemm_wgrad(tx, th.tensor_f32(&dy, &[rows, n]), dw, offsets).unwrap();
        for e in 0..g {
            let (r0, r1) = (off[e], off[e + 1]);
            let r = reference(k, r1 - r0, n, &x[r0 * k..r1 * k], true, &dy[r0 * n..r1 * n], false);
            let want: Vec<f32> = r.iter().map(|v| v + 1.0).collect();
            close(&dw.f32s()[e * k * n..(e + 1) * k * n], &want, &format!("wgrad [{e}]"));
        }
        let bad = th.tensor_i32(&[0, 3, 2, 6], &[4]);
        let y = th.zeros(&[rows, n], DType::F32);
        let e = h.grouped_gemm(tx, th.tensor_f32(&w, &[g, k, n]), y, bad, false, false).unwrap_err();
        assert!(e.contains("non-decreasing"), "{e}");
    }

    #[test]
    fn rng_is_xoshiro256ss_and_reproducible_from_the_context() {
        // Reference outputs of xoshiro256** from state [1, 2, 3, 4], and of splitmix64 from 0.
        let mut r = Rng([1, 2, 3, 4]);
        assert_eq!([(); 4].map(|_| r.next_u64()), [11520, 0, 1509978240, 1215971899390074240]);
        assert_eq!(splitmix64(&mut 0), 0xE220_A839_7B1D_CDAF);

        let ctx = TestHost::new(4).host().context();
        let draw = |ctx: Context, stream| {
            let mut r = Rng::from_context(ctx, stream);
            (0..8).map(|_| r.normal()).collect::<Vec<f32>>()
        };
        assert_eq!(draw(ctx, 0), draw(ctx, 0));
        assert_ne!(draw(ctx, 0), draw(ctx, 1));
        assert_ne!(draw(ctx, 0), draw(Context { seed: 2, ..ctx }, 0));
        assert_eq!(Rng::new(7), Rng::new(7));

        let mut r = Rng::new(42);
        let u: Vec<f32> = (0..20000).map(|_| r.uniform()).collect();
        assert!(u.iter().all(|&v| (0.0..1.0).contains(&v)));
        assert!((u.iter().sum::<f32>() / 2e4 - 0.5).abs() < 0.01);
        let z: Vec<f64> = (0..20000).map(|_| r.normal() as f64).collect();
        let mean = z.iter().sum::<f64>() / 2e4;
        let var = z.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / 2e4;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05 && z.iter().all(|v| v.is_finite()), "{mean} {var}");
    }

    #[test]
    fn test_host_allocates_copies_records_metrics_and_is_one_rank() {
        let th = TestHost::new(6);
        let h = th.host();
        assert_eq!(
            (h.device(), act_dtype(&h), h.rank(Group::World), h.size(Group::ExpertParallel)),
            (Device::Cpu, DType::F32, 0, 1)
        );
        let ctx = h.context();
        assert_eq!((ctx.step, ctx.micro_batches, ctx.batch, ctx.seq, ctx.training, ctx.seed), (1, 1, 1, 6, true, 1));
        assert!(h.alloc(&[2, 3], DType::F32).unwrap().f32s().iter().all(|&v| v == 0.0));
        assert!(h.alloc_uninit(&[2, 3], DType::F32).unwrap().f32s().iter().all(|v| v.is_nan()));
        assert_eq!(h.alloc_uninit(&[2], DType::I32).unwrap().i32s(), &[-1, -1]);

        let src = th.tensor_f32(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let dst = h.alloc_f32(&[4]).unwrap();
        h.copy(src, dst).unwrap();
        assert_eq!(dst.f32s(), &[1.0, 2.0, 3.0, 4.0]);
        assert!(h.copy(src, h.alloc_f32(&[3]).unwrap()).unwrap_err().contains("size must match"));
        h.all_reduce(src, ReduceOp::Sum, Group::DataParallel).unwrap();
        let gathered = h.alloc_f32(&[2, 2]).unwrap();
        h.all_gather(src, gathered, Group::World).unwrap();
        assert_eq!(gathered.f32s(), src.f32s());
        assert!(h.reduce_scatter(src, h.alloc_f32(&[1, 2]).unwrap(), Group::World).is_err());
        let moved = h.alloc_f32(&[3, 2]).unwrap();
        h.all_to_all(src, &[2], moved, &[2], Group::ExpertParallel).unwrap();
        assert_eq!(&moved.f32s()[..4], src.f32s());
        assert!(h.all_to_all(src, &[1, 1], moved, &[1, 1], Group::ExpertParallel).is_err());
        assert!(h.all_to_all(src, &[3], moved, &[3], Group::ExpertParallel).is_err());

        assert!(h.launch("", "k", [1; 3], [1; 3], 0, &[]).unwrap_err().contains("no CUDA"));
        assert!(h.compile("").unwrap_err().contains("no CUDA"));
        assert!(require_cpu(&h, "me").is_ok());

        h.metric("a", 1.0);
        h.metric_weighted("a", 4.0, 3.0);
        th.set_context(Context { training: false, ..ctx });
        h.metric("a", 100.0);
        assert_eq!(th.metrics().get("a"), Some(&3.25));
        th.reset();
        assert!(lock(&th.arena).is_empty());
    }

    #[test]
    fn grids_and_kernel_sources() {
        assert_eq!([grid(0, 256), grid(256, 256), grid(257, 256), grid(1 << 30, 128)].map(|g| g[0]), [1, 1, 2, 65535]);
        let src = || kernel_source!("__global__ void k() {}");
        assert!(src().starts_with(COMMON_CUH) && src().ends_with("k() {}"));
        assert_eq!(src().as_ptr(), src().as_ptr(), "built once");
    }
}
