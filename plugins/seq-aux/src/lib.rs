//! `seq-aux`: the sequence-wise auxiliary balance loss of DeepSeek-V2 (arXiv:2405.04434, its
//! expert-level balance loss, counted per sequence) and DeepSeek-V3 (arXiv:2412.19437 §2.1.2, the
//! "complementary sequence-wise auxiliary loss", eqs. 17–20): the switch loss taken per sequence
//! instead of over the whole micro-batch, so no single sequence may pile onto a few experts.
//! README.md has the equations, the config key and the commands.
//!
//! The micro-batch's T = B·s router rows are B sequences of s tokens in row-major order
//! (`h.context()`: `batch` × `seq`). For probs p [T,E] and ids [T,k] (k = `ids.dim(1)`), per
//! sequence q (rows q·s .. (q+1)·s):
//!   f_e = E / (k·s) · |{slots of q routed to e}|        (EMPTY slots skipped);
//!   p'_te = p_te / Σ_j p_tj                             (a softmax router's p is p' already);
//!   P_e = (1/s) · Σ_{t∈q} p'_te;
//!   loss = coef · (1/B) · Σ_q Σ_e f_e·P_e               (coef: `coef`, α in the paper, 1e-4).
//! A balanced sequence (every expert k·s/E slots) gives Σ_e f_e·P_e = 1, so loss = coef.
//! Backward: f is a count (constant); per row t of sequence q, with r_t = Σ_j p_tj and
//! φ_t = Σ_i f_i·p'_ti,
//!   ∂loss/∂p_tj = coef / (B·s) · (f_j − φ_t) / r_t   (through the per-token normalisation),
//! ACCUMULATED times `scale` into d_probs; d_logits is left to the router. A row whose probs sum
//! to 0 (or less) is divided by 1 instead of r_t.
//!
//! CUDA (kernels/seq_aux.cu): `seq_aux_count` counts each sequence's slots per expert into a
//! zeroed [B,E] i32 (integer atomics: exact in any order; ids neither in 0..E nor EMPTY are
//! skipped there, the CPU path refuses them), `seq_aux_rows` writes ⟨f_q, p_t⟩ / r_t per row
//! with one warp per row, `seq_aux_sum` adds the rows in a fixed order (double) times
//! coef/(B·s) into the loss scalar — the same value, summed per row instead of per expert —
//! and `seq_aux_bwd` adds the gradient above to d_probs, one warp per row. No float atomics, no
//! host synchronisation.

use pith_plugin_api::{
    kernel_source, parse_config, register, Arg, BalanceLoss, DType, Device, Host, ModelDims, Result, RouterOut, Tensor,
    EMPTY,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("seq-aux");

const WHO: &str = "seq-aux";
/// `coef` when the config leaves it out (DeepSeek-V3's α).
const DEFAULT_COEF: f32 = 1e-4;
/// Threads per block of every launch: 8 warps, one token row each in the row kernels.
const BLOCK: [u32; 3] = [256, 1, 1];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The loss weight α.
    coef: Option<f32>,
}

struct SeqAux {
    experts: usize,
    coef: f32,
}

fn create(config: &str, dims: ModelDims) -> Result<SeqAux> {
    let c: Config = parse_config(config)?;
    let coef = c.coef.unwrap_or(DEFAULT_COEF);
    if !(coef.is_finite() && coef >= 0.0) {
        return Err(format!("`coef` = {coef} but it must be a finite number >= 0 (DeepSeek-V3: {DEFAULT_COEF})"));
    }
    Ok(SeqAux { experts: dims.experts as usize, coef })
}

register!(
    BalanceLoss,
    "seq-aux",
    "DeepSeek-V2/V3 sequence-wise balance loss coef·mean_seq Σ f_e·P_e (f, P per sequence)",
    "[[balance_loss]]\nplugin = \"seq-aux\"\ncoef = 0.0001",
    create
);

fn cuda_source() -> &'static str {
    kernel_source!(include_str!("../kernels/seq_aux.cu"))
}

/// A divisor that is never 0: `v` when positive, else 1 (the row's probs are then all 0 or
/// meaningless, and so is its share).
fn nonzero(v: f32) -> f32 {
    if v > 0.0 {
        v
    } else {
        1.0
    }
}

/// Grid of a row kernel over `t` rows: 8 rows (warps) per block, grid-stride beyond 65535 blocks.
fn rows_grid(t: usize) -> [u32; 3] {
    [t.div_ceil(8).clamp(1, 65535) as u32, 1, 1]
}

use pith_plugin_api::kit::ints;

/// [`kit::expect`], the message led by this component's name.
fn expect(t: &Tensor, dtype: DType, device: Device, want: &[usize], what: &str) -> Result<()> {
    pith_plugin_api::kit::expect(t, dtype, device, want, &format!("{WHO}: {what}"))
}

/// The launch arguments of each kernel, in parameter order (a unit test holds them to the
/// kernels' signatures in kernels/seq_aux.cu).
mod args {
    use super::*;

    /// ids [T,k], counts [B,E]; n = T·k ids, `per_seq` = s·k of them per sequence.
    pub fn count(ids: Tensor, counts: Tensor, n: usize, per_seq: usize, e: usize) -> Vec<Arg> {
        [&[ids.arg(), counts.arg()][..], &ints([n, per_seq, e])].concat()
    }
    /// probs [T,E], counts [B,E] → row [T]; f = counts · fscale.
    pub fn rows(probs: Tensor, counts: Tensor, row: Tensor, [t, e, s]: [usize; 3], fscale: f32) -> Vec<Arg> {
        [&[probs.arg(), counts.arg(), row.arg()][..], &ints([t, e, s]), &[Arg::F32(fscale)]].concat()
    }
    /// loss[0] += Σ row · scale.
    pub fn sum(row: Tensor, loss: Tensor, t: usize, scale: f32) -> Vec<Arg> {
        vec![row.arg(), loss.arg(), Arg::I32(t as i32), Arg::F32(scale)]
    }
    /// d_probs [T,E] += c0 · (f − φ) / r per row.
    pub fn bwd(probs: Tensor, counts: Tensor, dp: Tensor, [t, e, s]: [usize; 3], fscale: f32, c0: f32) -> Vec<Arg> {
        [&[probs.arg(), counts.arg(), dp.arg()][..], &ints([t, e, s]), &[Arg::F32(fscale), Arg::F32(c0)]].concat()
    }
}

/// The micro-batch's layout: B sequences of s rows, k slots per row.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Layout {
    b: usize,
    s: usize,
    k: usize,
}

impl Layout {
    /// f_e = E/(k·s) · count: the factor (0 when there are no slots).
    fn fscale(&self, e: usize) -> f32 {
        match self.k * self.s {
            0 => 0.0,
            n => e as f32 / n as f32,
        }
    }
}

impl SeqAux {
    /// Check the route (probs [T,E] f32, ids [T,k] i32 on `dev`) against the context's batch × seq.
    fn layout(&self, h: &Host, dev: Device, route: &RouterOut) -> Result<Layout> {
        expect(&route.probs, DType::F32, dev, &[0, self.experts], "probs")?;
        let t = route.probs.dim(0);
        expect(&route.ids, DType::I32, dev, &[t, 0], "ids")?;
        let ctx = h.context();
        let (b, s) = (ctx.batch as usize, ctx.seq as usize);
        if t != b * s {
            return Err(format!(
                "{WHO}: the router gave {t} rows but the context says batch {b} × seq {s} = {} rows; the loss needs \
                 every row to belong to one sequence",
                b * s
            ));
        }
        Ok(Layout { b, s, k: route.ids.dim(1) })
    }

    /// f [B,E] on the CPU: E/(k·s) · each sequence's slots per expert. Refuses ids that are
    /// neither an expert nor EMPTY.
    fn f_cpu(&self, l: Layout, ids: &[i32]) -> Result<Vec<f32>> {
        let e = self.experts;
        if let Some(p) = ids.iter().position(|&i| i != EMPTY && (i < 0 || i as usize >= e)) {
            return Err(format!(
                "{WHO}: ids[{}, {}] = {} but the model has {e} experts; ids must be in 0..{e} or EMPTY (-1)",
                p / l.k,
                p % l.k,
                ids[p]
            ));
        }
        let mut count = vec![0u32; l.b * e];
        for (i, &id) in ids.iter().enumerate().filter(|(_, &id)| id != EMPTY) {
            count[i / (l.s * l.k) * e + id as usize] += 1;
        }
        let fscale = l.fscale(e);
        Ok(count.iter().map(|&c| c as f32 * fscale).collect())
    }

    /// Each sequence's slots per expert, [B,E] i32 on the device (recomputed by backward: a
    /// balance loss saves nothing).
    fn counts_cuda(&self, h: &Host, l: Layout, ids: Tensor) -> Result<Tensor> {
        let counts = h.alloc(&[l.b, self.experts], DType::I32)?; // zeroed
        let n = ids.numel();
        let a = args::count(ids, counts, n, l.s * l.k, self.experts);
        h.launch(cuda_source(), "seq_aux_count", pith_plugin_api::kit::grid(n, 256), BLOCK, 0, &a)?;
        Ok(counts)
    }
}

impl BalanceLoss for SeqAux {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(coef = self.coef)
    }

    fn forward(&self, h: Host, _p: &[Tensor], route: &RouterOut, loss: Tensor) -> Result<()> {
        let (dev, e) = (h.device(), self.experts);
        expect(&loss, DType::F32, dev, &[1], "loss")?;
        let l = self.layout(&h, dev, route)?;
        let t = l.b * l.s;
        if t == 0 {
            return Ok(());
        }
        match dev {
            Device::Cpu => {
                let (f, pr) = (self.f_cpu(l, route.ids.i32s())?, route.probs.f32s());
                let mut total = 0.0f64;
                for q in 0..l.b {
                    // P_e = mean over the sequence of the normalised probs.
                    let mut pbar = vec![0.0f64; e];
                    for row in pr[q * l.s * e..(q + 1) * l.s * e].chunks(e) {
                        let r = nonzero(row.iter().sum());
                        pbar.iter_mut().zip(row).for_each(|(a, &p)| *a += (p / r) as f64);
                    }
                    let fq = &f[q * e..(q + 1) * e];
                    total += fq.iter().zip(&pbar).map(|(&f, &p)| f as f64 * p / l.s as f64).sum::<f64>();
                }
                // SAFETY: loss is the output, apart from the route.
                unsafe { loss.f32s_mut()[0] += (self.coef as f64 * total / l.b as f64) as f32 };
            }
            Device::Cuda => {
                let counts = self.counts_cuda(&h, l, route.ids)?;
                let row = h.alloc_uninit(&[t], DType::F32)?;
                let a = args::rows(route.probs, counts, row, [t, e, l.s], l.fscale(e));
                h.launch(cuda_source(), "seq_aux_rows", rows_grid(t), BLOCK, 0, &a)?;
                let scale = self.coef / (l.b * l.s) as f32;
                h.launch(cuda_source(), "seq_aux_sum", [1, 1, 1], BLOCK, 0, &args::sum(row, loss, t, scale))?;
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
        let l = self.layout(&h, dev, route)?;
        let t = l.b * l.s;
        expect(&d_probs, DType::F32, dev, &[t, e], "d_probs")?;
        if t == 0 {
            return Ok(());
        }
        // ∂loss/∂p_tj = c0 · (f_j − φ_t) / r_t.
        let c0 = scale * self.coef / (l.b * l.s) as f32;
        match dev {
            Device::Cpu => {
                let (f, pr) = (self.f_cpu(l, route.ids.i32s())?, route.probs.f32s());
                // SAFETY: d_probs is the output; the host passes it apart from the route.
                let dp = unsafe { d_probs.f32s_mut() };
                for (i, (row, d)) in pr.chunks(e).zip(dp.chunks_mut(e)).enumerate() {
                    let fq = &f[i / l.s * e..(i / l.s + 1) * e];
                    let r = nonzero(row.iter().sum());
                    let phi = fq.iter().zip(row).map(|(&f, &p)| f * p).sum::<f32>() / r;
                    let c = c0 / r;
                    d.iter_mut().zip(fq).for_each(|(d, &fj)| *d += c * (fj - phi));
                }
            }
            Device::Cuda => {
                let counts = self.counts_cuda(&h, l, route.ids)?;
                let a = args::bwd(route.probs, counts, d_probs, [t, e, l.s], l.fscale(e), c0);
                h.launch(cuda_source(), "seq_aux_bwd", rows_grid(t), BLOCK, 0, &a)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
