//! Unit tests on the plugin kit's CPU `TestHost`: bit-for-bit equality with std `local` when
//! nothing drops; with drops: at most C rows per expert, the largest gates kept, dropped slots
//! contributing nothing and getting d_weights 0, finite differences; `dropped_frac`; config errors.

use super::*;
use abi_stable::std_types::{RResult, RString};
use pith_plugin_api::abi::{ops_ref, CommScheduleBox, Component};
use pith_plugin_api::kit::{test_dims, Rng, TestHost};
use pith_plugin_api::Kind;

/// n standard normal values of stream `seed`.
fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Metric means are sums of value·weight over sums of weights: equal to within round-off.
fn close(got: f64, want: f64) {
    assert!((got - want).abs() <= 1e-12, "dropped_frac {got}, expected {want}");
}

fn row(v: &[f32], r: usize, hd: usize) -> &[f32] {
    &v[r * hd..(r + 1) * hd]
}

/// A comm schedule as the host holds one (the FFI object, called through the adapters).
fn boxed(c: RResult<Component, RString>, what: &str) -> CommScheduleBox {
    match c.into_result() {
        Ok(Component::CommSchedule(c)) => c,
        Ok(_) => panic!("{what} is not a comm schedule"),
        Err(e) => panic!("creating {what}: {e}"),
    }
}

/// std's `local`, built through the built-in pack's root module.
fn std_local(e: usize) -> CommScheduleBox {
    let create = pith_std::pith_root_module().create();
    boxed(create(Kind::CommSchedule, "local".into(), "".into(), test_dims(8, e, 4)), "std `local`")
}

/// This crate's `capacity` with `config`, built from its registration as the host builds it.
fn capacity_box(config: &str, e: usize) -> CommScheduleBox {
    let c = pith_plugin_api::ffi_create(Kind::CommSchedule, "capacity".into(), config.into(), test_dims(8, e, 4));
    boxed(c, "`capacity`")
}

fn make(config: &str, e: usize) -> Capacity {
    create(config, test_dims(8, e, 4)).unwrap()
}

/// ids [T,k] of k distinct random experts per token, then about one slot in six EMPTY and every
/// slot of token 1 EMPTY (a token with no expert); gates from `gate` (0 for EMPTY).
fn random_route(t: usize, k: usize, e: usize, seed: u64, gate: impl Fn(&mut Rng) -> f32) -> (Vec<i32>, Vec<f32>) {
    let mut r = Rng::new(seed);
    let mut ids = Vec::with_capacity(t * k);
    for _ in 0..t {
        let mut all: Vec<i32> = (0..e as i32).collect();
        for j in 0..k {
            all.swap(j, j + (r.next_u64() % (e - j) as u64) as usize);
        }
        ids.extend_from_slice(&all[..k]);
    }
    for (p, id) in ids.iter_mut().enumerate() {
        if p / k == 1 || r.uniform() < 1.0 / 6.0 {
            *id = EMPTY;
        }
    }
    let w = ids.iter().map(|&i| if i == EMPTY { 0.0 } else { gate(&mut r) }).collect();
    (ids, w)
}

fn route_on(th: &TestHost, ids: &[i32], w: &[f32], t: usize, k: usize, e: usize) -> RouterOut {
    RouterOut {
        logits: th.zeros(&[t, e], DType::F32),
        probs: th.zeros(&[t, e], DType::F32),
        ids: th.tensor_i32(ids, &[t, k]),
        weights: th.tensor_f32(w, &[t, k]),
        saved: Default::default(),
    }
}

/// Everything one forward + backward gives: offsets, row map, dispatched x, combine out, dy,
/// d_weights, dx (from y = `yv`, dout, dx_sorted = `dsv`; the outputs start as NaN or noise).
#[derive(Debug, PartialEq)]
struct Run {
    offsets: Vec<i32>,
    rows: Vec<i32>,
    x: Vec<u32>,
    out: Vec<u32>,
    dy: Vec<u32>,
    dw: Vec<u32>,
    dx: Vec<u32>,
}

/// Forward and backward of `c` on x, route; y, dout and dx_sorted drawn from `seed` for the rows
/// dispatch gave.
fn run(c: &CommScheduleBox, th: &TestHost, x: Tensor, route: &RouterOut, e: usize, seed: u64) -> Run {
    let (t, k, hd) = (x.dim(0), route.ids.dim(1), x.dim(1));
    let d = c.dispatch(ops_ref(th), x, route, e as u32).unwrap();
    let n = d.x.dim(0);
    let y = th.tensor_f32(&randn(n * hd, seed), &[n, hd]);
    let out = c.combine(ops_ref(th), y, route, &d).unwrap();
    let dout = th.tensor_f32(&randn(t * hd, seed + 1), &[t, hd]);
    let h = th.host();
    let (dy, dw, dx) = (
        h.alloc_uninit(&[n, hd], DType::F32).unwrap(),
        th.tensor_f32(&randn(t * k, seed + 2), &[t, k]),
        h.alloc_uninit(&[t, hd], DType::F32).unwrap(),
    );
    c.combine_backward(ops_ref(th), dout, y, route, &d, dy, dw).unwrap();
    c.dispatch_backward(ops_ref(th), th.tensor_f32(&randn(n * hd, seed + 3), &[n, hd]), &d, dx).unwrap();
    Run {
        offsets: d.offsets.i32s().to_vec(),
        rows: d.saved[0].i32s().to_vec(),
        x: bits(d.x.f32s()),
        out: bits(out.f32s()),
        dy: bits(dy.f32s()),
        dw: bits(dw.f32s()),
        dx: bits(dx.f32s()),
    }
}

#[test]
fn equals_std_local_bit_for_bit_when_nothing_drops() {
    let (t, k, hd, e) = (24, 3, 10, 5);
    let local = std_local(e);
    for seed in [1, 2, 3] {
        let (ids, w) = random_route(t, k, e, seed, |r| r.uniform());
        let th = TestHost::new(t);
        let route = route_on(&th, &ids, &w, t, k, e);
        let x = th.tensor_f32(&randn(t * hd, 10 + seed), &[t, hd]);
        let slots = ids.iter().filter(|&&i| i != EMPTY).count();
        let fullest = (0..e as i32).map(|j| ids.iter().filter(|&&i| i == j).count()).max().unwrap();
        // A huge factor, and the one that puts the fullest expert exactly at capacity.
        let at_capacity = fullest as f64 * e as f64 / slots as f64;
        for config in ["capacity_factor = 1e6".to_string(), format!("capacity_factor = {at_capacity:?}")] {
            assert!(make(&config, e).capacity(slots, e) >= fullest, "{config}");
            let want = run(&local, &th, x, &route, e, 100 * seed);
            let got = run(&capacity_box(&config, e), &th, x, &route, e, 100 * seed);
            assert!(want.rows.contains(&EMPTY) && want.offsets[e] as usize == slots, "seed {seed}");
            assert_eq!(got, want, "seed {seed}, {config}");
        }
        assert_eq!(th.metrics().get("dropped_frac"), Some(&0.0));
    }
}

#[test]
fn a_small_factor_keeps_each_experts_largest_gates_and_drops_the_rest() {
    let (t, k, hd, e) = (40, 2, 4, 4);
    let c = make("capacity_factor = 0.5", e);
    // Gates on a coarse grid, so many tie (ties go to the earlier pair).
    let (ids, w) = random_route(t, k, e, 7, |r| 0.1 * (1 + (r.next_u64() % 5)) as f32);
    let th = TestHost::new(t);
    let route = route_on(&th, &ids, &w, t, k, e);
    let xv = randn(t * hd, 8);
    let x = th.tensor_f32(&xv, &[t, hd]);
    let d = CommSchedule::dispatch(&c, th.host(), x, &route, e as u32).unwrap();
    let (off, rows) = (d.offsets.i32s(), d.saved[0].i32s());
    let slots = ids.iter().filter(|&&i| i != EMPTY).count();
    let cap = c.capacity(slots, e);
    assert_eq!(cap, (0.5 * slots as f64 / e as f64).ceil() as usize);
    // The reference: a pair is kept when fewer than C pairs of its expert rank ahead of it.
    let ahead = |p: usize| (0..t * k).filter(|&q| ids[q] == ids[p] && (w[q] > w[p] || (w[q] == w[p] && q < p))).count();
    let keep: Vec<bool> = (0..t * k).map(|p| ids[p] != EMPTY && ahead(p) < cap).collect();
    let mut dropped = 0;
    for j in 0..e {
        let mine: Vec<usize> = (0..t * k).filter(|&p| ids[p] == j as i32).collect();
        let kept: Vec<usize> = mine.iter().copied().filter(|&p| keep[p]).collect();
        assert_eq!((off[j + 1] - off[j]) as usize, mine.len().min(cap), "rows of expert {j}");
        assert!(kept.len() <= cap);
        // Kept rows in (token, slot) order, from the expert's first row on; the rest dropped.
        for (q, &p) in kept.iter().enumerate() {
            assert_eq!(rows[p], off[j] + q as i32, "pair {p} of expert {j}");
            assert_eq!(row(d.x.f32s(), rows[p] as usize, hd), row(&xv, p / k, hd), "pair {p}");
        }
        for &p in mine.iter().filter(|&&p| !keep[p]) {
            assert_eq!(rows[p], EMPTY, "dropped pair {p} of expert {j}");
            assert!(kept.iter().all(|&q| w[q] >= w[p]), "expert {j} dropped gate {} but kept a smaller one", w[p]);
            dropped += 1;
        }
    }
    assert!(dropped > 0 && ids.iter().zip(rows).all(|(&i, &r)| i != EMPTY || r == EMPTY), "{dropped}");
    assert_eq!(d.x.dim(0), slots - dropped);
    let tied = (0..t * k)
        .any(|p| !keep[p] && ids[p] != EMPTY && (0..t * k).any(|q| keep[q] && ids[q] == ids[p] && w[q] == w[p]));
    assert!(tied, "the draw should have a tie at some expert's capacity boundary");
    close(th.metrics()["dropped_frac"], dropped as f64 / slots as f64);

    // combine, combine_backward, dispatch_backward: the kept slots only.
    let n = d.x.dim(0);
    let yv = randn(n * hd, 9);
    let y = th.tensor_f32(&yv, &[n, hd]);
    let out = CommSchedule::combine(&c, th.host(), y, &route, &d).unwrap();
    let dout = randn(t * hd, 10);
    let (dy, dw) = (th.zeros(&[n, hd], DType::F32), th.tensor_f32(&vec![9.0; t * k], &[t, k]));
    CommSchedule::combine_backward(&c, th.host(), th.tensor_f32(&dout, &[t, hd]), y, &route, &d, dy, dw).unwrap();
    let dx = th.tensor_f32(&vec![7.0; t * hd], &[t, hd]);
    CommSchedule::dispatch_backward(&c, th.host(), y, &d, dx).unwrap();
    for tok in 0..t {
        let (mut o, mut g) = (vec![0.0f32; hd], vec![0.0f32; hd]);
        for p in (tok * k..(tok + 1) * k).filter(|&p| keep[p]) {
            let yr = row(&yv, rows[p] as usize, hd);
            o.iter_mut().zip(yr).for_each(|(o, &v)| *o += w[p] * v);
            g.iter_mut().zip(yr).for_each(|(g, &v)| *g += v);
        }
        assert_eq!(row(out.f32s(), tok, hd), o, "combine token {tok}");
        assert_eq!(row(dx.f32s(), tok, hd), g, "dispatch_backward token {tok}");
    }
    assert!(row(out.f32s(), 1, hd).iter().chain(row(dx.f32s(), 1, hd)).all(|&v| v == 0.0), "token 1 has no slot");
    for p in 0..t * k {
        let g = row(&dout, p / k, hd);
        match keep[p] {
            true => {
                let dot: f32 = g.iter().zip(row(&yv, rows[p] as usize, hd)).map(|(a, b)| a * b).sum();
                assert_eq!(dw.f32s()[p], dot, "d_weights[{p}]");
                let want: Vec<f32> = g.iter().map(|v| w[p] * v).collect();
                assert_eq!(row(dy.f32s(), rows[p] as usize, hd), want, "dy of pair {p}");
            }
            false => assert_eq!(dw.f32s()[p], 0.0, "d_weights[{p}] of a dropped or EMPTY slot"),
        }
    }
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

#[test]
fn finite_differences_through_dispatch_and_combine_with_drops() {
    let (t, k, hd, e) = (12, 2, 5, 3);
    let c = make("capacity_factor = 0.5", e);
    let (ids, _) = random_route(t, k, e, 11, |_| 0.0);
    // Distinct gates 0.04 apart: a ±0.01 step never changes which pairs are kept.
    let mut order: Vec<usize> = (0..t * k).collect();
    let mut r = Rng::new(12);
    for i in (1..order.len()).rev() {
        order.swap(i, (r.next_u64() % (i as u64 + 1)) as usize);
    }
    let w: Vec<f32> = (0..t * k).map(|p| if ids[p] == EMPTY { 0.0 } else { 0.1 + 0.04 * order[p] as f32 }).collect();
    let th = TestHost::new(t);
    let route = route_on(&th, &ids, &w, t, k, e);
    let x = th.tensor_f32(&randn(t * hd, 13), &[t, hd]);
    let rv = randn(t * hd, 14);
    // Stand-in experts: y = gain_e · x_sorted, a different gain per expert.
    let gain = |v: &[f32], off: &[i32]| -> Vec<f32> {
        let mut y = v.to_vec();
        for j in 0..e {
            y[off[j] as usize * hd..off[j + 1] as usize * hd].iter_mut().for_each(|v| *v *= 1.0 + 0.5 * j as f32);
        }
        y
    };
    let loss = || -> f64 {
        let d = CommSchedule::dispatch(&c, th.host(), x, &route, e as u32).unwrap();
        let y = th.tensor_f32(&gain(d.x.f32s(), d.offsets.i32s()), &d.x.dims());
        let out = CommSchedule::combine(&c, th.host(), y, &route, &d).unwrap();
        out.f32s().iter().zip(&rv).map(|(&o, &r)| o as f64 * r as f64).sum()
    };
    let d = CommSchedule::dispatch(&c, th.host(), x, &route, e as u32).unwrap();
    let n = d.x.dim(0);
    let slots = ids.iter().filter(|&&i| i != EMPTY).count();
    assert!(n < slots, "some pairs must drop: {n} of {slots} kept");
    let y = th.tensor_f32(&gain(d.x.f32s(), d.offsets.i32s()), &[n, hd]);
    let (dy, dw, dx) = (th.zeros(&[n, hd], DType::F32), th.zeros(&[t, k], DType::F32), th.zeros(&[t, hd], DType::F32));
    CommSchedule::combine_backward(&c, th.host(), th.tensor_f32(&rv, &[t, hd]), y, &route, &d, dy, dw).unwrap();
    let dxs = th.tensor_f32(&gain(dy.f32s(), d.offsets.i32s()), &[n, hd]);
    CommSchedule::dispatch_backward(&c, th.host(), dxs, &d, dx).unwrap();
    let dropped: Vec<usize> = (0..t * k).filter(|&p| ids[p] != EMPTY && d.saved[0].i32s()[p] < 0).collect();
    assert!(!dropped.is_empty() && dropped.iter().all(|&p| dw.f32s()[p] == 0.0));
    check_grad("x", x, dx.f32s(), loss);
    check_grad("weights", route.weights, dw.f32s(), loss);
}

#[test]
fn capacity_formula_ties_and_dropped_frac() {
    assert_eq!(make("", 6).capacity(15, 6), 4, "default 1.25: ceil(1.25 * 15 / 6) = ceil(3.125)");
    assert_eq!(make("capacity_factor = 1.0", 8).capacity(2048, 8), 256);
    assert_eq!(make("capacity_factor = 1", 8).capacity(2049, 8), 257, "an integer is a factor too");
    assert_eq!(make("capacity_factor = 1e9", 4).capacity(10, 4), 10, "at most N_slots");
    assert_eq!(make("capacity_factor = 0.01", 4).capacity(10, 4), 1);
    assert_eq!(make("capacity_factor = 2.0", 4).capacity(0, 4), 0);

    // T = 4, k = 2, E = 2; 7 slots, factor 0.5: C = ceil(0.5 · 7 / 2) = 2.
    let (t, k, hd, e) = (4, 2, 3, 2);
    let c = make("capacity_factor = 0.5", e);
    let th = TestHost::new(t);
    let ids = [0, 1, 0, 1, 0, EMPTY, 0, 1];
    // Expert 0 (pairs 0, 2, 4, 6): 0.9 at pair 2, then a three-way tie at 0.5: pair 0 is the earliest.
    // Expert 1 (pairs 1, 3, 7): 0.7 twice beat 0.2.
    let w = [0.5, 0.2, 0.9, 0.7, 0.5, 0.0, 0.5, 0.7];
    let route = route_on(&th, &ids, &w, t, k, e);
    let x = th.tensor_f32(&randn(t * hd, 1), &[t, hd]);
    let d = CommSchedule::dispatch(&c, th.host(), x, &route, e as u32).unwrap();
    assert_eq!(d.offsets.i32s(), [0, 2, 4]);
    assert_eq!(d.saved[0].i32s(), [0, EMPTY, 1, 2, EMPTY, EMPTY, EMPTY, 3]);
    close(th.metrics()["dropped_frac"], 3.0 / 7.0);
    // Run twice: the same choice (deterministic).
    let again = CommSchedule::dispatch(&c, th.host(), x, &route, e as u32).unwrap();
    assert_eq!(again.saved[0].i32s(), d.saved[0].i32s());
    // Weighted by N_slots: (3/7·7 + 3/7·7 + 0·6) / 20 after a call with 6 slots and no drop.
    let ids2 = [0, EMPTY, 1, EMPTY, 0, 1, 1, 0];
    let w2 = [0.5, 0.0, 0.5, 0.0, 0.5, 0.5, 0.5, 0.5];
    let r2 = route_on(&th, &ids2, &w2, t, k, e);
    let d2 = CommSchedule::dispatch(&make("capacity_factor = 1.0", e), th.host(), x, &r2, e as u32).unwrap();
    assert_eq!(d2.x.dim(0), 6);
    close(th.metrics()["dropped_frac"], 6.0 / 20.0);
    // No slot at all: nothing moves, no metric value (the mean stays).
    let none = route_on(&th, &[EMPTY; 8], &[0.0; 8], t, k, e);
    let d3 = CommSchedule::dispatch(&c, th.host(), x, &none, e as u32).unwrap();
    assert_eq!((d3.offsets.i32s(), d3.x.dim(0)), (&[0, 0, 0][..], 0));
    close(th.metrics()["dropped_frac"], 6.0 / 20.0);
    // Eval calls are not recorded (as the host does).
    th.set_context(pith_plugin_api::Context { training: false, ..th.host().context() });
    CommSchedule::dispatch(&c, th.host(), x, &route, e as u32).unwrap();
    close(th.metrics()["dropped_frac"], 6.0 / 20.0);
}

#[test]
fn config_and_input_errors_are_one_line_and_name_the_key() {
    for (config, want) in [
        ("capacity_factor = 0", "`capacity_factor` = 0 but it must be a finite number > 0"),
        ("capacity_factor = -1.5", "`capacity_factor` = -1.5 but"),
        ("capacity_factor = nan", "`capacity_factor` = NaN but"),
        ("capacity_factor = inf", "`capacity_factor` = inf but"),
        ("capacity_factor = \"big\"", "`capacity_factor`"),
        ("capacity_factr = 1.0", "`capacity_factr`"),
    ] {
        let e = create(config, test_dims(8, 4, 4)).err().unwrap_or_else(|| panic!("{config} was accepted"));
        assert!(e.contains(want) && !e.contains('\n'), "{config}: {e}");
    }
    let (t, k, hd, e) = (2, 2, 3, 3);
    let c = make("", e);
    let th = TestHost::new(t);
    let x = th.tensor_f32(&randn(t * hd, 1), &[t, hd]);
    let bad = route_on(&th, &[0, 3, 1, EMPTY], &[0.5, 0.5, 0.5, 0.0], t, k, e);
    let err = CommSchedule::dispatch(&c, th.host(), x, &bad, e as u32).err().unwrap();
    assert!(err.contains("ids[0, 1] = 3") && err.contains("0..3 or EMPTY"), "{err}");
    let short =
        RouterOut { weights: th.zeros(&[t, 1], DType::F32), ..route_on(&th, &[0, 1, 2, 0], &[0.5; 4], t, k, e) };
    let err = CommSchedule::dispatch(&c, th.host(), x, &short, e as u32).err().unwrap();
    assert!(err.contains("capacity: weights"), "{err}");
}
