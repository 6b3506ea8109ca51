"""Mistral: Llama's attention, with a sliding window over the keys when ``config.sliding_window`` is set."""
from __future__ import annotations

from transformers.models.mistral import modeling_mistral
from transformers.models.mistral.modeling_mistral import MistralAttention

from .base import register
from .llama import LlamaFamilyArchitecture, LlamaFamilyForward


class MistralTuckerMPSAttention(LlamaFamilyForward, MistralAttention):
    """Replaces ``MistralAttention``: Q/K/V through a FactoredProjection; ``o_proj`` kept dense."""

    eager_fallback = staticmethod(modeling_mistral.eager_attention_forward)


class MistralArchitecture(LlamaFamilyArchitecture):
    def sliding_window(self, attention):
        # Read from the config at every call, as MistralAttention does: one window for every layer.
        return getattr(attention.config, "sliding_window", None)


MISTRAL = register(MistralArchitecture(
    model_type="mistral",
    dense_attention_class=MistralAttention,
    compressed_attention_class=MistralTuckerMPSAttention,
    uses_rope=True,
))
