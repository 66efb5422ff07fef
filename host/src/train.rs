//! The training loop: micro-batches with gradient accumulation, LR warmup then cosine/WSD decay,
//! global-norm clipping, the optimizer plugin, periodic eval, checkpoints and `--resume`, one
//! metrics JSON line per step (`<out>/metrics.jsonl`) and a console line every few steps.

use crate::checkpoint::{self, TrainerState};
use crate::config::{ComponentTable, Config};
use crate::cpu::{view, view_mut, CpuOps};
use crate::data::{Dataset, Split, Synthetic};
use crate::model::{Model, MoeComponents};
use crate::params::Params;
use crate::registry::Registry;
use crate::trace::RoutingTrace;
use abi_stable::std_types::RSlice;
use pith_plugin_api::abi::{Component, OptimizerBox};
use pith_plugin_api::Kind;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Build one component from its config table; errors point at file:line.
pub fn create(
    cfg: &Config,
    reg: &Registry,
    kind: Kind,
    n: usize,
    table: &ComponentTable,
    layer: usize,
) -> Result<Component, String> {
    let section = kind.as_str();
    let name = table.get("plugin").and_then(|v| v.as_str()).ok_or_else(|| {
        format!(
            "{}: [{section}] needs `plugin = \"...\"`; valid: {}",
            cfg.at(section, n, "plugin"),
            reg.names(kind).join(", ")
        )
    })?;
    let mut own = table.clone();
    own.remove("plugin");
    let text = toml::to_string(&own).map_err(|e| e.to_string())?;
    reg.create(kind, name, &text, cfg.dims(layer)).map_err(|msg| {
        let unknown = msg.split("unknown field `").nth(1).and_then(|r| r.split('`').next());
        let key = unknown
            .or_else(|| own.keys().map(|k| k.as_str()).find(|k| msg.contains(&format!("`{k}`"))))
            .unwrap_or("plugin");
        format!("{}: {msg}", cfg.at(section, n, key))
    })
}

/// The components of every MoE layer, and the optimizer.
pub fn components(cfg: &Config, reg: &Registry) -> Result<(Vec<MoeComponents>, (String, OptimizerBox)), String> {
    let name = |t: &ComponentTable| t.get("plugin").and_then(|v| v.as_str()).unwrap_or("").to_string();
    let mut layers = Vec::new();
    for l in 0..cfg.model.layers {
        let Component::Router(router) = create(cfg, reg, Kind::Router, 0, &cfg.router, l)? else { unreachable!() };
        let Component::Experts(experts) = create(cfg, reg, Kind::Experts, 0, &cfg.experts, l)? else { unreachable!() };
        let Component::CommSchedule(comm) = create(cfg, reg, Kind::CommSchedule, 0, &cfg.comm, l)? else {
            unreachable!()
        };
        let mut losses = Vec::new();
        for (i, t) in cfg.balance_loss.iter().enumerate() {
            let Component::BalanceLoss(b) = create(cfg, reg, Kind::BalanceLoss, i, t, l)? else { unreachable!() };
            losses.push((name(t), b));
        }
        layers.push(MoeComponents {
            router: (name(&cfg.router), router),
            experts: (name(&cfg.experts), experts),
            losses,
            comm: (name(&cfg.comm), comm),
        });
    }
    let Component::Optimizer(opt) = create(cfg, reg, Kind::Optimizer, 0, &cfg.optimizer, 0)? else { unreachable!() };
    Ok((layers, (name(&cfg.optimizer), opt)))
}

/// Learning rate at `step` (1-based).
pub fn lr_at(cfg: &crate::config::TrainConfig, step: u64) -> f32 {
    let (lr, min) = (cfg.lr, cfg.lr * cfg.min_lr_ratio);
    if step <= cfg.warmup {
        return lr * step as f32 / cfg.warmup.max(1) as f32;
    }
    let after = (step - cfg.warmup) as f32;
    let span = (cfg.steps.saturating_sub(cfg.warmup)).max(1) as f32;
    match cfg.schedule.as_str() {
        "cosine" => min + (lr - min) * 0.5 * (1.0 + (std::f32::consts::PI * (after / span).min(1.0)).cos()),
        "wsd" => {
            let decay = (cfg.decay_frac * span).max(1.0);
            let into = after - (span - decay);
            if into <= 0.0 {
                lr
            } else {
                lr + (min - lr) * (into / decay).min(1.0)
            }
        }
        _ => lr,
    }
}

/// max/mean and normalised entropy of one layer's expert load.
fn load_stats(counts: &[u32]) -> (f64, f64) {
    let total: f64 = counts.iter().map(|&c| c as f64).sum();
    if total == 0.0 {
        return (0.0, 0.0);
    }
    let mean = total / counts.len() as f64;
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    let ent: f64 = counts.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / total) * (c as f64 / total).ln()).sum();
    (max / mean, ent / (counts.len() as f64).ln().max(1e-12))
}

pub struct Summary {
    pub steps: u64,
    pub final_loss: f32,
    pub val_loss: Option<f32>,
    pub out: PathBuf,
}

struct Run {
    cfg: Config,
    model: Model,
    params: Params,
    opt: (String, OptimizerBox),
    ops: CpuOps,
}

impl Run {
    fn eval(&mut self, seed: u64) -> Result<f32, String> {
        let m = &self.cfg.model;
        let mut val = Dataset::open(&self.cfg.data, m.vocab, seed, Split::Val)?;
        let mut sum = 0.0;
        for _ in 0..self.cfg.train.eval_batches {
            let (x, y) = val.next_batch(self.cfg.train.micro_batch, m.seq_len)?;
            sum += self.model.loss(&self.ops, &self.params, &x, &y, self.cfg.train.micro_batch)?;
            self.ops.reset();
        }
        Ok(sum / self.cfg.train.eval_batches.max(1) as f32)
    }

    fn optimizer_step(&mut self, lr: f32, step: u64) -> Result<(), String> {
        let (name, opt) = &self.opt;
        for p in &mut self.params.list {
            let shape: Vec<usize> = p.spec.shape.iter().map(|&d| d as usize).collect();
            let state: Vec<_> = p.state.iter_mut().map(|(_, v)| view_mut(v, &shape)).collect();
            opt.step(
                self.ops.ops(),
                &p.spec,
                view_mut(&mut p.w, &shape),
                view(&p.g, &shape),
                RSlice::from_slice(&state),
                lr,
                step,
            )
            .into_result()
            .map_err(|e| format!("optimizer `{name}` on {}: {e}", p.name))?;
        }
        self.ops.reset();
        Ok(())
    }
}

/// Train `cfg`; with `resume`, continue from a checkpoint (a step directory or a run directory);
/// with `trace`, write the routing of the first tokens trained on (see trace.rs).
pub fn train(
    cfg: Config,
    reg: &Registry,
    resume: Option<&Path>,
    mut trace: Option<RoutingTrace>,
) -> Result<Summary, String> {
    let t = cfg.train.clone();
    let m = cfg.model.clone();
    if t.device == "cuda" {
        let at = cfg.at("train", 0, "device");
        crate::gpu::Gpu::open(0).map_err(|e| format!("{at}: {e}"))?;
        return Err(format!("{at}: the GPU opened, but the CUDA training step is not built yet; use device = \"cpu\""));
    }
    if t.threads > 0 {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(t.threads).build_global();
    }
    let out = PathBuf::from(&t.out);
    if resume.is_none() && out.join("checkpoints").exists() {
        return Err(format!(
            "{}: this run directory already holds checkpoints; continue it with --resume {} or choose another --set train.out=...",
            out.display(),
            out.display()
        ));
    }
    let (moe, opt) = components(&cfg, reg)?;
    let mut params = Params::default();
    let model = Model::new(&m, &mut params, t.seed, moe)?;
    for p in &mut params.list {
        let names = opt.1.state(&p.spec);
        p.state = names.iter().map(|n| (n.to_string(), vec![0.0; p.w.len()])).collect();
    }
    if let (None, Some(src)) = (resume, &t.init_from) {
        crate::hf::init_weights(Path::new(src), &cfg, &mut params)
            .map_err(|e| format!("{}: train.init_from: {e}", cfg.at("train", 0, "init_from")))?;
        tracing::info!("initialised the weights from {src}");
    }
    let mut data = Dataset::open(&cfg.data, m.vocab, t.seed, Split::Train)?;
    let mut start = 0;
    if let Some(r) = resume {
        let st = checkpoint::load(r, &cfg, &mut params)?;
        data.set_position(st.data_position);
        start = st.step;
        tracing::info!("resumed from {} at step {start}", checkpoint::resolve(r)?.display());
    }
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    std::fs::write(out.join("config.toml"), cfg.to_toml()).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("metrics.jsonl"))
        .map_err(|e| format!("{}: {e}", out.display()))?;
    let mut run = Run { cfg, model, params, opt, ops: CpuOps::default() };
    let tokens_per_step = t.micro_batch * m.seq_len * t.grad_accum;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(t.steps);
        b.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").unwrap());
        b.set_position(start);
        b
    });
    let say = |line: String| match &bar {
        Some(b) => b.println(line),
        None => eprintln!("{line}"),
    };
    let (mut last_loss, mut val_loss) = (f32::NAN, None);
    for step in start + 1..=t.steps {
        let t0 = Instant::now();
        let lr = lr_at(&t, step);
        let (mut loss, mut aux, mut counts) = (0.0f32, Vec::<(String, f32)>::new(), Vec::<Vec<u32>>::new());
        for _ in 0..t.grad_accum {
            let (x, y) = data.next_batch(t.micro_batch, m.seq_len)?;
            let o = run
                .model
                .forward_backward(&run.ops, &mut run.params, &x, &y, t.micro_batch, 1.0 / t.grad_accum as f32)
                .map_err(|e| format!("step {step}: {e}"))?;
            if let Some(tr) = trace.as_mut().filter(|tr| !tr.done()) {
                tr.add(&x, &o);
                if tr.done() {
                    tr.write()?;
                    say(format!("routing trace of {} tokens written to {}", tr.want, tr.path.display()));
                }
            }
            loss += o.loss / t.grad_accum as f32;
            for (i, (n, v)) in o.aux.into_iter().enumerate() {
                match aux.get_mut(i) {
                    Some(a) => a.1 += v / t.grad_accum as f32,
                    None => aux.push((n, v / t.grad_accum as f32)),
                }
            }
            for (l, c) in o.expert_counts.into_iter().enumerate() {
                match counts.get_mut(l) {
                    Some(a) => a.iter_mut().zip(c).for_each(|(a, c)| *a += c),
                    None => counts.push(c),
                }
            }
        }
        if !loss.is_finite() {
            return Err(format!("step {step}: the loss is non-finite ({loss})"));
        }
        let gnorm = run.params.grad_norm();
        if !gnorm.is_finite() {
            let bad =
                run.params.list.iter().find(|p| p.g.iter().any(|g| !g.is_finite())).map_or("?", |p| p.name.as_str());
            return Err(format!("step {step}: non-finite gradient, first in `{bad}`"));
        }
        if t.clip > 0.0 && gnorm > t.clip {
            let s = t.clip / gnorm;
            run.params.list.iter_mut().for_each(|p| p.g.iter_mut().for_each(|g| *g *= s));
        }
        run.optimizer_step(lr, step).map_err(|e| format!("step {step}: {e}"))?;
        run.params.zero_grads();
        let dt = t0.elapsed().as_secs_f64();
        let plugin_metrics = run.ops.take_metrics();
        let loads: Vec<(f64, f64)> = counts.iter().map(|c| load_stats(c)).collect();
        let n = loads.len().max(1) as f64;
        let (load_max, load_ent) =
            (loads.iter().map(|l| l.0).sum::<f64>() / n, loads.iter().map(|l| l.1).sum::<f64>() / n);
        let tps = tokens_per_step as f64 / dt;
        let mut line = serde_json::json!({
            "step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_s": tps,
            "load_max_over_mean": load_max, "load_entropy": load_ent,
            "load_per_layer": counts,
        });
        for (n, v) in &aux {
            line[format!("aux.{n}")] = (*v).into();
        }
        for (n, v) in &plugin_metrics {
            line[n.as_str()] = (*v).into();
        }
        last_loss = loss;
        let is_last = step == t.steps;
        if (t.eval_every > 0 && step % t.eval_every == 0) || is_last {
            let v = run.eval(t.seed)?;
            line["val_loss"] = v.into();
            val_loss = Some(v);
        }
        writeln!(metrics, "{line}").map_err(|e| format!("metrics.jsonl: {e}"))?;
        if step % t.log_every.max(1) == 0 || is_last || step == start + 1 {
            let aux_s: String = aux.iter().map(|(n, v)| format!(" {n} {v:.4}")).collect();
            let val_s = line.get("val_loss").map(|v| format!(" | val {:.4}", v.as_f64().unwrap())).unwrap_or_default();
            say(format!(
                "step {step:>5}/{} | loss {loss:.4}{val_s} |{aux_s} | lr {lr:.2e} | gnorm {gnorm:.3} | {:.1}K tok/s | load max/mean {load_max:.2}",
                t.steps,
                tps / 1e3
            ));
        }
        if let Some(b) = &bar {
            b.set_position(step);
        }
        if (t.checkpoint_every > 0 && step % t.checkpoint_every == 0) || is_last {
            let st = TrainerState { step, data_position: data.position(), plugin_api: pith_plugin_api::VERSION.into() };
            let dir = checkpoint::save(&out, &run.cfg, &run.params, &st)?;
            tracing::debug!("checkpoint {}", dir.display());
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if let Some(tr) = trace.filter(|tr| !tr.done()) {
        tr.write()?;
        say(format!("routing trace (the whole run: fewer than {} tokens) written to {}", tr.want, tr.path.display()));
    }
    if run.cfg.data.source == "synthetic" && last_loss.is_finite() {
        let s = Synthetic::new(m.vocab, t.seed);
        let (uni, floor) = (s.unigram_entropy(), s.entropy_floor());
        let reached = val_loss.unwrap_or(last_loss) as f64;
        say(format!(
            "done: loss {reached:.4} nats/token (val); unigram entropy {uni:.4}, known floor {floor:.4}: {:.0}% of the way from unigram to floor, {:.4} above the floor",
            100.0 * (uni - reached) / (uni - floor),
            reached - floor
        ));
    }
    Ok(Summary { steps: t.steps, final_loss: last_loss, val_loss, out })
}
