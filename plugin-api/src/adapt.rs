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
use std::sync::Mutex;

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

/// Run `f`, turning a panic into "panicked at FILE:LINE: message".
pub(crate) fn caught<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = PANIC_AT.with(|p| p.borrow_mut().take()).map(|a| format!(" at {a}")).unwrap_or_default();
        format!("panicked{at}: {msg}")
    })
}

/// Run `f`, turning an error or a panic into `RErr` with a readable message.
pub(crate) fn guarded<T>(f: impl FnOnce() -> crate::Result<T>) -> RResult<T, RString> {
    caught(f).and_then(|r| r).map_err(RString::from).into()
}

/// A component as an FFI object. The calls that cannot return an error never panic across the
/// boundary: `params()` is computed (under `catch_unwind`) when the component is created, and a
/// panic in `Optimizer::state` is reported as the error of the next `step`.
pub struct Wrap<T> {
    t: T,
    params: RVec<ParamSpec>,
    failed: Mutex<Option<String>>,
}

impl<T> Wrap<T> {
    fn new(t: T, params: Vec<ParamSpec>) -> Self {
        Wrap { t, params: params.into(), failed: Mutex::default() }
    }
    fn failed(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<T: crate::Router> DynRouter for Wrap<T> {
    fn params(&self) -> RVec<ParamSpec> {
        self.params.clone()
    }
    fn forward(&self, ops: OpsRef<'_>, p: RSlice<'_, Tensor>, x: Tensor) -> Res<RouterOut> {
        guarded(|| self.t.forward(Host(&ops), &p, x))
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
        guarded(|| self.t.backward(Host(&ops), &p, &g, x, out, d_weights, d_logits, dx))
    }
}

impl<T: crate::Experts> DynExperts for Wrap<T> {
    fn params(&self) -> RVec<ParamSpec> {
        self.params.clone()
    }
    fn forward(&self, ops: OpsRef<'_>, p: RSlice<'_, Tensor>, x: Tensor, offsets: Tensor) -> Res<ExpertsOut> {
        guarded(|| self.t.forward(Host(&ops), &p, x, offsets))
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
        guarded(|| self.t.backward(Host(&ops), &p, &g, x, offsets, out, dy, dx))
    }
}

impl<T: crate::BalanceLoss> DynBalanceLoss for Wrap<T> {
    fn forward(&self, ops: OpsRef<'_>, logits: Tensor, ids: Tensor) -> Res<f32> {
        guarded(|| self.t.forward(Host(&ops), logits, ids))
    }
    fn backward(&self, ops: OpsRef<'_>, logits: Tensor, ids: Tensor, scale: f32, d_logits: Tensor) -> Res<()> {
        guarded(|| self.t.backward(Host(&ops), logits, ids, scale, d_logits))
    }
}

impl<T: crate::Optimizer> DynOptimizer for Wrap<T> {
    fn state(&self, param: &ParamSpec) -> RVec<RString> {
        match caught(|| self.t.state(param)) {
            Ok(names) => names.into_iter().map(RString::from).collect(),
            Err(e) => {
                tracing::error!("optimizer state for `{}` {e}; its steps will fail", param.name);
                *self.failed() = Some(format!("state(`{}`) {e}", param.name));
                RVec::new()
            }
        }
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
        let failed = self.failed().clone();
        guarded(|| match failed {
            Some(e) => Err(e),
            None => self.t.step(Host(&ops), param, w, g, &state, lr, step),
        })
    }
}

impl<T: crate::CommSchedule> DynCommSchedule for Wrap<T> {
    fn dispatch(&self, ops: OpsRef<'_>, x: Tensor, ids: Tensor, experts: u32) -> Res<Dispatched> {
        guarded(|| self.t.dispatch(Host(&ops), x, ids, experts))
    }
    fn combine(&self, ops: OpsRef<'_>, y: Tensor, weights: Tensor, d: &Dispatched) -> Res<Tensor> {
        guarded(|| self.t.combine(Host(&ops), y, weights, d))
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
        guarded(|| self.t.combine_backward(Host(&ops), dout, y, weights, d, dy, d_weights))
    }
    fn dispatch_backward(&self, ops: OpsRef<'_>, dx_sorted: Tensor, d: &Dispatched, dx: Tensor) -> Res<()> {
        guarded(|| self.t.dispatch_backward(Host(&ops), dx_sorted, d, dx))
    }
}

/// Box a component of each kind as its FFI object (used by `register!`).
#[allow(non_snake_case)]
pub mod wrap {
    use super::*;
    /// Calls `t.params()` now (a panic there is the creating call's error).
    pub fn Router<T: crate::Router>(t: T) -> Component {
        let p = t.params();
        Component::Router(DynRouter_TO::from_value(Wrap::new(t, p), TD_Opaque))
    }
    /// Calls `t.params()` now (a panic there is the creating call's error).
    pub fn Experts<T: crate::Experts>(t: T) -> Component {
        let p = t.params();
        Component::Experts(DynExperts_TO::from_value(Wrap::new(t, p), TD_Opaque))
    }
    pub fn BalanceLoss<T: crate::BalanceLoss>(t: T) -> Component {
        Component::BalanceLoss(DynBalanceLoss_TO::from_value(Wrap::new(t, vec![]), TD_Opaque))
    }
    pub fn Optimizer<T: crate::Optimizer>(t: T) -> Component {
        Component::Optimizer(DynOptimizer_TO::from_value(Wrap::new(t, vec![]), TD_Opaque))
    }
    pub fn CommSchedule<T: crate::CommSchedule>(t: T) -> Component {
        Component::CommSchedule(DynCommSchedule_TO::from_value(Wrap::new(t, vec![]), TD_Opaque))
    }
    // Keep RBox in scope for the generated types' pointer parameter.
    #[allow(dead_code)]
    type _Ptr = RBox<()>;
}

/// Root-module entry (through `export_plugin!`): the components registered in this library. It
/// returns no error, so a panic is logged naming the pack and the list comes back empty.
pub fn root_components(pack: &str) -> RVec<ComponentInfo> {
    let list = || {
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
    };
    caught(list).unwrap_or_else(|e| {
        tracing::error!("plugin `{pack}`: listing its components {e}");
        RVec::new()
    })
}

/// Root-module entry: build component (kind, name) from its TOML table (the host names the
/// plugin in the error).
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

/// Root-module entry (dylibs only, through `export_plugin!`): install the host's log callback as
/// this library's tracing subscriber, and report panics as errors rather than printing them. A
/// panic here is printed naming the pack (there is no logger yet to take it).
pub fn root_set_logger(pack: &str, f: LogFn) {
    if let Err(e) = caught(|| {
        crate::log::install(f);
        quiet_panics();
    }) {
        eprintln!("plugin `{pack}`: setting up its logging {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{register, Result};

    /// A router whose `params()` panics, an optimizer whose `state()` panics for "bad" and whose
    /// step panics, and a constructor that panics.
    struct BadParams;
    impl crate::Router for BadParams {
        fn params(&self) -> Vec<ParamSpec> {
            panic!("no params today")
        }
        fn forward(&self, _: Host, _: &[Tensor], _: Tensor) -> Result<RouterOut> {
            unreachable!()
        }
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
        ) -> Result<()> {
            unreachable!()
        }
    }
    struct BadOpt;
    impl crate::Optimizer for BadOpt {
        fn state(&self, p: &ParamSpec) -> Vec<String> {
            assert!(p.name != "bad", "state of bad");
            vec!["m".into()]
        }
        fn step(&self, _: Host, _: &ParamSpec, _: Tensor, _: Tensor, _: &[Tensor], _: f32, _: u64) -> Result<()> {
            panic!("step {}", 7)
        }
    }
    register!(Router, "test-bad-params", "", "", |_: &str, _: ModelDims| Ok::<_, String>(BadParams));
    register!(Router, "test-bad-create", "", "", |_: &str, _: ModelDims| -> Result<BadParams> { panic!("ctor") });
    register!(Optimizer, "test-bad-opt", "", "", |_: &str, _: ModelDims| Ok::<_, String>(BadOpt));

    /// Host services that are never reached.
    struct NoOps;
    impl Ops for NoOps {
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn alloc(&self, _: RSlice<'_, u64>, _: DType, _: Device, _: bool) -> Res<Tensor> {
            unreachable!()
        }
        fn gemm(&self, _: Tensor, _: Tensor, _: Tensor, _: bool, _: bool, _: f32, _: f32) -> Res<()> {
            unreachable!()
        }
        fn grouped_gemm(&self, _: Tensor, _: Tensor, _: Tensor, _: Tensor, _: bool, _: bool) -> Res<()> {
            unreachable!()
        }
        fn grouped_gemm_wgrad(&self, _: Tensor, _: Tensor, _: Tensor, _: Tensor) -> Res<()> {
            unreachable!()
        }
        fn copy(&self, _: Tensor, _: Tensor) -> Res<()> {
            unreachable!()
        }
        fn compile(&self, _: RStr<'_>) -> Res<()> {
            unreachable!()
        }
        fn launch(&self, _: RStr<'_>, _: RStr<'_>, _: LaunchDims, _: RSlice<'_, Arg>) -> Res<()> {
            unreachable!()
        }
        fn metric(&self, _: RStr<'_>, _: f64) {}
    }

    const DIMS: ModelDims = ModelDims { hidden: 4, experts: 2, expert_ffn: 4, layer: 0, layers: 1 };

    fn create(kind: Kind, name: &str) -> std::result::Result<Component, String> {
        ffi_create(kind, name.into(), "".into(), DIMS).into_result().map_err(|e| e.to_string())
    }

    #[test]
    fn panics_in_root_calls_are_errors() {
        let err = |r: std::result::Result<Component, String>| r.err().expect("a panic must be an error");
        let e = err(create(Kind::Router, "test-bad-create"));
        assert!(e.starts_with("panicked") && e.ends_with("ctor"), "{e}");
        let e = err(create(Kind::Router, "test-bad-params"));
        assert!(e.contains("panicked") && e.ends_with("no params today"), "{e}");
        assert!(err(create(Kind::Router, "nope")).contains("no router named `nope`"));
        let names: Vec<String> = root_components("test-pack").iter().map(|c| c.name.to_string()).collect();
        assert!(names.contains(&"test-bad-opt".to_string()), "{names:?}");
        assert_eq!(caught(|| 3), Ok(3));
        assert!(caught(|| panic!("boom")).unwrap_err().ends_with(": boom"));
    }

    #[test]
    fn panics_in_component_calls_are_errors() {
        let Ok(Component::Optimizer(o)) = create(Kind::Optimizer, "test-bad-opt") else { panic!("an optimizer") };
        let (good, bad) =
            (ParamSpec::new("w", &[1], Init::Zeros, true), ParamSpec::new("bad", &[1], Init::Zeros, true));
        let mut v = [0f32; 1];
        let t = Tensor::new(v.as_mut_ptr() as u64, DType::F32, Device::Cpu, &[1]);
        let step = |p: &ParamSpec| o.step(ops_ref(&NoOps), p, t, t, RSlice::from_slice(&[t]), 0.1, 1).into_result();
        assert_eq!(o.state(&good).len(), 1);
        assert!(step(&good).unwrap_err().ends_with("step 7"));
        assert!(o.state(&bad).is_empty(), "a panicking state() returns nothing");
        let e = step(&good).unwrap_err();
        assert!(e.starts_with("state(`bad`) panicked") && e.ends_with("state of bad"), "{e}");
    }
}
