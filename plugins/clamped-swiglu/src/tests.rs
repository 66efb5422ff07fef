//! Unit tests on the plugin kit's CPU `TestHost`: the forward against a per-row evaluation of the
//! formula (clamps active), the backward against finite differences (every parameter, local
//! experts, an empty group, the WRITE/ACCUMULATE contract), and config errors.

use super::*;
use pith_plugin_api::kit::{test_dims, Rng, TestHost};

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| scale * r.normal()).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Random x, offsets `offs` and parameters (scale 0.7, so that with limit 0.5 both clamps cut).
fn case(ex: &ClampedSwiglu, th: &TestHost, n: usize, offs: &[i32]) -> (Tensor, Tensor, Vec<Tensor>) {
    let x = th.tensor_f32(&randn(n * ex.hidden, 1, 1.0), &[n, ex.hidden]);
    let shape = |q: &ParamSpec| q.shape.iter().map(|&d| d as usize).collect::<Vec<_>>();
    let p = ex.params().iter().zip(2..).map(|(q, s)| th.tensor_f32(&randn(q.numel(), s, 0.7), &shape(q))).collect();
    (x, th.tensor_i32(offs, &[offs.len()]), p)
}

#[test]
fn forward_is_gpt_oss_expert_per_row() {
    let (n, hd, f) = (5, 4, 3);
    let ex = create("limit = 0.5", test_dims(hd, 2, f)).unwrap();
    let th = TestHost::new(n);
    let (x, offsets, p) = case(&ex, &th, n, &[0, 2, 5]);
    let y = ex.forward(th.host(), &p, x, offsets).unwrap().y;
    let (w, xv) = (|i: usize| p[i].f32s(), x.f32s());
    let (mut clamped_a, mut clamped_b) = (0, 0);
    for r in 0..n {
        let e = if r < 2 { 0 } else { 1 };
        let proj = |m: usize, b: usize, j: usize| {
            (0..hd).map(|k| xv[r * hd + k] * w(m)[(e * hd + k) * f + j]).sum::<f32>() + w(b)[e * f + j]
        };
        let u: Vec<f32> = (0..f)
            .map(|j| {
                let (a, b) = (proj(0, 3, j), proj(1, 4, j));
                clamped_a += (a > 0.5) as usize;
                clamped_b += (b.abs() > 0.5) as usize;
                let (a, b) = (a.min(0.5), b.clamp(-0.5, 0.5));
                (b + 1.0) * a / (1.0 + (-1.702 * a).exp())
            })
            .collect();
        for c in 0..hd {
            let want = (0..f).map(|j| u[j] * w(2)[(e * f + j) * hd + c]).sum::<f32>() + w(5)[e * hd + c];
            let got = y.f32s()[r * hd + c];
            assert!((got - want).abs() < 1e-5, "row {r} col {c}: {got} vs {want}");
        }
    }
    assert!(clamped_a > 0 && clamped_b > 0, "the clamps took part: {clamped_a} {clamped_b}");
}

/// Experts 1 and 2 of 4 on this rank, groups [3, 3] and [0, 6] (an empty one): central
/// differences of L = ⟨c, y⟩ for dx and all six parameters; dx is written (from NaN), the
/// parameter grads accumulate (from 1).
#[test]
fn backward_matches_finite_differences_and_keeps_the_contract() {
    let (n, hd, f) = (6, 5, 4);
    for offs in [[0, 3, 6], [0, 0, 6]] {
        let dims = ModelDims { first_expert: 1, local_experts: 2, ..test_dims(hd, 4, f) };
        let ex = create("limit = 0.5\nalpha = 1.5", dims).unwrap();
        let data = TestHost::new(n);
        let (x, offsets, p) = case(&ex, &data, n, &offs);
        let c = randn(n * hd, 9, 1.0);
        let loss = || dot(&c, ex.forward(TestHost::new(n).host(), &p, x, offsets).unwrap().y.f32s());
        let th = TestHost::new(n);
        let o = ex.forward(th.host(), &p, x, offsets).unwrap();
        let g: Vec<Tensor> = p.iter().map(|q| th.tensor_f32(&vec![1.0; q.numel()], &q.dims())).collect();
        let dx = th.tensor_f32(&vec![f32::NAN; n * hd], &[n, hd]);
        ex.backward(th.host(), &p, &g, x, offsets, &o, th.tensor_f32(&c, &[n, hd]), dx).unwrap();
        let mut checks = vec![("dx".to_string(), x, dx.f32s().to_vec())];
        for (i, (q, g)) in p.iter().zip(&g).enumerate() {
            checks.push((format!("d param {i}"), *q, g.f32s().iter().map(|v| v - 1.0).collect()));
        }
        for (what, t, grad) in checks {
            let eps = 1e-3f32;
            for (i, &g) in grad.iter().enumerate() {
                // SAFETY: the loss reads t only while no slice from here is alive.
                let at = |v: f32| unsafe { t.f32s_mut()[i] = v };
                let v = t.f32s()[i];
                at(v + eps);
                let up = loss();
                at(v - eps);
                let down = loss();
                at(v);
                let num = (up - down) / (2.0 * eps as f64);
                // A clamp's kink within eps of the point makes the difference one-sided: skip it.
                let kink = (g as f64 - num).abs() > 2e-2 * (1.0 + num.abs());
                let recheck = if kink {
                    at(v + eps / 10.0);
                    let up = loss();
                    at(v);
                    (up - loss()) / (eps as f64 / 10.0)
                } else {
                    num
                };
                assert!(
                    (grad[i] as f64 - recheck).abs() <= 2e-2 * (1.0 + recheck.abs()),
                    "{offs:?} {what}[{i}]: {} vs {num}",
                    grad[i]
                );
            }
        }
    }
}

#[test]
fn config_errors_name_the_key() {
    let err = |c: &str| create(c, test_dims(4, 2, 3)).err().unwrap();
    assert!(err("limit = 0.0").contains("`limit` = 0"), "{}", err("limit = 0.0"));
    assert!(err("alpha = nan").contains("`alpha` = NaN"), "{}", err("alpha = nan"));
    assert!(err("ffn = 0").contains("`ffn`"), "{}", err("ffn = 0"));
    assert!(err("gain = 1").contains("gain"), "{}", err("gain = 1"));
    assert_eq!(create("bias = false", test_dims(4, 2, 3)).unwrap().params().len(), 3);
}
