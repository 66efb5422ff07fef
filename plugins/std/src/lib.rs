//! pith-std: Pith's built-in components, one file each — the `topk-softmax` router, `swiglu`
//! experts, the `switch-aux` and `z-loss` balance losses, the `adamw` optimizer and the `local`
//! (single-rank) and `alltoall` (expert-parallel) comm schedules. The host links this pack statically and reaches it through the
//! same root module a loaded plugin exports.
//!
//! Every component runs on both devices: on `Device::Cpu` plain Rust over f32 host memory (the
//! reference), on `Device::Cuda` the kernels of `kernels/<file>.cu` (one file per component,
//! after the kit's helpers (`plugin-api/kernels/common.cuh`), compiled by the host with NVRTC) plus the
//! host's GEMMs, with bf16 activations and working weights and f32 logits, gates, gradients and
//! optimizer state.

/// A component's CUDA source: the kit's helpers (plugin-api/kernels/common.cuh, `kit::COMMON_CUH`), then kernels/`$file`.
macro_rules! kernel_source {
    ($file:literal) => {
        concat!(include_str!("../../../plugin-api/kernels/common.cuh"), include_str!(concat!("../kernels/", $file)))
    };
}

mod adamw;
mod alltoall;
mod experts;
mod local;
mod router;
mod switch_aux;
mod z_loss;

pith_plugin_api::export_plugin!("pith-std");

use pith_plugin_api::{DType, Device, Result, EMPTY};

/// Threads per block of every std kernel launch (8 warps; the warp-per-row kernels rely on it).
pub(crate) const BLOCK: [u32; 3] = [256, 1, 1];

/// Grid for a grid-stride loop over `n` items, `per_block` of them per block of [`BLOCK`]
/// (at least 1 block, so an empty input is a valid launch; at most 65535).
pub(crate) fn grid(n: usize, per_block: usize) -> [u32; 3] {
    [n.div_ceil(per_block).clamp(1, 65535) as u32, 1, 1]
}

pub(crate) use pith_plugin_api::kit::ints;

/// The dtype of activations and parameter working copies on `device`: f32 on the CPU, bf16 on CUDA.
pub(crate) fn act(device: Device) -> DType {
    match device {
        Device::Cpu => DType::F32,
        Device::Cuda => DType::BF16,
    }
}

pub(crate) use pith_plugin_api::kit::expect;

/// out = softmax(row), computed stably; returns logsumexp(row).
pub(crate) fn softmax(row: &[f32], out: &mut [f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (o, &v) in out.iter_mut().zip(row) {
        *o = (v - max).exp();
        sum += *o;
    }
    out.iter_mut().for_each(|o| *o /= sum);
    max + sum.ln()
}

/// The config of a loss whose only key is `coef` (≥ 0, finite), with its default.
pub(crate) fn parse_coef(config: &str, default: f32) -> Result<f32> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Coef {
        coef: Option<f32>,
    }
    let coef = pith_plugin_api::parse_config::<Coef>(config)?.coef.unwrap_or(default);
    if !(coef.is_finite() && coef >= 0.0) {
        return Err(format!("`coef` = {coef} but it must be a finite number >= 0 (typical: {default})"));
    }
    Ok(coef)
}

/// Check that every id is an expert of the model or EMPTY: `ids` [T,k] in 0..experts or -1.
pub(crate) fn check_ids(ids: &[i32], k: usize, experts: usize, who: &str) -> Result<()> {
    match ids.iter().position(|&i| i != EMPTY && (i < 0 || i as usize >= experts)) {
        None => Ok(()),
        Some(p) => Err(format!(
            "{who}: ids[{}, {}] = {} but the model has {experts} experts; ids must be in 0..{experts} or EMPTY (-1)",
            p / k,
            p % k,
            ids[p]
        )),
    }
}

/// Helpers of the components' unit tests (on the plugin kit's CPU `TestHost`).
#[cfg(test)]
pub(crate) mod testing {
    use pith_plugin_api::{kit::Rng, ModelDims, Tensor};

    /// A model of hidden 6, expert FFN 5 and `experts` experts, all on this rank.
    pub fn dims(experts: u32) -> ModelDims {
        ModelDims { hidden: 6, experts, expert_ffn: 5, layer: 0, layers: 1, first_expert: 0, local_experts: experts }
    }

    /// n standard normal values of stream `seed`, times `scale`.
    pub fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| scale * r.normal()).collect()
    }

    pub fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
    }

    /// Central differences of `loss` over every element of `t` (a CPU f32 tensor the loss reads)
    /// against the analytic `grad`: max error ≤ 1e-2 of the largest derivative.
    pub fn check_grad(what: &str, t: Tensor, grad: &[f32], loss: impl Fn() -> f64) {
        let eps = 1e-2f32;
        let num: Vec<f64> = (0..t.numel())
            .map(|i| {
                // SAFETY: the loss reads t only while no slice from here is alive.
                let at = |v: f32| unsafe { t.f32s_mut()[i] = v };
                let v = t.f32s()[i];
                at(v + eps);
                let up = loss();
                at(v - eps);
                let down = loss();
                at(v);
                (up - down) / (2.0 * eps as f64)
            })
            .collect();
        let big = num.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        let err = num.iter().zip(grad).fold(0.0f64, |m, (n, &g)| m.max((n - g as f64).abs()));
        assert!(err <= 1e-2 * big, "{what}: max error {err} of max |d| {big}\nnumeric {num:?}\nanalytic {grad:?}");
    }
}
