//! `adamw`: Adam with bias correction and decoupled weight decay (Loshchilov & Hutter).
//!
//! At step t (from 1), for gradient g = grad_scale · grad (the host's clip):
//!   m = β1·m + (1−β1)·g;   v = β2·v + (1−β2)·g²;   m̂ = m/(1−β1ᵗ);   v̂ = v/(1−β2ᵗ);
//!   w = w·(1 − lr·wd) − lr·m̂/(√v̂ + eps)     (the decay factor only where spec.decay).
//! Every slot in one call; slots whose spec.role is not Param are left alone.
//!
//! CUDA (kernels/adamw.cu): `adamw_step`, one fused launch over every slot (a table of the slots'
//! pointers, chunks of 4096 elements a block) that also writes the bf16 working copy `w_lowp`,
//! so the host skips that (StepDone). It leaves the gradients: the host frees them after the
//! step (the next backward allocates them zeroed), so zeroing them would be wasted bandwidth.

use crate::{expect, grid, BLOCK};
use pith_plugin_api::{
    parse_config, register, Arg, DType, Device, Host, ModelDims, Optimizer, ParamSpec, Result, Role, Slot, StepDone,
};

const SRC: &str = kernel_source!("adamw.cu");
/// Elements per block of `adamw_step` (kernels/adamw.cu `CHUNK`).
const CHUNK: usize = 4096;
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

impl AdamW {
    /// Check a slot's tensors on `dev`: f32 w, g and the two states alike, w_lowp bf16 of w's size or empty.
    fn check(slot: &Slot, dev: Device) -> Result<()> {
        let (name, shape) = (&slot.name, slot.w.dims());
        let [m, v] = &slot.state[..] else {
            return Err(format!("adamw: {name}: expected 2 state tensors, got {}", slot.state.len()));
        };
        for (t, what) in [(&slot.w, "weight"), (&slot.g, "grad"), (m, "exp_avg"), (v, "exp_avg_sq")] {
            expect(t, DType::F32, dev, &shape, &format!("adamw: {name} {what}"))?;
        }
        let l = &slot.w_lowp;
        if l.numel() > 0 && (l.dtype != DType::BF16 || l.device != dev || l.numel() != slot.w.numel()) {
            let (ty, d, dims) = (l.dtype, l.device, l.dims());
            return Err(format!(
                "adamw: {name} w_lowp: expected bf16 on {dev:?} like {shape:?}, got {ty:?} {dims:?} on {d:?}"
            ));
        }
        Ok(())
    }
}

impl Optimizer for AdamW {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(
            beta1 = self.0.beta1,
            beta2 = self.0.beta2,
            eps = self.0.eps,
            weight_decay = self.0.weight_decay
        )
    }

    fn state(&self, _name: &str, _param: &ParamSpec) -> Vec<String> {
        vec!["exp_avg".into(), "exp_avg_sq".into()]
    }

    fn step(&self, h: Host, slots: &[Slot], lr: f32, step: u64, grad_scale: f32) -> Result<StepDone> {
        let dev = h.device();
        if step == 0 {
            return Err("adamw: step counts from 1".into());
        }
        let live: Vec<&Slot> = slots.iter().filter(|s| s.spec.role == Role::Param).collect();
        live.iter().try_for_each(|s| Self::check(s, dev))?;
        let c = &self.0;
        let bc1 = 1.0 - (c.beta1 as f64).powf(step as f64);
        let bc2 = 1.0 - (c.beta2 as f64).powf(step as f64);
        let (step_size, bc2_sqrt) = ((lr as f64 / bc1) as f32, bc2.sqrt() as f32);
        let keep = |s: &Slot| if s.spec.decay { 1.0 - lr * c.weight_decay } else { 1.0 };
        match dev {
            Device::Cpu => {
                for s in live {
                    let (keep, g) = (keep(s), s.g.f32s());
                    // SAFETY: w, m and v are distinct host buffers, apart from g; nothing else views them.
                    let (w, m, v) = unsafe { (s.w.f32s_mut(), s.state[0].f32s_mut(), s.state[1].f32s_mut()) };
                    for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m).zip(v) {
                        let g = g * grad_scale;
                        *m = c.beta1 * *m + (1.0 - c.beta1) * g;
                        *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
                        *w = *w * keep - step_size * *m / (v.sqrt() / bc2_sqrt + c.eps);
                    }
                }
                Ok(StepDone::default())
            }
            Device::Cuda => {
                // The slot table: 8 words a slot (kernels/adamw.cu `AdamSlot`), chunks numbered across slots.
                let mut table: Vec<u64> = Vec::with_capacity(8 * live.len());
                let mut chunks = 0;
                for s in live.iter().filter(|s| s.w.numel() > 0) {
                    let (n, lowp) = (s.w.numel(), if s.w_lowp.numel() > 0 { s.w_lowp.addr } else { 0 });
                    let [w, g, m, v] = [s.w, s.g, s.state[0], s.state[1]].map(|t| t.addr);
                    table.extend([w, g, m, v, lowp, n as u64, keep(s).to_bits() as u64, chunks as u64]);
                    chunks += n.div_ceil(CHUNK);
                }
                if chunks > 0 {
                    let words: Vec<i32> =
                        table.iter().flat_map(|&u| [u as u32 as i32, (u >> 32) as u32 as i32]).collect();
                    let (host, dev_table) =
                        (h.alloc_host(&[words.len()], DType::I32)?, h.alloc_uninit(&[words.len()], DType::I32)?);
                    // SAFETY: host is this call's own allocation.
                    unsafe { host.i32s_mut() }.copy_from_slice(&words);
                    h.copy(host, dev_table)?;
                    let args = [dev_table.arg(), Arg::I32((table.len() / 8) as i32), Arg::I64(chunks as i64)];
                    let hyper = [c.beta1, c.beta2, c.eps, step_size, bc2_sqrt, grad_scale].map(Arg::F32);
                    h.launch(SRC, "adamw_step", grid(chunks, 1), BLOCK, 0, &[&args[..], &hyper].concat())?;
                }
                let all = live.len() == slots.len();
                Ok(StepDone { wrote_lowp: all, zeroed_grads: false })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pith_plugin_api::{kit::TestHost, Init, Tensor};

    /// Step 1 with grad_scale 0.5: m = (1−β1)·g', v = (1−β2)·g'², w = w·keep − lr·g'/(|g'| + eps)
    /// for g' = 0.5·g; decay only where spec.decay; a Buffer slot untouched.
    #[test]
    fn one_step_over_all_slots() {
        let a = create(
            "",
            ModelDims { hidden: 1, experts: 1, expert_ffn: 1, layer: 0, layers: 1, first_expert: 0, local_experts: 1 },
        )
        .unwrap();
        let th = TestHost::new(1);
        let slot = |name: &str, spec: ParamSpec| Slot {
            name: name.into(),
            spec,
            w: th.tensor_f32(&[1.0, -2.0], &[2]),
            g: th.tensor_f32(&[0.5, -3.0], &[2]),
            state: vec![th.zeros(&[2], DType::F32), th.zeros(&[2], DType::F32)].into(),
            w_lowp: Tensor::new(0, DType::BF16, Device::Cpu, &[0]),
        };
        let slots = [
            slot("decayed", ParamSpec::new("w", &[2], Init::Zeros, true)),
            slot("plain", ParamSpec::new("b", &[2], Init::Zeros, false)),
            slot("buffer", ParamSpec::buffer("bias", &[2], Init::Zeros)),
        ];
        let done = a.step(th.host(), &slots, 0.1, 1, 0.5).unwrap();
        assert_eq!(done, StepDone::default());
        for (s, keep) in slots[..2].iter().zip([1.0 - 0.1 * 0.1, 1.0]) {
            for (i, (w, g)) in [(1.0f32, 0.5f32), (-2.0, -3.0)].into_iter().enumerate() {
                let g = 0.5 * g;
                let want = [w * keep - 0.1 * g / (g.abs() + 1e-8), 0.1 * g, 0.05 * g * g];
                let got = [s.w.f32s()[i], s.state[0].f32s()[i], s.state[1].f32s()[i]];
                assert!(
                    got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
                    "{}[{i}]: {got:?} vs {want:?}",
                    s.name
                );
            }
        }
        assert_eq!(slots[2].w.f32s(), [1.0, -2.0], "a Buffer slot is not a parameter");
        assert!(a.step(th.host(), &slots, 0.1, 0, 1.0).unwrap_err().contains("from 1"));
    }
}
