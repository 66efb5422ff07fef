//! `pith plugins new`: a new plugin crate from `plugin-api/templates/<kind>/`. The templates are
//! compiled into the binary, so scaffolding works from any directory.

use pith_plugin_api::Kind;
use std::path::{Path, PathBuf};

/// The crate manifest shared by every kind, and each kind's `src/lib.rs`.
const MANIFEST: &str = include_str!("../../plugin-api/templates/Cargo.toml");
const TEMPLATES: [(Kind, &str); 5] = [
    (Kind::Router, include_str!("../../plugin-api/templates/router/src/lib.rs")),
    (Kind::Experts, include_str!("../../plugin-api/templates/experts/src/lib.rs")),
    (Kind::BalanceLoss, include_str!("../../plugin-api/templates/balance_loss/src/lib.rs")),
    (Kind::Optimizer, include_str!("../../plugin-api/templates/optimizer/src/lib.rs")),
    (Kind::CommSchedule, include_str!("../../plugin-api/templates/comm/src/lib.rs")),
];

/// The plugin-api crate this pith was built from.
fn api_dir() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-api");
    p.canonicalize().unwrap_or(p)
}

/// Create `<dir>/<name>/` as a plugin crate of `kind`; returns the crate directory.
pub fn new_plugin(kind: Kind, name: &str, dir: &Path) -> Result<PathBuf, String> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        return Err(format!("plugin name `{name}`: use lowercase letters, digits and '-', starting with a letter"));
    }
    let lib = TEMPLATES.iter().find(|(k, _)| *k == kind).map(|(_, t)| *t).expect("a template per kind");
    let out = dir.join(name);
    if out.exists() {
        return Err(format!("{} already exists; choose another name or remove it", out.display()));
    }
    // Inside this repo's plugins/ a relative path keeps the workspace relocatable.
    let api = api_dir();
    let dir_abs = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let api_path = if api.parent().map(|r| r.join("plugins")) == Some(dir_abs) {
        "../../plugin-api".to_string()
    } else {
        api.display().to_string()
    };
    let crate_name = name.replace('-', "_");
    for (rel, text) in [("Cargo.toml", MANIFEST), ("src/lib.rs", lib)] {
        let path = out.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).map_err(|e| format!("{}: {e}", path.display()))?;
        let text = text.replace("{{name}}", name).replace("{{crate}}", &crate_name).replace("{{api_path}}", &api_path);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(out)
}
