"""SmolLM3: Llama's attention with RoPE left out of every fourth layer (``config.no_rope_layers[i]``
is 0 there: NoPE layers, whose attention sees no positions at all), and an optional sliding window
per layer (``config.layer_types``, fixed in each attention's ``sliding_window``).

The compressed attention reads the dense layer's ``use_rope``: a NoPE layer runs as OPT's layers do
in kv mode (the key basis folded into the projection, the queries absorbed into the latent scores,
no rebuild of keys at decode), a RoPE layer as Llama's. The solver's key and query metrics average
over RoPE's angles only in the RoPE layers.
"""
from __future__ import annotations

from transformers.models.smollm3 import modeling_smollm3
from transformers.models.smollm3.modeling_smollm3 import SmolLM3Attention

from .base import register
from .llama import LayerWindowArchitecture, LlamaFamilyForward


class SmolLM3TuckerMPSAttention(LlamaFamilyForward, SmolLM3Attention):
    """Replaces ``SmolLM3Attention``: Q/K/V through a FactoredProjection; ``o_proj`` kept dense; RoPE
    where the dense layer has it."""

    eager_fallback = staticmethod(modeling_smollm3.eager_attention_forward)

    @property
    def uses_rope(self) -> bool:
        return bool(self.use_rope)


class SmolLM3Architecture(LayerWindowArchitecture):
    def layer_uses_rope(self, attention) -> bool:
        return bool(attention.use_rope)


SMOLLM3 = register(SmolLM3Architecture(
    model_type="smollm3",
    dense_attention_class=SmolLM3Attention,
    compressed_attention_class=SmolLM3TuckerMPSAttention,
    uses_rope=True,
))
