//! The `top-any` router plugin (plugins/top-any, DynMoE) end to end, through the `pith` binary:
//! it loads from pith's own directory, passes `pith plugins check`, and the quickstart trains with
//! it, its tokens using fewer than `max_k` experts and the host counting only the used slots.
//!
//! `cargo test --workspace` builds target/<profile>/libtop_any.so (a workspace member); the tests
//! build it themselves too (`cargo build -p top-any`, quick when it is up to date), so that
//! `cargo test -p pith-tests --test plugin_top_any` runs alone. With `PITH_BIN` (the GPU machine,
//! no cargo) the .so must already lie next to that binary: the `#[ignore]`d GPU tests run there as
//! `PITH_BIN=.device/pith .device/plugin-top-any-tests --ignored` (see plugins/top-any/README.md).

use pith_tests::{metrics, out, pith, tmp};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The quickstart, compiled in: the GPU machine has no checkout at this path.
const QUICKSTART: &str = include_str!("../../configs/quickstart.toml");

/// libtop_any.so next to the pith under test.
fn plugin_so() -> PathBuf {
    pith_tests::plugin("top-any")
}

/// The quickstart with its [router] table replaced by `router` (so `top_k` does not leak),
/// written into `dir`; returns its path and the table.
fn quickstart_with_router(dir: &Path, router: &str) -> (PathBuf, toml::Table) {
    let mut cfg: toml::Table = toml::from_str(QUICKSTART).unwrap();
    cfg.insert("router".into(), toml::Value::Table(toml::from_str(router).unwrap()));
    let path = dir.join("quickstart-top-any.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    (path, cfg)
}

fn num(row: &Value, key: &str) -> f64 {
    row[key].as_f64().unwrap_or_else(|| panic!("no {key} in {row}"))
}

/// Train the quickstart with `[router] plugin = "top-any"` for 60 steps on `device`; check that
/// the loss falls, that `experts_per_token` is reported every step and ends below max_k = 4, and
/// that the host's load (which skips EMPTY slots) adds up to it.
fn quickstart_learns_with_fewer_than_max_k_experts(device: &str) {
    plugin_so();
    let dir = tmp(&format!("top-any-quickstart-{device}"));
    let (cfg, table) = quickstart_with_router(&dir, "plugin = \"top-any\"");
    let int = |t: &str, k: &str| table[t].get(k).and_then(|v| v.as_integer());
    // Routed tokens per step and layer: micro_batch × seq_len per micro-batch.
    let tokens = (int("train", "micro_batch").unwrap() * int("model", "seq_len").unwrap()) as f64
        * int("train", "grad_accum").unwrap_or(1) as f64;
    let layers = int("model", "layers").unwrap() as f64;
    let run = dir.join("run");
    let device = format!("train.device=\"{device}\"");
    let args = ["train", cfg.to_str().unwrap(), "--set", &out(&run), "--set", &device, "--set", "train.steps=60"];
    let (code, stdout, stderr) = pith(&[&args[..], &["--set", "train.eval_every=0"]].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    let m = metrics(&run);
    assert_eq!(m.len(), 60);
    let (first, last) = (num(&m[0], "loss"), num(&m[59], "loss"));
    assert!((first - 256f64.ln()).abs() < 0.3, "initial loss {first} should be about ln(256)");
    assert!(last < first - 2.0, "the loss must fall: {first} -> {last}");
    for row in &m {
        let (k, fallback) = (num(row, "experts_per_token"), num(row, "fallback_frac"));
        assert!((1.0..=4.0).contains(&k) && (0.0..=1.0).contains(&fallback), "{row}");
        // The host counts only the used slots: its per-layer load adds up to the router's count.
        let load_rows = row["load_per_layer"].as_array().unwrap().iter().flat_map(|l| l.as_array().unwrap());
        let load: f64 = load_rows.map(|v| v.as_f64().unwrap()).sum();
        assert!((load / (layers * tokens) - k).abs() < 1e-9, "load {load} vs experts_per_token {k}: {row}");
    }
    let k = num(&m[59], "experts_per_token");
    assert!(k < 4.0 - 0.25, "after training the tokens use fewer than max_k = 4 experts: {k}");
}

#[test]
fn plugins_list_shows_top_any_loaded_from_pith_s_directory() {
    let so = plugin_so();
    let (code, stdout, stderr) = pith(&["plugins", "list"]);
    assert_eq!(code, 0, "{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("router") && l.contains("top-any"));
    let line = line.unwrap_or_else(|| panic!("no top-any router in:\n{stdout}"));
    assert!(line.contains(so.to_str().unwrap()) && line.contains("DynMoE"), "{line}");
}

#[test]
fn plugins_check_top_any_passes_and_its_config_errors_name_the_key() {
    plugin_so();
    for config in ["", "normalize = false\nmax_k = 2", "threshold_init = 0.5"] {
        let (code, stdout, stderr) = pith(&["plugins", "check", "top-any", "--config", config]);
        assert_eq!(code, 0, "config {config:?}:\n{stdout}{stderr}");
        for want in [
            "param threshold: surrogate gradient, finite, nonzero on",
            "backward contract: overwrites [\"input x\"], adds to [\"param weight\", \"param threshold\"]",
            "grad input x: 20 coords",
            "grad param weight: 20 coords",
        ] {
            let pass = |l: &&str| l.starts_with("PASS router `top-any`") && l.contains(want);
            assert!(stdout.lines().any(|l| pass(&l)), "{want}:\n{stdout}");
        }
        assert!(!stdout.contains("FAIL"), "{stdout}");
    }
    let (code, stdout, stderr) = pith(&["plugins", "check", "top-any", "--config", "max_k = 9"]);
    assert_eq!(code, 1, "{stdout}");
    let line = pith_tests::one_line(&stderr);
    assert!(line.contains("`max_k` = 9") && line.contains("1..=6"), "{line}");
    let (code, _, stderr) = pith(&["plugins", "check", "top-any", "--config", "top_k = 2"]);
    assert_eq!(code, 1);
    assert!(pith_tests::one_line(&stderr).contains("top_k"), "{stderr}");
}

#[test]
fn quickstart_trains_with_top_any_and_its_tokens_use_fewer_than_max_k_experts() {
    quickstart_learns_with_fewer_than_max_k_experts("cpu");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_kernels_match_the_cpu_path() {
    plugin_so();
    // The CPU check's model has 6 experts unless told (the CUDA check's has 8).
    for config in ["", "normalize = false", "max_k = 8\nthreshold_init = -0.5"] {
        let args = ["plugins", "check", "top-any", "--device", "cuda", "--experts", "8", "--config", config];
        let (code, stdout, stderr) = pith(&args);
        assert_eq!(code, 0, "config {config:?}:\n{stdout}{stderr}");
        for want in [
            "on cuda: forward ids",
            "on cuda: forward weights",
            "on cuda: backward dx",
            "on cuda: backward grad threshold",
            "on cuda: backward (d_probs) grad weight",
        ] {
            assert!(stdout.lines().any(|l| l.starts_with("PASS") && l.contains(want)), "{want}:\n{stdout}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn quickstart_trains_on_cuda_with_top_any() {
    quickstart_learns_with_fewer_than_max_k_experts("cuda");
}
