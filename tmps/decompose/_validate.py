"""Small input checks shared by the decompositions; each raises a ValueError that names the problem."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def validate_tensor(tensor: torch.Tensor, name: str = "tensor", min_order: int = 1) -> None:
    """Check that ``tensor`` is a finite floating-point torch tensor of order >= ``min_order``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}; convert it with .float()")
    if tensor.ndim < min_order:
        raise ValueError(f"{name} must have at least {min_order} modes, got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)})")
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise ValueError(f"{name} has {bad} NaN/Inf entries; clean the input before decomposing it")


def validate_ranks(ranks: Sequence[int] | int, dims: Sequence[int], name: str = "ranks") -> list[int]:
    """Return ``ranks`` as a list with one positive rank per dimension, each at most that dimension."""
    if isinstance(ranks, int):
        ranks = [ranks] * len(dims)
    ranks = list(ranks)
    if len(ranks) != len(dims):
        raise ValueError(f"{name} has {len(ranks)} entries but {len(dims)} are needed (dims {tuple(dims)})")
    for i, (r, n) in enumerate(zip(ranks, dims)):
        if isinstance(r, bool) or not isinstance(r, int):
            raise ValueError(f"{name}[{i}] must be an int, got {r!r}")
        if r < 1:
            raise ValueError(f"{name}[{i}] = {r} must be a positive integer")
        if r > n:
            raise ValueError(f"{name}[{i}] = {r} exceeds the dimension {n}; use a rank <= {n}")
    return ranks


def validate_eps(eps: float, name: str = "eps") -> float:
    """Check that an energy fraction lies in (0, 1]."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"{name} must be a number in (0, 1], got {eps!r}")
    if not 0.0 < float(eps) <= 1.0:
        raise ValueError(f"{name} = {eps} is outside (0, 1]; it is the fraction of energy kept, e.g. 0.99")
    return float(eps)


def validate_modes(modes: Sequence[int] | None, order: int) -> list[int]:
    """Return the sorted list of distinct modes to compress (all modes when ``modes`` is None)."""
    if modes is None:
        return list(range(order))
    modes = list(modes)
    if not modes:
        raise ValueError("modes is empty; give at least one mode to compress, or None for all")
    for m in modes:
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < order:
            raise ValueError(f"mode {m!r} is not a mode of an order-{order} tensor (valid: 0..{order - 1})")
    if len(set(modes)) != len(modes):
        raise ValueError(f"modes {modes} repeat a mode")
    return sorted(modes)
