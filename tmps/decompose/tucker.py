"""Tucker decomposition by higher-order orthogonal iteration (HOOI).

A Tucker decomposition writes an order-N tensor as a core multiplied by one factor per mode
(Kolda & Bader, "Tensor Decompositions and Applications", SIAM Review 2009, §4):

    X ≈ G ×₁ U₁ ×₂ U₂ … ×_N U_N,   U_n: (X.shape[n], r_n) with orthonormal columns.

A *partial* Tucker compresses only some modes; the core keeps the full size of the others.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._linalg import leading_left_singular_vectors, multi_mode_dot, unfold
from ._validate import validate_modes, validate_ranks, validate_tensor

__all__ = ["TuckerTensor", "hooi", "tucker_to_tensor"]


@dataclass
class TuckerTensor:
    """A (partial) Tucker tensor.

    Attributes
    ----------
    core : torch.Tensor
        Shape ``(…, r_n, …)``: ``r_n`` on compressed modes, the full dimension elsewhere.
    factors : list[torch.Tensor]
        ``factors[i]`` has shape ``(shape[modes[i]], r_{modes[i]})`` with orthonormal columns.
    modes : list[int]
        The compressed modes, in the order of ``factors``.
    """

    core: torch.Tensor
    factors: list[torch.Tensor]
    modes: list[int]

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.core.shape)
        for factor, mode in zip(self.factors, self.modes):
            shape[mode] = factor.shape[0]
        return tuple(shape)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(self.core.shape)

    def num_parameters(self) -> int:
        """Numbers stored: the core plus every factor."""
        return self.core.numel() + sum(f.numel() for f in self.factors)

    def to_tensor(self) -> torch.Tensor:
        return tucker_to_tensor(self)


def tucker_to_tensor(tucker: TuckerTensor) -> torch.Tensor:
    """Rebuild the full tensor ``G ×_{m} U_m`` for every compressed mode ``m``."""
    return multi_mode_dot(tucker.core, tucker.factors, tucker.modes)


def hooi(
    tensor: torch.Tensor,
    ranks: Sequence[int] | int,
    modes: Sequence[int] | None = None,
    n_iter_max: int = 100,
    tol: float = 1e-5,
    init: str = "svd",
    compute_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> TuckerTensor:
    """Tucker decomposition by higher-order orthogonal iteration (Kolda & Bader 2009, Fig. 4.4).

    Parameters
    ----------
    tensor : torch.Tensor
        Order-N floating tensor of shape ``(I_1, …, I_N)``, on any device.
    ranks : sequence of int or int
        One rank per compressed mode (``len(ranks) == len(modes)``), each ``1 <= r <= I_mode``.
        An int uses the same rank for every compressed mode.
    modes : sequence of int, optional
        The modes to compress (partial Tucker). Default: all modes.
    n_iter_max : int
        Maximum number of HOOI sweeps.
    tol : float
        Stop when the relative reconstruction error changes by less than ``tol`` between sweeps.
    init : {"svd", "random"}
        ``"svd"`` starts from the truncated HOSVD; ``"random"`` from random orthonormal factors.
    compute_dtype : torch.dtype, optional
        Compute in this dtype (e.g. ``torch.float64``) and cast the result back to ``tensor.dtype``.
        Half-precision inputs are always computed in float32.
    seed : int
        Seed for ``init="random"``.

    Returns
    -------
    TuckerTensor
        ``core`` of shape ``ranks`` on the compressed modes (full size elsewhere) and orthonormal
        ``factors[i]`` of shape ``(I_{modes[i]}, ranks[i])``, columns sign-fixed so that each
        column's largest-magnitude entry is positive.

    Notes
    -----
    Each sweep updates one factor at a time: with the other factors fixed, the best ``U_n`` is
    the leading ``r_n`` left singular vectors of the mode-n unfolding of
    ``Y = X ×_{m≠n} U_mᵀ``. After the HOSVD start these are found by subspace iteration warm
    started from the previous sweep's factor (see :func:`leading_left_singular_vectors`), which is
    what makes this faster than an SVD per step at the same fixed point. Since the factors are orthonormal the error is
    ``‖X − X̂‖² = ‖X‖² − ‖G‖²``, which is what the stopping rule monitors.
    """
    validate_tensor(tensor)
    modes = validate_modes(modes, tensor.ndim)
    if isinstance(ranks, int):
        ranks = [ranks] * len(modes)
    ranks = validate_ranks(ranks, [tensor.shape[m] for m in modes])
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    if n_iter_max < 0:
        raise ValueError(f"n_iter_max must be >= 0, got {n_iter_max}")

    out_dtype = tensor.dtype
    work_dtype = compute_dtype or (torch.float32 if tensor.element_size() < 4 else tensor.dtype)
    x = tensor.to(work_dtype)
    norm_sq = x.pow(2).sum()

    # Step 1: initial factors (truncated HOSVD, or random orthonormal).
    if init == "svd":
        factors = [leading_left_singular_vectors(unfold(x, m), r)[0] for m, r in zip(modes, ranks)]
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        factors = [
            torch.linalg.qr(torch.randn(x.shape[m], r, generator=gen, dtype=work_dtype))[0].to(x.device)
            for m, r in zip(modes, ranks)
        ]

    # Step 2: alternate over modes until the error stops improving.
    previous_error = None
    for _ in range(n_iter_max):
        for i, mode in enumerate(modes):
            others = [j for j in range(len(modes)) if j != i]
            y = multi_mode_dot(x, [factors[j] for j in others], [modes[j] for j in others], transpose=True)
            factors[i] = leading_left_singular_vectors(unfold(y, mode), ranks[i], warm_start=factors[i])[0]
        core = multi_mode_dot(x, factors, modes, transpose=True)
        error = torch.sqrt((norm_sq - core.pow(2).sum()).clamp_min(0) / norm_sq.clamp_min(1e-300)).item()
        if previous_error is not None and abs(previous_error - error) < tol:
            break
        previous_error = error

    core = multi_mode_dot(x, factors, modes, transpose=True)
    return TuckerTensor(core.to(out_dtype), [f.to(out_dtype) for f in factors], list(modes))
