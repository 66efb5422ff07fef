//! Every template as a user gets it: `pith plugins new`, then the new crate's own `cargo test`
//! (its unit test runs the component on `pith_plugin_api::kit::TestHost`), both outside the
//! workspace (plugin-api by the absolute path of this checkout) and inside the checkout but
//! outside the workspace's members (by a relative path, in a workspace of its own).
//!
//! The crates build into target/plugin-tests (shared with plugins.rs: dependencies build once).

use std::path::{Path, PathBuf};
use std::process::Command;

use pith_tests::{pith, WORKSPACE};

/// Scaffold `kind` as `name` in `dir`; returns the crate directory and its Cargo.toml.
fn scaffold(kind: &str, name: &str, dir: &Path) -> (PathBuf, String) {
    let (code, out, err) = pith(&["plugins", "new", "--kind", kind, "--name", name, "--dir", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{kind}: {out}{err}");
    let krate = dir.join(name);
    let manifest = std::fs::read_to_string(krate.join("Cargo.toml")).unwrap();
    (krate, manifest)
}

/// `cargo test` of the crate at `dir` passes, running its one unit test.
fn cargo_test_passes(dir: &Path) {
    let o = Command::new(env!("CARGO"))
        .args(["test", "--quiet", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", Path::new(WORKSPACE).join("target/plugin-tests"))
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && out.contains("test result: ok. 1 passed"), "{}:\n{out}{err}", dir.display());
}

#[test]
fn every_template_scaffolded_outside_the_workspace_passes_its_own_tests() {
    let dir = pith_tests::tmp("templates-outside");
    let api = Path::new(WORKSPACE).join("plugin-api").canonicalize().unwrap();
    for kind in ["router", "experts", "shared", "balance_loss", "optimizer", "comm"] {
        let (krate, manifest) = scaffold(kind, &format!("my-{}", kind.replace('_', "-")), &dir);
        assert!(manifest.contains(&format!("pith-plugin-api = {{ path = \"{}\" }}", api.display())), "{manifest}");
        cargo_test_passes(&krate);
    }
}

#[test]
fn a_template_scaffolded_inside_the_checkout_uses_a_relative_path() {
    let dir = Path::new(WORKSPACE).join(format!("target/plugin-tests/scaffold-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (krate, manifest) = scaffold("router", "inside", &dir);
    // target/plugin-tests/scaffold-N/inside: four levels below the checkout, not a member.
    assert!(manifest.contains("pith-plugin-api = { path = \"../../../../plugin-api\" }"), "{manifest}");
    assert!(manifest.contains("\n[workspace]\n"), "{manifest}");
    cargo_test_passes(&krate);
    std::fs::remove_dir_all(&dir).unwrap();
}
