//! What a run says about itself: the block printed before step 1 (the model, each component and
//! where it comes from, devices and ranks, tokens, memory, where the outputs go) and
//! `summary.json` with the line that ends the run.

use crate::config::{human, Config, MemEstimate};
use crate::data::Synthetic;
use crate::params::Params;
use crate::registry::Registry;
use std::fmt::Write;
use std::path::Path;

/// The start-of-run block: one `key: value` line each, for people and for logs.
pub fn header(cfg: &Config, reg: &Registry, params: &Params, ranks: usize, out: &Path) -> String {
    let (m, t) = (&cfg.model, &cfg.train);
    let mut s = format!("pith train {} → {}\n", cfg.source.file, out.display());
    let embedding = 2 * m.vocab * m.hidden;
    let dense = if m.dense_layers > 0 { format!(" ({} dense)", m.dense_layers) } else { String::new() };
    let heads = if m.mla.is_some() { "MLA".to_string() } else { format!("{} kv", m.kv_heads) };
    let _ = writeln!(
        s,
        "  model       {} layers{dense}, hidden {}, {} heads ({heads}), {} experts × ffn {}, vocab {}, seq {}: {} parameters ({} outside the embeddings)",
        m.layers,
        m.hidden,
        m.heads,
        m.experts,
        m.expert_ffn,
        m.vocab,
        m.seq_len,
        count(params.count()),
        count(params.count().saturating_sub(embedding))
    );
    for (kind, section, _, table) in cfg.components() {
        let name = table.get("plugin").and_then(|v| v.as_str()).unwrap_or("?");
        let origin = reg.find(kind, name).map_or("?".to_string(), |e| e.origin.to_string());
        let _ = writeln!(s, "  {section:<11} {name} ({origin})");
    }
    let device = match (t.device.as_str(), ranks) {
        ("cuda", 1) => "cuda (1 GPU)".to_string(),
        ("cuda", n) => format!("cuda ({n} GPUs, data parallel)"),
        (_, 1) => format!("cpu ({} threads)", rayon::current_num_threads()),
        (_, n) => format!("cpu ({n} ranks, data parallel)"),
    };
    let _ = writeln!(s, "  device      {device}");
    let per_step = t.micro_batch * m.seq_len * t.grad_accum;
    let _ = writeln!(
        s,
        "  tokens      {per_step} per step (micro_batch {} × seq {} × grad_accum {}), {} steps: {}",
        t.micro_batch,
        m.seq_len,
        t.grad_accum,
        t.steps,
        count(per_step * t.steps as usize)
    );
    let cpu = t.device == "cpu";
    let mem = MemEstimate::per_rank(cfg, if cpu { 16 } else { 18 }, cpu);
    let _ = writeln!(
        s,
        "  memory      {} ({})",
        human(mem.total()),
        if cpu { "a CPU step" } else { "parameters and optimizer state per GPU" }
    );
    let ckpt = match t.checkpoint_every {
        0 => "at the end".to_string(),
        n => format!("every {n} steps"),
    };
    let o = out.display();
    let _ = write!(s, "  outputs     {o}/metrics.jsonl, {o}/checkpoints/ ({ckpt}), {o}/summary.json");
    s
}

/// `1.23M`, `45.6K`, `789`.
fn count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// How a run ended, as `summary.json` holds it.
pub struct Outcome {
    /// The run's steps and tokens so far (a resumed run's included).
    pub steps: u64,
    pub tokens: u64,
    /// This process's training time and speed.
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub loss: f32,
    pub val_loss: Option<f32>,
    pub interrupted: Option<i32>,
}

/// Write `<out>/summary.json` and return the line that ends the run: loss, val loss, tokens and
/// time, and for the synthetic corpus how far the loss is from its known floor.
pub fn finish(cfg: &Config, out: &Path, o: &Outcome) -> Result<String, String> {
    let reached = o.val_loss.unwrap_or(o.loss) as f64;
    let mut j = serde_json::json!({
        "steps": o.steps, "tokens": o.tokens, "seconds": o.seconds, "tokens_per_s": o.tokens_per_s,
        "loss": o.loss, "val_loss": o.val_loss, "config": cfg.source.file, "data": cfg.data.source,
    });
    let val = o.val_loss.map(|v| format!(", val {v:.4}")).unwrap_or_default();
    let mut line = format!(
        "done: {} steps, {} tokens; trained {:.1} s at {:.1}K tokens/s; loss {:.4}{val}",
        o.steps,
        count(o.tokens as usize),
        o.seconds,
        o.tokens_per_s / 1e3,
        o.loss
    );
    if let Some(sig) = o.interrupted {
        j["interrupted_by_signal"] = sig.into();
    }
    if cfg.data.source == "synthetic" && reached.is_finite() {
        let s = Synthetic::new(cfg.model.vocab, cfg.train.seed);
        let (uni, floor) = (s.unigram_entropy(), s.entropy_floor());
        let share = 100.0 * (uni - reached) / (uni - floor);
        (j["unigram_entropy"], j["entropy_floor"], j["above_floor"]) =
            (uni.into(), floor.into(), (reached - floor).into());
        let which = if o.val_loss.is_some() { "val" } else { "train" };
        line += &format!(
            "\n      {reached:.4} nats/token ({which}); unigram entropy {uni:.4}, known floor {floor:.4}: {share:.0}% of the way from unigram to floor, {:.4} above the floor",
            reached - floor
        );
    }
    let path = out.join("summary.json");
    std::fs::write(&path, format!("{j:#}\n")).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(line)
}
