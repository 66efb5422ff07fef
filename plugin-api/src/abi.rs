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

/// The five kinds of component a plugin can provide.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Router,
    Experts,
    BalanceLoss,
    Optimizer,
    CommSchedule,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Router, Kind::Experts, Kind::BalanceLoss, Kind::Optimizer, Kind::CommSchedule];
    /// The name used in TOML (`[router]`, `[[balance_loss]]`, ...) and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Router => "router",
            Kind::Experts => "experts",
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

/// How the host initialises a parameter. Normal draws from N(0, std²).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Normal(f32),
}

/// A parameter a component asks the host to allocate, initialise, checkpoint and optimise.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ParamSpec {
    pub name: RString,
    pub shape: RVec<u64>,
    pub init: Init,
    /// Whether the optimizer applies weight decay (false for norms and biases).
    pub decay: bool,
}

/// Model sizes a component is built for. `layer` is the index of the MoE layer it serves.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelDims {
    pub hidden: u32,
    pub experts: u32,
    pub expert_ffn: u32,
    pub layer: u32,
    pub layers: u32,
}

/// Router output for T tokens, E experts, top-k: logits [T,E] f32, ids [T,k] i32,
/// weights [T,k] f32 (the gates the combine step multiplies by), and whatever the router
/// saved for its backward (allocated with `Host::alloc`).
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RouterOut {
    pub logits: Tensor,
    pub ids: Tensor,
    pub weights: Tensor,
    pub saved: RVec<Tensor>,
}

/// Experts output: y [N,H] for the N expert-sorted rows, and what backward needs.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ExpertsOut {
    pub y: Tensor,
    pub saved: RVec<Tensor>,
}

/// Dispatched tokens: x [N,H] sorted by expert, offsets [E+1] i32 (rows of expert e are
/// offsets[e]..offsets[e+1]), and the schedule's own bookkeeping (e.g. the permutation).
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
    /// Record a scalar for this step's metrics line (averaged over the layers that report it).
    #[sabi(last_prefix_field)]
    fn metric(&self, name: RStr<'_>, value: f64);
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
    #[allow(clippy::too_many_arguments)]
    #[sabi(last_prefix_field)]
    fn backward(
        &self,
        ops: OpsRef<'_>,
        params: RSlice<'_, Tensor>,
        grads: RSlice<'_, Tensor>,
        x: Tensor,
        out: &RouterOut,
        d_weights: Tensor,
        d_logits: Tensor,
        dx: Tensor,
    ) -> Res<()>;
}

#[sabi_trait]
pub trait DynExperts: Send + Sync {
    fn params(&self) -> RVec<ParamSpec>;
    fn forward(&self, ops: OpsRef<'_>, params: RSlice<'_, Tensor>, x: Tensor, offsets: Tensor) -> Res<ExpertsOut>;
    #[allow(clippy::too_many_arguments)]
    #[sabi(last_prefix_field)]
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
}

#[sabi_trait]
pub trait DynBalanceLoss: Send + Sync {
    fn forward(&self, ops: OpsRef<'_>, logits: Tensor, ids: Tensor) -> Res<f32>;
    #[sabi(last_prefix_field)]
    fn backward(&self, ops: OpsRef<'_>, logits: Tensor, ids: Tensor, scale: f32, d_logits: Tensor) -> Res<()>;
}

#[sabi_trait]
pub trait DynOptimizer: Send + Sync {
    fn state(&self, param: &ParamSpec) -> RVec<RString>;
    #[allow(clippy::too_many_arguments)]
    #[sabi(last_prefix_field)]
    fn step(
        &self,
        ops: OpsRef<'_>,
        param: &ParamSpec,
        w: Tensor,
        g: Tensor,
        state: RSlice<'_, Tensor>,
        lr: f32,
        step: u64,
    ) -> Res<()>;
}

#[sabi_trait]
pub trait DynCommSchedule: Send + Sync {
    fn dispatch(&self, ops: OpsRef<'_>, x: Tensor, ids: Tensor, experts: u32) -> Res<Dispatched>;
    fn combine(&self, ops: OpsRef<'_>, y: Tensor, weights: Tensor, d: &Dispatched) -> Res<Tensor>;
    #[allow(clippy::too_many_arguments)]
    fn combine_backward(
        &self,
        ops: OpsRef<'_>,
        dout: Tensor,
        y: Tensor,
        weights: Tensor,
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
    #[sabi(last_prefix_field)]
    pub set_logger: extern "C" fn(LogFn),
}

impl RootModule for PluginMod_Ref {
    declare_root_module_statics! {PluginMod_Ref}
    const BASE_NAME: &'static str = "pith_plugin";
    const NAME: &'static str = "pith_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
