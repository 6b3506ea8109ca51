"""Llama family: RoPE, grouped-query attention, usually no biases.

:class:`LlamaFamilyForward` is what every Llama-shaped attention shares (the forward's signature,
``o_proj``, the model-level rotary embedding); Mistral, Qwen2, Qwen3, Gemma 3, Phi-3 and SmolLM3 (a file
each) add their sliding windows, biases, per-head norms, fused Q/K/V and layers without RoPE.
"""
from __future__ import annotations

from torch import nn
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaAttention

from .attention import CompressedAttentionMixin
from .base import Architecture, register


class LlamaFamilyForward(CompressedAttentionMixin):
    """The compressed forward with a Llama-shaped attention's signature: ``o_proj`` kept dense, RoPE
    from the model's rotary embedding, the cache as ``cache`` (transformers ≥ 5.24) or
    ``past_key_values`` (earlier 5.x)."""

    query_prescale = False
    uses_rope = True

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
                                       kv_cache=self.layer_cache(cache, past_key_values, kwargs),
                                       position_embeddings=position_embeddings, **kwargs)


class LlamaFamilyArchitecture(Architecture):
    def decoder_layers(self, model):
        return self.base_model(model).layers


class LayerWindowArchitecture(LlamaFamilyArchitecture):
    """A Llama-shaped architecture whose attention fixes its sliding window at construction, per layer,
    from ``config.layer_types`` (Qwen2, Qwen3, Gemma 3): ``attention.sliding_window``, None for full."""

    def sliding_window(self, attention):
        return getattr(attention, "sliding_window", None)


class LlamaTuckerMPSAttention(LlamaFamilyForward, LlamaAttention):
    """Replaces ``LlamaAttention``: Q/K/V through a FactoredProjection; ``o_proj`` kept dense."""

    eager_fallback = staticmethod(modeling_llama.eager_attention_forward)


LLAMA = register(LlamaFamilyArchitecture(
    model_type="llama",
    dense_attention_class=LlamaAttention,
    compressed_attention_class=LlamaTuckerMPSAttention,
    uses_rope=True,
))
