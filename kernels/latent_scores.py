"""Attention scores of RoPE queries against kv mode's latent key cache, keys rebuilt and rotated on chip.

Math
----
kv mode caches key latents ``c_k[b, t]`` (width r) and holds ``U_k: (kv_heads·head_dim, r)``. For a
RoPE model the key of head g at position t is ``k_g,t = R_t U_k,g c_k,t``, where ``R_t`` rotates the
pairs ``(j, j + head_dim/2)`` (HF's ``rotate_half`` convention, tables ``cos, sin: (T, head_dim)``,
or ``(b, T, head_dim)`` where each sequence has its own: dynamic NTK RoPE with left-padded rows)::

    k1, k2         = c_k,t U_k,g[:half]ᵀ,  c_k,t U_k,g[half:]ᵀ                  (half = head_dim/2)
    k1', k2'       = k1·cos[t,:half] − k2·sin[t,:half],  k2·cos[t,half:] + k1·sin[t,half:]
    scores[m, t]   = q[m, :half]·k1' + q[m, half:]·k2'                         (fp32)

for the rows m of queries that share head g (its ``group`` query heads times the new tokens).
``R_t`` does not commute with ``U_k``, so unlike the value side the up-projection cannot be moved
onto the queries; the torch chain therefore writes every rebuilt key ``(b, T, kv_heads·head_dim)`` to
memory, rotates it in three more passes and reads it back for the product. Here a key tile lives
only in registers: the cache is read as latents (r numbers per token instead of kv_heads·head_dim),
and nothing but the scores is written.

Shapes and layout
-----------------
    q        (b, kv_heads, m, head_dim)     any strides, unit stride on head_dim
    c_k      (b, T, r)                       unit stride on r
    k_up     (kv_heads·head_dim, r)          unit stride on r
    cos, sin (T, head_dim) or (b, T, head_dim)   unit stride on head_dim
    scores   (b, kv_heads, m, T)             float32, contiguous (allocated here)

Tiling
------
Grid ``(cdiv(T, BLOCK_T), b · kv_heads)``: a program owns BLOCK_T positions of one (sequence, key
head). It accumulates the two key halves over r in BLOCK_R chunks (``tl.dot``, fp32), rotates them,
rounds them to the input dtype (as the torch chain's keys are), and takes one product with the
group's queries, whose rows are padded to ``M_PAD >= 16`` (the smallest ``tl.dot`` size). ``half``
is padded to a power of two >= 16 with masks, r and T edges are masked. The latent tile is re-read by
each of the kv_heads programs of a position block; at decode sizes it comes from L2.
"""

from __future__ import annotations  # Triton reads the string annotations; lets this import without Triton

from dataclasses import dataclass

import torch

from ._common import FP32_DOT_PRECISION, SUPPORTED_DTYPES, autotune, check_tile_sizes, dot, jit, next_pow2
from ._common import cdiv, require_runnable, tl, triton_available, unit_last
from ._common import aligned, alignment, decode_bench, launch
from ._common import interpreted as _interpreted
from ..tuning_cache import TunedChoices

__all__ = ["MAX_ROWS", "ScoresConfig", "latent_rope_scores", "latent_rope_scores_ref", "triton_available"]

MAX_ROWS = 128  # query rows per (sequence, key head): decode sizes; larger takes the rebuild path


@dataclass(frozen=True)
class ScoresConfig:
    """Tile sizes: block_t positions per program, block_r latent columns per step of the r loop."""

    block_t: int = 64
    block_r: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_tile_sizes(self, ("block_t", "block_r"))


# Candidates, untuned (no GPU has run them yet): position tiles of 32-128 keep the two fp32 key
# halves at <= 128 x 64 each; the r loop in 32- or 64-wide steps.
_CONFIGS = tuple(
    ScoresConfig(block_t=bt, block_r=br, num_warps=4 if bt <= 64 else 8, num_stages=2)
    for bt in (32, 64, 128)
    for br in (32, 64)
)
# fp32 is the accuracy path: its dots run as 3xTF32 (FP32_DOT_PRECISION), whose operand splitting
# doubles the registers, so it gets one small config and no autotuning (as the projection kernel).
_FP32_CONFIG = ScoresConfig(block_t=32, block_r=32, num_warps=4, num_stages=2)
_INTERPRETER_CONFIG = ScoresConfig(block_t=32, block_r=32, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


@jit
def _latent_rope_scores_kernel(
    # pointers
    q_ptr, c_ptr, u_ptr, cos_ptr, sin_ptr, out_ptr,
    # sizes
    kv_heads, m, total, r, half,
    # strides (elements)
    stride_qb, stride_qg, stride_qm,
    stride_cb, stride_ct,
    stride_u,
    stride_cos_b, stride_sin_b, stride_cos, stride_sin,  # per-sequence strides 0 for shared tables
    # meta-parameters
    M_PAD: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    ALIGN: tl.constexpr,  # r and the row strides of the key latents and U_k are multiples of it (_common.aligned)
):
    stride_cb, stride_ct, stride_u = aligned(stride_cb, ALIGN), aligned(stride_ct, ALIGN), aligned(stride_u, ALIGN)
    r = aligned(r, ALIGN)  # the masks' bound
    pid_t = tl.program_id(0)
    pid_bg = tl.program_id(1)
    batch = (pid_bg // kv_heads).to(tl.int64)
    head = pid_bg % kv_heads

    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t_offs < total
    j_offs = tl.arange(0, HALF_PAD)
    j_mask = j_offs < half

    # -- rebuild the two key halves of BLOCK_T positions: (BLOCK_T, HALF_PAD) each, fp32 ---------
    k1 = tl.zeros((BLOCK_T, HALF_PAD), dtype=tl.float32)
    k2 = tl.zeros((BLOCK_T, HALF_PAD), dtype=tl.float32)
    c_rows = c_ptr + batch * stride_cb + t_offs[:, None].to(tl.int64) * stride_ct
    u_rows1 = u_ptr + (head * 2 * half + j_offs)[None, :] * stride_u  # rows of U_k,g[:half], read as Uᵀ
    u_rows2 = u_rows1 + half * stride_u
    for r0 in range(0, r, BLOCK_R):
        r_offs = r0 + tl.arange(0, BLOCK_R)
        r_mask = r_offs < r
        c = tl.load(c_rows + r_offs[None, :], mask=t_mask[:, None] & r_mask[None, :], other=0.0)
        u_mask = r_mask[:, None] & j_mask[None, :]
        u1 = tl.load(u_rows1 + r_offs[:, None], mask=u_mask, other=0.0)  # (BLOCK_R, HALF_PAD)
        u2 = tl.load(u_rows2 + r_offs[:, None], mask=u_mask, other=0.0)
        k1 = dot(c, u1, k1, DOT_PRECISION, DOT_UPCAST)
        k2 = dot(c, u2, k2, DOT_PRECISION, DOT_UPCAST)

    # -- rotate by position: RoPE tables for the two halves --------------------------------------
    tj_mask = t_mask[:, None] & j_mask[None, :]
    cos_rows = cos_ptr + batch * stride_cos_b + t_offs[:, None].to(tl.int64) * stride_cos
    sin_rows = sin_ptr + batch * stride_sin_b + t_offs[:, None].to(tl.int64) * stride_sin
    cos1 = tl.load(cos_rows + j_offs[None, :], mask=tj_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_rows + half + j_offs[None, :], mask=tj_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_rows + j_offs[None, :], mask=tj_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_rows + half + j_offs[None, :], mask=tj_mask, other=0.0).to(tl.float32)
    # Round the keys to the input dtype before and after the rotation, as the torch chain's are.
    dtype = c_ptr.dtype.element_ty
    k1 = k1.to(dtype).to(tl.float32)
    k2 = k2.to(dtype).to(tl.float32)
    rot1 = (k1 * cos1 - k2 * sin1).to(dtype)
    rot2 = (k2 * cos2 + k1 * sin2).to(dtype)

    # -- scores = q1 · rot1ᵀ + q2 · rot2ᵀ: (M_PAD, BLOCK_T) ---------------------------------------
    m_offs = tl.arange(0, M_PAD)
    m_mask = m_offs < m
    q_rows = q_ptr + batch * stride_qb + head * stride_qg + m_offs[:, None] * stride_qm
    q_mask = m_mask[:, None] & j_mask[None, :]
    q1 = tl.load(q_rows + j_offs[None, :], mask=q_mask, other=0.0)
    q2 = tl.load(q_rows + half + j_offs[None, :], mask=q_mask, other=0.0)
    scores = tl.zeros((M_PAD, BLOCK_T), dtype=tl.float32)
    scores = dot(q1, tl.trans(rot1), scores, DOT_PRECISION, DOT_UPCAST)
    scores = dot(q2, tl.trans(rot2), scores, DOT_PRECISION, DOT_UPCAST)

    out_rows = out_ptr + (pid_bg.to(tl.int64) * m + m_offs[:, None]) * total
    tl.store(out_rows + t_offs[None, :], scores, mask=m_mask[:, None] & t_mask[None, :])


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _validate(q, c_k, k_up, cos, sin):
    for name, tensor in (("q", q), ("c_k", c_k), ("k_up", k_up), ("cos", cos), ("sin", sin)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}; move all tensors to one device")
    if q.dtype not in SUPPORTED_DTYPES or any(t.dtype != q.dtype for t in (c_k, k_up)):
        raise TypeError(f"q, c_k and k_up must share one dtype among float32, float16, bfloat16; "
                        f"got {q.dtype}, {c_k.dtype}, {k_up.dtype}")
    if q.dim() != 4 or c_k.dim() != 3 or k_up.dim() != 2:
        raise ValueError(f"expected q (b, kv_heads, m, head_dim), c_k (b, T, r), k_up (kv_heads*head_dim, r); "
                         f"got {tuple(q.shape)}, {tuple(c_k.shape)}, {tuple(k_up.shape)}")
    b, kv_heads, m, head_dim = q.shape
    total, r = c_k.shape[1], c_k.shape[2]
    if head_dim % 2 or c_k.shape[0] != b or tuple(k_up.shape) != (kv_heads * head_dim, r):
        raise ValueError(f"shapes do not match: q {tuple(q.shape)} (even head_dim), c_k {tuple(c_k.shape)}, "
                         f"k_up {tuple(k_up.shape)} (expected ({kv_heads * head_dim}, {r}))")
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) not in ((total, head_dim), (b, total, head_dim)):
            raise ValueError(f"{name} has shape {tuple(table.shape)}, expected (T={total}, head_dim={head_dim}) "
                             f"or, one table per sequence, (b={b}, T={total}, head_dim={head_dim})")
    if m > MAX_ROWS:
        raise ValueError(f"{m} query rows per key head; the kernel serves decode (at most {MAX_ROWS})")
    return b, kv_heads, m, head_dim, total, r


def _launch(q, c_k, k_up, cos, sin, out, config: ScoresConfig):
    b, kv_heads, m, head_dim = q.shape
    total, r = c_k.shape[1], c_k.shape[2]
    half = head_dim // 2
    grid = (cdiv(total, config.block_t), b * kv_heads)
    launch(
        _latent_rope_scores_kernel, grid,
        q, c_k, k_up, cos, sin, out,
        kv_heads, m, total, r, half,
        q.stride(0), q.stride(1), q.stride(2),
        c_k.stride(0), c_k.stride(1),
        k_up.stride(0),
        _sequence_stride(cos), _sequence_stride(sin), cos.stride(-2), sin.stride(-2),
        M_PAD=max(16, next_pow2(m)), HALF_PAD=max(16, next_pow2(half)),
        BLOCK_T=config.block_t, BLOCK_R=config.block_r,
        DOT_PRECISION=FP32_DOT_PRECISION if q.dtype == torch.float32 else "tf32",
        DOT_UPCAST=q.dtype == torch.bfloat16 and _interpreted(),
        ALIGN=alignment(c_k.stride(0), c_k.stride(1), k_up.stride(0), r),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _sequence_stride(table) -> int:
    """A RoPE table's stride between sequences: 0 where one ``(T, head_dim)`` table serves them all."""
    return table.stride(0) if table.dim() == 3 else 0


_TUNED = TunedChoices("latent_scores", ScoresConfig)  # kept on disk too where TMPS_TUNING_CACHE asks (tmps.tuning_cache)


def _pick_config(q, c_k, k_up, cos, sin, out) -> ScoresConfig:
    """Autotune once per (device, dtype, batch, kv heads, rows, head_dim, r, T bucket) and cache the winner
    (the grid is T tiles x batch x kv heads: batch 16 wants other tiles than batch 1)."""
    if q.device.type != "cuda" or _interpreted():
        return _INTERPRETER_CONFIG
    if q.dtype == torch.float32:
        return _FP32_CONFIG
    b, kv_heads, m, head_dim = q.shape
    key = (q.device, q.dtype, b, kv_heads, m, head_dim, c_k.shape[2], min(next_pow2(c_k.shape[1]), 1 << 16))
    config = _TUNED.get(key)  # one lookup: a miss also asks the on-disk cache, where it is on
    if config is not None:
        return config
    if torch.cuda.is_current_stream_capturing():  # cannot benchmark inside a CUDA graph capture
        return _CONFIGS[2]
    best = autotune(_CONFIGS, lambda config: _launch(q, c_k, k_up, cos, sin, out, config),
                     decode_bench)  # a decode kernel: device time (see decode_bench)
    if best is None:
        raise RuntimeError(f"no latent-scores config fits this GPU for head_dim={head_dim}, r={c_k.shape[2]}")
    _TUNED[key] = best
    return best


def latent_rope_scores(q, c_k, k_up, cos, sin, *, out=None, config=None):
    """``scores[b, g, m, t] = q[b, g, m] · (R_t U_k,g c_k[b, t])`` in float32, keys never in memory.

    Parameters
    ----------
    q : (b, kv_heads, m, head_dim)   the m query rows served by key head g (already rotated, scaled)
    c_k : (b, T, r)   key latents of the whole context
    k_up : (kv_heads·head_dim, r)   U_k, rows head-major
    cos, sin : (T, head_dim), or (b, T, head_dim) per sequence   RoPE tables of the key positions
        (HF's rotate_half convention)
    out : optional contiguous float32 Tensor ``(b, kv_heads, m, T)`` to write into
    config : optional :class:`ScoresConfig` overriding the autotuner

    q, c_k and k_up share one dtype (float32, float16, bfloat16); accumulation is fp32 and the
    rebuilt keys are rounded to that dtype, as in :func:`latent_rope_scores_ref`.

    Returns a float32 Tensor ``(b, kv_heads, m, T)``.
    """
    b, kv_heads, m, head_dim, total, r = _validate(q, c_k, k_up, cos, sin)
    if config is not None and not isinstance(config, ScoresConfig):
        raise TypeError(f"config must be a ScoresConfig or None, got {type(config).__name__}")
    require_runnable(q.device, "latent_rope_scores", "latent_rope_scores_ref", "q")
    q, c_k, k_up, cos, sin = (unit_last(t) for t in (q, c_k, k_up, cos, sin))
    shape = (b, kv_heads, m, total)
    if out is None:
        out = torch.empty(shape, device=q.device, dtype=torch.float32)
    elif (not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != torch.float32
          or out.device != q.device or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 tensor of shape {shape} on {q.device}")
    if out.numel() == 0 or r == 0:
        return out.zero_()
    _launch(q, c_k, k_up, cos, sin, out, config or _pick_config(q, c_k, k_up, cos, sin, out))
    return out


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def latent_rope_scores_ref(q, c_k, k_up, cos, sin):
    """The torch chain: rebuild every key, rotate it, multiply. Same arguments; float32 result
    (float64 for float64 inputs)."""
    b, kv_heads, _, head_dim = q.shape
    keys = (c_k @ k_up.T).view(b, c_k.shape[1], kv_heads, head_dim).transpose(1, 2)
    half = head_dim // 2
    rotated = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)
    if cos.dim() == 3:  # one table per sequence: broadcast over the key heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    keys = keys * cos.to(keys.dtype) + rotated * sin.to(keys.dtype)
    scores = q.float() @ keys.float().transpose(-1, -2) if q.dtype != torch.float64 else q @ keys.transpose(-1, -2)
    return scores
