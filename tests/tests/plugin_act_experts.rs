//! The `relu2` and `gelu` experts (plugins/act-experts: Primer's squared ReLU and GPT-2's tanh
//! GELU, two matrices per expert) end to end, through the `pith` binary: both are listed from
//! libact_experts.so, pass `pith plugins check`, the quickstart trains with each, and `pith plan`
//! counts their two GEMMs (2/3 of swiglu's three).
//!
//! The plugin is the workspace member's own build, `target/<profile>/libact_experts.so`, next to
//! the `pith` under test. With `PITH_BIN` (a prebuilt pith, e.g. on the GPU machine) it must already
//! lie next to that binary; the `#[ignore]`d GPU tests run there as
//! `PITH_BIN=.device/pith .device/plugin-act-experts-tests --ignored` (plugins/act-experts/README.md).

use pith_tests::{metrics, out, pith, tmp};
use std::path::{Path, PathBuf};

/// The quickstart, compiled in: the GPU machine has no checkout at this path.
const QUICKSTART: &str = include_str!("../../configs/quickstart.toml");

/// libact_experts.so beside the `pith` under test.
fn plugin() -> PathBuf {
    pith_tests::plugin("act-experts")
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

/// `N` of `pith plan`'s "3 × N experts forward": one layer-summed forward FLOP count per token.
fn plan_experts_forward(config: &Path) -> f64 {
    let (code, stdout, stderr) = run(&["plan", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("training FLOPs/token:")).unwrap_or_else(|| panic!("{stdout}"));
    let at = line.find(" experts forward").unwrap_or_else(|| panic!("{line}"));
    line[..at].rsplit(' ').next().unwrap().parse().unwrap_or_else(|e| panic!("{line}: {e}"))
}

/// Train the quickstart with `[experts] plugin = "<name>"` for 20 steps (warmup 5) on `device`;
/// the loss must fall by more than 1 nat from about ln(256).
fn quickstart_learns(name: &str, device: &str) {
    let dir = tmp(&format!("act-experts-{name}-{device}"));
    let cfg = quickstart_with(&dir, "q.toml", &format!("plugin = \"{name}\""));
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
    assert!((loss(0) - 256f64.ln()).abs() < 0.3, "{name}: initial loss {} should be about ln(256)", loss(0));
    assert!(loss(19) < loss(0) - 1.0, "{name}: the loss must fall: {} -> {}", loss(0), loss(19));
}

#[test]
fn relu2_and_gelu_are_listed_from_libact_experts() {
    let (code, stdout, stderr) = run(&["plugins", "list"]);
    assert_eq!(code, 0, "{stderr}");
    for (name, what) in [("relu2", "Primer"), ("gelu", "GPT-2")] {
        let line = stdout.lines().find(|l| l.starts_with("experts") && l.split_whitespace().nth(1) == Some(name));
        let line = line.unwrap_or_else(|| panic!("no {name} experts in:\n{stdout}"));
        assert!(line.contains("libact_experts.so") && line.contains(what), "{line}");
    }
}

#[test]
fn plugins_check_relu2_and_gelu_pass_and_config_errors_name_the_key() {
    for name in ["relu2", "gelu"] {
        for config in ["", "ffn = 24"] {
            let (code, stdout, stderr) = run(&["plugins", "check", name, "--config", config]);
            assert_eq!(code, 0, "{name} {config:?}:\n{stdout}{stderr}");
            let pass = |want: &str| {
                stdout.lines().any(|l| l.starts_with(&format!("PASS experts `{name}`")) && l.contains(want))
            };
            for want in [
                "backward contract: overwrites [\"input x\"], adds to [\"param w_up\", \"param w_down\"]",
                "grad input x",
                "grad param w_up",
                "grad param w_down",
                "determinism",
            ] {
                assert!(pass(want), "{name} {config:?}: no PASS line with {want}:\n{stdout}");
            }
            assert!(!stdout.contains("FAIL"), "{stdout}");
        }
        let (code, stdout, stderr) = run(&["plugins", "check", name, "--config", "ffn = 0"]);
        assert_eq!(code, 1, "{stdout}");
        assert!(pith_tests::one_line(&stderr).contains("`ffn` = 0"), "{stderr}");
        let (code, _, stderr) = run(&["plugins", "check", name, "--config", "top_k = 2"]);
        assert_eq!(code, 1);
        assert!(pith_tests::one_line(&stderr).contains("top_k"), "{stderr}");
    }
}

#[test]
fn quickstart_trains_with_relu2() {
    quickstart_learns("relu2", "cpu");
}

#[test]
fn quickstart_trains_with_gelu() {
    quickstart_learns("gelu", "cpu");
}

/// Two GEMMs per row (4·H·F) against swiglu's three (6·H·F): plan counts 2/3 of its expert FLOPs.
#[test]
fn plan_counts_two_gemms_per_expert_row() {
    let dir = tmp("act-experts-plan");
    let swiglu = plan_experts_forward(&quickstart_with(&dir, "swiglu.toml", "plugin = \"swiglu\""));
    for name in ["relu2", "gelu"] {
        let mine =
            plan_experts_forward(&quickstart_with(&dir, &format!("{name}.toml"), &format!("plugin = \"{name}\"")));
        assert!((mine - swiglu * 2.0 / 3.0).abs() < 1.0, "{name}: {mine} vs swiglu {swiglu}");
    }
    // The quickstart: 2 layers × top-2 rows per token × 4 · hidden 128 · ffn 128.
    assert_eq!(swiglu * 2.0 / 3.0, 2.0 * 2.0 * 4.0 * 128.0 * 128.0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_kernels_match_the_cpu_path() {
    for name in ["relu2", "gelu"] {
        for config in ["", "ffn = 20"] {
            let (code, stdout, stderr) = run(&["plugins", "check", name, "--device", "cuda", "--config", config]);
            assert_eq!(code, 0, "{name} {config:?}:\n{stdout}{stderr}");
            for want in [
                "on cuda: forward y",
                "on cuda: backward dx",
                "on cuda: backward grad w_up",
                "on cuda: backward grad w_down",
            ] {
                assert!(stdout.lines().any(|l| l.starts_with("PASS") && l.contains(want)), "{name}: {want}:\n{stdout}");
            }
            assert!(!stdout.contains("FAIL"), "{stdout}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn quickstart_trains_on_cuda_with_relu2_and_gelu() {
    quickstart_learns("relu2", "cuda");
    quickstart_learns("gelu", "cuda");
}
