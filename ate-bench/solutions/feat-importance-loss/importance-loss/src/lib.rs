//! `importance-loss`: the importance loss of Shazeer et al. 2017 (sparsely-gated MoE).
//!
//! For logits [T,E]: p = softmax(logits); Imp_e = Σ_t p_te; μ = (1/E)·Σ_e Imp_e (= T/E);
//!   CV² = (1/E)·Σ_e (Imp_e − μ)² / μ²;  loss = coef · CV².
//! Backward: Σ_e Imp_e = T is constant, so ∂CV²/∂Imp_e = 2(Imp_e − μ)/(E·μ²) = c_e/coef, and
//!   d_logits_t += scale · p_t ⊙ (c − ⟨c, p_t⟩).
//! Reports `importance_cv2` (CV², without the coefficient).

use pith_plugin_api::{parse_config, register, BalanceLoss, Host, ModelDims, Result, Tensor};
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
    /// Softmax rows, CV², and c_e = ∂loss/∂p_te.
    fn parts(&self, logits: &Tensor) -> Result<(Vec<f32>, f64, Vec<f32>)> {
        let e = self.experts;
        if logits.dims().len() != 2 || logits.dim(1) != e {
            return Err(format!("importance-loss: logits must be [T,{e}], got {:?}", logits.dims()));
        }
        let mut p = logits.f32s().to_vec();
        let mut imp = vec![0.0f64; e];
        for row in p.chunks_mut(e) {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            row.iter_mut().for_each(|v| *v = (*v - max).exp());
            let s: f32 = row.iter().sum();
            row.iter_mut().zip(imp.iter_mut()).for_each(|(v, i)| {
                *v /= s;
                *i += *v as f64;
            });
        }
        let mu = imp.iter().sum::<f64>() / e as f64;
        if mu <= 0.0 {
            return Ok((p, 0.0, vec![0.0; e]));
        }
        let cv2 = imp.iter().map(|i| (i - mu) * (i - mu)).sum::<f64>() / e as f64 / (mu * mu);
        let c = imp.iter().map(|i| (self.coef as f64 * 2.0 * (i - mu) / (e as f64 * mu * mu)) as f32).collect();
        Ok((p, cv2, c))
    }
}

impl BalanceLoss for Importance {
    fn forward(&self, h: Host, logits: Tensor, _ids: Tensor) -> Result<f32> {
        let (_, cv2, _) = self.parts(&logits)?;
        h.metric("importance_cv2", cv2);
        Ok((self.coef as f64 * cv2) as f32)
    }

    fn backward(&self, _h: Host, logits: Tensor, _ids: Tensor, scale: f32, d_logits: Tensor) -> Result<()> {
        let (p, _, c) = self.parts(&logits)?;
        let e = self.experts;
        // SAFETY: d_logits is the output, apart from logits; nothing else views it.
        let dl = unsafe { d_logits.f32s_mut() };
        for (pt, dt) in p.chunks(e).zip(dl.chunks_mut(e)) {
            let dot: f32 = pt.iter().zip(&c).map(|(a, b)| a * b).sum();
            for ((d, &pe), &ce) in dt.iter_mut().zip(pt).zip(&c) {
                *d += scale * pe * (ce - dot);
            }
        }
        Ok(())
    }
}
