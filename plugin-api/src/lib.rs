//! pith-plugin-api: the contract between the Pith host and its plugins.
//!
//! A plugin crate implements one of the five component traits below in plain Rust
//! ([`Router`], [`Experts`], [`BalanceLoss`], [`Optimizer`], [`CommSchedule`]), registers it with
//! [`register!`] and exports its library once with [`export_plugin!`]. This crate turns those
//! into the `#[repr(C)]` objects of [`abi`], catching every panic at the boundary.
//! See `plugin-api/templates/` for a complete plugin of each kind. [`kit`] has what most
//! components need beside the traits, and [`kit::TestHost`] for a plugin's own unit tests.

pub mod abi;
mod adapt;
pub mod kit;
mod log;

pub use abi::{
    Arg, ComponentInfo, Context, DType, Device, Dispatched, ExpertsOut, Group, Init, Kind, LaunchDims, ModelDims,
    ParamSpec, ReduceOp, Role, RouterOut, Slot, StepDone, Tensor, EMPTY,
};
pub use abi_stable;
#[doc(hidden)]
pub use adapt::{ffi_create, ffi_settings, root_components, root_set_logger};
pub use inventory;

use abi_stable::std_types::{RSlice, RStr};

/// The plugin-api version a plugin was built against; host and plugin must agree on it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub type Result<T> = std::result::Result<T, String>;

impl Tensor {
    pub fn new(addr: u64, dtype: DType, device: Device, shape: &[usize]) -> Tensor {
        assert!(shape.len() <= 4, "tensors have at most 4 dimensions");
        let mut s = [1u64; 4];
        for (d, &n) in s.iter_mut().zip(shape) {
            *d = n as u64;
        }
        Tensor { addr, dtype, device, rank: shape.len() as u8, shape: s }
    }
    pub fn dims(&self) -> Vec<usize> {
        self.shape[..self.rank as usize].iter().map(|&d| d as usize).collect()
    }
    /// Size of dimension `i`; negative counts from the end.
    pub fn dim(&self, i: isize) -> usize {
        let i = if i < 0 { self.rank as isize + i } else { i };
        self.shape[i as usize] as usize
    }
    pub fn numel(&self) -> usize {
        self.dims().iter().product()
    }
    /// Rows `start .. start + n` (dimension 0) of this view.
    pub fn rows(&self, start: usize, n: usize) -> Tensor {
        let rows = if self.rank == 0 { 1 } else { self.dim(0) };
        assert!(start + n <= rows, "rows {start}..{} of a tensor with {rows}", start + n);
        let row_bytes = self.numel() / rows.max(1) * self.dtype.size();
        let mut t = Tensor { addr: self.addr + (start * row_bytes) as u64, ..*self };
        if t.rank > 0 {
            t.shape[0] = n as u64;
        }
        t
    }
    /// This tensor's address as a kernel argument.
    pub fn arg(&self) -> Arg {
        Arg::Ptr(self.addr)
    }
    fn host_ptr(&self, dtype: DType) -> *mut u8 {
        assert_eq!(self.device, Device::Cpu, "host access to a device tensor");
        assert_eq!(self.dtype, dtype, "tensor dtype");
        if self.numel() == 0 {
            return std::ptr::NonNull::<u32>::dangling().as_ptr() as *mut u8;
        }
        assert!(self.addr != 0 && self.addr.is_multiple_of(4), "host access to a null or misaligned tensor");
        self.addr as *mut u8
    }
    /// The elements of a CPU f32 tensor, to read. The host keeps the memory valid for the call
    /// (for `Host::alloc` tensors, until the micro-batch ends); don't hold the slice across a
    /// `Host` call that writes this tensor (`copy`, the GEMMs) or a write through
    /// [`Tensor::f32s_mut`].
    pub fn f32s(&self) -> &[f32] {
        unsafe { std::slice::from_raw_parts(self.host_ptr(DType::F32) as *const f32, self.numel()) }
    }
    /// The elements of a CPU i32 tensor, to read (same rules as [`Tensor::f32s`]).
    pub fn i32s(&self) -> &[i32] {
        unsafe { std::slice::from_raw_parts(self.host_ptr(DType::I32) as *const i32, self.numel()) }
    }
    /// The elements of a CPU f32 tensor, to write (outputs, gradients, optimizer state).
    ///
    /// # Safety
    /// A view is a `Copy` handle, not an owner: while the returned slice is in use, no other
    /// slice of the same memory may be (from this view or any copy of it, shared or mutable),
    /// and no `Host` call may touch the tensor. The host passes distinct buffers as distinct
    /// arguments and `Host::alloc` returns fresh memory, so one `f32s_mut` per output tensor,
    /// beside `f32s` of the inputs, keeps to this.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn f32s_mut(&self) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.host_ptr(DType::F32) as *mut f32, self.numel())
    }
    /// The elements of a CPU i32 tensor, to write.
    ///
    /// # Safety
    /// As for [`Tensor::f32s_mut`].
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn i32s_mut(&self) -> &mut [i32] {
        std::slice::from_raw_parts_mut(self.host_ptr(DType::I32) as *mut i32, self.numel())
    }
}

impl ModelDims {
    /// Sizes for layer `layer` of `layers` on one rank (all experts local).
    pub const fn new(hidden: usize, experts: usize, expert_ffn: usize, layer: usize, layers: usize) -> ModelDims {
        let e = experts as u32;
        let (hidden, expert_ffn, layer, layers) = (hidden as u32, expert_ffn as u32, layer as u32, layers as u32);
        ModelDims { hidden, experts: e, expert_ffn, layer, layers, first_expert: 0, local_experts: e }
    }
    /// The sizes a component of `kind` is built with: a shared expert (`Kind::Shared`) is one
    /// expert that sees every token.
    pub const fn for_kind(self, kind: Kind) -> ModelDims {
        match kind {
            Kind::Shared => ModelDims { experts: 1, first_expert: 0, local_experts: 1, ..self },
            _ => self,
        }
    }
}

impl ParamSpec {
    /// A trained parameter.
    pub fn new(name: &str, shape: &[usize], init: Init, decay: bool) -> ParamSpec {
        let shape = shape.iter().map(|&d| d as u64).collect();
        ParamSpec { name: name.into(), shape, init, decay, role: Role::Param, surrogate: false }
    }
    /// Persistent state the component updates itself in `end_step` (checkpointed, no gradient).
    pub fn buffer(name: &str, shape: &[usize], init: Init) -> ParamSpec {
        ParamSpec { role: Role::Buffer, ..ParamSpec::new(name, shape, init, false) }
    }
    /// Per-step statistics: zeroed before each step, accumulated by the component, summed over
    /// the data-parallel group before `end_step`.
    pub fn accumulator(name: &str, shape: &[usize]) -> ParamSpec {
        ParamSpec { role: Role::Accumulator, ..ParamSpec::new(name, shape, Init::Zeros, false) }
    }
    /// Mark this parameter's gradient a surrogate (straight-through): checked by sign, not by
    /// finite differences.
    pub fn surrogate(self) -> ParamSpec {
        ParamSpec { surrogate: true, ..self }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product::<u64>() as usize
    }
}

/// The host's services, as a plugin sees them during one call.
#[derive(Clone, Copy)]
pub struct Host<'a>(pub(crate) &'a (dyn abi::Ops + 'a));

impl<'a> Host<'a> {
    pub fn new(ops: &'a (dyn abi::Ops + 'a)) -> Self {
        Host(ops)
    }
    pub fn device(&self) -> Device {
        self.0.device()
    }
    /// A zero-filled tensor on this device, owned by the host, valid until the micro-batch
    /// ends; use it for outputs and for anything saved for backward.
    pub fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.alloc_on(shape, dtype, self.device(), true)
    }
    /// Like [`Host::alloc`] but of undefined contents (no memset on the GPU): for outputs whose
    /// every element the component writes. Never read before writing: it is not zero on CUDA.
    pub fn alloc_uninit(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.alloc_on(shape, dtype, self.device(), false)
    }
    /// Like [`Host::alloc`], in host memory whatever the device (e.g. `Dispatched::offsets`).
    pub fn alloc_host(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.alloc_on(shape, dtype, Device::Cpu, true)
    }
    fn alloc_on(&self, shape: &[usize], dtype: DType, device: Device, zeroed: bool) -> Result<Tensor> {
        let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        self.0.alloc(RSlice::from_slice(&shape), dtype, device, zeroed).into_result().map_err(Into::into)
    }
    /// dst = src (same dtype and size; host or device on either side).
    pub fn copy(&self, src: Tensor, dst: Tensor) -> Result<()> {
        self.0.copy(src, dst).into_result().map_err(Into::into)
    }
    /// Compile CUDA C `source` now (see [`Host::launch`]); the error is NVRTC's log.
    pub fn compile(&self, source: &str) -> Result<()> {
        self.0.compile(RStr::from_str(source)).into_result().map_err(Into::into)
    }
    /// Launch `extern "C" __global__` kernel `name` of CUDA C `source` (compiled by the host
    /// with NVRTC on first use and cached on disk) over `grid` blocks of `block` threads. `args`
    /// must match the kernel's parameters in number and size (`Ptr`/`I64` 8 bytes, others 4):
    /// the host checks them against the compiled kernel.
    /// CUDA only: a component keeps a CPU path for `Device::Cpu` (the reference).
    pub fn launch(
        &self,
        source: &str,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        shared_mem: u32,
        args: &[Arg],
    ) -> Result<()> {
        let dims = LaunchDims { grid, block, shared_mem };
        let r = self.0.launch(RStr::from_str(source), RStr::from_str(name), dims, RSlice::from_slice(args));
        r.into_result().map_err(|e| format!("kernel `{name}`: {e}"))
    }
    /// The f32 values of a tensor on any device (waits for the device).
    pub fn read_f32(&self, t: Tensor) -> Result<Vec<f32>> {
        let mut v = vec![0f32; t.numel()];
        self.copy(t, Tensor::new(v.as_mut_ptr() as u64, DType::F32, Device::Cpu, &t.dims()))?;
        Ok(v)
    }
    pub fn alloc_f32(&self, shape: &[usize]) -> Result<Tensor> {
        self.alloc(shape, DType::F32)
    }
    /// c = alpha · op(a) · op(b) + beta · c.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        a: Tensor,
        b: Tensor,
        c: Tensor,
        trans_a: bool,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.0.gemm(a, b, c, trans_a, trans_b, alpha, beta).into_result().map_err(Into::into)
    }
    /// y_g (+)= x_g · w[g] (or w[g]ᵀ) for each group of rows given by `offsets`.
    pub fn grouped_gemm(
        &self,
        x: Tensor,
        w: Tensor,
        y: Tensor,
        offsets: Tensor,
        trans_w: bool,
        accumulate: bool,
    ) -> Result<()> {
        self.0.grouped_gemm(x, w, y, offsets, trans_w, accumulate).into_result().map_err(Into::into)
    }
    /// dw[g] += x_gᵀ · dy_g.
    pub fn grouped_gemm_wgrad(&self, x: Tensor, dy: Tensor, dw: Tensor, offsets: Tensor) -> Result<()> {
        self.0.grouped_gemm_wgrad(x, dy, dw, offsets).into_result().map_err(Into::into)
    }
    /// Add `value` to this step's metrics line (averaged over the step's calls, weight 1).
    pub fn metric(&self, name: &str, value: f64) {
        self.0.metric(RStr::from_str(name), value, 1.0)
    }
    /// Like [`Host::metric`], weighted (e.g. by the tokens the value was measured over).
    pub fn metric_weighted(&self, name: &str, value: f64, weight: f64) {
        self.0.metric(RStr::from_str(name), value, weight)
    }
    /// A metric still on the device: `sum[0]` (f32) summed over `count` items (e.g. the entropy
    /// of `count` tokens); the line shows Σ sum / Σ count. No wait: the host reads it per step.
    pub fn metric_sum(&self, name: &str, sum: Tensor, count: f64) {
        self.0.metric_sum(RStr::from_str(name), sum, count)
    }
    /// Step, micro-batch, batch × seq layout, layer and the seed of this call.
    pub fn context(&self) -> Context {
        self.0.context()
    }
    /// c[g] = alpha · op(a[g]) · op(b[g]) + beta · c[g] for each g of the leading dimension.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_batched(
        &self,
        a: Tensor,
        b: Tensor,
        c: Tensor,
        trans_a: bool,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.0.gemm_batched(a, b, c, trans_a, trans_b, alpha, beta).into_result().map_err(Into::into)
    }
    /// This rank's index in `group`.
    pub fn rank(&self, group: Group) -> usize {
        self.0.rank(group) as usize
    }
    /// How many ranks `group` has (1 on a single GPU or the CPU).
    pub fn size(&self, group: Group) -> usize {
        self.0.size(group) as usize
    }
    pub fn all_reduce(&self, t: Tensor, op: ReduceOp, group: Group) -> Result<()> {
        self.0.all_reduce(t, op, group).into_result().map_err(Into::into)
    }
    pub fn all_gather(&self, src: Tensor, dst: Tensor, group: Group) -> Result<()> {
        self.0.all_gather(src, dst, group).into_result().map_err(Into::into)
    }
    pub fn reduce_scatter(&self, src: Tensor, dst: Tensor, group: Group) -> Result<()> {
        self.0.reduce_scatter(src, dst, group).into_result().map_err(Into::into)
    }
    /// `send[r]` rows of `src` to rank r; `recv[r]` rows from rank r into `dst`, in rank order.
    pub fn all_to_all(&self, src: Tensor, send: &[u64], dst: Tensor, recv: &[u64], group: Group) -> Result<()> {
        let (s, r) = (RSlice::from_slice(send), RSlice::from_slice(recv));
        self.0.all_to_all(src, s, dst, r, group).into_result().map_err(Into::into)
    }
}

/// Chooses which experts each token goes to, with what weight.
pub trait Router: Send + Sync + 'static {
    /// Parameters, buffers and accumulators, in the order `p` and `g` pass them.
    fn params(&self) -> Vec<ParamSpec>;
    /// x [T,H] → logits [T,E], probs [T,E], ids [T,k] (an expert or [`EMPTY`]), weights [T,k].
    fn forward(&self, h: Host, p: &[Tensor], x: Tensor) -> Result<RouterOut>;
    /// Accumulate parameter grads into `g` and WRITE the input grad into `dx`. `d_probs` and
    /// `d_logits` hold the gradient the balance losses already put there.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;
    /// Once per optimizer step, after the step's accumulators are summed over the data-parallel
    /// group: update buffers (e.g. an aux-free bias from the step's load).
    fn end_step(&self, _h: Host, _p: &[Tensor]) -> Result<()> {
        Ok(())
    }
    /// Every setting with its default filled in, as TOML `key = value` lines (`pith config` shows
    /// them; [`settings_toml`] writes them). Empty: not reported.
    fn settings(&self) -> String {
        String::new()
    }
}

/// All experts of one MoE layer on this rank, applied to expert-sorted rows; or, as
/// `Kind::Shared`, an always-on expert applied to every token (one group of T rows).
pub trait Experts: Send + Sync + 'static {
    fn params(&self) -> Vec<ParamSpec>;
    /// Forward FLOPs for `rows[e]` rows of each local expert (plan, bench and MFU count these).
    fn flops(&self, rows: &[u64]) -> f64;
    /// x [N,H] sorted by expert, offsets [E_local+1] (on the host) → y [N,H].
    fn forward(&self, h: Host, p: &[Tensor], x: Tensor, offsets: Tensor) -> Result<ExpertsOut>;
    /// Accumulate parameter grads into `g`, WRITE the input grad into `dx`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        h: Host,
        p: &[Tensor],
        g: &[Tensor],
        x: Tensor,
        offsets: Tensor,
        out: &ExpertsOut,
        dy: Tensor,
        dx: Tensor,
    ) -> Result<()>;
    fn end_step(&self, _h: Host, _p: &[Tensor]) -> Result<()> {
        Ok(())
    }
    /// Every setting with its default filled in, as TOML `key = value` lines (`pith config` shows
    /// them; [`settings_toml`] writes them). Empty: not reported.
    fn settings(&self) -> String {
        String::new()
    }
}

/// An auxiliary loss on the routing (load balancing, z-loss, ...). It sees everything the router
/// returned (probs, ids, gates) and `h.context()` (batch × seq layout, micro-batch).
pub trait BalanceLoss: Send + Sync + 'static {
    /// Buffers and accumulators (e.g. the load of the whole global batch); no trained parameters.
    fn params(&self) -> Vec<ParamSpec> {
        Vec::new()
    }
    /// ACCUMULATE the loss value, coefficient included, into `loss` [1] f32 on `h`'s device (the
    /// host reads it once per micro-batch: a CUDA path never waits for the device here).
    fn forward(&self, h: Host, p: &[Tensor], route: &RouterOut, loss: Tensor) -> Result<()>;
    /// ACCUMULATE scale · ∂loss/∂probs into `d_probs` and scale · ∂loss/∂logits into `d_logits`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        h: Host,
        p: &[Tensor],
        route: &RouterOut,
        scale: f32,
        d_probs: Tensor,
        d_logits: Tensor,
    ) -> Result<()>;
    fn end_step(&self, _h: Host, _p: &[Tensor]) -> Result<()> {
        Ok(())
    }
    /// Every setting with its default filled in, as TOML `key = value` lines (`pith config` shows
    /// them; [`settings_toml`] writes them). Empty: not reported.
    fn settings(&self) -> String {
        String::new()
    }
}

/// Updates every parameter from its gradient, in one call per step.
pub trait Optimizer: Send + Sync + 'static {
    /// Names of the state tensors this optimizer keeps for the parameter `name` (full name,
    /// e.g. `layers.0.moe.experts.w_up`; each shaped like it, zero-initialised, checkpointed).
    fn state(&self, name: &str, param: &ParamSpec) -> Vec<String>;
    /// `step` counts from 1. Gradients are to be scaled by `grad_scale` (global-norm clipping).
    /// Return what else was done (the bf16 working copies written, the gradients zeroed) so the
    /// host skips it.
    fn step(&self, h: Host, slots: &[Slot], lr: f32, step: u64, grad_scale: f32) -> Result<StepDone>;
    /// Every setting with its default filled in, as TOML `key = value` lines (`pith config` shows
    /// them; [`settings_toml`] writes them). Empty: not reported.
    fn settings(&self) -> String {
        String::new()
    }
}

/// Moves tokens to their experts and back (within a rank, or across the expert-parallel group).
pub trait CommSchedule: Send + Sync + 'static {
    /// x [T,H] and the routing → rows sorted by local expert with offsets [E_local+1]; empty
    /// slots never move; a schedule may drop assignments (capacity) before the experts run.
    fn dispatch(&self, h: Host, x: Tensor, route: &RouterOut, experts: u32) -> Result<Dispatched>;
    /// y [N,H] expert outputs → out [T,H] = Σ over kept slots of weight · y.
    fn combine(&self, h: Host, y: Tensor, route: &RouterOut, d: &Dispatched) -> Result<Tensor>;
    /// dout [T,H] → WRITE dy [N,H] and d_weights [T,k] (0 for empty or dropped slots).
    #[allow(clippy::too_many_arguments)]
    fn combine_backward(
        &self,
        h: Host,
        dout: Tensor,
        y: Tensor,
        route: &RouterOut,
        d: &Dispatched,
        dy: Tensor,
        d_weights: Tensor,
    ) -> Result<()>;
    /// dx_sorted [N,H] → WRITE dx [T,H].
    fn dispatch_backward(&self, h: Host, dx_sorted: Tensor, d: &Dispatched, dx: Tensor) -> Result<()>;
    /// Every setting with its default filled in, as TOML `key = value` lines (`pith config` shows
    /// them; [`settings_toml`] writes them). Empty: not reported.
    fn settings(&self) -> String {
        String::new()
    }
}

/// One component a library provides; submitted with [`register!`].
pub struct Registration {
    pub kind: Kind,
    pub name: &'static str,
    pub description: &'static str,
    pub example: &'static str,
    pub source: &'static str,
    pub create: fn(&str, ModelDims) -> Result<abi::Component>,
    /// The settings of the component this table builds (its `settings()`).
    pub settings: fn(&str, ModelDims) -> Result<String>,
}
inventory::collect!(Registration);

/// A setting's value for [`settings!`]: integers, floats (f32 by their shortest decimal), bools,
/// strings and lists of them.
pub struct Setting(pub toml::Value);
macro_rules! setting_from {
    ($($t:ty => $f:expr),* $(,)?) => { $(impl From<$t> for Setting { fn from(v: $t) -> Setting { Setting($f(v)) } })* };
}
setting_from! {
    usize => |v: usize| toml::Value::Integer(v as i64),
    u64 => |v: u64| toml::Value::Integer(v as i64),
    u32 => |v: u32| toml::Value::Integer(v as i64),
    f64 => toml::Value::Float,
    f32 => |v: f32| toml::Value::Float(v.to_string().parse().unwrap_or(v as f64)),
    bool => toml::Value::Boolean,
    &str => |v: &str| toml::Value::String(v.into()),
    String => toml::Value::String,
}
impl<T: Into<Setting>, const N: usize> From<[T; N]> for Setting {
    fn from(v: [T; N]) -> Setting {
        Setting(toml::Value::Array(v.into_iter().map(|x| x.into().0).collect()))
    }
}
impl<T: Into<Setting>> From<Vec<T>> for Setting {
    fn from(v: Vec<T>) -> Setting {
        Setting(toml::Value::Array(v.into_iter().map(|x| x.into().0).collect()))
    }
}

/// A component's `settings()`: `settings!(top_k = self.top_k, normalize = self.normalize)`.
#[macro_export]
macro_rules! settings {
    ($($key:ident = $value:expr),* $(,)?) => {
        $crate::settings_toml(&[$((stringify!($key), $crate::Setting::from($value).0)),*])
    };
}

/// TOML `key = value` lines of a component's settings (for `settings()`), in the order given.
pub fn settings_toml(pairs: &[(&str, toml::Value)]) -> String {
    let table: toml::Table = pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let text = toml::to_string(&table).unwrap_or_default();
    let order = |line: &str| pairs.iter().position(|(k, _)| line.split(" = ").next() == Some(*k));
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_by_key(|l| order(l));
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// Parse a component's TOML table into its config struct (use `#[serde(deny_unknown_fields)]`).
/// Errors are one line and name the key in backticks, so the host can point at file:line.
pub fn parse_config<T: serde::de::DeserializeOwned>(toml_text: &str) -> Result<T> {
    toml::from_str(toml_text).map_err(|e| toml_error(toml_text, &e).1)
}

/// A TOML error as (1-based line, one-line message naming the key in backticks).
pub fn toml_error(text: &str, e: &toml::de::Error) -> (Option<usize>, String) {
    let msg = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else { return (None, msg) };
    let line_no = text[..span.start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key =
        line.split_once('=').map(|(k, _)| k.trim().trim_matches('"')).filter(|k| !k.is_empty() && !k.starts_with('['));
    match key {
        Some(k) if !msg.contains(&format!("`{k}`")) => (Some(line_no), format!("`{k}`: {msg}")),
        _ => (Some(line_no), msg),
    }
}

/// Register a component: `register!(Router, "name", "one line", "example toml", ctor)` where
/// `ctor: fn(&str, ModelDims) -> Result<T>` and `T` implements the kind's trait.
#[macro_export]
macro_rules! register {
    ($kind:ident, $name:literal, $description:literal, $example:expr, $ctor:expr) => {
        $crate::inventory::submit! {
            $crate::Registration {
                kind: $crate::Kind::$kind,
                name: $name,
                description: $description,
                example: $example,
                source: file!(),
                create: |cfg: &str, dims: $crate::ModelDims| -> $crate::Result<$crate::abi::Component> {
                    Ok($crate::wrap::$kind($ctor(cfg, dims)?))
                },
                settings: |cfg: &str, dims: $crate::ModelDims| -> $crate::Result<String> {
                    Ok($crate::settings_of::$kind(&$ctor(cfg, dims)?))
                },
            }
        }
    };
}

/// Export this crate's root module; call once per plugin library: `export_plugin!("my-pack");`.
#[macro_export]
macro_rules! export_plugin {
    ($pack:literal) => {
        extern "C" fn __pith_pack() -> $crate::abi_stable::std_types::RStr<'static> {
            $crate::abi_stable::std_types::RStr::from_str($pack)
        }
        extern "C" fn __pith_components() -> $crate::abi_stable::std_types::RVec<$crate::ComponentInfo> {
            $crate::root_components($pack)
        }
        extern "C" fn __pith_set_logger(f: $crate::abi::LogFn) {
            $crate::root_set_logger($pack, f)
        }
        /// The library's root module (also how the host links a built-in pack).
        #[$crate::abi_stable::export_root_module]
        pub fn pith_root_module() -> $crate::abi::PluginMod_Ref {
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::abi::PluginMod {
                pack: __pith_pack,
                components: __pith_components,
                create: $crate::ffi_create,
                set_logger: __pith_set_logger,
                settings: $crate::ffi_settings,
            }
            .leak_into_prefix()
        }
    };
}

pub use adapt::{settings_of, wrap};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_read_shared_and_write_through_f32s_mut() {
        let mut v = vec![1.0f32, 2.0, 3.0, 4.0];
        let t = Tensor::new(v.as_mut_ptr() as u64, DType::F32, Device::Cpu, &[2, 2]);
        let (a, b) = (t.f32s(), t.f32s());
        assert_eq!((a, a.as_ptr()), (b, b.as_ptr()));
        // SAFETY: no other slice of `v` is alive while `w` is.
        let w = unsafe { t.f32s_mut() };
        w[3] = 7.0;
        assert_eq!(t.f32s(), &[1.0, 2.0, 3.0, 7.0]);
        let empty = Tensor::new(0, DType::I32, Device::Cpu, &[0]);
        assert!(empty.i32s().is_empty());
        let null = Tensor::new(0, DType::F32, Device::Cpu, &[1]);
        assert!(std::panic::catch_unwind(|| null.f32s().len()).is_err(), "a null view must not be read");
        let (r1, scalar) = (t.rows(1, 1), Tensor::new(v.as_ptr() as u64, DType::F32, Device::Cpu, &[]));
        assert_eq!((r1.dims(), r1.f32s()), (vec![1, 2], &[3.0, 7.0][..]));
        assert_eq!(t.rows(2, 0).numel(), 0);
        assert!(std::panic::catch_unwind(|| t.rows(1, 2)).is_err(), "rows past the end");
        assert_eq!(scalar.rows(0, 1).f32s(), [1.0]);
        let wrong = Tensor { dtype: DType::I32, ..t };
        assert!(std::panic::catch_unwind(|| wrong.f32s().len()).is_err(), "dtype is checked");
    }
}
