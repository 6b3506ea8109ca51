"""Phi-3 (and Phi-4-mini, same ``model_type``): Llama's attention with Q, K and V fused into one
``qkv_proj`` (rows: the query heads, then the key heads, then the value heads), the sliding window
of ``config.sliding_window`` for every layer, and partial RoPE where ``partial_rotary_factor < 1``
(Phi-4-mini: 0.75; the features past the rotary width pass through unrotated).

The compressor reads the fused layer's rows as three projections (:class:`tmps.models.base.LinearRows`)
and hooks their outputs within its output; the compressed attention replaces ``qkv_proj`` with the
FactoredProjection, whose three outputs are those rows' counterparts.
"""
from __future__ import annotations

from transformers.models.phi3 import modeling_phi3
from transformers.models.phi3.modeling_phi3 import Phi3Attention

from .base import LinearRows, register
from .llama import LlamaFamilyForward
from .mistral import MistralArchitecture


class Phi3TuckerMPSAttention(LlamaFamilyForward, Phi3Attention):
    """Replaces ``Phi3Attention``: its fused ``qkv_proj`` through a FactoredProjection; ``o_proj`` kept dense."""

    eager_fallback = staticmethod(modeling_phi3.eager_attention_forward)


class Phi3Architecture(MistralArchitecture):
    """Mistral's window rule (one ``config.sliding_window`` for every layer), with Q/K/V fused."""

    def _rows(self, attention) -> dict[str, tuple[int, int]]:
        q = attention.config.num_attention_heads * attention.head_dim
        kv = attention.num_key_value_heads * attention.head_dim
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}

    def projections(self, attention):
        rows = self._rows(attention)
        return (*(LinearRows(attention.qkv_proj, *rows[name]) for name in "qkv"), attention.o_proj)

    def projection_output(self, attention, name):
        return attention.qkv_proj, slice(*self._rows(attention)[name])

    def rotary_dim(self, attention):
        rope = getattr(attention.config, "rope_parameters", None) or {}
        return int(attention.head_dim * rope.get("partial_rotary_factor", 1.0))


PHI3 = register(Phi3Architecture(
    model_type="phi3",
    dense_attention_class=Phi3Attention,
    compressed_attention_class=Phi3TuckerMPSAttention,
    q_name="qkv_proj", k_name="qkv_proj", v_name="qkv_proj",
    uses_rope=True,
))
