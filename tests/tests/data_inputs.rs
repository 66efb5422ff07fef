//! Bad data inputs through the `pith` binary: shards that are missing, malformed, out of the
//! vocabulary, too short or truncated while a run reads them, and `pith data prepare` inputs
//! that repeat or loop, or a partial output left by a killed prepare. Each is a one-line error
//! naming the file and the config key (or a log line saying what was skipped), never a crash.

use pith_tests::{command, one_line, out, pith, split};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn tmp(name: &str) -> pith_tests::Scratch {
    pith_tests::tmp(&format!("data-{name}"))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `n` byte-level tokens (vocab 256).
fn tokens(n: usize) -> Vec<u32> {
    (0..n).map(|i| (i * 31 % 256) as u32).collect()
}

/// A short quickstart run on `source` (and `val`, if any) into `run`: (exit code, stdout, stderr).
fn train(run: &Path, source: &str, val: Option<&str>) -> (i32, String, String) {
    let (o, s) = (out(run), format!("data.source={source:?}"));
    let mut args = vec!["train", "--set", &o, "--set", &s, "--set", "train.steps=3", "--set", "train.eval_every=0"];
    let v = val.map(|v| format!("data.val={v:?}"));
    if let Some(v) = &v {
        args.extend(["--set", v]);
    }
    pith(&args)
}

/// Train on `source` into `run`: it fails before step 1 with one line naming `source` and saying `want`.
fn fails_up_front(run: &Path, source: &str, val: Option<&str>, want: &[&str]) {
    let (code, so, se) = train(run, source, val);
    assert_eq!(code, 1, "{so}{se}");
    let line = one_line(&se);
    assert!(want.iter().all(|w| line.contains(w)), "{line}");
    assert!(!run.join("metrics.jsonl").exists(), "no step ran");
}

#[test]
fn bad_train_shards_are_one_line_errors_naming_the_file_and_key() {
    let dir = tmp("bad-train");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (shard, key) = (data.join("train_000000.bin"), format!("data.source = {:?}", p(&data)));
    std::fs::write(&shard, b"{\"not\": \"a shard\"}").unwrap();
    fails_up_front(&dir.join("magic"), p(&data), None, &[&key, "train_000000.bin: not a token shard: magic"]);
    pith::data::write_shard(&shard, &[1, 2, 3, 4, 5, 300, 6], 1000).unwrap();
    let want = [&key, "train_000000.bin: token id 300 at index 5", "model.vocab 256"];
    fails_up_front(&dir.join("vocab"), p(&data), None, &want);
    let glob = format!("{}/nope_*.bin", data.display());
    let want = [&format!("data.source = {glob:?}: no .bin token shards found (valid: ")[..]];
    fails_up_front(&dir.join("glob"), &glob, None, &want);
    let absent = format!("{}/absent", data.display());
    let want = [&format!("data.source = {absent:?}: no such shard file or directory (valid: ")[..]];
    fails_up_front(&dir.join("absent"), &absent, None, &want);
}

#[test]
fn bad_val_data_fails_before_step_1() {
    let dir = tmp("bad-val");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    pith::data::write_shard(&data.join("train_000000.bin"), &tokens(5000), 256).unwrap();
    let source = p(&data);
    fails_up_front(&dir.join("none"), source, None, &["data.val (unset", "no held-out data", "set data.val"]);
    let val = data.join("val_000000.bin");
    pith::data::write_shard(&val, &tokens(40), 256).unwrap();
    let want = ["data.val (unset", "val_000000.bin: 40 tokens in all", "model.seq_len + 1 = 65"];
    fails_up_front(&dir.join("short"), source, None, &want);
    let mut bad = tokens(500);
    bad[77] = 4000;
    pith::data::write_shard(&val, &bad, 5000).unwrap();
    let want = ["val_000000.bin: token id 4000 at index 77", "model.vocab 256"];
    fails_up_front(&dir.join("vocab"), source, None, &want);
    let named = format!("{}/short_*.bin", data.display());
    let want = [&format!("data.val = {named:?}: no .bin token shards found")[..]];
    fails_up_front(&dir.join("named"), source, Some(&named), &want);
}

#[test]
fn a_shard_truncated_under_a_running_train_is_an_error_not_sigbus() {
    let dir = tmp("truncate");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let shard = data.join("train_000000.bin");
    pith::data::write_shard(&shard, &tokens(200_000), 256).unwrap();
    pith::data::write_shard(&data.join("val_000000.bin"), &tokens(2000), 256).unwrap();
    let run = dir.join("run");
    let (o, s) = (out(&run), format!("data.source={:?}", p(&data)));
    let mut child = command()
        .args(["train", "--set", &o, "--set", &s, "--set", "train.steps=100000", "--set", "train.eval_every=0"])
        .args(["--set", "train.checkpoint_every=0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |m| m.lines().count()) < 1 {
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the run wrote no metrics");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let header = pith::data::HEADER_BYTES as u64;
    std::fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(header).unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the run went on after its shard was truncated");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, so, se) = split(child.wait_with_output().unwrap());
    assert_eq!(code, 1, "a signal death is -1\n{so}{se}");
    let last = se.lines().last().unwrap_or_default();
    assert!(last.contains("train_000000.bin: shrank to 1024 bytes") && last.contains("data.source"), "{se}");
}

/// `pith data prepare ARGS… --out OUT`; panics unless it succeeds; returns stderr and meta.json.
fn prepare(args: &[&str], out: &Path) -> (String, serde_json::Value) {
    let (code, so, se) = pith(&[&["data", "prepare"][..], args, &["--out", p(out), "--val-fraction", "0.2"]].concat());
    assert_eq!(code, 0, "{so}{se}");
    let meta = serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    (se, meta)
}

#[test]
fn prepare_reads_a_file_named_twice_once() {
    let dir = tmp("twice");
    let text = "one document, given twice on the command line. ".repeat(20);
    std::fs::write(dir.join("a.txt"), &text).unwrap();
    let a = dir.join("a.txt");
    let (said, meta) = prepare(&[p(&a), p(&a)], &dir.join("out"));
    assert!(said.contains("skipped 1 duplicate input"), "{said}");
    let tokens = meta["train"]["tokens"].as_u64().unwrap() + meta["val"]["tokens"].as_u64().unwrap();
    assert_eq!(tokens, text.len() as u64, "the text once, not twice");
    assert_eq!(meta["sources"].as_array().unwrap().len(), 1);
}

#[test]
fn prepare_follows_no_symlink_loop_and_reads_an_aliased_file_once() {
    let dir = tmp("symlinks");
    let docs = dir.join("docs");
    std::fs::create_dir_all(docs.join("sub")).unwrap();
    for i in 0..10 {
        std::fs::write(docs.join(format!("sub/{i}.txt")), format!("document number {i}. ")).unwrap();
    }
    std::os::unix::fs::symlink(&docs, docs.join("sub/loop")).unwrap();
    std::os::unix::fs::symlink(docs.join("sub/3.txt"), docs.join("alias.txt")).unwrap();
    let three = docs.join("sub/3.txt");
    let (said, meta) = prepare(&[p(&docs), p(&three)], &dir.join("out"));
    // sub/3.txt (reached as alias.txt first), sub/loop and the 3.txt named again are skipped.
    assert!(said.contains("skipped 3 duplicate input"), "{said}");
    let docs_read = meta["train"]["documents"].as_u64().unwrap() + meta["val"]["documents"].as_u64().unwrap();
    assert_eq!(docs_read, 10);
}

#[test]
fn prepare_after_a_killed_prepare_removes_its_partial_output() {
    let dir = tmp("stale");
    std::fs::write(dir.join("a.txt"), "text to prepare again. ".repeat(40)).unwrap();
    // What a prepare killed while writing leaves: its temp directory (of a pid no longer running).
    let stale = dir.join(".out.tmp-999999999");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("train_000000.bin"), b"half a shard").unwrap();
    let (said, meta) = prepare(&[p(&dir.join("a.txt"))], &dir.join("out"));
    assert!(said.contains(".out.tmp-999999999: the partial output of an interrupted"), "{said}");
    assert!(!stale.exists());
    assert_eq!(meta["val"]["shards"], 1);
    let (code, _, se) = train(&dir.join("run"), p(&dir.join("out")), None);
    assert_eq!(code, 0, "{se}");
}
