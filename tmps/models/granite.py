"""IBM Granite (3.x dense models): Llama's attention with the softmax scale set by the config
(``attention_multiplier``, not ``head_dim^-½``) and optional biases on every projection; the
model's own multipliers (embeddings, residuals, logits) sit outside the attention and stay as they are.

The compressed forward passes the dense layer's ``scaling`` on, so only the Q/K/V projections change.
"""
from __future__ import annotations

from transformers.models.granite import modeling_granite
from transformers.models.granite.modeling_granite import GraniteAttention

from .base import register
from .llama import LlamaFamilyArchitecture, LlamaFamilyForward


class GraniteTuckerMPSAttention(LlamaFamilyForward, GraniteAttention):
    """Replaces ``GraniteAttention``: Q/K/V (and their biases) through a FactoredProjection; ``o_proj`` kept dense."""

    eager_fallback = staticmethod(modeling_granite.eager_attention_forward)


GRANITE = register(LlamaFamilyArchitecture(
    model_type="granite",
    dense_attention_class=GraniteAttention,
    compressed_attention_class=GraniteTuckerMPSAttention,
    uses_rope=True,
))
