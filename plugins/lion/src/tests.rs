//! Unit tests on the plugin kit's CPU `TestHost`: one step computed by hand (decay on and off,
//! grad_scale, sign(0) = 0, a buffer left alone), two steps of momentum, descent on a quadratic,
//! config errors naming the key, bad slots, and the CUDA launch against the kernel's signature.

use super::*;
use pith_plugin_api::kit::{test_dims, Rng, TestHost, COMMON_CUH};
use pith_plugin_api::Init;

fn lion(config: &str) -> Lion {
    create(config, test_dims(4, 2, 4)).unwrap()
}

fn no_lowp() -> Tensor {
    Tensor::new(0, DType::BF16, Device::Cpu, &[0])
}

/// A slot named `name` with weights `w`, gradient `g`, momentum `m` (1-D) and `spec`.
fn slot(th: &TestHost, name: &str, spec: ParamSpec, w: &[f32], g: &[f32], m: &[f32]) -> Slot {
    let n = w.len();
    Slot {
        name: name.into(),
        spec,
        w: th.tensor_f32(w, &[n]),
        g: th.tensor_f32(g, &[n]),
        state: vec![th.tensor_f32(m, &[n])].into(),
        w_lowp: no_lowp(),
    }
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}[{i}]: {x} vs {y} (all: {a:?} vs {b:?})");
    }
}

#[test]
fn one_step_by_hand_with_decay_grad_scale_and_a_zero_sign() {
    let o = lion("weight_decay = 0.5");
    let th = TestHost::new(1);
    let (lr, scale) = (0.1f32, 0.5f32);
    // Element 2: m and g both 0, so c = 0 and only the decay moves it. Element 3: c = 0.9·(−1) +
    // 0.1·(0.5·4) = −0.7 < 0 though the gradient is positive (the momentum wins).
    let (w, g, m) = ([1.0, -2.0, 3.0, 0.5], [0.4, -3.0, 0.0, 4.0], [0.0, 0.0, 0.0, -1.0]);
    let decayed = slot(&th, "layers.0.attn.q_proj.weight", ParamSpec::new("w", &[4], Init::Zeros, true), &w, &g, &m);
    let plain = slot(&th, "final_norm.weight", ParamSpec::new("w", &[4], Init::Ones, false), &w, &g, &m);
    let buffer = slot(&th, "layers.0.moe.router.bias", ParamSpec::buffer("bias", &[4], Init::Zeros), &w, &g, &m);
    let slots = [decayed, plain, buffer];
    let done = o.step(th.host(), &slots, lr, 1, scale).unwrap();
    assert_eq!(done, StepDone::default(), "the CPU path leaves the bf16 copies and the zeroing to the host");
    let signs = [1.0, -1.0, 0.0, -1.0];
    for (s, keep) in slots[..2].iter().zip([1.0 - lr * 0.5, 1.0]) {
        let want_w: Vec<f32> = w.iter().zip(signs).map(|(w, c)| w * keep - lr * c).collect();
        let want_m: Vec<f32> = m.iter().zip(g).map(|(m, g)| 0.99 * m + 0.01 * scale * g).collect();
        close(s.w.f32s(), &want_w, 1e-6, &format!("{} w", s.name));
        close(s.state[0].f32s(), &want_m, 1e-7, &format!("{} m", s.name));
    }
    assert_eq!(slots[1].w.f32s()[2], 3.0, "sign(0) = 0: no gradient, no momentum, no decay: unchanged");
    assert_eq!(slots[2].w.f32s(), w, "a Buffer slot is not a parameter");
    assert_eq!(slots[2].state[0].f32s(), m);
    assert!(o.step(th.host(), &slots, lr, 0, 1.0).unwrap_err().contains("from 1"));
}

#[test]
fn the_momentum_carries_the_sign_across_steps() {
    // β1 = 0.5, β2 = 0.5 to see it in two steps: step 1 g = 2: c = 1, m = 1; step 2 g = −1:
    // c = 0.5·1 + 0.5·(−1) = 0 (no move), m = 0.5·1 + 0.5·(−1) = 0; step 3 g = −1: c = −0.5, m = −0.5.
    let o = lion("beta1 = 0.5\nbeta2 = 0.5");
    let th = TestHost::new(1);
    let s = slot(&th, "w", ParamSpec::new("w", &[1], Init::Zeros, false), &[0.0], &[2.0], &[0.0]);
    let mut trace = vec![];
    for (step, g) in [(1, 2.0), (2, -1.0), (3, -1.0)] {
        // SAFETY: the test's own tensor; no other slice of it is alive.
        unsafe { s.g.f32s_mut()[0] = g };
        o.step(th.host(), std::slice::from_ref(&s), 0.1, step, 1.0).unwrap();
        trace.push((s.w.f32s()[0], s.state[0].f32s()[0]));
    }
    assert_eq!(trace, [(-0.1, 1.0), (-0.1, 0.0), (0.0, -0.5)]);
}

#[test]
fn descends_a_quadratic_each_coordinate_by_at_most_lr() {
    let o = lion("");
    let th = TestHost::new(1);
    let mut r = Rng::new(7);
    let n = 32;
    let target: Vec<f32> = (0..n).map(|_| r.normal()).collect();
    let w0: Vec<f32> = (0..n).map(|_| r.normal()).collect();
    let s = slot(&th, "w", ParamSpec::new("w", &[n], Init::Zeros, true), &w0, &vec![0.0; n], &vec![0.0; n]);
    let f = |w: &[f32]| w.iter().zip(&target).map(|(a, b)| 0.5 * (a - b) * (a - b)).sum::<f32>();
    let (f0, lr) = (f(&w0), 0.02);
    for step in 1..=300 {
        let before = s.w.f32s().to_vec();
        let grad: Vec<f32> = before.iter().zip(&target).map(|(a, b)| a - b).collect();
        // SAFETY: the test's own tensor; no other slice of it is alive.
        unsafe { s.g.f32s_mut() }.copy_from_slice(&grad);
        o.step(th.host(), std::slice::from_ref(&s), lr, step, 1.0).unwrap();
        let moved = s.w.f32s().iter().zip(&before).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(moved <= lr * 1.0001, "step {step}: an element moved by {moved} > lr (no decay set)");
    }
    let f1 = f(s.w.f32s());
    assert!(f1 < 0.02 * f0, "f {f0} -> {f1}");
}

#[test]
fn config_errors_name_the_key() {
    let err = |c: &str| create(c, test_dims(4, 2, 4)).err().unwrap_or_else(|| panic!("{c:?} accepted"));
    assert!(err("beta1 = 1.0").contains("`beta1` = 1 but it must be in [0, 1)"));
    assert!(err("beta2 = -0.1").contains("`beta2`"));
    assert!(err("weight_decay = -1.0").contains("`weight_decay` = -1"));
    assert!(err("weight_decay = nan").contains("`weight_decay`"));
    assert!(err("eps = 1e-8").contains("eps"), "Lion has no eps: an unknown key");
    let o = lion("beta1 = 0.95\nbeta2 = 0.98\nweight_decay = 1.0");
    assert_eq!((o.beta1, o.beta2, o.weight_decay), (0.95, 0.98, 1.0));
    let d = lion("");
    assert_eq!((d.beta1, d.beta2, d.weight_decay), (0.9, 0.99, 0.0));
    assert_eq!(d.state("embed.weight", &ParamSpec::new("weight", &[3, 2], Init::Zeros, true)), ["m"]);
}

#[test]
fn a_slot_without_its_momentum_or_of_the_wrong_shape_is_refused() {
    let (o, th) = (lion(""), TestHost::new(1));
    let spec = ParamSpec::new("w", &[2], Init::Zeros, true);
    let mut s = slot(&th, "layers.0.attn.o_proj.weight", spec, &[1.0, 2.0], &[1.0, 1.0], &[0.0, 0.0]);
    s.state = vec![].into();
    let e = o.step(th.host(), std::slice::from_ref(&s), 0.1, 1, 1.0).unwrap_err();
    assert!(e.contains("layers.0.attn.o_proj.weight") && e.contains("1 state tensor"), "{e}");
    s.state = vec![th.zeros(&[3], DType::F32)].into();
    let e = o.step(th.host(), std::slice::from_ref(&s), 0.1, 1, 1.0).unwrap_err();
    assert!(e.contains("state m") && e.contains("[2]"), "{e}");
}

#[test]
fn cuda_launch_matches_the_kernel_signature_and_table_layout() {
    let src = kernel_source!(include_str!("../kernels/lion.cu"));
    assert!(src.starts_with(COMMON_CUH), "the kit's helpers come first");
    let t = Tensor::new(256, DType::I32, Device::Cuda, &[14]);
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args(t, 2, 3, &lion(""), 1e-3, 1.0)),
        pith_plugin_api::kit::kernel_params(src, "lion_step")
    );
    assert!(src.contains(&format!("#define CHUNK {CHUNK}")));
    // LionSlot: 4 pointers, n, keep + pad, first: SLOT_WORDS 8-byte words.
    let body = &src[src.find("struct LionSlot {").unwrap()..];
    let body = &body[..body.find("};").unwrap()];
    assert!(body.contains("float *w, *g, *m;") && body.contains("__nv_bfloat16* lowp;"), "{body}");
    assert_eq!(["long long n;", "float keep;", "int pad;", "long long first;"].map(|f| body.contains(f)), [true; 4]);
    assert_eq!(SLOT_WORDS, 4 + 1 + 1 + 1);
}
