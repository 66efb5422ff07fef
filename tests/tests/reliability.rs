//! The run directory and its checkpoints under faults, through the `pith` binary: concurrent
//! runs, resumes that would overwrite another run, stale temporaries, signals, kill -9, corrupted
//! checkpoint bytes, and the small CLI faults (docs/reliability.md lists every case and its test).

use pith_tests::{command, metrics, one_line, out, pith, snapshot, split};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn tmp(name: &str) -> pith_tests::Scratch {
    pith_tests::tmp(&format!("rel-{name}"))
}

const SHORT: [&str; 4] = ["--set", "train.eval_every=0", "--set", "train.log_every=1000"];

/// A short quickstart run into `run`; panics unless it succeeds.
fn train_ok(run: &Path, extra: &[&str]) {
    let o = out(run);
    let args = [&["train", "--set", &o][..], &SHORT, extra].concat();
    let (code, so, se) = pith(&args);
    assert_eq!(code, 0, "{args:?}\n{so}{se}");
}

/// A long quickstart run in the background, returned once it has written `rows` metrics rows.
fn start_long(run: &Path, rows: usize) -> Child {
    let o = out(run);
    let child = command()
        .args(["train", "--set", &o, "--set", "train.steps=100000", "--set", "train.checkpoint_every=0"])
        .args(SHORT)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |m| m.lines().count()) < rows {
        assert!(t0.elapsed() < Duration::from_secs(120), "the background run wrote no metrics");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn kill(child: &Child, sig: &str) {
    let st = std::process::Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
    assert!(st.success());
}

#[test]
fn a_second_run_on_the_same_directory_is_refused_while_the_first_lives() {
    let run = tmp("concurrent");
    let mut first = start_long(&run, 2);
    let (code, _, err) = pith(&[&["train", "--set", &out(&run), "--set", "train.steps=3"][..], &SHORT].concat());
    let line = one_line(&err);
    assert_eq!(code, 1, "{err}");
    assert!(line.contains("another pith run") && line.contains(&first.id().to_string()), "{line}");
    // kill -9 leaves no stale lock: the directory is usable at once (a fresh run: no checkpoints).
    first.kill().unwrap();
    first.wait().unwrap();
    train_ok(&run, &["--set", "train.steps=3"]);
    let steps: Vec<u64> = metrics(&run).iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3], "the dead run's rows must be gone, the new run's kept");
}

#[test]
fn sigint_saves_a_checkpoint_and_prints_the_resume_command_that_finishes_the_run() {
    let run = tmp("sigint");
    let child = start_long(&run, 3);
    kill(&child, "-INT");
    let (code, _, err) = split(child.wait_with_output().unwrap());
    assert_eq!(code, 130, "{err}");
    let ck = std::fs::read_dir(run.join("checkpoints")).unwrap().count();
    assert_eq!(ck, 1, "one checkpoint, at the interrupted step");
    let step = metrics(&run).len() as u64;
    assert!(err.contains(&format!("after step {step}: checkpoint saved")), "{err}");
    let cmd = err.lines().find_map(|l| l.split("continue with: ").nth(1)).expect("a resume command").to_string();
    let args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
    let target = (step + 2).to_string();
    let (code, so, se) = pith(&[&args[..], &["--set", &format!("train.steps={target}")]].concat());
    assert_eq!(code, 0, "{cmd}\n{so}{se}");
    let steps: Vec<u64> = metrics(&run).iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=step + 2).collect::<Vec<_>>());
}

#[test]
fn a_resume_never_overwrites_another_run_or_its_own_later_checkpoints() {
    let dir = tmp("overwrite");
    let (a, b) = (dir.join("a"), dir.join("b"));
    train_ok(&a, &["--set", "train.steps=4", "--set", "train.checkpoint_every=2"]);
    train_ok(&b, &["--set", "train.steps=4", "--set", "train.checkpoint_every=2"]);
    // Everything but the lock file (a refused run takes the lock, then lets go).
    let files = |d: &Path| snapshot(d).into_iter().filter(|(p, _)| !p.ends_with(".lock")).collect::<Vec<_>>();
    let (sa, sb) = (files(&a), files(&b));
    let a2 = a.join("checkpoints/step_00000002");
    // Into another run's directory.
    let (code, _, err) =
        pith(&["train", "--set", &out(&b), "--resume", a2.to_str().unwrap(), "--set", "train.steps=6"]);
    assert_eq!(code, 1);
    assert!(one_line(&err).contains("another run"), "{err}");
    // Into its own directory from before its newest checkpoint.
    let (code, _, err) =
        pith(&["train", "--set", &out(&a), "--resume", a2.to_str().unwrap(), "--set", "train.steps=6"]);
    assert_eq!(code, 1);
    assert!(one_line(&err).contains("later checkpoints (steps 4)"), "{err}");
    assert!(files(&a) == sa && files(&b) == sb, "a refused resume changed files");
    // Branching into a new directory is fine.
    let c = dir.join("c");
    let (code, so, se) =
        pith(&["train", "--set", &out(&c), "--resume", a2.to_str().unwrap(), "--set", "train.steps=4"]);
    assert_eq!(code, 0, "{so}{se}");
    assert!(c.join("checkpoints/step_00000004").is_dir());
}

#[test]
fn stale_temporaries_of_an_interrupted_save_are_cleaned_and_metrics_trimmed() {
    let run = tmp("stale");
    train_ok(&run, &["--set", "train.steps=4", "--set", "train.checkpoint_every=2"]);
    let ck = run.join("checkpoints");
    // A crash during the first save of a run: only a .tmp. A fresh run proceeds and removes it.
    let lone = tmp("stale-first");
    train_ok(&lone, &["--set", "train.steps=2"]);
    std::fs::rename(lone.join("checkpoints/step_00000002"), lone.join("checkpoints/step_00000002.tmp")).unwrap();
    train_ok(&lone, &["--set", "train.steps=2"]);
    assert!(!lone.join("checkpoints/step_00000002.tmp").exists());
    // A crash after step 4's save was started: its .tmp is removed, a resume continues from 2,
    // and metrics.jsonl keeps steps 1-2 once, then the redone 3-6.
    std::fs::rename(ck.join("step_00000004"), ck.join("step_00000004.tmp")).unwrap();
    // A replacement interrupted between its renames: the checkpoint is back from its .old.
    std::fs::rename(ck.join("step_00000002"), ck.join("step_00000002.old")).unwrap();
    train_ok(&run, &["--resume", run.to_str().unwrap(), "--set", "train.steps=6", "--set", "train.checkpoint_every=2"]);
    let names: Vec<String> =
        std::fs::read_dir(&ck).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["step_00000002", "step_00000004", "step_00000006"]);
    let steps: Vec<u64> = metrics(&run).iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
}

#[test]
fn flipped_bytes_in_a_checkpoint_are_found_and_the_file_named() {
    let run = tmp("corrupt");
    train_ok(&run, &["--set", "train.steps=2"]);
    let file = run.join("checkpoints/step_00000002/model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x10;
    std::fs::write(&file, &bytes).unwrap();
    let resume = ["train", "--set", &out(&run), "--resume", run.to_str().unwrap(), "--set", "train.steps=4"];
    let (code, _, err) = pith(&resume);
    assert_eq!(code, 1);
    let line = one_line(&err);
    assert!(line.contains("model.safetensors") && line.contains("corrupted"), "{line}");
    // Without checksums (a checkpoint from an older Pith), a file that is not safetensors says so.
    std::fs::remove_file(run.join("checkpoints/step_00000002/checksums.json")).unwrap();
    std::fs::write(&file, b"not a tensor file").unwrap();
    let (code, _, err) = pith(&resume);
    assert_eq!(code, 1);
    assert!(one_line(&err).contains("not a readable safetensors file"), "{err}");
}

#[test]
fn train_out_never_writes_into_a_directory_that_is_not_a_run() {
    let dir = tmp("out");
    std::fs::write(dir.join("config.toml"), "# the user's own file\n").unwrap();
    for o in ["", "."] {
        let o = format!("train.out=\"{o}\"");
        let r = command().current_dir(&dir).args(["train", "--set", &o, "--set", "train.steps=2"]).output();
        let (code, _, err) = split(r.unwrap());
        assert_eq!(code, 1, "{o}: {err}");
        assert!(one_line(&err).contains("train.out"), "{err}");
    }
    assert_eq!(std::fs::read_to_string(dir.join("config.toml")).unwrap(), "# the user's own file\n");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "nothing was written");
}

#[test]
fn small_cli_faults_are_one_line_and_write_nothing() {
    let dir = tmp("cli");
    // A missing --plugin-dir.
    let missing = dir.join("no-such-dir");
    let (code, _, err) = pith(&["--plugin-dir", missing.to_str().unwrap(), "plugins", "list"]);
    assert_eq!(code, 1);
    assert!(one_line(&err).contains("--plugin-dir"), "{err}");
    // An existing routing-trace file is never overwritten, and training does not start.
    let trace = dir.join("trace.safetensors");
    std::fs::write(&trace, "keep").unwrap();
    let run = dir.join("run");
    let (code, _, err) =
        pith(&["train", "--set", &out(&run), "--set", "train.steps=2", "--trace-routing", trace.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(one_line(&err).contains("--trace-routing"), "{err}");
    assert_eq!(std::fs::read_to_string(&trace).unwrap(), "keep");
    assert!(!run.exists());
    // A closed pipe (`pith config | head`) ends quietly, not in a panic.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let (_, _, se) = split(command().arg("config").stdout(writer).output().unwrap());
    assert!(!se.contains("panicked"), "{se}");
}

#[test]
fn a_save_that_fails_for_lack_of_space_leaves_earlier_checkpoints_and_no_temporary() {
    let run = tmp("full");
    train_ok(&run, &["--set", "train.steps=2"]);
    let before = snapshot(&run.join("checkpoints"));
    // A file-size limit just above the model file: the optimizer file of the next save fails
    // as on a full disk (EFBIG), halfway through the checkpoint.
    let model = std::fs::metadata(run.join("checkpoints/step_00000002/model.safetensors")).unwrap().len();
    let bin = pith_tests::pith_bin().display().to_string();
    let script = format!(
        "ulimit -f {}; exec '{bin}' train --set '{}' --resume '{}' --set train.steps=4 --set train.eval_every=0",
        model / 1024 + 8,
        out(&run),
        run.display()
    );
    let o = std::process::Command::new("bash").args(["-c", &script]).env("PITH_PLUGIN_PATH", "").output().unwrap();
    let (code, _, err) = split(o);
    assert_eq!(code, 1, "{err}");
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("error: ") && last.contains("optimizer.safetensors: File too large"), "{err}");
    assert!(snapshot(&run.join("checkpoints")) == before, "the earlier checkpoint changed or a .tmp was left");
    // The run continues from there once there is room.
    train_ok(&run, &["--resume", run.to_str().unwrap(), "--set", "train.steps=4"]);
}

#[test]
fn sigterm_stops_like_sigint_and_a_second_signal_aborts_at_once() {
    let run = tmp("sigterm");
    let child = start_long(&run, 2);
    kill(&child, "-TERM");
    let (code, _, err) = split(child.wait_with_output().unwrap());
    assert_eq!(code, 143, "{err}");
    assert!(err.contains("terminated (SIGTERM)") && err.contains("--resume"), "{err}");
    assert_eq!(std::fs::read_dir(run.join("checkpoints")).unwrap().count(), 1);
    // Two Ctrl-C in a row: the second ends the process at once (status 130), before any save
    // could finish — whatever is on disk is still only complete checkpoints.
    let run = tmp("sigint-twice");
    let child = start_long(&run, 2);
    kill(&child, "-INT");
    kill(&child, "-INT");
    let t0 = Instant::now();
    let (code, _, err) = split(child.wait_with_output().unwrap());
    assert_eq!(code, 130, "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let ck: Vec<_> = std::fs::read_dir(run.join("checkpoints")).map_or(Vec::new(), |d| d.flatten().collect());
    assert!(ck.iter().all(|e| e.path().join("checksums.json").is_file() || e.path().extension().is_some()));
}

#[test]
fn kill_9_while_checkpoints_are_being_written_leaves_a_resumable_run() {
    // A checkpoint every step, so a kill at any moment is likely to land inside a save.
    for (i, rows) in [2usize, 3, 5].into_iter().enumerate() {
        let run = tmp(&format!("kill9-{i}"));
        let o = out(&run);
        let mut child = command()
            .args(["train", "--set", &o, "--set", "train.steps=100000", "--set", "train.checkpoint_every=1"])
            .args(SHORT)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |m| m.lines().count()) < rows {
            assert!(t0.elapsed() < Duration::from_secs(120), "the run wrote no metrics");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(7 * i as u64));
        child.kill().unwrap();
        child.wait().unwrap();
        let (code, so, se) = pith(
            &[&["train", "--set", &o, "--resume", run.to_str().unwrap(), "--set", "train.steps=8"][..], &SHORT]
                .concat(),
        );
        assert_eq!(code, 0, "kill after {rows} rows:\n{so}{se}");
        let steps: Vec<u64> = metrics(&run).iter().map(|r| r["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, (1..=8).collect::<Vec<_>>(), "kill after {rows} rows");
    }
}
