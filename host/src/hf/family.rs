//! The model families Pith imports and exports, and how each names its MoE tensors.

use crate::config::{ModelConfig, QkNorm};

/// A model family Pith imports and exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Qwen3Moe,
    Mixtral,
    Olmoe,
    /// Qwen1.5-MoE / Qwen2-MoE: q/k/v biases and a shared expert with a sigmoid gate per token.
    Qwen2Moe,
    /// DeepSeek-V2 / V2-Lite: multi-head latent attention with interleaved RoPE, shared experts
    /// (no gate), softmax top-k gates that are not renormalised.
    DeepseekV2,
    /// DeepSeek-V3: V2's attention and experts with a sigmoid router, a correction bias that
    /// only chooses (`e_score_correction_bias`) and group-limited top-k: the `sigmoid-bias` router.
    DeepseekV3,
    /// GPT-OSS: biases on q/k/v/o, attention sinks, sliding-window layers, a router with a bias
    /// (softmax over the chosen logits) and the clamped SwiGLU experts (`clamped-swiglu`), whose
    /// gate and up projections are stored fused and interleaved.
    GptOss,
}

pub(super) const FAMILIES: [Family; 7] = [
    Family::Qwen3Moe,
    Family::Mixtral,
    Family::Olmoe,
    Family::Qwen2Moe,
    Family::DeepseekV2,
    Family::DeepseekV3,
    Family::GptOss,
];

impl Family {
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
            Family::Olmoe => "OlmoeForCausalLM",
            Family::Qwen2Moe => "Qwen2MoeForCausalLM",
            Family::DeepseekV2 => "DeepseekV2ForCausalLM",
            Family::DeepseekV3 => "DeepseekV3ForCausalLM",
            Family::GptOss => "GptOssForCausalLM",
        }
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen3Moe => "qwen3_moe",
            Family::Mixtral => "mixtral",
            Family::Olmoe => "olmoe",
            Family::Qwen2Moe => "qwen2_moe",
            Family::DeepseekV2 => "deepseek_v2",
            Family::DeepseekV3 => "deepseek_v3",
            Family::GptOss => "gpt_oss",
        }
    }
    pub(super) fn qk_norm(self) -> QkNorm {
        match self {
            Family::Qwen3Moe => QkNorm::Head,
            Family::Mixtral | Family::Qwen2Moe | Family::DeepseekV2 | Family::DeepseekV3 | Family::GptOss => {
                QkNorm::None
            }
            Family::Olmoe => QkNorm::Full,
        }
    }
    /// The prefix of the MoE block's tensors in a layer.
    pub(super) fn moe(self) -> &'static str {
        match self {
            Family::Mixtral => "block_sparse_moe",
            _ => "mlp",
        }
    }
    /// HF names of an expert's (gate, up, down) matrices.
    pub(super) fn expert_names(self) -> [&'static str; 3] {
        match self {
            Family::Mixtral => ["w1", "w3", "w2"],
            _ => ["gate_proj", "up_proj", "down_proj"],
        }
    }
    /// Does the family name its expert FFN size `moe_intermediate_size` (else `intermediate_size`)?
    pub(super) fn moe_ffn_key(self) -> bool {
        matches!(self, Family::Qwen3Moe | Family::Qwen2Moe | Family::DeepseekV2 | Family::DeepseekV3)
    }
    /// DeepSeek's: MLA, dense first layers, shared experts, scaled gates, YaRN's score scale.
    pub(super) fn deepseek(self) -> bool {
        matches!(self, Family::DeepseekV2 | Family::DeepseekV3)
    }
    /// The HF module of the shared expert(s) in a layer's MLP block.
    pub(super) fn shared(self) -> &'static str {
        match self {
            Family::DeepseekV2 | Family::DeepseekV3 => "shared_experts",
            _ => "shared_expert",
        }
    }
    /// The family a Pith model exports as (GPT-OSS is chosen by its experts, in export's `target`):
    /// DeepSeek-V3 or V2 with MLA (by the router: `sigmoid`,
    /// the sigmoid-bias router), Qwen2-MoE when it has q/k/v biases or a shared expert (`shared`:
    /// that expert's `gate`), else chosen by `model.qk_norm`.
    pub(super) fn of(m: &ModelConfig, sigmoid: bool, normalize: bool, shared: Option<bool>) -> Result<Family, String> {
        if m.mla.is_some() {
            return match (m.rope_interleaved, sigmoid, normalize, shared) {
                (true, true, _, Some(false)) => Ok(Family::DeepseekV3),
                (true, false, false, Some(false)) => Ok(Family::DeepseekV2),
                _ => Err("the exported families with [model.mla] are DeepSeek-V2 and V3, which need \
                          model.rope_interleaved = true and [shared] plugin = \"shared-swiglu\" without a gate, \
                          and the topk-softmax router with normalize = false (V2) or sigmoid-bias (V3)"
                    .into()),
            };
        }
        if m.qkv_bias || shared.is_some() {
            return match (m.qkv_bias, shared, m.qk_norm) {
                (true, Some(true), QkNorm::None) => Ok(Family::Qwen2Moe),
                _ => Err("the exported family with q/k/v biases or a shared expert is Qwen2-MoE, which needs all of \
                          model.qkv_bias = true, model.qk_norm = \"none\" and [shared] plugin = \"shared-swiglu\" \
                          with gate = true"
                    .into()),
            };
        }
        match (m.qk_norm, normalize) {
            (QkNorm::None, false) => Err("model.qk_norm = \"none\" is Mixtral, whose router always renormalises the \
                                          top-k weights, but router.normalize = false"
                .into()),
            (q, _) => Ok(FAMILIES.into_iter().find(|f| f.qk_norm() == q).unwrap()),
        }
    }
}

pub(super) fn names() -> String {
    FAMILIES.map(|f| f.architecture()).join(", ")
}
