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
    let c: Config = parse_config(config)?;
    let ffn = c.ffn.unwrap_or(dims.expert_ffn as usize);
    if c.ffn == Some(0) {
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
    "an always-on SwiGLU expert on every token (DeepSeek-style, ungated), beside the routed ones",
    "[shared]\nplugin = \"shared-swiglu\"\nffn = 256",
    create
);

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
}
