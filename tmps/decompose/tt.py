"""Matrix product states (tensor trains) by TT-SVD (Oseledets, "Tensor-Train Decomposition", 2011).

An order-N tensor is written as a chain of order-3 cores

    X[i_1, …, i_N] = G_1[:, i_1, :] G_2[:, i_2, :] … G_N[:, i_N, :],   G_k: (r_{k-1}, I_k, r_k),

with boundary ranks ``r_0 = r_N = 1``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._linalg import truncated_svd
from ._validate import validate_eps, validate_tensor

__all__ = ["TTTensor", "tt_svd", "tt_to_tensor", "energy_rank", "tt_error_bound"]


@dataclass
class TTTensor:
    """A tensor train: ``cores[k]`` has shape ``(r_{k-1}, I_k, r_k)`` with ``r_0 = r_N = 1``."""

    cores: list[torch.Tensor]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(c.shape[1] for c in self.cores)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (1,) + tuple(c.shape[2] for c in self.cores)

    def num_parameters(self) -> int:
        return sum(c.numel() for c in self.cores)

    def to_tensor(self) -> torch.Tensor:
        return tt_to_tensor(self)

    def __iter__(self):
        return iter(self.cores)

    def __len__(self) -> int:
        return len(self.cores)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.cores[k]


def tt_to_tensor(tt: TTTensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract the cores left to right into the full tensor of shape ``(I_1, …, I_N)``."""
    cores = tt.cores if isinstance(tt, TTTensor) else list(tt)
    shape = [c.shape[1] for c in cores]
    result = cores[0].reshape(cores[0].shape[1], cores[0].shape[2])
    for core in cores[1:]:
        result = result @ core.reshape(core.shape[0], -1)
        result = result.reshape(-1, core.shape[2])
    return result.reshape(shape)


# Energy share below which the tail counts as rounding noise: eps = 1.0 keeps every value whose
# share of the energy is above it (σ_i above about 1e-6 ‖σ‖), not the float noise of an exactly rank-deficient
# unfolding. It also shields the comparison from the rounding of the cumulative sum.
ENERGY_SLACK = 1e-12


def energy_rank(singular_values: torch.Tensor, eps: float) -> int:
    """Fewest leading singular values whose squared sum reaches ``eps − ENERGY_SLACK`` of the total energy.

    ``r = min{ r : Σ_{i≤r} σ_i² ≥ (eps − ENERGY_SLACK) · Σ_i σ_i² }`` (at least 1). The discarded
    energy is then at most ``(1 − eps + ENERGY_SLACK) Σ σ_i²``; at ``eps = 1.0`` values with an energy
    share below ``ENERGY_SLACK`` (e.g. ``σ = 1e-7 σ_1``) are dropped too.
    """
    energy = singular_values.double().pow(2)
    total = energy.sum()
    if total <= 0:
        return 1
    cumulative = torch.cumsum(energy, 0) / total
    return max(1, int((cumulative < eps - ENERGY_SLACK).sum().item()) + 1)


def _tt_rank(singular_values: torch.Tensor, eps: float | None, bound: int | None) -> int:
    """The rank kept at one TT-SVD step: the ``eps`` energy rule, then the ``max_rank`` bound."""
    rank = singular_values.numel() if eps is None else energy_rank(singular_values, eps)
    return rank if bound is None else min(rank, bound)


def tt_svd(
    tensor: torch.Tensor,
    eps: float | None = None,
    max_rank: int | Sequence[int] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> TTTensor:
    """TT-SVD: sequential truncated SVDs of the unfoldings, left to right.

    Parameters
    ----------
    tensor : torch.Tensor
        Order-N floating tensor of shape ``(I_1, …, I_N)``, N >= 2.
    eps : float in (0, 1], optional
        Energy kept at each unfolding (the prototype's ``mps_eps``; higher keeps more). At step k,
        with singular values ``σ`` of the current ``(r_{k-1} I_k) × (I_{k+1}…I_N)`` unfolding,
        keep the fewest ``r_k`` with ``Σ_{i≤r_k} σ_i² ≥ eps Σ σ_i²`` (up to ``ENERGY_SLACK``, see
        :func:`energy_rank`). Each step discards at most ``(1 − eps + ENERGY_SLACK)‖X‖²`` and the
        discarded parts are orthogonal, so ``‖X − X̂‖_F / ‖X‖_F ≤ tt_error_bound(N, eps)``
        ``= sqrt((N − 1)(1 − eps + ENERGY_SLACK))``: eps = 1.0 is exact to about 1e-6, not exactly.
    max_rank : int or sequence of N-1 ints, optional
        Upper bound on each internal rank ``r_1 … r_{N-1}`` (applied after ``eps``).
        With neither ``eps`` nor ``max_rank`` the decomposition is exact.
    compute_dtype : torch.dtype, optional
        Compute in this dtype and cast the cores back (half precision is computed in float32).

    Returns
    -------
    TTTensor
        Cores ``(r_{k-1}, I_k, r_k)``; all but the last are left-orthonormal, with the sign
        convention of :func:`fix_signs` on each left factor.
    """
    validate_tensor(tensor, min_order=2)
    if eps is not None:
        eps = validate_eps(eps, "eps")
    order = tensor.ndim
    if max_rank is None:
        bounds = [None] * (order - 1)
    elif isinstance(max_rank, int):
        bounds = [max_rank] * (order - 1)
    else:
        bounds = list(max_rank)
        if len(bounds) != order - 1:
            raise ValueError(f"max_rank needs {order - 1} internal ranks for an order-{order} tensor, got {len(bounds)}")
    for b in bounds:
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"max_rank entries must be positive integers, got {max_rank!r}")

    out_dtype = tensor.dtype
    work_dtype = compute_dtype or (torch.float32 if tensor.element_size() < 4 else tensor.dtype)
    shape = tensor.shape
    remainder = tensor.to(work_dtype).reshape(shape[0], -1)
    cores, rank = [], 1
    for k in range(order - 1):
        remainder = remainder.reshape(rank * shape[k], -1)
        u, _, remainder = truncated_svd(remainder, lambda s, k=k: _tt_rank(s, eps, bounds[k]))
        new_rank = u.shape[1]
        cores.append(u.reshape(rank, shape[k], new_rank).to(out_dtype))
        rank = new_rank
    cores.append(remainder.reshape(rank, shape[-1], 1).to(out_dtype))
    return TTTensor(cores)


def tt_error_bound(order: int, eps: float) -> float:
    """The relative error bound ``sqrt((order − 1)(1 − eps + ENERGY_SLACK))`` of :func:`tt_svd` with ``eps``."""
    return math.sqrt((order - 1) * (1.0 - eps + ENERGY_SLACK))
