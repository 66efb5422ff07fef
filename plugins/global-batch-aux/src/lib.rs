//! `global-batch-aux`: global-batch load balancing (Qiu et al. 2025, "Demons in the Detail: On
//! Implementing Load Balancing Loss for Training Specialized Mixture-of-Expert Models",
//! arXiv:2501.11873, Qwen): the switch loss coef·E·Σ_e f_e·P_e with the expert frequencies f
//! counted over the whole global batch instead of the micro-batch, so a micro-batch of one domain
//! is not pushed to spread its tokens evenly. README.md has the equations, what is exact and what
//! is approximate, the config key and the commands.
//!
//! For probs p [T,E] and ids [T,k] of this micro-batch (EMPTY slots skipped everywhere):
//!   c_e = this micro-batch's assignments to e;
//!   training (`h.context().training`): the accumulator `counts` [E] += c (once per micro-batch,
//!     see `counted` below), then G = `counts` — every micro-batch of this step so far, this one
//!     included — summed over every rank on a COPY (`h.all_reduce(.., World)`;
//!     the host sums the accumulator itself before `end_step`, and zeroes it after);
//!   eval: G = c, summed over every rank (the global micro-batch, as `switch-aux`);
//!   f_e = G_e / Σ_j G_j;   P_e = (1/T)·Σ_t p_te   (this micro-batch, this rank);
//!   loss = coef · E · Σ_e f_e·P_e   (= coef for a uniform softmax routing; `coef` default 0.01).
//! With one micro-batch per step and one rank this is `switch-aux` exactly. With several
//! ranks f is the same on every rank and the host's mean of the ranks' losses is the loss of the
//! global micro-batch. With gradient accumulation micro-batch m sees micro-batches 0..=m of the
//! step: only the last sees the whole global batch (a loss cannot wait for the end of the global
//! batch: backward runs per micro-batch; docs/decisions.md item 12).
//! Backward: f is a count (constant), recomputed exactly as forward left it (the accumulator has
//! not changed since):  d_probs_te += scale · coef·E·f_e / T; d_logits is left to the router.
//!
//! `counted` [1] (an accumulator too) makes the add happen once per micro-batch: forward adds c
//! only when `counted` ≠ m + 1 (m = `h.context().micro_batch`) and then sets it to m + 1, so a
//! second forward of the same micro-batch (`pith plugins check` runs forward many times on one
//! route) does not count it twice, while the host's zeroing after every step re-arms micro-batch
//! 0. Backward computes the same G without writing anything.
//!
//! CUDA (kernels/global_batch_aux.cu): `gba_count` counts c into a zeroed [E] i32 (integer
//! atomics: exact; ids neither in 0..E nor EMPTY are skipped there, the CPU path refuses them),
//! `gba_global` (one block) does the `counted` test, the add and writes G into a fresh [E] that
//! is all-reduced, `gba_coef` (one block) turns G into the per-expert gradient
//! a_e = coef·E·f_e/T (the total in double, fixed order), `gba_rows` writes ⟨a, p_t⟩ per token row
//! (a warp each), `gba_sum` adds the rows in a fixed order into the loss scalar, `gba_bwd` adds
//! scale·a to every row of d_probs. No float atomics and no host synchronisation.

use pith_plugin_api::{
    kernel_source, parse_config, register, Arg, BalanceLoss, DType, Device, Group, Host, ModelDims, ParamSpec,
    ReduceOp, Result, RouterOut, Tensor, EMPTY,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("global-batch-aux");

const WHO: &str = "global-batch-aux";
/// `coef` when the config leaves it out (`switch-aux`'s default).
const DEFAULT_COEF: f32 = 0.01;
/// Threads per block of every launch: 8 warps, one token row each in the row kernel.
const BLOCK: [u32; 3] = [256, 1, 1];
/// Indices of the declared tensors in `p`.
const COUNTS: usize = 0;
const COUNTED: usize = 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The loss weight.
    coef: Option<f32>,
}

struct GlobalBatchAux {
    experts: usize,
    coef: f32,
}

fn create(config: &str, dims: ModelDims) -> Result<GlobalBatchAux> {
    let c: Config = parse_config(config)?;
    let coef = c.coef.unwrap_or(DEFAULT_COEF);
    if !(coef.is_finite() && coef >= 0.0) {
        return Err(format!("`coef` = {coef} but it must be a finite number >= 0 (typical: {DEFAULT_COEF})"));
    }
    Ok(GlobalBatchAux { experts: dims.experts as usize, coef })
}

register!(
    BalanceLoss,
    "global-batch-aux",
    "Qwen global-batch balance loss coef·E·Σ f_e·P_e, f over the global batch so far (micro-batches, ranks)",
    "[[balance_loss]]\nplugin = \"global-batch-aux\"\ncoef = 0.01",
    create
);

fn cuda_source() -> &'static str {
    kernel_source!(include_str!("../kernels/global_batch_aux.cu"))
}

/// Grid of a row kernel over `t` rows: 8 rows (warps) per block, grid-stride beyond 65535 blocks.
fn rows_grid(t: usize) -> [u32; 3] {
    [t.div_ceil(8).clamp(1, 65535) as u32, 1, 1]
}

/// [`kit::expect`], the message led by this component's name.
fn expect(t: &Tensor, dtype: DType, device: Device, want: &[usize], what: &str) -> Result<()> {
    pith_plugin_api::kit::expect(t, dtype, device, want, &format!("{WHO}: {what}"))
}

/// The launch arguments of each kernel, in parameter order (a unit test holds them to the
/// kernels' signatures in kernels/global_batch_aux.cu).
mod args {
    use super::*;

    /// ids (n of them) → own [E] i32.
    pub fn count(ids: Tensor, own: Tensor, n: usize, e: usize) -> Vec<Arg> {
        vec![ids.arg(), own.arg(), Arg::I32(n as i32), Arg::I32(e as i32)]
    }
    /// (counts, counted, own) → g [E]; `m1` = micro-batch + 1; `training` and `commit` as 0/1.
    #[allow(clippy::too_many_arguments)]
    pub fn global(
        counts: Tensor,
        counted: Tensor,
        own: Tensor,
        g: Tensor,
        e: usize,
        m1: f32,
        training: bool,
        commit: bool,
    ) -> Vec<Arg> {
        let ptrs = [counts, counted, own, g].map(|t| t.arg());
        [&ptrs[..], &[Arg::I32(e as i32), Arg::F32(m1), Arg::I32(training as i32), Arg::I32(commit as i32)]].concat()
    }
    /// g [E] → a [E] = g · cscale / Σ g, cscale = coef·E/T.
    pub fn coef(g: Tensor, a: Tensor, e: usize, cscale: f32) -> Vec<Arg> {
        vec![g.arg(), a.arg(), Arg::I32(e as i32), Arg::F32(cscale)]
    }
    /// probs [T,E], a [E] → row [T] = ⟨a, p_t⟩.
    pub fn rows(probs: Tensor, a: Tensor, row: Tensor, t: usize, e: usize) -> Vec<Arg> {
        vec![probs.arg(), a.arg(), row.arg(), Arg::I32(t as i32), Arg::I32(e as i32)]
    }
    /// loss[0] += Σ row.
    pub fn sum(row: Tensor, loss: Tensor, t: usize) -> Vec<Arg> {
        vec![row.arg(), loss.arg(), Arg::I32(t as i32)]
    }
    /// d_probs [T,E] (n elements) += scale · a[e].
    pub fn bwd(a: Tensor, dp: Tensor, n: usize, e: usize, scale: f32) -> Vec<Arg> {
        vec![a.arg(), dp.arg(), Arg::I64(n as i64), Arg::I32(e as i32), Arg::F32(scale)]
    }
}

impl GlobalBatchAux {
    /// Check the declared tensors (counts [E], counted [1], f32 on `dev`) and the route (probs
    /// [T,E] f32, ids [T,k] i32); returns T.
    fn check(&self, dev: Device, p: &[Tensor], route: &RouterOut) -> Result<usize> {
        if p.len() != 2 {
            return Err(format!("{WHO}: expected 2 tensors (counts, counted), got {}", p.len()));
        }
        expect(&p[COUNTS], DType::F32, dev, &[self.experts], "counts")?;
        expect(&p[COUNTED], DType::F32, dev, &[1], "counted")?;
        expect(&route.probs, DType::F32, dev, &[0, self.experts], "probs")?;
        let t = route.probs.dim(0);
        expect(&route.ids, DType::I32, dev, &[t, 0], "ids")?;
        Ok(t)
    }

    /// a_e = ∂loss/∂p_te = coef·E·f_e/T (the same for every token) on the CPU. `commit`: add
    /// this micro-batch's counts to the accumulator (forward) or only compute what forward left
    /// there (backward).
    fn a_cpu(&self, h: &Host, p: &[Tensor], route: &RouterOut, commit: bool) -> Result<Vec<f32>> {
        let (t, e, ids) = (route.probs.dim(0), self.experts, route.ids.i32s());
        if let Some(i) = ids.iter().position(|&i| i != EMPTY && (i < 0 || i as usize >= e)) {
            let k = route.ids.dim(1);
            return Err(format!(
                "{WHO}: ids[{}, {}] = {} but the model has {e} experts; ids must be in 0..{e} or EMPTY (-1)",
                i / k,
                i % k,
                ids[i]
            ));
        }
        let mut g = vec![0.0f32; e];
        ids.iter().filter(|&&i| i != EMPTY).for_each(|&i| g[i as usize] += 1.0);
        let ctx = h.context();
        if ctx.training {
            // SAFETY: the accumulators are this component's own, viewed nowhere else in this call.
            let (counts, counted) = unsafe { (p[COUNTS].f32s_mut(), p[COUNTED].f32s_mut()) };
            let m1 = (ctx.micro_batch + 1) as f32;
            let add = counted[0] != m1; // not counted yet in this micro-batch
            g.iter_mut().zip(counts.iter()).for_each(|(g, &c)| *g = if add { c + *g } else { c });
            if commit && add {
                counts.copy_from_slice(&g);
                counted[0] = m1;
            }
        }
        if h.size(Group::World) > 1 {
            // A copy: the host sums the accumulator itself, before end_step.
            let all = h.alloc_f32(&[e])?;
            // SAFETY: a fresh allocation.
            unsafe { all.f32s_mut() }.copy_from_slice(&g);
            h.all_reduce(all, ReduceOp::Sum, Group::World)?;
            g.copy_from_slice(all.f32s());
        }
        let n = (g.iter().map(|&v| v as f64).sum::<f64>() as f32).max(1.0);
        let per = self.coef * e as f32 / t.max(1) as f32 / n;
        Ok(g.iter().map(|&v| v * per).collect())
    }

    /// The same on the device: a [E] f32 (kernels/global_batch_aux.cu).
    fn a_cuda(&self, h: &Host, p: &[Tensor], route: &RouterOut, commit: bool) -> Result<Tensor> {
        let (t, e, ids) = (route.probs.dim(0), self.experts, route.ids);
        let own = h.alloc(&[e], DType::I32)?; // zeroed
        let n = ids.numel();
        h.launch(
            cuda_source(),
            "gba_count",
            pith_plugin_api::kit::grid(n, 256),
            BLOCK,
            0,
            &args::count(ids, own, n, e),
        )?;
        let ctx = h.context();
        let (g, a) = (h.alloc_uninit(&[e], DType::F32)?, h.alloc_uninit(&[e], DType::F32)?);
        let m1 = (ctx.micro_batch + 1) as f32;
        let gl = args::global(p[COUNTS], p[COUNTED], own, g, e, m1, ctx.training, commit);
        h.launch(cuda_source(), "gba_global", [1, 1, 1], BLOCK, 0, &gl)?;
        if h.size(Group::World) > 1 {
            h.all_reduce(g, ReduceOp::Sum, Group::World)?;
        }
        let cscale = self.coef * e as f32 / t.max(1) as f32;
        h.launch(cuda_source(), "gba_coef", [1, 1, 1], BLOCK, 0, &args::coef(g, a, e, cscale))?;
        Ok(a)
    }
}

impl BalanceLoss for GlobalBatchAux {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(coef = self.coef)
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![
            // This step's assignments per expert, micro-batches so far (summed over the
            // ranks by the host before end_step; zeroed after it).
            ParamSpec::accumulator("counts", &[self.experts]),
            // m + 1 once micro-batch m's assignments are in `counts` (0 at the start of a step).
            ParamSpec::accumulator("counted", &[1]),
        ]
    }

    fn forward(&self, h: Host, p: &[Tensor], route: &RouterOut, loss: Tensor) -> Result<()> {
        let (dev, e) = (h.device(), self.experts);
        let t = self.check(dev, p, route)?;
        expect(&loss, DType::F32, dev, &[1], "loss")?;
        match dev {
            Device::Cpu => {
                let a = self.a_cpu(&h, p, route, true)?;
                // Σ_t Σ_e a_e·p_te = coef·E·Σ_e f_e·P_e.
                let rows = route.probs.f32s().chunks(e);
                let v = rows.flat_map(|pt| pt.iter().zip(&a)).map(|(&p, &a)| p as f64 * a as f64).sum::<f64>();
                // SAFETY: loss is the output, apart from the route and the accumulators.
                unsafe { loss.f32s_mut()[0] += v as f32 };
            }
            Device::Cuda => {
                let a = self.a_cuda(&h, p, route, true)?;
                let row = h.alloc_uninit(&[t], DType::F32)?;
                h.launch(cuda_source(), "gba_rows", rows_grid(t), BLOCK, 0, &args::rows(route.probs, a, row, t, e))?;
                h.launch(cuda_source(), "gba_sum", [1, 1, 1], BLOCK, 0, &args::sum(row, loss, t))?;
            }
        }
        Ok(())
    }

    fn backward(
        &self,
        h: Host,
        p: &[Tensor],
        route: &RouterOut,
        scale: f32,
        d_probs: Tensor,
        _d_logits: Tensor,
    ) -> Result<()> {
        let (dev, e) = (h.device(), self.experts);
        let t = self.check(dev, p, route)?;
        expect(&d_probs, DType::F32, dev, &[t, e], "d_probs")?;
        match dev {
            Device::Cpu => {
                let a = self.a_cpu(&h, p, route, false)?;
                // SAFETY: d_probs is the output; the host passes it apart from the route.
                let dp = unsafe { d_probs.f32s_mut() };
                dp.chunks_mut(e).for_each(|row| row.iter_mut().zip(&a).for_each(|(d, &a)| *d += scale * a));
            }
            Device::Cuda => {
                let a = self.a_cuda(&h, p, route, false)?;
                let n = d_probs.numel();
                h.launch(
                    cuda_source(),
                    "gba_bwd",
                    pith_plugin_api::kit::grid(n, 256),
                    BLOCK,
                    0,
                    &args::bwd(a, d_probs, n, e, scale),
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
