//! `lion`: the Lion optimizer (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").
//!
//! Per element of every trained parameter, with one state m (`exp_avg`, zero-initialised) and
//! g = grad_scale · gradient (the host's global-norm clip):
//!   c = β1·m + (1−β1)·g;  w ← w − lr·(sign(c) + wd·w)   (wd only for decay = true params);
//!   m ← β2·m + (1−β2)·g.   sign(0) = 0, so a zero gradient on a zero state moves nothing.
//! Reports `update_rms` = sqrt(mean(sign(c)²)) per parameter tensor (≤ 1; the step's metric is
//! the mean over tensors). The host writes the bf16 copies and zeroes the gradients. CPU only.

use pith_plugin_api::{
    kit, parse_config, register, Host, ModelDims, Optimizer, ParamSpec, Result, Role, Slot, StepDone,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("lion");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_beta1")]
    beta1: f32,
    #[serde(default = "default_beta2")]
    beta2: f32,
    #[serde(default)]
    weight_decay: f32,
}
fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.99
}

struct Lion {
    beta1: f32,
    beta2: f32,
    weight_decay: f32,
}

fn create(config: &str, _dims: ModelDims) -> Result<Lion> {
    let c: Config = parse_config(config)?;
    for (k, v) in [("beta1", c.beta1), ("beta2", c.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(format!("`{k}` = {v} must be in [0, 1)"));
        }
    }
    if !(c.weight_decay.is_finite() && c.weight_decay >= 0.0) {
        return Err(format!("`weight_decay` = {} must be a finite number >= 0", c.weight_decay));
    }
    Ok(Lion { beta1: c.beta1, beta2: c.beta2, weight_decay: c.weight_decay })
}

register!(
    Optimizer,
    "lion",
    "Lion: sign of an interpolated momentum, one state tensor (Chen et al. 2023)",
    "[optimizer]\nplugin = \"lion\"\nbeta1 = 0.9\nbeta2 = 0.99\nweight_decay = 0.1",
    create
);

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl Optimizer for Lion {
    fn state(&self, _name: &str, _param: &ParamSpec) -> Vec<String> {
        vec!["exp_avg".into()]
    }

    fn step(&self, h: Host, slots: &[Slot], lr: f32, _step: u64, grad_scale: f32) -> Result<StepDone> {
        kit::require_cpu(&h, "lion")?;
        let (b1, b2) = (self.beta1, self.beta2);
        for s in slots.iter().filter(|s| s.spec.role == Role::Param) {
            let [m] = &s.state[..] else {
                return Err(format!("lion: expected 1 state tensor for {}, got {}", s.name, s.state.len()));
            };
            if s.g.numel() != s.w.numel() || m.numel() != s.w.numel() {
                return Err(format!("lion: {}: weight, grad and exp_avg differ in size", s.name));
            }
            let wd = if s.spec.decay { self.weight_decay } else { 0.0 };
            let mut sq = 0.0f64;
            // SAFETY: w and m are distinct host buffers, apart from g; nothing else views them.
            let (wv, mv) = unsafe { (s.w.f32s_mut(), m.f32s_mut()) };
            for ((w, &g), m) in wv.iter_mut().zip(s.g.f32s()).zip(mv) {
                let g = grad_scale * g;
                let u = sign(b1 * *m + (1.0 - b1) * g);
                sq += (u * u) as f64;
                *w -= lr * (u + wd * *w);
                *m = b2 * *m + (1.0 - b2) * g;
            }
            h.metric("update_rms", (sq / s.w.numel().max(1) as f64).sqrt());
        }
        Ok(StepDone::default())
    }
}
