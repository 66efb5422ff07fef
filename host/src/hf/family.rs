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
}

pub(super) const FAMILIES: [Family; 5] =
    [Family::Qwen3Moe, Family::Mixtral, Family::Olmoe, Family::Qwen2Moe, Family::DeepseekV2];

impl Family {
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
            Family::Olmoe => "OlmoeForCausalLM",
            Family::Qwen2Moe => "Qwen2MoeForCausalLM",
            Family::DeepseekV2 => "DeepseekV2ForCausalLM",
        }
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen3Moe => "qwen3_moe",
            Family::Mixtral => "mixtral",
            Family::Olmoe => "olmoe",
            Family::Qwen2Moe => "qwen2_moe",
            Family::DeepseekV2 => "deepseek_v2",
        }
    }
    pub(super) fn qk_norm(self) -> QkNorm {
        match self {
            Family::Qwen3Moe => QkNorm::Head,
            Family::Mixtral | Family::Qwen2Moe | Family::DeepseekV2 => QkNorm::None,
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
        matches!(self, Family::Qwen3Moe | Family::Qwen2Moe | Family::DeepseekV2)
    }
    /// The HF module of the shared expert(s) in a layer's MLP block.
    pub(super) fn shared(self) -> &'static str {
        match self {
            Family::DeepseekV2 => "shared_experts",
            _ => "shared_expert",
        }
    }
    /// The family a Pith model exports as: Qwen2-MoE when it has q/k/v biases or a shared expert
    /// (`shared`: that expert's `gate`), else chosen by `model.qk_norm`.
    pub(super) fn of(m: &ModelConfig, normalize: bool, shared: Option<bool>) -> Result<Family, String> {
        if m.mla.is_some() {
            return match (m.rope_interleaved, normalize, shared) {
                (true, false, Some(false)) => Ok(Family::DeepseekV2),
                _ => Err("the exported family with [model.mla] is DeepSeek-V2, which needs all of \
                          model.rope_interleaved = true, router.normalize = false and [shared] plugin = \
                          \"shared-swiglu\" without a gate"
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
