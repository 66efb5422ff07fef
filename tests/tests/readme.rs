//! README.md's everyday commands run as written, in order, on a fresh copy of the repository's
//! configs, after the main command (`pith train`) made `runs/quickstart`: each exits 0. GPU
//! commands are skipped with a message, and so is the import of an HF model folder (the user's
//! download; tests/tests/hf.rs imports every family). `corpus.txt`, the user's text, is written
//! first. CI runs README's two set-up commands themselves (`.ci/run`).

use pith_tests::{pith_bin, tmp, WORKSPACE};
use std::process::Command;

/// The lines of README.md's "Everyday commands" shell block, comments stripped.
fn everyday_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(format!("{WORKSPACE}/README.md")).unwrap();
    let section = readme.split("## Everyday commands").nth(1).expect("README.md has an Everyday commands section");
    let block = section.split("```sh").nth(1).and_then(|b| b.split("```").next()).expect("a ```sh block");
    let strip = |l: &str| l.split(" #").next().unwrap_or("").trim().to_string();
    block.lines().map(strip).filter(|l| !l.is_empty()).collect()
}

/// Why a README command cannot run here, if it cannot.
fn skipped(cmd: &str) -> Option<&'static str> {
    if cmd.contains("device=cuda") || cmd.starts_with("pith bench") {
        Some("needs a CUDA GPU")
    } else if cmd.starts_with("pith import hf path/to/") {
        Some("needs a downloaded Hugging Face model folder")
    } else {
        None
    }
}

#[test]
fn every_everyday_command_of_the_readme_runs_as_written() {
    let cmds = everyday_commands();
    assert!(cmds.len() >= 10 && cmds.iter().all(|c| c.starts_with("pith ")), "{cmds:?}");
    let dir = tmp("readme");
    let copy = Command::new("cp").args(["-r", &format!("{WORKSPACE}/configs"), dir.to_str().unwrap()]).status();
    assert!(copy.unwrap().success());
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(400);
    std::fs::write(dir.join("corpus.txt"), text).unwrap();
    let path = format!("{}:{}", pith_bin().parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let run = |cmd: &str| {
        let mut sh = Command::new("sh");
        let o = sh.args(["-c", cmd]).current_dir(&dir).env("PATH", &path).env("PITH_PLUGIN_PATH", "").output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    // README's main command, `cargo run --release -- train`, is `pith train`.
    let (code, err) = run("pith train");
    assert_eq!(code, Some(0), "pith train: {err}");
    let mut failed = Vec::new();
    for cmd in &cmds {
        if let Some(why) = skipped(cmd) {
            println!("skipped ({why}): {cmd}");
            continue;
        }
        let (code, err) = run(cmd);
        println!("exit {code:?}: {cmd}");
        if code != Some(0) {
            failed.push(format!("{cmd}: exit {code:?}: {}", err.lines().last().unwrap_or("")));
        }
    }
    assert!(failed.is_empty(), "README commands that failed as written:\n{}", failed.join("\n"));
}
