//! Unit tests on the plugin kit's CPU `TestHost`: hand-computed values, the per-token
//! normalisation, per-sequence (not per-batch) counting, EMPTY slots, finite differences for
//! d_probs, the ACCUMULATE contract, errors, and the CUDA launches against the kernels' signatures.

use super::*;
use pith_plugin_api::kit::{loss_value, test_dims, Rng, TestHost, COMMON_CUH};
use pith_plugin_api::Context;

fn loss(config: &str, experts: usize) -> SeqAux {
    create(config, test_dims(4, experts, 4)).unwrap()
}

/// A host whose micro-batch is `batch` sequences of `seq` tokens.
fn host(batch: usize, seq: usize) -> TestHost {
    let th = TestHost::new(batch * seq);
    th.set_context(Context { batch: batch as u32, seq: seq as u32, ..th.host().context() });
    th
}

fn route(th: &TestHost, probs: &[f32], ids: &[i32], e: usize, k: usize) -> RouterOut {
    let t = probs.len() / e;
    RouterOut {
        logits: th.zeros(&[t, e], DType::F32),
        probs: th.tensor_f32(probs, &[t, e]),
        ids: th.tensor_i32(ids, &[t, k]),
        weights: th.zeros(&[t, k], DType::F32),
        saved: Default::default(),
    }
}

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| scale * r.normal()).collect()
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// The loss straight from the paper's equations, in f64: per sequence f_e = E/(k·s)·count,
/// P_e = mean of p_te / Σ_j p_tj, then coef · mean over sequences of Σ f_e·P_e.
fn reference(coef: f64, probs: &[f32], ids: &[i32], (b, s, e, k): (usize, usize, usize, usize)) -> f64 {
    let mut total = 0.0;
    for q in 0..b {
        let mut f = vec![0.0f64; e];
        for &id in &ids[q * s * k..(q + 1) * s * k] {
            if id != EMPTY {
                f[id as usize] += e as f64 / (k * s) as f64;
            }
        }
        let mut p = vec![0.0f64; e];
        for t in q * s..(q + 1) * s {
            let row = &probs[t * e..(t + 1) * e];
            let r: f64 = row.iter().map(|&v| v as f64).sum();
            (0..e).for_each(|j| p[j] += row[j] as f64 / r / s as f64);
        }
        total += (0..e).map(|j| f[j] * p[j]).sum::<f64>();
    }
    coef * total / b as f64
}

#[test]
fn hand_computed_value_and_the_per_token_normalisation() {
    // One sequence of 2 tokens, E = 2, k = 1, both tokens on expert 0: f = 2/(1·2)·[2, 0] = [2, 0].
    // Normalised probs [0.75, 0.25] and [0.5, 0.5]: P = [0.625, 0.375]; loss = coef · 2 · 0.625.
    let l = loss("coef = 0.5", 2);
    let th = host(1, 2);
    let softmax = route(&th, &[0.75, 0.25, 0.5, 0.5], &[0, 0], 2, 1);
    assert!((loss_value(&l, th.host(), &[], &softmax).unwrap() - 0.625).abs() < 1e-7);
    // Unnormalised (sigmoid-like) probs: the same once divided by their row sums.
    let scaled = route(&th, &[1.5, 0.5, 0.2, 0.2], &[0, 0], 2, 1);
    assert!((loss_value(&l, th.host(), &[], &scaled).unwrap() - 0.625).abs() < 1e-7);
    // Balanced within the sequence and uniform probs: Σ f·P = 1, the loss is coef.
    let th = host(1, 4);
    let uniform = route(&th, &[0.25; 16], &[0, 1, 2, 3, 1, 0, 3, 2], 4, 2);
    let l = loss("", 4);
    assert_eq!(l.coef, 1e-4, "default coef: DeepSeek-V3's α");
    assert!((loss_value(&l, th.host(), &[], &uniform).unwrap() - 1e-4).abs() < 1e-11);
}

#[test]
fn counts_per_sequence_not_per_micro_batch() {
    // Two sequences, each sending every slot to one expert (0 and 1): over the micro-batch the
    // load is balanced over experts 0 and 1, but each sequence collapses. E = 2, k = 1, s = 2.
    let th = host(2, 2);
    let probs = [0.5f32; 8];
    let collapsed = route(&th, &probs, &[0, 0, 1, 1], 2, 1);
    let mixed = route(&th, &probs, &[0, 1, 1, 0], 2, 1);
    let l = loss("coef = 1.0", 2);
    // With uniform probs P = [0.5, 0.5] and Σ f·P = 1 either way: the loss acts through the probs.
    let (a, b) = (loss_value(&l, th.host(), &[], &collapsed).unwrap(), loss_value(&l, th.host(), &[], &mixed).unwrap());
    assert!((a - 1.0).abs() < 1e-6 && (b - 1.0).abs() < 1e-6, "{a} {b}");
    let follow = [0.9f32, 0.1, 0.9, 0.1, 0.1, 0.9, 0.1, 0.9];
    let collapsed = route(&th, &follow, &[0, 0, 1, 1], 2, 1);
    // f = [2, 0], P = [0.9, 0.1] → 1.8 for both sequences.
    assert!((loss_value(&l, th.host(), &[], &collapsed).unwrap() - 1.8).abs() < 1e-6);
    // The same ids and probs as one sequence of 4 (switch-style over the batch): f = [1, 1],
    // P = [0.5, 0.5] → 1.0.
    let th1 = host(1, 4);
    let whole = route(&th1, &follow, &[0, 0, 1, 1], 2, 1);
    assert!((loss_value(&l, th1.host(), &[], &whole).unwrap() - 1.0).abs() < 1e-6);
}

#[test]
fn matches_the_equations_with_empty_slots_and_sigmoid_probs() {
    let (b, s, e, k) = (3, 5, 6, 2);
    let t = b * s;
    let probs: Vec<f32> = randn(t * e, 7, 1.5).iter().map(|&v| sigmoid(v)).collect();
    let mut ids: Vec<i32> = (0..t * k).map(|i| ((i * 7 + i / 3) % e) as i32).collect();
    for i in [0, 3, 11, 17, 18, 19, 29] {
        ids[i] = EMPTY; // token 9 has no expert at all
    }
    let th = host(b, s);
    let l = loss("coef = 0.01", e);
    let r = route(&th, &probs, &ids, e, k);
    let want = reference(0.01, &probs, &ids, (b, s, e, k));
    let got = loss_value(&l, th.host(), &[], &r).unwrap() as f64;
    assert!((got - want).abs() < 1e-6 * want.abs(), "{got} vs {want}");
    // forward ACCUMULATES into the loss scalar.
    let acc = th.tensor_f32(&[2.0], &[1]);
    l.forward(th.host(), &[], &r, acc).unwrap();
    assert!((acc.f32s()[0] as f64 - 2.0 - want).abs() < 1e-6, "{}", acc.f32s()[0]);
}

#[test]
fn backward_matches_finite_differences_and_accumulates() {
    let (b, s, e, k) = (2, 4, 5, 2);
    let t = b * s;
    let th = host(b, s);
    let l = loss("coef = 0.3", e);
    let probs: Vec<f32> = randn(t * e, 11, 1.0).iter().map(|&v| sigmoid(v)).collect();
    let mut ids: Vec<i32> = (0..t * k).map(|i| ((i * 3 + i / 4) % e) as i32).collect();
    ids[5] = EMPTY;
    let r = route(&th, &probs, &ids, e, k);
    let scale = 0.7f32;
    let (dp, dl) = (th.zeros(&[t, e], DType::F32), th.zeros(&[t, e], DType::F32));
    l.backward(th.host(), &[], &r, scale, dp, dl).unwrap();
    assert!(dl.f32s().iter().all(|&v| v == 0.0), "seq-aux leaves d_logits to the router");
    // Central differences of scale · loss in f64 (the reference) over every prob.
    let eps = 1e-3f64;
    for i in 0..t * e {
        let mut p = probs.clone();
        p[i] = (probs[i] as f64 + eps) as f32;
        let up = reference(0.3, &p, &ids, (b, s, e, k));
        p[i] = (probs[i] as f64 - eps) as f32;
        let down = reference(0.3, &p, &ids, (b, s, e, k));
        let h = (probs[i] as f64 + eps) as f32 as f64 - (probs[i] as f64 - eps) as f32 as f64;
        let num = scale as f64 * (up - down) / h;
        let ana = dp.f32s()[i] as f64;
        assert!((num - ana).abs() < 1e-4 * (1.0 + num.abs()) + 2e-6, "d_probs[{i}]: {ana} vs numeric {num}");
    }
    // The same through the plugin's own forward (f32), on a few coordinates.
    for i in [0, 7, 13, 39] {
        let at = |v: f32| {
            let mut p = probs.clone();
            p[i] = v;
            let r = route(&th, &p, &ids, e, k);
            loss_value(&l, th.host(), &[], &r).unwrap() as f64
        };
        let num = scale as f64 * (at(probs[i] + 1e-2) - at(probs[i] - 1e-2)) / 2e-2;
        let ana = dp.f32s()[i] as f64;
        assert!((num - ana).abs() < 1e-3 * ana.abs().max(1e-2), "d_probs[{i}]: {ana} vs numeric {num}");
    }
    // ACCUMULATE: a second backward onto the first doubles it.
    let first = dp.f32s().to_vec();
    l.backward(th.host(), &[], &r, scale, dp, dl).unwrap();
    for (i, (&a, &b)) in dp.f32s().iter().zip(&first).enumerate() {
        assert!((a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1e-6), "d_probs[{i}]: {a} after {b}");
    }
}

#[test]
fn softmax_probs_get_a_gradient_that_sums_to_zero_per_token() {
    // Through p' = p / Σp, a row's gradient is orthogonal to the row (Σ_j p_j·∂/∂p_j = 0: the loss
    // does not change when a row is scaled).
    let (b, s, e, k) = (1, 6, 4, 2);
    let th = host(b, s);
    let mut probs = randn(s * e, 3, 1.0);
    for row in probs.chunks_mut(e) {
        let m: f32 = row.iter().map(|v| v.exp()).sum();
        row.iter_mut().for_each(|v| *v = v.exp() / m);
    }
    let ids: Vec<i32> = (0..s * k).map(|i| ((i * i + 1) % e) as i32).collect(); // experts 1 and 2 only
    let r = route(&th, &probs, &ids, e, k);
    let dp = th.zeros(&[s, e], DType::F32);
    loss("coef = 1.0", e).backward(th.host(), &[], &r, 1.0, dp, th.zeros(&[s, e], DType::F32)).unwrap();
    for t in 0..s {
        let dot: f32 = (0..e).map(|j| dp.f32s()[t * e + j] * probs[t * e + j]).sum();
        assert!(dot.abs() < 1e-6, "row {t}: ⟨d_probs, p⟩ = {dot}");
    }
    assert!(dp.f32s().iter().any(|&v| v.abs() > 1e-3));
}

#[test]
fn errors_name_the_sizes_the_ids_and_the_key() {
    let e = 4;
    let th = host(2, 3); // 6 rows expected
    let l = loss("", e);
    let r = route(&th, &[0.25; 20], &[0; 5], e, 1);
    let err = loss_value(&l, th.host(), &[], &r).unwrap_err();
    assert!(err.contains("5 rows") && err.contains("batch 2 × seq 3 = 6"), "{err}");
    let dp = th.zeros(&[5, e], DType::F32);
    let err = l.backward(th.host(), &[], &r, 1.0, dp, dp).unwrap_err();
    assert!(err.contains("5 rows"), "{err}");
    let r = route(&th, &[0.25; 24], &[0, 1, 2, 3, 4, 0], e, 1);
    let err = loss_value(&l, th.host(), &[], &r).unwrap_err();
    assert!(err.contains("ids[4, 0] = 4") && err.contains("EMPTY"), "{err}");
    for (cfg, key) in [("coef = -1.0", "`coef`"), ("coef = inf", "`coef`"), ("alpha = 0.1", "alpha")] {
        let err = create(cfg, test_dims(4, e, 4)).err().unwrap();
        assert!(err.contains(key), "{cfg}: {err}");
    }
    // A micro-batch of no tokens adds nothing.
    let th0 = host(0, 8);
    let r = route(&th0, &[], &[], e, 2);
    assert_eq!(loss_value(&l, th0.host(), &[], &r).unwrap(), 0.0);
}

#[test]
fn cuda_launches_match_the_kernel_signatures() {
    let src = cuda_source();
    assert!(src.starts_with(COMMON_CUH), "the kit's helpers come first");
    let t = Tensor::new(256, DType::F32, Device::Cuda, &[1]);
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::count(t, t, 1, 2, 3)),
        pith_plugin_api::kit::kernel_params(src, "seq_aux_count")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::rows(t, t, t, [1, 2, 3], 1.0)),
        pith_plugin_api::kit::kernel_params(src, "seq_aux_rows")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::sum(t, t, 1, 1.0)),
        pith_plugin_api::kit::kernel_params(src, "seq_aux_sum")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::bwd(t, t, t, [1, 2, 3], 1.0, 1.0)),
        pith_plugin_api::kit::kernel_params(src, "seq_aux_bwd")
    );
    assert_eq!((rows_grid(0), rows_grid(9), rows_grid(1 << 30)), ([1, 1, 1], [2, 1, 1], [65535, 1, 1]));
    assert_eq!(Layout { b: 2, s: 4, k: 2 }.fscale(8), 1.0);
    assert_eq!(Layout { b: 2, s: 4, k: 0 }.fscale(8), 0.0);
}
