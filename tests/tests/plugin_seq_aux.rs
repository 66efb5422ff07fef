//! The `seq-aux` balance loss (plugins/seq-aux: DeepSeek-V2/V3's sequence-wise auxiliary loss)
//! end to end, through the `pith` binary: it loads from pith's own directory, passes `pith plugins
//! check`, the quickstart trains with it as a third `[[balance_loss]]` (its value reported every
//! step), and two data-parallel CPU ranks train the same run as one (the loss is per sequence, and
//! every sequence lives on one rank).
//!
//! The plugin is the workspace member's own build, `target/<profile>/libseq_aux.so`, next to the
//! `pith` under test. With `PITH_BIN` (the GPU machine, no cargo) it must already lie there: the
//! `#[ignore]`d GPU tests run as `PITH_BIN=.device/pith .device/plugin_seq_aux-tests --ignored`
//! (scripts/gpu-tests.sh).

use pith_tests::{metrics, out, pith, tmp};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The quickstart, compiled in: the GPU machine has no checkout at this path.
const QUICKSTART: &str = include_str!("../../configs/quickstart.toml");

/// libseq_aux.so next to the pith under test.
fn plugin_so() -> PathBuf {
    pith_tests::plugin("seq-aux")
}

/// The quickstart with `[[balance_loss]] plugin = "seq-aux", coef = COEF` added after its own
/// (switch-aux, z-loss), written into `dir`.
fn quickstart_with_seq_aux(dir: &Path, coef: f64) -> PathBuf {
    let mut cfg: toml::Table = toml::from_str(QUICKSTART).unwrap();
    let losses = cfg["balance_loss"].as_array_mut().expect("the quickstart has [[balance_loss]] tables");
    let names: Vec<&str> = losses.iter().map(|l| l["plugin"].as_str().unwrap()).collect();
    assert_eq!(names, ["switch-aux", "z-loss"], "configs/quickstart.toml's balance losses changed");
    losses.push(toml::Value::Table(toml::from_str(&format!("plugin = \"seq-aux\"\ncoef = {coef:?}")).unwrap()));
    let path = dir.join("quickstart-seq-aux.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    path
}

fn num(row: &Value, key: &str) -> f64 {
    row[key].as_f64().unwrap_or_else(|| panic!("step {}: no number `{key}` in {row}", row["step"]))
}

/// Train the quickstart plus seq-aux (coef 1e-3) for 20 steps on `device`: the loss falls, and
/// every step reports `aux.seq-aux` within (0, coef·E·layers] (Σ_e f_e·P_e is at most E per
/// sequence, about 1 when balanced; summed over the 2 layers) next to switch-aux and z-loss.
fn quickstart_learns_with_seq_aux(device: &str) {
    plugin_so();
    let dir = tmp(&format!("seq-aux-quickstart-{device}"));
    let (cfg, run) = (quickstart_with_seq_aux(&dir, 1e-3), dir.join("run"));
    let device = format!("train.device=\"{device}\"");
    let args = ["train", cfg.to_str().unwrap(), "--set", &out(&run), "--set", &device, "--set", "train.steps=20"];
    let (code, stdout, stderr) = pith(&[&args[..], &["--set", "train.eval_every=0"]].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    let console = format!("{stdout}{stderr}");
    assert!(console.contains("seq-aux"), "the console line shows the loss: {console}");
    let m = metrics(&run);
    assert_eq!(m.len(), 20);
    let (first, last) = (num(&m[0], "loss"), num(&m[19], "loss"));
    assert!((first - 256f64.ln()).abs() < 0.3, "initial loss {first} should be about ln(256)");
    assert!(last < first - 1.0, "20 steps took the loss from {first} to only {last}");
    for row in &m {
        let aux = num(row, "aux.seq-aux");
        assert!(aux > 0.5e-3 && aux <= 1e-3 * 8.0 * 2.0, "step {}: aux.seq-aux {aux}", row["step"]);
        assert!(num(row, "aux.switch-aux") > 0.0 && num(row, "aux.z-loss") > 0.0, "{row}");
    }
}

#[test]
fn plugins_list_shows_seq_aux_loaded_from_pith_s_directory() {
    let so = plugin_so();
    let (code, stdout, stderr) = pith(&["plugins", "list"]);
    assert_eq!(code, 0, "{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("balance_loss") && l.contains("seq-aux"));
    let line = line.unwrap_or_else(|| panic!("no seq-aux balance loss in:\n{stdout}"));
    assert!(line.contains(so.to_str().unwrap()) && line.contains("sequence-wise"), "{line}");
}

#[test]
fn plugins_check_seq_aux_passes_and_its_config_errors_name_the_key() {
    plugin_so();
    for config in ["", "coef = 0.01"] {
        let (code, stdout, stderr) = pith(&["plugins", "check", "seq-aux", "--config", config]);
        assert_eq!(code, 0, "config {config:?}:\n{stdout}{stderr}");
        for want in [
            "determinism: 1 outputs and all grads bitwise identical",
            "backward contract: overwrites [], adds to [\"input logits\", \"input probs\"]",
            "grad input probs: 20 coords",
        ] {
            let pass = |l: &&str| l.starts_with("PASS balance_loss `seq-aux`") && l.contains(want);
            assert!(stdout.lines().any(|l| pass(&l)), "{want}:\n{stdout}");
        }
        assert!(!stdout.contains("FAIL"), "{stdout}");
    }
    let (code, stdout, stderr) = pith(&["plugins", "check", "seq-aux", "--config", "coef = -1.0"]);
    assert_eq!(code, 1, "{stdout}");
    let line = pith_tests::one_line(&stderr);
    assert!(line.contains("`coef` = -1") && line.contains(">= 0"), "{line}");
    let (code, _, stderr) = pith(&["plugins", "check", "seq-aux", "--config", "alpha = 0.1"]);
    assert_eq!(code, 1);
    assert!(pith_tests::one_line(&stderr).contains("alpha"), "{stderr}");
}

#[test]
fn quickstart_trains_with_seq_aux_as_a_third_balance_loss() {
    quickstart_learns_with_seq_aux("cpu");
}

#[test]
fn two_data_parallel_ranks_train_the_same_run_as_one() {
    plugin_so();
    let dir = tmp("seq-aux-dp");
    // A large coefficient, so that the loss steers the routing within six steps.
    let cfg = quickstart_with_seq_aux(&dir, 1.0);
    let run = |verb: &[&str], name: &str| {
        let (run, at) = (dir.join(name), out(&dir.join(name)));
        let set = ["--set", "train.steps=6", "--set", "train.eval_every=0"];
        let args = [verb, &[cfg.to_str().unwrap()], &set[..], &["--set", &at]].concat();
        let (code, stdout, stderr) = pith(&args);
        assert_eq!(code, 0, "{args:?}\n{stdout}{stderr}");
        metrics(&run)
    };
    let (one, two) = (run(&["train"], "one"), run(&["launch", "--gpus", "2"], "two"));
    assert_eq!((one.len(), two.len()), (6, 6));
    for (a, b) in one.iter().zip(&two) {
        // The ranks add the gradients of their halves: another float summation order.
        let (la, lb) = (num(a, "loss"), num(b, "loss"));
        assert!((la - lb).abs() <= 1e-4, "step {}: loss {la} on one rank, {lb} on two", a["step"]);
        let (sa, sb) = (num(a, "aux.seq-aux"), num(b, "aux.seq-aux"));
        assert!((sa - sb).abs() <= 1e-5 * sa, "step {}: aux.seq-aux {sa} on one rank, {sb} on two", a["step"]);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_kernels_match_the_cpu_path() {
    plugin_so();
    for config in ["", "coef = 0.5"] {
        let (code, stdout, stderr) = pith(&["plugins", "check", "seq-aux", "--device", "cuda", "--config", config]);
        assert_eq!(code, 0, "config {config:?}:\n{stdout}{stderr}");
        for want in ["on cuda: forward loss", "on cuda: backward d_probs", "on cuda: backward d_logits"] {
            assert!(stdout.lines().any(|l| l.starts_with("PASS") && l.contains(want)), "{want}:\n{stdout}");
        }
        assert!(!stdout.contains("FAIL"), "{stdout}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn quickstart_trains_on_cuda_with_seq_aux() {
    quickstart_learns_with_seq_aux("cuda");
}
