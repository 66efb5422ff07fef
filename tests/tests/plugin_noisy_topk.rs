//! The `noisy-topk` router plugin (plugins/noisy-topk: Shazeer et al. 2017 noisy top-k gating,
//! learned noise or multiplicative jitter) end to end, through the `pith` binary: it loads from
//! pith's own directory, passes `pith plugins check` (the check's repeated forwards draw the same
//! noise from the same context), the quickstart trains with it and its noise weight learns, and a
//! resumed run redraws exactly the noise of the uninterrupted one.
//!
//! `cargo test --workspace` builds target/<profile>/libnoisy_topk.so (a workspace member); the
//! tests build it themselves too (`cargo build -p noisy-topk`), so that `cargo test -p pith-tests
//! --test plugin_noisy_topk` runs alone. With `PITH_BIN` (the GPU machine, no cargo) the .so must
//! already lie next to that binary: the `#[ignore]`d GPU tests run there as
//! `PITH_BIN=.device/pith .device/plugin-noisy-topk-tests --ignored` (see plugins/noisy-topk/README.md).

use pith_tests::{metrics, out, pith, tmp};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The quickstart, compiled in: the GPU machine has no checkout at this path.
const QUICKSTART: &str = include_str!("../../configs/quickstart.toml");

/// libnoisy_topk.so next to the pith under test.
fn plugin_so() -> PathBuf {
    pith_tests::plugin("noisy-topk")
}

/// The quickstart with its [router] table replaced by `router`, written into `dir`.
fn quickstart_with_router(dir: &Path, router: &str) -> PathBuf {
    let mut cfg: toml::Table = toml::from_str(QUICKSTART).unwrap();
    cfg.insert("router".into(), toml::Value::Table(toml::from_str(router).unwrap()));
    let path = dir.join("quickstart-noisy-topk.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    path
}

fn num(row: &Value, key: &str) -> f64 {
    row[key].as_f64().unwrap_or_else(|| panic!("step {}: no number `{key}`: {row}", row["step"]))
}

/// The f32 tensor `name` of a checkpoint's model.safetensors.
fn tensor(ckpt: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{}: no {name}: {e:?}", ckpt.display()));
    t.data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Train the quickstart with learned noise for 20 steps on `device`: the loss falls from about
/// ln 256, `router_entropy` is reported, the evals (no noise) are finite, and the noise weight,
/// which starts at 0, has learned.
fn quickstart_learns_with_learned_noise(device: &str) {
    plugin_so();
    let dir = tmp(&format!("noisy-topk-quickstart-{device}"));
    let cfg = quickstart_with_router(&dir, "plugin = \"noisy-topk\"\ntop_k = 2");
    let run = dir.join("run");
    let device = format!("train.device=\"{device}\"");
    let sets = ["--set", &out(&run), "--set", &device, "--set", "train.steps=20", "--set", "train.eval_every=10"];
    let (code, stdout, stderr) = pith(&[&["train", cfg.to_str().unwrap()][..], &sets].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    let m = metrics(&run);
    assert_eq!(m.len(), 20);
    let (first, last) = (num(&m[0], "loss"), num(&m[19], "loss"));
    assert!((first - 256f64.ln()).abs() < 0.3, "initial loss {first} should be about ln(256)");
    assert!(last < first - 1.0, "the loss must fall: {first} -> {last}");
    assert!(num(&m[9], "val_loss").is_finite() && num(&m[19], "val_loss").is_finite());
    for row in &m {
        let h = num(row, "router_entropy");
        assert!(h > 0.0 && h <= 8f64.ln() + 1e-6, "router_entropy {h}");
    }
    let ck = run.join("checkpoints/step_00000020");
    for layer in 0..2 {
        let wn = tensor(&ck, &format!("layers.{layer}.moe.router.noise_weight"));
        assert_eq!(wn.len(), 8 * 128, "[E, H]");
        assert!(wn.iter().any(|&v| v != 0.0), "layer {layer}: the noise weight never left its zero init");
        assert_eq!(tensor(&ck, &format!("layers.{layer}.moe.router.weight")).len(), 8 * 128);
    }
}

#[test]
fn plugins_list_shows_noisy_topk_loaded_from_pith_s_directory() {
    let so = plugin_so();
    let (code, stdout, stderr) = pith(&["plugins", "list"]);
    assert_eq!(code, 0, "{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("router") && l.contains("noisy-topk"));
    let line = line.unwrap_or_else(|| panic!("no noisy-topk router in:\n{stdout}"));
    assert!(line.contains(so.to_str().unwrap()) && line.contains("Shazeer"), "{line}");
}

/// The check runs the forward many times in training with one context: the noise is the same
/// each time, so the determinism and finite-difference checks pass with it on.
#[test]
fn plugins_check_noisy_topk_passes_and_its_config_errors_name_the_key() {
    plugin_so();
    for (config, params) in [
        ("", "[\"param weight\", \"param noise_weight\"]"),
        ("normalize = false\ntop_k = 3", "[\"param weight\", \"param noise_weight\"]"),
        ("noise = \"jitter\"\njitter = 0.2\ntop_k = 3", "[\"param weight\"]"),
        ("noise = \"jitter\"", "[\"param weight\"]"),
    ] {
        let (code, stdout, stderr) = pith(&["plugins", "check", "noisy-topk", "--config", config]);
        assert_eq!(code, 0, "config {config:?}:\n{stdout}{stderr}");
        let contract = format!("backward contract: overwrites [\"input x\"], adds to {params}");
        let mut want = vec!["determinism:", &contract, "grad input x: 20 coords", "grad param weight: 20 coords"];
        if params.contains("noise_weight") {
            want.push("grad param noise_weight: 20 coords");
        }
        for want in want {
            let pass = |l: &&str| l.starts_with("PASS router `noisy-topk`") && l.contains(want);
            assert!(stdout.lines().any(|l| pass(&l)), "{config:?}: {want}:\n{stdout}");
        }
        assert!(!stdout.contains("FAIL"), "{stdout}");
    }
    for (config, key) in [
        ("jitter = 0.1", "`jitter`"),
        ("noise = \"jitter\"\njitter = 1.5", "`jitter` = 1.5"),
        ("noise = \"gumbel\"", "`noise`"),
        ("top_k = 7", "`top_k` = 7"),
    ] {
        let (code, stdout, stderr) = pith(&["plugins", "check", "noisy-topk", "--config", config]);
        assert_eq!(code, 1, "{config:?}: {stdout}");
        let line = pith_tests::one_line(&stderr);
        assert!(line.contains(key), "{config:?}: {line}");
    }
}

#[test]
fn quickstart_trains_with_noisy_topk_and_its_noise_weight_learns() {
    quickstart_learns_with_learned_noise("cpu");
}

/// 8 steps with checkpoints every 4 vs a run resumed from step 4, for both kinds of noise: the
/// noise is redrawn from the step's context, nothing of it is checkpointed, and the resumed run's
/// losses, grad norms and final weights are bitwise those of the uninterrupted one.
#[test]
fn resumed_run_redraws_the_same_noise() {
    plugin_so();
    for (name, router) in [
        ("learned", "plugin = \"noisy-topk\""),
        ("jitter", "plugin = \"noisy-topk\"\nnoise = \"jitter\"\njitter = 0.1"),
    ] {
        let dir = tmp(&format!("noisy-topk-resume-{name}"));
        let cfg = quickstart_with_router(&dir, router);
        let cfg = cfg.to_str().unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        let common = [
            "--set",
            "train.steps=8",
            "--set",
            "train.checkpoint_every=4",
            "--set",
            "train.eval_every=0",
            "--set",
            "train.grad_accum=2",
        ];
        let (code, stdout, stderr) = pith(&[&["train", cfg, "--set", &out(&a)][..], &common].concat());
        assert_eq!(code, 0, "{stdout}{stderr}");
        let ck4 = a.join("checkpoints/step_00000004");
        let resume = ["train", cfg, "--set", &out(&b), "--resume", ck4.to_str().unwrap()];
        let (code, stdout, stderr) = pith(&[&resume[..], &common].concat());
        assert_eq!(code, 0, "{stdout}{stderr}");
        let (ma, mb) = (metrics(&a), metrics(&b));
        assert_eq!((ma.len(), mb.len()), (8, 4));
        for (x, y) in ma[4..].iter().zip(&mb) {
            for key in ["loss", "grad_norm", "router_entropy", "aux.switch-aux"] {
                assert_eq!(x[key].as_f64(), y[key].as_f64(), "{name}: step {} {key}", x["step"]);
            }
            assert_eq!(x["load_per_layer"], y["load_per_layer"], "{name}: step {}", x["step"]);
        }
        let (fa, fb) = (a.join("checkpoints/step_00000008"), b.join("checkpoints/step_00000008"));
        let (wa, wb) = (
            std::fs::read(fa.join("model.safetensors")).unwrap(),
            std::fs::read(fb.join("model.safetensors")).unwrap(),
        );
        assert!(wa == wb, "{name}: final weights differ");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_kernels_match_the_cpu_path() {
    plugin_so();
    for config in
        ["", "normalize = false\ntop_k = 3", "noise = \"jitter\"\njitter = 0.2", "noise = \"jitter\"\ntop_k = 3"]
    {
        let args = ["plugins", "check", "noisy-topk", "--device", "cuda", "--experts", "8", "--config", config];
        let (code, stdout, stderr) = pith(&args);
        assert_eq!(code, 0, "config {config:?}:\n{stdout}{stderr}");
        for want in
            ["on cuda: forward ids", "on cuda: forward logits", "on cuda: forward weights", "on cuda: backward dx"]
        {
            assert!(stdout.lines().any(|l| l.starts_with("PASS") && l.contains(want)), "{want}:\n{stdout}");
        }
        if !config.contains("jitter") {
            let want = "on cuda: backward grad noise_weight";
            assert!(stdout.lines().any(|l| l.starts_with("PASS") && l.contains(want)), "{want}:\n{stdout}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn quickstart_trains_on_cuda_with_noisy_topk() {
    quickstart_learns_with_learned_noise("cuda");
}
