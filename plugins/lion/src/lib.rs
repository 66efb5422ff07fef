//! `lion`: the Lion optimizer (EvoLved Sign Momentum) of Chen et al. 2023, "Symbolic Discovery of
//! Optimization Algorithms" (arXiv:2302.06675). README.md has the paper, the equations, every
//! config key and how to pick the learning rate.
//!
//! At each step, for every trained parameter w with gradient g = grad_scale · grad (the host's
//! clip) and one state tensor m (zero at the start):
//!   c = β1·m + (1−β1)·g                      (the interpolated momentum: only its sign is used)
//!   w = w − lr·(sign(c) + wd·w) = w·(1 − lr·wd) − lr·sign(c)   (wd only where spec.decay)
//!   m = β2·m + (1−β2)·g
//! sign(0) = 0, so a zero gradient on a zero momentum moves nothing. Every element moves by ±lr
//! (plus the decay), which is why Lion's lr is 3–10× smaller than AdamW's.
//!
//! CPU: plain loops over every slot (the reference). CUDA (kernels/lion.cu): `lion_step`, one fused
//! launch over every slot (a table of the slots' pointers, chunks of 4096 elements a block) that
//! also writes the bf16 working copy `w_lowp` and zeroes the gradient, so the host skips both
//! (StepDone). The CUDA kernel rounds each product and sum separately (`__fmul_rn`, `__fadd_rn`:
//! no fused multiply-add), so it computes the CPU's bits.

use pith_plugin_api::{
    kernel_source, kit, parse_config, register, Arg, DType, Device, Host, ModelDims, Optimizer, ParamSpec, Result,
    Role, Slot, StepDone, Tensor,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("lion");

const WHO: &str = "lion";
/// Elements per block of `lion_step` (kernels/lion.cu `CHUNK`).
const CHUNK: usize = 4096;
/// Threads per block.
const BLOCK: [u32; 3] = [256, 1, 1];
/// Words (u64) per slot of the table `lion_step` reads (kernels/lion.cu `LionSlot`).
const SLOT_WORDS: usize = 7;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Interpolation between the momentum and the gradient for the update's sign.
    #[serde(default = "default_beta1")]
    beta1: f32,
    /// Decay of the momentum m.
    #[serde(default = "default_beta2")]
    beta2: f32,
    /// Decoupled weight decay (multiplied by lr), where the parameter's spec asks for decay.
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
    for (key, v, typical) in [("beta1", c.beta1, 0.9), ("beta2", c.beta2, 0.99)] {
        if !(0.0..1.0).contains(&v) {
            return Err(format!("`{key}` = {v} but it must be in [0, 1) (typical: {typical})"));
        }
    }
    if !(c.weight_decay.is_finite() && c.weight_decay >= 0.0) {
        return Err(format!(
            "`weight_decay` = {} but it must be a finite number >= 0 (typical: 3-10x AdamW's, e.g. 0.1 to 1.0)",
            c.weight_decay
        ));
    }
    Ok(Lion { beta1: c.beta1, beta2: c.beta2, weight_decay: c.weight_decay })
}

register!(
    Optimizer,
    "lion",
    "Lion (Chen et al. 2023): the sign of an interpolated momentum, decoupled weight decay; lr 3-10x below AdamW's",
    "[optimizer]\nplugin = \"lion\"\nbeta1 = 0.9\nbeta2 = 0.99\nweight_decay = 0.0",
    create
);

/// -1, 0 or 1 (`f32::signum(0.0)` is 1: a zero gradient must not move the weight).
fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl Lion {
    /// One element: (w, m) after the step, for the raw gradient `g` (kernels/lion.cu does the
    /// same operations in the same order).
    fn update(&self, w: f32, g: f32, m: f32, keep: f32, lr: f32, grad_scale: f32) -> (f32, f32) {
        let g = g * grad_scale;
        let c = self.beta1 * m + (1.0 - self.beta1) * g;
        let w = w * keep - lr * sign(c);
        (w, self.beta2 * m + (1.0 - self.beta2) * g)
    }

    /// The factor w is multiplied by before the signed step: 1 − lr·wd, or 1 without decay.
    fn keep(&self, s: &Slot, lr: f32) -> f32 {
        if s.spec.decay {
            1.0 - lr * self.weight_decay
        } else {
            1.0
        }
    }

    /// Every slot in one `lion_step` launch: a table of SLOT_WORDS words a slot, chunks of CHUNK
    /// elements numbered across the slots.
    fn step_cuda(&self, h: Host, live: &[&Slot], lr: f32, grad_scale: f32) -> Result<()> {
        let mut table: Vec<u64> = Vec::with_capacity(SLOT_WORDS * live.len());
        let mut chunks = 0;
        for s in live.iter().filter(|s| s.w.numel() > 0) {
            let lowp = if s.w_lowp.numel() > 0 { s.w_lowp.addr } else { 0 };
            let n = s.w.numel();
            table.extend([s.w.addr, s.g.addr, s.state[0].addr, lowp, n as u64, self.keep(s, lr).to_bits() as u64]);
            table.push(chunks as u64);
            chunks += n.div_ceil(CHUNK);
        }
        if chunks == 0 {
            return Ok(());
        }
        let words: Vec<i32> = table.iter().flat_map(|&u| [u as u32 as i32, (u >> 32) as u32 as i32]).collect();
        let (host, dev) = (h.alloc_host(&[words.len()], DType::I32)?, h.alloc_uninit(&[words.len()], DType::I32)?);
        // SAFETY: `host` is this call's own allocation; nothing else views it.
        unsafe { host.i32s_mut() }.copy_from_slice(&words);
        h.copy(host, dev)?;
        let src = kernel_source!(include_str!("../kernels/lion.cu"));
        h.launch(
            src,
            "lion_step",
            kit::grid(chunks, 1),
            BLOCK,
            0,
            &args(dev, table.len() / SLOT_WORDS, chunks, self, lr, grad_scale),
        )
    }
}

/// `lion_step`'s arguments in parameter order (a unit test holds them to the kernel's signature).
fn args(table: Tensor, slots: usize, chunks: usize, o: &Lion, lr: f32, grad_scale: f32) -> Vec<Arg> {
    let head = [table.arg(), Arg::I32(slots as i32), Arg::I64(chunks as i64)];
    [&head[..], &[o.beta1, o.beta2, lr, grad_scale].map(Arg::F32)].concat()
}

/// Fail unless the slot's tensors are what the step needs on `dev`: f32 w, g and m of w's shape,
/// w_lowp bf16 of w's size or empty.
fn check(s: &Slot, dev: Device) -> Result<()> {
    let (name, shape) = (&s.name, s.w.dims());
    if s.state.len() != 1 {
        return Err(format!("{WHO}: {name}: expected 1 state tensor (m), got {}", s.state.len()));
    }
    for (t, what) in [(&s.w, "weight"), (&s.g, "grad"), (&s.state[0], "state m")] {
        if t.dtype != DType::F32 || t.device != dev || t.dims() != shape {
            let (ty, d, dims) = (t.dtype, t.device, t.dims());
            return Err(format!(
                "{WHO}: {name} {what}: expected f32 on {dev:?} like {shape:?}, got {ty:?} {dims:?} on {d:?}"
            ));
        }
    }
    let l = &s.w_lowp;
    if l.numel() > 0 && (l.dtype != DType::BF16 || l.device != dev || l.numel() != s.w.numel()) {
        let (ty, d, dims) = (l.dtype, l.device, l.dims());
        return Err(format!(
            "{WHO}: {name} w_lowp: expected bf16 on {dev:?} like {shape:?}, got {ty:?} {dims:?} on {d:?}"
        ));
    }
    Ok(())
}

impl Optimizer for Lion {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(beta1 = self.beta1, beta2 = self.beta2, weight_decay = self.weight_decay)
    }

    fn state(&self, _name: &str, _param: &ParamSpec) -> Vec<String> {
        vec!["m".into()]
    }

    fn step(&self, h: Host, slots: &[Slot], lr: f32, step: u64, grad_scale: f32) -> Result<StepDone> {
        if step == 0 {
            return Err(format!("{WHO}: step counts from 1"));
        }
        let dev = h.device();
        let live: Vec<&Slot> = slots.iter().filter(|s| s.spec.role == Role::Param).collect();
        live.iter().try_for_each(|s| check(s, dev))?;
        match dev {
            Device::Cpu => {
                for s in live {
                    let (keep, g) = (self.keep(s, lr), s.g.f32s());
                    // SAFETY: w and m are distinct host buffers, apart from g; nothing else views them.
                    let (w, m) = unsafe { (s.w.f32s_mut(), s.state[0].f32s_mut()) };
                    for ((w, &g), m) in w.iter_mut().zip(g).zip(m) {
                        (*w, *m) = self.update(*w, g, *m, keep, lr, grad_scale);
                    }
                }
                Ok(StepDone::default())
            }
            Device::Cuda => {
                self.step_cuda(h, &live, lr, grad_scale)?;
                // Slots that are not parameters (none from the host) were left alone.
                let all = live.len() == slots.len();
                Ok(StepDone { wrote_lowp: all, zeroed_grads: all })
            }
        }
    }
}

#[cfg(test)]
mod tests;
