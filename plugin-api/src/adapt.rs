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
        d_probs: Tensor,
        d_logits: Tensor,
        dx: Tensor,
    ) -> Res<()> {
        guarded(|| self.t.backward(Host(&ops), &p, &g, x, out, d_weights, d_probs, d_logits, dx))
    }
    fn end_step(&self, ops: OpsRef<'_>, p: RSlice<'_, Tensor>) -> Res<()> {
        guarded(|| self.t.end_step(Host(&ops), &p))
    }
}

impl<T: crate::Experts> DynExperts for Wrap<T> {
    fn params(&self) -> RVec<ParamSpec> {
        self.params.clone()
    }
    fn flops(&self, rows: RSlice<'_, u64>) -> f64 {
        caught(|| self.t.flops(&rows)).unwrap_or_else(|e| {
            tracing::error!("flops() {e}");
            f64::NAN
        })
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
    fn end_step(&self, ops: OpsRef<'_>, p: RSlice<'_, Tensor>) -> Res<()> {
        guarded(|| self.t.end_step(Host(&ops), &p))
    }
}

impl<T: crate::BalanceLoss> DynBalanceLoss for Wrap<T> {
    fn params(&self) -> RVec<ParamSpec> {
        self.params.clone()
    }
    fn forward(&self, ops: OpsRef<'_>, p: RSlice<'_, Tensor>, route: &RouterOut, loss: Tensor) -> Res<()> {
        guarded(|| self.t.forward(Host(&ops), &p, route, loss))
    }
    fn backward(
        &self,
        ops: OpsRef<'_>,
        p: RSlice<'_, Tensor>,
        route: &RouterOut,
        scale: f32,
        d_probs: Tensor,
        d_logits: Tensor,
    ) -> Res<()> {
        guarded(|| self.t.backward(Host(&ops), &p, route, scale, d_probs, d_logits))
    }
    fn end_step(&self, ops: OpsRef<'_>, p: RSlice<'_, Tensor>) -> Res<()> {
        guarded(|| self.t.end_step(Host(&ops), &p))
    }
}

impl<T: crate::Optimizer> DynOptimizer for Wrap<T> {
    fn state(&self, name: RStr<'_>, param: &ParamSpec) -> RVec<RString> {
        match caught(|| self.t.state(name.as_str(), param)) {
            Ok(names) => names.into_iter().map(RString::from).collect(),
            Err(e) => {
                tracing::error!("optimizer state for `{name}` {e}; its steps will fail");
                *self.failed() = Some(format!("state(`{name}`) {e}"));
                RVec::new()
            }
        }
    }
    fn step(&self, ops: OpsRef<'_>, slots: RSlice<'_, Slot>, lr: f32, step: u64, grad_scale: f32) -> Res<StepDone> {
        let failed = self.failed().clone();
        guarded(|| match failed {
            Some(e) => Err(e),
            None => self.t.step(Host(&ops), &slots, lr, step, grad_scale),
        })
    }
}

impl<T: crate::CommSchedule> DynCommSchedule for Wrap<T> {
    fn dispatch(&self, ops: OpsRef<'_>, x: Tensor, route: &RouterOut, experts: u32) -> Res<Dispatched> {
        guarded(|| self.t.dispatch(Host(&ops), x, route, experts))
    }
    fn combine(&self, ops: OpsRef<'_>, y: Tensor, route: &RouterOut, d: &Dispatched) -> Res<Tensor> {
        guarded(|| self.t.combine(Host(&ops), y, route, d))
    }
    fn combine_backward(
        &self,
        ops: OpsRef<'_>,
        dout: Tensor,
        y: Tensor,
        route: &RouterOut,
        d: &Dispatched,
        dy: Tensor,
        d_weights: Tensor,
    ) -> Res<()> {
        guarded(|| self.t.combine_backward(Host(&ops), dout, y, route, d, dy, d_weights))
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
    /// An always-on expert (`Kind::Shared`): the experts trait, called with one group.
    pub fn Shared<T: crate::Experts>(t: T) -> Component {
        let p = t.params();
        Component::Shared(DynExperts_TO::from_value(Wrap::new(t, p), TD_Opaque))
    }
    pub fn BalanceLoss<T: crate::BalanceLoss>(t: T) -> Component {
        let p = t.params();
        Component::BalanceLoss(DynBalanceLoss_TO::from_value(Wrap::new(t, p), TD_Opaque))
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

/// A component's `settings()` by its kind (used by `register!`).
#[allow(non_snake_case)]
pub mod settings_of {
    pub fn Router<T: crate::Router>(t: &T) -> String {
        t.settings()
    }
    pub fn Experts<T: crate::Experts>(t: &T) -> String {
        t.settings()
    }
    pub fn Shared<T: crate::Experts>(t: &T) -> String {
        t.settings()
    }
    pub fn BalanceLoss<T: crate::BalanceLoss>(t: &T) -> String {
        t.settings()
    }
    pub fn Optimizer<T: crate::Optimizer>(t: &T) -> String {
        t.settings()
    }
    pub fn CommSchedule<T: crate::CommSchedule>(t: &T) -> String {
        t.settings()
    }
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

/// Root-module entry: the settings (`settings()`) of component (kind, name) built from its TOML
/// table.
pub extern "C" fn ffi_settings(
    kind: Kind,
    name: RStr<'_>,
    config: RStr<'_>,
    dims: ModelDims,
) -> RResult<RString, RString> {
    guarded(|| {
        let reg = inventory::iter::<Registration>
            .into_iter()
            .find(|r| r.kind == kind && r.name == name.as_str())
            .ok_or_else(|| format!("this library has no {} named `{}`", kind.as_str(), name))?;
        (reg.settings)(config.as_str(), dims).map(RString::from)
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
    use crate::kit::TestHost;
    use crate::{register, Result};

    /// A component of every kind whose every call panics with "boom in <call>" (and whose
    /// optimizer `state` panics for the parameter "bad").
    struct Boom;
    impl crate::Router for Boom {
        fn params(&self) -> Vec<ParamSpec> {
            vec![]
        }
        fn forward(&self, _: Host, _: &[Tensor], _: Tensor) -> Result<RouterOut> {
            panic!("boom in forward")
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
            _: Tensor,
        ) -> Result<()> {
            panic!("boom in backward")
        }
        fn end_step(&self, _: Host, _: &[Tensor]) -> Result<()> {
            panic!("boom in end_step")
        }
    }
    impl crate::Experts for Boom {
        fn params(&self) -> Vec<ParamSpec> {
            vec![]
        }
        fn flops(&self, _: &[u64]) -> f64 {
            panic!("boom in flops")
        }
        fn forward(&self, _: Host, _: &[Tensor], _: Tensor, _: Tensor) -> Result<ExpertsOut> {
            panic!("boom in forward")
        }
        fn backward(
            &self,
            _: Host,
            _: &[Tensor],
            _: &[Tensor],
            _: Tensor,
            _: Tensor,
            _: &ExpertsOut,
            _: Tensor,
            _: Tensor,
        ) -> Result<()> {
            panic!("boom in backward")
        }
        fn end_step(&self, _: Host, _: &[Tensor]) -> Result<()> {
            panic!("boom in end_step")
        }
    }
    impl crate::BalanceLoss for Boom {
        fn forward(&self, _: Host, _: &[Tensor], _: &RouterOut, _: Tensor) -> Result<()> {
            panic!("boom in forward")
        }
        fn backward(&self, _: Host, _: &[Tensor], _: &RouterOut, _: f32, _: Tensor, _: Tensor) -> Result<()> {
            panic!("boom in backward")
        }
        fn end_step(&self, _: Host, _: &[Tensor]) -> Result<()> {
            panic!("boom in end_step")
        }
    }
    impl crate::Optimizer for Boom {
        fn state(&self, name: &str, _: &ParamSpec) -> Vec<String> {
            assert!(name != "bad", "state of bad");
            vec!["m".into()]
        }
        fn step(&self, _: Host, _: &[Slot], _: f32, _: u64, _: f32) -> Result<StepDone> {
            panic!("boom in step")
        }
    }
    impl crate::CommSchedule for Boom {
        fn dispatch(&self, _: Host, _: Tensor, _: &RouterOut, _: u32) -> Result<Dispatched> {
            panic!("boom in dispatch")
        }
        fn combine(&self, _: Host, _: Tensor, _: &RouterOut, _: &Dispatched) -> Result<Tensor> {
            panic!("boom in combine")
        }
        fn combine_backward(
            &self,
            _: Host,
            _: Tensor,
            _: Tensor,
            _: &RouterOut,
            _: &Dispatched,
            _: Tensor,
            _: Tensor,
        ) -> Result<()> {
            panic!("boom in combine_backward")
        }
        fn dispatch_backward(&self, _: Host, _: Tensor, _: &Dispatched, _: Tensor) -> Result<()> {
            panic!("boom in dispatch_backward")
        }
    }

    /// A router whose `params()` panics.
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
            _: Tensor,
        ) -> Result<()> {
            unreachable!()
        }
    }
    register!(Router, "test-bad-params", "", "", |_: &str, _: ModelDims| Ok::<_, String>(BadParams));
    register!(Router, "test-bad-create", "", "", |_: &str, _: ModelDims| -> Result<BadParams> { panic!("ctor") });
    register!(Optimizer, "test-boom", "", "", |_: &str, _: ModelDims| Ok::<_, String>(Boom));

    const DIMS: ModelDims =
        ModelDims { hidden: 4, experts: 2, expert_ffn: 4, layer: 0, layers: 1, first_expert: 0, local_experts: 2 };

    fn create(kind: Kind, name: &str) -> std::result::Result<Component, String> {
        ffi_create(kind, name.into(), "".into(), DIMS).into_result().map_err(|e| e.to_string())
    }

    /// `r` is the error of a panic in `call`, located in this file (the plugin's source).
    #[track_caller]
    fn boom<T>(r: Res<T>, call: &str) {
        let e = r.into_result().err().map(|e| e.to_string()).unwrap_or_else(|| panic!("{call}: Ok from a panic"));
        assert!(
            e.starts_with("panicked at ") && e.contains("adapt.rs:") && e.ends_with(&format!(": boom in {call}")),
            "{e}"
        );
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
        assert!(names.contains(&"test-boom".to_string()), "{names:?}");
        assert_eq!(caught(|| 3), Ok(3));
        assert!(caught(|| panic!("boom")).unwrap_err().ends_with(": boom"));
    }

    #[test]
    fn panics_in_every_component_call_are_errors_naming_where() {
        // The hook a plugin library installs (restored after: the hook is global).
        let previous = std::panic::take_hook();
        quiet_panics();
        let th = TestHost::new(2);
        let ops = || ops_ref(&th);
        let (t, none) = (th.zeros(&[2, 2], DType::F32), RSlice::<Tensor>::from_slice(&[]));
        let route = RouterOut { logits: t, probs: t, ids: t, weights: t, saved: RVec::new() };

        let Component::Router(r) = wrap::Router(Boom) else { unreachable!() };
        boom(r.forward(ops(), none, t), "forward");
        boom(r.backward(ops(), none, none, t, &route, t, t, t, t), "backward");
        boom(r.end_step(ops(), none), "end_step");

        let out = ExpertsOut { y: t, saved: RVec::new() };
        for c in [wrap::Experts(Boom), wrap::Shared(Boom)] {
            let (Component::Experts(e) | Component::Shared(e)) = c else { unreachable!() };
            assert!(e.flops(RSlice::from_slice(&[1, 2])).is_nan(), "a panicking flops() is NaN");
            boom(e.forward(ops(), none, t, t), "forward");
            boom(e.backward(ops(), none, none, t, t, &out, t, t), "backward");
            boom(e.end_step(ops(), none), "end_step");
        }

        let Component::BalanceLoss(b) = wrap::BalanceLoss(Boom) else { unreachable!() };
        boom(b.forward(ops(), none, &route, t), "forward");
        boom(b.backward(ops(), none, &route, 1.0, t, t), "backward");
        boom(b.end_step(ops(), none), "end_step");

        let Component::CommSchedule(c) = wrap::CommSchedule(Boom) else { unreachable!() };
        let d = Dispatched { x: t, offsets: t, saved: RVec::new() };
        boom(c.dispatch(ops(), t, &route, 2), "dispatch");
        boom(c.combine(ops(), t, &route, &d), "combine");
        boom(c.combine_backward(ops(), t, t, &route, &d, t, t), "combine_backward");
        boom(c.dispatch_backward(ops(), t, &d, t), "dispatch_backward");

        // The optimizer, built through the root module; a panic in `state` fails the next step.
        let Ok(Component::Optimizer(o)) = create(Kind::Optimizer, "test-boom") else { panic!("an optimizer") };
        let spec = ParamSpec::new("w", &[1], Init::Zeros, true);
        let slots = [Slot { name: "w".into(), spec: spec.clone(), w: t, g: t, state: RVec::new(), w_lowp: t }];
        let step = || o.step(ops(), RSlice::from_slice(&slots), 0.1, 1, 1.0);
        assert_eq!(o.state("w".into(), &spec).len(), 1);
        boom(step(), "step");
        assert!(o.state("bad".into(), &spec).is_empty(), "a panicking state() returns nothing");
        let e = step().into_result().unwrap_err().to_string();
        std::panic::set_hook(previous);
        assert!(e.starts_with("state(`bad`) panicked at ") && e.ends_with("state of bad"), "{e}");
    }
}
