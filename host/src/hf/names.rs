//! Tensor names: every Pith parameter with its shape, and the translation between Pith names
//! and each family's Hugging Face names (per-expert and fused expert tensors).

use super::family::Family;
use crate::config::{ModelConfig, QkNorm};

/// Name and shape of every checkpointed parameter of a Pith model of `family`: the std
/// topk-softmax router (DeepSeek-V3: sigmoid-bias, whose bias is a buffer) and swiglu experts,
/// with `shared_ffn` > 0 the std shared-swiglu of that FFN size (Qwen2-MoE's with its sigmoid
/// gate), and the first `m.dense_layers` with a std shared-swiglu of FFN `dense_ffn` as
/// `[dense]`; GPT-OSS: the router's bias and the clamped-swiglu experts' three biases; in
/// `Model::new`'s order.
pub fn pith_params(m: &ModelConfig, family: Family, shared_ffn: usize, dense_ffn: usize) -> Vec<(String, Vec<usize>)> {
    let shared_gate = family == Family::Qwen2Moe;
    let (h, qd, kd, e, f) = (m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim, m.experts, m.expert_ffn);
    let mut v = vec![("embed.weight".to_string(), vec![m.vocab, h])];
    for l in 0..m.layers {
        let mut add = |name: &str, shape: Vec<usize>| v.push((format!("layers.{l}.{name}"), shape));
        add("attn_norm.weight", vec![h]);
        match m.mla {
            None => {
                add("attn.q_proj.weight", vec![qd, h]);
                add("attn.k_proj.weight", vec![kd, h]);
                add("attn.v_proj.weight", vec![kd, h]);
                add("attn.o_proj.weight", vec![h, qd]);
            }
            Some(a) => {
                match a.q_rank {
                    0 => add("attn.q_proj.weight", vec![qd, h]),
                    r => add("attn.q_b_proj.weight", vec![qd, r]),
                }
                add("attn.kv_a_proj.weight", vec![a.kv_rank + a.rope_dim, h]);
                add("attn.kv_b_proj.weight", vec![m.heads * (m.head_dim - a.rope_dim + a.v_dim), a.kv_rank]);
                add("attn.o_proj.weight", vec![h, m.heads * a.v_dim]);
                add("attn.kv_a_norm.weight", vec![a.kv_rank]);
                if a.q_rank > 0 {
                    add("attn.q_a_proj.weight", vec![a.q_rank, h]);
                    add("attn.q_a_norm.weight", vec![a.q_rank]);
                }
            }
        }
        let qk = match m.qk_norm {
            QkNorm::Head if m.mla.is_none() => Some((m.head_dim, m.head_dim)),
            QkNorm::Full if m.mla.is_none() => Some((qd, kd)),
            _ => None,
        };
        if let Some((qn, kn)) = qk {
            add("attn.q_norm.weight", vec![qn]);
            add("attn.k_norm.weight", vec![kn]);
        }
        if m.qkv_bias {
            add("attn.q_proj.bias", vec![qd]);
            add("attn.k_proj.bias", vec![kd]);
            add("attn.v_proj.bias", vec![kd]);
        }
        if m.o_bias {
            add("attn.o_proj.bias", vec![h]);
        }
        if m.attn_sinks {
            add("attn.sinks", vec![m.heads]);
        }
        add("moe_norm.weight", vec![h]);
        if l < m.dense_layers {
            add("dense.w_gate", vec![1, h, dense_ffn]);
            add("dense.w_up", vec![1, h, dense_ffn]);
            add("dense.w_down", vec![1, dense_ffn, h]);
            continue;
        }
        add("moe.router.weight", vec![e, h]);
        if matches!(family, Family::DeepseekV3 | Family::GptOss) {
            add("moe.router.bias", vec![e]);
        }
        add("moe.experts.w_gate", vec![e, h, f]);
        add("moe.experts.w_up", vec![e, h, f]);
        add("moe.experts.w_down", vec![e, f, h]);
        if family == Family::GptOss {
            add("moe.experts.b_gate", vec![e, f]);
            add("moe.experts.b_up", vec![e, f]);
            add("moe.experts.b_down", vec![e, h]);
        }
        if shared_ffn > 0 {
            add("moe.shared.w_gate", vec![1, h, shared_ffn]);
            add("moe.shared.w_up", vec![1, h, shared_ffn]);
            add("moe.shared.w_down", vec![1, shared_ffn, h]);
            if shared_gate {
                add("moe.shared.gate", vec![1, h]);
            }
        }
    }
    v.push(("final_norm.weight".into(), vec![h]));
    v.push(("lm_head.weight".into(), vec![m.vocab, h]));
    v
}

/// How many HF [out, in] matrices a Pith expert stack [E, in, out] holds — `experts` for the
/// routed experts, 1 for the shared expert and a dense layer's FFN — or None for a parameter
/// HF stores whole (GPT-OSS's experts: fused tensors).
pub(super) fn stack(f: Family, pith: &str, experts: usize) -> Option<usize> {
    match pith {
        p if p.contains(".moe.experts.w_") && f != Family::GptOss => Some(experts),
        p if p.contains(".moe.shared.w_") || p.contains(".dense.w_") => Some(1),
        _ => None,
    }
}

/// The HF name of a Pith parameter (of expert `e` for an expert stack).
pub(super) fn hf_name(f: Family, pith: &str, e: usize) -> String {
    match pith {
        "embed.weight" => return "model.embed_tokens.weight".into(),
        "final_norm.weight" => return "model.norm.weight".into(),
        "lm_head.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let (l, rest) = pith.strip_prefix("layers.").and_then(|r| r.split_once('.')).expect("a layer parameter");
    let [gate, up, down] = f.expert_names();
    let gpt_oss = f == Family::GptOss;
    let rest = match rest {
        "moe.router.weight" | "moe.router.bias" if gpt_oss => format!("mlp.{}", rest.strip_prefix("moe.").unwrap()),
        "moe.experts.w_gate" | "moe.experts.w_up" if gpt_oss => "mlp.experts.gate_up_proj".into(),
        "moe.experts.b_gate" | "moe.experts.b_up" => "mlp.experts.gate_up_proj_bias".into(),
        "moe.experts.w_down" if gpt_oss => "mlp.experts.down_proj".into(),
        "moe.experts.b_down" => "mlp.experts.down_proj_bias".into(),
        "attn_norm.weight" => "input_layernorm.weight".into(),
        "moe_norm.weight" => "post_attention_layernorm.weight".into(),
        "moe.router.weight" => format!("{}.gate.weight", f.moe()),
        "moe.router.bias" => format!("{}.gate.e_score_correction_bias", f.moe()),
        "moe.experts.w_gate" => format!("{}.experts.{e}.{gate}.weight", f.moe()),
        "moe.experts.w_up" => format!("{}.experts.{e}.{up}.weight", f.moe()),
        "moe.experts.w_down" => format!("{}.experts.{e}.{down}.weight", f.moe()),
        "moe.shared.w_gate" => format!("mlp.{}.gate_proj.weight", f.shared()),
        "moe.shared.w_up" => format!("mlp.{}.up_proj.weight", f.shared()),
        "moe.shared.w_down" => format!("mlp.{}.down_proj.weight", f.shared()),
        "moe.shared.gate" => "mlp.shared_expert_gate.weight".into(),
        "dense.w_gate" => "mlp.gate_proj.weight".into(),
        "dense.w_up" => "mlp.up_proj.weight".into(),
        "dense.w_down" => "mlp.down_proj.weight".into(),
        "attn.kv_a_proj.weight" => "self_attn.kv_a_proj_with_mqa.weight".into(),
        "attn.kv_a_norm.weight" => "self_attn.kv_a_layernorm.weight".into(),
        "attn.q_a_norm.weight" => "self_attn.q_a_layernorm.weight".into(),
        r => format!("self_attn.{}", r.strip_prefix("attn.").expect("an attention parameter")),
    };
    format!("model.layers.{l}.{rest}")
}

/// Where an HF tensor goes in a Pith model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Slot {
    /// The whole parameter, same layout.
    Whole,
    /// Expert e's [out, in] matrix, transposed into slot e of an expert stack.
    Expert(usize),
    /// A fused [E, 2F, H] gate_up_proj: gate rows into `w_gate`, up rows into `w_up`.
    GateUp,
    /// A fused [E, H, F] down_proj into `w_down`.
    Down,
    /// GPT-OSS's fused [.., 2F] gate_up_proj (or its bias) with gate and up interleaved by
    /// column: even columns into `w_gate` (`b_gate`), odd into `w_up` (`b_up`).
    GateUpCols,
    /// Not a weight (a saved RoPE table).
    Skip,
}

/// The Pith parameter an HF tensor name of family `f` belongs to, or None.
pub(super) fn translate(f: Family, name: &str) -> Option<(String, Slot)> {
    if name.ends_with("rotary_emb.inv_freq") {
        return Some((String::new(), Slot::Skip));
    }
    match name {
        "model.embed_tokens.weight" => return Some(("embed.weight".into(), Slot::Whole)),
        "model.norm.weight" => return Some(("final_norm.weight".into(), Slot::Whole)),
        "lm_head.weight" => return Some(("lm_head.weight".into(), Slot::Whole)),
        _ => {}
    }
    let (l, rest) = name.strip_prefix("model.layers.")?.split_once('.')?;
    let l: usize = l.parse().ok()?;
    let at = |s: &str, slot| Some((format!("layers.{l}.{s}"), slot));
    match rest {
        "input_layernorm.weight" => return at("attn_norm.weight", Slot::Whole),
        "post_attention_layernorm.weight" => return at("moe_norm.weight", Slot::Whole),
        _ => {}
    }
    if let Some(a) = rest.strip_prefix("self_attn.") {
        let mla = match a {
            "kv_a_proj_with_mqa.weight" => Some("kv_a_proj"),
            "kv_a_layernorm.weight" => Some("kv_a_norm"),
            "q_a_layernorm.weight" => Some("q_a_norm"),
            _ => None,
        };
        if let Some(w) = mla {
            return at(&format!("attn.{w}.weight"), Slot::Whole);
        }
        if a == "sinks" {
            return at("attn.sinks", Slot::Whole);
        }
        let known = ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "q_a_proj", "q_b_proj", "kv_b_proj"];
        if let Some(w) = a.strip_suffix(".bias").filter(|w| ["q_proj", "k_proj", "v_proj", "o_proj"].contains(w)) {
            return at(&format!("attn.{w}.bias"), Slot::Whole);
        }
        let w = a.strip_suffix(".weight").filter(|w| known.contains(w))?;
        return at(&format!("attn.{w}.weight"), Slot::Whole);
    }
    let moe = rest.strip_prefix("mlp.").or_else(|| rest.strip_prefix("block_sparse_moe."))?;
    let gpt_oss = f == Family::GptOss;
    match moe {
        "router.weight" => return at("moe.router.weight", Slot::Whole),
        "router.bias" => return at("moe.router.bias", Slot::Whole),
        "experts.gate_up_proj" if gpt_oss => return at("moe.experts.w_gate", Slot::GateUpCols),
        "experts.gate_up_proj_bias" => return at("moe.experts.b_gate", Slot::GateUpCols),
        "experts.down_proj" if gpt_oss => return at("moe.experts.w_down", Slot::Whole),
        "experts.down_proj_bias" => return at("moe.experts.b_down", Slot::Whole),
        "gate.weight" => return at("moe.router.weight", Slot::Whole),
        "gate.e_score_correction_bias" => return at("moe.router.bias", Slot::Whole),
        "experts.gate_up_proj" => return at("moe.experts.w_gate", Slot::GateUp),
        "experts.down_proj" => return at("moe.experts.w_down", Slot::Down),
        "shared_expert_gate.weight" => return at("moe.shared.gate", Slot::Whole),
        "gate_proj.weight" => return at("dense.w_gate", Slot::Expert(0)),
        "up_proj.weight" => return at("dense.w_up", Slot::Expert(0)),
        "down_proj.weight" => return at("dense.w_down", Slot::Expert(0)),
        _ => {}
    }
    if let Some(w) = moe.strip_prefix("shared_expert.").or_else(|| moe.strip_prefix("shared_experts.")) {
        let which = match w {
            "gate_proj.weight" => "w_gate",
            "up_proj.weight" => "w_up",
            "down_proj.weight" => "w_down",
            _ => return None,
        };
        return at(&format!("moe.shared.{which}"), Slot::Expert(0));
    }
    let (e, w) = moe.strip_prefix("experts.")?.split_once('.')?;
    let which = match w {
        "gate_proj.weight" | "w1.weight" => "w_gate",
        "up_proj.weight" | "w3.weight" => "w_up",
        "down_proj.weight" | "w2.weight" => "w_down",
        _ => return None,
    };
    at(&format!("moe.experts.{which}"), Slot::Expert(e.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::hf::build;
    use crate::hf::family::FAMILIES;
    use crate::registry::Registry;

    #[test]
    fn names_translate_both_ways() {
        let m: ModelConfig = toml::from_str(
            "vocab = 8\nhidden = 4\nlayers = 2\nheads = 2\nkv_heads = 1\nhead_dim = 2\nseq_len = 4\nexperts = 3\n\
             expert_ffn = 5",
        )
        .unwrap();
        for (f, q_rank) in FAMILIES.into_iter().map(|f| (f, 0)).chain([(Family::DeepseekV2, 3)]) {
            let (qkv_bias, shared) = match f {
                Family::Qwen2Moe => (true, 6),
                Family::DeepseekV2 | Family::DeepseekV3 => (false, 10),
                Family::GptOss => (true, 0),
                _ => (false, 0),
            };
            let mla = f.deepseek().then_some(crate::config::Mla { kv_rank: 4, q_rank, rope_dim: 2, v_dim: 2 });
            let gpt_oss = f == Family::GptOss;
            let m =
                ModelConfig { qk_norm: f.qk_norm(), qkv_bias, mla, o_bias: gpt_oss, attn_sinks: gpt_oss, ..m.clone() };
            let m = ModelConfig { dense_layers: f.deepseek() as usize, ..m };
            for (name, _) in pith_params(&m, f, shared, 7) {
                let e = stack(f, &name, 3).map_or(0, |n| n - 1);
                let want = match stack(f, &name, 3) {
                    Some(_) => (name.clone(), Slot::Expert(e)),
                    // GPT-OSS's gate and up (weights, biases) share one fused tensor, named by gate.
                    None if gpt_oss && name.contains("_up") => (name.replace("_up", "_gate"), Slot::GateUpCols),
                    None if gpt_oss && name.contains("_gate") => (name.clone(), Slot::GateUpCols),
                    None => (name.clone(), Slot::Whole),
                };
                assert_eq!(translate(f, &hf_name(f, &name, e)), Some(want), "{f:?} {name}");
            }
        }
        let fused = translate(Family::Qwen3Moe, "model.layers.1.mlp.experts.gate_up_proj");
        assert_eq!(fused, Some(("layers.1.moe.experts.w_gate".into(), Slot::GateUp)));
        let skip = translate(Family::Mixtral, "model.layers.0.self_attn.rotary_emb.inv_freq");
        assert_eq!(skip.map(|t| t.1), Some(Slot::Skip));
        assert_eq!(translate(Family::Qwen2Moe, "model.layers.0.mlp.shared_expert.up_proj.bias"), None);
    }

    /// `pith_params` lists exactly what `Model::new` declares with the std router and experts
    /// (and Qwen2-MoE's biases and gated shared expert).
    #[test]
    fn pith_params_match_the_model() {
        let text = "[model]\nvocab = 8\nhidden = 4\nlayers = 2\nheads = 2\nkv_heads = 1\nhead_dim = 2\nseq_len = 4\n\
                    experts = 3\nexpert_ffn = 5\n[train]\nsteps = 1\nmicro_batch = 1\nlr = 0.1\n\
                    [router]\nplugin = \"topk-softmax\"\n[experts]\nplugin = \"swiglu\"\n[optimizer]\nplugin = \"adamw\"\n";
        let reg = Registry::load(&[]).unwrap();
        let qwen2 = "model.qkv_bias=true\nshared.plugin=\"shared-swiglu\"\nshared.ffn=6\nshared.gate=true";
        // MLA ([model.mla] below), a dense first layer, two shared experts.
        let deepseek = "model.kv_heads=2\nmodel.head_dim=4\nshared.plugin=\"shared-swiglu\"\nshared.ffn=10\n\
                        model.dense_layers=1\ndense.plugin=\"shared-swiglu\"\ndense.ffn=7";
        let mla = "[model.mla]\nkv_rank = 5\nq_rank = 3\nrope_dim = 2\nv_dim = 3\n";
        for (qk, extra, shared) in
            [("head", "", 0), ("full", "", 0), ("none", "", 0), ("none", qwen2, 6), ("none", deepseek, 10)]
        {
            let mut sets = vec![format!("model.qk_norm=\"{qk}\"")];
            sets.extend(extra.lines().filter(|l| !l.is_empty()).map(String::from));
            let text = if extra == deepseek { format!("{text}{mla}") } else { text.to_string() };
            let cfg = Config::parse("t", &text, &sets).unwrap();
            let (_, params, _) = build(&cfg, &reg).unwrap();
            let got: Vec<(String, Vec<usize>)> =
                params.list.iter().map(|p| (p.name.clone(), crate::hf::shape(p))).collect();
            let (f, dense) = match extra {
                e if e == qwen2 => (Family::Qwen2Moe, 0),
                e if e == deepseek => (Family::DeepseekV2, 7),
                _ => (Family::Qwen3Moe, 0),
            };
            assert_eq!(got, pith_params(&cfg.model, f, shared, dense), "qk_norm = {qk} {extra}");
        }
    }
}
