//! Unit tests on the plugin kit's CPU `TestHost`: the selection on hand-computed inputs (ties
//! included), the capacity, the invariants on random inputs (every expert takes exactly its
//! capacity, EMPTY slots trail, descending scores), finite differences for dx and dW through the
//! gates, probs and logits, the backward contract, config errors, the CUDA launches against the
//! kernels' signatures, and the CUDA kernel's radix-select walk (mirrored here) against a sort.

use super::*;
use pith_plugin_api::kit::{test_dims, Rng, TestHost, COMMON_CUH};
use pith_plugin_api::Context;

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| scale * r.normal()).collect()
}

/// Uniform in 0..n.
fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

fn router(config: &str, hidden: usize, experts: usize) -> ExpertChoice {
    create(config, test_dims(hidden, experts, 4)).unwrap()
}

/// The identity as W (E = H), so x's rows are the logits.
fn identity(e: usize) -> Vec<f32> {
    (0..e * e).map(|i| if i / e == i % e { 1.0 } else { 0.0 }).collect()
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f32 = row.iter().map(|&v| (v - m).exp()).sum();
    row.iter().map(|&v| (v - m).exp() / z).collect()
}

/// Route `rows` (the logits: W is the identity) with `config`; returns the output and the host.
fn route_logits(config: &str, rows: &[Vec<f32>]) -> (RouterOut, TestHost) {
    let (t, e) = (rows.len(), rows[0].len());
    let r = router(config, e, e);
    let th = TestHost::new(t);
    let x = th.tensor_f32(&rows.concat(), &[t, e]);
    let w = th.tensor_f32(&identity(e), &[e, e]);
    let o = r.forward(th.host(), &[w], x).unwrap();
    (o, th)
}

/// Each token's experts (its non-EMPTY slots), checking that the EMPTY slots trail with gate 0.
fn experts_of(o: &RouterOut) -> Vec<Vec<i32>> {
    let k = o.ids.dim(1);
    let (id, w) = (o.ids.i32s(), o.weights.f32s());
    (0..o.ids.dim(0))
        .map(|r| {
            let n = id[r * k..(r + 1) * k].iter().take_while(|&&i| i != EMPTY).count();
            assert!(id[r * k + n..(r + 1) * k].iter().all(|&i| i == EMPTY), "row {r}: EMPTY slots must trail");
            assert!(w[r * k + n..(r + 1) * k].iter().all(|&v| v == 0.0), "row {r}: EMPTY slots have gate 0");
            id[r * k..r * k + n].to_vec()
        })
        .collect()
}

#[test]
fn each_expert_takes_its_top_capacity_tokens() {
    // E = 3, T = 6, k_avg = 1: capacity ⌈6·1/3⌉ = 2 tokens per expert.
    let rows = vec![
        vec![2.0, 0.0, 0.0], // S ≈ [.787, .106, .106]: expert 0's best, tied with tokens 1 and 4
        vec![2.0, 0.0, 0.0], // the same scores: expert 0 takes token 0 and 1 (lower index first)
        vec![0.0, 3.0, 2.5], // S ≈ [.030, .604, .366]: expert 1's best, expert 2's second
        vec![0.0, 0.0, 0.0], // S = 1/3 each: expert 1's second (1/3 > .114 > .106)
        vec![2.0, 0.0, 0.0], // expert 0's third: dropped by every expert (unrouted)
        vec![0.0, 1.0, 3.0], // S ≈ [.042, .114, .844]: expert 2's best
    ];
    let (o, th) = route_logits("k_avg = 1", &rows);
    let want: Vec<Vec<i32>> = vec![vec![0], vec![0], vec![1, 2], vec![1], vec![], vec![2]];
    assert_eq!(experts_of(&o), want);
    assert_eq!(o.ids.dims(), [6, 2], "k = the most experts of any token (token 2's two)");
    assert_eq!(o.logits.f32s(), rows.concat().as_slice());
    for (t, row) in rows.iter().enumerate() {
        let s = softmax(row);
        let p = &o.probs.f32s()[t * 3..(t + 1) * 3];
        assert!(p.iter().zip(&s).all(|(p, s)| (p - s).abs() < 1e-6), "probs are the softmax: {p:?} vs {s:?}");
        for (slot, &j) in want[t].iter().enumerate() {
            // The gate is the score itself, not renormalised over the token's experts.
            assert_eq!(o.weights.f32s()[t * 2 + slot], p[j as usize], "token {t} slot {slot}");
        }
    }
    assert!((o.weights.f32s()[4] - 0.604).abs() < 1e-3 && (o.weights.f32s()[5] - 0.366).abs() < 1e-3);
    let m = th.metrics();
    assert!((m["experts_per_token"] - 1.0).abs() < 1e-12, "{m:?}");
    assert!((m["unrouted_frac"] - 1.0 / 6.0).abs() < 1e-12, "{m:?}");
}

#[test]
fn ties_go_to_the_lower_token_then_the_lower_expert() {
    // Every score is 1/2: each expert takes one token (⌈2·1/2⌉), token 0 (the lower index); token 0
    // lists its two experts in id order, token 1 gets none.
    let (o, th) = route_logits("k_avg = 1", &[vec![0.0, 0.0], vec![-5.0, -5.0]]);
    assert_eq!(o.ids.i32s(), [0, 1, EMPTY, EMPTY]);
    assert_eq!(o.weights.f32s(), [0.5, 0.5, 0.0, 0.0]);
    assert!((th.metrics()["unrouted_frac"] - 0.5).abs() < 1e-12);
    // A NaN score ranks below every other (the host refuses non-finite outputs anyway).
    assert_eq!((key(f32::NAN), key(0.0), key(-0.0)), (0, 1, 1));
    assert!(key(1e-30) > key(0.0) && key(0.5) > key(0.25) && key(1.0) > key(0.9999999));
}

#[test]
fn capacity_follows_the_factor_and_k_avg_capped_at_t() {
    let r = router("", 8, 8); // capacity_factor 1, k_avg 2
    assert_eq!((r.capacity_factor, r.k_avg), (1.0, 2));
    assert_eq!([r.capacity(0), r.capacity(1), r.capacity(8), r.capacity(9), r.capacity(1024)], [0, 1, 2, 3, 256]);
    let r = router("capacity_factor = 1.25\nk_avg = 1", 8, 4);
    assert_eq!([r.capacity(8), r.capacity(10), r.capacity(64)], [3, 4, 20]); // ⌈2.5⌉, ⌈3.125⌉, 20
    let r = router("capacity_factor = 3.0\nk_avg = 4", 8, 4);
    assert_eq!(r.capacity(10), 10, "at most T");
    let r = router("capacity_factor = 0.001", 8, 8);
    assert_eq!(r.capacity(10), 1, "at least one token per expert when there are tokens");
}

#[test]
fn on_random_inputs_every_expert_takes_exactly_its_capacity() {
    let (t, hd, e) = (40, 8, 8);
    for (config, seed) in [("", 1), ("k_avg = 1\ncapacity_factor = 0.5", 2), ("capacity_factor = 2.0", 3)] {
        let r = router(config, hd, e);
        let cap = r.capacity(t);
        let th = TestHost::new(t);
        let (xv, wv) = (randn(t * hd, seed, 1.0), randn(e * hd, seed + 10, 0.5));
        let (x, w) = (th.tensor_f32(&xv, &[t, hd]), th.tensor_f32(&wv, &[e, hd]));
        let o = r.forward(th.host(), &[w], x).unwrap();
        let lists = experts_of(&o);
        let p = o.probs.f32s();
        for j in 0..e as i32 {
            let takers: Vec<usize> = (0..t).filter(|&r| lists[r].contains(&j)).collect();
            assert_eq!(takers.len(), cap, "{config}: expert {j} takes its capacity");
            // No token left out scores higher than one taken.
            let low = takers.iter().map(|&r| p[r * e + j as usize]).fold(f32::INFINITY, f32::min);
            assert!((0..t).filter(|r| !takers.contains(r)).all(|r| p[r * e + j as usize] <= low), "{config}");
        }
        let k = o.ids.dim(1);
        assert_eq!(k, lists.iter().map(Vec::len).max().unwrap().max(1), "{config}: k is the most of any token");
        for (r, list) in lists.iter().enumerate() {
            let s: Vec<f32> = list.iter().map(|&j| p[r * e + j as usize]).collect();
            assert!(s.windows(2).all(|w| w[0] >= w[1]), "{config}: row {r} by descending score: {s:?}");
            assert_eq!(&o.weights.f32s()[r * k..r * k + list.len()], s.as_slice(), "{config}: gates are S");
        }
        let m = th.metrics();
        let unrouted = lists.iter().filter(|l| l.is_empty()).count() as f64 / t as f64;
        assert!((m["experts_per_token"] - (cap * e) as f64 / t as f64).abs() < 1e-12, "{config}: {m:?}");
        assert!((m["unrouted_frac"] - unrouted).abs() < 1e-12, "{config}: {m:?}");
        if config.contains("0.5") {
            assert!(unrouted > 0.0, "half the capacity leaves tokens unrouted");
        }
        if config.contains("2.0") {
            assert!(k > 2, "tokens get more than k_avg experts: k = {k}");
        }
    }
    // Eval records no metrics.
    let r = router("", hd, e);
    let th = TestHost::new(t);
    th.set_context(Context { training: false, ..th.host().context() });
    let (x, w) = (th.tensor_f32(&randn(t * hd, 4, 1.0), &[t, hd]), th.tensor_f32(&randn(e * hd, 5, 0.5), &[e, hd]));
    r.forward(th.host(), &[w], x).unwrap();
    assert!(th.metrics().is_empty());
}

#[test]
fn a_token_may_get_none_or_every_expert_and_routing_depends_on_the_other_tokens() {
    let (e, rows) = (3, vec![vec![5.0, 5.0, 5.0], vec![-5.0, -5.0, -5.0], vec![0.0, -9.0, -9.0]]);
    // Identical rows score 1/3 everywhere; token 2 is mostly expert 0's. k_avg 1: one token each.
    let (o, _th) = route_logits("k_avg = 1", &rows);
    assert_eq!(experts_of(&o), vec![vec![1, 2], vec![], vec![0]]);
    // Token 0 with another token after it that outbids it for expert 2: token 0 loses expert 2.
    let mut more = rows.clone();
    more.push(vec![-9.0, -9.0, 0.0]);
    more.push(vec![-9.0, -9.0, -8.0]);
    more.push(vec![-9.0, -9.0, -8.5]);
    let (o, _th) = route_logits("k_avg = 1", &more);
    assert_eq!(o.ids.dim(0), 6);
    // Capacity ⌈6/3⌉ = 2 now: expert 2 takes tokens 3 and 4 instead of token 0, experts 0 and 1
    // take token 0 and their best other (token 2; token 1, tied with token 0 at 1/3).
    let want: Vec<Vec<i32>> = vec![vec![0, 1], vec![1], vec![0], vec![2], vec![2], vec![]];
    assert_eq!(experts_of(&o), want);
    // k_avg = E with capacity_factor 1: every expert takes every token.
    let (o, th) = route_logits(&format!("k_avg = {e}"), &rows);
    assert_eq!(o.ids.dims(), [3, 3]);
    assert!(experts_of(&o).iter().all(|l| l.len() == 3));
    assert!((th.metrics()["experts_per_token"] - 3.0).abs() < 1e-12);
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// x [T,H] (with W [E,H]) whose every expert column has a gap ≥ `gap` between its capacity-th and
/// next score, so no small step changes the routing (x redrawn until so).
fn separated_x(r: &ExpertChoice, t: usize, hd: usize, w: &[f32], seed: u64, gap: f32) -> Vec<f32> {
    let e = r.experts;
    let cap = r.capacity(t);
    let mut rng = Rng::new(seed);
    loop {
        let x: Vec<f32> = (0..t * hd).map(|_| rng.normal()).collect();
        let s: Vec<Vec<f32>> =
            x.chunks(hd).map(|row| softmax(&w.chunks(hd).map(|wj| dot(row, wj) as f32).collect::<Vec<_>>())).collect();
        let apart = (0..e).all(|j| {
            let mut col: Vec<f32> = s.iter().map(|row| row[j]).collect();
            col.sort_by(|a, b| b.total_cmp(a));
            col[cap - 1] - col[cap] >= gap
        });
        if apart {
            return x;
        }
    }
}

/// Central differences of `loss` over every element of `t` against `grad` (max error ≤ 1e-2 of the
/// largest derivative); the routing must not change under the step.
fn check_grad(what: &str, t: Tensor, grad: &[f32], loss: impl Fn() -> (f64, Vec<i32>)) {
    let eps = 1e-3f32;
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

#[test]
fn backward_matches_finite_differences_through_gates_probs_and_logits() {
    let (t, hd, e) = (8, 5, 4);
    let r = router("", hd, e); // capacity 4 of 8 tokens
    let wv = randn(e * hd, 31, 0.8);
    let xv = separated_x(&r, t, hd, &wv, 32, 0.02);
    let th = TestHost::new(t);
    let (x, w) = (th.tensor_f32(&xv, &[t, hd]), th.tensor_f32(&wv, &[e, hd]));
    let o = r.forward(th.host(), &[w], x).unwrap();
    let k = o.ids.dim(1);
    assert!(o.ids.i32s().contains(&EMPTY) && k >= 2, "the check covers EMPTY slots and several experts");
    let (rw, rp, rl) = (randn(t * k, 33, 1.0), randn(t * e, 34, 1.0), randn(t * e, 35, 1.0));
    for (name, (a, b, c)) in [("all", (1.0, 1.0, 1.0)), ("gates", (1.0, 0.0, 0.0)), ("probs", (0.0, 1.0, 0.0))] {
        let scaled = |v: &[f32], s: f32| v.iter().map(|x| x * s).collect::<Vec<f32>>();
        let (dw, dp, dl) = (scaled(&rw, a), scaled(&rp, b), scaled(&rl, c));
        let loss = || {
            let th2 = TestHost::new(t);
            let o = r.forward(th2.host(), &[w], x).unwrap();
            assert_eq!(o.ids.dim(1), k);
            let l = dot(o.weights.f32s(), &dw) + dot(o.probs.f32s(), &dp) + dot(o.logits.f32s(), &dl);
            (l, o.ids.i32s().to_vec())
        };
        let (gw, dx) = (th.zeros(&[e, hd], DType::F32), th.zeros(&[t, hd], DType::F32));
        let (dwt, dpt, dlt) = (th.tensor_f32(&dw, &[t, k]), th.tensor_f32(&dp, &[t, e]), th.tensor_f32(&dl, &[t, e]));
        r.backward(th.host(), &[w], &[gw], x, &o, dwt, dpt, dlt, dx).unwrap();
        check_grad(&format!("{name}: dx"), x, dx.f32s(), loss);
        check_grad(&format!("{name}: dW"), w, gw.f32s(), loss);
    }
}

#[test]
fn backward_writes_dx_and_accumulates_the_weight_grad() {
    let (t, hd, e) = (12, 6, 4);
    let r = router("", hd, e);
    let th = TestHost::new(t);
    let (x, w) = (th.tensor_f32(&randn(t * hd, 41, 1.0), &[t, hd]), th.tensor_f32(&randn(e * hd, 42, 0.5), &[e, hd]));
    let o = r.forward(th.host(), &[w], x).unwrap();
    let k = o.ids.dim(1);
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
    // Wrong shapes are refused in one line.
    let bad = th.tensor_f32(&vec![0.0; t * (k + 1)], &[t, k + 1]);
    let err = r.backward(th.host(), &[w], &[gw], x, &o, bad, db, dc, dx).unwrap_err();
    assert!(err.contains("d_weights") && !err.contains('\n'), "{err}");
}

#[test]
fn config_errors_name_the_key() {
    let err = |cfg: &str| create(cfg, test_dims(8, 6, 4)).err().unwrap();
    let e = err("k_avg = 7");
    assert!(e.contains("`k_avg` = 7") && e.contains("1..=6"), "{e}");
    assert!(err("k_avg = 0").contains("`k_avg` = 0"));
    assert!(err("k_avg = -1").contains("k_avg"), "{}", err("k_avg = -1"));
    assert!(err("k_avg = 1.5").contains("k_avg"), "{}", err("k_avg = 1.5"));
    for bad in ["0.0", "-1.0", "nan", "inf"] {
        let e = err(&format!("capacity_factor = {bad}"));
        assert!(e.contains("`capacity_factor`") && e.contains("> 0"), "{e}");
    }
    assert!(err("top_k = 2").contains("top_k"), "{}", err("top_k = 2"));
    let r = router("capacity_factor = 2\nk_avg = 6", 8, 6);
    assert_eq!((r.capacity_factor, r.k_avg), (2.0, 6));
    let p = r.params();
    assert_eq!(p.len(), 1);
    assert!(p[0].name == "weight" && p[0].shape.as_slice() == [6, 8] && p[0].decay && p[0].init == Init::Normal(0.02));
}

#[test]
fn cuda_launches_match_the_kernel_signatures() {
    let src = cuda_source();
    assert!(src.starts_with(COMMON_CUH), "the kit's helpers come first");
    let t = Tensor::new(256, DType::F32, Device::Cuda, &[1]);
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::softmax(t, t, t, 1, 2)),
        pith_plugin_api::kit::kernel_params(src, "ec_softmax")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::select(t, t, 1, 2, 1)),
        pith_plugin_api::kit::kernel_params(src, "ec_select")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::stats(t, t, 1, 2)),
        pith_plugin_api::kit::kernel_params(src, "ec_stats")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::gather(t, t, t, t, [1, 2, 1])),
        pith_plugin_api::kit::kernel_params(src, "ec_gather")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::bwd([t; 6], [1, 2, 1])),
        pith_plugin_api::kit::kernel_params(src, "ec_bwd")
    );
    assert_eq!((rows_grid(0), rows_grid(9), rows_grid(1 << 30)), ([1, 1, 1], [2, 1, 1], [65535, 1, 1]));
    assert!(router("", 8, 2048).cuda_limits().unwrap_err().contains("model.experts <= 1024"));
    assert!(router("", 8, 1024).cuda_limits().is_ok());
}

/// `ec_select`'s algorithm (kernels/expert_choice.cu), step for step on the CPU: radix select of
/// the cap-th largest key 8 bits a pass, then the ties to the lower token indices.
fn radix_select(keys: &[u32], cap: usize) -> Vec<bool> {
    let (mut prefix, mut mask, mut left) = (0u32, 0u32, cap as i64);
    for shift in [24, 16, 8, 0] {
        let mut hist = [0i64; 256];
        keys.iter().filter(|&&v| v & mask == prefix).for_each(|&v| hist[((v >> shift) & 255) as usize] += 1);
        let mut d = 255;
        while d > 0 && left > hist[d] {
            left -= hist[d];
            d -= 1;
        }
        prefix |= (d as u32) << shift;
        mask |= 255 << shift;
    }
    let mut before = 0;
    keys.iter()
        .map(|&v| {
            let tie = v == prefix;
            let take = v > prefix || (tie && before < left);
            before += tie as i64;
            take
        })
        .collect()
}

#[test]
fn the_kernel_s_radix_select_takes_what_the_cpu_sort_takes() {
    let mut rng = Rng::new(7);
    for case in 0..300 {
        let t = 1 + below(&mut rng, 200);
        let cap = 1 + below(&mut rng, t);
        // Few distinct scores (many ties), or scores across the whole range, with a NaN now and then.
        let keys: Vec<u32> = (0..t)
            .map(|_| match case % 3 {
                0 => key((below(&mut rng, 4) as f32) * 0.25),
                1 => key(rng.uniform().powi(8)),
                _ if below(&mut rng, 10) == 0 => key(f32::NAN),
                _ => key(rng.uniform()),
            })
            .collect();
        let mut order: Vec<usize> = (0..t).collect();
        order.sort_by(|&a, &b| keys[b].cmp(&keys[a]).then(a.cmp(&b)));
        let mut want = vec![false; t];
        order[..cap].iter().for_each(|&i| want[i] = true);
        assert_eq!(radix_select(&keys, cap), want, "case {case}: t {t} cap {cap} keys {keys:?}");
    }
}
