"""kv mode's decode attention over the latent cache: softmax, values and the value up-projection fused.

Math
----
kv mode caches ``c_k[b, t]`` (width r_k) and ``c_v[b, t]`` (width r_v), one basis for all heads, and
holds ``U_v: (kv_heads·D, r_v)``. For the query rows ``ρ = h·q_len + i`` (head h, new token i) of
one sequence (see :mod:`tmps.models.latent_attention`)::

    s[ρ, t]   = scaling · q̃[ρ] · c_k[t]      (no RoPE: q̃ = U_k,gᵀ q, the absorbed query, width r_k)
              = given                        (RoPE: the fp32 scores of tmps.kernels.latent_scores)
    s[ρ, t]  += mask[b, h, i, t]             (additive; a boolean mask keeps s or sets a large negative)
    p[ρ, :]   = softmax(s[ρ, :])
    ō[ρ]      = Σ_t p[ρ, t] c_v[t]           (width r_v)
    out[b, i, h, :] = U_v,g ō[ρ]             (head_dim D; g = h // (heads / kv_heads))

The torch chain runs that as a score GEMM, a mask pass, a softmax, a GEMM by the values, a batched
GEMM by ``U_v`` and a copy into the attention layout: six or seven launches a layer and decode
step, each a few microseconds at decode sizes whatever its work. Here it is two (plus the absorbed
query's small GEMM before them); the scores and probabilities stay on chip, and ``ō`` reaches
memory only as per-chunk fp32 partials:

1. ``_partials_kernel``, grid ``(chunks, value tiles, b)``, flash-decoding style: a program owns all
   the query rows of one sequence, ``CHUNK`` positions and ``BLOCK_V`` value columns. It walks its
   positions ``BLOCK_T`` at a time with an online softmax (running max ``m``, sum ``l``) and writes
   the unnormalised ``acc = Σ_t exp(s - m) c_v[t]`` with ``m`` and ``l`` to an fp32 workspace.
   Without RoPE every value tile recomputes the chunk's scores (the chunk of ``c_k`` comes from L2
   after the first tile, but at OPT-1.3B's shape, batch 16 and 256-wide value tiles that is six
   times one score GEMM's 0.76 GFLOP a layer). *scores-first* configs (``scores_first``) compute
   the scores with one cuBLAS GEMM first (``b·R·T`` numbers, 1 MB there) and this pass reads them:
   three launches, no recomputation; the tuner keeps whichever is faster per shape, as the
   projection kernel's z-pass. Its scores are rounded to the input dtype before the softmax, as the
   torch chain's score GEMM rounds them, so its fp16 error is the chain's rather than the one-pass
   configs' (fp32 scores): ``benchmarks/latent_decode_check.py`` prints both.
2. ``_combine_kernel``, grid ``(heads, cdiv(b·q_len, BLOCK_B), cdiv(D, BLOCK_D))``: rescales the
   chunks to their common max, sums and divides (``ō``, rounded to the input dtype as the chain's
   is), multiplies by ``BLOCK_D`` columns of the head's ``U_v,g`` with ``tl.dot`` and stores ``out``
   in ``(b, q_len, heads, D)`` order, the layout the output projection reads. ``BLOCK_D`` is the
   whole padded head unless the config splits it (more programs where heads × row blocks are few).

Shapes and layout
-----------------
    q_latent  (b, R, r_k) | None       R = heads·q_len rows, unit stride on r_k (no-RoPE path)
    scores    (b, R, T) | None         RoPE path: fp32 or c_v's dtype, contiguous
    c_k       (b, T, r_k) | None       unit stride on r_k
    c_v       (b, T, r_v)              unit stride on r_v
    v_up      (kv_heads·D, r_v)        unit stride on r_v
    mask      None | (b|1, heads|1, q_len, ≥T): bool (True = attend) or additive float, any strides
    out       (b, q_len, heads, D)     contiguous, allocated here

Masked scores use ``-1e30`` and additive ones are clamped there, so a fully masked row stays finite.
A query with no position to attend to then gets what the dense model's attention gives it: under an
additive mask (HF's eager attention) the uniform average of the values, as eager's finite minimum
gives; under a boolean mask (HF's sdpa) zeros, as torch's SDPA returns (the combine kernel zeroes a
row whose common max is the masked -1e30). Without a mask the queries must be one token each
(decode), which is what ``None`` means to HF's sdpa path.
"""

from __future__ import annotations  # Triton reads the string annotations; lets this import without Triton

import dataclasses
from dataclasses import dataclass

import torch

from ._common import FP32_DOT_PRECISION, SUPPORTED_DTYPES, autotune, check_tile_sizes, dot, jit, next_pow2
from ._common import cdiv, require_runnable, tl, triton_available, unit_last
from ._common import aligned, alignment, decode_bench, launch
from ._common import interpreted as _interpreted
from ..tuning_cache import TunedChoices

__all__ = ["MAX_ROWS", "DecodeConfig", "latent_decode_attention", "latent_decode_attention_ref", "triton_available"]

MAX_ROWS = 128  # query rows (heads·q_len) per sequence a program holds: decode sizes
_MASK_NONE, _MASK_BOOL, _MASK_ADD = 0, 1, 2  # MASK_KIND; masked scores are -1e30 (see above)


@dataclass(frozen=True)
class DecodeConfig:
    """Tile sizes. chunk: positions per partials program (a multiple of block_t); block_t: positions
    per online-softmax step; block_v: value columns per program; block_k: r_k step of the score
    product; block_b: rows (sequence × token) per combine program; block_r: r_v step of the combine;
    block_d: head_dim columns per combine program, 0 for the whole (padded) head. scores_first:
    without RoPE, compute the scores with one GEMM before the partials (which then read them)
    instead of inside every value tile's program."""

    chunk: int = 256
    block_t: int = 64
    block_v: int = 128
    block_k: int = 64
    block_b: int = 16
    block_r: int = 64
    num_warps: int = 4
    num_stages: int = 2
    scores_first: bool = False
    block_d: int = 0

    def __post_init__(self):
        check_tile_sizes(self, ("chunk", "block_t", "block_v", "block_k", "block_b", "block_r")
                         + (("block_d",) if self.block_d else ()))
        if self.chunk < self.block_t:
            raise ValueError(f"DecodeConfig.chunk ({self.chunk}) must be at least block_t ({self.block_t})")


# Candidates, untuned (no GPU has run them yet). The chunk trades programs against workspace: at
# batch 1 and T = 1024, 128-position chunks give 8 x (r_v / block_v) programs; at batch 16 longer
# chunks keep the fp32 workspace (b x chunks x rows x r_v) well below the latents' own bytes.
# Ten candidates in all with the split-head_dim ones below, six where the scores are given (each
# compiles two kernels per specialisation inside the first decode step; a split one shares its
# twin's partials kernel):
# _CONFIGS[0] is also the untimed pick inside a CUDA-graph capture.
_CONFIGS = (
    DecodeConfig(chunk=128, block_t=64, block_v=128, num_warps=4),
    DecodeConfig(chunk=64, block_t=32, block_v=128, num_warps=4),
    DecodeConfig(chunk=512, block_t=64, block_v=256, num_warps=8),
    DecodeConfig(chunk=2048, block_t=64, block_v=256, num_warps=8),
)
# Scores by one GEMM first (no RoPE only; with RoPE they arrive computed): no recomputation per value
# tile, so wider value tiles buy nothing but registers. Long chunks for large batches: the fp32
# partials are written and read once, b x chunks x rows x r_v x 8 bytes (OPT-1.3B, b=16, T=1040:
# 27 MB with 256-position chunks, 11 MB with 1024, against 67 MB of latents).
_SCORES_FIRST_CONFIGS = tuple(
    DecodeConfig(chunk=chunk, block_t=64, block_v=bv, num_warps=4 if bv <= 128 else 8, scores_first=True)
    for chunk, bv in ((64, 128), (256, 128), (1024, 128))
)
# The combine pass runs heads x cdiv(b * q_len, block_b) programs: 32 at OPT-1.3B's shape for batch
# 1 and for batch 16 alike, a quarter of an H100's or H200's 132 SMs, each reading its head's U_v,g
# (170 KB there) and its rows' partials. Splitting head_dim into 32-wide tiles doubles the programs
# (four times at Llama-3-8B's 128) for re-reads of the partials, which L2 serves; U_v is still read
# once. Untimed: offered beside the configs the batch suits (short chunks for batch 1, long ones for
# batch 16); the partials kernel of each is the same compile as its whole-head twin's.
_SPLIT_D_CONFIGS = tuple(dataclasses.replace(config, block_d=32)
                         for config in (_CONFIGS[0], _CONFIGS[3], _SCORES_FIRST_CONFIGS[2]))
# fp32 is the accuracy path (3xTF32 dots double the registers): one small config, no autotuning.
_FP32_CONFIG = DecodeConfig(chunk=128, block_t=32, block_v=64, block_k=32, block_r=32, num_warps=4)
_INTERPRETER_CONFIG = DecodeConfig(chunk=64, block_t=32, block_v=64, block_k=32, block_b=16, block_r=32,
                                   num_stages=1)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@jit
def _partials_kernel(
    # pointers
    q_ptr, s_ptr, ck_ptr, cv_ptr, mask_ptr, acc_ptr, ml_ptr,
    # sizes
    rows, q_len, total, r_k, r_v, chunks, scaling,
    # strides (elements)
    stride_qb, stride_qm, stride_sb, stride_sm,
    stride_ckb, stride_ckt, stride_cvb, stride_cvt,
    stride_mb, stride_mh, stride_mi, stride_mt,
    # meta-parameters
    SCORES_GIVEN: tl.constexpr, MASK_KIND: tl.constexpr,
    R_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    ALIGN: tl.constexpr,  # the latents' strides, r_k and r_v are multiples of it (see _common.aligned)
):
    stride_qb, stride_qm = aligned(stride_qb, ALIGN), aligned(stride_qm, ALIGN)
    stride_ckb, stride_ckt = aligned(stride_ckb, ALIGN), aligned(stride_ckt, ALIGN)
    stride_cvb, stride_cvt = aligned(stride_cvb, ALIGN), aligned(stride_cvt, ALIGN)
    r_k, r_v = aligned(r_k, ALIGN), aligned(r_v, ALIGN)  # the masks' bounds; r_v is the workspace's row stride
    pid_c = tl.program_id(0)
    pid_v = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    dtype = cv_ptr.dtype.element_ty

    rho = tl.arange(0, R_PAD)
    rho_mask = rho < rows
    v_offs = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = v_offs < r_v
    head = rho // q_len
    token = rho % q_len

    m_i = tl.full((R_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((R_PAD,), dtype=tl.float32)
    acc = tl.zeros((R_PAD, BLOCK_V), dtype=tl.float32)
    start = pid_c * CHUNK
    for t0 in range(start, tl.minimum(start + CHUNK, total), BLOCK_T):  # the last chunk stops at T
        t_offs = t0 + tl.arange(0, BLOCK_T)
        t_mask = t_offs < total
        # -- scores of the block: (R_PAD, BLOCK_T), fp32
        if SCORES_GIVEN:
            s = tl.load(s_ptr + batch * stride_sb + rho[:, None] * stride_sm + t_offs[None, :],
                        mask=rho_mask[:, None] & t_mask[None, :], other=0.0).to(tl.float32)
        else:
            s = tl.zeros((R_PAD, BLOCK_T), dtype=tl.float32)
            for k0 in range(0, r_k, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_mask = k < r_k
                q = tl.load(q_ptr + batch * stride_qb + rho[:, None] * stride_qm + k[None, :],
                            mask=rho_mask[:, None] & k_mask[None, :], other=0.0)
                ck = tl.load(ck_ptr + batch * stride_ckb + t_offs[None, :].to(tl.int64) * stride_ckt + k[:, None],
                             mask=k_mask[:, None] & t_mask[None, :], other=0.0)  # (BLOCK_K, BLOCK_T)
                s = dot(q, ck, s, DOT_PRECISION, DOT_UPCAST)
            s = s * scaling
        # -- mask (rows ρ = head·q_len + token), then the positions past T drop out entirely
        if MASK_KIND != 0:
            mask_offs = (batch * stride_mb + head[:, None] * stride_mh + token[:, None] * stride_mi
                         + t_offs[None, :].to(tl.int64) * stride_mt)
            mk = tl.load(mask_ptr + mask_offs, mask=rho_mask[:, None] & t_mask[None, :], other=0)
            if MASK_KIND == 1:
                s = tl.where(mk != 0, s, -1e30)
            else:
                s = tl.maximum(s + mk.to(tl.float32), -1e30)
        s = tl.where(t_mask[None, :], s, float("-inf"))
        # -- online softmax over the chunk (the chunk's first block always holds a position < T)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        cv = tl.load(cv_ptr + batch * stride_cvb + t_offs[:, None].to(tl.int64) * stride_cvt + v_offs[None, :],
                     mask=t_mask[:, None] & v_mask[None, :], other=0.0)  # (BLOCK_T, BLOCK_V)
        acc = dot(p.to(dtype), cv, acc * alpha[:, None], DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    # -- workspace: acc (b, chunks, rows, r_v); m and l (b, chunks, 2, rows), written by value tile 0
    slot = batch * chunks + pid_c
    tl.store(acc_ptr + (slot * rows + rho[:, None]) * r_v + v_offs[None, :], acc,
             mask=rho_mask[:, None] & v_mask[None, :])
    if pid_v == 0:
        tl.store(ml_ptr + slot * 2 * rows + rho, m_i, mask=rho_mask)
        tl.store(ml_ptr + slot * 2 * rows + rows + rho, l_i, mask=rho_mask)


@jit
def _combine_kernel(
    acc_ptr, ml_ptr, vu_ptr, out_ptr,
    # sizes
    n_rows, rows, q_len, heads, group, chunks, r_v, head_dim,
    stride_u,
    # meta-parameters
    BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    ALIGN: tl.constexpr,  # r_v and stride_u are multiples of it (see _common.aligned)
    EMPTY_ROWS_ZERO: tl.constexpr,  # a boolean mask: a row with no position to attend to gives 0 (SDPA)
):
    r_v, stride_u = aligned(r_v, ALIGN), aligned(stride_u, ALIGN)
    head = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)  # flat (sequence, token) rows
    pid_d = tl.program_id(2)  # head_dim tile
    n_mask = n < n_rows
    batch = (n // q_len).to(tl.int64)
    rho = head * q_len + n % q_len
    dtype = out_ptr.dtype.element_ty

    # -- the chunks' common max M and the softmax denominator L = Σ_c exp(m_c - M) l_c
    big_m = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    for c in range(0, chunks):
        base = (batch * chunks + c) * 2 * rows + rho
        big_m = tl.maximum(big_m, tl.load(ml_ptr + base, mask=n_mask, other=0.0))
    big_l = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for c in range(0, chunks):
        base = (batch * chunks + c) * 2 * rows + rho
        m_c = tl.load(ml_ptr + base, mask=n_mask, other=0.0)
        big_l += tl.exp(m_c - big_m) * tl.load(ml_ptr + base + rows, mask=n_mask, other=0.0)
    inv_l = 1.0 / tl.where(n_mask, big_l, 1.0)
    if EMPTY_ROWS_ZERO:  # every score of the row is the masked -1e30: nothing to attend to
        inv_l = tl.where(big_m > -5e29, inv_l, 0.0)

    # -- out = ō U_v,gᵀ over r_v in BLOCK_R steps, ō = Σ_c exp(m_c - M) acc_c / L rounded to the dtype
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_offs < head_dim
    u_rows = vu_ptr + ((head // group) * head_dim + d_offs)[None, :] * stride_u  # U_v,gᵀ columns
    out = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, r_v, BLOCK_R):
        k = r0 + tl.arange(0, BLOCK_R)
        k_mask = k < r_v
        o_bar = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
        for c in range(0, chunks):
            slot = batch * chunks + c
            w = tl.exp(tl.load(ml_ptr + slot * 2 * rows + rho, mask=n_mask, other=0.0) - big_m) * inv_l
            part = tl.load(acc_ptr + (slot * rows + rho)[:, None] * r_v + k[None, :],
                           mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            o_bar += w[:, None] * part
        u = tl.load(u_rows + k[:, None], mask=k_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_R, BLOCK_D)
        out = dot(o_bar.to(dtype), u, out, DOT_PRECISION, DOT_UPCAST)

    out_offs = ((batch * q_len + n % q_len) * heads + head)[:, None] * head_dim + d_offs[None, :]
    tl.store(out_ptr + out_offs, out.to(dtype), mask=n_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _validate(q_latent, scores, c_k, c_v, v_up, heads, q_len, head_dim):
    """Check the tensors and sizes; return (b, rows, total, r_k, r_v)."""
    if (q_latent is None) == (scores is None):
        raise ValueError("pass exactly one of q_latent (no RoPE: scores from c_k) or scores (RoPE)")
    named = [("c_v", c_v), ("v_up", v_up)] + ([("q_latent", q_latent), ("c_k", c_k)] if scores is None
                                              else [("scores", scores)])
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != c_v.device:
            raise ValueError(f"{name} is on {tensor.device} but c_v is on {c_v.device}; move all tensors to one device")
    dtype = c_v.dtype
    low = [v_up] + ([q_latent, c_k] if scores is None else [])
    if dtype not in SUPPORTED_DTYPES or any(t.dtype != dtype for t in low):
        raise TypeError(f"c_v, v_up (and q_latent, c_k) must share one dtype among float32, float16, bfloat16; "
                        f"got {[str(t.dtype) for t in [c_v] + low]}")
    if c_v.dim() != 3 or v_up.dim() != 2 or v_up.shape[1] != c_v.shape[2]:
        raise ValueError(f"expected c_v (b, T, r_v) and v_up (kv_heads*head_dim, r_v); got {tuple(c_v.shape)}, "
                         f"{tuple(v_up.shape)}")
    b, total, r_v = c_v.shape
    rows = heads * q_len
    if heads < 1 or q_len < 1 or rows > MAX_ROWS:
        raise ValueError(f"heads={heads} x q_len={q_len} query rows; the kernel serves decode (1 to {MAX_ROWS})")
    if scores is None:
        if q_latent.dim() != 3 or c_k.dim() != 3 or tuple(q_latent.shape[:2]) != (b, rows) \
                or tuple(c_k.shape[:2]) != (b, total) or c_k.shape[2] != q_latent.shape[2]:
            raise ValueError(f"expected q_latent (b={b}, rows={rows}, r_k) and c_k (b={b}, T={total}, r_k); got "
                             f"{tuple(q_latent.shape)}, {tuple(c_k.shape)}")
        r_k = c_k.shape[2]
    else:
        if tuple(scores.shape) != (b, rows, total) or scores.dtype not in (torch.float32, dtype):
            raise ValueError(f"scores must be float32 or {dtype} of shape (b={b}, rows={rows}, T={total}); got "
                             f"{scores.dtype} {tuple(scores.shape)}")
        r_k = 0
    if head_dim < 1 or v_up.shape[0] % head_dim or heads % (v_up.shape[0] // head_dim):
        raise ValueError(f"v_up has {v_up.shape[0]} rows: expected kv_heads*head_dim (head_dim={head_dim}) with "
                         f"kv_heads dividing heads={heads}")
    return b, rows, total, r_k, r_v


def _mask_args(mask, b, heads, q_len, total):
    """(tensor, kind, strides) of the 4-D mask as the kernel reads it: size-1 dims broadcast (stride 0)."""
    if mask is None:
        if q_len != 1:
            raise ValueError("without a mask the kernel serves one new token per sequence (q_len=1); pass the "
                             "causal mask for more")
        return None, _MASK_NONE, (0, 0, 0, 0)
    if mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, heads) \
            or mask.shape[2] != q_len or mask.shape[3] < total:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected (b|1, heads|1, q_len={q_len}, >= T={total})")
    strides = tuple(0 if mask.shape[d] == 1 else mask.stride(d) for d in range(4))
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), _MASK_BOOL, strides
    if not mask.is_floating_point():
        raise TypeError(f"mask must be boolean (True = attend) or an additive float mask, got {mask.dtype}")
    return mask, _MASK_ADD, strides


def _new_workspace(shape, device):
    """fp32 scratch for the partials (every element is written before it is read; tests poison it)."""
    return torch.empty(shape, device=device, dtype=torch.float32)


def _launch(q_latent, scores, c_k, c_v, v_up, mask, scaling, heads, q_len, out, config: DecodeConfig):
    b, total, r_v = c_v.shape
    rows = heads * q_len
    if config.scores_first and scores is None:  # one GEMM (cuBLAS), the scale as its alpha
        scores = torch.baddbmm(c_v.new_empty(()).expand(b, rows, total), q_latent, c_k.transpose(1, 2),
                               beta=0, alpha=scaling)
        q_latent = c_k = None
    kv_heads_dim = v_up.shape[0]
    head_dim = out.shape[-1]
    group = heads // (kv_heads_dim // head_dim)
    chunks = cdiv(total, config.chunk)
    v_tiles = cdiv(r_v, config.block_v)
    acc = _new_workspace((b, chunks, rows, r_v), c_v.device)
    ml = _new_workspace((b, chunks, 2, rows), c_v.device)
    mask_t, kind, (smb, smh, smi, smt) = _mask_args(mask, b, heads, q_len, total)
    given = scores is not None
    latent_strides = (c_v.stride(0), c_v.stride(1), r_v) + (() if given else (
        q_latent.stride(0), q_latent.stride(1), c_k.stride(0), c_k.stride(1), c_k.shape[2]))
    align = alignment(*latent_strides)
    precision = FP32_DOT_PRECISION if c_v.dtype == torch.float32 else "tf32"
    upcast = c_v.dtype == torch.bfloat16 and _interpreted()
    launch(
        _partials_kernel, (chunks, v_tiles, b),
        q_latent if not given else c_v, scores if given else c_v, c_k if not given else c_v, c_v,
        mask_t if mask_t is not None else c_v, acc, ml,
        rows, q_len, total, 0 if given else c_k.shape[2], r_v, chunks, float(scaling),
        0 if given else q_latent.stride(0), 0 if given else q_latent.stride(1),
        scores.stride(0) if given else 0, scores.stride(1) if given else 0,
        0 if given else c_k.stride(0), 0 if given else c_k.stride(1), c_v.stride(0), c_v.stride(1),
        smb, smh, smi, smt,
        SCORES_GIVEN=given, MASK_KIND=kind, R_PAD=max(16, next_pow2(rows)), CHUNK=config.chunk,
        BLOCK_T=config.block_t, BLOCK_V=config.block_v, BLOCK_K=config.block_k,
        DOT_PRECISION=precision, DOT_UPCAST=upcast, ALIGN=align, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    n_rows = b * q_len
    whole = next_pow2(head_dim)
    block_d = max(16, min(config.block_d, whole) if config.block_d else whole)  # tl.dot's smallest size is 16
    launch(
        _combine_kernel, (heads, cdiv(n_rows, config.block_b), cdiv(head_dim, block_d)),
        acc, ml, v_up, out,
        n_rows, rows, q_len, heads, group, chunks, r_v, head_dim,
        v_up.stride(0),
        BLOCK_D=block_d, BLOCK_B=config.block_b, BLOCK_R=config.block_r,
        DOT_PRECISION=precision, DOT_UPCAST=upcast, ALIGN=alignment(r_v, v_up.stride(0)),
        EMPTY_ROWS_ZERO=kind == _MASK_BOOL, num_warps=4, num_stages=config.num_stages,
    )


_TUNED = TunedChoices("latent_decode", DecodeConfig)  # kept on disk too where TMPS_TUNING_CACHE asks (tmps.tuning_cache)


def _candidates(scores_given: bool) -> tuple:
    """The configs the tuner times (and benchmarks/compile_check.py compiles): scores-first ones only
    where the scores are not given."""
    return tuple(config for config in _CONFIGS + _SCORES_FIRST_CONFIGS + _SPLIT_D_CONFIGS
                 if not (scores_given and config.scores_first))


def _pick_config(args, kind_key) -> DecodeConfig:
    """Autotune once per (device, dtype, batch, rows, sizes (U_v's rows: the kv heads), T bucket, path) and
    cache the winner."""
    q_latent, scores, c_k, c_v, v_up, mask, scaling, heads, q_len, out = args
    if c_v.device.type != "cuda" or _interpreted():
        return _INTERPRETER_CONFIG
    if c_v.dtype == torch.float32:
        return _FP32_CONFIG
    b, total, r_v = c_v.shape
    key = (c_v.device, c_v.dtype, b, heads, q_len, 0 if c_k is None else c_k.shape[2], r_v, out.shape[-1],
           v_up.shape[0], min(next_pow2(total), 1 << 20), kind_key)
    config = _TUNED.get(key)  # one lookup: a miss also asks the on-disk cache, where it is on
    if config is not None:
        return config
    if torch.cuda.is_current_stream_capturing():  # cannot benchmark inside a CUDA graph capture
        return _CONFIGS[0]
    best = autotune(_candidates(scores_given=scores is not None), lambda config: _launch(*args, config),
                    decode_bench)  # a decode kernel: device time (see decode_bench)
    if best is None:
        raise RuntimeError(f"no latent-decode config fits this GPU for rows={heads * q_len}, r_v={r_v}")
    _TUNED[key] = best
    return best


def latent_decode_attention(q_latent, scores, c_k, c_v, v_up, mask, scaling, heads, q_len, head_dim, *,
                            config=None):
    """Softmax attention of ``heads·q_len`` query rows over the latent cache, up-projected per head.

    Parameters
    ----------
    q_latent : (b, heads·q_len, r_k) or None   absorbed queries ``U_k,gᵀ q`` (rows ``h·q_len + i``), no-RoPE path
    scores : (b, heads·q_len, T) float32 or None   precomputed scores, already scaled (RoPE path)
    c_k : (b, T, r_k) or None   key latents (with ``q_latent``)
    c_v : (b, T, r_v)   value latents
    v_up : (kv_heads·head_dim, r_v)   U_v, rows head-major; head h reads key/value head ``h // (heads / kv_heads)``
    mask : None (q_len must be 1) or 4-D ``(b|1, heads|1, q_len, ≥T)``, boolean (True = attend) or additive
    scaling : float   multiplies ``q_latent · c_k`` (ignored with ``scores``)
    heads, q_len, head_dim : int
    config : optional :class:`DecodeConfig` overriding the autotuner

    Returns ``(b, q_len, heads, head_dim)`` in c_v's dtype, contiguous (the layout HF's attention
    functions return). Accumulation is fp32; the probabilities enter the value product and ``ō`` the
    up-projection rounded to the input dtype, as in the torch chain.
    """
    b, rows, total, r_k, r_v = _validate(q_latent, scores, c_k, c_v, v_up, heads, q_len, head_dim)
    if config is not None and not isinstance(config, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig or None, got {type(config).__name__}")
    require_runnable(c_v.device, "latent_decode_attention", "latent_decode_attention_ref", "c_v")
    if mask is not None and mask.device != c_v.device:
        raise ValueError(f"mask is on {mask.device} but c_v is on {c_v.device}")
    q_latent, c_k, c_v, v_up = (unit_last(t) for t in (q_latent, c_k, c_v, v_up))
    if scores is not None and not scores.is_contiguous():
        scores = scores.contiguous()
    out = torch.empty((b, q_len, heads, head_dim), device=c_v.device, dtype=c_v.dtype)
    if out.numel() == 0:
        return out
    if total == 0:  # nothing to attend to: softmax over no positions is undefined; the chain gives NaN
        raise ValueError("the latent cache is empty (T = 0): nothing to attend to")
    args = (q_latent, scores, c_k, c_v, v_up, mask, scaling, heads, q_len, out)
    kind = (scores is not None, None if mask is None else mask.dtype == torch.bool)
    _launch(*args, config or _pick_config(args, kind))
    return out


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def latent_decode_attention_ref(q_latent, scores, c_k, c_v, v_up, mask, scaling, heads, q_len, head_dim):
    """The torch chain (kv mode's latent attention after its scores): same arguments and result,
    computed in c_v's dtype with a float32 softmax (float64 throughout for float64 inputs)."""
    b, total, r_v = c_v.shape
    kv_heads = v_up.shape[0] // head_dim
    if scores is None:
        scores = scaling * (q_latent @ c_k.transpose(1, 2))
    scores = scores.reshape(b, heads, q_len, total)
    if mask is not None:
        mask = mask[..., :total]
        if mask.dtype == torch.bool:
            scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(c_v.dtype)
    if mask is not None and mask.dtype == torch.bool:  # SDPA: a row with nothing to attend to gives 0
        probs = probs * mask.any(-1, keepdim=True)
    o_bar = probs.reshape(b, heads * q_len, total) @ c_v  # (b, rows, r_v)
    out = torch.einsum("bgmr,gdr->bgmd", o_bar.view(b, kv_heads, heads // kv_heads * q_len, r_v),
                       v_up.view(kv_heads, head_dim, r_v))
    return out.reshape(b, heads, q_len, head_dim).transpose(1, 2).contiguous()
