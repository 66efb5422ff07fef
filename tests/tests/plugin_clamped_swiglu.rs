//! GPT-OSS's experts (plugins/clamped-swiglu) end to end, through the `pith` binary: listed from
//! libclamped_swiglu.so, `pith plugins check` passes (with and without biases), and
//! configs/gpt-oss-tiny.toml (biased router, sinks, sliding windows, these experts) trains on the
//! CPU and exports as GptOssForCausalLM. The `#[ignore]`d GPU test runs on the GPU machine as
//! `PITH_BIN=.device/pith .device/plugin_clamped_swiglu-tests --ignored`.

use pith_tests::{metrics, out, pith, tmp};

/// The GPT-OSS config, compiled in: the GPU machine has no checkout at this path.
const GPT_OSS: &str = include_str!("../../configs/gpt-oss-tiny.toml");

fn run(args: &[&str]) -> (i32, String, String) {
    pith_tests::plugin("clamped-swiglu");
    pith(args)
}

/// Train configs/gpt-oss-tiny.toml for 30 steps on `device`: the loss falls by over a nat from
/// about ln(256); returns the run directory.
fn gpt_oss_learns(device: &str) -> (pith_tests::Scratch, std::path::PathBuf) {
    let dir = tmp(&format!("clamped-swiglu-{device}"));
    let cfg = dir.join("gpt-oss.toml");
    std::fs::write(&cfg, GPT_OSS).unwrap();
    let run_dir = dir.join("run");
    let sets =
        [out(&run_dir), format!("train.device=\"{device}\""), "train.steps=30".into(), "train.eval_every=0".into()];
    let mut args = vec!["train", cfg.to_str().unwrap()];
    sets.iter().for_each(|s| args.extend(["--set", s.as_str()]));
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let m = metrics(&run_dir);
    let loss = |i: usize| m[i]["loss"].as_f64().unwrap();
    assert!((loss(0) - 256f64.ln()).abs() < 0.3, "{device}: initial loss {} should be about ln(256)", loss(0));
    assert!(loss(29) < loss(0) - 1.0, "{device}: the loss must fall: {} -> {}", loss(0), loss(29));
    (dir, run_dir)
}

#[test]
fn clamped_swiglu_is_listed_and_passes_its_checks() {
    let (code, stdout, stderr) = run(&["plugins", "list"]);
    assert_eq!(code, 0, "{stderr}");
    let line =
        stdout.lines().find(|l| l.starts_with("experts") && l.split_whitespace().nth(1) == Some("clamped-swiglu"));
    assert!(line.is_some_and(|l| l.contains("libclamped_swiglu.so")), "{stdout}");
    for config in ["", "bias = false\nffn = 24"] {
        let (code, stdout, stderr) = run(&["plugins", "check", "clamped-swiglu", "--config", config]);
        assert_eq!(code, 0, "--config '{config}':\n{stdout}{stderr}");
        assert!(stdout.lines().last().is_some_and(|l| l.starts_with("PASS")), "{stdout}");
    }
    let (code, _, stderr) = run(&["plugins", "check", "clamped-swiglu", "--config", "limit = -1.0"]);
    assert!(code != 0 && stderr.contains("`limit` = -1"), "{stderr}");
}

#[test]
fn gpt_oss_tiny_trains_and_exports_as_gpt_oss() {
    let (dir, run_dir) = gpt_oss_learns("cpu");
    let hf = dir.join("hf");
    let (code, stdout, stderr) = run(&["export", "hf", run_dir.to_str().unwrap(), hf.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "GptOssForCausalLM");
    assert_eq!(config["layer_types"][0], "sliding_attention");
    assert_eq!(config["layer_types"][1], "full_attention");
    assert_eq!(config["sliding_window"], 16);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_matches_the_cpu_and_gpt_oss_trains() {
    for config in ["", "bias = false"] {
        let (code, stdout, stderr) =
            run(&["plugins", "check", "clamped-swiglu", "--device", "cuda", "--config", config]);
        assert_eq!(code, 0, "--config '{config}':\n{stdout}{stderr}");
    }
    gpt_oss_learns("cuda");
}
