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


def latent_rope_scores_for(device: torch.device, backend: str = "auto", rows: int = 1):
    """The fused RoPE key-score kernel for kv mode's latent attention, or None for the torch chain.

    backend: "auto" (the kernel on CUDA when Triton runs there and the ``rows`` query rows per key
    head fit it), "torch" or "triton" (the kernel, or a RuntimeError saying why it cannot run) -- the
    same switch as ``FactoredProjection.backend``.
    """
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return None
    try:
        from tmps.kernels.latent_scores import MAX_ROWS, latent_rope_scores, triton_available
    except Exception:  # triton missing or broken: the torch chain serves
        latent_rope_scores, triton_available, MAX_ROWS = None, lambda device: False, 0
    if triton_available(device) and (backend == "triton" or rows <= MAX_ROWS):
        return latent_rope_scores
    if backend == "auto":
        return None
    raise RuntimeError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1) and triton installed")
