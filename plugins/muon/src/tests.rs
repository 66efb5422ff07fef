//! Unit tests on the plugin kit's CPU `TestHost`: Newton–Schulz gives singular values near 1 (wide,
//! tall, and each matrix of a stack on its own), the update's direction and scale, Nesterov, the
//! AdamW group by name and shape (and its update by hand), descent on a quadratic, zero gradients,
//! grad_scale, config errors naming the key, bad slots, and the CUDA launches against the kernels'
//! signatures.

use super::*;
use pith_plugin_api::kit::{test_dims, Rng, TestHost, COMMON_CUH};
use pith_plugin_api::Init;

fn muon(config: &str) -> Muon {
    create(config, test_dims(4, 2, 4)).unwrap()
}

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| scale * r.normal()).collect()
}

fn no_lowp() -> Tensor {
    Tensor::new(0, DType::BF16, Device::Cpu, &[0])
}

/// A slot named `name` shaped `shape` (decay on), weights `w`, gradient `g`, zero states as
/// `state` asks for it.
fn slot(th: &TestHost, o: &Muon, name: &str, shape: &[usize], w: &[f32], g: &[f32]) -> Slot {
    let spec = ParamSpec::new("w", shape, Init::Normal(0.02), true);
    let state = o.state(name, &spec).iter().map(|_| th.zeros(shape, DType::F32)).collect();
    Slot { name: name.into(), w: th.tensor_f32(w, shape), g: th.tensor_f32(g, shape), state, spec, w_lowp: no_lowp() }
}

/// NS5 of `u` [g,r,c] on the test host (a fresh scratch); the result's values.
fn ns5(th: &TestHost, u: &[f32], dims: (usize, usize, usize)) -> Vec<f32> {
    let (g, r, c) = dims;
    let sc = Scratch::new(th.host(), u.len(), g * r.min(c) * r.min(c)).unwrap();
    // SAFETY: the scratch is this test's own; nothing else views it.
    let x = unsafe { sc.x.f32s_mut() };
    x[..u.len()].copy_from_slice(u);
    newton_schulz(th.host(), &sc, dims).unwrap().f32s().to_vec()
}

/// The eigenvalues of a symmetric n×n matrix (cyclic Jacobi, f64), ascending.
fn eigenvalues(mut a: Vec<f64>, n: usize) -> Vec<f64> {
    for _sweep in 0..100 {
        let off: f64 = (0..n * n).filter(|i| i / n != i % n).map(|i| a[i] * a[i]).sum();
        if off < 1e-24 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p * n + q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * a[p * n + q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                for k in 0..n {
                    let (kp, kq) = (a[k * n + p], a[k * n + q]);
                    (a[k * n + p], a[k * n + q]) = (c * kp - s * kq, s * kp + c * kq);
                }
                for k in 0..n {
                    let (pk, qk) = (a[p * n + k], a[q * n + k]);
                    (a[p * n + k], a[q * n + k]) = (c * pk - s * qk, s * pk + c * qk);
                }
            }
        }
    }
    let mut d: Vec<f64> = (0..n).map(|i| a[i * n + i]).collect();
    d.sort_by(f64::total_cmp);
    d
}

/// The singular values of the r×c matrix x, ascending (the square roots of the eigenvalues of the
/// smaller Gram matrix).
fn singular_values(x: &[f32], r: usize, c: usize) -> Vec<f64> {
    let (k, tall) = (r.min(c), r > c);
    let at = |i: usize, j: usize| x[i * c + j] as f64;
    let mut gram = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..k {
            gram[i * k + j] = match tall {
                false => (0..c).map(|p| at(i, p) * at(j, p)).sum(), // X·Xᵀ
                true => (0..r).map(|p| at(p, i) * at(p, j)).sum(),  // Xᵀ·X
            };
        }
    }
    eigenvalues(gram, k).into_iter().map(|e| e.max(0.0).sqrt()).collect()
}

#[test]
fn newton_schulz_brings_every_singular_value_near_1() {
    let th = TestHost::new(1);
    for (r, c, seed) in [(6, 20, 1), (20, 6, 2), (12, 16, 3)] {
        let u = randn(r * c, seed, 3.0);
        let before = singular_values(&u, r, c);
        let o = ns5(&th, &u, (1, r, c));
        let after = singular_values(&o, r, c);
        // The quintic trades exactness for speed: it leaves singular values in about [0.7, 1.2].
        assert!(after.iter().all(|&s| (0.6..=1.25).contains(&s)), "{r}x{c}: {before:?} -> {after:?}");
        assert!(before[0] / before[before.len() - 1] < 0.6, "{r}x{c}: a test matrix with spread-out {before:?}");
        // X ≈ U·Vᵀ of u: ⟨X, u⟩ = Σ σᵢ·p(σᵢ) > 0, and XᵀX (XXᵀ) ≈ I loosely.
        assert!(o.iter().zip(&u).map(|(a, b)| a * b).sum::<f32>() > 0.0);
    }
}

#[test]
fn a_stack_is_orthogonalised_matrix_by_matrix() {
    // [3, 10, 4] (tall) with the middle matrix 1000× the others: each is normalised on its own,
    // so it gives what it gives alone, and the stack what its matrices give one by one.
    let th = TestHost::new(1);
    let (r, c) = (10, 4);
    let mut u = randn(3 * r * c, 5, 1.0);
    u[r * c..2 * r * c].iter_mut().for_each(|v| *v *= 1000.0);
    let stacked = ns5(&th, &u, (3, r, c));
    for q in 0..3 {
        let alone = ns5(&th, &u[q * r * c..(q + 1) * r * c], (1, r, c));
        let part = &stacked[q * r * c..(q + 1) * r * c];
        let diff = part.iter().zip(&alone).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff < 1e-6, "matrix {q}: {diff}");
        let s = singular_values(part, r, c);
        assert!(s.iter().all(|&s| (0.6..=1.25).contains(&s)), "matrix {q}: {s:?}");
    }
    // Scale-free: 1000·u gives u's result (the norm divides it out, up to the 1e-7).
    let scaled = ns5(&th, &u[r * c..2 * r * c], (1, r, c));
    let base: Vec<f32> = u[r * c..2 * r * c].iter().map(|v| v / 1000.0).collect();
    let base = ns5(&th, &base, (1, r, c));
    assert!(scaled.iter().zip(&base).all(|(a, b)| (a - b).abs() < 1e-4));
}

#[test]
fn one_step_is_the_scaled_orthogonalised_momentum_plus_decay() {
    let (o, th) = (muon("nesterov = false"), TestHost::new(1));
    let (r, c, lr, scale) = (6, 9, 0.02f32, 0.5f32);
    let (w0, g) = (randn(r * c, 11, 0.1), randn(r * c, 12, 1.0));
    let s = slot(&th, &o, "layers.0.attn.q_proj.weight", &[r, c], &w0, &g);
    assert_eq!(s.state.len(), 1, "a matrix is Muon's: one state");
    let done = o.step(th.host(), std::slice::from_ref(&s), lr, 1, scale).unwrap();
    assert_eq!(done, StepDone::default(), "the CPU path leaves the bf16 copies and the zeroing to the host");
    // m = 0.95·0 + 0.5·g; the update is NS5(m) scaled by lr·0.2·√9.
    let m: Vec<f32> = g.iter().map(|g| 0.5 * g).collect();
    assert_eq!(s.state[0].f32s(), m);
    let want_o = ns5(&th, &m, (1, r, c));
    let keep = 1.0 - lr * 0.1;
    let step = lr * 0.2 * 3.0;
    for (i, ((&w1, &w0), &ob)) in s.w.f32s().iter().zip(&w0).zip(&want_o).enumerate() {
        assert!((w1 - (w0 * keep - step * ob)).abs() < 1e-7, "[{i}]: {w1} vs {}", w0 * keep - step * ob);
    }
    // Its RMS: min(r, c) singular values near 1 make RMS(NS5) ≈ √(min/(r·c)) = 1/√max, so the
    // update's RMS is about 0.2·lr, AdamW's (Moonlight's point).
    let upd: Vec<f32> = s.w.f32s().iter().zip(&w0).map(|(w1, w0)| w0 * keep - w1).collect();
    let rms = (upd.iter().map(|v| v * v).sum::<f32>() / upd.len() as f32).sqrt();
    let want = 0.2 * lr;
    assert!((0.6 * want..1.25 * want).contains(&rms), "update RMS {rms}, about {want}");
}

#[test]
fn nesterov_orthogonalises_g_plus_mu_m() {
    // Step 1 from m = 0: u = m = g without Nesterov, u = g + μ·g with it; NS5 is scale-free, so
    // the same step. Step 2 with a new gradient: Nesterov's u = g2 + μ·(μ·g1 + g2) differs.
    let th = TestHost::new(1);
    let (r, c) = (5, 7);
    let (w0, g1, g2) = (randn(r * c, 21, 0.1), randn(r * c, 22, 1.0), randn(r * c, 23, 1.0));
    let run = |config: &str| {
        let o = muon(config);
        let s = slot(&th, &o, "layers.1.moe.experts.w_down", &[1, r, c], &w0, &g1);
        o.step(th.host(), std::slice::from_ref(&s), 0.01, 1, 1.0).unwrap();
        let after1 = s.w.f32s().to_vec();
        // SAFETY: the test's own tensor; no other slice of it is alive.
        unsafe { s.g.f32s_mut() }.copy_from_slice(&g2);
        o.step(th.host(), std::slice::from_ref(&s), 0.01, 2, 1.0).unwrap();
        (after1, s.w.f32s().to_vec(), s.state[0].f32s().to_vec())
    };
    let (plain, nesterov) = (run("nesterov = false"), run(""));
    assert!(plain.0.iter().zip(&nesterov.0).all(|(a, b)| (a - b).abs() < 1e-6), "step 1: the same direction");
    let m2: Vec<f32> = g1.iter().zip(&g2).map(|(a, b)| 0.95 * a + b).collect();
    for (m, want) in [(&plain.2, &m2), (&nesterov.2, &m2)] {
        assert!(m.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "m = μ·m + g in both");
    }
    let u: Vec<f32> = g2.iter().zip(&m2).map(|(g, m)| g + 0.95 * m).collect();
    let (keep, step) = (1.0 - 0.01 * 0.1, 0.01 * 0.2 * (7.0f32).sqrt());
    for (run, u) in [(&plain, &m2), (&nesterov, &u)] {
        let want: Vec<f32> = run.0.iter().zip(ns5(&th, u, (1, r, c))).map(|(w, o)| w * keep - step * o).collect();
        assert!(run.1.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6));
    }
    assert!(plain.1.iter().zip(&nesterov.1).any(|(a, b)| (a - b).abs() > 1e-4), "step 2 differs");
}

#[test]
fn embeddings_head_norms_routers_and_adamw_params_go_to_adamw() {
    let o = muon("adamw_params = [\"attn.o_proj\", \"moe.shared.\"]");
    let spec = |shape: &[usize]| ParamSpec::new("w", shape, Init::Normal(0.02), true);
    let muon_group = [
        ("layers.0.attn.q_proj.weight", spec(&[8, 4])),
        ("layers.0.moe.experts.w_up", spec(&[2, 4, 6])),
        ("layers.3.moe.experts.w_down", spec(&[2, 6, 4])),
    ];
    let adamw_group = [
        ("embed.weight", spec(&[16, 4])),
        ("lm_head.weight", spec(&[16, 4])),
        ("layers.0.attn_norm.weight", spec(&[4])),
        ("final_norm.weight", spec(&[4])),
        ("layers.0.moe.router.weight", spec(&[2, 4])),
        ("layers.1.moe.router.threshold", spec(&[2])),
        ("layers.0.attn.o_proj.weight", spec(&[4, 8])), // adamw_params
        ("layers.0.moe.shared.w_up", spec(&[1, 4, 6])), // adamw_params
    ];
    for (name, s) in &muon_group {
        assert!(o.is_muon(name, s), "{name}");
        assert_eq!(o.state(name, s), ["m"], "{name}");
    }
    for (name, s) in &adamw_group {
        assert!(!o.is_muon(name, s), "{name}");
        assert_eq!(o.state(name, s), ["m", "v"], "{name}");
    }
    let plain = muon("");
    assert!(plain.is_muon("layers.0.attn.o_proj.weight", &spec(&[4, 8])), "only through adamw_params");
}

#[test]
fn the_adamw_group_takes_adamw_s_step() {
    // Step 1, grad_scale 0.5: m = 0.1·g', v = 0.05·g'², w = w·keep − lr·g'/(|g'| + eps) for g' = 0.5·g
    // (bias-corrected), decay only where spec.decay.
    let (o, th) = (muon("weight_decay = 0.2"), TestHost::new(1));
    let (w, g, lr) = ([1.0f32, -2.0, 0.5, 3.0], [0.5f32, -3.0, 0.0, 1.0], 0.1f32);
    let embed = slot(&th, &o, "embed.weight", &[2, 2], &w, &g);
    let mut norm = slot(&th, &o, "layers.0.moe_norm.weight", &[4], &w, &g);
    norm.spec.decay = false;
    let slots = [embed, norm];
    o.step(th.host(), &slots, lr, 1, 0.5).unwrap();
    for (s, keep) in slots.iter().zip([1.0 - lr * 0.2, 1.0]) {
        assert_eq!(s.state.len(), 2, "{}", s.name);
        for i in 0..4 {
            let g = 0.5 * g[i];
            let want = [w[i] * keep - lr * g / (g.abs() + 1e-8), 0.1 * g, 0.05 * g * g];
            let got = [s.w.f32s()[i], s.state[0].f32s()[i], s.state[1].f32s()[i]];
            assert!(got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{}[{i}]: {got:?} vs {want:?}", s.name);
        }
    }
}

#[test]
fn a_quadratic_decreases_on_the_muon_and_the_adamw_group() {
    // f = ½‖W − T‖² over a [2,6,10] expert stack and a norm vector, 60 steps at lr 0.05.
    let (o, th) = (muon(""), TestHost::new(1));
    let shapes: [(&str, &[usize]); 2] = [("layers.0.moe.experts.w_gate", &[2, 6, 10]), ("final_norm.weight", &[6])];
    let mut slots = vec![];
    let mut targets = vec![];
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let n = shape.iter().product();
        let w0 = randn(n, 30 + i as u64, 0.1);
        targets.push(randn(n, 40 + i as u64, 0.3));
        slots.push(slot(&th, &o, name, shape, &w0, &vec![0.0; n]));
    }
    let f = |s: &Slot, t: &[f32]| s.w.f32s().iter().zip(t).map(|(a, b)| 0.5 * (a - b) * (a - b)).sum::<f32>();
    let f0: Vec<f32> = slots.iter().zip(&targets).map(|(s, t)| f(s, t)).collect();
    for step in 1..=60 {
        for (s, t) in slots.iter().zip(&targets) {
            let grad: Vec<f32> = s.w.f32s().iter().zip(t).map(|(a, b)| a - b).collect();
            // SAFETY: the test's own tensor; no other slice of it is alive.
            unsafe { s.g.f32s_mut() }.copy_from_slice(&grad);
        }
        o.step(th.host(), &slots, 0.05, step, 1.0).unwrap();
    }
    for ((s, t), f0) in slots.iter().zip(&targets).zip(f0) {
        let f1 = f(s, t);
        assert!(f1 < 0.1 * f0, "{}: f {f0} -> {f1}", s.name);
    }
}

#[test]
fn a_zero_gradient_moves_only_decayed_weights_and_grad_scale_scales_the_gradient() {
    let th = TestHost::new(1);
    let o = muon("weight_decay = 0.5");
    let (r, c) = (4, 6);
    let w0 = randn(r * c, 50, 1.0);
    let mut s = slot(&th, &o, "layers.0.attn.k_proj.weight", &[r, c], &w0, &vec![0.0; r * c]);
    s.spec.decay = false;
    o.step(th.host(), std::slice::from_ref(&s), 0.1, 1, 1.0).unwrap();
    assert_eq!(s.w.f32s(), w0, "decay = false, zero momentum and gradient: unchanged");
    s.spec.decay = true;
    o.step(th.host(), std::slice::from_ref(&s), 0.1, 2, 1.0).unwrap();
    let want: Vec<f32> = w0.iter().map(|w| w * (1.0 - 0.1 * 0.5)).collect();
    assert_eq!(s.w.f32s(), want, "decay only");
    // grad_scale 0.25 on g equals g/4 (two steps, the momentum carrying it).
    let g = randn(r * c, 51, 1.0);
    let run = |g: &[f32], scale: f32| {
        let s = slot(&th, &o, "layers.0.attn.k_proj.weight", &[r, c], &w0, g);
        for step in 1..=2 {
            o.step(th.host(), std::slice::from_ref(&s), 0.1, step, scale).unwrap();
        }
        s.w.f32s().to_vec()
    };
    let quarter: Vec<f32> = g.iter().map(|g| g * 0.25).collect();
    let (a, b) = (run(&g, 0.25), run(&quarter, 1.0));
    assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-6));
}

#[test]
fn config_errors_name_the_key() {
    let err = |c: &str| create(c, test_dims(4, 2, 4)).err().unwrap_or_else(|| panic!("{c:?} accepted"));
    assert!(err("momentum = 1.0").contains("`momentum` = 1 but it must be in [0, 1)"));
    assert!(err("adamw_betas = [0.9, 1.5]").contains("`adamw_betas` = [0.9, 1.5]"));
    assert!(err("adamw_betas = [0.9]").contains("adamw_betas"));
    assert!(err("adamw_eps = 0.0").contains("`adamw_eps` = 0"));
    assert!(err("weight_decay = -0.1").contains("`weight_decay` = -0.1"));
    assert!(err("adamw_params = [\"\"]").contains("`adamw_params` holds an empty string"));
    assert!(err("beta1 = 0.9").contains("beta1"), "an unknown key");
    let d = muon("");
    let c = &d.0;
    assert_eq!(
        (c.momentum, c.nesterov, c.weight_decay, c.adamw_betas, c.adamw_eps),
        (0.95, true, 0.1, [0.9, 0.95], 1e-8)
    );
    assert!(c.adamw_params.is_empty());
}

#[test]
fn a_slot_with_the_wrong_states_is_refused_naming_it() {
    let (o, th) = (muon(""), TestHost::new(1));
    let mut s = slot(&th, &o, "layers.0.attn.v_proj.weight", &[2, 3], &[0.0; 6], &[1.0; 6]);
    s.state = vec![th.zeros(&[2, 3], DType::F32), th.zeros(&[2, 3], DType::F32)].into();
    let e = o.step(th.host(), std::slice::from_ref(&s), 0.1, 1, 1.0).unwrap_err();
    assert!(e.contains("layers.0.attn.v_proj.weight") && e.contains("1 state tensors (m), got 2"), "{e}");
    let mut s = slot(&th, &o, "embed.weight", &[2, 3], &[0.0; 6], &[1.0; 6]);
    s.state = vec![th.zeros(&[2, 3], DType::F32), th.zeros(&[3, 2], DType::F32)].into();
    let e = o.step(th.host(), std::slice::from_ref(&s), 0.1, 1, 1.0).unwrap_err();
    assert!(e.contains("embed.weight v") && e.contains("[3, 2]"), "{e}");
    assert!(o.step(th.host(), &[], 0.1, 0, 1.0).unwrap_err().contains("from 1"));
}

#[test]
fn cuda_launches_match_the_kernel_signatures_and_table_layout() {
    let src = source();
    assert!(src.starts_with(COMMON_CUH), "the kit's helpers come first");
    let t = Tensor::new(256, DType::F32, Device::Cuda, &[4]);
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::adamw(t, 2, 3, [0.0; 6])),
        pith_plugin_api::kit::kernel_params(src, "muon_adamw")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::momentum(t, t, t, 4, 0.95, 1.0, true)),
        pith_plugin_api::kit::kernel_params(src, "muon_momentum")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::normalize(t, 4, 1)),
        pith_plugin_api::kit::kernel_params(src, "muon_normalize")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::axpy(t, t, 2.0, 4)),
        pith_plugin_api::kit::kernel_params(src, "muon_axpy")
    );
    assert_eq!(
        pith_plugin_api::kit::arg_kinds(&args::update(t, t, no_lowp(), 4, 1.0, 0.1)),
        pith_plugin_api::kit::kernel_params(src, "muon_update")
    );
    assert!(matches!(args::update(t, t, no_lowp(), 4, 1.0, 0.1)[2], Arg::Ptr(0)), "no bf16 copy: a null pointer");
    assert!(src.contains(&format!("#define CHUNK {CHUNK}")));
    assert!(src.contains("__shared__ double part[256]") && BLOCK[0] == 256, "muon_normalize's block");
    let body = &src[src.find("struct AdamSlot {").unwrap()..];
    let body = &body[..body.find("};").unwrap()];
    assert!(body.contains("float *w, *g, *m, *v;") && body.contains("__nv_bfloat16* lowp;"), "{body}");
    assert_eq!(["long long n;", "float keep;", "int pad;", "long long first;"].map(|f| body.contains(f)), [true; 4]);
    assert_eq!(ADAM_WORDS, 5 + 1 + 1 + 1);
    assert_eq!(matrices(&[3, 4, 5]), (3, 4, 5));
    assert_eq!(matrices(&[4, 5]), (1, 4, 5));
}
