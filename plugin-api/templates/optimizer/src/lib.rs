//! `{{name}}`: an optimizer plugin for Pith (scaffolded by `pith plugins new --kind optimizer`).
//!
//! Math: SGD with momentum and decoupled weight decay:
//! m = μ·m + g;  w = w − lr·(m + wd·w)   (wd only for parameters with `decay`).
//! Check it with `pith plugins check {{name}}`; select it with `[optimizer] plugin = "{{name}}"`.

use pith_plugin_api::{parse_config, register, Host, ModelDims, Optimizer, ParamSpec, Result, Tensor};
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
    fn state(&self, _param: &ParamSpec) -> Vec<String> {
        vec!["momentum".into()]
    }

    fn step(&self, _h: Host, param: &ParamSpec, w: Tensor, g: Tensor, state: &[Tensor], lr: f32, _step: u64) -> Result<()> {
        let wd = if param.decay { self.weight_decay } else { 0.0 };
        // Writes go through f32s_mut, which is unsafe: no other slice of w or the state may be
        // alive meanwhile (the host passes w, g and each state tensor as distinct buffers).
        let (w, m) = unsafe { (w.f32s_mut(), state[0].f32s_mut()) };
        for ((w, g), m) in w.iter_mut().zip(g.f32s()).zip(m) {
            *m = self.momentum * *m + g;
            *w -= lr * (*m + wd * *w);
        }
        Ok(())
    }
}
