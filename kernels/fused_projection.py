"""Fused factor-core-factor projection: Q, K and V of a factorised attention in one launch (or two).

Math
----
Every projection of a compressed attention layer shares one input factor ``B`` and owns a
core per head and an optional output factor shared by its heads::

    z              = x @ B                          (M, r)        computed once, shared by all groups
    t_g[m, h, :]   = z[m] @ core_g[h]ᵀ              (M, n_g, s_g)
    y_g[m, h, :]   = t_g[m, h] @ out_factor_gᵀ      (M, n_g, o_g) (t_g itself when out_factor_g is None)
    y_g            = y_g.reshape(M, n_g * o_g) + bias_g

for P = 1..4 groups g (typically q, k, v).  ``in_factor`` may be absent (``B = I``, ``z = x``): kv
mode's projection, a dense per-head Q beside the K and V latent projections ``(1, r_k, d_in)``,
``(1, r_v, d_in)``, is then three GEMMs sharing one input, run as one launch over all their output
columns instead of three (z-pass configs, reading x as z).  The unfused chain writes ``z`` and
every ``t_g`` to memory and launches 1 + 2P GEMMs plus the bias adds; here ``t_g`` never leaves the
chip, ``z`` stays in registers (or, for large ranks, in a program-private scratch slice that L1/L2
serve back at once), and the whole thing is one launch -- or two, where the tuner finds that
computing ``z`` first with cuBLAS pays (z-pass configs, below).

Shapes and layout (all row-major / contiguous, one dtype: fp32, fp16 or bf16)
----------------------------------------------------------------------------
    x            (..., d_in)       leading dims flattened to M rows; row stride free, unit column stride
    in_factor    (d_in, r) | None  ``B``; None: ``r = d_in``, ``z = x`` (read as a contiguous matrix)
    cores[g]     (n_g, s_g, r)     read as an (n_g * s_g, r) matrix
    out_factors  (o_g, s_g) | None
    biases       (n_g * o_g,) | None
    outputs      (..., n_g * o_g)  head-major columns: column h * o_g + j is head h, feature j
                                   (the layout of ``nn.Linear(d_in, n_g * o_g)`` in HF models)

Tiling
------
The output columns of all groups are cut into *column tiles*: ``HEADS_PER_TILE[g]`` whole heads
of one group, sized so that the tile's latent width ``HEADS_PER_TILE[g] * S_PAD[g]`` is about
``BLOCK_T``.  A group without an out factor has independent output columns, so its tiles are
``BLOCK_T`` consecutive columns of the flattened ``(n_g * s_g)`` outputs (*flat* tiles, passed to
the kernel as virtual heads of width ``BLOCK_T`` with a mask at ``COLS[g] = n_g * s_g``): a latent
group of one 712-wide head is 12 tiles of 64 instead of one padded 1024-wide tile.  A 1-D grid
runs ``cdiv(M, BLOCK_M) * COL_SPLITS`` programs; program ``(row tile, split)`` owns ``BLOCK_M``
rows and a contiguous run of column tiles (possibly spanning groups), and

1. computes its ``z`` tile = x_tile @ B once (loop over d_in in BLOCK_K chunks, fp32 accumulate,
   rounded to the input dtype like the unfused chain),
2. for each of its column tiles: ``t = z @ core_tileᵀ`` (fp32), then the per-head out factor as one
   GEMM by folding heads into rows (``(BLOCK_M * heads, S_PAD) @ (S_PAD, O_PAD)``), adds the bias in
   fp32, casts, stores with masks.

Where ``z`` lives depends on the rank (``Z_IN_REGS``): when ``R_PAD <= _Z_REGS_MAX_R`` and
``BLOCK_M * R_PAD <= _Z_REGS_MAX`` the tile stays in registers for the program's whole run; for
larger ranks it is computed in BLOCK_R chunks into the program's slice of a (COL_SPLITS, M, r)
scratch buffer that the same program reads back right away (a CTA barrier orders the writes and
the reads).

``COL_SPLITS`` trades parallelism against recomputation: each split recomputes the ``z`` tile,
i.e. re-reads ``x_tile`` and all of ``B``.  Decode (M <= 16) is memory-bound with a single row
tile, so it wants many splits (one column tile per program at the extreme) to put every SM to work;
the price is ``COL_SPLITS`` reads of B, mostly from L2.  Prefill is compute-bound with plenty of row
tiles, so it wants 1-4 splits (z recomputed at most 4x, versus once per column tile for a naive
tiling).

Two passes (``KernelConfig.z_pass``): at large ranks those re-reads dominate.  On an H200, hidden
4096 at r = 2048 (B is 16 MiB), one program per column tile read B 48 times per decode step, and
prefill with 4 splits did 1.7x the chain's flops.  So the tuner may also pick configs that first
compute ``z = x @ B`` with one cuBLAS GEMM (B read once, z written once: M * r elements) and then
run the tile programs on that z (the scratch path, reading z instead of recomputing it): two
launches instead of one, t and the out factors still fused.  Each shape keeps whichever is faster.

r and s are padded to powers of two (>= 16, the smallest ``tl.dot`` size) with masks; M edges are masked; row offsets are int64, factor offsets int32 (the launcher checks each factor
holds fewer than 2**31 elements).
"""

from __future__ import annotations  # Triton reads the string annotations; lets this import without Triton

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ._common import FP32_DOT_PRECISION, SUPPORTED_DTYPES, autotune, check_tile_sizes, dot, jit, next_pow2
from ._common import cdiv, require_runnable, tl, triton_available
from ._common import aligned, alignment, decode_bench, eager_ms, launch
from ._common import interpreted as _interpreted
from ..tuning_cache import TunedChoices

__all__ = [
    "FusedProjection",
    "KernelConfig",
    "fused_factored_projection",
    "fused_factored_projection_ref",
    "triton_available",
]

_MAX_GROUPS = 4
_DECODE_MAX_M = 16
# Keep z in registers while its padded rank is at most _Z_REGS_MAX_R and the fp32 tile holds at
# most _Z_REGS_MAX elements (32 KiB: 64 registers per thread at 4 warps).  The rank bound keeps
# the whole-rank B and core tiles in shared memory: R_PAD = 512 needed 132 KiB at one stage
# (fp16, sm_90 compile, BLOCK_K = 128).  Chosen from these budgets, not from timings.
_Z_REGS_MAX_R = 128
_Z_REGS_MAX = 8192


# --------------------------------------------------------------------------------------------
# Config space
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of the fused projection kernel.

    block_m: rows of x per program.  block_t: target latent columns (heads * padded s) per column
    tile.  col_splits: programs sharing one row tile, each walking a contiguous run of column
    tiles and recomputing z; 0 means one program per column tile.  block_k: d_in chunk of
    ``x @ B``.  block_r: r chunk of the scratch path.  z_in_regs: None picks from ``_Z_REGS_MAX``.
    z_pass: compute z with a separate GEMM first (torch.matmul, cuBLAS on the GPU) and let every
    program read it instead of recomputing it; implies the scratch path.
    """

    block_m: int = 64
    block_t: int = 128
    col_splits: int = 1
    block_k: int = 64
    block_r: int = 64
    num_warps: int = 4
    num_stages: int = 3
    z_in_regs: Optional[bool] = None
    z_pass: bool = False

    def __post_init__(self):
        check_tile_sizes(self, ("block_m", "block_t", "block_k", "block_r"))
        if self.col_splits < 0:
            raise ValueError(f"KernelConfig.col_splits must be >= 0, got {self.col_splits}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"KernelConfig.num_warps must be a power of two <= 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"KernelConfig.num_stages must be >= 1, got {self.num_stages}")
        if self.z_pass and self.z_in_regs:
            raise ValueError("KernelConfig.z_pass reads z from memory: it cannot be combined with z_in_regs=True")


# Candidates, untuned: sizes follow Triton's matmul tutorial and the register budget above.
# Replace them with the winners of benchmarks/kernel_microbench.py once it has run on a GPU.
# Decode: one 16-row tile, so parallelism must come from the columns (col_splits 0 = one program
# per column tile; 16 = fewer programs that re-read B less often).
_DECODE_CONFIGS = tuple(
    KernelConfig(block_m=16, block_t=bt, col_splits=cs, block_k=128, block_r=64, num_warps=4, num_stages=3)
    for bt in (64, 128, 256)
    for cs in (0, 16)
) + tuple(  # z first (reads B once), then one program per column tile: many programs, each one core slice
    KernelConfig(block_m=16, block_t=bt, col_splits=0, block_k=128, block_r=br, num_warps=4, num_stages=3,
                 z_pass=True)
    for bt in (64, 128)
    for br in (64, 128)
) + tuple(  # flat tiles (no out factor) of 16 / 32 columns: kv mode's d_in x 4096 outputs over ~130-260
    # programs instead of ~65 (the out-factor groups' plans do not change below a head: pruned as duplicates)
    KernelConfig(block_m=16, block_t=bt, col_splits=0, block_k=128, block_r=128, num_warps=4, num_stages=4,
                 z_pass=True)
    for bt in (16, 32)
) + (  # more core bytes in flight per program: on the H200 the z-pass decode read its cores at ~1.7 TB/s,
    # 192 one-head programs over 132 SMs; deeper pipelines / wider r chunks are the untried knobs
    KernelConfig(block_m=16, block_t=64, col_splits=0, block_k=128, block_r=128, num_warps=4, num_stages=5,
                 z_pass=True),
    KernelConfig(block_m=16, block_t=64, col_splits=0, block_k=128, block_r=256, num_warps=8, num_stages=3,
                 z_pass=True),
)
# Prefill: many row tiles; few splits keep the recomputation of z at 1-4x.  Tiles of 64 x 128 and
# up get 8 warps: at 4 warps the fp16 sm_90 compile of 64 x 128 with an out factor used 255
# registers and spilled.
_PREFILL_CONFIGS = tuple(
    KernelConfig(block_m=bm, block_t=bt, col_splits=cs, block_k=64, block_r=64,
                 num_warps=4 if bm * bt < 8192 else 8, num_stages=3)
    for bm in (64, 128)
    for bt in (64, 128)
    for cs in (1, 2, 4)
) + tuple(  # z by cuBLAS first: no recomputation, so every column tile gets its own program
    KernelConfig(block_m=bm, block_t=bt, col_splits=0, block_k=64, block_r=64,
                 num_warps=4 if bm * bt < 8192 else 8, num_stages=3, z_pass=True)
    for bm in (64, 128)
    for bt in (64, 128)
) + (  # a deeper pipeline: at 3 stages the H200 ran the tile GEMM at ~490 TFLOP/s where cuBLAS ran
    # the chain's at ~650 (kv layout, 4096 tokens).  (128 x 256 tiles spilled 220 bytes with out factors.)
    KernelConfig(block_m=128, block_t=128, col_splits=0, block_k=64, block_r=64, num_warps=8, num_stages=4,
                 z_pass=True),
)
# fp32 is the accuracy path, not the fast one: dots run as 3xTF32 (FP32_DOT_PRECISION) whose
# operand splitting doubles the registers, so fp32 gets one small config per regime, untuned.  The
# fp16 prefill configs spilled up to 7 KiB in fp32 (sm_90 compile); these two compile without spills.
_FP32_DECODE_CONFIG = KernelConfig(block_m=16, block_t=64, col_splits=0, block_k=32, block_r=32, num_warps=4,
                                   num_stages=2)
_FP32_PREFILL_CONFIG = KernelConfig(block_m=32, block_t=64, col_splits=1, block_k=32, block_r=32, num_warps=8,
                                    num_stages=2)
# The CPU interpreter runs programs one after another in Python: fewest, largest programs.
_INTERPRETER_CONFIG = KernelConfig(block_m=32, block_t=128, col_splits=1, block_k=64, block_r=32, num_warps=4,
                                   num_stages=1)
# Without an in factor z is x itself: only z-pass configs apply (the others would compute x @ B).
_Z_GIVEN = {config: dataclasses.replace(config, z_pass=True, z_in_regs=None)
            for config in (_INTERPRETER_CONFIG, _FP32_DECODE_CONFIG, _FP32_PREFILL_CONFIG)}


def _m_bucket(m: int) -> int:
    """Autotuning key for the token count: decode sizes share one bucket, then powers of two."""
    return _DECODE_MAX_M if m <= _DECODE_MAX_M else min(next_pow2(m), 1 << 16)


@dataclass(frozen=True)
class _Plan:
    """Everything the launch derives from (config, shapes): the constexpr metadata and the grid."""

    heads: tuple  # per group, as the kernel sees it: flat groups as virtual heads of BLOCK_T columns
    s: tuple
    o: tuple
    cols: tuple  # n_g * s_g, the real output columns (the mask of a flat group's last tile)
    s_pad: tuple
    o_pad: tuple
    heads_per_tile: tuple
    tile_start: tuple  # P + 1 prefix sums of the groups' column tiles
    tiles_per_program: int
    col_splits: int
    r_pad: int
    z_in_regs: bool


@functools.lru_cache(maxsize=1024)
def _make_plan(config: KernelConfig, r: int, groups: tuple) -> _Plan:
    """groups: ((n_g, s_g, o_g, has_out_factor, has_bias), ...)."""
    heads, s_eff, o_eff, cols, s_pad, o_pad, heads_per_tile = [], [], [], [], [], [], []
    for n, s, o, has_out, _ in groups:
        if has_out:  # whole heads: the out factor mixes a head's s features
            sp = max(16, next_pow2(s))
            group = (n, s, o, sp, max(16, next_pow2(o)), min(next_pow2(n), max(1, config.block_t // sp)))
        else:  # flat: BLOCK_T consecutive output columns, one virtual head each
            width = min(config.block_t, max(16, next_pow2(n * s)))
            group = (cdiv(n * s, width), width, width, width, width, 1)
        for values, value in zip((heads, s_eff, o_eff, s_pad, o_pad, heads_per_tile), group):
            values.append(value)
        cols.append(n * s)
    tile_start = [0]
    for n, hpt in zip(heads, heads_per_tile):
        tile_start.append(tile_start[-1] + cdiv(n, hpt))
    num_tiles = tile_start[-1]
    splits = num_tiles if config.col_splits == 0 else min(config.col_splits, num_tiles)
    tiles_per_program = cdiv(num_tiles, splits)
    col_splits = cdiv(num_tiles, tiles_per_program)  # no split is left without tiles
    r_pad = max(16, next_pow2(r))
    if config.z_pass:
        z_in_regs = False
    elif config.z_in_regs is None:
        z_in_regs = r_pad <= _Z_REGS_MAX_R and config.block_m * r_pad <= _Z_REGS_MAX
    else:
        z_in_regs = config.z_in_regs
    return _Plan(tuple(heads), tuple(s_eff), tuple(o_eff), tuple(cols), tuple(s_pad), tuple(o_pad),
                 tuple(heads_per_tile), tuple(tile_start), tiles_per_program, col_splits, r_pad, z_in_regs)


def _prune_configs(configs, m: int, r: int, groups: tuple):
    """Drop row tiles far taller than M and configs whose plan duplicates an earlier one."""
    keep, seen = [], set()
    for config in configs:
        if config.block_m > max(64, next_pow2(m)):
            continue
        plan = _make_plan(config, r, groups)
        signature = (config.block_m, config.block_k, config.block_r, config.num_warps, config.num_stages,
                     config.z_pass, plan)
        if signature not in seen:
            seen.add(signature)
            keep.append(config)
    return keep


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


@jit
def _z_tile(
    x_ptr, b_ptr,  # x rows of this program, in_factor B
    rows64, row_mask, r_offs, r_mask,  # (BLOCK_M,) int64 rows and mask, (WIDTH,) r columns and mask
    d_in, r, stride_xm,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, WIDTH: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    # z[rows, r_offs] = x[rows, :] @ B[:, r_offs], fp32 accumulate over d_in in BLOCK_K chunks.
    acc = tl.zeros((BLOCK_M, WIDTH), dtype=tl.float32)
    k_offs = tl.arange(0, BLOCK_K)
    for k0 in range(0, d_in, BLOCK_K):
        k = k0 + k_offs
        k_mask = k < d_in
        x_tile = tl.load(x_ptr + rows64[:, None] * stride_xm + k[None, :],
                         mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b_tile = tl.load(b_ptr + k[:, None] * r + r_offs[None, :],
                         mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = dot(x_tile, b_tile, acc, DOT_PRECISION, DOT_UPCAST)
    return acc


@jit
def _project_tile(
    z, z_base,  # z tile in registers (Z_IN_REGS) or the base of this program's scratch rows
    core_ptr, out_factor_ptr, bias_ptr, y_ptr,  # this group's tensors
    rows64, row_mask, head0, r, stride_ym,
    # group metadata (COLS: the group's real output columns; a flat group's last tile stops there)
    HEADS: tl.constexpr, S: tl.constexpr, O: tl.constexpr, COLS: tl.constexpr, S_PAD: tl.constexpr, O_PAD: tl.constexpr,
    HEADS_PER_TILE: tl.constexpr, HAS_OUT_FACTOR: tl.constexpr, HAS_BIAS: tl.constexpr,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, R_PAD: tl.constexpr, Z_IN_REGS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, Y_ALIGN: tl.constexpr,
):
    dtype = y_ptr.dtype.element_ty
    stride_ym = aligned(stride_ym, Y_ALIGN)  # e.g. kv mode's 712-wide latent rows
    # -- latent columns of the tile: heads head0 .. head0 + HEADS_PER_TILE, features padded to S_PAD
    t_cols = tl.arange(0, HEADS_PER_TILE * S_PAD)
    t_head = head0 + t_cols // S_PAD
    t_feat = t_cols % S_PAD
    core_row = t_head * S + t_feat  # row of core viewed as (HEADS * S, r)
    t_mask = (t_head < HEADS) & (t_feat < S) & (core_row < COLS)

    # -- t = z @ core_tileᵀ : (BLOCK_M, HEADS_PER_TILE * S_PAD), fp32
    if Z_IN_REGS:
        k = tl.arange(0, R_PAD)
        core_t = tl.load(core_ptr + core_row[None, :] * r + k[:, None],
                         mask=t_mask[None, :] & (k < r)[:, None], other=0.0)
        t = dot(z, core_t, tl.zeros((BLOCK_M, HEADS_PER_TILE * S_PAD), dtype=tl.float32), DOT_PRECISION,
                 DOT_UPCAST)
    else:
        t = tl.zeros((BLOCK_M, HEADS_PER_TILE * S_PAD), dtype=tl.float32)
        for r0 in range(0, r, BLOCK_R):
            k = r0 + tl.arange(0, BLOCK_R)
            k_mask = k < r
            z_chunk = tl.load(z_base + rows64[:, None] * r + k[None, :],
                              mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            core_t = tl.load(core_ptr + core_row[None, :] * r + k[:, None],
                             mask=t_mask[None, :] & k_mask[:, None], other=0.0)
            t = dot(z_chunk, core_t, t, DOT_PRECISION, DOT_UPCAST)

    # -- y = t @ out_factorᵀ per head: fold heads into rows for one (BLOCK_M * heads, S_PAD) GEMM
    if HAS_OUT_FACTOR:
        s_offs = tl.arange(0, S_PAD)
        o_offs = tl.arange(0, O_PAD)
        out_factor_t = tl.load(out_factor_ptr + o_offs[None, :] * S + s_offs[:, None],
                               mask=(s_offs < S)[:, None] & (o_offs < O)[None, :], other=0.0)
        t_rows = tl.reshape(t.to(dtype), (BLOCK_M * HEADS_PER_TILE, S_PAD))
        y = dot(t_rows, out_factor_t, tl.zeros((BLOCK_M * HEADS_PER_TILE, O_PAD), dtype=tl.float32),
                 DOT_PRECISION, DOT_UPCAST)
        y = tl.reshape(y, (BLOCK_M, HEADS_PER_TILE * O_PAD))
        y_cols = tl.arange(0, HEADS_PER_TILE * O_PAD)
        y_head = head0 + y_cols // O_PAD
        y_feat = y_cols % O_PAD
        y_mask = (y_head < HEADS) & (y_feat < O)
        y_col = y_head * O + y_feat
    else:
        y = t
        y_mask = t_mask
        y_col = core_row  # head-major columns coincide with the core rows

    # -- bias in fp32, cast, masked store
    if HAS_BIAS:
        # At 128-wide decode tiles this compiles to one 2-byte load per thread (compile_check counts
        # them: 3 per kernel, one per group): 256 bytes per tile, coalesced per warp, left as is.
        bias = tl.load(bias_ptr + y_col, mask=y_mask, other=0.0)
        y = y + bias.to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + y_col[None, :], y.to(dtype),
             mask=row_mask[:, None] & y_mask[None, :])


@jit
def _fused_factored_projection_kernel(
    # pointers; per-group tuples hold P entries (absent out factors / biases point at the core)
    x_ptr, in_factor_ptr, z_scratch_ptr,
    core_ptrs, out_factor_ptrs, bias_ptrs, y_ptrs,
    # sizes
    M, d_in, r,
    # strides (unit column strides everywhere)
    stride_xm, y_row_strides,
    # per-group metadata, tuples of P constexprs
    HEADS: tl.constexpr, S: tl.constexpr, O: tl.constexpr, COLS: tl.constexpr,
    S_PAD: tl.constexpr, O_PAD: tl.constexpr, HEADS_PER_TILE: tl.constexpr,
    TILE_START: tl.constexpr,  # P + 1 prefix sums of the column tiles per group
    HAS_OUT_FACTOR: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_GROUPS: tl.constexpr,
    # meta-parameters
    TILES_PER_PROGRAM: tl.constexpr, COL_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, R_PAD: tl.constexpr,
    Z_IN_REGS: tl.constexpr,
    Z_GIVEN: tl.constexpr,  # z_scratch_ptr holds z = x @ B, (M, r), computed before the launch
    R_ALIGN: tl.constexpr,  # r is a multiple of it (see _common.aligned)
    Y_ALIGN: tl.constexpr,  # so is every output's row stride
    DOT_PRECISION: tl.constexpr,  # FP32_DOT_PRECISION for fp32, ignored for 16-bit
    DOT_UPCAST: tl.constexpr,  # interpreter + bf16 only, see _common.dot
):
    # -- r is the row stride of z, B and the cores: with the divisibility the launcher checked
    r = aligned(r, R_ALIGN)
    # -- program -> (row tile, column split); splits of one row tile are adjacent so that their
    #    x tile and B stay hot in L2
    pid = tl.program_id(0)
    pid_split = pid % COL_SPLITS
    pid_m = pid // COL_SPLITS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    dtype = x_ptr.dtype.element_ty

    # -- z tile = x_tile @ B, once per program (or already in memory)
    if Z_GIVEN:
        z = 0.0  # unused: the tiles read z from memory
        z_base = z_scratch_ptr
    elif Z_IN_REGS:
        z_base = z_scratch_ptr
        r_offs = tl.arange(0, R_PAD)
        z = _z_tile(x_ptr, in_factor_ptr, rows64, row_mask, r_offs, r_offs < r, d_in, r, stride_xm,
                    BLOCK_M, BLOCK_K, R_PAD, DOT_PRECISION, DOT_UPCAST).to(dtype)
    else:
        z = 0.0  # unused: the tiles read z back from scratch
        z_base = z_scratch_ptr + pid_split.to(tl.int64) * M * r
        for r0 in range(0, r, BLOCK_R):
            r_offs = r0 + tl.arange(0, BLOCK_R)
            r_mask = r_offs < r
            z_chunk = _z_tile(x_ptr, in_factor_ptr, rows64, row_mask, r_offs, r_mask, d_in, r, stride_xm,
                              BLOCK_M, BLOCK_K, BLOCK_R, DOT_PRECISION, DOT_UPCAST)
            tl.store(z_base + rows64[:, None] * r + r_offs[None, :], z_chunk.to(dtype),
                     mask=row_mask[:, None] & r_mask[None, :])
        # make this CTA's scratch writes visible to all of its threads before they read them back
        tl.debug_barrier()

    # -- walk this program's column tiles, group by group
    tile_lo = pid_split * TILES_PER_PROGRAM
    tile_hi = tile_lo + TILES_PER_PROGRAM
    for g in tl.static_range(NUM_GROUPS):
        lo = tl.maximum(tile_lo, TILE_START[g])
        hi = tl.minimum(tile_hi, TILE_START[g + 1])
        for tile in range(lo, hi):
            _project_tile(
                z, z_base, core_ptrs[g], out_factor_ptrs[g], bias_ptrs[g], y_ptrs[g],
                rows64, row_mask, (tile - TILE_START[g]) * HEADS_PER_TILE[g], r, y_row_strides[g],
                HEADS[g], S[g], O[g], COLS[g], S_PAD[g], O_PAD[g], HEADS_PER_TILE[g], HAS_OUT_FACTOR[g], HAS_BIAS[g],
                BLOCK_M, BLOCK_R, R_PAD, Z_IN_REGS, DOT_PRECISION, DOT_UPCAST, Y_ALIGN,
            )


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _check_tensor(name: str, tensor, shape: Optional[tuple], device):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but x is on {device}; move all tensors to one device")
    if shape is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    if tensor.numel() >= 2**31:
        raise ValueError(f"{name} has {tensor.numel()} elements; factors must hold fewer than 2**31")


def _validate(x, in_factor, cores, out_factors, biases):
    """Check types, devices, dtypes and shapes; return (d_in, r, groups) with
    groups = ((n_g, s_g, o_g, has_out_factor, has_bias), ...)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have shape (..., d_in), got a 0-d tensor")
    for name, seq in (("cores", cores), ("out_factors", out_factors), ("biases", biases)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple, got {type(seq).__name__}")
    num_groups = len(cores)
    if not 1 <= num_groups <= _MAX_GROUPS:
        raise ValueError(f"cores must hold 1 to {_MAX_GROUPS} groups, got {num_groups}")
    if len(out_factors) != num_groups or len(biases) != num_groups:
        raise ValueError(
            f"cores, out_factors and biases must have equal lengths, got {num_groups}, {len(out_factors)} "
            f"and {len(biases)} (use None for an absent out factor or bias)"
        )

    tensors = [("x", x)] + ([("in_factor", in_factor)] if in_factor is not None else [])
    tensors += [(f"cores[{g}]", c) for g, c in enumerate(cores)]
    tensors += [(f"out_factors[{g}]", a) for g, a in enumerate(out_factors) if a is not None]
    tensors += [(f"biases[{g}]", b) for g, b in enumerate(biases) if b is not None]
    for name, tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    dtypes = {name: t.dtype for name, t in tensors}
    if len(set(dtypes.values())) != 1 or x.dtype not in SUPPORTED_DTYPES:
        listed = ", ".join(f"{name}={dt}" for name, dt in dtypes.items())
        raise TypeError(
            f"all tensors must share one dtype among float32, float16, bfloat16; got {listed}"
        )

    d_in = x.shape[-1]
    if in_factor is not None and (in_factor.dim() != 2 or in_factor.shape[0] != d_in):
        raise ValueError(f"in_factor has shape {tuple(in_factor.shape)}, expected (d_in={d_in}, r)")
    r = in_factor.shape[1] if in_factor is not None else d_in  # no in factor: z = x
    if d_in == 0 or r == 0:
        raise ValueError(f"d_in and r must be positive, got d_in={d_in}, r={r}")
    if in_factor is not None:
        _check_tensor("in_factor", in_factor, None, x.device)

    groups = []
    for g in range(num_groups):
        core = cores[g]
        if core.dim() != 3 or core.shape[2] != r or core.shape[0] == 0 or core.shape[1] == 0:
            raise ValueError(f"cores[{g}] has shape {tuple(core.shape)}, expected (n_heads, s, r={r})")
        n, s = core.shape[0], core.shape[1]
        _check_tensor(f"cores[{g}]", core, None, x.device)
        out_factor = out_factors[g]
        if out_factor is None:
            o = s
        else:
            if out_factor.dim() != 2 or out_factor.shape[1] != s or out_factor.shape[0] == 0:
                raise ValueError(f"out_factors[{g}] has shape {tuple(out_factor.shape)}, expected (o, s={s})")
            o = out_factor.shape[0]
            _check_tensor(f"out_factors[{g}]", out_factor, None, x.device)
        if biases[g] is not None:
            _check_tensor(f"biases[{g}]", biases[g], (n * o,), x.device)
        groups.append((n, s, o, out_factor is not None, biases[g] is not None))
    return d_in, r, tuple(groups)


_CHECKED: dict = {}  # _signature(...) -> _validate(...): what passed once passes again


def _signature(x, in_factor, cores, out_factors, biases):
    """Everything :func:`_validate` reads of its arguments, as a dict key; None where it would fail
    before reading it all (a non-tensor, a 0-d x, groups not in a list or tuple).

    The checks depend on types, dtypes, devices and shapes alone, so one key gives one verdict. A
    compiled graph's ``tmps::fused_projection`` op builds a launcher at every call (it has nowhere to
    keep one): the checks took 12.3 us of its 48 a call at OPT-1.3B's decode shape on this project's
    CPU, building and looking up this key 3.6 us.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        return None
    if not all(isinstance(seq, (list, tuple)) for seq in (cores, out_factors, biases)):
        return None
    tensors = (in_factor, *cores, *out_factors, *biases)
    if not all(t is None or isinstance(t, torch.Tensor) for t in tensors):
        return None
    return (x.dtype, x.device, x.shape[-1], len(cores), len(out_factors), len(biases),
            tuple(None if t is None else (t.dtype, t.device, t.shape) for t in tensors))


def _validated(x, in_factor, cores, out_factors, biases):
    """:func:`_validate`, run once per :func:`_signature` (a failure is never kept: it raises again)."""
    key = _signature(x, in_factor, cores, out_factors, biases)
    checked = _CHECKED.get(key) if key is not None else None
    if checked is None:
        checked = _validate(x, in_factor, cores, out_factors, biases)
        if key is not None:
            _CHECKED[key] = checked
    return checked


@functools.lru_cache(maxsize=1024)
def _launch_meta(config: KernelConfig, r: int, groups: tuple, dtype: torch.dtype):
    """``(plan, constexpr keyword arguments, output widths)`` of a launch: fixed by the config, shapes
    and dtype, so built once (a decode call is host-bound: rebuilding these ~25 arguments took 3.5 us
    a launch on this project's CPU, the cached lookup 0.5). ``Y_ALIGN`` assumes contiguous outputs,
    rows of these widths; :func:`_launch` restates it for other row strides."""
    plan = _make_plan(config, r, groups)
    widths = tuple(n * o for n, _, o, _, _ in groups)
    meta = dict(
        HEADS=plan.heads, S=plan.s, O=plan.o, COLS=plan.cols,
        S_PAD=plan.s_pad, O_PAD=plan.o_pad, HEADS_PER_TILE=plan.heads_per_tile, TILE_START=plan.tile_start,
        HAS_OUT_FACTOR=tuple(g[3] for g in groups), HAS_BIAS=tuple(g[4] for g in groups),
        NUM_GROUPS=len(groups),
        TILES_PER_PROGRAM=plan.tiles_per_program, COL_SPLITS=plan.col_splits,
        BLOCK_M=config.block_m, BLOCK_K=config.block_k, BLOCK_R=config.block_r, R_PAD=plan.r_pad,
        Z_IN_REGS=plan.z_in_regs, Z_GIVEN=config.z_pass, R_ALIGN=alignment(r), Y_ALIGN=alignment(*widths),
        DOT_PRECISION=FP32_DOT_PRECISION if dtype == torch.float32 else "tf32",
        DOT_UPCAST=dtype == torch.bfloat16 and _interpreted(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return plan, meta, widths


def _factor_args(cores, out_factors, biases) -> tuple:
    """The kernel's factor pointer tuples; an absent out factor or bias passes its core (never read)."""
    return (tuple(cores),
            tuple(a if a is not None else c for a, c in zip(out_factors, cores)),
            tuple(b if b is not None else c for b, c in zip(biases, cores)))


def _launch(x2d, in_factor, cores, out_factors, biases, ys, r, groups, config: KernelConfig, z=None,
            factor_args=None):
    """Launch the kernel once with ``config``; every argument is already checked.

    z: for z-pass configs, ``x2d @ in_factor`` if already at hand ((M, r), contiguous); computed here
    otherwise.  (benchmarks/compile_check.py passes an empty one: it only captures the launch.)
    factor_args: :func:`_factor_args` of the factors, if a :class:`FusedProjection` holds them.
    """
    plan, meta, widths = _launch_meta(config, r, groups, x2d.dtype)
    m, d_in = x2d.shape
    y_strides = tuple(y.stride(0) for y in ys)
    if y_strides != widths:  # outputs that are views of a wider buffer
        meta = {**meta, "Y_ALIGN": alignment(*y_strides)}
    if in_factor is None:  # z = x: the launcher made x2d contiguous
        if not config.z_pass:
            raise ValueError(f"in_factor=None reads x as z: it needs a z-pass config, got {config}")
        scratch = x2d
    elif config.z_pass:
        scratch = x2d @ in_factor if z is None else z  # the same GEMM as the unfused chain's first
    elif plan.z_in_regs:
        scratch = x2d  # unused by the kernel
    else:
        scratch = torch.empty((plan.col_splits, m, r), device=x2d.device, dtype=x2d.dtype)
    grid = (cdiv(m, config.block_m) * plan.col_splits,)
    core_args, out_args, bias_args = factor_args or _factor_args(cores, out_factors, biases)
    launch(
        _fused_factored_projection_kernel, grid,
        x2d, in_factor if in_factor is not None else x2d, scratch,
        core_args, out_args, bias_args, tuple(ys),
        m, d_in, r,
        x2d.stride(0), y_strides,
        **meta,
    )


_TUNED = TunedChoices("fused_projection", KernelConfig)  # kept on disk too where TMPS_TUNING_CACHE asks (tmps.tuning_cache)


def _heuristic_config(m: int, z_given: bool) -> KernelConfig:
    """The untimed pick (inside a CUDA-graph capture): 128-column decode tiles, one program each;
    64 x 128 prefill tiles, one split; without an in factor the first z-pass candidate of the regime."""
    pool = _DECODE_CONFIGS if m <= _DECODE_MAX_M else _PREFILL_CONFIGS
    if z_given:
        return next(config for config in pool if config.z_pass)
    return pool[2] if m <= _DECODE_MAX_M else pool[3]


def _tuning_bench(m: int):
    """How the tuner times candidates for ``m`` rows: device time at decode sizes, where eager timing
    is host-bound (:func:`decode_bench`), ``do_bench``'s eager median at prefill sizes, where the
    launch is a rounding error of a compute-bound call."""
    return decode_bench if m <= _DECODE_MAX_M else eager_ms


def _tune_key(device, dtype, m, d_in, r, groups, z_given=False):
    return (torch.device(device), dtype, _m_bucket(m), d_in, r, groups, z_given)  # the device, not its index: see tmps.tuning_cache


def _pick_config(x2d, in_factor, cores, out_factors, biases, ys, r, groups) -> KernelConfig:
    """Autotune once per (device, dtype, M bucket, d_in, r, groups) and cache the winner."""
    m, d_in = x2d.shape
    z_given = in_factor is None

    def usable(config):
        return _Z_GIVEN.get(config, config) if z_given else config

    if x2d.device.type != "cuda" or _interpreted():
        return usable(_INTERPRETER_CONFIG)
    if x2d.dtype == torch.float32:
        return usable(_FP32_DECODE_CONFIG if m <= _DECODE_MAX_M else _FP32_PREFILL_CONFIG)
    key = _tune_key(x2d.device, x2d.dtype, m, d_in, r, groups, z_given)
    config = _TUNED.get(key)
    if config is not None:
        return config
    if torch.cuda.is_current_stream_capturing():  # cannot benchmark inside a CUDA graph capture
        return _heuristic_config(m, z_given)
    candidates = [c for c in (_DECODE_CONFIGS if m <= _DECODE_MAX_M else _PREFILL_CONFIGS) if c.z_pass or not z_given]
    candidates = _prune_configs(candidates, m, r, groups)
    best = autotune(
        candidates,
        lambda config: _launch(x2d, in_factor, cores, out_factors, biases, ys, r, groups, config),
        _tuning_bench(m),
    )
    if best is None:
        raise RuntimeError(f"no fused projection config fits this GPU for d_in={d_in}, r={r}, groups={groups}")
    _TUNED[key] = best
    return best


class FusedProjection:
    """:func:`fused_factored_projection` with its factors fixed: they are checked once, at
    construction, against ``like`` (an input of the dtype, device and width every call will pass);
    each call then checks only ``x``.

    A compressed attention layer calls its projection with the same factors at every step, and at
    decode sizes the call is host-bound: re-checking ~10 factor tensors, module attribute lookups and
    rebuilding the launch's arguments took the projection module 128-185 us a call on this project's
    CPU (at 0bd237e; 42-77 with this launcher), against ~20 us of device time for the kernel on an
    H200 (``python benchmarks/host_overhead.py`` measures the host side).
    Contiguous factors are held, not copied, so in-place updates (``load_state_dict``) are seen;
    ``copied`` says whether some factor was not contiguous and a contiguous copy is held instead.
    """

    def __init__(self, in_factor, cores, out_factors, biases, *, like):
        d_in, r, groups = _validated(like, in_factor, cores, out_factors, biases)
        self.dtype, self.device, self.d_in, self.r, self.groups = like.dtype, like.device, d_in, r, groups
        held_in = in_factor.contiguous() if in_factor is not None else None
        held_cores = [c.contiguous() for c in cores]
        held_outs = [a.contiguous() if a is not None else None for a in out_factors]
        held_biases = [b.contiguous() if b is not None else None for b in biases]
        given = [in_factor, *cores, *out_factors, *biases]
        self.copied = any(h is not g for h, g in zip([held_in, *held_cores, *held_outs, *held_biases], given))
        self.in_factor, self.cores, self.out_factors, self.biases = held_in, held_cores, held_outs, held_biases
        self.widths = tuple(n * o for n, _, o, _, _ in groups)
        self._factor_args = _factor_args(held_cores, held_outs, held_biases)

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the factors are {self.dtype}; cast x or the factors")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the factors are on {self.device}; move all tensors to one device")
        if x.dim() < 1 or x.shape[-1] != self.d_in:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (..., d_in={self.d_in})")

    def __call__(self, x, out=None, *, config=None):
        """The projections of ``x: (..., d_in)``: a list of P tensors ``(..., n_g * o_g)`` (or ``out``)."""
        self._check_input(x)
        if config is not None and not isinstance(config, KernelConfig):
            raise TypeError(f"config must be a KernelConfig or None, got {type(config).__name__}")
        d_in = self.d_in
        lead = tuple(x.shape[:-1])
        m = 1
        for size in lead:
            m *= size
        x2d = x.reshape(m, d_in)
        if x2d.stride(1) != 1 or (self.in_factor is None and m > 1 and x2d.stride(0) != d_in):
            x2d = x2d.contiguous()  # without an in factor the kernel reads x as the (M, r) matrix z

        widths = self.widths
        if out is None:
            out = [torch.empty(lead + (w,), device=x.device, dtype=x.dtype) for w in widths]
            ys = [y.view(m, w) for y, w in zip(out, widths)]
        else:
            out, ys = self._check_out(out, lead, m)
        require_runnable(x.device, "fused_factored_projection", "fused_factored_projection_ref", "x")
        if m == 0:
            return out

        args = (x2d, self.in_factor, self.cores, self.out_factors, self.biases, ys, self.r, self.groups)
        if config is None:
            config = _pick_config(*args)
        _launch(*args, config, factor_args=self._factor_args)
        return out

    def _check_out(self, out, lead, m):
        if not isinstance(out, (list, tuple)) or len(out) != len(self.groups):
            raise ValueError(f"out must be a list of {len(self.groups)} tensors, one per group")
        out = list(out)
        ys = []
        for g, (y, w) in enumerate(zip(out, self.widths)):
            _check_tensor(f"out[{g}]", y, lead + (w,), self.device)
            if y.dtype != self.dtype:
                raise TypeError(f"out[{g}] has dtype {y.dtype}, expected {self.dtype} (the dtype of x)")
            try:
                y2d = y.view(m, w)
            except RuntimeError:
                y2d = None
            if y2d is None or (m > 1 and y2d.stride(1) != 1) or (w > 1 and y.stride(-1) != 1):
                raise ValueError(
                    f"out[{g}] with strides {tuple(y.stride())} cannot be written as an ({m}, {w}) matrix "
                    "with unit column stride"
                )
            ys.append(y2d)
        return out, ys


def fused_factored_projection(x, in_factor, cores, out_factors, biases, out=None, *, config=None):
    """Compute every group's ``((x @ in_factor) @ core_gᵀ) @ out_factor_gᵀ + bias_g`` in one launch.

    Parameters
    ----------
    x : Tensor of shape ``(..., d_in)``
    in_factor : Tensor of shape ``(d_in, r)``, shared by all groups, or None (``z = x``, ``r = d_in``)
    cores : list of P (1 to 4) Tensors, ``cores[g]`` of shape ``(n_g, s_g, r)``, one core per head
    out_factors : list of P entries, each a Tensor of shape ``(o_g, s_g)`` shared by the group's
        heads, or None (the head output is the latent itself, o_g = s_g)
    biases : list of P entries, each a Tensor of shape ``(n_g * o_g,)`` or None
    out : optional list of P Tensors of shape ``(..., n_g * o_g)`` to write into (unit column
        stride; any row stride that flattens to ``(M, n_g * o_g)``, e.g. slices of a packed QKV
        buffer). They must not overlap the inputs.
    config : optional :class:`KernelConfig` overriding the autotuner (tests, benchmarks).

    All tensors share one device and one dtype (float32, float16 or bfloat16); accumulation is
    fp32, and z and t are rounded to the input dtype between GEMMs like the unfused chain.  On the
    GPU fp32 products run as 3xTF32 (error close to fp32's, not bit-equal to torch's fp32 GEMM).
    Repeated calls with the same factors: :class:`FusedProjection` checks them once.

    Returns
    -------
    list of P Tensors, ``y_g`` of shape ``(..., n_g * o_g)`` (the ``out`` tensors when given).
    """
    return FusedProjection(in_factor, cores, out_factors, biases, like=x)(x, out, config=config)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def fused_factored_projection_ref(x, in_factor, cores, out_factors, biases):
    """Plain torch version of :func:`fused_factored_projection` (the unfused chain), computed in
    x's dtype. Same arguments (without ``out``) and return value."""
    if not (len(cores) == len(out_factors) == len(biases)):
        raise ValueError(
            f"cores, out_factors and biases must have equal lengths, got {len(cores)}, {len(out_factors)} "
            f"and {len(biases)}"
        )
    lead = x.shape[:-1]
    z = x @ in_factor if in_factor is not None else x  # (..., r)
    outputs = []
    for core, out_factor, bias in zip(cores, out_factors, biases):
        n, s, r = core.shape
        t = (z @ core.reshape(n * s, r).T).unflatten(-1, (n, s))  # (..., n, s)
        y = t if out_factor is None else t @ out_factor.T  # (..., n, o)
        y = y.reshape(*lead, -1)
        if bias is not None:
            y = y + bias
        outputs.append(y)
    return outputs
