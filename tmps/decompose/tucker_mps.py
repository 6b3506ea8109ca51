"""The prototype's combined Tucker-MPS decomposition, generalised to any 3-way tensor and any matrix.

Algorithm (for a 3-way tensor ``X`` of shape ``(n1, n2, n3)``):

1. MPS: ``X ≈ C1 · C2 · C3`` by TT-SVD with energy threshold ``mps_eps``; ``C1: (n1, s1)``,
   ``C2: (s1, n2, s2)``, ``C3: (s2, n3)``, with ``C1`` orthonormal.
2. HOOI on the middle core: ``C2 ≈ K ×₁ V1 ×₂ V2 ×₃ V3`` with ``hooi_ranks`` clipped to
   ``(s1, n2, s2)`` (the MPS has already removed what lies beyond its ranks).
3. Contract the outer MPS cores into the Tucker factors: ``U1 = C1 V1``, ``U2 = V2``,
   ``U3 R = C3ᵀ V3`` (QR, with ``R`` folded into the core) so that every factor is orthonormal.

Format kept: a plain Tucker tensor ``X ≈ K' ×₁ U1 ×₂ U2 ×₃ U3`` of ranks ``(r1, r2, r3)``; the MPS
is the route to it. Kept parameters are ``r1 r2 r3 + n1 r1 + n2 r2 + n3 r3``, and the compression
ratio printed everywhere is kept parameters / dense parameters.

A matrix ``W: (m, n)`` is first reshaped (row-major) into a 3-way tensor; the prototype's
``768 × 768 → 64 × 64 × 144`` is the default for 768.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._linalg import mode_dot
from ._validate import validate_eps, validate_ranks, validate_tensor
from .tt import tt_svd
from .tucker import TuckerTensor, hooi

__all__ = [
    "TuckerMPS",
    "tucker_mps_tensor",
    "tucker_mps",
    "combined_mps_hooi_compression",
    "default_tensor_shape",
    "compression_ratio",
]


def compression_ratio(kept_parameters: int, dense_parameters: int) -> float:
    """Parameters kept / dense parameters (lower is more compressed)."""
    if dense_parameters <= 0:
        raise ValueError(f"dense_parameters must be positive, got {dense_parameters}")
    return kept_parameters / dense_parameters


@dataclass
class TuckerMPS:
    """Result of :func:`tucker_mps` on a matrix.

    Attributes
    ----------
    tucker : TuckerTensor
        The Tucker tensor of the reshaped matrix, shape ``tensor_shape``.
    matrix_shape : tuple[int, int]
        ``(m, n)`` of the original matrix.
    mps_ranks : tuple[int, int]
        Internal TT ranks ``(s1, s2)`` chosen by ``mps_eps``.
    """

    tucker: TuckerTensor
    matrix_shape: tuple[int, int]
    mps_ranks: tuple[int, int]

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        return self.tucker.shape

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.tucker.ranks

    def num_parameters(self) -> int:
        return self.tucker.num_parameters()

    def compression_ratio(self) -> float:
        m, n = self.matrix_shape
        return compression_ratio(self.num_parameters(), m * n)

    def to_matrix(self) -> torch.Tensor:
        return self.tucker.to_tensor().reshape(self.matrix_shape)


def default_tensor_shape(m: int, n: int) -> tuple[int, int, int]:
    """A 3-way shape ``(k, k, m n / k²)`` for reshaping an ``m × n`` matrix.

    ``k`` is the largest integer ``<= (m n)^{1/3}`` whose square divides ``m n``, which gives the
    prototype's ``(64, 64, 144)`` for 768 × 768 and keeps the modes balanced. When no such
    ``k >= 2`` exists (e.g. prime sizes) the matrix's own modes are split as ``(m, 1, n)``.
    """
    total = m * n
    k = int(round(total ** (1.0 / 3.0)))
    while k > 1 and (k * k > total or total % (k * k)):
        k -= 1
    if k < 2:
        return (m, 1, n)
    return (k, k, total // (k * k))


def tucker_mps_tensor(
    tensor: torch.Tensor,
    mps_eps: float | None = 0.99,
    hooi_ranks: Sequence[int] = (6, 6, 8),
    n_iter_max: int = 50,
    compute_dtype: torch.dtype | None = None,
) -> tuple[TuckerTensor, tuple[int, int]]:
    """Tucker-MPS of a 3-way tensor ``(n1, n2, n3)``: TT-SVD with ``mps_eps``, then HOOI of the middle core.

    Returns the Tucker tensor (orthonormal factors ``(n_k, r_k)``, core ``(r1, r2, r3)``) and the
    MPS ranks ``(s1, s2)``. ``hooi_ranks[k]`` must not exceed ``n_k``; ranks above the MPS ranks
    are clipped to them. ``mps_eps=None`` makes the MPS step exact, so that ``hooi_ranks`` alone
    decide (even ``1.0`` drops values with an energy share below ``ENERGY_SLACK``, see
    :func:`tmps.decompose.tt.energy_rank`).
    """
    validate_tensor(tensor)
    if tensor.ndim != 3:
        raise ValueError(f"tucker_mps_tensor needs a 3-way tensor, got shape {tuple(tensor.shape)}")
    if mps_eps is not None:
        mps_eps = validate_eps(mps_eps, "mps_eps")
    hooi_ranks = validate_ranks(list(hooi_ranks), tensor.shape, "hooi_ranks")
    out_dtype = tensor.dtype
    work_dtype = compute_dtype or (torch.float32 if tensor.element_size() < 4 else tensor.dtype)

    # Step 1: MPS by TT-SVD with the energy threshold.
    c1, c2, c3 = tt_svd(tensor.to(work_dtype), eps=mps_eps).cores
    s1, s2 = c2.shape[0], c2.shape[2]

    # Step 2: HOOI on the middle core, ranks clipped to what the MPS kept.
    ranks = [min(hooi_ranks[0], s1), min(hooi_ranks[1], tensor.shape[1]), min(hooi_ranks[2], s2)]
    inner = hooi(c2, ranks, n_iter_max=n_iter_max)

    # Step 3: fold the outer MPS cores into orthonormal Tucker factors.
    u1 = c1[0] @ inner.factors[0]
    u2 = inner.factors[1]
    q3, r3 = torch.linalg.qr(c3[:, :, 0].T @ inner.factors[2])
    core = mode_dot(inner.core, r3, 2)
    tucker = TuckerTensor(core.to(out_dtype), [u1.to(out_dtype), u2.to(out_dtype), q3.to(out_dtype)], [0, 1, 2])
    return tucker, (s1, s2)


def tucker_mps(
    matrix: torch.Tensor,
    mps_eps: float = 0.99,
    hooi_ranks: Sequence[int] = (6, 6, 8),
    tensor_shape: Sequence[int] | None = None,
    n_iter_max: int = 50,
    compute_dtype: torch.dtype | None = None,
) -> TuckerMPS:
    """The prototype's combined MPS + HOOI compression of a matrix ``(m, n)``.

    The matrix is reshaped row-major to ``tensor_shape`` (default :func:`default_tensor_shape`,
    ``(64, 64, 144)`` for 768 × 768), decomposed by :func:`tucker_mps_tensor`, and kept as a
    Tucker tensor; ``result.to_matrix()`` rebuilds the ``(m, n)`` approximation.
    """
    validate_tensor(matrix, "matrix")
    if matrix.ndim != 2:
        raise ValueError(f"tucker_mps needs a matrix, got shape {tuple(matrix.shape)}; use tucker_mps_tensor for 3-way tensors")
    m, n = matrix.shape
    shape = tuple(tensor_shape) if tensor_shape is not None else default_tensor_shape(m, n)
    if len(shape) != 3 or shape[0] * shape[1] * shape[2] != m * n:
        raise ValueError(f"tensor_shape {shape} must have 3 modes whose product is {m}·{n} = {m * n}")
    tucker, mps_ranks = tucker_mps_tensor(matrix.reshape(shape), mps_eps, hooi_ranks, n_iter_max, compute_dtype)
    return TuckerMPS(tucker, (m, n), mps_ranks)


def combined_mps_hooi_compression(matrix: torch.Tensor, mps_eps: float = 0.99,
                                  hooi_ranks: Sequence[int] = (6, 6, 8), **kwargs) -> TuckerMPS:
    """The prototype's name for :func:`tucker_mps` (any matrix size, not only 768 × 768)."""
    return tucker_mps(matrix, mps_eps=mps_eps, hooi_ranks=hooi_ranks, **kwargs)
