"""Mixtral: Mistral's attention (one ``config.sliding_window`` for every layer, or none) in front of
a mixture-of-experts MLP, which the compression leaves as it is."""
from __future__ import annotations

from transformers.models.mixtral import modeling_mixtral
from transformers.models.mixtral.modeling_mixtral import MixtralAttention

from .base import register
from .llama import LlamaFamilyForward
from .mistral import MistralArchitecture


class MixtralTuckerMPSAttention(LlamaFamilyForward, MixtralAttention):
    """Replaces ``MixtralAttention``: Q/K/V through a FactoredProjection; ``o_proj`` kept dense."""

    eager_fallback = staticmethod(modeling_mixtral.eager_attention_forward)


MIXTRAL = register(MistralArchitecture(
    model_type="mixtral",
    dense_attention_class=MixtralAttention,
    compressed_attention_class=MixtralTuckerMPSAttention,
    uses_rope=True,
))
