//! Turns the plain-Rust component traits into the FFI objects of [`crate::abi`]. Every call
//! runs under `catch_unwind` on the plugin's side, so a panic becomes an error string and
//! never unwinds into the host.

use crate::abi::{self, *};
use crate::{Host, Registration};
use abi_stable::{
    sabi_trait::prelude::TD_Opaque,
    std_types::{RBox, RResult, RSlice, RStr, RString, RVec},
};
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    /// Where the last panic on this thread happened (set by the hook `quiet_panics` installs).
    static PANIC_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// In a plugin library: record a panic's location instead of printing it, so the host reports
/// the panic as one error line (each dylib has its own copy of std and its own panic hook).
pub(crate) fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
        PANIC_AT.with(|p| *p.borrow_mut() = at);
    }));
}

/// Run `f`, turning an error or a panic into `RErr` with a readable message.
pub(crate) fn guarded<T>(f: impl FnOnce() -> crate::Result<T>) -> RResult<T, RString> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e.into()),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let at = PANIC_AT.with(|p| p.borrow_mut().take()).map(|a| format!(" at {a}")).unwrap_or_default();
            RResult::RErr(format!("panicked{at}: {msg}").into())
        }
    }
}

pub struct Wrap<T>(T);

impl<T: crate::Router> DynRouter for Wrap<T> {
    fn params(&self) -> RVec<ParamSpec> {
        self.0.params().into()
    }
    fn forward(&self, ops: OpsRef<'_>, p: RSlice<'_, Tensor>, x: Tensor) -> Res<RouterOut> {
        guarded(|| self.0.forward(Host(&ops), &p, x))
    }
    fn backward(
        &self,
        ops: OpsRef<'_>,
        p: RSlice<'_, Tensor>,
        g: RSlice<'_, Tensor>,
        x: Tensor,
        out: &RouterOut,
        d_weights: Tensor,
        d_logits: Tensor,
        dx: Tensor,
    ) -> Res<()> {
        guarded(|| self.0.backward(Host(&ops), &p, &g, x, out, d_weights, d_logits, dx))
    }
}

impl<T: crate::Experts> DynExperts for Wrap<T> {
    fn params(&self) -> RVec<ParamSpec> {
        self.0.params().into()
    }
    fn forward(&self, ops: OpsRef<'_>, p: RSlice<'_, Tensor>, x: Tensor, offsets: Tensor) -> Res<ExpertsOut> {
        guarded(|| self.0.forward(Host(&ops), &p, x, offsets))
    }
    fn backward(
        &self,
        ops: OpsRef<'_>,
        p: RSlice<'_, Tensor>,
        g: RSlice<'_, Tensor>,
        x: Tensor,
        offsets: Tensor,
        out: &ExpertsOut,
        dy: Tensor,
        dx: Tensor,
    ) -> Res<()> {
        guarded(|| self.0.backward(Host(&ops), &p, &g, x, offsets, out, dy, dx))
    }
}

impl<T: crate::BalanceLoss> DynBalanceLoss for Wrap<T> {
    fn forward(&self, ops: OpsRef<'_>, logits: Tensor, ids: Tensor) -> Res<f32> {
        guarded(|| self.0.forward(Host(&ops), logits, ids))
    }
    fn backward(&self, ops: OpsRef<'_>, logits: Tensor, ids: Tensor, scale: f32, d_logits: Tensor) -> Res<()> {
        guarded(|| self.0.backward(Host(&ops), logits, ids, scale, d_logits))
    }
}

impl<T: crate::Optimizer> DynOptimizer for Wrap<T> {
    fn state(&self, param: &ParamSpec) -> RVec<RString> {
        self.0.state(param).into_iter().map(RString::from).collect()
    }
    fn step(
        &self,
        ops: OpsRef<'_>,
        param: &ParamSpec,
        w: Tensor,
        g: Tensor,
        state: RSlice<'_, Tensor>,
        lr: f32,
        step: u64,
    ) -> Res<()> {
        guarded(|| self.0.step(Host(&ops), param, w, g, &state, lr, step))
    }
}

impl<T: crate::CommSchedule> DynCommSchedule for Wrap<T> {
    fn dispatch(&self, ops: OpsRef<'_>, x: Tensor, ids: Tensor, experts: u32) -> Res<Dispatched> {
        guarded(|| self.0.dispatch(Host(&ops), x, ids, experts))
    }
    fn combine(&self, ops: OpsRef<'_>, y: Tensor, weights: Tensor, d: &Dispatched) -> Res<Tensor> {
        guarded(|| self.0.combine(Host(&ops), y, weights, d))
    }
    fn combine_backward(
        &self,
        ops: OpsRef<'_>,
        dout: Tensor,
        y: Tensor,
        weights: Tensor,
        d: &Dispatched,
        dy: Tensor,
        d_weights: Tensor,
    ) -> Res<()> {
        guarded(|| self.0.combine_backward(Host(&ops), dout, y, weights, d, dy, d_weights))
    }
    fn dispatch_backward(&self, ops: OpsRef<'_>, dx_sorted: Tensor, d: &Dispatched, dx: Tensor) -> Res<()> {
        guarded(|| self.0.dispatch_backward(Host(&ops), dx_sorted, d, dx))
    }
}

/// Box a component of each kind as its FFI object (used by `register!`).
#[allow(non_snake_case)]
pub mod wrap {
    use super::*;
    pub fn Router<T: crate::Router>(t: T) -> Component {
        Component::Router(DynRouter_TO::from_value(Wrap(t), TD_Opaque))
    }
    pub fn Experts<T: crate::Experts>(t: T) -> Component {
        Component::Experts(DynExperts_TO::from_value(Wrap(t), TD_Opaque))
    }
    pub fn BalanceLoss<T: crate::BalanceLoss>(t: T) -> Component {
        Component::BalanceLoss(DynBalanceLoss_TO::from_value(Wrap(t), TD_Opaque))
    }
    pub fn Optimizer<T: crate::Optimizer>(t: T) -> Component {
        Component::Optimizer(DynOptimizer_TO::from_value(Wrap(t), TD_Opaque))
    }
    pub fn CommSchedule<T: crate::CommSchedule>(t: T) -> Component {
        Component::CommSchedule(DynCommSchedule_TO::from_value(Wrap(t), TD_Opaque))
    }
    // Keep RBox in scope for the generated types' pointer parameter.
    #[allow(dead_code)]
    type _Ptr = RBox<()>;
}

/// Root-module entry: the components registered in this library.
pub extern "C" fn ffi_components() -> RVec<ComponentInfo> {
    inventory::iter::<Registration>
        .into_iter()
        .map(|r| ComponentInfo {
            kind: r.kind,
            name: r.name.into(),
            description: r.description.into(),
            example: r.example.into(),
            source: r.source.into(),
        })
        .collect()
}

/// Root-module entry: build component (kind, name) from its TOML table.
pub extern "C" fn ffi_create(
    kind: Kind,
    name: RStr<'_>,
    config: RStr<'_>,
    dims: ModelDims,
) -> RResult<abi::Component, RString> {
    guarded(|| {
        let reg = inventory::iter::<Registration>
            .into_iter()
            .find(|r| r.kind == kind && r.name == name.as_str())
            .ok_or_else(|| format!("this library has no {} named `{}`", kind.as_str(), name))?;
        (reg.create)(config.as_str(), dims)
    })
}

/// Root-module entry (dylibs only): install the host's log callback as this library's tracing
/// subscriber, and report panics as errors rather than printing them.
pub extern "C" fn ffi_set_logger(f: LogFn) {
    crate::log::install(f);
    quiet_panics();
}
