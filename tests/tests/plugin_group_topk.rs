//! The `group-topk` router plugin (plugins/group-topk: DeepSeek-V2/V3 group-limited routing) end
//! to end, through the `pith` binary: it loads from pith's own directory, passes `pith plugins
//! check` for V2- and V3-style configs (and refuses bad ones in one line naming the key), and the
//! quickstart (8 experts) trains with it, every traced token's experts lying in at most
//! `topk_group` groups.
//!
//! `cargo test --workspace` builds target/<profile>/libgroup_topk.so (a workspace member); the
//! tests build it themselves too (`cargo build -p group-topk`, quick when it is up to date), so that
//! `cargo test -p pith-tests --test plugin_group_topk` runs alone. With `PITH_BIN` (the GPU
//! machine, no cargo) the .so must already lie next to that binary: the `#[ignore]`d GPU tests run
//! there as `PITH_BIN=.device/pith .device/plugin-group-topk-tests --ignored` (see
//! plugins/group-topk/README.md).

use pith_tests::{metrics, out, pith, tmp};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The quickstart, compiled in: the GPU machine has no checkout at this path.
const QUICKSTART: &str = include_str!("../../configs/quickstart.toml");

/// libgroup_topk.so next to the pith under test.
fn plugin_so() -> PathBuf {
    pith_tests::plugin("group-topk")
}

/// The quickstart with its [router] table replaced by `router`, written into `dir`.
fn quickstart_with_router(dir: &Path, router: &str) -> PathBuf {
    let mut cfg: toml::Table = toml::from_str(QUICKSTART).unwrap();
    assert_eq!(cfg["model"]["experts"].as_integer(), Some(8), "the quickstart's expert count changed");
    cfg.insert("router".into(), toml::Value::Table(toml::from_str(router).unwrap()));
    let path = dir.join("quickstart-group-topk.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    path
}

fn num(row: &Value, key: &str) -> f64 {
    row[key].as_f64().unwrap_or_else(|| panic!("no {key} in {row}"))
}

/// The i32 or f32 values of tensor `name` in a safetensors file's bytes.
fn tensor<T>(st: &safetensors::SafeTensors, name: &str, from: fn([u8; 4]) -> T) -> Vec<T> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    t.data().chunks(4).map(|b| from(b.try_into().unwrap())).collect()
}

/// Train the quickstart for 20 steps with `router` (groups of `8 / n_group` experts) on `device`,
/// tracing the first 256 tokens' routing: the loss falls from about ln 256, `router_entropy` is
/// reported (between 0 and ln 8), the host's load counts k experts per token, and every traced
/// token's k distinct experts lie in at most `topk_group` groups with gates summing to `scale`.
fn quickstart_learns_within_the_group_limit(
    device: &str,
    router: &str,
    (k, group, topk_group, scale): (usize, i32, usize, f32),
) {
    plugin_so();
    let dir = tmp(&format!("group-topk-quickstart-{device}-{k}-{group}"));
    let cfg = quickstart_with_router(&dir, router);
    let (run, trace) = (dir.join("run"), dir.join("routing.safetensors"));
    let device = format!("train.device=\"{device}\"");
    let sets = ["--set", &out(&run), "--set", &device, "--set", "train.steps=20", "--set", "train.eval_every=10"];
    let tr = ["--trace-routing", trace.to_str().unwrap(), "--trace-tokens", "256"];
    let (code, stdout, stderr) = pith(&[&["train", cfg.to_str().unwrap()][..], &sets, &tr].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    let m = metrics(&run);
    assert_eq!(m.len(), 20);
    let (first, last) = (num(&m[0], "loss"), num(&m[19], "loss"));
    assert!((first - 256f64.ln()).abs() < 0.3, "initial loss {first} should be about ln(256)");
    assert!(last < first - 1.0, "the loss must fall: {first} -> {last}");
    assert!(num(&m[9], "val_loss").is_finite() && num(&m[19], "val_loss").is_finite());
    for row in &m {
        let h = num(row, "router_entropy");
        assert!(h > 0.0 && h <= 8f64.ln() + 1e-6, "router_entropy {h}: {row}");
        for layer in row["load_per_layer"].as_array().unwrap() {
            let load: f64 = layer.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
            assert_eq!(load, (16 * 64 * k) as f64, "every slot is filled: {row}");
        }
    }
    let bytes = std::fs::read(&trace).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut spread = [0usize; 9];
    for l in 0..2 {
        let ids = tensor(&st, &format!("layers.{l}.expert_ids"), i32::from_le_bytes);
        let gates = tensor(&st, &format!("layers.{l}.gate_weights"), f32::from_le_bytes);
        assert_eq!(ids.len(), 256 * k);
        for (tok, (ids, gates)) in ids.chunks(k).zip(gates.chunks(k)).enumerate() {
            let mut e = ids.to_vec();
            e.sort();
            e.dedup();
            assert!(e.len() == k && e.iter().all(|i| (0..8).contains(i)), "layer {l} token {tok}: ids {ids:?}");
            let mut groups: Vec<i32> = ids.iter().map(|i| i / group).collect();
            groups.sort();
            groups.dedup();
            assert!(groups.len() <= topk_group, "layer {l} token {tok}: experts {ids:?} span groups {groups:?}");
            spread[groups.len()] += 1;
            let sum: f32 = gates.iter().sum();
            assert!((sum - scale).abs() < 1e-4 * scale, "layer {l} token {tok}: gates {gates:?} sum to {sum}");
        }
    }
    // Not vacuous: with k > topk_group, plain top-k would often spread wider than the limit.
    assert!(spread[topk_group] > 0, "no token used {topk_group} groups: {spread:?}");
}

#[test]
fn plugins_list_shows_group_topk_loaded_from_pith_s_directory() {
    let so = plugin_so();
    let (code, stdout, stderr) = pith(&["plugins", "list"]);
    assert_eq!(code, 0, "{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("router") && l.contains("group-topk"));
    let line = line.unwrap_or_else(|| panic!("no group-topk router in:\n{stdout}"));
    assert!(line.contains(so.to_str().unwrap()) && line.contains("DeepSeek"), "{line}");
}

#[test]
fn plugins_check_group_topk_passes_and_its_config_errors_name_the_key() {
    plugin_so();
    // (extra check args, config): the defaults on 8 experts (V2: softmax, max), V3-style (sigmoid,
    // top2, scaled) on the check's 6 experts in 2 groups of 3, one group of 2 kept, unnormalised.
    let cases: [(&[&str], &str); 3] = [
        (&["--experts", "8"], ""),
        (&[], "n_group = 2\nscore = \"sigmoid\"\ngroup_score = \"top2\"\ntop_k = 3\nrouted_scaling_factor = 2.5"),
        (&[], "n_group = 3\ntopk_group = 1\nnormalize = false"),
    ];
    for (extra, config) in cases {
        let args = [&["plugins", "check", "group-topk", "--config", config][..], extra].concat();
        let (code, stdout, stderr) = pith(&args);
        assert_eq!(code, 0, "{args:?}:\n{stdout}{stderr}");
        for want in [
            "determinism:",
            "backward contract: overwrites [\"input x\"], adds to [\"param weight\"]",
            "grad input x: 20 coords",
            "grad param weight: 20 coords",
        ] {
            let pass = |l: &&str| l.starts_with("PASS router `group-topk`") && l.contains(want);
            assert!(stdout.lines().any(|l| pass(&l)), "{args:?}: {want}:\n{stdout}");
        }
        assert!(!stdout.contains("FAIL"), "{stdout}");
    }
    // The check's model has 6 experts: the default n_group = 4 does not divide them.
    for (args, key) in [
        (&["plugins", "check", "group-topk"][..], "`n_group` = 4"),
        (&["plugins", "check", "group-topk", "--experts", "8", "--config", "topk_group = 5"], "`topk_group` = 5"),
        (&["plugins", "check", "group-topk", "--experts", "8", "--config", "top_k = 5"], "`top_k` = 5"),
        (
            &["plugins", "check", "group-topk", "--experts", "8", "--config", "n_group = 8\ngroup_score = \"top2\""],
            "`group_score`",
        ),
        (&["plugins", "check", "group-topk", "--experts", "8", "--config", "score = \"relu\""], "`score`"),
    ] {
        let (code, stdout, stderr) = pith(args);
        assert_eq!(code, 1, "{args:?}: {stdout}");
        let line = pith_tests::one_line(&stderr);
        assert!(line.contains(key), "{args:?}: {line}");
    }
}

/// DeepSeek-V2 style (softmax, a group's best expert), one group of 4 kept: both experts of every
/// token come from the same half of the experts.
#[test]
fn quickstart_trains_with_v2_style_routing_in_one_group() {
    quickstart_learns_within_the_group_limit(
        "cpu",
        "plugin = \"group-topk\"\nn_group = 2\ntopk_group = 1\ntop_k = 2",
        (2, 4, 1, 1.0),
    );
}

/// DeepSeek-V3 style (sigmoid, two best experts a group, normalised and scaled gates), 3 experts
/// within 2 of the 4 groups of 2.
#[test]
fn quickstart_trains_with_v3_style_routing_in_two_groups() {
    let router = "plugin = \"group-topk\"\nn_group = 4\ntopk_group = 2\ntop_k = 3\nscore = \"sigmoid\"\n\
                  group_score = \"top2\"\nrouted_scaling_factor = 2.5";
    quickstart_learns_within_the_group_limit("cpu", router, (3, 2, 2, 2.5));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_kernels_match_the_cpu_path() {
    plugin_so();
    // The CUDA check's model has 8 experts.
    for config in [
        "",
        "n_group = 2\ntopk_group = 1\ntop_k = 3\nnormalize = false",
        "score = \"sigmoid\"\ngroup_score = \"top2\"\ntop_k = 3\nrouted_scaling_factor = 2.5",
        "n_group = 8\ntopk_group = 3\ntop_k = 3\nscore = \"sigmoid\"",
    ] {
        let args = ["plugins", "check", "group-topk", "--device", "cuda", "--experts", "8", "--config", config];
        let (code, stdout, stderr) = pith(&args);
        assert_eq!(code, 0, "config {config:?}:\n{stdout}{stderr}");
        for want in [
            "on cuda: forward ids",
            "on cuda: forward weights",
            "on cuda: backward dx",
            "on cuda: backward (d_probs) grad weight",
        ] {
            assert!(stdout.lines().any(|l| l.starts_with("PASS") && l.contains(want)), "{want}:\n{stdout}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn quickstart_trains_on_cuda_with_group_topk() {
    let router = "plugin = \"group-topk\"\nn_group = 4\ntopk_group = 2\ntop_k = 3\nscore = \"sigmoid\"\n\
                  group_score = \"top2\"\nrouted_scaling_factor = 2.5";
    quickstart_learns_within_the_group_limit("cuda", router, (3, 2, 2, 2.5));
}
