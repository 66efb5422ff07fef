//! `{{name}}`: an experts plugin for Pith (scaffolded by `pith plugins new --kind experts`).
//!
//! Math, per expert e on its rows x_e (rows arrive sorted by expert, `offsets` [E+1]):
//! a = x_e·W_in[e], u = relu(a)², y = u·W_out[e]   (a squared-ReLU MLP).
//! Backward: dW_out += uᵀ·dy; du = dy·W_outᵀ; da = du ⊙ 2·relu(a); dW_in += xᵀ·da; dx = da·W_inᵀ.
//! Check it with `pith plugins check {{name}}`; select it with `[experts] plugin = "{{name}}"`.

use pith_plugin_api::{parse_config, register, Experts, ExpertsOut, Host, Init, ModelDims, ParamSpec, Result, Tensor};
use serde::Deserialize;

pith_plugin_api::export_plugin!("{{name}}");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {}

struct MyExperts {
    hidden: usize,
    experts: usize,
    ffn: usize,
}

fn create(config: &str, dims: ModelDims) -> Result<MyExperts> {
    let _: Config = parse_config(config)?;
    Ok(MyExperts { hidden: dims.hidden as usize, experts: dims.experts as usize, ffn: dims.expert_ffn as usize })
}

register!(Experts, "{{name}}", "squared-ReLU expert MLPs (scaffolded; edit me)", "[experts]\nplugin = \"{{name}}\"", create);

impl Experts for MyExperts {
    fn params(&self) -> Vec<ParamSpec> {
        let (e, h, f) = (self.experts, self.hidden, self.ffn);
        vec![
            ParamSpec::new("w_in", &[e, h, f], Init::Normal(0.02), true),
            ParamSpec::new("w_out", &[e, f, h], Init::Normal(0.02), true),
        ]
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor, offsets: Tensor) -> Result<ExpertsOut> {
        let n = x.dim(0);
        let a = h.alloc_f32(&[n, self.ffn])?;
        h.grouped_gemm(x, p[0], a, offsets, false, false)?;
        let u = h.alloc_f32(&[n, self.ffn])?;
        // Writes go through f32s_mut, which is unsafe: no other slice of `u` may be alive
        // meanwhile (it is this call's own fresh allocation).
        for (u, a) in unsafe { u.f32s_mut() }.iter_mut().zip(a.f32s()) {
            *u = a.max(0.0) * a.max(0.0);
        }
        let y = h.alloc_f32(&[n, self.hidden])?;
        h.grouped_gemm(u, p[1], y, offsets, false, false)?;
        Ok(ExpertsOut { y, saved: vec![a, u].into() })
    }

    fn backward(
        &self,
        h: Host,
        p: &[Tensor],
        g: &[Tensor],
        x: Tensor,
        offsets: Tensor,
        out: &ExpertsOut,
        dy: Tensor,
        dx: Tensor,
    ) -> Result<()> {
        let (a, u) = (out.saved[0], out.saved[1]);
        h.grouped_gemm_wgrad(u, dy, g[1], offsets)?;
        let da = h.alloc_f32(&[x.dim(0), self.ffn])?;
        h.grouped_gemm(dy, p[1], da, offsets, true, false)?;
        for (d, a) in unsafe { da.f32s_mut() }.iter_mut().zip(a.f32s()) {
            *d *= 2.0 * a.max(0.0);
        }
        h.grouped_gemm_wgrad(x, da, g[0], offsets)?;
        h.grouped_gemm(da, p[0], dx, offsets, true, false)
    }
}
