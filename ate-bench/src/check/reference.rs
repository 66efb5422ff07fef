//! Reference solutions and the self-test: [`solve`] applies a task's solution to a working copy
//! (a Q&A template filled by [`qa::locate`], a plugin crate copied in, or `solve.sh` run);
//! [`selftest`] requires every task to FAIL unmodified and PASS solved; GPU tasks only where pith
//! can open a GPU (elsewhere each is listed as skipped, with pith's reason).

use super::{copy_dir, gpu, pith_bin, qa, run_with, scratch, Check, Env};
use crate::{bench_dir, repo_dir, Task};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Apply task's reference solution to the working copy `dir`.
pub fn solve(task: &Task, dir: &Path) -> Result<(), String> {
    solve_with(task, dir, &Env::from_env())
}

pub fn solve_with(task: &Task, dir: &Path, env: &Env) -> Result<(), String> {
    let sol = bench_dir().join("solutions").join(&task.id);
    match &task.meta.check {
        Check::Cite { cite, .. } => {
            let tpl = std::fs::read_to_string(sol.join("answer.md")).map_err(|e| format!("{}: {e}", sol.display()))?;
            let mut text = tpl.clone();
            for (i, c) in cite.iter().enumerate() {
                let at = qa::locate(c, dir)
                    .ok_or(format!("requirement {i} ({}) is satisfied nowhere in {}", c.what, c.file))?;
                text = text.replace(&format!("{{{{cite {i}}}}}"), &at);
            }
            std::fs::write(dir.join("ANSWER.md"), text).map_err(|e| e.to_string())
        }
        Check::Plugin(p) => copy_dir(&sol.join(&p.name), &dir.join("plugins").join(&p.name), &["target"]),
        Check::Unavailable { missing } => Err(format!("no reference solution: {missing}")),
        _ => {
            let pith = pith_bin(dir, env)?;
            let o = Command::new("sh")
                .arg(sol.join("solve.sh"))
                .current_dir(dir)
                .env("PITH", &pith)
                .env("PITH_PLUGIN_PATH", "")
                .output()
                .map_err(|e| format!("sh: {e}"))?;
            if !o.status.success() {
                return Err(format!("solve.sh failed: {}", String::from_utf8_lossy(&o.stderr)));
            }
            Ok(())
        }
    }
}

/// A fresh working copy of this repo's current tree (not a commit: what the checks must agree with now).
pub fn working_copy(tag: &str) -> Result<PathBuf, String> {
    let d = scratch(tag)?.join("repo");
    copy_dir(&repo_dir(), &d, &["target", ".git", "runs", "ate-bench", "ANSWER.md"])?;
    crate::write_stamp(&d, tag, "working-tree")?;
    Ok(d)
}

/// Every task: FAIL on an unmodified copy, PASS with its reference solution. Tasks that need a GPU
/// run only where pith can open one; elsewhere they are printed as skipped, never as passed.
pub fn selftest() -> Result<bool, String> {
    let mut env = Env::from_env();
    if env.pith.is_none() {
        env.pith = Some(pith_bin(&repo_dir(), &env)?);
    }
    if env.target_dir.is_none() {
        env.target_dir = Some(repo_dir().join("target/plugin-tests"));
    }
    let tasks = crate::load_tasks()?;
    let feature_copy = working_copy("selftest-features")?;
    let pith = env.pith.clone().unwrap_or_default();
    let no_gpu = if tasks.iter().any(|t| t.meta.needs_gpu) { gpu::probe(&pith, &repo_dir()).err() } else { None };
    let (mut bad, mut skipped) = (0, 0);
    for t in &tasks {
        if let (true, Some(why)) = (t.meta.needs_gpu, &no_gpu) {
            println!("skip {:<28}        {why}", t.id);
            skipped += 1;
            continue;
        }
        let dir = if t.meta.category == "feature" { feature_copy.clone() } else { working_copy(&t.id)? };
        let t0 = std::time::Instant::now();
        let before = run_with(t, &dir, &env);
        let solved = solve_with(t, &dir, &env);
        let after = run_with(t, &dir, &env);
        let ok = !before.passed() && solved.is_ok() && after.passed();
        let why = match (&solved, before.passed()) {
            (Err(e), _) => format!("solve: {e}"),
            (_, true) => "PASSES unmodified".into(),
            _ => after.fails.join("; "),
        };
        println!(
            "{} {:<28} {:>5.1}s {}",
            if ok { "ok  " } else { "BAD " },
            t.id,
            t0.elapsed().as_secs_f64(),
            if ok { "" } else { &why }
        );
        bad += !ok as usize;
    }
    let ran = tasks.len() - skipped;
    let skip =
        if skipped > 0 { format!("; {skipped} GPU tasks skipped: no GPU here, not tested") } else { String::new() };
    println!(
        "{}",
        if bad == 0 {
            format!("selftest PASS ({ran} tasks{skip})")
        } else {
            format!("selftest FAIL ({bad} of {ran} tasks{skip})")
        }
    );
    Ok(bad == 0)
}
