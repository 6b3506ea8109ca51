"""OPT: learned positions, biases on every projection, queries pre-scaled by 1/sqrt(head_dim)."""
from __future__ import annotations

from torch import nn
from transformers.models.opt import modeling_opt
from transformers.models.opt.modeling_opt import OPTAttention, OPTDecoderLayer

from .attention import CompressedAttentionMixin
from .base import Architecture, new_like, register


class OPTTuckerMPSAttention(CompressedAttentionMixin, OPTAttention):
    """Replaces ``OPTAttention``: Q/K/V through a FactoredProjection; ``out_proj`` kept dense."""

    query_prescale = True
    uses_rope = False
    eager_fallback = staticmethod(modeling_opt.eager_attention_forward)

    @property
    def output_projection(self) -> nn.Module:
        return self.out_proj

    @property
    def attention_dropout_p(self) -> float:
        return self.dropout

    def forward(self, hidden_states, cache=None, attention_mask=None, output_attentions=False,
                past_key_values=None, **kwargs):
        kwargs.pop("position_ids", None)
        return self.compressed_forward(hidden_states, attention_mask=attention_mask,
                                       kv_cache=self.layer_cache(cache, past_key_values, kwargs), **kwargs)


class OPTTuckerMPSDecoderLayer(OPTDecoderLayer):
    """The prototype's decoder layer name: an ``OPTDecoderLayer`` whose ``self_attn`` is compressed."""

    @classmethod
    def from_dense(cls, layer: OPTDecoderLayer, attention: OPTTuckerMPSAttention) -> "OPTTuckerMPSDecoderLayer":
        new = new_like(cls, layer)
        for name, child in layer.named_children():
            new.add_module(name, attention if name == "self_attn" else child)
        return new


class OPTArchitecture(Architecture):
    def decoder_layers(self, model):
        base = self.base_model(model)
        return base.decoder.layers if hasattr(base, "decoder") else base.layers

    def set_attention(self, layers, index, attention):
        layers[index] = OPTTuckerMPSDecoderLayer.from_dense(layers[index], attention)


OPT = register(OPTArchitecture(
    model_type="opt",
    dense_attention_class=OPTAttention,
    compressed_attention_class=OPTTuckerMPSAttention,
    o_name="out_proj",
))
