"""Activation-aware (input-weighted) low rank: minimise the output error, not the weight error.

For a linear map ``y = x Wᵀ`` with ``W: (m, n)`` and calibration inputs ``X: (N, n)`` the error
that matters is ``‖X (W − Ŵ)ᵀ‖_F``. With ``C = Xᵀ X = L Lᵀ``,

    ‖X (W − Ŵ)ᵀ‖_F = ‖(W − Ŵ) L‖_F,

so a decomposition of the *whitened* matrix ``W L`` that is optimal in Frobenius norm is optimal in
output error once mapped back by ``L⁻¹``. ``L = Q Λ^{1/2}`` comes from the eigen-decomposition
``C = Q Λ Qᵀ``; eigenvalues below ``damping · mean(Λ)`` are raised to it, so ``L`` stays
invertible for rank-deficient calibration data and a full-rank decomposition is still exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validate import validate_tensor

__all__ = ["InputMetric", "input_metric", "weighted_svd", "relative_output_error"]


@dataclass
class InputMetric:
    """``sqrt`` is ``L: (n, n)`` with ``L Lᵀ = C``; ``inv_sqrt`` is ``L⁻¹``. Float64."""

    sqrt: torch.Tensor
    inv_sqrt: torch.Tensor

    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        """``W L``: ``(m, n) -> (m, n)``, in float64."""
        return weight.to(self.sqrt) @ self.sqrt

    def input_factor(self, right_vectors: torch.Tensor) -> torch.Tensor:
        """Map right factors ``V: (n, r)`` of ``W L`` to input factors ``L⁻ᵀ V`` acting on raw ``x``."""
        return self.inv_sqrt.T @ right_vectors.to(self.inv_sqrt)


def input_metric(covariance: torch.Tensor, damping: float = 1e-6) -> InputMetric:
    """Build the whitening ``L`` of a covariance ``C: (n, n)`` (symmetric PSD), computed in float64."""
    validate_tensor(covariance, "covariance", min_order=2)
    if covariance.ndim != 2 or covariance.shape[0] != covariance.shape[1]:
        raise ValueError(f"covariance must be a square matrix, got shape {tuple(covariance.shape)}")
    if not damping > 0:
        raise ValueError(f"damping must be positive, got {damping}")
    c = covariance.double()
    c = (c + c.T) / 2
    evals, evecs = torch.linalg.eigh(c)
    mean = evals.clamp_min(0).mean()
    if mean <= 0:
        raise ValueError("covariance is zero: the calibration inputs carry no signal (all zeros?)")
    evals = evals.clamp_min(damping * mean)
    root = evals.sqrt()
    return InputMetric(sqrt=evecs * root, inv_sqrt=(evecs / root).T)


def weighted_svd(weight: torch.Tensor, metric: InputMetric, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` ``W ≈ A Bᵀ`` minimising ``‖X (W − A Bᵀ)ᵀ‖``; returns ``A: (m, r)``, ``B: (n, r)``.

    ``W L = U S Vᵀ`` truncated to ``r``; ``A = U_r S_r`` and ``B = L⁻ᵀ V_r``, so ``x Ŵᵀ = (x B) Aᵀ``.
    Factors are returned in ``weight.dtype``.
    """
    validate_tensor(weight, "weight", min_order=2)
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank {rank} must be in [1, {min(weight.shape)}] for a weight of shape {tuple(weight.shape)}")
    u, s, vh = torch.linalg.svd(metric.whiten(weight), full_matrices=False)
    out_factor = u[:, :rank] * s[:rank]
    in_factor = metric.input_factor(vh[:rank].T)
    return out_factor.to(weight.dtype), in_factor.to(weight.dtype)


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, covariance: torch.Tensor) -> float:
    """``sqrt(tr(E C Eᵀ) / tr(W C Wᵀ))`` with ``E = W − Ŵ``: relative output error over the calibration inputs."""
    c = covariance.double()
    e = (weight - approx).double()
    w = weight.double()
    return float(torch.sqrt(torch.einsum("ij,jk,ik->", e, c, e) / torch.einsum("ij,jk,ik->", w, c, w)))
