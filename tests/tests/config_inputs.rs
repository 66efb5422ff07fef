//! Bad config inputs through the `pith` binary: each is refused before any work, exit code 1, in
//! one line naming where (file:line, and the `--set` that wrote it), the key and what is valid.
//! Sizes that cannot fit are refused with the numbers; `pith plan` of any size allocates nothing.

use pith_tests::{one_line, out, pith, WORKSPACE};
use std::path::Path;

fn tmp(name: &str) -> pith_tests::Scratch {
    pith_tests::tmp(&format!("cfg-{name}"))
}

/// Run pith; asserts exit code 1 and a one-line error, which it returns.
fn refused(args: &[&str]) -> String {
    let (code, so, se) = pith(args);
    assert_eq!(code, 1, "{args:?}\n{so}{se}");
    one_line(&se)
}

/// The 1-based line of the quickstart that starts with `prefix`.
fn quickstart_line(prefix: &str) -> usize {
    let text = std::fs::read_to_string(format!("{WORKSPACE}/configs/quickstart.toml")).unwrap();
    text.lines().position(|l| l.starts_with(prefix)).unwrap() + 1
}

#[test]
fn bad_host_values_are_refused_before_anything_is_written() {
    let dir = tmp("values");
    let run = dir.join("run");
    let o = out(&run);
    let cases = [
        ("train.lr=-1", "train.lr = -1: must be finite and >= 0"),
        ("train.lr=nan", "train.lr = NaN: must be finite and >= 0"),
        ("train.min_lr_ratio=2", "train.min_lr_ratio = 2: must be in [0, 1]"),
        ("model.init_std=0", "model.init_std = 0: must be finite and > 0"),
        ("model.rope_theta=inf", "model.rope_theta = inf: must be finite and > 0"),
        ("model.norm_eps=-1", "model.norm_eps = -1: must be finite and > 0"),
        ("train.clip=nan", "train.clip = NaN: must be finite and >= 0"),
        ("train.steps=0", "train.steps = 0: must be at least 1"),
        ("model.layers=0", "model.layers = 0: must be an integer in 1..="),
        ("train.eval_batches=0", "train.eval_batches = 0: must be at least 1"),
        ("model.kv_heads=8", "model.kv_heads = 8: must be in 1..=heads (4)"),
        ("train.decay_frac=0", "train.decay_frac = 0: must be in (0, 1]"),
    ];
    for (set, want) in cases {
        let line = refused(&["train", "--set", &o, "--set", set]);
        // A key the quickstart file has is pointed at by its line; one it lacks by the --set alone.
        let key = set.split('=').next().unwrap().rsplit('.').next().unwrap();
        let in_file = !["min_lr_ratio", "init_std", "norm_eps", "decay_frac"].contains(&key);
        let at = if in_file { format!(":{}", quickstart_line(&format!("{key} ="))) } else { String::new() };
        assert!(line.starts_with(&format!("error: <built-in quickstart>{at} (--set {set}): {want}")), "{line}");
    }
    assert!(!run.exists(), "a refused config wrote {}", run.display());
}

#[test]
fn a_bad_value_in_a_file_is_pointed_at_by_its_line_even_after_a_set_added_lines() {
    let dir = tmp("file");
    let text = std::fs::read_to_string(format!("{WORKSPACE}/configs/quickstart.toml")).unwrap();
    let file = dir.join("run.toml");
    std::fs::write(&file, text.replace("top_k = 2", "top_k = 99").replace("clip = 1.0", "clip = -1.0")).unwrap();
    let f = file.to_str().unwrap();
    let line = refused(&["plan", f, "--set", "train.min_lr_ratio=0.5"]);
    let want = format!("error: {f}:{}: train.clip = -1: must be finite and >= 0", quickstart_line("clip ="));
    assert!(line.starts_with(&want), "{line}");
    // A plugin's key: the `--set` of a new [train] key above it moves no line of the file.
    let line = refused(&["plan", f, "--set", "train.min_lr_ratio=0.5", "--set", "train.clip=1"]);
    let want = format!("error: {f}:{}: router `topk-softmax`", quickstart_line("top_k"));
    assert!(line.starts_with(&want) && line.contains("`top_k` = 99"), "{line}");
}

#[test]
fn sizes_that_cannot_fit_are_refused_with_the_numbers_and_the_key() {
    let dir = tmp("sizes");
    let run = dir.join("run");
    let o = out(&run);
    let seq = quickstart_line("seq_len");
    let hidden = quickstart_line("hidden");
    for (set, line_no, term) in [
        ("model.seq_len=100000", seq, "attention scores"),
        ("model.seq_len=1000000000", seq, "attention scores"),
        ("model.hidden=4000000000", hidden, "activations"),
    ] {
        let line = refused(&["train", "--set", &o, "--set", set]);
        let (key, value) = set.split_once('=').unwrap();
        let want = format!(
            "error: <built-in quickstart>:{line_no} (--set {set}): {key} = {value}: a CPU training step needs ~"
        );
        assert!(line.starts_with(&want) && line.contains(" available (mostly ") && line.contains(term), "{line}");
    }
    // An integer written as a float is a type error that says how to write it.
    let line = refused(&["train", "--set", &o, "--set", "model.seq_len=1e9"]);
    assert!(
        line.contains("model.seq_len: invalid type: floating point") && line.ends_with("integer: 1000000000"),
        "{line}"
    );
    assert!(!run.exists(), "a refused config wrote {}", run.display());
}

#[test]
fn plan_of_a_model_too_big_for_any_machine_allocates_nothing() {
    for set in ["model.hidden=4000000000", "model.seq_len=1000000000", "model.vocab=4000000000"] {
        let (code, so, se) = pith(&["plan", "--set", set]);
        assert_eq!(code, 0, "{set}\n{so}{se}");
        let mem = so.lines().find(|l| l.starts_with("CPU training step memory (estimate): ~")).unwrap();
        assert!(mem.ends_with("does not fit here") || !Path::new("/proc/meminfo").exists(), "{mem}");
    }
    let (code, so, se) = pith(&["plan", "--set", "model.hidden=4000000000"]);
    assert_eq!(code, 0, "{so}{se}");
    // hidden × (2·vocab + layers·(attention, 8 experts · 3 · 128, router)) parameters, in full.
    let all = so.lines().find(|l| l.trim_start().starts_with("all ")).unwrap();
    let n: u128 = all.split_whitespace().nth(1).unwrap().parse().unwrap();
    let h = 4_000_000_000u128;
    let want = 2 * 256 * h + 2 * (2 * h * 128 + 2 * h * 64 + 2 * h + 32 + 32 + 8 * 3 * h * 128 + 8 * h) + h;
    assert_eq!(n, want, "{all}");
}

/// A Hugging Face folder with only a config.json, of hidden size `hidden`.
fn hf_dir(name: &str, hidden: u64) -> pith_tests::Scratch {
    let dir = tmp(name);
    let json = format!(
        r#"{{"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 256, "hidden_size": {hidden},
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "num_experts": 8, "moe_intermediate_size": 64, "num_experts_per_tok": 2, "max_position_embeddings": 64}}"#
    );
    std::fs::write(dir.join("config.json"), json).unwrap();
    dir
}

#[test]
fn import_and_eval_logits_refuse_a_huge_config_json_before_reading_weights() {
    let src = hf_dir("hf-huge", 1_000_000_000);
    let (s, o) = (src.to_str().unwrap(), src.with_extension("out"));
    let at = format!("error: {}: `hidden_size` = 1000000000: ", src.join("config.json").display());
    let line = refused(&["import", "hf", s, "--out", o.to_str().unwrap()]);
    assert!(
        line.starts_with(&format!("{at}importing the model needs ~")) && line.contains("`hidden_size` <= "),
        "{line}"
    );
    assert!(!o.exists());
    let line = refused(&["eval-logits", s, "--tokens", "1,2,3"]);
    assert!(line.starts_with(&format!("{at}evaluating the model needs ~")), "{line}");
    // A size Pith cannot represent at all is named by its config.json field too.
    let src = hf_dir("hf-wide", 1 << 33);
    let line = refused(&["eval-logits", src.to_str().unwrap(), "--tokens", "1,2,3"]);
    assert!(
        line.contains("config.json: `hidden_size` gives model.hidden = 8589934592: must be an integer in 1..="),
        "{line}"
    );
}

#[test]
fn set_reaches_each_balance_loss_and_says_how_many_there_are() {
    let (code, so, se) = pith(&["config", "--set", "balance_loss.1.coef=0.5"]);
    assert_eq!(code, 0, "{se}");
    let c = pith::config::Config::parse("resolved", &so, &[]).unwrap();
    assert_eq!(c.balance_loss[1]["coef"].as_float(), Some(0.5));
    assert_eq!(c.balance_loss[0]["coef"].as_float(), Some(0.01));
    let line = refused(&["config", "--set", "balance_loss.2.coef=0.5"]);
    let want = "error: --set balance_loss.2.coef=0.5: index 2 is out of range: <built-in quickstart> has 2 [[balance_loss]] tables (indices 0..=1)";
    assert_eq!(line, want);
    let line = refused(&["config", "--set", "balance_loss.coef=0.5"]);
    assert!(line.contains("give an index, e.g. --set balance_loss.0.coef="), "{line}");
    // The plugin's own check points at that entry's line and the --set.
    let line = refused(&["plan", "--set", "balance_loss.1.coef=-1"]);
    let coef = quickstart_line("coef = 0.001");
    let want = format!("error: <built-in quickstart>:{coef} (--set balance_loss.1.coef=-1): balance_loss `z-loss`");
    assert!(line.starts_with(&want) && line.contains("`coef` = -1"), "{line}");
}

#[test]
fn set_of_a_key_or_table_that_does_not_exist_lists_the_valid_ones() {
    let line = refused(&["train", "--set", "train.stepz=5"]);
    let want =
        "error: <built-in quickstart> (--set train.stepz=5): unknown field `stepz`, expected one of `device`, `steps`";
    assert!(line.starts_with(want), "{line}");
    let line = refused(&["train", "--set", "trian.steps=5"]);
    assert!(line.contains("there is no table `trian`; valid: model, train, data, parallel, router"), "{line}");
    let line = refused(&["train", "--set", "steps=5"]);
    assert!(line.contains("expected table.key=value"), "{line}");
}

/// `pith config` completes every component table with its plugin's defaults (the component's
/// `settings()`, plugin-api 0.4) and keeps what the config says.
#[test]
fn config_shows_every_plugin_default() {
    let (code, so, se) = pith(&["config", "--set", "router.top_k=3"]);
    assert_eq!(code, 0, "{se}");
    let t: toml::Table = toml::from_str(&so).unwrap();
    let get = |table: &str, key: &str| t[table].get(key).cloned();
    assert_eq!(get("router", "top_k"), Some(toml::Value::Integer(3)), "given: kept");
    assert_eq!(get("router", "normalize"), Some(toml::Value::Boolean(true)), "the router's default");
    assert_eq!(get("experts", "ffn"), Some(toml::Value::Integer(128)), "swiglu's default: model.expert_ffn");
    assert_eq!(get("optimizer", "beta2"), Some(toml::Value::Float(0.95)), "adamw's default");
    let losses = t["balance_loss"].as_array().unwrap();
    assert!(losses.iter().all(|l| l.get("coef").is_some()), "{losses:?}");
}
