//! `pith plugins new`: a new plugin crate from `plugin-api/templates/<kind>/`. The templates are
//! compiled into the binary, so scaffolding works from any directory. The crate's plugin-api
//! dependency is the Pith checkout it sits in (a relative path), else the checkout this pith was
//! built from (an absolute path), else a placeholder with a note saying what to set.

use pith_plugin_api::Kind;
use std::path::{Path, PathBuf};

/// The crate manifest shared by every kind, and each kind's `src/lib.rs` (`Kind::Shared` is the
/// experts template registered as a shared expert).
const MANIFEST: &str = include_str!("../../plugin-api/templates/Cargo.toml");
const TEMPLATES: [(Kind, &str); 5] = [
    (Kind::Router, include_str!("../../plugin-api/templates/router/src/lib.rs")),
    (Kind::Experts, include_str!("../../plugin-api/templates/experts/src/lib.rs")),
    (Kind::BalanceLoss, include_str!("../../plugin-api/templates/balance_loss/src/lib.rs")),
    (Kind::Optimizer, include_str!("../../plugin-api/templates/optimizer/src/lib.rs")),
    (Kind::CommSchedule, include_str!("../../plugin-api/templates/comm/src/lib.rs")),
];

/// The plugin-api crate this pith was built from (it may since have moved or gone).
fn built_from() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-api");
    p.canonicalize().unwrap_or(p)
}

/// Where a new crate's `pith-plugin-api` dependency points, and why.
#[derive(Debug, PartialEq)]
struct ApiDep {
    path: String,
    /// The manifest's comment above the dependency.
    note: String,
    /// No plugin-api was found: `path` is a placeholder the user must set.
    missing: bool,
    /// The crate is in a Pith checkout but not among its workspace's members, so it needs a
    /// `[workspace]` of its own (cargo refuses to build it otherwise).
    own_workspace: bool,
}

/// The dependency for a crate at `crate_dir` (absolute, canonical) when pith was built from the
/// plugin-api at `built_from`.
fn api_dep(crate_dir: &Path, built_from: &Path) -> ApiDep {
    if let Some((root, members)) = checkout_of(crate_dir) {
        let rel = crate_dir.strip_prefix(&root).expect("a checkout is an ancestor");
        let own_workspace = !members.iter().any(|m| match m.strip_suffix("/*") {
            Some(parent) => rel.parent() == Some(Path::new(parent)),
            None => rel == Path::new(m),
        });
        return ApiDep {
            path: format!("{}plugin-api", "../".repeat(rel.components().count())),
            note: format!("plugin-api of the Pith checkout this crate is in ({})", root.display()),
            missing: false,
            own_workspace,
        };
    }
    if built_from.join("Cargo.toml").is_file() {
        let note = "plugin-api of the Pith checkout `pith` was built from".to_string();
        return ApiDep { path: built_from.display().to_string(), note, missing: false, own_workspace: false };
    }
    let note = format!(
        "NOT FOUND: pith was built from {}, which is gone. Set `path` to the plugin-api/ folder of a Pith \
         checkout of plugin-api {}",
        built_from.display(),
        pith_plugin_api::VERSION
    );
    ApiDep { path: "/path/to/pith/plugin-api".into(), note, missing: true, own_workspace: false }
}

/// The Pith checkout `dir` is in: the nearest ancestor whose Cargo.toml has a `[workspace]` and
/// which holds plugin-api/; with its workspace's `members`.
fn checkout_of(dir: &Path) -> Option<(PathBuf, Vec<String>)> {
    dir.ancestors().find_map(|a| {
        let manifest: toml::Table = std::fs::read_to_string(a.join("Cargo.toml")).ok()?.parse().ok()?;
        let ws = manifest.get("workspace")?;
        let members = ws.get("members").and_then(|m| m.as_array()).cloned().unwrap_or_default();
        let members = members.iter().filter_map(|m| m.as_str().map(|s| s.trim_end_matches('/').to_string()));
        a.join("plugin-api/Cargo.toml").is_file().then(|| (a.to_path_buf(), members.collect()))
    })
}

/// Create `<dir>/<name>/` as a plugin crate of `kind`; returns the crate directory. Says on
/// stdout when the plugin-api dependency must be set by hand.
pub fn new_plugin(kind: Kind, name: &str, dir: &Path) -> Result<PathBuf, String> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        return Err(format!("plugin name `{name}`: use lowercase letters, digits and '-', starting with a letter"));
    }
    let out = dir.join(name);
    if out.exists() {
        return Err(format!("{} already exists; choose another name or remove it", out.display()));
    }
    std::fs::create_dir_all(out.join("src")).map_err(|e| format!("{}: {e}", out.display()))?;
    let crate_dir = out.canonicalize().map_err(|e| format!("{}: {e}", out.display()))?;
    let dep = api_dep(&crate_dir, &built_from());
    let mut manifest = MANIFEST.replace("{{api_note}}", &dep.note).replace("{{api_path}}", &dep.path);
    if dep.own_workspace {
        manifest += "\n# Not a member of the Pith workspace around it: a workspace of its own.\n[workspace]\n";
    }
    let fill = |t: &str| t.replace("{{name}}", name).replace("{{crate}}", &name.replace('-', "_"));
    for (rel, text) in [("Cargo.toml", fill(&manifest)), ("src/lib.rs", fill(&lib_template(kind)))] {
        let path = out.join(rel);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if dep.missing {
        println!("note: no Pith checkout found for the plugin-api dependency: {}", dep.note);
        println!("      edit {} (`pith-plugin-api = {{ path = ... }}`)", out.join("Cargo.toml").display());
    }
    Ok(out)
}

/// The `src/lib.rs` template of `kind`.
fn lib_template(kind: Kind) -> String {
    let of = |k: Kind| TEMPLATES.iter().find(|(t, _)| *t == k).map(|(_, t)| t.to_string()).expect("a template");
    match kind {
        Kind::Shared => of(Kind::Experts)
            .replace("register!(\n    Experts,", "register!(\n    Shared,")
            .replace("an experts plugin", "a shared-expert plugin")
            .replace("--kind experts", "--kind shared")
            .replace("[experts]", "[shared]"),
        k => of(k),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pith-scaffold-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.canonicalize().unwrap()
    }

    /// A fake Pith checkout: a workspace with plugins/* as members, and plugin-api/.
    fn checkout(name: &str) -> PathBuf {
        let root = tmp(name);
        std::fs::write(root.join("Cargo.toml"), "[workspace]\nmembers = [\"host\", \"plugins/*\"]\n").unwrap();
        std::fs::create_dir_all(root.join("plugin-api")).unwrap();
        std::fs::write(root.join("plugin-api/Cargo.toml"), "[package]\n").unwrap();
        root
    }

    #[test]
    fn api_path_is_relative_in_a_checkout_else_the_build_checkout_else_a_note() {
        let root = checkout("ws");
        let gone = root.join("gone/plugin-api");
        let dep = api_dep(&root.join("plugins/mine"), &gone);
        assert_eq!((dep.path.as_str(), dep.missing, dep.own_workspace), ("../../plugin-api", false, false));
        let dep = api_dep(&root.join("target/x/mine"), &gone);
        assert_eq!((dep.path.as_str(), dep.own_workspace), ("../../../plugin-api", true), "not a member");
        // A [workspace] without plugin-api/ is not a Pith checkout.
        let other = tmp("other");
        std::fs::write(other.join("Cargo.toml"), "[workspace]\nmembers = [\"*\"]\n").unwrap();
        let built = root.join("plugin-api");
        let dep = api_dep(&other.join("mine"), &built);
        assert_eq!((dep.path, dep.missing, dep.own_workspace), (built.display().to_string(), false, false));
        let dep = api_dep(&other.join("mine"), &gone);
        assert!(dep.missing && dep.note.contains(&gone.display().to_string()) && dep.note.contains("Set `path`"));
    }

    #[test]
    fn new_plugin_writes_every_kind_with_a_dependency_that_resolves() {
        let root = checkout("new");
        for kind in Kind::ALL {
            let name = format!("my-{}", kind.as_str().replace('_', "-"));
            let out = new_plugin(kind, &name, &root.join("plugins")).unwrap();
            let manifest = std::fs::read_to_string(out.join("Cargo.toml")).unwrap();
            let lib = std::fs::read_to_string(out.join("src/lib.rs")).unwrap();
            assert!(manifest.contains("pith-plugin-api = { path = \"../../plugin-api\" }"), "{manifest}");
            assert!(!manifest.contains("[workspace]") && !(manifest.clone() + &lib).contains("{{"), "{kind:?}");
            assert!(lib.contains(&format!("register!(\n    {kind:?},")), "{kind:?} is registered as such");
        }
        let out = new_plugin(Kind::Router, "loose", &root.join("elsewhere")).unwrap();
        let manifest = std::fs::read_to_string(out.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("path = \"../../plugin-api\"") && manifest.ends_with("[workspace]\n"), "{manifest}");
        assert!(new_plugin(Kind::Router, "loose", &root.join("elsewhere")).unwrap_err().contains("already exists"));
        assert!(new_plugin(Kind::Router, "Bad_Name", &root).unwrap_err().contains("lowercase"));
    }
}
