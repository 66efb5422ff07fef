//! Unit tests on the plugin kit's CPU `TestHost`: gradients by finite differences, what the
//! forward selects and gates, the bias update, and that eval does not count load.
//!
//! SAFETY, for every `f32s_mut` below: the tensors are the test's own, and no other slice of the
//! one written is alive at that moment.

use super::*;
use pith_plugin_api::kit::{test_dims, Rng, TestHost};
use pith_plugin_api::Context;

/// n standard normal values of stream `seed`, times `scale`.
fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| scale * r.normal()).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// The router's three declared tensors on `th`: W, the bias and a zeroed load.
fn params(th: &TestHost, w: &[f32], bias: &[f32]) -> [Tensor; 3] {
    let (e, h) = (bias.len(), w.len() / bias.len());
    [th.tensor_f32(w, &[e, h]), th.tensor_f32(bias, &[e]), th.zeros(&[e], DType::F32)]
}

fn router(cfg: &str, hidden: usize, experts: usize) -> SigmoidBias {
    create(cfg, test_dims(hidden, experts, 4)).unwrap_or_else(|e| panic!("{cfg}: {e}"))
}

/// L = ⟨a, weights⟩ + ⟨b, probs⟩ + ⟨c, logits⟩, all three non-zero: backward gets (a, b, c) as
/// (d_weights, d_probs, d_logits) and must give dL/dx (written over noise) and dL/dW (added onto
/// what was there), against central differences; none for the bias.
#[test]
fn backward_matches_finite_differences_through_gates_probs_and_logits() {
    let (t, hd, e, k) = (6, 5, 7, 3);
    for (cfg, seed) in
        [("", 10), ("normalize = false\nrouted_scaling_factor = 2.5", 20), ("routed_scaling_factor = 2.5", 30)]
    {
        let r = router(&format!("top_k = {k}\n{cfg}"), hd, e);
        let (mut xv, mut wv) = (randn(t * hd, seed, 1.0), randn(e * hd, seed + 1, 0.7));
        let bias = randn(e, seed + 2, 0.3); // large enough to change the selection
        let (a, b, c) = (randn(t * k, seed + 3, 1.0), randn(t * e, seed + 4, 1.0), randn(t * e, seed + 5, 1.0));
        // (loss, ids) of the forward at x, W.
        let run = |x: &[f32], w: &[f32]| {
            let th = TestHost::new(t);
            let p = params(&th, w, &bias);
            let o = r.forward(th.host(), &p, th.tensor_f32(x, &[t, hd])).unwrap();
            let l = dot(&a, o.weights.f32s()) + dot(&b, o.probs.f32s()) + dot(&c, o.logits.f32s());
            (l, o.ids.i32s().to_vec())
        };
        let th = TestHost::new(t);
        let (x, p) = (th.tensor_f32(&xv, &[t, hd]), params(&th, &wv, &bias));
        let o = r.forward(th.host(), &p, x).unwrap();
        // The bias matters here: some token's experts differ from the top k of s alone.
        let by_s = |row: &[f32]| {
            let mut o: Vec<usize> = (0..e).collect();
            o.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
            o[..k].iter().map(|&j| j as i32).collect::<Vec<_>>()
        };
        let ids = o.ids.i32s();
        assert!(
            (0..t).any(|r| by_s(&o.probs.f32s()[r * e..(r + 1) * e]) != ids[r * k..(r + 1) * k]),
            "{cfg}: the bias never changed a choice; pick another seed"
        );
        let g0 = randn(e * hd, seed + 6, 1.0);
        let (gw, dx) = (th.tensor_f32(&g0, &[e, hd]), th.tensor_f32(&randn(t * hd, seed + 7, 9.0), &[t, hd]));
        let none = th.zeros(&[0], DType::F32);
        let [da, db, dc] = [(&a, k), (&b, e), (&c, e)].map(|(v, n)| th.tensor_f32(v, &[t, n]));
        r.backward(th.host(), &p, &[gw, none, none], x, &o, da, db, dc, dx).unwrap();
        let dw: Vec<f32> = gw.f32s().iter().zip(&g0).map(|(g, g0)| g - g0).collect();
        let (dxv, ids0) = (dx.f32s().to_vec(), ids.to_vec());
        let eps = 1e-3f32;
        for (what, grad, on_x) in [("dx", &dxv, true), ("dW", &dw, false)] {
            let n = grad.len();
            let (mut skipped, mut worst, mut big) = (0, 0.0f64, 1e-3f64);
            let mut diffs = vec![];
            for i in 0..n {
                let v = if on_x { &mut xv } else { &mut wv };
                let v0 = v[i];
                v[i] = v0 + eps;
                let (up, iu) = run(&xv, &wv);
                let v = if on_x { &mut xv } else { &mut wv };
                v[i] = v0 - eps;
                let (down, id) = run(&xv, &wv);
                let v = if on_x { &mut xv } else { &mut wv };
                v[i] = v0;
                if iu != ids0 || id != ids0 {
                    skipped += 1; // ±eps flipped a choice: not differentiable there
                    continue;
                }
                let fd = (up - down) / (2.0 * eps as f64);
                big = big.max(fd.abs());
                diffs.push((i, fd, grad[i] as f64));
            }
            for &(i, fd, an) in &diffs {
                worst = f64::max(worst, (fd - an).abs());
                assert!((fd - an).abs() <= 1e-2 * big, "{cfg} {what}[{i}]: finite difference {fd}, backward {an}");
            }
            assert!(skipped * 10 <= n, "{cfg} {what}: {skipped} of {n} coordinates flipped the selection");
            assert!(grad.iter().any(|&g| g.abs() > 1e-3), "{cfg} {what} is all but zero");
            println!("{cfg:?} {what}: {} coords, max error {worst:.2e} of max |d| {big:.2e}", diffs.len());
        }
    }
}

/// Each of the three output gradients alone reaches W: none of the paths is dropped.
#[test]
fn every_output_gradient_reaches_the_weight() {
    let (t, hd, e, k) = (4, 3, 5, 2);
    let r = router(&format!("top_k = {k}"), hd, e);
    let th = TestHost::new(t);
    let (x, p) = (th.tensor_f32(&randn(t * hd, 1, 1.0), &[t, hd]), params(&th, &randn(e * hd, 2, 1.0), &[0.0; 5]));
    let o = r.forward(th.host(), &p, x).unwrap();
    for which in 0..3 {
        let grads = [(t, k), (t, e), (t, e)].map(|(a, b)| th.zeros(&[a, b], DType::F32));
        unsafe { grads[which].f32s_mut() }.copy_from_slice(&randn(grads[which].numel(), 3, 1.0));
        let (gw, dx, none) =
            (th.zeros(&[e, hd], DType::F32), th.zeros(&[t, hd], DType::F32), th.zeros(&[0], DType::F32));
        r.backward(th.host(), &p, &[gw, none, none], x, &o, grads[0], grads[1], grads[2], dx).unwrap();
        let n = gw.f32s().iter().map(|g| g.abs()).fold(0.0f32, f32::max);
        assert!(n > 1e-3, "output grad {which} alone gives a zero dW");
    }
}

/// A one-token layout with logits = W (H = 1, x = 1): s = σ(W).
fn route(cfg: &str, logits: &[f32], bias: &[f32]) -> (Vec<i32>, Vec<f32>, Vec<f32>) {
    let e = logits.len();
    let r = router(cfg, 1, e);
    let th = TestHost::new(1);
    let o = r.forward(th.host(), &params(&th, logits, bias), th.tensor_f32(&[1.0], &[1, 1])).unwrap();
    (o.ids.i32s().to_vec(), o.weights.f32s().to_vec(), o.probs.f32s().to_vec())
}

#[test]
fn selection_uses_scores_plus_bias_and_gates_use_the_scores() {
    let logits = [2.0f32, 1.0, 0.0, -1.0];
    let s: Vec<f32> = logits.iter().map(|&l| sigmoid(l)).collect();
    let q: f32 = s.iter().sum();
    // No bias: the top two scores, gates s / Σ s over the chosen.
    let (ids, w, probs) = route("top_k = 2", &logits, &[0.0; 4]);
    assert_eq!(ids, [0, 1]);
    assert_eq!(w, [s[0] / (s[0] + s[1]), s[1] / (s[0] + s[1])]);
    let want: Vec<f32> = s.iter().map(|v| v / q).collect();
    assert_eq!(probs, want, "probs are s / Σ_e s");
    // A bias on expert 2 (s 0.5 + 0.5 = 1.0 > 0.88): chosen first, but gated by its s alone.
    let (ids, w, probs2) = route("top_k = 2", &logits, &[0.0, 0.0, 0.5, 0.0]);
    assert_eq!(ids, [2, 0]);
    assert_eq!(w, [s[2] / (s[2] + s[0]), s[0] / (s[2] + s[0])]);
    assert_eq!(probs2, probs, "the bias does not touch probs");
    // A negative bias pushes the best expert out.
    let (ids, _, _) = route("top_k = 2", &logits, &[-0.5, 0.0, 0.0, 0.0]);
    assert_eq!(ids, [1, 2]);
    // Without normalisation the gates are c·s.
    let (ids, w, _) =
        route("top_k = 2\nnormalize = false\nrouted_scaling_factor = 2.5", &logits, &[0.0, 0.0, 0.5, 0.0]);
    assert_eq!((ids, w), (vec![2, 0], vec![2.5 * s[2], 2.5 * s[0]]));
    // Normalised gates times the scaling factor sum to it.
    let (_, w, _) = route("top_k = 3\nrouted_scaling_factor = 2.5", &logits, &[0.1, -0.2, 0.3, 0.0]);
    assert!((w.iter().sum::<f32>() - 2.5).abs() < 1e-6, "{w:?}");
    // Ties in s + b go to the lower id.
    let (ids, _, _) = route("top_k = 2", &[0.0; 4], &[0.0, 0.1, 0.0, 0.1]);
    assert_eq!(ids, [1, 3]);
}

/// DeepSeek-V3's node-limited routing: 8 experts in 4 groups of 2, a token keeps the 2 groups
/// whose two s + b sum highest and picks its experts there, even past a better single expert.
#[test]
fn groups_limit_the_selection_to_the_best_groups_by_their_top_two() {
    // s + b by group: [0.9, 0.1] sums 1.0; [0.6, 0.6] 1.2; [0.95, 0.0] 0.95; [0.55, 0.5] 1.05.
    let want = [0.9f32, 0.1, 0.6, 0.6, 0.95, 0.0, 0.55, 0.5];
    let logits: Vec<f32> = want.iter().map(|&p| (p / (1.0 - p)).ln()).collect();
    let cfg = "top_k = 2\nn_group = 4\ntopk_group = 2";
    let (ids, w, _) = route(cfg, &logits, &[0.0; 8]);
    // Groups 1 (1.2) and 3 (1.05) stay; expert 4 (0.95, the best alone) is out with group 2.
    assert_eq!(ids, [2, 3]);
    assert!((w[0] - 0.5).abs() < 1e-6 && (w[1] - 0.5).abs() < 1e-6, "{w:?}");
    // The bias takes part in the group scores: +0.3 on expert 5 lifts group 2 to 1.25.
    let (ids, _, _) = route(cfg, &logits, &[0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0]);
    assert_eq!(ids, [4, 2]);
    // One group each of all 8 is no limit: the global top 2.
    let (ids, _, _) = route("top_k = 2\nn_group = 4\ntopk_group = 4", &logits, &[0.0; 8]);
    assert_eq!(ids, [4, 0]);
}

#[test]
fn end_step_moves_the_bias_against_the_load_by_exactly_the_rate() {
    let th = TestHost::new(1);
    let r = router("bias_update = 0.01", 2, 4);
    let b0 = [0.1f32, -0.2, 0.0, 0.05];
    let p = params(&th, &[0.0; 8], &b0);
    // Load 5, 1, 3, 3: mean 3 → the busy expert down, the idle one up, the average ones unchanged.
    unsafe { p[LOAD].f32s_mut() }.copy_from_slice(&[5.0, 1.0, 3.0, 3.0]);
    r.end_step(th.host(), &p).unwrap();
    assert_eq!(p[BIAS].f32s(), [0.1 - 0.01, -0.2 + 0.01, 0.0, 0.05]);
    assert_eq!(p[LOAD].f32s(), [5.0, 1.0, 3.0, 3.0], "the host zeroes the accumulator, not end_step");
    assert!((th.metrics()["bias_absmax"] - (0.2f32 - 0.01) as f64).abs() < 1e-9);
    // bias_update = 0 disables it; a balanced or empty load moves nothing.
    let before = p[BIAS].f32s().to_vec();
    router("bias_update = 0", 2, 4).end_step(th.host(), &p).unwrap();
    assert_eq!(p[BIAS].f32s(), before);
    for load in [[2.0f32; 4], [0.0; 4]] {
        unsafe { p[LOAD].f32s_mut() }.copy_from_slice(&load);
        r.end_step(th.host(), &p).unwrap();
        assert_eq!(p[BIAS].f32s(), before, "load {load:?}");
    }
}

/// Forward in training, then end_step, then the host's zeroing, as a run does: an expert the
/// weights favour loses its lead, and the load evens out.
#[test]
fn repeated_steps_balance_a_skewed_load() {
    let (t, hd, e, k) = (64, 4, 4, 1);
    let r = router("top_k = 1\nbias_update = 0.01", hd, e);
    let th = TestHost::new(t);
    // Feature 0 is large in every token and only expert 0 reads it: it wins most tokens at b = 0.
    let x: Vec<f32> =
        randn(t * hd, 5, 1.0).iter().enumerate().map(|(i, v)| v + if i % hd == 0 { 3.0 } else { 0.0 }).collect();
    let mut w = randn(e * hd, 6, 0.5);
    (0..e).for_each(|j| w[j * hd] = if j == 0 { 1.0 } else { 0.0 });
    let (x, p) = (th.tensor_f32(&x, &[t, hd]), params(&th, &w, &[0.0; 4]));
    let load_of =
        |o: &RouterOut| (0..e).map(|j| o.ids.i32s().iter().filter(|&&i| i == j as i32).count()).collect::<Vec<_>>();
    let first = load_of(&r.forward(th.host(), &p, x).unwrap());
    assert!(first[0] > t * k * 3 / 4, "expert 0 takes most tokens at first: {first:?}");
    r.end_step(th.host(), &p).unwrap();
    assert!(p[BIAS].f32s()[0] < 0.0 && p[BIAS].f32s()[1..].iter().all(|&b| b > 0.0), "{:?}", p[BIAS].f32s());
    unsafe { p[LOAD].f32s_mut() }.fill(0.0);
    for _ in 0..200 {
        r.forward(th.host(), &p, x).unwrap();
        r.end_step(th.host(), &p).unwrap();
        unsafe { p[LOAD].f32s_mut() }.fill(0.0);
    }
    let last = load_of(&r.forward(th.host(), &p, x).unwrap());
    assert!(*last.iter().max().unwrap() <= 2 * t * k / e, "still skewed after 200 steps: {last:?}");
}

/// Training forwards add their assignment counts (summed over micro-batches); eval adds nothing.
#[test]
fn only_training_forwards_count_load() {
    let (t, hd, e, k) = (8, 3, 5, 2);
    let r = router(&format!("top_k = {k}"), hd, e);
    let th = TestHost::new(t);
    let (x, p) = (th.tensor_f32(&randn(t * hd, 7, 1.0), &[t, hd]), params(&th, &randn(e * hd, 8, 1.0), &[0.0; 5]));
    let ctx = th.host().context();
    th.set_context(Context { training: false, step: 0, ..ctx });
    r.forward(th.host(), &p, x).unwrap();
    assert_eq!(p[LOAD].f32s(), [0.0; 5], "an eval forward counted load");
    let mut want = [0.0f32; 5];
    for micro in 0..2 {
        th.set_context(Context { training: true, micro_batch: micro, micro_batches: 2, ..ctx });
        let o = r.forward(th.host(), &p, x).unwrap();
        o.ids.i32s().iter().for_each(|&i| want[i as usize] += 1.0);
    }
    assert_eq!(p[LOAD].f32s(), want);
    assert_eq!(want.iter().sum::<f32>(), (2 * t * k) as f32);
}

#[test]
fn config_is_validated_naming_the_key() {
    let err = |cfg: &str| create(cfg, test_dims(4, 6, 4)).err().unwrap_or_else(|| panic!("{cfg} was accepted"));
    for (cfg, key) in [
        ("top_k = 0", "`top_k`"),
        ("top_k = 7", "`top_k`"),
        ("top_k = -1", "`top_k`"),
        ("bias_update = -1e-3", "`bias_update`"),
        ("bias_update = nan", "`bias_update`"),
        ("routed_scaling_factor = 0.0", "`routed_scaling_factor`"),
        ("routed_scaling_factor = inf", "`routed_scaling_factor`"),
        ("normalize = 1", "`normalize`"),
        ("topk = 2", "topk"),
        ("n_group = 4", "`n_group`"),
        ("n_group = 6", "`n_group`"),
        ("n_group = 3\ntopk_group = 4", "`topk_group`"),
        ("n_group = 3\ntopk_group = 0", "`topk_group`"),
        ("top_k = 3\nn_group = 3\ntopk_group = 1", "`topk_group`"),
    ] {
        let e = err(cfg);
        assert!(e.contains(key) && !e.contains('\n'), "{cfg}: {e}");
    }
    assert!(err("top_k = 7").contains("1..=6"));
    let r = create("", test_dims(4, 6, 4)).unwrap();
    assert_eq!((r.top_k, r.rate, r.scale, r.normalize), (2, 1e-3, 1.0, true));
    let names: Vec<(String, pith_plugin_api::Role)> = r.params().iter().map(|p| (p.name.to_string(), p.role)).collect();
    use pith_plugin_api::Role::*;
    assert_eq!(names, [("weight".into(), Param), ("bias".into(), Buffer), ("load".into(), Accumulator)]);
}
