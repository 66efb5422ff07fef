//! `swiglu`: E SwiGLU feed-forward experts over expert-sorted rows (dropless: every row is
//! processed by the expert whose group it is in).
//!
//! This rank's experts only: `local_experts` of them (all on one rank), each parameter
//! [E_local, ..]. Forward FLOPs: 6·H·F per row (three GEMMs).
//! Forward, for the rows x_e of local expert e (x [N,H], groups from offsets [E_local+1]):
//!   a = x_e·Wg[e], b = x_e·Wu[e]  [n_e,F];  u = silu(a) ⊙ b;  y_e = u·Wd[e]  [n_e,H].
//! Backward, with σ = sigmoid(a), silu(a) = a·σ, silu'(a) = σ·(1 + a·(1 − σ)):
//!   du = dy·Wd[e]ᵀ;  dWd[e] += uᵀ·dy;  da = du ⊙ b ⊙ silu'(a);  db = du ⊙ silu(a);
//!   dWg[e] += x_eᵀ·da;  dWu[e] += x_eᵀ·db;  dx_e = da·Wg[e]ᵀ + db·Wu[e]ᵀ.
//!
//! CUDA (kernels/swiglu.cu): the same host grouped GEMMs on bf16 x, a, b, u, y (f32 weight
//! grads), with the elementwise steps in `swiglu_fwd` (u) and `swiglu_bwd` (da, db).

use crate::{act, expect, grid, BLOCK};
use pith_plugin_api::{
    parse_config, register, Arg, DType, Device, Experts, ExpertsOut, Host, Init, ModelDims, ParamSpec, Result, Tensor,
};
use serde::Deserialize;

/// `ffn`: the hidden size of each expert (default `model.expert_ffn`; set it for a shared expert).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    ffn: Option<usize>,
}

struct SwiGlu {
    hidden: usize,
    /// This rank's experts (`ModelDims::local_experts`).
    experts: usize,
    ffn: usize,
}

fn create(config: &str, dims: ModelDims) -> Result<SwiGlu> {
    build(parse_config::<Config>(config)?.ffn, dims)
}

fn build(ffn_key: Option<usize>, dims: ModelDims) -> Result<SwiGlu> {
    let ffn = ffn_key.unwrap_or(dims.expert_ffn as usize);
    if ffn_key == Some(0) {
        return Err("`ffn` = 0: an expert's hidden size must be at least 1".into());
    }
    let (hidden, experts) = (dims.hidden as usize, dims.local_experts as usize);
    if hidden == 0 || experts == 0 || ffn == 0 {
        return Err(format!(
            "model.hidden ({hidden}), the local experts ({experts}) and model.expert_ffn ({ffn}) must all be at least 1"
        ));
    }
    if dims.first_expert as usize + experts > dims.experts as usize {
        let (first, all) = (dims.first_expert, dims.experts);
        return Err(format!(
            "{WHO}: local experts {first}..{} are not experts of the model (0..{all})",
            first as usize + experts
        ));
    }
    Ok(SwiGlu { hidden, experts, ffn })
}

register!(
    Experts,
    "swiglu",
    "SwiGLU experts (silu(x·Wg) ⊙ x·Wu)·Wd via grouped GEMM, dropless",
    "[experts]\nplugin = \"swiglu\"",
    create
);

register!(
    Shared,
    "shared-swiglu",
    "an always-on SwiGLU expert on every token beside the routed ones: ungated (DeepSeek) or with a sigmoid gate per token (gate = true, Qwen2-MoE)",
    "[shared]\nplugin = \"shared-swiglu\"\nffn = 256\ngate = false",
    create_shared
);

/// `[shared]`: `ffn` as for `swiglu`; `gate = true` multiplies the expert's output by a sigmoid
/// gate per token, σ(x·w) with a trained w [1,H] (`gate`), as Qwen2-MoE's `shared_expert_gate`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SharedConfig {
    #[serde(default)]
    ffn: Option<usize>,
    #[serde(default)]
    gate: bool,
}

struct Shared {
    ffn: SwiGlu,
    gate: bool,
}

fn create_shared(config: &str, dims: ModelDims) -> Result<Shared> {
    let c: SharedConfig = parse_config(config)?;
    Ok(Shared { ffn: build(c.ffn, dims)?, gate: c.gate })
}

const WHO: &str = "swiglu";
const SRC: &str = kernel_source!("swiglu.cu");

fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + (-a).exp())
}

impl SwiGlu {
    /// Offsets are host memory on every device; x is f32 on the CPU, bf16 on CUDA.
    fn check(&self, dev: Device, p: &[Tensor], x: &Tensor, offsets: &Tensor) -> Result<()> {
        if p.len() != 3 {
            return Err(format!("{WHO}: expected 3 parameters (w_gate, w_up, w_down), got {}", p.len()));
        }
        expect(x, act(dev), dev, &[0, self.hidden], "swiglu: x")?;
        expect(offsets, DType::I32, Device::Cpu, &[self.experts + 1], "swiglu: offsets")
    }
}

impl Experts for SwiGlu {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(ffn = self.ffn)
    }

    fn params(&self) -> Vec<ParamSpec> {
        let (e, h, f) = (self.experts, self.hidden, self.ffn);
        vec![
            ParamSpec::new("w_gate", &[e, h, f], Init::Normal(0.02), true),
            ParamSpec::new("w_up", &[e, h, f], Init::Normal(0.02), true),
            ParamSpec::new("w_down", &[e, f, h], Init::Normal(0.02), true),
        ]
    }

    fn flops(&self, rows: &[u64]) -> f64 {
        6.0 * (self.hidden * self.ffn) as f64 * rows.iter().sum::<u64>() as f64
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor, offsets: Tensor) -> Result<ExpertsOut> {
        let dev = h.device();
        self.check(dev, p, &x, &offsets)?;
        let (n, f) = (x.dim(0), self.ffn);
        let new = || h.alloc_uninit(&[n, f], act(dev));
        let (a, b, u) = (new()?, new()?, new()?);
        h.grouped_gemm(x, p[0], a, offsets, false, false)?;
        h.grouped_gemm(x, p[1], b, offsets, false, false)?;
        match dev {
            Device::Cpu => {
                // SAFETY: u is this call's own allocation; nothing else views it.
                let uv = unsafe { u.f32s_mut() };
                for ((ui, &ai), &bi) in uv.iter_mut().zip(a.f32s()).zip(b.f32s()) {
                    *ui = ai * sigmoid(ai) * bi;
                }
            }
            Device::Cuda => {
                let args = [a.arg(), b.arg(), u.arg(), Arg::I64((n * f) as i64)];
                h.launch(SRC, "swiglu_fwd", grid(n * f, 256), BLOCK, 0, &args)?;
            }
        }
        let y = h.alloc_uninit(&[n, self.hidden], act(dev))?;
        h.grouped_gemm(u, p[2], y, offsets, false, false)?;
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
        let ([ga, gb, gd], [a, b, u]) = (g, &out.saved[..]) else {
            return Err(format!("{WHO}: expected 3 grads and the 3 tensors forward saved"));
        };
        let (n, f) = (x.dim(0), self.ffn);
        let new = || h.alloc_uninit(&[n, f], act(dev));
        let (du, da, db) = (new()?, new()?, new()?);
        h.grouped_gemm(dy, p[2], du, offsets, true, false)?;
        h.grouped_gemm_wgrad(*u, dy, *gd, offsets)?;
        match dev {
            Device::Cpu => {
                let (av, bv, duv) = (a.f32s(), b.f32s(), du.f32s());
                // SAFETY: da and db are this call's own allocations; nothing else views them.
                let (dav, dbv) = unsafe { (da.f32s_mut(), db.f32s_mut()) };
                for i in 0..duv.len() {
                    let (ai, s) = (av[i], sigmoid(av[i]));
                    dav[i] = duv[i] * bv[i] * s * (1.0 + ai * (1.0 - s));
                    dbv[i] = duv[i] * ai * s;
                }
            }
            Device::Cuda => {
                for (t, what) in [(a, "a"), (b, "b")] {
                    expect(t, DType::BF16, dev, &[n, f], &format!("swiglu: saved {what}"))?;
                }
                let args = [a.arg(), b.arg(), du.arg(), da.arg(), db.arg(), Arg::I64((n * f) as i64)];
                h.launch(SRC, "swiglu_bwd", grid(n * f, 256), BLOCK, 0, &args)?;
            }
        }
        h.grouped_gemm_wgrad(x, da, *ga, offsets)?;
        h.grouped_gemm_wgrad(x, db, *gb, offsets)?;
        h.grouped_gemm(da, p[0], dx, offsets, true, false)?;
        h.grouped_gemm(db, p[1], dx, offsets, true, true)
    }
}

/// The gated form: y = σ(z)·y_in with z = x·wᵀ [T,1] (f32) and y_in the SwiGLU's output; saved
/// after the SwiGLU's own a, b, u: y_in and z. Backward: dy_in = σ(z)·dy (into the SwiGLU's
/// backward), dz = σ'(z)·⟨dy, y_in⟩ per row; dw += dzᵀ·x; dx += dz·w.
impl Experts for Shared {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(ffn = self.ffn.ffn, gate = self.gate)
    }

    fn params(&self) -> Vec<ParamSpec> {
        let mut p = self.ffn.params();
        if self.gate {
            p.push(ParamSpec::new("gate", &[1, self.ffn.hidden], Init::Normal(0.02), true));
        }
        p
    }

    fn flops(&self, rows: &[u64]) -> f64 {
        self.ffn.flops(rows)
            + if self.gate { 2.0 * (self.ffn.hidden as u64 * rows.iter().sum::<u64>()) as f64 } else { 0.0 }
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor, offsets: Tensor) -> Result<ExpertsOut> {
        if !self.gate {
            return self.ffn.forward(h, p, x, offsets);
        }
        let [w_gate, w_up, w_down, gate] = p else {
            return Err(format!("shared-swiglu: expected 4 parameters with `gate`, got {}", p.len()));
        };
        let inner = self.ffn.forward(h, &[*w_gate, *w_up, *w_down], x, offsets)?;
        let (dev, t, hd) = (h.device(), x.dim(0), self.ffn.hidden);
        let z = h.alloc_uninit(&[t, 1], DType::F32)?;
        h.gemm(x, *gate, z, false, true, 1.0, 0.0)?;
        let y = h.alloc_uninit(&[t, hd], act(dev))?;
        match dev {
            Device::Cpu => {
                // SAFETY: y is this call's own allocation; nothing else views it.
                let yv = unsafe { y.f32s_mut() };
                for ((row, yin), &zt) in yv.chunks_mut(hd).zip(inner.y.f32s().chunks(hd)).zip(z.f32s()) {
                    row.iter_mut().zip(yin).for_each(|(o, &v)| *o = sigmoid(zt) * v);
                }
            }
            Device::Cuda => {
                let args = [inner.y.arg(), z.arg(), y.arg(), Arg::I64((t * hd) as i64), Arg::I32(hd as i32)];
                h.launch(SRC, "gate_fwd", grid(t * hd, 256), BLOCK, 0, &args)?;
            }
        }
        let saved: Vec<Tensor> = inner.saved.iter().copied().chain([inner.y, z]).collect();
        Ok(ExpertsOut { y, saved: saved.into() })
    }

    #[allow(clippy::too_many_arguments)]
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
        if !self.gate {
            return self.ffn.backward(h, p, g, x, offsets, out, dy, dx);
        }
        let ([w_gate, w_up, w_down, gate], [gg, gu, gd, g_gate], [a, b, u, yin, z]) = (p, g, &out.saved[..]) else {
            return Err("shared-swiglu: expected 4 parameters and grads, and the 5 tensors forward saved".into());
        };
        let (dev, t, hd) = (h.device(), x.dim(0), self.ffn.hidden);
        let (dyin, dz) = (h.alloc_uninit(&[t, hd], act(dev))?, h.alloc_uninit(&[t, 1], act(dev))?);
        match dev {
            Device::Cpu => {
                // SAFETY: dyin and dz are this call's own allocations; nothing else views them.
                let (dyv, dzv) = unsafe { (dyin.f32s_mut(), dz.f32s_mut()) };
                let rows = dy.f32s().chunks(hd).zip(yin.f32s().chunks(hd)).zip(z.f32s());
                for (((d, yi), &zt), (out, dzt)) in rows.zip(dyv.chunks_mut(hd).zip(dzv.iter_mut())) {
                    let s = sigmoid(zt);
                    out.iter_mut().zip(d).for_each(|(o, &dv)| *o = s * dv);
                    *dzt = s * (1.0 - s) * d.iter().zip(yi).map(|(&dv, &v)| dv * v).sum::<f32>();
                }
            }
            Device::Cuda => {
                let ptrs = [yin.arg(), z.arg(), dy.arg(), dyin.arg(), dz.arg()];
                h.launch(
                    SRC,
                    "gate_bwd",
                    grid(t, 8),
                    BLOCK,
                    0,
                    &[&ptrs[..], &[Arg::I32(t as i32), Arg::I32(hd as i32)]].concat(),
                )?;
            }
        }
        let inner = ExpertsOut { y: *yin, saved: vec![*a, *b, *u].into() };
        self.ffn.backward(h, &[*w_gate, *w_up, *w_down], &[*gg, *gu, *gd], x, offsets, &inner, dyin, dx)?;
        h.gemm(dz, x, *g_gate, true, false, 1.0, 1.0)?;
        h.gemm(dz, *gate, dx, false, false, 1.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, dims, dot, randn};
    use pith_plugin_api::kit::TestHost;

    /// Two local experts (1 and 2 of 4): parameters, FLOPs and gradients of L = ⟨c, y⟩.
    #[test]
    fn local_experts_forward_backward() {
        let (n, hd, f) = (5, 6, 5);
        let s = create("", ModelDims { first_expert: 1, local_experts: 2, ..dims(4) }).unwrap();
        assert_eq!(s.params().iter().map(|p| p.shape[0]).collect::<Vec<_>>(), [2, 2, 2]);
        assert_eq!(s.flops(&[3, 4]), 6.0 * (hd * f * 7) as f64);
        assert!(create("", ModelDims { first_expert: 3, local_experts: 2, ..dims(4) }).err().unwrap().contains("3..5"));
        let data = TestHost::new(n);
        let x = data.tensor_f32(&randn(n * hd, 1, 1.0), &[n, hd]);
        let offsets = data.tensor_i32(&[0, 2, 5], &[3]);
        let shape = |q: &ParamSpec| q.shape.iter().map(|&d| d as usize).collect::<Vec<_>>();
        let p: Vec<Tensor> = s
            .params()
            .iter()
            .zip(2..)
            .map(|(q, seed)| data.tensor_f32(&randn(q.numel(), seed, 0.5), &shape(q)))
            .collect();
        let c = randn(n * hd, 9, 1.0);
        let loss = || {
            let th = TestHost::new(n);
            dot(&c, s.forward(th.host(), &p, x, offsets).unwrap().y.f32s())
        };
        let th = TestHost::new(n);
        let o = s.forward(th.host(), &p, x, offsets).unwrap();
        let g: Vec<Tensor> = p.iter().map(|q| th.zeros(&q.dims(), DType::F32)).collect();
        let dx = th.zeros(&[n, hd], DType::F32);
        s.backward(th.host(), &p, &g, x, offsets, &o, th.tensor_f32(&c, &[n, hd]), dx).unwrap();
        check_grad("dx", x, dx.f32s(), loss);
        for (i, (q, g)) in p.iter().zip(&g).enumerate() {
            check_grad(&format!("d param {i}"), *q, g.f32s(), loss);
        }
    }

    /// The gated shared expert (Qwen2-MoE): y = σ(x·w)·SwiGLU(x); every gradient by finite
    /// differences, and without `gate` it is the plain SwiGLU.
    #[test]
    fn gated_shared_expert_forward_backward() {
        let (n, hd) = (5, 6);
        let one = ModelDims { experts: 1, local_experts: 1, first_expert: 0, ..dims(1) };
        let s = create_shared("ffn = 4\ngate = true", one).unwrap();
        assert_eq!(
            s.params().last().map(|q| (q.name.to_string(), q.shape.to_vec())),
            Some(("gate".into(), vec![1, 6]))
        );
        assert_eq!(create_shared("ffn = 4", one).unwrap().params().len(), 3);
        assert!(create_shared("gate = 1", one).is_err());
        let data = TestHost::new(n);
        let x = data.tensor_f32(&randn(n * hd, 1, 1.0), &[n, hd]);
        let offsets = data.tensor_i32(&[0, n as i32], &[2]);
        let shape = |q: &ParamSpec| q.shape.iter().map(|&d| d as usize).collect::<Vec<_>>();
        let p: Vec<Tensor> = s
            .params()
            .iter()
            .zip(2..)
            .map(|(q, seed)| data.tensor_f32(&randn(q.numel(), seed, 0.5), &shape(q)))
            .collect();
        let plain = s.ffn.forward(data.host(), &p[..3], x, offsets).unwrap().y.f32s().to_vec();
        let gated = s.forward(data.host(), &p, x, offsets).unwrap().y.f32s().to_vec();
        for t in 0..n {
            let z: f32 = (0..hd).map(|j| x.f32s()[t * hd + j] * p[3].f32s()[j]).sum();
            for j in 0..hd {
                assert!((gated[t * hd + j] - sigmoid(z) * plain[t * hd + j]).abs() < 1e-6);
            }
        }
        let c = randn(n * hd, 9, 1.0);
        let loss = || {
            let th = TestHost::new(n);
            dot(&c, s.forward(th.host(), &p, x, offsets).unwrap().y.f32s())
        };
        let th = TestHost::new(n);
        let o = s.forward(th.host(), &p, x, offsets).unwrap();
        let g: Vec<Tensor> = p.iter().map(|q| th.zeros(&q.dims(), DType::F32)).collect();
        let dx = th.zeros(&[n, hd], DType::F32);
        s.backward(th.host(), &p, &g, x, offsets, &o, th.tensor_f32(&c, &[n, hd]), dx).unwrap();
        check_grad("dx", x, dx.f32s(), loss);
        for (i, (q, g)) in p.iter().zip(&g).enumerate() {
            check_grad(&format!("d param {i}"), *q, g.f32s(), loss);
        }
    }
}
