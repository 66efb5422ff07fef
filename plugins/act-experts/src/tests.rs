//! Unit tests on the plugin kit's CPU `TestHost`: each activation's forward against hand-computed
//! values, act' against finite differences of act, the backward of both components against
//! finite differences (local experts, an empty group, the WRITE/ACCUMULATE contract), FLOPs,
//! config errors, and the CUDA launches against the kernels' signatures.

use super::*;
use pith_plugin_api::kit::{test_dims, Rng, TestHost, COMMON_CUH};

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| scale * r.normal()).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
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

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}\n{got:?}\n{want:?}");
    }
}

/// H = 2, F = 3, 2 experts: expert 0 gets row 0, expert 1 rows 1 and 2.
/// W_up[0] = [[1, 0, 1], [0, 1, 1]], W_up[1] = [[1, -1, 0], [2, 0, -1]];
/// W_down[0] = [[1, 2], [3, 4], [5, 6]], W_down[1] = [[1, 0], [0, 1], [1, 1]].
fn hand_case(th: &TestHost) -> (Vec<Tensor>, Tensor, Tensor) {
    let w_up = th.tensor_f32(&[1., 0., 1., 0., 1., 1., 1., -1., 0., 2., 0., -1.], &[2, 2, 3]);
    let w_down = th.tensor_f32(&[1., 2., 3., 4., 5., 6., 1., 0., 0., 1., 1., 1.], &[2, 3, 2]);
    let x = th.tensor_f32(&[1., -2., 0.5, 0.25, -1., 1.], &[3, 2]);
    (vec![w_up, w_down], x, th.tensor_i32(&[0, 1, 3], &[3]))
}

#[test]
fn relu2_forward_is_the_squared_relu_mlp() {
    let ex = create_relu2("", test_dims(2, 2, 3)).unwrap();
    let th = TestHost::new(3);
    let (p, x, offsets) = hand_case(&th);
    let o = ex.forward(th.host(), &p, x, offsets).unwrap();
    // Row 0 (expert 0): a = [1, -2, -1] → u = [1, 0, 0] → y = [1, 2].
    // Row 1 (expert 1): a = [0.5 + 0.5, -0.5, -0.25] = [1, -0.5, -0.25] → u = [1, 0, 0] → y = [1, 0].
    // Row 2 (expert 1): a = [-1 + 2, 1, -1] = [1, 1, -1] → u = [1, 1, 0] → y = [1, 1].
    assert_eq!(o.saved[0].f32s(), [1., -2., -1., 1., -0.5, -0.25, 1., 1., -1.]);
    assert_eq!(o.saved[1].f32s(), [1., 0., 0., 1., 0., 0., 1., 1., 0.]);
    assert_eq!(o.y.f32s(), [1., 2., 1., 0., 1., 1.]);
    // A larger pre-activation: 3 → 9.
    let th = TestHost::new(1);
    let (p, _, _) = hand_case(&th);
    let x = th.tensor_f32(&[3., 0.], &[1, 2]);
    let o = ex.forward(th.host(), &p, x, th.tensor_i32(&[0, 1, 1], &[3])).unwrap();
    // a = [3, 0, 3] → u = [9, 0, 9] → y = 9·[1, 2] + 9·[5, 6] = [54, 72].
    assert_eq!(o.y.f32s(), [54., 72.]);
}

#[test]
fn gelu_forward_is_the_tanh_gelu_mlp() {
    // GELU (tanh approximation) at the pre-activations of the hand case: values to 7 digits.
    let table = [(1.0, 0.841_192), (-2.0, -0.045_402_3), (-1.0, -0.158_808), (-0.5, -0.154_286), (-0.25, -0.100_325)];
    let g = |a: f32| table.iter().find(|t| t.0 == a).unwrap_or_else(|| panic!("{a}")).1;
    let ex = create_gelu("", test_dims(2, 2, 3)).unwrap();
    let th = TestHost::new(3);
    let (p, x, offsets) = hand_case(&th);
    let o = ex.forward(th.host(), &p, x, offsets).unwrap();
    let u: Vec<f32> = [1., -2., -1., 1., -0.5, -0.25, 1., 1., -1.].iter().map(|&a| g(a)).collect();
    close(o.saved[1].f32s(), &u, 1e-5, "u");
    let w_down = [[[1., 2.], [3., 4.], [5., 6.]], [[1., 0.], [0., 1.], [1., 1.]]];
    let mut y = vec![0.0f32; 6];
    for (r, e) in [(0, 0), (1, 1), (2, 1)] {
        for c in 0..2 {
            y[r * 2 + c] = (0..3).map(|j| u[r * 3 + j] * w_down[e][j][c]).sum();
        }
    }
    close(o.y.f32s(), &y, 1e-5, "y");
    assert_eq!(Act::Gelu.f(0.0), 0.0);
    assert!((Act::Gelu.f(2.0) - 1.954_598).abs() < 1e-5 && (Act::Gelu.f(-3.0) + 0.003_637_4).abs() < 1e-6);
}

#[test]
fn derivatives_match_finite_differences_of_the_activations() {
    for act in [Act::Relu2, Act::Gelu] {
        for i in -60..=60 {
            let a = i as f32 * 0.1 + 0.013; // off the kink of relu2 at 0
            let e = 1e-3f64;
            let f = |v: f64| match act {
                Act::Relu2 => v.max(0.0).powi(2),
                Act::Gelu => 0.5 * v * (1.0 + (0.7978845608028654 * (v + 0.044715 * v.powi(3))).tanh()),
            };
            let num = (f(a as f64 + e) - f(a as f64 - e)) / (2.0 * e);
            assert!((act.df(a) as f64 - num).abs() < 1e-4 * (1.0 + num.abs()), "{act:?}'({a}): {} vs {num}", act.df(a));
            assert!((act.f(a) as f64 - f(a as f64)).abs() < 1e-5 * (1.0 + f(a as f64).abs()), "{act:?}({a})");
        }
    }
}

/// Experts 1 and 2 of 4 on this rank, groups [3, 0] and an all-rows case: FD of L = ⟨c, y⟩ for
/// dx and both weights; dx is written (from NaN), the weight grads accumulate (from 1).
#[test]
fn backward_matches_finite_differences_and_keeps_the_contract() {
    let (n, hd, f) = (6, 5, 4);
    for (act, offs) in
        [(Act::Relu2, [0, 3, 6]), (Act::Gelu, [0, 3, 6]), (Act::Relu2, [0, 6, 6]), (Act::Gelu, [0, 0, 6])]
    {
        let dims = ModelDims { first_expert: 1, local_experts: 2, ..test_dims(hd, 4, f) };
        let ex = create(act, "", dims).unwrap();
        assert_eq!(ex.params().iter().map(|p| p.shape.clone()).collect::<Vec<_>>(), [vec![2, 5, 4], vec![2, 4, 5]]);
        let data = TestHost::new(n);
        let x = data.tensor_f32(&randn(n * hd, 1, 1.0), &[n, hd]);
        let offsets = data.tensor_i32(&offs, &[3]);
        let shape = |q: &ParamSpec| q.shape.iter().map(|&d| d as usize).collect::<Vec<_>>();
        let p: Vec<Tensor> = ex
            .params()
            .iter()
            .zip(2..)
            .map(|(q, seed)| data.tensor_f32(&randn(q.numel(), seed, 0.5), &shape(q)))
            .collect();
        let c = randn(n * hd, 9, 1.0);
        let loss = || {
            let th = TestHost::new(n);
            dot(&c, ex.forward(th.host(), &p, x, offsets).unwrap().y.f32s())
        };
        let th = TestHost::new(n);
        let o = ex.forward(th.host(), &p, x, offsets).unwrap();
        let g: Vec<Tensor> = p.iter().map(|q| th.tensor_f32(&vec![1.0; q.numel()], &q.dims())).collect();
        let dx = th.tensor_f32(&vec![f32::NAN; n * hd], &[n, hd]);
        ex.backward(th.host(), &p, &g, x, offsets, &o, th.tensor_f32(&c, &[n, hd]), dx).unwrap();
        check_grad(&format!("{act:?} dx"), x, dx.f32s(), loss);
        for (i, (q, g)) in p.iter().zip(&g).enumerate() {
            let grad: Vec<f32> = g.f32s().iter().map(|v| v - 1.0).collect();
            check_grad(&format!("{act:?} {offs:?} d param {i}"), *q, &grad, loss);
        }
    }
}

#[test]
fn flops_count_two_gemms_per_row() {
    let ex = create_relu2("ffn = 7", test_dims(5, 3, 4)).unwrap();
    assert_eq!(ex.flops(&[3, 0, 4]), 2.0 * (2.0 * 5.0 * 7.0) * 7.0);
    assert_eq!(create_gelu("", test_dims(5, 3, 4)).unwrap().flops(&[1, 1, 1]), 4.0 * 5.0 * 4.0 * 3.0);
    assert_eq!(ex.flops(&[0, 0, 0]), 0.0);
}

#[test]
fn config_and_shape_errors_name_the_key() {
    let err = |c: &str| create_gelu(c, test_dims(4, 2, 3)).err().unwrap();
    assert!(err("ffn = 0").contains("`ffn` = 0"), "{}", err("ffn = 0"));
    assert!(err("fnn = 3").contains("fnn"), "{}", err("fnn = 3"));
    assert!(err("ffn = -1").contains("ffn"), "{}", err("ffn = -1"));
    let out = ModelDims { first_expert: 3, local_experts: 2, ..test_dims(4, 4, 3) };
    assert!(create_relu2("", out).err().unwrap().contains("3..5"));
    let ex = create_relu2("ffn = 6", test_dims(4, 2, 3)).unwrap();
    assert_eq!((ex.ffn, ex.params()[0].shape.as_slice()), (6, &[2u64, 4, 6][..]));
    // Wrong parameter count or x width: one line, no panic.
    let th = TestHost::new(2);
    let x = th.tensor_f32(&[0.0; 6], &[2, 3]);
    let offsets = th.tensor_i32(&[0, 1, 2], &[3]);
    let e = ex.forward(th.host(), &[], x, offsets).err().unwrap();
    assert!(e.contains("2 parameters"), "{e}");
    let p: Vec<Tensor> = ex
        .params()
        .iter()
        .map(|q| th.zeros(&q.shape.iter().map(|&d| d as usize).collect::<Vec<_>>(), DType::F32))
        .collect();
    let e = ex.forward(th.host(), &p, x, offsets).err().unwrap();
    assert!(e.starts_with("relu2: x:"), "{e}");
}

#[test]
fn cuda_launches_match_the_kernel_signatures() {
    let src = cuda_source();
    assert!(src.starts_with(COMMON_CUH), "the kit's helpers come first");
    let t = Tensor::new(256, DType::BF16, Device::Cuda, &[1]);
    for act in [Act::Relu2, Act::Gelu] {
        let (fwd, bwd) = act.kernels();
        assert_eq!(pith_plugin_api::kit::arg_kinds(&args::fwd(t, t, 8)), pith_plugin_api::kit::kernel_params(src, fwd));
        assert_eq!(
            pith_plugin_api::kit::arg_kinds(&args::bwd(t, t, t, 8)),
            pith_plugin_api::kit::kernel_params(src, bwd)
        );
    }
    // The constants of the CPU path are the kernels'.
    assert!(src.contains("#define ACT_GELU_C 0.7978845608028654f") && src.contains("#define ACT_GELU_K 0.044715f"));
    assert!((GELU_C - (2.0f64 / std::f64::consts::PI).sqrt() as f32).abs() < 1e-7);
}
