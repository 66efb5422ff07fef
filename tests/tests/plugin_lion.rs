//! The `lion` optimizer plugin (plugins/lion, Chen et al. 2023) end to end, through the `pith`
//! binary: it loads from pith's own directory, passes `pith plugins check` (the quadratic,
//! determinism, grad_scale, weight decay), a bad key is one line naming it, the quickstart trains
//! with it at lr 3e-4 (the loss falls), and a resumed run reproduces the uninterrupted one bit for
//! bit (its momentum `m` is checkpointed).
//!
//! The `#[ignore]`d GPU tests run on the GPU machine as
//! `PITH_BIN=.device/pith .device/plugin-lion-tests --ignored` with liblion.so next to that pith
//! (see plugins/lion/README.md).

use pith_tests::{metrics, out, pith, tmp};
use std::path::{Path, PathBuf};

/// The quickstart, compiled in: the GPU machine has no checkout at this path.
const QUICKSTART: &str = include_str!("../../configs/quickstart.toml");

/// liblion.so next to the pith under test.
fn plugin_so() -> PathBuf {
    pith_tests::plugin("lion")
}

/// The quickstart with `[optimizer] plugin = "lion"` (weight_decay 0.3: Lion's is 3-10× AdamW's),
/// written into `dir`.
fn quickstart_with_lion(dir: &Path) -> PathBuf {
    let adamw = "[optimizer]\nplugin = \"adamw\"\nweight_decay = 0.1\n";
    assert!(QUICKSTART.contains(adamw), "configs/quickstart.toml has no `{adamw}` table");
    let path = dir.join("quickstart-lion.toml");
    std::fs::write(&path, QUICKSTART.replace(adamw, "[optimizer]\nplugin = \"lion\"\nweight_decay = 0.3\n")).unwrap();
    path
}

/// Train the quickstart with Lion for `steps` steps at lr 3e-4 (warmup 5, no eval) into `dir`/run
/// on `device`, with `extra` settings; returns the run directory.
fn train(dir: &Path, device: &str, steps: usize, extra: &[&str]) -> PathBuf {
    let (cfg, run) = (quickstart_with_lion(dir), dir.join("run"));
    let (steps, device, out) = (format!("train.steps={steps}"), format!("train.device=\"{device}\""), out(&run));
    let mut args = vec!["train", cfg.to_str().unwrap(), "--set", &out];
    for set in [&steps[..], &device, "train.lr=3e-4", "train.warmup=5", "train.eval_every=0"] {
        args.extend(["--set", set]);
    }
    args.extend(extra);
    let (code, stdout, stderr) = pith(&args);
    assert_eq!(code, 0, "{stdout}{stderr}");
    run
}

fn losses(run: &Path) -> Vec<f64> {
    metrics(run).iter().map(|r| r["loss"].as_f64().unwrap_or_else(|| panic!("no loss in {r}"))).collect()
}

/// 20 steps: the loss starts near ln(256) and falls by more than 0.3 nats.
fn quickstart_learns(device: &str) {
    plugin_so();
    let l = losses(&train(&tmp(&format!("lion-quickstart-{device}")), device, 20, &[]));
    assert_eq!(l.len(), 20);
    assert!(l.iter().all(|v| v.is_finite()), "{l:?}");
    assert!((l[0] - 256f64.ln()).abs() < 0.3, "initial loss {} should be about ln(256)", l[0]);
    assert!(l[19] < l[0] - 0.3, "the loss must fall: {l:?}");
}

/// The tensor names of a safetensors file (its header: an 8-byte length, then JSON).
fn tensor_names(file: &Path) -> Vec<String> {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header.keys().filter(|k| *k != "__metadata__").cloned().collect()
}

#[test]
fn plugins_list_shows_lion_loaded_from_pith_s_directory() {
    let so = plugin_so();
    let (code, stdout, stderr) = pith(&["plugins", "list"]);
    assert_eq!(code, 0, "{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("optimizer") && l.contains(" lion "));
    let line = line.unwrap_or_else(|| panic!("no lion optimizer in:\n{stdout}"));
    assert!(line.contains(so.to_str().unwrap()) && line.contains("Lion"), "{line}");
}

#[test]
fn plugins_check_lion_passes_and_a_bad_key_is_named() {
    plugin_so();
    for (config, decay) in [
        ("", "decay = true: a zero-grad step leaves it unchanged (no weight decay set)"),
        ("weight_decay = 1.0\nbeta1 = 0.95\nbeta2 = 0.98", "decay = true: a zero-grad step shrinks the norm"),
    ] {
        let (code, stdout, stderr) = pith(&["plugins", "check", "lion", "--config", config]);
        assert_eq!(code, 0, "config {config:?}:\n{stdout}{stderr}");
        for want in [
            "quadratic: f ",
            "determinism: two 200-step runs bitwise identical",
            "grad_scale: scaling by 0.25 equals gradients ÷ 4",
            "decay = false: a zero-grad step leaves the param unchanged",
            decay,
        ] {
            let pass = |l: &&str| l.starts_with("PASS optimizer `lion`") && l.contains(want);
            assert!(stdout.lines().any(|l| pass(&l)), "{want}:\n{stdout}");
        }
        assert!(!stdout.contains("FAIL"), "{stdout}");
    }
    let (code, stdout, stderr) = pith(&["plugins", "check", "lion", "--config", "beta2 = 1.0"]);
    assert_eq!(code, 1, "{stdout}");
    let line = pith_tests::one_line(&stderr);
    assert!(line.contains("`beta2` = 1 but it must be in [0, 1)"), "{line}");
    let (code, _, stderr) = pith(&["plugins", "check", "lion", "--config", "eps = 1e-8"]);
    assert_eq!(code, 1);
    assert!(pith_tests::one_line(&stderr).contains("eps"), "{stderr}");
}

#[test]
fn quickstart_trains_with_lion() {
    quickstart_learns("cpu");
}

#[test]
fn a_resumed_lion_run_reproduces_the_uninterrupted_one_exactly() {
    plugin_so();
    let (a, b) = (tmp("lion-resume-a"), tmp("lion-resume-b"));
    let ra = train(&a, "cpu", 8, &["--set", "train.checkpoint_every=4"]);
    let ck = ra.join("checkpoints/step_00000004");
    let names = tensor_names(&ck.join("optimizer.safetensors"));
    for name in ["embed.weight.m", "layers.0.moe.experts.w_up.m", "final_norm.weight.m", "lm_head.weight.m"] {
        assert!(names.iter().any(|n| n == name), "optimizer.safetensors lacks {name}: {names:?}");
    }
    assert!(names.iter().all(|n| n.ends_with(".m")), "one state, `m`: {names:?}");
    let rb = train(&b, "cpu", 8, &["--resume", ck.to_str().unwrap()]);
    let (la, lb) = (losses(&ra), losses(&rb));
    assert_eq!(lb.len(), 4);
    assert_eq!(la[4..], lb[..], "steps 5..8 after a resume at 4");
    let w = |r: &Path| std::fs::read(r.join("checkpoints/step_00000008/model.safetensors")).unwrap();
    assert!(w(&ra) == w(&rb), "final weights differ");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_kernel_matches_the_cpu_path() {
    plugin_so();
    for config in ["", "weight_decay = 0.5\nbeta1 = 0.8"] {
        let (code, stdout, stderr) = pith(&["plugins", "check", "lion", "--device", "cuda", "--config", config]);
        assert_eq!(code, 0, "config {config:?}:\n{stdout}{stderr}");
        for want in [
            "on cuda: step 3 (grad_scale 0.8) layers.0.moe.experts.w_up: w - w0",
            "on cuda: step 3 (grad_scale 0.8) layers.0.attn_norm.weight: state m",
            "on cuda: step 3 (grad_scale 0.8) layers.0.moe.router.weight: w_lowp = bf16(w)",
        ] {
            assert!(stdout.lines().any(|l| l.starts_with("PASS") && l.contains(want)), "{want}:\n{stdout}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn quickstart_trains_on_cuda_with_lion() {
    quickstart_learns("cuda");
}
