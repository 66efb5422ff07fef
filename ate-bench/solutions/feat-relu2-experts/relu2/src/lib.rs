//! `relu2`: squared-ReLU experts (So et al. 2021, "Primer"): two matrices per expert, no gate.
//!
//! This rank's experts only (`local_experts`; all of them on one rank), each parameter [E_local, ..].
//! Forward, for the rows x_e of local expert e (x [N,H], groups from offsets [E_local+1]):
//!   a = x_e·Wu[e] [n_e,F];  u = act(a);  y_e = u·Wd[e] [n_e,H],
//!   act = relu(a)² (`variant = "relu2"`) or relu(a) (`variant = "relu"`).
//!   FLOPs: 4·H·F per row (two GEMMs).
//! Backward: du = dy·Wd[e]ᵀ;  dWd[e] += uᵀ·dy;  da = du ⊙ act'(a) (2·relu(a), or [a > 0]);
//!   dWu[e] += x_eᵀ·da;  dx_e = da·Wu[e]ᵀ.
//! Reports `act_sparsity`: the fraction of a ≤ 0 (activations that are exactly zero). CPU only.

use pith_plugin_api::{
    kit, parse_config, register, DType, Device, Experts, ExpertsOut, Host, Init, ModelDims, ParamSpec, Result, Tensor,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("relu2");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_variant")]
    variant: String,
}
fn default_variant() -> String {
    "relu2".into()
}

struct Relu2 {
    hidden: usize,
    /// This rank's experts (`ModelDims::local_experts`).
    experts: usize,
    ffn: usize,
    squared: bool,
}

fn create(config: &str, dims: ModelDims) -> Result<Relu2> {
    let c: Config = parse_config(config)?;
    let squared = match c.variant.as_str() {
        "relu2" => true,
        "relu" => false,
        v => return Err(format!("`variant` = \"{v}\"; valid: \"relu2\" (squared ReLU), \"relu\"")),
    };
    let (hidden, experts, ffn) = (dims.hidden as usize, dims.local_experts as usize, dims.expert_ffn as usize);
    if hidden == 0 || experts == 0 || ffn == 0 {
        return Err("model.hidden, the local experts and model.expert_ffn must all be at least 1".into());
    }
    Ok(Relu2 { hidden, experts, ffn, squared })
}

register!(
    Experts,
    "relu2",
    "squared-ReLU experts relu(x·Wu)²·Wd (Primer), no gate matrix",
    "[experts]\nplugin = \"relu2\"\nvariant = \"relu2\"",
    create
);

impl Relu2 {
    fn check(&self, h: &Host, p: &[Tensor], x: &Tensor, offsets: &Tensor) -> Result<()> {
        kit::require_cpu(h, "relu2")?;
        if p.len() != 2 || x.dims().len() != 2 || x.dim(1) != self.hidden {
            return Err(format!("relu2: expected 2 parameters and x [N,{}]", self.hidden));
        }
        if offsets.dtype != DType::I32 || offsets.device != Device::Cpu || offsets.numel() != self.experts + 1 {
            return Err(format!("relu2: offsets must be {} i32 on the host", self.experts + 1));
        }
        Ok(())
    }
}

impl Experts for Relu2 {
    fn params(&self) -> Vec<ParamSpec> {
        let (e, h, f) = (self.experts, self.hidden, self.ffn);
        vec![
            ParamSpec::new("w_up", &[e, h, f], Init::Normal(0.02), true),
            ParamSpec::new("w_down", &[e, f, h], Init::Normal(0.02), true),
        ]
    }

    fn flops(&self, rows: &[u64]) -> f64 {
        4.0 * (self.hidden * self.ffn) as f64 * rows.iter().sum::<u64>() as f64
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor, offsets: Tensor) -> Result<ExpertsOut> {
        self.check(&h, p, &x, &offsets)?;
        let n = x.dim(0);
        let (a, u) = (h.alloc_f32(&[n, self.ffn])?, h.alloc_f32(&[n, self.ffn])?);
        h.grouped_gemm(x, p[0], a, offsets, false, false)?;
        let mut zeros = 0usize;
        // SAFETY: u is this call's own allocation.
        for (ui, &ai) in unsafe { u.f32s_mut() }.iter_mut().zip(a.f32s()) {
            let r = ai.max(0.0);
            zeros += (ai <= 0.0) as usize;
            *ui = if self.squared { r * r } else { r };
        }
        if n > 0 {
            h.metric("act_sparsity", zeros as f64 / (n * self.ffn) as f64);
        }
        let y = h.alloc_f32(&[n, self.hidden])?;
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
        self.check(&h, p, &x, &offsets)?;
        let ([gu, gd], [a, u]) = (g, &out.saved[..]) else {
            return Err("relu2: expected 2 grads and the 2 tensors forward saved".into());
        };
        let n = x.dim(0);
        let (du, da) = (h.alloc_f32(&[n, self.ffn])?, h.alloc_f32(&[n, self.ffn])?);
        h.grouped_gemm(dy, p[1], du, offsets, true, false)?;
        h.grouped_gemm_wgrad(*u, dy, *gd, offsets)?;
        // SAFETY: da is this call's own allocation.
        for ((d, &ai), &dui) in unsafe { da.f32s_mut() }.iter_mut().zip(a.f32s()).zip(du.f32s()) {
            let slope = if ai <= 0.0 {
                0.0
            } else if self.squared {
                2.0 * ai
            } else {
                1.0
            };
            *d = dui * slope;
        }
        h.grouped_gemm_wgrad(x, da, *gu, offsets)?;
        h.grouped_gemm(da, p[0], dx, offsets, true, false)
    }
}
