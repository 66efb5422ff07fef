//! The types that cross the host/plugin boundary. Everything here is `#[repr(C)]` and
//! `StableAbi`; abi_stable checks their layout when a library is loaded. Changing any of them
//! is a breaking change: bump the plugin-api version (see docs/plugins.md).
#![allow(non_camel_case_types, non_local_definitions, clippy::too_many_arguments)]

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_trait::prelude::TD_Opaque,
    sabi_types::{RRef, VersionStrings},
    std_types::{RBox, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

/// The six kinds of component a plugin can provide.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Router,
    Experts,
    /// Runs on every token beside the routed experts (shared experts, gated or not); its output
    /// is added to the MoE block's. Same object as `Experts`, called with one group of all rows.
    Shared,
    BalanceLoss,
    Optimizer,
    CommSchedule,
}

impl Kind {
    pub const ALL: [Kind; 6] =
        [Kind::Router, Kind::Experts, Kind::Shared, Kind::BalanceLoss, Kind::Optimizer, Kind::CommSchedule];
    /// The name used in TOML (`[router]`, `[[balance_loss]]`, ...) and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Router => "router",
            Kind::Experts => "experts",
            Kind::Shared => "shared",
            Kind::BalanceLoss => "balance_loss",
            Kind::Optimizer => "optimizer",
            Kind::CommSchedule => "comm",
        }
    }
    pub fn parse(s: &str) -> Option<Kind> {
        let s = s.replace('-', "_");
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    I32,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 => 2,
        }
    }
}

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// A view of a contiguous, row-major tensor owned by the host. `addr` is a host pointer on
/// `Device::Cpu` and a device pointer on `Device::Cuda`. A view is only valid during the call
/// it was passed to (or, for tensors from `Host::alloc`, until the host ends the micro-batch).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct Tensor {
    pub addr: u64,
    pub dtype: DType,
    pub device: Device,
    pub rank: u8,
    pub shape: [u64; 4],
}

/// How the host initialises a declared tensor. Normal draws from N(0, std²).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Normal(f32),
    Constant(f32),
}

/// What the host does with a tensor a component declares.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Trained: a gradient, optimizer state, checkpointed.
    Param,
    /// Persistent state the component updates itself (e.g. an aux-loss-free bias): checkpointed
    /// and resumed, shown by `pith plan`, no gradient, never touched by the optimizer.
    Buffer,
    /// Statistics of one optimizer step: zeroed before the step, ACCUMULATED by the component
    /// over the step's micro-batches, summed over the data-parallel group, then read in
    /// `end_step`; not checkpointed.
    Accumulator,
}

/// A tensor a component asks the host to allocate, initialise, checkpoint and (for
/// `Role::Param`) optimise. Its full name is `layers.{l}.moe.{kind}.{name}` (balance losses:
/// `layers.{l}.moe.balance_loss.{i}.{name}`).
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ParamSpec {
    pub name: RString,
    pub shape: RVec<u64>,
    pub init: Init,
    /// Whether the optimizer applies weight decay (false for norms and biases).
    pub decay: bool,
    pub role: Role,
    /// The backward gives a surrogate gradient (straight-through, ...), not the derivative:
    /// `pith plugins check` does not hold it to finite differences.
    pub surrogate: bool,
}

/// Model sizes a component is built for. `layer` is the index of the MoE layer it serves.
/// Experts are sharded over the expert-parallel group: this rank holds experts
/// `first_expert .. first_expert + local_experts` (all of them on one rank).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelDims {
    pub hidden: u32,
    pub experts: u32,
    pub expert_ffn: u32,
    pub layer: u32,
    pub layers: u32,
    pub first_expert: u32,
    pub local_experts: u32,
}

/// The id of an empty routing slot: dispatch, combine, load metrics and balance losses skip it
/// at no cost (a token may use fewer than k experts, or none).
pub const EMPTY: i32 = -1;

/// Router output for T tokens, E experts and k slots: logits [T,E] f32 (raw scores), probs
/// [T,E] f32 (the router's probabilities — softmax, sigmoid, ... — what balance losses use),
/// ids [T,k] i32 (an expert or [`EMPTY`]), weights [T,k] f32 (the gates combine multiplies by;
/// 0 for empty slots), and whatever the router saved for its backward (from `Host::alloc`).
/// Expert-choice routers fill the slots from the experts' side (k = the most experts a token
/// can get). Dispatch sees all of it, so it can drop by gate before the experts run.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RouterOut {
    pub logits: Tensor,
    pub probs: Tensor,
    pub ids: Tensor,
    pub weights: Tensor,
    pub saved: RVec<Tensor>,
}

/// Where a call sits in training: the step (from 1; 0 outside training), the micro-batch
/// (0-based) of `micro_batches`, the tokens as `batch` sequences of `seq`, the layer, whether
/// gradients follow (false in eval), and a seed for this (run seed, step, micro-batch, layer):
/// derive random numbers from it (`kit::Rng`) and a resumed run draws the same ones.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Context {
    pub step: u64,
    pub micro_batch: u32,
    pub micro_batches: u32,
    pub batch: u32,
    pub seq: u32,
    pub layer: u32,
    pub training: bool,
    pub seed: u64,
}

/// A process group for collectives. With one rank every collective is the identity.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Every rank. Each trains on its own rows of the micro-batch, so a statistic of the
    /// global micro-batch (e.g. expert counts for a balance loss) is a sum over `World`.
    World,
    /// Ranks holding the same experts (their gradients are summed over it); `World` when
    /// `parallel.ep` is 1.
    DataParallel,
    /// Ranks sharing one MoE layer's experts (`ModelDims::first_expert` / `local_experts`).
    ExpertParallel,
}

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// One parameter as the optimizer sees it: its full name (`layers.0.moe.experts.w_up`), spec,
/// master weight `w` and gradient `g` (f32), state tensors (in `Optimizer::state` order) and
/// `w_lowp`, the bf16 working copy on CUDA (numel 0 on the CPU).
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct Slot {
    pub name: RString,
    pub spec: ParamSpec,
    pub w: Tensor,
    pub g: Tensor,
    pub state: RVec<Tensor>,
    pub w_lowp: Tensor,
}

/// What an optimizer step did beyond updating `w`: the host skips what it already did.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepDone {
    /// `w_lowp` holds bf16(w) for every slot.
    pub wrote_lowp: bool,
    /// every `g` is zero.
    pub zeroed_grads: bool,
}

/// Experts output: y [N,H] for the N expert-sorted rows, and what backward needs.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ExpertsOut {
    pub y: Tensor,
    pub saved: RVec<Tensor>,
}

/// Dispatched tokens: x [N,H] sorted by this rank's (local) expert, offsets [E_local+1] i32
/// (rows of local expert e are offsets[e]..offsets[e+1]; N counts only the assignments kept:
/// no empty slots, no dropped ones), and the schedule's own bookkeeping (e.g. the permutation).
/// `offsets` is a host (CPU) tensor on every device: grouped GEMMs need the group sizes there.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct Dispatched {
    pub x: Tensor,
    pub offsets: Tensor,
    pub saved: RVec<Tensor>,
}

/// One argument of a kernel launch: a tensor's address (`Tensor::arg`) or a scalar.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    F32(f32),
    I64(i64),
}

/// Where a kernel runs: `grid` blocks of `block` threads with `shared_mem` bytes of dynamic
/// shared memory per block.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_mem: u32,
}

/// The host's services to a plugin: memory, GEMMs, copies, kernels and metrics. Implemented by the host for
/// each device; plugins reach it through [`crate::Host`].
#[sabi_trait]
pub trait Ops {
    fn device(&self) -> Device;
    /// A tensor on `device` (this one's, or `Cpu` for host memory) that lives until the host
    /// finishes the current micro-batch; zero-filled when `zeroed`, else of undefined contents.
    fn alloc(&self, shape: RSlice<'_, u64>, dtype: DType, device: Device, zeroed: bool) -> RResult<Tensor, RString>;
    /// c = alpha · op(a) · op(b) + beta · c, 2-D; op transposes when its flag is set. On the CPU
    /// all f32; on CUDA a and b both bf16 (or both f32) and c bf16 or f32, fp32 accumulation.
    fn gemm(
        &self,
        a: Tensor,
        b: Tensor,
        c: Tensor,
        trans_a: bool,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> RResult<(), RString>;
    /// For each group g (rows offsets[g]..offsets[g+1] of x and y):
    /// y_g = x_g · w[g] (w [G,K,N]) or x_g · w[g]ᵀ when trans_w (w [G,N,K]); y_g += when accumulate.
    fn grouped_gemm(
        &self,
        x: Tensor,
        w: Tensor,
        y: Tensor,
        offsets: Tensor,
        trans_w: bool,
        accumulate: bool,
    ) -> RResult<(), RString>;
    /// Weight gradient of a grouped GEMM: dw[g] += x_gᵀ · dy_g (dw [G,K,N]).
    fn grouped_gemm_wgrad(&self, x: Tensor, dy: Tensor, dw: Tensor, offsets: Tensor) -> RResult<(), RString>;
    /// Copy `src` into `dst` (same dtype and element count; either may be on the host or the
    /// device). Copies to the host wait for the device.
    fn copy(&self, src: Tensor, dst: Tensor) -> RResult<(), RString>;
    /// Compile CUDA C `source` for this device (NVRTC, cached on disk by source and arch), so
    /// a later `launch` of it is quick; the error is the compiler's log. Errors on the CPU.
    fn compile(&self, source: RStr<'_>) -> RResult<(), RString>;
    /// Launch `extern "C"` kernel `name` of `source` on the host's stream with `args` (in the
    /// kernel's parameter order). Errors on the CPU: there the plugin runs its own CPU code.
    fn launch(&self, source: RStr<'_>, name: RStr<'_>, dims: LaunchDims, args: RSlice<'_, Arg>)
        -> RResult<(), RString>;
    /// Record a scalar for this step's metrics line: averaged over every call in the step
    /// (layers and micro-batches), weighted by `weight`; eval passes are not recorded.
    fn metric(&self, name: RStr<'_>, value: f64, weight: f64);
    /// Where this call sits: step, micro-batch, batch × seq layout, layer, seed.
    fn context(&self) -> Context;
    /// G independent GEMMs over the leading dimension: c[g] = alpha · op(a[g]) · op(b[g]) +
    /// beta · c[g] (3-D tensors; dtypes as for `gemm`).
    fn gemm_batched(
        &self,
        a: Tensor,
        b: Tensor,
        c: Tensor,
        trans_a: bool,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> RResult<(), RString>;
    /// This rank's index in `group` and the group's size.
    fn rank(&self, group: Group) -> u32;
    fn size(&self, group: Group) -> u32;
    /// In place over `group`.
    fn all_reduce(&self, t: Tensor, op: ReduceOp, group: Group) -> RResult<(), RString>;
    /// dst = the ranks' `src` concatenated along dimension 0, in rank order.
    fn all_gather(&self, src: Tensor, dst: Tensor, group: Group) -> RResult<(), RString>;
    /// dst = this rank's slice (dimension 0) of the sum of the ranks' `src`.
    fn reduce_scatter(&self, src: Tensor, dst: Tensor, group: Group) -> RResult<(), RString>;
    /// Rows (dimension 0) of `src`, `send[r]` of them in order to rank r, land in `dst`,
    /// `recv[r]` of them from rank r in rank order. Counts are on the host.
    fn all_to_all(
        &self,
        src: Tensor,
        send: RSlice<'_, u64>,
        dst: Tensor,
        recv: RSlice<'_, u64>,
        group: Group,
    ) -> RResult<(), RString>;
    /// Like `metric`, for a value still on the device: `sum[0]` (f32) is a sum over `count` items
    /// (tokens, assignments); the line shows Σ sum / Σ count. The host reads it once per step,
    /// so recording it costs no synchronisation.
    #[sabi(last_prefix_field)]
    fn metric_sum(&self, name: RStr<'_>, sum: Tensor, count: f64);
}

/// How a plugin holds the host's ops during one call.
pub type OpsRef<'a> = Ops_TO<'a, RRef<'a, ()>>;

pub fn ops_ref<T: Ops>(ops: &T) -> OpsRef<'_> {
    Ops_TO::from_ptr(ops, TD_Opaque)
}

pub type Res<T> = RResult<T, RString>;

#[sabi_trait]
pub trait DynRouter: Send + Sync {
    fn params(&self) -> RVec<ParamSpec>;
    fn forward(&self, ops: OpsRef<'_>, params: RSlice<'_, Tensor>, x: Tensor) -> Res<RouterOut>;
    /// `d_probs` and `d_logits` hold what the balance losses put there.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        ops: OpsRef<'_>,
        params: RSlice<'_, Tensor>,
        grads: RSlice<'_, Tensor>,
        x: Tensor,
        out: &RouterOut,
        d_weights: Tensor,
        d_probs: Tensor,
        d_logits: Tensor,
        dx: Tensor,
    ) -> Res<()>;
    /// Once per optimizer step, after the accumulators are summed over the data-parallel group.
    #[sabi(last_prefix_field)]
    fn end_step(&self, ops: OpsRef<'_>, params: RSlice<'_, Tensor>) -> Res<()>;
}

/// Experts (and shared experts: `Kind::Shared`, called with one group of all T rows).
#[sabi_trait]
pub trait DynExperts: Send + Sync {
    fn params(&self) -> RVec<ParamSpec>;
    /// Forward FLOPs for these rows per local expert (for plan, bench and MFU).
    fn flops(&self, rows: RSlice<'_, u64>) -> f64;
    fn forward(&self, ops: OpsRef<'_>, params: RSlice<'_, Tensor>, x: Tensor, offsets: Tensor) -> Res<ExpertsOut>;
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        ops: OpsRef<'_>,
        params: RSlice<'_, Tensor>,
        grads: RSlice<'_, Tensor>,
        x: Tensor,
        offsets: Tensor,
        out: &ExpertsOut,
        dy: Tensor,
        dx: Tensor,
    ) -> Res<()>;
    #[sabi(last_prefix_field)]
    fn end_step(&self, ops: OpsRef<'_>, params: RSlice<'_, Tensor>) -> Res<()>;
}

#[sabi_trait]
pub trait DynBalanceLoss: Send + Sync {
    fn params(&self) -> RVec<ParamSpec>;
    fn forward(&self, ops: OpsRef<'_>, params: RSlice<'_, Tensor>, route: &RouterOut, loss: Tensor) -> Res<()>;
    fn backward(
        &self,
        ops: OpsRef<'_>,
        params: RSlice<'_, Tensor>,
        route: &RouterOut,
        scale: f32,
        d_probs: Tensor,
        d_logits: Tensor,
    ) -> Res<()>;
    #[sabi(last_prefix_field)]
    fn end_step(&self, ops: OpsRef<'_>, params: RSlice<'_, Tensor>) -> Res<()>;
}

#[sabi_trait]
pub trait DynOptimizer: Send + Sync {
    fn state(&self, name: RStr<'_>, param: &ParamSpec) -> RVec<RString>;
    /// Every parameter in one call; gradients are to be multiplied by `grad_scale` (the clip).
    #[sabi(last_prefix_field)]
    fn step(&self, ops: OpsRef<'_>, slots: RSlice<'_, Slot>, lr: f32, step: u64, grad_scale: f32) -> Res<StepDone>;
}

#[sabi_trait]
pub trait DynCommSchedule: Send + Sync {
    fn dispatch(&self, ops: OpsRef<'_>, x: Tensor, route: &RouterOut, experts: u32) -> Res<Dispatched>;
    fn combine(&self, ops: OpsRef<'_>, y: Tensor, route: &RouterOut, d: &Dispatched) -> Res<Tensor>;
    #[allow(clippy::too_many_arguments)]
    fn combine_backward(
        &self,
        ops: OpsRef<'_>,
        dout: Tensor,
        y: Tensor,
        route: &RouterOut,
        d: &Dispatched,
        dy: Tensor,
        d_weights: Tensor,
    ) -> Res<()>;
    #[sabi(last_prefix_field)]
    fn dispatch_backward(&self, ops: OpsRef<'_>, dx_sorted: Tensor, d: &Dispatched, dx: Tensor) -> Res<()>;
}

pub type RouterBox = DynRouter_TO<'static, RBox<()>>;
pub type ExpertsBox = DynExperts_TO<'static, RBox<()>>;
pub type BalanceLossBox = DynBalanceLoss_TO<'static, RBox<()>>;
pub type OptimizerBox = DynOptimizer_TO<'static, RBox<()>>;
pub type CommScheduleBox = DynCommSchedule_TO<'static, RBox<()>>;

/// A constructed component, one variant per kind.
#[repr(u8)]
#[derive(StableAbi)]
pub enum Component {
    Router(RouterBox),
    Experts(ExpertsBox),
    Shared(ExpertsBox),
    BalanceLoss(BalanceLossBox),
    Optimizer(OptimizerBox),
    CommSchedule(CommScheduleBox),
}

/// What `pith plugins list` shows about a component.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ComponentInfo {
    pub kind: Kind,
    pub name: RString,
    pub description: RString,
    /// A TOML table that selects this component with its default settings.
    pub example: RString,
    /// The source file that defines it (as `file!()` saw it when the plugin was built).
    pub source: RString,
}

/// Log callback the host gives a loaded library: level (1 = error .. 5 = trace), target, message.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct LogFn {
    pub log: extern "C" fn(u8, RString, RString),
}

/// The root module every plugin library exports (one per library).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginMod_Ref)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The pack's name (its crate name).
    pub pack: extern "C" fn() -> RStr<'static>,
    pub components: extern "C" fn() -> RVec<ComponentInfo>,
    /// Build component (kind, name) from its TOML table (as text) for a model of these sizes.
    pub create: extern "C" fn(Kind, RStr<'_>, RStr<'_>, ModelDims) -> RResult<Component, RString>,
    /// Route the library's `tracing` events to the host (each dylib has its own globals).
    pub set_logger: extern "C" fn(LogFn),
    /// Since 0.4.0: the settings of component (kind, name) built from this TOML table, every
    /// default filled in, as TOML lines (empty: not reported; `pith config` shows them).
    #[sabi(last_prefix_field)]
    pub settings: extern "C" fn(Kind, RStr<'_>, RStr<'_>, ModelDims) -> RResult<RString, RString>,
}

impl RootModule for PluginMod_Ref {
    declare_root_module_statics! {PluginMod_Ref}
    const BASE_NAME: &'static str = "pith_plugin";
    const NAME: &'static str = "pith_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
