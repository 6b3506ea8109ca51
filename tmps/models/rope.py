"""Rotary position embedding in Hugging Face's ``rotate_half`` convention (pairs ``(j, j + d/2)``)."""
from __future__ import annotations

import contextlib

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


def over_heads(table: torch.Tensor) -> torch.Tensor:
    """A RoPE table (cos or sin) shaped to broadcast against ``(b, heads, n, head_dim)``: one table for
    every sequence, ``(n, head_dim)``, as it is; one per sequence, ``(b, n, head_dim)``, as ``(b, 1, n, head_dim)``."""
    return table.unsqueeze(-3) if table.dim() == 3 else table


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

    kind, inv_freq = rope_type(rotary, layer_type), getattr(rotary, _prefix(layer_type) + "inv_freq", None)
    if kind not in STATIC_ROPE_TYPES or not isinstance(inv_freq, torch.Tensor):
        return compute(total)
    return _cached_table(rotary, layer_type, "inv_freq", total, like, compute)


def _prefix(layer_type: str | None) -> str:
    return "" if layer_type is None else f"{layer_type}_"


def rope_type(rotary, layer_type: str | None = None) -> str | None:
    """HF's RoPE type of ``rotary`` ("default", "llama3", "longrope", "dynamic", ...), of the layer kind
    ``layer_type`` where it keeps one per kind (Gemma 3); None where it names none."""
    kind = getattr(rotary, "rope_type", "default")
    if layer_type is not None:
        kind = kind.get(layer_type) if isinstance(kind, dict) else None
    return kind if isinstance(kind, str) else None


def is_dynamic_ntk(kind: str | None) -> bool:
    """Whether the RoPE type ``kind`` (:func:`rope_type`) is HF's dynamic NTK, whose frequencies grow
    with the longest sequence seen past the original context (``max_position_embeddings``)."""
    return kind is not None and "dynamic" in kind


def _cached_table(rotary, layer_type, name: str, total: int, like: torch.Tensor, compute) -> torch.Tensor:
    """``compute(length)``'s table from the rotary's frequencies ``name`` (``inv_freq``, or longrope's
    ``original_inv_freq`` / ``long_inv_freq``), computed for the next power of two of slots and sliced."""
    if torch.compiler.is_compiling():  # the cache's data-pointer check breaks the graph; the compiler fuses compute
        return compute(total)
    inv_freq = getattr(rotary, _prefix(layer_type) + name)
    source = (inv_freq.data_ptr(), inv_freq.dtype, inv_freq._version)
    tables = rotary.__dict__.setdefault("_tmps_rope_tables", {})  # (device, dtype, layer_type, name) -> (source, pairs)
    key = (like.device, like.dtype, layer_type, name)
    cached = tables.get(key)
    if cached is None or cached[0] != source or cached[1].shape[0] < total:
        if like.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return compute(total)
        cached = tables[key] = (source, compute(1 << max(0, total - 1).bit_length()))
    return cached[1][:total]


def longrope_call_is_long(rotary, layer_type: str | None = None) -> torch.Tensor:
    """0-dim bool on the device: whether this forward's rotation uses the long factors.

    HF's rotary embedding picks them once per forward, before the layers, when the longest position
    passes ``original_max_position_embeddings``, and leaves its choice in ``inv_freq`` (swapped in
    transformers 5.17, copied in place in later versions): comparing on the device reads it in both,
    without a host sync.
    """
    prefix = _prefix(layer_type)
    current, original = getattr(rotary, prefix + "inv_freq"), getattr(rotary, prefix + "original_inv_freq")
    return (current != original.to(current.device)).any()


def current_frequencies(rotary, layer_type: str | None = None) -> torch.Tensor:
    """``(rotary_dim / 2,)`` float32: the frequencies of this forward, which HF's rotary embedding set
    (its dynamic update runs once per forward, before the layers)."""
    return getattr(rotary, _prefix(layer_type) + "inv_freq").float()


def per_token_pairs(rotary, frequencies: torch.Tensor, like: torch.Tensor, layer_type: str | None = None,
                    shifts: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`rope_pairs` with token ``j`` rotated at position ``j`` by its own ``frequencies[j]``
    (``(n, rotary_dim / 2)`` float32), as the dense cache holds keys under dynamic NTK RoPE:
    ``(n, 2, head_dim)``. With ``shifts`` (``(b,)``, float32) sequence ``i``'s token ``j`` sits at
    position ``j - shifts[i]`` instead (a left-padded row counts from its first real token) and the
    tables are ``(b, n, 2, head_dim)``; one shift (``b = 1``) moves every sequence alike, and the
    tables stay ``(n, 2, head_dim)``.

    HF's forward, row by row: angles ``position · f`` in float32, ``emb = [angles, angles]``, cos and
    sin times ``attention_scaling``, cast to ``like``'s dtype. The tables change at every step past the
    original context, so they are computed per call (as :func:`rope_pairs` does for dynamic types).
    """
    positions = torch.arange(frequencies.shape[0], device=frequencies.device, dtype=torch.float32)
    if shifts is not None:  # integers below 2^24: exact in float32, as HF's float position ids
        positions = positions - shifts[:, None]
        positions = positions[0] if shifts.shape[0] == 1 else positions
    angles = positions[..., None] * frequencies
    emb = torch.cat((angles, angles), dim=-1)
    scale = getattr(rotary, "attention_scaling", 1.0) if layer_type is None else \
        getattr(rotary, f"{layer_type}_attention_scaling", getattr(rotary, "attention_scaling", 1.0))
    return torch.stack((emb.cos() * scale, emb.sin() * scale), dim=-2).to(like.dtype)


def longrope_pairs(rotary, total: int, like: torch.Tensor, long_slots: torch.Tensor,
                   layer_type: str | None = None) -> torch.Tensor:
    """:func:`rope_pairs` for "longrope", slot by slot as the dense model's cache holds its keys.

    The dense model rotates each key when it is written, with the factors of that forward, and keeps
    it: a cache filled below ``original_max_position_embeddings`` and decoded past it holds keys
    rotated with the short factors, then with the long ones. kv mode rotates the keys of its latent
    cache anew at each step, so it rotates slot ``j`` with the long factors where ``long_slots[j]``
    (bool ``(total,)``, the choice of the forward that wrote it) and with the short ones elsewhere.
    The two tables are static and cached as :func:`rope_pairs` caches one.
    """
    prefix = _prefix(layer_type)
    short_freq, long_freq = getattr(rotary, prefix + "original_inv_freq"), getattr(rotary, prefix + "long_inv_freq", None)
    short = _cached_table(rotary, layer_type, "original_inv_freq", total, like,
                          lambda n: _table_with(rotary, short_freq, n, like, layer_type))
    if long_freq is None:  # HF creates it at the first long forward: every slot is short
        return short
    long = _cached_table(rotary, layer_type, "long_inv_freq", total, like,
                         lambda n: _table_with(rotary, long_freq, n, like, layer_type))
    return torch.where(long_slots[:, None, None], long, short)


def _table_with(rotary, inv_freq: torch.Tensor, length: int, like: torch.Tensor, layer_type) -> torch.Tensor:
    """HF's table at positions ``0 … length-1`` with ``inv_freq`` in place of the rotary's current one.

    HF's forward first runs its dynamic update, which would choose the factors by ``length``; it is
    skipped by presenting the rotary as a "default" one for the call (the update reads ``rope_type``
    then; unwrapping ``forward`` instead fails on transformers 5.17, whose ``no_grad`` wraps the
    update). The rotary's own frequencies and type are put back after.
    """
    name = _prefix(layer_type) + "inv_freq"
    current, kinds = rotary._buffers[name], rotary.rope_type
    rotary._buffers[name] = inv_freq.to(current.device)
    rotary.rope_type = "default" if layer_type is None else {**kinds, layer_type: "default"}
    try:
        positions = torch.arange(length, device=like.device).unsqueeze(0)
        cos, sin = rotary(like, positions) if layer_type is None else rotary(like, positions, layer_type)
    finally:
        rotary._buffers[name], rotary.rope_type = current, kinds
    return torch.stack((cos[0], sin[0]), dim=1).to(like.dtype)


@contextlib.contextmanager
def rotary_state_kept(model: torch.nn.Module):
    """Run the block with ``model``'s rotary embeddings restored afterwards, as they were before it.

    HF's dynamic NTK RoPE keeps state between forwards: one past the original context grows the
    frequencies (``inv_freq``) to its length and remembers it (``max_seq_len_cached``), and a later,
    shorter forward keeps them. Compression's calibration forwards would otherwise leave the model
    rotating as if the user had run them (a 20-token forward after 24-token calibration: 1.7e-4
    relative off the logits of the same model never calibrated). Kept: every ``*inv_freq`` buffer's
    object and values, and the rotary modules' public numbers (``max_seq_len_cached``,
    ``attention_scaling``, per layer kind in Gemma 3).
    """
    saved = []
    for module in model.modules():
        buffers = {name: (tensor, tensor.detach().clone()) for name, tensor in module._buffers.items()
                   if name.endswith("inv_freq") and tensor is not None}
        if buffers:
            numbers = {name: value.clone() if isinstance(value, torch.Tensor) else value
                       for name, value in vars(module).items()
                       if not name.startswith("_") and name != "training"
                       and isinstance(value, (bool, int, float, torch.Tensor))}
            saved.append((module, buffers, numbers))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers, numbers in saved:
                for name, (tensor, values) in buffers.items():
                    tensor.copy_(values)  # in place, as later versions update it: the object stays the model's
                    module._buffers[name] = tensor  # 5.17 swaps in another tensor: put the original back
                for name, value in numbers.items():
                    setattr(module, name, value)
