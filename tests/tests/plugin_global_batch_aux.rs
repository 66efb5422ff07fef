//! The `global-batch-aux` balance loss (plugins/global-batch-aux: Qwen's global-batch load
//! balancing) end to end, through the `pith` binary: it loads from pith's own directory, passes
//! `pith plugins check` (which runs its forward many times on one micro-batch: it must count that
//! micro-batch once), the quickstart trains with it in place of switch-aux under gradient
//! accumulation, and two data-parallel CPU ranks train the same run as one — f counted over both
//! ranks' halves, so the loss values agree too (a rank that used its own counts would not).
//!
//! The plugin is the workspace member's own build, `target/<profile>/libglobal_batch_aux.so`, next
//! to the `pith` under test. With `PITH_BIN` (the GPU machine, no cargo) it must already lie there:
//! the `#[ignore]`d GPU tests run as `PITH_BIN=.device/pith .device/plugin_global_batch_aux-tests
//! --ignored` (scripts/gpu-tests.sh).

use pith_tests::{metrics, out, pith, tmp};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The quickstart, compiled in: the GPU machine has no checkout at this path.
const QUICKSTART: &str = include_str!("../../configs/quickstart.toml");

/// libglobal_batch_aux.so next to the pith under test.
fn plugin_so() -> PathBuf {
    pith_tests::plugin("global-batch-aux")
}

/// The quickstart with its switch-aux table replaced by `plugin = "global-batch-aux", coef =
/// COEF` (z-loss kept), written into `dir`.
fn quickstart_with_global_batch_aux(dir: &Path, coef: f64) -> PathBuf {
    let mut cfg: toml::Table = toml::from_str(QUICKSTART).unwrap();
    let losses = cfg["balance_loss"].as_array_mut().expect("the quickstart has [[balance_loss]] tables");
    let names: Vec<&str> = losses.iter().map(|l| l["plugin"].as_str().unwrap()).collect();
    assert_eq!(names, ["switch-aux", "z-loss"], "configs/quickstart.toml's balance losses changed");
    losses[0] = toml::Value::Table(toml::from_str(&format!("plugin = \"global-batch-aux\"\ncoef = {coef:?}")).unwrap());
    let path = dir.join("quickstart-global-batch-aux.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    path
}

fn num(row: &Value, key: &str) -> f64 {
    row[key].as_f64().unwrap_or_else(|| panic!("step {}: no number `{key}` in {row}", row["step"]))
}

/// Train the quickstart with global-batch-aux (coef 0.01) in place of switch-aux, two
/// micro-batches per step, for 20 steps on `device`: the loss falls and every step reports
/// `aux.global-batch-aux` about coef per layer (coef·E·Σ f·P is coef for a balanced softmax
/// routing, at most coef·E), summed over the 2 layers.
fn quickstart_learns_with_global_batch_aux(device: &str) {
    plugin_so();
    let dir = tmp(&format!("global-batch-aux-quickstart-{device}"));
    let (cfg, run) = (quickstart_with_global_batch_aux(&dir, 0.01), dir.join("run"));
    let device = format!("train.device=\"{device}\"");
    let args = ["train", cfg.to_str().unwrap(), "--set", &out(&run), "--set", &device, "--set", "train.steps=20"];
    let (code, stdout, stderr) =
        pith(&[&args[..], &["--set", "train.grad_accum=2", "--set", "train.eval_every=0"]].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    let console = format!("{stdout}{stderr}");
    assert!(console.contains("global-batch-aux") && !console.contains("switch-aux"), "{console}");
    let m = metrics(&run);
    assert_eq!(m.len(), 20);
    let (first, last) = (num(&m[0], "loss"), num(&m[19], "loss"));
    assert!((first - 256f64.ln()).abs() < 0.3, "initial loss {first} should be about ln(256)");
    assert!(last < first - 1.0, "20 steps took the loss from {first} to only {last}");
    for row in &m {
        let aux = num(row, "aux.global-batch-aux");
        assert!((0.015..=0.01 * 8.0 * 2.0).contains(&aux), "step {}: aux.global-batch-aux {aux}", row["step"]);
        assert!(row.get("aux.switch-aux").is_none(), "{row}");
    }
}

#[test]
fn plugins_list_shows_global_batch_aux_loaded_from_pith_s_directory() {
    let so = plugin_so();
    let (code, stdout, stderr) = pith(&["plugins", "list"]);
    assert_eq!(code, 0, "{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("balance_loss") && l.contains("global-batch-aux"));
    let line = line.unwrap_or_else(|| panic!("no global-batch-aux balance loss in:\n{stdout}"));
    assert!(line.contains(so.to_str().unwrap()) && line.contains("global batch"), "{line}");
}

#[test]
fn plugins_check_global_batch_aux_passes_and_its_config_errors_name_the_key() {
    plugin_so();
    for config in ["", "coef = 0.1"] {
        let (code, stdout, stderr) = pith(&["plugins", "check", "global-batch-aux", "--config", config]);
        assert_eq!(code, 0, "config {config:?}:\n{stdout}{stderr}");
        for want in [
            // The check runs forward on one micro-batch over and over (training): counted once.
            "determinism: 1 outputs and all grads bitwise identical",
            "backward contract: overwrites [], adds to [\"input logits\", \"input probs\"]",
            "grad input probs: 20 coords",
        ] {
            let pass = |l: &&str| l.starts_with("PASS balance_loss `global-batch-aux`") && l.contains(want);
            assert!(stdout.lines().any(|l| pass(&l)), "{want}:\n{stdout}");
        }
        assert!(!stdout.contains("FAIL"), "{stdout}");
    }
    let (code, stdout, stderr) = pith(&["plugins", "check", "global-batch-aux", "--config", "coef = -0.5"]);
    assert_eq!(code, 1, "{stdout}");
    let line = pith_tests::one_line(&stderr);
    assert!(line.contains("`coef` = -0.5") && line.contains(">= 0"), "{line}");
    let (code, _, stderr) = pith(&["plugins", "check", "global-batch-aux", "--config", "global = true"]);
    assert_eq!(code, 1);
    assert!(pith_tests::one_line(&stderr).contains("global"), "{stderr}");
}

#[test]
fn quickstart_trains_with_global_batch_aux_under_gradient_accumulation() {
    quickstart_learns_with_global_batch_aux("cpu");
}

#[test]
fn two_data_parallel_ranks_train_the_same_run_as_one() {
    plugin_so();
    let dir = tmp("global-batch-aux-dp");
    // A large coefficient, so that f steers the routing within six steps: with the ranks' own
    // counts instead of the all-reduced ones the losses part by > 1e-4 from step 2 and the
    // aux values by ~4e-3 from step 1 (measured).
    let cfg = quickstart_with_global_batch_aux(&dir, 1.0);
    let run = |verb: &[&str], name: &str| {
        let (run, at) = (dir.join(name), out(&dir.join(name)));
        let set = ["--set", "train.steps=6", "--set", "train.grad_accum=2", "--set", "train.eval_every=0"];
        let args = [verb, &[cfg.to_str().unwrap()], &set[..], &["--set", &at]].concat();
        let (code, stdout, stderr) = pith(&args);
        assert_eq!(code, 0, "{args:?}\n{stdout}{stderr}");
        metrics(&run)
    };
    // train.micro_batch (16 sequences) is global: 8 per rank.
    let (one, two) = (run(&["train"], "one"), run(&["launch", "--gpus", "2"], "two"));
    assert_eq!((one.len(), two.len()), (6, 6));
    for (a, b) in one.iter().zip(&two) {
        // The ranks add the gradients of their halves: another float summation order.
        let (la, lb) = (num(a, "loss"), num(b, "loss"));
        assert!((la - lb).abs() <= 1e-4, "step {}: loss {la} on one rank, {lb} on two", a["step"]);
        let (ga, gb) = (num(a, "aux.global-batch-aux"), num(b, "aux.global-batch-aux"));
        assert!((ga - gb).abs() <= 1e-5 * ga, "step {}: aux {ga} on one rank, {gb} on two", a["step"]);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_kernels_match_the_cpu_path() {
    plugin_so();
    for config in ["", "coef = 0.5"] {
        let args = ["plugins", "check", "global-batch-aux", "--device", "cuda", "--config", config];
        let (code, stdout, stderr) = pith(&args);
        assert_eq!(code, 0, "config {config:?}:\n{stdout}{stderr}");
        for want in [
            "on cuda: forward loss",
            "on cuda: backward d_probs",
            "on cuda: forward + backward: accumulator counts",
            "on cuda: forward + backward: accumulator counted",
        ] {
            assert!(stdout.lines().any(|l| l.starts_with("PASS") && l.contains(want)), "{want}:\n{stdout}");
        }
        assert!(!stdout.contains("FAIL"), "{stdout}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn quickstart_trains_on_cuda_with_global_batch_aux() {
    quickstart_learns_with_global_batch_aux("cuda");
}
