"""Llama family: RoPE, grouped-query attention, usually no biases."""
from __future__ import annotations

from torch import nn
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaAttention

from .attention import CompressedAttentionMixin
from .base import Architecture, register


class LlamaTuckerMPSAttention(CompressedAttentionMixin, LlamaAttention):
    """Replaces ``LlamaAttention``: Q/K/V through a FactoredProjection; ``o_proj`` kept dense."""

    query_prescale = False
    uses_rope = True
    eager_fallback = staticmethod(modeling_llama.eager_attention_forward)

    @property
    def output_projection(self) -> nn.Module:
        return self.o_proj

    @property
    def attention_dropout_p(self) -> float:
        return self.attention_dropout

    def rotary_emb(self):
        return self._rotary_handle[0]

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        return self.compressed_forward(hidden_states, attention_mask=attention_mask,
                                       cache=cache if cache is not None else past_key_values,
                                       position_embeddings=position_embeddings, **kwargs)


class LlamaArchitecture(Architecture):
    def decoder_layers(self, model):
        return self.base_model(model).layers


LLAMA = register(LlamaArchitecture(
    model_type="llama",
    dense_attention_class=LlamaAttention,
    compressed_attention_class=LlamaTuckerMPSAttention,
    uses_rope=True,
))
