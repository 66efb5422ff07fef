//! Data parallelism on CPU ranks (the loopback collective; multi-GPU runs the same trainer code
//! over NCCL): two ranks train the same run as one on the same global batch, a run resumes at
//! another layout, and a rank that dies or never comes ends the others with a line naming it.

use pith::checkpoint::{read_tensors, Saved};
use pith_tests::{command, metrics, out, pith, split, tmp};
use std::net::TcpListener;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The quickstart, short, with a checkpoint at step 3.
const RUN: [&str; 8] = [
    "--set",
    "train.steps=6",
    "--set",
    "train.checkpoint_every=3",
    "--set",
    "train.eval_every=0",
    "--set",
    "train.log_every=1",
];

/// The tensor files of a checkpoint, without `.safetensors`.
fn files(step: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(step).unwrap().filter_map(|e| e.unwrap().file_name().into_string().ok()).collect();
    names.retain(|n| n.ends_with(".safetensors"));
    names.sort();
    names.iter().map(|n| n.trim_end_matches(".safetensors").to_string()).collect()
}

/// Every tensor of a checkpoint's `kind` files (model or optimizer), whole, however it was split.
fn tensors(step: &std::path::Path, kind: &str) -> Vec<(String, Vec<f32>)> {
    let saved = Saved::open(step, kind).unwrap();
    saved.names().map(|n| (n.to_string(), saved.whole(n).unwrap())).collect()
}

fn losses(run: &std::path::Path) -> Vec<f64> {
    metrics(run).iter().map(|m| m["loss"].as_f64().unwrap()).collect()
}

/// |a − b| ≤ 1e-4 per step: the ranks add the gradient of their halves where one rank adds
/// all rows at once, a different float summation order (the measured gap is ~2e-5 by step 6).
fn same_run(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-4, "{what}: step {} loss {x} vs {y}\n{a:?}\n{b:?}", i + 1);
    }
}

#[test]
fn two_ranks_train_the_same_run_as_one_and_resume_at_another_layout() {
    let dir = tmp("dp");
    let (one, two, fork) = (dir.join("one"), dir.join("two"), dir.join("fork"));
    let train = |args: &[&str]| {
        let (code, so, se) = pith(args);
        assert_eq!(code, 0, "{args:?}\n{so}{se}");
        se
    };
    train(&[&["train"], &RUN[..], &["--set", &out(&one)]].concat());
    let se = train(&[&["launch", "--gpus", "2"], &RUN[..], &["--set", &out(&two)]].concat());
    assert!(!se.contains("[rank 1]"), "rank 1 trains quietly: {se}");
    same_run(&losses(&one), &losses(&two), "dp=2 vs 1 rank");
    let counts = |run: &std::path::Path| metrics(run)[0]["load_per_layer"].clone();
    assert_eq!(counts(&one), counts(&two), "step 1's expert loads are summed over the ranks");
    // Rank 0 writes what every rank holds alike; rank 1 holds nothing of its own.
    assert_eq!(files(&two.join("checkpoints/step_00000006")), ["model-rank00000", "optimizer-rank00000"]);
    // shard_optimizer: each tensor stepped by one rank, the others sent its new weights; the
    // same run, and the same checkpoint to the bit, each owner writing its tensors and state.
    let sharded = dir.join("sharded");
    let shard = ["--set", "parallel.shard_optimizer=true", "--set", &out(&sharded)];
    train(&[&["launch", "--gpus", "2"], &RUN[..], &shard[..]].concat());
    let step6 = |run: &std::path::Path| run.join("checkpoints/step_00000006");
    assert_eq!(
        files(&step6(&sharded)),
        ["model-rank00000", "model-rank00001", "optimizer-rank00000", "optimizer-rank00001"]
    );
    for kind in ["model", "optimizer"] {
        assert!(
            tensors(&step6(&two), kind) == tensors(&step6(&sharded), kind),
            "{kind}: dp=2 with and without shard_optimizer"
        );
    }
    // The dp=2 run's step-3 checkpoint, continued on one rank, is the one-rank run's steps 4..6.
    let ckpt = two.join("checkpoints/step_00000003");
    train(&[&["train"], &RUN[..], &["--set", &out(&fork), "--resume", ckpt.to_str().unwrap()]].concat());
    same_run(&losses(&one)[3..], &losses(&fork), "resumed at dp=1 from dp=2");
}

/// Expert parallelism: the experts split over 2 ranks (ep=2), and over 2 of 4 ranks (dp=2 ×
/// ep=2), train the same run as one rank; the checkpoint holds whole tensors, so a run saved at
/// ep=2 resumes on one rank and one saved on one rank resumes at ep=2.
#[test]
fn expert_parallel_trains_the_same_run_as_one_and_resumes_at_any_layout() {
    let dir = tmp("ep");
    let train = |args: &[&str]| {
        let (code, so, se) = pith(args);
        assert_eq!(code, 0, "{args:?}\n{so}{se}");
    };
    let ep = |ranks: &str, ep: &str, run: &std::path::Path, more: &[&str]| {
        let layout = ["--set", "comm.plugin=alltoall", "--set", ep, "--set"];
        train(&[&["launch", "--gpus", ranks], &RUN[..], &layout, &[&out(run)], more].concat());
    };
    let (one, two, four, fork, back) = (dir.join("1"), dir.join("2"), dir.join("4"), dir.join("f"), dir.join("b"));
    train(&[&["train"], &RUN[..], &["--set", "comm.plugin=alltoall", "--set", &out(&one)]].concat());
    ep("2", "parallel.ep=2", &two, &[]);
    ep("4", "parallel.ep=2", &four, &["--set", "parallel.shard_optimizer=true"]);
    same_run(&losses(&one), &losses(&two), "ep=2 vs 1 rank");
    same_run(&losses(&one), &losses(&four), "dp=2 × ep=2 with shard_optimizer vs 1 rank");
    let counts = |run: &std::path::Path| metrics(run)[0]["load_per_layer"].clone();
    assert_eq!(counts(&one), counts(&two), "step 1's expert loads, gathered over the expert-parallel ranks");
    assert_eq!(counts(&one), counts(&four));
    let ckpt = |run: &std::path::Path| run.join("checkpoints/step_00000003").to_str().unwrap().to_string();
    // Each expert-parallel rank writes its half of the experts; with dp=2 × ep=2 and
    // shard_optimizer, every rank writes the tensors it owns.
    let halves = ["model-rank00000", "model-rank00001", "optimizer-rank00000", "optimizer-rank00001"];
    assert_eq!(files(std::path::Path::new(&ckpt(&two))), halves);
    assert_eq!(files(std::path::Path::new(&ckpt(&four))).len(), 8);
    let halves = Saved::open(std::path::Path::new(&ckpt(&two)), "model").unwrap();
    assert_eq!(halves.shape("layers.0.moe.experts.w_up").map(|s| s[0]), Some(8), "two halves of 4 experts make 8");
    let resume = ["--set", "parallel.ep=1", "--set", &out(&fork), "--resume", &ckpt(&two)];
    train(&[&["train"], &RUN[..], &["--set", "comm.plugin=alltoall"], &resume[..]].concat());
    same_run(&losses(&one)[3..], &losses(&fork), "saved at ep=2, resumed on one rank");
    let (fork4, fork4b) = (dir.join("f4"), dir.join("f4b"));
    let resume4 = ["--set", "parallel.ep=1", "--set", &out(&fork4), "--resume", &ckpt(&four)];
    train(&[&["train"], &RUN[..], &["--set", "comm.plugin=alltoall"], &resume4[..]].concat());
    same_run(&losses(&one)[3..], &losses(&fork4), "saved at dp=2 × ep=2 by owners, resumed on one rank");
    ep("2", "parallel.ep=2", &fork4b, &["--set", "parallel.shard_optimizer=true", "--resume", &ckpt(&four)]);
    same_run(&losses(&one)[3..], &losses(&fork4b), "saved at dp=2 × ep=2 by owners, resumed at ep=2");
    // `pith export hf` reads the slices: the 4-rank run's model is the one-rank run's. Within
    // 1e-3: Adam's normalised step turns the summation-order gaps of near-zero gradients into
    // weight gaps of ~1e-4 by step 6 (measured 1.1e-4); experts put in the wrong place would
    // differ by their init scale, 0.02.
    let export = |run: &std::path::Path, to: &std::path::Path| {
        train(&["export", "hf", run.to_str().unwrap(), to.to_str().unwrap()])
    };
    let (hf1, hf4) = (dir.join("hf1"), dir.join("hf4"));
    export(&one, &hf1);
    export(&four, &hf4);
    let (a, b) =
        (read_tensors(&hf1.join("model.safetensors")).unwrap(), read_tensors(&hf4.join("model.safetensors")).unwrap());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, (shape, x)) in &a {
        assert_eq!(shape, &b[name].0, "{name}");
        let gap = x.iter().zip(&b[name].1).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(gap <= 1e-3, "{name}: exported from 4 ranks differs from 1 rank by {gap}");
    }
    ep("2", "parallel.ep=2", &back, &["--resume", &ckpt(&one)]);
    same_run(&losses(&one)[3..], &losses(&back), "saved on one rank, resumed at ep=2");
    // train.init_from (weights only) at ep=2: each rank keeps its slice of the whole experts.
    let (init1, init2) = (dir.join("i1"), dir.join("i2"));
    let init = format!("train.init_from={:?}", ckpt(&one));
    let a2a = ["--set", "comm.plugin=alltoall", "--set", &init, "--set"];
    train(&[&["train"], &RUN[..], &a2a, &[&out(&init1)]].concat());
    ep("2", "parallel.ep=2", &init2, &["--set", &init]);
    same_run(&losses(&init1), &losses(&init2), "init_from at ep=2 vs 1 rank");
    // `local` moves no rows between ranks: refused with the schedule that does.
    let (code, _, se) = pith(
        &[&["launch", "--gpus", "2"], &RUN[..], &["--set", "parallel.ep=2", "--set", &out(&dir.join("x"))]].concat(),
    );
    assert!(code != 0 && se.contains("use [comm] plugin = \"alltoall\""), "{se}");
}

/// A node's layouts on 8 CPU ranks (issue #17's configs, before its GPUs): ep=8 (one expert of
/// the quickstart's 8 per rank) and dp=2 × ep=4 train the same run as one rank, and the metrics
/// say how evenly the experts' rows spread over the expert-parallel ranks.
#[test]
fn eight_ranks_at_ep_8_and_dp_2_by_ep_4_train_the_same_run_as_one() {
    let dir = tmp("ep8");
    let short = ["--set", "train.steps=3", "--set", "comm.plugin=alltoall", "--set"];
    let run = |args: &[&str]| {
        let (code, so, se) = pith(args);
        assert_eq!(code, 0, "{args:?}\n{so}{se}");
    };
    let (one, ep8, ep4) = (dir.join("1"), dir.join("8"), dir.join("4"));
    run(&[&["train"], &RUN[..], &short, &[&out(&one)]].concat());
    run(&[&["launch", "--gpus", "8"], &RUN[..], &short, &[&out(&ep8), "--set", "parallel.ep=8"]].concat());
    run(&[&["launch", "--gpus", "8"], &RUN[..], &short, &[&out(&ep4), "--set", "parallel.ep=4"]].concat());
    same_run(&losses(&one), &losses(&ep8), "ep=8 vs 1 rank");
    same_run(&losses(&one), &losses(&ep4), "dp=2 × ep=4 vs 1 rank");
    for (run, ep) in [(&ep8, 8usize), (&ep4, 4)] {
        for m in metrics(run) {
            let layers = m["load_per_layer"].as_array().unwrap().iter();
            let per_rank = layers.filter(|l| !l.as_array().unwrap().is_empty()).map(|l| {
                let c: Vec<f64> = l.as_array().unwrap().iter().map(|c| c.as_f64().unwrap()).collect();
                let ranks: Vec<f64> = c.chunks(c.len() / ep).map(|r| r.iter().sum()).collect();
                ranks.iter().cloned().fold(0.0, f64::max) * ep as f64 / ranks.iter().sum::<f64>()
            });
            let want = per_rank.clone().sum::<f64>() / per_rank.count() as f64;
            let got = m["ep_load_max_over_mean"].as_f64().expect("ep_load_max_over_mean with ep > 1");
            assert!((got - want).abs() < 1e-9 && got >= 1.0, "ep={ep}: {got} vs {want}");
        }
    }
    assert!(metrics(&one)[0].get("ep_load_max_over_mean").is_none(), "one rank has no expert-parallel load");
}

#[test]
fn a_batch_that_does_not_split_over_the_ranks_is_refused_before_training() {
    let dir = tmp("dp-bad");
    let (code, _, se) = pith(&["launch", "--gpus", "2", "--set", "train.micro_batch=3", "--set", &out(&dir.join("r"))]);
    assert_eq!(code, 1, "{se}");
    assert!(se.contains("train.micro_batch = 3 sequences do not split over the job's 2 ranks"), "{se}");
    assert!(!dir.join("r/checkpoints").exists());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Rank `rank` of `size` of a long quickstart run, as torchrun would start it.
fn rank(rank: u32, size: u32, port: u16, run: &std::path::Path) -> Child {
    let mut c = command();
    c.args(["train", "--set", "train.steps=100000", "--set", &out(run)]);
    c.envs([("RANK", rank.to_string()), ("WORLD_SIZE", size.to_string()), ("MASTER_PORT", port.to_string())]);
    c.envs([("MASTER_ADDR", "127.0.0.1"), ("PITH_DIST_TIMEOUT", "5"), ("PITH_JOB_ID", "dist-test")]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Wait at most `limit` for `c` to exit (then kill it); its (code, stderr) and how long it took.
fn ends_within(mut c: Child, limit: Duration) -> (i32, String, Duration) {
    let t0 = Instant::now();
    while c.try_wait().unwrap().is_none() && t0.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = t0.elapsed();
    let _ = c.kill();
    let (code, _, se) = split(c.wait_with_output().unwrap());
    (code, se, took)
}

#[test]
fn a_rank_that_never_comes_or_dies_ends_the_others_naming_it() {
    let dir = tmp("dp-faults");
    // Rank 1 never starts: rank 0 gives up after PITH_DIST_TIMEOUT.
    let (code, se, took) = ends_within(rank(0, 2, free_port(), &dir.join("alone")), Duration::from_secs(60));
    assert!(code != 0 && took < Duration::from_secs(30), "{code} after {took:?}: {se}");
    assert!(se.contains("rank(s) 1 did not join"), "{se}");
    // Rank 1 is killed while training: rank 0 exits at once, naming it.
    let port = free_port();
    let (r0, mut r1) = (rank(0, 2, port, &dir.join("run")), rank(1, 2, port, &dir.join("run")));
    let t0 = Instant::now();
    while metrics_lines(&dir.join("run")) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the ranks never trained");
        std::thread::sleep(Duration::from_millis(50));
    }
    r1.kill().unwrap();
    let (code, se, took) = ends_within(r0, Duration::from_secs(60));
    assert!(code != 0 && took < Duration::from_secs(30), "{code} after {took:?}: {se}");
    assert!(se.contains("rank 1"), "{se}");
    let _ = r1.wait();
    // A port something else holds: rank 0 says so.
    let busy = TcpListener::bind("0.0.0.0:0").unwrap();
    let (code, se, _) =
        ends_within(rank(0, 2, busy.local_addr().unwrap().port(), &dir.join("busy")), Duration::from_secs(60));
    assert!(code != 0 && se.contains("in use"), "{code}: {se}");
}

/// A rank that cannot write its part of a checkpoint (a full disk; here rank 1 runs under a
/// 1 KiB file-size limit) fails the save on every rank: both exit non-zero, rank 0 naming rank
/// 1, and no half checkpoint (`.tmp`) is left behind.
#[test]
fn a_rank_that_cannot_write_its_part_fails_the_save_on_every_rank() {
    let dir = tmp("dp-full");
    let run = dir.join("run");
    let port = free_port().to_string();
    let o = out(&run);
    let args = [&RUN[..], &["--set", "comm.plugin=alltoall", "--set", "parallel.ep=2", "--set", &o]].concat();
    let start = |rank: &str, limit: &str| {
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let script =
            format!("ulimit -f {limit}; exec '{}' train {}", pith_tests::pith_bin().display(), quoted.join(" "));
        let mut c = std::process::Command::new("bash");
        c.args(["-c", &script]).env("PITH_PLUGIN_PATH", "");
        c.envs([("RANK", rank), ("WORLD_SIZE", "2"), ("MASTER_PORT", &port), ("MASTER_ADDR", "127.0.0.1")]);
        c.envs([("PITH_DIST_TIMEOUT", "20"), ("PITH_JOB_ID", "dist-full")]);
        c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let (r0, r1) = (start("0", "unlimited"), start("1", "1"));
    let (c0, e0, _) = ends_within(r0, Duration::from_secs(60));
    let (c1, e1, _) = ends_within(r1, Duration::from_secs(60));
    assert!(c1 != 0 && e1.contains("model-rank00001.safetensors: File too large"), "{c1}: {e1}");
    assert!(c0 != 0 && e0.contains("rank 1 could not write its part of the checkpoint"), "{c0}: {e0}");
    let left: Vec<_> = std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "no checkpoint, complete or half: {left:?}");
}

fn metrics_lines(run: &std::path::Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |s| s.lines().count())
}
