//! The `pith` command line. Each verb is a thin call into the library.

use clap::{Parser, Subcommand};
use pith::config::Config;
use pith::registry::{plugin_dirs, Registry};
use pith_plugin_api::Kind;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "pith", version, about = "Pith: train Mixture-of-Experts LLMs; every MoE part is a plugin")]
struct Cli {
    /// Extra plugin directory (repeatable); PITH_PLUGIN_PATH and the executable's directory are also searched.
    #[arg(long = "plugin-dir", global = true)]
    plugin_dirs: Vec<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model (no CONFIG: the built-in quickstart, configs/quickstart.toml).
    Train {
        config: Option<PathBuf>,
        /// Override a config key, e.g. --set train.steps=10 (repeatable).
        #[arg(long = "set")]
        set: Vec<String>,
        /// Continue from a checkpoint: a step directory or a run directory (its newest checkpoint),
        /// in that run's directory and, without CONFIG, with that run's config.toml.
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Write the expert ids and gate weights of every MoE layer for the first tokens (safetensors).
        #[arg(long)]
        trace_routing: Option<PathBuf>,
        /// How many tokens --trace-routing records.
        #[arg(long, default_value_t = 4096)]
        trace_tokens: usize,
        /// The step --trace-routing starts recording at.
        #[arg(long, default_value_t = 1)]
        trace_from: u64,
    },
    /// Train on N ranks of this machine: N processes of `pith train CONFIG [FLAGS…]` (one per GPU,
    /// or CPU ranks: the config decides), with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set.
    Launch {
        /// How many ranks (processes) to start.
        #[arg(long)]
        gpus: u32,
        /// MASTER_PORT of the rendezvous (default: a free port).
        #[arg(long)]
        port: Option<u16>,
        /// The config and any `pith train` flags, passed to every rank.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        train: Vec<std::ffi::OsString>,
    },
    /// Time training steps: median step time, tokens/s, MFU and peak GPU memory (docs/performance.md).
    Bench {
        config: Option<PathBuf>,
        #[arg(long = "set")]
        set: Vec<String>,
        /// Steps run and not counted (the first few are slower: cuBLAS picks its kernels).
        #[arg(long, default_value_t = 4)]
        warmup: usize,
        /// Steps timed (the median is reported; steps vary by about ±10%).
        #[arg(long, default_value_t = 15)]
        steps: usize,
        /// Also time one step per kernel and GEMM with CUDA events, heaviest first.
        #[arg(long)]
        profile: bool,
    },
    /// Print every resolved component with its origin and source, parameter counts and FLOPs/token.
    Plan {
        config: Option<PathBuf>,
        #[arg(long = "set")]
        set: Vec<String>,
    },
    /// Print the resolved config (defaults filled in, overrides applied).
    Config {
        config: Option<PathBuf>,
        #[arg(long = "set")]
        set: Vec<String>,
    },
    /// List, scaffold and check plugins.
    #[command(subcommand)]
    Plugins(PluginsCmd),
    /// Prepare token shards.
    #[command(subcommand)]
    Data(DataCmd),
    /// Look at finished or running runs: a table of their final numbers and a PNG of their curves.
    #[command(subcommand)]
    Runs(RunsCmd),
    /// Bring a model in from another framework (docs/interop.md).
    #[command(subcommand)]
    Import(ImportCmd),
    /// Write a checkpoint out for another framework (docs/interop.md).
    #[command(subcommand)]
    Export(ExportCmd),
    /// Print, as JSON, the logits and next-token loss of a token sequence under a model (a Hugging
    /// Face folder or a Pith checkpoint/run directory).
    /// Continue a text with a trained model (a Pith checkpoint or run directory, or a Hugging Face
    /// folder), on the CPU, with the model's tokenizer (bytes without one).
    Generate {
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 is greedy (argmax); above, sampling from softmax(logits / T).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// With sampling, only the K most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// cpu (f32) or cuda (bf16 activations, as in training).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    EvalLogits {
        model: PathBuf,
        /// Token ids, comma-separated, e.g. --tokens 1,2,3.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
    },
}

#[derive(Subcommand)]
enum ImportCmd {
    /// A Hugging Face Qwen3-MoE, Mixtral or OLMoE folder → a run directory with a step-0 checkpoint.
    Hf {
        dir: PathBuf,
        /// The run directory to create (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Pith's sequence length (default: max_position_embeddings, at most 2048).
        #[arg(long)]
        seq_len: Option<usize>,
    },
}

#[derive(Subcommand)]
enum ExportCmd {
    /// A checkpoint (step or run directory) → a Hugging Face folder: config.json, safetensors, tokenizer.
    Hf {
        checkpoint: PathBuf,
        out: PathBuf,
        /// f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Largest shard, e.g. 5GB, 200MB; past it the weights are sharded with an index.
        #[arg(long, default_value = "5GB")]
        max_shard_size: String,
        /// A tokenizer.json to ship (default: the one the run's data meta.json names).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// config.json's max_position_embeddings (default: model.seq_len).
        #[arg(long)]
        max_positions: Option<usize>,
    },
}

#[derive(Subcommand)]
enum RunsCmd {
    /// One or more runs: final loss, val loss, tokens/s, time; the plot goes to RUN/runs.png.
    Show {
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Where the PNG goes (default: the first run's runs.png).
        #[arg(long)]
        png: Option<PathBuf>,
    },
    /// The same for several runs side by side, one colour each.
    Compare {
        #[arg(required = true, num_args = 2..)]
        runs: Vec<PathBuf>,
        #[arg(long)]
        png: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PluginsCmd {
    /// Every component: kind, name, origin (built-in or file) and description.
    List,
    /// Scaffold a plugin crate from plugin-api/templates/<kind>/.
    New {
        #[arg(long)]
        kind: String,
        #[arg(long)]
        name: String,
        /// Directory to create the crate in.
        #[arg(long, default_value = "plugins")]
        dir: PathBuf,
    },
    /// Gradient and determinism checks (routers, experts, losses, comm) or a step check (optimizers);
    /// with --device cuda, then that the CUDA path matches the CPU's (host/src/check_cuda.rs).
    Check {
        name: String,
        /// Needed only when several kinds share the name.
        #[arg(long)]
        kind: Option<String>,
        /// A TOML key of the component, e.g. --config 'top_k = 1' (repeatable).
        #[arg(long)]
        config: Vec<String>,
        /// The check's model: experts (CPU check; the CUDA check keeps its own sizes).
        #[arg(long, default_value_t = 6)]
        experts: usize,
        /// The check's hidden size.
        #[arg(long, default_value_t = 16)]
        hidden: usize,
        /// The check's expert FFN size.
        #[arg(long, default_value_t = 12)]
        expert_ffn: usize,
        /// Tokens for routers, comm schedules and balance losses (default 8; 16 for losses).
        #[arg(long, default_value_t = 0)]
        tokens: usize,
        /// Seed of the random inputs and parameters.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// cpu: the CPU checks. cuda: the CPU checks (the reference must hold), then the CUDA path
        /// against the CPU's on GPU 0 (host/src/check_cuda.rs).
        #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
        device: String,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Tokenize text/JSONL files or directories into train_*.bin / val_*.bin shards.
    Prepare {
        inputs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// A Hugging Face tokenizer.json; default: byte-level (vocab 256).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// JSONL field holding the text.
        #[arg(long, default_value = "text")]
        field: String,
        #[arg(long, default_value_t = 0.01)]
        val_fraction: f64,
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: usize,
    },
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::parse(s).ok_or_else(|| {
        let all: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        format!("unknown kind `{s}`; valid: {}", all.join(", "))
    })
}

/// How a command ends early: an error to print, or an exit status already explained (a run
/// stopped by a signal after its checkpoint).
enum Failure {
    Error(String),
    Exit(i32),
}
use Failure::Exit;

impl From<String> for Failure {
    fn from(e: String) -> Failure {
        Failure::Error(e)
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let registry = || Registry::load(&plugin_dirs(&cli.plugin_dirs)?);
    match cli.cmd {
        Cmd::Train { config, set, resume, trace_routing, trace_tokens, trace_from } => {
            let cfg = match &resume {
                Some(r) => pith::train::resume_config(config.as_deref(), &set, r)?,
                None => Config::load(config.as_deref(), &set)?,
            };
            let trace = trace_routing.map(|p| pith::trace::RoutingTrace::new(p, trace_tokens, trace_from));
            let summary = pith::train::train(cfg, &registry()?, resume.as_deref(), trace)?;
            if let Some(sig) = summary.interrupted {
                return Err(Exit(128 + sig));
            }
        }
        Cmd::Launch { gpus, port, train } => {
            let exe = std::env::current_exe().map_err(|e| format!("finding the pith executable: {e}"))?;
            let mut args: Vec<std::ffi::OsString> = vec![];
            for d in &cli.plugin_dirs {
                args.extend(["--plugin-dir".into(), d.into()]);
            }
            args.push("train".into());
            args.extend(train);
            let opts = pith::dist::launch::LaunchOpts { ranks: gpus, port, grace: std::time::Duration::from_secs(5) };
            let stop = pith::dist::launch::signals()?;
            let code = pith::dist::launch::launch(&exe, &args, &opts, &stop)?;
            if code != 0 {
                return Err(Exit(code));
            }
        }
        Cmd::Bench { config, set, warmup, steps, profile } => {
            let cfg = Config::load(config.as_deref(), &set)?;
            pith::bench::bench(cfg, &registry()?, pith::bench::BenchOpts { warmup, steps, profile })?;
        }
        Cmd::Plan { config, set } => {
            let cfg = Config::load(config.as_deref(), &set)?;
            print!("{}", pith::plan::plan(&cfg, &registry()?)?);
        }
        Cmd::Config { config, set } => {
            let cfg = Config::load(config.as_deref(), &set)?;
            print!("{}", pith::train::with_plugin_settings(&cfg, &registry()?)?.to_toml())
        }
        Cmd::Plugins(PluginsCmd::List) => {
            let reg = registry()?;
            println!("{:<14} {:<16} {:<40} DESCRIPTION", "KIND", "NAME", "ORIGIN");
            for e in &reg.entries {
                let mut origin = e.origin.to_string();
                if let Some(r) = &e.replaced {
                    origin += &format!(" (replaces {r})");
                }
                println!("{:<14} {:<16} {:<40} {}", e.info.kind.as_str(), e.info.name, origin, e.info.description);
            }
        }
        Cmd::Plugins(PluginsCmd::New { kind, name, dir }) => {
            let out = pith::scaffold::new_plugin(parse_kind(&kind)?, &name, &dir)?;
            println!("created {}", out.display());
            println!("next: implement it, `cargo build --release` (inside this workspace) or `cargo build --release --manifest-path {}/Cargo.toml`,", out.display());
            println!(
                "      put lib{}.so in a plugin directory, then `pith plugins check {name}`",
                name.replace('-', "_")
            );
        }
        Cmd::Plugins(PluginsCmd::Check { name, kind, config, device, experts, hidden, expert_ffn, tokens, seed }) => {
            let config = config.join("\n");
            let reg = registry()?;
            let found = reg.find_any(&name);
            let entry = match (kind, found.len()) {
                (Some(k), _) => {
                    let k = parse_kind(&k)?;
                    reg.find(k, &name).ok_or_else(|| {
                        format!("no {} named `{name}`; valid: {}", k.as_str(), reg.names(k).join(", "))
                    })?
                }
                (None, 1) => found[0],
                (None, 0) => {
                    return Err(format!("no plugin named `{name}`; `pith plugins list` shows what is loaded").into())
                }
                (None, _) => return Err(format!("several kinds are named `{name}`; add --kind").into()),
            };
            let kind = entry.info.kind;
            let dims = pith_plugin_api::ModelDims::new(hidden, experts, expert_ffn, 0, 1);
            let c = reg.create(kind, &name, &config, dims.for_kind(kind))?;
            let label = format!("{} `{name}` ({})", kind.as_str(), entry.origin);
            let lines = pith::check::check_component(&c, &label, dims, seed, tokens)?;
            lines.iter().for_each(|l| println!("{l}"));
            if device == "cuda" {
                let gpu = pith::gpu::Gpu::open(0).map_err(|e| format!("--device cuda: {e}"))?;
                let gpu = std::sync::Arc::new(gpu);
                let dims = pith::check_cuda::DIMS;
                let c = reg.create(kind, &name, &config, dims.for_kind(kind))?;
                let lines = pith::check_cuda::check_component(&c, &label, &gpu, dims, seed)?;
                lines.iter().for_each(|l| println!("{l}"));
            }
            println!("PASS {label}");
        }
        Cmd::Data(DataCmd::Prepare { inputs, out, tokenizer, field, val_fraction, shard_tokens }) => {
            let s = pith::data::prepare(&inputs, &out, tokenizer.as_deref(), &field, val_fraction, shard_tokens)?;
            println!(
                "{}: {} train / {} val tokens ({} / {} documents) in {} / {} shards, vocab {} ({})",
                s.out_dir.display(),
                s.tokens[0],
                s.tokens[1],
                s.documents[0],
                s.documents[1],
                s.shards[0],
                s.shards[1],
                s.vocab,
                s.tokenizer
            );
            if s.documents[1] == 0 {
                println!(
                    "(one document: val holds its last {:.0}% of tokens, not whole documents)",
                    100.0 * val_fraction
                );
            }
        }
        Cmd::Import(ImportCmd::Hf { dir, out, seq_len }) => {
            let i = pith::hf::import(&dir, &out, seq_len, &registry()?)?;
            println!(
                "imported {} ({} parameters) from {} into {}",
                i.family.architecture(),
                i.params,
                dir.display(),
                i.checkpoint.display()
            );
            let (o, c) = (out.display(), out.join("config.toml"));
            println!("train it: pith train {} --resume {o}   (or init_from = \"{o}\" in another config)", c.display());
        }
        Cmd::Export(ExportCmd::Hf { checkpoint, out, dtype, max_shard_size, tokenizer, max_positions }) => {
            let dtype = match dtype.as_str() {
                "f32" => pith::hf::ExportDtype::F32,
                "bf16" => pith::hf::ExportDtype::Bf16,
                d => return Err(format!("--dtype {d}: valid: f32, bf16").into()),
            };
            let max_shard_bytes = pith::hf::parse_size(&max_shard_size)?;
            let opts = pith::hf::ExportOptions { dtype, max_shard_bytes, tokenizer, max_positions };
            let e = pith::hf::export(&checkpoint, &out, &opts)?;
            let tok = e.tokenizer.map_or("no tokenizer".into(), |t| format!("tokenizer {}", t.display()));
            println!(
                "exported {} to {}: {} file(s), {} bytes of weights, {tok}",
                e.family.architecture(),
                out.display(),
                e.files.len(),
                e.bytes
            );
        }
        Cmd::Runs(RunsCmd::Show { runs, png } | RunsCmd::Compare { runs, png }) => {
            println!("{}", pith::runs::compare(&runs, png.as_deref())?);
        }
        Cmd::Generate { model, prompt, max_tokens, temperature, top_k, seed, device } => {
            let s = pith::hf::Sampling { max_tokens, temperature, top_k, seed, device };
            let (text, _) = pith::hf::generate(&model, &prompt, &s, &registry()?)?;
            println!("{prompt}{text}");
        }
        Cmd::EvalLogits { model, tokens } => {
            println!("{}", pith::hf::eval_logits(&model, &tokens, &registry()?)?);
        }
    }
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("PITH_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    // `pith config x.toml | head`: a closed pipe ends the process quietly, as for any Unix tool,
    // instead of a panic in println!. A file-size limit (`ulimit -f`) makes writes fail with an
    // error the run reports (like a full disk) instead of killing the process mid-save.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let start = std::time::SystemTime::now();
    let result = run(Cli::parse());
    if !matches!(result, Err(Failure::Error(_))) {
        pith::dist::peers::goodbye(); // to the other ranks: this one ends on purpose (done, or a signal)
    }
    let code = match result {
        Ok(()) => 0,
        Err(Failure::Exit(code)) => code,
        Err(Failure::Error(e)) => {
            eprintln!("error: {e}");
            1
        }
    };
    ledger(start, code);
    std::process::exit(code);
}

/// With `PITH_LEDGER=FILE`, append one JSON line per command: what ran, when, on which device,
/// how many GPUs it held and how it ended. ATE-Bench's `score` charges `(end - start) × gpus` as
/// active GPU time. The device is decided from the command line (parsed again here) and the
/// resolved config: `train`/`bench` with `train.device = "cuda"` and `plugins check --device cuda`
/// ran on GPU 0 (`gpus` 1, also when opening it failed: the whole command is charged); everything
/// else ran on the CPU (`gpus` 0). `gpu_busy_s` (time the GPU spent in kernels) is 0.0 on the CPU
/// and null on CUDA, where it is not measured outside `pith bench --profile`.
fn ledger(start: std::time::SystemTime, exit: i32) {
    let Some(path) = std::env::var_os("PITH_LEDGER") else { return };
    let secs = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let device = match Cli::try_parse().map(|c| c.cmd) {
        Ok(Cmd::Train { config, set, .. } | Cmd::Bench { config, set, .. }) => {
            Config::load(config.as_deref(), &set).map_or_else(|_| "cpu".to_string(), |c| c.train.device)
        }
        Ok(Cmd::Plugins(PluginsCmd::Check { device, .. })) => device,
        _ => "cpu".to_string(),
    };
    let gpus = u32::from(device == "cuda");
    let line = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "start": secs(start),
        "end": secs(std::time::SystemTime::now()),
        "device": device,
        "gpus": gpus,
        "gpu_busy_s": if gpus == 0 { Some(0.0) } else { None },
        "exit": exit,
    });
    use std::io::Write;
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
    if let Err(e) = file.and_then(|mut f| writeln!(f, "{line}")) {
        eprintln!("warning: PITH_LEDGER {}: {e}", std::path::Path::new(&path).display());
    }
}
