//! `z-loss`: keeps router logits small (ST-MoE).
//!
//! For logits [T,E], with lse_t = logsumexp(logits_t) and p_t = softmax(logits_t):
//!   loss = coef · (1/T)·Σ_t lse_t²;   d_logits_t += scale · coef · 2·lse_t·p_t / T.

use crate::{expect, need_cpu, parse_coef, softmax};
use pith_plugin_api::{register, BalanceLoss, DType, Host, ModelDims, Result, Tensor};

struct ZLoss {
    experts: usize,
    coef: f32,
}

fn create(config: &str, dims: ModelDims) -> Result<ZLoss> {
    Ok(ZLoss { experts: dims.experts as usize, coef: parse_coef(config, 0.001)? })
}

register!(
    BalanceLoss,
    "z-loss",
    "router z-loss coef·mean_t logsumexp(logits_t)²",
    "[[balance_loss]]\nplugin = \"z-loss\"\ncoef = 0.001",
    create
);

const WHO: &str = "z-loss";

impl BalanceLoss for ZLoss {
    fn forward(&self, h: Host, logits: Tensor, _ids: Tensor) -> Result<f32> {
        need_cpu(&h, WHO)?;
        expect(&logits, DType::F32, &[0, self.experts], "z-loss: logits")?;
        let t = logits.dim(0).max(1) as f64;
        let mut p = vec![0.0f32; self.experts];
        let sum: f64 = logits.f32s().chunks(self.experts).map(|row| (softmax(row, &mut p) as f64).powi(2)).sum();
        Ok((self.coef as f64 * sum / t) as f32)
    }

    fn backward(&self, h: Host, logits: Tensor, _ids: Tensor, scale: f32, d_logits: Tensor) -> Result<()> {
        need_cpu(&h, WHO)?;
        expect(&logits, DType::F32, &[0, self.experts], "z-loss: logits")?;
        expect(&d_logits, DType::F32, &logits.dims(), "z-loss: d_logits")?;
        let c = scale * self.coef * 2.0 / logits.dim(0).max(1) as f32;
        let mut p = vec![0.0f32; self.experts];
        for (row, d) in logits.f32s().chunks(self.experts).zip(d_logits.f32s().chunks_mut(self.experts)) {
            let lse = softmax(row, &mut p);
            d.iter_mut().zip(&p).for_each(|(d, &pe)| *d += c * lse * pe);
        }
        Ok(())
    }
}
