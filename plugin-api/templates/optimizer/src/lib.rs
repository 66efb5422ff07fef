//! `{{name}}`: an optimizer plugin for Pith (scaffolded by `pith plugins new --kind optimizer`).
//!
//! Math: SGD with momentum and decoupled weight decay, for every trained parameter (`Role::Param`;
//! buffers and accumulators are the components' own) with its gradient scaled by `grad_scale`
//! (the host's global-norm clipping):
//! m = μ·m + grad_scale·g;  w = w − lr·(m + wd·w)   (wd only for parameters with `decay`).
//! The host then writes the bf16 working copies and zeroes the gradients (`StepDone::default()`).
//! CPU only: on CUDA w, g and m live on the GPU (see plugins/std/src/adamw.rs for a kernel).
//! `cargo test` runs its test; `pith plugins check {{name}}` checks it; select it with
//! `[optimizer] plugin = "{{name}}"`.

use pith_plugin_api::{
    kit, parse_config, register, Host, ModelDims, Optimizer, ParamSpec, Result, Role, Slot, StepDone,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("{{name}}");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_momentum")]
    momentum: f32,
    #[serde(default)]
    weight_decay: f32,
}

fn default_momentum() -> f32 {
    0.9
}

struct MyOptimizer {
    momentum: f32,
    weight_decay: f32,
}

fn create(config: &str, _dims: ModelDims) -> Result<MyOptimizer> {
    let c: Config = parse_config(config)?;
    if !(0.0..1.0).contains(&c.momentum) {
        return Err(format!("`momentum` = {} must be in [0, 1)", c.momentum));
    }
    if !(c.weight_decay >= 0.0 && c.weight_decay.is_finite()) {
        return Err(format!("`weight_decay` = {} must be a finite number >= 0", c.weight_decay));
    }
    Ok(MyOptimizer { momentum: c.momentum, weight_decay: c.weight_decay })
}

register!(
    Optimizer,
    "{{name}}",
    "SGD with momentum (scaffolded; edit me)",
    "[optimizer]\nplugin = \"{{name}}\"\nmomentum = 0.9\nweight_decay = 0.0",
    create
);

impl Optimizer for MyOptimizer {
    /// Every setting with its default filled in (`pith config` shows them).
    fn settings(&self) -> String {
        pith_plugin_api::settings!(momentum = self.momentum, weight_decay = self.weight_decay)
    }

    fn state(&self, _name: &str, _param: &ParamSpec) -> Vec<String> {
        vec!["momentum".into()]
    }

    fn step(&self, h: Host, slots: &[Slot], lr: f32, _step: u64, grad_scale: f32) -> Result<StepDone> {
        kit::require_cpu(&h, "{{name}}")?;
        for s in slots.iter().filter(|s| s.spec.role == Role::Param) {
            let wd = if s.spec.decay { self.weight_decay } else { 0.0 };
            // Writes go through f32s_mut, which is unsafe: no other slice of w or the state may
            // be alive meanwhile (the host passes w, g and each state tensor as distinct buffers).
            let (w, m) = unsafe { (s.w.f32s_mut(), s.state[0].f32s_mut()) };
            for ((w, g), m) in w.iter_mut().zip(s.g.f32s()).zip(m) {
                *m = self.momentum * *m + grad_scale * g;
                *w -= lr * (*m + wd * *w);
            }
        }
        Ok(StepDone::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pith_plugin_api::kit::{test_dims, TestHost};
    use pith_plugin_api::{DType, Init, Tensor};

    fn slot(th: &TestHost, spec: ParamSpec, w: &[f32]) -> Slot {
        let n = w.len();
        let (w, g, m) = (th.tensor_f32(w, &[n]), th.zeros(&[n], DType::F32), th.zeros(&[n], DType::F32));
        Slot {
            name: format!("layers.0.moe.router.{}", spec.name).into(),
            spec,
            w,
            g,
            state: vec![m].into(),
            w_lowp: th.zeros(&[0], DType::F32),
        }
    }

    fn set(t: Tensor, v: impl IntoIterator<Item = f32>) {
        // The test holds no other slice of `t` meanwhile.
        unsafe { t.f32s_mut() }.iter_mut().zip(v).for_each(|(t, v)| *t = v);
    }

    /// On loss = ½ Σ a_i (w_i − c_i)²: the first step is w − lr·grad_scale·g exactly, decay applies
    /// only with `decay`, a buffer is left alone, and 200 steps reach the minimum.
    #[test]
    fn steps_every_parameter_and_minimises_a_quadratic() {
        let opt = create("momentum = 0.5\nweight_decay = 0.1", test_dims(1, 1, 1)).unwrap();
        let th = TestHost::new(1);
        let (a, c) = ([1.0f32, 2.0, 0.5], [0.3f32, -1.0, 2.0]);
        let slots = [
            slot(&th, ParamSpec::new("w", &[3], Init::Zeros, false), &[1.0, 1.0, 1.0]),
            slot(&th, ParamSpec::new("decayed", &[1], Init::Zeros, true), &[2.0]),
            slot(&th, ParamSpec::buffer("bias", &[1], Init::Zeros), &[5.0]),
        ];
        for s in &slots {
            set(s.g, [1.0; 3]);
        }
        opt.step(th.host(), &slots, 0.1, 1, 0.5).unwrap();
        assert_eq!(slots[0].w.f32s(), [0.95; 3]);
        assert!((slots[1].w.f32s()[0] - (2.0 - 0.1 * (0.5 + 0.1 * 2.0))).abs() < 1e-6);
        assert_eq!((slots[2].w.f32s(), slots[2].state[0].f32s()), ([5.0].as_slice(), [0.0].as_slice()));

        for step in 2..=200 {
            let w = slots[0].w.f32s().to_vec();
            set(slots[0].g, (0..3).map(|i| a[i] * (w[i] - c[i])));
            opt.step(th.host(), &slots[..1], 0.1, step, 0.5).unwrap();
        }
        for (w, c) in slots[0].w.f32s().iter().zip(c) {
            assert!((w - c).abs() < 1e-3, "{w} vs {c}");
        }
    }
}
