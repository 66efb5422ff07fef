//! `clamped-swiglu`: GPT-OSS's experts (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card";
//! transformers' `GptOssExperts`): a SwiGLU whose gate and up projections are clamped, whose gate
//! is z·σ(α·z), whose up is shifted by one, with a bias on every projection. README.md has every
//! config key.
//!
//! Per local expert e on its rows x_e of x [N,H] (sorted by expert, groups from offsets [E_local+1]),
//! Wg, Wu [E_local,H,F], Wd [E_local,F,H], biases bg, bu [E_local,F], bd [E_local,H] (`bias`):
//!   a = x_e·Wg[e] + bg[e];  b = x_e·Wu[e] + bu[e]                    [n_e,F]
//!   ac = min(a, L);  bc = clamp(b, −L, L);  glu = ac·σ(α·ac);  u = (bc + s)·glu
//!   y_e = u·Wd[e] + bd[e]                                              [n_e,H]
//! with α = `alpha` (1.702), L = `limit` (7), s = `up_shift` (1). Backward (clamps pass the
//! gradient where their input is inside, bounds included, as torch.clamp):
//!   du = dy·Wd[e]ᵀ;  dWd[e] += uᵀ·dy;  dbd[e] += Σ dy
//!   da = du·(bc + s)·glu'(ac)·[a ≤ L],  glu'(z) = σ(αz)·(1 + αz·(1 − σ(αz)));  db = du·glu·[|b| ≤ L]
//!   dWg[e] += x_eᵀ·da;  dWu[e] += x_eᵀ·db;  dbg[e] += Σ da;  dbu[e] += Σ db;  dx_e = da·Wgᵀ + db·Wuᵀ.
//! Forward FLOPs: three GEMMs, 6·H·F per row.
//!
//! CUDA (kernels/clamped_swiglu.cu): the same host grouped GEMMs on bf16 x, a, b, u, y (f32
//! weight gradients); `cs_fwd`/`cs_bwd` do the elementwise steps; `cs_bias_add`/`cs_bias_grad`
//! the per-expert biases (the offsets copied to the device; column sums in a fixed order, no atomics).

use pith_plugin_api::{
    kernel_source, kit, parse_config, register, Arg, DType, Device, Experts, ExpertsOut, Host, Init, ModelDims,
    ParamSpec, Result, Tensor,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("clamped-swiglu");

const WHO: &str = "clamped-swiglu";
/// Threads per block of every launch.
const BLOCK: [u32; 3] = [256, 1, 1];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    ffn: Option<usize>,
    #[serde(default = "d_alpha")]
    alpha: f32,
    #[serde(default = "d_limit")]
    limit: f32,
    #[serde(default = "d_shift")]
    up_shift: f32,
    #[serde(default = "d_bias")]
    bias: bool,
}
fn d_alpha() -> f32 {
    1.702
}
fn d_limit() -> f32 {
    7.0
}
fn d_shift() -> f32 {
    1.0
}
fn d_bias() -> bool {
    true
}

struct ClampedSwiglu {
    hidden: usize,
    /// This rank's experts (`ModelDims::local_experts`).
    experts: usize,
    ffn: usize,
    alpha: f32,
    limit: f32,
    shift: f32,
    bias: bool,
}

fn create(config: &str, dims: ModelDims) -> Result<ClampedSwiglu> {
    let c: Config = parse_config(config)?;
    let (hidden, experts) = (dims.hidden as usize, dims.local_experts as usize);
    let ffn = c.ffn.unwrap_or(dims.expert_ffn as usize);
    if hidden == 0 || experts == 0 || ffn == 0 {
        return Err(format!(
            "{WHO}: model.hidden ({hidden}), the local experts ({experts}) and `ffn`/model.expert_ffn ({ffn}) must all be at least 1"
        ));
    }
    if !(c.alpha.is_finite() && c.limit > 0.0 && c.up_shift.is_finite()) {
        return Err(format!(
            "{WHO}: `alpha` = {}, `limit` = {}, `up_shift` = {}: alpha and up_shift must be finite, limit > 0 (inf: no clamp)",
            c.alpha, c.limit, c.up_shift
        ));
    }
    let (first, all) = (dims.first_expert as usize, dims.experts as usize);
    if first + experts > all {
        return Err(format!(
            "{WHO}: local experts {first}..{} are not experts of the model (0..{all})",
            first + experts
        ));
    }
    let (alpha, limit, shift, bias) = (c.alpha, c.limit, c.up_shift, c.bias);
    Ok(ClampedSwiglu { hidden, experts, ffn, alpha, limit, shift, bias })
}

register!(
    Experts,
    "clamped-swiglu",
    "GPT-OSS experts: (clamp(x·Wu + bu) + 1) · glu(min(x·Wg + bg, L)) · Wd + bd, glu(z) = z·σ(1.702z)",
    "[experts]\nplugin = \"clamped-swiglu\"\nalpha = 1.702\nlimit = 7.0\nup_shift = 1.0\nbias = true",
    create
);

fn src() -> &'static str {
    kernel_source!(include_str!("../kernels/clamped_swiglu.cu"))
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

impl ClampedSwiglu {
    /// Parameters (3, or 6 with `bias`), x (f32 on the CPU, bf16 on CUDA) and the host offsets.
    fn check(&self, dev: Device, p: &[Tensor], x: &Tensor, offsets: &Tensor) -> Result<()> {
        let want = if self.bias { 6 } else { 3 };
        if p.len() != want {
            return Err(format!("{WHO}: expected {want} parameters, got {}", p.len()));
        }
        let act = if dev == Device::Cpu { DType::F32 } else { DType::BF16 };
        let (e, h, f) = (self.experts, self.hidden, self.ffn);
        let shapes: [&[usize]; 6] = [&[e, h, f], &[e, h, f], &[e, f, h], &[e, f], &[e, f], &[e, h]];
        for (i, (t, s)) in p.iter().zip(shapes).enumerate() {
            kit::expect(t, act, dev, s, &format!("{WHO}: parameter {i}"))?;
        }
        kit::expect(x, act, dev, &[0, h], &format!("{WHO}: x"))?;
        kit::expect(offsets, DType::I32, Device::Cpu, &[e + 1], &format!("{WHO}: offsets"))
    }

    /// y [N, cols] += bias[g] on each row of group g; `offsets` from [`Self::groups`].
    fn bias_add(&self, h: &Host, y: Tensor, b: Tensor, offsets: Tensor, cols: usize) -> Result<()> {
        match h.device() {
            Device::Cpu => {
                let off = offsets.i32s();
                // SAFETY: y is the caller's fresh allocation, viewed nowhere else.
                let yv = unsafe { y.f32s_mut() };
                for (g, w) in off.windows(2).enumerate() {
                    let bg = &b.f32s()[g * cols..][..cols];
                    let rows = &mut yv[w[0] as usize * cols..w[1] as usize * cols];
                    rows.chunks_mut(cols).for_each(|r| r.iter_mut().zip(bg).for_each(|(y, b)| *y += b));
                }
                Ok(())
            }
            Device::Cuda => {
                let rows = y.numel() / cols;
                let args = [y.arg(), b.arg(), offsets.arg(), Arg::I32(self.experts as i32), Arg::I64(rows as i64)];
                let args = [&args[..], &[Arg::I32(cols as i32)]].concat();
                h.launch(src(), "cs_bias_add", kit::grid(rows, 1), BLOCK, 0, &args)
            }
        }
    }

    /// g [E, cols] += each group's column sums of d; `offsets` from [`Self::groups`].
    fn bias_grad(&self, h: &Host, d: Tensor, g: Tensor, offsets: Tensor, cols: usize) -> Result<()> {
        match h.device() {
            Device::Cpu => {
                // SAFETY: g is this component's gradient, viewed nowhere else during the call.
                let gv = unsafe { g.f32s_mut() };
                for (e, w) in offsets.i32s().windows(2).enumerate() {
                    let ge = &mut gv[e * cols..][..cols];
                    for r in d.f32s()[w[0] as usize * cols..w[1] as usize * cols].chunks(cols) {
                        ge.iter_mut().zip(r).for_each(|(g, d)| *g += d);
                    }
                }
                Ok(())
            }
            Device::Cuda => {
                let grid = [cols.div_ceil(32) as u32, self.experts as u32, 1];
                let args = [d.arg(), g.arg(), offsets.arg(), Arg::I32(cols as i32)];
                h.launch(src(), "cs_bias_grad", grid, BLOCK, 0, &args)
            }
        }
    }

    /// The group offsets where the bias kernels read them: the host tensor on the CPU, a device
    /// copy (made once per forward or backward) on CUDA.
    fn groups(&self, h: &Host, offsets: Tensor) -> Result<Tensor> {
        if h.device() == Device::Cpu {
            return Ok(offsets);
        }
        let t = h.alloc_uninit(&[self.experts + 1], DType::I32)?;
        h.copy(offsets, t)?;
        Ok(t)
    }

    /// The scalar arguments (alpha, limit, shift) of cs_fwd and cs_bwd.
    fn consts(&self) -> [Arg; 3] {
        [Arg::F32(self.alpha), Arg::F32(self.limit), Arg::F32(self.shift)]
    }
}

impl Experts for ClampedSwiglu {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(
            ffn = self.ffn,
            alpha = self.alpha,
            limit = self.limit,
            up_shift = self.shift,
            bias = self.bias
        )
    }

    fn params(&self) -> Vec<ParamSpec> {
        let (e, h, f) = (self.experts, self.hidden, self.ffn);
        let mut p = vec![
            ParamSpec::new("w_gate", &[e, h, f], Init::Normal(0.02), true),
            ParamSpec::new("w_up", &[e, h, f], Init::Normal(0.02), true),
            ParamSpec::new("w_down", &[e, f, h], Init::Normal(0.02), true),
        ];
        if self.bias {
            p.extend([
                ParamSpec::new("b_gate", &[e, f], Init::Zeros, false),
                ParamSpec::new("b_up", &[e, f], Init::Zeros, false),
                ParamSpec::new("b_down", &[e, h], Init::Zeros, false),
            ]);
        }
        p
    }

    /// Three GEMMs of 2·H·F FLOPs per row.
    fn flops(&self, rows: &[u64]) -> f64 {
        6.0 * (self.hidden * self.ffn) as f64 * rows.iter().sum::<u64>() as f64
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor, offsets: Tensor) -> Result<ExpertsOut> {
        let dev = h.device();
        self.check(dev, p, &x, &offsets)?;
        let (n, f, act) = (x.dim(0), self.ffn, kit::act_dtype(&h));
        let new = || h.alloc_uninit(&[n, f], act);
        let (a, b, u) = (new()?, new()?, new()?);
        h.grouped_gemm(x, p[0], a, offsets, false, false)?;
        h.grouped_gemm(x, p[1], b, offsets, false, false)?;
        let groups = if self.bias { Some(self.groups(&h, offsets)?) } else { None };
        if let Some(o) = groups {
            self.bias_add(&h, a, p[3], o, f)?;
            self.bias_add(&h, b, p[4], o, f)?;
        }
        match dev {
            Device::Cpu => {
                // SAFETY: u is this call's own allocation; nothing else views it.
                let uv = unsafe { u.f32s_mut() };
                for ((u, &a), &b) in uv.iter_mut().zip(a.f32s()).zip(b.f32s()) {
                    let (ac, bc) = (a.min(self.limit), b.clamp(-self.limit, self.limit));
                    *u = (bc + self.shift) * ac * sigmoid(self.alpha * ac);
                }
            }
            Device::Cuda => {
                let args = [&[a.arg(), b.arg(), u.arg(), Arg::I64((n * f) as i64)][..], &self.consts()].concat();
                h.launch(src(), "cs_fwd", kit::grid(n * f, 256), BLOCK, 0, &args)?;
            }
        }
        let y = h.alloc_uninit(&[n, self.hidden], act)?;
        h.grouped_gemm(u, p[2], y, offsets, false, false)?;
        if let Some(o) = groups {
            self.bias_add(&h, y, p[5], o, self.hidden)?;
        }
        Ok(ExpertsOut { y, saved: vec![a, b, u].into() })
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
        let [a, b, u] = &out.saved[..] else {
            return Err(format!("{WHO}: expected the 3 tensors forward saved"));
        };
        if g.len() != p.len() {
            return Err(format!("{WHO}: expected {} grads, got {}", p.len(), g.len()));
        }
        let (n, f, act) = (x.dim(0), self.ffn, kit::act_dtype(&h));
        let new = || h.alloc_uninit(&[n, f], act);
        let (du, da, db) = (new()?, new()?, new()?);
        h.grouped_gemm(dy, p[2], du, offsets, true, false)?;
        h.grouped_gemm_wgrad(*u, dy, g[2], offsets)?;
        match dev {
            Device::Cpu => {
                let (av, bv, duv) = (a.f32s(), b.f32s(), du.f32s());
                // SAFETY: da and db are this call's own allocations; nothing else views them.
                let (dav, dbv) = unsafe { (da.f32s_mut(), db.f32s_mut()) };
                for i in 0..duv.len() {
                    let (ac, bc) = (av[i].min(self.limit), bv[i].clamp(-self.limit, self.limit));
                    let s = sigmoid(self.alpha * ac);
                    let dglu = s * (1.0 + self.alpha * ac * (1.0 - s));
                    dav[i] = if av[i] <= self.limit { duv[i] * (bc + self.shift) * dglu } else { 0.0 };
                    dbv[i] = if bv[i].abs() <= self.limit { duv[i] * ac * s } else { 0.0 };
                }
            }
            Device::Cuda => {
                let ptrs = [a.arg(), b.arg(), du.arg(), da.arg(), db.arg(), Arg::I64((n * f) as i64)];
                h.launch(src(), "cs_bwd", kit::grid(n * f, 256), BLOCK, 0, &[&ptrs[..], &self.consts()].concat())?;
            }
        }
        if self.bias {
            let o = self.groups(&h, offsets)?;
            self.bias_grad(&h, dy, g[5], o, self.hidden)?;
            self.bias_grad(&h, da, g[3], o, f)?;
            self.bias_grad(&h, db, g[4], o, f)?;
        }
        h.grouped_gemm_wgrad(x, da, g[0], offsets)?;
        h.grouped_gemm_wgrad(x, db, g[1], offsets)?;
        h.grouped_gemm(da, p[0], dx, offsets, true, false)?;
        h.grouped_gemm(db, p[1], dx, offsets, true, true)
    }
}

#[cfg(test)]
mod tests;
