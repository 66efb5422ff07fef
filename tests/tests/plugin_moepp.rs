//! The `moepp` experts (plugins/moepp: MoE++, SwiGLU FFN experts plus zero, copy and constant
//! experts) end to end, through the `pith` binary: listed from libmoepp.so, `pith plugins check`
//! passes for several mixes of expert kinds, the quickstart (8 experts: 4 FFN, 2 constant, 1 copy,
//! 1 zero) trains with it, and `pith plan` counts fewer expert FLOPs per token than swiglu (only the
//! FFN experts' rows and the constant experts' two-logit GEMV).
//!
//! The plugin is the workspace member's own build, `target/<profile>/libmoepp.so`, next to the
//! `pith` under test. With `PITH_BIN` (a prebuilt pith, e.g. on the GPU machine) it must already lie
//! next to that binary; the `#[ignore]`d GPU tests run there as
//! `PITH_BIN=.device/pith .device/plugin-moepp-tests --ignored` (plugins/moepp/README.md).

use pith_tests::{metrics, out, pith, tmp};
use std::path::{Path, PathBuf};

/// The quickstart, compiled in: the GPU machine has no checkout at this path.
const QUICKSTART: &str = include_str!("../../configs/quickstart.toml");

/// libmoepp.so beside the `pith` under test.
fn plugin() -> PathBuf {
    pith_tests::plugin("moepp")
}

/// Run pith with the plugin in place; returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    plugin();
    pith(args)
}

/// The quickstart with its [experts] table's body replaced by `experts`, written into `dir`.
fn quickstart_with(dir: &Path, name: &str, experts: &str) -> PathBuf {
    let old = "[experts]\nplugin = \"swiglu\"\n";
    assert!(QUICKSTART.contains(old), "configs/quickstart.toml's [experts] table changed");
    let path = dir.join(name);
    std::fs::write(&path, QUICKSTART.replace(old, &format!("[experts]\n{experts}\n"))).unwrap();
    path
}

/// `N` of `pith plan`'s "3 × N experts forward" and the training GFLOP per token.
fn plan_flops(config: &Path) -> (f64, f64) {
    let (code, stdout, stderr) = run(&["plan", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("training FLOPs/token:")).unwrap_or_else(|| panic!("{stdout}"));
    let num = |s: &str| s.parse::<f64>().unwrap_or_else(|e| panic!("{line}: {s:?}: {e}"));
    let at = line.find(" experts forward").unwrap_or_else(|| panic!("{line}"));
    let experts = num(line[..at].rsplit(' ').next().unwrap());
    let total = num(line["training FLOPs/token:".len()..].split_whitespace().next().unwrap());
    (experts, total)
}

/// Train the quickstart with `[experts] plugin = "moepp"` for 20 steps (warmup 5) on `device`; the
/// loss must fall by more than 1 nat and `ffn_rows_frac` (the share of routed rows the FFN experts
/// computed) be reported every step, strictly between 0 and 1.
fn quickstart_learns(device: &str) {
    let dir = tmp(&format!("moepp-quickstart-{device}"));
    let cfg = quickstart_with(&dir, "q.toml", "plugin = \"moepp\"");
    let run_dir = dir.join("run");
    let device = format!("train.device=\"{device}\"");
    let mut args = vec!["train", cfg.to_str().unwrap()];
    let sets = [out(&run_dir), device, "train.steps=20".into(), "train.warmup=5".into(), "train.eval_every=0".into()];
    sets.iter().for_each(|s| args.extend(["--set", s.as_str()]));
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let m = metrics(&run_dir);
    assert_eq!(m.len(), 20);
    let loss = |i: usize| m[i]["loss"].as_f64().unwrap();
    assert!((loss(0) - 256f64.ln()).abs() < 0.3, "initial loss {} should be about ln(256)", loss(0));
    assert!(loss(19) < loss(0) - 1.0, "the loss must fall: {} -> {}", loss(0), loss(19));
    for row in &m {
        let frac = row["ffn_rows_frac"].as_f64().unwrap_or_else(|| panic!("no ffn_rows_frac in {row}"));
        assert!(frac > 0.0 && frac < 1.0, "{row}");
    }
}

#[test]
fn moepp_is_listed_from_libmoepp() {
    let (code, stdout, stderr) = run(&["plugins", "list"]);
    assert_eq!(code, 0, "{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("experts") && l.split_whitespace().nth(1) == Some("moepp"));
    let line = line.unwrap_or_else(|| panic!("no moepp experts in:\n{stdout}"));
    assert!(line.contains("libmoepp.so") && line.contains("MoE++"), "{line}");
}

#[test]
fn plugins_check_moepp_passes_for_each_mix_of_kinds_and_errors_name_the_keys() {
    // The check's model has 6 experts. Seed 3 puts rows on every kind with the defaults (FFN 0-1,
    // constant 2-3, copy 4, zero 5).
    let all = "\"param w_gate\", \"param w_up\", \"param w_down\", \"param w_const\", \"param v_const\"";
    for (config, seed, params) in [
        ("", "1", all),
        ("", "3", all),
        ("copy = 2\nconstant = 1\nffn = 20", "3", all),
        ("constant = 0", "3", "\"param w_gate\", \"param w_up\", \"param w_down\""),
        ("zero = 0\ncopy = 0\nconstant = 5", "1", all), // one FFN expert, rows on it
    ] {
        let (code, stdout, stderr) = run(&["plugins", "check", "moepp", "--seed", seed, "--config", config]);
        assert_eq!(code, 0, "{config:?}:\n{stdout}{stderr}");
        let contract = format!("backward contract: overwrites [\"input x\"], adds to [{params}]");
        for want in [contract.as_str(), "grad input x", "grad param w_gate", "determinism"] {
            let pass = |l: &&str| l.starts_with("PASS experts `moepp`") && l.contains(want);
            assert!(stdout.lines().any(|l| pass(&l)), "{config:?}: no PASS line with {want}:\n{stdout}");
        }
        assert!(!stdout.contains("FAIL"), "{stdout}");
    }
    // 4 zero-computation experts of 4: no FFN expert left.
    let (code, stdout, stderr) = run(&["plugins", "check", "moepp", "--experts", "4"]);
    assert_eq!(code, 1, "{stdout}");
    let line = pith_tests::one_line(&stderr);
    assert!(line.contains("`zero` + `copy` + `constant` = 1 + 1 + 2 = 4") && line.contains("at most 3"), "{line}");
    let (code, _, stderr) = run(&["plugins", "check", "moepp", "--config", "zeros = 1"]);
    assert_eq!(code, 1);
    assert!(pith_tests::one_line(&stderr).contains("zeros"), "{stderr}");
}

#[test]
fn quickstart_trains_with_moepp() {
    quickstart_learns("cpu");
}

/// The quickstart (hidden 128, expert FFN 128, 2 layers, top-2 of 8, evenly loaded in the plan):
/// swiglu counts 2 · 2 · 6·H·F per token; moepp only its 4 FFN experts' half of the rows, plus the 2
/// constant experts' quarter at 4·H.
#[test]
fn plan_counts_fewer_flops_per_token_with_moepp_than_swiglu() {
    let dir = tmp("moepp-plan");
    let (swiglu, swiglu_total) = plan_flops(&quickstart_with(&dir, "swiglu.toml", "plugin = \"swiglu\""));
    let (moepp, moepp_total) = plan_flops(&quickstart_with(&dir, "moepp.toml", "plugin = \"moepp\""));
    let (h, f, layers) = (128.0, 128.0, 2.0);
    assert_eq!(swiglu, layers * 2.0 * 6.0 * h * f);
    let want = layers * (2.0 * 4.0 / 8.0 * 6.0 * h * f + 2.0 * 2.0 / 8.0 * 4.0 * h);
    assert!((moepp - want).abs() < 1.0, "moepp experts forward {moepp}, expected {want}");
    assert!(moepp_total < swiglu_total, "training GFLOP/token: moepp {moepp_total} vs swiglu {swiglu_total}");
    // More zero-computation experts, fewer FLOPs.
    let (fewer, _) = plan_flops(&quickstart_with(&dir, "moepp6.toml", "plugin = \"moepp\"\nzero = 3\ncopy = 1"));
    assert!((fewer - layers * (2.0 * 2.0 / 8.0 * 6.0 * h * f + 2.0 * 2.0 / 8.0 * 4.0 * h)).abs() < 1.0, "{fewer}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_kernels_match_the_cpu_path() {
    // The CUDA check's model has 6 experts: at most 5 zero-computation ones.
    for config in ["", "copy = 2\nconstant = 2", "constant = 0\nzero = 2", "zero = 0\ncopy = 0\nffn = 20"] {
        let (code, stdout, stderr) = run(&["plugins", "check", "moepp", "--device", "cuda", "--config", config]);
        assert_eq!(code, 0, "{config:?}:\n{stdout}{stderr}");
        let mut want = vec!["on cuda: forward y", "on cuda: backward dx", "on cuda: backward grad w_gate"];
        if !config.contains("constant = 0") {
            want.extend(["on cuda: backward grad w_const", "on cuda: backward grad v_const"]);
        }
        for want in want {
            assert!(stdout.lines().any(|l| l.starts_with("PASS") && l.contains(want)), "{config:?}: {want}:\n{stdout}");
        }
        assert!(!stdout.contains("FAIL"), "{stdout}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn quickstart_trains_on_cuda_with_moepp() {
    quickstart_learns("cuda");
}
