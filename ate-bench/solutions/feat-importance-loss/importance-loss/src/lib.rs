//! `importance-loss`: the importance loss of Shazeer et al. 2017 (sparsely-gated MoE), on the
//! router's probabilities (`route.probs`: the softmax of the logits for `topk-softmax`).
//!
//! For probs p [T,E]: Imp_e = Σ_t p_te; μ = (1/E)·Σ_e Imp_e;
//!   CV² = (1/E)·Σ_e (Imp_e − μ)² / μ²;  loss = coef · CV².
//! Backward, exact in p (μ depends on p too; rows need not sum to 1, e.g. a sigmoid router):
//!   ∂CV²/∂Imp_j = 2(Imp_j − μ)/(E·μ²) − 2·CV²/(E·μ), so
//!   d_probs_tj += scale · c_j with c_j = coef · ∂CV²/∂Imp_j; the router chains d_probs to its
//!   logits (d_logits is left alone).
//! Reports `importance_cv2` (CV², without the coefficient). CPU only.

use pith_plugin_api::{
    kit, parse_config, register, BalanceLoss, DType, Device, Host, ModelDims, Result, RouterOut, Tensor,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("importance-loss");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_coef")]
    coef: f32,
}
fn default_coef() -> f32 {
    0.01
}

struct Importance {
    experts: usize,
    coef: f32,
}

fn create(config: &str, dims: ModelDims) -> Result<Importance> {
    let c: Config = parse_config(config)?;
    if !(c.coef.is_finite() && c.coef >= 0.0) {
        return Err(format!("`coef` = {} but it must be a finite number >= 0 (typical: 0.01)", c.coef));
    }
    Ok(Importance { experts: dims.experts as usize, coef: c.coef })
}

register!(
    BalanceLoss,
    "importance-loss",
    "importance loss coef·CV²(Σ_t p_te) (Shazeer et al. 2017)",
    "[[balance_loss]]\nplugin = \"importance-loss\"\ncoef = 0.01",
    create
);

impl Importance {
    /// CV² of the importance, and c_e = ∂loss/∂p_te (the same for every token).
    fn parts(&self, h: &Host, probs: &Tensor) -> Result<(f64, Vec<f32>)> {
        kit::require_cpu(h, "importance-loss")?;
        let e = self.experts;
        if probs.dims().len() != 2 || probs.dim(1) != e || probs.dtype != DType::F32 || probs.device != Device::Cpu {
            return Err(format!(
                "importance-loss: probs must be f32 [T,{e}], got {:?} {:?}",
                probs.dtype,
                probs.dims()
            ));
        }
        let mut imp = vec![0.0f64; e];
        for row in probs.f32s().chunks(e) {
            imp.iter_mut().zip(row).for_each(|(i, &p)| *i += p as f64);
        }
        let mu = imp.iter().sum::<f64>() / e as f64;
        if mu <= 0.0 {
            return Ok((0.0, vec![0.0; e]));
        }
        let cv2 = imp.iter().map(|i| (i - mu) * (i - mu)).sum::<f64>() / e as f64 / (mu * mu);
        let (ef, coef) = (e as f64, self.coef as f64);
        let c = imp.iter().map(|i| (coef * (2.0 * (i - mu) / (ef * mu * mu) - 2.0 * cv2 / (ef * mu))) as f32).collect();
        Ok((cv2, c))
    }
}

impl BalanceLoss for Importance {
    fn forward(&self, h: Host, _p: &[Tensor], route: &RouterOut, loss: Tensor) -> Result<()> {
        let (cv2, _) = self.parts(&h, &route.probs)?;
        h.metric("importance_cv2", cv2);
        // SAFETY: `loss` is this call's output, apart from the route.
        unsafe { loss.f32s_mut()[0] += (self.coef as f64 * cv2) as f32 };
        Ok(())
    }

    fn backward(
        &self,
        h: Host,
        _p: &[Tensor],
        route: &RouterOut,
        scale: f32,
        d_probs: Tensor,
        _d_logits: Tensor,
    ) -> Result<()> {
        let (_, c) = self.parts(&h, &route.probs)?;
        if d_probs.dims() != route.probs.dims() {
            return Err(format!("importance-loss: d_probs is {:?}, probs {:?}", d_probs.dims(), route.probs.dims()));
        }
        // SAFETY: d_probs is the output, apart from the route; nothing else views it.
        let dp = unsafe { d_probs.f32s_mut() };
        dp.chunks_mut(self.experts).for_each(|row| row.iter_mut().zip(&c).for_each(|(d, &ce)| *d += scale * ce));
        Ok(())
    }
}
