//! Unit tests on the plugin kit's CPU `TestHost` (one rank): one micro-batch is `switch-aux`
//! (its formula by hand), a second micro-batch of the step uses the cumulative counts, a repeated
//! forward counts once, eval uses its own counts and leaves the accumulators alone, backward
//! against finite differences and the ACCUMULATE contract, errors, and the CUDA launches against
//! the kernels' signatures.

use super::*;
use pith_plugin_api::kit::{loss_value, test_dims, Rng, TestHost, COMMON_CUH};
use pith_plugin_api::Context;

fn loss(config: &str, experts: usize) -> GlobalBatchAux {
    create(config, test_dims(4, experts, 4)).unwrap()
}

fn route(th: &TestHost, probs: &[f32], ids: &[i32], e: usize) -> RouterOut {
    let (t, k) = (probs.len() / e, ids.len() * e / probs.len().max(1));
    RouterOut {
        logits: th.zeros(&[t, e], DType::F32),
        probs: th.tensor_f32(probs, &[t, e]),
        ids: th.tensor_i32(ids, &[t, k]),
        weights: th.zeros(&[t, k], DType::F32),
        saved: Default::default(),
    }
}

/// The accumulators as the host allocates them: zeroed.
fn accumulators(th: &TestHost, e: usize) -> [Tensor; 2] {
    [th.zeros(&[e], DType::F32), th.zeros(&[1], DType::F32)]
}

fn sigmoid_probs(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| 1.0 / (1.0 + (-r.normal()).exp())).collect()
}

/// `switch-aux`'s value (plugins/std/src/switch_aux.rs), by hand: coef·E·Σ_e (count_e/N)·P_e
/// with `count` the assignments and P the mean probs, in f64.
fn switch_aux(coef: f64, probs: &[f32], count: &[f64], e: usize) -> f64 {
    let (t, n) = (probs.len() / e, count.iter().sum::<f64>());
    let p = |j: usize| (0..t).map(|i| probs[i * e + j] as f64).sum::<f64>() / t as f64;
    coef * e as f64 * (0..e).map(|j| count[j] / n * p(j)).sum::<f64>()
}

fn micro_batch(th: &TestHost, m: u32, training: bool) {
    th.set_context(Context { micro_batch: m, micro_batches: 2, training, ..th.host().context() });
}

#[test]
fn one_micro_batch_is_switch_aux() {
    let (t, e) = (4, 4);
    let l = loss("", e);
    assert_eq!(l.coef, 0.01, "default coef");
    let th = TestHost::new(t);
    let p = accumulators(&th, e);
    // Uniform probs, balanced ids: coef.
    let uniform = route(&th, &[0.25; 16], &[0, 1, 2, 3, 1, 0, 3, 2], e);
    assert!((loss_value(&l, th.host(), &p, &uniform).unwrap() - 0.01).abs() < 1e-8);
    // Sigmoid probs (rows need not sum to 1) and EMPTY slots: 5 assignments.
    let (th, p) = (TestHost::new(t), accumulators(&th, e));
    let probs = sigmoid_probs(t * e, 3);
    let r = route(&th, &probs, &[0, 1, 2, EMPTY, 3, 0, EMPTY, EMPTY], e);
    let count = [2.0, 1.0, 1.0, 1.0];
    let want = switch_aux(0.01, &probs, &count, e);
    let acc = th.tensor_f32(&[1.0], &[1]);
    l.forward(th.host(), &p, &r, acc).unwrap();
    assert!((acc.f32s()[0] as f64 - 1.0 - want).abs() < 1e-7, "{} vs 1 + {want}: ACCUMULATED", acc.f32s()[0]);
    assert_eq!(p[COUNTS].f32s(), &[2.0, 1.0, 1.0, 1.0], "training adds this micro-batch's counts");
    assert_eq!(p[COUNTED].f32s(), &[1.0], "micro-batch 0 is counted");
    // Backward: d_probs += scale · coef·E·f_e/T, accumulated; d_logits untouched.
    let (dp, dl) = (th.tensor_f32(&[1.0; 16], &[t, e]), th.zeros(&[t, e], DType::F32));
    l.backward(th.host(), &p, &r, 2.0, dp, dl).unwrap();
    for (i, &v) in dp.f32s().iter().enumerate() {
        let want = 1.0 + 2.0 * 0.01 * e as f32 * count[i % e] as f32 / (5.0 * t as f32);
        assert!((v - want).abs() < 1e-7, "d_probs[{i}] = {v}, want {want}");
    }
    assert!(dl.f32s().iter().all(|&v| v == 0.0), "d_logits is left to the router");
    assert_eq!(p[COUNTS].f32s(), &[2.0, 1.0, 1.0, 1.0], "backward counts nothing");
}

#[test]
fn a_second_micro_batch_uses_the_cumulative_counts() {
    let (t, e) = (3, 4);
    let l = loss("coef = 0.1", e);
    let th = TestHost::new(t);
    let p = accumulators(&th, e);
    // Micro-batch 0: everything on experts 0 and 1.
    micro_batch(&th, 0, true);
    let r0 = route(&th, &sigmoid_probs(t * e, 5), &[0, 1, 0, 1, 0, EMPTY], e);
    let v0 = loss_value(&l, th.host(), &p, &r0).unwrap() as f64;
    assert!((v0 - switch_aux(0.1, r0.probs.f32s(), &[3.0, 2.0, 0.0, 0.0], e)).abs() < 1e-7);
    // Micro-batch 1 of the same step: experts 2 and 3. Its f is over both micro-batches
    // (3, 2, 2, 3 of 10), not its own (0, 0, 2, 3 of 5).
    micro_batch(&th, 1, true);
    let probs1 = sigmoid_probs(t * e, 6);
    let r1 = route(&th, &probs1, &[2, 3, 3, EMPTY, 2, 3], e);
    let v1 = loss_value(&l, th.host(), &p, &r1).unwrap() as f64;
    let (global, own) =
        (switch_aux(0.1, &probs1, &[3.0, 2.0, 2.0, 3.0], e), switch_aux(0.1, &probs1, &[0.0, 0.0, 2.0, 3.0], e));
    assert!((v1 - global).abs() < 1e-7 && (v1 - own).abs() > 1e-3, "{v1}: global {global}, own {own}");
    assert_eq!(p[COUNTS].f32s(), &[3.0, 2.0, 2.0, 3.0]);
    assert_eq!(p[COUNTED].f32s(), &[2.0]);
    // Its backward uses the same f: coef·E·(3, 2, 2, 3)/10 / T per token.
    let dp = th.zeros(&[t, e], DType::F32);
    l.backward(th.host(), &p, &r1, 1.0, dp, th.zeros(&[t, e], DType::F32)).unwrap();
    let want = [3.0, 2.0, 2.0, 3.0].map(|c: f32| 0.1 * e as f32 * c / 10.0 / t as f32);
    for (i, &v) in dp.f32s().iter().enumerate() {
        assert!((v - want[i % e]).abs() < 1e-7, "d_probs[{i}] = {v}, want {}", want[i % e]);
    }
    // The host zeroes the accumulators after end_step: the next step starts from micro-batch 0's
    // counts alone.
    for t in p {
        unsafe { t.f32s_mut() }.fill(0.0);
    }
    th.set_context(Context { step: 2, ..th.host().context() });
    micro_batch(&th, 0, true);
    let v = loss_value(&l, th.host(), &p, &r1).unwrap() as f64;
    assert!((v - own).abs() < 1e-7, "a new step: {v} vs {own}");
}

#[test]
fn a_repeated_forward_of_one_micro_batch_counts_it_once() {
    let (t, e) = (5, 3);
    let l = loss("", e);
    let th = TestHost::new(t);
    let p = accumulators(&th, e);
    let r = route(&th, &sigmoid_probs(t * e, 8), &[0, 1, 1, 2, 0, 0, 1, EMPTY, 2, 2], e);
    let first = loss_value(&l, th.host(), &p, &r).unwrap();
    let counts = p[COUNTS].f32s().to_vec();
    for _ in 0..3 {
        assert_eq!(loss_value(&l, th.host(), &p, &r).unwrap().to_bits(), first.to_bits());
    }
    assert_eq!(p[COUNTS].f32s(), counts.as_slice());
    assert_eq!(counts, [3.0, 3.0, 3.0]);
}

#[test]
fn eval_uses_its_own_counts_and_leaves_the_accumulators_alone() {
    let (t, e) = (4, 4);
    let l = loss("coef = 0.02", e);
    let th = TestHost::new(t);
    let p = [th.tensor_f32(&[10.0, 0.0, 0.0, 0.0], &[e]), th.tensor_f32(&[1.0], &[1])];
    th.set_context(Context { step: 0, training: false, ..th.host().context() });
    let probs = sigmoid_probs(t * e, 9);
    let r = route(&th, &probs, &[1, 2, 3, 1, 2, 3, 1, EMPTY], e);
    let v = loss_value(&l, th.host(), &p, &r).unwrap() as f64;
    let want = switch_aux(0.02, &probs, &[0.0, 3.0, 2.0, 2.0], e);
    assert!((v - want).abs() < 1e-7, "{v} vs {want}");
    assert_eq!(p[COUNTS].f32s(), &[10.0, 0.0, 0.0, 0.0]);
    assert_eq!(p[COUNTED].f32s(), &[1.0]);
}

#[test]
fn backward_matches_finite_differences() {
    let (t, e) = (6, 5);
    let l = loss("coef = 0.5", e);
    let th = TestHost::new(t);
    let p = accumulators(&th, e);
    micro_batch(&th, 1, true);
    unsafe { p[COUNTS].f32s_mut() }.copy_from_slice(&[4.0, 0.0, 1.0, 2.0, 5.0]); // micro-batch 0's
    unsafe { p[COUNTED].f32s_mut()[0] = 1.0 };
    let probs = sigmoid_probs(t * e, 12);
    let ids: Vec<i32> = (0..t * 2).map(|i| ((i * i + 2) % e) as i32).collect();
    let r = route(&th, &probs, &ids, e);
    let base = loss_value(&l, th.host(), &p, &r).unwrap(); // counts this micro-batch
    let dp = th.zeros(&[t, e], DType::F32);
    l.backward(th.host(), &p, &r, 0.5, dp, th.zeros(&[t, e], DType::F32)).unwrap();
    for (i, &p0) in probs.iter().enumerate() {
        let at = |v: f32| {
            unsafe { r.probs.f32s_mut()[i] = v };
            let out = loss_value(&l, th.host(), &p, &r).unwrap() as f64;
            unsafe { r.probs.f32s_mut()[i] = p0 };
            out
        };
        let num = 0.5 * (at(p0 + 1e-2) - at(p0 - 1e-2)) / 2e-2;
        let ana = dp.f32s()[i] as f64;
        assert!((num - ana).abs() < 1e-4 * ana.abs().max(1e-2), "d_probs[{i}]: {ana} vs numeric {num}");
    }
    assert_eq!(loss_value(&l, th.host(), &p, &r).unwrap(), base, "the finite differences counted nothing");
}

#[test]
fn errors_name_the_ids_the_tensors_and_the_key() {
    let e = 4;
    let l = loss("", e);
    let th = TestHost::new(2);
    let p = accumulators(&th, e);
    let r = route(&th, &[0.25; 8], &[0, 4], e);
    let err = loss_value(&l, th.host(), &p, &r).unwrap_err();
    assert!(err.contains("ids[1, 0] = 4") && err.contains("EMPTY"), "{err}");
    assert_eq!(p[COUNTS].f32s(), &[0.0; 4], "nothing counted on an error");
    let err = loss_value(&l, th.host(), &p[..1], &r).unwrap_err();
    assert!(err.contains("expected 2 tensors"), "{err}");
    for (cfg, key) in [("coef = -0.1", "`coef`"), ("coef = nan", "`coef`"), ("alpha = 1", "alpha")] {
        let err = create(cfg, test_dims(4, e, 4)).err().unwrap();
        assert!(err.contains(key), "{cfg}: {err}");
    }
    let specs = l.params();
    assert_eq!((specs[0].name.as_str(), specs[0].shape.as_slice()), ("counts", &[4u64][..]));
    assert_eq!((specs[1].name.as_str(), specs[1].shape.as_slice()), ("counted", &[1u64][..]));
    assert!(specs.iter().all(|s| s.role == pith_plugin_api::Role::Accumulator));
}

#[test]
fn cuda_launches_match_the_kernel_signatures() {
    let src = cuda_source();
    assert!(src.starts_with(COMMON_CUH), "the kit's helpers come first");
    let t = Tensor::new(256, DType::F32, Device::Cuda, &[1]);
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::count(t, t, 1, 2)),
        pith_plugin_api::kit::kernel_params(src, "gba_count")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::global(t, t, t, t, 2, 1.0, true, false)),
        pith_plugin_api::kit::kernel_params(src, "gba_global")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::coef(t, t, 2, 1.0)),
        pith_plugin_api::kit::kernel_params(src, "gba_coef")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::rows(t, t, t, 1, 2)),
        pith_plugin_api::kit::kernel_params(src, "gba_rows")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::sum(t, t, 1)),
        pith_plugin_api::kit::kernel_params(src, "gba_sum")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::bwd(t, t, 1, 2, 1.0)),
        pith_plugin_api::kit::kernel_params(src, "gba_bwd")
    );
    assert_eq!((rows_grid(0), rows_grid(9), rows_grid(1 << 30)), ([1, 1, 1], [2, 1, 1], [65535, 1, 1]));
}
