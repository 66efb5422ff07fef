//! Unit tests on the plugin kit's CPU `TestHost`: hand-computed routes (where the group limit
//! changes the choice, and where "max" and "top2" group scores disagree), gates and probs for both
//! score functions, the group limit on random tokens, finite differences for dx and dW through
//! gates, probs and logits, the backward contract, config errors, and the CUDA launches against
//! the kernels' signatures.

use super::*;
use pith_plugin_api::kit::{test_dims, Rng, TestHost, COMMON_CUH};

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| scale * r.normal()).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

fn router(config: &str, hidden: usize, experts: usize) -> GroupTopK {
    create(config, test_dims(hidden, experts, 4)).unwrap_or_else(|e| panic!("{config:?}: {e}"))
}

/// The identity as W (E = H), so x's rows are the logits.
fn identity(e: usize) -> Vec<f32> {
    (0..e * e).map(|i| if i / e == i % e { 1.0 } else { 0.0 }).collect()
}

/// Route `rows` (the logits themselves) with `config`; returns (ids, weights, probs) and the metrics.
fn route(config: &str, rows: &[&[f32]]) -> (Vec<i32>, Vec<f32>, Vec<f32>, f64) {
    let e = rows[0].len();
    let r = router(config, e, e);
    let th = TestHost::new(rows.len());
    let x = th.tensor_f32(&rows.concat(), &[rows.len(), e]);
    let o = r.forward(th.host(), &[th.tensor_f32(&identity(e), &[e, e])], x).unwrap();
    assert_eq!(o.logits.f32s(), rows.concat(), "logits = x·Wᵀ");
    let entropy = th.metrics()["router_entropy"];
    (o.ids.i32s().to_vec(), o.weights.f32s().to_vec(), o.probs.f32s().to_vec(), entropy)
}

fn softmax(l: &[f32]) -> Vec<f32> {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f32 = l.iter().map(|v| (v - m).exp()).sum();
    l.iter().map(|v| (v - m).exp() / z).collect()
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert!(a.len() == b.len() && a.iter().zip(b).all(|(a, b)| (a - b).abs() <= 1e-6), "{what}: {a:?} vs {b:?}");
}

#[test]
fn the_group_limit_changes_the_choice() {
    // Groups of 2: g0 = {0,1} best 5, g1 = {2,3} best 4, g2 = {4,5} best 3.9, g3 = {6,7} best 0.
    let row: &[f32] = &[5.0, 0.0, 4.0, 0.0, 3.9, 3.8, 0.0, 0.0];
    // Plain top-3 would take 0, 2, 4; with 2 groups kept (g0, g1) it is 0, 2 and then the tie of
    // experts 1 and 3 at 0.0, which goes to the lower id.
    let (ids, w, p, _) = route("top_k = 3", &[row]);
    assert_eq!(ids, [0, 2, 1]);
    let s = softmax(row);
    close(&p, &s, "softmax probs are the scores");
    let sel = s[0] + s[2] + s[1];
    close(&w, &[s[0] / sel, s[2] / sel, s[1] / sel], "normalised gates");
    // One group kept: both experts of g0, whatever g1 holds.
    assert_eq!(route("topk_group = 1", &[row]).0, [0, 1]);
    // Every group kept: the plain top-k.
    assert_eq!(route("topk_group = 4\ntop_k = 3", &[row]).0, [0, 2, 4]);
    // n_group = 2 (groups of 4), one kept: g0 = {0..3} has 5 > 3.9.
    assert_eq!(route("n_group = 2\ntopk_group = 1\ntop_k = 3", &[row]).0, [0, 2, 1]);
}

#[test]
fn max_and_top2_group_scores_pick_different_groups() {
    // σ-scores per group: g0 = σ(3) + σ(−3) = 1.0 (best single expert), g1 = 2·σ(2) ≈ 1.76,
    // g2 ≈ 0.54, g3 = σ(2.5) + σ(−5) ≈ 0.93.
    let row: &[f32] = &[3.0, -3.0, 2.0, 2.0, -1.0, -1.0, 2.5, -5.0];
    let s: Vec<f32> = row.iter().map(|&l| sigmoid(l)).collect();
    let base = "score = \"sigmoid\"\ntopk_group = 1\ntop_k = 2";
    let (ids, w, p, _) = route(&format!("{base}\ngroup_score = \"max\""), &[row]);
    assert_eq!(ids, [0, 1], "max: the group of the best expert");
    close(&w, &[s[0] / (s[0] + s[1]), s[1] / (s[0] + s[1])], "normalised sigmoid gates");
    let total: f32 = s.iter().sum();
    close(&p, &s.iter().map(|v| v / total).collect::<Vec<_>>(), "sigmoid probs are s / Σ s");
    let (ids, w, _, _) = route(&format!("{base}\ngroup_score = \"top2\""), &[row]);
    assert_eq!(ids, [2, 3], "top2: the group whose two best sum highest (a tie: the lower id first)");
    close(&w, &[0.5, 0.5], "equal scores, equal gates");
    // Unnormalised, scaled gates: c · s.
    let (_, w, _, _) =
        route(&format!("{base}\ngroup_score = \"top2\"\nnormalize = false\nrouted_scaling_factor = 2.5"), &[row]);
    close(&w, &[2.5 * s[2], 2.5 * s[3]], "c · s");
    let (_, w, _, _) = route(&format!("{base}\nrouted_scaling_factor = 2.5"), &[row]);
    close(&w, &[2.5 * s[0] / (s[0] + s[1]), 2.5 * s[1] / (s[0] + s[1])], "c · s / Σ s");
}

#[test]
fn entropy_metric_is_the_mean_entropy_of_the_probs() {
    let rows: [&[f32]; 2] = [&[1.0, 2.0, 3.0, 4.0, 0.0, 0.0, -1.0, 0.5], &[0.0; 8]];
    for score in ["softmax", "sigmoid"] {
        let (_, _, p, entropy) = route(&format!("score = \"{score}\""), &rows);
        let h = |p: &[f32]| -p.iter().map(|&v| v as f64 * (v as f64).ln()).sum::<f64>();
        let want = (h(&p[..8]) + h(&p[8..])) / 2.0;
        assert!((entropy - want).abs() < 1e-9, "{score}: {entropy} vs {want}");
        assert!((h(&p[8..]) - 8f64.ln()).abs() < 1e-6, "{score}: equal logits, uniform probs");
    }
}

/// Each token's experts are distinct and lie in at most `topk_group` groups, and these are the
/// best groups by a group score computed here independently; the gates sum to c when normalised.
#[test]
fn random_tokens_use_at_most_topk_group_groups() {
    let (t, hd, e) = (200, 8, 16);
    for (cfg, m, kg) in [
        ("n_group = 4\ntopk_group = 2\ntop_k = 4", 4, 2),
        ("n_group = 8\ntopk_group = 3\ntop_k = 6\nscore = \"sigmoid\"\ngroup_score = \"top2\"", 2, 3),
        ("n_group = 8\ntopk_group = 4\ntop_k = 8\nscore = \"sigmoid\"\ngroup_score = \"top2\"\nrouted_scaling_factor = 2.5", 2, 4),
    ] {
        let r = router(cfg, hd, e);
        let th = TestHost::new(t);
        let (x, w) = (th.tensor_f32(&randn(t * hd, 1, 1.0), &[t, hd]), th.tensor_f32(&randn(e * hd, 2, 0.5), &[e, hd]));
        let o = r.forward(th.host(), &[w], x).unwrap();
        let (k, ng) = (r.top_k, e / m);
        let mut spread = 0;
        for tok in 0..t {
            let ids: Vec<usize> = o.ids.i32s()[tok * k..(tok + 1) * k].iter().map(|&i| i as usize).collect();
            let mut groups: Vec<usize> = ids.iter().map(|&j| j / m).collect();
            groups.sort();
            groups.dedup();
            assert!(groups.len() <= kg, "{cfg}: token {tok} uses groups {groups:?}");
            spread = spread.max(groups.len());
            let mut u = ids.clone();
            u.sort();
            u.dedup();
            assert_eq!(u.len(), k, "{cfg}: distinct experts");
            // The kept groups hold the best group scores (s from the logits, independently).
            let l = &o.logits.f32s()[tok * e..(tok + 1) * e];
            let s: Vec<f32> = if r.score == Score::Sigmoid { l.iter().map(|&v| sigmoid(v)).collect() } else { softmax(l) };
            let gscore = |g: usize| {
                let mut v = s[g * m..(g + 1) * m].to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                if r.group_score == GroupScore::Top2 { v[0] + v[1] } else { v[0] }
            };
            let worst_used = groups.iter().map(|&g| gscore(g)).fold(f32::INFINITY, f32::min);
            let unused_best = (0..ng).filter(|g| !groups.contains(g)).map(gscore).fold(f32::NEG_INFINITY, f32::max);
            // A used group beats every group left out, unless the token used fewer than kg groups.
            if groups.len() == kg {
                assert!(worst_used >= unused_best, "{cfg}: token {tok}");
            }
            let gates: f32 = o.weights.f32s()[tok * k..(tok + 1) * k].iter().sum();
            assert!((gates - r.scale).abs() < 1e-5, "{cfg}: gates sum to {gates}");
        }
        assert_eq!(spread, kg, "{cfg}: some token spreads over all kept groups");
    }
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

/// Inputs whose routing no small step changes: every logit of a row 0.1 away from every other,
/// and (with groups of 2) the group scores 0.02 apart, rows redrawn until so.
fn separated_inputs(t: usize, hd: usize, e: usize, seed: u64, r: &GroupTopK) -> (Vec<f32>, Vec<f32>) {
    let w = randn(e * hd, seed, 0.6);
    let mut rng = Rng::new(seed + 1);
    let mut x = vec![0.0; t * hd];
    let m = e / r.n_group;
    for row in x.chunks_mut(hd) {
        loop {
            row.iter_mut().for_each(|v| *v = rng.normal());
            let l: Vec<f32> = (0..e).map(|j| dot(row, &w[j * hd..(j + 1) * hd]) as f32).collect();
            let s: Vec<f32> =
                if r.score == Score::Sigmoid { l.iter().map(|&v| sigmoid(v)).collect() } else { softmax(&l) };
            let g: Vec<f32> = (0..r.n_group)
                .map(|g| match r.group_score {
                    GroupScore::Max => l[g * m..(g + 1) * m].iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    GroupScore::Top2 => s[g * m..(g + 1) * m].iter().sum(), // m = 2 here
                })
                .collect();
            let apart = |v: &[f32], gap: f32| (0..v.len()).all(|a| (0..a).all(|b| (v[a] - v[b]).abs() > gap));
            if apart(&l, 0.1) && apart(&g, 0.02) {
                break;
            }
        }
    }
    (x, w)
}

/// L = ⟨a, weights⟩ + ⟨b, probs⟩ + ⟨c, logits⟩: backward gets (a, b, c) as (d_weights, d_probs,
/// d_logits) and must give dL/dx and dL/dW, for both score functions, both group scores, with and
/// without normalisation and scaling.
#[test]
fn backward_matches_finite_differences_through_gates_probs_and_logits() {
    let (t, hd, e) = (8, 5, 8);
    for score in ["softmax", "sigmoid"] {
        for group in ["max", "top2"] {
            for extra in ["", "normalize = false", "routed_scaling_factor = 2.5"] {
                let cfg = format!("score = \"{score}\"\ngroup_score = \"{group}\"\ntop_k = 3\n{extra}");
                let r = router(&cfg, hd, e);
                let k = r.top_k;
                let data = TestHost::new(t);
                let (xv, wv) = separated_inputs(t, hd, e, 7, &r);
                let (x, w) = (data.tensor_f32(&xv, &[t, hd]), data.tensor_f32(&wv, &[e, hd]));
                let (a, b, c) = (randn(t * k, 3, 1.0), randn(t * e, 4, 1.0), randn(t * e, 5, 1.0));
                let loss = || {
                    let th = TestHost::new(t);
                    let o = r.forward(th.host(), &[w], x).unwrap();
                    let l = dot(&a, o.weights.f32s()) + dot(&b, o.probs.f32s()) + dot(&c, o.logits.f32s());
                    (l, o.ids.i32s().to_vec())
                };
                let th = TestHost::new(t);
                let o = r.forward(th.host(), &[w], x).unwrap();
                let (gw, dx) = (th.zeros(&[e, hd], DType::F32), th.zeros(&[t, hd], DType::F32));
                let [da, db, dc] = [(&a, k), (&b, e), (&c, e)].map(|(v, n)| th.tensor_f32(v, &[t, n]));
                r.backward(th.host(), &[w], &[gw], x, &o, da, db, dc, dx).unwrap();
                check_grad(&format!("dx ({cfg})"), x, dx.f32s(), loss);
                check_grad(&format!("dW ({cfg})"), w, gw.f32s(), loss);
            }
        }
    }
}

#[test]
fn backward_writes_dx_and_accumulates_the_weight_grad() {
    let (t, hd, e, k) = (6, 5, 8, 2);
    let r = router("score = \"sigmoid\"\ngroup_score = \"top2\"", hd, e);
    let th = TestHost::new(t);
    let (xv, wv) = separated_inputs(t, hd, e, 21, &r);
    let (x, w) = (th.tensor_f32(&xv, &[t, hd]), th.tensor_f32(&wv, &[e, hd]));
    let o = r.forward(th.host(), &[w], x).unwrap();
    let (da, db, dc) = (
        th.tensor_f32(&randn(t * k, 1, 1.0), &[t, k]),
        th.tensor_f32(&randn(t * e, 2, 1.0), &[t, e]),
        th.tensor_f32(&randn(t * e, 3, 1.0), &[t, e]),
    );
    let run = |gw: Tensor, dx: Tensor| r.backward(th.host(), &[w], &[gw], x, &o, da, db, dc, dx).unwrap();
    let (gw, dx) = (th.zeros(&[e, hd], DType::F32), th.zeros(&[t, hd], DType::F32));
    run(gw, dx);
    let gw2 = th.tensor_f32(gw.f32s(), &[e, hd]);
    let dx2 = th.tensor_f32(&vec![f32::NAN; t * hd], &[t, hd]);
    run(gw2, dx2);
    assert_eq!(dx2.f32s(), dx.f32s(), "dx is written, whatever was there");
    assert!(gw2.f32s().iter().zip(gw.f32s()).all(|(a, b)| (a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1.0)));
    assert!(gw.f32s().iter().any(|&g| g != 0.0));
}

#[test]
fn config_defaults_and_errors_name_the_key() {
    let r = router("", 8, 8);
    let got = (r.n_group, r.topk_group, r.top_k, r.score, r.group_score, r.normalize, r.scale);
    assert_eq!(got, (4, 2, 2, Score::Softmax, GroupScore::Max, true, 1.0));
    let r = router("n_group = 8\ntopk_group = 4\ntop_k = 8\nscore = \"sigmoid\"\ngroup_score = \"top2\"", 8, 16);
    assert_eq!((r.score, r.group_score, r.top_k), (Score::Sigmoid, GroupScore::Top2, 8));
    let p = r.params();
    assert_eq!((p.len(), p[0].name.as_str(), p[0].shape.as_slice(), p[0].decay), (1, "weight", &[16, 8][..], true));
    let err = |cfg: &str, e: usize| create(cfg, test_dims(8, e, 4)).err().unwrap_or_else(|| panic!("{cfg:?} passed"));
    let e = err("", 6);
    assert!(e.contains("`n_group` = 4") && e.contains("6 experts"), "{e}");
    assert!(err("n_group = 0", 8).contains("`n_group` = 0"));
    assert!(err("n_group = 3", 8).contains("`n_group` = 3"));
    let e = err("topk_group = 5", 8);
    assert!(e.contains("`topk_group` = 5") && e.contains("1..=4"), "{e}");
    assert!(err("topk_group = 0", 8).contains("`topk_group` = 0"));
    let e = err("top_k = 5", 8);
    assert!(e.contains("`top_k` = 5") && e.contains("1..=4"), "{e}");
    assert!(err("top_k = 0", 8).contains("`top_k` = 0"));
    assert!(create("top_k = 4", test_dims(8, 8, 4)).is_ok(), "top_k = topk_group · E / n_group is allowed");
    let e = err("n_group = 8\ntopk_group = 2\ngroup_score = \"top2\"", 8);
    assert!(e.contains("`group_score`") && e.contains("2 experts"), "{e}");
    let e = err("score = \"tanh\"", 8);
    assert!(e.contains("`score`") && e.contains("softmax"), "{e}");
    let e = err("group_score = \"mean\"", 8);
    assert!(e.contains("`group_score`") && e.contains("top2"), "{e}");
    let e = err("routed_scaling_factor = 0.0", 8);
    assert!(e.contains("`routed_scaling_factor`"), "{e}");
    assert!(err("routed_scaling_factor = nan", 8).contains("`routed_scaling_factor`"));
    assert!(err("bias_update = 0.1", 8).contains("bias_update"));
    assert!(err("normalize = 3", 8).contains("normalize"));
}

#[test]
fn cuda_launches_match_the_kernel_signatures() {
    let src = cuda_source();
    assert!(src.starts_with(COMMON_CUH), "the kit's helpers come first");
    let r = router("score = \"sigmoid\"\ngroup_score = \"top2\"", 8, 8);
    let t = Tensor::new(256, DType::F32, Device::Cuda, &[1]);
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::fwd(&r, [t; 6], 3)),
        pith_plugin_api::kit::kernel_params(src, "group_topk_fwd")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::sum(t, t, 3)),
        pith_plugin_api::kit::kernel_params(src, "group_topk_sum")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::bwd(&r, [t; 8], 3)),
        pith_plugin_api::kit::kernel_params(src, "group_topk_bwd")
    );
    // The flags travel as 0/1 in the order the kernel reads them: sigmoid, top2, normalize.
    let a = args::fwd(&r, [t; 6], 3);
    let ints: Vec<i32> = a.iter().filter_map(|a| if let Arg::I32(v) = a { Some(*v) } else { None }).collect();
    assert_eq!(ints, [3, 8, 4, 2, 2, 1, 1, 1]);
    // What the CUDA path refuses, before any launch.
    assert!(router("n_group = 64\ntopk_group = 1", 8, 128).cuda_limits().unwrap_err().contains("`n_group` <= 32"));
    assert!(router("n_group = 4", 8, 2048).cuda_limits().unwrap_err().contains("model.experts <= 1024"));
    assert!(router("n_group = 32\ntopk_group = 32\ntop_k = 32", 8, 1024).cuda_limits().is_ok());
}
