//! `adamw`: Adam with bias correction and decoupled weight decay (Loshchilov & Hutter).
//!
//! At step t (from 1), for gradient g:
//!   m = β1·m + (1−β1)·g;   v = β2·v + (1−β2)·g²;   m̂ = m/(1−β1ᵗ);   v̂ = v/(1−β2ᵗ);
//!   w = w·(1 − lr·wd) − lr·m̂/(√v̂ + eps)     (the decay factor only where param.decay).
//!
//! CUDA (kernels/adamw.cu): `adamw_step`, one fused grid-stride kernel per parameter over the
//! f32 master weight, grad and state.

use crate::{expect, grid, BLOCK};
use pith_plugin_api::{
    parse_config, register, Arg, DType, Device, Host, ModelDims, Optimizer, ParamSpec, Result, Tensor,
};

const SRC: &str = kernel_source!("adamw.cu");
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_beta1")]
    beta1: f32,
    #[serde(default = "default_beta2")]
    beta2: f32,
    #[serde(default = "default_eps")]
    eps: f32,
    #[serde(default = "default_weight_decay")]
    weight_decay: f32,
}
fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.95
}
fn default_eps() -> f32 {
    1e-8
}
fn default_weight_decay() -> f32 {
    0.1
}

struct AdamW(Config);

fn create(config: &str, _dims: ModelDims) -> Result<AdamW> {
    let c: Config = parse_config(config)?;
    for (key, v) in [("beta1", c.beta1), ("beta2", c.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(format!("`{key}` = {v} but it must be in [0, 1) (typical: 0.9 for beta1, 0.95 for beta2)"));
        }
    }
    if !(c.eps.is_finite() && c.eps > 0.0) {
        return Err(format!("`eps` = {} but it must be a finite number > 0 (typical: 1e-8)", c.eps));
    }
    if !(c.weight_decay.is_finite() && c.weight_decay >= 0.0) {
        return Err(format!("`weight_decay` = {} but it must be a finite number >= 0 (typical: 0.1)", c.weight_decay));
    }
    Ok(AdamW(c))
}

register!(
    Optimizer,
    "adamw",
    "Adam with bias correction and decoupled weight decay",
    "[optimizer]\nplugin = \"adamw\"\nbeta1 = 0.9\nbeta2 = 0.95\neps = 1e-8\nweight_decay = 0.1",
    create
);

impl Optimizer for AdamW {
    fn state(&self, _param: &ParamSpec) -> Vec<String> {
        vec!["exp_avg".into(), "exp_avg_sq".into()]
    }

    fn step(
        &self,
        h: Host,
        param: &ParamSpec,
        w: Tensor,
        g: Tensor,
        state: &[Tensor],
        lr: f32,
        step: u64,
    ) -> Result<()> {
        let dev = h.device();
        let [m, v] = state else {
            return Err(format!("adamw: expected 2 state tensors, got {}", state.len()));
        };
        if step == 0 {
            return Err("adamw: step counts from 1".into());
        }
        let shape = w.dims();
        for (t, what) in [(&w, "weight"), (&g, "grad"), (m, "exp_avg"), (v, "exp_avg_sq")] {
            expect(t, DType::F32, dev, &shape, &format!("adamw: {} {what}", param.name))?;
        }
        let c = &self.0;
        let bc1 = 1.0 - (c.beta1 as f64).powf(step as f64);
        let bc2 = 1.0 - (c.beta2 as f64).powf(step as f64);
        let (step_size, bc2_sqrt) = ((lr as f64 / bc1) as f32, bc2.sqrt() as f32);
        let keep = if param.decay { 1.0 - lr * c.weight_decay } else { 1.0 };
        match dev {
            Device::Cpu => {
                // SAFETY: w, m and v are distinct host buffers, apart from g; nothing else views them.
                let (w, m, v) = unsafe { (w.f32s_mut(), m.f32s_mut(), v.f32s_mut()) };
                for (((w, &g), m), v) in w.iter_mut().zip(g.f32s()).zip(m).zip(v) {
                    *m = c.beta1 * *m + (1.0 - c.beta1) * g;
                    *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
                    *w = *w * keep - step_size * *m / (v.sqrt() / bc2_sqrt + c.eps);
                }
            }
            Device::Cuda => {
                let n = w.numel();
                let args = [w.arg(), g.arg(), m.arg(), v.arg(), Arg::I64(n as i64)];
                let hyper = [c.beta1, c.beta2, c.eps, keep, step_size, bc2_sqrt].map(Arg::F32);
                h.launch(SRC, "adamw_step", grid(n, 256), BLOCK, 0, &[&args[..], &hyper].concat())?;
            }
        }
        Ok(())
    }
}
