//! `pith bench <config>`: train steps on the config's device and report what they cost — the
//! median step time after a warm-up, tokens/s, MFU against a bf16 GEMM peak measured in the
//! same run (and against the 790 TFLOP/s of ../shared/bench, for comparison with the PyTorch
//! reference), and peak GPU memory. `--profile` adds one more step timed per kernel and GEMM
//! with CUDA events, heaviest first. The last line is JSON (for scripts and ATE-Bench).

use crate::config::Config;
use crate::data::{Dataset, Split};
use crate::gpu::{gib, Gpu};
use crate::model::Model;
use crate::parallel::Parallel;
use crate::registry::Registry;
use crate::train::{lr_at, Run};
use pith_plugin_api::DType;
use std::sync::Arc;
use std::time::Instant;

pub struct BenchOpts {
    pub warmup: usize,
    pub steps: usize,
    pub profile: bool,
}

/// The reference peak of ../shared/bench/README.md (bf16 GEMM measured on the H200).
const REFERENCE_PEAK: f64 = 790e12;

/// bf16 GEMM throughput in FLOP/s: 8192³, 3 warm-up then 10 timed with CUDA events.
fn gemm_peak(gpu: &Gpu) -> Result<f64, String> {
    let n = 8192;
    let (a, b, c) =
        (gpu.zeros(&[n, n], DType::BF16)?, gpu.zeros(&[n, n], DType::BF16)?, gpu.zeros(&[n, n], DType::BF16)?);
    let ev = || gpu.stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT));
    for _ in 0..3 {
        gpu.gemm(&a, &b, &c, false, false, 1.0, 0.0)?;
    }
    let start = ev().map_err(|e| format!("{e:?}"))?;
    for _ in 0..10 {
        gpu.gemm(&a, &b, &c, false, false, 1.0, 0.0)?;
    }
    let end = ev().map_err(|e| format!("{e:?}"))?;
    gpu.sync()?;
    let ms = start.elapsed_ms(&end).map_err(|e| format!("{e:?}"))? as f64;
    Ok(10.0 * 2.0 * (n as f64).powi(3) / (ms / 1e3))
}

/// One optimizer step (all micro-batches, every rank); returns the loss, this rank's experts'
/// forward FLOPs by their own count (`Experts::flops`) over the rows they computed, and the rows
/// per expert-parallel rank, max over mean (`train::ep_load`; 1 with one rank).
fn step(run: &mut Run, data: &mut Dataset, step: u64) -> Result<(f32, f64, f64), String> {
    let lr = lr_at(&run.cfg.train, step);
    let (st, _) = run.train_step(data, step, lr, None)?;
    Ok((st.loss, st.experts_flops, crate::train::ep_load(&st.counts, run.par.ep.len().max(1))))
}

pub fn bench(cfg: Config, reg: &Registry, o: BenchOpts) -> Result<(), String> {
    crate::config::check_memory(&cfg)?;
    let (m, t) = (cfg.model.clone(), cfg.train.clone());
    // The dense part (attention, router, shared expert, dense layers' FFN) here; the routed experts'
    // part from their own count of the rows they computed.
    let dense_per_token = Model::counts(&m, 0, (cfg.shared_ffn(), cfg.dense_ffn())).flops_per_token;
    let mut data = Dataset::open(&cfg.data, m.vocab, t.seed, Split::Train)?;
    let t0 = Instant::now();
    let par = Arc::new(Parallel::init(&cfg)?);
    // Per rank: this rank's tokens and its own FLOPs, so MFU and tokens/s are per GPU.
    let tokens = t.micro_batch / par.data_slice().1 * m.seq_len * t.grad_accum;
    let mut run = Run::new(cfg, reg, par.clone())?;
    run.place()?;
    eprintln!(
        "bench: model ready in {:.1} s on {} (rank {} of {})",
        t0.elapsed().as_secs_f64(),
        t.device,
        par.rank,
        par.size
    );
    let peak = match run.gpu() {
        Some(g) => {
            let p = gemm_peak(g)?;
            g.pool.release_cached()?;
            g.pool.reset_peaks();
            Some(p)
        }
        None => None,
    };
    let (mut times, mut experts_flops, mut ep_imbalance) = (Vec::new(), 0.0, 0.0);
    let mut loss = f32::NAN;
    let mut mallocs = 0;
    for i in 0..o.warmup + o.steps {
        if i == o.warmup {
            mallocs = run.gpu().map_or(0, |g| g.pool.stats().mallocs);
        }
        let s = Instant::now();
        let (l, experts_fwd, ep_load) = step(&mut run, &mut data, i as u64 + 1)?;
        loss = l;
        let dt = s.elapsed().as_secs_f64();
        eprintln!(
            "bench: step {:>2} {:>8.1} ms  loss {loss:.4}{}",
            i + 1,
            dt * 1e3,
            if i < o.warmup { "  (warm-up)" } else { "" }
        );
        if i >= o.warmup {
            times.push(dt);
            experts_flops += 3.0 * experts_fwd / o.steps as f64; // forward + backward
            ep_imbalance += ep_load / o.steps as f64;
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().ok_or("bench: --steps must be at least 1")?;
    let tps = tokens as f64 / median;
    let achieved = (dense_per_token * tokens as f64 + experts_flops) / median;
    let mut line = serde_json::json!({
        "config": run.cfg.source.file, "device": t.device, "tokens_per_step": tokens,
        "median_step_ms": median * 1e3, "tokens_per_s": tps, "tflops": achieved / 1e12, "loss": loss,
    });
    println!(
        "step {:.1} ms (median of {}) | {:.1}K tokens/s | {:.1} TFLOP/s",
        median * 1e3,
        times.len(),
        tps / 1e3,
        achieved / 1e12
    );
    if run.par.ep.len() > 1 {
        println!(
            "expert parallel over {} ranks: rows per rank, max over mean {ep_imbalance:.3} (mean of the timed steps)",
            run.par.ep.len()
        );
        line["ep_load_max_over_mean"] = ep_imbalance.into();
    }
    if let (Some(peak), Some(g)) = (peak, run.gpu()) {
        let mem = g.pool.stats();
        line["timed_step_mallocs"] = (mem.mallocs - mallocs).into();
        let (free, total) = cudarc::driver::result::mem_get_info().map_err(|e| format!("{e:?}"))?;
        println!(
            "MFU {:.1}% of the measured bf16 GEMM peak ({:.1} TFLOP/s), {:.1}% of 790 TFLOP/s | peak memory {:.1} GiB reserved ({:.1} GiB in tensors); device shows {:.1} GiB used now; {} cudaMalloc calls in the timed steps",
            100.0 * achieved / peak,
            peak / 1e12,
            100.0 * achieved / REFERENCE_PEAK,
            gib(mem.peak_reserved),
            gib(mem.peak_in_use),
            gib(total - free),
            mem.mallocs - mallocs
        );
        line["gemm_peak_tflops"] = (peak / 1e12).into();
        line["mfu"] = (achieved / peak).into();
        line["mfu_790"] = (achieved / REFERENCE_PEAK).into();
        line["peak_gib"] = gib(mem.peak_reserved).into();
        line["peak_tensor_gib"] = gib(mem.peak_in_use).into();
        if let Some(ms) = run.time_grad_sum()? {
            let bytes: usize = run.grad_bytes();
            println!(
                "{} ranks (dp {} × ep {}): summing this rank's {:.2} GB of gradients alone takes {ms:.1} ms (NCCL); the step overlaps it with the backward",
                run.par.size,
                run.par.dp.len(),
                run.par.ep.len(),
                bytes as f64 / 1e9
            );
            line["grad_sum_ms"] = ms.into();
            line["ranks"] = run.par.size.into();
        }
        if o.profile {
            g.start_profile();
            let s = Instant::now();
            step(&mut run, &mut data, (o.warmup + o.steps + 1) as u64)?;
            let wall = s.elapsed().as_secs_f64() * 1e3;
            let g = run.gpu().unwrap();
            let prof = g.take_profile()?;
            let busy: f64 = prof.iter().map(|p| p.1).sum();
            println!("profile of one step ({wall:.1} ms wall with event overhead; {busy:.1} ms in kernels and GEMMs):");
            println!("{:>9} {:>6} {:>7}  op", "ms", "%", "calls");
            for (name, ms, calls) in &prof {
                println!("{ms:>9.2} {:>5.1}% {calls:>7}  {name}", 100.0 * ms / busy);
            }
            line["profile_ms"] = prof
                .iter()
                .map(|(n, ms, _)| (n.clone(), serde_json::Value::from(*ms)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
    }
    println!("{line}");
    Ok(())
}
