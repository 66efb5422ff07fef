//! `pith plan`: what a config resolves to before anything trains: every component with its
//! origin and source file, parameter counts per component (total and active per token),
//! training FLOPs per token and the memory a run needs. Nothing the size of the model is
//! allocated (any size plans, in u128): parameters are declared, not made; layer 0's components
//! stand for every layer's; the router is probed on one token at a small hidden size.

use crate::config::{human, mem_available, Config, MemEstimate, QkNorm};
use crate::cpu::{view, CpuOps};
use crate::model::Model;
use crate::params::{Param, Params, Shard};
use crate::registry::Registry;
use abi_stable::std_types::RSlice;
use pith_plugin_api::{abi::Component, Kind};
use std::collections::BTreeMap;
use std::fmt::Write;

/// The router probe's hidden size: top_k does not depend on it, and it keeps the probe's
/// weights (experts × hidden) small whatever the model's size.
const PROBE_HIDDEN: usize = 64;

/// Tokens the router probe routes.
const PROBE_TOKENS: usize = 16;

/// Experts per token (non-empty slots; a router may use fewer than its k), measured by running
/// layer 0's router on a few tokens.
fn measured_top_k(cfg: &Config, reg: &Registry) -> Result<f64, String> {
    let mut small = cfg.clone();
    small.model.hidden = cfg.model.hidden.min(PROBE_HIDDEN);
    let Component::Router(r) = crate::train::create(&small, reg, Kind::Router, 0, &cfg.router, (0, Shard::WHOLE))?
    else {
        unreachable!()
    };
    let specs = r.params().into_vec();
    let floats: u128 = specs.iter().map(|s| s.shape.iter().map(|&d| d as u128).product::<u128>()).sum();
    if floats > 1 << 26 {
        let at = cfg.at("model", 0, "experts");
        let e = cfg.model.experts;
        return Err(format!("{at}: model.experts = {e}: too many to probe the router ({floats} weights at hidden 64)"));
    }
    let mut p = Params::default();
    let range = p.add("probe", specs, 1);
    let (ops, h, t) = (CpuOps::default(), small.model.hidden, PROBE_TOKENS);
    let x: Vec<f32> = (0..t * h).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect();
    let out = r.forward(ops.ops(), RSlice::from_slice(&p.weights(range)), view(&x, &[t, h])).into_result()?;
    let used = out.ids.i32s().iter().filter(|&&id| id != pith_plugin_api::EMPTY).count();
    Ok(used as f64 / t as f64)
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
    let qk = match m.qk_norm {
        QkNorm::Head => "RMSNorm per head",
        QkNorm::Full => "RMSNorm over the projection",
        QkNorm::None => "none",
    };
    let bias = [(m.qkv_bias, ", q/k/v biases"), (m.o_bias, ", o bias"), (m.attn_sinks, ", a sink per head")];
    let mut bias: String = bias.iter().filter(|b| b.0).map(|b| b.1).collect();
    if m.sliding_window > 0 {
        let n = (0..m.layers).filter(|&l| m.window(l) > 0).count();
        bias += &format!(", a {}-key sliding window on {n} of {} layers", m.sliding_window, m.layers);
    }
    let rope = if m.rope_interleaved { "interleaved RoPE" } else { "RoPE" };
    let _ = match m.mla {
        None => writeln!(
            s,
            "attention: causal GQA, {} query heads / {} kv heads × head_dim {}, {rope} θ {}, qk-norm {qk}{bias}",
            m.heads, m.kv_heads, m.head_dim, m.rope_theta
        ),
        Some(a) => writeln!(
            s,
            "attention: causal MLA (latent kv {}, {}), {} heads × q·k {} ({} rotated) / value {}, {rope} θ {}",
            a.kv_rank,
            if a.q_rank == 0 { "q_proj".to_string() } else { format!("latent q {}", a.q_rank) },
            m.heads,
            m.head_dim,
            a.rope_dim,
            a.v_dim,
            m.rope_theta
        ),
    };
    if m.dense_layers > 0 {
        let (d, l) = (m.dense_layers, m.layers);
        let _ = writeln!(s, "layers: {d} dense (`[dense]`, FFN {}), then {} MoE", cfg.dense_ffn(), l - d);
    }
    let family = crate::hf::export_family(cfg).unwrap_or_else(|why| format!("none ({why})"));
    let _ = writeln!(s, "Hugging Face family (`pith export hf`): {family}");
    let _ = writeln!(s, "\ncomponents:");
    for (kind, section, i, table) in cfg.components() {
        let name = table.get("plugin").and_then(|v| v.as_str()).unwrap_or("?");
        let e = reg.find(kind, name).ok_or_else(|| {
            let valid = reg.names(kind).join(", ");
            format!("{}: unknown {} plugin `{name}`; valid: {valid}", cfg.at(section, i, "plugin"), kind.as_str())
        })?;
        let _ = writeln!(s, "  {section:<13} {:<14} {}  [{}]", name, e.origin, e.info.source);
    }
    let top_k = measured_top_k(cfg, reg)?;
    // One layer of each kind (dense, MoE), counted as many times as the model has it; seq_len 0
    // leaves the RoPE table empty.
    let mut one = cfg.clone();
    let dense = m.dense_layers.min(1);
    (one.model.layers, one.model.dense_layers, one.model.seq_len) = (1 + dense, dense, 0);
    let (moe, opt) = crate::train::components(&one, reg, Shard::WHOLE)?;
    let Component::Experts(one_layer_experts) =
        crate::train::create(&one, reg, Kind::Experts, 0, &cfg.experts, (0, Shard::WHOLE))?
    else {
        unreachable!()
    };
    let mut params = Params { shapes_only: true, ..Default::default() };
    Model::new(&one.model, &mut params, cfg.train.seed, moe, Shard::WHOLE)?;
    let (moe_layers, experts) = ((m.layers - m.dense_layers) as u128, m.experts as u128);
    let times = |name: &str| match name.strip_prefix("layers.") {
        Some(r) if dense == 1 && r.starts_with("0.") => m.dense_layers as u128,
        Some(_) => moe_layers,
        None => 1,
    };
    let numel = |p: &Param| {
        let n = p.spec.shape.iter().fold(1u128, |a, &d| a.saturating_mul(d as u128));
        n.saturating_mul(times(&p.name))
    };
    let active = |p: &Param, n: u128| match group(&p.name) == "moe.experts" {
        true => (n as f64 * top_k / experts as f64) as u128,
        false => n,
    };
    let (buffers, accumulators) =
        params.list.iter().filter(|p| !p.trained()).fold((0u128, 0u128), |a, p| match p.spec.role {
            pith_plugin_api::Role::Buffer => (a.0.saturating_add(numel(p)), a.1),
            _ => (a.0, a.1.saturating_add(numel(p))),
        });
    let mut groups: BTreeMap<String, (u128, u128)> = BTreeMap::new();
    for p in params.list.iter().filter(|p| p.trained()) {
        let n = numel(p);
        let e = groups.entry(group(&p.name)).or_default();
        (e.0, e.1) = (e.0.saturating_add(n), e.1.saturating_add(active(p, n)));
    }
    let _ = writeln!(s, "\nparameters (experts active: {top_k:.2} of {} per token, probed):", m.experts);
    let _ = writeln!(s, "  {:<16} {:>14} {:>14}", "group", "total", "active/token");
    for (g, (n, a)) in &groups {
        let _ = writeln!(s, "  {g:<16} {n:>14} {a:>14}");
    }
    let total = groups.values().fold(0u128, |a, v| a.saturating_add(v.0));
    let all_active = groups.values().fold(0u128, |a, v| a.saturating_add(v.1));
    let _ = writeln!(s, "  {:<16} {total:>14} {all_active:>14}", "all");
    if buffers + accumulators > 0 {
        let _ =
            writeln!(s, "  + {buffers} buffer and {accumulators} accumulator floats (components' state, no gradient)");
    }
    // Matmul params exclude the embedding lookup and the norm weights; the experts' FLOPs are
    // their own count (`Experts::flops`) at an even load of `top_k` experts per token.
    let dense = params.list.iter().filter(|p| p.trained() && p.spec.shape.len() >= 2 && !p.name.starts_with("embed"));
    let dense = dense.filter(|p| group(&p.name) != "moe.experts");
    let matmul = dense.fold(0u128, |a, p| a.saturating_add(numel(p)));
    let per_expert = (1e6 * top_k / experts as f64).round() as u64;
    let one_expert_layer = one_layer_experts.flops(RSlice::from_slice(&vec![per_expert; m.experts])) / 1e6;
    let experts_fwd = one_expert_layer * moe_layers as f64;
    let qk_v = m.head_dim + m.rope_v_dims().1;
    let attn = 3.0 * (m.heads * qk_v) as f64 * m.attention_span();
    let flops = 6.0 * matmul as f64 + 3.0 * experts_fwd + attn;
    let _ = writeln!(
        s,
        "\ntraining FLOPs/token: {:.4} GFLOP = 6 × {matmul} active dense matmul params + 3 × {experts_fwd:.0} experts \
         forward (the plugin's count) + 3 × heads × (q·k head + value head) × Σ_layers seq_len (a window in its place: {attn})",
        flops / 1e9
    );
    // Bytes per parameter: f32 weight, grad and optimizer state, and on CUDA a bf16 working copy;
    // with expert parallelism a rank holds 1/ep of the experts' share. With `shard_optimizer`
    // at parallel.dp = n, the state (and on CUDA the f32 master) of a tensor is on one of the
    // n·ep ranks that sum its gradient (n for an experts slice); the embedding stays everywhere.
    let (ep, dp) = (cfg.parallel.ep.max(1) as u128, cfg.parallel.dp as u128);
    let sharded = cfg.parallel.shard_optimizer && dp > 1;
    let experts = |p: &Param| group(&p.name) == "moe.experts";
    let owners = |p: &Param| match (sharded && !p.name.starts_with("embed"), experts(p)) {
        (false, _) => 1,
        (true, true) => dp,
        (true, false) => dp * ep,
    };
    let bytes = |gpu: bool| {
        params.list.iter().fold(0u128, |a, p| {
            // Bytes per element, times the owners `o` (to divide once): the grad (4) and, on
            // CUDA, the bf16 copy (2) on every rank; the master (4, on the CPU the weight on
            // every rank) and the state on one of `o`.
            let (state, o) = (4 * opt.1.state(p.name.as_str().into(), &p.spec).len() as u128, owners(p));
            let per_o = if gpu { 6 * o + 4 + state } else { 8 * o + state };
            let n = numel(p).saturating_mul(per_o) / o;
            a.saturating_add(n / if experts(p) { ep } else { 1 })
        })
    };
    let mib = |b: u128| b as f64 / (1 << 20) as f64;
    let mut at = Vec::new();
    if ep > 1 {
        at.push(format!("parallel.ep = {ep}"));
    }
    if sharded {
        at.push(format!("parallel.dp = {dp} with shard_optimizer"));
    }
    let ep = if at.is_empty() { String::new() } else { format!(" per rank at {}", at.join(", ")) };
    let _ = writeln!(s, "parameter memory{ep} (f32 weights, grads, `{}` state): {:.1} MiB", opt.0, mib(bytes(false)));
    if cfg.train.device == "cuda" {
        let _ = writeln!(
            s,
            "on CUDA: {:.1} MiB with the bf16 weight copies; activations come on top (`pith bench` measures the peak)",
            mib(bytes(true))
        );
    }
    let est = MemEstimate::per_rank(cfg, 16, true);
    let avail = mem_available();
    let fits = match avail {
        Some(a) if est.total() > a => "; does not fit here",
        _ => "",
    };
    let avail = avail.map_or("unknown".into(), human);
    let _ = writeln!(s, "CPU training step memory (estimate): {}; {avail} available here{fits}", est.summary());
    Ok(s)
}
