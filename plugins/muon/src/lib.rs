//! `muon`: Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks")
//! with the Moonlight recipe of Liu et al. 2025, "Muon is Scalable for LLM Training"
//! (arXiv:2502.16982): weight decay, and an update scaled to AdamW's RMS so that both groups share
//! one learning rate. README.md has the papers, the equations, every config key and the grouping.
//!
//! Groups, by full name and shape (decided the same way by `state` and `step`):
//!   AdamW: `embed.*`, `lm_head.*`, every tensor of fewer than 2 dimensions (norms), routers
//!          (`*.router.*`), and any name containing one of `adamw_params`;
//!   Muon:  every other parameter: a 2-D matrix [a,b], or a stack [.., a, b] (experts [E,a,b]) of
//!          matrices each orthogonalised on its own.
//! Muon, per matrix, with g = grad_scale · grad (the host's clip), μ = `momentum`:
//!   m = μ·m + g;   u = g + μ·m (`nesterov`, the default) or u = m;
//!   X = u / (‖u‖_F + 1e-7);   5 times: A = X·Xᵀ, B = b·A + c·A², X = a·X + B·X
//!     ((a, b, c) = (3.4445, −4.7750, 2.0315); a tall X (a > b) iterates on Xᵀ, i.e.
//!     A = Xᵀ·X and X = a·X + X·B, the smaller Gram matrix);
//!   w = w·(1 − lr·wd) − lr·0.2·√max(a,b)·X     (wd = `weight_decay`, only where spec.decay).
//! AdamW (the `adamw` of Pith's std pack, with `adamw_betas`, `adamw_eps`, the same lr and wd):
//!   m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²;  w = w·(1 − lr·wd) − lr/(1−β1ᵗ)·m/(√v/√(1−β2ᵗ) + eps).
//! States: `m` for Muon parameters, `m`, `v` for AdamW ones.
//!
//! CPU: loops for the elementwise parts and the norms (the reference), h.gemm_batched for the
//! Newton–Schulz products. CUDA (kernels/muon.cu): the same products through h.gemm_batched on f32
//! operands (a batch of E matrices for expert stacks, of 1 for 2-D weights), and the component's own
//! kernels: `muon_momentum` (also zeroes g), `muon_normalize` (a block per matrix, a fixed-order sum),
//! `muon_axpy`, `muon_update` (also writes the bf16 copy), and `muon_adamw` (the whole AdamW group in
//! one launch over a table of slots, writing the bf16 copies and zeroing the gradients).

use pith_plugin_api::{
    kernel_source, kit, parse_config, register, Arg, DType, Device, Host, ModelDims, Optimizer, ParamSpec, Result,
    Role, Slot, StepDone, Tensor,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("muon");

const WHO: &str = "muon";
/// The quintic Newton–Schulz iteration's (a, b, c).
pub const NS: [f32; 3] = [3.4445, -4.7750, 2.0315];
/// Newton–Schulz iterations.
pub const NS_STEPS: usize = 5;
/// Added to the Frobenius norm before dividing by it.
const NS_EPS: f32 = 1e-7;
/// Moonlight's update scale: 0.2·√max(a,b) gives the orthogonalised update about AdamW's RMS.
pub const RMS_MATCH: f32 = 0.2;
/// Elements per block of `muon_adamw` (kernels/muon.cu `CHUNK`).
const CHUNK: usize = 4096;
/// Threads per block of every launch (`muon_normalize` needs 256).
const BLOCK: [u32; 3] = [256, 1, 1];
/// Words (u64) per slot of the table `muon_adamw` reads (kernels/muon.cu `AdamSlot`).
const ADAM_WORDS: usize = 8;

fn source() -> &'static str {
    kernel_source!(include_str!("../kernels/muon.cu"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// μ of the Muon group's momentum.
    #[serde(default = "default_momentum")]
    momentum: f32,
    /// Orthogonalise g + μ·m (Nesterov) rather than m.
    #[serde(default = "yes")]
    nesterov: bool,
    /// Decoupled weight decay of both groups (multiplied by lr), where the spec asks for decay.
    #[serde(default = "default_weight_decay")]
    weight_decay: f32,
    /// (β1, β2) of the AdamW group.
    #[serde(default = "default_adamw_betas")]
    adamw_betas: [f32; 2],
    /// eps of the AdamW group.
    #[serde(default = "default_adamw_eps")]
    adamw_eps: f32,
    /// More parameters for the AdamW group: any whose full name contains one of these.
    #[serde(default)]
    adamw_params: Vec<String>,
}
fn default_momentum() -> f32 {
    0.95
}
fn yes() -> bool {
    true
}
fn default_weight_decay() -> f32 {
    0.1
}
fn default_adamw_betas() -> [f32; 2] {
    [0.9, 0.95]
}
fn default_adamw_eps() -> f32 {
    1e-8
}

pub struct Muon(Config);

fn create(config: &str, _dims: ModelDims) -> Result<Muon> {
    let c: Config = parse_config(config)?;
    if !(0.0..1.0).contains(&c.momentum) {
        return Err(format!("`momentum` = {} but it must be in [0, 1) (typical: 0.95)", c.momentum));
    }
    for (v, typical) in c.adamw_betas.iter().zip([0.9, 0.95]) {
        if !(0.0..1.0).contains(v) {
            return Err(format!(
                "`adamw_betas` = {:?} but each must be in [0, 1) (typical: [0.9, 0.95]; {v} is {typical}'s)",
                c.adamw_betas
            ));
        }
    }
    if !(c.adamw_eps.is_finite() && c.adamw_eps > 0.0) {
        return Err(format!("`adamw_eps` = {} but it must be a finite number > 0 (typical: 1e-8)", c.adamw_eps));
    }
    if !(c.weight_decay.is_finite() && c.weight_decay >= 0.0) {
        return Err(format!("`weight_decay` = {} but it must be a finite number >= 0 (typical: 0.1)", c.weight_decay));
    }
    if c.adamw_params.iter().any(|p| p.is_empty()) {
        return Err("`adamw_params` holds an empty string, which every name contains; list name parts such as \
                    \"attn.o_proj\""
            .into());
    }
    Ok(Muon(c))
}

register!(
    Optimizer,
    "muon",
    "Muon (Moonlight): Newton-Schulz-orthogonalised momentum for matrices and expert stacks, AdamW for \
     embeddings, lm_head, norms and routers",
    "[optimizer]\nplugin = \"muon\"\nmomentum = 0.95\nnesterov = true\nweight_decay = 0.1\nadamw_betas = [0.9, 0.95]\n\
     adamw_eps = 1e-8\nadamw_params = []",
    create
);

/// (matrices, rows, cols) of a Muon parameter: [.., a, b] is prod(..) matrices of a×b.
pub fn matrices(shape: &[usize]) -> (usize, usize, usize) {
    let n = shape.len();
    (shape[..n - 2].iter().product(), shape[n - 2], shape[n - 1])
}

/// A view of the start of scratch `t` shaped `shape`.
fn view(t: Tensor, shape: &[usize]) -> Tensor {
    Tensor::new(t.addr, t.dtype, t.device, shape)
}

/// Newton–Schulz scratch for a step, sized for its largest Muon parameter and reused by each:
/// two [G,a,b] buffers (X and the next X) and two [G,k,k] ones (A and B), k = min(a, b).
pub struct Scratch {
    pub x: Tensor,
    y: Tensor,
    gram: Tensor,
    poly: Tensor,
}

impl Scratch {
    /// Room for `numel` elements of X and `gram` of A (every element is written before it is read).
    pub fn new(h: Host, numel: usize, gram: usize) -> Result<Scratch> {
        let f = |n: usize| h.alloc_uninit(&[n.max(1)], DType::F32);
        Ok(Scratch { x: f(numel)?, y: f(numel)?, gram: f(gram)?, poly: f(gram)? })
    }
}

/// X = NS5(u / (‖u‖_F + 1e-7)) for each of the `g` matrices (`r`×`c`) of u, held in `sc.x`
/// (overwritten); returns the view [g,r,c] of the scratch buffer that holds the result.
pub fn newton_schulz(h: Host, sc: &Scratch, (g, r, c): (usize, usize, usize)) -> Result<Tensor> {
    let (mut x, mut next) = (view(sc.x, &[g, r, c]), view(sc.y, &[g, r, c]));
    normalize(h, x, g, r * c)?;
    let (tall, k) = (r > c, r.min(c));
    let (gram, poly) = (view(sc.gram, &[g, k, k]), view(sc.poly, &[g, k, k]));
    for _ in 0..NS_STEPS {
        h.gemm_batched(x, x, gram, tall, !tall, 1.0, 0.0)?; // A = X·Xᵀ, or Xᵀ·X for a tall X
        h.gemm_batched(gram, gram, poly, false, false, NS[2], 0.0)?; // c·A²
        axpy(h, poly, gram, NS[1])?; // B = b·A + c·A²
        match tall {
            false => h.gemm_batched(poly, x, next, false, false, 1.0, 0.0)?, // B·X
            true => h.gemm_batched(x, poly, next, false, false, 1.0, 0.0)?,  // X·B = (B·Xᵀ)ᵀ
        }
        axpy(h, next, x, NS[0])?; // X' = a·X + B·X
        std::mem::swap(&mut x, &mut next);
    }
    Ok(x)
}

/// Each of the `count` matrices of `per` elements of x divided by its Frobenius norm + 1e-7.
fn normalize(h: Host, x: Tensor, count: usize, per: usize) -> Result<()> {
    match h.device() {
        Device::Cpu => {
            // SAFETY: x is the step's scratch; no other slice of it is alive.
            for xq in unsafe { x.f32s_mut() }.chunks_mut(per) {
                let ss: f64 = xq.iter().map(|&v| v as f64 * v as f64).sum();
                let inv = 1.0 / (ss.sqrt() as f32 + NS_EPS);
                xq.iter_mut().for_each(|v| *v *= inv);
            }
            Ok(())
        }
        Device::Cuda => {
            let grid = [count.clamp(1, 65535) as u32, 1, 1];
            h.launch(source(), "muon_normalize", grid, BLOCK, 0, &args::normalize(x, per, count))
        }
    }
}

/// y += a·x, elementwise (y and x of one size, apart).
fn axpy(h: Host, y: Tensor, x: Tensor, a: f32) -> Result<()> {
    match h.device() {
        Device::Cpu => {
            // SAFETY: y and x are distinct scratch buffers; nothing else views y.
            unsafe { y.f32s_mut() }.iter_mut().zip(x.f32s()).for_each(|(y, &x)| *y += a * x);
            Ok(())
        }
        Device::Cuda => {
            let n = y.numel();
            h.launch(source(), "muon_axpy", kit::grid(n, BLOCK[0]), BLOCK, 0, &args::axpy(y, x, a, n))
        }
    }
}

/// The launch arguments of each kernel, in parameter order (a unit test holds them to the
/// kernels' signatures in kernels/muon.cu).
mod args {
    use super::*;

    pub fn adamw(table: Tensor, slots: usize, chunks: usize, hyper: [f32; 6]) -> Vec<Arg> {
        let head = [table.arg(), Arg::I32(slots as i32), Arg::I64(chunks as i64)];
        [&head[..], &hyper.map(Arg::F32)].concat()
    }
    pub fn momentum(g: Tensor, m: Tensor, u: Tensor, n: usize, mu: f32, grad_scale: f32, nesterov: bool) -> Vec<Arg> {
        let tail = [Arg::F32(mu), Arg::F32(grad_scale), Arg::I32(nesterov as i32)];
        [&[g.arg(), m.arg(), u.arg(), Arg::I64(n as i64)][..], &tail].concat()
    }
    pub fn normalize(x: Tensor, per: usize, count: usize) -> Vec<Arg> {
        vec![x.arg(), Arg::I64(per as i64), Arg::I32(count as i32)]
    }
    pub fn axpy(y: Tensor, x: Tensor, a: f32, n: usize) -> Vec<Arg> {
        vec![y.arg(), x.arg(), Arg::F32(a), Arg::I64(n as i64)]
    }
    pub fn update(w: Tensor, o: Tensor, lowp: Tensor, n: usize, keep: f32, scale: f32) -> Vec<Arg> {
        let lowp = Arg::Ptr(if lowp.numel() > 0 { lowp.addr } else { 0 });
        vec![w.arg(), o.arg(), lowp, Arg::I64(n as i64), Arg::F32(keep), Arg::F32(scale)]
    }
}

impl Muon {
    /// Whether parameter `name` of `spec` is orthogonalised (the Muon group) rather than given to
    /// AdamW: at least 2 dimensions, and not an embedding, the head, a router or one of `adamw_params`.
    pub fn is_muon(&self, name: &str, spec: &ParamSpec) -> bool {
        let adamw = name.starts_with("embed.")
            || name.starts_with("lm_head.")
            || name.starts_with("router.")
            || name.contains(".router.")
            || self.0.adamw_params.iter().any(|p| name.contains(p.as_str()));
        spec.shape.len() >= 2 && !adamw
    }

    /// 1 − lr·wd where the spec asks for decay, else 1.
    fn keep(&self, s: &Slot, lr: f32) -> f32 {
        if s.spec.decay {
            1.0 - lr * self.0.weight_decay
        } else {
            1.0
        }
    }

    /// The AdamW group: std `adamw`'s update with `adamw_betas`, `adamw_eps`.
    fn adamw(&self, h: Host, slots: &[&Slot], lr: f32, step: u64, grad_scale: f32) -> Result<()> {
        let ([b1, b2], eps) = (self.0.adamw_betas, self.0.adamw_eps);
        let bc1 = 1.0 - (b1 as f64).powf(step as f64);
        let bc2 = 1.0 - (b2 as f64).powf(step as f64);
        let (step_size, bc2_sqrt) = ((lr as f64 / bc1) as f32, bc2.sqrt() as f32);
        match h.device() {
            Device::Cpu => {
                for s in slots {
                    let (keep, g) = (self.keep(s, lr), s.g.f32s());
                    // SAFETY: w, m and v are distinct host buffers, apart from g; nothing else views them.
                    let (w, m, v) = unsafe { (s.w.f32s_mut(), s.state[0].f32s_mut(), s.state[1].f32s_mut()) };
                    for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m).zip(v) {
                        let g = g * grad_scale;
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        *w = *w * keep - step_size * *m / (v.sqrt() / bc2_sqrt + eps);
                    }
                }
                Ok(())
            }
            Device::Cuda => {
                // The slot table: ADAM_WORDS words a slot (kernels/muon.cu `AdamSlot`), chunks numbered across slots.
                let mut table: Vec<u64> = Vec::with_capacity(ADAM_WORDS * slots.len());
                let mut chunks = 0;
                for s in slots.iter().filter(|s| s.w.numel() > 0) {
                    let (n, lowp) = (s.w.numel(), if s.w_lowp.numel() > 0 { s.w_lowp.addr } else { 0 });
                    let [w, g, m, v] = [s.w, s.g, s.state[0], s.state[1]].map(|t| t.addr);
                    table.extend([w, g, m, v, lowp, n as u64, self.keep(s, lr).to_bits() as u64, chunks as u64]);
                    chunks += n.div_ceil(CHUNK);
                }
                if chunks == 0 {
                    return Ok(());
                }
                let words: Vec<i32> = table.iter().flat_map(|&u| [u as u32 as i32, (u >> 32) as u32 as i32]).collect();
                let (host, dev) =
                    (h.alloc_host(&[words.len()], DType::I32)?, h.alloc_uninit(&[words.len()], DType::I32)?);
                // SAFETY: `host` is this call's own allocation; nothing else views it.
                unsafe { host.i32s_mut() }.copy_from_slice(&words);
                h.copy(host, dev)?;
                let hyper = [b1, b2, eps, step_size, bc2_sqrt, grad_scale];
                let a = args::adamw(dev, table.len() / ADAM_WORDS, chunks, hyper);
                h.launch(source(), "muon_adamw", kit::grid(chunks, 1), BLOCK, 0, &a)
            }
        }
    }

    /// The Muon group, one parameter (one stack of matrices) after the other through one scratch.
    fn muon(&self, h: Host, slots: &[&Slot], lr: f32, grad_scale: f32) -> Result<()> {
        let slots: Vec<&&Slot> = slots.iter().filter(|s| s.w.numel() > 0).collect();
        let dims: Vec<(usize, usize, usize)> = slots.iter().map(|s| matrices(&s.w.dims())).collect();
        let Some(numel) = slots.iter().map(|s| s.w.numel()).max() else { return Ok(()) };
        let gram = dims.iter().map(|&(g, r, c)| g * r.min(c) * r.min(c)).max().unwrap_or(0);
        let sc = Scratch::new(h, numel, gram)?;
        for (s, &(g, r, c)) in slots.into_iter().zip(&dims) {
            let u = view(sc.x, &[g, r, c]);
            self.momentum(h, s, u, grad_scale)?;
            let o = newton_schulz(h, &sc, (g, r, c))?;
            let scale = lr * RMS_MATCH * (r.max(c) as f32).sqrt();
            update(h, s, o, self.keep(s, lr), scale)?;
        }
        Ok(())
    }

    /// m = μ·m + g';  u = g' + μ·m (Nesterov) or m, for g' = grad_scale·g (CUDA: g zeroed too).
    fn momentum(&self, h: Host, s: &Slot, u: Tensor, grad_scale: f32) -> Result<()> {
        let (mu, nesterov) = (self.0.momentum, self.0.nesterov);
        match h.device() {
            Device::Cpu => {
                let g = s.g.f32s();
                // SAFETY: m is the slot's state, u the step's scratch: distinct, apart from g.
                let (m, u) = unsafe { (s.state[0].f32s_mut(), u.f32s_mut()) };
                for ((m, u), &g) in m.iter_mut().zip(u).zip(g) {
                    let g = g * grad_scale;
                    *m = mu * *m + g;
                    *u = if nesterov { g + mu * *m } else { *m };
                }
                Ok(())
            }
            Device::Cuda => {
                let n = s.w.numel();
                let a = args::momentum(s.g, s.state[0], u, n, mu, grad_scale, nesterov);
                h.launch(source(), "muon_momentum", kit::grid(n, BLOCK[0]), BLOCK, 0, &a)
            }
        }
    }
}

/// w = w·keep − scale·o (CUDA: the bf16 copy written too).
fn update(h: Host, s: &Slot, o: Tensor, keep: f32, scale: f32) -> Result<()> {
    match h.device() {
        Device::Cpu => {
            // SAFETY: w is the slot's weight, o the step's scratch; nothing else views w.
            let w = unsafe { s.w.f32s_mut() };
            w.iter_mut().zip(o.f32s()).for_each(|(w, &o)| *w = *w * keep - scale * o);
            Ok(())
        }
        Device::Cuda => {
            let n = s.w.numel();
            let a = args::update(s.w, o, s.w_lowp, n, keep, scale);
            h.launch(source(), "muon_update", kit::grid(n, BLOCK[0]), BLOCK, 0, &a)
        }
    }
}

/// Fail unless the slot's tensors are what its group needs on `dev`: f32 w, g and the states
/// `states` of w's shape, w_lowp bf16 of w's size or empty.
fn check(s: &Slot, dev: Device, states: &[&str]) -> Result<()> {
    let (name, shape) = (&s.name, s.w.dims());
    let spec: Vec<usize> = s.spec.shape.iter().map(|&d| d as usize).collect();
    if spec != shape {
        return Err(format!("{WHO}: {name}: the weight is {shape:?} but its spec says {spec:?}"));
    }
    if s.state.len() != states.len() {
        return Err(format!(
            "{WHO}: {name}: expected {} state tensors ({}), got {}; `adamw_params` must be what the run was built with",
            states.len(),
            states.join(", "),
            s.state.len()
        ));
    }
    let tensors = [(&s.w, "weight"), (&s.g, "grad")].into_iter().chain(s.state.iter().zip(states.iter().copied()));
    for (t, what) in tensors {
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

impl Optimizer for Muon {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(
            momentum = self.0.momentum,
            nesterov = self.0.nesterov,
            weight_decay = self.0.weight_decay,
            adamw_betas = self.0.adamw_betas,
            adamw_eps = self.0.adamw_eps,
            adamw_params = self.0.adamw_params.clone()
        )
    }

    fn state(&self, name: &str, param: &ParamSpec) -> Vec<String> {
        match self.is_muon(name, param) {
            true => vec!["m".into()],
            false => vec!["m".into(), "v".into()],
        }
    }

    fn step(&self, h: Host, slots: &[Slot], lr: f32, step: u64, grad_scale: f32) -> Result<StepDone> {
        if step == 0 {
            return Err(format!("{WHO}: step counts from 1"));
        }
        let dev = h.device();
        let live: Vec<&Slot> = slots.iter().filter(|s| s.spec.role == Role::Param).collect();
        let (muon, adamw): (Vec<&Slot>, Vec<&Slot>) = live.iter().partition(|s| self.is_muon(&s.name, &s.spec));
        muon.iter().try_for_each(|s| check(s, dev, &["m"]))?;
        adamw.iter().try_for_each(|s| check(s, dev, &["m", "v"]))?;
        self.adamw(h, &adamw, lr, step, grad_scale)?;
        self.muon(h, &muon, lr, grad_scale)?;
        match dev {
            Device::Cpu => Ok(StepDone::default()),
            Device::Cuda => {
                // Every parameter's bf16 copy written and gradient zeroed by the kernels (slots that
                // are not parameters, none from the host, were left alone).
                let all = live.len() == slots.len();
                Ok(StepDone { wrote_lowp: all, zeroed_grads: all })
            }
        }
    }
}

#[cfg(test)]
mod tests;
