//! Unit tests on the plugin kit's CPU `TestHost`: each expert kind's forward by hand, the backward
//! against finite differences (every kind, empty groups, local expert ranges, the WRITE/ACCUMULATE
//! contract), FLOPs counting only the FFN rows (and the constant experts' two logits), the
//! `ffn_rows_frac` metric, config errors, and the CUDA launches against the kernels' signatures.

use super::*;
use pith_plugin_api::kit::{test_dims, Rng, TestHost, COMMON_CUH};

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| scale * r.normal()).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

fn shape(q: &ParamSpec) -> Vec<usize> {
    q.shape.iter().map(|&d| d as usize).collect()
}

/// Central differences of `loss` over every element of `t` (a CPU f32 tensor the loss reads)
/// against the analytic `grad`: max error ≤ 1e-2 of the largest derivative.
fn check_grad(what: &str, t: Tensor, grad: &[f32], loss: impl Fn() -> f64) {
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

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}\n{got:?}\n{want:?}");
    }
}

#[test]
fn experts_are_laid_out_ffn_constant_copy_zero_and_cut_by_the_local_range() {
    // 8 experts, defaults: ids 0..4 FFN, 4 and 5 constant, 6 copy, 7 zero.
    let m = create("", test_dims(4, 8, 3)).unwrap();
    assert_eq!(m.local, Kinds { ffn: 4, constant: 2, copy: 1, zero: 1 });
    let names: Vec<_> = m.params().iter().map(|p| (p.name.clone(), shape(p))).collect();
    let want = [("w_gate", [4, 4, 3]), ("w_up", [4, 4, 3]), ("w_down", [4, 3, 4])];
    for (i, (n, s)) in want.iter().enumerate() {
        assert_eq!((names[i].0.as_str(), names[i].1.as_slice()), (*n, &s[..]));
    }
    assert_eq!((names[3].0.as_str(), names[3].1.as_slice()), ("w_const", &[2, 2, 4][..]));
    assert_eq!((names[4].0.as_str(), names[4].1.as_slice()), ("v_const", &[2, 4][..]));
    let p = m.params();
    assert!(p[3].decay && !p[4].decay && p[4].init == Init::Normal(1.0) && p[3].init == Init::Normal(0.02));
    // Expert parallelism: each rank's slice of ids by kind.
    let all = Kinds { ffn: 4, constant: 2, copy: 1, zero: 1 };
    assert_eq!(all.local(0, 4), Kinds { ffn: 4, constant: 0, copy: 0, zero: 0 });
    assert_eq!(all.local(4, 4), Kinds { ffn: 0, constant: 2, copy: 1, zero: 1 });
    assert_eq!(all.local(3, 2), Kinds { ffn: 1, constant: 1, copy: 0, zero: 0 });
    assert_eq!(all.local(6, 2), Kinds { ffn: 0, constant: 0, copy: 1, zero: 1 });
    // A rank holding only copy and zero experts declares nothing.
    let dims = ModelDims { first_expert: 6, local_experts: 2, ..test_dims(4, 8, 3) };
    assert!(create("", dims).unwrap().params().is_empty());
    let dims = ModelDims { first_expert: 4, local_experts: 4, ..test_dims(4, 8, 3) };
    let p = create("", dims).unwrap().params();
    assert_eq!(p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["w_const", "v_const"]);
}

/// H = 2, F = 2; 5 experts with `constant = 2`: FFN 0, constant 1 and 2, copy 3, zero 4, a row each.
#[test]
fn each_expert_kind_forward_by_hand() {
    let m = create("zero = 1\ncopy = 1\nconstant = 2\nffn = 2", test_dims(2, 5, 7)).unwrap();
    assert_eq!(m.local, Kinds { ffn: 1, constant: 2, copy: 1, zero: 1 });
    let th = TestHost::new(5);
    let ln3 = 3f32.ln();
    #[rustfmt::skip]
    let x = th.tensor_f32(&[
        1.0, 2.0,  // FFN
        ln3, 5.0,  // constant 0: W_c = [[1, 0], [0, 0]] → s = [ln 3, 0] → α = [3/4, 1/4]
        2.0, 4.0,  // constant 1: W_c = 0 → α = [1/2, 1/2]
        7.0, -1.0, // copy
        3.0, 9.0,  // zero
    ], &[5, 2]);
    let offsets = th.tensor_i32(&[0, 1, 2, 3, 4, 5], &[6]);
    // FFN: Wg = [[1, 0], [0, 1]] → a = [1, 2]; Wu = [[1, 1], [0, 1]] → b = [1, 3];
    // u = [silu(1)·1, silu(2)·3]; Wd = [[1, 0], [0, 2]] → y = [silu(1), 6·silu(2)].
    let wg = th.tensor_f32(&[1., 0., 0., 1.], &[1, 2, 2]);
    let wu = th.tensor_f32(&[1., 1., 0., 1.], &[1, 2, 2]);
    let wd = th.tensor_f32(&[1., 0., 0., 2.], &[1, 2, 2]);
    let wc = th.tensor_f32(&[1., 0., 0., 0., 0., 0., 0., 0.], &[2, 2, 2]);
    let v = th.tensor_f32(&[4., -8., 0., -2.], &[2, 2]);
    let o = m.forward(th.host(), &[wg, wu, wd, wc, v], x, offsets).unwrap();
    let silu = |a: f32| a / (1.0 + (-a).exp());
    #[rustfmt::skip]
    let want = [
        silu(1.0), 6.0 * silu(2.0),
        0.75 * ln3 + 0.25 * 4.0, 0.75 * 5.0 - 0.25 * 8.0,
        0.5 * 2.0, 0.5 * 4.0 - 0.5 * 2.0,
        7.0, -1.0,
        0.0, 0.0,
    ];
    close(o.y.f32s(), &want, "y");
    close(o.saved[3].f32s(), &[ln3, 0.0, 0.0, 0.0], "saved logits");
    assert_eq!(o.saved[0].dims(), [1, 2], "the FFN's saved tensors cover its rows only");
    // ffn_rows_frac: 1 FFN row of 5.
    assert!((th.metrics()["ffn_rows_frac"] - 0.2).abs() < 1e-12);
    // No FFN rows at all: only the other kinds, and no metric in eval.
    let th = TestHost::new(2);
    th.set_context(pith_plugin_api::Context { training: false, ..th.host().context() });
    let x = th.tensor_f32(&[7.0, -1.0, 3.0, 9.0], &[2, 2]);
    let o = m.forward(th.host(), &[wg, wu, wd, wc, v], x, th.tensor_i32(&[0, 0, 0, 0, 1, 2], &[6])).unwrap();
    assert_eq!(o.y.f32s(), [7.0, -1.0, 0.0, 0.0]);
    assert!(th.metrics().is_empty());
}

/// L = ⟨c, y⟩ over rows of every kind (one group empty), for several layouts: dx is written (from
/// NaN), the parameter grads accumulate (from 1).
#[test]
fn backward_matches_finite_differences_for_every_kind() {
    let (hd, f) = (5, 4);
    // (config, model experts, first local, local experts, rows per local expert)
    let cases: [(&str, usize, usize, usize, &[i32]); 5] = [
        ("", 6, 0, 6, &[2, 3, 2, 0, 2, 3]), // FFN 0-1, constant 2-3, copy 4, zero 5
        ("constant = 3\nzero = 0", 6, 0, 6, &[0, 3, 2, 3, 1, 2]), // FFN 0-1, constant 2-4, copy 5
        ("copy = 0\nzero = 2", 6, 0, 6, &[4, 1, 2, 3, 2, 1]), // no copy expert
        ("", 8, 3, 4, &[2, 2, 3, 1]),       // EP: FFN 3, constant 4-5, copy 6
        ("constant = 0", 4, 0, 4, &[3, 0, 2, 2]), // no constant expert
    ];
    for (config, e, first, local, sizes) in cases {
        let dims = ModelDims { first_expert: first as u32, local_experts: local as u32, ..test_dims(hd, e, f) };
        let m = create(config, dims).unwrap();
        let mut off = vec![0i32];
        sizes.iter().for_each(|&s| off.push(off.last().unwrap() + s));
        let n = *off.last().unwrap() as usize;
        let data = TestHost::new(n);
        let x = data.tensor_f32(&randn(n * hd, 1, 1.0), &[n, hd]);
        let offsets = data.tensor_i32(&off, &[local + 1]);
        let p: Vec<Tensor> = m
            .params()
            .iter()
            .zip(2..)
            .map(|(q, seed)| data.tensor_f32(&randn(q.numel(), seed, 0.5), &shape(q)))
            .collect();
        let c = randn(n * hd, 9, 1.0);
        let loss = || {
            let th = TestHost::new(n);
            dot(&c, m.forward(th.host(), &p, x, offsets).unwrap().y.f32s())
        };
        let th = TestHost::new(n);
        let o = m.forward(th.host(), &p, x, offsets).unwrap();
        let g: Vec<Tensor> = p.iter().map(|q| th.tensor_f32(&vec![1.0; q.numel()], &q.dims())).collect();
        let dx = th.tensor_f32(&vec![f32::NAN; n * hd], &[n, hd]);
        m.backward(th.host(), &p, &g, x, offsets, &o, th.tensor_f32(&c, &[n, hd]), dx).unwrap();
        check_grad(&format!("{config:?} dx"), x, dx.f32s(), loss);
        for ((q, g), spec) in p.iter().zip(&g).zip(m.params()) {
            let grad: Vec<f32> = g.f32s().iter().map(|v| v - 1.0).collect();
            check_grad(&format!("{config:?} {first}+{local} d {}", spec.name), *q, &grad, loss);
        }
        // The copy rows pass dy through and the zero rows get 0, exactly.
        let l = m.local;
        let at = |i: usize| off[i] as usize * hd;
        let (c0, c1) = (at(l.ffn + l.constant), at(l.ffn + l.constant + l.copy));
        assert_eq!(&dx.f32s()[c0..c1], &c[c0..c1], "{config:?}: copy rows");
        assert!(dx.f32s()[c1..].iter().all(|&v| v == 0.0), "{config:?}: zero rows");
    }
}

#[test]
fn flops_count_only_the_ffn_rows_and_the_constant_logits() {
    let (h, f) = (16.0, 12.0);
    let m = create("", test_dims(16, 6, 12)).unwrap(); // FFN 0-1, constant 2-3, copy 4, zero 5
    assert_eq!(m.flops(&[3, 4, 0, 0, 0, 0]), 6.0 * h * f * 7.0);
    assert_eq!(m.flops(&[0, 0, 5, 1, 0, 0]), 4.0 * h * 6.0);
    assert_eq!(m.flops(&[0, 0, 0, 0, 100, 100]), 0.0, "copy and zero experts cost nothing");
    assert_eq!(m.flops(&[1, 1, 1, 1, 1, 1]), 6.0 * h * f * 2.0 + 4.0 * h * 2.0);
    // At an even load it is (FFN experts / E) of std swiglu's 6·H·F per row, plus the GEMVs.
    let even = vec![10; 6];
    let swiglu = 6.0 * h * f * 60.0;
    assert!(m.flops(&even) < swiglu * 2.0 / 6.0 + 4.0 * h * 20.0 + 1.0);
    // A rank holding only the zero-computation experts (expert parallelism).
    let dims = ModelDims { first_expert: 2, local_experts: 4, ..test_dims(16, 6, 12) };
    assert_eq!(create("", dims).unwrap().flops(&[2, 2, 9, 9]), 4.0 * h * 4.0);
}

#[test]
fn config_errors_name_the_key() {
    let err = |c: &str, e: usize| create(c, test_dims(4, e, 3)).err().unwrap();
    let e = err("", 4);
    assert!(e.contains("`zero` + `copy` + `constant` = 1 + 1 + 2 = 4") && e.contains("at most 3"), "{e}");
    assert!(
        err("constant = 6", 8).contains("= 8 zero-computation experts") && err("constant = 6", 8).contains("at most 7")
    );
    assert_eq!(create("constant = 5", test_dims(4, 8, 3)).unwrap().local.ffn, 1, "one FFN expert is enough");
    assert!(err("zeros = 1", 8).contains("zeros"));
    assert!(err("copy = -1", 8).contains("copy"), "{}", err("copy = -1", 8));
    assert!(err("ffn = 0", 8).contains("`ffn` = 0"));
    let out = ModelDims { first_expert: 6, local_experts: 4, ..test_dims(4, 8, 3) };
    assert!(create("", out).err().unwrap().contains("6..10"));
    assert_eq!(create("zero = 0\ncopy = 0\nconstant = 0", test_dims(4, 2, 3)).unwrap().local.ffn, 2);
    // Wrong parameter count or offsets: one line, no panic.
    let m = create("", test_dims(4, 6, 3)).unwrap();
    let th = TestHost::new(2);
    let x = th.tensor_f32(&[0.0; 8], &[2, 4]);
    let off = th.tensor_i32(&[0, 1, 1, 1, 1, 1, 2], &[7]);
    assert!(m.forward(th.host(), &[], x, off).err().unwrap().contains("expected 5 parameters"));
    let p: Vec<Tensor> = m.params().iter().map(|q| th.zeros(&shape(q), DType::F32)).collect();
    let bad = th.tensor_i32(&[0, 1, 1, 1, 1, 1, 3], &[7]);
    assert!(m.forward(th.host(), &p, x, bad).err().unwrap().contains("offsets"));
}

#[test]
fn cuda_launches_match_the_kernel_signatures() {
    let src = cuda_source();
    assert!(src.starts_with(COMMON_CUH), "the kit's helpers come first");
    let t = Tensor::new(256, DType::BF16, Device::Cuda, &[1]);
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::swiglu_fwd(t, t, t, 8)),
        pith_plugin_api::kit::kernel_params(src, "moepp_swiglu_fwd")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::swiglu_bwd(t, t, t, t, t, 8)),
        pith_plugin_api::kit::kernel_params(src, "moepp_swiglu_bwd")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::fill(t, t, 1, 8)),
        pith_plugin_api::kit::kernel_params(src, "moepp_fill")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::const_fwd(t, t, t, t, 1, 8)),
        pith_plugin_api::kit::kernel_params(src, "moepp_const_fwd")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::const_bwd([t; 8], 1, 8)),
        pith_plugin_api::kit::kernel_params(src, "moepp_const_bwd")
    );
    assert_eq!((rows_grid(0), rows_grid(9), rows_grid(1 << 30)), ([1, 1, 1], [2, 1, 1], [65535, 1, 1]));
    let (a0, a1) = alpha(3f32.ln(), 0.0);
    assert!((a0 - 0.75).abs() < 1e-6 && (a1 - 0.25).abs() < 1e-6);
    assert_eq!(alpha(1e4, 0.0), (1.0, 0.0), "no overflow");
}
