"""Qwen2: Llama's attention with biases on q/k/v (not o), and a per-layer sliding window when
``use_sliding_window`` is set (layers from ``max_window_layers`` on)."""
from __future__ import annotations

from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

from .base import register
from .llama import LayerWindowArchitecture, LlamaFamilyForward


class Qwen2TuckerMPSAttention(LlamaFamilyForward, Qwen2Attention):
    """Replaces ``Qwen2Attention``: Q/K/V (and their biases) through a FactoredProjection; ``o_proj`` kept dense."""

    eager_fallback = staticmethod(modeling_qwen2.eager_attention_forward)


QWEN2 = register(LayerWindowArchitecture(
    model_type="qwen2",
    dense_attention_class=Qwen2Attention,
    compressed_attention_class=Qwen2TuckerMPSAttention,
    uses_rope=True,
))
