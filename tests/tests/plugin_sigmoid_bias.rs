//! The `sigmoid-bias` router (plugins/sigmoid-bias: DeepSeek-V3's sigmoid router with an
//! aux-loss-free balancing bias) end to end, through the `pith` binary: it is listed and passes
//! `pith plugins check`, the quickstart trains with it (switch-aux on its probs), its bias buffer
//! is checkpointed, and a resumed run reproduces the uninterrupted one bitwise, bias included.
//!
//! The plugin is the workspace member's own build, `target/<profile>/libsigmoid_bias.so`, next to
//! the `pith` under test (the executable's directory is always searched). With `PITH_BIN` (a
//! prebuilt pith, e.g. on the GPU machine) it must already lie next to that binary.

use pith_tests::{metrics, out, pith, tmp};
use std::path::{Path, PathBuf};

/// libsigmoid_bias.so beside the `pith` under test.
fn plugin() -> PathBuf {
    pith_tests::plugin("sigmoid-bias")
}

/// Run pith with the plugin in place; returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    plugin();
    pith(args)
}

/// configs/quickstart.toml with its [router] table replaced by `sigmoid-bias` (top_k 2), written
/// into `dir`; every other table (switch-aux and z-loss included) as it is.
fn config(dir: &Path) -> PathBuf {
    let text = include_str!("../../configs/quickstart.toml");
    let (old, new) =
        ("[router]\nplugin = \"topk-softmax\"\ntop_k = 2\n", "[router]\nplugin = \"sigmoid-bias\"\ntop_k = 2\n");
    assert!(text.contains(old), "configs/quickstart.toml's [router] table changed:\n{text}");
    let path = dir.join("sigmoid-bias.toml");
    std::fs::write(&path, text.replace(old, new)).unwrap();
    path
}

/// The f32 tensor `name` of a checkpoint's model.safetensors.
fn tensor(ckpt: &Path, name: &str) -> Option<Vec<f32>> {
    let bytes = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).ok()?;
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    Some(t.data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
}

fn bias(ckpt: &Path, layer: usize) -> Vec<f32> {
    let name = format!("layers.{layer}.moe.router.bias");
    tensor(ckpt, &name).unwrap_or_else(|| panic!("{} has no {name}", ckpt.display()))
}

#[test]
fn is_listed_and_passes_its_check() {
    let (code, stdout, stderr) = run(&["plugins", "list"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("router") && l.contains("sigmoid-bias") && l.contains("libsigmoid_bias.so")),
        "{stdout}"
    );
    for cfg in ["", "top_k = 3\nnormalize = false\nrouted_scaling_factor = 2.5\nbias_update = 0.0"] {
        let (code, stdout, stderr) = run(&["plugins", "check", "sigmoid-bias", "--config", cfg]);
        assert_eq!(code, 0, "{cfg:?}: {stdout}{stderr}");
        for want in ["grad input x", "grad param weight", "bias: a Buffer, no gradient", "load: a Accumulator"] {
            assert!(
                stdout.lines().any(|l| l.starts_with("PASS router `sigmoid-bias`") && l.contains(want)),
                "{want}: {stdout}"
            );
        }
        assert!(!stdout.contains("FAIL"), "{stdout}");
    }
    let (code, stdout, stderr) = run(&["plugins", "check", "sigmoid-bias", "--config", "bias_update = -1.0"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    let line = pith_tests::one_line(&stderr);
    assert!(line.contains("`bias_update`") && line.contains(">= 0"), "{line}");
}

#[test]
fn quickstart_trains_with_it_and_checkpoints_the_bias() {
    let dir = tmp("sigmoid-bias-train");
    let (cfg, runs) = (config(&dir), dir.join("run"));
    let steps = 40;
    let (code, stdout, stderr) = run(&[
        "train",
        cfg.to_str().unwrap(),
        "--set",
        &out(&runs),
        "--set",
        &format!("train.steps={steps}"),
        "--set",
        "train.eval_every=20",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let m = metrics(&runs);
    assert_eq!(m.len(), steps);
    let num = |row: &serde_json::Value, key: &str| {
        row[key].as_f64().unwrap_or_else(|| panic!("step {}: no number `{key}`: {row}", row["step"]))
    };
    let (first, last) = (num(&m[0], "loss"), num(&m[steps - 1], "loss"));
    assert!((first - 256f64.ln()).abs() < 0.3, "initial loss {first} should be about ln(256)");
    assert!(last < first - 1.0, "40 steps took the loss from {first} to only {last}");
    for (i, row) in m.iter().enumerate() {
        // switch-aux sees the router's probs (normalised sigmoids): coef·E·Σ f·P, about coef
        // when balanced, at most coef·E.
        let aux = num(row, "aux.switch-aux");
        assert!(aux > 0.0 && aux < 0.01 * 8.0, "step {}: aux.switch-aux {aux}", i + 1);
        assert!(num(row, "aux.z-loss").is_finite());
        // The bias moves by exactly ±bias_update (1e-3) per step, from 0.
        let absmax = num(row, "bias_absmax");
        assert!(absmax > 0.0 && absmax <= (i + 1) as f64 * 1e-3 * (1.0 + 1e-4), "step {}: bias_absmax {absmax}", i + 1);
    }
    assert!((num(&m[0], "bias_absmax") - 1e-3).abs() < 1e-9, "after one step |b| is bias_update: {}", m[0]);
    assert!(num(&m[19], "val_loss").is_finite() && num(&m[steps - 1], "val_loss").is_finite());
    let ck = runs.join(format!("checkpoints/step_{steps:08}"));
    for layer in 0..2 {
        let b = bias(&ck, layer);
        assert_eq!(b.len(), 8, "one bias per expert");
        assert!(b.iter().any(|&v| v != 0.0), "layer {layer}: the bias is still zero after training: {b:?}");
        assert!(b.iter().all(|v| v.abs() <= steps as f32 * 1e-3 * 1.0001), "layer {layer}: {b:?}");
    }
    assert!(tensor(&ck, "layers.0.moe.router.load").is_none(), "an accumulator is not checkpointed");
}

/// 8 steps with checkpoints every 4 vs a run resumed from step 4: bitwise the same losses, grad
/// norms and final weights and bias. With 2 micro-batches a step (the load is summed over both)
/// and an eval every 2 steps: the uninterrupted run evaluates at step 4 after its checkpoint and
/// the resumed one does not, so an eval that counted load would make step 5's bias update differ.
#[test]
fn resumed_run_reproduces_the_uninterrupted_one_exactly() {
    let dir = tmp("sigmoid-bias-resume");
    let cfg = config(&dir);
    let (a, b) = (dir.join("a"), dir.join("b"));
    let common = [
        "--set",
        "train.steps=8",
        "--set",
        "train.checkpoint_every=4",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.grad_accum=2",
    ];
    let cfg = cfg.to_str().unwrap();
    let (code, stdout, stderr) = run(&[&["train", cfg, "--set", &out(&a)][..], &common].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    let ck4 = a.join("checkpoints/step_00000004");
    let (code, stdout, stderr) =
        run(&[&["train", cfg, "--set", &out(&b), "--resume", ck4.to_str().unwrap()][..], &common].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!((ma.len(), mb.len()), (8, 4));
    for (x, y) in ma[4..].iter().zip(&mb) {
        assert_eq!(x["step"], y["step"]);
        for key in ["loss", "grad_norm", "aux.switch-aux", "aux.z-loss", "bias_absmax", "val_loss"] {
            assert_eq!(x[key].as_f64(), y[key].as_f64(), "step {} {key}", x["step"]);
        }
        assert_eq!(x["load_per_layer"], y["load_per_layer"], "step {}", x["step"]);
    }
    let (fa, fb) = (a.join("checkpoints/step_00000008"), b.join("checkpoints/step_00000008"));
    for layer in 0..2 {
        let (b4, b8, b8r) = (bias(&ck4, layer), bias(&fa, layer), bias(&fb, layer));
        assert!(b4.iter().any(|&v| v != 0.0), "layer {layer}: zero bias at step 4");
        assert_ne!(b4, b8, "layer {layer}: the bias did not move after step 4");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&b8), bits(&b8r), "layer {layer}: the resumed run's final bias differs");
    }
    let (wa, wb) =
        (std::fs::read(fa.join("model.safetensors")).unwrap(), std::fs::read(fb.join("model.safetensors")).unwrap());
    assert!(wa == wb, "final weights differ");
}

/// The CUDA path against the CPU path (three configs: group-limited too), then the quickstart on the GPU: the loss
/// falls and the bias moves.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_matches_the_cpu_and_trains() {
    for config in
        ["", "top_k = 3\nnormalize = false\nrouted_scaling_factor = 2.5", "top_k = 2\nn_group = 2\ntopk_group = 1"]
    {
        let (code, o, e) = run(&["plugins", "check", "sigmoid-bias", "--device", "cuda", "--config", config]);
        assert_eq!(code, 0, "--config '{config}':\n{o}{e}");
    }
    let dir = tmp("sb-cuda");
    let out = out(&dir.join("run"));
    let sets = ["train.device=\"cuda\"", "router.plugin=\"sigmoid-bias\"", "router.top_k=2", "train.steps=100"];
    let mut args = vec!["train", "--set", &out];
    sets.iter().for_each(|s| args.extend(["--set", s]));
    let (code, o, e) = run(&args);
    assert_eq!(code, 0, "{o}{e}");
    let m = metrics(&dir.join("run"));
    let bias = m[99]["bias_absmax"].as_f64().unwrap();
    println!("cuda: loss {} -> {}, bias_absmax {bias}", m[0]["loss"], m[99]["loss"]);
    assert!(bias > 0.0 && m[99]["loss"].as_f64() < m[0]["loss"].as_f64());
}
