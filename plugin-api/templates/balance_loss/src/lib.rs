//! `{{name}}`: a balance-loss plugin for Pith (scaffolded by `pith plugins new --kind balance_loss`).
//!
//! Math: p = softmax(logits) [T,E]; loss = coef · E/T · Σ_t Σ_e p_te² (smallest when routing
//! probabilities are spread evenly). Backward: dp = scale · coef · 2E/T · p;
//! d_logits += p ⊙ (dp − Σ_e p·dp).
//! Check it with `pith plugins check {{name}}`; select it with `[[balance_loss]] plugin = "{{name}}"`.

use pith_plugin_api::{parse_config, register, BalanceLoss, Host, ModelDims, Result, Tensor};
use serde::Deserialize;

pith_plugin_api::export_plugin!("{{name}}");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_coef")]
    coef: f32,
}

fn default_coef() -> f32 {
    0.01
}

struct MyLoss {
    coef: f32,
}

fn create(config: &str, _dims: ModelDims) -> Result<MyLoss> {
    let c: Config = parse_config(config)?;
    if !(c.coef >= 0.0) {
        return Err(format!("`coef` = {} must be ≥ 0", c.coef));
    }
    Ok(MyLoss { coef: c.coef })
}

register!(
    BalanceLoss,
    "{{name}}",
    "squared router probabilities (scaffolded; edit me)",
    "[[balance_loss]]\nplugin = \"{{name}}\"\ncoef = 0.01",
    create
);

fn softmax_rows(logits: &[f32], e: usize) -> Vec<f32> {
    let mut p = logits.to_vec();
    for row in p.chunks_mut(e) {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        row.iter_mut().for_each(|v| *v = (*v - max).exp());
        let sum: f32 = row.iter().sum();
        row.iter_mut().for_each(|v| *v /= sum);
    }
    p
}

impl BalanceLoss for MyLoss {
    fn forward(&self, _h: Host, logits: Tensor, _ids: Tensor) -> Result<f32> {
        let (t, e) = (logits.dim(0), logits.dim(1));
        let p = softmax_rows(logits.f32s(), e);
        Ok(self.coef * e as f32 / t as f32 * p.iter().map(|v| v * v).sum::<f32>())
    }

    fn backward(&self, _h: Host, logits: Tensor, _ids: Tensor, scale: f32, d_logits: Tensor) -> Result<()> {
        let (t, e) = (logits.dim(0), logits.dim(1));
        let p = softmax_rows(logits.f32s(), e);
        let c = scale * self.coef * 2.0 * e as f32 / t as f32;
        // Writes go through f32s_mut, which is unsafe: no other slice of d_logits may be alive
        // meanwhile (the host passes it apart from logits).
        let dl = unsafe { d_logits.f32s_mut() };
        for (prow, drow) in p.chunks(e).zip(dl.chunks_mut(e)) {
            let dot: f32 = prow.iter().map(|v| v * c * v).sum();
            for (d, &pv) in drow.iter_mut().zip(prow) {
                *d += pv * (c * pv - dot);
            }
        }
        Ok(())
    }
}
