//! `switch-aux`: the Switch Transformer / GShard load-balancing loss.
//!
//! For logits [T,E] and the chosen ids [T,k]:
//!   f_e = (assignments to e) / (T·k);  P_e = (1/T)·Σ_t p_te, p = softmax(logits);
//!   loss = coef · E · Σ_e f_e·P_e   (= coef when routing is perfectly uniform).
//! Backward (f is a count, so constant): with c_e = coef·E·f_e / T = ∂loss/∂p_te,
//!   d_logits_t += scale · p_t ⊙ (c − ⟨c, p_t⟩).
//!
//! CUDA (kernels/switch_aux.cu): `switch_aux_count` counts assignments (integer atomics, exact),
//! `switch_aux_fwd` / `switch_aux_bwd` work on one token row per warp, `switch_aux_sum` adds
//! the rows' ⟨c, p_t⟩ in a fixed order and reports ids outside 0..E (forward only).

use crate::{check_ids, expect, grid, ints, parse_coef, softmax, BLOCK};
use pith_plugin_api::{register, Arg, BalanceLoss, DType, Device, Host, ModelDims, Result, Tensor};

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
    /// Check logits [T,E] f32 and ids [T,k] i32 on `dev`; returns (T, k, c_e / count_e).
    fn check(&self, dev: Device, logits: &Tensor, ids: &Tensor) -> Result<(usize, usize, f32)> {
        let e = self.experts;
        expect(logits, DType::F32, dev, &[0, e], "switch-aux: logits")?;
        let t = logits.dim(0);
        expect(ids, DType::I32, dev, &[t, 0], "switch-aux: ids")?;
        let k = ids.dim(1);
        Ok((t, k, self.coef * e as f32 / ((t * k).max(1) as f32 * t.max(1) as f32)))
    }

    /// On the device: the assignment counts [E+1] (the last counts ids outside 0..E).
    fn counts_cuda(&self, h: &Host, ids: &Tensor) -> Result<Tensor> {
        let (n, e) = (ids.numel(), self.experts);
        let counts = h.alloc(&[e + 1], DType::I32)?;
        let [n32, e32] = ints([n, e]);
        h.launch(SRC, "switch_aux_count", grid(n, 256), BLOCK, 0, &[ids.arg(), counts.arg(), n32, e32])?;
        Ok(counts)
    }

    /// Softmax of every row, and c_e = ∂loss/∂p_te (the same for every token).
    fn probs_and_c(&self, logits: &Tensor, ids: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
        let e = self.experts;
        let (t, k, scale) = self.check(Device::Cpu, logits, ids)?;
        let id = ids.i32s();
        check_ids(id, k, e, WHO)?;
        let mut c = vec![0.0f32; e];
        id.iter().for_each(|&i| c[i as usize] += 1.0);
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
        match h.device() {
            Device::Cpu => {
                let (p, c) = self.probs_and_c(&logits, &ids)?;
                // Σ_t Σ_e c_e·p_te = coef·E·Σ_e f_e·P_e.
                let loss: f64 =
                    p.chunks(self.experts).flat_map(|pt| pt.iter().zip(&c)).map(|(&a, &b)| a as f64 * b as f64).sum();
                Ok(loss as f32)
            }
            Device::Cuda => {
                let (t, _, cscale) = self.check(Device::Cuda, &logits, &ids)?;
                let (e, counts) = (self.experts, self.counts_cuda(&h, &ids)?);
                let (row_loss, out) = (h.alloc_f32(&[t])?, h.alloc_f32(&[2])?);
                let [t32, e32] = ints([t, e]);
                let args = [logits.arg(), counts.arg(), row_loss.arg(), t32, e32, Arg::F32(cscale)];
                h.launch(SRC, "switch_aux_fwd", grid(t, 8), BLOCK, 0, &args)?;
                h.launch(
                    SRC,
                    "switch_aux_sum",
                    [1, 1, 1],
                    BLOCK,
                    0,
                    &[row_loss.arg(), counts.arg(), out.arg(), t32, e32],
                )?;
                let (loss, bad) = match h.read_f32(out)?[..] {
                    [loss, bad] => (loss, bad),
                    _ => return Err(format!("{WHO}: reading the loss back")),
                };
                if bad != 0.0 {
                    return Err(format!("{WHO}: {bad} of the ids are not experts of the model; ids must be in 0..{e}"));
                }
                Ok(loss)
            }
        }
    }

    fn backward(&self, h: Host, logits: Tensor, ids: Tensor, scale: f32, d_logits: Tensor) -> Result<()> {
        match h.device() {
            Device::Cpu => {
                let (p, c) = self.probs_and_c(&logits, &ids)?;
                expect(&d_logits, DType::F32, Device::Cpu, &logits.dims(), "switch-aux: d_logits")?;
                // SAFETY: d_logits is the output; the host passes it apart from logits.
                let dl = unsafe { d_logits.f32s_mut() };
                for (pt, dt) in p.chunks(self.experts).zip(dl.chunks_mut(self.experts)) {
                    let dot: f32 = pt.iter().zip(&c).map(|(a, b)| a * b).sum();
                    for ((d, &pe), &ce) in dt.iter_mut().zip(pt).zip(&c) {
                        *d += scale * pe * (ce - dot);
                    }
                }
            }
            Device::Cuda => {
                let (t, _, cscale) = self.check(Device::Cuda, &logits, &ids)?;
                expect(&d_logits, DType::F32, Device::Cuda, &logits.dims(), "switch-aux: d_logits")?;
                let counts = self.counts_cuda(&h, &ids)?;
                let [t32, e32] = ints([t, self.experts]);
                let args = [logits.arg(), counts.arg(), d_logits.arg(), t32, e32, Arg::F32(cscale), Arg::F32(scale)];
                h.launch(SRC, "switch_aux_bwd", grid(t, 8), BLOCK, 0, &args)?;
            }
        }
        Ok(())
    }
}
