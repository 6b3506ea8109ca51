"""Qwen2-MoE: Qwen2's attention (q/k/v biases, a window on the layers ``config.layer_types`` marks
sliding) in front of a mixture-of-experts MLP, which the compression leaves as it is."""
from __future__ import annotations

from transformers.models.qwen2_moe import modeling_qwen2_moe
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeAttention

from .base import register
from .llama import LayerWindowArchitecture, LlamaFamilyForward


class Qwen2MoeTuckerMPSAttention(LlamaFamilyForward, Qwen2MoeAttention):
    """Replaces ``Qwen2MoeAttention``: Q/K/V (and their biases) through a FactoredProjection; ``o_proj`` kept dense."""

    eager_fallback = staticmethod(modeling_qwen2_moe.eager_attention_forward)


QWEN2_MOE = register(LayerWindowArchitecture(
    model_type="qwen2_moe",
    dense_attention_class=Qwen2MoeAttention,
    compressed_attention_class=Qwen2MoeTuckerMPSAttention,
    uses_rope=True,
))
