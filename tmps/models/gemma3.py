"""Gemma 3 (text): Llama-shaped attention with each query and key head RMS-normalised (``q_norm``,
``k_norm``, Gemma's ``1 + weight`` scale) before RoPE, a softmax scale of ``query_pre_attn_scalar^-½``
rather than ``head_dim^-½``, and layers that alternate a sliding window with full attention
(``config.layer_types``: five local layers, then one global, each kind with its own RoPE base).

HF hands each layer the mask and the rotary tables of its kind; the compressed forward takes both as
given and passes the layer's window on, so only the Q/K/V projections change. kv mode caches latents
of the normalised keys, as for Qwen3, and rotates the rebuilt keys with the RoPE table of the layer's
kind. The multimodal ``gemma3`` (``Gemma3ForConditionalGeneration``) is not registered.
"""
from __future__ import annotations

from transformers.models.gemma3 import modeling_gemma3
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention

from .base import register
from .llama import LayerWindowArchitecture, LlamaFamilyForward


class Gemma3TuckerMPSAttention(LlamaFamilyForward, Gemma3Attention):
    """Replaces ``Gemma3Attention``: Q/K/V through a FactoredProjection, then the dense q_norm / k_norm;
    ``o_proj`` kept dense, ``scaling`` and ``sliding_window`` as the dense layer set them."""

    head_norms = True
    eager_fallback = staticmethod(modeling_gemma3.eager_attention_forward)

    def rope_layer_type(self) -> str:
        return self.config.layer_types[self.layer_idx]


GEMMA3 = register(LayerWindowArchitecture(
    model_type="gemma3_text",
    dense_attention_class=Gemma3Attention,
    compressed_attention_class=Gemma3TuckerMPSAttention,
    uses_rope=True,
    head_norms_heads_first=True,
))
