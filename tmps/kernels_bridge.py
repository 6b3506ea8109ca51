"""The one place the library touches the Triton kernels, so that a machine without triton still imports tmps."""
from __future__ import annotations

import torch


def triton_path_available(device: torch.device) -> bool:
    """True when the fused kernel can run on ``device`` (CUDA with triton, or the interpreter when asked)."""
    try:
        from tmps.kernels.fused_projection import triton_available
    except Exception:  # triton missing or broken: the torch path serves
        return False
    return triton_available(device)


def fused_factored_projection(x, in_factor, cores, out_factors, biases):
    from tmps.kernels.fused_projection import fused_factored_projection as kernel

    return kernel(x, in_factor, cores, out_factors, biases)
