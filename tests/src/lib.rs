//! What every end-to-end test needs: the `pith` binary (built once per test run, in the same
//! profile and target directory as the tests), scratch directories, and running a command.
//!
//! Unit tests live beside their code in host/; the tests here drive the binary as a user does.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The workspace root.
pub const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The `pith` binary of this build profile: `cargo test` builds libraries and test binaries but
/// not other packages' executables, so it is built here once (`cargo build -p pith --bin pith`,
/// fast: the library is already compiled). `PITH_BIN=path` uses that binary instead (on the GPU
/// machine, which has no cargo: scripts/gpu-tests.sh).
pub fn pith_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("PITH_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => cargo_build(&["-p", "pith", "--bin", "pith"]).join("pith"),
    })
}

/// The plugin crate `package` (plugins/<package>) built beside `pith`, where pith always loads
/// plugins from; returns the .so. With `PITH_BIN` the library must already be there.
pub fn plugin(package: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let so = pith_bin().parent().unwrap().join(format!("lib{}.so", package.replace('-', "_")));
    let mut built = BUILT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if std::env::var_os("PITH_BIN").is_none() && !built.iter().any(|b| b == package) {
        cargo_build(&["-p", package]);
        built.push(package.to_string());
    }
    assert!(so.is_file(), "{} is missing", so.display());
    so
}

/// `cargo build ARGS` in this test executable's profile and target directory; returns the
/// profile directory (the test executable is <target>/<profile-dir>/deps/<name>-<hash>).
fn cargo_build(args: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()).unwrap() {
        "debug" => "dev".to_string(),
        p => p.to_string(),
    };
    let st = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--profile", &profile])
        .args(args)
        .current_dir(WORKSPACE)
        .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap())
        .status()
        .expect("running cargo");
    assert!(st.success(), "cargo build {args:?} failed");
    profile_dir
}

/// A fresh, empty scratch directory unique to this process and `name`; removed when the
/// test that made it passes (kept, to look at, when it fails): a whole suite's runs and
/// checkpoints would otherwise take over a gigabyte of /tmp.
pub fn tmp(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("pith-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

/// A scratch directory (see [`tmp`]); derefs to its path.
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `pith` with no plugin path from the environment and quiet logs unless asked for.
pub fn command() -> Command {
    let mut c = Command::new(pith_bin());
    c.env("PITH_PLUGIN_PATH", "");
    c
}

/// Run pith; returns (exit code, stdout, stderr). A signal death is code -1.
pub fn pith(args: &[&str]) -> (i32, String, String) {
    split(command().args(args).output().unwrap())
}

pub fn split(o: Output) -> (i32, String, String) {
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (o.status.code().unwrap_or(-1), s(&o.stdout), s(&o.stderr))
}

/// `train.out="DIR"` for `--set`.
pub fn out(dir: &Path) -> String {
    format!("train.out=\"{}\"", dir.display())
}

/// The rows of a run's metrics.jsonl.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every file under `dir` with its bytes, to prove nothing was changed.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                v.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    v.sort();
    v
}

/// The one non-empty line of an error output (fails the test if there are more).
pub fn one_line(err: &str) -> String {
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    lines[0].to_string()
}
