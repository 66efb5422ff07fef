//! `act-experts`: two experts components that differ only in their activation, sharing one code
//! path — `relu2`, the squared ReLU of Primer (So et al. 2021, "Primer: Searching for Efficient
//! Transformers for Language Modeling", arXiv:2109.08668), and `gelu`, GELU in its tanh
//! approximation (Hendrycks & Gimpel 2016, as in GPT-2). README.md has the equations, every config
//! key and the commands.
//!
//! Per local expert e on its rows x_e of x [N,H] (sorted by expert, groups from offsets [E_local+1]),
//! with W_up [E_local,H,F] (`w_up`) and W_down [E_local,F,H] (`w_down`), as std `swiglu` lays them out:
//!   a = x_e·W_up[e]  [n_e,F];   u = act(a);   y_e = u·W_down[e]  [n_e,H]
//!   relu2: act(a) = max(a, 0)²,                     act'(a) = 2·max(a, 0)
//!   gelu:  act(a) = ½·a·(1 + tanh(c·(a + k·a³))),    c = √(2/π), k = 0.044715,
//!          act'(a) = ½·(1 + t) + ½·a·(1 − t²)·c·(1 + 3k·a²)   with t = tanh(c·(a + k·a³))
//! Backward (exact):
//!   du = dy·W_down[e]ᵀ;  dW_down[e] += uᵀ·dy;  da = du ⊙ act'(a);  dW_up[e] += x_eᵀ·da;  dx_e = da·W_up[e]ᵀ.
//! Forward FLOPs: two GEMMs, 2·(2·H·F) per row.
//!
//! CUDA (kernels/act.cu): the same host grouped GEMMs on bf16 x, a, u, y (f32 weight gradients);
//! the activation and its derivative are this crate's elementwise kernels `{relu2,gelu}_{fwd,bwd}`
//! (f32 math on bf16 values, one thread per 8 elements, no reductions).

use pith_plugin_api::{
    kernel_source, kit, parse_config, register, Arg, DType, Device, Experts, ExpertsOut, Host, Init, ModelDims,
    ParamSpec, Result, Tensor,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("act-experts");

/// Threads per block of every launch.
const BLOCK: [u32; 3] = [256, 1, 1];
/// √(2/π) and the cubic coefficient of GELU's tanh approximation.
const GELU_C: f32 = 0.797_884_6;
const GELU_K: f32 = 0.044715;

/// The activation, the only difference between the two components.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    Relu2,
    Gelu,
}

impl Act {
    fn name(self) -> &'static str {
        match self {
            Act::Relu2 => "relu2",
            Act::Gelu => "gelu",
        }
    }

    /// act(a).
    fn f(self, a: f32) -> f32 {
        match self {
            Act::Relu2 => a.max(0.0) * a.max(0.0),
            Act::Gelu => 0.5 * a * (1.0 + (GELU_C * (a + GELU_K * a * a * a)).tanh()),
        }
    }

    /// act'(a).
    fn df(self, a: f32) -> f32 {
        match self {
            Act::Relu2 => 2.0 * a.max(0.0),
            Act::Gelu => {
                let t = (GELU_C * (a + GELU_K * a * a * a)).tanh();
                0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_K * a * a)
            }
        }
    }

    /// The CUDA kernels (forward, backward) of kernels/act.cu.
    fn kernels(self) -> (&'static str, &'static str) {
        match self {
            Act::Relu2 => ("relu2_fwd", "relu2_bwd"),
            Act::Gelu => ("gelu_fwd", "gelu_bwd"),
        }
    }
}

/// `ffn`: the hidden size of each expert (default `model.expert_ffn`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    ffn: Option<usize>,
}

struct ActExperts {
    act: Act,
    hidden: usize,
    /// This rank's experts (`ModelDims::local_experts`).
    experts: usize,
    ffn: usize,
}

fn create(act: Act, config: &str, dims: ModelDims) -> Result<ActExperts> {
    let c: Config = parse_config(config)?;
    if c.ffn == Some(0) {
        return Err("`ffn` = 0: an expert's hidden size must be at least 1".into());
    }
    let (hidden, experts) = (dims.hidden as usize, dims.local_experts as usize);
    let ffn = c.ffn.unwrap_or(dims.expert_ffn as usize);
    if hidden == 0 || experts == 0 || ffn == 0 {
        return Err(format!(
            "{}: model.hidden ({hidden}), the local experts ({experts}) and model.expert_ffn ({ffn}) must all be at \
             least 1",
            act.name()
        ));
    }
    let (first, all) = (dims.first_expert as usize, dims.experts as usize);
    if first + experts > all {
        let who = act.name();
        return Err(format!(
            "{who}: local experts {first}..{} are not experts of the model (0..{all})",
            first + experts
        ));
    }
    Ok(ActExperts { act, hidden, experts, ffn })
}

fn create_relu2(config: &str, dims: ModelDims) -> Result<ActExperts> {
    create(Act::Relu2, config, dims)
}

fn create_gelu(config: &str, dims: ModelDims) -> Result<ActExperts> {
    create(Act::Gelu, config, dims)
}

register!(
    Experts,
    "relu2",
    "squared-ReLU experts (Primer): relu(x·W_up)²·W_down via grouped GEMM, dropless",
    "[experts]\nplugin = \"relu2\"\nffn = 128",
    create_relu2
);

register!(
    Experts,
    "gelu",
    "GELU experts (tanh approximation, GPT-2): gelu(x·W_up)·W_down via grouped GEMM, dropless",
    "[experts]\nplugin = \"gelu\"\nffn = 128",
    create_gelu
);

fn cuda_source() -> &'static str {
    kernel_source!(include_str!("../kernels/act.cu"))
}

/// Fail unless `t` is a `dtype` tensor on `device` of shape `want` (a 0 in `want` matches any size).
fn expect(who: &str, t: &Tensor, dtype: DType, device: Device, want: &[usize], what: &str) -> Result<()> {
    let dims = t.dims();
    let fits = dims.len() == want.len() && dims.iter().zip(want).all(|(&d, &w)| w == 0 || d == w);
    if !fits || t.dtype != dtype || t.device != device {
        return Err(format!(
            "{who}: {what}: expected a {dtype:?} {device:?} tensor of shape {want:?} (0: any size), got {:?} {dims:?} \
             on {:?}",
            t.dtype, t.device
        ));
    }
    Ok(())
}

/// Launch arguments of the kernels, in parameter order (a unit test holds them to kernels/act.cu).
mod args {
    use super::*;

    /// `{relu2,gelu}_fwd(a, u, n)`.
    pub fn fwd(a: Tensor, u: Tensor, n: usize) -> Vec<Arg> {
        vec![a.arg(), u.arg(), Arg::I64(n as i64)]
    }
    /// `{relu2,gelu}_bwd(a, du, da, n)`.
    pub fn bwd(a: Tensor, du: Tensor, da: Tensor, n: usize) -> Vec<Arg> {
        vec![a.arg(), du.arg(), da.arg(), Arg::I64(n as i64)]
    }
}

impl ActExperts {
    fn who(&self) -> &'static str {
        self.act.name()
    }

    /// Parameters, x (f32 on the CPU, bf16 on CUDA) and the host offsets.
    fn check(&self, dev: Device, p: &[Tensor], x: &Tensor, offsets: &Tensor) -> Result<()> {
        let who = self.who();
        if p.len() != 2 {
            return Err(format!("{who}: expected 2 parameters (w_up, w_down), got {}", p.len()));
        }
        let act = match dev {
            Device::Cpu => DType::F32,
            Device::Cuda => DType::BF16,
        };
        expect(who, &p[0], act, dev, &[self.experts, self.hidden, self.ffn], "w_up")?;
        expect(who, &p[1], act, dev, &[self.experts, self.ffn, self.hidden], "w_down")?;
        expect(who, x, act, dev, &[0, self.hidden], "x")?;
        expect(who, offsets, DType::I32, Device::Cpu, &[self.experts + 1], "offsets")
    }
}

impl Experts for ActExperts {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(ffn = self.ffn)
    }

    fn params(&self) -> Vec<ParamSpec> {
        let (e, h, f) = (self.experts, self.hidden, self.ffn);
        vec![
            ParamSpec::new("w_up", &[e, h, f], Init::Normal(0.02), true),
            ParamSpec::new("w_down", &[e, f, h], Init::Normal(0.02), true),
        ]
    }

    /// Two GEMMs of 2·H·F FLOPs per row.
    fn flops(&self, rows: &[u64]) -> f64 {
        4.0 * (self.hidden * self.ffn) as f64 * rows.iter().sum::<u64>() as f64
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor, offsets: Tensor) -> Result<ExpertsOut> {
        let dev = h.device();
        self.check(dev, p, &x, &offsets)?;
        let (n, f, act) = (x.dim(0), self.ffn, kit::act_dtype(&h));
        // alloc_uninit: the grouped GEMMs and the activation write every element.
        let (a, u) = (h.alloc_uninit(&[n, f], act)?, h.alloc_uninit(&[n, f], act)?);
        h.grouped_gemm(x, p[0], a, offsets, false, false)?;
        match dev {
            Device::Cpu => {
                // SAFETY: u is this call's own allocation; nothing else views it.
                let uv = unsafe { u.f32s_mut() };
                uv.iter_mut().zip(a.f32s()).for_each(|(u, &a)| *u = self.act.f(a));
            }
            Device::Cuda => {
                let k = self.act.kernels().0;
                h.launch(cuda_source(), k, kit::grid((n * f).div_ceil(8), 256), BLOCK, 0, &args::fwd(a, u, n * f))?;
            }
        }
        let y = h.alloc_uninit(&[n, self.hidden], act)?;
        h.grouped_gemm(u, p[1], y, offsets, false, false)?;
        Ok(ExpertsOut { y, saved: vec![a, u].into() })
    }

    fn backward(
        &self,
        h: Host,
        p: &[Tensor],
        g: &[Tensor],
        x: Tensor,
        offsets: Tensor,
        out: &ExpertsOut,
        dy: Tensor,
        dx: Tensor,
    ) -> Result<()> {
        let dev = h.device();
        self.check(dev, p, &x, &offsets)?;
        let who = self.who();
        let ([g_up, g_down], [a, u]) = (g, &out.saved[..]) else {
            return Err(format!("{who}: expected 2 grads and the 2 tensors forward saved"));
        };
        let (n, f, act) = (x.dim(0), self.ffn, kit::act_dtype(&h));
        for (t, what) in [(a, "saved a"), (u, "saved u")] {
            expect(who, t, act, dev, &[n, f], what)?;
        }
        let (du, da) = (h.alloc_uninit(&[n, f], act)?, h.alloc_uninit(&[n, f], act)?);
        h.grouped_gemm(dy, p[1], du, offsets, true, false)?; // du = dy·W_downᵀ
        h.grouped_gemm_wgrad(*u, dy, *g_down, offsets)?; // dW_down += uᵀ·dy
        match dev {
            Device::Cpu => {
                // SAFETY: da is this call's own allocation; nothing else views it.
                let dav = unsafe { da.f32s_mut() };
                for ((d, &a), &du) in dav.iter_mut().zip(a.f32s()).zip(du.f32s()) {
                    *d = du * self.act.df(a);
                }
            }
            Device::Cuda => {
                let (k, m) = (self.act.kernels().1, n * f);
                h.launch(cuda_source(), k, kit::grid(m.div_ceil(8), 256), BLOCK, 0, &args::bwd(*a, du, da, m))?;
            }
        }
        h.grouped_gemm_wgrad(x, da, *g_up, offsets)?; // dW_up += xᵀ·da
        h.grouped_gemm(da, p[0], dx, offsets, true, false) // dx = da·W_upᵀ (written)
    }
}

#[cfg(test)]
mod tests;
