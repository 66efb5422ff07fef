//! The plugin foundation end to end, through the `pith` binary: scaffold a router, build it as
//! a cdylib outside the workspace, load it from a directory, select it in TOML, check it; and
//! every load/config/panic error a user can meet is one line, names the culprit, exits 1.
//!
//! Plugin crates are built once per test run into `target/plugin-tests` (shared across runs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use pith_tests::{pith, WORKSPACE};

fn tmp(name: &str) -> pith_tests::Scratch {
    pith_tests::tmp(&format!("plugins-{name}"))
}

/// Build the crate at `dir` as a cdylib; returns the .so path.
fn build(dir: &Path, crate_name: &str) -> PathBuf {
    let target = Path::new(WORKSPACE).join("target/plugin-tests");
    let st = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .env("CARGO_PROFILE_DEV_DEBUG", "false") // 1.6 GB less disk: nothing here is debugged
        .env("CARGO_INCREMENTAL", "0")
        .status()
        .unwrap();
    assert!(st.success(), "building {} failed", dir.display());
    target.join(format!("debug/lib{crate_name}.so"))
}

/// Hash of every file under host/ (to prove scaffolding and loading never touch it).
fn host_fingerprint() -> u64 {
    fn walk(p: &Path, acc: &mut Vec<(PathBuf, Vec<u8>)>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, acc)
            } else {
                acc.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut files = Vec::new();
    walk(&Path::new(WORKSPACE).join("host"), &mut files);
    files.sort();
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut h);
    h.finish()
}

/// A router scaffolded with `pith plugins new` and built as-is.
fn scaffolded_router() -> &'static PathBuf {
    static SO: OnceLock<PathBuf> = OnceLock::new();
    SO.get_or_init(|| {
        let dir = tmp("scaffold");
        let (code, out, err) =
            pith(&["plugins", "new", "--kind", "router", "--name", "test-router", "--dir", dir.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
        build(&dir.join("test-router"), "test_router")
    })
}

/// A router that panics in create, forward or backward, as its config says.
fn panicky_router() -> &'static PathBuf {
    static SO: OnceLock<PathBuf> = OnceLock::new();
    SO.get_or_init(|| {
        let dir = tmp("panicky");
        let (code, _, err) = pith(&["plugins", "new", "--kind", "router", "--name", "panicky", "--dir", dir.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let src = dir.join("panicky/src/lib.rs");
        let s = std::fs::read_to_string(&src).unwrap();
        let s = s
            .replacen("    top_k: usize,\n}", "    top_k: usize,\n    #[serde(default)]\n    panic: String,\n}", 1)
            .replace("    let c: Config = parse_config(config)?;", "    let c: Config = parse_config(config)?;\n    if c.panic == \"create\" { panic!(\"boom in create\") }\n    PANIC.set(c.panic.clone()).ok();")
            .replace("        let (t, e, k) = (x.dim(0), self.experts, self.top_k);\n        let logits", "        if PANIC.get().map(String::as_str) == Some(\"forward\") { panic!(\"boom in forward\") }\n        let (t, e, k) = (x.dim(0), self.experts, self.top_k);\n        let logits")
            .replace("        let dl = h.alloc_f32", "        if PANIC.get().map(String::as_str) == Some(\"backward\") { panic!(\"boom in backward\") }\n        let dl = h.alloc_f32")
            + "\nstatic PANIC: std::sync::OnceLock<String> = std::sync::OnceLock::new();\n";
        std::fs::write(&src, s).unwrap();
        build(&dir.join("panicky"), "panicky")
    })
}

fn plugin_dir_with(name: &str, files: &[(&str, &Path)]) -> pith_tests::Scratch {
    let d = tmp(name);
    for (n, f) in files {
        std::fs::copy(f, d.join(n)).unwrap();
    }
    d
}

#[test]
fn list_shows_every_kind_built_in() {
    let (code, out, _) = pith(&["plugins", "list"]);
    assert_eq!(code, 0);
    for (kind, name) in [
        ("router", "topk-softmax"),
        ("experts", "swiglu"),
        ("balance_loss", "switch-aux"),
        ("balance_loss", "z-loss"),
        ("optimizer", "adamw"),
        ("comm", "local"),
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(kind) && l.contains(name) && l.contains("built-in")),
            "{kind} {name} missing:\n{out}"
        );
    }
}

#[test]
fn scaffolded_router_builds_loads_is_selected_and_passes_check() {
    let before = host_fingerprint();
    let so = scaffolded_router();
    let dir = plugin_dir_with("select", &[("libtest_router.so", so)]);
    let d = dir.to_str().unwrap();
    let (code, out, err) = pith(&["plugins", "list", "--plugin-dir", d]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines().any(|l| l.starts_with("router") && l.contains("test-router") && l.contains("libtest_router.so")),
        "{out}"
    );
    let (code, out, err) = pith(&["plugins", "check", "test-router", "--plugin-dir", d]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("PASS router `test-router`"), "{out}");
    // Selected in TOML: plan resolves it from the file, and a short training run uses it.
    let cfg = dir.join("run.toml");
    let text = std::fs::read_to_string(Path::new(WORKSPACE).join("configs/quickstart.toml"))
        .unwrap()
        .replace("plugin = \"topk-softmax\"", "plugin = \"test-router\"");
    std::fs::write(&cfg, text).unwrap();
    let (code, out, err) = pith(&["plan", cfg.to_str().unwrap(), "--plugin-dir", d]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines().any(|l| l.contains("router") && l.contains("test-router") && l.contains("libtest_router.so")),
        "{out}"
    );
    let run = dir.join("run");
    let (code, _, err) = pith(&[
        "train",
        cfg.to_str().unwrap(),
        "--plugin-dir",
        d,
        "--set",
        "train.steps=3",
        "--set",
        &format!("train.out=\"{}\"", run.display()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(run.join("metrics.jsonl").is_file());
    assert_eq!(before, host_fingerprint(), "a file under host/ changed");
}

#[test]
fn every_template_builds_and_passes_its_check() {
    let dir = tmp("templates");
    let pd = tmp("templates-dir");
    for kind in ["experts", "balance_loss", "optimizer", "comm"] {
        let name = format!("tpl-{}", kind.replace('_', "-"));
        let (code, _, err) = pith(&["plugins", "new", "--kind", kind, "--name", &name, "--dir", dir.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let lib = format!("lib{}.so", name.replace('-', "_"));
        let so = build(&dir.join(&name), &name.replace('-', "_"));
        std::fs::copy(so, pd.join(&lib)).unwrap();
    }
    for kind in ["experts", "balance_loss", "optimizer", "comm"] {
        let name = format!("tpl-{}", kind.replace('_', "-"));
        let (code, out, err) = pith(&["plugins", "check", &name, "--plugin-dir", pd.to_str().unwrap()]);
        assert_eq!(code, 0, "{kind}: {out}{err}");
        assert!(out.contains(&format!("PASS {kind} `{name}`")), "{out}");
    }
}

#[test]
fn loaded_plugin_replaces_builtin_visibly() {
    let dir = tmp("replace");
    let (code, _, err) =
        pith(&["plugins", "new", "--kind", "router", "--name", "topk-softmax", "--dir", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let so = build(&dir.join("topk-softmax"), "topk_softmax");
    let pd = plugin_dir_with("replace-dir", &[("libtopk_softmax.so", &so)]);
    let (code, out, _) = pith(&["plugins", "list", "--plugin-dir", pd.to_str().unwrap()]);
    assert_eq!(code, 0);
    let line = out.lines().find(|l| l.contains("topk-softmax")).unwrap();
    assert!(line.contains("libtopk_softmax.so") && line.contains("replaces built-in"), "{line}");
}

#[test]
fn plugin_built_against_another_api_version_is_refused_in_one_line() {
    let root = tmp("api-v2");
    // A copy of plugin-api with a bumped version, and a router built against it.
    let api = root.join("plugin-api");
    let v = pith_plugin_api::VERSION;
    let ours = &v[..v.rfind('.').unwrap()]; // e.g. "0.3": a 0.x plugin must match the minor version
    for dir in ["src", "kernels"] {
        std::fs::create_dir_all(api.join(dir)).unwrap();
        for f in std::fs::read_dir(Path::new(WORKSPACE).join("plugin-api").join(dir)).unwrap().flatten() {
            std::fs::copy(f.path(), api.join(dir).join(f.file_name())).unwrap();
        }
    }
    let manifest = std::fs::read_to_string(Path::new(WORKSPACE).join("plugin-api/Cargo.toml")).unwrap();
    let (theirs, bumped) = (format!("version = \"{ours}.0\""), "version = \"0.99.0\"");
    assert!(manifest.contains(&theirs), "plugin-api/Cargo.toml has no `{theirs}`");
    std::fs::write(api.join("Cargo.toml"), manifest.replace(&theirs, bumped)).unwrap();
    let (code, _, err) =
        pith(&["plugins", "new", "--kind", "router", "--name", "old-router", "--dir", root.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let m = root.join("old-router/Cargo.toml");
    let text = std::fs::read_to_string(&m).unwrap();
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("pith-plugin-api") {
                format!("pith-plugin-api = {{ path = \"{}\" }}", api.display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&m, text).unwrap();
    let so = build(&root.join("old-router"), "old_router");
    let pd = plugin_dir_with("api-v2-dir", &[("libold_router.so", &so)]);
    let (code, _, err) = pith(&["plugins", "list", "--plugin-dir", pd.to_str().unwrap()]);
    assert_eq!(code, 1);
    let line = pith_tests::one_line(&err);
    assert!(
        line.contains("libold_router.so")
            && line.contains("plugin-api 0.99.0")
            && line.contains(&format!("rebuild the plugin against plugin-api {ours}")),
        "{line}"
    );
}

#[test]
fn files_that_are_not_plugins_are_refused_in_one_line() {
    let dirs = [tmp("random"), tmp("short"), tmp("trunc")];
    let random = dirs[0].join("librandom.so");
    std::fs::write(&random, (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<u8>>())
        .unwrap();
    let bytes = std::fs::read(scaffolded_router()).unwrap();
    // Cut inside the loadable segments (the loader would SIGBUS) and inside the debug info.
    let (short, truncated) = (dirs[1].join("libshort.so"), dirs[2].join("libtrunc.so"));
    std::fs::write(&short, &bytes[..2000]).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    // Any real shared library that is not a Pith plugin: a C library we compile here.
    let c_dir = tmp("clib");
    std::fs::write(c_dir.join("x.c"), "int add(int a, int b) { return a + b; }\n").unwrap();
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(c_dir.join("libplain.so"))
        .arg(c_dir.join("x.c"))
        .status()
        .unwrap();
    assert!(st.success());
    for (file, expect) in [
        (&random, "not a loadable shared library"),
        (&truncated, "not a loadable shared library"),
        (&c_dir.join("libplain.so"), "not a Pith plugin"),
    ] {
        let pd = plugin_dir_with("bad", &[(file.file_name().unwrap().to_str().unwrap(), file)]);
        let (code, _, err) = pith(&["plugins", "list", "--plugin-dir", pd.to_str().unwrap()]);
        assert_eq!(code, 1, "{err}");
        let line = pith_tests::one_line(&err);
        assert!(line.contains(file.file_name().unwrap().to_str().unwrap()) && line.contains(expect), "{line}");
    }
}

#[test]
fn two_plugins_with_one_name_are_refused() {
    let so = scaffolded_router();
    let pd = plugin_dir_with("dup", &[("liba.so", so), ("libb.so", so)]);
    let (code, _, err) = pith(&["plugins", "list", "--plugin-dir", pd.to_str().unwrap()]);
    assert_eq!(code, 1);
    let line = pith_tests::one_line(&err);
    assert!(line.contains("test-router") && line.contains("liba.so") && line.contains("libb.so"), "{line}");
}

#[test]
fn panics_inside_a_plugin_are_reported_with_its_name() {
    let pd = plugin_dir_with("panic", &[("libpanicky.so", panicky_router())]);
    for place in ["create", "forward", "backward"] {
        let (code, out, err) = pith(&[
            "plugins",
            "check",
            "panicky",
            "--plugin-dir",
            pd.to_str().unwrap(),
            "--config",
            &format!("panic = \"{place}\""),
        ]);
        assert_eq!(code, 1, "{place}: {out}{err}");
        let line = pith_tests::one_line(&err);
        assert!(line.contains("panicky") && line.contains(&format!("boom in {place}")), "{place}: {line}");
    }
}

#[test]
fn config_errors_name_file_line_and_valid_choices() {
    let dir = tmp("cfgerr");
    let base = std::fs::read_to_string(Path::new(WORKSPACE).join("configs/quickstart.toml")).unwrap();
    let line_of = |text: &str, needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let cases = [
        (
            "unknown-plugin",
            base.replace("plugin = \"topk-softmax\"", "plugin = \"nope\""),
            "plugin = \"nope\"",
            "topk-softmax",
        ),
        ("plugin-key", base.replace("top_k = 2", "top_k = 2\ntopk = 3"), "topk = 3", "topk"),
        ("plugin-type", base.replace("top_k = 2", "top_k = \"two\""), "top_k = \"two\"", "top_k"),
        ("host-key", base.replace("hidden = 128", "hidden = 128\nhiden = 3"), "hiden = 3", "hiden"),
        ("host-type", base.replace("layers = 2", "layers = \"2\""), "layers = \"2\"", "layers"),
        ("top-k-too-big", base.replace("top_k = 2", "top_k = 9"), "top_k = 9", "top_k"),
    ];
    for (name, text, bad_line, mention) in cases {
        let f = dir.join(format!("{name}.toml"));
        std::fs::write(&f, &text).unwrap();
        let (code, _, err) = pith(&["plan", f.to_str().unwrap()]);
        assert_eq!(code, 1, "{name}: {err}");
        let line = pith_tests::one_line(&err);
        let want = format!("{}:{}", f.display(), line_of(&text, bad_line));
        assert!(line.contains(&want) && line.contains(mention), "{name}: expected {want} and `{mention}` in: {line}");
    }
}

/// A `.so` in a workspace's target/<profile>/ whose crate is gone from plugins/ is loaded with a
/// warning naming it; one whose crate is there loads quietly.
#[test]
fn a_library_left_by_a_removed_crate_is_named() {
    let so = scaffolded_router();
    let ws = tmp("stale-ws");
    let profile = ws.join("target/debug");
    std::fs::create_dir_all(&profile).unwrap();
    std::fs::create_dir_all(ws.join("plugins/test-router")).unwrap();
    std::fs::write(ws.join("plugins/test-router/Cargo.toml"), "[package]\nname = \"test-router\"\n").unwrap();
    std::fs::copy(so, profile.join("libtest_router.so")).unwrap();
    let list = || pith(&["--plugin-dir", profile.to_str().unwrap(), "plugins", "list"]);
    let (code, _, se) = list();
    assert!(code == 0 && !se.contains("no crate in"), "{se}");
    std::fs::rename(profile.join("libtest_router.so"), profile.join("libold_router.so")).unwrap();
    let (code, so_out, se) = list();
    assert_eq!(code, 0, "{se}");
    assert!(se.contains("libold_router.so: no crate in") && se.contains("builds it any more"), "{se}");
    assert!(so_out.contains("libold_router.so"), "still loaded: {so_out}");
}
