//! pith-std: Pith's built-in components, one file each — the `topk-softmax` router, `swiglu`
//! experts, the `switch-aux` and `z-loss` balance losses, the `adamw` optimizer and the `local`
//! (single-rank) comm schedule. The host links this pack statically and reaches it through the
//! same root module a loaded plugin exports.

mod adamw;
mod experts;
mod local;
mod router;
mod switch_aux;
mod z_loss;

pith_plugin_api::export_plugin!("pith-std");

use pith_plugin_api::{DType, Device, Host, Result, Tensor};

/// The std components compute on host memory; fail clearly on any other device.
pub(crate) fn need_cpu(h: &Host, who: &str) -> Result<()> {
    match h.device() {
        Device::Cpu => Ok(()),
        d => Err(format!("{who}: runs on the CPU backend only (got {d:?})")),
    }
}

/// Fail unless `t` is a CPU tensor of `dtype` with shape `want` (a 0 in `want` matches any size).
pub(crate) fn expect(t: &Tensor, dtype: DType, want: &[usize], what: &str) -> Result<()> {
    let dims = t.dims();
    let fits = dims.len() == want.len() && dims.iter().zip(want).all(|(&d, &w)| w == 0 || d == w);
    if !fits || t.dtype != dtype || t.device != Device::Cpu {
        let want: Vec<String> = want.iter().map(|&w| if w == 0 { "_".into() } else { w.to_string() }).collect();
        return Err(format!(
            "{what}: expected a {dtype:?} CPU tensor of shape [{}], got {:?} {dims:?} on {:?}",
            want.join(", "),
            t.dtype,
            t.device
        ));
    }
    Ok(())
}

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

/// Check that every id is an expert of the model: `ids` [T,k] in 0..experts.
pub(crate) fn check_ids(ids: &[i32], k: usize, experts: usize, who: &str) -> Result<()> {
    match ids.iter().position(|&i| i < 0 || i as usize >= experts) {
        None => Ok(()),
        Some(p) => Err(format!(
            "{who}: ids[{}, {}] = {} but the model has {experts} experts; ids must be in 0..{experts}",
            p / k,
            p % k,
            ids[p]
        )),
    }
}
