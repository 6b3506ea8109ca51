"""Rotary position embedding in Hugging Face's ``rotate_half`` convention (pairs ``(j, j + d/2)``)."""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``R x = x·cos + rotate_half(x)·sin``, with ``cos, sin`` broadcasting against ``x``.

    Their last dim is the rotary width: head_dim, or fewer for partial RoPE (Phi-4-mini's
    ``partial_rotary_factor``), which rotates the first ``cos.shape[-1]`` features of each head and
    passes the rest through, as HF's Phi-3 does.
    """
    width = cos.shape[-1]
    if width == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotary, passed = x[..., :width], x[..., width:]
    return torch.cat((rotary * cos + rotate_half(rotary) * sin, passed), dim=-1)


def rope_average(m: torch.Tensor, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """``m: (heads·head_dim, heads·head_dim)``, a second moment of RoPE'd projections' outputs, averaged
    over the rotation angles: what RoPE leaves of it for any position.

    Per head, feature pairs ``(j, j + rotary_dim/2)`` rotate together by every angle, so each pair's
    block becomes its mean diagonal times I₂ and its correlations with other features vanish; the
    features past ``rotary_dim`` (partial RoPE) are not rotated and keep their block. Blocks between
    heads are dropped. Full RoPE (``rotary_dim == head_dim``) leaves a diagonal matrix.
    """
    heads, half = m.shape[0] // head_dim, rotary_dim // 2
    out = torch.zeros_like(m)
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        block, target = m[rows, rows], out[rows, rows]
        diag = torch.diagonal(block)[:rotary_dim]
        pair = (diag[:half] + diag[half:]) / 2
        target[:rotary_dim, :rotary_dim] = torch.diag(torch.cat([pair, pair]))
        target[rotary_dim:, rotary_dim:] = block[rotary_dim:, rotary_dim:]
    return out


# RoPE types whose angle at a position does not depend on the other positions of the call (HF's
# "dynamic" and "longrope" rescale inv_freq by the longest position seen: recomputed every call).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_pairs(rotary, total: int, like: torch.Tensor, layer_type: str | None = None) -> torch.Tensor:
    """``(total, 2, head_dim)`` in ``like``'s dtype: HF's ``rotary(like, positions)`` cos and sin at cache
    slots ``0 … total-1`` side by side (``pairs[:, 0]`` is cos, ``pairs[:, 1]`` sin: views with unit
    stride on head_dim), so that the rows of a few slots are one gather (``pairs[slots]``), not two.

    kv mode rotates the keys of the whole cache at every decode step, in every layer; computing the
    table there costs 7 small kernels per layer and step (HF computes its positions' table once per
    forward). For static RoPE types the table of a position never changes, so it is computed once per
    (device, dtype, inv_freq) for the next power of two of slots and sliced (a view: no kernel). It is
    recomputed whenever ``inv_freq`` is replaced or changed in place, and never grown inside a
    CUDA-graph capture (the capture would own its memory): there, for dynamic types, and in code that
    ``torch.compile`` traces, each call computes the table as before.

    ``layer_type``: Gemma 3's rotary embedding holds one table per kind of layer (its sliding and
    full-attention layers rotate at different bases) and takes the kind as an argument.
    """
    def compute(length):
        positions = torch.arange(length, device=like.device).unsqueeze(0)
        cos, sin = rotary(like, positions) if layer_type is None else rotary(like, positions, layer_type)
        return torch.stack((cos[0], sin[0]), dim=1).to(like.dtype)

    if layer_type is None:
        rope_type, inv_freq = getattr(rotary, "rope_type", "default"), getattr(rotary, "inv_freq", None)
    else:
        rope_type = getattr(rotary, "rope_type", {}).get(layer_type)
        inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None)
    if not isinstance(rope_type, str) or rope_type not in STATIC_ROPE_TYPES or not isinstance(inv_freq, torch.Tensor):
        return compute(total)
    if torch.compiler.is_compiling():  # the cache's data-pointer check breaks the graph; the compiler fuses compute
        return compute(total)
    source = (inv_freq.data_ptr(), inv_freq.dtype, inv_freq._version)
    tables = rotary.__dict__.setdefault("_tmps_rope_tables", {})  # (device, dtype, layer_type) -> (source, pairs)
    key = (like.device, like.dtype, layer_type)
    cached = tables.get(key)
    if cached is None or cached[0] != source or cached[1].shape[0] < total:
        if like.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return compute(total)
        cached = tables[key] = (source, compute(1 << max(0, total - 1).bit_length()))
    return cached[1][:total]
