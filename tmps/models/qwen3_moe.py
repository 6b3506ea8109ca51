"""Qwen3-MoE: Qwen3's attention (each query and key head RMS-normalised before RoPE; kv mode caches
latents of the normalised keys, see :mod:`tmps.models.qwen3`) in front of a mixture-of-experts MLP,
which the compression leaves as it is."""
from __future__ import annotations

from transformers.models.qwen3_moe import modeling_qwen3_moe
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention

from .base import register
from .llama import LayerWindowArchitecture, LlamaFamilyForward


class Qwen3MoeTuckerMPSAttention(LlamaFamilyForward, Qwen3MoeAttention):
    """Replaces ``Qwen3MoeAttention``: Q/K/V through a FactoredProjection, then the dense q_norm / k_norm;
    ``o_proj`` kept dense."""

    head_norms = True
    eager_fallback = staticmethod(modeling_qwen3_moe.eager_attention_forward)


QWEN3_MOE = register(LayerWindowArchitecture(
    model_type="qwen3_moe",
    dense_attention_class=Qwen3MoeAttention,
    compressed_attention_class=Qwen3MoeTuckerMPSAttention,
    uses_rope=True,
))
