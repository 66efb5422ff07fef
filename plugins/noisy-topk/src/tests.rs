//! Unit tests on the plugin kit's CPU `TestHost`: eval routes without noise (hand-computed), the
//! noise is a function of the context (same context → same noise, another step, micro-batch,
//! layer or seed → other noise, eval → none), its distribution, finite differences for dx, dW and
//! dW_noise through gates, probs and logits with the noise on, the backward contract, config
//! errors, and the CUDA launches against the kernels' signatures.

use super::*;
use pith_plugin_api::kit::{test_dims, TestHost, COMMON_CUH};

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| scale * r.normal()).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

fn router(config: &str, hidden: usize, experts: usize) -> NoisyTopK {
    create(config, test_dims(hidden, experts, 4)).unwrap_or_else(|e| panic!("{config:?}: {e}"))
}

/// The identity as W (E = H), so x's rows are the clean logits.
fn identity(e: usize) -> Vec<f32> {
    (0..e * e).map(|i| if i / e == i % e { 1.0 } else { 0.0 }).collect()
}

fn eval(th: &TestHost) {
    th.set_context(Context { training: false, step: 0, ..th.host().context() });
}

/// The parameters of `r` on `th`: W, then W_n (learned noise) filled with `wn`.
fn params(th: &TestHost, r: &NoisyTopK, w: &[f32], wn: &[f32]) -> Vec<Tensor> {
    let shape = [r.experts, r.hidden];
    let mut p = vec![th.tensor_f32(w, &shape)];
    if r.noise == Noise::Learned {
        p.push(th.tensor_f32(wn, &shape));
    }
    p
}

#[test]
fn eval_routes_the_clean_logits_to_the_top_k_by_softmax() {
    let row = [1.0f32, 3.0, -1.0, 2.0, 3.0, 0.0];
    let e = row.len();
    for noise in ["learned", "jitter"] {
        for normalize in [true, false] {
            let r = router(&format!("noise = \"{noise}\"\nnormalize = {normalize}\ntop_k = 3"), e, e);
            let th = TestHost::new(1);
            eval(&th);
            let p = params(&th, &r, &identity(e), &vec![0.5; e * e]);
            let o = r.forward(th.host(), &p, th.tensor_f32(&row, &[1, e])).unwrap();
            assert_eq!(o.logits.f32s(), row, "{noise}: no noise in eval");
            assert_eq!(o.ids.i32s(), [1, 4, 3], "{noise}: the top 3 logits, a tie to the lower id");
            let z: f32 = row.iter().map(|v| v.exp()).sum();
            let sm: Vec<f32> = row.iter().map(|v| v.exp() / z).collect();
            assert!(o.probs.f32s().iter().zip(&sm).all(|(a, b)| (a - b).abs() < 1e-6), "probs = softmax");
            // normalize: the softmax over the kept logits (Shazeer's G(x)); else their probs.
            let kept = row[1].exp() + row[4].exp() + row[3].exp();
            let want = match normalize {
                true => [row[1].exp() / kept, row[4].exp() / kept, row[3].exp() / kept],
                false => [sm[1], sm[4], sm[3]],
            };
            assert!(o.weights.f32s().iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "{:?}", o.weights.f32s());
            assert!(o.saved.is_empty(), "nothing saved without noise");
            assert!(th.metrics().is_empty(), "eval records no metrics");
        }
    }
}

/// The logits of one training forward of `r` at context `ctx` on the rows `x` (W = identity, so
/// they are the clean logits plus the noise; W_n = 0.3·identity).
fn noisy_logits(r: &NoisyTopK, ctx: Context, x: &[f32]) -> Vec<f32> {
    let e = r.experts;
    let th = TestHost::new(x.len() / e);
    th.set_context(ctx);
    let wn: Vec<f32> = identity(e).iter().map(|v| 0.3 * v).collect();
    let p = params(&th, r, &identity(e), &wn);
    let o = r.forward(th.host(), &p, th.tensor_f32(x, &[x.len() / e, e])).unwrap();
    o.logits.f32s().to_vec()
}

#[test]
fn the_noise_is_a_function_of_the_context() {
    let (t, e) = (16, 8);
    let x = randn(t * e, 1, 1.0);
    for noise in ["noise = \"learned\"", "noise = \"jitter\"\njitter = 0.2"] {
        let r = router(noise, e, e);
        let ctx = TestHost::new(t).host().context();
        assert!(ctx.training);
        let base = noisy_logits(&r, ctx, &x);
        assert!(base.iter().zip(&x).all(|(a, b)| a != b), "{noise}: every logit gets noise in training");
        assert_eq!(noisy_logits(&r, ctx, &x), base, "{noise}: the same context draws the same noise");
        for (what, other) in [
            ("step", Context { step: ctx.step + 1, ..ctx }),
            ("micro-batch", Context { micro_batch: 1, micro_batches: 2, ..ctx }),
            ("layer", Context { layer: 1, ..ctx }),
            ("seed", Context { seed: ctx.seed + 1, ..ctx }),
        ] {
            let l = noisy_logits(&r, other, &x);
            let same = l.iter().zip(&base).filter(|(a, b)| a == b).count();
            assert_eq!(same, 0, "{noise}: another {what} draws other noise ({same} of {} equal)", l.len());
        }
        assert_eq!(noisy_logits(&r, Context { training: false, ..ctx }, &x), x, "{noise}: none in eval");
    }
}

#[test]
fn learned_noise_is_standard_normal_times_softplus_and_jitter_is_uniform() {
    let (t, e) = (512, 16);
    let x = vec![1.0f32; t * e]; // clean logits 1 everywhere (W = identity)
                                 // Learned, W_n = 0.3·identity: noise = ε·softplus(0.3) with ε ~ N(0, 1).
    let r = router("", e, e);
    let ctx = TestHost::new(t).host().context();
    let eps: Vec<f64> = noisy_logits(&r, ctx, &x).iter().map(|&l| (l as f64 - 1.0) / softplus(0.3) as f64).collect();
    let n = eps.len() as f64;
    let mean = eps.iter().sum::<f64>() / n;
    let var = eps.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    let inside = eps.iter().filter(|v| v.abs() < 1.0).count() as f64 / n;
    assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.06, "ε: mean {mean}, variance {var}");
    assert!((inside - 0.6827).abs() < 0.02, "ε: P(|ε| < 1) = {inside}");
    assert!(eps.iter().all(|v| v.abs() < 5.8), "Box–Muller on 24-bit uniforms stays within 5.8σ");
    // Jitter 0.2: the logits times 1 + U(-0.2, 0.2).
    let r = router("noise = \"jitter\"\njitter = 0.2", e, e);
    let f: Vec<f32> = noisy_logits(&r, ctx, &x);
    let mean = f.iter().map(|&v| v as f64).sum::<f64>() / n;
    let (lo, hi) = f.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(lo >= 0.8 && hi < 1.2 && lo < 0.81 && hi > 1.19, "jitter range [{lo}, {hi}]");
    assert!((mean - 1.0).abs() < 0.01, "jitter mean {mean}");
    // The default jitter is 0.01.
    let r = router("noise = \"jitter\"", e, e);
    assert_eq!(r.jitter, 0.01);
    let f = noisy_logits(&r, ctx, &x);
    assert!(f.iter().all(|&v| (0.99..1.01).contains(&v)) && f.iter().any(|&v| v != 1.0));
}

#[test]
fn rows_are_numbered_globally_so_a_rank_split_draws_the_same_noise() {
    let ctx = TestHost::new(8).host().context();
    let (whole, second) = (Draw::new(ctx, 0, 8), Draw::new(ctx, 1, 4)); // rank 1 of 2 holds rows 4..8
    assert_eq!(whole.key, second.key);
    for (row, e) in [(0, 0), (2, 5), (3, 7)] {
        assert_eq!(second.bits(second.index(row, e, 8)), whole.bits(whole.index(row + 4, e, 8)));
    }
    assert_ne!(whole.bits(whole.index(0, 1, 8)), whole.bits(whole.index(1, 0, 8)));
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

/// L = ⟨a, weights⟩ + ⟨b, probs⟩ + ⟨c, logits⟩ in training (noise on): backward gets (a, b, c)
/// as (d_weights, d_probs, d_logits) and must give dL/dx, dL/dW and, for learned noise, dL/dW_n.
/// Rows whose noisy logits come within 0.1 of each other are redrawn, so no step changes the ids.
#[test]
fn backward_matches_finite_differences_with_the_noise_on() {
    let (t, hd, e) = (6, 5, 6);
    for cfg in [
        "",
        "normalize = false",
        "noise = \"jitter\"\njitter = 0.3",
        "noise = \"jitter\"\nnormalize = false\njitter = 0.3",
    ] {
        let cfg = format!("top_k = 3\n{cfg}");
        let r = router(&cfg, hd, e);
        let k = r.top_k;
        let data = TestHost::new(t);
        let p = params(&data, &r, &randn(e * hd, 1, 0.6), &randn(e * hd, 2, 0.5));
        let x = data.tensor_f32(&randn(t * hd, 3, 1.0), &[t, hd]);
        let mut rng = Rng::new(4);
        for _ in 0..1000 {
            let th = TestHost::new(t);
            let o = r.forward(th.host(), &p, x).unwrap();
            let l = o.logits.f32s();
            let bad: Vec<usize> =
                (0..t).filter(|&q| (0..e).any(|a| (0..a).any(|b| (l[q * e + a] - l[q * e + b]).abs() < 0.1))).collect();
            if bad.is_empty() {
                break;
            }
            // SAFETY: x is this test's own input; no slice of it is alive.
            let xs = unsafe { x.f32s_mut() };
            bad.iter().for_each(|&q| xs[q * hd..(q + 1) * hd].iter_mut().for_each(|v| *v = rng.normal()));
        }
        let (a, b, c) = (randn(t * k, 5, 1.0), randn(t * e, 6, 1.0), randn(t * e, 7, 1.0));
        let loss = || {
            let th = TestHost::new(t);
            let o = r.forward(th.host(), &p, x).unwrap();
            let l = dot(&a, o.weights.f32s()) + dot(&b, o.probs.f32s()) + dot(&c, o.logits.f32s());
            (l, o.ids.i32s().to_vec())
        };
        let th = TestHost::new(t);
        let o = r.forward(th.host(), &p, x).unwrap();
        let g: Vec<Tensor> = p.iter().map(|_| th.zeros(&[e, hd], DType::F32)).collect();
        let dx = th.zeros(&[t, hd], DType::F32);
        let [da, db, dc] = [(&a, k), (&b, e), (&c, e)].map(|(v, n)| th.tensor_f32(v, &[t, n]));
        r.backward(th.host(), &p, &g, x, &o, da, db, dc, dx).unwrap();
        check_grad(&format!("dx ({cfg})"), x, dx.f32s(), loss);
        check_grad(&format!("dW ({cfg})"), p[0], g[0].f32s(), loss);
        if r.noise == Noise::Learned {
            assert!(g[1].f32s().iter().any(|&v| v.abs() > 1e-3), "W_n gets a gradient");
            check_grad(&format!("dW_noise ({cfg})"), p[1], g[1].f32s(), loss);
        }
    }
}

/// In eval the backward (were it called) is that of the clean router: W_n gets nothing.
#[test]
fn eval_backward_has_no_noise_and_no_noise_weight_gradient() {
    let (t, hd, e) = (4, 5, 6);
    let r = router("", hd, e);
    let th = TestHost::new(t);
    eval(&th);
    let p = params(&th, &r, &randn(e * hd, 1, 0.6), &randn(e * hd, 2, 0.5));
    let x = th.tensor_f32(&randn(t * hd, 3, 1.0), &[t, hd]);
    let o = r.forward(th.host(), &p, x).unwrap();
    let g = [th.zeros(&[e, hd], DType::F32), th.zeros(&[e, hd], DType::F32)];
    let dx = th.zeros(&[t, hd], DType::F32);
    let dw = th.tensor_f32(&randn(t * 2, 4, 1.0), &[t, 2]);
    let z = th.zeros(&[t, e], DType::F32);
    r.backward(th.host(), &p, &g, x, &o, dw, z, z, dx).unwrap();
    assert!(g[0].f32s().iter().any(|&v| v != 0.0) && g[1].f32s().iter().all(|&v| v == 0.0));
}

#[test]
fn backward_writes_dx_and_accumulates_both_weight_grads() {
    let (t, hd, e, k) = (6, 5, 6, 2);
    for cfg in ["", "noise = \"jitter\""] {
        let r = router(cfg, hd, e);
        let th = TestHost::new(t);
        let p = params(&th, &r, &randn(e * hd, 1, 0.6), &randn(e * hd, 2, 0.5));
        let x = th.tensor_f32(&randn(t * hd, 3, 1.0), &[t, hd]);
        let o = r.forward(th.host(), &p, x).unwrap();
        let (da, db, dc) = (
            th.tensor_f32(&randn(t * k, 4, 1.0), &[t, k]),
            th.tensor_f32(&randn(t * e, 5, 1.0), &[t, e]),
            th.tensor_f32(&randn(t * e, 6, 1.0), &[t, e]),
        );
        let g: Vec<Tensor> = p.iter().map(|_| th.zeros(&[e, hd], DType::F32)).collect();
        let dx = th.zeros(&[t, hd], DType::F32);
        r.backward(th.host(), &p, &g, x, &o, da, db, dc, dx).unwrap();
        let g2: Vec<Tensor> = g.iter().map(|g| th.tensor_f32(g.f32s(), &[e, hd])).collect();
        let dx2 = th.tensor_f32(&vec![f32::NAN; t * hd], &[t, hd]);
        r.backward(th.host(), &p, &g2, x, &o, da, db, dc, dx2).unwrap();
        assert_eq!(dx2.f32s(), dx.f32s(), "{cfg}: dx is written, whatever was there");
        for (twice, once) in g2.iter().zip(&g) {
            let (a, b) = (twice.f32s(), once.f32s());
            assert!(a.iter().zip(b).all(|(a, b)| (a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1.0)), "{cfg}");
            assert!(b.iter().any(|&v| v != 0.0), "{cfg}");
        }
    }
}

#[test]
fn config_defaults_params_and_errors_name_the_key() {
    let r = router("", 8, 6);
    assert_eq!((r.top_k, r.normalize, r.noise, r.jitter), (2, true, Noise::Learned, 0.01));
    let p = r.params();
    assert_eq!(p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["weight", "noise_weight"]);
    assert_eq!((p[1].init, p[1].shape.as_slice()), (Init::Zeros, &[6, 8][..]));
    let r = router("noise = \"jitter\"\njitter = 0.05\ntop_k = 1\nnormalize = false", 8, 6);
    assert_eq!((r.top_k, r.normalize, r.noise, r.jitter, r.params().len()), (1, false, Noise::Jitter, 0.05, 1));
    let err = |cfg: &str| create(cfg, test_dims(8, 6, 4)).err().unwrap_or_else(|| panic!("{cfg:?} passed"));
    let e = err("top_k = 7");
    assert!(e.contains("`top_k` = 7") && e.contains("1..=6"), "{e}");
    assert!(err("top_k = 0").contains("`top_k` = 0"));
    let e = err("noise = \"gumbel\"");
    assert!(e.contains("`noise`") && e.contains("learned") && e.contains("jitter"), "{e}");
    let e = err("jitter = 0.1");
    assert!(e.contains("`jitter`") && e.contains("`noise`"), "{e}");
    for bad in ["1.0", "-0.1", "nan"] {
        let e = err(&format!("noise = \"jitter\"\njitter = {bad}"));
        assert!(e.contains("`jitter`") && e.contains("[0, 1)"), "{e}");
    }
    assert!(err("noise_std = 1.0").contains("noise_std"));
}

#[test]
fn cuda_launches_match_the_kernel_signatures() {
    let src = cuda_source();
    assert!(src.starts_with(COMMON_CUH), "the kit's helpers come first");
    let t = Tensor::new(256, DType::F32, Device::Cuda, &[1]);
    let d = Draw { key: u64::MAX, first_row: 3 };
    for cfg in ["", "noise = \"jitter\""] {
        let r = router(cfg, 8, 8);
        assert_eq!(
            pith_plugin_api::kit::arg_kinds(&args::noise(&r, t, Some(t), 3, d)),
            pith_plugin_api::kit::kernel_params(src, "noisy_topk_noise")
        );
        assert_eq!(
            pith_plugin_api::kit::arg_kinds(&args::noise(&r, t, None, 3, d)),
            pith_plugin_api::kit::kernel_params(src, "noisy_topk_noise")
        );
        assert_eq!(
            pith_plugin_api::kit::arg_kinds(&args::fwd(&r, [t; 5], 3)),
            pith_plugin_api::kit::kernel_params(src, "noisy_topk_fwd")
        );
        assert_eq!(
            pith_plugin_api::kit::arg_kinds(&args::sum(t, t, 3)),
            pith_plugin_api::kit::kernel_params(src, "noisy_topk_sum")
        );
        assert_eq!(
            pith_plugin_api::kit::arg_kinds(&args::bwd(&r, [t; 7], Some(t), None, 3, d, 1)),
            pith_plugin_api::kit::kernel_params(src, "noisy_topk_bwd")
        );
    }
    // The key travels as its bits; an absent tensor as a null pointer.
    let a = args::noise(&router("noise = \"jitter\"", 8, 8), t, None, 3, d);
    assert!(matches!(a[1], Arg::Ptr(0)) && matches!(a[4], Arg::I64(-1)) && matches!(a[5], Arg::I64(3)));
    assert!(matches!(a[6], Arg::I32(2)) && matches!(a[7], Arg::F32(v) if v == 0.01));
    assert!(router("top_k = 33", 8, 64).cuda_limits().unwrap_err().contains("`top_k` <= 32"));
    assert!(router("", 8, 2048).cuda_limits().unwrap_err().contains("model.experts <= 1024"));
}
