//! `{{name}}`: an experts plugin for Pith (scaffolded by `pith plugins new --kind experts`).
//!
//! Math, per local expert e on its rows x_e (rows arrive sorted by expert, `offsets` [E_local+1]):
//! a = x_e·W_in[e], u = relu(a)², y = u·W_out[e]   (a squared-ReLU MLP).
//! Backward: dW_out += uᵀ·dy; du = dy·W_outᵀ; da = du ⊙ 2·relu(a); dW_in += xᵀ·da; dx = da·W_inᵀ.
//! CPU only: on CUDA x is bf16 and the elementwise step is a kernel (see plugins/std/src/experts.rs).
//! `cargo test` runs its test; `pith plugins check {{name}}` checks it; select it with
//! `[experts] plugin = "{{name}}"`.

use pith_plugin_api::{
    kit, parse_config, register, DType, Experts, ExpertsOut, Host, Init, ModelDims, ParamSpec, Result, Tensor,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("{{name}}");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {}

struct MyExperts {
    hidden: usize,
    /// The experts this rank holds (all of them on one rank).
    local: usize,
    ffn: usize,
}

fn create(config: &str, dims: ModelDims) -> Result<MyExperts> {
    let _: Config = parse_config(config)?;
    Ok(MyExperts { hidden: dims.hidden as usize, local: dims.local_experts as usize, ffn: dims.expert_ffn as usize })
}

register!(
    Experts,
    "{{name}}",
    "squared-ReLU expert MLPs (scaffolded; edit me)",
    "[experts]\nplugin = \"{{name}}\"",
    create
);

impl Experts for MyExperts {
    fn params(&self) -> Vec<ParamSpec> {
        let (e, h, f) = (self.local, self.hidden, self.ffn);
        vec![
            ParamSpec::new("w_in", &[e, h, f], Init::Normal(0.02), true),
            ParamSpec::new("w_out", &[e, f, h], Init::Normal(0.02), true),
        ]
    }

    /// Two GEMMs of 2·H·F FLOPs per row.
    fn flops(&self, rows: &[u64]) -> f64 {
        rows.iter().sum::<u64>() as f64 * 4.0 * (self.hidden * self.ffn) as f64
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor, offsets: Tensor) -> Result<ExpertsOut> {
        kit::require_cpu(&h, "{{name}}")?;
        let n = x.dim(0);
        // alloc_uninit: the grouped GEMMs and the loop write every element.
        let a = h.alloc_uninit(&[n, self.ffn], DType::F32)?;
        h.grouped_gemm(x, p[0], a, offsets, false, false)?;
        let u = h.alloc_uninit(&[n, self.ffn], DType::F32)?;
        // Writes go through f32s_mut, which is unsafe: no other slice of `u` may be alive
        // meanwhile (it is this call's own fresh allocation).
        for (u, a) in unsafe { u.f32s_mut() }.iter_mut().zip(a.f32s()) {
            *u = a.max(0.0) * a.max(0.0);
        }
        let y = h.alloc_uninit(&[n, self.hidden], DType::F32)?;
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
        let da = h.alloc_uninit(&[x.dim(0), self.ffn], DType::F32)?;
        h.grouped_gemm(dy, p[1], da, offsets, true, false)?;
        for (d, a) in unsafe { da.f32s_mut() }.iter_mut().zip(a.f32s()) {
            *d *= 2.0 * a.max(0.0);
        }
        h.grouped_gemm_wgrad(x, da, g[0], offsets)?;
        h.grouped_gemm(da, p[0], dx, offsets, true, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pith_plugin_api::kit::{test_dims, TestHost};

    fn values(n: usize, f: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * f).sin()).collect()
    }

    /// y's shape and FLOPs, then dx, dW_in and dW_out against finite differences of ⟨c, y⟩.
    #[test]
    fn forward_shapes_and_backward_matches_finite_differences() {
        let experts = create("", test_dims(3, 2, 4)).unwrap();
        let (n, hd, e, f) = (5, 3, 2, 4);
        assert_eq!(experts.flops(&[2, 3]), (5 * 4 * hd * f) as f64);
        let th = TestHost::new(n);
        let h = th.host();
        let offsets = th.tensor_i32(&[0, 2, 5], &[e + 1]);
        let mut inputs = [values(n * hd, 0.7), values(e * hd * f, 1.3), values(e * f * hd, 0.4)];
        let c = values(n * hd, 2.1);
        let tensors = |v: &[Vec<f32>]| {
            (th.tensor_f32(&v[0], &[n, hd]), [th.tensor_f32(&v[1], &[e, hd, f]), th.tensor_f32(&v[2], &[e, f, hd])])
        };
        let loss = |v: &[Vec<f32>]| {
            let (x, p) = tensors(v);
            let y = experts.forward(h, &p, x, offsets).unwrap().y;
            y.f32s().iter().zip(&c).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
        };

        let (x, p) = tensors(&inputs);
        let out = experts.forward(h, &p, x, offsets).unwrap();
        assert_eq!(out.y.dims(), [n, hd]);
        let grads =
            [th.zeros(&[n, hd], DType::F32), th.zeros(&[e, hd, f], DType::F32), th.zeros(&[e, f, hd], DType::F32)];
        let dy = th.tensor_f32(&c, &[n, hd]);
        experts.backward(h, &p, &grads[1..], x, offsets, &out, dy, grads[0]).unwrap();
        let eps = 1e-3;
        for (which, (what, grad)) in ["dx", "dW_in", "dW_out"].into_iter().zip(grads).enumerate() {
            for i in 0..grad.numel() {
                let v = inputs[which][i];
                inputs[which][i] = v + eps;
                let plus = loss(&inputs);
                inputs[which][i] = v - eps;
                let minus = loss(&inputs);
                inputs[which][i] = v;
                let (fd, an) = ((plus - minus) / (2.0 * eps as f64), grad.f32s()[i] as f64);
                assert!(
                    (fd - an).abs() < 2e-3 * (1.0 + an.abs()),
                    "{what}[{i}]: finite difference {fd}, backward {an}"
                );
            }
        }
    }
}
