"""Rotary position embedding in Hugging Face's ``rotate_half`` convention (pairs ``(j, j + d/2)``)."""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``R x = x·cos + rotate_half(x)·sin``, with ``cos, sin`` broadcasting against ``x`` (last dim head_dim)."""
    return x * cos + rotate_half(x) * sin
