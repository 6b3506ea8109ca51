"""Qwen3: Qwen2's attention without q/k/v biases (``attention_bias`` optional) and with each query and
key head RMS-normalised (``q_norm``, ``k_norm``) before RoPE. The key norm is not linear, so kv mode
caches latents of the normalised keys (``k_down`` after the norm, see :mod:`tmps.models.attention`)."""
from __future__ import annotations

from transformers.models.qwen3 import modeling_qwen3
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

from .base import register
from .llama import LayerWindowArchitecture, LlamaFamilyForward


class Qwen3TuckerMPSAttention(LlamaFamilyForward, Qwen3Attention):
    """Replaces ``Qwen3Attention``: Q/K/V through a FactoredProjection, then the dense q_norm / k_norm; ``o_proj`` kept dense."""

    head_norms = True
    eager_fallback = staticmethod(modeling_qwen3.eager_attention_forward)


QWEN3 = register(LayerWindowArchitecture(
    model_type="qwen3",
    dense_attention_class=Qwen3Attention,
    compressed_attention_class=Qwen3TuckerMPSAttention,
    uses_rope=True,
))
