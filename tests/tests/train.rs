//! Training end to end through the `pith` binary: the quickstart learns, a resumed run
//! reproduces the uninterrupted one exactly, bad runs fail clearly without touching existing
//! checkpoints, and real text trains after `pith data prepare`.

use pith_tests::{command, metrics, out, snapshot, WORKSPACE};
use std::path::Path;

fn tmp(name: &str) -> pith_tests::Scratch {
    pith_tests::tmp(&format!("train-{name}"))
}

/// Run pith; returns (exit code, stdout and stderr together).
fn pith(args: &[&str]) -> (i32, String) {
    let (code, o, e) = pith_tests::pith(args);
    (code, o + &e)
}

#[test]
fn quickstart_learns_well_below_the_unigram_entropy() {
    let run = tmp("quickstart");
    let (code, text) = pith(&["train", "--set", &out(&run)]);
    assert_eq!(code, 0, "{text}");
    let m = metrics(&run);
    let s = pith::data::Synthetic::new(256, 1);
    let first = m[0]["loss"].as_f64().unwrap();
    let val = m.last().unwrap()["val_loss"].as_f64().unwrap();
    assert!((first - (256f64).ln()).abs() < 0.3, "initial loss {first} should be about ln(256)");
    let (uni, floor) = (s.unigram_entropy(), s.entropy_floor());
    // "Well below": at least 60% of the way from the unigram entropy down to the floor.
    assert!(val < uni - 0.6 * (uni - floor), "val loss {val}, unigram {uni}, floor {floor}");
    assert!(text.contains("known floor"), "{text}");
    // The start-of-run block and summary.json, which holds the last line's numbers.
    for want in
        ["  model       2 layers, hidden 128", "  router      topk-softmax (built-in (pith-std))", "  outputs     "]
    {
        assert!(text.contains(want), "{want}: {text}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!((summary["steps"].as_u64(), summary["tokens"].as_u64()), (Some(300), Some(300 * 16 * 64)));
    assert_eq!(summary["val_loss"].as_f64(), Some(val));
    assert!(summary["above_floor"].as_f64().unwrap() > 0.0 && summary["seconds"].as_f64().unwrap() > 0.0);
    assert!(m[1]["time"].as_f64().unwrap() >= m[0]["time"].as_f64().unwrap() && m[0]["elapsed_s"].as_f64().is_some());
    for key in ["lr", "grad_norm", "tokens_per_s", "load_max_over_mean", "load_entropy", "aux.switch-aux", "aux.z-loss"]
    {
        assert!(m[0].get(key).is_some(), "metrics line lacks {key}: {}", m[0]);
    }
}

#[test]
fn resumed_run_reproduces_the_uninterrupted_losses_exactly() {
    let (a, b) = (tmp("resume-a"), tmp("resume-b"));
    let common = [
        "--set",
        "train.steps=12",
        "--set",
        "train.checkpoint_every=6",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.grad_accum=2",
    ];
    let (code, text) = pith(&[&["train", "--set", &out(&a)][..], &common].concat());
    assert_eq!(code, 0, "{text}");
    let ck = a.join("checkpoints/step_00000006");
    assert!(ck.join("model.safetensors").is_file() && ck.join("optimizer.safetensors").is_file());
    let (code, text) = pith(&[&["train", "--set", &out(&b), "--resume", ck.to_str().unwrap()][..], &common].concat());
    assert_eq!(code, 0, "{text}");
    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!(mb.len(), 6);
    for (x, y) in ma[6..].iter().zip(&mb) {
        assert_eq!(x["step"], y["step"]);
        assert_eq!(x["loss"].as_f64(), y["loss"].as_f64(), "step {}", x["step"]);
        assert_eq!(x["grad_norm"].as_f64(), y["grad_norm"].as_f64(), "step {}", x["step"]);
    }
    let wa = std::fs::read(a.join("checkpoints/step_00000012/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("checkpoints/step_00000012/model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ");
}

#[test]
fn bad_runs_fail_clearly_and_keep_existing_checkpoints() {
    let run = tmp("bad");
    let (code, text) = pith(&["train", "--set", &out(&run), "--set", "train.steps=4", "--set", "train.eval_every=0"]);
    assert_eq!(code, 0, "{text}");
    let before = snapshot(&run.join("checkpoints"));
    // A fresh run into a directory with checkpoints is refused.
    let (code, text) = pith(&["train", "--set", &out(&run), "--set", "train.steps=4"]);
    assert_eq!(code, 1);
    assert!(text.contains("already holds checkpoints") && text.contains("--resume"), "{text}");
    // A run that diverges says at which step and where, and writes no checkpoint.
    let (code, text) = pith(&[
        "train",
        "--set",
        &out(&run),
        "--resume",
        run.to_str().unwrap(),
        "--set",
        "train.steps=8",
        "--set",
        "train.lr=1e30",
        "--set",
        "train.warmup=0",
        "--set",
        "train.clip=0",
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("step ") && text.contains("non-finite"), "{text}");
    // A checkpoint from another model is refused, naming the difference.
    let (code, text) = pith(&[
        "train",
        "--set",
        &out(&run),
        "--resume",
        run.to_str().unwrap(),
        "--set",
        "model.hidden=64",
        "--set",
        "train.steps=8",
    ]);
    assert_eq!(code, 1);
    assert!(text.contains("model.hidden") && text.contains("different config"), "{text}");
    assert!(before == snapshot(&run.join("checkpoints")), "existing checkpoints changed");
}

#[test]
fn prepared_tinyshakespeare_trains() {
    let src = Path::new(WORKSPACE).join("../shared/data/tinyshakespeare.txt");
    if !src.is_file() {
        eprintln!("skipped: {} is absent", src.display());
        return;
    }
    let dir = tmp("shakespeare");
    let data = dir.join("data");
    let (code, text) =
        pith(&["data", "prepare", src.to_str().unwrap(), "--out", data.to_str().unwrap(), "--val-fraction", "0.1"]);
    assert_eq!(code, 0, "{text}");
    let source = format!("data.source=\"{}\"", data.display());
    let (code, text) = pith(&[
        "train",
        "--set",
        &out(&dir.join("run")),
        "--set",
        &source,
        "--set",
        "train.steps=30",
        "--set",
        "train.eval_every=0",
    ]);
    assert_eq!(code, 0, "{text}");
    let m = metrics(&dir.join("run"));
    let (first, last) = (m[0]["loss"].as_f64().unwrap(), m.last().unwrap()["loss"].as_f64().unwrap());
    assert!(last < first - 1.0, "loss {first} → {last}");
}

/// configs/deepseek-v2-tiny.toml (MLA, a dense first layer, shared experts) learns on the CPU;
/// its dense layer has its own FFN in the checkpoint and no routing in the trace.
#[test]
fn deepseek_shaped_model_with_a_dense_first_layer_learns() {
    let dir = tmp("deepseek");
    let (run, trace) = (dir.join("run"), dir.join("trace.safetensors"));
    let cfg = format!("{WORKSPACE}/configs/deepseek-v2-tiny.toml");
    let args = ["train", &cfg, "--set", &out(&run), "--set", "train.steps=100", "--set", "train.eval_every=0"];
    let (code, text) =
        pith(&[&args[..], &["--trace-routing", trace.to_str().unwrap(), "--trace-tokens", "50"]].concat());
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("  model       3 layers (1 dense), hidden 128, 4 heads (MLA)"), "{text}");
    let m = metrics(&run);
    let (first, val) = (m[0]["loss"].as_f64().unwrap(), m.last().unwrap()["val_loss"].as_f64().unwrap());
    assert!((first - 256f64.ln()).abs() < 0.5 && val < 1.5, "loss {first} → val {val}");
    assert_eq!(m[0]["load_per_layer"][0], serde_json::json!([]), "layer 0 is dense: {}", m[0]);
    let bytes = std::fs::read(&trace).unwrap();
    let names: Vec<String> =
        safetensors::SafeTensors::deserialize(&bytes).unwrap().names().into_iter().cloned().collect();
    assert!(names.contains(&"layers.1.expert_ids".to_string()) && !names.iter().any(|n| n.starts_with("layers.0.")));
    let ckpt = std::fs::read(run.join("checkpoints/step_00000100/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&ckpt).unwrap();
    assert_eq!(st.tensor("layers.0.dense.w_gate").unwrap().shape(), [1, 128, 256]);
    assert!(st.tensor("layers.0.moe.router.weight").is_err() && st.tensor("layers.1.moe.router.weight").is_ok());
}

#[test]
fn routing_trace_records_the_first_tokens_of_every_layer() {
    let dir = tmp("trace");
    let file = dir.join("routing.safetensors");
    let args = ["train", "--set", &out(&dir.join("run")), "--set", "train.steps=2", "--set", "train.eval_every=0"];
    let (code, text) =
        pith(&[&args[..], &["--trace-routing", file.to_str().unwrap(), "--trace-tokens", "100"]].concat());
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(&format!("routing trace of 100 tokens of step 1 written to {}", file.display())), "{text}");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!((meta["first_step"].as_str(), meta["last_step"].as_str()), ("1", "1"));
    let i32s = |n: &str| {
        st.tensor(n).unwrap().data().chunks(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect::<Vec<_>>()
    };
    let f32s = |n: &str| {
        st.tensor(n).unwrap().data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect::<Vec<_>>()
    };
    // The first 100 training tokens, as the data stream yields them.
    let cfg = pith::config::Config::load(None, &[]).unwrap();
    let mut data = pith::data::Dataset::open(&cfg.data, 256, 1, pith::data::Split::Train).unwrap();
    let (x, _) = data.next_batch(16, 64).unwrap();
    assert_eq!(i32s("tokens"), x[..100].iter().map(|&t| t as i32).collect::<Vec<_>>());
    for l in 0..2 {
        let (ids, w) = (i32s(&format!("layers.{l}.expert_ids")), f32s(&format!("layers.{l}.gate_weights")));
        assert_eq!(st.tensor(&format!("layers.{l}.expert_ids")).unwrap().shape(), [100, 2]);
        assert!(ids.iter().all(|&i| (0..8).contains(&i)), "layer {l}: ids out of range");
        for (r, pair) in ids.chunks(2).zip(w.chunks(2)).enumerate() {
            assert_ne!(pair.0[0], pair.0[1], "token {r}: one expert twice");
            assert!((pair.1[0] + pair.1[1] - 1.0).abs() < 1e-5, "token {r}: gates {:?} are not renormalised", pair.1);
        }
    }
    // A later step: --trace-from 2 records step 2's tokens.
    let later = dir.join("later.safetensors");
    let args = ["train", "--set", &out(&dir.join("run2")), "--set", "train.steps=2", "--set", "train.eval_every=0"];
    let tr = ["--trace-routing", later.to_str().unwrap(), "--trace-tokens", "100", "--trace-from", "2"];
    let (code, text) = pith(&[&args[..], &tr[..]].concat());
    assert!(code == 0 && text.contains("routing trace of 100 tokens of step 2 written to"), "{text}");
    let bytes = std::fs::read(&later).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (x2, _) = data.next_batch(16, 64).unwrap();
    let tokens: Vec<i32> =
        st.tensor("tokens").unwrap().data().chunks(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(tokens, x2[..100].iter().map(|&t| t as i32).collect::<Vec<_>>());
}

#[test]
fn ledger_gets_one_line_per_command() {
    let dir = tmp("ledger");
    let ledger = dir.join("ledger.jsonl");
    for args in [&["plugins", "list"][..], &["plan", "/nonexistent.toml"][..]] {
        command().args(args).env("PITH_LEDGER", &ledger).output().unwrap();
    }
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&ledger).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!((lines[0]["exit"].as_i64(), lines[1]["exit"].as_i64()), (Some(0), Some(1)));
    assert!(lines[1]["command"].as_str().unwrap().ends_with("plan /nonexistent.toml"));
    for l in &lines {
        assert!(l["end"].as_f64() >= l["start"].as_f64() && l["gpus"] == 0, "{l}");
    }
}

#[test]
fn plan_of_the_benchmark_model_matches_the_reference_flops() {
    // ../shared/bench/README.md: bench-1b trains at 1.603 GFLOP/token.
    let (code, text) = pith(&["plan", &format!("{WORKSPACE}/configs/bench-1b.toml")]);
    assert_eq!(code, 0, "{text}");
    let line = text.lines().find(|l| l.starts_with("training FLOPs/token")).unwrap();
    let gflop: f64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!((gflop - 1.603).abs() < 5e-4, "{line}");
    assert!(text.contains("experts active: 8.00 of 64 per token"), "{text}");
    // device = "cuda": f32 weights, grads and two AdamW states plus a bf16 copy, 18 B a parameter.
    let all: f64 = text
        .lines()
        .find(|l| l.trim_start().starts_with("all "))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let on_cuda = |text: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with("on CUDA:")).unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    assert!((on_cuda(&text) - all * 18.0 / (1 << 20) as f64).abs() < 0.1, "{text}");
    // At ep = 2 a rank holds half of the experts' 64 × 12 × 3 matrices of 1024 × 512.
    let (code, ep2) = pith(&["plan", &format!("{WORKSPACE}/configs/bench-1b.toml"), "--set", "parallel.ep=2"]);
    assert_eq!(code, 0, "{ep2}");
    let half = (64 * 12 * 3 * 1024 * 512 / 2) as f64 * 18.0 / (1 << 20) as f64;
    assert!((on_cuda(&text) - on_cuda(&ep2) - half).abs() < 0.1, "{ep2}");
    assert!(ep2.contains("per rank at parallel.ep = 2"), "{ep2}");
    // shard_optimizer at dp = 2: every tensor but the embedding (32768 × 1024) keeps its master
    // and two AdamW states (12 B) on one rank of two: 6 B a parameter less per rank.
    let zero = ["--set", "parallel.dp=2", "--set", "parallel.shard_optimizer=true"];
    let (code, z) = pith(&[&["plan", &format!("{WORKSPACE}/configs/bench-1b.toml")], &zero[..]].concat());
    assert_eq!(code, 0, "{z}");
    let saved = (all - 32768.0 * 1024.0) * 6.0 / (1 << 20) as f64;
    assert!((on_cuda(&text) - on_cuda(&z) - saved).abs() < 0.1, "{z}");
    assert!(z.contains("per rank at parallel.dp = 2 with shard_optimizer"), "{z}");
}

/// `pith bench` on the CPU: its last line is JSON with a positive step time and throughput for
/// the config's tokens per step; on a machine without a GPU, a CUDA bench fails in one line.
#[test]
fn bench_reports_step_time_and_throughput() {
    let (code, text) = pith(&["bench", "--warmup", "1", "--steps", "2"]);
    assert_eq!(code, 0, "{text}");
    let last = text.lines().rev().find(|l| l.starts_with('{')).expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["tokens_per_step"].as_u64(), Some(1024), "{last}");
    assert!(v["median_step_ms"].as_f64().unwrap() > 0.0 && v["tokens_per_s"].as_f64().unwrap() > 0.0, "{last}");
    assert!(v["loss"].as_f64().unwrap().is_finite(), "{last}");
    let (code, text) = pith(&["bench", "--set", "train.device=cuda", "--steps", "1"]);
    if code != 0 {
        let err: Vec<&str> = text.lines().filter(|l| l.starts_with("error")).collect();
        assert!(err.len() == 1 && err[0].contains("device = \"cuda\""), "{text}");
    }
}

#[test]
fn resume_continues_in_its_own_run_and_a_finished_run_says_how_to_extend_it() {
    let run = tmp("resume-own");
    let short = ["--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=0"];
    let (code, text) = pith(&[&["train"], &short[..], &["--set", &out(&run)]].concat());
    assert_eq!(code, 0, "{text}");
    // No config and no train.out: the run's own config.toml, into the run's own directory.
    let r = run.to_str().unwrap();
    let (code, text) = pith(&["train", "--resume", r]);
    assert_eq!(code, 1, "{text}");
    let want = format!("this run finished at step 4 (train.steps = 4); to train it longer: pith train --resume {r} --set train.steps=8");
    assert!(text.contains(&want), "{text}");
    let (code, text) = pith(&["train", "--resume", r, "--set", "train.steps=6"]);
    assert_eq!(code, 0, "{text}");
    let steps: Vec<u64> = metrics(&run).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    assert!(run.join("checkpoints/step_00000006").is_dir());
}

#[test]
fn tensorboard_event_files_hold_every_number_of_the_metrics_lines() {
    let run = tmp("tensorboard");
    let (code, text) =
        pith(&["train", "--set", "train.steps=3", "--set", "train.tensorboard=true", "--set", &out(&run)]);
    assert_eq!(code, 0, "{text}");
    let files: Vec<_> = std::fs::read_dir(run.join("tensorboard")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let scalars = pith::tensorboard::read_scalars(&files[0]).unwrap();
    for (i, row) in metrics(&run).iter().enumerate() {
        let step = i as u64 + 1;
        for key in ["loss", "lr", "grad_norm", "aux.switch-aux", "router_entropy"] {
            let want = row[key].as_f64().unwrap() as f32;
            assert!(scalars.contains(&(step, key.to_string(), want)), "step {step} {key} {want}: {scalars:?}");
        }
    }
    assert!(scalars.iter().any(|s| s.1 == "val_loss" && s.0 == 3));
}

#[test]
fn runs_compare_tabulates_final_numbers_and_plots_the_curves() {
    let (a, b) = (tmp("runs-a"), tmp("runs-b"));
    for (run, lr) in [(&a, "3e-3"), (&b, "1e-3")] {
        let lr = format!("train.lr={lr}");
        let (code, text) = pith(&["train", "--set", "train.steps=4", "--set", &lr, "--set", &out(run)]);
        assert_eq!(code, 0, "{text}");
    }
    let png = a.join("cmp.png");
    let (code, text) =
        pith(&["runs", "compare", a.to_str().unwrap(), b.to_str().unwrap(), "--png", png.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    for (i, run) in [(1, &a), (2, &b)] {
        let val = metrics(run).last().unwrap()["val_loss"].as_f64().unwrap();
        let row = text.lines().find(|l| l.starts_with(&format!("[{i}]"))).unwrap_or_else(|| panic!("{text}"));
        assert!(row.contains(&run.display().to_string()) && row.contains(&format!("{val:.4}")), "{row}");
    }
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 1000, "{} bytes", bytes.len());
    let (code, text) = pith(&["runs", "show", "/nonexistent-run"]);
    assert!(code == 1 && text.contains("/nonexistent-run/metrics.jsonl"), "{text}");
}
