//! `switch-aux`: the Switch Transformer / GShard load-balancing loss, on the router's probs
//! (softmax, sigmoid, ...: whatever the router returns; the router chains d_probs to its logits).
//!
//! For probs p [T,E] and the ids [T,k], of which N are not EMPTY:
//!   f_e = (assignments to e) / N;  P_e = (1/T)·Σ_t p_te;
//!   loss = coef · E · Σ_e f_e·P_e   (= coef when a softmax routing is perfectly uniform).
//! With several ranks the counts (so f) are summed over them first (Megatron's and
//! torchtitan's choice too): the mean of the ranks' losses is then the loss of the global
//! micro-batch, as one rank training on all of it would compute.
//! Backward (f is a count, so constant): d_probs_te += scale · c_e, c_e = coef·E·f_e / T = ∂loss/∂p_te.
//!
//! CUDA (kernels/switch_aux.cu): `switch_aux_count` counts assignments (integer atomics, exact),
//! `switch_aux_coef` turns them into c, `switch_aux_fwd` does ⟨c, p_t⟩ with one warp per token
//! row, `switch_aux_sum` adds the rows in a fixed order into the loss scalar (no wait for the
//! device: ids that are neither experts nor EMPTY are skipped here; on CUDA the comm's dispatch
//! reports them); `switch_aux_bwd` adds scale·c to every row of d_probs.

use crate::{check_ids, expect, grid, ints, parse_coef, BLOCK};
use pith_plugin_api::{
    register, Arg, BalanceLoss, DType, Device, Group, Host, ModelDims, ReduceOp, Result, RouterOut, Tensor, EMPTY,
};

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
const SRC: &str = kernel_source!("switch_aux.cu");

impl SwitchAux {
    /// Check probs [T,E] f32 and ids [T,k] i32 on `dev`; returns T.
    fn check(&self, dev: Device, route: &RouterOut) -> Result<usize> {
        expect(&route.probs, DType::F32, dev, &[0, self.experts], "switch-aux: probs")?;
        let t = route.probs.dim(0);
        expect(&route.ids, DType::I32, dev, &[t, 0], "switch-aux: ids")?;
        Ok(t)
    }

    /// c_e = ∂loss/∂p_te (the same for every token), on the CPU.
    fn c_cpu(&self, h: &Host, route: &RouterOut) -> Result<Vec<f32>> {
        let (t, e, ids) = (self.check(Device::Cpu, route)?, self.experts, route.ids.i32s());
        check_ids(ids, route.ids.dim(1), e, WHO)?;
        let mut c = vec![0.0f32; e];
        ids.iter().filter(|&&i| i != EMPTY).for_each(|&i| c[i as usize] += 1.0);
        if h.size(Group::World) > 1 {
            h.all_reduce(
                Tensor::new(c.as_mut_ptr() as u64, DType::F32, Device::Cpu, &[e]),
                ReduceOp::Sum,
                Group::World,
            )?;
        }
        let n = c.iter().sum::<f32>().max(1.0);
        let scale = self.coef * e as f32 / (n * t.max(1) as f32);
        c.iter_mut().for_each(|v| *v *= scale);
        Ok(c)
    }

    /// c [E] on the device and the count of ids that are neither experts nor EMPTY ([1] i32).
    fn c_cuda(&self, h: &Host, route: &RouterOut) -> Result<(Tensor, Tensor)> {
        let (t, e, ids) = (self.check(Device::Cuda, route)?, self.experts, route.ids);
        let (counts, c) = (h.alloc(&[e + 1], DType::I32)?, h.alloc_uninit(&[e], DType::F32)?);
        let [n32, e32] = ints([ids.numel(), e]);
        h.launch(SRC, "switch_aux_count", grid(ids.numel(), 256), BLOCK, 0, &[ids.arg(), counts.arg(), n32, e32])?;
        if h.size(Group::World) > 1 {
            h.all_reduce(counts, ReduceOp::Sum, Group::World)?;
        }
        let cscale = Arg::F32(self.coef * e as f32 / t.max(1) as f32);
        h.launch(SRC, "switch_aux_coef", [1, 1, 1], BLOCK, 0, &[counts.arg(), c.arg(), e32, cscale])?;
        Ok((c, counts))
    }
}

impl BalanceLoss for SwitchAux {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(coef = self.coef)
    }

    fn forward(&self, h: Host, _p: &[Tensor], route: &RouterOut, loss: Tensor) -> Result<()> {
        let (dev, e) = (h.device(), self.experts);
        expect(&loss, DType::F32, dev, &[1], "switch-aux: loss")?;
        match dev {
            Device::Cpu => {
                let c = self.c_cpu(&h, route)?;
                // Σ_t Σ_e c_e·p_te = coef·E·Σ_e f_e·P_e.
                let rows = route.probs.f32s().chunks(e);
                let v = rows.flat_map(|pt| pt.iter().zip(&c)).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
                // SAFETY: loss is the output, apart from the route.
                unsafe { loss.f32s_mut()[0] += v as f32 };
            }
            Device::Cuda => {
                let ((c, _), t) = (self.c_cuda(&h, route)?, route.probs.dim(0));
                let (row_loss, [t32, e32]) = (h.alloc_uninit(&[t], DType::F32)?, ints([t, e]));
                let args = [route.probs.arg(), c.arg(), row_loss.arg(), t32, e32];
                h.launch(SRC, "switch_aux_fwd", grid(t, 8), BLOCK, 0, &args)?;
                h.launch(SRC, "switch_aux_sum", [1, 1, 1], BLOCK, 0, &[row_loss.arg(), loss.arg(), t32])?;
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
        d_probs: Tensor,
        _d_logits: Tensor,
    ) -> Result<()> {
        let (dev, e) = (h.device(), self.experts);
        expect(&d_probs, DType::F32, dev, &route.probs.dims(), "switch-aux: d_probs")?;
        match dev {
            Device::Cpu => {
                let c = self.c_cpu(&h, route)?;
                // SAFETY: d_probs is the output; the host passes it apart from the route.
                let dp = unsafe { d_probs.f32s_mut() };
                dp.chunks_mut(e).for_each(|row| row.iter_mut().zip(&c).for_each(|(d, &ce)| *d += scale * ce));
            }
            Device::Cuda => {
                let (c, _) = self.c_cuda(&h, route)?;
                let n = d_probs.numel();
                let args = [c.arg(), d_probs.arg(), Arg::I64(n as i64), Arg::I32(e as i32), Arg::F32(scale)];
                h.launch(SRC, "switch_aux_bwd", grid(n, 256), BLOCK, 0, &args)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{dims, randn};
    use pith_plugin_api::kit::{loss_value, TestHost};

    fn route(th: &TestHost, probs: &[f32], ids: &[i32], e: usize) -> RouterOut {
        let (t, k) = (probs.len() / e, ids.len() * e / probs.len());
        RouterOut {
            logits: th.zeros(&[t, e], DType::F32),
            probs: th.tensor_f32(probs, &[t, e]),
            ids: th.tensor_i32(ids, &[t, k]),
            weights: th.zeros(&[t, k], DType::F32),
            saved: Default::default(),
        }
    }

    #[test]
    fn loss_on_probs_skips_empty_slots() {
        let (t, e) = (4, 4);
        let s = create("coef = 0.01", dims(e as u32)).unwrap();
        let th = TestHost::new(t);
        // Uniform probs, balanced ids: coef.
        let uniform = route(&th, &[0.25; 16], &[0, 1, 2, 3, 1, 0, 3, 2], e);
        assert!((loss_value(&s, th.host(), &[], &uniform).unwrap() - 0.01).abs() < 1e-8);
        // Sigmoid-like probs (rows need not sum to 1) and EMPTY slots: N = 5 assignments.
        let probs: Vec<f32> = randn(t * e, 3, 1.0).iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
        let ids = [0, 1, 2, EMPTY, 3, 0, EMPTY, EMPTY];
        let r = route(&th, &probs, &ids, e);
        let count = [2.0, 1.0, 1.0, 1.0];
        let p_mean: Vec<f32> = (0..e).map(|j| (0..t).map(|i| probs[i * e + j]).sum::<f32>() / t as f32).collect();
        let want: f32 = 0.01 * e as f32 * (0..e).map(|j| count[j] / 5.0 * p_mean[j]).sum::<f32>();
        assert!((loss_value(&s, th.host(), &[], &r).unwrap() - want).abs() < 1e-7);
        let acc = th.tensor_f32(&[1.0], &[1]);
        s.forward(th.host(), &[], &r, acc).unwrap();
        assert!((acc.f32s()[0] - 1.0 - want).abs() < 1e-6, "forward accumulates into the loss");
        let (dp, dl) = (th.tensor_f32(&[1.0; 16], &[t, e]), th.zeros(&[t, e], DType::F32));
        s.backward(th.host(), &[], &r, 2.0, dp, dl).unwrap();
        for (i, &v) in dp.f32s().iter().enumerate() {
            let want = 1.0 + 2.0 * 0.01 * e as f32 * count[i % e] / (5.0 * t as f32);
            assert!((v - want).abs() < 1e-7, "d_probs[{i}] = {v}, want {want} (accumulated)");
        }
        assert!(dl.f32s().iter().all(|&v| v == 0.0), "switch-aux leaves d_logits to the router");
        let bad = route(&th, &probs, &[0, 1, 2, -2, 3, 0, 9, 1], e);
        let err = loss_value(&s, th.host(), &[], &bad).unwrap_err();
        assert!(err.contains("ids[1, 1] = -2") && err.contains("EMPTY"), "{err}");
    }
}
