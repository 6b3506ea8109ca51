"""Attention read straight from the latent KV cache of kv mode, without rebuilding full keys and values.

kv mode caches ``c_k = P_k k`` and ``c_v = P_v v`` (widths ``r_k``, ``r_v``, one basis shared by all
heads) and holds the up-projections ``U_k: (d_kv, r_k)``, ``U_v: (d_kv, r_v)`` with ``k ≈ U_k c_k``.
Rebuilding ``k`` and ``v`` for the whole context at every decode step reads the latents, writes full
keys and values and reads them again: more memory traffic than the dense cache it replaces. Here the
up-projections are moved to the other side of the products instead (as DeepSeek's MLA does), for the
query heads ``h`` of key/value head ``g``::

    scores[h, i, t] = scaling · q_h,iᵀ U_k,g c_k,t = scaling · (U_k,gᵀ q_h,i) · c_k,t     (no RoPE)
    o_h,i           = Σ_t p[h, i, t] U_v,g c_v,t   = U_v,g (Σ_t p[h, i, t] c_v,t)

so the context is read once, as latents, and the work per cached token is ``r_k + r_v`` per query
head instead of ``2·head_dim`` plus the rebuild. That pays while the queries are few: the absorbed
products cost ``heads·q_len·T·(r_k + r_v)`` against the rebuild's ``T·d_kv·(r_k + r_v)``, so
:func:`prefers_latent` takes this path when ``heads·q_len <= d_kv`` (decode) and leaves prefill to
the rebuild and the model's fused attention kernel.

RoPE rotates keys by their position, ``k_t = R_t U_k c_k,t``, and ``R_t`` does not commute with
``U_k``, so the key side cannot be absorbed: the keys are rebuilt and rotated (fused with the scores
in the Triton kernel :mod:`tmps.kernels.latent_scores` on CUDA), and only the value side is absorbed.
"""
from __future__ import annotations

import torch

from .rope import over_heads, rotate

# Attention implementations whose masks this module reads: 4-D boolean (True = attend) from sdpa,
# 4-D additive from eager, or None (no padding).  Others (flash, flex) take the rebuild path.
LATENT_IMPLEMENTATIONS = ("sdpa", "eager")


def prefers_latent(num_heads: int, q_len: int, kv_width: int) -> bool:
    """Whether reading the latent cache directly costs fewer FLOPs than rebuilding keys and values."""
    return num_heads * q_len <= kv_width


def latent_attention(q, c_k, c_v, k_up, v_up, attention_mask, scaling, rope=None, key_scores=None, values=None):
    """Softmax attention of ``q`` over latent keys and values.

    Parameters
    ----------
    q : (b, heads, q_len, head_dim)   queries (RoPE already applied for RoPE models)
    c_k : (b, T, r_k), c_v : (b, T, r_v)   the cached latents of the whole context
    k_up : (kv_heads·head_dim, r_k), v_up : (kv_heads·head_dim, r_v)   rows head-major
    attention_mask : None, or (b | 1, 1 | heads, q_len, ≥T), boolean (True = attend) or additive
    scaling : float   softmax scale
    rope : None, or (cos, sin) of shape (T, head_dim): keys at position t are rotated by row t; or
        (b, T, head_dim), one table per sequence (dynamic NTK with left-padded rows)
    key_scores : optional callable ``(q_grouped, c_k, k_up, cos, sin) -> (b, kv_heads, G·q_len, T)``
        computing the RoPE key scores (the fused Triton kernel); the torch chain when None.
    values : optional callable with :func:`tmps.kernels.latent_decode.latent_decode_attention`'s
        signature: mask, softmax, the value product and ``U_v`` fused after the scores (no-RoPE: the
        scores too); it never forms the probabilities, so ``probs`` is then None.

    Returns ``(out, probs)``: out ``(b, q_len, heads, head_dim)`` (the layout HF's attention
    functions return), probs ``(b, heads, q_len, T)`` in the latents' dtype (the softmax itself runs
    in float32 at least, as HF's eager attention's does, and rounds once).
    """
    b, heads, q_len, head_dim = q.shape
    total = c_k.shape[1]
    kv_heads = k_up.shape[0] // head_dim
    group = heads // kv_heads
    # Query head h = g·group + j belongs to key/value head g (HF's repeat_kv order).
    if rope is None:
        q_grouped = q.reshape(b, kv_heads, group * q_len, head_dim)
        q_latent = grouped_bmm(q_grouped, k_up.view(kv_heads, head_dim, -1))
        q_latent = q_latent.reshape(b, heads * q_len, -1)  # rows h·q_len + i
        if values is not None:
            return values(q_latent, None, c_k, c_v, v_up, attention_mask, scaling, heads, q_len, head_dim), None
        # the scale rides on the GEMM (cuBLAS's alpha) instead of a separate multiply of q
        scores = torch.baddbmm(c_k.new_empty(()).expand(b, heads * q_len, total), q_latent, c_k.transpose(1, 2),
                               beta=0, alpha=scaling)
    else:
        q_grouped = (q * scaling if scaling != 1.0 else q).reshape(b, kv_heads, group * q_len, head_dim)
        scores = (key_scores or rope_key_scores_torch)(q_grouped, c_k, k_up, *rope)
        if values is not None:  # fp32 from the RoPE-score kernel, the latents' dtype from the torch chain
            out = values(None, scores.reshape(b, heads * q_len, total), None, c_v, v_up, attention_mask,
                         scaling, heads, q_len, head_dim)
            return out, None
    scores = _masked(scores.reshape(b, heads, q_len, total), attention_mask, total)
    probs = _softmax(scores, c_v.dtype)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        # sdpa's dense attention: a query with nothing to attend to gets zeros (torch's SDPA), where
        # eager's additive mask averages the values uniformly (what the finite minimum above gives).
        # Elsewhere the masked probabilities are already 0 (exp underflows): one where, no reduction.
        probs = torch.where(attention_mask[..., :total], probs, 0)
    out_latent = probs.reshape(b, heads * q_len, total) @ c_v  # (b, heads·q_len, r_v)
    out = grouped_bmm(out_latent.view(b, kv_heads, group * q_len, -1), v_up.view(kv_heads, head_dim, -1).mT)
    return out.reshape(b, heads, q_len, head_dim).transpose(1, 2), probs


def grouped_bmm(x, w):
    """``x[b, g] @ w[g]`` for every sequence b and group g: x (b, g, m, k), w (g, k, n) -> (b, g, m, n).

    One bmm over the groups with the sequences folded into its rows: the same device ops as
    ``einsum("bgmk,gkn->bgmn")`` (a copy of x first where b and m do not fold into a view), without
    einsum's parsing: 24 against 8 µs of host time a call at toy sizes on this project's CPU, and
    decode is host-bound.
    """
    b, g, m, k = x.shape
    y = torch.bmm(x.transpose(0, 1).reshape(g, b * m, k), w)
    return y.view(g, b, m, -1).transpose(0, 1)


def rope_key_scores_torch(q_grouped, c_k, k_up, cos, sin):
    """``q · R_t U_k,g c_k,t`` by rebuilding and rotating the keys: (b, kv_heads, m, T).

    q_grouped (b, kv_heads, m, head_dim); c_k (b, T, r_k); k_up (kv_heads·head_dim, r_k);
    cos, sin (T, head_dim), or (b, T, head_dim) per sequence, with HF's rotate_half convention.
    """
    b, kv_heads, _, head_dim = q_grouped.shape
    keys = (c_k @ k_up.T).view(b, c_k.shape[1], kv_heads, head_dim).transpose(1, 2)
    keys = rotate(keys, over_heads(cos).to(keys.dtype), over_heads(sin).to(keys.dtype))
    return q_grouped @ keys.transpose(-1, -2)


def _softmax(scores, dtype):
    """Softmax over the last dim in float32 at least (as HF's eager attention), returned in ``dtype``.

    torch's half / bfloat16 softmax accumulates in float32 and rounds its output once, in one kernel
    instead of two: an fp32 softmax followed by a cast, up to which way an output lands that sits
    within rounding of a tie (on an AVX-512 AMD EPYC, ~2 in 100,000 outputs one unit in the last
    place apart; bit-equal on the CPUs of earlier CI runs).
    """
    if scores.dtype == dtype and dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(dtype)


def _masked(scores, attention_mask, total):
    """Apply HF's 4-D mask (boolean or additive); None means what it means to HF's sdpa path.

    HF leaves the mask out only where SDPA's own ``is_causal`` is right: one query (no mask), or
    queries that start at slot 0 (a prefill, also into a static cache whose tail is empty), where
    torch's top-left causal alignment applies: query i sees slots 0 … i.
    """
    q_len = scores.shape[-2]
    if attention_mask is not None:
        mask = attention_mask[..., :total]
        if mask.dtype == torch.bool:
            # The dtype's minimum, not -inf: a fully masked row stays finite (then zeroed, as SDPA's).
            # where(), not masked_fill(~mask): one kernel, no inverted mask.
            return torch.where(mask, scores, torch.finfo(scores.dtype).min)
        return scores + mask.to(scores.dtype)
    if q_len == 1:
        return scores
    visible = torch.ones(q_len, total, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
