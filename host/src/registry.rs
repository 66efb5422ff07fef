//! The plugin registry: the built-in pack (linked statically) and every `*.so` in the plugin
//! directories, each loaded on its own through the same root-module path. A loaded component
//! with a built-in's (kind, name) replaces it, and `pith plugins list` says so.

use abi_stable::library::{lib_header_from_path, LibraryError};
use abi_stable::std_types::{RStr, RString};
use pith_plugin_api::abi::{Component, LogFn, PluginMod_Ref};
use pith_plugin_api::{ComponentInfo, Kind, ModelDims};
use std::path::{Path, PathBuf};

/// Where a component comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    BuiltIn(String),
    File(PathBuf),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::BuiltIn(pack) => write!(f, "built-in ({pack})"),
            Origin::File(p) => write!(f, "{}", p.display()),
        }
    }
}

pub struct Entry {
    pub info: ComponentInfo,
    pub origin: Origin,
    /// Set when this loaded component replaced a built-in one of the same (kind, name).
    pub replaced: Option<Origin>,
    module: PluginMod_Ref,
}

#[derive(Default)]
pub struct Registry {
    pub entries: Vec<Entry>,
}

/// The plugin directories in search order: `--plugin-dir`s, then `PITH_PLUGIN_PATH`
/// (colon-separated), then the directory holding the `pith` executable.
pub fn plugin_dirs(cli_dirs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    for d in cli_dirs {
        std::fs::read_dir(d).map_err(|e| format!("--plugin-dir {}: not a readable directory ({e})", d.display()))?;
    }
    let mut dirs = cli_dirs.to_vec();
    if let Ok(p) = std::env::var("PITH_PLUGIN_PATH") {
        for d in std::env::split_paths(&p).filter(|d| !d.as_os_str().is_empty()) {
            if let Err(e) = std::fs::read_dir(&d) {
                tracing::warn!("PITH_PLUGIN_PATH: skipping {}: {e}", d.display());
            }
            dirs.push(d);
        }
    }
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        dirs.push(exe_dir);
    }
    Ok(dirs)
}

extern "C" fn host_log(level: u8, target: RString, msg: RString) {
    let (t, m) = (target.as_str(), msg.as_str());
    match level {
        1 => tracing::error!(plugin = t, "{m}"),
        2 => tracing::warn!(plugin = t, "{m}"),
        3 => tracing::info!(plugin = t, "{m}"),
        4 => tracing::debug!(plugin = t, "{m}"),
        _ => tracing::trace!(plugin = t, "{m}"),
    }
}

/// The one-line reason a library can't be used, and what to do about it.
fn load_error(path: &Path, e: LibraryError) -> String {
    let p = path.display();
    tracing::debug!("{p}: {e}");
    let api = pith_plugin_api::VERSION;
    match e {
        LibraryError::OpenError { err, .. } => {
            let why = err.to_string();
            let why = why.rsplit(": ").next().unwrap_or(&why).to_string();
            format!("{p}: not a loadable shared library ({why}); remove it from the plugin directory")
        }
        LibraryError::GetSymbolError { .. } => format!(
            "{p}: not a Pith plugin (it exports no Pith root module); remove it from the plugin \
             directory, or build it with pith_plugin_api::export_plugin!"
        ),
        LibraryError::AbiInstability(_) | LibraryError::InvalidAbiHeader(_) | LibraryError::InvalidCAbi { .. } => {
            format!(
                "{p}: its plugin-api types differ from this pith's (incompatible layout); rebuild the \
             plugin against plugin-api {api}"
            )
        }
        other => format!("{p}: cannot load plugin: {}", other.to_string().lines().next().unwrap_or("")),
    }
}

/// A `lib<name>.so` in a cargo build directory (`<workspace>/target/<profile>/`) whose crate is
/// no longer among `<workspace>/plugins/*`: left behind by a removed or renamed crate, it would
/// otherwise still be loaded without a word.
fn stale(so: &Path) -> Option<String> {
    let profile = so.parent()?;
    let workspace = profile.parent().filter(|t| t.file_name().is_some_and(|n| n == "target"))?.parent()?;
    let stem = so.file_stem()?.to_str()?.strip_prefix("lib")?;
    let crates = std::fs::read_dir(workspace.join("plugins")).ok()?;
    let named = |toml: &str| {
        let t: toml::Table = toml.parse().ok()?;
        let lib = t.get("lib").and_then(|l| l.get("name")).and_then(|n| n.as_str()).map(str::to_string);
        let package =
            t.get("package").and_then(|p| p.get("name")).and_then(|n| n.as_str()).map(|n| n.replace('-', "_"));
        lib.or(package)
    };
    let found = crates
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("Cargo.toml")).ok())
        .any(|t| named(&t).as_deref() == Some(stem));
    (!found).then(|| {
        format!(
            "{}: no crate in {} builds it any more (a removed or renamed plugin?); loading it anyway — delete the file if it is stale",
            so.display(),
            workspace.join("plugins").display()
        )
    })
}

/// Refuse a file whose ELF headers point past its end: the dynamic loader would map it and
/// the process would die of SIGBUS on first access (a truncated copy, an interrupted download).
fn check_elf(path: &Path) -> Result<(), String> {
    let b = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = |why: String| {
        Err(format!("{}: not a loadable shared library ({why}); remove it from the plugin directory", path.display()))
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return bad("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let len = b.len() as u64;
    let (phoff, phsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    let (shoff, shsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    if phoff + phsize * phnum > len || shoff + shsize * shnum > len || phsize < 56 {
        return bad(format!("truncated: headers end past the file's {len} bytes"));
    }
    for i in 0..phnum {
        let h = (phoff + i * phsize) as usize;
        let end = u64_at(h + 8).saturating_add(u64_at(h + 32));
        if end > len {
            return bad(format!("truncated: a segment ends at byte {end}, the file has {len}"));
        }
    }
    Ok(())
}

impl Registry {
    /// The built-in pack plus every `*.so` in `dirs`.
    pub fn load(dirs: &[PathBuf]) -> Result<Registry, String> {
        let mut r = Registry::default();
        r.add_module(pith_std::pith_root_module(), None)?;
        let mut files = Vec::new();
        for dir in dirs {
            let Ok(read) = std::fs::read_dir(dir) else { continue };
            let mut here: Vec<PathBuf> = read
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "so") && p.is_file())
                .collect();
            here.sort();
            files.extend(here);
        }
        files.dedup();
        for f in files {
            if let Some(w) = stale(&f) {
                tracing::warn!("{w}");
            }
            r.load_file(&f)?;
        }
        Ok(r)
    }

    /// Load one library and register its components.
    pub fn load_file(&mut self, path: &Path) -> Result<(), String> {
        check_elf(path)?;
        let header = lib_header_from_path(path).map_err(|e| load_error(path, e))?;
        // Semver: 0.x plugins must match the minor version, others the major one.
        let theirs = header.version_strings().version.to_string();
        let series = |v: &str| {
            let p: Vec<&str> = v.split('.').collect();
            if p[0] == "0" {
                format!("0.{}", p.get(1).unwrap_or(&""))
            } else {
                p[0].to_string()
            }
        };
        let ours = pith_plugin_api::VERSION;
        if series(&theirs) != series(ours) {
            return Err(format!(
                "{}: built against plugin-api {theirs}, this pith uses {ours}; rebuild the plugin against plugin-api {}",
                path.display(),
                series(ours)
            ));
        }
        let module = header.init_root_module::<PluginMod_Ref>().map_err(|e| load_error(path, e))?;
        (module.set_logger())(LogFn { log: host_log });
        self.add_module(module, Some(path))
    }

    fn add_module(&mut self, module: PluginMod_Ref, path: Option<&Path>) -> Result<(), String> {
        let origin = match path {
            Some(p) => Origin::File(p.to_path_buf()),
            None => Origin::BuiltIn((module.pack())().to_string()),
        };
        for info in (module.components())() {
            let existing = self.entries.iter().position(|e| e.info.kind == info.kind && e.info.name == info.name);
            let mut replaced = None;
            if let Some(i) = existing {
                let old = &self.entries[i].origin;
                if !matches!(old, Origin::BuiltIn(_)) {
                    return Err(format!(
                        "{} `{}` is provided by both {old} and {origin}; remove one of them from the plugin directories",
                        info.kind.as_str(),
                        info.name
                    ));
                }
                replaced = Some(self.entries.remove(i).origin);
                tracing::info!("{} `{}` from {origin} replaces the built-in one", info.kind.as_str(), info.name);
            }
            self.entries.push(Entry { info, origin: origin.clone(), replaced, module });
        }
        Ok(())
    }

    pub fn find(&self, kind: Kind, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.info.kind == kind && e.info.name == name)
    }

    /// Every component named `name`, of any kind.
    pub fn find_any(&self, name: &str) -> Vec<&Entry> {
        self.entries.iter().filter(|e| e.info.name == name).collect()
    }

    pub fn names(&self, kind: Kind) -> Vec<String> {
        let mut v: Vec<String> =
            self.entries.iter().filter(|e| e.info.kind == kind).map(|e| e.info.name.to_string()).collect();
        v.sort();
        v
    }

    /// Build component (kind, name) from its TOML text (the table without `plugin`).
    pub fn create(&self, kind: Kind, name: &str, config: &str, dims: ModelDims) -> Result<Component, String> {
        let e = self.find(kind, name).ok_or_else(|| {
            format!("unknown {} plugin `{name}`; valid: {}", kind.as_str(), self.names(kind).join(", "))
        })?;
        (e.module.create())(kind, RStr::from_str(name), RStr::from_str(config), dims)
            .into_result()
            .map_err(|m| format!("{} `{name}` ({}): {m}", kind.as_str(), e.origin))
    }

    /// The settings component (kind, name) reports for this TOML text, every default filled in
    /// (TOML lines; empty when it reports none).
    pub fn settings(&self, kind: Kind, name: &str, config: &str, dims: ModelDims) -> Result<String, String> {
        let e = self.find(kind, name).ok_or_else(|| format!("unknown {} plugin `{name}`", kind.as_str()))?;
        (e.module.settings())(kind, RStr::from_str(name), RStr::from_str(config), dims)
            .into_result()
            .map(|s| s.into())
            .map_err(|m| format!("{} `{name}` ({}): {m}", kind.as_str(), e.origin))
    }
}
