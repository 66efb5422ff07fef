//! Hugging Face interop through the `pith` binary: import of synthetic HF folders this file
//! writes itself (sharded with an index or single-file, F32/BF16/F16, per-expert or fused
//! experts, each family), export → import round trips, `init_from`, `eval-logits`, tokenizer
//! files, and every bad input failing in one line without leaving output behind. The parity run
//! against transformers itself (scripts/hf_parity.py) runs when python3 can import it.

use pith::checkpoint::{read_tensors, Saved, TensorMap};
use pith::config::ModelConfig;
use pith::rng::Rng;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/hf_parity.py");

fn tmp(name: &str) -> pith_tests::Scratch {
    pith_tests::tmp(&format!("hf-{name}"))
}

/// (exit code, stdout, stderr), with the `sigmoid-bias` plugin (DeepSeek-V3's router) and
/// `clamped-swiglu` (GPT-OSS's experts) beside pith.
fn pith(args: &[&str]) -> (i32, String, String) {
    pith_tests::plugin("sigmoid-bias");
    pith_tests::plugin("clamped-swiglu");
    pith_tests::split(pith_tests::command().args(args).env("PITH_LOG", "warn").output().unwrap())
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = pith(args);
    assert_eq!(code, 0, "pith {args:?}:\n{out}{err}");
    out
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Arch {
    Qwen3,
    Mixtral,
    Olmoe,
    Qwen2,
    Deepseek,
    DeepseekV3,
    GptOss,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::Qwen3 => "Qwen3MoeForCausalLM",
            Arch::Mixtral => "MixtralForCausalLM",
            Arch::Olmoe => "OlmoeForCausalLM",
            Arch::Qwen2 => "Qwen2MoeForCausalLM",
            Arch::Deepseek => "DeepseekV2ForCausalLM",
            Arch::DeepseekV3 => "DeepseekV3ForCausalLM",
            Arch::GptOss => "GptOssForCausalLM",
        }
    }
    fn deepseek(self) -> bool {
        matches!(self, Arch::Deepseek | Arch::DeepseekV3)
    }
    fn family(self) -> pith::hf::Family {
        use pith::hf::Family::*;
        [Qwen3Moe, Mixtral, Olmoe, Qwen2Moe, DeepseekV2, DeepseekV3, GptOss][self as usize]
    }
    fn qk(self) -> &'static str {
        match self {
            Arch::Qwen3 => "head",
            Arch::Mixtral | Arch::Qwen2 | Arch::Deepseek | Arch::DeepseekV3 | Arch::GptOss => "none",
            Arch::Olmoe => "full",
        }
    }
    /// The shared expert's FFN size (Qwen2-MoE's gated one, DeepSeek-V2's two of 8, V3's one; 0: none).
    fn shared(self) -> usize {
        match self {
            Arch::Qwen2 => 6,
            Arch::Deepseek => 16,
            Arch::DeepseekV3 => 8,
            _ => 0,
        }
    }
}

const ARCHS: [Arch; 7] =
    [Arch::Qwen3, Arch::Mixtral, Arch::Olmoe, Arch::Qwen2, Arch::Deepseek, Arch::DeepseekV3, Arch::GptOss];
const E: usize = 4;

/// vocab 72, hidden 16, 2 layers, 4 heads of 4 (2 kv heads), 4 experts of ffn 8, top-2, 16 positions.
fn config_json(a: Arch) -> Value {
    let mut c = json!({
        "architectures": [a.name()], "vocab_size": 72, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts_per_tok": 2,
        "max_position_embeddings": 16, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": false,
    });
    let extra = match a {
        Arch::Qwen3 => json!({"model_type": "qwen3_moe", "head_dim": 4, "num_experts": E, "moe_intermediate_size": 8,
                              "intermediate_size": 32, "norm_topk_prob": true, "rope_theta": 10000.0}),
        Arch::Mixtral => json!({"model_type": "mixtral", "head_dim": 4, "num_local_experts": E, "intermediate_size": 8,
                                "rope_theta": 1e6, "sliding_window": null}),
        Arch::Olmoe => json!({"model_type": "olmoe", "num_experts": E, "intermediate_size": 8, "norm_topk_prob": false,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "clip_qkv": null}),
        Arch::Qwen2 => json!({"model_type": "qwen2_moe", "num_experts": E, "moe_intermediate_size": 8,
                              "shared_expert_intermediate_size": 6, "intermediate_size": 32, "norm_topk_prob": false,
                              "rope_theta": 10000.0}),
        // MLA: 4 heads, q·k 4 = 2 + 2 rotated ("head_dim" is the rotated part), values 3, kv rank 6;
        // layer 0 dense (FFN intermediate_size 32), gates scaled by 2.5, YaRN RoPE (V2-Lite's).
        Arch::Deepseek => json!({"model_type": "deepseek_v2", "num_key_value_heads": 4, "n_routed_experts": E,
                                 "moe_intermediate_size": 8, "n_shared_experts": 2, "intermediate_size": 32,
                                 "kv_lora_rank": 6, "q_lora_rank": null, "qk_rope_head_dim": 2, "qk_nope_head_dim": 2,
                                 "v_head_dim": 3, "head_dim": 2, "first_k_dense_replace": 1, "topk_method": "greedy",
                                 "routed_scaling_factor": 2.5, "norm_topk_prob": false, "rope_theta": 10000.0,
                                 "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                                  "mscale_all_dim": 0.707}}),
        // V3: compressed q (rank 5), a dense first layer, sigmoid routing with a correction bias
        // over 2 groups of 2 experts keeping 1, normalised gates scaled by 2.5, one shared expert.
        Arch::DeepseekV3 => json!({"model_type": "deepseek_v3", "num_key_value_heads": 4, "n_routed_experts": E,
                                   "moe_intermediate_size": 8, "n_shared_experts": 1, "intermediate_size": 32,
                                   "kv_lora_rank": 6, "q_lora_rank": 5, "qk_rope_head_dim": 2, "qk_nope_head_dim": 2,
                                   "v_head_dim": 3, "head_dim": 2, "first_k_dense_replace": 1, "n_group": 2,
                                   "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 2.5,
                                   "rope_interleave": true, "rope_theta": 10000.0, "num_nextn_predict_layers": 1}),
        // Biases on q/k/v/o, sinks, a window of 4 keys on layer 0, the clamped SwiGLU, YaRN untruncated.
        Arch::GptOss => json!({"model_type": "gpt_oss", "head_dim": 4, "num_local_experts": E, "intermediate_size": 8,
                               "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
                               "attention_bias": true, "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
                               "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                                   "original_max_position_embeddings": 8, "beta_fast": 32.0,
                                                   "beta_slow": 1.0, "truncate": false}}),
    };
    c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    c
}

fn model_config(a: Arch) -> ModelConfig {
    let mla = match a {
        Arch::Deepseek => "rope_interleaved = true\ndense_layers = 1\n[mla]\nkv_rank = 6\nrope_dim = 2\nv_dim = 3",
        Arch::DeepseekV3 => {
            "rope_interleaved = true\ndense_layers = 1\n[mla]\nkv_rank = 6\nq_rank = 5\nrope_dim = 2\nv_dim = 3"
        }
        Arch::GptOss => "o_bias = true\nattn_sinks = true\nsliding_window = 4\nwindow_layers = [0]",
        _ => "",
    };
    let text = format!(
        "vocab = 72\nhidden = 16\nlayers = 2\nheads = 4\nkv_heads = {}\nhead_dim = 4\nseq_len = 16\nexperts = {E}\n\
         expert_ffn = 8\nqk_norm = \"{}\"\nqkv_bias = {}\n{mla}",
        if a.deepseek() { 4 } else { 2 },
        a.qk(),
        matches!(a, Arch::Qwen2 | Arch::GptOss)
    );
    toml::from_str(&text).unwrap()
}

/// Random weights in Pith's names and layouts, each value k/256 or (norms) k/128 with |k| < 256,
/// so F32, BF16 and F16 all hold them exactly.
fn pith_weights(a: Arch, seed: u64) -> TensorMap {
    let mut r = Rng::new(seed);
    let mut out = BTreeMap::new();
    let dense_ffn = if a.deepseek() { 32 } else { 0 };
    for (name, shape) in pith::hf::pith_params(&model_config(a), a.family(), a.shared(), dense_ffn) {
        let n: usize = shape.iter().product();
        let v = match name.ends_with("norm.weight") {
            true => (0..n).map(|_| (96 + r.below(64)) as f32 / 128.0).collect(),
            false => (0..n).map(|_| (r.below(255) as f32 - 127.0) / 256.0).collect(),
        };
        out.insert(name, (shape, v));
    }
    out
}

/// Expert e of a Pith stack [E, in, out] as an HF [out, in] matrix.
fn expert(t: &(Vec<usize>, Vec<f32>), e: usize) -> Vec<f32> {
    let (i, o) = (t.0[1], t.0[2]);
    let slot = &t.1[e * i * o..][..i * o];
    (0..o).flat_map(|r| (0..i).map(move |c| slot[c * o + r])).collect()
}

/// The HF tensors of Pith weights `w`: per-expert (Mixtral: `block_sparse_moe` with w1/w3/w2) or
/// fused the transformers-5 way (`mlp.experts.gate_up_proj` [E, 2F, H], `down_proj` [E, H, F]).
fn hf_tensors(a: Arch, w: &TensorMap, fused: bool) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut v = Vec::new();
    let mut put = |name: String, pith: &str| v.push((name, w[pith].0.clone(), w[pith].1.clone()));
    put("model.embed_tokens.weight".into(), "embed.weight");
    let mut out = Vec::new();
    for l in 0..2 {
        let (hl, pl) = (format!("model.layers.{l}"), format!("layers.{l}"));
        put(format!("{hl}.input_layernorm.weight"), &format!("{pl}.attn_norm.weight"));
        let mla = [
            ("kv_a_proj_with_mqa", "kv_a_proj"),
            ("kv_a_layernorm", "kv_a_norm"),
            ("kv_b_proj", "kv_b_proj"),
            ("q_a_proj", "q_a_proj"),
            ("q_a_layernorm", "q_a_norm"),
            ("q_b_proj", "q_b_proj"),
        ];
        for (x, px) in
            ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"].map(|x| (x, x)).into_iter().chain(mla)
        {
            if w.contains_key(&format!("{pl}.attn.{px}.weight")) {
                put(format!("{hl}.self_attn.{x}.weight"), &format!("{pl}.attn.{px}.weight"));
            }
            if w.contains_key(&format!("{pl}.attn.{x}.bias")) {
                put(format!("{hl}.self_attn.{x}.bias"), &format!("{pl}.attn.{x}.bias"));
            }
        }
        if w.contains_key(&format!("{pl}.attn.sinks")) {
            put(format!("{hl}.self_attn.sinks"), &format!("{pl}.attn.sinks"));
        }
        put(format!("{hl}.post_attention_layernorm.weight"), &format!("{pl}.moe_norm.weight"));
        if a == Arch::GptOss {
            // The router with its bias; gate and up fused [.., 2F] with alternating columns.
            put(format!("{hl}.mlp.router.weight"), &format!("{pl}.moe.router.weight"));
            put(format!("{hl}.mlp.router.bias"), &format!("{pl}.moe.router.bias"));
            let t = |n: &str| &w[&format!("{pl}.moe.experts.{n}")];
            let alternate = |g: &[f32], u: &[f32]| g.iter().zip(u).flat_map(|(g, u)| [*g, *u]).collect::<Vec<f32>>();
            out.push((
                format!("{hl}.mlp.experts.gate_up_proj"),
                vec![E, 16, 16],
                alternate(&t("w_gate").1, &t("w_up").1),
            ));
            out.push((
                format!("{hl}.mlp.experts.gate_up_proj_bias"),
                vec![E, 16],
                alternate(&t("b_gate").1, &t("b_up").1),
            ));
            put(format!("{hl}.mlp.experts.down_proj"), &format!("{pl}.moe.experts.w_down"));
            put(format!("{hl}.mlp.experts.down_proj_bias"), &format!("{pl}.moe.experts.b_down"));
            continue;
        }
        if w.contains_key(&format!("{pl}.dense.w_gate")) {
            for (n, hn) in [("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")] {
                let t = &w[&format!("{pl}.dense.{n}")];
                out.push((format!("{hl}.mlp.{hn}.weight"), vec![t.0[2], t.0[1]], expert(t, 0)));
            }
            continue;
        }
        let moe = if a == Arch::Mixtral && !fused { "block_sparse_moe" } else { "mlp" };
        put(format!("{hl}.{moe}.gate.weight"), &format!("{pl}.moe.router.weight"));
        if w.contains_key(&format!("{pl}.moe.router.bias")) {
            put(format!("{hl}.mlp.gate.e_score_correction_bias"), &format!("{pl}.moe.router.bias"));
        }
        let [g, u, d] = ["w_gate", "w_up", "w_down"].map(|n| &w[&format!("{pl}.moe.experts.{n}")]);
        if fused {
            let gate_up = (0..E).flat_map(|e| [expert(g, e), expert(u, e)].concat()).collect();
            out.push((format!("{hl}.mlp.experts.gate_up_proj"), vec![E, 16, 16], gate_up));
            let down = (0..E).flat_map(|e| expert(d, e)).collect();
            out.push((format!("{hl}.mlp.experts.down_proj"), vec![E, 16, 8], down));
        } else {
            let names = if a == Arch::Mixtral { ["w1", "w3", "w2"] } else { ["gate_proj", "up_proj", "down_proj"] };
            for e in 0..E {
                for (t, n) in [g, u, d].into_iter().zip(names) {
                    out.push((format!("{hl}.{moe}.experts.{e}.{n}.weight"), vec![t.0[2], t.0[1]], expert(t, e)));
                }
            }
        }
        if a.shared() > 0 {
            let module = if a.deepseek() { "shared_experts" } else { "shared_expert" };
            for (n, hn) in [("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")] {
                let t = &w[&format!("{pl}.moe.shared.{n}")];
                out.push((format!("{hl}.mlp.{module}.{hn}.weight"), vec![t.0[2], t.0[1]], expert(t, 0)));
            }
            if a == Arch::Qwen2 {
                put(format!("{hl}.mlp.shared_expert_gate.weight"), &format!("{pl}.moe.shared.gate"));
            }
        }
    }
    put("model.norm.weight".into(), "final_norm.weight");
    put("lm_head.weight".into(), "lm_head.weight");
    v.extend(out);
    v
}

fn encode(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    let f16 = |x: f32| -> u16 {
        if x == 0.0 {
            return 0;
        }
        let b = x.to_bits();
        let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
        (((b >> 16) & 0x8000) | ((exp as u32) << 10) | ((b >> 13) & 0x3ff)) as u16
    };
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect(),
        Dtype::F16 => v.iter().flat_map(|&x| f16(x).to_le_bytes()).collect(),
        Dtype::F64 => v.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
        _ => unreachable!(),
    }
}

/// Write an HF folder: config.json and `tensors` in `shards` files (with an index when more
/// than one), the i-th tensor in `dtype(i)`.
fn write_hf(
    dir: &Path,
    config: &Value,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    shards: usize,
    dtype: fn(usize) -> Dtype,
) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    let file = |s: usize| match shards {
        1 => "model.safetensors".to_string(),
        n => format!("model-{:05}-of-{n:05}.safetensors", s + 1),
    };
    let bytes: Vec<Vec<u8>> = tensors.iter().enumerate().map(|(i, t)| encode(dtype(i), &t.2)).collect();
    let mut map = serde_json::Map::new();
    for s in 0..shards {
        let mut views = Vec::new();
        for (i, t) in tensors.iter().enumerate().filter(|(i, _)| i * shards / tensors.len() == s) {
            views.push((t.0.clone(), TensorView::new(dtype(i), t.1.clone(), &bytes[i]).unwrap()));
            map.insert(t.0.clone(), json!(file(s)));
        }
        safetensors::serialize_to_file(views, &None, &dir.join(file(s))).unwrap();
    }
    if shards > 1 {
        let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

fn checkpoint_weights(run: &Path) -> TensorMap {
    read_tensors(&run.join("checkpoints/step_00000000/model.safetensors")).unwrap()
}

/// Every tensor of an HF folder (all its safetensors files), as f32.
fn read_hf(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(e.path()).unwrap();
            for (name, t) in SafeTensors::deserialize(&bytes).unwrap().tensors() {
                let v = match t.dtype() {
                    Dtype::F32 => t.data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
                    Dtype::BF16 => t
                        .data()
                        .chunks(2)
                        .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                        .collect(),
                    d => panic!("{d:?}"),
                };
                out.insert(name, (t.shape().to_vec(), v));
            }
        }
    }
    out
}

fn as_map(t: Vec<(String, Vec<usize>, Vec<f32>)>) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    t.into_iter().map(|(n, s, v)| (n, (s, v))).collect()
}

fn cycle(i: usize) -> Dtype {
    [Dtype::BF16, Dtype::F32, Dtype::F16][i % 3]
}

/// Each family, per-expert and sharded (3 shards + index) in mixed BF16/F32/F16, or fused in one
/// file, imports to exactly the weights it was made from, with the right config.
#[test]
fn import_reads_each_family_layout_and_dtype_exactly() {
    let root = tmp("import");
    for (i, a) in ARCHS.into_iter().enumerate() {
        let w = pith_weights(a, 1 + i as u64);
        for fused in [false, true] {
            let (src, run) = (root.join(format!("{a:?}-{fused}-hf")), root.join(format!("{a:?}-{fused}-run")));
            let (shards, dtype): (usize, fn(usize) -> Dtype) = if fused { (1, |_| Dtype::F32) } else { (3, cycle) };
            let mut tensors = hf_tensors(a, &w, fused);
            if a == Arch::DeepseekV3 {
                // Its multi-token-prediction layer (num_nextn_predict_layers = 1) is skipped.
                tensors.push(("model.layers.2.eh_proj.weight".into(), vec![2, 2], vec![0.5; 4]));
            }
            write_hf(&src, &config_json(a), &tensors, shards, dtype);
            let out = ok(&["import", "hf", p(&src), "--out", p(&run)]);
            assert!(out.contains(&format!("imported {}", a.name())), "{out}");
            assert_eq!(checkpoint_weights(&run), w, "{a:?} fused={fused}");
            let cfg = std::fs::read_to_string(run.join("config.toml")).unwrap();
            assert!(cfg.contains(&format!("qk_norm = \"{}\"", a.qk())), "{cfg}");
            let normalize = !matches!(a, Arch::Olmoe | Arch::Qwen2 | Arch::Deepseek);
            assert!(cfg.contains(&format!("normalize = {normalize}")), "{cfg}");
            if a == Arch::Deepseek {
                assert!(cfg.contains("scale = 2.5") && cfg.contains("dense_layers = 1"), "{cfg}");
                assert!(cfg.contains("[model.yarn]\nfactor = 4.0\noriginal_seq_len = 8\n"), "{cfg}");
                assert!(cfg.contains("attn_scale = 1.205628"), "m(4, 0.707)²: {cfg}");
            }
            if a == Arch::DeepseekV3 {
                let router =
                    ["plugin = \"sigmoid-bias\"", "routed_scaling_factor = 2.5", "n_group = 2", "topk_group = 1"];
                assert!(router.iter().all(|l| cfg.contains(l)), "{cfg}");
            }
            let entries: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().map(|e| e.file_name()).collect();
            assert!(entries.iter().all(|n| !n.to_string_lossy().contains(".tmp")), "{entries:?}");
        }
    }
}

/// `tie_word_embeddings` without an lm_head tensor imports lm_head as a copy of the embedding.
#[test]
fn tied_embeddings_import_as_a_copy() {
    let root = tmp("tied");
    let a = Arch::Olmoe;
    let mut w = pith_weights(a, 7);
    let mut config = config_json(a);
    config["tie_word_embeddings"] = json!(true);
    let tensors: Vec<_> = hf_tensors(a, &w, false).into_iter().filter(|t| t.0 != "lm_head.weight").collect();
    let (src, run) = (root.join("hf"), root.join("run"));
    write_hf(&src, &config, &tensors, 2, cycle);
    ok(&["import", "hf", p(&src), "--out", p(&run)]);
    w.insert("lm_head.weight".into(), w["embed.weight"].clone());
    assert_eq!(checkpoint_weights(&run), w);
}

/// import → export (sharded F32, and BF16) → import gives the very same weights; the exported
/// tensors are the original per-expert ones, and the folder has config.json, shards and index.
#[test]
fn export_then_import_round_trips_bitwise() {
    let root = tmp("roundtrip");
    for (i, a) in ARCHS.into_iter().enumerate() {
        let w = pith_weights(a, 10 + i as u64);
        let (src, run) = (root.join(format!("{a:?}-hf")), root.join(format!("{a:?}-run")));
        write_hf(&src, &config_json(a), &hf_tensors(a, &w, i == 1), 1, |_| Dtype::F32);
        ok(&["import", "hf", p(&src), "--out", p(&run)]);
        let out = root.join(format!("{a:?}-export"));
        let said = ok(&["export", "hf", p(&run), p(&out), "--max-shard-size", "6KB"]);
        assert!(said.contains(&format!("exported {}", a.name())), "{said}");
        let index: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();
        let files: std::collections::BTreeSet<&str> =
            index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
        assert!(files.len() >= 3 && files.iter().all(|f| out.join(f).is_file()), "{files:?}");
        let config: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["architectures"][0], a.name());
        if a == Arch::DeepseekV3 {
            let v3 =
                (&config["n_group"], &config["topk_group"], &config["topk_method"], &config["routed_scaling_factor"]);
            assert_eq!(v3, (&json!(2), &json!(1), &json!("noaux_tc"), &json!(2.5)), "{config}");
        }
        if a == Arch::Deepseek {
            let dense =
                (&config["first_k_dense_replace"], &config["intermediate_size"], &config["routed_scaling_factor"]);
            assert_eq!(dense, (&json!(1), &json!(32), &json!(2.5)), "{config}");
            let yarn = &config["rope_parameters"];
            assert_eq!(
                (&yarn["rope_type"], &yarn["factor"], &yarn["mscale_all_dim"]),
                (&json!("yarn"), &json!(4.0), &json!(0.707))
            );
        }
        assert_eq!(read_hf(&out), as_map(hf_tensors(a, &w, false)), "{a:?}: exported tensors");
        let again = root.join(format!("{a:?}-again"));
        ok(&["import", "hf", p(&out), "--out", p(&again)]);
        assert_eq!(checkpoint_weights(&again), w, "{a:?}: round trip");
        let bf16 = root.join(format!("{a:?}-bf16"));
        ok(&["export", "hf", p(&run), p(&bf16), "--dtype", "bf16"]);
        assert!(bf16.join("model.safetensors").is_file() && !bf16.join("model.safetensors.index.json").exists());
        let again = root.join(format!("{a:?}-bf16-again"));
        ok(&["import", "hf", p(&bf16), "--out", p(&again)]);
        assert_eq!(checkpoint_weights(&again), w, "{a:?}: bf16 round trip (values are bf16-exact)");
    }
}

/// `eval-logits` gives the same numbers for an HF folder and its imported checkpoint; the loss
/// is the mean next-token cross-entropy of those logits.
#[test]
fn eval_logits_agrees_between_folder_and_checkpoint() {
    let root = tmp("logits");
    let a = Arch::Olmoe;
    let (src, run) = (root.join("hf"), root.join("run"));
    write_hf(&src, &config_json(a), &hf_tensors(a, &pith_weights(a, 3), false), 2, cycle);
    ok(&["import", "hf", p(&src), "--out", p(&run)]);
    let tokens = "5,17,3,71,0,9,9";
    let x: Value = serde_json::from_str(&ok(&["eval-logits", p(&src), "--tokens", tokens])).unwrap();
    let y: Value = serde_json::from_str(&ok(&["eval-logits", p(&run), "--tokens", tokens])).unwrap();
    assert_eq!(x, y);
    let logits = x["logits"].as_array().unwrap();
    assert_eq!((logits.len(), logits[0].as_array().unwrap().len()), (7, 72));
    let ids: Vec<usize> = tokens.split(',').map(|t| t.parse().unwrap()).collect();
    let mut ce = 0.0;
    for (row, &next) in logits.iter().zip(&ids[1..]) {
        let row: Vec<f64> = row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        ce += m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - row[next];
    }
    let loss = x["loss"].as_f64().unwrap();
    assert!((loss - ce / 6.0).abs() < 1e-5, "loss {loss} vs {}", ce / 6.0);
    let (code, _, err) = pith(&["eval-logits", p(&src), "--tokens", "5,72"]);
    assert_eq!(code, 1);
    assert!(err.contains("token id 72 at position 1 is out of range for vocab 72"), "{err}");
}

/// `train.init_from` an HF folder at ep = 2 (two CPU ranks, 2 of the 4 experts each): each rank
/// reads only its experts — from per-expert tensors, from transformers 5's packed gate_up/down,
/// and from GPT-OSS's interleaved columns and per-expert biases — and with lr 0 the checkpoint,
/// written in halves, holds exactly the HF weights.
#[test]
fn init_from_an_hf_folder_at_expert_parallel_reads_each_ranks_experts() {
    let root = tmp("init-ep");
    for (a, fused) in [(Arch::Qwen3, false), (Arch::Qwen3, true), (Arch::GptOss, false)] {
        let w = pith_weights(a, 9);
        let (src, run, out) = (root.join(format!("{a:?}-{fused}")), root.join("imported"), root.join("ep2"));
        write_hf(&src, &config_json(a), &hf_tensors(a, &w, fused), 1, |_| Dtype::F32);
        let _ = std::fs::remove_dir_all(&run);
        ok(&["import", "hf", p(&src), "--out", p(&run)]);
        let sets = [
            "parallel.ep=2".to_string(),
            "comm.plugin=\"alltoall\"".into(),
            "train.lr=0.0".into(),
            "train.steps=1".into(),
            "train.micro_batch=2".into(),
            "train.eval_batches=1".into(),
            format!("train.init_from=\"{}\"", src.display()),
            format!("train.out=\"{}\"", out.display()),
        ];
        let cfg = run.join("config.toml");
        let mut args = vec!["launch", "--gpus", "2", p(&cfg)];
        args.extend(sets.iter().flat_map(|s| ["--set", s.as_str()]));
        let (code, so, se) = pith(&args);
        assert_eq!(code, 0, "{a:?} fused={fused}: {so}{se}");
        let step = out.join("checkpoints/step_00000001");
        assert!(step.join("model-rank00001.safetensors").is_file(), "rank 1 wrote its experts");
        let saved = Saved::open(&step, "model").unwrap();
        let got: TensorMap = saved
            .names()
            .map(|n| (n.to_string(), (saved.shape(n).unwrap().to_vec(), saved.whole(n).unwrap())))
            .collect();
        assert_eq!(got, w, "{a:?} fused={fused}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// `train.init_from` an HF folder starts from its weights (lr 0: the checkpoint after one step
/// equals the import); `--resume` of an imported run trains on; a config for another model is
/// refused naming each difference.
#[test]
fn init_from_and_resume_start_from_the_imported_weights() {
    let root = tmp("init");
    let a = Arch::Qwen3;
    let w = pith_weights(a, 4);
    let (src, run) = (root.join("hf"), root.join("run"));
    write_hf(&src, &config_json(a), &hf_tensors(a, &w, false), 2, cycle);
    ok(&["import", "hf", p(&src), "--out", p(&run)]);
    let cfg = run.join("config.toml");
    let set = |k: &str, v: &str| format!("{k}={v}");
    let quoted = |x: &Path| format!("\"{}\"", x.display());
    let base = |out: &Path| {
        vec![
            set("train.steps", "1"),
            set("train.micro_batch", "2"),
            set("train.eval_batches", "1"),
            set("train.out", &quoted(out)),
        ]
    };
    let args = |extra: Vec<String>| {
        let mut v = vec!["train".to_string(), p(&cfg).to_string()];
        for s in extra {
            v.extend(["--set".to_string(), s]);
        }
        v
    };
    let run_args = |v: Vec<String>| pith(&v.iter().map(String::as_str).collect::<Vec<_>>());
    let frozen = root.join("frozen");
    let mut extra = base(&frozen);
    extra.extend([set("train.lr", "0.0"), set("train.init_from", &quoted(&src))]);
    let (code, out, err) = run_args(args(extra));
    assert_eq!(code, 0, "{out}{err}");
    let after = read_tensors(&frozen.join("checkpoints/step_00000001/model.safetensors")).unwrap();
    assert_eq!(after, w, "lr 0 keeps the weights init_from loaded");
    let ckpt = root.join("from-ckpt");
    let mut extra = base(&ckpt);
    extra.extend([set("train.lr", "0.0"), set("train.init_from", &quoted(&run))]);
    assert_eq!(run_args(args(extra)).0, 0);
    assert_eq!(read_tensors(&ckpt.join("checkpoints/step_00000001/model.safetensors")).unwrap(), w);
    // --resume the imported run itself: steps 1..=2, from step 0.
    let (code, out, err) = run_args(vec![
        "train".into(),
        p(&cfg).into(),
        "--resume".into(),
        p(&run).into(),
        "--set".into(),
        set("train.steps", "2"),
        "--set".into(),
        set("train.micro_batch", "2"),
        "--set".into(),
        set("train.eval_batches", "1"),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(run.join("checkpoints/step_00000002/model.safetensors").is_file());
    let bad = root.join("bad");
    let mut extra = base(&bad);
    extra.extend([set("train.init_from", &quoted(&src)), set("model.rope_theta", "500.0"), set("router.top_k", "1")]);
    let (code, _, err) = run_args(args(extra));
    assert_eq!(code, 1);
    let line = err.trim().lines().last().unwrap();
    assert!(line.contains("train.init_from") && line.contains("config.json: a different model"), "{err}");
    assert!(line.contains("model.rope_theta: config.json has 10000.0, config has 500.0"), "{err}");
    assert!(line.contains("router.top_k: config.json has 2, config has 1"), "{err}");
    assert!(!bad.join("checkpoints").exists());
}

/// A run trained on shards made with a tokenizer exports its tokenizer.json (and a
/// tokenizer_config.json); its separator becomes eos_token_id.
#[test]
fn export_ships_the_runs_tokenizer() {
    use tokenizers::{models::wordlevel::WordLevel, pre_tokenizers::whitespace::Whitespace, AddedToken};
    let root = tmp("tokenizer");
    let words = ["<|endoftext|>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "[UNK]"];
    let vocab = words.iter().enumerate().map(|(i, w)| (w.to_string(), i as u32)).collect();
    let model = WordLevel::builder().vocab(vocab).unk_token("[UNK]".into()).build().unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace));
    tok.add_special_tokens(&[AddedToken::from("<|endoftext|>", true)]);
    let tj = root.join("tokenizer.json");
    tok.save(&tj, false).unwrap();
    let text = "the cat sat on the mat a dog ran on a mat the dog sat ".repeat(60);
    for i in 0..8 {
        std::fs::write(root.join(format!("doc{i}.txt")), &text).unwrap();
    }
    let data = root.join("data");
    let docs: Vec<String> = (0..8).map(|i| p(&root.join(format!("doc{i}.txt"))).to_string()).collect();
    let mut args = vec!["data", "prepare"];
    args.extend(docs.iter().map(String::as_str));
    args.extend(["--out", p(&data), "--tokenizer", p(&tj), "--val-fraction", "0.25"]);
    ok(&args);
    let a = Arch::Mixtral;
    let (src, run) = (root.join("hf"), root.join("run"));
    write_hf(&src, &config_json(a), &hf_tensors(a, &pith_weights(a, 5), false), 1, |_| Dtype::F32);
    ok(&["import", "hf", p(&src), "--out", p(&run)]);
    let trained = root.join("trained");
    let sets = [
        format!("data.source=\"{}\"", data.display()),
        format!("train.out=\"{}\"", trained.display()),
        "train.steps=1".into(),
        "train.micro_batch=2".into(),
        "train.eval_batches=1".into(),
        format!("train.init_from=\"{}\"", run.display()),
    ];
    let cfg = run.join("config.toml");
    let mut args = vec!["train", p(&cfg)];
    sets.iter().for_each(|s| args.extend(["--set", s.as_str()]));
    ok(&args);
    let out = root.join("export");
    let said = ok(&["export", "hf", p(&trained), p(&out)]);
    assert!(said.contains("tokenizer"), "{said}");
    assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), std::fs::read(&tj).unwrap());
    assert!(out.join("tokenizer_config.json").is_file());
    let config: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["eos_token_id"], 0);
    // The import run itself trained on nothing: no tokenizer.
    let bare = root.join("bare");
    assert!(ok(&["export", "hf", p(&run), p(&bare)]).contains("no tokenizer"));
    assert!(!bare.join("tokenizer.json").exists());
}

/// What a bad-input case does to a good HF folder.
type Spoil<'a> = Box<dyn Fn(&Path) + 'a>;

/// Each bad input: exit 1, one line naming the file (and the tensor or field), no output left.
#[test]
fn bad_inputs_fail_in_one_line_and_leave_nothing() {
    let root = tmp("bad");
    let a = Arch::Qwen3;
    let w = pith_weights(a, 6);
    let tensors = hf_tensors(a, &w, false);
    let cases: Vec<(&str, Spoil, Vec<&str>)> = vec![
        (
            "missing shard",
            Box::new(|d: &Path| std::fs::remove_file(d.join("model-00002-of-00003.safetensors")).unwrap()),
            vec!["model.safetensors.index.json: shard `model-00002-of-00003.safetensors` (holding `lm_head.weight`) is missing"],
        ),
        (
            "f64 tensor",
            Box::new(|d: &Path| {
                let t = &tensors;
                write_hf(d, &config_json(a), t, 3, |i| if i == 4 { Dtype::F64 } else { Dtype::F32 })
            }),
            vec!["model-00001-of-00003.safetensors: tensor `model.layers.0.self_attn.v_proj.weight` is F64; Pith reads F32, BF16 and F16"],
        ),
        (
            "wrong shape",
            Box::new(|d: &Path| {
                let mut t = tensors.clone();
                let q = t.iter_mut().find(|t| t.0 == "model.layers.1.self_attn.q_proj.weight").unwrap();
                q.1 = vec![8, 32];
                write_hf(d, &config_json(a), &t, 3, cycle)
            }),
            vec!["tensor `model.layers.1.self_attn.q_proj.weight` has shape [8, 32], the model needs [16, 16]"],
        ),
        (
            "missing tensor",
            Box::new(|d: &Path| {
                let t: Vec<_> =
                    tensors.iter().filter(|t| t.0 != "model.layers.1.mlp.experts.3.up_proj.weight").cloned().collect();
                write_hf(d, &config_json(a), &t, 1, cycle)
            }),
            vec!["model.safetensors: tensor `model.layers.1.mlp.experts.3.up_proj.weight` is missing"],
        ),
        (
            "stray tensor",
            Box::new(|d: &Path| {
                let mut t = tensors.clone();
                t.push(("model.layers.0.mlp.shared_expert.up_proj.weight".into(), vec![2], vec![0.0, 1.0]));
                write_hf(d, &config_json(a), &t, 1, cycle)
            }),
            vec!["model.safetensors: tensor `model.layers.0.mlp.shared_expert.up_proj.weight` has no place in a Pith model"],
        ),
        (
            "unknown architecture",
            Box::new(|d: &Path| {
                let mut c = config_json(a);
                c["architectures"] = json!(["JambaForCausalLM"]);
                std::fs::write(d.join("config.json"), c.to_string()).unwrap()
            }),
            vec!["config.json: unknown architecture `JambaForCausalLM`; Pith imports Qwen3MoeForCausalLM, MixtralForCausalLM, OlmoeForCausalLM"],
        ),
        (
            "sliding window",
            Box::new(|d: &Path| {
                let mut c = config_json(a);
                c["use_sliding_window"] = json!(true);
                c["rope_scaling"] = json!({"rope_type": "longrope", "factor": 2.0});
                std::fs::write(d.join("config.json"), c.to_string()).unwrap()
            }),
            vec!["config.json: Pith can't represent `rope_scaling` = ", "; `use_sliding_window` = true"],
        ),
    ];
    for (what, spoil, wants) in cases {
        let (src, run) = (root.join(what.replace(' ', "-")), root.join(format!("{}-run", what.replace(' ', "-"))));
        write_hf(&src, &config_json(a), &tensors, 3, cycle);
        spoil(&src);
        let (code, out, err) = pith(&["import", "hf", p(&src), "--out", p(&run)]);
        assert_eq!(code, 1, "{what}: {out}{err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
        for want in wants {
            assert!(err.contains(want), "{what}: `{want}` not in: {err}");
        }
        assert!(!run.exists(), "{what}: left {}", run.display());
    }
    // Export: a checkpoint missing a tensor, and a non-std router, leave nothing either.
    let (src, run) = (root.join("ok-hf"), root.join("ok-run"));
    write_hf(&src, &config_json(a), &tensors, 1, cycle);
    ok(&["import", "hf", p(&src), "--out", p(&run)]);
    let step = run.join("checkpoints/step_00000000");
    let mut weights = read_tensors(&step.join("model.safetensors")).unwrap();
    weights.remove("layers.1.moe.router.weight");
    let views: Vec<_> = weights
        .iter()
        .map(|(n, (s, v))| (n.clone(), s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()))
        .collect();
    let views: Vec<_> =
        views.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, &None, &step.join("model.safetensors")).unwrap();
    let out = root.join("export");
    let (code, _, err) = pith(&["export", "hf", p(&run), p(&out)]);
    assert_eq!((code, err.trim().lines().count()), (1, 1), "{err}");
    assert!(err.contains("step_00000000/model.safetensors: tensor `layers.1.moe.router.weight` is missing"), "{err}");
    let text =
        std::fs::read_to_string(step.join("config.toml")).unwrap().replace("plugin = \"swiglu\"", "plugin = \"other\"");
    std::fs::write(step.join("config.toml"), text).unwrap();
    let (code, _, err) = pith(&["export", "hf", p(&run), p(&out)]);
    assert_eq!(code, 1);
    assert!(
        err.contains("covers the std `topk-softmax` router (DeepSeek-V2: `group-topk`, V3: `sigmoid-bias`) and `swiglu` experts only"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!out.exists() && left.iter().all(|n| !n.to_string_lossy().contains(".tmp")), "{left:?}");
    // An existing non-empty output is never written into.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep"), "x").unwrap();
    let (code, _, err) = pith(&["import", "hf", p(&src), "--out", p(&out)]);
    assert_eq!(code, 1);
    assert!(err.contains("exists and is not empty"), "{err}");
}

/// The parity run against transformers (scripts/hf_parity.py): logits and loss of each family
/// against transformers' own forward. Needs python3 with torch and transformers (the GPU machine).
#[test]
#[ignore = "needs python3 with torch and transformers; run with --ignored where they are (docs/performance.md)"]
fn transformers_parity() {
    let have = Command::new("python3").args(["-c", "import torch, transformers"]).output();
    assert!(have.is_ok_and(|o| o.status.success()), "python3 cannot import torch and transformers");
    let work = tmp("parity");
    pith_tests::plugin("sigmoid-bias"); // DeepSeek-V3's router
    pith_tests::plugin("group-topk"); // DeepSeek-V2's group-limited one
    pith_tests::plugin("clamped-swiglu"); // GPT-OSS's experts
    let o = Command::new("python3")
        .arg(if Path::new(SCRIPT).is_file() { SCRIPT } else { "scripts/hf_parity.py" }) // another checkout
        .args([pith_tests::pith_bin().to_str().unwrap(), "--work", p(&work)])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("PASS")).count(),
        ARCHS.len() + 1,
        "one PASS per family (DeepSeek-V2 twice): {text}"
    );
}
