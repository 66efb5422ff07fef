//! `{{name}}`: a balance-loss plugin for Pith (scaffolded by `pith plugins new --kind balance_loss`).
//!
//! Math (Switch Transformer): over T tokens and E experts, f_e = the share of the kept (non-empty)
//! routing slots that chose expert e, P_e = mean_t probs[t,e] (the router's probabilities);
//! loss = coef · E · Σ_e f_e·P_e, smallest when the load is even. f does not depend on the
//! probabilities, so backward: d_probs[t,e] += scale · coef · E · f_e / T (d_logits untouched:
//! the router carries d_probs back to its logits). Records the metric `max_load` = E · max_e f_e.
//! CPU only: on CUDA probs and ids live on the GPU (see plugins/std/src/switch_aux.rs).
//! `cargo test` runs its test; `pith plugins check {{name}}` checks it; select it with
//! `[[balance_loss]] plugin = "{{name}}"`.

use pith_plugin_api::{kit, parse_config, register, BalanceLoss, Host, ModelDims, Result, RouterOut, Tensor, EMPTY};
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
    if !(c.coef >= 0.0 && c.coef.is_finite()) {
        return Err(format!("`coef` = {} must be a finite number >= 0 (typical: 0.01)", c.coef));
    }
    Ok(MyLoss { coef: c.coef })
}

register!(
    BalanceLoss,
    "{{name}}",
    "Switch-style load-balancing loss (scaffolded; edit me)",
    "[[balance_loss]]\nplugin = \"{{name}}\"\ncoef = 0.01",
    create
);

/// f_e: the share of the kept slots routed to each expert (all 0 when every slot is empty).
fn load(route: &RouterOut) -> Result<Vec<f32>> {
    let e = route.probs.dim(1);
    let mut count = vec![0usize; e];
    for &i in route.ids.i32s().iter().filter(|&&i| i != EMPTY) {
        *count.get_mut(i as usize).ok_or_else(|| format!("expert id {i} is outside 0..{e}"))? += 1;
    }
    let kept = count.iter().sum::<usize>().max(1) as f32;
    Ok(count.iter().map(|&c| c as f32 / kept).collect())
}

impl BalanceLoss for MyLoss {
    /// Every setting with its default filled in (`pith config` shows them).
    fn settings(&self) -> String {
        pith_plugin_api::settings!(coef = self.coef)
    }

    /// ACCUMULATES the value into `loss` [1] (the host reads it once per micro-batch).
    fn forward(&self, h: Host, _p: &[Tensor], route: &RouterOut, loss: Tensor) -> Result<()> {
        kit::require_cpu(&h, "{{name}}")?;
        let (t, e) = (route.probs.dim(0), route.probs.dim(1));
        let f = load(route)?;
        let mut mean_p = vec![0f32; e];
        for row in route.probs.f32s().chunks(e) {
            mean_p.iter_mut().zip(row).for_each(|(m, p)| *m += p / t as f32);
        }
        h.metric("max_load", e as f64 * f.iter().copied().fold(0.0, f32::max) as f64);
        let v = self.coef * e as f32 * f.iter().zip(&mean_p).map(|(f, p)| f * p).sum::<f32>();
        // SAFETY: `loss` is this call's output; no other slice of it is alive.
        unsafe { loss.f32s_mut()[0] += v };
        Ok(())
    }

    fn backward(
        &self,
        _h: Host,
        _p: &[Tensor],
        route: &RouterOut,
        scale: f32,
        d_probs: Tensor,
        _d_logits: Tensor,
    ) -> Result<()> {
        let (t, e) = (route.probs.dim(0), route.probs.dim(1));
        let f = load(route)?;
        // Writes go through f32s_mut, which is unsafe: no other slice of d_probs may be alive
        // meanwhile (the host passes it apart from the router's outputs).
        for row in unsafe { d_probs.f32s_mut() }.chunks_mut(e) {
            row.iter_mut().zip(&f).for_each(|(d, f)| *d += scale * self.coef * e as f32 * f / t as f32);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pith_plugin_api::kit::{loss_value, test_dims, TestHost};
    use pith_plugin_api::DType;

    /// Two tokens, two experts, ids [[0, EMPTY], [0, 1]]: 3 kept slots, f = [2/3, 1/3],
    /// P = [0.625, 0.375], loss = 2 · (2/3 · 0.625 + 1/3 · 0.375) = 13/12 with coef 1.
    #[test]
    fn loss_skips_empty_slots_and_backward_accumulates_d_probs() {
        let loss = create("coef = 1.0", test_dims(4, 2, 4)).unwrap();
        let th = TestHost::new(2);
        let h = th.host();
        let probs = th.tensor_f32(&[0.75, 0.25, 0.5, 0.5], &[2, 2]);
        let (ids, weights) =
            (th.tensor_i32(&[0, EMPTY, 0, 1], &[2, 2]), th.tensor_f32(&[0.75, 0.0, 0.5, 0.5], &[2, 2]));
        let route = RouterOut { logits: probs, probs, ids, weights, saved: Vec::new().into() };
        let value = loss_value(&loss, h, &[], &route).unwrap();
        assert!((value - 13.0 / 12.0).abs() < 1e-6, "{value}");
        assert!((th.metrics()["max_load"] - 4.0 / 3.0).abs() < 1e-6);

        // Backward ACCUMULATES scale · ∂loss/∂probs (here onto ones), checked by finite differences.
        let (d_probs, d_logits) = (th.tensor_f32(&[1.0; 4], &[2, 2]), th.zeros(&[2, 2], DType::F32));
        loss.backward(h, &[], &route, 2.0, d_probs, d_logits).unwrap();
        let p0 = route.probs.f32s().to_vec();
        for i in 0..p0.len() {
            let at = |delta: f32| {
                let mut p = p0.clone();
                p[i] += delta;
                loss_value(&loss, h, &[], &RouterOut { probs: th.tensor_f32(&p, &[2, 2]), ..route.clone() }).unwrap()
            };
            let fd = 2.0 * (at(1e-2) - at(-1e-2)) / 2e-2;
            let d = d_probs.f32s()[i] - 1.0;
            assert!((d - fd).abs() < 1e-4, "d_probs[{i}]: backward {d}, finite difference {fd}");
        }
        assert_eq!(d_logits.f32s(), [0.0; 4]);

        let bad = RouterOut { ids: th.tensor_i32(&[0, 2, 0, 1], &[2, 2]), ..route };
        assert!(loss_value(&loss, h, &[], &bad).unwrap_err().contains("expert id 2"));
    }
}
