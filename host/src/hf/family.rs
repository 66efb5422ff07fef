//! The model families Pith imports and exports, and how each names its MoE tensors.

use crate::config::{ModelConfig, QkNorm};

/// A model family Pith imports and exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Qwen3Moe,
    Mixtral,
    Olmoe,
}

pub(super) const FAMILIES: [Family; 3] = [Family::Qwen3Moe, Family::Mixtral, Family::Olmoe];

impl Family {
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
            Family::Olmoe => "OlmoeForCausalLM",
        }
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen3Moe => "qwen3_moe",
            Family::Mixtral => "mixtral",
            Family::Olmoe => "olmoe",
        }
    }
    pub(super) fn qk_norm(self) -> QkNorm {
        match self {
            Family::Qwen3Moe => QkNorm::Head,
            Family::Mixtral => QkNorm::None,
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
    /// The family a Pith model exports as: chosen by `model.qk_norm`.
    pub(super) fn of(m: &ModelConfig, normalize: bool) -> Result<Family, String> {
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
