"""The compressed attention forward shared by every architecture.

``weights`` mode: q, k, v come out of a :class:`FactoredProjection` at full width and the rest is
the model's own attention (RoPE, cache, attention kernel, output projection).

``kv`` mode: k and v come out as latents ``c_k: (b, s, r_k)``, ``c_v: (b, s, r_v)``; the cache
stores the latents (one pseudo-head of width r), and the full keys/values are rebuilt from the
whole cached context as ``k = c_k U_kᵀ`` and ``v = c_v U_vᵀ`` before attention. RoPE does not
commute with a basis that mixes rotation pairs, so for RoPE models the rotation is applied to the
rebuilt keys, with the cos/sin of their cache slots ``0 … T-1``, and to the queries at theirs (the
last q filled slots: ``T-q … T-1`` in a dynamic cache, counted by a static one): attention scores
depend only on relative positions, and within a sequence the model's position ids are contiguous,
so this is exact (at full rank it reproduces the dense model). Under "longrope" (Phi-3 128k,
Phi-4-mini) the dense cache holds keys rotated with the short factors, then the long ones, once a
forward passes the original context, and under "dynamic" (dynamic NTK) the frequencies grow with
the sequence past it: kv mode reads the rotation of each slot from a record of those forwards, at
the tokens' positions (see ``_record_tokens``; under dynamic NTK each sequence's own positions, which
start after a left-padded row's padding: see ``_position_shifts``). Models that RMS-normalise each key
head (Qwen3, Gemma 3) cache latents of the normalised keys, ``c_k = P_k k_norm(W_k x)``: the
projection outputs full keys and ``k_down = P_k`` follows the norm (a norm is not linear, so the
basis cannot be folded into the projection as it is elsewhere).

When the queries are few (decode), kv mode skips the rebuild and attends over the latents directly
(:mod:`tmps.models.latent_attention`): ``module.kv_attention`` is ``"auto"`` (latent when that costs
fewer FLOPs, see :func:`prefers_latent`), ``"latent"`` or ``"rebuild"`` (``tmps.set_paths`` sets it on
every layer).
"""
from __future__ import annotations

import torch

from .. import kernels_bridge as bridge
from ..compat import attention_cache_keyword, is_paged_cache
from ..paths import KV_ATTENTION
from .latent_attention import LATENT_IMPLEMENTATIONS, latent_attention, prefers_latent
from .rope import (current_frequencies, is_dynamic_ntk, longrope_call_is_long, longrope_pairs, over_heads,
                   per_token_pairs, rope_pairs, rope_type, rotate)

try:  # transformers 5.x
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # pragma: no cover
    from transformers.integrations import ALL_ATTENTION_FUNCTIONS


class CompressedAttentionMixin:
    """Forward pass over ``self.qkv`` (a FactoredProjection) for modes ``weights`` and ``kv``.

    Expects on ``self``: ``qkv``, ``mode``, ``head_dim``, ``num_heads``, ``num_kv_heads``,
    ``query_prescale`` (OPT multiplies q by ``scaling`` and passes 1.0 to attention), ``scaling``,
    ``layer_idx``, ``config``, ``output_projection`` (the o_proj module), and in kv mode the
    parameters ``k_up: (d_kv, r_k)``, ``v_up: (d_kv, r_v)``, and ``k_down: (r_k, d_kv)`` where the model
    normalises its key heads (else None: the key basis is folded into ``qkv``); for RoPE models
    ``rotary_emb()``.
    """

    uses_rope = False
    head_norms = False  # Qwen3, Gemma 3: each q and k head RMS-normalised (q_norm, k_norm) before RoPE
    kv_attention = "auto"  # kv mode: "auto" | "latent" | "rebuild" (see the module docstring)

    def rope_layer_type(self) -> str | None:
        """The kind of layer whose RoPE table this one uses, where the rotary embedding keeps one per kind
        (Gemma 3: ``config.layer_types``), else None."""
        return None

    def attention_window(self) -> int | None:
        """The sliding window passed to the attention function (Mistral, Qwen2), None for full attention;
        ``architecture`` is set by :func:`tmps.models.base.register`."""
        return self.architecture.sliding_window(self)

    def layer_cache(self, cache, past_key_values, kwargs: dict):
        """The KV cache the model passed this layer, from the forward's ``cache`` / ``past_key_values``.

        From transformers 5.24 the layer's cache is ``cache`` (``past_key_values`` its deprecated alias).
        Before, it was ``past_key_values``, and a ``cache`` keyword belonged to the paged attention
        functions of continuous batching, which update it themselves: it goes back into ``kwargs``.
        """
        if attention_cache_keyword(self.architecture.dense_attention_class) == "cache":
            return cache if cache is not None else past_key_values
        if cache is not None:
            kwargs["cache"] = cache
        return past_key_values

    def compressed_forward(self, hidden_states, attention_mask=None, kv_cache=None, **kwargs):
        """``kv_cache``: :meth:`layer_cache`'s (``kwargs`` may hold a ``cache`` of the attention function's)."""
        input_shape = hidden_states.shape[:-1]
        position_ids = kwargs.get("position_ids")  # left in kwargs: HF's attention functions take it too
        # read once: a config attribute costs ~3 us (HF's __getattribute__), and decode is host-bound
        implementation = self.config._attn_implementation
        q, k, v = self.qkv(hidden_states)
        q = q.view(*input_shape, -1, self.head_dim)
        if self.head_norms:
            q = self.q_norm(q)
        q = q.transpose(1, 2)
        scaling = self.scaling
        window = self.attention_window()

        if self.mode == "kv":
            if is_paged_cache(kv_cache) or is_paged_cache(kwargs.get("cache")):
                raise ValueError(
                    "kv mode caches latent keys and values, and transformers' continuous batching "
                    "(generate_batch) keeps full ones per head in its paged cache: use model.generate, or "
                    "compress with mode='weights' (its cache is the dense model's)")
            if self.k_down is not None:  # full keys: normalise each head, then take the latent (c_k = P_k k̂)
                k = self.k_norm(k.view(*input_shape, -1, self.head_dim)).flatten(-2) @ self.k_down.T
            k, v = k.unsqueeze(1), v.unsqueeze(1)  # latents as one pseudo-head: (b, 1, s, r)
            if kv_cache is not None:
                k, v = kv_cache.update(k, v, self.layer_idx)
            if self._reads_latents(q.shape[1], q.shape[2], attention_mask, implementation):
                # the whole scale (OPT's query prescale too) rides on the latent score GEMM
                return self._latent_forward(q, k.squeeze(1), v.squeeze(1), attention_mask, scaling, input_shape,
                                            kv_cache, implementation, position_ids)
        if self.query_prescale:  # as the dense model: q scaled in its dtype, attention at scale 1
            q, scaling = q * self.scaling, 1.0
        if self.mode == "kv":
            k = (k.squeeze(1) @ self.k_up.T).view(k.shape[0], k.shape[2], -1, self.head_dim).transpose(1, 2)
            v = (v.squeeze(1) @ self.v_up.T).view(v.shape[0], v.shape[2], -1, self.head_dim).transpose(1, 2)
            if self.uses_rope:
                q, k = self._rope_by_relative_position(q, k, kv_cache, position_ids)
        else:
            k = k.view(*input_shape, -1, self.head_dim)
            if self.head_norms:
                k = self.k_norm(k)
            k = k.transpose(1, 2)
            v = v.view(*input_shape, -1, self.head_dim).transpose(1, 2)
            if self.uses_rope:
                cos, sin = kwargs.pop("position_embeddings")
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            if kv_cache is not None:  # the paged cache (5.25) reads this batch's indices from kwargs, as HF passes them
                k, v = (kv_cache.update(k, v, self.layer_idx, kwargs=kwargs) if is_paged_cache(kv_cache)
                        else kv_cache.update(k, v, self.layer_idx))
        kwargs.pop("position_embeddings", None)
        if window is not None:
            kwargs["sliding_window"] = window

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, self.eager_fallback)
        out, weights = interface(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout_p,
            scaling=scaling, **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()
        return self.output_projection(out), weights

    def _reads_latents(self, num_heads: int, q_len: int, attention_mask, implementation: str) -> bool:
        """Whether this kv-mode step attends over the latent cache directly (see ``kv_attention``)."""
        if self.kv_attention not in KV_ATTENTION:  # set directly rather than through tmps.set_paths
            raise ValueError(f"kv_attention must be 'auto', 'latent' or 'rebuild', got {self.kv_attention!r}")
        if self.kv_attention == "rebuild":
            return False
        readable = (implementation in LATENT_IMPLEMENTATIONS
                    and (attention_mask is None or attention_mask.dim() == 4))
        if self.kv_attention == "latent":
            if not readable:
                raise ValueError(
                    f"kv_attention='latent' reads sdpa/eager attention masks, not those of "
                    f"attn_implementation={implementation!r}: use 'auto' or 'rebuild'")
            return True
        return not self.training and readable and prefers_latent(num_heads, q_len, self.k_up.shape[0])

    def _latent_forward(self, q, c_k, c_v, attention_mask, scaling, input_shape, cache, implementation,
                        position_ids=None):
        rope = key_scores = values = None
        # no kernel where gradients flow (it has no backward; see bridge.kernels_serve_gradients)
        kernels = bridge.kernels_serve_gradients(self.qkv.backend, q, c_k, c_v, self.k_up, self.v_up)
        if self.uses_rope:
            q, cos, sin = self._rotate_queries(q, c_k.shape[1], cache, position_ids)
            rope = (cos, sin)
            if kernels and cos.shape[-1] == self.head_dim:  # the kernel rotates whole heads: not partial RoPE
                rows = q.shape[1] // (self.k_up.shape[0] // self.head_dim) * q.shape[2]  # query rows per key head
                key_scores = bridge.latent_rope_scores_for(q.device, self.qkv.backend, rows)
        if kernels:
            values = self._latent_values(q, c_k, c_v, attention_mask, rope, key_scores, scaling,
                                         need_probs=implementation == "eager")
        out, probs = latent_attention(q, c_k, c_v, self.k_up, self.v_up, attention_mask, scaling,
                                      rope=rope, key_scores=key_scores, values=values)
        weights = probs.to(q.dtype) if implementation == "eager" else None
        out = out.reshape(*input_shape, -1).contiguous()
        return self.output_projection(out), weights

    def _latent_values(self, q, c_k, c_v, attention_mask, rope, key_scores, scaling, need_probs: bool):
        """The fused latent decode kernel when it serves this step (see ``latent_decode_for``), else None.

        Under ``backend="auto"`` it is timed against the torch chain once per shape and cache-length
        bucket (eagerly and in device time, as the projection is) and kept only where it is faster.
        """
        b, heads, q_len, head_dim = q.shape
        backend = self.qkv.backend
        values = bridge.latent_decode_for(q.device, backend, heads * q_len, q_len, attention_mask is not None,
                                          need_probs=need_probs)
        if values is None or backend != "auto":  # (traced code: "auto" got None, see bridge._traced)
            return values
        total = c_k.shape[1]
        mask_kind = None if attention_mask is None else attention_mask.dtype
        key = ("latent_decode", q.device, q.dtype, b, heads, q_len, head_dim, c_k.shape[2], c_v.shape[2],
               bridge.token_bucket(total), rope is not None, mask_kind)

        def run(fused):
            return latent_attention(q, c_k, c_v, self.k_up, self.v_up, attention_mask, scaling,
                                    rope=rope, key_scores=key_scores, values=fused)

        choice = bridge.faster_path(key, lambda: run(values), lambda: run(None), device=q.device)
        return values if choice == "triton" else None

    def _rotate_queries(self, q, total: int, cache, position_ids=None):
        """``(q rotated at its cache slots, cos, sin)``; the tables ``(total, head_dim)`` cover slots 0 … total-1
        (under dynamic NTK with per-sequence positions, ``(b, total, head_dim)``: one per sequence)."""
        rotary, layer_type = self.rotary_emb(), self.rope_layer_type()
        slots = self._query_slots(cache, total, q.shape[2], q.device)
        kind = rope_type(rotary, layer_type)  # read once: this runs in every layer at every decode step
        if kind == "longrope":  # Phi-3 128k, Phi-3.5, Phi-4-mini
            long_tokens, offset = self._record_tokens(cache, total, slots, "_tmps_longrope_long",
                                                      longrope_call_is_long(rotary, layer_type))
            pairs = longrope_pairs(rotary, offset + total, q, long_tokens, layer_type)[offset:]
        elif is_dynamic_ntk(kind):
            frequencies, offset = self._record_tokens(cache, total, slots, "_tmps_rope_frequencies",
                                                      current_frequencies(rotary, layer_type))
            shifts = self._position_shifts(position_ids, slots, offset)
            pairs = per_token_pairs(rotary, frequencies, q, layer_type, shifts)[..., offset:, :, :]
        else:
            pairs = rope_pairs(rotary, total, q, layer_type)
        # pairs: (total, 2, head_dim), or (b, total, 2, head_dim) with one table per sequence
        cos_q, sin_q = pairs[..., slots, :, :].unbind(-2)  # one gather for both (static cache), a view otherwise
        return rotate(q, over_heads(cos_q), over_heads(sin_q)), pairs[..., 0, :], pairs[..., 1, :]

    @staticmethod
    def _position_shifts(position_ids, slots, offset: int):
        """``(b,)`` float32: how far each sequence's positions lag its tokens' indices (``offset`` + slot);
        ``(1,)`` for one row of position ids, which serves every sequence (HF's own, ``cache_position``,
        where the caller passed none: then 0); None without position ids.

        HF's ``generate`` numbers a left-padded row's tokens from its first real one. Where every key
        is rotated with the queries' frequencies only distances count and the slots serve; under
        dynamic NTK a key keeps the frequencies of the forward that wrote it, so keys and queries score
        by position and each sequence's tables must be read at its own positions. The shift is read
        from this step's last query, a real token in a left-padded row; the padding's keys it mis-places
        are masked. Longrope's two static tables stay shared: its ``generate`` drops the cache where
        it would switch them (see test_left_padded_generate_past_the_original_context).
        """
        if position_ids is None:
            return None
        last = offset + (slots.stop - 1 if isinstance(slots, slice) else slots[-1])
        return (last - position_ids[:, -1]).float()

    def _record_tokens(self, cache, total: int, slots, name: str, value: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(record, offset)``: ``value`` (this forward's RoPE choice: longrope's long-or-short flag, or
        dynamic NTK's frequencies) kept for each token this forward writes, ``record: (offset + total,
        *value.shape)`` for the sequence's tokens so far, and the index of the cache's first slot among them.

        The dense cache holds each key as rotated by the forward that wrote it; kv mode rotates its
        latent keys anew at every step, so it keeps that forward's choice per token, on the cache layer,
        by the token's index in the sequence: a sliding window shifts the slots, and returns the latest
        ``total`` of the tokens it has seen (a static cache before its window fills writes at
        ``slots``, a device index). Keys and queries rotated with different frequencies score by
        position, not only by distance, so the tables are read at the tokens' indices too. Reordered
        rows (beam search) share the record; a cropped cache rewrites the tokens past its new length
        before reading them. No cache: every key is this forward's.
        """
        layers = getattr(cache, "layers", None)
        layer = layers[self.layer_idx] if layers else None
        if layer is None:
            return value.expand(total, *value.shape), 0
        if isinstance(slots, torch.Tensor):
            offset, written = 0, slots
        else:  # the latest `total` tokens of those the layer has seen
            seen = getattr(layer, "cumulative_length_int", getattr(layer, "cumulative_length", total))
            offset = (seen if isinstance(seen, int) else total) - total
            written = slice(offset + slots.start, offset + slots.stop)
        record = layer.__dict__.get(name)
        if record is None or record.device != value.device or record.shape[1:] != value.shape \
                or record.shape[0] < offset + total:
            grown = torch.zeros((1 << max(0, offset + total - 1).bit_length(), *value.shape), dtype=value.dtype,
                                device=value.device)
            if record is not None and record.device == grown.device and record.shape[1:] == value.shape:
                grown[:record.shape[0]] = record
            record = layer.__dict__[name] = grown
        record[written] = value
        return record[:offset + total], offset

    def _query_slots(self, cache, total: int, q_len: int, device):
        """Cache slots of this step's queries (their RoPE positions): the last ``q_len`` filled ones.

        A dynamic cache returns exactly the filled slots, ``total``, in order, the queries' last; so
        does HF's dynamic sliding-window layer, which keeps the latest ``window - 1`` keys and returns
        them with the new ones. HF's StaticCache preallocates ``total`` slots and counts the filled ones
        in its layer's ``cumulative_length``, a device tensor: indexing with it keeps the step free of
        host syncs (CUDA graphs). Its sliding-window layer stops counting there once the window is
        full (its host count ``cumulative_length_int`` passes the slots it holds): from then on it
        returns the latest keys in order, shifted left, the queries' last again.
        """
        layers = getattr(cache, "layers", None)
        layer = layers[self.layer_idx] if layers else None
        filled = getattr(layer, "cumulative_length", None)
        static = isinstance(filled, torch.Tensor)  # the window count is read for static layers only
        if not static or getattr(layer, "cumulative_length_int", 0) > getattr(layer, "max_cache_len", 0):
            return slice(total - q_len, total)
        if q_len == 1:  # decode: one subtraction, no arange
            return (filled.to(device) - 1).view(1)
        return filled.to(device) - q_len + torch.arange(q_len, device=device)

    def _rope_by_relative_position(self, q, k, cache, position_ids=None):
        q, cos, sin = self._rotate_queries(q, k.shape[2], cache, position_ids)
        return q, rotate(k, over_heads(cos), over_heads(sin))
