//! `switch-aux`: the Switch Transformer / GShard load-balancing loss.
//!
//! For logits [T,E] and the chosen ids [T,k]:
//!   f_e = (assignments to e) / (T·k);  P_e = (1/T)·Σ_t p_te, p = softmax(logits);
//!   loss = coef · E · Σ_e f_e·P_e   (= coef when routing is perfectly uniform).
//! Backward (f is a count, so constant): with c_e = coef·E·f_e / T = ∂loss/∂p_te,
//!   d_logits_t += scale · p_t ⊙ (c − ⟨c, p_t⟩).

use crate::{check_ids, expect, need_cpu, parse_coef, softmax};
use pith_plugin_api::{register, BalanceLoss, DType, Host, ModelDims, Result, Tensor};

struct SwitchAux {
    experts: usize,
    coef: f32,
}

fn create(config: &str, dims: ModelDims) -> Result<SwitchAux> {
    Ok(SwitchAux { experts: dims.experts as usize, coef: parse_coef(config, 0.01)? })
}

register!(
    BalanceLoss,
    "switch-aux",
    "Switch/GShard load-balancing loss coef·E·Σ f_e·P_e",
    "[[balance_loss]]\nplugin = \"switch-aux\"\ncoef = 0.01",
    create
);

const WHO: &str = "switch-aux";

impl SwitchAux {
    /// Softmax of every row, and c_e = ∂loss/∂p_te (the same for every token).
    fn probs_and_c(&self, logits: &Tensor, ids: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
        let e = self.experts;
        expect(logits, DType::F32, &[0, e], "switch-aux: logits")?;
        let t = logits.dim(0);
        expect(ids, DType::I32, &[t, 0], "switch-aux: ids")?;
        let (id, k) = (ids.i32s(), ids.dim(1));
        check_ids(id, k, e, WHO)?;
        let mut c = vec![0.0f32; e];
        id.iter().for_each(|&i| c[i as usize] += 1.0);
        let scale = self.coef * e as f32 / ((t * k).max(1) as f32 * t.max(1) as f32);
        c.iter_mut().for_each(|v| *v *= scale);
        let mut p = vec![0.0f32; t * e];
        for (row, out) in logits.f32s().chunks(e).zip(p.chunks_mut(e)) {
            softmax(row, out);
        }
        Ok((p, c))
    }
}

impl BalanceLoss for SwitchAux {
    fn forward(&self, h: Host, logits: Tensor, ids: Tensor) -> Result<f32> {
        need_cpu(&h, WHO)?;
        let (p, c) = self.probs_and_c(&logits, &ids)?;
        // Σ_t Σ_e c_e·p_te = coef·E·Σ_e f_e·P_e.
        let loss: f64 =
            p.chunks(self.experts).flat_map(|pt| pt.iter().zip(&c)).map(|(&a, &b)| a as f64 * b as f64).sum();
        Ok(loss as f32)
    }

    fn backward(&self, h: Host, logits: Tensor, ids: Tensor, scale: f32, d_logits: Tensor) -> Result<()> {
        need_cpu(&h, WHO)?;
        let (p, c) = self.probs_and_c(&logits, &ids)?;
        expect(&d_logits, DType::F32, &logits.dims(), "switch-aux: d_logits")?;
        for (pt, dt) in p.chunks(self.experts).zip(d_logits.f32s().chunks_mut(self.experts)) {
            let dot: f32 = pt.iter().zip(&c).map(|(a, b)| a * b).sum();
            for ((d, &pe), &ce) in dt.iter_mut().zip(pt).zip(&c) {
                *d += scale * pe * (ce - dot);
            }
        }
        Ok(())
    }
}
