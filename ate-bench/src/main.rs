//! ATE-Bench: how cheaply a coding agent can understand, operate and extend Pith.
//!
//! `ate-bench list | prepare TASK DIR | check TASK DIR | score TRANSCRIPT | report SCORES... | selftest`
//! (see ate-bench/README.md). Tasks live in `ate-bench/tasks/<id>/` (task.md, meta.toml), reference
//! solutions in `ate-bench/solutions/<id>/`.

mod check;
mod re;
mod score;
#[cfg(test)]
mod tests;

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub category: String,
    pub title: String,
    #[serde(default)]
    pub needs_gpu: bool,
    #[serde(default)]
    pub blocked_by: Option<String>,
    pub budget: Budget,
    pub check: check::Check,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub max_turns: u32,
    pub max_output_tokens: u64,
    pub max_minutes: u32,
}

pub struct Task {
    pub id: String,
    pub dir: PathBuf,
    pub meta: Meta,
}

/// `ate-bench/` (ATE_BENCH_DIR, else where this crate was built from).
pub fn bench_dir() -> PathBuf {
    std::env::var_os("ATE_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The Pith repository the benchmark ships in.
pub fn repo_dir() -> PathBuf {
    let b = bench_dir();
    b.parent().map(Path::to_path_buf).unwrap_or(b)
}

pub fn load_tasks() -> Result<Vec<Task>, String> {
    let root = bench_dir().join("tasks");
    let rd = std::fs::read_dir(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut tasks = Vec::new();
    for e in rd.flatten().filter(|e| e.path().is_dir()) {
        let id = e.file_name().to_string_lossy().into_owned();
        let mp = e.path().join("meta.toml");
        let text = std::fs::read_to_string(&mp).map_err(|e| format!("{}: {e}", mp.display()))?;
        let meta: Meta = toml::from_str(&text).map_err(|e| format!("{}: {e}", mp.display()))?;
        if !["qa", "operate", "feature"].contains(&meta.category.as_str()) {
            return Err(format!("{}: category `{}`; valid: qa, operate, feature", mp.display(), meta.category));
        }
        tasks.push(Task { id, dir: e.path(), meta });
    }
    let order = |c: &str| ["qa", "operate", "feature"].iter().position(|x| *x == c);
    tasks.sort_by(|a, b| (order(&a.meta.category), &a.id).cmp(&(order(&b.meta.category), &b.id)));
    Ok(tasks)
}

pub fn find_task(id: &str) -> Result<Task, String> {
    let tasks = load_tasks()?;
    let names: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
    tasks.into_iter().find(|t| t.id == id).ok_or_else(|| format!("no task `{id}`; valid: {}", names.join(", ")))
}

fn list() -> Result<(), String> {
    let tasks = load_tasks()?;
    println!("{:<28} {:<9} {:<4} {:>6} {:>8} {:>5}  TITLE", "ID", "CATEGORY", "GPU", "TURNS", "OUT_TOK", "MIN");
    for t in &tasks {
        let b = &t.meta.budget;
        let gpu = if t.meta.needs_gpu { "yes" } else { "no" };
        let title = match &t.meta.blocked_by {
            Some(why) => format!("{} [blocked: {why}]", t.meta.title),
            None => t.meta.title.clone(),
        };
        println!(
            "{:<28} {:<9} {:<4} {:>6} {:>8} {:>5}  {}",
            t.id, t.meta.category, gpu, b.max_turns, b.max_output_tokens, b.max_minutes, title
        );
    }
    let cpu = tasks.iter().filter(|t| !t.meta.needs_gpu).count();
    println!("\n{} tasks ({cpu} runnable on CPU, {} need a GPU)", tasks.len(), tasks.len() - cpu);
    Ok(())
}

/// Files whose content must not change in a New-Feature task ("no host change").
pub const FROZEN: [&str; 3] = ["host", "plugin-api", "plugins/std"];

/// A hash of every file under the FROZEN folders of `dir`.
pub fn fingerprint(dir: &Path) -> String {
    fn walk(root: &Path, p: &Path, acc: &mut Vec<(String, Vec<u8>)>) {
        let Ok(rd) = std::fs::read_dir(p) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, acc)
            } else if let Ok(b) = std::fs::read(&p) {
                acc.push((p.strip_prefix(root).unwrap_or(&p).to_string_lossy().into_owned(), b));
            }
        }
    }
    let mut files = Vec::new();
    for f in FROZEN {
        walk(dir, &dir.join(f), &mut files);
    }
    files.sort();
    // FNV-1a: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in &files {
        for b in name.as_bytes().iter().chain([0u8].iter()).chain(bytes).chain([0u8].iter()) {
            h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Record what a working copy was prepared from (read by `check`).
pub fn write_stamp(dir: &Path, task: &str, commit: &str) -> Result<(), String> {
    let stamp = serde_json::json!({ "task": task, "commit": commit, "frozen": fingerprint(dir) });
    std::fs::write(dir.join(".ate-bench.json"), stamp.to_string()).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Make `dir` what the agent sees: the repo at `commit` minus the benchmark itself, with the prompt as TASK.md.
fn prepare(task: &Task, dir: &Path, repo: &Path, commit: &str) -> Result<(), String> {
    if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(format!("{} exists and is not empty", dir.display()));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let sh = format!("git -C '{}' archive '{commit}' | tar -x -C '{}'", repo.display(), dir.display());
    let st = Command::new("sh").args(["-c", &sh]).status().map_err(|e| format!("sh: {e}"))?;
    if !st.success() {
        return Err(format!("`{sh}` failed"));
    }
    // The agent never sees tasks, checks or solutions.
    let _ = std::fs::remove_dir_all(dir.join("ate-bench"));
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).map_err(|e| format!("{}: {e}", manifest.display()))?;
    let text = text.replace(", \"ate-bench\"", "").replace("\"ate-bench\", ", "");
    std::fs::write(&manifest, text).map_err(|e| format!("{}: {e}", manifest.display()))?;
    std::fs::copy(task.dir.join("task.md"), dir.join("TASK.md")).map_err(|e| format!("task.md: {e}"))?;
    write_stamp(dir, &task.id, commit)?;
    println!("prepared {} for task `{}` (commit {commit}); the prompt is TASK.md", dir.display(), task.id);
    Ok(())
}

fn usage() -> String {
    "usage: ate-bench list\n       ate-bench prepare TASK DIR [--repo REPO] [--commit REV]\n       ate-bench check TASK DIR\n       ate-bench solve TASK DIR        (apply the reference solution; for testing checks)\n       ate-bench score TRANSCRIPT.jsonl [--ledger FILE] [--task ID] [--run N]\n       ate-bench report SCORES.jsonl...\n       ate-bench selftest              (every task: FAIL unmodified, PASS solved)".into()
}

fn opt(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn run(args: Vec<String>) -> Result<bool, String> {
    let pos: Vec<&String> = {
        let mut v = Vec::new();
        let mut skip = false;
        for a in &args {
            if skip {
                skip = false;
            } else if a.starts_with("--") {
                skip = true;
            } else {
                v.push(a);
            }
        }
        v
    };
    match pos.iter().map(|s| s.as_str()).collect::<Vec<_>>().as_slice() {
        ["list"] => list().map(|_| true),
        ["prepare", id, dir] => {
            let repo = opt(&args, "--repo").map(PathBuf::from).unwrap_or_else(repo_dir);
            let commit = opt(&args, "--commit").unwrap_or_else(|| "HEAD".into());
            let out = Command::new("git")
                .args(["-C", &repo.to_string_lossy(), "rev-parse", &commit])
                .output()
                .map_err(|e| format!("git: {e}"))?;
            if !out.status.success() {
                return Err(format!("{}: no commit `{commit}`", repo.display()));
            }
            let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
            prepare(&find_task(id)?, Path::new(dir), &repo, &commit).map(|_| true)
        }
        ["check", id, dir] => {
            let task = find_task(id)?;
            let r = check::run(&task, Path::new(dir));
            for l in &r.notes {
                println!("  {l}");
            }
            if r.passed() {
                println!("PASS {id}");
            } else {
                println!("FAIL {id}: {}", r.fails.join("; "));
            }
            Ok(r.passed())
        }
        ["solve", id, dir] => check::reference::solve(&find_task(id)?, Path::new(dir)).map(|_| true),
        ["score", transcript] => {
            let s = score::score(Path::new(transcript), opt(&args, "--ledger").as_deref().map(Path::new))?;
            let mut v = serde_json::to_value(&s).map_err(|e| e.to_string())?;
            if let Some(t) = opt(&args, "--task") {
                v["task"] = t.into();
            }
            if let Some(r) = opt(&args, "--run") {
                v["run"] = r.into();
            }
            println!("{v}");
            Ok(true)
        }
        ["report", files @ ..] if !files.is_empty() => {
            print!("{}", score::report(&files.iter().map(PathBuf::from).collect::<Vec<_>>())?);
            Ok(true)
        }
        ["selftest"] => check::reference::selftest(),
        _ => Err(usage()),
    }
}

fn main() {
    match run(std::env::args().skip(1).collect()) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
