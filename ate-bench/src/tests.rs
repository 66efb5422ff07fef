//! The benchmark's own tests: every task's check FAILS before and PASSES after its reference
//! solution, against the current tree; the parsers and the scorer do what README.md says.
//!
//! Training runs use PITH_BIN, else `target/debug/pith` (built once with `cargo build -p pith`);
//! plugin crates build into `target/plugin-tests` (shared with tests/tests/plugins.rs).

use crate::check::{self, Env};
use crate::{load_tasks, Task};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `target/` (the test executable is `target/debug/deps/ate_bench-*`).
fn target_root() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let pith = match std::env::var_os("PITH_BIN") {
            Some(p) => PathBuf::from(p),
            None => {
                let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                    .args(["build", "--quiet", "-p", "pith", "--manifest-path"])
                    .arg(crate::repo_dir().join("Cargo.toml"))
                    .env("CARGO_TARGET_DIR", target_root())
                    .status()
                    .unwrap();
                assert!(st.success(), "cargo build -p pith failed");
                target_root().join("debug/pith")
            }
        };
        let small = "model.hidden=32 model.layers=1 model.seq_len=16 model.heads=2 model.kv_heads=1 \
                     model.head_dim=16 model.expert_ffn=32 train.micro_batch=4";
        Env {
            pith: Some(pith),
            target_dir: Some(target_root().join("plugin-tests")),
            extra_set: small.split_whitespace().map(String::from).collect(),
            steps: None,
        }
    })
}

fn tasks(category: &str) -> Vec<Task> {
    load_tasks().unwrap().into_iter().filter(|t| t.meta.category == category && !t.meta.needs_gpu).collect()
}

fn task(id: &str) -> Task {
    crate::find_task(id).unwrap()
}

#[test]
fn the_task_set_is_complete() {
    let all = load_tasks().unwrap();
    let (qa, op, feat) = (tasks("qa").len(), tasks("operate").len(), tasks("feature").len());
    assert!(qa >= 12 && op >= 6 && feat >= 4, "qa {qa}, operate {op}, feature {feat}");
    assert!(qa + op + feat >= 20);
    for t in &all {
        let prompt = std::fs::read_to_string(t.dir.join("task.md")).unwrap();
        assert!(prompt.starts_with("# ") && prompt.len() > 100, "{}: task.md", t.id);
        let sol = crate::bench_dir().join("solutions").join(&t.id);
        match (t.meta.needs_gpu, &t.meta.check) {
            (true, check::Check::Unavailable { .. }) => assert!(t.meta.blocked_by.is_some(), "{}", t.id),
            (false, check::Check::Unavailable { .. }) => panic!("{}: CPU task without a check", t.id),
            (_, _) => {
                assert!(sol.is_dir() && t.meta.blocked_by.is_none(), "{}: no reference solution, or blocked", t.id)
            }
        }
    }
}

#[test]
fn qa_checks_fail_on_empty_and_wrong_answers_and_pass_on_the_reference() {
    let dir = check::reference::working_copy("qa").unwrap();
    for t in tasks("qa") {
        let check::Check::Cite { cite, .. } = &t.meta.check else { panic!("{}: qa must be a cite check", t.id) };
        let run = || check::run_with(&t, &dir, env());
        let _ = std::fs::remove_file(dir.join("ANSWER.md"));
        assert!(!run().passed(), "{}: passes with no ANSWER.md", t.id);
        std::fs::write(dir.join("ANSWER.md"), "").unwrap();
        assert!(!run().passed(), "{}: passes an empty answer", t.id);
        // The right files, the wrong lines (line 1 is never inside a function).
        let wrong: Vec<String> = cite
            .iter()
            .map(|c| {
                let at =
                    check::qa::locate(c, &dir).unwrap_or_else(|| panic!("{}: `{}` is satisfied nowhere", t.id, c.what));
                format!("{}:1", at.split(':').next().unwrap())
            })
            .collect();
        std::fs::write(dir.join("ANSWER.md"), format!("It is here: {}\n", wrong.join(", "))).unwrap();
        let o = run();
        assert!(!o.passed(), "{}: passes a wrong answer", t.id);
        assert!(o.fails.iter().any(|f| f.contains("outside fn") || f.contains("matches")), "{}: {:?}", t.id, o.fails);
        check::reference::solve_with(&t, &dir, env()).unwrap();
        let o = run();
        assert!(o.passed(), "{}: the reference answer fails: {:?}", t.id, o.fails);
    }
}

/// Unmodified copy: FAIL; reference solution applied: PASS.
fn fail_then_pass(t: &Task, dir: &Path) {
    let before = check::run_with(t, dir, env());
    assert!(!before.passed(), "{}: passes on the unmodified repo", t.id);
    check::reference::solve_with(t, dir, env()).unwrap_or_else(|e| panic!("{}: solve: {e}", t.id));
    let after = check::run_with(t, dir, env());
    assert!(after.passed(), "{}: FAILS with the reference solution: {:?}\n{:?}", t.id, after.fails, after.notes);
}

fn operate(id: &str) {
    let t = task(id);
    fail_then_pass(&t, &check::reference::working_copy(id).unwrap());
}

/// GPU tasks: where pith can open a GPU, FAIL unmodified and PASS solved like every task; on a
/// machine without one (the CPU CI), the check FAILS saying it needs a GPU, and the test says it
/// tested nothing more.
#[test]
fn gpu_tasks_pass_on_a_gpu_and_say_they_need_one_elsewhere() {
    let gpu_tasks: Vec<Task> = load_tasks().unwrap().into_iter().filter(|t| t.meta.needs_gpu).collect();
    assert!(gpu_tasks.len() >= 2);
    let pith = env().pith.clone().unwrap();
    let here = check::gpu::probe(&pith, &crate::repo_dir());
    for t in &gpu_tasks {
        let dir = check::reference::working_copy(&t.id).unwrap();
        match &here {
            Ok(()) => fail_then_pass(t, &dir),
            Err(why) => {
                let o = check::run_with(t, &dir, env());
                assert!(!o.passed() && o.fails.iter().all(|f| f.starts_with(check::gpu::NEEDS_GPU)), "{:?}", o.fails);
                println!("{}: skipped on this machine ({why}); its check says so", t.id);
            }
        }
    }
}

#[test]
fn profile_answers_are_judged_with_tolerance() {
    use check::gpu::{judge, reported};
    let ops: Vec<(String, f64)> =
        [("gemm", 5.0), ("attn_fwd", 3.0), ("wgrad", 2.0), ("norm", 1.9), ("rope", 1.0), ("copy", 0.1)]
            .iter()
            .map(|(n, ms)| (n.to_string(), *ms))
            .collect();
    // Shares: gemm 38.8%, attn_fwd 23.3%, wgrad 15.5%, norm 14.7%, rope 7.8%.
    let judged = |text: &str| judge(&ops, &reported(text), 3, 0.1, 3.0);
    let parsed = reported("# Answer\n1. `gemm`: 38.8%\n- **attn_fwd**: 23%\nwgrad : 15.5 %\nstep time: 12 ms\n");
    assert_eq!(parsed, vec![("gemm".into(), 38.8), ("attn_fwd".into(), 23.0), ("wgrad".into(), 15.5)]);
    assert!(judged("gemm: 38.8%\nattn_fwd: 23.3%\nwgrad: 15.5%").is_ok());
    // norm is within 10% of wgrad (the third): it may stand in for it, or swap with it.
    assert!(judged("gemm: 38.8%\nattn_fwd: 23.3%\nnorm: 14.7%").is_ok());
    assert!(judged("gemm: 39%\nattn_fwd: 23%\nnorm: 15%").is_ok());
    let fails = |text: &str, what: &str| {
        let e = judged(text).expect_err(text);
        assert!(e.iter().any(|f| f.contains(what)), "{text}: {e:?}");
    };
    fails("gemm: 38.8%\nattn_fwd: 23.3%\nrope: 7.8%", "`rope` (1.000 ms) is among the 3 heaviest");
    fails("attn_fwd: 23.3%\ngemm: 38.8%\nwgrad: 15.5%", "then `gemm`");
    fails("gemm: 38.8%\nattn_fwd: 23.3%\nmystery: 15.5%", "not an op");
    fails("gemm: 60%\nattn_fwd: 23.3%\nwgrad: 15.5%", "`gemm`: 60% reported");
    fails("gemm: 38.8%\nattn_fwd: 23.3%", "3 distinct");
    fails("gemm: 38.8%\ngemm: 38.8%\nwgrad: 15.5%", "3 distinct");
}

#[test]
fn operate_getting_started() {
    operate("op-getting-started");
}

#[test]
fn operate_train_resume() {
    operate("op-train-resume");
}

#[test]
fn operate_config_change() {
    operate("op-config-change");
}

#[test]
fn operate_plan_estimate() {
    operate("op-plan-estimate");
}

#[test]
fn operate_routing_trace() {
    let t = task("op-routing-trace");
    let dir = check::reference::working_copy("op-routing-trace").unwrap();
    fail_then_pass(&t, &dir);
    // A wrong expert, or a trace that is not pith's, fails.
    let ans = std::fs::read_to_string(dir.join("ANSWER.md")).unwrap();
    let e = check::operate::labelled_int(&ans, "expert:").unwrap();
    std::fs::write(dir.join("ANSWER.md"), ans.replace(&format!("expert: {e}"), &format!("expert: {}", (e + 1) % 8)))
        .unwrap();
    let o = check::run_with(&t, &dir, env());
    assert!(o.fails.iter().any(|f| f.contains("`expert:`")), "{:?}", o.fails);
    let f = dir.join("runs/routing.safetensors");
    assert_eq!(check::safetensors::st_read(&f).unwrap()["tokens"].shape, [256]);
    // Every value's low byte changed: other tokens, other experts.
    let mut b = std::fs::read(&f).unwrap();
    let data = 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    for i in (data..b.len()).step_by(4) {
        b[i] ^= 1;
    }
    std::fs::write(&f, b).unwrap();
    assert!(!check::run_with(&t, &dir, env()).passed(), "a tampered trace passes");
}

#[test]
fn operate_export_hf() {
    let t = task("op-export-hf");
    let dir = check::reference::working_copy("op-export-hf").unwrap();
    fail_then_pass(&t, &dir);
    // An export of a different checkpoint (here: a 2-step run) does not match.
    let pith = env().pith.clone().unwrap();
    let st = Command::new(&pith)
        .current_dir(&dir)
        .args(["train", "configs/quickstart.toml", "--set", "train.steps=2", "--set", "train.out=\"runs/other\""])
        .output()
        .unwrap();
    assert!(st.status.success());
    std::fs::remove_dir_all(dir.join("export/hf")).unwrap();
    let st = Command::new(&pith).current_dir(&dir).args(["export", "hf", "runs/other", "export/hf"]).output().unwrap();
    assert!(st.status.success());
    let o = check::run_with(&t, &dir, env());
    assert!(o.fails.iter().any(|f| f.contains("eval-logits of export/hf")), "{:?}", o.fails);
}

/// One working copy for every feature task (each adds its own plugins/<name>; plugin-api builds once).
fn feature_copy() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| check::reference::working_copy("features").unwrap())
}

#[test]
fn feature_capacity_router() {
    fail_then_pass(&task("feat-capacity-router"), feature_copy());
}

#[test]
fn feature_importance_loss() {
    fail_then_pass(&task("feat-importance-loss"), feature_copy());
}

#[test]
fn feature_adafactor() {
    fail_then_pass(&task("feat-adafactor"), feature_copy());
}

#[test]
fn feature_cosine_router() {
    fail_then_pass(&task("feat-cosine-router"), feature_copy());
}

#[test]
fn a_host_change_fails_a_feature_task() {
    let dir = check::reference::working_copy("host-change").unwrap();
    let t = task("feat-cosine-router");
    check::reference::solve_with(&t, &dir, env()).unwrap();
    let f = dir.join("host/src/lib.rs");
    let text = std::fs::read_to_string(&f).unwrap();
    std::fs::write(&f, text + "\n// changed\n").unwrap();
    let o = check::run_with(&t, &dir, env());
    assert!(o.fails.iter().any(|f| f.contains("unchanged")), "{:?}", o.fails);
}

#[test]
fn citations_spans_and_numbers_parse() {
    let c = check::qa::citations("see `host/src/train.rs:42`, ./plugin-api/src/lib.rs:7 and a.rs#L3; not 12:30 or x:y");
    assert_eq!(c, vec![("host/src/train.rs".into(), 42), ("plugin-api/src/lib.rs".into(), 7)]);
    let src = "fn a() {\n    let s = \"}\";\n    if x { y }\n}\nfn b<T>() {}\n";
    let lines: Vec<&str> = src.lines().collect();
    assert_eq!(check::qa::fn_span(&lines, "a"), Some((1, 4)));
    assert_eq!(check::qa::fn_span(&lines, "b"), Some((5, 5)));
    assert_eq!(check::qa::fn_span(&lines, "c"), None);
    assert_eq!(check::operate::numbers("loss 5.4338, total: 1,234 and 1e-3."), vec![5.4338, 1234.0, 1e-3]);
}

#[test]
fn score_and_report() {
    let d = std::env::temp_dir().join(format!("ate-bench-score-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("t.jsonl"),
        [
            r#"{"type":"session","task":"qa-rope","run":1,"agent":"a","gpu_ledger":"ledger.jsonl"}"#,
            r#"{"role":"user","timestamp":"2025-01-01T00:00:00Z"}"#,
            r#"{"role":"assistant","timestamp":"2025-01-01T00:00:10Z","input_tokens":100,"cache_read_tokens":900,"output_tokens":50}"#,
            r#"{"role":"tool","timestamp":"2025-01-01T00:00:20Z"}"#,
            r#"{"role":"assistant","timestamp":"2025-01-01T00:01:40+00:00","input_tokens":3000,"output_tokens":25}"#,
            r#"{"type":"result","check":"PASS"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let t0 = crate::score::timestamp(&"2025-01-01T00:00:00Z".into()).unwrap();
    assert_eq!(t0, 1_735_689_600.0);
    // 30 s on 2 GPUs inside the session, and an entry entirely before it.
    let ledger = format!(
        "{{\"start\":{},\"end\":{},\"gpus\":2}}\n{{\"start\":{},\"end\":{}}}\n",
        t0 + 20.0,
        t0 + 50.0,
        t0 - 100.0,
        t0 - 50.0
    );
    std::fs::write(d.join("ledger.jsonl"), ledger).unwrap();
    let s = crate::score::score(&d.join("t.jsonl"), None).unwrap();
    assert_eq!((s.turns, s.output_tokens, s.max_context_tokens), (2, 75, 3000));
    assert_eq!((s.mean_context_tokens, s.wall_s, s.gpu_s), (2000.0, 100.0, 60.0));
    assert_eq!((s.task.as_str(), s.run.as_str(), s.result.as_str()), ("qa-rope", "1", "PASS"));
    let mut s2 = serde_json::to_value(&s).unwrap();
    s2["turns"] = 4.into();
    s2["result"] = "FAIL".into();
    let lines = format!("{}\n{}\n", serde_json::to_string(&s).unwrap(), s2);
    std::fs::write(d.join("scores.jsonl"), lines).unwrap();
    let r = crate::score::report(&[d.join("scores.jsonl")]).unwrap();
    assert!(r.contains("| qa-rope | 2 | 1/2 | 3 | 75 | 2000 | 100.0 | 60.0 |"), "{r}");
}

/// Lines as `PITH_LEDGER` writes them: CPU commands hold no GPU, CUDA commands one.
#[test]
fn score_charges_pith_ledger_lines_by_their_gpus() {
    let d = std::env::temp_dir().join(format!("ate-bench-ledger-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let t0 = 1_735_689_600.0;
    std::fs::write(
        d.join("t.jsonl"),
        format!("{{\"role\":\"user\",\"timestamp\":{t0}}}\n{{\"role\":\"assistant\",\"timestamp\":{}}}\n", t0 + 100.0),
    )
    .unwrap();
    let line = |a: f64, b: f64, device: &str, gpus: u32, busy: &str| {
        format!(
            "{{\"command\":\"pith train\",\"start\":{},\"end\":{},\"device\":\"{device}\",\"gpus\":{gpus},\"gpu_busy_s\":{busy},\"exit\":0}}\n",
            t0 + a,
            t0 + b
        )
    };
    let ledger = line(10.0, 40.0, "cpu", 0, "0.0") + &line(50.0, 62.5, "cuda", 1, "null");
    std::fs::write(d.join("ledger.jsonl"), ledger).unwrap();
    let s = crate::score::score(&d.join("t.jsonl"), Some(&d.join("ledger.jsonl"))).unwrap();
    assert_eq!((s.wall_s, s.gpu_s), (100.0, 12.5));
}

#[test]
fn prepare_gives_the_repo_without_the_benchmark() {
    let repo = crate::repo_dir();
    let head = Command::new("git").args(["-C", &repo.to_string_lossy(), "rev-parse", "HEAD"]).output().unwrap();
    let commit = String::from_utf8_lossy(&head.stdout).trim().to_string();
    let dir = std::env::temp_dir().join(format!("ate-bench-prepare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    crate::prepare(&task("qa-rope"), &dir, &repo, &commit).unwrap();
    assert!(dir.join("TASK.md").is_file() && dir.join("host/src/main.rs").is_file());
    assert!(!dir.join("ate-bench").exists());
    assert!(!std::fs::read_to_string(dir.join("Cargo.toml")).unwrap().contains("ate-bench"));
    assert!(std::fs::read_to_string(dir.join(".ate-bench.json")).unwrap().contains(&commit));
    assert!(crate::prepare(&task("qa-rope"), &dir, &repo, &commit).is_err(), "prepare into a non-empty dir");
}
