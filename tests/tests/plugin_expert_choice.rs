//! The `expert-choice` router plugin (plugins/expert-choice, Zhou et al. 2022) end to end, through
//! the `pith` binary: it loads from pith's own directory, passes `pith plugins check` (tokens with
//! no expert and k varying per call included), and the quickstart trains with it, every expert
//! taking exactly its capacity of tokens.
//!
//! `cargo test --workspace` builds target/<profile>/libexpert_choice.so (a workspace member); the
//! tests build it themselves too (`cargo build -p expert-choice`, quick when it is up to date), so
//! that `cargo test -p pith-tests --test plugin_expert_choice` runs alone. With `PITH_BIN` (the GPU
//! machine, no cargo) the .so must already lie next to that binary: the `#[ignore]`d GPU tests run
//! there as `PITH_BIN=.device/pith .device/plugin_expert_choice-tests --ignored` (scripts/gpu-tests.sh).

use pith_tests::{metrics, out, pith, tmp};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The quickstart, compiled in: the GPU machine has no checkout at this path.
const QUICKSTART: &str = include_str!("../../configs/quickstart.toml");

/// libexpert_choice.so next to the pith under test.
fn plugin_so() -> PathBuf {
    pith_tests::plugin("expert-choice")
}

/// The quickstart with its [router] table replaced by `router` (so `top_k` does not leak),
/// written into `dir`; returns its path and the table.
fn quickstart_with_router(dir: &Path, router: &str) -> (PathBuf, toml::Table) {
    let mut cfg: toml::Table = toml::from_str(QUICKSTART).unwrap();
    cfg.insert("router".into(), toml::Value::Table(toml::from_str(router).unwrap()));
    let path = dir.join("quickstart-expert-choice.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    (path, cfg)
}

fn num(row: &Value, key: &str) -> f64 {
    row[key].as_f64().unwrap_or_else(|| panic!("no {key} in {row}"))
}

/// Train the quickstart with `[router] plugin = "expert-choice"` (capacity_factor 1, k_avg 2) for
/// 30 steps on `device`; check that the loss falls, that every expert of every layer took exactly
/// its capacity ⌈T·k_avg/E⌉ of each micro-batch's T tokens (the host's load, which skips EMPTY
/// slots), and that the router's metrics say the same.
fn quickstart_learns_with_every_expert_at_capacity(device: &str) {
    plugin_so();
    let dir = tmp(&format!("expert-choice-quickstart-{device}"));
    let (cfg, table) = quickstart_with_router(&dir, "plugin = \"expert-choice\"");
    let int = |t: &str, k: &str| table[t].get(k).and_then(|v| v.as_integer());
    let tokens = (int("train", "micro_batch").unwrap() * int("model", "seq_len").unwrap()) as f64;
    let (experts, accum) = (int("model", "experts").unwrap() as f64, int("train", "grad_accum").unwrap_or(1) as f64);
    let capacity = (tokens * 2.0 / experts).ceil();
    let run = dir.join("run");
    let device = format!("train.device=\"{device}\"");
    let args = ["train", cfg.to_str().unwrap(), "--set", &out(&run), "--set", &device, "--set", "train.steps=30"];
    let (code, stdout, stderr) = pith(&[&args[..], &["--set", "train.eval_every=0"]].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    let m = metrics(&run);
    assert_eq!(m.len(), 30);
    let (first, last) = (num(&m[0], "loss"), num(&m[29], "loss"));
    assert!((first - 256f64.ln()).abs() < 0.3, "initial loss {first} should be about ln(256)");
    assert!(last < first - 1.0, "the loss must fall: {first} -> {last}");
    for row in &m {
        let (k, unrouted) = (num(row, "experts_per_token"), num(row, "unrouted_frac"));
        assert!((k - capacity * experts / tokens).abs() < 1e-9, "experts_per_token = capacity·E/T: {row}");
        assert!((0.0..0.5).contains(&unrouted), "{row}");
        let layers = row["load_per_layer"].as_array().unwrap();
        for l in layers {
            let load: Vec<f64> = l.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert!(load.iter().all(|&n| n == capacity * accum), "every expert takes its capacity: {row}");
        }
        assert_eq!(num(row, "load_max_over_mean"), 1.0, "{row}");
    }
}

#[test]
fn plugins_list_shows_expert_choice_loaded_from_pith_s_directory() {
    let so = plugin_so();
    let (code, stdout, stderr) = pith(&["plugins", "list"]);
    assert_eq!(code, 0, "{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("router") && l.contains("expert-choice"));
    let line = line.unwrap_or_else(|| panic!("no expert-choice router in:\n{stdout}"));
    assert!(line.contains(so.to_str().unwrap()) && line.contains("Zhou et al. 2022"), "{line}");
}

#[test]
fn plugins_check_expert_choice_passes_and_its_config_errors_name_the_key() {
    plugin_so();
    // 8 tokens, 6 experts: capacity 3 (2.25 experts a token), 2 (k_avg 1: some tokens get none), 8.
    for (config, unrouted) in [("", false), ("k_avg = 1", true), ("capacity_factor = 2.0\nk_avg = 3", false)] {
        let (code, stdout, stderr) = pith(&["plugins", "check", "expert-choice", "--config", config]);
        assert_eq!(code, 0, "config {config:?}:\n{stdout}{stderr}");
        for want in [
            "backward contract: overwrites [\"input x\"], adds to [\"param weight\"]",
            "grad input x: 20 coords",
            "grad param weight: 20 coords",
            "6 of 6 experts chosen",
        ] {
            let pass = |l: &&str| l.starts_with("PASS router `expert-choice`") && l.contains(want);
            assert!(stdout.lines().any(|l| pass(&l)), "{want}:\n{stdout}");
        }
        if unrouted {
            assert!(stdout.contains("routes 8 tokens: 0..="), "a token with no expert:\n{stdout}");
        }
        assert!(!stdout.contains("FAIL"), "{stdout}");
    }
    for (config, want) in [
        ("k_avg = 9", "`k_avg` = 9 but the model has 6 experts; k_avg must be in 1..=6"),
        ("capacity_factor = 0.0", "`capacity_factor` = 0 must be a finite number > 0"),
        ("top_k = 2", "top_k"),
    ] {
        let (code, stdout, stderr) = pith(&["plugins", "check", "expert-choice", "--config", config]);
        assert_eq!(code, 1, "{config}: {stdout}");
        let line = pith_tests::one_line(&stderr);
        assert!(line.contains(want), "{config}: {line}");
    }
}

#[test]
fn quickstart_trains_with_expert_choice_and_every_expert_takes_its_capacity() {
    quickstart_learns_with_every_expert_at_capacity("cpu");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_kernels_match_the_cpu_path() {
    plugin_so();
    // The CUDA check routes 64 tokens over 8 experts: capacity 16, 8 (tokens left unrouted), 48, 64.
    for config in ["", "k_avg = 1", "capacity_factor = 2.0\nk_avg = 3", "k_avg = 8"] {
        let args = ["plugins", "check", "expert-choice", "--device", "cuda", "--experts", "8", "--config", config];
        let (code, stdout, stderr) = pith(&args);
        assert_eq!(code, 0, "config {config:?}:\n{stdout}{stderr}");
        for want in [
            "on cuda: forward ids",
            "on cuda: forward probs",
            "on cuda: forward weights",
            "on cuda: backward dx",
            "on cuda: backward grad weight",
            "on cuda: backward (d_probs) grad weight",
        ] {
            assert!(stdout.lines().any(|l| l.starts_with("PASS") && l.contains(want)), "{want}:\n{stdout}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn quickstart_trains_on_cuda_with_expert_choice() {
    quickstart_learns_with_every_expert_at_capacity("cuda");
}
