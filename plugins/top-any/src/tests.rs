//! Unit tests on the plugin kit's CPU `TestHost`: the selection rules, finite differences for dx
//! and dW, the surrogate's sign (and that it moves the expert count the right way), the backward
//! contract, config errors, and the CUDA launches against the kernels' signatures.

use super::*;
use pith_plugin_api::kit::{test_dims, Rng, TestHost, COMMON_CUH};

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| scale * r.normal()).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

fn router(config: &str, hidden: usize, experts: usize) -> TopAny {
    create(config, test_dims(hidden, experts, 4)).unwrap()
}

/// Experts used by each token (its non-EMPTY slots), checking that the EMPTY slots come last
/// and have gate 0.
fn counts(o: &RouterOut) -> Vec<usize> {
    let k = o.ids.dim(1);
    let (id, w) = (o.ids.i32s(), o.weights.f32s());
    (0..o.ids.dim(0))
        .map(|r| {
            let n = id[r * k..(r + 1) * k].iter().take_while(|&&i| i != EMPTY).count();
            assert!(id[r * k + n..(r + 1) * k].iter().all(|&i| i == EMPTY), "row {r}: EMPTY slots must trail");
            assert!(w[r * k + n..(r + 1) * k].iter().all(|&v| v == 0.0), "row {r}: EMPTY slots have gate 0");
            n
        })
        .collect()
}

/// The identity as W (E = H), so x's rows are the logits.
fn identity(e: usize) -> Vec<f32> {
    (0..e * e).map(|i| if i / e == i % e { 1.0 } else { 0.0 }).collect()
}

#[test]
fn forward_routes_each_token_to_the_experts_that_pass_at_least_one_at_most_max_k() {
    let e = 6;
    let rows: [[f32; 6]; 5] = [
        [1.0, 2.0, 3.0, -1.0, -2.0, 0.4],     // 0, 1, 2 pass; 5 misses its threshold 0.5
        [-1.0, -2.0, -0.5, -3.0, -1.0, -1.0], // none passes: the best alone
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],       // all pass: the best max_k
        [0.7, 0.7, -1.0, -1.0, -1.0, -1.0],   // a tie: the lower id first
        [0.5, -1.0, -1.0, -1.0, -1.0, 0.5],   // 0.5 is not > 0.5
    ];
    let want: [[i32; 4]; 5] =
        [[2, 1, 0, EMPTY], [2, EMPTY, EMPTY, EMPTY], [5, 4, 3, 2], [0, 1, EMPTY, EMPTY], [0, EMPTY, EMPTY, EMPTY]];
    for normalize in [true, false] {
        let r = router(&format!("normalize = {normalize}"), e, e);
        assert_eq!(r.max_k, 4, "default max_k");
        let th = TestHost::new(rows.len());
        let x = th.tensor_f32(rows.as_flattened(), &[rows.len(), e]);
        let (w, thr) = (th.tensor_f32(&identity(e), &[e, e]), th.tensor_f32(&[0.0, 0.0, 0.0, 0.0, 0.0, 0.5], &[e]));
        let o = r.forward(th.host(), &[w, thr], x).unwrap();
        assert_eq!(o.ids.i32s(), want.as_flattened(), "normalize {normalize}");
        assert_eq!(o.logits.f32s(), rows.as_flattened());
        for (t, row) in rows.iter().enumerate() {
            let s: Vec<f32> = row.iter().map(|&l| sigmoid(l)).collect();
            let p = &o.probs.f32s()[t * e..(t + 1) * e];
            let total: f32 = s.iter().sum();
            assert!(p.iter().zip(&s).all(|(p, s)| (p - s / total).abs() < 1e-6), "probs are the scores normalised");
            let ids: Vec<usize> = want[t].iter().filter(|&&i| i != EMPTY).map(|&i| i as usize).collect();
            let sel: f32 = ids.iter().map(|&j| s[j]).sum();
            for (slot, &j) in ids.iter().enumerate() {
                let gate = if normalize { s[j] / sel } else { s[j] };
                assert!((o.weights.f32s()[t * 4 + slot] - gate).abs() < 1e-6, "row {t} slot {slot}");
            }
        }
        assert_eq!(counts(&o), [3, 1, 4, 2, 1]);
        let m = th.metrics();
        assert!((m["experts_per_token"] - 11.0 / 5.0).abs() < 1e-12, "{m:?}");
        assert!((m["fallback_frac"] - 1.0 / 5.0).abs() < 1e-12, "{m:?}");
    }
}

#[test]
fn token_counts_vary_and_empty_slots_are_present() {
    let (t, hd, e) = (64, 8, 8);
    let r = router("", hd, e);
    let th = TestHost::new(t);
    let (x, w) = (th.tensor_f32(&randn(t * hd, 1, 1.0), &[t, hd]), th.tensor_f32(&randn(e * hd, 2, 0.4), &[e, hd]));
    let thr = th.tensor_f32(&randn(e, 3, 0.5), &[e]);
    let o = r.forward(th.host(), &[w, thr], x).unwrap();
    let c = counts(&o);
    let mut seen: Vec<usize> = c.clone();
    seen.sort();
    seen.dedup();
    assert!(seen.len() >= 3 && seen.contains(&4) && seen[0] < 4, "counts {c:?}");
    assert!(o.ids.i32s().contains(&EMPTY));
    for row in o.weights.f32s().chunks(4) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "normalised gates sum to 1: {row:?}");
    }
    let mean = c.iter().sum::<usize>() as f64 / t as f64;
    assert!((th.metrics()["experts_per_token"] - mean).abs() < 1e-12 && mean < 4.0);
    // Eval records nothing.
    let th = TestHost::new(t);
    th.set_context(pith_plugin_api::Context { training: false, ..th.host().context() });
    let (x, w, thr) =
        (th.tensor_f32(x.f32s(), &[t, hd]), th.tensor_f32(w.f32s(), &[e, hd]), th.tensor_f32(thr.f32s(), &[e]));
    r.forward(th.host(), &[w, thr], x).unwrap();
    assert!(th.metrics().is_empty());
}

/// Central differences of `loss` over every element of `t` against `grad` (max error ≤ 1e-2 of
/// the largest derivative); `ids` must not change under the step (the inputs keep a margin).
fn check_grad(what: &str, t: Tensor, grad: &[f32], loss: impl Fn() -> (f64, Vec<i32>)) {
    let eps = 2e-3f32;
    let ids0 = loss().1;
    let num: Vec<f64> = (0..t.numel())
        .map(|i| {
            // SAFETY: the loss reads t only while no slice from here is alive.
            let at = |v: f32| unsafe { t.f32s_mut()[i] = v };
            let v = t.f32s()[i];
            at(v + eps);
            let (up, ids_up) = loss();
            at(v - eps);
            let (down, ids_down) = loss();
            at(v);
            assert!(ids_up == ids0 && ids_down == ids0, "{what}[{i}]: ±{eps} changed the routing");
            (up - down) / (2.0 * eps as f64)
        })
        .collect();
    let big = num.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    let err = num.iter().zip(grad).fold(0.0f64, |m, (n, &g)| m.max((n - g as f64).abs()));
    assert!(err <= 1e-2 * big, "{what}: max error {err} of max |d| {big}\nnumeric {num:?}\nanalytic {grad:?}");
}

/// Inputs whose routing no small step changes: every logit is 0.1 away from its threshold and
/// from every other logit of its row (rows redrawn until so).
fn separated_inputs(t: usize, hd: usize, e: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (w, thr) = (randn(e * hd, seed, 0.6), randn(e, seed + 1, 0.7));
    let mut rng = Rng::new(seed + 2);
    let mut x = vec![0.0; t * hd];
    for row in x.chunks_mut(hd) {
        loop {
            row.iter_mut().for_each(|v| *v = rng.normal());
            let l: Vec<f32> = (0..e).map(|j| dot(row, &w[j * hd..(j + 1) * hd]) as f32).collect();
            let apart = (0..e).all(|a| (l[a] - thr[a]).abs() > 0.1 && (0..a).all(|b| (l[a] - l[b]).abs() > 0.1));
            if apart {
                break;
            }
        }
    }
    (x, w, thr)
}

/// L = ⟨a, weights⟩ + ⟨b, probs⟩ + ⟨c, logits⟩: backward gets (a, b, c) as (d_weights, d_probs,
/// d_logits) and must give dL/dx and dL/dW; routes with 1..=max_k experts and EMPTY slots.
#[test]
fn backward_matches_finite_differences_through_gates_probs_and_logits() {
    let (t, hd, e, k) = (10, 5, 6, 3);
    for normalize in [true, false] {
        let r = router(&format!("max_k = {k}\nnormalize = {normalize}"), hd, e);
        let data = TestHost::new(t);
        let (xv, wv, tv) = separated_inputs(t, hd, e, 7);
        let (x, w, thr) = (data.tensor_f32(&xv, &[t, hd]), data.tensor_f32(&wv, &[e, hd]), data.tensor_f32(&tv, &[e]));
        let (a, b, c) = (randn(t * k, 3, 1.0), randn(t * e, 4, 1.0), randn(t * e, 5, 1.0));
        let loss = || {
            let th = TestHost::new(t);
            let o = r.forward(th.host(), &[w, thr], x).unwrap();
            let l = dot(&a, o.weights.f32s()) + dot(&b, o.probs.f32s()) + dot(&c, o.logits.f32s());
            (l, o.ids.i32s().to_vec())
        };
        let th = TestHost::new(t);
        let o = r.forward(th.host(), &[w, thr], x).unwrap();
        let n = counts(&o);
        assert!(n.contains(&1) && n.contains(&k) && o.ids.i32s().contains(&EMPTY), "counts {n:?}");
        let (gw, gt, dx) = (th.zeros(&[e, hd], DType::F32), th.zeros(&[e], DType::F32), th.zeros(&[t, hd], DType::F32));
        let [da, db, dc] = [(&a, k), (&b, e), (&c, e)].map(|(v, n)| th.tensor_f32(v, &[t, n]));
        r.backward(th.host(), &[w, thr], &[gw, gt], x, &o, da, db, dc, dx).unwrap();
        check_grad(&format!("dx (normalize {normalize})"), x, dx.f32s(), loss);
        check_grad(&format!("dW (normalize {normalize})"), w, gw.f32s(), loss);
        assert!(gt.f32s().iter().any(|&g| g != 0.0), "the thresholds get a (surrogate) gradient");
    }
}

/// One token's backward from `dw` alone; returns the threshold's gradient.
fn threshold_grad(r: &TopAny, row: &[f32], thr: &[f32], dw: &[f32]) -> Vec<f32> {
    let e = row.len();
    let th = TestHost::new(1);
    let (x, w, thr) = (th.tensor_f32(row, &[1, e]), th.tensor_f32(&identity(e), &[e, e]), th.tensor_f32(thr, &[e]));
    let o = r.forward(th.host(), &[w, thr], x).unwrap();
    let (gw, gt, dx) = (th.zeros(&[e, e], DType::F32), th.zeros(&[e], DType::F32), th.zeros(&[1, e], DType::F32));
    let (dwt, zeros) = (th.tensor_f32(dw, &[1, r.max_k]), th.zeros(&[1, e], DType::F32));
    r.backward(th.host(), &[w, thr], &[gw, gt], x, &o, dwt, zeros, zeros, dx).unwrap();
    gt.f32s().to_vec()
}

#[test]
fn the_surrogate_lowers_the_threshold_of_an_expert_that_helps_and_raises_one_that_hurts() {
    let row = [1.0, 2.0, 3.0, -1.0, -2.0, -0.5]; // experts 2, 1, 0 pass (slots 0, 1, 2)
    let thr = [0.0; 6];
    // Gates are the scores: a gate that lowers the loss (dw < 0) says "use this expert more":
    // a positive gradient, so descent lowers its threshold. Experts not used get nothing.
    let r = router("normalize = false", 6, 6);
    let g = threshold_grad(&r, &row, &thr, &[-1.0, -1.0, -1.0, 0.0]);
    assert!(g[..3].iter().all(|&v| v > 0.0) && g[3..].iter().all(|&v| v == 0.0), "{g:?}");
    let (st, dw) = (sigmoid(0.0), -1.0);
    let want = -st * (1.0 - st) * sigmoid(3.0) * dw; // −σ'(τ)·s·dw for expert 2
    assert!((g[2] - want).abs() < 1e-6, "{g:?}");
    let g = threshold_grad(&r, &row, &thr, &[1.0, 1.0, 1.0, 0.0]);
    assert!(g[..3].iter().all(|&v| v < 0.0), "{g:?}");
    // Normalised gates: expert 2 (slot 0) does better than the mix, experts 1 and 0 worse.
    let r = router("", 6, 6);
    let g = threshold_grad(&r, &row, &thr, &[-1.0, 1.0, 1.0, 0.0]);
    assert!(g[2] > 0.0 && g[1] < 0.0 && g[0] < 0.0 && g[3..].iter().all(|&v| v == 0.0), "{g:?}");
    // With normalised gates the mask's gradients of one token sum to 0 (Σ s_j·(dw_j − dot)/Σ s = 0).
    assert!(g.iter().sum::<f32>().abs() < 1e-6, "{g:?}");
    // A token none of whose experts passed uses its best one, which gets no threshold gradient.
    let r = router("normalize = false", 6, 6);
    let g = threshold_grad(&r, &[-1.0, -2.0, -0.5, -3.0, -1.0, -1.0], &thr, &[-1.0, 0.0, 0.0, 0.0]);
    assert!(g.iter().all(|&v| v == 0.0), "{g:?}");
}

/// Descent on the thresholds alone: when every gate lowers the loss the tokens take more experts,
/// when every gate raises it they take fewer.
#[test]
fn descent_on_the_surrogate_moves_the_expert_count_the_right_way() {
    let (t, hd, e) = (64, 8, 8);
    let r = router("normalize = false", hd, e);
    let (xv, wv) = (randn(t * hd, 11, 1.0), randn(e * hd, 12, 0.4));
    for (sign, more) in [(-1.0f32, true), (1.0, false)] {
        let mut tau = vec![0.0f32; e];
        let mut mean = Vec::new();
        for _ in 0..10 {
            let th = TestHost::new(t);
            let (x, w, thr) = (th.tensor_f32(&xv, &[t, hd]), th.tensor_f32(&wv, &[e, hd]), th.tensor_f32(&tau, &[e]));
            let o = r.forward(th.host(), &[w, thr], x).unwrap();
            mean.push(counts(&o).iter().sum::<usize>() as f32 / t as f32);
            let (gw, gt, dx) =
                (th.zeros(&[e, hd], DType::F32), th.zeros(&[e], DType::F32), th.zeros(&[t, hd], DType::F32));
            let dw = th.tensor_f32(&vec![sign; t * 4], &[t, 4]);
            let zeros = th.zeros(&[t, e], DType::F32);
            r.backward(th.host(), &[w, thr], &[gw, gt], x, &o, dw, zeros, zeros, dx).unwrap();
            tau.iter_mut().zip(gt.f32s()).for_each(|(v, g)| *v -= 0.05 * g);
        }
        let (first, last) = (mean[0], mean[mean.len() - 1]);
        assert!(if more { last > first + 0.5 } else { last < first - 0.5 }, "dw = {sign}: experts per token {mean:?}");
    }
}

#[test]
fn backward_writes_dx_and_accumulates_both_parameter_grads() {
    let (t, hd, e, k) = (6, 5, 6, 4);
    let r = router("", hd, e);
    let th = TestHost::new(t);
    let (xv, wv, tv) = separated_inputs(t, hd, e, 21);
    let (x, w, thr) = (th.tensor_f32(&xv, &[t, hd]), th.tensor_f32(&wv, &[e, hd]), th.tensor_f32(&tv, &[e]));
    let o = r.forward(th.host(), &[w, thr], x).unwrap();
    let (da, db, dc) = (
        th.tensor_f32(&randn(t * k, 1, 1.0), &[t, k]),
        th.tensor_f32(&randn(t * e, 2, 1.0), &[t, e]),
        th.tensor_f32(&randn(t * e, 3, 1.0), &[t, e]),
    );
    let run = |gw: Tensor, gt: Tensor, dx: Tensor| {
        r.backward(th.host(), &[w, thr], &[gw, gt], x, &o, da, db, dc, dx).unwrap()
    };
    let (gw, gt, dx) = (th.zeros(&[e, hd], DType::F32), th.zeros(&[e], DType::F32), th.zeros(&[t, hd], DType::F32));
    run(gw, gt, dx);
    let (gw2, gt2) = (th.tensor_f32(gw.f32s(), &[e, hd]), th.tensor_f32(gt.f32s(), &[e]));
    let dx2 = th.tensor_f32(&vec![f32::NAN; t * hd], &[t, hd]);
    run(gw2, gt2, dx2);
    assert_eq!(dx2.f32s(), dx.f32s(), "dx is written, whatever was there");
    for (twice, once) in [(gw2, gw), (gt2, gt)] {
        assert!(twice.f32s().iter().zip(once.f32s()).all(|(a, b)| (a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1.0)));
    }
    assert!(gt.f32s().iter().any(|&g| g != 0.0));
}

#[test]
fn config_errors_name_the_key() {
    let err = |cfg: &str| create(cfg, test_dims(8, 6, 4)).err().unwrap();
    let e = err("max_k = 7");
    assert!(e.contains("`max_k` = 7") && e.contains("1..=6"), "{e}");
    assert!(err("max_k = 0").contains("`max_k` = 0"));
    assert!(err("top_k = 2").contains("top_k"), "{}", err("top_k = 2"));
    assert!(err("threshold_init = nan").contains("`threshold_init`"));
    assert!(err("normalize = 3").contains("normalize"), "{}", err("normalize = 3"));
    assert_eq!(router("", 8, 3).max_k, 3, "the default is capped at E");
    let r = router("max_k = 2\nnormalize = false\nthreshold_init = 1", 8, 6);
    assert_eq!((r.max_k, r.normalize), (2, false));
    let p = r.params();
    assert_eq!(
        (p[1].name.as_str(), p[1].init, p[1].surrogate, p[1].decay),
        ("threshold", Init::Constant(1.0), true, false)
    );
    assert!(!p[0].surrogate && p[0].shape.as_slice() == [6, 8]);
}

#[test]
fn cuda_launches_match_the_kernel_signatures() {
    let src = cuda_source();
    assert!(src.starts_with(COMMON_CUH), "the kit's helpers come first");
    let t = Tensor::new(256, DType::F32, Device::Cuda, &[1]);
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::fwd(t, t, t, t, t, t, t, [1, 2, 3, 1])),
        pith_plugin_api::kit::kernel_params(src, "top_any_fwd")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::sum(t, t, 1)),
        pith_plugin_api::kit::kernel_params(src, "top_any_sum")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::bwd([t; 11], [1, 2, 3, 1])),
        pith_plugin_api::kit::kernel_params(src, "top_any_bwd")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::thr_grad(t, t, t, t, 1, 2)),
        pith_plugin_api::kit::kernel_params(src, "top_any_thr_grad")
    );
    assert_eq!((rows_grid(0), rows_grid(9), rows_grid(1 << 30)), ([1, 1, 1], [2, 1, 1], [65535, 1, 1]));
    // What the CUDA path refuses, before any launch.
    let big = router("max_k = 33", 8, 2048);
    assert!(big.cuda_limits().unwrap_err().contains("`max_k` <= 32"));
    assert!(router("", 8, 1024).cuda_limits().is_ok());
}
