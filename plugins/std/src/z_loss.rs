//! `z-loss`: keeps router logits small (ST-MoE).
//!
//! On the router's raw logits [T,E] (whatever its probs are), with lse_t = logsumexp(logits_t)
//! and p_t = softmax(logits_t):
//!   loss = coef · (1/T)·Σ_t lse_t²;   d_logits_t += scale · coef · 2·lse_t·p_t / T.
//!
//! CUDA (kernels/z_loss.cu): `z_loss_fwd` / `z_loss_bwd` work on one token row per warp,
//! `z_loss_sum` adds the rows' lse_t² in a fixed order.

use crate::{expect, grid, ints, parse_coef, softmax, BLOCK};
use pith_plugin_api::{register, Arg, BalanceLoss, DType, Device, Host, ModelDims, Result, RouterOut, Tensor};

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

const SRC: &str = kernel_source!("z_loss.cu");

impl BalanceLoss for ZLoss {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(coef = self.coef)
    }

    fn forward(&self, h: Host, _p: &[Tensor], route: &RouterOut, loss: Tensor) -> Result<()> {
        let (dev, logits) = (h.device(), route.logits);
        expect(&logits, DType::F32, dev, &[0, self.experts], "z-loss: logits")?;
        expect(&loss, DType::F32, dev, &[1], "z-loss: loss")?;
        let scale = self.coef as f64 / logits.dim(0).max(1) as f64;
        match dev {
            Device::Cpu => {
                let mut p = vec![0.0f32; self.experts];
                let rows = logits.f32s().chunks(self.experts);
                let sum: f64 = rows.map(|row| (softmax(row, &mut p) as f64).powi(2)).sum();
                // SAFETY: loss is the output, apart from the route.
                unsafe { loss.f32s_mut()[0] += (scale * sum) as f32 };
            }
            Device::Cuda => {
                let rows = logits.dim(0);
                let (lse2, [t32, e32]) = (h.alloc_f32(&[rows])?, ints([rows, self.experts]));
                h.launch(SRC, "z_loss_fwd", grid(rows, 8), BLOCK, 0, &[logits.arg(), lse2.arg(), t32, e32])?;
                let args = [lse2.arg(), loss.arg(), t32, Arg::F32(scale as f32)];
                h.launch(SRC, "z_loss_sum", [1, 1, 1], BLOCK, 0, &args)?;
            }
        }
        Ok(())
    }

    fn backward(
        &self,
        h: Host,
        _p: &[Tensor],
        route: &RouterOut,
        scale: f32,
        _d_probs: Tensor,
        d_logits: Tensor,
    ) -> Result<()> {
        let (dev, logits) = (h.device(), route.logits);
        expect(&logits, DType::F32, dev, &[0, self.experts], "z-loss: logits")?;
        expect(&d_logits, DType::F32, dev, &logits.dims(), "z-loss: d_logits")?;
        let c = scale * self.coef * 2.0 / logits.dim(0).max(1) as f32;
        match dev {
            Device::Cpu => {
                let mut p = vec![0.0f32; self.experts];
                // SAFETY: d_logits is the output; the host passes it apart from logits.
                let dl = unsafe { d_logits.f32s_mut() };
                for (row, d) in logits.f32s().chunks(self.experts).zip(dl.chunks_mut(self.experts)) {
                    let lse = softmax(row, &mut p);
                    d.iter_mut().zip(&p).for_each(|(d, &pe)| *d += c * lse * pe);
                }
            }
            Device::Cuda => {
                let rows = logits.dim(0);
                let [t32, e32] = ints([rows, self.experts]);
                let args = [logits.arg(), d_logits.arg(), t32, e32, Arg::F32(c)];
                h.launch(SRC, "z_loss_bwd", grid(rows, 8), BLOCK, 0, &args)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, dims};
    use pith_plugin_api::kit::{loss_value, TestHost};

    #[test]
    fn value_and_gradient_on_the_logits() {
        let (t, e) = (4, 5);
        let z = create("coef = 0.5", dims(e as u32)).unwrap();
        let data = TestHost::new(t);
        let route = |logits: Tensor| RouterOut {
            logits,
            probs: data.zeros(&[t, e], DType::F32),
            ids: data.zeros(&[t, 2], DType::I32),
            weights: data.zeros(&[t, 2], DType::F32),
            saved: Default::default(),
        };
        // Zero logits: lse = ln E on every row.
        let r0 = route(data.zeros(&[t, e], DType::F32));
        let want = 0.5 * (e as f32).ln().powi(2);
        assert!((loss_value(&z, data.host(), &[], &r0).unwrap() - want).abs() < 1e-6);
        let r = route(data.tensor_f32(&crate::testing::randn(t * e, 7, 2.0), &[t, e]));
        let loss = || loss_value(&z, TestHost::new(t).host(), &[], &r).unwrap() as f64 * 3.0;
        let (dp, dl) = (data.zeros(&[t, e], DType::F32), data.zeros(&[t, e], DType::F32));
        z.backward(data.host(), &[], &r, 3.0, dp, dl).unwrap();
        assert!(dp.f32s().iter().all(|&v| v == 0.0), "z-loss leaves d_probs alone");
        check_grad("d_logits", r.logits, dl.f32s(), loss);
    }
}
