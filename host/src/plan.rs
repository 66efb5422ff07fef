//! `pith plan`: what a config resolves to before anything trains: every component with its
//! origin and source file, parameter counts per component (total and active per token) and
//! training FLOPs per token.

use crate::config::Config;
use crate::cpu::{view, CpuOps};
use crate::model::Model;
use crate::params::Params;
use crate::registry::Registry;
use abi_stable::std_types::RSlice;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Experts per token, measured by running layer 0's router on one token.
fn measured_top_k(cfg: &Config, reg: &Registry) -> Result<usize, String> {
    let pith_plugin_api::abi::Component::Router(r) =
        crate::train::create(cfg, reg, pith_plugin_api::Kind::Router, 0, &cfg.router, 0)?
    else {
        unreachable!()
    };
    let mut p = Params::default();
    let range = p.add("probe", r.params().into_vec(), 1);
    let ops = CpuOps::default();
    let x: Vec<f32> = (0..cfg.model.hidden).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect();
    let out =
        r.forward(ops.ops(), RSlice::from_slice(&p.weights(range)), view(&x, &[1, cfg.model.hidden])).into_result()?;
    Ok(out.ids.dim(1))
}

/// Group key of a parameter name: `layers.3.moe.experts.w_up` → `moe.experts`.
fn group(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let rest = if parts[0] == "layers" { &parts[2..] } else { &parts[..] };
    let take = if rest[0] == "moe" { 2 } else { 1 };
    rest[..take.min(rest.len() - 1).max(1)].join(".")
}

pub fn plan(cfg: &Config, reg: &Registry) -> Result<String, String> {
    let m = &cfg.model;
    let mut s = String::new();
    let _ = writeln!(s, "config: {}", cfg.source.file);
    let _ = writeln!(s, "\ncomponents:");
    for (kind, i, table) in cfg.components() {
        let name = table.get("plugin").and_then(|v| v.as_str()).unwrap_or("?");
        let e = reg.find(kind, name).ok_or_else(|| {
            let valid = reg.names(kind).join(", ");
            format!("{}: unknown {} plugin `{name}`; valid: {valid}", cfg.at(kind.as_str(), i, "plugin"), kind.as_str())
        })?;
        let _ = writeln!(s, "  {:<13} {:<14} {}  [{}]", kind.as_str(), name, e.origin, e.info.source);
    }
    let top_k = measured_top_k(cfg, reg)?;
    let (moe, opt) = crate::train::components(cfg, reg)?;
    let mut params = Params { shapes_only: true, ..Default::default() };
    Model::new(m, &mut params, cfg.train.seed, moe)?;
    let mut groups: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for p in &params.list {
        let n = p.spec.numel();
        let g = group(&p.name);
        let active = if g == "moe.experts" { n * top_k / m.experts } else { n };
        let e = groups.entry(g).or_default();
        e.0 += n;
        e.1 += active;
    }
    let _ = writeln!(s, "\nparameters (experts active: top-{top_k} of {}):", m.experts);
    let _ = writeln!(s, "  {:<16} {:>14} {:>14}", "group", "total", "active/token");
    for (g, (n, a)) in &groups {
        let _ = writeln!(s, "  {g:<16} {n:>14} {a:>14}");
    }
    let total: usize = groups.values().map(|v| v.0).sum();
    let active: usize = groups.values().map(|v| v.1).sum();
    let _ = writeln!(s, "  {:<16} {total:>14} {active:>14}", "all");
    // Matmul params exclude the embedding lookup and the norm weights.
    let matmul: usize = params
        .list
        .iter()
        .filter(|p| p.spec.shape.len() >= 2 && !p.name.starts_with("embed"))
        .map(|p| if group(&p.name) == "moe.experts" { p.spec.numel() * top_k / m.experts } else { p.spec.numel() })
        .sum();
    let attn = 6 * m.layers * m.heads * m.head_dim * m.seq_len;
    let flops = 6 * matmul + attn;
    let _ = writeln!(
        s,
        "\ntraining FLOPs/token: {:.4} GFLOP = 6 × {matmul} active matmul params + 6 × layers × heads × head_dim × seq_len ({attn})",
        flops as f64 / 1e9
    );
    let bytes: usize = params.list.iter().map(|p| p.spec.numel() * 4 * (2 + opt.1.state(&p.spec).len())).sum();
    let _ = writeln!(
        s,
        "parameter memory (f32 weights, grads, `{}` state): {:.1} MiB",
        opt.0,
        bytes as f64 / (1 << 20) as f64
    );
    if cfg.train.device == "cuda" {
        // The GPU adds a bf16 working copy of every weight (2 B) to the f32 weights, grads, state.
        let gpu = bytes + params.list.iter().map(|p| p.spec.numel() * 2).sum::<usize>();
        let _ = writeln!(
            s,
            "on CUDA: {:.1} MiB with the bf16 weight copies; activations come on top (`pith bench` measures the peak)",
            gpu as f64 / (1 << 20) as f64
        );
    }
    Ok(s)
}
