"""The compressed attention forward shared by every architecture.

``weights`` mode: q, k, v come out of a :class:`FactoredProjection` at full width and the rest is
the model's own attention (RoPE, cache, attention kernel, output projection).

``kv`` mode: k and v come out as latents ``c_k: (b, s, r_k)``, ``c_v: (b, s, r_v)``; the cache
stores the latents (one pseudo-head of width r), and the full keys/values are rebuilt from the
whole cached context as ``k = c_k U_kᵀ`` and ``v = c_v U_vᵀ`` before attention. RoPE does not
commute with a basis that mixes rotation pairs, so for RoPE models the rotation is applied to the
rebuilt keys, with the cos/sin of positions ``0 … T-1`` for the keys and ``T-q … T-1`` for the
queries: attention scores depend only on relative positions, and within a sequence the model's
position ids are contiguous, so this is exact (at full rank it reproduces the dense model).
"""
from __future__ import annotations

import torch

try:  # transformers 5.x
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # pragma: no cover
    from transformers.integrations import ALL_ATTENTION_FUNCTIONS


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CompressedAttentionMixin:
    """Forward pass over ``self.qkv`` (a FactoredProjection) for modes ``weights`` and ``kv``.

    Expects on ``self``: ``qkv``, ``mode``, ``head_dim``, ``num_heads``, ``num_kv_heads``,
    ``query_prescale`` (OPT multiplies q by ``scaling`` and passes 1.0 to attention), ``scaling``,
    ``layer_idx``, ``config``, ``output_projection`` (the o_proj module), and in kv mode the
    buffers ``k_up: (d_kv, r_k)``, ``v_up: (d_kv, r_v)``; for RoPE models ``rotary_emb()``.
    """

    uses_rope = False

    def compressed_forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        q, k, v = self.qkv(hidden_states)
        scaling = self.scaling
        if self.query_prescale:
            q, scaling = q * self.scaling, 1.0
        q = q.view(*input_shape, -1, self.head_dim).transpose(1, 2)

        if self.mode == "kv":
            k, v = k.unsqueeze(1), v.unsqueeze(1)  # latents as one pseudo-head: (b, 1, s, r)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            k = (k.squeeze(1) @ self.k_up.T).view(k.shape[0], k.shape[2], -1, self.head_dim).transpose(1, 2)
            v = (v.squeeze(1) @ self.v_up.T).view(v.shape[0], v.shape[2], -1, self.head_dim).transpose(1, 2)
            if self.uses_rope:
                q, k = self._rope_by_relative_position(q, k)
        else:
            k = k.view(*input_shape, -1, self.head_dim).transpose(1, 2)
            v = v.view(*input_shape, -1, self.head_dim).transpose(1, 2)
            if self.uses_rope:
                cos, sin = kwargs.pop("position_embeddings")
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
                q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
        kwargs.pop("position_embeddings", None)

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager_fallback)
        out, weights = interface(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout_p,
            scaling=scaling, **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()
        return self.output_projection(out), weights

    def _rope_by_relative_position(self, q, k):
        total, q_len = k.shape[2], q.shape[2]
        positions = torch.arange(total, device=k.device).unsqueeze(0)
        cos, sin = self.rotary_emb()(k, positions)
        cos, sin = cos.unsqueeze(1).to(k.dtype), sin.unsqueeze(1).to(k.dtype)
        k = k * cos + rotate_half(k) * sin
        qc, qs = cos[:, :, total - q_len:], sin[:, :, total - q_len:]
        q = q * qc + rotate_half(q) * qs
        return q, k
